"""The submit-time look inside every model checkpoint a spec names by path (`teacher.checkpoint`,
`student.checkpoint`, `model.checkpoint`): the one check the API (`POST /jobs`) and `icd validate` share.

A file torch reads but that is not this service's checkpoint (a torchvision, detectron2 or MMDetection
detector, a bare state dict) is refused naming the field, with the `icd import-teacher` line that
converts it; a checkpoint of this service trained as another architecture is refused naming the
differing field. `job:<id>` references are the API's to check (their spec is in the database); a file
torch cannot read passes here and the worker's reader names it when the job starts.

Run it after the paths are confined and known to exist (it opens the files).
"""

from __future__ import annotations

from collections.abc import Iterator

from pydantic import BaseModel

from .checkpoint_format import read_verdict
from .spec import ModelSpec, architecture_diffs, iter_checkpoint_refs, parse_job_ref


def model_checkpoints(spec: BaseModel) -> Iterator[tuple[str, ModelSpec, str]]:
    """(field, the model spec it belongs to, path) of every model checkpoint named by a file path."""
    for field, ref in iter_checkpoint_refs(spec):
        owner, _, last = field.rpartition(".")
        model = getattr(spec, owner, None) if "." not in owner else None
        if last == "checkpoint" and isinstance(model, ModelSpec) and parse_job_ref(ref) is None:
            yield field, model, ref


def checkpoint_problems(spec: BaseModel, skip: set[str] | frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """(field, reason) for each model checkpoint file that is not this service's or not the spec's
    architecture; fields in `skip` (already refused for another reason) are not opened."""
    problems: list[tuple[str, str]] = []
    for field, model, path in model_checkpoints(spec):
        if field in skip:
            continue
        saved, verdict = read_verdict(path)
        if verdict is not None:
            problems.append((field, verdict.message(path)))
        elif saved is not None:
            problems += _architecture_problems(field, model, saved, path)
    return problems


def _architecture_problems(field: str, model: ModelSpec, saved: dict, path: str) -> list[tuple[str, str]]:
    """One entry per architecture field the checkpoint disagrees on, named `<side>.<field>`."""
    side = field.rpartition(".")[0]
    out = []
    for name, mine, theirs in architecture_diffs(model, saved):
        if not name:  # the checkpoint's own model spec does not validate
            out.append((field, f"{path}: {mine}; name a checkpoint written by this service"))
            continue
        out.append(
            (
                f"{side}.{name}",
                f"spec {mine}, checkpoint {theirs} ({field} {path}); make {side}.{name} match the "
                f"checkpoint or name another checkpoint",
            )
        )
    return out
