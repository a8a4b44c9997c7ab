"""Preemption onto a checkpoint: when a queued job cannot start because every worker that could run it
runs lower-priority work, ask the lowest-priority of those jobs to checkpoint and go back to the queue.

Runs with the reaper (API and every worker, every ICD_REAPER_INTERVAL_S) and right after a submit. The
decision is taken under the scheduler lock and each request is a guarded UPDATE, so concurrent passes
never ask two jobs to make room for one. The running job's worker reads the request about once a second,
stops at its next step with a checkpoint of that step, and re-queues it (`store.jobs.requeue_preempted`):
the warm-shutdown path, with the attempt not counted against max_attempts. See docs/scheduling.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from store.jobs import request_preemption, withdraw_stale_preemptions
from store.models import Job, JobStatus, Worker, utcnow
from store.scheduler import Candidate, claim_order, lock_scheduler, owner_loads, queued_candidates
from store.settings import Settings
from store.workers import list_workers

log = logging.getLogger(__name__)
PREEMPTIBLE_KINDS = ("train", "distill")  # they checkpoint any step; evaluate and study jobs are short


@dataclass(frozen=True)
class Running:
    id: int
    attempt: int
    priority: int
    started_at: datetime | None
    worker: str | None
    asked: int | None  # preempt_requested_by
    finishing: bool  # past its last step (post-training phase): nothing to gain by stopping it


def preemption_pass(s: Session, settings: Settings, now: datetime | None = None) -> list[tuple[int, int]]:
    """Request the preemptions the queue calls for; returns (victim job, for job) pairs, committed."""
    if not settings.preemption:
        return []
    now = now or utcnow()
    lock_scheduler(s)
    withdraw_stale_preemptions(s)
    workers = list_workers(s, alive_within_s=3 * settings.worker_heartbeat_s)
    running = _running(s)
    floor = min((r.priority for r in running), default=None)
    if floor is None:
        s.commit()
        return []
    cands = queued_candidates(s, None, min_priority=floor + 1)
    order = claim_order(cands, owner_loads(s, {c.owner for c in cands}))
    asked: list[tuple[int, int]] = []
    pending = {r.asked for r in running if r.asked is not None}
    taken: set[str] = set()  # workers already promised to a candidate in this pass
    for cand in order:
        if cand.id in pending:
            continue  # a job is already making room for it
        victim = _victim_for(cand, workers, running, taken, now, settings.preempt_min_run_s)
        if victim is None:
            continue
        if victim.id and request_preemption(s, victim.id, victim.attempt, cand.id):
            asked.append((victim.id, cand.id))
            log.warning(
                "job %s (priority %s) preempts job %s (priority %s)", cand.id, cand.priority, victim.id, victim.priority
            )
    s.commit()
    return asked


_IDLE = Running(0, 0, 0, None, None, None, False)  # "a free worker will take it": no preemption


def _victim_for(
    cand: Candidate, workers: list[Worker], running: list[Running], taken: set[str], now: datetime, min_run_s: float
) -> Running | None:
    """The running job to stop for `cand` (lowest priority, then latest started), _IDLE when a worker that
    serves its queue is free, None when nothing may be preempted for it."""
    suitable = [w for w in workers if cand.queue in (w.queues or "").split(",") and w.name not in taken]
    for w in suitable:
        if w.current_job_id is None:
            taken.add(w.name)
            return _IDLE
    on = {w.name for w in suitable}
    victims = [
        r
        for r in running
        if r.worker in on
        and r.priority < cand.priority
        and r.asked is None
        and not r.finishing
        and r.started_at is not None
        and (now - r.started_at).total_seconds() >= min_run_s
    ]
    if not victims:
        return None
    victim = min(victims, key=lambda r: (r.priority, -(r.started_at.timestamp() if r.started_at else 0.0), r.id))
    taken.add(victim.worker or "")
    return victim


def _running(s: Session) -> list[Running]:
    rows = s.execute(
        select(
            Job.id,
            Job.attempt,
            Job.priority,
            Job.started_at,
            Job.worker,
            Job.preempt_requested_by,
            Job.progress_step,
            Job.progress_total,
        ).where(Job.status == JobStatus.RUNNING, Job.kind.in_(PREEMPTIBLE_KINDS))
    ).all()
    return [
        Running(
            r.id,
            r.attempt,
            r.priority,
            r.started_at,
            r.worker,
            r.preempt_requested_by,
            bool(r.progress_total and r.progress_step >= r.progress_total),
        )
        for r in rows
    ]
