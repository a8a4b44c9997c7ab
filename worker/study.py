"""Study jobs in the service: fan out one queued child job per (method, seed), then build the leaderboard.

A study never holds a worker while its children train. `start_study` (run by the study's own task)
checks the teacher, creates the children as ordinary jobs (so any number of workers run them in
parallel) and parks the study in 'waiting'. Each child's task calls `child_ended` when it ends: that
applies the teacher pre-flight checks as soon as their inputs exist (the teacher's AP, then the first
`none` student's AP), keeps the study's progress, and when every child has ended writes the report
(report.json / .md / .png in the study's artifact folder) and closes the study.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from sqlalchemy import exists, select
from sqlalchemy.orm import Session, aliased

from icd_core.leaderboard import BASELINE, write_report
from icd_core.spec import ICD_PRETRAINED, StudySpec, parse_spec
from icd_core.study import evaluate_checkpoint
from icd_core.study_plan import check_study, child_specs, preflight, result_from_job, teacher_train_spec
from store.artifacts import ArtifactStore
from store.dispatch import queue_for
from store.jobs import (
    JobStateError,
    create_job,
    fail_job,
    finish_study,
    get_job,
    park_study,
    request_cancel,
    update_progress,
)
from store.models import TERMINAL_STATUSES, Job
from store.settings import get_settings

log = logging.getLogger(__name__)
TEACHER_FILE = "teacher_eval.json"


def start_study(s: Session, job: Job, resolve_checkpoint: Any) -> list[Job]:
    """Create the children of a claimed study job and park the study; returns the children to enqueue."""
    study = parse_spec(job.spec)
    assert isinstance(study, StudySpec)
    check_study(study)
    settings = get_settings()
    artifacts = ArtifactStore(settings.artifact_root)
    existing = _children(s, job.id)
    if existing:  # a redelivered study task: its children already exist
        park_study(s, job.id, len(existing))
        return []

    teacher_job: Job | None = None
    if study.teacher.checkpoint:
        teacher_ref = study.teacher.checkpoint
        path = resolve_checkpoint(teacher_ref)
        result = evaluate_checkpoint(path, study.data, settings.cache_dir, model=study.teacher, device=study.device)
        _save_teacher(artifacts, job.id, result.metrics)
        preflight(result, None, study.teacher_min_ap)
    else:
        tspec = teacher_train_spec(study)
        assert tspec is not None
        teacher_job = create_job(
            s, tspec.model_dump(mode="json"), "train", tspec.name, queue_for(tspec), parent_id=job.id, owner=job.owner
        )
        teacher_ref = f"job:{teacher_job.id}"

    created = [teacher_job] if teacher_job else []
    first_pretrained: Job | None = None  # pre-trains the decoder; the other icd_pretrained children reuse it
    for method, _seed, child in child_specs(study, teacher_ref):
        waits = [teacher_job.id] if teacher_job else []
        if method == ICD_PRETRAINED and first_pretrained is not None:
            waits.append(first_pretrained.id)  # same artifact key: wait, then load it from the cache
        created.append(
            create_job(
                s,
                child.model_dump(mode="json"),
                "distill",
                child.name,
                queue_for(child),
                depends_on=waits,
                parent_id=job.id,
                status="waiting" if waits else "queued",
                owner=job.owner,
            )
        )
        if method == ICD_PRETRAINED and first_pretrained is None:
            first_pretrained = created[-1]
    park_study(s, job.id, len(created))
    return [c for c in created if c.status == "queued"]


def child_ended(s: Session, child_id: int) -> None:
    """Called after a child job reached a terminal state: pre-flight checks, progress, and the final report."""
    child = get_job(s, child_id)
    if child is None or child.parent_id is None:
        return
    parent = get_job(s, child.parent_id)
    if parent is None or parent.status in TERMINAL_STATUSES:
        return
    study = parse_spec(parent.spec)
    assert isinstance(study, StudySpec)
    artifacts = ArtifactStore(get_settings().artifact_root)
    children = _children(s, parent.id)

    problem = _preflight_problem(study, child, artifacts, parent.id)
    if problem:
        for other in _children(s, parent.id):
            if other.status not in TERMINAL_STATUSES:
                try:
                    request_cancel(s, other.id)
                except JobStateError:  # it ended meanwhile
                    pass
        fail_job(s, parent.id, problem)
        _log_to_study(artifacts, parent.id, f"study {parent.id} failed: {problem}")
        return

    done = sum(c.status in TERMINAL_STATUSES for c in children)
    update_progress(s, parent.id, done, len(children), None)
    _log_to_study(artifacts, parent.id, f"child job {child.id} ended {child.status} ({done}/{len(children)} done)")
    if done < len(children):
        return
    paths = write_study_report(s, parent.id, study, children, artifacts)
    report = json.loads(paths["json"].read_text())
    final = {f"AP_{row['method']}": row["AP"]["mean"] for row in report["methods"] if row["n"]}
    if final:
        finish_study(s, parent.id, final)
        scores = ", ".join(f"{k}={v:.2f}" for k, v in final.items() if v is not None)
        _log_to_study(artifacts, parent.id, f"study {parent.id} succeeded: {scores}")
    else:
        msg = f"every child job failed; see GET /jobs?parent_id={parent.id} for their errors"
        fail_job(s, parent.id, msg)
        _log_to_study(artifacts, parent.id, f"study {parent.id} failed: {msg}")


def close_ended_studies(s: Session) -> list[int]:
    """Close every waiting study whose children have all ended; returns their ids.

    A child normally closes its study through `child_ended` when its own task records the end. A child
    ended elsewhere (the API's reaper failing it at max_attempts, a cancel of a job whose worker died)
    has no task to do that, and its study would wait forever: the workers' periodic upkeep runs this.
    """
    child = aliased(Job)
    has_children = exists().where(child.parent_id == Job.id)
    active_child = exists().where(child.parent_id == Job.id, child.status.not_in(TERMINAL_STATUSES))
    stuck = list(
        s.scalars(select(Job.id).where(Job.kind == "study", Job.status == "waiting", has_children, ~active_child))
    )
    closed = []
    for study_id in stuck:
        last = s.scalars(
            select(Job.id).where(Job.parent_id == study_id).order_by(Job.finished_at.desc(), Job.id.desc()).limit(1)
        ).first()
        if last is not None:
            log.warning("study %s: every child has ended but the study was still waiting; closing it", study_id)
            child_ended(s, last)
            closed.append(study_id)
    return closed


def _log_to_study(artifacts: ArtifactStore, study_id: int, message: str) -> None:
    """Append to the study's own log: its children end in other tasks, after the study's task has returned,
    so the study's log would otherwise stop at the fan-out while its status moves on."""
    log.info("%s", message)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        with open(artifacts.log_path(study_id), "a", encoding="utf-8") as f:
            f.write(f"{stamp} INFO worker.study: {message}\n")
    except OSError as exc:
        log.warning("study %s: cannot append to its log: %s", study_id, exc)


def write_study_report(
    s: Session, study_id: int, study: StudySpec, children: list[Job], artifacts: ArtifactStore
) -> dict[str, Path]:
    """Leaderboard from the children's database rows, written next to the study's artifacts."""
    rows = [
        result_from_job(c.spec, c.status, c.final_metrics, c.sec_per_step, c.peak_memory_mb, c.error, c.id)
        for c in children
        if c.kind == "distill"
    ]
    teacher = _load_teacher(artifacts, study_id)
    return write_report(rows, artifacts.report_dir(study_id), teacher=teacher, name=study.name)


def _preflight_problem(study: StudySpec, child: Job, artifacts: ArtifactStore, study_id: int) -> str | None:
    """A reason to stop the study now, or None: the teacher failed or is too weak, or not above `none`."""
    if child.kind == "train":  # the study's own teacher
        if child.status != "succeeded":
            return f"teacher training job {child.id} {child.status}: {child.error or 'no error recorded'}"
        metrics = child.final_metrics or {}
        _save_teacher(artifacts, study_id, metrics)
        try:
            preflight(metrics, None, study.teacher_min_ap)
        except ValueError as exc:
            return str(exc)
        return None
    spec = child.spec or {}
    if (
        spec.get("distill", {}).get("method") == BASELINE
        and child.status == "succeeded"
        and study.require_teacher_better
        and int(spec.get("seed", -1)) == study.seeds[0]
    ):
        teacher = _load_teacher(artifacts, study_id)
        if teacher is not None:
            try:
                preflight(
                    teacher["metrics"],
                    (child.final_metrics or {}).get("AP"),
                    study.teacher_min_ap,
                    min_lead=study.teacher_lead_ap,
                )
            except ValueError as exc:
                return str(exc)
    return None


def _children(s: Session, study_id: int) -> list[Job]:
    return list(s.scalars(select(Job).where(Job.parent_id == study_id).order_by(Job.id)))


def _save_teacher(artifacts: ArtifactStore, study_id: int, metrics: dict[str, Any]) -> None:
    path = artifacts.job_dir(study_id) / TEACHER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"metrics": metrics}))


def _load_teacher(artifacts: ArtifactStore, study_id: int) -> dict[str, Any] | None:
    path = artifacts.job_dir(study_id) / TEACHER_FILE
    return json.loads(path.read_text()) if path.is_file() else None
