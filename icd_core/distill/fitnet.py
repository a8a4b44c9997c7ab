"""FitNet-style FPN imitation (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015).

The student's FPN level l passes through a 1×1 conv adapter A_l (C_s → C_t, one per level, trained
with the student) and imitates the teacher's level everywhere:
    L_fit = w · Σ_l mean_{n,c,h,w} (A_l(S_l) − T_l)²,   w = 1.
[ours] (docs/method/baselines.md#fitnet): FitNet's hint/guided layers and its staged training have no FPN detector
version in the authors' code; we use one adapter per FPN level, an element mean per level summed over
levels, and no hint pre-training or warm-up (as HEAD's `fitnet_retina` config does).

Weight: `DistillSpec.weight` (null → 1.0). Options: none.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from icd_core.spec import PAPER_WEIGHT, DistillSpec

from .base import DistillBatch, Distiller
from .masks import resolve_options

if TYPE_CHECKING:
    from icd_core.data.priors import ClassPriors
    from icd_core.detectors import Detector

DEFAULT_WEIGHT = PAPER_WEIGHT["fitnet"]


class FitNetDistiller(Distiller):
    """Adapter + MSE over all positions of every FPN level."""

    method = "fitnet"

    def __init__(
        self,
        dspec: DistillSpec,
        teacher: Detector,
        student: Detector,
        total_steps: int,
        priors: ClassPriors | None = None,
    ) -> None:
        super().__init__()
        resolve_options(self.method, dspec.options, {})
        self.weight = DEFAULT_WEIGHT if dspec.weight is None else float(dspec.weight)
        self.levels = list(student.level_names)
        # Detectors are read, never stored: their parameters must not join this module's.
        self.adapters = nn.ModuleDict(
            {lv: nn.Conv2d(student.channels, teacher.channels, kernel_size=1) for lv in self.levels}
        )

    def losses(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        total = 0.0
        for lv in self.levels:
            student = self.adapters[lv](batch.student_features[lv]).float()
            teacher = batch.teacher_features[lv].detach().float()
            total = total + F.mse_loss(student, teacher)
        return {"loss_fitnet": self.weight * total}
