"""Response bodies of the API (the request body of POST /jobs is icd_core.spec.JobSpec itself)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, computed_field

from icd_core.leaderboard import cost_from_metrics
from icd_core.spec import PRIORITY_MAX, PRIORITY_MIN
from store.dispatch import gpus_served
from store.models import AttemptStatus, JobStatus


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class AttemptOut(_Out):
    number: int
    worker: str | None
    status: AttemptStatus = Field(
        description="lost: its worker stopped renewing the lease; preempted: it made room for a job of higher priority"
    )
    error: str | None
    started_at: datetime
    finished_at: datetime | None
    resumed_from_step: int | None = Field(None, description="The checkpoint step this attempt resumed from.")


class JobOut(_Out):
    """A job as listed: status, progress and outcome, without its spec."""

    id: int
    name: str
    kind: str
    status: JobStatus = Field(
        description="pruned: a sweep's trial its pruner stopped early, the reason in `error` (an outcome, not a "
        "failure)"
    )
    queue: str
    attempt: int = Field(description="Runs started so far (0 before the first).")
    parent_id: int | None
    depends_on: list[int] = Field(description="Jobs whose final checkpoints this one waits for (checkpoint: job:<id>).")
    progress_step: int
    progress_total: int | None
    percent: float | None
    eta_s: float | None = Field(description="Estimated seconds to the end of training.")
    sec_per_step: float | None
    peak_memory_mb: float | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    worker: str | None
    error: str | None
    cancel_requested: bool
    owner: str | None = Field(description="Name of the API token that submitted it; null: the local admin.")
    priority: int = Field(0, description="Higher runs first (docs/scheduling.md); POST /jobs/{id}/priority changes it.")
    preemptions: int = Field(0, description="Attempts ended by a preemption (not counted against max_attempts).")
    final_metrics: dict[str, Any] | None

    @computed_field(
        description="What the finished run's model costs (and, for distill, its teacher): params_m, "
        "gflops at the evaluation size, peak_inference_mb, latency_ms (batch 1, warm, median; "
        "_torchscript / _onnxruntime on the CPU). From final_metrics' cost_* entries."
    )
    @property
    def model_cost(self) -> dict[str, dict[str, float]] | None:
        return cost_from_metrics(self.final_metrics)


class JobDetail(JobOut):
    """One job with its spec and its attempts."""

    spec: dict[str, Any]
    lineage: dict[str, Any] | None = Field(
        None,
        description="What its last attempt ran on, recorded as the run started (docs/usage.md#lineage): `code` "
        "(git commit or package version, sources_sha256), `packages` (versions), `data` (each split's content "
        "sha256), `teacher_sha256` (distill jobs); null before a run started.",
    )
    attempts: list[AttemptOut]
    lease_expires_at: datetime | None = Field(None, description="A running job's worker holds it until then.")
    status_detail: str | None = Field(
        None,
        description="Why a queued or running job is not progressing (no live worker for its queue, its owner's "
        "quota, jobs that go first, a preemption, a lost worker), and what happens next; for a pruned trial, "
        "why its sweep stopped it.",
    )


class PriorityIn(BaseModel):
    priority: int = Field(ge=PRIORITY_MIN, le=PRIORITY_MAX, description="Higher runs first.")


class QuotaOut(BaseModel):
    """One token's quotas and what its jobs hold now."""

    name: str
    admin: bool
    max_running: int | None = Field(description="Jobs it may run at once (null: no limit).")
    max_gpus: int | None = Field(description="Devices (resources.gpus summed) its running jobs may hold.")
    max_priority: int | None = Field(description="Highest priority it may set (null: the default, 0); admins: any.")
    running: int
    devices: int
    queued: int


class JobList(BaseModel):
    items: list[JobOut]
    total: int = Field(description="Jobs matching the filters: exact up to 10,000, else an estimate (see below).")
    total_is_estimate: bool = Field(False, description="True when total is the database's estimate.")
    limit: int
    offset: int
    next_cursor: str | None = Field(None, description="Pass as cursor for the next page; null on the last page.")


# [step, value]; documented as a 2-number array (a `prefixItems` tuple trips some OpenAPI tools).
_Point = Annotated[
    tuple[int, float], WithJsonSchema({"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2})
]


class MetricsOut(BaseModel):
    job_id: int
    series: dict[str, list[_Point]] = Field(description="name -> [[step, value], ...], steps ascending.")
    last_step: int | None = Field(description="Largest step returned; pass it as since_step to poll for more.")
    attempt: int = Field(
        0,
        description="The job's current attempt. When it changes between two polls, the new "
        "attempt resumed at `resumed_from_step` and replaced the points above it: "
        "poll again with since_step=resumed_from_step.",
    )
    resumed_from_step: int | None = Field(None, description="The step the current attempt resumed from.")


class EvaluationOut(_Out):
    step: int
    attempt: int
    ap: float | None
    ap50: float | None
    ap75: float | None
    aps: float | None
    apm: float | None
    apl: float | None
    per_class: dict[str, Any]
    created_at: datetime


class CheckpointOut(_Out):
    name: str
    step: int
    attempt: int
    size_bytes: int
    sha256: str
    final: bool
    created_at: datetime
    url: str = ""


class WorkerOut(_Out):
    name: str
    hostname: str
    device: str
    queues: str
    pid: int | None
    started_at: datetime
    last_heartbeat: datetime
    current_job_id: int | None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def gpus(self) -> int:
        """Its device group: the largest resources.gpus it runs (from its -gN queues)."""
        return gpus_served(self.queues)


class CheckResult(BaseModel):
    ok: bool
    detail: str


class HealthOut(BaseModel):
    status: str = Field(description="ok when database and broker are reachable and a worker is alive, else degraded.")
    database: CheckResult
    broker: CheckResult
    workers: CheckResult
    warnings: list[str] = Field(
        default_factory=list, description="Jobs that cannot start: no live worker consumes their queue."
    )


class VersionOut(BaseModel):
    version: str
    git_commit: str | None
    python: str
    torch: str | None
    database_revision: str | None


class ErrorOut(BaseModel):
    detail: Any


class ValidationErrorItem(BaseModel):
    loc: list[str | int] = Field(description="Where: 'body', 'query' or 'path', then the field's path.")
    field: str = Field("", description="The field as a dotted path, e.g. schedule.batch_size.")
    msg: str = Field(description="What is wrong and, where it helps, what to change.")
    type: str


class ValidationErrorOut(BaseModel):
    """A 422: always a list, one entry per problem."""

    detail: list[ValidationErrorItem]


def json_error(description: str) -> dict[str, Any]:
    """An error response documented as JSON, also on routes whose success body is text or a file."""
    return {"description": description, "content": {"application/json": {"schema": ErrorOut.model_json_schema()}}}
