"""Data roots: every dataset, annotation file and checkpoint a spec names must resolve inside a root.

The one rule the service (`store.settings.Settings`, the API's submit checks, the worker) and the
local commands (`icd train`, `icd eval`, `icd study`, with ICD_DATA_ROOTS set) share. A path is
URL-decoded, `~`-expanded and resolved (symlinks and `..` followed) before it is compared with the
roots, so `../../etc/passwd`, `%2e%2e/`, and a symlink pointing out of a root are all caught.

Which fields are paths is decided by the spec itself (`icd_core.spec.UserPath`), so a path field added
later is confined without touching this module. Checkpoint fields may also name files in the artifact
store, but only a job's own folder (`jobs/<id>/...`) and only of a job the submitter may read: the same
ownership rule as `job:<id>`. Messages list the data roots only; the artifact store is not advertised.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote

from pydantic import BaseModel

from .spec import iter_user_paths, parse_job_ref, with_values

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
    try:
        p.encode("utf-8")
    except UnicodeEncodeError:
        raise PathNotAllowed("the path is not valid UTF-8 text (it holds a lone surrogate)") from None
    return p


def _listed(roots: Sequence[Path]) -> str:
    return ", ".join(str(r) for r in roots) or "(none configured)"


def _outside(p: str, where: Path | str, allowed: Sequence[Path]) -> PathNotAllowed:
    return PathNotAllowed(
        f"{p} resolves to {where}, outside the allowed roots: {_listed(allowed)} "
        "(set ICD_DATA_ROOTS to the folders that hold your data; another job's checkpoint is job:<id>)"
    )


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
        raise _outside(p, candidates[0] if path.is_absolute() else path, allowed)
    for c in inside:
        if c.exists():
            return c
    if path.is_absolute():
        return inside[0]  # inside a root but missing: the caller's existence check names it
    raise PathNotAllowed(f"{p} is in none of the roots; tried {', '.join(str(c) for c in inside)}")


MayReadJob = Callable[[int], bool]
JOBS_FOLDER = "jobs"  # store.artifacts keeps job <id>'s files under <artifact root>/jobs/<id>/


def artifact_job_id(path: Path, artifact_root: Path) -> int | None:
    """The job whose folder holds `path` (a resolved path inside the artifact root), or None."""
    parts = path.relative_to(artifact_root).parts
    if len(parts) >= 3 and parts[0] == JOBS_FOLDER and parts[1].isdigit():
        return int(parts[1])
    return None


def _readable(path: Path, artifacts: Path | None, may_read_job: MayReadJob | None) -> bool:
    """False for a file in the artifact store outside the folder of a job the submitter may read,
    wherever it was reached from (the embedded default's working-folder root holds the store too)."""
    if artifacts is None or not path.is_relative_to(artifacts):
        return True
    job_id = artifact_job_id(path, artifacts)
    return job_id is not None and (may_read_job is None or may_read_job(job_id))


def _confine(
    value: str, kind: str, data_roots: Sequence[Path], artifacts: Path | None, may_read_job: MayReadJob | None
) -> str:
    """One path field resolved by the rule in the module docstring; PathNotAllowed otherwise. A refused
    file of another owner reads like any path outside the roots: the store is not advertised."""
    job_id = parse_job_ref(value) if kind == "checkpoint" else None
    if job_id is not None:
        if may_read_job is not None and not may_read_job(job_id):
            raise PathNotAllowed(f"job {job_id} does not exist")
        return value
    if kind == "checkpoint" and value.startswith("job:"):
        return value  # malformed: check_paths names it
    roots = [*data_roots, artifacts] if kind == "checkpoint" and artifacts is not None else list(data_roots)
    try:
        path = resolve_in_roots(value, roots)
    except PathNotAllowed as exc:
        if artifacts is None or artifacts not in roots:
            raise
        resolve_in_roots(value, data_roots)  # the same refusal, naming the data roots only
        raise exc from None
    if not _readable(path, artifacts, may_read_job):
        raise _outside(value, path if Path(_decoded(value)).is_absolute() else value, data_roots)
    return str(path)


def confine_spec_paths(
    spec: SpecT,
    data_roots: Sequence[str | Path],
    artifact_root: str | Path | None,
    may_read_job: MayReadJob | None = None,
) -> tuple[SpecT, list[tuple[str, str]]]:
    """A copy of the spec with every path field (`UserPath`) resolved inside its roots, and (field,
    reason) for each one that is not. artifact_root None leaves checkpoint fields alone (local commands);
    may_read_job None trusts every job (the local admin)."""
    roots = [Path(r).expanduser().resolve() for r in data_roots]
    artifacts = Path(artifact_root).expanduser().resolve() if artifact_root is not None else None
    values: dict[str, str] = {}
    errors: list[tuple[str, str]] = []
    for field, value, kind in iter_user_paths(spec):
        if kind == "checkpoint" and artifacts is None:
            continue  # local commands: a checkpoint is whatever file the user names
        try:
            values[field] = _confine(value, kind, roots, artifacts, may_read_job)
        except PathNotAllowed as exc:
            errors.append((field, str(exc)))
    if errors or not values:
        return spec, errors
    return with_values(spec, values), errors  # type: ignore[return-value]


def resolve_data_roots(spec: SpecT, roots: Sequence[str | Path]) -> SpecT:
    """The spec with its data paths resolved inside `roots` (relative ones: the first root holding
    them); PathNotAllowed naming each field otherwise. With no roots the spec is returned unchanged
    (a laptop run reads what its user can read). Checkpoint paths are left as given."""
    if not roots:
        return spec
    confined, errors = confine_spec_paths(spec, roots, None)
    if errors:
        raise PathNotAllowed("; ".join(f"{field}: {reason}" for field, reason in errors))
    return confined
