"""Publishing a just-created job: all or nothing, so a client that retries after a 503 makes no duplicate."""

from __future__ import annotations

from fastapi import HTTPException, status
from sqlalchemy.orm import Session

from store import jobs as q
from store.dispatch import BrokerUnavailable, enqueue
from store.models import Job
from store.settings import Settings


def dispatch_new(s: Session, settings: Settings, job: Job) -> None:
    """Publish a just-created job, or delete it and answer 503."""
    try:
        enqueue(job.id, job.queue, settings.broker_url)
    except BrokerUnavailable as exc:
        q.discard_unsent(s, job.id)
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail=f"{exc}; nothing was recorded: submit again when the broker is back",
            headers={"Retry-After": "5"},
        ) from exc
