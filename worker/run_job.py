"""Running one job in a worker: claim it, run its spec (or fan out a study, or export a model), record the
outcome. Celery-free: the Celery task (worker.tasks) calls `execute_job`, and the DDP ranks
(worker.ddp_rank) share `resolve_checkpoint` without loading Celery.

The claim takes the first job on the worker's queues in the scheduler's order (docs/scheduling.md; a
redelivered or canceled job claims nothing); a training job runs with `icd_core.runner.run_spec` in its run
folder, resuming from its last checkpoint. Whatever happens, the job never stays 'running': errors a user
can fix become a failed job whose message says what to change (worker.outcome).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from icd_core.json_numbers import finite_floats
from icd_core.run_layout import CHECKPOINT_DIR, LOG_FILE
from icd_core.spec import parse_job_ref
from store.artifacts import ArtifactStore
from store.checkpoint_refs import resolve_job_ref
from store.dispatch import group_size
from store.jobs import LeaseLost, claim_job, claim_next, expire_leases_of, finish_job, get_job, update_progress
from store.models import AttemptStatus, JobStatus
from store.settings import get_settings
from worker.db import sessions
from worker.outcome import after_end, log_attempt_end, never_left_running, record_failure, record_pruned
from worker.reporter import DbReporter
from worker.state import PROCESS, send, shutdown_requested

log = logging.getLogger(__name__)


def execute_job(job_id: int, worker: str, queues: str | None = None) -> str:
    """Claim, run and settle one job; returns its final status (for logs: the database holds the truth).

    A Celery worker (which knows its queues) treats the message as a wake-up: it claims the job the
    database puts first on all its queues (docs/scheduling.md), which may be another one than `job_id`;
    that one's wake-up is then sent again, so every queued job keeps a message. Called without queues
    (tests, in-process runs), it claims exactly `job_id`.
    """
    settings = get_settings()
    queues = queues if queues is not None else PROCESS.queues or None
    with sessions()() as s:
        job = _claim(s, job_id, worker, queues, settings.lease_timeout_s)
        if job is None:
            return _not_claimed(s, job_id, worker)
        job_id = job.id
        kind, spec_dict, attempt = job.kind, dict(job.spec), job.attempt  # loaded: usable after close

    artifacts = ArtifactStore(settings.artifact_root)
    job_dir = artifacts.job_dir(job_id)
    heartbeat = PROCESS.heartbeat
    if heartbeat is not None:
        heartbeat.set_job(job_id, attempt)
    status: str = JobStatus.FAILED
    try:
        with job_log(job_dir / LOG_FILE):
            how = "starts" if attempt <= 1 else "resumes from its last checkpoint (if any)"
            log.info("job %s (%s) attempt %s %s on %s", job_id, kind, attempt, how, worker)
            _remove_stale_temporaries(job_dir)
            status = _run_and_settle(job, spec_dict, attempt, job_dir, artifacts)
            if kind in ("study", "sweep") and status == JobStatus.SUCCEEDED:
                log.info("%s %s: children queued; it is 'waiting' until they end", kind, job_id)
            else:
                log.info("job %s %s", job_id, status)
    except LeaseLost as exc:
        log.error("job %s: %s; another attempt owns it now, nothing recorded", job_id, exc)
        status = AttemptStatus.LOST
    finally:
        never_left_running(job_id, worker, attempt)
        if heartbeat is not None:
            heartbeat.set_job(None)
        if status != JobStatus.QUEUED:  # a hand-back logged its end before another attempt could start
            log_attempt_end(job_id, attempt, worker, status)
        after_end(job_id)
    return status


def _claim(s: Any, hint: int, worker: str, queues: str | None, lease_s: float) -> Any:
    """The job this worker runs now: the database's first on `queues`, else exactly `hint`. When the
    first is another job, `hint` (if still queued) gets a new wake-up: every queued job keeps a message."""
    if not queues:
        return claim_job(s, hint, worker, lease_s=lease_s)
    job = claim_next(s, worker, [q for q in queues.split(",") if q], lease_s=lease_s)
    if job is not None and job.id != hint:
        hinted = get_job(s, hint)
        if hinted is not None and hinted.status == JobStatus.QUEUED:
            send(hint, hinted.queue)
        log.info("job %s claimed on the wake-up of job %s (database order)", job.id, hint)
    return job


def _remove_stale_temporaries(job_dir: Path) -> None:
    """A killed checkpoint write leaves `<name>.tmp` (tens of MB); no writer of this job runs now."""
    from icd_core.engine.checkpoint import remove_stale_temporaries

    removed = remove_stale_temporaries(job_dir / CHECKPOINT_DIR)
    if removed:
        log.info("removed %d stale temporary file(s): %s", len(removed), [p.name for p in removed])


def _reporter(job_id: int, attempt: int, artifacts: ArtifactStore) -> DbReporter:
    heartbeat = PROCESS.heartbeat
    return DbReporter(
        sessions(),
        job_id,
        attempt,
        artifacts,
        on_flush=heartbeat.beat_if_due if heartbeat is not None else None,
        stop_event=shutdown_requested,
        lease_lost=heartbeat.lease_lost if heartbeat is not None else None,
        confirm_lease=heartbeat.confirm_lease if heartbeat is not None else None,
    )


def _run_and_settle(job: Any, spec_dict: dict[str, Any], attempt: int, job_dir: Path, artifacts: ArtifactStore) -> str:
    """Run the job and write its outcome; every exception becomes a status and a message."""
    reporter = _reporter(job.id, attempt, artifacts)
    trial: list[Any] = []
    try:
        try:
            if job.kind == "study":
                run_study_job(job)
                return JobStatus.SUCCEEDED
            if job.kind == "sweep":
                run_sweep_job(job)
                return JobStatus.SUCCEEDED
            if job.kind == "export":
                from worker.export import run_export

                return _finish(job.id, attempt, run_export(spec_dict, job.owner, job_dir, reporter))
            trial = _trial_callbacks(job.id)  # a sweep's trial: its pruner (worker.sweep)
            result = _run_spec(spec_dict, job.owner, job_dir, reporter, trial)
        finally:
            reporter.close()  # stop its writer thread and write what it still buffers
    except BaseException as exc:  # noqa: BLE001 - every failure must be recorded, then re-raised if fatal
        status = record_pruned(job.id, attempt, exc, trial) or record_failure(job.id, attempt, exc, reporter)
        if not isinstance(exc, Exception):
            raise
        return status
    _record_run(job.id, attempt, reporter, result)
    return _finish(job.id, attempt, finite_floats(result.final_metrics))


def _record_run(job_id: int, attempt: int, reporter: DbReporter, result: Any) -> None:
    """A finished run's last progress, timing and evaluation (idempotent: the reporter usually wrote it)."""
    with sessions()() as s:
        update_progress(
            s,
            job_id,
            reporter.step or (reporter.total or 0),
            reporter.total,
            0.0,
            sec_per_step=result.sec_per_step,
            peak_memory_mb=result.peak_memory_mb,
        )
        if result.evaluation is not None:
            from store.results import add_evaluation

            ev = result.evaluation
            add_evaluation(s, job_id, attempt, ev.step, ev.metrics, ev.per_class)


def _finish(job_id: int, attempt: int, final_metrics: dict[str, Any]) -> str:
    """running → succeeded for this attempt ('canceled' when a cancel came while it finished)."""
    with sessions()() as s:
        ended = finish_job(s, job_id, final_metrics, attempt=attempt)
    return ended.status if ended is not None else JobStatus.SUCCEEDED


def _run_spec(
    spec_dict: dict[str, Any], owner: str | None, job_dir: Path, reporter: DbReporter, extra: Sequence[Any] = ()
) -> Any:
    from icd_core.runner import run_spec

    spec = confined_spec(spec_dict, owner)
    if group_size(spec_dict) > 1:
        return _run_group(spec.model_dump(mode="json"), group_size(spec_dict), job_dir, reporter)
    return run_spec(
        spec,
        output_dir=job_dir,
        callbacks=[reporter, *extra],
        resume=True,
        resolve_checkpoint=resolve_checkpoint,
        cache_dir=get_settings().cache_dir,
    )


def confined_spec(spec_dict: dict[str, Any], owner: str | None) -> Any:
    """The parsed training spec with its paths checked again (see `confine`)."""
    from icd_core.spec import parse_spec

    return confine(parse_spec(spec_dict), owner)


def confine(spec: BaseModel, owner: str | None) -> Any:
    """The spec with its paths checked again against this worker's roots and the job owner's rights (a
    symlink may have moved since submit; a token may have been revoked): the API's one path rule."""
    from icd_core.data_roots import PathNotAllowed, confine_spec_paths
    from store.tokens import may_read_job

    settings = get_settings()
    with sessions()() as s:
        confined, errors = confine_spec_paths(
            spec, settings.allowed_data_roots(), settings.artifact_root, lambda job_id: may_read_job(s, owner, job_id)
        )
    if errors:
        raise PathNotAllowed("; ".join(f"{field}: {reason}" for field, reason in errors))
    return confined


def _run_group(spec_dict: dict[str, Any], gpus: int, job_dir: Path, reporter: DbReporter) -> Any:
    """resources.gpus > 1: the job runs as a torchrun group (rank 0 reports to the database); this
    process keeps the job's heartbeat and relays a worker shutdown to the group."""
    from icd_core.engine.callbacks import TrainingStopped
    from icd_core.spec import parse_spec
    from worker.group import run_group

    parse_spec(spec_dict)  # a spec error fails the job here, before any rank starts
    heartbeat = PROCESS.heartbeat
    try:
        result, main = run_group(
            reporter.job_id,
            reporter.attempt,
            spec_dict,
            gpus,
            job_dir,
            should_stop=lambda: shutdown_requested.is_set() or _lease_lost(reporter) or reporter.poll_preemption(),
            on_tick=heartbeat.beat_if_due if heartbeat is not None else None,
            stop_grace_s=get_settings().ddp_stop_grace_s,
        )
    except TrainingStopped as stop:
        reporter.cancel_requested = bool(getattr(stop, "canceled", False))
        raise
    reporter.step, reporter.total = int(main.get("step") or 0), main.get("total")
    return result


def _lease_lost(reporter: DbReporter) -> bool:
    """Whether the heartbeat found this attempt's lease taken over."""
    lost = reporter.lease_lost
    return bool(lost is not None and lost.is_set())


def run_study_job(job: Any) -> None:
    """kind=study: create the children as ordinary queued jobs and park the study in 'waiting'.

    The study is closed later by `worker.study.child_ended`, called as each child ends (worker.outcome.after_end).
    """
    from worker.study import start_study

    confined_spec(dict(job.spec), job.owner)  # the same path and ownership check as a training job's
    with sessions()() as s:
        for child in start_study(s, job, resolve_checkpoint):
            send(child.id, child.queue)


def run_sweep_job(job: Any) -> None:
    """kind=sweep: park the sweep and queue its first trials; `worker.sweep.child_ended` does the rest."""
    from worker.sweep import start_sweep

    confined_spec(dict(job.spec), job.owner)
    with sessions()() as s:
        for child in start_sweep(s, job):
            send(child.id, child.queue)


def _trial_callbacks(job_id: int) -> list[Any]:
    from worker.sweep import trial_callbacks

    return trial_callbacks(sessions(), job_id)


def resolve_checkpoint(ref: str) -> Path:
    """`job:<id>` → that job's final checkpoint; a path → itself (confine resolved and checked it)."""
    if parse_job_ref(ref) is not None:
        with sessions()() as s:
            return resolve_job_ref(s, get_settings().artifact_root, ref)
    return Path(ref)


def _not_claimed(s: Any, job_id: int, worker: str) -> str:
    """A message for a job this worker cannot claim: a no-op. If the job is 'running' under this very
    worker name, the process that ran it died (this worker runs one job at a time): its lease ends
    now and the reaper re-queues it to resume from its last checkpoint."""
    from worker.upkeep import reap

    job = get_job(s, job_id)
    if job is None:
        return "missing"
    if job.status == JobStatus.RUNNING and job.worker == worker:
        log.warning("job %s was running under this worker's name in a process that died; taking it back", job_id)
        expire_leases_of(s, worker)
        reap()
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
