"""Which queued job a free worker takes next, what holds a job back, and which running job to preempt.

Pure reads and ranking; the transitions they lead to (claim, preemption request) are guarded UPDATEs
in `store.jobs`. The order (docs/scheduling.md): highest priority first; at equal priority the owner
holding the fewest devices, then the owner served least recently; then the oldest job. An owner at its
quota (`api_tokens.max_running` / `max_gpus`) is skipped: its jobs stay queued, never refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from store.models import ApiToken, Job, JobStatus

PER_OWNER = 16  # queued jobs read per owner: the first that fits its quota is that owner's candidate
_NEVER = datetime.min.replace(tzinfo=UTC)
# One advisory-lock key for every claim and preemption decision (PostgreSQL), see lock_scheduler.
SCHEDULER_LOCK_KEY = 0x1CD5C4ED


@dataclass
class OwnerLoad:
    """What one owner runs now, and the limits on it."""

    running: list[tuple[int, int, str | None]] = field(default_factory=list)  # (job id, devices, worker)
    last_served: datetime | None = None
    max_running: int | None = None
    max_gpus: int | None = None

    @property
    def devices(self) -> int:
        return sum(g for _, g, _ in self.running)

    def held(self, gpus: int) -> str | None:
        """The quota that holds a job of `gpus` devices back, as `name=limit`, or None when it may start."""
        if self.max_running is not None and len(self.running) + 1 > self.max_running:
            return f"max_running={self.max_running}"
        if self.max_gpus is not None and self.devices + gpus > self.max_gpus:
            return f"max_gpus={self.max_gpus}"
        return None


@dataclass(frozen=True)
class Candidate:
    id: int
    owner: str | None
    priority: int
    queue: str
    gpus: int


def lock_scheduler(s: Session) -> None:
    """Serialise claim and preemption decisions until the caller's transaction ends (PostgreSQL: a
    transaction-scoped advisory lock, held for the few milliseconds of one decision). SQLite needs none:
    it has one writer at a time, and the claim's guarded UPDATE re-checks the quota inside its write."""
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": SCHEDULER_LOCK_KEY})


def owner_loads(s: Session, owners: Iterable[str | None]) -> dict[str | None, OwnerLoad]:
    """Running jobs, quotas and last start of each owner in `owners` (and of every owner running now)."""
    loads: dict[str | None, OwnerLoad] = {o: OwnerLoad() for o in owners}
    for job_id, owner, gpus, worker in s.execute(
        select(Job.id, Job.owner, Job.gpus, Job.worker).where(Job.status == JobStatus.RUNNING)
    ).all():
        loads.setdefault(owner, OwnerLoad()).running.append((job_id, int(gpus or 1), worker))
    named = [o for o in loads if o is not None]
    if named:
        for name, max_running, max_gpus in s.execute(
            select(ApiToken.name, ApiToken.max_running, ApiToken.max_gpus).where(ApiToken.name.in_(named))
        ).all():
            loads[name].max_running, loads[name].max_gpus = max_running, max_gpus
    for owner, load in loads.items():
        cond = Job.owner.is_(None) if owner is None else Job.owner == owner
        load.last_served = s.scalar(select(func.max(Job.started_at)).where(cond))
    return loads


def queued_candidates(s: Session, queues: Sequence[str] | None, min_priority: int | None = None) -> list[Candidate]:
    """Each owner's first PER_OWNER queued jobs on `queues` (None: every queue), by priority then age."""
    rank = func.row_number().over(partition_by=Job.owner, order_by=(Job.priority.desc(), Job.id)).label("rank")
    conds: list[Any] = [Job.status == JobStatus.QUEUED]
    if queues is not None:
        conds.append(Job.queue.in_(list(queues)))
    if min_priority is not None:
        conds.append(Job.priority >= min_priority)
    sub = select(Job.id, Job.owner, Job.priority, Job.queue, Job.gpus, rank).where(*conds).subquery()
    rows = s.execute(select(sub).where(sub.c.rank <= PER_OWNER)).all()
    return [Candidate(r.id, r.owner, int(r.priority), r.queue, int(r.gpus or 1)) for r in rows]


def claim_order(cands: list[Candidate], loads: dict[str | None, OwnerLoad]) -> list[Candidate]:
    """The candidates a free worker should try, best first, without those their owner's quota holds.

    Within a priority, owners take turns: the one holding the fewest devices first (a fair share of the
    workers), then the one whose last job started longest ago (with one worker, two owners alternate).
    """

    def key(c: Candidate) -> tuple[int, int, datetime, int]:
        load = loads.get(c.owner) or OwnerLoad()
        return (-c.priority, load.devices, load.last_served or _NEVER, c.id)

    return sorted((c for c in cands if (loads.get(c.owner) or OwnerLoad()).held(c.gpus) is None), key=key)


def next_for(s: Session, queues: Sequence[str] | None) -> tuple[list[Candidate], dict[str | None, OwnerLoad]]:
    """The claim order for a worker consuming `queues`, and the owners' loads it was computed from (call
    under lock_scheduler to act on it)."""
    cands = queued_candidates(s, queues)
    loads = owner_loads(s, {c.owner for c in cands})
    return claim_order(cands, loads), loads


def queued_heads(s: Session) -> list[tuple[int, str]]:
    """(first queued job, queue) for every queue that has queued jobs: where to send wake-ups."""
    rows = s.execute(
        select(func.min(Job.id), Job.queue).where(Job.status == JobStatus.QUEUED).group_by(Job.queue)
    ).all()
    return [(int(r[0]), str(r[1])) for r in rows]


# --- why a queued job waits --------------------------------------------------------------------------


def quota_hold(s: Session, job: Job) -> str | None:
    """A queued job its owner's quota holds: which quota, and what runs under it; None otherwise."""
    load = owner_loads(s, [job.owner])[job.owner]
    why = load.held(int(job.gpus or 1))
    if why is None:
        return None
    running = ", ".join(f"job {jid} on {worker or '?'}" for jid, _, worker in load.running) or "nothing"
    return (
        f"held by the quota of owner {job.owner!r} ({why}): running now {running}; it starts when one of "
        "them ends (quotas hold jobs, they never refuse them)"
    )


def jobs_ahead(s: Session, job: Job) -> int:
    """Queued jobs on the same queue that a worker takes before this one (higher priority, or older at
    the same priority; the owner turn-taking can move it forward)."""
    ahead = (Job.priority > job.priority) | ((Job.priority == job.priority) & (Job.id < job.id))
    return int(s.scalar(select(func.count()).where(Job.status == JobStatus.QUEUED, Job.queue == job.queue, ahead)) or 0)
