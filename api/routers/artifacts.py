"""A job's files: checkpoint list and downloads (streamed, sha256 header, HTTP ranges) and its log."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, status
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, PlainTextResponse, StreamingResponse
from sqlalchemy.orm import Session

from api.auth import UNAUTHORIZED, Caller, get_caller
from api.deps import JobId, get_artifacts, get_session, job_or_404
from api.schemas import CheckpointOut, json_error
from store import jobs as q
from store.artifacts import ArtifactStore
from store.db import session_scope
from store.models import TERMINAL_STATUSES
from store.results import get_checkpoint, list_checkpoints

router = APIRouter(
    prefix="/jobs",
    tags=["artifacts"],
    dependencies=[Depends(get_caller)],
    responses=UNAUTHORIZED | {404: json_error("No such job or file")},
)


@router.get("/{job_id}/checkpoints", response_model=list[CheckpointOut])
def job_checkpoints(
    job_id: JobId, request: Request, s: Session = Depends(get_session), caller: Caller = Depends(get_caller)
) -> list[CheckpointOut]:
    """Checkpoints recorded for the job, with size, sha256 and a download URL."""
    job_or_404(s, job_id, caller)
    out = []
    for ck in list_checkpoints(s, job_id):
        item = CheckpointOut.model_validate(ck)
        item.url = f"/jobs/{job_id}/checkpoints/{ck.name}"
        out.append(item)
    return out


@router.get(
    "/{job_id}/checkpoints/{name}",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The checkpoint file"},
        206: {"description": "The requested byte range"},
        416: {"description": "Range not satisfiable"},
    },
)
def download_checkpoint(
    job_id: JobId,
    name: Annotated[str, PathParam(max_length=255)],
    s: Session = Depends(get_session),
    caller: Caller = Depends(get_caller),
    artifacts: ArtifactStore = Depends(get_artifacts),
) -> FileResponse:
    """Stream a checkpoint. `X-Checkpoint-SHA256` (also the ETag) lets clients verify it; `Range`
    requests resume an interrupted download (206, or 416 for a range outside the file)."""
    job_or_404(s, job_id, caller)
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


# HEAD (size and sha256 before a ranged download) is the same handler, kept out of the schema so that
# each operation id stays unique.
router.add_api_route(
    "/{job_id}/checkpoints/{name}",
    download_checkpoint,
    methods=["HEAD"],
    include_in_schema=False,
    response_class=FileResponse,
)

FOLLOW_POLL_S = 0.5


@router.get(
    "/{job_id}/logs",
    response_class=PlainTextResponse,
    responses={200: {"headers": {"X-Log-Offset": {"description": "Byte offset after this text: pass it as offset"}}}},
)
def job_logs(
    job_id: JobId,
    request: Request,
    tail: Annotated[int | None, Query(ge=1, le=100_000, description="Only the last N lines")] = None,
    offset: Annotated[int | None, Query(ge=0, description="Start at this byte (a previous X-Log-Offset)")] = None,
    follow: Annotated[bool, Query(description="Keep streaming new lines until the job is finished")] = False,
    s: Session = Depends(get_session),
    caller: Caller = Depends(get_caller),
    artifacts: ArtifactStore = Depends(get_artifacts),
) -> Response:
    """The job's log as plain text (empty until its worker writes one). `offset` reads only what was added
    since a previous read; `follow` streams the log as it grows and ends when the job is finished."""
    job = job_or_404(s, job_id, caller)
    path = artifacts.log_path(job_id)
    start = _start_offset(path, tail, offset)
    if follow:
        finished = job.status in TERMINAL_STATUSES
        sessions = request.app.state.sessions
        return StreamingResponse(_follow(path, start, job_id, sessions, request, finished), media_type="text/plain")
    data, end = _read_from(path, start)
    return PlainTextResponse(data.decode("utf-8", errors="replace"), headers={"X-Log-Offset": str(end)})


def _start_offset(path: Path, tail: int | None, offset: int | None) -> int:
    """Byte where reading starts: `offset`, else the start of the last `tail` lines, else 0."""
    size = path.stat().st_size if path.is_file() else 0
    if offset is not None:
        return min(offset, size)
    if not tail or not size:
        return 0
    with open(path, "rb") as f:
        starts = deque([0], maxlen=tail)
        pos = 0
        for line in f:
            pos += len(line)
            if pos < size:
                starts.append(pos)
    return starts[0]


def _read_from(path: Path, start: int) -> tuple[bytes, int]:
    if not path.is_file():
        return b"", 0
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read()
    return data, start + len(data)


def _job_finished(sessions: Any, job_id: int) -> bool:
    with session_scope(sessions) as s:
        job = q.get_job(s, job_id)
        return job is None or job.status in TERMINAL_STATUSES


async def _follow(
    path: Path, pos: int, job_id: int, sessions: Any, request: Request, finished: bool
) -> AsyncIterator[bytes]:
    """New bytes of the log as they are written; ends once the job is finished and the log read to its end."""
    while True:
        data, pos = await asyncio.to_thread(_read_from, path, pos)
        if data:
            yield data
        if finished or await request.is_disconnected():
            return
        finished = await asyncio.to_thread(_job_finished, sessions, job_id)  # read once more after it ends
        if not finished:
            await asyncio.sleep(FOLLOW_POLL_S)
