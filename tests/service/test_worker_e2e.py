"""End to end with real parts: a real `celery worker` process on the real Redis broker (and, in the
second test, `icd serve` in embedded mode as a user starts it), the real API, real training.

The jobs are tiny (64 px shapes images, 4 iterations of a 32-channel RetinaNet-R18) so the whole
module runs in about a minute on two CPU cores.
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import (
    REDIS_DB,
    REPO,
    TINY_MODEL,
    free_port,
    service_env,
    stop_process,
    tiny_distill_spec,
    tiny_study_spec,
    tiny_train_spec,
    wait_for,
)
from tests.helpers import flushed_redis_url as redis_url
from worker.supervisor import WorkerSpec
from worker.threads import choose_threads

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def wait_status(client: Any, job_id: int, statuses: set[str], timeout: float = 300) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        if job["status"] in ("failed", "canceled", "succeeded") and job["status"] not in statuses:
            raise AssertionError(f"job {job_id} ended {job['status']}: {job.get('error')}")
        return None

    return wait_for(done, timeout, f"job {job_id} to reach {statuses}")


def check_final_checkpoint(client: Any, job_id: int) -> None:
    """The final checkpoint is listed, streams with Content-Length, and its bytes hash to the sha256
    in the header and in the database."""
    listed = client.get(f"/jobs/{job_id}/checkpoints").json()
    final = [c for c in listed if c["final"]]
    assert final, listed
    ck = final[0]
    r = client.get(f"/jobs/{job_id}/checkpoints/{ck['name']}")
    assert r.status_code == 200
    digest = hashlib.sha256(r.content).hexdigest()
    assert digest == r.headers["x-checkpoint-sha256"] == ck["sha256"]
    assert int(r.headers["content-length"]) == len(r.content) == ck["size_bytes"]


# --- a real Celery worker on Redis ----------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Path]]:
    """(TestClient on the API, worker log path) with a `celery -A worker.app worker` subprocess."""
    from fastapi.testclient import TestClient

    from api.main import create_app
    from store.settings import Settings

    tmp = tmp_path_factory.mktemp("e2e_redis")
    broker = redis_url()
    env = service_env(
        tmp, ICD_DATABASE_URL=f"sqlite:///{tmp / 'icd.db'}", ICD_BROKER_URL=broker, ICD_REDELIVER_AFTER_S="3"
    )
    settings = Settings(
        home=tmp / "home",
        database_url=env["ICD_DATABASE_URL"],
        broker_url=broker,
        worker_heartbeat_s=1.0,
        auto_migrate=True,
    )
    app = create_app(settings)  # migrates the database before the worker starts
    log_path = tmp / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            WorkerSpec(name="e2e@localhost", queues="cpu,any", loglevel="INFO").command(),
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        with TestClient(app) as client:
            wait_for(lambda: client.get("/workers").json() or worker.poll() is not None, 120, "a live worker")
            assert worker.poll() is None, log_path.read_text()[-3000:]
            yield client, log_path
    finally:
        stop_process(worker)
        app.state.engine.dispose()


@pytest.mark.redis
def test_train_then_distill_waiting_on_it(redis_stack: tuple[Any, Path]) -> None:
    client, log_path = redis_stack
    workers = client.get("/workers").json()
    assert workers[0]["name"] == "e2e@localhost" and workers[0]["device"] == "cpu"

    r = client.post("/jobs", json=tiny_train_spec())
    assert r.status_code == 201, r.text
    teacher = r.json()
    assert r.headers["location"] == f"/jobs/{teacher['id']}"
    r = client.post("/jobs", json=tiny_distill_spec(f"job:{teacher['id']}"))
    assert r.status_code == 201, r.text
    student = r.json()
    assert student["status"] == "waiting"  # the teacher is still queued or running

    try:
        t = wait_status(client, teacher["id"], {"succeeded"})
        s = wait_status(client, student["id"], {"succeeded"})
    except AssertionError:
        import redis

        r7 = redis.Redis.from_url(f"redis://127.0.0.1:6379/{REDIS_DB}")
        print({k: r7.type(k) for k in r7.keys()}, r7.llen("cpu"), r7.llen("any"), r7.hlen("unacked"))
        print(client.get("/jobs").json())
        print(log_path.read_text()[-5000:])
        raise
    for job in (t, s):
        assert job["attempt"] == 1 and job["worker"] == "e2e@localhost"
        assert job["progress_step"] == job["progress_total"] == 4
        assert job["final_metrics"] and "AP" in {k.upper() for k in job["final_metrics"]}
        metrics = client.get(f"/jobs/{job['id']}/metrics").json()
        assert [st for st, _ in metrics["series"]["loss"]] == [1, 2, 3, 4]
        evals = client.get(f"/jobs/{job['id']}/evaluations").json()
        assert [e["step"] for e in evals] == [4] and evals[0]["ap"] is not None
        check_final_checkpoint(client, job["id"])
        log = client.get(f"/jobs/{job['id']}/logs").text
        assert f"job {job['id']} (" in log and "succeeded" in log


@pytest.mark.redis
def test_cancel_a_running_job(redis_stack: tuple[Any, Path]) -> None:
    client, _ = redis_stack
    r = client.post("/jobs", json=tiny_train_spec("long", iterations=5000, eval_every=0, checkpoint_every=0))
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    wait_for(lambda: client.get(f"/jobs/{job_id}").json()["progress_step"] > 0, 120, "training to start")
    assert client.post(f"/jobs/{job_id}/cancel").status_code == 200
    job = wait_status(client, job_id, {"canceled"}, timeout=60)
    assert job["progress_step"] < 5000
    # The stop wrote a checkpoint, so a retry resumes instead of starting over.
    assert [c for c in client.get(f"/jobs/{job_id}/checkpoints").json() if c["step"] > 0 and not c["final"]]
    workers = client.get("/workers").json()
    assert workers[0]["current_job_id"] is None


@pytest.mark.redis
def test_bad_checkpoint_path_is_rejected_at_submit(redis_stack: tuple[Any, Path]) -> None:
    client, _ = redis_stack
    spec = tiny_distill_spec("/nonexistent/teacher.pt")
    r = client.post("/jobs", json=spec)
    assert r.status_code == 422
    assert any(d.get("field") == "teacher.checkpoint" for d in r.json()["detail"]), r.json()


@pytest.mark.redis
def test_distill_jobs_measure_their_teacher_once_and_honour_teacher_min_ap(redis_stack: tuple[Any, Path]) -> None:
    """The teacher's AP shows beside the student's; the second job of the same teacher reads the cached
    evaluation (its log says so); a teacher below teacher_min_ap fails the job before a step, with its AP."""
    client, _ = redis_stack
    teacher_spec = {**tiny_train_spec("gate-teacher"), "seed": 5}  # weights no other test's teacher has
    teacher = client.post("/jobs", json=teacher_spec).json()["id"]
    ref = f"job:{teacher}"
    first = client.post("/jobs", json=tiny_distill_spec(ref, "gate-first")).json()["id"]
    a = wait_status(client, first, {"succeeded"})
    assert isinstance(a["final_metrics"]["teacher_AP"], float) and "teacher_AP50" in a["final_metrics"]
    assert "AP" in a["final_metrics"]
    log = client.get(f"/jobs/{first}/logs").text
    assert "evaluating on data.val once" in log and "reused from the teacher-evaluation cache" not in log

    second = client.post("/jobs", json={**tiny_distill_spec(ref, "gate-second"), "distill": {"method": "none"}})
    b = wait_status(client, second.json()["id"], {"succeeded"})
    assert b["final_metrics"]["teacher_AP"] == a["final_metrics"]["teacher_AP"]
    log = client.get(f"/jobs/{b['id']}/logs").text
    assert "reused from the teacher-evaluation cache" in log and "evaluating on data.val once" not in log

    weak = client.post("/jobs", json={**tiny_distill_spec(ref, "gate-weak"), "teacher_min_ap": 99.0})
    assert weak.status_code == 201, weak.text
    c = wait_status(client, weak.json()["id"], {"failed"})
    ap = a["final_metrics"]["teacher_AP"]
    assert c["error"].startswith(f"teacher AP {ap:.1f} is below teacher_min_ap 99.0"), c["error"]
    assert "lower teacher_min_ap only if this AP is expected" in c["error"]
    assert c["progress_step"] == 0 and not client.get(f"/jobs/{c['id']}/checkpoints").json()


# --- `icd serve`, embedded mode, as a user starts it ----------------------------------------------


def start_serve(home_dir: Path, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """`icd serve --port PORT` with ICD_HOME under home_dir and nothing else configured."""
    icd = [sys.executable, "-c", "from icd_cli.main import main; main()"]
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [*icd, "serve", "--port", str(port), "--stop-grace", "30"],
            cwd=home_dir,
            env=service_env(home_dir),
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def wait_healthy(client: httpx.Client, serve: subprocess.Popen[bytes], log_path: Path) -> None:
    def healthy() -> bool:
        if serve.poll() is not None:
            raise AssertionError(f"icd serve exited:\n{log_path.read_text()[-3000:]}")
        try:
            return bool(client.get("/health").json()["workers"]["ok"])
        except httpx.HTTPError:
            return False

    wait_for(healthy, 180, "icd serve to report a live worker", interval=0.5)


def test_icd_serve_embedded(tmp_path: Path) -> None:
    port, log_path = free_port(), tmp_path / "serve.log"
    serve = start_serve(tmp_path, port, log_path)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            wait_healthy(client, serve, log_path)
            # The worker runs torch on the count `icd serve` chose for it (the API beside it).
            chosen = choose_threads(None, workers=1, api_beside=True, environ=service_env(tmp_path)).threads
            assert f"torch intra-op threads {chosen} (ICD_WORKER_THREADS)" in log_path.read_text(errors="replace")
            r = client.post("/jobs", json=tiny_train_spec("embedded"))
            assert r.status_code == 201, r.text
            job = wait_status(client, r.json()["id"], {"succeeded"})
            assert job["worker"].startswith("embedded@")
            check_final_checkpoint(client, job["id"])
            assert (tmp_path / "home" / "icd.db").is_file() and (tmp_path / "home" / "broker.db").is_file()
    except AssertionError:
        print(log_path.read_text()[-5000:])
        raise
    finally:
        code = stop_process(serve, signal.SIGINT, timeout=90)
    assert code == 0, log_path.read_text()[-3000:]


def test_icd_serve_stop_requeues_the_running_job_and_the_next_start_resumes_it(tmp_path: Path) -> None:
    """Ctrl-C while training: the job is checkpointed and queued again, and the next `icd serve`
    resumes it from that checkpoint (a new attempt), instead of leaving it 'running' forever."""
    port, log_path = free_port(), tmp_path / "serve.log"
    spec = tiny_train_spec("long", iterations=5000, eval_every=0, checkpoint_every=0)
    serve = start_serve(tmp_path, port, log_path)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            wait_healthy(client, serve, log_path)
            job_id = client.post("/jobs", json=spec).json()["id"]
            wait_for(lambda: client.get(f"/jobs/{job_id}").json()["progress_step"] > 0, 120, "training to start")
        assert stop_process(serve, signal.SIGINT, timeout=90) == 0

        serve = start_serve(tmp_path, port, log_path)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            wait_healthy(client, serve, log_path)
            job = wait_for(
                lambda: (j := client.get(f"/jobs/{job_id}").json())["status"] == "running" and j["attempt"] >= 2 and j,
                120,
                "the job to run again",
            )
            first = job["attempts"][0]
            assert first["status"] == "failed" and "re-queued to resume" in first["error"]
            wait_for(lambda: "resumed from" in client.get(f"/jobs/{job_id}/logs").text, 120, "the resume in the log")
            assert client.post(f"/jobs/{job_id}/cancel").status_code == 200
            wait_status(client, job_id, {"canceled"}, timeout=60)
    except AssertionError:
        print(log_path.read_text()[-5000:])
        raise
    finally:
        code = stop_process(serve, signal.SIGINT, timeout=90)
    assert code == 0, log_path.read_text()[-3000:]


@pytest.mark.redis
def test_study_fans_out_children_and_serves_a_leaderboard(redis_stack: tuple[Any, Path]) -> None:
    import io

    from PIL import Image

    client, log_path = redis_stack
    r = client.post("/jobs", json=tiny_study_spec())
    assert r.status_code == 201, r.text
    study = r.json()
    try:
        done = wait_status(client, study["id"], {"succeeded", "failed"}, timeout=600)
    except AssertionError:
        print(client.get("/jobs").json(), log_path.read_text()[-5000:])
        raise
    assert done["status"] == "succeeded", done["error"]
    children = client.get("/jobs", params={"parent_id": study["id"]}).json()["items"]
    assert sorted(c["kind"] for c in children) == ["distill", "distill", "train"]
    assert all(c["status"] == "succeeded" for c in children)
    assert done["progress_step"] == done["progress_total"] == 3
    assert all(a["status"] != "running" for a in done["attempts"])

    report = client.get(f"/jobs/{study['id']}/report").json()
    assert {m["method"] for m in report["methods"]} == {"none", "icd"}
    assert report["teacher"] is not None and "AP" in report["teacher"]
    assert "| icd" in client.get(f"/jobs/{study['id']}/report.md").text
    # both children ran on the same code, data and teacher: listed once, no warning
    lineage = report["lineage"]
    assert lineage["differs"] == [] and not lineage["not_recorded"], lineage
    teacher_sha = next(e for e in lineage["keys"] if e["key"] == "teacher_sha256")["values"][0]["value"]
    teacher_job = next(c for c in children if c["kind"] == "train")
    final = next(c for c in client.get(f"/jobs/{teacher_job['id']}/checkpoints").json() if c["final"])
    assert teacher_sha == final["sha256"]
    assert "## Lineage" in client.get(f"/jobs/{study['id']}/report.md").text
    png = client.get(f"/jobs/{study['id']}/report.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size[0] > 0
    assert set(done["final_metrics"]) == {"AP_none", "AP_icd"}


@pytest.mark.redis
def test_incompatible_study_is_rejected_at_submit(redis_stack: tuple[Any, Path]) -> None:
    client, _ = redis_stack
    spec = tiny_study_spec()
    spec["student"] = {**TINY_MODEL, "fpn_channels": 64}  # inherit needs matching necks
    r = client.post("/jobs", json=spec)
    assert r.status_code == 422, r.text
    assert "inherit" in r.text


@pytest.mark.redis
def test_a_queued_job_whose_message_was_lost_still_runs(redis_stack: tuple[Any, Path]) -> None:
    """The database is the source of truth: an idle worker re-sends a job the broker never delivered."""
    from store.jobs import create_job

    client, _ = redis_stack
    with client.app.state.sessions() as s:  # queued in the database, but no message is ever published
        job = create_job(
            s,
            tiny_train_spec("lost-message", iterations=1, eval_every=0, checkpoint_every=0),
            "train",
            "lost-message",
            "any",
        )
    done = wait_status(client, job.id, {"succeeded", "failed"}, timeout=120)
    assert done["status"] == "succeeded", done["error"]
