"""Numbers as strict JSON: JSON has no NaN or infinity, so every writer of metrics goes through here."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def finite_or_none(obj: Any) -> Any:
    """NaN/inf -> None, recursively through dicts and lists (a diverged value reads as null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite_or_none(v) for v in obj]
    return obj


def finite_floats(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """The finite numeric entries as floats; NaN, inf and non-numbers are dropped (a database column
    of floats, where null would read as a value)."""
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[key] = number
    return out
