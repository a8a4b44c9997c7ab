"""The task's bookkeeping, run in-process on a real SQLite database and the embedded broker:
unclaimable messages, failures a user can fix, dependents, dead runs, and the `icd` CLI plumbing."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from store.db import upgrade_database
from store.jobs import create_job, get_job, request_cancel
from store.settings import get_settings
from worker.supervisor import WorkerSpec

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def sessions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """ICD_* pointing at tmp_path; the worker's per-process engine rebuilt for it."""
    from worker import db

    monkeypatch.setenv("ICD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ICD_DATABASE_URL", f"sqlite:///{tmp_path / 'icd.db'}")
    monkeypatch.setenv("ICD_BROKER_URL", f"sqla+sqlite:///{tmp_path / 'broker.db'}")
    get_settings.cache_clear()
    db.dispose()
    upgrade_database(get_settings().database_url)
    yield db.sessions()
    db.dispose()
    get_settings.cache_clear()


def _spec(kind: str, **extra: Any) -> dict[str, Any]:
    model = {"detector": "retinanet", "backbone": "resnet18", "fpn_channels": 32, "levels": ["p3", "p4", "p5"]}
    data = {
        "train": {"format": "shapes", "num_images": 4, "image_size": 64, "max_object": 32},
        "val": {"format": "shapes", "num_images": 2, "image_size": 64, "seed": 1, "max_object": 32},
        "min_size": 64,
        "max_size": 64,
        "workers": 0,
    }
    spec: dict[str, Any] = {
        "kind": kind,
        "name": kind,
        "device": "cpu",
        "data": data,
        "schedule": {"iterations": 2, "batch_size": 2},
    }
    if kind == "distill":
        spec.update(teacher={**model, "checkpoint": extra.pop("teacher_ref")}, student=model)
    else:
        spec["model"] = model
    spec.update(extra)
    return spec


def test_missing_teacher_checkpoint_fails_the_job_and_its_dependents(sessions: Any) -> None:
    from worker.run_job import execute_job

    with sessions() as s:
        teacher = create_job(s, _spec("train"), "train", "teacher", "cpu", [])
        teacher.status = "succeeded"  # succeeded, but without a final checkpoint on record
        s.commit()
        student = create_job(s, _spec("distill", teacher_ref=f"job:{teacher.id}"), "distill", "s", "cpu", [])
        waiting = create_job(
            s, _spec("distill", teacher_ref=f"job:{student.id}"), "distill", "w", "cpu", [student.id], status="waiting"
        )

    assert execute_job(student.id, "w@h") == "failed"
    with sessions() as s:
        job = get_job(s, student.id)
        assert job is not None and job.status == "failed" and job.attempt == 1
        assert f"job:{teacher.id}" in job.error and "no final checkpoint" in job.error
        assert "FileNotFoundError" in job.error
        dep = get_job(s, waiting.id)
        assert dep is not None and dep.status == "failed" and f"job {student.id} failed" in dep.error
    log = (Path(get_settings().artifact_root) / "jobs" / str(student.id) / "job.log").read_text()
    assert "Traceback" in log and "FileNotFoundError" in log


def test_unclaimable_messages_change_nothing(sessions: Any) -> None:
    from worker.run_job import execute_job

    with sessions() as s:
        job = create_job(s, _spec("train"), "train", "t", "cpu", [])
        request_cancel(s, job.id)
    assert execute_job(job.id, "w@h") == "canceled"
    assert execute_job(999, "w@h") == "missing"
    with sessions() as s:
        again = get_job(s, job.id)
        assert again is not None and again.status == "canceled" and again.attempt == 0


def test_a_run_that_died_with_its_process_is_requeued_on_redelivery(sessions: Any) -> None:
    from store.jobs import claim_job
    from worker.run_job import execute_job

    with sessions() as s:
        job = create_job(s, _spec("train"), "train", "t", "cpu", [])
        claim_job(s, job.id, "w@h", lease_s=3600)
    assert execute_job(job.id, "other@h") == "running"  # someone else's live run: leave it alone
    # The same name again: the process that ran it is gone (one job at a time), so it resumes.
    assert execute_job(job.id, "w@h") == "reaped"
    with sessions() as s:
        dead = get_job(s, job.id)
        assert dead is not None and dead.status == "queued" and dead.attempt == 1
        assert dead.attempts[0].status == "lost" and "worker w@h lost at step 0" in dead.attempts[0].error


def test_a_broken_study_spec_fails_with_the_fields_named(sessions: Any) -> None:
    from worker.run_job import execute_job

    with sessions() as s:
        job = create_job(s, {"kind": "study"}, "study", "st", "any", [])
    assert execute_job(job.id, "w@h") == "failed"
    with sessions() as s:
        failed = get_job(s, job.id)
        assert failed is not None and failed.status == "failed"
        assert "teacher" in failed.error and "fix the spec" in failed.error


def test_failure_messages_say_what_to_change() -> None:
    from icd_core.engine.callbacks import TrainingDiverged
    from worker.outcome import failure_message

    oom = failure_message(3, RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), step=7)
    assert oom.startswith("out of GPU memory at batch 7: lower schedule.batch_size or data.max_size")
    assert "RuntimeError" in oom
    div = failure_message(3, TrainingDiverged(5, {"loss": float("nan")}))
    assert "schedule.lr" in div and "TrainingDiverged" in div
    bad = failure_message(3, ValueError("data.val: categories differ"))
    assert bad.startswith("data.val: categories differ") and "ValueError" in bad
    other = failure_message(3, KeyError("boom"))
    assert "KeyError" in other and "see /jobs/3/logs" in other


def test_icd_worker_plans_one_process_per_gpu() -> None:
    import click

    from icd_cli.service import plan_workers

    specs = plan_workers("0,1", False, None, None, "host")
    assert [(w.name, w.queues, w.env) for w in specs] == [
        ("gpu0@host", "cuda,any", {"CUDA_VISIBLE_DEVICES": "0"}),
        ("gpu1@host", "cuda,any", {"CUDA_VISIBLE_DEVICES": "1"}),
    ]
    cpu = plan_workers(None, True, None, None, "host")
    assert [(w.name, w.queues, w.env) for w in cpu] == [("cpu@host", "cpu,any", {"CUDA_VISIBLE_DEVICES": ""})]
    assert "--pool" in cpu[0].command() and "solo" in cpu[0].command()
    with pytest.raises(click.UsageError):
        plan_workers("0", True, None, None, "host")
    with pytest.raises(click.BadParameter):
        plan_workers("0,0", False, None, None, "host")


def test_icd_service_commands_never_import_torch(tmp_path: Path) -> None:
    """The parent of GPU workers must not be able to touch CUDA: torch is not even imported."""
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from icd_cli.main import main\n"
        "import worker.app, worker.tasks\n"
        "for args in (['serve', '--help'], ['worker', '--help'], ['db', 'upgrade'], ['db', 'current']):\n"
        "    r = CliRunner().invoke(main, args)\n"
        "    assert r.exit_code == 0, (args, r.output)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    env = {"PATH": "/usr/bin:/bin", "ICD_HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_icd_db_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from icd_cli.main import main

    monkeypatch.setenv("ICD_HOME", str(tmp_path))
    monkeypatch.delenv("ICD_DATABASE_URL", raising=False)
    runner = CliRunner()
    before = runner.invoke(main, ["db", "current"])
    assert before.exit_code == 1 and "<empty>" in before.output
    assert runner.invoke(main, ["db", "upgrade"]).exit_code == 0
    after = runner.invoke(main, ["db", "current"])
    assert after.exit_code == 0, after.output
    get_settings.cache_clear()


def test_a_worker_refuses_an_unmigrated_database(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "ICD_HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        WorkerSpec(name="unmigrated@localhost", queues="cpu,any", loglevel="WARNING").command(),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode != 0
    assert "run: icd db upgrade" in out.stdout + out.stderr
