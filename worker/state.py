"""The worker process's state: its name and queues, its heartbeat, the shutdown flag, and how it sends a
job's wake-up. Set by the Celery signal handlers (worker.tasks); read by the Celery-free modules that run
jobs (worker.run_job, worker.outcome, worker.upkeep), so those never import Celery themselves."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from store.settings import get_settings

if TYPE_CHECKING:
    from worker.heartbeat import Heartbeat

log = logging.getLogger(__name__)

Sender = Callable[[int, str], None]


@dataclass
class WorkerProcess:
    """Set once per process by the signal handlers; empty in an in-process run (tests, `execute_job`)."""

    name: str | None = None
    queues: str = ""
    heartbeat: Heartbeat | None = None
    sender: Sender | None = None  # the Celery app's producer, set by worker.tasks


PROCESS = WorkerProcess()
# Set on a warm shutdown (SIGTERM/Ctrl-C): the running job stops at its next step, is checkpointed
# and re-queued, so the next worker resumes it.
shutdown_requested = threading.Event()


def worker_name() -> str:
    """This worker's name (its Celery hostname, e.g. gpu0@host)."""
    return PROCESS.name or f"celery@{os.uname().nodename}"


def _publish(job_id: int, queue: str) -> None:
    """Outside a Celery worker: the store's client (store.dispatch), as the API sends."""
    from store.dispatch import enqueue

    enqueue(job_id, queue, get_settings().broker_url)


def send(job_id: int, queue: str) -> None:
    """Wake a worker for `job_id`; a failure is logged, never raised: the job stays queued in the database
    and the idle sweep sends it again."""
    try:
        (PROCESS.sender or _publish)(int(job_id), queue)
        log.info("job %s sent to queue %s", job_id, queue)
    except Exception as exc:
        log.error(
            "job %s is queued but could not be sent to the broker (%s); POST /jobs/%s/retry "
            "after cancel, or restart the API",
            job_id,
            exc,
            job_id,
        )
