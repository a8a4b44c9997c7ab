"""A job's files: checkpoint list and downloads (streamed, sha256 header, HTTP ranges) and its log."""

from __future__ import annotations

from collections import deque
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi.responses import FileResponse, PlainTextResponse
from sqlalchemy.orm import Session

from api.deps import get_artifacts, get_session, job_or_404
from api.schemas import CheckpointOut, ErrorOut
from store.artifacts import ArtifactStore
from store.results import get_checkpoint, list_checkpoints

router = APIRouter(prefix="/jobs", tags=["artifacts"])


@router.get("/{job_id}/checkpoints", response_model=list[CheckpointOut])
def job_checkpoints(job_id: int, request: Request, s: Session = Depends(get_session)) -> list[CheckpointOut]:
    """Checkpoints recorded for the job, with size, sha256 and a download URL."""
    job_or_404(s, job_id)
    out = []
    for ck in list_checkpoints(s, job_id):
        item = CheckpointOut.model_validate(ck)
        item.url = f"/jobs/{job_id}/checkpoints/{ck.name}"
        out.append(item)
    return out


@router.api_route(
    "/{job_id}/checkpoints/{name}",
    methods=["GET", "HEAD"],
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The checkpoint file"},
        206: {"description": "The requested byte range"},
        404: {"model": ErrorOut},
        416: {"description": "Range not satisfiable"},
    },
)
def download_checkpoint(
    job_id: int, name: str, s: Session = Depends(get_session), artifacts: ArtifactStore = Depends(get_artifacts)
) -> FileResponse:
    """Stream a checkpoint. `X-Checkpoint-SHA256` (also the ETag) lets clients verify it; `Range`
    requests resume an interrupted download (206, or 416 for a range outside the file)."""
    job_or_404(s, job_id)
    ck = get_checkpoint(s, job_id, name)
    if ck is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"job {job_id} has no checkpoint named {name!r}")
    try:
        path = artifacts.absolute(ck.path)
    except ValueError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc)) from exc
    if not path.is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"checkpoint file missing on disk: {ck.path}")
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=ck.name,
        headers={"X-Checkpoint-SHA256": ck.sha256, "ETag": f'"{ck.sha256}"'},
    )


@router.get("/{job_id}/logs", response_class=PlainTextResponse, responses={404: {"model": ErrorOut}})
def job_logs(
    job_id: int,
    tail: Annotated[int | None, Query(ge=1, le=100_000, description="Only the last N lines")] = None,
    s: Session = Depends(get_session),
    artifacts: ArtifactStore = Depends(get_artifacts),
) -> PlainTextResponse:
    """The job's log as plain text (empty until its worker writes one)."""
    job_or_404(s, job_id)
    path = artifacts.log_path(job_id)
    if not path.is_file():
        return PlainTextResponse("")
    with open(path, encoding="utf-8", errors="replace") as f:
        text = "".join(deque(f, maxlen=tail)) if tail else f.read()
    return PlainTextResponse(text)
