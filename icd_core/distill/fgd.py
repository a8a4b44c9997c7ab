"""FGD: focal and global distillation (Yang et al., "Focal and Global Knowledge Distillation for
Detectors", CVPR 2022; code yzd-v/FGD@c03a6cf, mmdet/distillation/losses/fgd.py).

Per FPN level [code], with f a 1×1 conv adapter only when C_s ≠ C_t, S' = f(S), D = (S' − T)², N the batch:
- masks: boxes / stride, floor x1,y1, ceil x2,y2; the inclusive rectangle gets 1/area, max where boxes
  overlap (smaller box wins); M_bg = [M_fg = 0] / count (`masks.fgd_masks`);
- attention (temperature τ): A_S = H·W·softmax_hw(mean_c|F| / τ), A_C = C·softmax_c(mean_hw|F| / τ);
- L_fg = Σ M_fg·A_S^t·A_C^t·D / N and L_bg likewise with M_bg (the *teacher's* attention weights both);
- L_at = (Σ|A_C^s − A_C^t| + Σ|A_S^s − A_S^t|) / N;
- L_glb = Σ (R_s(S') − R_t(T))² / N with separate student and teacher GcBlocks R; the teacher's GcBlock is
  trained too (the reference optimizer covers it);
- per level α·L_fg + β·L_bg + γ·L_at + λ·L_glb, levels summed. Raw sums, so the terms grow with H·W.
Levels [code]: P3–P7 for RetinaNet/FCOS; P2–P5 for Faster R-CNN (its P6 `pool` level is skipped).
Defaults [code configs] (τ, α, β, γ, λ): RetinaNet 0.5, 1e-3, 5e-4, 5e-4, 5e-6; Faster R-CNN 0.5, 5e-5,
2.5e-5, 5e-5, 5e-7; FCOS 0.8, 1.6e-3, 8e-4, 8e-4, 8e-6.

Our deviation [ours] (docs/method/baselines.md#fgd): the reference scales boxes by the unpadded image shape
against padded feature maps, which misaligns them when there is padding; we divide boxes by the stride
in padded-batch coordinates (padded size / feature size), so masks sit on the objects. The background
mask therefore also covers padding cells.

Returned losses: `loss_fgd_fg`, `loss_fgd_bg`, `loss_fgd_at`, `loss_fgd_glb` (each weighted, summed over levels).
Weight: `DistillSpec.weight` multiplies all four (null → 1.0).
Options: `alpha`, `beta`, `gamma`, `lambda`, `temperature` (null → the detector's row above).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from icd_core.spec import PAPER_WEIGHT, DistillSpec

from .base import DistillBatch, Distiller
from .masks import fgd_masks, resolve_options

if TYPE_CHECKING:
    from icd_core.data.priors import ClassPriors
    from icd_core.detectors import Detector

DEFAULT_WEIGHT = PAPER_WEIGHT["fgd"]
DEFAULTS: dict[str, dict[str, float]] = {
    "retinanet": {"temperature": 0.5, "alpha": 1e-3, "beta": 5e-4, "gamma": 5e-4, "lambda": 5e-6},
    "faster_rcnn": {"temperature": 0.5, "alpha": 5e-5, "beta": 2.5e-5, "gamma": 5e-5, "lambda": 5e-7},
    "fcos": {"temperature": 0.8, "alpha": 1.6e-3, "beta": 8e-4, "gamma": 8e-4, "lambda": 8e-6},
}
SKIPPED_LEVELS = {"faster_rcnn": ("p6",)}


class GcBlock(nn.Module):
    """Global context block: R(F) = F + W2·ReLU(LN(W1·ctx)), ctx = Σ_hw softmax_hw(W_k F)·F.

    W2 starts at zero, so R starts as the identity.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = max(channels // 2, 1)
        self.context_mask = nn.Conv2d(channels, 1, kernel_size=1)
        self.transform = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )
        nn.init.kaiming_normal_(self.context_mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.context_mask.bias)
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        weights = torch.softmax(self.context_mask(x).view(n, 1, h * w), dim=2)  # [N, 1, HW]
        context = torch.bmm(x.view(n, c, h * w), weights.transpose(1, 2)).view(n, c, 1, 1)
        return x + self.transform(context)


def attention(features: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """FGD's spatial [N, H, W] and channel [N, C] attention of a feature map."""
    n, c, h, w = features.shape
    value = features.abs()
    spatial = h * w * torch.softmax((value.mean(dim=1) / temperature).view(n, -1), dim=1).view(n, h, w)
    channel = c * torch.softmax(value.mean(dim=(2, 3)) / temperature, dim=1)
    return spatial, channel


class FGDDistiller(Distiller):
    """Focal (fg/bg with teacher attention, attention imitation) and global (GcBlock relation) distillation."""

    method = "fgd"

    def __init__(
        self,
        dspec: DistillSpec,
        teacher: Detector,
        student: Detector,
        total_steps: int,
        priors: ClassPriors | None = None,
    ) -> None:
        super().__init__()
        detector = student.spec.detector
        opts = resolve_options(self.method, dspec.options, DEFAULTS[detector])
        self.temperature = opts["temperature"]
        self.alpha, self.beta, self.gamma, self.lam = opts["alpha"], opts["beta"], opts["gamma"], opts["lambda"]
        self.weight = DEFAULT_WEIGHT if dspec.weight is None else float(dspec.weight)
        skipped = SKIPPED_LEVELS.get(detector, ())
        self.levels = [lv for lv in student.level_names if lv not in skipped]
        c_s, c_t = student.channels, teacher.channels
        self.adapters = nn.ModuleDict(
            {lv: nn.Conv2d(c_s, c_t, kernel_size=1) for lv in self.levels} if c_s != c_t else {}
        )
        self.student_gc = nn.ModuleDict({lv: GcBlock(c_t) for lv in self.levels})
        self.teacher_gc = nn.ModuleDict({lv: GcBlock(c_t) for lv in self.levels})
        self._last: dict[str, Tensor] = {}

    @torch.no_grad()
    def masks(self, batch: DistillBatch, level: str) -> tuple[Tensor, Tensor]:
        """Foreground and background masks [N, H, W] of one level."""
        grid = batch.student_features[level].shape[-2:]
        pairs = [fgd_masks(t["boxes"].float(), grid, batch.padded_size) for t in batch.targets]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def level_losses(self, batch: DistillBatch, level: str) -> dict[str, Tensor]:
        """Unweighted L_fg, L_bg, L_at, L_glb of one level."""
        student = batch.student_features[level]
        if level in self.adapters:
            student = self.adapters[level](student)
        student = student.float()
        teacher = batch.teacher_features[level].detach().float()
        n = student.shape[0]
        fg, bg = self.masks(batch, level)
        fg, bg = fg.to(student.device), bg.to(student.device)
        s_spatial, s_channel = attention(student, self.temperature)
        with torch.no_grad():
            t_spatial, t_channel = attention(teacher, self.temperature)
        weighted = (student - teacher) ** 2 * t_spatial[:, None] * t_channel[:, :, None, None]
        relation = (self.student_gc[level](student) - self.teacher_gc[level](teacher)) ** 2
        return {
            "fg": (weighted * fg[:, None]).sum() / n,
            "bg": (weighted * bg[:, None]).sum() / n,
            "at": ((s_channel - t_channel).abs().sum() + (s_spatial - t_spatial).abs().sum()) / n,
            "glb": relation.sum() / n,
        }

    def losses(self, batch: DistillBatch) -> dict[str, Tensor]:
        coefficient = {"fg": self.alpha, "bg": self.beta, "at": self.gamma, "glb": self.lam}
        totals: dict[str, Tensor] = {}
        for level in self.levels:
            for name, value in self.level_losses(batch, level).items():
                term = self.weight * coefficient[name] * value
                totals[name] = totals[name] + term if name in totals else term
        self._last = {k: v.detach() for k, v in totals.items()}
        return {f"loss_fgd_{name}": value for name, value in totals.items()}

    def report(self) -> dict[str, float]:
        """The weighted FGD total of the last batch (the parts are logged as losses)."""
        if not self._last:
            return {}
        return {"fgd_total": float(sum(self._last.values()))}
