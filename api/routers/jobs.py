"""Jobs: submit, list, inspect, cancel, retry, delete, and read their metrics and evaluations."""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Response, status
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from api.auth import UNAUTHORIZED, Caller, get_caller
from api.bodies import YAML_REQUEST_BODY, YamlBodyRoute
from api.deps import JobId, get_app_settings, get_artifacts, get_session, job_or_404
from api.docs import SUBMIT_EXAMPLES
from api.enqueue import dispatch_new
from api.schemas import (
    ErrorOut,
    EvaluationOut,
    JobDetail,
    JobList,
    JobOut,
    MetricsOut,
    PriorityIn,
    ValidationErrorOut,
)
from api.validation import (
    confine_paths,
    field_error,
    limit_errors,
    reference_mismatch,
    sweep_limit_errors,
    unstorable_fields,
)
from icd_core.checkpoint_gate import checkpoint_problems
from icd_core.spec import (
    INT32_MAX,
    JobSpec,
    ModelSpec,
    StudySpec,
    SweepSpec,
    check_paths,
    iter_checkpoint_refs,
    parse_job_ref,
)
from icd_core.study_plan import check_study
from store import jobs as q
from store.artifacts import ArtifactStore
from store.checkpoint_refs import job_ref_state
from store.dispatch import BrokerUnavailable, enqueue, group_size, queue_for
from store.models import JOB_KINDS, JOB_STATUSES, Job, JobKind, JobStatus
from store.paging import page_jobs
from store.preemption import preemption_pass
from store.reaper import status_detail
from store.results import get_metrics, list_evaluations
from store.settings import Settings
from store.tokens import priority_cap

log = logging.getLogger(__name__)
_UNPROCESSABLE = {422: {"model": ValidationErrorOut, "description": "Invalid parameters: each entry names the field"}}
router = APIRouter(
    prefix="/jobs",
    tags=["jobs"],
    route_class=YamlBodyRoute,
    dependencies=[Depends(get_caller)],
    responses=UNAUTHORIZED | _UNPROCESSABLE,
)

_ERRORS: dict[int | str, dict[str, Any]] = {404: {"model": ErrorOut, "description": "No such job"}}
_STATE: dict[int | str, dict[str, Any]] = {409: {"model": ErrorOut, "description": "Not allowed in the job's status"}}


def _validated_spec(s: Session, spec: Any, settings: Settings, caller: Caller) -> tuple[Any, list[dict[str, Any]]]:
    """The spec with its paths resolved inside the allowed roots, and every problem found (422 entries).

    The stored spec carries the real absolute paths, so workers do not depend on their working directory.
    """
    raw = spec.model_dump(mode="json")
    errors = [field_error(f, "NUL bytes and lone surrogates are not allowed") for f in unstorable_fields(raw)]
    if errors:
        return spec, errors
    spec, errors = confine_paths(spec, settings, lambda job_id: _may_read(s, caller, job_id))
    if errors:
        return spec, errors
    path_problems = check_paths(spec)
    errors = [field_error(f, r) for f, r in path_problems]
    limits = sweep_limit_errors if isinstance(spec, SweepSpec) else limit_errors
    errors += [field_error(f, r) for f, r in limits(spec, settings)]
    # A teacher file of another format (or architecture) is refused now, with the command that imports it.
    errors += [field_error(f, r) for f, r in checkpoint_problems(spec, skip={f for f, _ in path_problems})]
    return spec, errors


def _may_read(s: Session, caller: Caller, job_id: int) -> bool:
    """Whether the caller may use job `job_id`'s files (by job:<id> or by path): the same rule as seeing it."""
    job = q.get_job(s, job_id) if job_id <= INT32_MAX else None
    return job is not None and caller.can_see(job)


def _check_job_refs(
    s: Session, spec: Any, settings: Settings, caller: Caller, errors: list[dict[str, Any]]
) -> list[int]:
    """Validate `checkpoint: job:<id>` references; return the ids still running (to wait for)."""
    waits: list[int] = []
    for field, ref in iter_checkpoint_refs(spec):
        dep_id = parse_job_ref(ref)
        if dep_id is None:
            continue
        dep = q.get_job(s, dep_id) if dep_id <= INT32_MAX else None
        if dep is None or not caller.can_see(dep):
            errors.append(field_error(field, f"job {dep_id} does not exist"))
            continue
        expected = getattr(spec, field.split(".")[0])
        if isinstance(expected, ModelSpec) and (why := reference_mismatch(field, expected, dep)):
            errors.append(field_error(field, why))
            continue
        problem, pending = job_ref_state(s, settings.artifact_root, dep_id)
        if problem:
            errors.append(field_error(field, problem))
        elif pending and dep_id not in waits:
            waits.append(dep_id)
    return waits


def _dispatch(s: Session, settings: Settings, job: Job) -> None:
    """Publish a retried job. If the broker is down the job is marked failed again (retry later) → 503."""
    try:
        enqueue(job.id, job.queue, settings.broker_url)
    except BrokerUnavailable as exc:
        msg = f"{exc}; the job was not queued: retry it (POST /jobs/{job.id}/retry) when the broker is back"
        q.fail_job(s, job.id, msg)
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, detail=msg, headers={"Location": f"/jobs/{job.id}"}
        ) from exc


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=JobDetail,
    openapi_extra=YAML_REQUEST_BODY,
    responses={
        400: {"model": ErrorOut, "description": "The body is not JSON"},
        413: {"model": ErrorOut, "description": "Request body over ICD_MAX_BODY_BYTES"},
        415: {"model": ErrorOut, "description": "A body that is neither JSON nor YAML"},
        422: {"model": ValidationErrorOut, "description": "Invalid spec: each entry names the field and the reason"},
        503: {"model": ErrorOut, "description": "Broker unreachable: nothing was recorded; submit again later"},
    },
)
def submit_job(
    response: Response,
    spec: Annotated[JobSpec, Body(openapi_examples=SUBMIT_EXAMPLES)],
    s: Session = Depends(get_session),
    settings: Settings = Depends(get_app_settings),
    caller: Caller = Depends(get_caller),
) -> JobDetail:
    """Submit a job spec (JSON, or YAML with `Content-Type: application/yaml`). It is queued at once, or
    waits while a `checkpoint: job:<id>` job still runs.

    Paths outside the allowed roots, unreadable files, values above the server's caps, checkpoint files
    that are not this service's (a torchvision, detectron2 or MMDetection detector: the message gives the
    `icd import-teacher` command) and checkpoints or `job:<id>` references of another architecture are
    rejected here (422 naming the field).
    """
    spec, errors = _validated_spec(s, spec, settings, caller)
    waits = _check_job_refs(s, spec, settings, caller, errors) if not errors else []
    if (why := _above_cap(s, caller, spec.priority)) is not None:
        errors.append(field_error("priority", why))
    if isinstance(spec, StudySpec):
        try:
            check_study(spec)  # an incompatible teacher/student pair fails now, not after the teacher trains
        except ValueError as exc:
            errors.append(field_error("student", str(exc)))
    if errors:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=errors)
    job = q.create_job(
        s,
        spec.model_dump(mode="json"),
        kind=spec.kind,
        name=spec.name,
        queue=queue_for(spec),
        depends_on=waits,
        status=JobStatus.WAITING if waits else JobStatus.QUEUED,
        owner=caller.name,
        priority=spec.priority,
        gpus=group_size(spec),
    )
    response.headers["Location"] = f"/jobs/{job.id}"
    if waits:
        released = q.settle_waiting(s, job.id)  # a dependency may have finished meanwhile
        if released is not None:
            dispatch_new(s, settings, released)
    else:
        dispatch_new(s, settings, job)
        _preempt_now(s, settings)
    return JobDetail.model_validate(job_or_404(s, job.id, caller))


def _above_cap(s: Session, caller: Caller, priority: int) -> str | None:
    """Why a non-admin may not use this priority (None: it may): above the cap its admin set."""
    if caller.admin:
        return None
    cap = priority_cap(s, caller.name)
    if priority <= cap:
        return None
    return (
        f"priority {priority} is above the cap of token {caller.name!r} ({cap}); use {cap} or lower, or ask an "
        f"admin to raise it (`icd token set-quota {caller.name} --max-priority N`)"
    )


def _preempt_now(s: Session, settings: Settings) -> None:
    """A new job of high priority makes room at once instead of at the next reaper pass; a failure here is
    only logged (the reaper's pass does the same within ICD_REAPER_INTERVAL_S)."""
    try:
        preemption_pass(s, settings)
    except Exception:  # noqa: BLE001 - the submit succeeded; preemption is retried by the reaper
        s.rollback()
        log.exception("preemption after submit failed")


@router.get("", response_model=JobList)
def list_jobs(
    s: Session = Depends(get_session),
    status_: Annotated[
        str | None,
        Query(alias="status", description=f"One status or several, comma-separated: {', '.join(JOB_STATUSES)}"),
    ] = None,
    kind: Annotated[JobKind | None, Query(description=" | ".join(JOB_KINDS))] = None,
    name: Annotated[str | None, Query(max_length=200)] = None,
    parent_id: Annotated[int | None, Query(ge=1, le=INT32_MAX)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=INT32_MAX, description="Rows to skip (slow when deep: prefer cursor)")] = 0,
    search: Annotated[str | None, Query(max_length=200, description="Name contains this (any case), or the id")] = None,
    cursor: Annotated[
        str | None,
        Query(max_length=200, description="next_cursor of the previous page: the jobs after it, newest first"),
    ] = None,
    sort: Annotated[
        Literal["newest", "priority"],
        Query(
            description="newest (default; pages by cursor) or priority: highest first, oldest first within one "
            "(pages by offset)"
        ),
    ] = "newest",
    caller: Caller = Depends(get_caller),
) -> JobList:
    """Jobs newest first, filtered, one page at a time; a non-admin token sees only its own jobs.

    Page by `cursor` (each page returns `next_cursor`, null on the last page): fast at any depth, and
    no job is repeated or skipped while new ones are submitted. `total` is exact up to 10,000 matches,
    above that a database estimate (`total_is_estimate: true`).
    """
    statuses = [x for x in (status_ or "").split(",") if x] or None
    if cursor and offset:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail=[_query_error("offset", "offset: use either cursor or offset, not both")],
        )
    if cursor and sort == "priority":
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail=[_query_error("cursor", "cursor: sort=priority pages by offset")],
        )
    try:
        page = page_jobs(
            s,
            statuses,
            kind,
            name,
            parent_id,
            limit=limit,
            offset=offset,
            cursor=cursor,
            search=search,
            owner=None if caller.admin else caller.name,
            by_priority=sort == "priority",
        )
    except ValueError as exc:
        field = "cursor" if str(exc).startswith("cursor") else "status"
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=[_query_error(field, str(exc))]) from exc
    return JobList(
        items=[JobOut.model_validate(j) for j in page.items],
        total=page.total,
        total_is_estimate=page.total_is_estimate,
        limit=limit,
        offset=offset,
        next_cursor=page.next_cursor,
    )


def _query_error(field: str, reason: str) -> dict[str, Any]:
    """One 422 entry about a query parameter, in the array shape of every 422."""
    return {"loc": ["query", field], "field": field, "msg": reason, "type": "value_error"}


@router.get("/{job_id}", response_model=JobDetail, responses=_ERRORS)
def get_job(
    job_id: JobId,
    s: Session = Depends(get_session),
    settings: Settings = Depends(get_app_settings),
    caller: Caller = Depends(get_caller),
) -> JobDetail:
    """Spec, status, attempt, progress, ETA, timestamps, worker, error and final metrics."""
    job = job_or_404(s, job_id, caller)
    detail = JobDetail.model_validate(job)
    detail.status_detail = status_detail(s, job, settings)
    return detail


@router.post("/{job_id}/cancel", response_model=JobDetail, responses=_ERRORS | _STATE)
def cancel_job(job_id: JobId, s: Session = Depends(get_session), caller: Caller = Depends(get_caller)) -> JobDetail:
    """Queued or waiting jobs are canceled at once; a running one stops at its next step, and a cancel
    answered 200 always ends the job canceled, even one that was writing its final checkpoint. 409 when
    the job already finished (also when it finished while this request was being answered)."""
    job_or_404(s, job_id, caller)
    try:
        q.request_cancel(s, job_id)
    except q.JobStateError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from exc
    return JobDetail.model_validate(job_or_404(s, job_id, caller))


@router.post("/{job_id}/priority", response_model=JobDetail, responses=_ERRORS | _STATE)
def set_priority(
    job_id: JobId,
    body: PriorityIn,
    s: Session = Depends(get_session),
    settings: Settings = Depends(get_app_settings),
    caller: Caller = Depends(get_caller),
) -> JobDetail:
    """Re-prioritise a queued or waiting job (a study: with its unstarted children); its owner or an admin.
    A non-admin stays within its token's cap (422 naming `priority`); 409 once the job runs or ended."""
    job_or_404(s, job_id, caller)
    if (why := _above_cap(s, caller, body.priority)) is not None:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=[field_error("priority", why)])
    try:
        q.set_priority(s, job_id, body.priority)
    except q.JobStateError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from exc
    _preempt_now(s, settings)
    job = job_or_404(s, job_id, caller)
    detail = JobDetail.model_validate(job)
    detail.status_detail = status_detail(s, job, settings)
    return detail


@router.post(
    "/{job_id}/retry",
    response_model=JobDetail,
    responses=_ERRORS | _STATE | {503: {"model": ErrorOut, "description": "Broker unreachable"}},
)
def retry_job(
    job_id: JobId,
    s: Session = Depends(get_session),
    settings: Settings = Depends(get_app_settings),
    caller: Caller = Depends(get_caller),
) -> JobDetail:
    """Requeue a failed or canceled job; it resumes from its last checkpoint."""
    job_or_404(s, job_id, caller)
    try:
        job = q.retry_job(s, job_id)
    except q.JobStateError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from exc
    if job.status == JobStatus.WAITING:
        released = q.settle_waiting(s, job_id)
        if released is not None:
            _dispatch(s, settings, released)
    else:
        _dispatch(s, settings, job)
    return JobDetail.model_validate(job_or_404(s, job_id, caller))


@router.delete(
    "/{job_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=_ERRORS | _STATE,
)
def delete_job(
    job_id: JobId,
    s: Session = Depends(get_session),
    artifacts: ArtifactStore = Depends(get_artifacts),
    caller: Caller = Depends(get_caller),
) -> Response:
    """Delete a finished job, its results and its artifact folder (study children included)."""
    job_or_404(s, job_id, caller)
    children = [c.id for c in q.list_jobs(s, parent_id=job_id, limit=100_000)]
    try:
        q.delete_job(s, job_id)
    except q.JobStateError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from exc
    for jid in (job_id, *children):
        artifacts.delete_job(jid)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{job_id}/metrics", response_model=MetricsOut, responses=_ERRORS)
def job_metrics(
    job_id: JobId,
    s: Session = Depends(get_session),
    caller: Caller = Depends(get_caller),
    names: Annotated[
        str | None, Query(max_length=10_000, description="Comma-separated series names; all when omitted")
    ] = None,
    since_step: Annotated[
        int | None, Query(ge=-INT32_MAX - 1, le=INT32_MAX, description="Only steps after this one (polling)")
    ] = None,
    max_points: Annotated[
        int | None,
        Query(
            ge=2,
            le=100_000,
            description="Downsample each series in the database to at most this many points: every step "
            "bucket's min and max point and the series' last point (max_points=2: the first and last point)",
        ),
    ] = None,
) -> MetricsOut | JSONResponse:
    """Training scalars by series name."""
    job = job_or_404(s, job_id, caller)
    wanted = [n for n in (names or "").split(",") if n] or None
    series = get_metrics(s, job_id, wanted, since_step, max_points)
    last = max((pts[-1][0] for pts in series.values() if pts), default=None)
    current = next((a for a in job.attempts if a.number == job.attempt), None)
    return MetricsOut(
        job_id=job_id,
        series=series,
        last_step=last,
        attempt=job.attempt,
        resumed_from_step=current.resumed_from_step if current is not None else None,
    )


@router.get("/{job_id}/evaluations", response_model=list[EvaluationOut], responses=_ERRORS)
def job_evaluations(
    job_id: JobId,
    s: Session = Depends(get_session),
    caller: Caller = Depends(get_caller),
    since_step: Annotated[
        int | None, Query(ge=-INT32_MAX - 1, le=INT32_MAX, description="Only evaluations after this step (polling)")
    ] = None,
) -> list[EvaluationOut]:
    """Every COCO evaluation: AP, AP50, AP75, APs/m/l (percent) and per-class AP, steps ascending."""
    job_or_404(s, job_id, caller)
    evals = list_evaluations(s, job_id)
    if since_step is not None:
        evals = [e for e in evals if e.step > since_step]
    return [EvaluationOut.model_validate(e) for e in evals]
