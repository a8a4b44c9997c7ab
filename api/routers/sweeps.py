"""A sweep's trials, live: parameters, status, metric, evaluations and the pruning reason of each."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, status
from sqlalchemy.orm import Session

from api.auth import UNAUTHORIZED, Caller, get_caller
from api.deps import JobId, get_session, job_or_404
from api.schemas import json_error
from icd_core.spec import SweepSpec, parse_spec
from icd_core.sweep import best_trial
from store.sweeps import trial_records

router = APIRouter(
    prefix="/jobs",
    tags=["sweeps"],
    dependencies=[Depends(get_caller)],
    responses=UNAUTHORIZED | {404: json_error("No such sweep")},
)


@router.get("/{job_id}/trials")
def sweep_trials(
    job_id: JobId, s: Session = Depends(get_session), caller: Caller = Depends(get_caller)
) -> dict[str, Any]:
    """Every trial of a sweep so far (number, job id, status, params, metric, steps, evaluations by step,
    why it was pruned) and the best finished one; read from the database while the sweep runs."""
    job = job_or_404(s, job_id, caller)
    if job.kind != "sweep":
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"job {job_id} is a {job.kind} job, not a sweep")
    sweep = parse_spec(job.spec)
    assert isinstance(sweep, SweepSpec)
    trials = trial_records(s, job_id, sweep.metric)
    best = best_trial(trials)
    return {
        "sweep_id": job_id,
        "status": job.status,
        "metric": sweep.metric,
        "budget": sweep.trials,
        "space": {k: v.model_dump(mode="json") for k, v in sweep.space.items()},
        "best": best.number if best else None,
        # each trial's lineage is its job's (GET /jobs/{id}); the report lists them
        "trials": [{k: v for k, v in asdict(t).items() if k not in ("system_attrs", "lineage")} for t in trials],
    }
