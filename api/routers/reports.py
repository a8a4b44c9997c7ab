"""A study's leaderboard: report.json, its markdown table and its PNG chart, written by the workers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, status
from fastapi.responses import FileResponse, PlainTextResponse
from sqlalchemy.orm import Session

from api.auth import UNAUTHORIZED, Caller, get_caller
from api.deps import JobId, get_artifacts, get_session, job_or_404
from api.schemas import json_error
from store.artifacts import ArtifactStore

router = APIRouter(
    prefix="/jobs",
    tags=["studies"],
    dependencies=[Depends(get_caller)],
    responses=UNAUTHORIZED | {404: json_error("No such study, or no report yet")},
)


def _report_file(s: Session, artifacts: ArtifactStore, job_id: int, name: str, caller: Caller) -> Path:
    job = job_or_404(s, job_id, caller)
    if job.kind not in ("study", "sweep"):
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            detail=f"job {job_id} is a {job.kind} job; reports belong to studies and sweeps",
        )
    path = artifacts.report_dir(job_id) / name
    if not path.is_file():
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            detail=f"study {job_id} has no report yet ({job.status}; "
            f"{job.progress_step or 0}/{job.progress_total or 0} children ended)",
        )
    return path


@router.get("/{job_id}/report")
def study_report(
    job_id: JobId,
    s: Session = Depends(get_session),
    caller: Caller = Depends(get_caller),
    artifacts: ArtifactStore = Depends(get_artifacts),
) -> dict[str, Any]:
    """The leaderboard: per method mean ± std of AP metrics over seeds, Δ vs `none`, step-time and memory cost."""
    return json.loads(_report_file(s, artifacts, job_id, "report.json", caller).read_text())


@router.get("/{job_id}/report.md", response_class=PlainTextResponse)
def study_report_markdown(
    job_id: JobId,
    s: Session = Depends(get_session),
    caller: Caller = Depends(get_caller),
    artifacts: ArtifactStore = Depends(get_artifacts),
) -> str:
    """The leaderboard as a markdown table."""
    return _report_file(s, artifacts, job_id, "report.md", caller).read_text()


@router.get(
    "/{job_id}/report.png",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}}, "description": "AP per method with error bars"}},
)
def study_report_png(
    job_id: JobId,
    s: Session = Depends(get_session),
    caller: Caller = Depends(get_caller),
    artifacts: ArtifactStore = Depends(get_artifacts),
) -> FileResponse:
    """The leaderboard chart: mean AP per method with std error bars, the teacher and `none` as lines."""
    return FileResponse(_report_file(s, artifacts, job_id, "report.png", caller), media_type="image/png")


@router.get(
    "/{job_id}/report/ap_latency.png",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}}, "description": "AP against batch-1 latency per run"}},
)
def study_ap_latency_png(
    job_id: JobId,
    s: Session = Depends(get_session),
    caller: Caller = Depends(get_caller),
    artifacts: ArtifactStore = Depends(get_artifacts),
) -> FileResponse:
    """COCO AP against the eager batch-1 latency of every finished child, the teacher as a star."""
    return FileResponse(_report_file(s, artifacts, job_id, "ap_latency.png", caller), media_type="image/png")
