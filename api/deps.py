"""Request dependencies: settings, a database session, the artifact store, and the job id parameter."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Path, Request
from sqlalchemy.orm import Session

from store.artifacts import ArtifactStore
from store.db import session_scope
from store.settings import Settings


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    """One session per request, always closed (rolled back on error)."""
    with session_scope(request.app.state.sessions) as s:
        yield s


def get_artifacts(request: Request) -> ArtifactStore:
    return request.app.state.artifacts


# Ids are 32-bit integer columns: a larger one is a 422, never a database error.
JobId = Annotated[int, Path(ge=1, le=2**31 - 1, description="The job's id")]
