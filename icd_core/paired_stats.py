"""Is a method's gain over `none` real? The seed-paired difference and its 95 % t interval.

Runs of two methods with the same seed share data order, initial weights and augmentation draws, so
their AP difference cancels most seed noise; the interval is over those per-seed differences
(`mean ± t(0.975, n-1) · sd / √n`). With one pair there is no interval. Student t quantiles come from a
table for 1-30 degrees of freedom and a Cornish-Fisher expansion beyond (error < 1e-4 there), so the
project needs no statistics package.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

# t(0.975, df) for df = 1..30 (two-sided 95 %).
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip
_Z975 = 1.959964


def t975(df: int) -> float:
    """The two-sided 95 % Student t critical value for `df` >= 1 degrees of freedom."""
    if df < 1:
        raise ValueError("df must be >= 1")
    if df <= len(_T975):
        return _T975[df - 1]
    z, v = _Z975, float(df)
    return (
        z
        + (z**3 + z) / (4 * v)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
    )


@dataclass(frozen=True)
class PairedDelta:
    """Mean per-seed difference (method − none) with its 95 % interval; the interval is None for n < 2."""

    n: int
    mean: float
    ci_low: float | None
    ci_high: float | None
    seeds: tuple[int, ...]

    @property
    def distinguishable(self) -> bool:
        """The interval exists and excludes 0."""
        return self.ci_low is not None and self.ci_high is not None and (self.ci_low > 0 or self.ci_high < 0)

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "seeds": list(self.seeds), "distinguishable": self.distinguishable}


def paired_delta(method: Mapping[int, float], baseline: Mapping[int, float]) -> PairedDelta | None:
    """Pair by seed (seeds missing on either side are left out); None when no seed is shared."""
    seeds = tuple(sorted(set(method) & set(baseline)))
    if not seeds:
        return None
    diffs = [float(method[s]) - float(baseline[s]) for s in seeds]
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return PairedDelta(n, mean, None, None, seeds)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return PairedDelta(n, mean, mean - half, mean + half, seeds)
