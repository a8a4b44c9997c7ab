"""Leases and the reaper, as store transitions on SQLite and PostgreSQL: the database decides who runs a
job, an expired lease is re-queued as a new attempt or failed with the reason, and every step is a
guarded UPDATE that is harmless to run twice or from two places."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from store import jobs as q
from store.models import JOB_STATUSES, Attempt, Metric
from store.reaper import reaper_pass, status_detail, unservable_warnings
from store.results import add_checkpoint, add_metrics, forget_missing_checkpoints, get_metrics, start_attempt_series
from store.settings import Settings
from store.workers import heartbeat

LATER = timedelta(seconds=60)


def _job(s: Session, queue: str = "any", spec: dict | None = None) -> int:
    return q.create_job(s, spec or {"kind": "train"}, "train", "j", queue).id


def _settings(tmp_path: Path, **kw: object) -> Settings:
    return Settings(home=tmp_path / "home", **kw)  # type: ignore[arg-type]


def test_claim_sets_a_lease_and_only_its_holder_renews_it(session: Session) -> None:
    jid = _job(session)
    job = q.claim_job(session, jid, "w1", lease_s=5)
    assert job is not None and job.lease_expires_at is not None
    assert q.renew_lease(session, jid, "w1", 1, 5)
    assert not q.renew_lease(session, jid, "w2", 1, 5)  # another worker
    assert not q.renew_lease(session, jid, "w1", 2, 5)  # another attempt


def test_expired_lease_is_requeued_once_then_fails_with_the_reason(session: Session) -> None:
    jid = _job(session)
    for attempt in (1, 2, 3):
        assert q.claim_job(session, jid, f"w{attempt}", lease_s=1) is not None
        q.update_progress(session, jid, 10 * attempt, 100, None)
        now = q.utcnow() + LATER
        assert q.reap_expired_leases(session, q.utcnow(), max_attempts=3).requeued == []  # not expired yet
        reaped = q.reap_expired_leases(session, now, max_attempts=3)
        again = q.reap_expired_leases(session, now, max_attempts=3)  # a second reaper: nothing left to do
        assert again.requeued == [] and again.ended == []
        job = q.get_job(session, jid)
        assert job is not None
        if attempt < 3:
            assert [j.id for j in reaped.requeued] == [jid] and job.status == "queued" and job.worker is None
        else:
            assert reaped.ended == [jid] and job.status == "failed"
            assert job.error is not None and job.error.startswith("worker w3 lost at step 30; 3 attempts used")
    attempts = session.scalars(select(Attempt).where(Attempt.job_id == jid).order_by(Attempt.number)).all()
    assert [(a.number, a.status) for a in attempts] == [(1, "lost"), (2, "lost"), (3, "lost")]
    assert "worker w1 lost at step 10" in (attempts[0].error or "")


def test_the_spec_can_allow_more_attempts(session: Session) -> None:
    jid = _job(session, spec={"kind": "train", "max_attempts": 1})
    q.claim_job(session, jid, "w1", lease_s=1)
    assert q.reap_expired_leases(session, q.utcnow() + LATER, max_attempts=3).ended == [jid]


def test_a_reaped_attempt_cannot_record_its_end(session: Session) -> None:
    jid = _job(session)
    q.claim_job(session, jid, "w1", lease_s=1)
    q.reap_expired_leases(session, q.utcnow() + LATER)
    q.claim_job(session, jid, "w2", lease_s=30)
    with pytest.raises(q.LeaseLost):
        q.finish_job(session, jid, {"AP": 1.0}, attempt=1)  # the zombie first attempt
    with pytest.raises(q.LeaseLost):
        q.fail_job(session, jid, "boom", attempt=1)
    assert not q.renew_lease(session, jid, "w1", 1, 30)
    assert q.finish_job(session, jid, {"AP": 2.0}, attempt=2).status == "succeeded"


def test_a_warm_shutdown_requeues_in_one_step_and_only_for_its_attempt(session: Session) -> None:
    from sqlalchemy import event

    jid = _job(session)
    q.claim_job(session, jid, "w1", lease_s=30)
    seen: list[str] = []  # every status value in an UPDATE of the jobs table (SET and WHERE)
    listen = (session.get_bind(), "before_cursor_execute")

    def record(conn, cursor, statement, params, context, many) -> None:  # noqa: ANN001 - SQLAlchemy's hook
        if statement.lstrip().upper().startswith("UPDATE JOBS") and isinstance(params, dict | tuple):
            seen.extend(v for v in (params.values() if isinstance(params, dict) else params) if v in JOB_STATUSES)

    event.listen(*listen, record)
    try:
        job = q.requeue_interrupted(session, jid, "worker w1 shut down at step 7; re-queued to resume", attempt=1)
    finally:
        event.remove(*listen, record)
    assert job is not None and job.status == "queued" and job.worker is None and job.error is None
    assert "queued" in seen and "failed" not in seen  # never written as failed on the way
    (first,) = session.scalars(select(Attempt).where(Attempt.job_id == jid)).all()
    assert first.status == "failed" and first.error == "worker w1 shut down at step 7; re-queued to resume"
    assert q.requeue_interrupted(session, jid, "again", attempt=1) is None  # queued now: nothing to hand back
    q.claim_job(session, jid, "w2", lease_s=30)
    assert q.requeue_interrupted(session, jid, "zombie", attempt=1) is None  # attempt 2 holds it
    assert q.get_job(session, jid).status == "running"


def test_a_renewed_lease_is_not_reaped(session: Session) -> None:
    jid = _job(session)
    q.claim_job(session, jid, "w1", lease_s=1)
    q.renew_lease(session, jid, "w1", 1, 3600)
    assert q.reap_expired_leases(session, q.utcnow() + LATER).requeued == []
    assert q.get_job(session, jid).status == "running"  # type: ignore[union-attr]


def test_cancel_of_a_job_whose_worker_is_dead(session: Session) -> None:
    live, dead = _job(session), _job(session)
    q.claim_job(session, live, "w1", lease_s=3600)
    q.claim_job(session, dead, "w2", lease_s=3600)
    q.expire_leases_of(session, "w2")  # as a restarted w2 does
    assert q.request_cancel(session, dead).status == "canceled"
    live_job = q.request_cancel(session, live)
    assert live_job.status == "running" and live_job.cancel_requested  # its worker stops it


def test_a_requested_cancel_ends_at_reaping(session: Session) -> None:
    jid = _job(session)
    q.claim_job(session, jid, "w1", lease_s=1)
    q.request_cancel(session, jid)  # lease still valid: the flag is set
    assert q.reap_expired_leases(session, q.utcnow() + LATER).ended == [jid]
    assert q.get_job(session, jid).status == "canceled"  # type: ignore[union-attr]


def test_restarted_worker_name_expires_only_its_own_leases(session: Session) -> None:
    a, b = _job(session), _job(session)
    q.claim_job(session, a, "gpu0@host", lease_s=3600)
    q.claim_job(session, b, "gpu1@host", lease_s=3600)
    assert q.expire_leases_of(session, "gpu0@host") == 1
    assert [j.id for j in q.reap_expired_leases(session).requeued] == [a]
    assert q.get_job(session, b).status == "running"  # type: ignore[union-attr]


def test_unservable_job_is_reported_then_failed(session: Session, tmp_path: Path) -> None:
    settings = _settings(tmp_path, unservable_timeout_s=100, worker_heartbeat_s=10)
    heartbeat(session, "cpu@host", "host", "cpu", "cpu,any", 1, None)
    gpu, cpu = _job(session, "cuda"), _job(session, "cpu")
    gpu_job = q.get_job(session, gpu)
    assert gpu_job is not None
    detail = status_detail(session, gpu_job, settings)
    assert detail is not None and "no live worker consumes queue 'cuda'" in detail and "--gpus" in detail
    assert status_detail(session, q.get_job(session, cpu), settings) is None  # type: ignore[arg-type]
    warnings = unservable_warnings(session, settings)
    assert len(warnings) == 1 and warnings[0].startswith("1 queued job(s) cannot start")
    assert f"[{gpu}]" not in warnings[0]  # /health is public: counts, not ids

    assert reaper_pass(session, settings).ended == []  # not waited long enough
    reaped = reaper_pass(session, settings, now=q.utcnow() + timedelta(seconds=101))
    assert reaped.ended == [gpu]
    job = q.get_job(session, gpu)
    assert job is not None and job.status == "failed" and "for 10" in (job.error or "")
    assert q.get_job(session, cpu).status == "queued"  # type: ignore[union-attr]


def test_unservable_jobs_are_failed_in_batches_and_listed_ten_per_queue(
    session: Session, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scan is filtered in SQL (a pass reads the jobs it fails, not every queued job) and bounded per pass."""
    monkeypatch.setattr(q, "UNSERVABLE_BATCH", 5)
    settings = _settings(tmp_path, unservable_timeout_s=100)
    ids = [_job(session, "cuda") for _ in range(12)]
    warnings = unservable_warnings(session, settings)
    assert warnings == [
        f"more than 10 queued job(s) cannot start: {q.unservable_message('cuda')}"
    ]  # no ids: /health is public
    later = q.utcnow() + timedelta(seconds=101)
    assert q.unservable_queued(session, ["cpu"], untouched_since=q.utcnow() - timedelta(seconds=100)) == []
    assert reaper_pass(session, settings, now=later).ended == ids[:5]  # oldest first, one batch per pass
    assert reaper_pass(session, settings, now=later).ended == ids[5:10]
    assert reaper_pass(session, settings, now=later).ended == ids[10:]
    assert unservable_warnings(session, settings) == []


def test_a_resumed_attempt_drops_the_superseded_points(session: Session) -> None:
    jid = _job(session)
    q.claim_job(session, jid, "w1")
    add_metrics(session, jid, 1, [("loss", st, 1.0) for st in range(1, 51)])
    q.reap_expired_leases(session, q.utcnow() + LATER)
    q.claim_job(session, jid, "w2")
    start_attempt_series(session, jid, 2, resumed_from_step=40)
    assert [st for st, _ in get_metrics(session, jid)["loss"]] == list(range(1, 41))
    add_metrics(session, jid, 2, [("loss", st, 2.0) for st in range(41, 61)])
    rows = session.execute(select(Metric.step, Metric.attempt).where(Metric.job_id == jid).order_by(Metric.step))
    assert [(st, a) for st, a in rows if st in (40, 41)] == [(40, 1), (41, 2)]
    attempt = session.scalars(select(Attempt).where(Attempt.job_id == jid, Attempt.number == 2)).one()
    assert attempt.resumed_from_step == 40


def test_a_resumed_attempt_leaves_no_dropped_point_in_the_downsampled_curve(session: Session) -> None:
    """The rollups behind `max_points` follow the superseded-point delete (else a long curve would still
    show attempt 1's points above the resume step)."""
    jid = _job(session)
    q.claim_job(session, jid, "w1")
    add_metrics(session, jid, 1, [("loss", st, 5.0) for st in range(1, 3001)])
    q.reap_expired_leases(session, q.utcnow() + LATER)
    q.claim_job(session, jid, "w2")
    start_attempt_series(session, jid, 2, resumed_from_step=1000)
    curve = get_metrics(session, jid, names=["loss"], max_points=20)["loss"]
    assert curve[-1] == (1000, 5.0) and max(st for st, _ in curve) == 1000


def test_pruned_checkpoints_leave_the_list(session: Session, tmp_path: Path) -> None:
    jid = _job(session)
    folder = tmp_path / "jobs" / str(jid) / "checkpoints"
    folder.mkdir(parents=True)
    for step in (5, 10):
        (folder / f"step_{step}.pt").write_bytes(b"x")
        add_checkpoint(
            session, jid, 1, step, f"step_{step}.pt", f"jobs/{jid}/checkpoints/step_{step}.pt", 1, "0" * 64, False
        )
    (folder / "step_5.pt").unlink()
    assert forget_missing_checkpoints(session, jid, tmp_path) == ["step_5.pt"]
