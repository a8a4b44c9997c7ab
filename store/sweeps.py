"""A sweep's trials in the database: create one (child job + trial row in one commit), read them back as
the records Optuna's study is rebuilt from, keep the pruner's bookkeeping, and take a sweep's turn.

Status changes stay in store/jobs.py; this module writes sweep_trials rows and the sweep's turn hold.
See docs/sweeps.md#storage-and-restarts.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from icd_core.sweep import TrialRecord
from store.jobs import claim_study_close, create_job
from store.models import Evaluation, Job, JobStatus, SweepTrial, utcnow

# A process that took a sweep's turn (to create trials or close it) and died frees it after this; the
# workers' periodic upkeep then takes the turn again.
SWEEP_TURN_HOLD_S = 60.0
# The evaluations table's column of each metric a sweep may optimise.
METRIC_COLUMNS = {"AP": "ap", "AP50": "ap50", "AP75": "ap75", "APs": "aps", "APm": "apm", "APl": "apl"}


def create_trial(
    s: Session,
    sweep: Job,
    number: int,
    params: dict[str, Any],
    spec: dict[str, Any],
    queue: str,
) -> Job:
    """The child job of trial `number` and its trial row, committed together (never one without the other)."""
    job = create_job(
        s,
        spec,
        str(spec["kind"]),
        str(spec["name"]),
        queue,
        parent_id=sweep.id,
        owner=sweep.owner,
        priority=sweep.priority,  # the sweep's current priority, as a study's children
        gpus=int((spec.get("resources") or {}).get("gpus", 1)),
        commit=False,
    )
    s.add(SweepTrial(job_id=job.id, sweep_id=sweep.id, number=number, params=params, system_attrs={}))
    s.commit()
    return job


def trial_rows(s: Session, sweep_id: int) -> list[tuple[SweepTrial, Job]]:
    """(trial, its job) of every trial of the sweep, by number (read fresh, not from the identity map)."""
    rows = s.execute(
        select(SweepTrial, Job)
        .join(Job, Job.id == SweepTrial.job_id)
        .where(SweepTrial.sweep_id == sweep_id)
        .order_by(SweepTrial.number)
        .execution_options(populate_existing=True)
    ).all()
    return [(t, j) for t, j in rows]


def trial_of(s: Session, job_id: int) -> SweepTrial | None:
    """The trial row of a child job, or None when the job is not a sweep's trial."""
    return s.execute(
        select(SweepTrial).where(SweepTrial.job_id == job_id).execution_options(populate_existing=True)
    ).scalar_one_or_none()


def intermediate_values(s: Session, job_ids: list[int], metric: str) -> dict[int, dict[int, float]]:
    """{job id: {step: metric}} from the trials' stored evaluations (Optuna's intermediate values)."""
    column = getattr(Evaluation, METRIC_COLUMNS[metric])
    out: dict[int, dict[int, float]] = {j: {} for j in job_ids}
    if not job_ids:
        return out
    for job_id, step, value in s.execute(
        select(Evaluation.job_id, Evaluation.step, column).where(Evaluation.job_id.in_(job_ids), column.is_not(None))
    ):
        out[job_id][int(step)] = float(value)
    return out


def trial_records(s: Session, sweep_id: int, metric: str) -> list[TrialRecord]:
    """The sweep's trials as Optuna's study is rebuilt from: params, status, metric, evaluations, rungs."""
    rows = trial_rows(s, sweep_id)
    values = intermediate_values(s, [job.id for _t, job in rows], metric)
    out = []
    for trial, job in rows:
        final = job.final_metrics or {}
        value = final.get(metric) if job.status in (JobStatus.SUCCEEDED, JobStatus.PRUNED) else None
        out.append(
            TrialRecord(
                number=trial.number,
                params=dict(trial.params),
                status=job.status,
                value=float(value) if isinstance(value, (int, float)) else None,
                intermediate=values[job.id],
                system_attrs=dict(trial.system_attrs or {}),
                reason=job.error,
                steps=job.progress_step or None,
                job_id=job.id,
                lineage=job.lineage,
            )
        )
    return out


def set_system_attrs(s: Session, job_id: int, attrs: dict[str, Any]) -> None:
    """Merge the pruner's bookkeeping into a trial's row (only its own evaluations write it)."""
    trial = trial_of(s, job_id)
    if trial is None or not attrs:
        return
    merged = {**(trial.system_attrs or {}), **attrs}
    s.execute(update(SweepTrial).where(SweepTrial.job_id == job_id).values(system_attrs=merged))
    s.commit()


def take_turn(s: Session, sweep_id: int) -> bool:
    """Make this caller the one process that changes a waiting sweep now (True), or say another one does.

    Trials ending at once on several workers would otherwise each create the next trials: the turn is the
    same guarded hold that lets one process close a study (store.jobs.claim_study_close)."""
    return claim_study_close(s, sweep_id, hold_s=SWEEP_TURN_HOLD_S)


def end_turn(s: Session, sweep_id: int) -> None:
    """Give the turn back (a sweep still waiting for its trials)."""
    s.execute(
        update(Job)
        .where(Job.id == sweep_id, Job.kind == "sweep", Job.status == JobStatus.WAITING)
        .values(lease_expires_at=None, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    s.commit()
