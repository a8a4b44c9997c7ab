"""DbReporter against a real SQLite database: batched metric writes (one statement per flush),
throttled cancel checks, progress and ETA, evaluations and checkpoints. Most tests run it inline
with a fake clock (deterministic); the last one runs its writer thread for real."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select

from icd_core.engine.callbacks import CheckpointInfo, EvalResult
from store.artifacts import ArtifactStore
from store.db import make_engine, session_factory, upgrade_database
from store.jobs import claim_job, create_job, get_job, request_cancel
from store.models import Checkpoint, Evaluation, Metric
from worker.reporter import DbReporter


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class StatementLog:
    """Every SQL statement the engine sends (executemany counts once)."""

    def __init__(self, engine: Any) -> None:
        self.statements: list[str] = []
        event.listen(engine, "before_cursor_execute", self._record)

    def _record(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.statements.append(" ".join(statement.split()).upper())

    def count(self, prefix: str) -> int:
        return sum(1 for st in self.statements if st.startswith(prefix.upper()))


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, Any]]:
    url = f"sqlite:///{tmp_path / 'icd.db'}"
    upgrade_database(url)
    engine = make_engine(url)
    sessions = session_factory(engine)
    with sessions() as s:
        job = create_job(s, {"kind": "train"}, "train", "t", "cpu", [])
        claim_job(s, job.id, "w@h")
    clock = Clock()
    artifacts = ArtifactStore(tmp_path / "artifacts")
    reporter = DbReporter(
        sessions,
        job.id,
        1,
        artifacts,
        flush_every=5,
        flush_interval_s=2.0,
        cancel_check_s=1.0,
        clock=clock,
        background=False,
    )
    yield {
        "sessions": sessions,
        "job_id": job.id,
        "clock": clock,
        "reporter": reporter,
        "log": StatementLog(engine),
        "artifacts": artifacts,
    }
    engine.dispose()


def test_metrics_are_batched_one_statement_per_flush(env: dict[str, Any]) -> None:
    rep, log, sessions = env["reporter"], env["log"], env["sessions"]
    rep.on_start(0, 100)
    for step in range(1, 13):
        rep.on_metrics(step, {"loss": 1.0 / step, "lr": 0.01, "nan_is_dropped": float("nan")})
    assert rep.flushes == 2  # calls 5 and 10; the clock did not move
    assert log.count("INSERT INTO METRICS") == 2
    with sessions() as s:
        assert len(s.scalars(select(Metric)).all()) == 2 * 10

    env["clock"].t += 2.5  # the time-based flush fires from should_stop, between log steps
    log.statements.clear()
    assert rep.should_stop() is False
    assert log.count("INSERT INTO METRICS") == 1
    with sessions() as s:
        assert len(s.scalars(select(Metric)).all()) == 2 * 12
        names = set(s.scalars(select(Metric.name)))
    assert names == {"loss", "lr"}


def test_rewritten_steps_after_resume_are_upserts(env: dict[str, Any]) -> None:
    rep, sessions = env["reporter"], env["sessions"]
    for _ in range(2):  # the same steps twice, as after a resume from an earlier checkpoint
        for step in range(1, 6):
            rep.on_metrics(step, {"loss": float(step)})
    with sessions() as s:
        assert len(s.scalars(select(Metric)).all()) == 5


def test_progress_and_eta(env: dict[str, Any]) -> None:
    rep, clock, sessions, job_id = env["reporter"], env["clock"], env["sessions"], env["job_id"]
    rep.on_start(0, 100)
    rep.on_metrics(10, {"loss": 1.0})  # the rate is measured from the first logged step
    clock.t += 20.0
    rep.on_metrics(30, {"loss": 1.0})  # 20 steps in 20 s, flushed by time
    with sessions() as s:
        job = get_job(s, job_id)
        assert job is not None
        assert job.progress_step == 30 and job.progress_total == 100
        assert job.eta_s == pytest.approx(70.0)
        assert job.sec_per_step == pytest.approx(1.0)
    rep.on_end(100, {"AP": 1.0})
    with sessions() as s:
        job = get_job(s, job_id)
        assert job is not None and job.progress_step == 100 and job.eta_s == 0.0


def test_cancel_is_read_at_most_once_per_interval(env: dict[str, Any]) -> None:
    rep, clock, log, sessions, job_id = env["reporter"], env["clock"], env["log"], env["sessions"], env["job_id"]
    with sessions() as s:
        request_cancel(s, job_id)
    log.statements.clear()
    for _ in range(1000):  # a thousand steps within one second: no database access at all
        assert rep.should_stop() is False
    assert log.statements == []
    clock.t += 1.0
    assert rep.should_stop() is True
    assert log.count("SELECT") == 1
    assert rep.should_stop() is True and log.count("SELECT") == 1  # remembered, not re-read


def test_evaluation_and_checkpoint_rows(env: dict[str, Any]) -> None:
    rep, sessions, job_id, artifacts = env["reporter"], env["sessions"], env["job_id"], env["artifacts"]
    rep.on_metrics(4, {"loss": 0.5})
    rep.on_evaluation(
        EvalResult(
            step=4,
            metrics={"AP": 12.5, "AP50": 30.0, "AP75": 10.0, "APs": 1.0, "APm": 2.0, "APl": 3.0},
            per_class={"circle": 20.0},
        )
    )
    path = artifacts.job_dir(job_id) / "checkpoints" / "final.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"weights")
    sha = ArtifactStore.sha256_file(path)
    rep.on_checkpoint(CheckpointInfo(name="final.pt", path=path, step=4, size_bytes=7, sha256=sha, final=True))
    with sessions() as s:
        assert s.scalars(select(Metric)).one().value == 0.5  # flushed before the evaluation
        ev = s.scalars(select(Evaluation)).one()
        assert (ev.step, ev.ap, ev.ap50, ev.per_class) == (4, 12.5, 30.0, {"circle": 20.0})
        ck = s.scalars(select(Checkpoint)).one()
        assert ck.path == f"jobs/{job_id}/checkpoints/final.pt"
        assert (ck.size_bytes, ck.sha256, ck.final, ck.attempt) == (7, sha, True, 1)


def test_lineage_is_stored_at_once_and_only_by_the_attempt_holding_the_job(env: dict[str, Any]) -> None:
    rep, sessions = env["reporter"], env["sessions"]
    record = {"code": {"version": "abc"}, "data": {"train": "sha256:aa"}, "teacher_sha256": None}
    rep.on_lineage(record)  # before on_start: a run that fails later keeps it
    with sessions() as s:
        assert get_job(s, env["job_id"]).lineage == record
    other = DbReporter(sessions, env["job_id"], 2, env["artifacts"], background=False)  # the job is at attempt 1
    other.on_lineage({"code": {"version": "other"}})
    with sessions() as s:
        assert get_job(s, env["job_id"]).lineage == record


def test_writer_thread_flushes_and_sees_cancel_without_the_loop_touching_the_database(env: dict[str, Any]) -> None:
    sessions, job_id, artifacts, log = env["sessions"], env["job_id"], env["artifacts"], env["log"]
    rep = DbReporter(sessions, job_id, 1, artifacts, flush_every=1000, flush_interval_s=0.05, cancel_check_s=0.05)
    rep.on_start(0, 10)
    try:
        assert rep._writer is not None and rep._writer.is_alive()
        rep.on_metrics(1, {"loss": 1.0})
        deadline = time.monotonic() + 10
        while rep.flushes == 0 and time.monotonic() < deadline:  # the writer's timer flushes it
            time.sleep(0.01)
        with sessions() as s:
            assert [m.value for m in s.scalars(select(Metric))] == [1.0]
        with sessions() as s:
            request_cancel(s, job_id)
        while not rep.should_stop() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rep.should_stop() is True
        rep.on_metrics(2, {"loss": 2.0})
    finally:
        rep.close()
    assert rep._writer is None
    with sessions() as s:  # close() wrote what was still buffered
        assert sorted(m.step for m in s.scalars(select(Metric))) == [1, 2]
    assert log.count("INSERT INTO METRICS") == 2  # one statement per flush that had rows
