"""Run one job spec end to end: resolve data and checkpoints, build models, train or evaluate, summarize.

This is the single entry point the CLI and the service's worker share. Problems a user can fix
(missing files, a teacher with another class count, a `job:<id>` reference outside the service)
raise ValueError or FileNotFoundError with a message that says what to change.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .data import CocoDataset, build_dataset, compute_priors, make_train_loader
from .detectors import Detector, build_detector, detector_meta, load_detector, load_weights, read_checkpoint
from .distill import build_distiller
from .distill.icd import ICDDistiller
from .distill.inherit import inherit_from_teacher, require_inherited
from .engine import checkpoint as ckpt
from .engine.callbacks import Callback, EvalResult, TrainingStopped
from .engine.metrics_log import MetricsLog
from .engine.trainer import Trainer, peak_memory_mb, resolve_device
from .evaluate import evaluate_model
from .leaderboard import TEACHER_AP_METRICS
from .lineage import collect_lineage
from .pretrain import heldout_diagnostics, prepare_decoder
from .run_layout import CHECKPOINT_DIR, SPEC_FILE, SUMMARY_FILE
from .run_report import deploy_report
from .spec import (
    DistillJobSpec,
    EvaluateSpec,
    ModelSpec,
    StudySpec,
    SweepSpec,
    TrainSpec,
    architecture_mismatch,
)
from .teacher_eval import TeacherEval, check_teacher_min_ap, evaluate_teacher
from .trunk_weights import load_trunk_weights

if TYPE_CHECKING:
    from .engine.distributed import RankGroup

log = logging.getLogger(__name__)
# Run counts a summary's final metrics carry next to the evaluation (teacher_AP, ... join them).
_COUNTS = ("inherit_copied", "inherit_skipped", "icd_pretrain_steps", "icd_pretrain_seconds")

AnySpec = TrainSpec | DistillJobSpec | EvaluateSpec | StudySpec
ResolveCheckpoint = Callable[[str], Path]
DEFAULT_CACHE_DIR = Path(".icd") / "cache"


@dataclass
class RunResult:
    final_metrics: dict[str, float]
    evaluation: EvalResult | None
    final_checkpoint: Path | None
    sec_per_step: float | None
    peak_memory_mb: float | None


def default_resolve_checkpoint(ref: str) -> Path:
    """Outside the service a checkpoint reference is a file path."""
    if ref.startswith("job:"):
        raise ValueError(f"{ref}: job:<id> references need the service; give a file path")
    return Path(ref)


def run_spec(
    spec: AnySpec,
    output_dir: Path,
    callbacks: Sequence[Callback] = (),
    resume: bool = False,
    resolve_checkpoint: ResolveCheckpoint | None = None,
    cache_dir: Path | None = None,
    group: RankGroup | None = None,
) -> RunResult:
    """Run a train, distill or evaluate spec into `output_dir` (checkpoints/, summary.json, metrics.jsonl).

    group: this process's rank in a torchrun group (resources.gpus > 1); rank 0 alone writes files.
    """
    output_dir = Path(output_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    resolve = resolve_checkpoint or default_resolve_checkpoint
    if isinstance(spec, StudySpec):
        raise NotImplementedError("study specs run through the service's study runner, not run_spec")
    if isinstance(spec, SweepSpec):
        raise NotImplementedError("sweep specs run through icd_core.sweep (icd sweep) or the service, not run_spec")
    output_dir.mkdir(parents=True, exist_ok=True)
    if group is None or group.is_main:
        (output_dir / SPEC_FILE).write_text(json.dumps(spec.model_dump(mode="json"), indent=2))
    if isinstance(spec, EvaluateSpec):
        return _run_evaluate(spec, output_dir, callbacks, resolve, cache_dir)
    return _run_training(spec, output_dir, callbacks, resume, resolve, cache_dir, group)


# --- helpers -------------------------------------------------------------------------------------------
def stop_check(callbacks: Sequence[Callback], step: int) -> Callable[[], None]:
    """A check for the phases outside the training loop: raises TrainingStopped when a callback asks to
    stop (a cancel, a worker shutdown, a lost lease), as the trainer does between steps."""

    def check() -> None:
        if any(cb.should_stop() for cb in callbacks):
            raise TrainingStopped(step)

    return check


def confirm_ownership(callbacks: Sequence[Callback], step: int) -> None:
    """Right before the final files are written: every callback must confirm the run still owns them."""
    if not all(cb.confirm_ownership() for cb in callbacks):
        raise TrainingStopped(step)


def _checkpoint_file(field: str, ref: str, resolve: ResolveCheckpoint) -> Path:
    path = Path(resolve(ref))
    if not path.is_file():
        raise FileNotFoundError(f"{field}: checkpoint not found: {path}")
    return path


def _open_datasets(spec: TrainSpec | DistillJobSpec, cache_dir: Path) -> tuple[CocoDataset, CocoDataset]:
    train = build_dataset(spec.data.train, cache_dir, train=True, hflip=spec.data.hflip)
    val = build_dataset(spec.data.val, cache_dir, train=False)
    if train.num_classes == 0:
        raise ValueError(f"data.train: {train.annotations_json} defines no categories")
    if val.label_to_cat_id != train.label_to_cat_id:
        raise ValueError("data.val: its categories differ from data.train's; evaluate on a split of the same dataset")
    return train, val


def _check_class_count(field: str, path: Path, ckpt_classes: int, dataset: CocoDataset, split: str) -> None:
    if ckpt_classes != dataset.num_classes:
        raise ValueError(
            f"{field}: {path} was trained on {ckpt_classes} classes but {split} has "
            f"{dataset.num_classes}; use a checkpoint trained on this dataset"
        )


def _check_teacher_categories(path: Path, ckpt: dict[str, Any], dataset: CocoDataset) -> None:
    """A teacher predicts the data's categories in the data's label order, or its logits teach the wrong class."""
    saved = [int(c) for c in ckpt.get("label_to_cat_id") or []]
    if saved and saved != [int(c) for c in dataset.label_to_cat_id]:
        raise ValueError(
            f"teacher.checkpoint: {path} predicts category ids {_short(saved)} but data.train's labels are "
            f"{_short(list(dataset.label_to_cat_id))}; re-import the teacher with "
            "`icd import-teacher ... --classes <data.train.annotations>` so its classes follow the data"
        )


def _short(ids: list[int]) -> str:
    return str(ids if len(ids) <= 8 else [*ids[:8], "..."]).replace("'...'", "...")


def _check_teacher_spec(spec_teacher: ModelSpec, ckpt_spec: dict[str, Any], path: Path) -> None:
    """The spec's teacher fields drive validation (levels, inherit); they must describe the checkpoint."""
    diffs = architecture_mismatch(spec_teacher, ckpt_spec)
    if diffs:
        raise ValueError(
            f"teacher: does not describe teacher.checkpoint {path} ({'; '.join(diffs)}); "
            "make the teacher fields match the checkpoint"
        )


def _teacher_gate(
    spec: DistillJobSpec, teacher_path: Path, cache_dir: Path, device: Any, group: RankGroup | None
) -> TeacherEval:
    """The teacher's AP on data.val (evaluated once per teacher file, data and sizes: icd_core.teacher_eval),
    and a failure before training when it is below teacher_min_ap. The run's RNG streams are left as they
    were, so a run that found the evaluation cached trains exactly as one that evaluated."""
    per_rank = spec.schedule.batch_size // (group.world if group is not None else 1)
    rng = ckpt.capture_rng()
    try:
        result = evaluate_teacher(teacher_path, spec.data, cache_dir, spec.teacher, str(device), per_rank)
    finally:
        ckpt.restore_rng(rng)
    check_teacher_min_ap(result, spec.teacher_min_ap)
    return result


def _record_lineage(
    spec: TrainSpec | DistillJobSpec | EvaluateSpec,
    cache_dir: Path,
    callbacks: Sequence[Callback],
    teacher_path: str | Path | None = None,
    splits: tuple[str, ...] = ("train", "val"),
) -> dict[str, Any]:
    """The run's lineage (icd_core.lineage), told to the callbacks now, before training: the service stores
    it at once, so a run that fails later still says what it ran on. Its summary.json keeps it too."""
    lineage = collect_lineage(spec, cache_dir, teacher_path, splits)
    log.info(
        "lineage: code %s, data %s%s",
        lineage["code"]["version"],
        ", ".join(f"{k} {v}" for k, v in lineage["data"].items()),
        f", teacher sha256 {lineage['teacher_sha256']}" if lineage["teacher_sha256"] else "",
    )
    for cb in callbacks:
        cb.on_lineage(lineage)
    return lineage


def _write_summary(output_dir: Path, spec: AnySpec, result: RunResult, extra: dict[str, Any]) -> None:
    summary = {
        "name": spec.name,
        "kind": spec.kind,
        "final_metrics": result.final_metrics,
        "evaluation": asdict(result.evaluation) if result.evaluation is not None else None,
        "final_checkpoint": str(result.final_checkpoint) if result.final_checkpoint else None,
        "sec_per_step": result.sec_per_step,
        "peak_memory_mb": result.peak_memory_mb,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }
    tmp = output_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(output_dir / SUMMARY_FILE)


def _find_resume_point(output_dir: Path, resume: bool) -> Path | None:
    latest = ckpt.latest_checkpoint(output_dir / CHECKPOINT_DIR)
    if resume:
        if latest is None:
            log.info("no checkpoint in %s: starting from step 0", output_dir)
        return latest
    if latest is not None:
        raise ValueError(
            f"{output_dir} already holds checkpoints ({latest.name}); resume it (--resume) "
            "or choose another output folder"
        )
    return None


# --- train / distill ----------------------------------------------------------------------------------
def _load_initial_student(
    student: Detector, spec: ModelSpec, field: str, resolve: ResolveCheckpoint, train_ds: CocoDataset
) -> dict[str, Any]:
    """Fine-tune from `checkpoint`, or start a resnet trunk from `backbone_weights` (ImageNet)."""
    if spec.checkpoint:
        path = _checkpoint_file(f"{field}.checkpoint", spec.checkpoint, resolve)
        init = read_checkpoint(path)
        _check_class_count(f"{field}.checkpoint", path, int(init["num_classes"]), train_ds, "data.train")
        load_weights(student, init["model"], source=f"{field}.checkpoint {path}")
        return {}
    if spec.backbone_weights:
        path = _checkpoint_file(f"{field}.backbone_weights", spec.backbone_weights, resolve)
        return {"backbone_weights_loaded": float(load_trunk_weights(student, path, f"{field}.backbone_weights"))}
    return {}


def build_trainer(
    spec: TrainSpec | DistillJobSpec,
    output_dir: Path,
    callbacks: Sequence[Callback] = (),
    resolve_checkpoint: ResolveCheckpoint | None = None,
    cache_dir: Path | None = None,
    load_initial_weights: bool = True,
    group: RankGroup | None = None,
) -> tuple[Trainer, dict[str, Any]]:
    """Seed, open the data, build student (+ teacher, inherit, distiller) and wrap them in a Trainer.

    Returns the trainer and the run's extra summary entries (inherit report, teacher path, counts).
    Exposed for tests and benchmarks that need the models; `run_spec` is the normal entry point.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    resolve = resolve_checkpoint or default_resolve_checkpoint
    ckpt.seed_everything(spec.seed)
    device = group.device if group is not None else resolve_device(spec.device)
    train_ds, val_ds = _open_datasets(spec, cache_dir)
    num_classes = train_ds.num_classes
    sizes, max_size = spec.data.train_sizes, spec.data.max_size
    student_spec = spec.model if isinstance(spec, TrainSpec) else spec.student
    student = build_detector(student_spec, num_classes, sizes, max_size)
    extra: dict[str, Any] = {}

    if load_initial_weights:
        field = "model" if isinstance(spec, TrainSpec) else "student"
        extra.update(_load_initial_student(student, student_spec, field, resolve, train_ds))

    teacher = distiller = None
    if isinstance(spec, DistillJobSpec):
        teacher_path = _checkpoint_file("teacher.checkpoint", spec.teacher.checkpoint, resolve)
        teacher, tckpt = load_detector(teacher_path, sizes, max_size)
        _check_class_count("teacher.checkpoint", teacher_path, int(tckpt["num_classes"]), train_ds, "data.train")
        _check_teacher_categories(teacher_path, tckpt, train_ds)
        _check_teacher_spec(spec.teacher, tckpt["model_spec"], teacher_path)
        teacher.requires_grad_(False)
        teacher.eval()
        if spec.distill.inherit:
            report = inherit_from_teacher(teacher, student)
            log.info("%s", report.summary())
            require_inherited(report)  # asked to inherit and nothing matched: a failure, not a warning
            extra["inherit_copied"] = float(len(report.copied))
            extra["inherit_skipped"] = float(len(report.skipped))
            extra["inherit"] = {"copied": report.copied, "skipped": [list(s) for s in report.skipped]}
        teacher_eval = _teacher_gate(spec, teacher_path, cache_dir, device, group)
        extra["teacher_eval"] = teacher_eval.summary()
        extra.update(teacher_eval.flat())
        priors = compute_priors(train_ds, cache_dir) if spec.distill.method == "icd" else None
        distiller = build_distiller(spec.distill, teacher, student, spec.schedule.total_iterations(), priors)
        extra["teacher_checkpoint"] = str(teacher_path)
        if spec.distill.method == "icd" and load_initial_weights:  # a resumed run's decoder is in its checkpoint
            decoder = prepare_decoder(spec, distiller, teacher, teacher_path, train_ds, cache_dir, resolve, device)
            if decoder:
                extra["icd_decoder"] = decoder
                extra["icd_pretrain_steps"] = float(decoder.get("steps") or 0)
                extra["icd_pretrain_seconds"] = float(decoder.get("seconds") or 0.0)

    bs, workers = spec.schedule.batch_size, spec.data.workers

    def batches(start_step: int):
        return iter(make_train_loader(train_ds, bs, workers, spec.seed, start_step=start_step))

    icd_heldout = (
        heldout_diagnostics(distiller, teacher, val_ds, bs, device) if isinstance(distiller, ICDDistiller) else None
    )

    def evaluator(det: Detector) -> EvalResult:
        result = evaluate_model(det, val_ds, batch_size=bs, device=device, workers=min(workers, 2))
        if icd_heldout is not None:  # the decoder's readiness on a held-out batch, beside the AP
            result.metrics.update(icd_heldout())
        return result

    kwargs: dict[str, Any] = dict(
        teacher=teacher,
        distiller=distiller,
        evaluator=evaluator,
        callbacks=callbacks,
        meta=detector_meta(student, train_ds.class_names, train_ds.label_to_cat_id),
        spec=spec.model_dump(mode="json"),
    )
    if group is not None:
        from .engine import distributed

        student = distributed.prepare_student(student, group)
        batches, kwargs["evaluator"] = _rank_batches_and_evaluator(train_ds, val_ds, spec, group, icd_heldout)
        trainer: Trainer = distributed.DistributedTrainer(
            student, spec.schedule, batches, output_dir, device, group=group, **kwargs
        )
        group.reseed(spec.seed)
    else:
        trainer = Trainer(student, spec.schedule, batches, output_dir, device, **kwargs)
    return trainer, extra


def _rank_batches_and_evaluator(
    train_ds: CocoDataset,
    val_ds: CocoDataset,
    spec: TrainSpec | DistillJobSpec,
    group: RankGroup,
    icd_heldout: Callable[[], dict[str, float]] | None,
) -> tuple[Callable[[int], Any], Callable[[Detector], EvalResult]]:
    """One rank's slice of every global batch, and evaluation sharded over the group (the ICD decoder's
    held-out diagnostics on rank 0, the one that reports)."""
    from .data.loader import make_rank_train_loader
    from .engine.distributed import evaluate_sharded

    bs, workers, per_rank = spec.schedule.batch_size, spec.data.workers, spec.schedule.batch_size // group.world

    def batches(start_step: int):
        return iter(make_rank_train_loader(train_ds, bs, group.rank, group.world, workers, spec.seed, start_step))

    def evaluator(det: Detector) -> EvalResult:
        result = evaluate_sharded(det, val_ds, group, batch_size=per_rank, workers=min(workers, 2))
        if icd_heldout is not None and group.is_main:
            result.metrics.update(icd_heldout())
        return result

    return batches, evaluator


def _run_training(
    spec: TrainSpec | DistillJobSpec,
    output_dir: Path,
    callbacks: Sequence[Callback],
    resume: bool,
    resolve: ResolveCheckpoint,
    cache_dir: Path,
    group: RankGroup | None = None,
) -> RunResult:
    resume_from = _find_resume_point(output_dir, resume)
    writes = group is None or group.is_main  # in a group, rank 0 alone writes metrics and the summary
    metrics_log = MetricsLog(output_dir)
    if resume_from is None and writes:
        metrics_log.path.unlink(missing_ok=True)  # a fresh run's curves start empty
    callbacks = [*callbacks, metrics_log] if writes else list(callbacks)
    with group.main_first() if group is not None else contextlib.nullcontext():  # rank 0 fills the caches
        trainer, extra = build_trainer(
            spec, output_dir, callbacks, resolve, cache_dir, load_initial_weights=resume_from is None, group=group
        )
        if writes:  # after build_trainer: the data and the teacher were found and checked, shapes generated
            extra["lineage"] = _record_lineage(spec, cache_dir, callbacks, extra.get("teacher_checkpoint"))
    out = trainer.train(resume_from=resume_from)
    counts = {k: extra[k] for k in (*_COUNTS, *TEACHER_AP_METRICS) if k in extra}
    if not writes:  # in a group, rank 0 alone measures the model and writes the summary
        # ... and the others wait for it: a rank that tears its process group down while rank 0 still
        # works can abort the group (gloo: "terminate called without an active exception", seen in CI).
        group.barrier()
        return RunResult(
            {**out.final_metrics, **counts}, out.evaluation, out.final_checkpoint, out.sec_per_step, out.peak_memory_mb
        )
    check = stop_check(callbacks, out.step)
    try:  # the trained model is kept whatever happens here: a failed measurement is reported, not fatal
        val = build_dataset(spec.data.val, cache_dir, train=False)
        deploy, cost_metrics = deploy_report(
            trainer.student, trainer.teacher, val, spec.deploy, trainer.device, output_dir, check
        )
    except TrainingStopped:
        raise
    except Exception as exc:
        log.warning("model cost / predictions failed: %s", exc, exc_info=True)
        deploy, cost_metrics = {"deploy_error": f"{type(exc).__name__}: {exc}"}, {}
    extra.update(deploy)
    result = RunResult(
        {**out.final_metrics, **counts, **cost_metrics},
        out.evaluation,
        out.final_checkpoint,
        out.sec_per_step,
        out.peak_memory_mb,
    )
    extra = {**extra, "ranks": group.world} if group is not None else extra
    confirm_ownership(callbacks, out.step)
    _write_summary(
        output_dir, spec, result, {"step": out.step, "device": str(trainer.device), "amp": trainer.amp.name, **extra}
    )
    if group is not None:
        group.barrier()  # the other ranks are waiting for the summary (above)
    return result


# --- evaluate -----------------------------------------------------------------------------------------
def _run_evaluate(
    spec: EvaluateSpec,
    output_dir: Path,
    callbacks: Sequence[Callback],
    resolve: ResolveCheckpoint,
    cache_dir: Path,
) -> RunResult:
    ckpt.seed_everything(spec.seed)
    device = resolve_device(spec.device)
    path = _checkpoint_file("model.checkpoint", spec.model.checkpoint, resolve)
    val = build_dataset(spec.data.val, cache_dir, train=False)
    detector, meta = load_detector(path, spec.data.test_size, spec.data.max_size)
    _check_class_count("model.checkpoint", path, int(meta["num_classes"]), val, "data.val")
    saved_cats = meta.get("label_to_cat_id")
    if saved_cats is not None and list(saved_cats) != list(val.label_to_cat_id):
        raise ValueError(
            f"data.val: its category ids differ from the ones {path} was trained with; "
            "evaluate on a split of the training dataset"
        )
    lineage = _record_lineage(spec, cache_dir, callbacks, splits=("val",))
    detector.to(device)
    for cb in callbacks:
        cb.on_start(0, 0)
    stop_check(callbacks, 0)()
    evaluation = evaluate_model(
        detector, val, batch_size=spec.schedule.batch_size, device=device, workers=min(spec.data.workers, 2)
    )
    evaluation.step = int(meta.get("step", 0))
    confirm_ownership(callbacks, evaluation.step)
    for cb in callbacks:
        cb.on_evaluation(evaluation)
    result = RunResult(dict(evaluation.metrics), evaluation, None, None, peak_memory_mb(device))
    for cb in callbacks:
        cb.on_end(evaluation.step, result.final_metrics)
    _write_summary(output_dir, spec, result, {"checkpoint": str(path), "device": str(device), "lineage": lineage})
    return result
