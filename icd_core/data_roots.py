"""Relative dataset paths in a spec, looked up in a list of data roots (ICD_DATA_ROOTS): the one rule
that the service (`store.settings.Settings.resolve_data_path`) and the local commands share."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

from .spec import CocoSource, DataSpec

SpecT = TypeVar("SpecT", bound=BaseModel)


def find_in_roots(path: str | Path, roots: Sequence[str | Path]) -> Path | None:
    """The first existing root/path (absolute), or None when no root holds it."""
    for root in roots:
        candidate = (Path(root) / path).expanduser().resolve()
        if candidate.exists():
            return candidate
    return None


def resolve_data_roots(spec: SpecT, roots: Sequence[str | Path]) -> SpecT:
    """The spec with relative COCO paths in data.* found in the roots (the first that holds one wins).

    With no roots, or when no root holds a path, that path stays as given (relative to the current
    directory). Specs without a `data` field are returned unchanged.
    """
    data_spec = getattr(spec, "data", None)
    if not roots or not isinstance(data_spec, DataSpec):
        return spec

    def find(p: str) -> str:
        if Path(p).is_absolute():
            return p
        found = find_in_roots(p, roots)
        return str(found) if found is not None else p

    data = data_spec.model_dump(mode="json")
    for split in ("train", "val"):
        src = getattr(data_spec, split)
        if isinstance(src, CocoSource):
            data[split] = {**data[split], "images": find(src.images), "annotations": find(src.annotations)}
    return spec.model_copy(update={"data": DataSpec.model_validate(data)})
