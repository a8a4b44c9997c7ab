"""The training loop shared by `train` and `distill` runs (detectron2-style, written out plainly).

One iteration: fetch a batch -> student forward (losses + FPN features in one pass) -> [teacher
features + distiller losses] -> one backward of the summed loss -> clip -> optimizer step(s) ->
LR scheduler step(s). Around it: logging every `log_every` steps, COCO evaluation every
`eval_every`, atomic checkpoints every `checkpoint_every`, a cooperative stop request and a
NaN/inf guard. A checkpoint holds everything needed to continue exactly where the run stopped.

The hot path avoids host syncs: losses are kept as device tensors and read back once per log
window (and for the finite check on CUDA, at the same points; on CPU a read costs nothing).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import resource
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..detectors import Detector, load_weights
from ..distill.base import DistillBatch, Distiller
from ..run_layout import CHECKPOINT_DIR
from ..spec import ScheduleSpec
from . import checkpoint as ckpt
from .amp import AmpConfig, make_scaler, resolve_amp
from .callbacks import Callback, EvalResult, TrainingDiverged, TrainingStopped
from .divergence import LossSpikeGuard
from .schedule import make_lr_scheduler, make_sgd

log = logging.getLogger(__name__)

Batch = tuple[list[Tensor], list[dict[str, Any]]]
# start_step -> an endless iterator whose first batch is the one of global step `start_step`.
BatchSource = Callable[[int], Iterator[Batch]]
Evaluator = Callable[[Detector], EvalResult]

CHECKPOINT_FORMAT = 1
LossWindow = list[tuple[int, dict[str, Tensor], Tensor]]  # (step, losses, total) since the last log


@dataclasses.dataclass
class _Loop:
    """What one `Trainer.train` call carries from step to step."""

    check_every_step: bool  # CPU: finite check every step; CUDA: once per window (no host sync per step)
    window: LossWindow = dataclasses.field(default_factory=list)
    window_time: float = 0.0
    window_data: float = 0.0
    last_eval: EvalResult | None = None
    evaluated_at: int = -1
    saved_at: int = -1


@dataclasses.dataclass
class TrainResult:
    step: int
    final_metrics: dict[str, float]
    evaluation: EvalResult | None
    final_checkpoint: Path | None
    sec_per_step: float | None
    peak_memory_mb: float | None


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda when present, else cpu; an explicit cuda request without a GPU is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {device} requested but no CUDA GPU is available; use device: auto or cpu")
    return torch.device(device)


def peak_memory_mb(device: torch.device) -> float:
    """GPU: peak allocated by torch; CPU: the process's resident-set high-water mark."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _to_device(batch: Batch, device: torch.device) -> Batch:
    images, targets = batch
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [
        {k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in t.items()} for t in targets
    ]
    return images, targets


class Trainer:
    """Trains `student` (optionally distilled from a frozen `teacher` through `distiller`).

    Args:
        student: the detector being trained.
        schedule: optimizer, LR schedule, AMP and the eval/checkpoint/log cadence.
        batches: start_step -> endless batch iterator (positioned exactly for resume).
        output_dir: the run folder; checkpoints go to output_dir/checkpoints.
        device: a resolved torch device.
        teacher, distiller: both for a distill run, both None for a train run.
        evaluator: detector -> EvalResult on the validation set (None: no evaluation).
        callbacks: progress listeners (see engine.callbacks).
        meta: detector meta keys stored in every checkpoint (model_spec, num_classes, class names, ...).
        spec: the job spec as a plain dict, stored for provenance.
        keep_checkpoints: periodic checkpoints kept besides final.pt.
    """

    def __init__(
        self,
        student: Detector,
        schedule: ScheduleSpec,
        batches: BatchSource,
        output_dir: Path,
        device: torch.device,
        teacher: Detector | None = None,
        distiller: Distiller | None = None,
        evaluator: Evaluator | None = None,
        callbacks: Sequence[Callback] = (),
        meta: dict[str, Any] | None = None,
        spec: dict[str, Any] | None = None,
        keep_checkpoints: int = 2,
    ):
        if (teacher is None) != (distiller is None):
            raise ValueError("a distill run needs both a teacher and a distiller")
        self.schedule = schedule
        self.batches = batches
        self.output_dir = Path(output_dir)
        self.checkpoint_dir = self.output_dir / CHECKPOINT_DIR
        self.device = device
        self.evaluator = evaluator
        self.callbacks = list(callbacks)
        self.meta = dict(meta or {})
        self.spec = spec
        self.keep_checkpoints = keep_checkpoints
        self.total_steps = schedule.total_iterations()
        self.batch_size = schedule.batch_size
        self.step = 0

        self.student = student.to(device)
        self.teacher = teacher
        self.distiller = distiller
        if teacher is not None:
            teacher.to(device).eval()
            teacher.requires_grad_(False)
        if distiller is not None:
            distiller.to(device)

        self.amp: AmpConfig = resolve_amp(schedule.amp, device)
        self.scaler = make_scaler(self.amp)

        # Distiller parameters join the SGD unless the method brings its own optimizer (ICD's AdamW).
        own = distiller.make_optimizer(self.total_steps) if distiller is not None else None
        self.distill_optimizer, self.distill_scheduler = own if own is not None else (None, None)
        sgd_params = [p for p in student.parameters() if p.requires_grad]
        if distiller is not None and own is None:
            sgd_params += self._distiller_parameters()
        self.sgd_params = sgd_params
        self.optimizer = make_sgd(sgd_params, schedule, schedule.resolved_lr(student.spec.detector))
        self.lr_scheduler = make_lr_scheduler(self.optimizer, schedule)
        self._check_teacher_not_optimized()

        self._step_times: list[float] = []
        self._window_means: list[float] = []
        self.last_metrics: dict[str, float] = {}
        self._lrs: dict[str, float] = {}
        self.spike_guard = LossSpikeGuard()  # finite explosions (engine.divergence); restarts on resume
        self._guarded_step = 0

    # --- setup helpers ---------------------------------------------------------------------------
    def _foreign_modules(self) -> list[nn.Module]:
        return [m for m in (self.teacher, self.student) if m is not None]

    def _distiller_parameters(self) -> list[nn.Parameter]:
        assert self.distiller is not None
        foreign = {id(p) for m in self._foreign_modules() for p in m.parameters()}
        return [p for p in self.distiller.parameters() if p.requires_grad and id(p) not in foreign]

    def _check_teacher_not_optimized(self) -> None:
        if self.teacher is None:
            return
        teacher_ids = {id(p) for p in self.teacher.parameters()}
        optimizers = [self.optimizer] + ([self.distill_optimizer] if self.distill_optimizer else [])
        for opt in optimizers:
            for group in opt.param_groups:
                if any(id(p) in teacher_ids for p in group["params"]):
                    raise RuntimeError("a teacher parameter ended up in an optimizer; the teacher must stay frozen")

    def _distiller_excluded_prefixes(self) -> list[str]:
        """State-dict prefixes of teacher/student modules a distiller may hold (saved elsewhere)."""
        assert self.distiller is not None
        foreign = [id(m) for m in self._foreign_modules()]
        return [f"{name}." for name, m in self.distiller.named_modules() if name and id(m) in foreign]

    def _distiller_state(self) -> dict[str, Tensor]:
        prefixes = tuple(self._distiller_excluded_prefixes())
        return {k: v for k, v in self.distiller.state_dict().items() if not (prefixes and k.startswith(prefixes))}

    # --- the step --------------------------------------------------------------------------------
    def _set_train_mode(self) -> None:
        self.student.train()
        if self.distiller is not None:
            self.distiller.train()
        if self.teacher is not None:
            self.teacher.eval()  # after distiller.train(): a distiller holding the teacher must not flip it

    def _compute_losses(self, images: list[Tensor], targets: list[dict[str, Any]]) -> dict[str, Tensor]:
        with self.amp.autocast():
            out = self.student.forward_train(images, targets)
            losses = dict(out.losses)
            if self.distiller is not None and self.distiller.method != "none":
                teacher_feats = self.teacher.teacher_features(out.image_list, source=self.student)
                batch = DistillBatch(
                    student_features=out.features,
                    teacher_features=teacher_feats,
                    targets=out.targets,
                    image_sizes=[tuple(s) for s in out.image_list.image_sizes],
                    padded_size=tuple(out.image_list.tensors.shape[-2:]),
                    step=self.step,
                    anchors=out.anchors,
                    anchors_per_level=out.anchors_per_level,
                )
                losses.update(self.distiller.losses(batch))
        return losses

    def _optimize(self, total: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.distill_optimizer is not None:
            self.distill_optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.schedule.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_value_(self.sgd_params, self.schedule.grad_clip)
        if self.distill_optimizer is not None:
            self.scaler.unscale_(self.distill_optimizer)
            self.distiller.clip_gradients()
            self.scaler.step(self.distill_optimizer)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_scheduler.step()
        if self.distill_scheduler is not None:
            self.distill_scheduler.step()

    # --- the loop --------------------------------------------------------------------------------
    def train(self, resume_from: Path | None = None) -> TrainResult:
        """Run to schedule.total_iterations(), resuming from a checkpoint when given."""
        loop = self._before_train(resume_from)
        batches = self.batches(self.step) if self.step < self.total_steps else iter(())
        self._set_train_mode()
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            images, targets = _to_device(next(batches), self.device)
            t_data = time.perf_counter() - t0
            self._train_step(images, targets, loop)
            self._after_step(loop, t0, t_data)
        return self._after_train(loop)

    # --- the loop's hooks (detectron2's HookBase points: before/after train, after step) ---------------
    def _before_train(self, resume_from: Path | None) -> _Loop:
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        for cb in self.callbacks:
            cb.on_start(self.step, self.total_steps)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return _Loop(check_every_step=self.device.type != "cuda")

    def _train_step(self, images: list[Tensor], targets: list[dict[str, Any]], loop: _Loop) -> None:
        """One optimisation step; its losses join the current log window."""
        losses = self._compute_losses(images, targets)
        loss = sum(losses.values())
        step_no = self.step + 1  # 1-based number of the step being taken
        if loop.check_every_step:
            if not bool(torch.isfinite(loss)):
                self._diverged(step_no, losses)
            self._check_spike(step_no, losses, loss)
        self._lrs = self._current_lrs()  # the rates this step uses (reported with its window)
        self._optimize(loss)
        self.step = step_no
        loop.window.append((step_no, {k: v.detach() for k, v in losses.items()}, loss.detach()))

    def _periodic_due(self, every: int) -> bool:
        """Every `every` steps (0: never), except the last step, which the end of training covers."""
        return every > 0 and self.step % every == 0 and self.step != self.total_steps

    def _after_step(self, loop: _Loop, t0: float, t_data: float) -> None:
        """Log, evaluate and checkpoint when due, then honour a stop request."""
        eval_due = self._periodic_due(self.schedule.eval_every)
        ckpt_due = self._periodic_due(self.schedule.checkpoint_every)
        log_due = self.step % self.schedule.log_every == 0 or self.step == self.total_steps
        if (log_due or eval_due or ckpt_due) and not loop.check_every_step:
            self._check_window(loop.window)  # GPU: one sync per window; never checkpoint a diverged run
        dt = time.perf_counter() - t0
        loop.window_time += dt
        loop.window_data += t_data
        self._step_times.append(dt)
        if log_due:
            self._log(loop.window, loop.window_time, loop.window_data)
            loop.window, loop.window_time, loop.window_data = [], 0.0, 0.0
        # The checkpoint before the evaluation: a failing evaluation never costs the training.
        if ckpt_due and self.spike_guard.suspect:
            log.warning("step %d: loss spiking, checkpoint skipped so the last one stays good", self.step)
        elif ckpt_due:
            self._save_periodic()
            loop.saved_at = self.step
        if eval_due and self.evaluator is not None:
            loop.last_eval = self._evaluate()
            loop.evaluated_at = self.step
        self._stop_if_requested(loop)

    def _stop_if_requested(self, loop: _Loop) -> None:
        """A cooperative stop: checkpoint this step (unless just done), then raise TrainingStopped."""
        if not self._stop_requested():
            return
        if not loop.check_every_step:
            self._check_window(loop.window)
        if loop.saved_at != self.step:
            self._save_periodic()
        raise TrainingStopped(self.step)

    def _stop_requested(self) -> bool:
        """Whether a callback asks to stop after this step (a data-parallel group takes a vote)."""
        return any(cb.should_stop() for cb in self.callbacks)

    def _after_train(self, loop: _Loop) -> TrainResult:
        """The final checkpoint, then the final evaluation (unless the last step had one): a bad
        validation image must not cost the trained weights."""
        if loop.window and not loop.check_every_step:
            self._check_window(loop.window)
        final_path = self.checkpoint_dir / ckpt.FINAL_NAME
        self._save(final_path, final=True)
        if self.evaluator is not None and loop.evaluated_at != self.step:
            loop.last_eval = self._evaluate()
        final_metrics = self._final_metrics(loop.last_eval)
        for cb in self.callbacks:
            cb.on_end(self.step, final_metrics)
        return TrainResult(
            self.step, final_metrics, loop.last_eval, final_path, self.sec_per_step(), peak_memory_mb(self.device)
        )

    # --- guards, logging, evaluation ---------------------------------------------------------------
    def _diverged(self, step: int, losses: dict[str, Tensor]) -> None:
        values = {k: float(v.detach().float()) for k, v in losses.items()}
        raise TrainingDiverged(step, values)

    def _check_spike(self, step: int, losses: dict[str, Tensor], total: Tensor | float) -> None:
        """Feed one step's finite total loss to the spike guard (once per step); raise when it says diverged."""
        if step <= self._guarded_step:
            return
        self._guarded_step = step
        reason = self.spike_guard.update(step, float(total.detach()) if isinstance(total, Tensor) else float(total))
        if reason is not None:
            values = {k: float(v.detach().float()) for k, v in losses.items()}
            raise TrainingDiverged(step, values, reason)

    def _check_window(self, window: list[tuple[int, dict[str, Tensor], Tensor]]) -> None:
        """One sync: find the first non-finite or exploding total loss among the steps since the last check."""
        if not window:
            return
        totals = torch.stack([t.float() for _, _, t in window])
        finite = torch.isfinite(totals).tolist()
        values = totals.tolist()
        for (step, losses, _), ok, value in zip(window, finite, values, strict=True):
            if not ok:
                self._diverged(step, losses)
            self._check_spike(step, losses, value)

    def _log(self, window: list[tuple[int, dict[str, Tensor], Tensor]], seconds: float, data_seconds: float) -> None:
        n = len(window)
        names = list(window[-1][1].keys())
        stacked = torch.stack([torch.stack([lo[k].float() for k in names] + [t.float()]) for _, lo, t in window])
        means = stacked.mean(dim=0).tolist()  # the one host sync of the window
        metrics = {name: float(v) for name, v in zip(names, means[:-1], strict=True)}
        metrics["loss"] = float(means[-1])
        if not math.isfinite(metrics["loss"]):
            self._check_window(window)
        metrics.update(self._lrs)
        metrics["sec_per_step"] = seconds / n
        metrics["data_time"] = data_seconds / n
        metrics["peak_memory_mb"] = peak_memory_mb(self.device)
        if self.distiller is not None:
            metrics.update({k: float(v) for k, v in self.distiller.report().items()})
        self._window_means.append(seconds / n)
        self.last_metrics = metrics
        for cb in self.callbacks:
            cb.on_metrics(self.step, metrics)

    def _current_lrs(self) -> dict[str, float]:
        lrs = {"lr": float(self.optimizer.param_groups[0]["lr"])}
        if self.distill_optimizer is not None:
            lrs["lr_distill"] = float(self.distill_optimizer.param_groups[0]["lr"])
        return lrs

    def _evaluate(self) -> EvalResult:
        self.student.eval()
        try:
            result = self.evaluator(self.student)
        finally:
            self._set_train_mode()
        result = dataclasses.replace(result, step=self.step)
        for cb in self.callbacks:
            cb.on_evaluation(result)
        return result

    def sec_per_step(self) -> float | None:
        """Median steady-state step time: per step on CPU; per log window on GPU (steps there are async)."""
        if self.device.type == "cuda":
            values = self._window_means[1:] or self._window_means
        else:
            skip = min(3, len(self._step_times) // 4)
            values = self._step_times[skip:]
        return statistics.median(values) if values else None

    def _final_metrics(self, evaluation: EvalResult | None) -> dict[str, float]:
        out: dict[str, float] = {"step": float(self.step)}
        if "loss" in self.last_metrics:
            out["loss"] = self.last_metrics["loss"]
        out.update({k: v for k, v in self.last_metrics.items() if k.startswith("icd_")})  # ICD readiness at the end
        if evaluation is not None:
            out.update(evaluation.metrics)
        return out

    # --- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly, plus the detector meta keys `load_detector` reads."""
        state: dict[str, Any] = {
            **self.meta,
            "format": CHECKPOINT_FORMAT,
            "model": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": ckpt.capture_rng(),
            "step": self.step,
            "total_steps": self.total_steps,
            "batch_size": self.batch_size,
            "data_position": self.step * self.batch_size,
            "spec": self.spec,
        }
        if self.distiller is not None:
            state["distill_method"] = self.distiller.method
            state["distiller"] = self._distiller_state()
            if self.distill_optimizer is not None:
                state["distill_optimizer"] = self.distill_optimizer.state_dict()
                state["distill_scheduler"] = self.distill_scheduler.state_dict()
        return state

    def load_checkpoint(self, path: Path) -> None:
        """Restore a checkpoint written by this trainer (same spec) and continue from its step."""
        state = ckpt.load_checkpoint(path)
        for key in ("model", "optimizer", "lr_scheduler", "rng", "step"):
            if key not in state:
                raise ValueError(f"{path} has no '{key}': not a resumable training checkpoint")
        if state.get("batch_size", self.batch_size) != self.batch_size:
            raise ValueError(
                f"schedule.batch_size is {self.batch_size} but {path} was trained with "
                f"{state['batch_size']}; resume with the same batch size"
            )
        if (self.distiller is not None) != ("distiller" in state):
            raise ValueError(
                f"{path} was written by a {'distill' if 'distiller' in state else 'train'} run; "
                "resume it with the same kind of spec"
            )
        load_weights(self.student, state["model"], source=f"resume checkpoint {path}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if "scaler" in state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        if self.distiller is not None:
            missing, unexpected = self.distiller.load_state_dict(state["distiller"], strict=False)
            prefixes = tuple(self._distiller_excluded_prefixes())
            missing = [k for k in missing if not (prefixes and k.startswith(prefixes))]
            if missing or unexpected:
                raise ValueError(
                    f"{path}: distiller state does not match distill.method "
                    f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
                )
            if self.distill_optimizer is not None:
                self.distill_optimizer.load_state_dict(state["distill_optimizer"])
                self.distill_scheduler.load_state_dict(state["distill_scheduler"])
        ckpt.restore_rng(state["rng"])
        self.step = int(state["step"])
        log.info("resumed from %s at step %d", path, self.step)

    def _save(self, path: Path, final: bool) -> None:
        ckpt.atomic_save(self.state_dict(), path)
        if not final:  # prune before the callbacks hear of it, so their list of checkpoints is current
            ckpt.prune_periodic(self.checkpoint_dir, self.keep_checkpoints)
        info = ckpt.describe(path, self.step, final)
        for cb in self.callbacks:
            cb.on_checkpoint(info)

    def _save_periodic(self) -> None:
        self._save(self.checkpoint_dir / ckpt.periodic_name(self.step), final=False)
