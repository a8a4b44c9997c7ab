"""Data roots: every dataset, annotation file and checkpoint a spec names must resolve inside a root.

The one rule the service (`store.settings.Settings`, the API's submit checks, the worker) and the
local commands (`icd train`, `icd eval`, `icd study`, with ICD_DATA_ROOTS set) share. A path is
URL-decoded, `~`-expanded and resolved (symlinks and `..` followed) before it is compared with the
roots, so `../../etc/passwd`, `%2e%2e/`, and a symlink pointing out of a root are all caught.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote

from pydantic import BaseModel

from .spec import CocoSource

SpecT = TypeVar("SpecT", bound=BaseModel)


class PathNotAllowed(ValueError):
    """A spec path outside every allowed root, or found in none of them."""


def _decoded(p: str) -> str:
    """`p` with percent-escapes undone until nothing changes (double encoding cannot slip through)."""
    for _ in range(5):
        nxt = unquote(p)
        if nxt == p:
            break
        p = nxt
    if "\x00" in p:
        raise PathNotAllowed("the path contains a NUL byte")
    return p


def _listed(roots: Sequence[Path]) -> str:
    return ", ".join(str(r) for r in roots) or "(none configured)"


def resolve_in_roots(p: str, roots: Sequence[str | Path]) -> Path:
    """The real path of `p` inside one of `roots`, or PathNotAllowed saying which roots were allowed.

    A relative path is looked up in each root in turn (the first root that holds it wins); when no
    root holds it, the message lists every place tried.
    """
    allowed = [Path(r).expanduser().resolve() for r in roots]
    path = Path(_decoded(p)).expanduser()
    candidates = [path.resolve()] if path.is_absolute() else [(r / path).resolve() for r in allowed]
    inside = [c for c in candidates if any(c.is_relative_to(r) for r in allowed)]
    if not inside:
        where = candidates[0] if path.is_absolute() else path
        raise PathNotAllowed(
            f"{p} resolves to {where}, outside the allowed roots: {_listed(allowed)} "
            "(set ICD_DATA_ROOTS to the folders that hold your data)"
        )
    for c in inside:
        if c.exists():
            return c
    if path.is_absolute():
        return inside[0]  # inside a root but missing: the caller's existence check names it
    raise PathNotAllowed(f"{p} is in none of the roots; tried {', '.join(str(c) for c in inside)}")


def confine_spec_paths(
    spec: dict[str, Any], data_roots: Sequence[str | Path], checkpoint_roots: Sequence[str | Path] | None
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """A copy of the spec dict with every COCO and checkpoint path resolved inside its roots, and
    (field, reason) for each path that is not. `job:<id>` checkpoint references are left as they are;
    checkpoint_roots None leaves checkpoint paths alone (local commands)."""
    out = {**spec}
    errors: list[tuple[str, str]] = []

    def confine(field: str, value: str, roots: Sequence[str | Path]) -> str:
        try:
            return str(resolve_in_roots(value, roots))
        except PathNotAllowed as exc:
            errors.append((field, str(exc)))
            return value

    data = out.get("data")
    if isinstance(data, dict):
        out["data"] = data = {**data}
        for split in ("train", "val"):
            src = data.get(split)
            if isinstance(src, dict) and src.get("format", CocoSource.model_fields["format"].default) == "coco":
                data[split] = src = {**src}
                for key in ("images", "annotations"):
                    if isinstance(src.get(key), str):
                        src[key] = confine(f"data.{split}.{key}", src[key], data_roots)
    for field in ("model", "teacher", "student"):
        m = out.get(field)
        ref = m.get("checkpoint") if isinstance(m, dict) else None
        if checkpoint_roots is not None and isinstance(ref, str) and ref and not ref.startswith("job:"):
            out[field] = {**m, "checkpoint": confine(f"{field}.checkpoint", ref, checkpoint_roots)}
    return out, errors


def resolve_data_roots(spec: SpecT, roots: Sequence[str | Path]) -> SpecT:
    """The spec with its COCO paths resolved inside `roots` (relative ones: the first root holding
    them); PathNotAllowed naming each field otherwise. With no roots the spec is returned unchanged
    (a laptop run reads what its user can read). Checkpoint paths are left as given."""
    if not roots or getattr(spec, "data", None) is None:
        return spec
    confined, errors = confine_spec_paths(spec.model_dump(mode="json"), roots, None)
    if errors:
        raise PathNotAllowed("; ".join(f"{field}: {reason}" for field, reason in errors))
    return type(spec).model_validate(confined)
