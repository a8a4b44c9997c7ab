"""A worker's periodic work on its heartbeat thread: the reaper, closing studies whose children others
ended, and re-sending queued jobs whose message was lost. Celery-free (messages go through worker.state)."""

from __future__ import annotations

import logging
import time

from store.jobs import undelivered_queued
from store.reaper import reaper_pass
from store.settings import get_settings
from worker.db import sessions
from worker.outcome import after_end
from worker.state import PROCESS, send

log = logging.getLogger(__name__)

_last_reap = 0.0


def upkeep() -> None:
    """Periodic work on the heartbeat thread: the reaper (every reaper_interval_s), then lost messages."""
    global _last_reap
    interval = get_settings().reaper_interval_s
    if interval > 0 and time.monotonic() - _last_reap >= interval:
        _last_reap = time.monotonic()
        reap()
    resend_undelivered()


def reap() -> None:
    """Every worker reaps too (guarded transitions: harmless beside the API's reaper), so a
    deployment whose API is down still resumes the jobs of dead workers."""
    with sessions()() as s:
        reaped = reaper_pass(s, get_settings())
    for job in reaped.requeued:
        send(job.id, job.queue)
    for job_id in reaped.ended:
        after_end(job_id)
    close_ended_studies()


def close_ended_studies() -> None:
    """Studies whose last child was ended by someone else's reaper (see worker.study.close_ended_studies),
    and sweeps that nobody advanced since (worker.sweep.advance_idle_sweeps)."""
    from worker.study import close_ended_studies as close
    from worker.sweep import advance_idle_sweeps

    try:
        with sessions()() as s:
            close(s)
    except Exception:
        log.exception("closing ended studies failed")
    try:
        with sessions()() as s:
            created = advance_idle_sweeps(s)
        for child in created:
            send(child.id, child.queue)
    except Exception:
        log.exception("advancing sweeps failed")


def resend_undelivered() -> None:
    """Idle worker: re-send queued jobs of its queues that no worker claimed for a while.

    The database is the source of truth; a message lost by the broker (seen once with the embedded
    SQLite broker after a 'disk I/O error' reconnect) must not leave a job queued forever. A duplicate
    message is harmless: `claim_job` lets exactly one delivery run the job.
    """
    heartbeat = PROCESS.heartbeat
    if heartbeat is None or heartbeat.current_job_id is not None:
        return
    after_s = get_settings().redeliver_after_s
    if time.monotonic() - heartbeat.idle_since < after_s:  # a fresh message may still be on its way
        return
    queues = [q for q in PROCESS.queues.split(",") if q]
    with sessions()() as s:
        stale = undelivered_queued(s, queues, older_than_s=after_s)
    for job in stale:
        log.warning("job %s queued for over %.0f s with an idle worker: sending it again", job.id, after_s)
        send(job.id, job.queue)
