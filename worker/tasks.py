"""The one Celery task, `icd.run_job(job_id)`, and the worker process's start/stop hooks.

The task claims a job in the database (the first on the worker's queues in the scheduler's order,
docs/scheduling.md; a redelivered or canceled job claims nothing), runs the
spec with `icd_core.runner.run_spec` into the job's run folder (resuming from its last checkpoint),
and records the outcome. Whatever happens, the job never stays 'running': errors a user can fix
become a failed job whose message says what to change.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from celery import signals
from celery.exceptions import Reject

from icd_core.json_numbers import finite_floats
from icd_core.run_layout import CHECKPOINT_DIR, LOG_FILE
from icd_core.spec import parse_job_ref
from store.artifacts import ArtifactStore
from store.checkpoint_refs import resolve_job_ref
from store.db import DatabaseNotMigrated, ensure_migrated
from store.dispatch import TASK_NAME, group_size
from store.jobs import (
    LeaseLost,
    claim_job,
    claim_next,
    expire_leases_of,
    fail_if_running_on,
    fail_job,
    finish_job,
    get_job,
    mark_canceled,
    release_dependents,
    requeue_interrupted,
    requeue_preempted,
    undelivered_queued,
    update_progress,
)
from store.reaper import reaper_pass
from store.scheduler import queued_heads
from store.settings import get_settings
from worker.app import app
from worker.db import dispose, sessions
from worker.heartbeat import Heartbeat
from worker.reporter import DbReporter
from worker.threads import apply_threads, choose_threads

log = logging.getLogger(__name__)

# Process state, set by the signal handlers below.
_worker_name: str | None = None
_worker_queues: str = ""
_heartbeat: Heartbeat | None = None
# Set on a warm shutdown (SIGTERM/Ctrl-C): the running job stops at its next step, is checkpointed
# and re-queued, so the next worker resumes it.
shutdown_requested = threading.Event()


class WorkerShutdown(Exception):
    """The worker is stopping; the job was checkpointed and goes back to the queue."""


def worker_name() -> str:
    """This worker's name (its Celery hostname, e.g. gpu0@host)."""
    return _worker_name or f"celery@{os.uname().nodename}"


# --- worker lifecycle -----------------------------------------------------------------------------


@signals.worker_init.connect
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    """Before consuming: the jobs a previous process under this name left 'running' died with it, so
    their leases end now and they are re-queued to resume from their last checkpoints."""
    global _worker_name, _worker_queues
    _worker_name = getattr(sender, "hostname", None) or worker_name()
    consume_from = getattr(getattr(sender, "app", app).amqp.queues, "consume_from", None) or {}
    _worker_queues = ",".join(consume_from) or "any"
    get_settings().ensure_dirs()
    try:
        factory = sessions()
        try:
            ensure_migrated(factory.kw["bind"])
        except DatabaseNotMigrated as exc:
            log.critical("%s", exc)
            raise SystemExit(f"worker {_worker_name}: {exc}") from None
        with factory() as s:
            if expire_leases_of(s, _worker_name):
                log.warning("worker %s: its previous process left jobs running; taking them back", _worker_name)
        _reap()
    finally:
        dispose()  # no pooled connection may cross into a forked pool process


@signals.worker_process_init.connect
def _on_process_init(**_: Any) -> None:
    """In the process that trains: size torch's threads to the cores this worker has (the count the
    supervisor chose, see worker.threads), import torch once (not per task), start the heartbeat."""
    global _heartbeat
    choice = choose_threads(get_settings().worker_threads, requested_by="ICD_WORKER_THREADS")
    got = apply_threads(choice.threads)
    log.info("worker %s: torch intra-op threads %d (%s)", worker_name(), got, choice.reason)
    import icd_core.runner  # noqa: F401  (imports torch: the first job starts without the delay)

    _heartbeat = Heartbeat(worker_name(), _worker_queues, on_beat=_upkeep)
    _heartbeat.start()


_last_reap = 0.0


def _upkeep() -> None:
    """Periodic work on the heartbeat thread: the reaper (every reaper_interval_s), then lost messages."""
    global _last_reap
    interval = get_settings().reaper_interval_s
    if interval > 0 and time.monotonic() - _last_reap >= interval:
        _last_reap = time.monotonic()
        _reap()
    _resend_undelivered()


def _reap() -> None:
    """Every worker reaps too (guarded transitions: harmless beside the API's reaper), so a
    deployment whose API is down still resumes the jobs of dead workers."""
    with sessions()() as s:
        reaped = reaper_pass(s, get_settings())
    for job in reaped.requeued:
        _send(job.id, job.queue)
    for job_id in reaped.ended:
        _release(job_id)
    _close_ended_studies()


def _close_ended_studies() -> None:
    """Studies whose last child was ended by someone else's reaper (see worker.study.close_ended_studies)."""
    from worker.study import close_ended_studies

    try:
        with sessions()() as s:
            close_ended_studies(s)
    except Exception:
        log.exception("closing ended studies failed")


def _resend_undelivered() -> None:
    """Idle worker: re-send queued jobs of its queues that no worker claimed for a while.

    The database is the source of truth; a message lost by the broker (seen once with the embedded
    SQLite broker after a 'disk I/O error' reconnect) must not leave a job queued forever. A duplicate
    message is harmless: `claim_job` lets exactly one delivery run the job.
    """
    if _heartbeat is None or _heartbeat.current_job_id is not None:
        return
    after_s = get_settings().redeliver_after_s
    if time.monotonic() - _heartbeat.idle_since < after_s:  # a fresh message may still be on its way
        return
    queues = [q for q in _worker_queues.split(",") if q]
    with sessions()() as s:
        stale = undelivered_queued(s, queues, older_than_s=after_s)
    for job in stale:
        log.warning("job %s queued for over %.0f s with an idle worker: sending it again", job.id, after_s)
        _send(job.id, job.queue)


@signals.worker_shutting_down.connect
def _on_shutting_down(how: str = "Warm", **_: Any) -> None:
    shutdown_requested.set()


@signals.worker_shutdown.connect
def _on_shutdown(**_: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()


# --- the task -------------------------------------------------------------------------------------


@app.task(name=TASK_NAME, bind=True, acks_late=True, ignore_result=True)
def run_job(self: Any, job_id: int) -> str:
    """Run job `job_id`; returns its final status (for logs only: the database holds the truth)."""
    if shutdown_requested.is_set():
        # A message taken while the worker stops: hand it back untouched for the next worker.
        raise Reject("worker is shutting down", requeue=True) from None
    return execute_job(int(job_id), self.request.hostname or worker_name())


def execute_job(job_id: int, worker: str, queues: str | None = None) -> str:
    """Claim, run and settle one job. Separate from the Celery task so it can run in-process.

    A Celery worker (which knows its queues) treats the message as a wake-up: it claims the job the
    database puts first on all its queues (docs/scheduling.md), which may be another one than `job_id`;
    that one's wake-up is then sent again, so every queued job keeps a message. Called without queues
    (tests, in-process runs), it claims exactly `job_id`.
    """
    factory = sessions()
    settings = get_settings()
    queues = queues if queues is not None else _worker_queues or None
    with factory() as s:
        job = _claim(s, job_id, worker, queues, settings.lease_timeout_s)
        if job is None:
            return _not_claimed(s, job_id, worker)
        job_id = job.id
        kind, spec_dict, attempt = job.kind, dict(job.spec), job.attempt  # loaded: usable after close

    artifacts = ArtifactStore(settings.artifact_root)
    job_dir = artifacts.job_dir(job_id)
    if _heartbeat is not None:
        _heartbeat.set_job(job_id, attempt)
    status = "failed"
    try:
        with job_log(job_dir / LOG_FILE):
            how = "starts" if attempt <= 1 else "resumes from its last checkpoint (if any)"
            log.info("job %s (%s) attempt %s %s on %s", job_id, kind, attempt, how, worker)
            _remove_stale_temporaries(job_dir)
            status = _run_and_settle(job, spec_dict, attempt, job_dir, artifacts)
            if kind == "study" and status == "succeeded":
                log.info("study %s: children queued; it is 'waiting' until they end", job_id)
            else:
                log.info("job %s %s", job_id, status)
    except LeaseLost as exc:
        log.error("job %s: %s; another attempt owns it now, nothing recorded", job_id, exc)
        status = "lost"
    finally:
        _never_left_running(job_id, worker, attempt)
        _release(job_id)
        if _heartbeat is not None:
            _heartbeat.set_job(None)
        if status != "queued":  # a hand-back logged its end before another attempt could start
            log_attempt_end(job_id, attempt, worker, status)
        if queues:
            _wake_queued()
    return status


def _wake_queued() -> None:
    """A job left its worker, so a quota may have freed: one wake-up on each queue that has queued jobs
    (a message that finds nothing to claim is a no-op), so a job its quota held starts now rather than
    after the idle sweep."""
    try:
        with sessions()() as s:
            for job_id, queue in queued_heads(s):
                _send(job_id, queue)
    except Exception:
        log.exception("waking workers for queued jobs failed")


def _claim(s: Any, hint: int, worker: str, queues: str | None, lease_s: float) -> Any:
    """The job this worker runs now: the database's first on `queues`, else exactly `hint`. When the
    first is another job, `hint` (if still queued) gets a new wake-up: every queued job keeps a message."""
    if not queues:
        return claim_job(s, hint, worker, lease_s=lease_s)
    job = claim_next(s, worker, [q for q in queues.split(",") if q], lease_s=lease_s)
    if job is not None and job.id != hint:
        hinted = get_job(s, hint)
        if hinted is not None and hinted.status == "queued":
            _send(hint, hinted.queue)
        log.info("job %s claimed on the wake-up of job %s (database order)", job.id, hint)
    return job


def log_attempt_end(job_id: int, attempt: int, worker: str, outcome: str) -> None:
    """With the start line, the span of an attempt in the worker's log: overlapping spans of one job are
    a double run (benchmarks/fault_injection.py counts them). Logged when the attempt stops touching the
    job, before any outcome that lets another attempt start."""
    log.info("job %s attempt %s ended on %s: %s", job_id, attempt, worker, outcome)


def _remove_stale_temporaries(job_dir: Path) -> None:
    """A killed checkpoint write leaves `<name>.tmp` (tens of MB); no writer of this job runs now."""
    from icd_core.engine.checkpoint import remove_stale_temporaries

    removed = remove_stale_temporaries(job_dir / CHECKPOINT_DIR)
    if removed:
        log.info("removed %d stale temporary file(s): %s", len(removed), [p.name for p in removed])


def _run_and_settle(job: Any, spec_dict: dict[str, Any], attempt: int, job_dir: Path, artifacts: ArtifactStore) -> str:
    """Run the job and write its outcome; every exception becomes a status and a message."""
    job_id = job.id
    factory = sessions()
    reporter = DbReporter(
        factory,
        job_id,
        attempt,
        artifacts,
        on_flush=_heartbeat.beat_if_due if _heartbeat is not None else None,
        stop_event=shutdown_requested,
        lease_lost=_heartbeat.lease_lost if _heartbeat is not None else None,
        confirm_lease=_heartbeat.confirm_lease if _heartbeat is not None else None,
    )
    try:
        try:
            if job.kind == "study":
                run_study_job(job)
                return "succeeded"
            result = _run_spec(spec_dict, job.owner, job_dir, reporter)
        finally:
            reporter.close()  # stop its writer thread and write what it still buffers
    except BaseException as exc:  # noqa: BLE001 - every failure must be recorded, then re-raised if fatal
        status = _record_failure(job_id, attempt, exc, reporter)
        if not isinstance(exc, Exception):
            raise
        return status
    with factory() as s:
        update_progress(
            s,
            job_id,
            reporter.step or (reporter.total or 0),
            reporter.total,
            0.0,
            sec_per_step=result.sec_per_step,
            peak_memory_mb=result.peak_memory_mb,
        )
        if result.evaluation is not None:  # idempotent: the reporter usually recorded it already
            from store.results import add_evaluation

            ev = result.evaluation
            add_evaluation(s, job_id, attempt, ev.step, ev.metrics, ev.per_class)
        ended = finish_job(s, job_id, finite_floats(result.final_metrics), attempt=attempt)
    return ended.status if ended is not None else "succeeded"  # 'canceled': a cancel came while it finished


def _run_spec(spec_dict: dict[str, Any], owner: str | None, job_dir: Path, reporter: DbReporter) -> Any:
    from icd_core.runner import run_spec

    settings = get_settings()
    spec = confined_spec(spec_dict, owner)
    if group_size(spec_dict) > 1:
        return _run_group(spec.model_dump(mode="json"), group_size(spec_dict), job_dir, reporter)
    return run_spec(
        spec,
        output_dir=job_dir,
        callbacks=[reporter],
        resume=True,
        resolve_checkpoint=resolve_checkpoint,
        cache_dir=settings.cache_dir,
    )


def confined_spec(spec_dict: dict[str, Any], owner: str | None) -> Any:
    """The parsed spec with its paths checked again against this worker's roots and the job owner's
    rights (a symlink may have moved since submit; a token may have been revoked): the API's rule."""
    from icd_core.data_roots import PathNotAllowed, confine_spec_paths
    from icd_core.spec import parse_spec
    from store.tokens import may_read_job

    settings = get_settings()
    with sessions()() as s:
        spec, errors = confine_spec_paths(
            parse_spec(spec_dict),
            settings.allowed_data_roots(),
            settings.artifact_root,
            lambda job_id: may_read_job(s, owner, job_id),
        )
    if errors:
        raise PathNotAllowed("; ".join(f"{field}: {reason}" for field, reason in errors))
    return spec


def _run_group(spec_dict: dict[str, Any], gpus: int, job_dir: Path, reporter: DbReporter) -> Any:
    """resources.gpus > 1: the job runs as a torchrun group (rank 0 reports to the database); this
    process keeps the job's heartbeat and relays a worker shutdown to the group."""
    from icd_core.engine.callbacks import TrainingStopped
    from icd_core.spec import parse_spec
    from worker.group import run_group

    parse_spec(spec_dict)  # a spec error fails the job here, before any rank starts
    try:
        result, main = run_group(
            reporter.job_id,
            reporter.attempt,
            spec_dict,
            gpus,
            job_dir,
            should_stop=lambda: shutdown_requested.is_set() or _lease_lost(reporter) or reporter.poll_preemption(),
            on_tick=_heartbeat.beat_if_due if _heartbeat is not None else None,
            stop_grace_s=get_settings().ddp_stop_grace_s,
        )
    except TrainingStopped as stop:
        reporter.cancel_requested = bool(getattr(stop, "canceled", False))
        raise
    reporter.step, reporter.total = int(main.get("step") or 0), main.get("total")
    return result


def _lease_lost(reporter: DbReporter) -> bool:
    """Whether the heartbeat found this attempt's lease taken over (leases: issue 9; absent before it)."""
    lost = getattr(reporter, "lease_lost", None)
    return bool(lost is not None and lost.is_set())


def run_study_job(job: Any) -> None:
    """kind=study: create the children as ordinary queued jobs and park the study in 'waiting'.

    The study is closed later by `worker.study.child_ended`, called as each child ends (see `_release`).
    """
    from worker.study import start_study

    confined_spec(dict(job.spec), job.owner)  # the same path and ownership check as a training job's
    with sessions()() as s:
        for child in start_study(s, job, resolve_checkpoint):
            _send(child.id, child.queue)


def resolve_checkpoint(ref: str) -> Path:
    """`job:<id>` → that job's final checkpoint; a path → itself (confined_spec resolved and checked it)."""
    if parse_job_ref(ref) is not None:
        with sessions()() as s:
            return resolve_job_ref(s, get_settings().artifact_root, ref)
    return Path(ref)


# --- outcomes ---------------------------------------------------------------------------------------


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


def _record_failure(job_id: int, attempt: int, exc: BaseException, reporter: DbReporter) -> str:
    """Translate an exception into canceled / re-queued / failed, with the traceback in the job log.
    Each transition is guarded by this attempt: a reaped attempt records nothing (LeaseLost)."""
    from icd_core.engine.callbacks import TrainingStopped

    with sessions()() as s:
        if isinstance(exc, TrainingStopped) and reporter.lease_lost is not None and reporter.lease_lost.is_set():
            raise LeaseLost(f"job {job_id}: attempt {attempt} was reaped at step {exc.step}")
        if isinstance(exc, TrainingStopped) and reporter.preempted_by is not None and not reporter.cancel_requested:
            return _hand_back_preempted(s, job_id, attempt, exc.step, reporter.preempted_by)
        if isinstance(exc, TrainingStopped) and shutdown_requested.is_set() and not reporter.cancel_requested:
            # A worker shutdown, not the user: give the job back to the queue; it resumes from the
            # checkpoint the trainer just wrote.
            reason = f"worker {worker_name()} shut down at step {exc.step}; re-queued to resume"
            log_attempt_end(job_id, attempt, worker_name(), "handed back to the queue")
            job = requeue_interrupted(s, job_id, reason, attempt)
            if job is None:  # it ended meanwhile: nothing to hand back
                current = get_job(s, job_id)
                return current.status if current is not None else "missing"
            log.warning("job %s: worker shutting down, checkpointed at step %s and re-queued", job_id, exc.step)
            _send(job_id, job.queue)
            return "queued"
        if isinstance(exc, TrainingStopped):
            mark_canceled(s, job_id, attempt=attempt)
            log.info("job %s canceled at step %s", job_id, exc.step)
            return "canceled"
        log.error("job %s failed:\n%s", job_id, "".join(traceback.format_exception(exc)))
        fail_job(s, job_id, failure_message(job_id, exc, reporter.step + 1 if reporter.step else None), attempt=attempt)
        return "failed"


def _hand_back_preempted(s: Any, job_id: int, attempt: int, step: int, by_job: int) -> str:
    """A preemption: the trainer checkpointed `step`; the job goes back to the queue (not counted against
    max_attempts) and resumes there on the next free worker; the job that asked takes this worker."""
    log_attempt_end(job_id, attempt, worker_name(), f"preempted by job {by_job}")
    job = requeue_preempted(s, job_id, attempt, step, by_job)
    if job is None:
        current = get_job(s, job_id)
        if current is not None and current.status == "running" and current.attempt == attempt:
            mark_canceled(s, job_id, attempt=attempt)  # a cancel came in meanwhile: it wins, as in finish_job
            return "canceled"
        return current.status if current is not None else "missing"
    log.warning("job %s: preempted by job %s, checkpointed at step %s and re-queued", job_id, by_job, step)
    _send(job_id, job.queue)
    return "queued"


def _never_left_running(job_id: int, worker: str, attempt: int) -> None:
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


def _release(job_id: int) -> None:
    """Queue the jobs that waited for this one (or fail them when it did not succeed)."""
    try:
        with sessions()() as s:
            job = get_job(s, job_id)
            if job is None or job.status in ("running", "queued"):
                return
            released = release_dependents(s, job_id)
            log.info("job %s ended %s; released waiting jobs %s", job_id, job.status, [j.id for j in released])
            for dep in released:
                _send(dep.id, dep.queue)
            if job.parent_id is not None:
                from worker.study import child_ended

                child_ended(s, job_id)
    except Exception:
        log.exception("job %s: releasing dependent jobs failed", job_id)


def _send(job_id: int, queue: str) -> None:
    """Publish from the worker's own app (its producer pool), never a second client on the same broker."""
    try:
        app.send_task(TASK_NAME, args=[int(job_id)], queue=queue)
        log.info("job %s sent to queue %s", job_id, queue)
    except Exception as exc:
        # The job stays 'queued' in the database; the message says how to get it going.
        log.error(
            "job %s is queued but could not be sent to the broker (%s); POST /jobs/%s/retry "
            "after cancel, or restart the API",
            job_id,
            exc,
            job_id,
        )


def _not_claimed(s: Any, job_id: int, worker: str) -> str:
    """A message for a job this worker cannot claim: a no-op. If the job is 'running' under this very
    worker name, the process that ran it died (this worker runs one job at a time): its lease ends
    now and the reaper re-queues it to resume from its last checkpoint."""
    job = get_job(s, job_id)
    if job is None:
        return "missing"
    if job.status == "running" and job.worker == worker:
        log.warning("job %s was running under this worker's name in a process that died; taking it back", job_id)
        expire_leases_of(s, worker)
        _reap()
        return "reaped"
    return job.status


@contextmanager
def job_log(path: Path) -> Iterator[None]:
    """Send this process's log records to the job's log file while the job runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    # Our own loggers speak at INFO (progress, resume points); other libraries stay at the root's level.
    ours = [logging.getLogger(name) for name in ("icd_core", "worker")]
    old_levels = [lg.level for lg in ours]
    for lg in ours:
        if lg.getEffectiveLevel() > logging.INFO:
            lg.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        for lg, level in zip(ours, old_levels, strict=True):
            lg.setLevel(level)
        handler.close()
