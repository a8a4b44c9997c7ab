"""SQLAlchemy 2 ORM models: jobs, attempts, metrics, evaluations, checkpoints, workers, API tokens.

Portable between SQLite and PostgreSQL: plain strings for enums (checked by constraints), JSON for
specs, timezone-aware UTC timestamps (SQLite drops the zone, so `UTCDateTime` puts it back on read).
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal, get_args

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

JobKind = Literal["train", "distill", "evaluate", "study", "sweep", "export"]
JOB_KINDS: tuple[str, ...] = get_args(JobKind)


class JobStatus(StrEnum):
    """A job's status: the one list of names. The column stays a string (a StrEnum member is one), so
    stored rows and clients that send strings are unchanged; the API's schemas list these values."""

    WAITING = "waiting"  # for the jobs it depends on (`checkpoint: job:<id>`), or a study for its children
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    # a sweep's trial stopped early by its pruner (docs/sweeps.md#pruned-trials): an outcome, not a failure
    PRUNED = "pruned"


JOB_STATUSES: tuple[JobStatus, ...] = tuple(JobStatus)
TERMINAL_STATUSES = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.PRUNED)
ACTIVE_STATUSES = (JobStatus.WAITING, JobStatus.QUEUED, JobStatus.RUNNING)


class AttemptStatus(StrEnum):
    """How one attempt ended (`attempts.status`): a job's terminal statuses, plus `lost` (its worker
    vanished: the reaper took the job back) and `preempted` (it made room for a job of higher priority)."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    PRUNED = "pruned"
    LOST = "lost"
    PREEMPTED = "preempted"


# Deterministic constraint names so migrations are identical on every backend.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A tz-aware UTC timestamp on every backend (SQLite returns naive datetimes otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


def _in(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(f"status IN ({_in(JOB_STATUSES)})", name="status"),
        CheckConstraint(f"kind IN ({_in(JOB_KINDS)})", name="kind"),
        # Each filter of GET /jobs with its newest-first order served by one index.
        Index("ix_jobs_status_id", "status", "id"),
        Index("ix_jobs_kind_id", "kind", "id"),
        Index("ix_jobs_name_id", "name", "id"),
        # `search` (name contains, any case): a trigram GIN index on PostgreSQL (migration 0005).
        Index("ix_jobs_name_trgm", "name", postgresql_using="gin", postgresql_ops={"name": "gin_trgm_ops"}),
        Index("ix_jobs_parent_id_id", "parent_id", "id"),
        Index("ix_jobs_owner_id", "owner", "id"),
        Index("ix_jobs_status_lease_expires_at", "status", "lease_expires_at"),  # the reaper's scan
        Index("ix_jobs_status_updated_at", "status", "updated_at"),  # the reaper's unservable scan
        # The scheduler (docs/scheduling.md): queued jobs by priority, and an owner's last start.
        Index("ix_jobs_status_priority_id", "status", "priority", "id"),
        Index("ix_jobs_owner_started_at", "owner", "started_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    queue: Mapped[str] = mapped_column(String(64), default="any")
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), nullable=True)
    depends_on: Mapped[list[int]] = mapped_column(JSON, default=list)
    progress_step: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int | None] = mapped_column(Integer, nullable=True)
    eta_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    final_metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    peak_memory_mb: Mapped[float | None] = mapped_column(Float, nullable=True)
    sec_per_step: Mapped[float | None] = mapped_column(Float, nullable=True)
    # The API token's name that submitted it; None: the local (anonymous) admin of a loopback server.
    owner: Mapped[str | None] = mapped_column(String(100), nullable=True)
    # The running worker holds the job until then; its heartbeat renews it, the reaper takes it back.
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Higher runs first (docs/scheduling.md); set from the spec at submit, changed by POST /jobs/{id}/priority.
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Devices it holds while running (resources.gpus): what the max_gpus quota counts.
    gpus: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # Attempts ended by preemption: they do not count against max_attempts.
    preemptions: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # A running job asked to checkpoint and go back to the queue for this queued job of higher priority.
    preempt_requested_by: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # What its last attempt ran on: code, package versions, data hashes, teacher sha256 (icd_core.lineage).
    lineage: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)

    attempts: Mapped[list[Attempt]] = relationship(
        back_populates="job", cascade="all, delete-orphan", passive_deletes=True, order_by="Attempt.number"
    )

    @property
    def percent(self) -> float | None:
        if not self.progress_total:
            return None
        return round(100.0 * min(self.progress_step, self.progress_total) / self.progress_total, 2)

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


class Attempt(Base):
    __tablename__ = "attempts"
    __table_args__ = (UniqueConstraint("job_id", "number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default=AttemptStatus.RUNNING)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # The checkpoint step this attempt resumed from (0: from scratch); metric points above it from
    # earlier attempts were dropped when it started.
    resumed_from_step: Mapped[int | None] = mapped_column(Integer, nullable=True)

    job: Mapped[Job] = relationship(back_populates="attempts")


class Metric(Base):
    """One scalar of a series; (job, name, step) is the key so a resumed run's rewrites are upserts."""

    __tablename__ = "metrics"
    __table_args__ = (Index("ix_metrics_job_id_step", "job_id", "step"),)

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    value: Mapped[float] = mapped_column(Float)


ROLLUP_BLOCK_STEPS = 128  # steps per metric_rollups row: a 1M-point series has ~7.8k summary rows


class MetricRollup(Base):
    """Per (job, series, block of ROLLUP_BLOCK_STEPS steps): point count, the min point, the max point and
    the last point. Maintained on every metrics write, so downsampling a long series reads ~1/128 of it."""

    __tablename__ = "metric_rollups"

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    block: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    n: Mapped[int] = mapped_column(Integer)
    min_step: Mapped[int] = mapped_column(Integer)
    min_value: Mapped[float] = mapped_column(Float)
    max_step: Mapped[int] = mapped_column(Integer)
    max_value: Mapped[float] = mapped_column(Float)
    last_step: Mapped[int] = mapped_column(Integer)
    last_value: Mapped[float] = mapped_column(Float)


class Evaluation(Base):
    __tablename__ = "evaluations"
    __table_args__ = (UniqueConstraint("job_id", "step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    step: Mapped[int] = mapped_column(Integer)
    ap: Mapped[float | None] = mapped_column(Float, nullable=True)
    ap50: Mapped[float | None] = mapped_column(Float, nullable=True)
    ap75: Mapped[float | None] = mapped_column(Float, nullable=True)
    aps: Mapped[float | None] = mapped_column(Float, nullable=True)
    apm: Mapped[float | None] = mapped_column(Float, nullable=True)
    apl: Mapped[float | None] = mapped_column(Float, nullable=True)
    per_class: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    step: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(255))
    path: Mapped[str] = mapped_column(String(1024))  # relative to artifact_root
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    final: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Worker(Base):
    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    device: Mapped[str] = mapped_column(String(255))
    queues: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_heartbeat: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    current_job_id: Mapped[int | None] = mapped_column(Integer, nullable=True)


class ApiToken(Base):
    """A named API token. Only the sha256 of its secret is stored: the secret is 256 random bits, so a
    fast hash cannot be brute-forced (slow password hashes exist for low-entropy human passwords), and
    the lookup stays one indexed equality per request. A leaked table reveals no usable token."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    secret_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    # Quotas of the jobs this name owns (None: no limit); they hold jobs in the queue, never refuse them.
    max_running: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_gpus: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # The highest priority a non-admin may give its jobs (None: the default priority).
    max_priority: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class SweepTrial(Base):
    """One trial of a sweep: its child job, its number, the parameters the sampler chose and the pruner's
    bookkeeping. With the child's evaluations (intermediate values) and final metrics, this is all the state
    an Optuna study of the sweep holds; icd_core.sweep rebuilds one from it for each decision."""

    __tablename__ = "sweep_trials"
    __table_args__ = (UniqueConstraint("sweep_id", "number"),)

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    sweep_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    system_attrs: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
