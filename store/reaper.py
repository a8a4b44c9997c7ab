"""The reaper pass: take back expired leases and fail jobs no live worker can take.

Both steps are guarded, idempotent transitions in `store.jobs`, so the pass runs safely from the API
process and from every worker at once (a worker-only deployment still reaps; an API with no worker
still reports). It returns the jobs to send to the broker; the caller sends them with its own client.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from sqlalchemy.orm import Session

from store.jobs import (
    Reaped,
    fail_unservable,
    reap_expired_leases,
    unservable_message,
    unservable_queues,
)
from store.models import AttemptStatus, Job, JobStatus, utcnow
from store.preemption import preemption_pass
from store.scheduler import jobs_ahead, quota_hold
from store.settings import Settings
from store.workers import list_workers, live_queues

log = logging.getLogger(__name__)


def reaper_pass(s: Session, settings: Settings, now: datetime | None = None) -> Reaped:
    """One pass: expired leases re-queued (or failed past max_attempts), unservable jobs failed after
    `unservable_timeout_s` (the jobs waiting for those fail in turn, in store.jobs)."""
    reaped = reap_expired_leases(s, now, settings.max_attempts)
    live = live_queues(s, alive_within_s=3 * settings.worker_heartbeat_s)
    reaped.ended += fail_unservable(s, live, settings.unservable_timeout_s, now)
    for job in reaped.requeued:
        log.warning("job %s: its worker's lease expired; re-queued as attempt %s", job.id, job.attempt + 1)
    for job_id in reaped.ended:  # their transitions released (failed) the jobs that waited for them
        log.warning("job %s ended by the reaper", job_id)
    try:
        preemption_pass(s, settings, now)
    except Exception:  # a failed pass is tried again on the next; the reaper's work above is committed
        s.rollback()
        log.exception("preemption pass failed")
    return reaped


def _alive_window(settings: Settings) -> float:
    return 3 * settings.worker_heartbeat_s


def status_detail(s: Session, job: Job, settings: Settings) -> str | None:
    """Why a queued or running job is not progressing, and what happens next (None when it is fine);
    why a sweep pruned a trial (docs/sweeps.md#pruned-trials)."""
    now = utcnow()
    if job.status == JobStatus.PRUNED:
        return f"pruned by its sweep: {job.error}" if job.error else "pruned by its sweep"
    if job.status == JobStatus.QUEUED and job.queue not in live_queues(s, _alive_window(settings)):
        waited = (now - job.updated_at).total_seconds()
        left = max(0.0, settings.unservable_timeout_s - waited)
        return f"{unservable_message(job.queue, waited)}; it fails in {left:.0f} s unless one starts"
    if job.status == JobStatus.RUNNING and job.lease_expires_at is not None and job.lease_expires_at < now:
        return (
            f"worker {job.worker} stopped renewing its lease {(now - job.lease_expires_at).total_seconds():.0f} s "
            "ago; the reaper re-queues the job to resume from its last checkpoint"
        )
    if job.status == JobStatus.RUNNING and job.preempt_requested_by is not None:
        return (
            f"preempted by job {job.preempt_requested_by}: it checkpoints at its next step and goes back to the queue"
        )
    if job.status == JobStatus.QUEUED:
        return queued_detail(s, job, settings)
    return None


def queued_detail(s: Session, job: Job, settings: Settings) -> str | None:
    """Why a queued job (on a queue a live worker consumes) has not started: its owner's quota, the jobs a
    worker takes first, or every such worker busy; after a preemption, by whom and where it resumes. None
    for a job that a free worker is about to take."""
    ahead = jobs_ahead(s, job)
    why = quota_hold(s, job)
    if why is None and ahead:
        why = (
            f"waiting for a free worker: {ahead} queued job(s) on queue {job.queue!r} go first "
            f"(higher priority, or older at priority {job.priority})"
        )
    elif why is None and not _free_worker_for(s, job.queue, settings):
        why = f"next on queue {job.queue!r} (priority {job.priority}): every worker that takes it is busy"
    last = max(job.attempts, key=lambda a: a.number, default=None)
    if last is not None and last.status == AttemptStatus.PREEMPTED and last.error:
        why = f"{last.error}; {why}" if why else last.error
    return why


def _free_worker_for(s: Session, queue: str, settings: Settings) -> bool:
    return any(
        w.current_job_id is None and queue in (w.queues or "").split(",")
        for w in list_workers(s, _alive_window(settings))
    )


def unservable_warnings(s: Session, settings: Settings) -> list[str]:
    """One line per queue that has queued jobs and no live worker (for /health, which anyone may read:
    a count, not the jobs' ids; each job's own page says why it waits)."""
    by_queue = unservable_queues(s, live_queues(s, _alive_window(settings)))
    return [
        f"{'more than 10' if len(ids) > 10 else len(ids)} queued job(s) cannot start: {unservable_message(queue)}"
        for queue, ids in sorted(by_queue.items())
    ]


def reap_and_send(s: Session, settings: Settings, send: Callable[[int, str], None]) -> Reaped:
    """One reaper pass, then every re-queued job published with `send(job_id, queue)`. A failed send is
    only logged: the job is queued in the database and an idle worker's sweep re-sends it."""
    reaped = reaper_pass(s, settings)
    for job in reaped.requeued:
        try:
            send(job.id, job.queue)
        except Exception as exc:
            log.error("job %s re-queued but not sent (%s); an idle worker re-sends it", job.id, exc)
    return reaped
