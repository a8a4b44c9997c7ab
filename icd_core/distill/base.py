"""The distiller interface: what every KD method (ICD and the baselines) provides to the trainer.

A distiller is an nn.Module that owns its extra modules (adapters, decoders, ...). Per step the
trainer hands it a DistillBatch (student and teacher FPN features of the same resized, padded batch,
plus the transformed targets) and adds the returned named losses to the detector losses. A method
that needs its own optimizer (ICD's AdamW) returns it from `make_optimizer`; otherwise its
parameters join the student's SGD.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class DistillBatch:
    """Everything a method may read for one training step."""

    student_features: OrderedDict[str, torch.Tensor]  # level name (p3..) -> [N, C, H, W]; carries grad
    teacher_features: OrderedDict[str, torch.Tensor]  # same keys and shapes; no grad
    targets: list[dict[str, torch.Tensor]]  # per image: boxes [n,4] xyxy in resized px, labels [n] (0-based)
    image_sizes: list[tuple[int, int]]  # per image (h, w) after resize, before padding
    padded_size: tuple[int, int]  # (H, W) of the padded batch tensor
    step: int  # 0-based global step
    anchors: list[torch.Tensor] | None = None  # per image [A, 4] xyxy (anchor-based detectors)
    anchors_per_level: list[int] | None = None  # anchors on each level, in level order
    extras: dict = field(default_factory=dict)


class Distiller(nn.Module):
    """Base class. Subclasses implement `losses`; the others have sensible defaults."""

    method: str = "none"
    # True when the student's anchors must be passed in DistillBatch.anchors.
    needs_anchors: bool = False

    def losses(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def make_optimizer(
        self, total_steps: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler] | None:
        """Return (optimizer, scheduler) for a separately optimized method, or None to join the student's SGD."""
        return None

    def clip_gradients(self) -> None:
        """Called after backward, before this method's own optimizer steps."""

    def report(self) -> dict[str, float]:
        """Scalars worth logging beyond the losses (e.g. auxiliary accuracy)."""
        return {}


class NoDistiller(Distiller):
    """`method: none`: the plain student."""

    method = "none"

    def losses(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        return {}
