"""FGFI: fine-grained feature imitation (Wang et al., "Distilling Object Detectors with Fine-grained
Feature Imitation", CVPR 2019; code twangnh/Distilling-Object-Detectors@c6583f3).

Mask [code]: per image, IoU of every anchor with every GT; for GT g, F_g = ψ · max_a IoU(a, g); a
location is positive if any of its anchors has IoU > F_g for some g (ψ = 0.5).
Adapter [code]: 3×3 conv + ReLU, weights N(0, σ=1e-4) truncated at 2σ, zero bias.
Loss [code]: L = λ · Σ I·(A(S) − T)² / (2·N_p), N_p = positive cells (not × C), λ = 0.01.

Our adaptations [ours] (docs/method/baselines.md#fgfi):
- FPN: the original has one map. We take the max IoU per GT over the anchors of *all* levels, threshold
  at ψ·max, and mark hits on every level; one adapter per level; one global N_p over levels and batch.
- Anchors: the detector's own (DistillBatch.anchors, torchvision order: level by level, positions
  row-major, the anchors of a position together). When the batch has none (FCOS, Faster R-CNN), or for
  FCOS always, virtual RetinaNet anchors (3 scales 2^(k/3), ratios 0.5/1/2) are built on the same grid:
  base 4·stride for FCOS (FCOS and RetinaNet then get the same masks), the RPN's own base size for
  Faster R-CNN. See `masks.virtual_anchor_sizes`.
- No warm-up: the original switches imitation off for its first 400 iterations at batch 1; every
  method here runs without one.

Weight: `DistillSpec.weight` = λ (null → 0.01). Options: `psi` (0.5).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from icd_core.spec import PAPER_WEIGHT, DistillSpec

from .base import DistillBatch, Distiller
from .masks import feature_grid_sizes, fgfi_mask, resolve_options, virtual_anchor_sizes, virtual_anchors

if TYPE_CHECKING:
    from icd_core.data.priors import ClassPriors
    from icd_core.detectors import Detector

DEFAULT_WEIGHT = PAPER_WEIGHT["fgfi"]
DEFAULTS = {"psi": 0.5}
ADAPTER_INIT_STD = 1e-4


def tiny_normal_(conv: nn.Conv2d, std: float = ADAPTER_INIT_STD) -> nn.Conv2d:
    """The FGFI/DeFeat adapter init: N(0, std) truncated at 2·std, zero bias."""
    nn.init.trunc_normal_(conv.weight, std=std, a=-2 * std, b=2 * std)
    nn.init.zeros_(conv.bias)
    return conv


class FGFIDistiller(Distiller):
    """Imitate the teacher only near objects, where anchors overlap a GT above ψ of its best IoU."""

    method = "fgfi"
    needs_anchors = True

    def __init__(
        self,
        dspec: DistillSpec,
        teacher: Detector,
        student: Detector,
        total_steps: int,
        priors: ClassPriors | None = None,
    ) -> None:
        super().__init__()
        opts = resolve_options(self.method, dspec.options, DEFAULTS)
        self.psi = opts["psi"]
        self.weight = DEFAULT_WEIGHT if dspec.weight is None else float(dspec.weight)
        self.levels = list(student.level_names)
        spec = student.spec
        self.detector = spec.detector
        self.virtual_sizes = virtual_anchor_sizes(spec.detector, self.levels, spec.anchor_sizes)
        self.adapters = nn.ModuleDict(
            {
                lv: nn.Sequential(
                    tiny_normal_(nn.Conv2d(student.channels, teacher.channels, kernel_size=3, padding=1)),
                    nn.ReLU(inplace=True),
                )
                for lv in self.levels
            }
        )
        self._mask_fraction: torch.Tensor | None = None
        self._virtual_cache: dict[tuple, tuple[torch.Tensor, list[int]]] = {}

    @torch.no_grad()
    def masks(self, batch: DistillBatch) -> list[torch.Tensor]:
        """Per level a bool [N, H, W] imitation mask for the batch."""
        grids = feature_grid_sizes(batch.student_features, self.levels)
        device = batch.student_features[self.levels[0]].device
        own = batch.anchors is not None and self.detector != "fcos"
        if own:
            per_level = batch.anchors_per_level or self._equal_split(batch.anchors[0].shape[0], grids)
        else:
            shared, per_level = self._virtual(tuple(batch.padded_size), grids, device)
        if len(per_level) != len(self.levels):
            raise ValueError(f"fgfi: anchors cover {len(per_level)} levels, the features have {len(self.levels)}")
        per_image = []
        for i, target in enumerate(batch.targets):
            anchors = batch.anchors[i] if own else shared
            per_image.append(fgfi_mask(anchors, target["boxes"], grids, per_level, self.psi))
        return [torch.stack([m[level] for m in per_image]) for level in range(len(self.levels))]

    def _virtual(
        self, padded_size: tuple[int, int], grids: list[tuple[int, int]], device: torch.device
    ) -> tuple[torch.Tensor, list[int]]:
        """Virtual anchors of a batch shape, cached (multi-scale training repeats a few shapes)."""
        key = (padded_size, tuple(grids), str(device))
        if key not in self._virtual_cache:
            if len(self._virtual_cache) >= 32:
                self._virtual_cache.clear()
            self._virtual_cache[key] = virtual_anchors(padded_size, grids, self.virtual_sizes, device=device)
        return self._virtual_cache[key]

    @staticmethod
    def _equal_split(total: int, grids: list[tuple[int, int]]) -> list[int]:
        cells = sum(h * w for h, w in grids)
        return [total // cells * h * w for h, w in grids]

    def losses(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        masks = self.masks(batch)
        numerator = 0.0
        positives = 0.0
        for lv, mask in zip(self.levels, masks):
            student = self.adapters[lv](batch.student_features[lv]).float()
            teacher = batch.teacher_features[lv].detach().float()
            m = mask[:, None].to(student.dtype)
            numerator = numerator + ((student - teacher) ** 2 * m).sum()
            positives = positives + m.sum()
        cells = sum(m.numel() for m in masks)
        self._mask_fraction = positives.detach() / max(cells, 1)
        loss = numerator / (2.0 * positives.clamp(min=1.0))
        return {"loss_fgfi": self.weight * loss}

    def report(self) -> dict[str, float]:
        """Share of feature cells inside the imitation mask (last batch)."""
        if self._mask_fraction is None:
            return {}
        return {"fgfi_mask_fraction": float(self._mask_fraction)}
