"""DeFeat: decoupled foreground/background feature distillation (Guo et al., "Distilling Object
Detectors via Decoupled Features", CVPR 2021; code ggjy/DeFeat.pytorch@c46a793).

Neck loss [code]: a binary GT mask M_l per FPN level, a 3×3 conv adapter per level (no activation,
N(0, σ=1e-4) init as in FGFI), D = (A_l(S_l) − T_l)² and
    fg_l = Σ M·D / max(1, 2·C·Σ M),   bg_l = Σ (1−M)·D / max(1, 2·C·Σ (1−M)),
    L = (w_fg / L)·Σ_l fg_l + (w_bg / L)·Σ_l bg_l     (averaged over levels),
with w_fg = 4, w_bg = 16 (the author's COCO values, issue #18; the VOC config uses 3 / 12).

Our choices [ours] (docs/method/baselines.md#defeat):
- Mask: size-based assignment, each GT on one level: k = clamp(⌊log2(√((w+1)(h+1)) / 56)⌋, 0, L−1),
  its box / stride truncated to int and filled half-open, a sub-cell box marking one cell (`masks.defeat_masks`).
  The canonical size 56 is scaled by ModelSpec.anchor_sizes[0] / the detector's default first size, so
  shrunken anchors (small-object data) shift the assignment with them.
- Neck only; head term off as in the released config (no head KD, no backbone-stage KD).
- Strides are padded size / feature size (padded-batch coordinates).
- One-stage (RetinaNet, FCOS) uses the same neck loss on P3–P7; Faster R-CNN includes its P6 (pool).

Weight: `DistillSpec.weight` multiplies both terms (null → 1.0). Options: `w_fg` (4), `w_bg` (16),
`canonical_size` (56 · anchor scale).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from icd_core.spec import PAPER_WEIGHT, DistillSpec

from .base import DistillBatch, Distiller
from .fgfi import tiny_normal_
from .masks import anchor_scale, defeat_masks, feature_grid_sizes, resolve_options

if TYPE_CHECKING:
    from icd_core.data.priors import ClassPriors
    from icd_core.detectors import Detector

DEFAULT_WEIGHT = PAPER_WEIGHT["defeat"]
CANONICAL_SIZE = 56.0


class DeFeatDistiller(Distiller):
    """Separate, separately normalized foreground and background imitation on the FPN."""

    method = "defeat"

    def __init__(
        self,
        dspec: DistillSpec,
        teacher: Detector,
        student: Detector,
        total_steps: int,
        priors: ClassPriors | None = None,
    ) -> None:
        super().__init__()
        self.levels = list(student.level_names)
        spec = student.spec
        canonical = CANONICAL_SIZE * anchor_scale(spec.detector, self.levels, spec.anchor_sizes, 0)
        opts = resolve_options(self.method, dspec.options, {"w_fg": 4.0, "w_bg": 16.0, "canonical_size": canonical})
        self.w_fg, self.w_bg, self.canonical_size = opts["w_fg"], opts["w_bg"], opts["canonical_size"]
        self.weight = DEFAULT_WEIGHT if dspec.weight is None else float(dspec.weight)
        self.adapters = nn.ModuleDict(
            {
                lv: tiny_normal_(nn.Conv2d(student.channels, teacher.channels, kernel_size=3, padding=1))
                for lv in self.levels
            }
        )

    @torch.no_grad()
    def masks(self, batch: DistillBatch) -> list[torch.Tensor]:
        """Per level a binary float [N, H, W] foreground mask."""
        grids = feature_grid_sizes(batch.student_features, self.levels)
        per_image = [
            defeat_masks(t["boxes"].float(), grids, batch.padded_size, self.canonical_size) for t in batch.targets
        ]
        return [torch.stack([m[level] for m in per_image]) for level in range(len(self.levels))]

    def losses(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        fg_total, bg_total = 0.0, 0.0
        for lv, mask in zip(self.levels, self.masks(batch)):
            student = self.adapters[lv](batch.student_features[lv]).float()
            teacher = batch.teacher_features[lv].detach().float()
            channels = student.shape[1]
            diff = (student - teacher) ** 2
            fg = mask[:, None].to(diff.device)
            bg = 1.0 - fg
            fg_total = fg_total + (diff * fg).sum() / (2.0 * channels * fg.sum()).clamp(min=1.0)
            bg_total = bg_total + (diff * bg).sum() / (2.0 * channels * bg.sum()).clamp(min=1.0)
        scale = self.weight / len(self.levels)
        return {"loss_defeat_fg": scale * self.w_fg * fg_total, "loss_defeat_bg": scale * self.w_bg * bg_total}
