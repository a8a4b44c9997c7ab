"""Tuned studies in the service: one sweep child per method first, then the seeds at each one's best.

A tuned study runs in two phases under the one study job (docs/sweeps.md#tuned-studies):

1. `start_tuning` (the study's task) creates one `kind: sweep` child per tuned method, each over the
   method's space on the tuning split carved from data.train (`icd_core.tuning`); they wait for the
   study's teacher when it is trained first. The sweeps' trials are the sweeps' children, not the study's.
2. When every child has ended, the study's closer (`worker.study.close_study`, under the study's close
   hold) finds no seed children yet and calls `start_seeds`: it reads each sweep's best parameters from
   its final metrics and creates the distill children at those settings, and the study waits again.
   A sweep that finished no trial leaves its method at the paper setting, and the study's log says so.

Creating the seeds is idempotent (children are matched by name) and done in one commit with the
study's re-opening, so a closer that dies half-way leaves either nothing or everything.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.orm import Session

from icd_core.spec import ICD_PRETRAINED, StudySpec, SweepSpec, parse_spec
from icd_core.study_plan import child_specs, study_method
from icd_core.tuning import tuned_methods, tuning_seed, tuning_sweep
from store.dispatch import group_size, queue_for
from store.jobs import create_job, reopen_study
from store.models import Job, JobStatus

log = logging.getLogger(__name__)


def start_tuning(s: Session, study_job: Job, study: StudySpec, teacher_ref: str, waits: list[int]) -> list[Job]:
    """Create (uncommitted) the sweep child of every tuned method; `waits`: the teacher job to wait for."""
    seed = tuning_seed(study)
    first = {m: spec for m, sd, spec in child_specs(study, teacher_ref) if sd == study.seeds[0]}
    created = []
    for method in tuned_methods(study):
        sweep = tuning_sweep(study, method, first[method].model_copy(update={"seed": seed}))
        created.append(
            create_job(
                s,
                sweep.model_dump(mode="json"),
                "sweep",
                sweep.name,
                queue_for(sweep),
                depends_on=waits,
                parent_id=study_job.id,
                status=JobStatus.WAITING if waits else JobStatus.QUEUED,
                owner=study_job.owner,
                priority=study_job.priority,
                gpus=group_size(sweep),
                commit=False,
            )
        )
    return created


def tuned_settings(study: StudySpec, children: list[Job]) -> dict[str, dict[str, Any]]:
    """The study's settings with each tuned method's best parameters (from its sweep's final metrics)."""
    settings = {k: dict(v) for k, v in study.settings.items()}
    for sweep_job in _sweeps(children):
        best = (sweep_job.final_metrics or {}).get("best_params")
        if sweep_job.status == JobStatus.SUCCEEDED and best:
            settings[_method_of(sweep_job)] = dict(best)
    return settings


def needs_seeds(study: StudySpec, children: list[Job]) -> bool:
    """A tuned study whose seed children do not all exist yet (phase 1 ended, or a closer died in phase 2)."""
    if study.tune is None:
        return False
    expected = len(child_specs(study, study.teacher.checkpoint or "job:0"))
    return sum(c.kind == "distill" for c in children) < expected


def start_seeds(s: Session, study_job: Job, study: StudySpec, children: list[Job]) -> list[str]:
    """Create the missing seed children at the tuned settings and re-open the study (one commit).

    Returns the lines for the study's log: each method's setting, and the methods left at the paper's."""
    settings = tuned_settings(study, children)
    teacher = next((c for c in children if c.kind == "train"), None)
    teacher_ref = f"job:{teacher.id}" if teacher is not None else str(study.teacher.checkpoint)
    existing = {c.name: c for c in children if c.kind == "distill"}
    first_pretrained = next((c for c in existing.values() if study_method(c.spec) == ICD_PRETRAINED), None)
    tuned = study.model_copy(update={"settings": settings})
    total = len(children)
    for method, _seed, child in child_specs(tuned, teacher_ref):
        if child.name in existing:
            continue
        waits = [first_pretrained.id] if method == ICD_PRETRAINED and first_pretrained is not None else []
        job = create_job(
            s,
            child.model_dump(mode="json"),
            "distill",
            child.name,
            queue_for(child),
            depends_on=waits,
            parent_id=study_job.id,
            status=JobStatus.WAITING if waits else JobStatus.QUEUED,
            owner=study_job.owner,
            priority=study_job.priority,
            gpus=group_size(child),
            commit=False,
        )
        total += 1
        if method == ICD_PRETRAINED and first_pretrained is None:
            first_pretrained = job
    reopen_study(s, study_job.id, done=len(children), total=total)
    lines = []
    for sweep_job in _sweeps(children):
        method = _method_of(sweep_job)
        if method in settings and sweep_job.status == JobStatus.SUCCEEDED:
            lines.append(f"{method}: tuned by sweep job {sweep_job.id}: {settings[method]}")
        else:
            lines.append(f"{method}: sweep job {sweep_job.id} {sweep_job.status}; the seeds run the paper setting")
    return lines


def tuning_summary(children: list[Job]) -> dict[str, Any] | None:
    """The tuning section of the report from the sweep children's rows (None: the study was not tuned)."""
    sweeps = _sweeps(children)
    if not sweeps:
        return None
    methods: dict[str, Any] = {}
    split: dict[str, Any] = {}
    for job in sweeps:
        spec = parse_spec(job.spec)
        assert isinstance(spec, SweepSpec)
        final = job.final_metrics or {}
        subset = spec.base.data.val.subset
        split = split or {"of": "data.train", "fraction": subset.fraction if subset else None, "seed": subset.seed}
        wall = (job.finished_at - job.started_at).total_seconds() if job.finished_at and job.started_at else None
        methods[_method_of(job)] = {
            "sweep_job_id": job.id,
            "status": job.status,
            "best_params": final.get("best_params"),
            "best_value": final.get(f"best_{spec.metric}"),
            "paper_params": spec.enqueue[0] if spec.enqueue else None,
            "counts": {k.removeprefix("trials_"): v for k, v in final.items() if k.startswith("trials_")},
            "steps_total": final.get("steps_total"),
            "wall_s": wall,
            "metric": spec.metric,
        }
    first = parse_spec(sweeps[0].spec)
    assert isinstance(first, SweepSpec)
    return {"seed": first.base.seed, "split": split, "methods": methods}


def _sweeps(children: list[Job]) -> list[Job]:
    return [c for c in children if c.kind == "sweep"]


def _method_of(sweep_job: Job) -> str:
    """The study method a tuning sweep tunes (its base is that method's child spec)."""
    return study_method(sweep_job.spec["base"])
