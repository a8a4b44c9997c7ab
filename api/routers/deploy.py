"""A finished job's model for deployment: its rendered predictions, and verified TorchScript / ONNX exports.

Predictions are rendered by the run itself (`predictions/` in its folder: the first validation images,
the teacher's too for a distill job). An export is a job of its own (kind `export`, docs/architecture.md#
exports-are-jobs): these endpoints submit it and serve its state and its files, which the worker that ran it
wrote into the export job's folder; the API process runs no export itself.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, status
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from api.auth import UNAUTHORIZED, Caller, get_caller
from api.deps import JobId, get_app_settings, get_artifacts, get_session, job_or_404
from api.enqueue import dispatch_new
from api.schemas import ErrorOut, json_error
from api.validation import confine_paths
from icd_core.run_layout import EXPORTS_RECORD
from icd_core.spec import EXPORT_FORMATS, INT32_MAX, JOB_REF_PREFIX, ExportFormat, ExportSpec
from store import jobs as q
from store.artifacts import ArtifactStore
from store.checkpoint_refs import job_ref_state
from store.dispatch import queue_for
from store.exports import export_jobs
from store.models import ACTIVE_STATUSES, Job, JobStatus
from store.settings import Settings

router = APIRouter(prefix="/jobs", tags=["deploy"], dependencies=[Depends(get_caller)], responses=UNAUTHORIZED)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}$")


# --- predictions ------------------------------------------------------------------------------------
class PredictionImage(BaseModel):
    name: str
    url: str
    raw_url: str | None = Field(None, description="The same image without boxes (runs since raw images are kept).")


class PredictionsOut(BaseModel):
    """A job's detections on its first validation images, as PNGs (and COCO-format JSON)."""

    model: list[PredictionImage] = Field(description="The job's model (the student of a distill job).")
    teacher: list[PredictionImage] = Field(description="The teacher's, on the same images (distill jobs).")
    detections_url: str | None = Field(description="COCO-format detections of the job's model.")
    teacher_detections_url: str | None = Field(None, description="The teacher's, on the same images.")


def _pngs(folder: Path, url: str) -> list[PredictionImage]:
    if not folder.is_dir():
        return []
    return [
        PredictionImage(
            name=p.name,
            url=f"{url}/{p.name}",
            raw_url=f"{url}/raw/{p.name}" if (folder / "raw" / p.name).is_file() else None,
        )
        for p in sorted(folder.glob("*.png"))
    ]


def _json_url(folder: Path, url: str) -> str | None:
    return f"{url}/detections.json" if (folder / "detections.json").is_file() else None


@router.get("/{job_id}/predictions", response_model=PredictionsOut, responses={404: {"model": ErrorOut}})
def job_predictions(
    job_id: JobId,
    s: Session = Depends(get_session),
    caller: Caller = Depends(get_caller),
    artifacts: ArtifactStore = Depends(get_artifacts),
) -> PredictionsOut:
    """The rendered predictions of a finished train/distill job (empty lists before it finishes)."""
    job_or_404(s, job_id, caller)
    folder = artifacts.job_dir(job_id) / "predictions"
    base = f"/jobs/{job_id}/predictions"
    return PredictionsOut(
        model=_pngs(folder, base),
        teacher=_pngs(folder / "teacher", f"{base}/teacher"),
        detections_url=_json_url(folder, base),
        teacher_detections_url=_json_url(folder / "teacher", f"{base}/teacher"),
    )


def _prediction_file(artifacts: ArtifactStore, job_id: int, parts: list[str]) -> FileResponse:
    if not all(_NAME.match(p) for p in parts):
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no prediction file {'/'.join(parts)!r}")
    path = artifacts.job_dir(job_id) / "predictions" / Path(*parts)
    if not path.is_file() or path.suffix not in (".png", ".json"):
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            detail=f"job {job_id} has no prediction file {'/'.join(parts)!r} (it renders them "
            "when it finishes; see GET /jobs/{id}/predictions)",
        )
    return FileResponse(path, media_type="image/png" if path.suffix == ".png" else "application/json")


_FILE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {}, "application/json": {}}, "description": "The PNG or the detections JSON"},
    404: {"model": ErrorOut},
}


@router.get("/{job_id}/predictions/teacher/raw/{name}", response_class=FileResponse, responses=_FILE_RESPONSES)
def teacher_raw_prediction_file(
    job_id: JobId,
    name: str,
    s: Session = Depends(get_session),
    caller: Caller = Depends(get_caller),
    artifacts: ArtifactStore = Depends(get_artifacts),
) -> FileResponse:
    """One of the teacher's validation images without boxes (a viewer draws them from the JSON)."""
    job_or_404(s, job_id, caller)
    return _prediction_file(artifacts, job_id, ["teacher", "raw", name])


@router.get("/{job_id}/predictions/raw/{name}", response_class=FileResponse, responses=_FILE_RESPONSES)
def raw_prediction_file(
    job_id: JobId,
    name: str,
    s: Session = Depends(get_session),
    caller: Caller = Depends(get_caller),
    artifacts: ArtifactStore = Depends(get_artifacts),
) -> FileResponse:
    """One validation image without boxes (a viewer draws them from detections.json)."""
    job_or_404(s, job_id, caller)
    return _prediction_file(artifacts, job_id, ["raw", name])


@router.get("/{job_id}/predictions/teacher/{name}", response_class=FileResponse, responses=_FILE_RESPONSES)
def teacher_prediction_file(
    job_id: JobId,
    name: str,
    s: Session = Depends(get_session),
    caller: Caller = Depends(get_caller),
    artifacts: ArtifactStore = Depends(get_artifacts),
) -> FileResponse:
    """One of the teacher's rendered validation images (distill jobs)."""
    job_or_404(s, job_id, caller)
    return _prediction_file(artifacts, job_id, ["teacher", name])


@router.get("/{job_id}/predictions/{name}", response_class=FileResponse, responses=_FILE_RESPONSES)
def prediction_file(
    job_id: JobId,
    name: str,
    s: Session = Depends(get_session),
    caller: Caller = Depends(get_caller),
    artifacts: ArtifactStore = Depends(get_artifacts),
) -> FileResponse:
    """One rendered validation image (PNG), or `detections.json`."""
    job_or_404(s, job_id, caller)
    return _prediction_file(artifacts, job_id, [name])


# --- exports ----------------------------------------------------------------------------------------
# An export is a job of kind `export` (icd_core.spec.ExportSpec) that a worker claims, leases and retries
# like any other (worker/export.py); these endpoints submit it and serve its state and files.
class ExportRequest(BaseModel):
    model_config = {"extra": "forbid"}

    format: ExportFormat = "onnx"
    verify_images: int = Field(4, ge=1, le=100, description="Validation images whose detections must match eager.")
    eval_images: int | None = Field(
        None, ge=1, le=INT32_MAX, description="Limit the COCO AP check (default: the whole val set)."
    )


class ExportOut(BaseModel):
    format: str
    job_id: int = Field(description="The export job (GET /jobs/{job_id} for its attempts, GET its logs).")
    status: JobStatus = Field(description="The export job's status.")
    error: str | None = None
    url: str | None = Field(None, description="Download URL once it succeeded.")
    sha256: str | None = None
    size_bytes: int | None = None
    started_at: float | None = Field(None, description="Unix time its current attempt started.")
    finished_at: float | None = None
    meta: dict[str, Any] | None = Field(None, description="The export's embedded metadata, with its verification.")


def _record(artifacts: ArtifactStore, export: Job, fmt: str) -> tuple[dict[str, Any] | None, Path | None]:
    """(the worker's record of `fmt`: file, sha256, size; the file) of a succeeded export job."""
    folder = artifacts.exports_dir(export.id)
    path = folder / EXPORTS_RECORD
    if export.status != JobStatus.SUCCEEDED or not path.is_file():
        return None, None
    entry = json.loads(path.read_text()).get(fmt)
    if not entry or not _NAME.match(str(entry.get("file", ""))):
        return None, None
    return entry, folder / entry["file"]


def _export_out(artifacts: ArtifactStore, source_id: int, export: Job, fmt: str) -> ExportOut:
    entry, file = _record(artifacts, export, fmt)
    out = ExportOut(
        format=fmt,
        job_id=export.id,
        status=JobStatus(export.status),
        error=export.error,
        started_at=export.started_at.timestamp() if export.started_at else None,
        finished_at=export.finished_at.timestamp() if export.finished_at else None,
    )
    if entry is not None and file is not None and file.is_file():
        sidecar = file.with_name(file.name + ".json")  # icd_core.export.meta_sidecar
        out.meta = json.loads(sidecar.read_text()) if sidecar.is_file() else None
        out.url = f"/jobs/{source_id}/exports/{fmt}/file"
        out.sha256, out.size_bytes = entry["sha256"], entry["size_bytes"]
    return out


def _latest(s: Session, caller: Caller, source_id: int, fmt: str) -> Job | None:
    """The newest export of `fmt` of the job that the caller may see."""
    return next(
        (job for job in export_jobs(s, source_id) if fmt in job.spec.get("formats", []) and caller.can_see(job)),
        None,
    )


def _exportable(s: Session, job: Job, settings: Settings) -> None:
    if job.kind not in ("train", "distill"):
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"job {job.id} is a {job.kind} job: only train and distill jobs have a model to export",
        )
    if job.status != JobStatus.SUCCEEDED:
        raise HTTPException(
            status.HTTP_409_CONFLICT, detail=f"job {job.id} is {job.status}: export it once it has succeeded"
        )
    problem, _ = job_ref_state(s, settings.artifact_root or "", job.id)
    if problem:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=f"{problem}: nothing to export")


@router.post(
    "/{job_id}/exports",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ExportOut,
    responses={
        400: {"model": ErrorOut, "description": "The body is not JSON"},
        404: {"model": ErrorOut},
        409: {"model": ErrorOut, "description": "Not exportable now"},
        503: {"model": ErrorOut, "description": "Broker unreachable: nothing was recorded; submit again later"},
    },
)
def create_export(
    job_id: JobId,
    req: ExportRequest,
    s: Session = Depends(get_session),
    caller: Caller = Depends(get_caller),
    settings: Settings = Depends(get_app_settings),
    artifacts: ArtifactStore = Depends(get_artifacts),
) -> ExportOut:
    """Export a succeeded train/distill job's model (the student only) and verify it against the eager model.

    Submits an export job (kind `export`), which a worker runs like any other job (a lost worker's export is
    retried from the start): poll `GET /jobs/{id}/exports/{format}` until `succeeded` (then download `url`)
    or `failed` (`error` says why: a detector or opset that cannot export, or a verification mismatch).
    POSTing again replaces a finished export; one still queued or running answers 409.
    """
    job = job_or_404(s, job_id, caller)
    _exportable(s, job, settings)
    current = _latest(s, caller, job_id, req.format)
    if current is not None and current.status in ACTIVE_STATUSES:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"a {req.format} export of job {job_id} is {current.status} (job {current.id})",
        )
    spec = ExportSpec(
        name=f"{job.name}-{req.format}",
        checkpoint=f"{JOB_REF_PREFIX}{job_id}",
        formats=[req.format],
        verify_images=req.verify_images,
        eval_images=req.eval_images,
    )
    spec, errors = confine_paths(spec, settings, lambda ref: ref == job_id)  # the one path rule
    if errors:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=errors)
    export = q.create_job(
        s, spec.model_dump(mode="json"), kind=spec.kind, name=spec.name, queue=queue_for(spec), owner=caller.name
    )
    dispatch_new(s, settings, export)
    return _export_out(artifacts, job_id, export, req.format)


@router.get("/{job_id}/exports", response_model=list[ExportOut], responses={404: {"model": ErrorOut}})
def list_exports(
    job_id: JobId,
    s: Session = Depends(get_session),
    caller: Caller = Depends(get_caller),
    artifacts: ArtifactStore = Depends(get_artifacts),
) -> list[ExportOut]:
    """The job's newest export per format that was requested."""
    job_or_404(s, job_id, caller)
    latest = {fmt: _latest(s, caller, job_id, fmt) for fmt in EXPORT_FORMATS}
    return [_export_out(artifacts, job_id, export, fmt) for fmt, export in latest.items() if export is not None]


@router.get("/{job_id}/exports/{fmt}", response_model=ExportOut, responses={404: {"model": ErrorOut}})
def get_export(
    job_id: JobId,
    fmt: ExportFormat,
    s: Session = Depends(get_session),
    caller: Caller = Depends(get_caller),
    artifacts: ArtifactStore = Depends(get_artifacts),
) -> ExportOut:
    """The newest export's state, error or verification."""
    job_or_404(s, job_id, caller)
    export = _latest(s, caller, job_id, fmt)
    if export is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"job {job_id} has no {fmt} export; POST one first")
    return _export_out(artifacts, job_id, export, fmt)


@router.get(
    "/{job_id}/exports/{fmt}/file",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, 404: json_error("No such job or export")},
)
def download_export(
    job_id: JobId,
    fmt: ExportFormat,
    s: Session = Depends(get_session),
    caller: Caller = Depends(get_caller),
    artifacts: ArtifactStore = Depends(get_artifacts),
) -> FileResponse:
    """Stream a verified export (`X-Export-SHA256` / ETag to check it; HTTP ranges resume a download)."""
    job_or_404(s, job_id, caller)
    export = _latest(s, caller, job_id, fmt)
    entry, path = _record(artifacts, export, fmt) if export is not None else (None, None)
    if entry is None or path is None or not path.is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"job {job_id} has no finished {fmt} export")
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=f"job{job_id}{path.suffix}",
        headers={"X-Export-SHA256": entry["sha256"], "ETag": f'"{entry["sha256"]}"'},
    )


# HEAD (size and sha256 first) is the same handler, kept out of the schema so operation ids stay unique.
router.add_api_route(
    "/{job_id}/exports/{fmt}/file",
    download_export,
    methods=["HEAD"],
    include_in_schema=False,
    response_class=FileResponse,
)
