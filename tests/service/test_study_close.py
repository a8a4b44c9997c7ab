"""Closing a study is one guarded transition: the last child's task and another worker's sweep may both
try at once, on a real database, and exactly one of them writes the report and logs the outcome."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session

from store import jobs as q
from store.artifacts import ArtifactStore
from store.db import make_engine, session_factory
from store.results import record_lineage
from store.settings import get_settings
from tests.helpers import one_child_study_spec
from tests.service.test_worker_task import _spec


@pytest.fixture
def env(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], Session]]:
    """Sessions on the test database; the worker's settings (artifact root) in tmp_path."""
    monkeypatch.setenv("ICD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ICD_DATABASE_URL", db_url)
    get_settings.cache_clear()
    engine = make_engine(db_url)
    yield session_factory(engine)
    engine.dispose()
    get_settings.cache_clear()


LINEAGE = {"code": {"version": "abc123"}, "data": {"train": "sha256:aa", "val": "sha256:bb"}, "teacher_sha256": "cc"}


def _study_with_children_done(s: Session) -> tuple[int, int]:
    """A study (teacher + one `none` child) whose teacher's end was recorded and whose last child just
    succeeded: (study id, last child id)."""
    from worker.study import child_ended, start_study

    base = _spec("train")
    spec = one_child_study_spec(base, "race")
    study = q.create_job(s, spec, "study", "race", "cpu")
    study = q.claim_job(s, study.id, "w0")
    (teacher,) = start_study(s, study, lambda ref: ref)
    q.claim_job(s, teacher.id, "w1")
    q.finish_job(s, teacher.id, {"AP": 30.0})
    child_ended(s, teacher.id)
    (child,) = q.list_jobs(s, parent_id=study.id, status="queued")  # finishing the teacher released it
    q.claim_job(s, child.id, "w2")
    record_lineage(s, child.id, 1, LINEAGE)  # as its run started (worker.reporter)
    q.finish_job(s, child.id, {"AP": 20.0})
    return study.id, child.id


def _meet_at_the_study_read(monkeypatch: pytest.MonkeyPatch, study_id: int) -> None:
    """Both closers read the waiting study before either goes on: the widest window for a double close."""
    import worker.study as ws

    barrier, seen = threading.Barrier(2, timeout=30), threading.local()
    real = ws.get_job

    def get_job(s: Session, job_id: int) -> Any:
        job = real(s, job_id)
        closer = threading.current_thread() is not threading.main_thread()
        if closer and job_id == study_id and not getattr(seen, "done", False):
            seen.done = True
            barrier.wait()
        return job

    monkeypatch.setattr(ws, "get_job", get_job)


def _count_report_writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    import worker.study as ws

    writes: list[int] = []
    real = ws.write_study_report

    def write_study_report(*args: Any, **kwargs: Any) -> Any:
        writes.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ws, "write_study_report", write_study_report)
    return writes


def test_two_concurrent_closers_close_a_study_once(env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.study import child_ended, close_ended_studies

    with env() as s:
        study_id, last = _study_with_children_done(s)
    _meet_at_the_study_read(monkeypatch, study_id)
    writes = _count_report_writes(monkeypatch)
    errors: list[BaseException] = []

    def run(closer: Callable[[Session], Any]) -> None:
        try:
            with env() as s:
                closer(s)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(lambda s: child_ended(s, last),)),  # the last child's task
        threading.Thread(target=run, args=(close_ended_studies,)),  # another worker's periodic sweep
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(writes) == 1

    artifacts = ArtifactStore(get_settings().artifact_root)
    lines = artifacts.log_path(study_id).read_text().splitlines()
    assert sum("succeeded: AP_none=20.00" in line for line in lines) == 1, lines
    assert sum(f"child job {last} ended" in line for line in lines) == 1, lines
    with env() as s:
        study = q.get_job(s, study_id)
        assert study is not None and study.status == "succeeded" and study.final_metrics == {"AP_none": 20.0}

    report_dir = artifacts.report_dir(study_id)
    report = json.loads((report_dir / "report.json").read_text())
    assert [m["method"] for m in report["methods"] if m["n"]] == ["none"]
    md = (report_dir / "report.md").read_text()
    assert md.startswith("# race\n")
    assert "## Lineage" in md and "| code.version | `abc123` | all |" in md  # the child's row carried its lineage
    assert report["lineage"]["keys"][0] == {
        "key": "code.version",
        "values": [{"value": "abc123", "runs": [f"none seed 0 (job {last})"]}],
        "differs": False,
    }
    assert (report_dir / "report.png").read_bytes().startswith(b"\x89PNG")
    assert not [p.name for p in report_dir.iterdir() if p.name.startswith(".")]  # no temporaries left
    with env() as s:
        assert close_ended_studies(s) == [] and not child_ended(s, last)  # closed once, for good


def test_a_closer_that_died_blocks_the_study_only_for_its_hold(env: Any) -> None:
    with env() as s:
        study_id, _ = _study_with_children_done(s)
        assert q.claim_study_close(s, study_id, hold_s=-1)  # a closer took it, then died: its hold is over
        assert q.claim_study_close(s, study_id)  # the sweep takes it over
        assert not q.claim_study_close(s, study_id)  # while held, nobody else
