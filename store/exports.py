"""The export jobs of a train/distill job: kind `export` jobs whose spec names it as `job:<id>`."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from icd_core.spec import JOB_REF_PREFIX
from store.models import Job


def export_jobs(s: Session, source_id: int) -> list[Job]:
    """Newest first. The kind index narrows the scan to export jobs; the JSON key is read on both backends."""
    query = (
        select(Job)
        .where(Job.kind == "export", Job.spec["checkpoint"].as_string() == f"{JOB_REF_PREFIX}{source_id}")
        .order_by(Job.id.desc())
    )
    return list(s.scalars(query))
