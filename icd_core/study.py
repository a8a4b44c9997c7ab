"""`kind: study`: check the teacher, run one distill child per (method, seed), then write a leaderboard.

The pieces are plain functions so the CLI (children one after another in this process) and the
service (each child a normal queued job, the leaderboard built from database rows) share them:

- `child_specs` expands a study into its distill jobs, in the order they should start;
- `teacher_train_spec` is the train job for a teacher the study must train first;
- `evaluate_checkpoint` + `preflight` refuse a teacher that cannot teach (the usual reason
  distillation "does nothing" is a wrongly loaded teacher);
- `child_result` turns a finished child into the row `icd_core.leaderboard` aggregates;
- `run_study_local` / `study_command` run the whole study from the command line.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from .engine.callbacks import Callback, EvalResult, TrainingDiverged
from .leaderboard import BASELINE, build_leaderboard, write_report
from .spec import (
    PRESET_ITERS_AT_16,
    CocoSource,
    DataSpec,
    DistillJobSpec,
    EvaluateSpec,
    ICDOptions,
    ModelSpec,
    StudySpec,
    TrainSpec,
    load_spec,
)

log = logging.getLogger(__name__)

# The paper fixes iteration counts for COCO 1x (90k iterations at batch 16): LR warm-up 1000 and the
# ICD bypass 1000 (ICD_SPEC §6-7). A study keeps their share of training (see `scaled_iterations`).
REFERENCE_ITERS = PRESET_ITERS_AT_16["1x"]
PAPER_WARMUP_ITERS = 1000
PAPER_BYPASS_ITERS = ICDOptions.model_fields["bypass_iters"].default
CallbacksFactory = Callable[[str], Sequence[Callback]]


# --- expanding a study ----------------------------------------------------------------------------------
def scaled_iterations(paper_iters: int, total: int) -> int:
    """The one scaling rule: an iteration count the paper sets for 1x keeps its share of training.

    n' = max(1, round(n · total / 90000)); 0 stays 0. At 1x and batch 16 nothing changes; a 1,500-step
    CPU study gets 17 warm-up and 17 bypass iterations (1.1 % of training, as in the paper). LR steps
    follow the same principle through the schedule's own default (2/3 and 8/9 of training).
    """
    if paper_iters <= 0:
        return 0
    return max(1, round(paper_iters * total / REFERENCE_ITERS))


def child_folder(method: str, seed: int) -> str:
    """Folder (CLI) or artifact sub-name of one child: '<method>-seed<seed>'."""
    return f"{method}-seed{seed}"


def child_specs(study: StudySpec, teacher_checkpoint: str) -> list[tuple[str, int, DistillJobSpec]]:
    """(method, seed, spec) of every child, in start order: per seed, `none` first, then the methods.

    Every child shares the study's data, schedule, device, student, teacher (with `teacher_checkpoint`
    filled in: a path or job:<id>) and distill options (inherit, weight, icd, options); only
    `distill.method` and `seed` differ. `none` is always included: it is the baseline of every Δ and
    of the pre-flight's "teacher better than student" check, so it runs first.

    With `study.scale_iterations` (the default) the paper's 1x iteration counts are scaled by
    `scaled_iterations`: `schedule.warmup_iters` when null, and `distill.icd.bypass_iters` when it is
    the paper's 1000 (any other value is taken as given). LR steps are written out explicitly (null:
    2/3 and 8/9 of training), so each child spec states the full schedule it ran.
    """
    total = study.schedule.total_iterations()
    schedule = study.schedule.model_copy(update={"steps": study.schedule.resolved_steps()})
    distill = study.distill
    if study.scale_iterations:
        if schedule.warmup_iters is None:
            schedule = schedule.model_copy(update={"warmup_iters": scaled_iterations(PAPER_WARMUP_ITERS, total)})
        if distill.icd.bypass_iters == PAPER_BYPASS_ITERS:
            icd = distill.icd.model_copy(update={"bypass_iters": scaled_iterations(PAPER_BYPASS_ITERS, total)})
            distill = distill.model_copy(update={"icd": icd})
    teacher = study.teacher.model_copy(update={"checkpoint": teacher_checkpoint})
    methods = [BASELINE] + [m for m in dict.fromkeys(study.methods) if m != BASELINE]

    children = []
    for seed in dict.fromkeys(study.seeds):
        for method in methods:
            data = {
                "name": f"{study.name}/{method}/seed{seed}"[-200:],
                "kind": "distill",
                "seed": seed,
                "data": study.data.model_dump(mode="json"),
                "schedule": schedule.model_dump(mode="json"),
                "device": study.device,
                "deploy": study.deploy.model_dump(mode="json"),
                "teacher": teacher.model_dump(mode="json"),
                "student": study.student.model_dump(mode="json"),
                "distill": {**distill.model_dump(mode="json"), "method": method},
            }
            children.append((method, seed, DistillJobSpec.model_validate(data)))
    return children


def check_study(study: StudySpec) -> None:
    """Raise the ValueError a child would raise (teacher/student mismatch, inherit, ICD heads) before any work.

    Run at submit time (the API) and before the teacher is trained (the CLI), so an incompatible pair is
    a message within a second, not a failed child after the teacher's training.
    """
    child_specs(study, study.teacher.checkpoint or "job:0")


def teacher_train_spec(study: StudySpec) -> TrainSpec | None:
    """The train job for the study's teacher, or None when the teacher already has a checkpoint."""
    if study.teacher.checkpoint or study.teacher_schedule is None:
        return None
    return TrainSpec.model_validate({
        "name": f"{study.name}/teacher"[-200:],
        "kind": "train",
        "seed": study.seed,
        "data": study.data.model_dump(mode="json"),
        "schedule": study.teacher_schedule.model_dump(mode="json"),
        "device": study.device,
        "deploy": study.deploy.model_dump(mode="json"),
        "model": study.teacher.model_dump(mode="json"),
    })


# --- the teacher pre-flight -----------------------------------------------------------------------------
def preflight(
    teacher_eval: EvalResult | Mapping[str, Any],
    baseline_ap: float | None,
    min_ap: float,
    require_better: bool = True,
) -> None:
    """Refuse (ValueError with the teacher's AP) a teacher below `min_ap`, or not above the `none` student.

    teacher_eval: an EvalResult or a plain metrics dict (as stored by the service). baseline_ap: the
    AP of the first finished `none` child, or None before it has run.
    """
    metrics = teacher_eval.metrics if isinstance(teacher_eval, EvalResult) else teacher_eval
    ap = float(metrics["AP"])
    if ap < min_ap:
        raise ValueError(
            f"teacher AP {ap:.1f} is below teacher_min_ap {min_ap:.1f}: check teacher.checkpoint (the file, and "
            "that the teacher fields describe it) or train the teacher longer (teacher_schedule); "
            "lower teacher_min_ap only if this AP is expected"
        )
    if require_better and baseline_ap is not None and ap <= baseline_ap:
        raise ValueError(
            f"teacher AP {ap:.1f} is not above the student baseline {baseline_ap:.1f}: check teacher.checkpoint "
            "(a wrong or undertrained teacher cannot teach), train the teacher longer, or set "
            "require_teacher_better: false to run the study anyway"
        )


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


# --- results --------------------------------------------------------------------------------------------
def child_result(method: str, seed: int, summary: Mapping[str, Any] | None, error: str | None = None) -> dict:
    """The leaderboard row of one child from its runner summary.json (None: the child did not finish)."""
    if summary is None:
        return {"method": method, "seed": seed, "metrics": None, "status": "failed", "error": error}
    evaluation = summary.get("evaluation") or {}
    metrics = evaluation.get("metrics") or summary.get("final_metrics") or {}
    return {
        "method": method,
        "seed": seed,
        "metrics": dict(metrics),
        "sec_per_step": summary.get("sec_per_step"),
        "peak_memory_mb": summary.get("peak_memory_mb"),
        "status": "succeeded",
        # model cost (cost_*, teacher_cost_*) lives in final_metrics, next to but not in the evaluation
        **{k: v for k, v in (summary.get("final_metrics") or {}).items() if "cost_" in k},
    }


def result_from_job(
    spec: Mapping[str, Any],
    status: str,
    final_metrics: Mapping[str, Any] | None,
    sec_per_step: float | None = None,
    peak_memory_mb: float | None = None,
    error: str | None = None,
    job_id: int | None = None,
) -> dict[str, Any]:
    """The leaderboard row of a child job stored by the service (method and seed read from its spec)."""
    ok = status == "succeeded" and final_metrics is not None
    return {
        "method": spec["distill"]["method"],
        "seed": int(spec["seed"]),
        "metrics": dict(final_metrics) if ok else None,
        "sec_per_step": sec_per_step,
        "peak_memory_mb": peak_memory_mb,
        "status": status,
        "error": error,
        "job_id": job_id,
    }


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _check_same_spec(folder: Path, spec: Any) -> None:
    """A resumed folder must hold the same job; otherwise stale results would enter the leaderboard."""
    saved = _read_json(folder / "spec.json")
    if saved is not None and saved != spec.model_dump(mode="json"):
        raise ValueError(f"{folder} holds a run of a different spec; choose another --output folder "
                         "(or delete that folder to rerun it)")


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
        summary = _read_json(tdir / "summary.json")
        if summary is None:
            log.info("training the teacher into %s", tdir)
            run_spec(train, tdir, callbacks(train.name), resume=True, cache_dir=cache)
            summary = _read_json(tdir / "summary.json")
        teacher_path = Path(summary["final_checkpoint"])
    teacher_path = teacher_path.resolve()

    # 2. Pre-flight on the checkpoint the children will load.
    teacher_eval = evaluate_checkpoint(teacher_path, study.data, cache, model=study.teacher,
                                       output_dir=out / "teacher-eval", device=study.device,
                                       batch_size=study.schedule.batch_size)
    teacher_row = {"name": f"{study.teacher.detector} {study.teacher.backbone}", "checkpoint": str(teacher_path),
                   "metrics": teacher_eval.metrics}
    preflight(teacher_eval, None, study.teacher_min_ap)

    notes = []
    eval_device = (_read_json(out / "teacher-eval" / "summary.json") or {}).get("device")
    if eval_device == "cpu":
        notes.append("on the CPU, peak memory is the process's resident-set high-water mark and the children run "
                     "one after another in one process, so it only grows: compare memory on a GPU run")

    # 3. The children, `none` of the first seed first so a useless teacher stops the study early.
    results: list[dict[str, Any]] = []
    checked_baseline = False
    for method, seed, spec in child_specs(study, str(teacher_path)):
        folder = out / child_folder(method, seed)
        _check_same_spec(folder, spec)
        summary = _read_json(folder / "summary.json")
        if summary is None:
            log.info("running %s into %s", spec.name, folder)
            try:
                run_spec(spec, folder, callbacks(spec.name), resume=True, cache_dir=cache)
            except TrainingDiverged as exc:
                log.warning("%s failed: %s", spec.name, exc)
                results.append(child_result(method, seed, None, error=str(exc)))
                continue
            summary = _read_json(folder / "summary.json")
        row = child_result(method, seed, summary)
        results.append(row)
        # A partial report after every child, so a long study can be watched (and survives a stop).
        write_report(results, out, teacher=teacher_row, name=study.name, notes=notes)
        if method == BASELINE and not checked_baseline:
            checked_baseline = True
            preflight(teacher_eval, float(row["metrics"]["AP"]), study.teacher_min_ap,
                      require_better=study.require_teacher_better)

    write_report(results, out, teacher=teacher_row, name=study.name, notes=notes)
    return build_leaderboard(results, teacher_row, name=study.name, notes=notes)


# --- the command line -----------------------------------------------------------------------------------
def resolve_data_roots(study: StudySpec, roots: Sequence[str | Path]) -> StudySpec:
    """Relative COCO paths in data.* are looked up in each root in turn (the first that exists wins).

    Roots come from ICD_DATA_ROOTS (colon-separated), as in the service; with no roots, or when no root
    holds the path, the path stays relative to the current directory.
    """
    if not roots:
        return study

    def find(p: str) -> str:
        if Path(p).is_absolute():
            return p
        for root in roots:
            candidate = Path(root) / p
            if candidate.exists():
                return str(candidate)
        return p

    data = study.data.model_dump(mode="json")
    for split in ("train", "val"):
        src = getattr(study.data, split)
        if isinstance(src, CocoSource):
            data[split] = {**data[split], "images": find(src.images), "annotations": find(src.annotations)}
    return study.model_copy(update={"data": DataSpec.model_validate(data)})


class _ProgressBar(Callback):
    """A tqdm bar per run, with the latest loss and AP."""

    def __init__(self, name: str):
        self.name = name
        self.bar: Any = None

    def on_start(self, step: int, total_steps: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=step, desc=self.name, unit="step", dynamic_ncols=True)
        self._last = step

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.update(step - self._last)
            self._last = step
            self.bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.3f}")

    def on_evaluation(self, result: EvalResult) -> None:
        if self.bar is not None:
            self.bar.write(f"{self.name} step {result.step}: AP {result.metrics.get('AP', 0.0):.1f}")

    def on_end(self, step: int, final_metrics: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.update(step - self._last)
            self.bar.close()


@click.command("study")
@click.argument("spec_path", metavar="SPEC", type=click.Path(exists=True, dir_okay=False))
@click.option("--output", "output", type=click.Path(file_okay=False), default=None,
              help="Result folder (default: runs/<study name>). Rerunning into it resumes.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Generated datasets and class priors (default: $ICD_CACHE_DIR or .icd/cache).")
def study_command(spec_path: str, output: str | None, cache_dir: str | None) -> None:
    """Run a `kind: study` spec locally: teacher check, every (method, seed) child in turn, a leaderboard."""
    spec = load_spec(spec_path)
    if not isinstance(spec, StudySpec):
        raise click.UsageError(f"{spec_path} is a '{spec.kind}' spec; `icd study` runs kind: study")
    roots = [r for r in os.environ.get("ICD_DATA_ROOTS", "").split(":") if r]
    spec = resolve_data_roots(spec, roots)
    out = Path(output) if output else Path("runs") / spec.name.replace("/", "_")
    cache = Path(cache_dir or os.environ.get("ICD_CACHE_DIR") or Path(".icd") / "cache")
    try:
        report = run_study_local(spec, out, cache, callbacks_factory=lambda name: [_ProgressBar(name)])
    except (ValueError, FileNotFoundError, TrainingDiverged) as exc:
        raise click.ClickException(f"{exc} (rerun the same command to resume)") from exc
    from .leaderboard import leaderboard_markdown

    click.echo(leaderboard_markdown(report))
    click.echo(f"report: {out / 'report.md'}, {out / 'report.json'}, {out / 'report.png'}")


__all__ = [
    "check_study",
    "child_folder",
    "child_result",
    "child_specs",
    "evaluate_checkpoint",
    "preflight",
    "resolve_data_roots",
    "result_from_job",
    "run_study_local",
    "scaled_iterations",
    "study_command",
    "teacher_train_spec",
]


if __name__ == "__main__":  # `python -m icd_core.study SPEC`
    study_command()
