"""Distillation methods, one module each. `build_distiller` maps a method name to its class explicitly."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from icd_core.distill.base import DistillBatch, Distiller, NoDistiller
from icd_core.spec import DistillSpec, Method

if TYPE_CHECKING:
    from icd_core.data.priors import ClassPriors
    from icd_core.detectors import Detector

__all__ = ["DISTILLERS", "DistillBatch", "Distiller", "NoDistiller", "build_distiller"]


def build_distiller(
    dspec: DistillSpec, teacher: Detector, student: Detector, total_steps: int, priors: ClassPriors | None = None
) -> Distiller:
    """The distiller for `dspec.method`; each method lives in the module of the same name."""
    if dspec.method == "none":
        return NoDistiller()
    if dspec.method not in DISTILLERS:
        raise ValueError(f"distill.method: unknown method {dspec.method!r}")
    module, name = DISTILLERS[dspec.method]
    cls = getattr(importlib.import_module(module), name)  # imported on use: each method pulls in its own code
    return cls(dspec, teacher, student, total_steps, priors)


# method -> (module, class) of every method but `none`; a test checks this covers `spec.Method`.
DISTILLERS: dict[Method, tuple[str, str]] = {
    "icd": ("icd_core.distill.icd", "ICDDistiller"),
    "fitnet": ("icd_core.distill.fitnet", "FitNetDistiller"),
    "fgfi": ("icd_core.distill.fgfi", "FGFIDistiller"),
    "defeat": ("icd_core.distill.defeat", "DeFeatDistiller"),
    "fgd": ("icd_core.distill.fgd", "FGDDistiller"),
}
