"""Recording how a job's attempt ended: the message a user reads for a failure, the canceled, re-queued
(shutdown, preemption) and failed transitions, the last-resort net that never leaves a job running, and the
wake-ups for the jobs that waited on it. Celery-free: the DDP ranks (worker.ddp_rank) use it too.

Where a job is marked failed: every status change is a guarded transition in store/jobs.py; a worker's run
ends there through `record_failure` (an exception) or `never_left_running` (the outcome could not be
recorded), a lost worker through the reaper (store/reaper.py).
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path
from typing import Any

from icd_core.json_numbers import finite_floats
from store.jobs import (
    LeaseLost,
    fail_if_running_on,
    fail_job,
    get_job,
    mark_canceled,
    requeue_interrupted,
    requeue_preempted,
)
from store.models import JobStatus
from store.scheduler import queued_heads
from store.settings import get_settings
from worker.db import sessions
from worker.state import send, shutdown_requested, worker_name

log = logging.getLogger(__name__)


def failure_message(job_id: int, exc: BaseException, step: int | None = None) -> str:
    """What the user reads in job.error: what to change, the exception type, never only a traceback."""
    from icd_core.engine.callbacks import TrainingDiverged

    name = type(exc).__name__
    text = str(exc) or name
    logs = f"see /jobs/{job_id}/logs"
    if _is_oom(exc):
        where = f" at batch {step}" if step else ""
        return f"out of GPU memory{where}: lower schedule.batch_size or data.max_size ({name}: {text[:300]})"
    full = _disk_full(exc)
    if full:
        return full
    if isinstance(exc, TrainingDiverged):
        return f"{text} ({name})"
    if isinstance(exc, (ValueError, FileNotFoundError)):
        return f"{text} ({name}); fix the spec and resubmit, or fix the file and retry"
    if isinstance(exc, RuntimeError):
        return f"{name}: {text}; {logs}"
    if isinstance(exc, NotImplementedError):
        return f"{name}: {text}"
    return f"{name}: {text}; {logs}"


def _disk_full(exc: BaseException) -> str | None:
    """The artifact disk filled up: say so, with its free space (torch's own text says 'unexpected pos')."""
    from icd_core.engine.checkpoint import DiskFull, disk_full_message, is_disk_full

    if isinstance(exc, DiskFull):  # a checkpoint write: its message names the file and folder
        return f"{exc} ({type(exc).__name__})"
    root = Path(get_settings().artifact_root)
    if not is_disk_full(exc, root):
        return None
    path = Path(exc.filename) if isinstance(exc, OSError) and isinstance(exc.filename, str) else None
    message = disk_full_message(path.parent, path.name) if path else disk_full_message(root)
    return f"{message} ({type(exc).__name__}: {str(exc)[:200]})"


def _is_oom(exc: BaseException) -> bool:
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:
        pass
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def log_attempt_end(job_id: int, attempt: int, worker: str, outcome: str) -> None:
    """With the start line, the span of an attempt in the worker's log: overlapping spans of one job are
    a double run (benchmarks/fault_injection.py counts them). Logged when the attempt stops touching the
    job, before any outcome that lets another attempt start."""
    log.info("job %s attempt %s ended on %s: %s", job_id, attempt, worker, outcome)


def record_failure(job_id: int, attempt: int, exc: BaseException, reporter: Any) -> str:
    """Translate an exception into canceled / re-queued / failed, with the traceback in the job log.
    Each transition is guarded by this attempt: a reaped attempt records nothing (LeaseLost)."""
    from icd_core.engine.callbacks import TrainingStopped

    with sessions()() as s:
        if not isinstance(exc, TrainingStopped):
            log.error("job %s failed:\n%s", job_id, "".join(traceback.format_exception(exc)))
            step = reporter.step + 1 if reporter.step else None
            fail_job(s, job_id, failure_message(job_id, exc, step), attempt=attempt)
            return JobStatus.FAILED
        if reporter.lease_lost is not None and reporter.lease_lost.is_set():
            raise LeaseLost(f"job {job_id}: attempt {attempt} was reaped at step {exc.step}")
        if reporter.preempted_by is not None and not reporter.cancel_requested:
            return _hand_back_preempted(s, job_id, attempt, exc.step, reporter.preempted_by)
        if shutdown_requested.is_set() and not reporter.cancel_requested:
            return _hand_back_on_shutdown(s, job_id, attempt, exc.step)
        mark_canceled(s, job_id, attempt=attempt)
        log.info("job %s canceled at step %s", job_id, exc.step)
        return JobStatus.CANCELED


def _current_status(s: Any, job_id: int) -> str:
    current = get_job(s, job_id)
    return current.status if current is not None else "missing"


def _hand_back_on_shutdown(s: Any, job_id: int, attempt: int, step: int) -> str:
    """A worker shutdown, not the user: the job goes back to the queue and resumes from the checkpoint
    the trainer just wrote."""
    reason = f"worker {worker_name()} shut down at step {step}; re-queued to resume"
    log_attempt_end(job_id, attempt, worker_name(), "handed back to the queue")
    job = requeue_interrupted(s, job_id, reason, attempt)
    if job is None:  # it ended meanwhile: nothing to hand back
        return _current_status(s, job_id)
    log.warning("job %s: worker shutting down, checkpointed at step %s and re-queued", job_id, step)
    send(job_id, job.queue)
    return JobStatus.QUEUED


def _hand_back_preempted(s: Any, job_id: int, attempt: int, step: int, by_job: int) -> str:
    """A preemption: the trainer checkpointed `step`; the job goes back to the queue (not counted against
    max_attempts) and resumes there on the next free worker; the job that asked takes this worker."""
    log_attempt_end(job_id, attempt, worker_name(), f"preempted by job {by_job}")
    job = requeue_preempted(s, job_id, attempt, step, by_job)
    if job is None:
        current = get_job(s, job_id)
        if current is not None and current.status == JobStatus.RUNNING and current.attempt == attempt:
            mark_canceled(s, job_id, attempt=attempt)  # a cancel came in meanwhile: it wins, as in finish_job
            return JobStatus.CANCELED
        return current.status if current is not None else "missing"
    log.warning("job %s: preempted by job %s, checkpointed at step %s and re-queued", job_id, by_job, step)
    send(job_id, job.queue)
    return JobStatus.QUEUED


def never_left_running(job_id: int, worker: str, attempt: int) -> None:
    """Last line of defence: if recording the outcome itself failed, fail the job (this attempt only)."""
    try:
        with sessions()() as s:
            fail_if_running_on(
                s,
                job_id,
                worker,
                f"the worker stopped before recording the result; see "
                f"/jobs/{job_id}/logs; retry to resume from the last checkpoint",
                attempt,
            )
    except Exception:
        log.exception("job %s: could not record the final state", job_id)


def record_pruned(job_id: int, attempt: int, exc: BaseException, trial: list[Any]) -> str | None:
    """A sweep's trial stopped by its pruner ends 'pruned' with the reason (None: not that kind of stop)."""
    from store.jobs import mark_pruned
    from worker.sweep import pruned_outcome

    outcome = pruned_outcome(trial, exc)
    if outcome is None:
        return None
    with sessions()() as s:
        step = int(outcome[1]["step"])
        job = mark_pruned(s, job_id, outcome[0], finite_floats(outcome[1]), step, attempt=attempt)
    log.info("job %s pruned: %s", job_id, outcome[0])
    return job.status if job is not None else JobStatus.PRUNED


def _child_ended(s: Any, job_id: int) -> None:
    """A study's or a sweep's child ended: its parent keeps its books (and a sweep may queue more trials)."""
    from worker.study import child_ended
    from worker.sweep import child_ended as trial_ended

    created = trial_ended(s, job_id)
    if created is None:
        child_ended(s, job_id)
    for child in created or []:
        send(child.id, child.queue)


def after_end(job_id: int) -> None:
    """Once a job left its worker: let its study count it, then one wake-up per queue that has queued jobs.
    The wake-ups start the jobs its end released (store.jobs releases them in the commit that ends it)
    and a job its owner's quota held, now rather than after the idle sweep; a wake-up that finds nothing
    to claim is a no-op."""
    try:
        with sessions()() as s:
            job = get_job(s, job_id)
            if job is not None and job.is_terminal and job.parent_id is not None:
                _child_ended(s, job_id)
            for head, queue in queued_heads(s):
                send(head, queue)
    except Exception:
        log.exception("job %s: waking workers for queued jobs failed", job_id)
