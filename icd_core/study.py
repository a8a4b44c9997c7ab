"""Running a `kind: study` locally (`icd study`): teacher, pre-flight, each child in turn, a leaderboard.

The planning (child specs, checks, pre-flight, result rows) is `icd_core.study_plan`, shared with the
service, which runs each child as a queued job instead.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
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
from .tuning import tuned_methods, tuning_seed, tuning_sweep

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
def _teacher_checkpoint(
    study: StudySpec, folder: Path, cache: Path, callbacks: Callable[[str], list[Callback]]
) -> Path:
    """The study's teacher checkpoint: the given one, or the one trained into `folder` first (resumable)."""
    from .runner import default_resolve_checkpoint, run_spec

    train = teacher_train_spec(study)
    if train is None:
        path = default_resolve_checkpoint(str(study.teacher.checkpoint))
        if not path.is_file():
            raise FileNotFoundError(f"teacher.checkpoint: checkpoint not found: {path}")
        return path.resolve()
    _check_same_spec(folder, train)
    summary = _read_json(folder / SUMMARY_FILE)
    if summary is None:
        log.info("training the teacher into %s", folder)
        run_spec(train, folder, callbacks(train.name), resume=True, cache_dir=cache)
        summary = _read_json(folder / SUMMARY_FILE)
    return Path(summary["final_checkpoint"]).resolve()


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
    from .runner import run_spec

    check_study(study)
    out, cache = Path(output_dir), Path(cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(study.model_dump(mode="json"), indent=2))

    def callbacks(name: str) -> list[Callback]:
        return list(callbacks_factory(name)) if callbacks_factory else []

    # 1. The teacher: a given checkpoint, or one trained here first.
    teacher_path = _teacher_checkpoint(study, out / "teacher", cache, callbacks)

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

    # 3. A tuned study first finds each method's best setting on the tuning split (never data.val).
    tuning = None
    if study.tune is not None:
        study, tuning = tune_methods(study, str(teacher_path), out / "tune", cache, callbacks_factory)

    # 4. The children, `none` of the first seed first so a useless teacher stops the study early.
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
                results.append(child_result(row_label(method, spec), seed, None, str(exc), study.settings.get(method)))
                continue
            summary = _read_json(folder / SUMMARY_FILE)
        row = child_result(row_label(method, spec), seed, summary, params=study.settings.get(method))
        results.append(row)
        # A partial report after every child, so a long study can be watched (and survives a stop).
        write_report(results, out, teacher=teacher_row, name=study.name, notes=notes, tuning=tuning)
        if method == BASELINE and not checked_baseline:
            checked_baseline = True
            preflight(
                teacher_eval.metrics,
                float(row["metrics"]["AP"]),
                study.teacher_min_ap,
                require_better=study.require_teacher_better,
                min_lead=study.teacher_lead_ap,
            )

    write_report(results, out, teacher=teacher_row, name=study.name, notes=notes, tuning=tuning)
    return build_leaderboard(results, teacher_row, name=study.name, notes=notes, tuning=tuning)


def tune_methods(
    study: StudySpec,
    teacher_checkpoint: str,
    output_dir: Path,
    cache_dir: Path,
    callbacks_factory: CallbacksFactory | None = None,
) -> tuple[StudySpec, dict[str, Any]]:
    """Run each tuned method's sweep into output_dir/<method>/ (resumable, like `icd sweep`); returns the
    study with every method's best setting in `settings`, and the tuning summary the report shows.

    A method whose sweep finished no trial keeps its paper setting, and the summary says so.
    """
    from .sweep import run_sweep_local  # torch-heavy

    assert study.tune is not None
    seed = tuning_seed(study)
    children = {m: spec for m, s, spec in child_specs(study, teacher_checkpoint) if s == study.seeds[0]}
    settings = dict(study.settings)
    summary: dict[str, Any] = {"seed": seed, "methods": {}}
    for method in tuned_methods(study):
        sweep = tuning_sweep(study, method, children[method].model_copy(update={"seed": seed}))
        summary.setdefault("split", split_summary(sweep, cache_dir))
        start = time.monotonic()
        report = run_sweep_local(sweep, output_dir / method, cache_dir, callbacks_factory)
        best = report["best"]
        if best is not None:
            settings[method] = dict(best["params"])
        summary["methods"][method] = {
            "best_params": dict(best["params"]) if best else None,
            "best_value": best["value"] if best else None,
            "paper_params": sweep.enqueue[0] if sweep.enqueue else None,
            "space": report["space"],
            "counts": report["counts"],
            "steps_total": report["steps_total"],
            "wall_s": round(time.monotonic() - start, 1),
            "metric": report["metric"],
            "folder": str(output_dir / method),
        }
    return study.model_copy(update={"settings": settings}), summary


def split_summary(sweep: Any, cache_dir: Path) -> dict[str, Any]:
    """What the tuning split holds and what the trials were evaluated on: the held-out images of data.train."""
    from .data import resolve_source

    data = sweep.base.data
    _, fit = resolve_source(data.train, cache_dir)
    _, held = resolve_source(data.val, cache_dir)
    return {
        "of": "data.train",
        "fraction": data.val.subset.fraction,
        "seed": data.val.subset.seed,
        "trained_on_images": _image_count(fit),
        "evaluated_on_images": _image_count(held),
    }


def _image_count(annotations: Path) -> int:
    return len(json.loads(annotations.read_text()).get("images", []))


__all__ = ["evaluate_checkpoint", "run_study_local"]
