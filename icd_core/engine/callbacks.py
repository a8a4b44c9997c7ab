"""How a caller (CLI progress bar, Celery worker) hears about a run while it happens.

Modelled on detectron2's hooks, reduced to what callers need. Every method has a no-op default;
the trainer calls them in order. `should_stop` is the cooperative stop request (a canceled job).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class CheckpointInfo:
    name: str  # e.g. "step_000500.pt" or "final.pt"
    path: Path
    step: int
    size_bytes: int
    sha256: str
    final: bool = False


@dataclass
class EvalResult:
    step: int
    metrics: dict[str, float]  # AP, AP50, AP75, APs, APm, APl (percent, 0..100)
    per_class: dict[str, float] = field(default_factory=dict)  # category name -> AP (percent)


class Callback:
    def on_start(self, step: int, total_steps: int) -> None:
        """Called once; `step` > 0 when resuming."""

    def on_lineage(self, lineage: dict[str, Any]) -> None:
        """The run's lineage (code, package versions, data hashes, teacher sha256: icd_core.lineage), once,
        before the first step, so a run that fails later still says what it ran on."""

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Training scalars (losses, lr, seconds/step), every `schedule.log_every` steps."""

    def on_evaluation(self, result: EvalResult) -> None:
        """A COCO evaluation finished."""

    def on_checkpoint(self, info: CheckpointInfo) -> None:
        """A checkpoint was written atomically (already renamed into place)."""

    def on_end(self, step: int, final_metrics: dict[str, float]) -> None:
        """Training finished normally."""

    def should_stop(self) -> bool:
        """Return True to request a cooperative stop (checked every step, and between the parts of the
        phases after training)."""
        return False

    def confirm_ownership(self) -> bool:
        """Called right before the run writes its final files (summary.json): False stops it. A service
        confirms here, synchronously, that this attempt still holds the job."""
        return True


class TrainingStopped(Exception):
    """Raised by the trainer when a callback asked it to stop; the last checkpoint is kept."""

    def __init__(self, step: int):
        super().__init__(f"stopped on request at step {step}")
        self.step = step


class TrainingDiverged(Exception):
    """A loss became NaN or inf, or exploded while finite (engine.divergence); the last good checkpoint is kept."""

    def __init__(self, step: int, losses: dict[str, float], reason: str | None = None):
        bad = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in losses.items())
        why = f"{reason}; " if reason else ""
        super().__init__(
            f"diverged at step {step} ({why}{bad}); lower schedule.lr, set schedule.grad_clip, "
            "or resume from the last checkpoint"
        )
        self.step = step
