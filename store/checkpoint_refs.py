"""`checkpoint: job:<id>`: what such a reference means, decided once for the API's check and the worker.

The API calls `job_ref_state` at submit time (refuse, wait for, or accept the job); the worker calls
`resolve_job_ref` when the run starts and needs the file.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import Session

from icd_core.spec import parse_job_ref
from store.models import Job, JobStatus
from store.results import final_checkpoint_path


def job_ref_state(s: Session, artifact_root: str | Path, job_id: int) -> tuple[str | None, bool]:
    """(why the referenced job cannot give a checkpoint, or None; whether to wait for it to finish)."""
    dep = s.get(Job, job_id, populate_existing=True)
    if dep is None:
        return f"job {job_id} does not exist", False
    if dep.kind not in ("train", "distill"):
        return f"job {job_id} is a {dep.kind} job and produces no checkpoint", False
    if dep.status in (JobStatus.FAILED, JobStatus.CANCELED):
        return f"job {job_id} is {dep.status}; retry it (POST /jobs/{job_id}/retry) first", False
    if dep.status == JobStatus.SUCCEEDED:
        path = final_checkpoint_path(s, artifact_root, job_id)
        if path is None or not path.is_file():
            return f"job {job_id} succeeded but has no final checkpoint file", False
        return None, False
    return None, True


def resolve_job_ref(s: Session, artifact_root: str | Path, ref: str) -> Path:
    """`job:<id>` → that job's final checkpoint file; FileNotFoundError saying which job to use instead."""
    job_id = parse_job_ref(ref)
    if job_id is None:
        raise ValueError(f"{ref!r} is not a job:<id> reference")
    path = final_checkpoint_path(s, artifact_root, job_id)
    if path is None:
        job = s.get(Job, job_id)
        state = job.status if job is not None else "deleted"
        raise FileNotFoundError(f"{ref}: job {job_id} ({state}) has no final checkpoint; use a job that succeeded")
    return path
