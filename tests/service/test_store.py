"""Store functions against a real database (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from icd_core.data_roots import resolve_in_roots
from store import jobs as q
from store.artifacts import ArtifactStore
from store.dispatch import queue_for
from store.models import Attempt, Job, JobStatus, Worker, utcnow
from store.results import (
    add_checkpoint,
    add_evaluation,
    add_metrics,
    final_checkpoint_path,
    get_checkpoint,
    get_metrics,
    list_checkpoints,
    list_evaluations,
)
from store.settings import Settings
from store.workers import heartbeat, list_workers


def _job(s: Session, status: str = "queued", depends_on: list[int] | None = None, name: str = "j") -> int:
    return q.create_job(s, {"kind": "train"}, "train", name, "any", depends_on or [], status=status).id


def test_claim_is_atomic_and_idempotent(session: Session) -> None:
    jid = _job(session)
    job = q.claim_job(session, jid, "w1")
    assert job is not None and job.status == "running" and job.attempt == 1 and job.worker == "w1"
    assert job.started_at is not None and job.started_at.tzinfo is not None
    assert q.claim_job(session, jid, "w2") is None  # a redelivered message claims nothing
    attempts = session.scalars(select(Attempt).where(Attempt.job_id == jid)).all()
    assert [(a.number, a.worker, a.status) for a in attempts] == [(1, "w1", "running")]

    q.update_progress(session, jid, 50, 200, eta_s=30.0, sec_per_step=0.2, peak_memory_mb=123.0)
    job = q.get_job(session, jid)
    assert job is not None and (job.progress_step, job.progress_total, job.percent) == (50, 200, 25.0)
    assert job.sec_per_step == 0.2 and job.peak_memory_mb == 123.0

    q.finish_job(session, jid, {"AP": 12.5})
    job = q.get_job(session, jid)
    assert job is not None and job.status == "succeeded" and job.final_metrics == {"AP": 12.5}
    assert job.progress_step == 200 and job.finished_at is not None
    assert session.scalars(select(Attempt.status).where(Attempt.job_id == jid)).all() == ["succeeded"]
    assert q.claim_job(session, jid, "w1") is None


def test_cancel_retry_delete(session: Session) -> None:
    queued = _job(session)
    assert q.request_cancel(session, queued).status == "canceled"
    with pytest.raises(q.JobStateError):
        q.request_cancel(session, queued)

    running = _job(session)
    q.claim_job(session, running, "w1")
    job = q.request_cancel(session, running)
    assert job.status == "running" and job.cancel_requested
    assert q.is_cancel_requested(session, running)
    with pytest.raises(q.JobStateError, match="cancel it first"):
        q.delete_job(session, running)
    q.mark_canceled(session, running)

    job = q.retry_job(session, running)
    assert job.status == "queued" and not job.cancel_requested and job.error is None
    assert not q.is_cancel_requested(session, running)
    again = q.claim_job(session, running, "w2")
    assert again is not None and again.attempt == 2
    with pytest.raises(q.JobStateError, match="only failed or canceled"):
        q.retry_job(session, running)
    q.fail_job(session, running, "boom")
    assert q.get_job(session, running).error == "boom"  # type: ignore[union-attr]

    add_metrics(session, running, 2, [("loss", 1, 1.0)])
    q.delete_job(session, running)
    assert q.get_job(session, running) is None
    assert get_metrics(session, running) == {}
    with pytest.raises(q.JobNotFound):
        q.delete_job(session, running)


def test_list_and_count_newest_first_with_filters(session: Session) -> None:
    ids = [_job(session, name=f"n{i % 2}") for i in range(5)]
    q.claim_job(session, ids[0], "w")
    assert [j.id for j in q.list_jobs(session, limit=3)] == ids[::-1][:3]
    assert [j.id for j in q.list_jobs(session, limit=3, offset=3)] == ids[::-1][3:]
    assert q.count_jobs(session) == 5
    assert [j.id for j in q.list_jobs(session, status="running")] == [ids[0]]
    assert q.count_jobs(session, status=["queued", "running"], name="n0") == 3
    with pytest.raises(ValueError, match="unknown"):
        q.list_jobs(session, status="bogus")


def test_metrics_upsert_incremental_and_downsampled(session: Session) -> None:
    jid = _job(session)
    add_metrics(session, jid, 1, [("loss", s, 10.0 - s / 10) for s in range(1, 101)] + [("lr", 1, 0.01)])
    add_metrics(session, jid, 2, [("loss", 100, 0.5)])  # a resumed run rewrites the same key
    add_metrics(session, jid, 2, [("lr", 1, 9.0), ("lr", 1, 0.01)])  # twice in one batch: the last one wins
    series = get_metrics(session, jid)
    assert len(series["loss"]) == 100 and series["loss"][-1] == (100, 0.5) and series["lr"] == [(1, 0.01)]
    assert [p[0] for p in get_metrics(session, jid, names=["loss"], since_step=97)["loss"]] == [98, 99, 100]
    assert set(get_metrics(session, jid, names=["lr"])) == {"lr"}

    down = get_metrics(session, jid, names=["loss"], max_points=10)["loss"]
    steps = [p[0] for p in down]
    assert steps[0] == 1 and steps[-1] == 100 and len(steps) <= 10
    assert steps == sorted(steps) and steps[:2] == [1, 25]  # 4 buckets of 25 steps: each one's max and min


def test_evaluations_checkpoints_and_final_path(session: Session, tmp_path: Path) -> None:
    jid = _job(session)
    add_evaluation(session, jid, 1, 100, {"AP": 10.0, "AP50": 20.0, "APs": 1.0}, {"circle": 12.0})
    add_evaluation(session, jid, 1, 100, {"AP": 11.0}, {})  # upsert on (job, step)
    add_evaluation(session, jid, 1, 200, {"AP": 15.0, "AP50": 30.0, "AP75": 14, "APm": 2, "APl": 3}, {})
    evals = list_evaluations(session, jid)
    assert [(e.step, e.ap, e.ap50) for e in evals] == [(100, 11.0, None), (200, 15.0, 30.0)]

    assert final_checkpoint_path(session, tmp_path, jid) is None
    add_checkpoint(session, jid, 1, 100, "step_100.pt", "jobs/1/checkpoints/step_100.pt", 10, "a" * 64, False)
    add_checkpoint(session, jid, 1, 200, "final.pt", "jobs/1/checkpoints/final.pt", 11, "b" * 64, True)
    add_checkpoint(session, jid, 2, 200, "final.pt", "jobs/1/checkpoints/final.pt", 12, "c" * 64, True)
    assert [c.name for c in list_checkpoints(session, jid)] == ["step_100.pt", "final.pt"]
    ck = get_checkpoint(session, jid, "final.pt")
    assert ck is not None and ck.size_bytes == 12 and ck.sha256 == "c" * 64 and ck.attempt == 2
    assert final_checkpoint_path(session, tmp_path, jid) == tmp_path / "jobs/1/checkpoints/final.pt"


def test_dependencies_release_and_fail(session: Session) -> None:
    teacher = _job(session)
    student = _job(session, status="waiting", depends_on=[teacher])
    grandchild = _job(session, status="waiting", depends_on=[student])
    q.claim_job(session, teacher, "w")
    assert q.settle_waiting(session, student) is None  # teacher still running
    q.finish_job(session, teacher, {})  # the transition itself releases the student
    assert _status(session, student) == JobStatus.QUEUED
    assert q.release_dependents(session, teacher) == []  # released once only

    q.claim_job(session, student, "w")
    q.fail_job(session, student, "diverged")
    assert q.release_dependents(session, student) == []
    g = q.get_job(session, grandchild)
    assert g is not None and g.status == "failed"
    assert g.error is not None and f"job {student} failed: diverged; retry it" in g.error
    with pytest.raises(q.JobStateError, match="retry it"):
        q.retry_job(session, grandchild)  # its dependency is still failed

    q.retry_job(session, student)
    assert q.retry_job(session, grandchild).status == "waiting"


def _status(s: Session, job_id: int) -> str:
    job = q.get_job(s, job_id)
    assert job is not None
    return job.status


def _running(s: Session) -> int:
    job_id = _job(s)
    q.claim_job(s, job_id, "w@host", lease_s=60)
    return job_id


def _expired(s: Session, job_id: int) -> None:
    s.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=5)))
    s.commit()


def _by_the_reaper(s: Session, job_id: int, cancel: bool) -> None:
    if cancel:
        s.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
    _expired(s, job_id)
    assert job_id in q.reap_expired_leases(s, max_attempts=1).ended


def _canceled_while_its_worker_is_dead(s: Session, job_id: int) -> None:
    _expired(s, job_id)
    q.request_cancel(s, job_id)


# Every way a job ends other than succeeding: (how, whether it ran first, the status it ends in).
ENDINGS = [
    ("fail_job", lambda s, j: q.fail_job(s, j, "broke", attempt=1), True, "failed"),
    ("fail_job of a queued job", lambda s, j: q.fail_job(s, j, "broker down"), False, "failed"),
    ("fail_if_running_on", lambda s, j: q.fail_if_running_on(s, j, "w@host", "died", 1), True, "failed"),
    ("mark_canceled", lambda s, j: q.mark_canceled(s, j, attempt=1), True, "canceled"),
    ("request_cancel of a queued job", q.request_cancel, False, "canceled"),
    ("the reaper at max_attempts", lambda s, j: _by_the_reaper(s, j, cancel=False), True, "failed"),
    ("the reaper after a cancel", lambda s, j: _by_the_reaper(s, j, cancel=True), True, "canceled"),
    ("a cancel of a job whose worker died", _canceled_while_its_worker_is_dead, True, "canceled"),
    ("no live worker", lambda s, j: q.fail_unservable(s, [], 0.0, utcnow() + timedelta(seconds=5)), False, "failed"),
]


@pytest.mark.parametrize(("how", "end", "ran", "ends"), ENDINGS, ids=[e[0] for e in ENDINGS])
def test_every_terminal_transition_releases_its_dependents(
    session: Session, how: str, end: Any, ran: bool, ends: str
) -> None:
    """No caller has to remember release_dependents: the waiting job fails with the reason, at once."""
    dep = _running(session) if ran else _job(session)
    waiting = _job(session, status="waiting", depends_on=[dep])
    end(session, dep)
    assert _status(session, dep) == ends, how
    assert _status(session, waiting) == JobStatus.FAILED, how
    assert f"job {dep} " in (q.get_job(session, waiting).error or ""), how


def test_a_success_queues_its_dependents(session: Session) -> None:
    dep = _running(session)
    waiting = _job(session, status="waiting", depends_on=[dep])
    q.finish_job(session, dep, {"AP": 1.0}, attempt=1)
    assert _status(session, waiting) == JobStatus.QUEUED


def test_workers_heartbeat_and_alive_window(session: Session) -> None:
    heartbeat(session, "w1", "host", "cpu", "cpu,any", 11, None)
    heartbeat(session, "w2", "host", "cuda:0 NVIDIA H100", "cuda,any", 12, None)
    heartbeat(session, "w1", "host", "cpu", "cpu,any", 11, 5)
    session.execute(update(Worker).where(Worker.name == "w2").values(last_heartbeat=utcnow() - timedelta(minutes=5)))
    session.commit()
    alive = list_workers(session, alive_within_s=30)
    assert [(w.name, w.current_job_id) for w in alive] == [("w1", 5)]
    assert len(list_workers(session)) == 2


def test_queue_for_and_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert queue_for({"device": "cuda:1"}) == "cuda"
    assert queue_for({"device": "cpu"}) == "cpu"
    assert queue_for({}) == "any"
    monkeypatch.setenv("ICD_HOME", str(tmp_path))
    monkeypatch.setenv("ICD_DATA_ROOTS", f"{tmp_path}/a:{tmp_path}/b")
    s = Settings()
    assert s.database_url == f"sqlite:///{tmp_path}/icd.db"
    assert s.broker_url == f"sqla+sqlite:///{tmp_path}/broker.db"
    assert s.artifact_root == tmp_path / "artifacts" and s.cache_dir == tmp_path / "cache"
    assert s.data_roots == [tmp_path / "a", tmp_path / "b"]
    (tmp_path / "b" / "coco").mkdir(parents=True)
    assert str(resolve_in_roots("coco", s.allowed_data_roots())) == str(
        tmp_path / "b" / "coco"
    )  # first root holding it


def test_artifact_store_paths(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    d = store.job_dir(3)
    f = d / "checkpoints" / "final.pt"
    f.parent.mkdir()
    f.write_bytes(b"abc")
    assert store.relative(f) == "jobs/3/checkpoints/final.pt"
    assert store.absolute("jobs/3/checkpoints/final.pt") == f
    assert store.sha256_file(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    with pytest.raises(ValueError, match="escapes"):
        store.absolute("../outside")
    store.delete_job(3)
    assert not d.exists()


def test_undelivered_queued_jobs_are_found_once_per_period(session: Session) -> None:
    from datetime import timedelta

    from store.jobs import undelivered_queued
    from store.models import Job, utcnow

    old, fresh, running = _job(session), _job(session), _job(session)
    for job_id, age in ((old, 120), (running, 120)):
        session.get(Job, job_id).updated_at = utcnow() - timedelta(seconds=age)
    session.get(Job, running).status = "running"
    session.commit()
    assert [j.id for j in undelivered_queued(session, ["any", "cpu", "cuda"], older_than_s=60)] == [old]
    assert undelivered_queued(session, ["any", "cpu", "cuda"], older_than_s=60) == []  # touched: not again
    session.get(Job, fresh).updated_at = utcnow() - timedelta(seconds=120)
    session.commit()
    assert undelivered_queued(session, ["cuda"], older_than_s=60) == []  # other queues' workers resend it
    assert [j.id for j in undelivered_queued(session, ["any"], older_than_s=60)] == [fresh]


def test_canceling_a_study_cancels_its_children(session: Session) -> None:
    study = q.create_job(session, {"kind": "study"}, "study", "st", "any", [], status="waiting")
    queued = q.create_job(session, {"kind": "distill"}, "distill", "c1", "any", [], parent_id=study.id)
    running = q.create_job(session, {"kind": "distill"}, "distill", "c2", "any", [], parent_id=study.id)
    q.claim_job(session, running.id, "w@h")
    assert q.request_cancel(session, study.id).status == "canceled"
    assert q.get_job(session, queued.id).status == "canceled"
    assert q.is_cancel_requested(session, running.id)
