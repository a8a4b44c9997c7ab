"""A refused lease renewal is a lost lease only when someone else took the job: the heartbeat may beat
once more after its own attempt finished, failed, parked or re-queued the job, and that is no loss."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy.orm import Session

from store import jobs as q
from tests.service.test_worker_task import sessions  # noqa: F401  (fixture)

LATER = timedelta(seconds=60)


def _running(s: Session, worker: str = "w1", kind: str = "train") -> int:
    jid = q.create_job(s, {"kind": kind}, kind, "j", "any").id
    assert q.claim_job(s, jid, worker, lease_s=30) is not None
    return jid


def test_the_attempt_that_settled_its_job_was_not_taken_over(session: Session) -> None:
    finished, failed, requeued = (_running(session) for _ in range(3))
    parked = _running(session, kind="study")
    q.finish_job(session, finished, {"AP": 1.0}, attempt=1)
    q.fail_job(session, failed, "boom", attempt=1)
    q.requeue_interrupted(session, requeued, "worker shut down", attempt=1)
    q.claim_job(session, requeued, "w2")  # another worker resumes it: still no loss of attempt 1
    q.park_study(session, parked, 2)
    for jid in (finished, failed, requeued, parked):
        assert not q.renew_lease(session, jid, "w1", 1, 30)
        assert not q.taken_over(session, jid, 1), jid
    assert not q.taken_over(session, 12345, 1)  # gone


def test_a_reaped_attempt_was_taken_over(session: Session) -> None:
    reaped, reclaimed = _running(session), _running(session)
    q.reap_expired_leases(session, q.utcnow() + LATER)
    q.claim_job(session, reclaimed, "w2")
    for jid in (reaped, reclaimed):
        assert not q.renew_lease(session, jid, "w1", 1, 30)
        assert q.taken_over(session, jid, 1), jid


def _beat_after(sessions: Any, settle: Any, caplog: pytest.LogCaptureFixture) -> tuple[bool, list[str]]:  # noqa: F811
    """Run a job on a heartbeat, `settle` it, beat again: (lease_lost, ERROR lines logged)."""
    from worker.heartbeat import Heartbeat

    with sessions() as s:
        jid = _running(s, worker="w1")
    hb = Heartbeat("w1", "any", interval_s=3600, device="cpu")
    hb.set_job(jid, 1)
    assert not hb.lease_lost.is_set()  # the renewal worked while it ran
    with sessions() as s:
        settle(s, jid)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="worker.heartbeat"):
        hb.beat()
        hb.beat()
    return hb.lease_lost.is_set(), [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_beat_after_the_attempt_finished_its_job_is_no_lost_lease(
    sessions: Any,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    lost, errors = _beat_after(sessions, lambda s, jid: q.finish_job(s, jid, {"AP": 1.0}, attempt=1), caplog)
    assert not lost and errors == []
    requeue = lambda s, jid: q.requeue_interrupted(s, jid, "worker shut down", attempt=1)  # noqa: E731
    lost, errors = _beat_after(sessions, requeue, caplog)
    assert not lost and errors == []


def test_a_beat_after_the_reaper_took_the_job_stops_it(
    sessions: Any,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    lost, errors = _beat_after(sessions, lambda s, jid: q.reap_expired_leases(s, q.utcnow() + LATER), caplog)
    assert lost and len(errors) == 1 and "lost its lease (reaped)" in errors[0]
