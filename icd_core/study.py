"""Running a `kind: study` locally (`icd study`): teacher, pre-flight, each child in turn, a leaderboard.

The planning (child specs, checks, pre-flight, result rows) is `icd_core.study_plan`, shared with the
service, which runs each child as a queued job instead.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .engine.callbacks import Callback, EvalResult, TrainingDiverged
from .leaderboard import BASELINE, build_leaderboard, write_report
from .run_layout import SPEC_FILE, SUMMARY_FILE
from .spec import DataSpec, EvaluateSpec, ModelSpec, StudySpec
from .study_plan import (
    check_study,
    child_folder,
    child_result,
    child_specs,
    preflight,
    row_label,
    teacher_train_spec,
)
from .teacher_eval import evaluate_teacher

log = logging.getLogger(__name__)
CallbacksFactory = Callable[[str], Sequence[Callback]]


def evaluate_checkpoint(
    path: str | Path,
    data: DataSpec,
    cache_dir: str | Path,
    model: ModelSpec | None = None,
    output_dir: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 4,
) -> EvalResult:
    """COCO-evaluate a checkpoint file on data.val through the runner's own evaluate job.

    `model` only names the job's model fields (the runner rebuilds the detector from the checkpoint);
    output_dir keeps the evaluate job's summary.json (a temporary folder when None).
    """
    from .runner import run_spec  # torch-heavy; imported when a study actually runs

    model = model or ModelSpec()
    spec_data = {
        "name": "teacher-preflight",
        "kind": "evaluate",
        "data": data.model_dump(mode="json"),
        "model": {**model.model_dump(mode="json"), "checkpoint": str(path)},
        "schedule": {"batch_size": batch_size},
        "device": device,
    }
    spec = EvaluateSpec.model_validate(spec_data)
    if output_dir is not None:
        result = run_spec(spec, Path(output_dir), cache_dir=Path(cache_dir))
    else:
        with tempfile.TemporaryDirectory(prefix="icd-eval-") as tmp:
            result = run_spec(spec, Path(tmp), cache_dir=Path(cache_dir))
    if result.evaluation is None:
        raise RuntimeError(f"evaluating {path} returned no evaluation")
    return result.evaluation


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _check_same_spec(folder: Path, spec: Any) -> None:
    """A resumed folder must hold the same job; otherwise stale results would enter the leaderboard."""
    saved = _read_json(folder / SPEC_FILE)
    if saved is not None and saved != spec.model_dump(mode="json"):
        raise ValueError(
            f"{folder} holds a run of a different spec; choose another --output folder "
            "(or delete that folder to rerun it)"
        )


# --- running a study locally ----------------------------------------------------------------------------
def run_study_local(
    study: StudySpec,
    output_dir: str | Path,
    cache_dir: str | Path,
    callbacks_factory: CallbacksFactory | None = None,
) -> dict[str, Any]:
    """Teacher (train if needed), pre-flight, each child in turn, then report.{json,md,png} in output_dir.

    Resumable: a child (or the teacher) whose summary.json exists is not run again, and an interrupted
    one resumes from its last checkpoint. A diverged child is reported as failed and the study goes
    on; a user-fixable error (bad path, wrong teacher) stops it. callbacks_factory(name) gives the
    callbacks of each run (e.g. a progress bar). Returns the report dict.
    """
    from .runner import default_resolve_checkpoint, run_spec

    check_study(study)
    out, cache = Path(output_dir), Path(cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(study.model_dump(mode="json"), indent=2))

    def callbacks(name: str) -> list[Callback]:
        return list(callbacks_factory(name)) if callbacks_factory else []

    # 1. The teacher: a given checkpoint, or one trained here first.
    train = teacher_train_spec(study)
    if train is None:
        teacher_path = default_resolve_checkpoint(str(study.teacher.checkpoint))
        if not teacher_path.is_file():
            raise FileNotFoundError(f"teacher.checkpoint: checkpoint not found: {teacher_path}")
    else:
        tdir = out / "teacher"
        _check_same_spec(tdir, train)
        summary = _read_json(tdir / SUMMARY_FILE)
        if summary is None:
            log.info("training the teacher into %s", tdir)
            run_spec(train, tdir, callbacks(train.name), resume=True, cache_dir=cache)
            summary = _read_json(tdir / SUMMARY_FILE)
        teacher_path = Path(summary["final_checkpoint"])
    teacher_path = teacher_path.resolve()

    # 2. Pre-flight on the checkpoint the children will load (cached: each child's teacher check reads it).
    teacher_eval = evaluate_teacher(
        teacher_path, study.data, cache, model=study.teacher, device=study.device, batch_size=study.schedule.batch_size
    )
    teacher_row = {
        "name": f"{study.teacher.detector} {study.teacher.backbone}",
        "checkpoint": str(teacher_path),
        "metrics": teacher_eval.metrics,
    }
    preflight(teacher_eval.metrics, None, study.teacher_min_ap)

    notes = []
    if teacher_eval.device == "cpu":
        notes.append(
            "on the CPU, peak memory is the process's resident-set high-water mark and the children run "
            "one after another in one process, so it only grows: compare memory on a GPU run"
        )

    # 3. The children, `none` of the first seed first so a useless teacher stops the study early.
    results: list[dict[str, Any]] = []
    checked_baseline = False
    for method, seed, spec in child_specs(study, str(teacher_path)):
        folder = out / child_folder(method, seed)
        _check_same_spec(folder, spec)
        summary = _read_json(folder / SUMMARY_FILE)
        if summary is None:
            log.info("running %s into %s", spec.name, folder)
            try:
                run_spec(spec, folder, callbacks(spec.name), resume=True, cache_dir=cache)
            except TrainingDiverged as exc:
                log.warning("%s failed: %s", spec.name, exc)
                results.append(child_result(row_label(method, spec), seed, None, error=str(exc)))
                continue
            summary = _read_json(folder / SUMMARY_FILE)
        row = child_result(row_label(method, spec), seed, summary)
        results.append(row)
        # A partial report after every child, so a long study can be watched (and survives a stop).
        write_report(results, out, teacher=teacher_row, name=study.name, notes=notes)
        if method == BASELINE and not checked_baseline:
            checked_baseline = True
            preflight(
                teacher_eval.metrics,
                float(row["metrics"]["AP"]),
                study.teacher_min_ap,
                require_better=study.require_teacher_better,
                min_lead=study.teacher_lead_ap,
            )

    write_report(results, out, teacher=teacher_row, name=study.name, notes=notes)
    return build_leaderboard(results, teacher_row, name=study.name, notes=notes)


__all__ = ["evaluate_checkpoint", "run_study_local"]
