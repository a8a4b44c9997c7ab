"""Submit-time checks the spec model cannot make alone: the operator's caps (settings), paths inside
the allowed roots, NUL bytes, and `job:<id>` references whose architecture must match the spec."""

from __future__ import annotations

from typing import Any

from icd_core.data_roots import MayReadJob, confine_spec_paths
from icd_core.spec import CocoSource, ModelSpec, ShapesSource, architecture_mismatch
from store.models import Job
from store.settings import Settings


def field_error(field: str, reason: str) -> dict[str, Any]:
    """One 422 entry, shaped like FastAPI's own validation errors plus a dotted `field`."""
    return {"loc": ["body", *field.split(".")], "field": field, "msg": reason, "type": "value_error"}


def _unstorable(text: str) -> bool:
    """A NUL byte or a lone surrogate: PostgreSQL cannot store either, and paths cannot hold them."""
    if "\x00" in text:
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def unstorable_fields(value: Any, field: str = "") -> list[str]:
    """Dotted names of every string (key or value) the database cannot store (see _unstorable)."""
    if isinstance(value, str):
        return [field or "body"] if _unstorable(value) else []
    if isinstance(value, dict):
        found = []
        for k, v in value.items():
            name = f"{field}.{k}" if field else str(k)
            found += [name.encode("utf-8", "replace").decode()] if _unstorable(str(k)) else unstorable_fields(v, name)
        return found
    if isinstance(value, list):
        return [f for i, v in enumerate(value) for f in unstorable_fields(v, f"{field}.{i}")]
    return []


def limit_errors(spec: Any, settings: Settings) -> list[tuple[str, str]]:
    """(field, reason) for every value above the operator's caps (ICD_MAX_* settings)."""
    errors: list[tuple[str, str]] = []

    def cap(field: str, value: int, limit: int, setting: str) -> None:
        if value > limit:
            errors.append((field, f"{value} is above this server's limit of {limit} (ICD_{setting})"))

    schedules = [("schedule", spec.schedule)]
    if getattr(spec, "teacher_schedule", None) is not None:
        schedules.append(("teacher_schedule", spec.teacher_schedule))
    for name, sched in schedules:
        cap(f"{name}.batch_size", sched.batch_size, settings.max_batch_size, "MAX_BATCH_SIZE")
        cap(f"{name}.iterations", sched.total_iterations(), settings.max_iterations, "MAX_ITERATIONS")
    data = getattr(spec, "data", None)
    if data is not None:
        cap("data.min_size", max(data.train_sizes), settings.max_image_size, "MAX_IMAGE_SIZE")
        cap("data.max_size", data.max_size, settings.max_image_size, "MAX_IMAGE_SIZE")
        for split in ("train", "val"):
            src = getattr(data, split)
            if isinstance(src, ShapesSource):
                cap(f"data.{split}.image_size", src.image_size, settings.max_image_size, "MAX_IMAGE_SIZE")
                cap(f"data.{split}.num_images", src.num_images, settings.max_dataset_images, "MAX_DATASET_IMAGES")
            elif not isinstance(src, CocoSource):  # pragma: no cover - a new source kind needs its caps here
                raise TypeError(f"no limits defined for data source {type(src).__name__}")
    return errors


def sweep_limit_errors(sweep: Any, settings: Settings) -> list[tuple[str, str]]:
    """limit_errors of a sweep's base spec (fields named base.*), and of every end of its space, so a space
    cannot reach past a cap that its base spec respects (`space.<field>` named)."""
    from icd_core.sweep_space import apply_params, dim_values

    errors = [(f"base.{field}", why) for field, why in limit_errors(sweep.base, settings)]
    for path, dim in sweep.space.items():
        for value in dim_values(dim):
            trial = apply_params(sweep.base, {path: value})
            errors += [(f"space.{path}", f"{value!r}: {why}") for _f, why in limit_errors(trial, settings)]
    return errors


def confine_paths(spec: Any, settings: Settings, may_read_job: MayReadJob) -> tuple[Any, list[dict[str, Any]]]:
    """The spec with its paths resolved inside the allowed roots, and a 422 entry per path that is not
    (or that is another owner's file in the artifact store)."""
    confined, problems = confine_spec_paths(spec, settings.allowed_data_roots(), settings.artifact_root, may_read_job)
    return confined, [field_error(f, r) for f, r in problems]


def referenced_model(dep: Job) -> dict[str, Any] | None:
    """The model spec a job's final checkpoint holds: `model` of a train job, `student` of a distill job."""
    spec = dep.spec or {}
    return {"train": spec.get("model"), "distill": spec.get("student")}.get(dep.kind)


def reference_mismatch(field: str, expected: ModelSpec, dep: Job) -> str | None:
    """Why job `dep`'s checkpoint cannot be loaded as `expected` (None when it can)."""
    saved = referenced_model(dep)
    if saved is None:
        return None
    diffs = architecture_mismatch(expected, saved)
    if not diffs:
        return None
    return (
        f"job {dep.id} trained a different architecture ({'; '.join(diffs)}); "
        f"make {field.rsplit('.', 1)[0]} match job {dep.id}'s spec or reference another job"
    )
