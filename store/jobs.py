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

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from icd_core.spec import INT32_MAX
from store.models import JOB_KINDS, JOB_STATUSES, TERMINAL_STATUSES, Attempt, AttemptStatus, Job, JobStatus, utcnow
from store.scheduler import Candidate, OwnerLoad, lock_scheduler, next_for
from store.settings import DEFAULT_LEASE_S


class JobNotFound(LookupError):
    """No job with that id."""


class JobStateError(ValueError):
    """The job's status does not allow the operation (the API answers 409)."""


class LeaseLost(JobStateError):
    """This attempt no longer holds the job (its lease was reaped and the job re-queued or ended)."""


def create_job(
    s: Session,
    spec_dict: dict[str, Any],
    kind: str,
    name: str,
    queue: str,
    depends_on: Sequence[int] = (),
    parent_id: int | None = None,
    status: str = JobStatus.QUEUED,
    owner: str | None = None,
    priority: int = 0,
    gpus: int = 1,
    commit: bool = True,
) -> Job:
    """Insert a job ('queued' to run now, 'waiting' until its depends_on jobs succeed) for `owner`, at
    `priority`, holding `gpus` devices while it runs.

    commit=False only flushes (the id is set), so a caller can add rows that belong to it in one commit."""
    if kind not in JOB_KINDS:
        raise ValueError(f"kind must be one of {JOB_KINDS}, got {kind!r}")
    if status not in (JobStatus.QUEUED, JobStatus.WAITING):
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
        owner=owner,
        priority=priority,
        gpus=gpus,
    )
    s.add(job)
    if commit:
        s.commit()
    else:
        s.flush()
    return job


def discard_unsent(s: Session, job_id: int) -> bool:
    """Delete a job whose first message never reached the broker, so a submit answered 503 leaves no
    row (a client that retries makes no duplicate). Guarded: a job a worker has claimed stays."""
    res = s.execute(
        delete(Job)
        .where(Job.id == job_id, Job.status.in_((JobStatus.QUEUED, JobStatus.WAITING)), Job.attempt == 0)
        .execution_options(synchronize_session=False)
    )
    s.commit()
    return bool(res.rowcount)  # type: ignore[attr-defined]


def get_job(s: Session, job_id: int) -> Job | None:
    """The job, or None (reads fresh from the database, not a stale identity-map copy)."""
    return s.execute(select(Job).where(Job.id == job_id).execution_options(populate_existing=True)).scalar_one_or_none()


def _require(s: Session, job_id: int) -> Job:
    job = get_job(s, job_id)
    if job is None:
        raise JobNotFound(f"job {job_id} not found")
    return job


def _filters(
    status: str | Iterable[str] | None,
    kind: str | None,
    name: str | None,
    parent_id: int | None,
    search: str | None = None,
    owner: str | None = None,
) -> list[Any]:
    conds: list[Any] = []
    if search:
        conds.append(_search_condition(search))
    if status:
        statuses = [status] if isinstance(status, str) else list(status)
        bad = [x for x in statuses if x not in JOB_STATUSES]
        if bad:
            raise ValueError(f"unknown {', '.join(map(repr, bad))}; choose from {', '.join(JOB_STATUSES)}")
        conds.append(Job.status == statuses[0] if len(statuses) == 1 else Job.status.in_(statuses))
    if kind:
        conds.append(Job.kind == kind)
    if name:
        conds.append(Job.name == name)
    if parent_id is not None:
        conds.append(Job.parent_id == parent_id)
    if owner is not None:
        conds.append(Job.owner == owner)
    return conds


def _search_condition(search: str) -> Any:
    """A free-text search: the name contains it (case-insensitive), or it is the job's id."""
    escaped = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    cond = Job.name.ilike(f"%{escaped}%", escape="\\")
    return or_(cond, Job.id == int(search)) if search.isdigit() and int(search) <= INT32_MAX else cond


def list_jobs(
    s: Session,
    status: str | Iterable[str] | None = None,
    kind: str | None = None,
    name: str | None = None,
    parent_id: int | None = None,
    limit: int = 50,
    offset: int = 0,
    search: str | None = None,
    owner: str | None = None,
    before_id: int | None = None,
    by_priority: bool = False,
) -> list[Job]:
    """Jobs newest first (id descending), filtered; `status` may be one status or several; `owner`
    None means every owner.

    before_id is the keyset cursor: only jobs older than that one (a page that stays fast at any depth).
    """
    conds = _filters(status, kind, name, parent_id, search, owner)
    if before_id is not None:
        conds.append(Job.id < before_id)
    order = (Job.priority.desc(), Job.id) if by_priority else (Job.id.desc(),)
    q = select(Job).where(*conds).order_by(*order).limit(limit).offset(offset)
    return list(s.scalars(q))


def count_jobs(
    s: Session,
    status: str | Iterable[str] | None = None,
    kind: str | None = None,
    name: str | None = None,
    parent_id: int | None = None,
    search: str | None = None,
    owner: str | None = None,
) -> int:
    """How many jobs match the same filters as list_jobs (for pagination totals)."""
    q = select(func.count()).select_from(Job).where(*_filters(status, kind, name, parent_id, search, owner))
    return int(s.scalar(q) or 0)


def claim_job(s: Session, job_id: int, worker: str, lease_s: float = DEFAULT_LEASE_S) -> Job | None:
    """queued → running for this worker under a lease of `lease_s`, attempt += 1; None when the job is
    not claimable.

    One conditional UPDATE decides: a redelivered message for a job that is running elsewhere,
    finished or canceled claims nothing.
    """
    now = utcnow()
    job = _transition(
        s, job_id, (JobStatus.QUEUED,), JobStatus.RUNNING, commit=False, **_claim_values(worker, lease_s, now)
    )
    if job is None:
        return None
    s.add(Attempt(job_id=job_id, number=job.attempt, worker=worker, status=AttemptStatus.RUNNING, started_at=now))
    s.commit()
    return job


def _claim_values(worker: str, lease_s: float, now: datetime) -> dict[str, Any]:
    return {
        "attempt": Job.attempt + 1,
        "started_at": now,
        "finished_at": None,
        "worker": worker,
        "error": None,
        "eta_s": None,
        "lease_expires_at": now + timedelta(seconds=lease_s),
        "preempt_requested_by": None,
    }


def claim_next(s: Session, worker: str, queues: Sequence[str], lease_s: float = DEFAULT_LEASE_S) -> Job | None:
    """queued → running for the job a free worker consuming `queues` should take next (store.scheduler's
    order: priority, owner turns, age; quotas skip), as claim_job does for one job; None when no job on
    these queues may start now.

    The decision runs under the scheduler lock (PostgreSQL), so two workers never both pick from the same
    snapshot; the UPDATE is still guarded by the job's status and, for an owner with a quota, by its
    running jobs counted inside the write (SQLite's one writer at a time), so a job never runs twice and
    a quota is never overrun whatever the backend.
    """
    lock_scheduler(s)
    now = utcnow()
    order, loads = next_for(s, queues)
    for cand in order:
        load = loads.get(cand.owner) or OwnerLoad()
        res = s.execute(
            update(Job)
            .where(Job.id == cand.id, Job.status == JobStatus.QUEUED, *_quota_guard(cand, load))
            .values(status=JobStatus.RUNNING, updated_at=now, **_claim_values(worker, lease_s, now))
            .execution_options(synchronize_session=False)
        )
        if res.rowcount == 1:  # type: ignore[attr-defined]
            job = _require(s, cand.id)
            s.add(
                Attempt(job_id=job.id, number=job.attempt, worker=worker, status=AttemptStatus.RUNNING, started_at=now)
            )
            s.commit()
            return job
    s.rollback()  # ends the read transaction and frees the scheduler lock
    return None


def _quota_guard(cand: Candidate, load: OwnerLoad) -> list[Any]:
    """The owner's quotas as conditions of the claim's UPDATE, evaluated inside the write."""
    other = aliased(Job)
    mine = (other.owner.is_(None) if cand.owner is None else other.owner == cand.owner) & (
        other.status == JobStatus.RUNNING
    )
    conds: list[Any] = []
    if load.max_running is not None:
        running = select(func.count()).select_from(other).where(mine).scalar_subquery()
        conds.append(running < load.max_running)
    if load.max_gpus is not None:
        devices = select(func.coalesce(func.sum(other.gpus), 0)).where(mine).scalar_subquery()
        conds.append(devices + cand.gpus <= load.max_gpus)
    return conds


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
# named states to one state: `grep -n 'JobStatus.FAILED' store/jobs.py` answers "where does a job get marked failed".
ACTIVE = (JobStatus.QUEUED, JobStatus.WAITING, JobStatus.RUNNING)  # every status a job can still leave


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
        _released_if_ended(s, job_id, to)
    return _require(s, job_id)


def _released_if_ended(s: Session, job_id: int, status: str) -> None:
    """Every terminal transition releases the jobs waiting for this one itself (after its commit), so no
    caller can forget: they are queued when it succeeded, failed with the reason when it did not. The
    workers' wake-ups after a job ends (worker.outcome.after_end) and the idle sweep start the queued ones."""
    if status in TERMINAL_STATUSES:
        release_dependents(s, job_id)


def _end(
    s: Session,
    job_id: int,
    from_states: Sequence[str],
    status: str,
    error: str | None = None,
    *conditions: Any,
    **extra: Any,
) -> Job | None:
    """A terminal transition: finished now, the cancel flag cleared, the open attempt closed alike."""
    values: dict[str, Any] = {
        "finished_at": utcnow(),
        "error": error,
        "eta_s": 0.0 if status == JobStatus.SUCCEEDED else None,
        "cancel_requested": False,
        "lease_expires_at": None,
        **extra,
    }
    return _transition(s, job_id, from_states, status, *conditions, close_attempt=status, **values)


def _own(attempt: int | None) -> tuple[Any, ...]:
    """The guard of a worker ending its own run: only while that attempt still holds the job."""
    return () if attempt is None else (Job.attempt == attempt,)


def _held(job: Job | None, job_id: int, attempt: int | None) -> Job | None:
    if job is None and attempt is not None:
        raise LeaseLost(f"job {job_id}: attempt {attempt} no longer holds the job")
    return job


def finish_job(s: Session, job_id: int, final_metrics: dict[str, Any] | None, attempt: int | None = None) -> Job | None:
    """running → succeeded with the run's final metrics, releasing the jobs that waited for it. With
    `attempt`, only that attempt may (LeaseLost otherwise).

    A cancel accepted while the run was finishing (writing final.pt, say) wins: the API answered it 200,
    so the job ends canceled (final.pt stays; a retry resumes from it) and the canceled job is returned.
    """
    job = _require(s, job_id)
    extra: dict[str, Any] = {"final_metrics": final_metrics}
    if job.progress_total:
        extra["progress_step"] = job.progress_total
    own = _own(attempt)
    done = _end(
        s, job_id, (JobStatus.RUNNING,), JobStatus.SUCCEEDED, None, Job.cancel_requested.is_not(True), *own, **extra
    )
    if done is None:
        done = _end(s, job_id, (JobStatus.RUNNING,), JobStatus.CANCELED, None, Job.cancel_requested.is_(True), *own)
    return _held(done, job_id, attempt)


def fail_job(s: Session, job_id: int, error: str, attempt: int | None = None) -> Job | None:
    """queued|waiting|running → failed, with a message that says what to change; the jobs that waited
    for it fail in turn. A job that already ended keeps its outcome. With `attempt`, only that attempt
    may (LeaseLost otherwise)."""
    return _held(_end(s, job_id, ACTIVE, JobStatus.FAILED, error, *_own(attempt)), job_id, attempt)


def fail_if_running_on(s: Session, job_id: int, worker: str, error: str, attempt: int | None = None) -> Job | None:
    """running on `worker` → failed: the safety net for a process that died or could not record its result."""
    return _end(s, job_id, (JobStatus.RUNNING,), JobStatus.FAILED, error, Job.worker == worker, *_own(attempt))


def mark_canceled(s: Session, job_id: int, attempt: int | None = None) -> Job | None:
    """running → canceled: the worker stopped cooperatively after a cancel request."""
    return _held(_end(s, job_id, (JobStatus.RUNNING,), JobStatus.CANCELED, None, *_own(attempt)), job_id, attempt)


def mark_pruned(
    s: Session, job_id: int, reason: str, final_metrics: dict[str, Any], step: int, attempt: int | None = None
) -> Job | None:
    """running → pruned: a sweep's pruner stopped this trial at an evaluation (docs/sweeps.md#pruned-trials).

    `reason` says why ("AP 0.0 at step 2, below the median ..."); it is kept in `error`, the column that
    says why a job did not succeed. A cancel accepted meanwhile wins, as in finish_job. With `attempt`,
    only that attempt may (LeaseLost otherwise)."""
    own = _own(attempt)
    extra = {"final_metrics": final_metrics, "progress_step": step}
    running = (JobStatus.RUNNING,)
    done = _end(s, job_id, running, JobStatus.PRUNED, reason, Job.cancel_requested.is_not(True), *own, **extra)
    if done is None:
        done = _end(s, job_id, running, JobStatus.CANCELED, None, Job.cancel_requested.is_(True), *own)
    return _held(done, job_id, attempt)


def park_study(s: Session, job_id: int, children: int) -> Job | None:
    """running → waiting: a study that created its children waits for them (its fan-out attempt succeeded).

    The study is closed by `finish_study` or `fail_job` when its children end, not by its own task.
    """
    return _transition(
        s,
        job_id,
        (JobStatus.RUNNING,),
        JobStatus.WAITING,
        close_attempt=JobStatus.SUCCEEDED,
        depends_on=[],
        progress_step=0,
        progress_total=children,
        lease_expires_at=None,  # free for claim_study_close
    )


def reopen_study(s: Session, job_id: int, done: int, total: int) -> None:
    """A study that created more children (a tuned study's seeds) waits again: its close hold is freed and
    its progress counts the new children. Left uncommitted: the caller commits it with those children."""
    s.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.WAITING)
        .values(lease_expires_at=None, progress_step=done, progress_total=total, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )


PARENT_KINDS = ("study", "sweep")  # jobs that wait for their children (a sweep: docs/sweeps.md)
STUDY_CLOSE_HOLD_S = 300.0  # a closer that died frees the study after this; the workers' sweep closes it


def claim_study_close(s: Session, job_id: int, hold_s: float = STUDY_CLOSE_HOLD_S) -> bool:
    """Make this caller the one closer of a waiting study (True), or say another one is closing it (False).

    The last child's task and every worker's periodic sweep may try to close a study at the same moment;
    only the caller whose conditional UPDATE wins writes the report and ends the study. The hold is kept
    in lease_expires_at (a waiting job has no lease otherwise), so a closer that dies mid-way blocks the
    study for `hold_s` only, and the reaper (which looks at running jobs only) never sees it.
    """
    now = utcnow()
    res = s.execute(
        update(Job)
        .where(Job.id == job_id, Job.kind.in_(PARENT_KINDS), Job.status == JobStatus.WAITING, _lease_expired(now))
        .values(lease_expires_at=now + timedelta(seconds=hold_s), updated_at=now)
        .execution_options(synchronize_session=False)
    )
    s.commit()
    return res.rowcount == 1  # type: ignore[attr-defined]


def finish_study(s: Session, job_id: int, final_metrics: dict[str, Any]) -> Job | None:
    """waiting → succeeded: every child of the study ended and its report is written."""
    return _end(s, job_id, (JobStatus.WAITING,), JobStatus.SUCCEEDED, None, final_metrics=final_metrics)


def requeue_interrupted(s: Session, job_id: int, reason: str, attempt: int | None = None) -> Job | None:
    """running → queued in one commit after a warm worker shutdown: the attempt is closed as failed with
    `reason`, and the job resumes from its checkpoint on the next worker. It never passes through
    'failed' (a client polling between two commits, `icd wait` say, would read a failure). None when
    the job ended or another attempt holds it."""
    job = _transition(
        s,
        job_id,
        (JobStatus.RUNNING,),
        JobStatus.QUEUED,
        *_own(attempt),
        commit=False,
        worker=None,
        lease_expires_at=None,
        cancel_requested=False,
        error=None,
        finished_at=None,
        eta_s=None,
        preempt_requested_by=None,
    )
    if job is None:
        return None
    _close_attempt(s, job_id, AttemptStatus.FAILED, reason)
    s.commit()
    return job


def requeue_preempted(s: Session, job_id: int, attempt: int, step: int, by_job: int | None) -> Job | None:
    """running → queued in one commit after this attempt stopped for a preemption: checkpointed at `step`,
    the attempt closed as 'preempted' with who asked and when, and `preemptions` + 1 so the attempt does
    not count against max_attempts. None when the job ended or another attempt holds it."""
    by = get_job(s, by_job) if by_job is not None else None
    who = (
        f"job {by_job} (owner {by.owner or 'local admin'}, priority {by.priority})"
        if by
        else "a job of higher priority"
    )
    reason = f"preempted at step {step} by {who} at {utcnow().isoformat(timespec='seconds')}; resumes from step {step}"
    s.rollback()
    job = _transition(
        s,
        job_id,
        (JobStatus.RUNNING,),
        JobStatus.QUEUED,
        Job.attempt == attempt,
        Job.cancel_requested.is_not(True),
        commit=False,
        worker=None,
        lease_expires_at=None,
        error=None,
        finished_at=None,
        eta_s=None,
        preempt_requested_by=None,
        preemptions=Job.preemptions + 1,
    )
    if job is None:
        return None
    _close_attempt(s, job_id, AttemptStatus.PREEMPTED, reason)
    s.commit()
    return _require(s, job_id)


def request_preemption(s: Session, victim_id: int, attempt: int, by_job: int) -> bool:
    """Ask running job `victim_id` (this attempt) to checkpoint and go back to the queue for `by_job`;
    False when it ended, moved on or was asked already. Left uncommitted: the caller decides under the
    scheduler lock and commits its decisions together."""
    res = s.execute(
        update(Job)
        .where(
            Job.id == victim_id,
            Job.status == JobStatus.RUNNING,
            Job.attempt == attempt,
            Job.preempt_requested_by.is_(None),
            Job.cancel_requested.is_not(True),
        )
        .values(preempt_requested_by=by_job)
        .execution_options(synchronize_session=False)
    )
    return res.rowcount == 1  # type: ignore[attr-defined]


def withdraw_stale_preemptions(s: Session) -> int:
    """Drop preemption requests whose job no longer waits (another worker took it, it was canceled):
    a victim that has not stopped yet keeps running. Uncommitted, like request_preemption."""
    waiting = select(Job.id).where(Job.status == JobStatus.QUEUED)
    res = s.execute(
        update(Job)
        .where(
            Job.status == JobStatus.RUNNING,
            Job.preempt_requested_by.is_not(None),
            Job.preempt_requested_by.not_in(waiting),
        )
        .values(preempt_requested_by=None)
        .execution_options(synchronize_session=False)
    )
    return int(res.rowcount or 0)  # type: ignore[attr-defined]


def set_priority(s: Session, job_id: int, priority: int) -> Job:
    """Re-prioritise a job that has not started (queued or waiting), and the unstarted children of a
    study; JobStateError for a job that runs or ended (it keeps its place until it ends or is preempted).
    Not a status change: one UPDATE guarded by the status, which stays as it is."""
    unstarted = Job.status.in_((JobStatus.QUEUED, JobStatus.WAITING))
    res = s.execute(
        update(Job)
        .where(Job.id == job_id, unstarted)
        .values(priority=priority, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:  # type: ignore[attr-defined]
        s.rollback()
        current = _require(s, job_id)
        raise JobStateError(f"job {job_id} is {current.status}; only a queued or waiting job can be re-prioritised")
    s.execute(
        update(Job)
        .where(Job.parent_id == job_id, unstarted)
        .values(priority=priority, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    s.commit()
    return _require(s, job_id)


def stop_requests(s: Session, job_id: int) -> tuple[bool, int | None]:
    """(cancel requested or job gone/canceled, the job a preemption was requested for): the running job's
    worker reads both at once, about once a second."""
    row = s.execute(select(Job.cancel_requested, Job.status, Job.preempt_requested_by).where(Job.id == job_id)).first()
    s.rollback()
    if row is None:
        return True, None
    return bool(row[0]) or row[1] == JobStatus.CANCELED, row[2]


def request_cancel(s: Session, job_id: int) -> Job:
    """queued/waiting → canceled now; running → cancel_requested (the job then ends canceled: at its next
    step, or when it finishes, see finish_job). JobStateError when the job already ended, including
    when it ended between this call's read and its UPDATE (the cancel came too late to say yes)."""
    for _ in range(3):  # the job may move on (claimed, re-queued, ended) between the read and the UPDATEs
        job = _require(s, job_id)
        if job.status in TERMINAL_STATUSES:
            raise JobStateError(f"job {job_id} already finished: it is {job.status}; nothing left to cancel")
        if _cancel_or_flag(s, job_id):
            break
    else:
        raise JobStateError(f"job {job_id} changed status meanwhile; reload it and try again")
    _cancel_if_worker_lost(s, job_id)
    children = s.scalars(select(Job.id).where(Job.parent_id == job_id, Job.status.not_in(TERMINAL_STATUSES)))
    for child_id in list(children):  # a study's children go with it
        request_cancel(s, child_id)
    return _require(s, job_id)


def _cancel_or_flag(s: Session, job_id: int) -> bool:
    """queued/waiting → canceled, or flag a running job; False when the job was in neither state."""
    if (
        _transition(s, job_id, (JobStatus.QUEUED, JobStatus.WAITING), JobStatus.CANCELED, finished_at=utcnow())
        is not None
    ):
        return True
    res = s.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING)
        .values(cancel_requested=True, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    s.commit()
    return res.rowcount == 1  # type: ignore[attr-defined]


def is_cancel_requested(s: Session, job_id: int) -> bool:
    """True when the job should stop (a cancel was requested, or it was deleted/canceled meanwhile)."""
    row = s.execute(select(Job.cancel_requested, Job.status).where(Job.id == job_id)).first()
    if row is None:
        return True
    return bool(row[0]) or row[1] == JobStatus.CANCELED


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
        if status == JobStatus.FAILED:
            return f"teacher/checkpoint job {dep} failed: {error or 'no message'}; retry it, then retry this job", False
        if status == JobStatus.CANCELED:
            return f"teacher/checkpoint job {dep} was canceled; retry it, then retry this job", False
        all_done = all_done and status == JobStatus.SUCCEEDED
    return None, all_done


def retry_job(s: Session, job_id: int) -> Job:
    """failed|canceled → queued (or waiting while its dependencies still run); the run folder is kept,
    so the worker resumes from the last checkpoint."""
    job = _require(s, job_id)
    if job.status not in (JobStatus.FAILED, JobStatus.CANCELED):
        raise JobStateError(f"job {job_id} is {job.status}; only failed or canceled jobs can be retried")
    problem, ready = _dependency_problem(s, job.depends_on or [])
    if problem:
        raise JobStateError(problem)
    retried = _transition(
        s,
        job_id,
        (JobStatus.FAILED, JobStatus.CANCELED),
        JobStatus.QUEUED if ready else JobStatus.WAITING,
        cancel_requested=False,
        error=None,
        finished_at=None,
        eta_s=None,
    )
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
    if job.status != JobStatus.WAITING:
        return None
    problem, ready = _dependency_problem(s, job.depends_on or [])
    if problem:
        _transition(
            s, job_id, (JobStatus.WAITING,), JobStatus.FAILED, error=problem, finished_at=utcnow()
        )  # its own fail in turn
        return None
    if not ready:
        return None
    # Only the process whose UPDATE won enqueues it, so a racing API and worker never send it twice.
    return _transition(s, job_id, (JobStatus.WAITING,), JobStatus.QUEUED)


def release_dependents(s: Session, finished_job_id: int) -> list[Job]:
    """After a job ends: waiting jobs whose dependencies all succeeded become queued (returned), those
    depending on a failed/canceled job fail with a message saying so. Every terminal transition calls it
    (`_released_if_ended`); calling it again releases nothing twice (each change is guarded)."""
    waiting = s.execute(select(Job.id, Job.depends_on).where(Job.status == JobStatus.WAITING)).all()
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
    jobs = list(
        s.scalars(
            select(Job)
            .where(Job.status == JobStatus.QUEUED, Job.queue.in_(list(queues)), Job.updated_at < cutoff)
            .order_by(Job.id)
            .limit(limit)
        )
    )
    for job in jobs:
        job.updated_at = utcnow()
    s.commit()
    return jobs


# --- leases -----------------------------------------------------------------------------------------
# A running job is held by one attempt under a lease that its worker's heartbeat renews. The reaper
# takes back expired leases with the same kind of conditional UPDATE as the claim, so running it from
# the API and from every worker at once is harmless: exactly one UPDATE wins each expired lease.


def _lease_expired(now: datetime) -> Any:
    """An expired lease, or none (rows claimed before leases existed)."""
    return (Job.lease_expires_at < now) | Job.lease_expires_at.is_(None)


def _stale(now: datetime) -> Any:
    """Running under an expired lease."""
    return (Job.status == JobStatus.RUNNING) & _lease_expired(now)


def renew_lease(s: Session, job_id: int, worker: str, attempt: int, lease_s: float) -> bool:
    """Extend this attempt's lease; False when the attempt no longer holds the job (it must stop)."""
    now = utcnow()
    res = s.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING, Job.worker == worker, Job.attempt == attempt)
        .values(lease_expires_at=now + timedelta(seconds=lease_s))
        .execution_options(synchronize_session=False)
    )
    s.commit()
    return res.rowcount == 1  # type: ignore[attr-defined]


def taken_over(s: Session, job_id: int, attempt: int) -> bool:
    """After renew_lease refused: True when someone else took the job from this attempt; False when this
    attempt ended or re-queued the job itself (its heartbeat may beat once more after the task recorded
    the outcome and before it let go of the job), or the job is gone.

    The attempt row tells them apart: the reaper (and a cancel of a job whose worker died) closes the attempt
    it takes back as 'lost'; an attempt that settles its own run closes it with the outcome, and whatever
    happens to the job afterwards (another worker claims it again) is no loss of this attempt.
    """
    row = s.execute(
        select(Attempt.status, Attempt.finished_at).where(Attempt.job_id == job_id, Attempt.number == attempt)
    ).first()
    s.rollback()  # end the read transaction
    if row is None:
        return False  # the job was deleted, which only an ended job can be
    status, finished_at = row
    return finished_at is None or status == AttemptStatus.LOST  # open: the job moved on without this attempt closing it


def lost_message(worker: str | None, step: int, attempts: int) -> str:
    """The reason a job failed because its workers kept disappearing."""
    return (
        f"worker {worker or '?'} lost at step {step}; {attempts} attempt{'s' if attempts != 1 else ''} used "
        "(max_attempts); retry to resume from the last checkpoint"
    )


@dataclass
class Reaped:
    """What one reaper pass did: jobs to enqueue again, and jobs it ended (their transitions released their
    dependents)."""

    requeued: list[Job] = field(default_factory=list)
    ended: list[int] = field(default_factory=list)


def _take_back(s: Session, job_id: int, attempt: int, now: datetime, to: str, lost: str, **values: Any) -> Job | None:
    """running under an expired lease → `to` (guarded by the attempt and the expiry), the attempt closed
    as 'lost' with the reason, in one commit."""
    job = _transition(
        s,
        job_id,
        (JobStatus.RUNNING,),
        to,
        Job.attempt == attempt,
        _lease_expired(now),
        commit=False,
        lease_expires_at=None,
        **values,
    )
    if job is None:
        return None  # renewed, ended or reaped by someone else meanwhile
    _close_attempt(s, job_id, AttemptStatus.LOST, lost)
    s.commit()
    _released_if_ended(s, job_id, to)
    return _require(s, job_id)


def reap_expired_leases(s: Session, now: datetime | None = None, max_attempts: int = 3) -> Reaped:
    """Expired leases → queued as a new attempt (it resumes from the last complete checkpoint), or
    failed with the reason once `max_attempts` (the spec's, else this default) are used, or canceled
    when a cancel was requested. The caller enqueues `requeued`; the dependents of `ended` were released
    by the transitions themselves."""
    now = now or utcnow()
    out = Reaped()
    rows = s.execute(
        select(
            Job.id, Job.attempt, Job.worker, Job.progress_step, Job.spec, Job.cancel_requested, Job.preemptions
        ).where(_stale(now))
    ).all()
    s.rollback()  # end the read transaction; each job below is its own guarded unit of work
    for job_id, attempt, worker, step, spec, cancel, preempted in rows:
        limit = int((spec or {}).get("max_attempts") or max_attempts)
        lost = f"worker {worker or '?'} lost at step {step} (no heartbeat before its lease expired)"
        if cancel:
            job = _take_back(s, job_id, attempt, now, JobStatus.CANCELED, lost, finished_at=now, cancel_requested=False)
        elif attempt - (preempted or 0) >= limit:  # preempted attempts do not count
            job = _take_back(
                s,
                job_id,
                attempt,
                now,
                JobStatus.FAILED,
                lost,
                finished_at=now,
                error=lost_message(worker, step, attempt),
            )
        else:
            job = _take_back(
                s, job_id, attempt, now, JobStatus.QUEUED, lost, worker=None, eta_s=None, preempt_requested_by=None
            )
        if job is not None:
            (out.requeued.append(job) if job.status == JobStatus.QUEUED else out.ended.append(job_id))
    return out


def expire_leases_of(s: Session, worker: str) -> int:
    """A worker (re)starting under `worker`'s name: the previous process is gone, so its leases are
    expired now instead of at their timeout (the next reap_expired_leases re-queues the jobs)."""
    res = s.execute(
        update(Job)
        .where(Job.status == JobStatus.RUNNING, Job.worker == worker)
        .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        .execution_options(synchronize_session=False)
    )
    s.commit()
    return int(res.rowcount or 0)  # type: ignore[attr-defined]


def _cancel_if_worker_lost(s: Session, job_id: int) -> None:
    """Cancel of a running job whose worker is gone (lease expired): nobody would read the flag, so
    the job is canceled now."""
    now = utcnow()
    row = s.execute(select(Job.attempt, Job.worker, Job.progress_step).where(Job.id == job_id, _stale(now))).first()
    s.rollback()
    if row is not None:
        attempt, worker, step = row
        _take_back(
            s,
            job_id,
            attempt,
            now,
            JobStatus.CANCELED,
            f"worker {worker or '?'} lost at step {step}; canceled",
            finished_at=now,
            cancel_requested=False,
        )


def _unservable(live_queues: Iterable[str]) -> Any:
    """Queued, on a queue that no live worker consumes."""
    live = sorted(set(live_queues))
    return (Job.status == JobStatus.QUEUED) & Job.queue.not_in(live) if live else Job.status == JobStatus.QUEUED


def unservable_queued(
    s: Session, live_queues: Iterable[str], untouched_since: datetime | None = None, limit: int | None = None
) -> list[Job]:
    """Queued jobs on a queue that no live worker consumes (e.g. device: cuda and no GPU worker), oldest id
    first. Filtered in SQL: the reaper runs this every pass, and a big table can hold 100k queued jobs."""
    query = select(Job).where(_unservable(live_queues))
    if untouched_since is not None:
        query = query.where(Job.updated_at <= untouched_since)
    return list(s.scalars(query.order_by(Job.id).limit(limit)))


def unservable_queues(s: Session, live_queues: Iterable[str], per_queue: int = 10) -> dict[str, list[int]]:
    """{queue: the first `per_queue` + 1 queued job ids} for every queue with queued jobs and no live worker."""
    queued = select(Job.queue).where(_unservable(live_queues)).distinct()
    return {
        queue: list(
            s.scalars(
                select(Job.id)
                .where(Job.status == JobStatus.QUEUED, Job.queue == queue)
                .order_by(Job.id)
                .limit(per_queue + 1)
            )
        )
        for queue in s.scalars(queued)
    }


UNSERVABLE_BATCH = 500  # jobs one reaper pass fails at most; the next pass goes on


def fail_unservable(s: Session, live_queues: Iterable[str], wait_s: float, now: datetime | None = None) -> list[int]:
    """queued → failed for jobs that no live worker could take for `wait_s` (guarded: only if still queued
    and untouched since it was read)."""
    now = now or utcnow()
    failed: list[int] = []
    for job in unservable_queued(s, live_queues, now - timedelta(seconds=wait_s), UNSERVABLE_BATCH):
        if (
            _transition(
                s,
                job.id,
                (JobStatus.QUEUED,),
                JobStatus.FAILED,
                Job.updated_at == job.updated_at,
                finished_at=now,
                error=unservable_message(job.queue, wait_s),
            )
            is not None
        ):
            failed.append(job.id)
    return failed


def unservable_message(queue: str, waited_s: float | None = None) -> str:
    """Why a queued job is not starting, and what to do about it."""
    how = {
        "cuda": "start a GPU worker (`icd worker --gpus 0`) or submit with device: cpu",
        "cpu": "start a CPU worker (`icd worker --cpu`) or submit with device: auto",
    }.get(queue, f"start a worker that consumes queue {queue!r} (`icd worker -Q {queue}`)")
    waited = f" for {waited_s:.0f} s" if waited_s is not None else ""
    return f"no live worker consumes queue {queue!r}{waited}: {how}"
