"""Job lifecycle queries: create, claim, progress, finish/fail/cancel, retry, delete, dependencies.

Every mutating function commits its own unit of work, so a worker can call them from any session
without thinking about transactions. State changes are guarded UPDATEs (`WHERE status = ...`) so
redelivered broker messages and racing processes cannot run or finish a job twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from store.models import JOB_KINDS, JOB_STATUSES, TERMINAL_STATUSES, Attempt, Job, utcnow


class JobNotFound(LookupError):
    """No job with that id."""


class JobStateError(ValueError):
    """The job's status does not allow the operation (the API answers 409)."""


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
    status: str | Iterable[str] | None, kind: str | None, name: str | None, parent_id: int | None,
    search: str | None = None,
) -> list[Any]:
    conds: list[Any] = []
    if search:
        conds.append(_search_condition(search))
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


def _search_condition(search: str) -> Any:
    """A free-text search: the name contains it (case-insensitive), or it is the job's id."""
    escaped = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    cond = Job.name.ilike(f"%{escaped}%", escape="\\")
    return or_(cond, Job.id == int(search)) if search.isdigit() else cond


def list_jobs(
    s: Session,
    status: str | Iterable[str] | None = None,
    kind: str | None = None,
    name: str | None = None,
    parent_id: int | None = None,
    limit: int = 50,
    offset: int = 0,
    search: str | None = None,
    before_id: int | None = None,
) -> list[Job]:
    """Jobs newest first (id descending), filtered; `status` may be one status or several.

    before_id is the keyset cursor: only jobs older than that one (a page that stays fast at any depth).
    """
    conds = _filters(status, kind, name, parent_id, search)
    if before_id is not None:
        conds.append(Job.id < before_id)
    q = select(Job).where(*conds).order_by(Job.id.desc()).limit(limit).offset(offset)
    return list(s.scalars(q))


def count_jobs(
    s: Session,
    status: str | Iterable[str] | None = None,
    kind: str | None = None,
    name: str | None = None,
    parent_id: int | None = None,
    search: str | None = None,
) -> int:
    """How many jobs match the same filters as list_jobs (for pagination totals)."""
    q = select(func.count()).select_from(Job).where(*_filters(status, kind, name, parent_id, search))
    return int(s.scalar(q) or 0)


def claim_job(s: Session, job_id: int, worker: str) -> Job | None:
    """queued → running for this worker, attempt += 1; None when the job is not claimable.

    A redelivered message for a job that is running elsewhere, finished or canceled claims nothing.
    """
    now = utcnow()
    job = _transition(s, job_id, ("queued",), "running", attempt=Job.attempt + 1, started_at=now, finished_at=None,
                      worker=worker, error=None, eta_s=None, commit=False)
    if job is None:
        return None
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


# --- state transitions ------------------------------------------------------------------------------
# Every status change of a job is a function in this file, each one guarded UPDATE (`_transition`) from
# named states to one state: `grep -n '"failed"' store/jobs.py` answers "where does a job get marked failed".
ACTIVE = ("queued", "waiting", "running")  # every status a job can still leave


def _close_attempt(s: Session, job_id: int, status: str, error: str | None) -> None:
    """Close the job's open attempt row (there is none before its first claim)."""
    s.execute(
        update(Attempt)
        .where(Attempt.job_id == job_id, Attempt.finished_at.is_(None))
        .values(status=status, error=error, finished_at=utcnow())
        .execution_options(synchronize_session=False)
    )


def _transition(
    s: Session,
    job_id: int,
    from_states: Sequence[str],
    to: str,
    *conditions: Any,
    close_attempt: str | None = None,
    commit: bool = True,
    **values: Any,
) -> Job | None:
    """from_states → `to` in one guarded UPDATE, committed; None (nothing written) when the guard missed.

    `close_attempt` closes the open attempt row with that status (and the job's error) in the same commit;
    commit=False leaves the transaction open for the caller to add rows to it.
    """
    now = utcnow()
    res = s.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(list(from_states)), *conditions)
        .values(status=to, updated_at=now, **values)
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:  # type: ignore[attr-defined]
        s.rollback()
        return None
    if close_attempt is not None:
        _close_attempt(s, job_id, close_attempt, values.get("error"))
    if commit:
        s.commit()
    return _require(s, job_id)


def _end(
    s: Session, job_id: int, from_states: Sequence[str], status: str, error: str | None = None, *conditions: Any,
    **extra: Any,
) -> Job | None:
    """A terminal transition: finished now, the cancel flag cleared, the open attempt closed alike."""
    values: dict[str, Any] = {
        "finished_at": utcnow(),
        "error": error,
        "eta_s": 0.0 if status == "succeeded" else None,
        "cancel_requested": False,
        **extra,
    }
    return _transition(s, job_id, from_states, status, *conditions, close_attempt=status, **values)


def finish_job(s: Session, job_id: int, final_metrics: dict[str, Any] | None) -> Job | None:
    """running → succeeded with the run's final metrics (callers then run release_dependents)."""
    job = _require(s, job_id)
    extra: dict[str, Any] = {"final_metrics": final_metrics}
    if job.progress_total:
        extra["progress_step"] = job.progress_total
    return _end(s, job_id, ("running",), "succeeded", None, **extra)


def fail_job(s: Session, job_id: int, error: str) -> Job | None:
    """queued|waiting|running → failed, with a message that says what to change (callers then run
    release_dependents). A job that already ended keeps its outcome."""
    return _end(s, job_id, ACTIVE, "failed", error)


def fail_if_running_on(s: Session, job_id: int, worker: str, error: str) -> Job | None:
    """running on `worker` → failed: the safety net for a process that died or could not record its result."""
    return _end(s, job_id, ("running",), "failed", error, Job.worker == worker)


def mark_canceled(s: Session, job_id: int) -> Job | None:
    """running → canceled: the worker stopped cooperatively after a cancel request."""
    return _end(s, job_id, ("running",), "canceled", None)


def park_study(s: Session, job_id: int, children: int) -> Job | None:
    """running → waiting: a study that created its children waits for them (its fan-out attempt succeeded).

    The study is closed by `finish_study` or `fail_job` when its children end, not by its own task.
    """
    return _transition(s, job_id, ("running",), "waiting", close_attempt="succeeded", depends_on=[],
                       progress_step=0, progress_total=children)


def finish_study(s: Session, job_id: int, final_metrics: dict[str, Any]) -> Job | None:
    """waiting → succeeded: every child of the study ended and its report is written."""
    return _end(s, job_id, ("waiting",), "succeeded", None, final_metrics=final_metrics)


def requeue_interrupted(s: Session, job_id: int, reason: str) -> Job | None:
    """running → queued after a warm worker shutdown: the attempt is closed as failed with `reason`, and
    the job resumes from its checkpoint on the next worker."""
    if fail_job(s, job_id, reason) is None:
        return None
    return retry_job(s, job_id)


def request_cancel(s: Session, job_id: int) -> Job:
    """queued/waiting → canceled now; running → cancel_requested (the worker stops at its next step)."""
    job = _require(s, job_id)
    if job.status in TERMINAL_STATUSES:
        raise JobStateError(f"job {job_id} is already {job.status}")
    if _transition(s, job_id, ("queued", "waiting"), "canceled", finished_at=utcnow()) is None:
        s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "running")
            .values(cancel_requested=True, updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
    s.commit()
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
    retried = _transition(s, job_id, ("failed", "canceled"), "queued" if ready else "waiting",
                          cancel_requested=False, error=None, finished_at=None, eta_s=None)
    if retried is None:
        raise JobStateError(f"job {job_id} changed status meanwhile; reload it and try again")
    return retried


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
        if _transition(s, job_id, ("waiting",), "failed", error=problem, finished_at=utcnow()) is not None:
            release_dependents(s, job_id)  # its own dependents fail in turn
        return None
    if not ready:
        return None
    # Only the process whose UPDATE won enqueues it, so a racing API and worker never send it twice.
    return _transition(s, job_id, ("waiting",), "queued")


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


def fail_stale_running(s: Session, worker_name: str) -> list[int]:
    """At worker start: its jobs still 'running' died with the previous process; fail them clearly."""
    ids = list(s.scalars(select(Job.id).where(Job.status == "running", Job.worker == worker_name)))
    for job_id in ids:
        error = f"worker {worker_name} restarted while running; retry to resume from the last checkpoint"
        if fail_if_running_on(s, job_id, worker_name, error) is not None:
            release_dependents(s, job_id)
    return ids


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
