"""The one Celery task, `icd.run_job(job_id)`, and the worker process's start/stop hooks: all that needs
Celery. Running a job and recording its outcome live in Celery-free modules (worker.run_job,
worker.outcome), which the DDP ranks import too; the hooks below fill in worker.state for them.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals
from celery.exceptions import Reject

from store.db import DatabaseNotMigrated, ensure_migrated
from store.dispatch import TASK_NAME
from store.jobs import expire_leases_of
from store.settings import get_settings
from worker.app import app
from worker.db import dispose, sessions
from worker.heartbeat import Heartbeat
from worker.run_job import execute_job
from worker.state import PROCESS, shutdown_requested, worker_name
from worker.threads import apply_threads, choose_threads
from worker.upkeep import reap, upkeep

log = logging.getLogger(__name__)


def _send_with_app(job_id: int, queue: str) -> None:
    """Publish from the worker's own app (its producer pool), never a second client on the same broker."""
    app.send_task(TASK_NAME, args=[int(job_id)], queue=queue)


PROCESS.sender = _send_with_app


@signals.worker_init.connect
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    """Before consuming: the jobs a previous process under this name left 'running' died with it, so
    their leases end now and they are re-queued to resume from their last checkpoints."""
    PROCESS.name = getattr(sender, "hostname", None) or worker_name()
    consume_from = getattr(getattr(sender, "app", app).amqp.queues, "consume_from", None) or {}
    PROCESS.queues = ",".join(consume_from) or "any"
    get_settings().ensure_dirs()
    try:
        factory = sessions()
        try:
            ensure_migrated(factory.kw["bind"])
        except DatabaseNotMigrated as exc:
            log.critical("%s", exc)
            raise SystemExit(f"worker {PROCESS.name}: {exc}") from None
        with factory() as s:
            if expire_leases_of(s, PROCESS.name):
                log.warning("worker %s: its previous process left jobs running; taking them back", PROCESS.name)
        reap()
    finally:
        dispose()  # no pooled connection may cross into a forked pool process


@signals.worker_process_init.connect
def _on_process_init(**_: Any) -> None:
    """In the process that trains: size torch's threads to the cores this worker has (the count the
    supervisor chose, see worker.threads), import torch once (not per task), start the heartbeat."""
    choice = choose_threads(get_settings().worker_threads, requested_by="ICD_WORKER_THREADS")
    got = apply_threads(choice.threads)
    log.info("worker %s: torch intra-op threads %d (%s)", worker_name(), got, choice.reason)
    import icd_core.runner  # noqa: F401  (imports torch: the first job starts without the delay)

    PROCESS.heartbeat = Heartbeat(worker_name(), PROCESS.queues, on_beat=upkeep)
    PROCESS.heartbeat.start()


@signals.worker_shutting_down.connect
def _on_shutting_down(how: str = "Warm", **_: Any) -> None:
    shutdown_requested.set()


@signals.worker_shutdown.connect
def _on_shutdown(**_: Any) -> None:
    if PROCESS.heartbeat is not None:
        PROCESS.heartbeat.stop()


@app.task(name=TASK_NAME, bind=True, acks_late=True, ignore_result=True)
def run_job(self: Any, job_id: int) -> str:
    """Run job `job_id`; returns its final status (for logs only: the database holds the truth)."""
    if shutdown_requested.is_set():
        # A message taken while the worker stops: hand it back untouched for the next worker.
        raise Reject("worker is shutting down", requeue=True) from None
    return execute_job(int(job_id), self.request.hostname or worker_name())
