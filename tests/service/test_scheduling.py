"""The scheduler's order, quotas and preemption requests on both backends (docs/scheduling.md).

Real databases (SQLite and PostgreSQL), the store's own calls; the worker processes that act on these
decisions are in test_scheduling_e2e.py.
"""

from __future__ import annotations

import threading
from datetime import timedelta

from sqlalchemy.orm import Session

from store import jobs as q
from store.db import make_engine, session_factory
from store.models import utcnow
from store.preemption import preemption_pass
from store.reaper import status_detail
from store.settings import Settings
from store.tokens import Quota, create_token, set_quota
from store.workers import heartbeat

SPEC = {"kind": "train", "name": "j", "device": "cpu"}


def _job(s: Session, queue: str = "cpu", priority: int = 0, owner: str | None = None, gpus: int = 1) -> int:
    return q.create_job(s, dict(SPEC), "train", "j", queue, owner=owner, priority=priority, gpus=gpus).id


def _run_all(s: Session, queues: list[str]) -> list[int]:
    """Claim and finish jobs one at a time, as one worker would: the order they ran in."""
    order = []
    while (job := q.claim_next(s, "w1", queues)) is not None:
        order.append(job.id)
        q.finish_job(s, job.id, {})
    return order


def test_highest_priority_first_across_queues_then_oldest(session: Session) -> None:
    low1, low2 = _job(session, "cpu", 0), _job(session, "cpu", 0)
    high = _job(session, "any", 5)
    low3 = _job(session, "cpu", 0)
    other = _job(session, "cuda", 9)  # a queue this worker does not consume
    assert _run_all(session, ["cpu", "any"]) == [high, low1, low2, low3]
    assert q.get_job(session, other).status == "queued"  # type: ignore[union-attr]


def test_owners_alternate_at_equal_priority(session: Session) -> None:
    a = [_job(session, owner="alice") for _ in range(4)]
    b = [_job(session, owner="bob") for _ in range(2)]
    assert _run_all(session, ["cpu"]) == [a[0], b[0], a[1], b[1], a[2], a[3]]


def test_owner_with_fewer_running_jobs_goes_first(session: Session) -> None:
    a = [_job(session, owner="alice") for _ in range(3)]
    b = _job(session, owner="bob")
    assert q.claim_next(session, "w1", ["cpu"]).id == a[0]  # type: ignore[union-attr]
    assert q.claim_next(session, "w2", ["cpu"]).id == b  # type: ignore[union-attr]
    assert q.claim_next(session, "w3", ["cpu"]).id == a[1]  # type: ignore[union-attr]


def test_quota_holds_visibly_and_releases(session: Session, settings: Settings) -> None:
    create_token(session, "alice", quota=Quota(max_running=1))
    a1, a2 = _job(session, owner="alice"), _job(session, owner="alice")
    b1 = _job(session, owner="bob")
    heartbeat(session, "w9", "h", "cpu", "cpu", 1, 123)  # a live, busy worker for the queue
    assert q.claim_next(session, "w1", ["cpu"]).id == a1  # type: ignore[union-attr]
    assert q.claim_next(session, "w2", ["cpu"]).id == b1  # type: ignore[union-attr]
    assert q.claim_next(session, "w3", ["cpu"]) is None  # a2 is held: alice runs a1
    held = q.get_job(session, a2)
    assert held is not None and held.status == "queued"
    detail = status_detail(session, held, settings)
    assert detail is not None and "max_running=1" in detail and f"job {a1} on w1" in detail
    q.finish_job(session, a1, {})
    assert q.claim_next(session, "w3", ["cpu"]).id == a2  # type: ignore[union-attr]


def test_gpu_quota_counts_devices(session: Session) -> None:
    create_token(session, "alice", quota=Quota(max_gpus=2))
    big = _job(session, "cpu-g2", owner="alice", gpus=2)
    small = _job(session, "cpu", owner="alice")
    assert q.claim_next(session, "w1", ["cpu", "cpu-g2"]).id == big  # type: ignore[union-attr]
    assert q.claim_next(session, "w2", ["cpu"]) is None
    set_quota(session, "alice", Quota(max_gpus=3))
    assert q.claim_next(session, "w2", ["cpu"]).id == small  # type: ignore[union-attr]


def test_concurrent_claims_run_each_job_once_and_keep_the_quota(db_url: str) -> None:
    engine = make_engine(db_url)
    factory = session_factory(engine)
    with factory() as s:
        create_token(s, "alice", quota=Quota(max_running=2))
        ids = [_job(s, owner="alice") for _ in range(6)] + [_job(s, owner="bob") for _ in range(6)]
    claimed: list[tuple[str, int]] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        with factory() as s:
            for _ in range(6):
                job = q.claim_next(s, name, ["cpu"])
                if job is not None:
                    with lock:
                        claimed.append((name, job.id))

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = [jid for _, jid in claimed]
    assert len(got) == len(set(got))  # no job claimed twice
    with factory() as s:
        alice_running = [j for j in q.list_jobs(s, status="running", owner="alice")]
        assert len(alice_running) == 2  # the quota held under contention
        assert {j.id for j in q.list_jobs(s, status="running", owner="bob")} == set(ids[6:])
    engine.dispose()


def test_priority_change_reorders_and_cascades(session: Session) -> None:
    first, second = _job(session), _job(session)
    q.set_priority(session, second, 3)
    assert q.get_job(session, second).priority == 3  # type: ignore[union-attr]
    assert _run_all(session, ["cpu"]) == [second, first]


def test_preemption_request_and_requeue_do_not_count_an_attempt(session: Session, settings: Settings) -> None:
    settings = settings.model_copy(update={"preempt_min_run_s": 0.0})
    low = _job(session, priority=0)
    heartbeat(session, "w1", "h", "cpu", "cpu", 1, low)
    assert q.claim_next(session, "w1", ["cpu"]).id == low  # type: ignore[union-attr]
    high = _job(session, priority=5, owner="bob")
    assert preemption_pass(session, settings) == [(low, high)]
    assert preemption_pass(session, settings) == []  # one room for one job
    assert q.stop_requests(session, low) == (False, high)
    assert "preempted by job" in (status_detail(session, q.get_job(session, low), settings) or "")  # type: ignore[arg-type]
    back = q.requeue_preempted(session, low, 1, 7, high)
    assert back is not None and back.status == "queued" and back.preemptions == 1
    attempt = back.attempts[-1]
    assert attempt.status == "preempted" and f"by job {high} (owner bob, priority 5)" in (attempt.error or "")
    # the reaper's max_attempts counts attempts less preemptions: one lost attempt with max 1 fails...
    assert q.claim_next(session, "w1", ["cpu"]).id == high  # type: ignore[union-attr]
    q.finish_job(session, high, {})
    job = q.claim_next(session, "w1", ["cpu"], lease_s=0.0)
    assert job is not None and job.id == low and job.attempt == 2
    reaped = q.reap_expired_leases(session, utcnow() + timedelta(seconds=1), max_attempts=2)
    assert [j.id for j in reaped.requeued] == [low]  # ...but attempt 2 of 2 is the first that counts


def test_no_preemption_while_a_worker_is_free_or_before_min_run(session: Session, settings: Settings) -> None:
    low = _job(session, priority=0)
    heartbeat(session, "w1", "h", "cpu", "cpu", 1, low)
    q.claim_next(session, "w1", ["cpu"])
    _job(session, priority=5)
    assert preemption_pass(session, settings) == []  # ran less than preempt_min_run_s (60 s)
    quick = settings.model_copy(update={"preempt_min_run_s": 0.0})
    heartbeat(session, "w2", "h", "cpu", "cpu", 2, None)  # an idle worker will take the high job
    assert preemption_pass(session, quick) == []
    off = quick.model_copy(update={"preemption": False})
    assert preemption_pass(session, off) == []
