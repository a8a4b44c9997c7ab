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

from icd_core.atomic_files import write_text_atomic
from icd_core.leaderboard import BASELINE, write_report
from icd_core.spec import ICD_PRETRAINED, StudySpec, parse_spec
from icd_core.study_plan import check_study, child_specs, preflight, result_from_job, teacher_train_spec
from icd_core.teacher_eval import evaluate_teacher
from store.artifacts import ArtifactStore
from store.dispatch import group_size, queue_for
from store.jobs import (
    JobStateError,
    claim_study_close,
    create_job,
    fail_job,
    finish_study,
    get_job,
    park_study,
    request_cancel,
    update_progress,
)
from store.models import TERMINAL_STATUSES, Job, JobStatus
from store.settings import get_settings
from worker.study_tuning import needs_seeds, start_seeds, start_tuning, tuned_settings, tuning_summary

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
        result = evaluate_teacher(  # cached: each child's own teacher check reads this evaluation
            path,
            study.data,
            settings.cache_dir,
            model=study.teacher,
            device=study.device,
            batch_size=study.schedule.batch_size,
        )
        _save_teacher(artifacts, job.id, result.metrics)
        preflight(result.metrics, None, study.teacher_min_ap)
    else:
        tspec = teacher_train_spec(study)
        assert tspec is not None
        teacher_job = create_job(
            s,
            tspec.model_dump(mode="json"),
            "train",
            tspec.name,
            queue_for(tspec),
            parent_id=job.id,
            owner=job.owner,
            priority=job.priority,  # the study's current priority (POST /jobs/{id}/priority may have changed it)
            gpus=group_size(tspec),
            commit=False,  # committed with the first child (or the sweeps): never a study with a teacher only
        )
        teacher_ref = f"job:{teacher_job.id}"

    created = [teacher_job] if teacher_job else []
    if study.tune is not None:  # phase 1: each method's sweep; the seeds follow when they end (close_study)
        created += start_tuning(s, job, study, teacher_ref, [teacher_job.id] if teacher_job else [])
        s.commit()
        park_study(s, job.id, len(created))
        return [c for c in created if c.status == JobStatus.QUEUED]
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
                status=JobStatus.WAITING if waits else JobStatus.QUEUED,
                owner=job.owner,
                priority=job.priority,
                gpus=group_size(child),
            )
        )
        if method == ICD_PRETRAINED and first_pretrained is None:
            first_pretrained = created[-1]
    park_study(s, job.id, len(created))
    return [c for c in created if c.status == JobStatus.QUEUED]


def child_ended(s: Session, child_id: int) -> bool:
    """Called once after a child job reached a terminal state: pre-flight checks, progress, and the final
    report. True when this call ended the study."""
    child = get_job(s, child_id)
    if child is None or child.parent_id is None:
        return False
    parent = get_job(s, child.parent_id)
    if parent is None or parent.status in TERMINAL_STATUSES:
        return False
    study = parse_spec(parent.spec)
    assert isinstance(study, StudySpec)
    artifacts = ArtifactStore(get_settings().artifact_root)

    problem = _preflight_problem(study, child, artifacts, parent.id)
    if problem:
        return _fail_study(s, parent.id, problem, artifacts)

    children = _children(s, parent.id)
    done = sum(c.status in TERMINAL_STATUSES for c in children)
    update_progress(s, parent.id, done, len(children), None)
    _log_to_study(artifacts, parent.id, f"child job {child.id} ended {child.status} ({done}/{len(children)} done)")
    return done == len(children) and close_study(s, parent.id, study, artifacts)


def close_study(s: Session, study_id: int, study: StudySpec, artifacts: ArtifactStore) -> bool:
    """Write the report of a study whose children have all ended and end it; True when this call did.

    Several processes may get here for one study at once (the last child's task, other workers' sweeps):
    `claim_study_close` lets exactly one of them write the report and the study's closing log line.
    """
    if not claim_study_close(s, study_id):
        return False  # another process is closing it, or it ended meanwhile
    children = _children(s, study_id)
    if needs_seeds(study, children):  # a tuned study's sweeps ended: its seeds run now, at the tuned settings
        parent = get_job(s, study_id)
        assert parent is not None
        lines = start_seeds(s, parent, study, children)
        s.commit()
        for line in lines:
            _log_to_study(artifacts, study_id, line)
        return False
    update_progress(s, study_id, len(children), len(children), None)
    paths = write_study_report(s, study_id, study, children, artifacts)
    report = json.loads(paths["json"].read_text())
    final = {f"AP_{row['method']}": row["AP"]["mean"] for row in report["methods"] if row["n"]}
    if not final:
        msg = f"every child job failed; see GET /jobs?parent_id={study_id} for their errors"
        return _fail_study(s, study_id, msg, artifacts)
    if finish_study(s, study_id, final) is None:
        return False  # canceled or failed meanwhile: that outcome stands
    scores = ", ".join(f"{k}={v:.2f}" for k, v in final.items() if v is not None)
    _log_to_study(artifacts, study_id, f"study {study_id} succeeded: {scores}")
    return True


def _fail_study(s: Session, study_id: int, problem: str, artifacts: ArtifactStore) -> bool:
    """Cancel the study's unfinished children and fail it; only the caller whose transition won logs it."""
    for other in _children(s, study_id):
        if other.status not in TERMINAL_STATUSES:
            try:
                request_cancel(s, other.id)
            except JobStateError:  # it ended meanwhile
                pass
    if fail_job(s, study_id, problem) is None:
        return False
    _log_to_study(artifacts, study_id, f"study {study_id} failed: {problem}")
    return True


def close_ended_studies(s: Session) -> list[int]:
    """Close every waiting study whose children have all ended; returns the ids this call closed.

    A child normally closes its study through `child_ended` when its own task records the end. A child
    ended elsewhere (the API's reaper failing it at max_attempts, a cancel of a job whose worker died)
    has no task to do that, and its study would wait forever: the workers' periodic upkeep runs this.
    """
    child = aliased(Job)
    has_children = exists().where(child.parent_id == Job.id)
    active_child = exists().where(child.parent_id == Job.id, child.status.not_in(TERMINAL_STATUSES))
    stuck = list(
        s.scalars(
            select(Job.id).where(Job.kind == "study", Job.status == JobStatus.WAITING, has_children, ~active_child)
        )
    )
    return [study_id for study_id in stuck if _close_stuck(s, study_id)]


def _close_stuck(s: Session, study_id: int) -> bool:
    """The sweep's close of one study: the last child's pre-flight check, then the report (no child line:
    that child's end was logged when it ended, or no task saw it end)."""
    last = s.scalars(
        select(Job).where(Job.parent_id == study_id).order_by(Job.finished_at.desc(), Job.id.desc()).limit(1)
    ).first()
    parent = get_job(s, study_id)
    if last is None or parent is None or parent.status != JobStatus.WAITING:
        return False
    study = parse_spec(parent.spec)
    assert isinstance(study, StudySpec)
    artifacts = ArtifactStore(get_settings().artifact_root)
    problem = _preflight_problem(study, last, artifacts, study_id)
    closed = _fail_study(s, study_id, problem, artifacts) if problem else close_study(s, study_id, study, artifacts)
    if closed:
        log.warning("study %s: every child had ended but the study was still waiting; closed it", study_id)
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
    settings = tuned_settings(study, children)
    rows = [
        result_from_job(
            c.spec, c.status, c.final_metrics, c.sec_per_step, c.peak_memory_mb, c.error, c.id, settings, c.lineage
        )
        for c in children
        if c.kind == "distill"
    ]
    teacher = _load_teacher(artifacts, study_id)
    tuning = tuning_summary(children)
    return write_report(rows, artifacts.report_dir(study_id), teacher=teacher, name=study.name, tuning=tuning)


def _preflight_problem(study: StudySpec, child: Job, artifacts: ArtifactStore, study_id: int) -> str | None:
    """A reason to stop the study now, or None: the teacher failed or is too weak, or not above `none`."""
    if child.kind == "train":  # the study's own teacher
        if child.status != JobStatus.SUCCEEDED:
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
        and child.status == JobStatus.SUCCEEDED
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
    write_text_atomic(artifacts.job_dir(study_id) / TEACHER_FILE, json.dumps({"metrics": metrics}))


def _load_teacher(artifacts: ArtifactStore, study_id: int) -> dict[str, Any] | None:
    path = artifacts.job_dir(study_id) / TEACHER_FILE
    return json.loads(path.read_text()) if path.is_file() else None
