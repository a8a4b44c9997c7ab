"""Request dependencies: settings, a database session, the artifact store, and the bearer-token check."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

from fastapi import HTTPException, Request, status
from sqlalchemy.orm import Session

from store.artifacts import ArtifactStore
from store.db import session_scope
from store.jobs import get_job
from store.models import Job
from store.settings import Settings


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    """One session per request, always closed (rolled back on error)."""
    with session_scope(request.app.state.sessions) as s:
        yield s


def get_artifacts(request: Request) -> ArtifactStore:
    return request.app.state.artifacts


def job_or_404(s: Session, job_id: int) -> Job:
    """The job, or the API's 404 naming it (every router that takes a job id starts here)."""
    job = get_job(s, job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"job {job_id} not found")
    return job


def require_token(request: Request) -> None:
    """Mutating endpoints need `Authorization: Bearer <ICD_API_TOKEN>` when a token is configured."""
    token = request.app.state.settings.api_token
    if not token:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), token.encode()):
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="missing or wrong bearer token: send 'Authorization: Bearer <ICD_API_TOKEN>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
