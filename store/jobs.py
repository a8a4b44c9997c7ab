"""Job lifecycle queries: create, claim, progress, finish/fail/cancel, retry, delete, dependencies.

Every mutating function commits its own unit of work, so a worker can call them from any session
without thinking about transactions. State changes are guarded UPDATEs (`WHERE status = ...`) so
redelivered broker messages and racing processes cannot run or finish a job twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from store.models import JOB_KINDS, JOB_STATUSES, TERMINAL_STATUSES, Attempt, Job, utcnow

# The contract lists these with the job functions; they live in results.py and are re-exported here.
from store.results import add_checkpoint, add_evaluation, add_metrics, final_checkpoint_path  # noqa: F401


class JobNotFound(LookupError):
    """No job with that id."""


class JobStateError(ValueError):
    """The job's status does not allow the operation (the API answers 409)."""


class LeaseLost(JobStateError):
    """This attempt no longer holds the job (its lease was reaped and the job re-queued or ended)."""


DEFAULT_LEASE_S = 30.0


def create_job(
    s: Session,
    spec_dict: dict[str, Any],
    kind: str,
    name: str,
    queue: str,
    depends_on: Sequence[int] = (),
    parent_id: int | None = None,
    status: str = "queued",
) -> Job:
    """Insert a job ('queued' to run now, 'waiting' until its depends_on jobs succeed)."""
    if kind not in JOB_KINDS:
        raise ValueError(f"kind must be one of {JOB_KINDS}, got {kind!r}")
    if status not in ("queued", "waiting"):
        raise ValueError(f"a new job is queued or waiting, not {status!r}")
    job = Job(
        spec=spec_dict,
        kind=kind,
        name=name,
        queue=queue,
        depends_on=list(depends_on),
        parent_id=parent_id,
        status=status,
        attempt=0,
        progress_step=0,
        cancel_requested=False,
    )
    s.add(job)
    s.commit()
    return job


def get_job(s: Session, job_id: int) -> Job | None:
    """The job, or None (reads fresh from the database, not a stale identity-map copy)."""
    return s.execute(select(Job).where(Job.id == job_id).execution_options(populate_existing=True)).scalar_one_or_none()


def _require(s: Session, job_id: int) -> Job:
    job = get_job(s, job_id)
    if job is None:
        raise JobNotFound(f"job {job_id} not found")
    return job


def _filters(
    status: str | Iterable[str] | None, kind: str | None, name: str | None, parent_id: int | None
) -> list[Any]:
    conds: list[Any] = []
    if status:
        statuses = [status] if isinstance(status, str) else list(status)
        bad = [x for x in statuses if x not in JOB_STATUSES]
        if bad:
            raise ValueError(f"status: unknown {bad}; choose from {list(JOB_STATUSES)}")
        conds.append(Job.status == statuses[0] if len(statuses) == 1 else Job.status.in_(statuses))
    if kind:
        conds.append(Job.kind == kind)
    if name:
        conds.append(Job.name == name)
    if parent_id is not None:
        conds.append(Job.parent_id == parent_id)
    return conds


def list_jobs(
    s: Session,
    status: str | Iterable[str] | None = None,
    kind: str | None = None,
    name: str | None = None,
    parent_id: int | None = None,
    limit: int = 50,
    offset: int = 0,
) -> list[Job]:
    """Jobs newest first (id descending), filtered; `status` may be one status or several."""
    q = select(Job).where(*_filters(status, kind, name, parent_id)).order_by(Job.id.desc()).limit(limit).offset(offset)
    return list(s.scalars(q))


def count_jobs(
    s: Session,
    status: str | Iterable[str] | None = None,
    kind: str | None = None,
    name: str | None = None,
    parent_id: int | None = None,
) -> int:
    """How many jobs match the same filters as list_jobs (for pagination totals)."""
    q = select(func.count()).select_from(Job).where(*_filters(status, kind, name, parent_id))
    return int(s.scalar(q) or 0)


def claim_job(s: Session, job_id: int, worker: str, lease_s: float = DEFAULT_LEASE_S) -> Job | None:
    """queued → running for this worker under a lease of `lease_s`, attempt += 1; None when the job is
    not claimable.

    One conditional UPDATE decides: a redelivered message for a job that is running elsewhere,
    finished or canceled claims nothing.
    """
    now = utcnow()
    res = s.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "queued")
        .values(
            status="running",
            attempt=Job.attempt + 1,
            started_at=now,
            finished_at=None,
            worker=worker,
            error=None,
            eta_s=None,
            updated_at=now,
            lease_expires_at=now + timedelta(seconds=lease_s),
        )
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:  # type: ignore[attr-defined]
        s.rollback()
        return None
    job = _require(s, job_id)
    s.add(Attempt(job_id=job_id, number=job.attempt, worker=worker, status="running", started_at=now))
    s.commit()
    return job


def update_progress(
    s: Session,
    job_id: int,
    step: int,
    total: int | None,
    eta_s: float | None,
    sec_per_step: float | None = None,
    peak_memory_mb: float | None = None,
) -> None:
    """Record the trainer's position (one small UPDATE; called every few seconds)."""
    values: dict[str, Any] = {"progress_step": step, "progress_total": total, "eta_s": eta_s, "updated_at": utcnow()}
    if sec_per_step is not None:
        values["sec_per_step"] = sec_per_step
    if peak_memory_mb is not None:
        values["peak_memory_mb"] = peak_memory_mb
    s.execute(update(Job).where(Job.id == job_id).values(**values).execution_options(synchronize_session=False))
    s.commit()


def _close_attempt(s: Session, job: Job, status: str, error: str | None) -> None:
    if job.attempt <= 0:
        return
    s.execute(
        update(Attempt)
        .where(Attempt.job_id == job.id, Attempt.number == job.attempt, Attempt.finished_at.is_(None))
        .values(status=status, error=error, finished_at=utcnow())
        .execution_options(synchronize_session=False)
    )


def _end(s: Session, job_id: int, status: str, error: str | None = None, attempt: int | None = None,
         **extra: Any) -> Job:
    """Write a final status. With `attempt` (a worker ending its own run) only while that attempt still
    holds the job: the UPDATE locks the row, and a reaped attempt raises LeaseLost instead."""
    if attempt is not None:
        res = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "running", Job.attempt == attempt)
            .values(lease_expires_at=None)
            .execution_options(synchronize_session=False)
        )
        if res.rowcount != 1:  # type: ignore[attr-defined]
            s.rollback()
            raise LeaseLost(f"job {job_id}: attempt {attempt} no longer holds the job")
    job = _require(s, job_id)
    now = utcnow()
    job.lease_expires_at = None
    job.status = status
    job.finished_at = now
    job.updated_at = now
    job.error = error
    job.eta_s = 0.0 if status == "succeeded" else None
    job.cancel_requested = False
    for key, value in extra.items():
        setattr(job, key, value)
    _close_attempt(s, job, status, error)
    s.commit()
    return job


def finish_job(s: Session, job_id: int, final_metrics: dict[str, Any] | None, attempt: int | None = None) -> Job:
    """running → succeeded with the run's final metrics (callers then run release_dependents)."""
    job = _require(s, job_id)
    extra: dict[str, Any] = {"final_metrics": final_metrics}
    if job.progress_total:
        extra["progress_step"] = job.progress_total
    return _end(s, job_id, "succeeded", None, attempt, **extra)


def fail_job(s: Session, job_id: int, error: str, attempt: int | None = None) -> Job:
    """Mark failed with a message that says what to change (callers then run release_dependents)."""
    return _end(s, job_id, "failed", error, attempt)


def mark_canceled(s: Session, job_id: int, attempt: int | None = None) -> Job:
    """The worker stopped cooperatively after a cancel request."""
    return _end(s, job_id, "canceled", None, attempt)


def request_cancel(s: Session, job_id: int) -> Job:
    """queued/waiting → canceled now; running → cancel_requested (the worker stops at its next step)."""
    job = _require(s, job_id)
    if job.status in TERMINAL_STATUSES:
        raise JobStateError(f"job {job_id} is already {job.status}")
    res = s.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(("queued", "waiting")))
        .values(status="canceled", finished_at=utcnow(), updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:  # type: ignore[attr-defined]
        s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "running")
            .values(cancel_requested=True, updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
    s.commit()
    _cancel_if_worker_lost(s, job_id)
    children = s.scalars(select(Job.id).where(Job.parent_id == job_id, Job.status.not_in(TERMINAL_STATUSES)))
    for child_id in list(children):  # a study's children go with it
        request_cancel(s, child_id)
    return _require(s, job_id)


def is_cancel_requested(s: Session, job_id: int) -> bool:
    """True when the job should stop (a cancel was requested, or it was deleted/canceled meanwhile)."""
    row = s.execute(select(Job.cancel_requested, Job.status).where(Job.id == job_id)).first()
    if row is None:
        return True
    return bool(row[0]) or row[1] == "canceled"


def _dependency_problem(s: Session, depends_on: Sequence[int]) -> tuple[str | None, bool]:
    """(message for a failed/canceled/missing dependency or None, all dependencies succeeded)."""
    if not depends_on:
        return None, True
    rows = {r[0]: (r[1], r[2]) for r in s.execute(select(Job.id, Job.status, Job.error).where(Job.id.in_(depends_on)))}
    all_done = True
    for dep in depends_on:
        if dep not in rows:
            return f"teacher/checkpoint job {dep} no longer exists; resubmit this job with another checkpoint", False
        status, error = rows[dep]
        if status == "failed":
            return f"teacher/checkpoint job {dep} failed: {error or 'no message'}; retry it, then retry this job", False
        if status == "canceled":
            return f"teacher/checkpoint job {dep} was canceled; retry it, then retry this job", False
        all_done = all_done and status == "succeeded"
    return None, all_done


def retry_job(s: Session, job_id: int) -> Job:
    """failed|canceled → queued (or waiting while its dependencies still run); the run folder is kept,
    so the worker resumes from the last checkpoint."""
    job = _require(s, job_id)
    if job.status not in ("failed", "canceled"):
        raise JobStateError(f"job {job_id} is {job.status}; only failed or canceled jobs can be retried")
    problem, ready = _dependency_problem(s, job.depends_on or [])
    if problem:
        raise JobStateError(problem)
    job.status = "queued" if ready else "waiting"
    job.cancel_requested = False
    job.error = None
    job.finished_at = None
    job.eta_s = None
    job.updated_at = utcnow()
    s.commit()
    return job


def delete_job(s: Session, job_id: int) -> None:
    """Remove a finished job and its rows (the caller removes its artifact folder)."""
    job = _require(s, job_id)
    if job.status not in TERMINAL_STATUSES:
        raise JobStateError(f"job {job_id} is {job.status}; cancel it first, only finished jobs can be deleted")
    s.delete(job)
    s.commit()


def settle_waiting(s: Session, job_id: int) -> Job | None:
    """Re-check one waiting job's dependencies: queue it (returned), fail it, or leave it waiting.

    Called by release_dependents and by the API right after it creates a waiting job, which closes the
    race where the dependency finished between the API's check and its commit.
    """
    job = _require(s, job_id)
    if job.status != "waiting":
        return None
    problem, ready = _dependency_problem(s, job.depends_on or [])
    if problem:
        res = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "waiting")
            .values(status="failed", error=problem, finished_at=utcnow(), updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        s.commit()
        if res.rowcount == 1:  # type: ignore[attr-defined]
            release_dependents(s, job_id)  # its own dependents fail in turn
        return None
    if not ready:
        return None
    res = s.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "waiting")
        .values(status="queued", updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    s.commit()
    # Only the process whose UPDATE won enqueues it, so a racing API and worker never send it twice.
    return _require(s, job_id) if res.rowcount == 1 else None  # type: ignore[attr-defined]


def release_dependents(s: Session, finished_job_id: int) -> list[Job]:
    """After a job ends: waiting jobs whose dependencies all succeeded become queued (returned, the
    caller enqueues them); those depending on a failed/canceled job fail with a message saying so."""
    waiting = s.execute(select(Job.id, Job.depends_on).where(Job.status == "waiting")).all()
    released: list[Job] = []
    for job_id, deps in waiting:
        if finished_job_id in (deps or []):
            job = settle_waiting(s, job_id)
            if job is not None:
                released.append(job)
    return released


def undelivered_queued(s: Session, queues: Sequence[str], older_than_s: float, limit: int = 10) -> list[Job]:
    """Queued jobs on these queues untouched for `older_than_s`: their broker message was probably lost.

    Marks them touched (updated_at) so that a sweep re-sends each at most once per period.
    """
    from datetime import timedelta

    cutoff = utcnow() - timedelta(seconds=older_than_s)
    jobs = list(s.scalars(
        select(Job).where(Job.status == "queued", Job.queue.in_(list(queues)), Job.updated_at < cutoff)
        .order_by(Job.id).limit(limit)
    ))
    for job in jobs:
        job.updated_at = utcnow()
    s.commit()
    return jobs


# --- leases -----------------------------------------------------------------------------------------
# A running job is held by one attempt under a lease that its worker's heartbeat renews. The reaper
# takes back expired leases with the same kind of conditional UPDATE as the claim, so running it from
# the API and from every worker at once is harmless: exactly one UPDATE wins each expired lease.


def _stale(now: datetime) -> Any:
    """Running under an expired lease (or none: rows claimed before leases existed)."""
    return (Job.status == "running") & ((Job.lease_expires_at < now) | Job.lease_expires_at.is_(None))


def renew_lease(s: Session, job_id: int, worker: str, attempt: int, lease_s: float) -> bool:
    """Extend this attempt's lease; False when the attempt no longer holds the job (it must stop)."""
    now = utcnow()
    res = s.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "running", Job.worker == worker, Job.attempt == attempt)
        .values(lease_expires_at=now + timedelta(seconds=lease_s))
        .execution_options(synchronize_session=False)
    )
    s.commit()
    return res.rowcount == 1  # type: ignore[attr-defined]


def lost_message(worker: str | None, step: int, attempts: int) -> str:
    """The reason a job failed because its workers kept disappearing."""
    return (f"worker {worker or '?'} lost at step {step}; {attempts} attempt{'s' if attempts != 1 else ''} used "
            "(max_attempts); retry to resume from the last checkpoint")


@dataclass
class Reaped:
    """What one reaper pass did: jobs to enqueue again, and jobs it ended (release their dependents)."""

    requeued: list[Job] = field(default_factory=list)
    ended: list[int] = field(default_factory=list)


def reap_expired_leases(s: Session, now: datetime | None = None, max_attempts: int = 3) -> Reaped:
    """Expired leases → queued as a new attempt (it resumes from the last complete checkpoint), or
    failed with the reason once `max_attempts` (the spec's, else this default) are used, or canceled
    when a cancel was requested. The caller enqueues `requeued` and releases the dependents of `ended`."""
    now = now or utcnow()
    out = Reaped()
    rows = s.execute(
        select(Job.id, Job.attempt, Job.worker, Job.progress_step, Job.spec, Job.cancel_requested).where(_stale(now))
    ).all()
    s.rollback()  # end the read transaction; each job below is its own guarded unit of work
    for job_id, attempt, worker, step, spec, cancel in rows:
        limit = int((spec or {}).get("max_attempts") or max_attempts)
        lost = f"worker {worker or '?'} lost at step {step} (no heartbeat before its lease expired)"
        if cancel:
            values: dict[str, Any] = {"status": "canceled", "finished_at": now, "cancel_requested": False}
        elif attempt >= limit:
            values = {"status": "failed", "finished_at": now, "error": lost_message(worker, step, attempt)}
        else:
            values = {"status": "queued", "worker": None, "eta_s": None}
        res = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.attempt == attempt, _stale(now))
            .values(lease_expires_at=None, updated_at=now, **values)
            .execution_options(synchronize_session=False)
        )
        if res.rowcount != 1:  # type: ignore[attr-defined]
            s.rollback()  # renewed, ended or reaped by someone else meanwhile
            continue
        _close_lost_attempt(s, job_id, attempt, lost, now)
        s.commit()
        if values["status"] == "queued":
            out.requeued.append(_require(s, job_id))
        else:
            out.ended.append(job_id)
    return out


def expire_leases_of(s: Session, worker: str) -> int:
    """A worker (re)starting under `worker`'s name: the previous process is gone, so its leases are
    expired now instead of at their timeout (the next reap_expired_leases re-queues the jobs)."""
    res = s.execute(
        update(Job)
        .where(Job.status == "running", Job.worker == worker)
        .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        .execution_options(synchronize_session=False)
    )
    s.commit()
    return int(res.rowcount or 0)  # type: ignore[attr-defined]


def _close_lost_attempt(s: Session, job_id: int, attempt: int, error: str, now: datetime) -> None:
    s.execute(
        update(Attempt)
        .where(Attempt.job_id == job_id, Attempt.number == attempt, Attempt.finished_at.is_(None))
        .values(status="lost", error=error, finished_at=now)
        .execution_options(synchronize_session=False)
    )


def _cancel_if_worker_lost(s: Session, job_id: int) -> None:
    """Cancel of a running job whose worker is gone (lease expired): nobody would read the flag, so
    the job is canceled now."""
    now = utcnow()
    row = s.execute(select(Job.attempt, Job.worker, Job.progress_step).where(Job.id == job_id, _stale(now))).first()
    if row is None:
        return
    attempt, worker, step = row
    res = s.execute(
        update(Job)
        .where(Job.id == job_id, Job.attempt == attempt, _stale(now))
        .values(status="canceled", finished_at=now, updated_at=now, lease_expires_at=None, cancel_requested=False)
        .execution_options(synchronize_session=False)
    )
    if res.rowcount == 1:  # type: ignore[attr-defined]
        _close_lost_attempt(s, job_id, attempt, f"worker {worker or '?'} lost at step {step}; canceled", now)
    s.commit()


def unservable_queued(s: Session, live_queues: Iterable[str]) -> list[Job]:
    """Queued jobs on a queue that no live worker consumes (e.g. device: cuda and no GPU worker)."""
    live = set(live_queues)
    return [j for j in s.scalars(select(Job).where(Job.status == "queued").order_by(Job.id)) if j.queue not in live]


def fail_unservable(s: Session, live_queues: Iterable[str], wait_s: float, now: datetime | None = None) -> list[int]:
    """Fail queued jobs that no live worker could take for `wait_s` (guarded: only if still queued)."""
    now = now or utcnow()
    failed: list[int] = []
    for job in unservable_queued(s, live_queues):
        if job.updated_at > now - timedelta(seconds=wait_s):
            continue
        res = s.execute(
            update(Job)
            .where(Job.id == job.id, Job.status == "queued", Job.updated_at == job.updated_at)
            .values(status="failed", finished_at=now, updated_at=now, error=unservable_message(job.queue, wait_s))
            .execution_options(synchronize_session=False)
        )
        s.commit()
        if res.rowcount == 1:  # type: ignore[attr-defined]
            failed.append(job.id)
    return failed


def unservable_message(queue: str, waited_s: float | None = None) -> str:
    """Why a queued job is not starting, and what to do about it."""
    how = {"cuda": "start a GPU worker (`icd worker --gpus 0`) or submit with device: cpu",
           "cpu": "start a CPU worker (`icd worker --cpu`) or submit with device: auto"}.get(
        queue, f"start a worker that consumes queue {queue!r} (`icd worker -Q {queue}`)")
    waited = f" for {waited_s:.0f} s" if waited_s is not None else ""
    return f"no live worker consumes queue {queue!r}{waited}: {how}"
