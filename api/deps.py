"""Request dependencies: settings, a database session, the artifact store, the job id parameter and
the job lookup every router starts from (the caller's identity comes from api.auth)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated

from fastapi import HTTPException, Path, Request, status
from sqlalchemy.orm import Session

from icd_core.spec import INT32_MAX
from store.artifacts import ArtifactStore
from store.db import session_scope
from store.jobs import get_job
from store.models import Job
from store.settings import Settings

if TYPE_CHECKING:
    from api.auth import Caller


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    """One session per request, always closed (rolled back on error)."""
    with session_scope(request.app.state.sessions) as s:
        yield s


def get_artifacts(request: Request) -> ArtifactStore:
    return request.app.state.artifacts


# Ids are 32-bit integer columns: a larger one is a 422, never a database error.
JobId = Annotated[int, Path(ge=1, le=INT32_MAX, description="The job's id")]


def job_or_404(s: Session, job_id: int, caller: Caller) -> Job:
    """The job, or the API's 404 naming it, also when it belongs to another owner (its existence is
    not revealed). Every router that takes a job id starts here."""
    job = get_job(s, job_id)
    if job is None or not caller.can_see(job):
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"job {job_id} not found")
    return job
