"""Distillation methods, one module each. `build_distiller` maps a method name to its class explicitly."""

from __future__ import annotations

from typing import TYPE_CHECKING

from icd_core.distill.base import DistillBatch, Distiller, NoDistiller
from icd_core.spec import DistillSpec

if TYPE_CHECKING:
    from icd_core.data.priors import ClassPriors
    from icd_core.detectors import Detector

__all__ = ["DistillBatch", "Distiller", "NoDistiller", "build_distiller"]


def build_distiller(
    dspec: DistillSpec, teacher: Detector, student: Detector, total_steps: int, priors: ClassPriors | None = None
) -> Distiller:
    """The distiller for `dspec.method`; each method lives in the module of the same name."""
    method = dspec.method
    if method == "none":
        return NoDistiller()
    if method == "icd":
        from icd_core.distill.icd import ICDDistiller as cls
    elif method == "fitnet":
        from icd_core.distill.fitnet import FitNetDistiller as cls
    elif method == "fgfi":
        from icd_core.distill.fgfi import FGFIDistiller as cls
    elif method == "defeat":
        from icd_core.distill.defeat import DeFeatDistiller as cls
    elif method == "fgd":
        from icd_core.distill.fgd import FGDDistiller as cls
    else:
        raise ValueError(f"distill.method: unknown method {method!r}")
    return cls(dspec, teacher, student, total_steps, priors)
