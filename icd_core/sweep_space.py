"""A sweep's search space over a base spec's dotted fields: checked at submit, applied per trial.

Pure pydantic and no Optuna, so `icd_core.spec` (and through it the API) validates a sweep without
importing the sampling library: every dotted path must exist in the base spec, and every value the
space can produce (both ends of a range, every choice, every enqueued value) must make a valid base
spec; an error names the field (`space.schedule.lr: ...`). See docs/sweeps.md#the-spec.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

if TYPE_CHECKING:
    from .spec import DistillJobSpec, SweepSpec, TrainSpec

# Fields a trial must not change: they say what the trial is, not how it trains.
FIXED_FIELDS = ("kind", "name")


def get_path(data: dict[str, Any], path: str) -> Any:
    """The value at a dotted path of a dumped spec (KeyError naming the first missing part)."""
    node: Any = data
    for i, key in enumerate(path.split(".")):
        if not isinstance(node, dict) or key not in node:
            where = ".".join(path.split(".")[:i]) or "the spec"
            raise KeyError(f"{where} has no field {key!r}" if isinstance(node, dict) else f"{where} is {node!r}")
        node = node[key]
    return node


def set_path(data: dict[str, Any], path: str, value: Any) -> None:
    """Set a dotted path of a dumped spec in place (its parent must exist; `get_path` checks that)."""
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    node[last] = value


def dim_values(dim: BaseModel) -> list[Any]:
    """The values of a dimension that must validate: both ends of a range, or every choice."""
    kind = next(iter(type(dim).model_fields))
    return list(getattr(dim, kind))


def _is_dict_field(base: dict[str, Any], path: str) -> bool:
    """`distill.options.<name>`: a key of a free-form mapping (the baselines' numeric overrides) may be new."""
    parent, _, _ = path.rpartition(".")
    return bool(parent) and parent == "distill.options" and isinstance(get_path(base, parent), dict)


def check_path(base: dict[str, Any], path: str) -> None:
    """ValueError naming `space.<path>` when the base spec has no such field."""
    if path.split(".")[0] in FIXED_FIELDS:
        raise ValueError(f"space.{path}: a trial's {path} is set by the sweep; search another field")
    try:
        get_path(base, path)
    except KeyError as exc:
        if not _is_dict_field(base, path):
            raise ValueError(f"space.{path}: not a field of base ({exc.args[0]})") from None


def _validation_problem(exc: ValidationError) -> str:
    first = exc.errors()[0]
    loc = ".".join(str(x) for x in first.get("loc", ()))
    return f"{loc + ': ' if loc else ''}{first.get('msg', 'invalid')}"


def apply_params(base: TrainSpec | DistillJobSpec, params: dict[str, Any], name: str | None = None) -> Any:
    """The base spec with each dotted field set to its value (and `name`), validated as the base's class."""
    data = copy.deepcopy(base.model_dump(mode="json"))
    for path, value in params.items():
        set_path(data, path, value)
    if name is not None:
        data["name"] = name[-200:]
    return type(base).model_validate(data)


def check_value(base: TrainSpec | DistillJobSpec, path: str, value: Any, where: str) -> None:
    """ValueError naming `where` when setting `path` to `value` makes the base spec invalid."""
    try:
        apply_params(base, {path: value})
    except ValidationError as exc:
        raise ValueError(f"{where}: {value!r} makes base invalid ({_validation_problem(exc)})") from None


def check_dim(dim: BaseModel) -> str | None:
    """What is wrong with a dimension's own bounds, or None."""
    kind = next(iter(type(dim).model_fields))
    values = getattr(dim, kind)
    if kind == "choice":
        unique = {repr(v) for v in values}
        return None if len(unique) == len(values) else "choice: values repeat"
    lo, hi = values
    if lo >= hi:
        return f"{kind}: lo {lo} must be below hi {hi}"
    if kind == "log_uniform" and lo <= 0:
        return f"log_uniform: lo {lo} must be above 0 (use uniform for a range that includes 0)"
    return None


def in_dim(dim: BaseModel, value: Any) -> bool:
    """Whether a value is one the dimension can produce (an enqueued trial's value)."""
    kind = next(iter(type(dim).model_fields))
    values = getattr(dim, kind)
    if kind == "choice":
        return value in values
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool) and values[0] <= value <= values[1]
    return isinstance(value, (int, float)) and not isinstance(value, bool) and values[0] <= value <= values[1]


def check_enqueued(sweep: SweepSpec) -> None:
    """Each enqueued trial names space fields only, with values its dimension can produce."""
    if len(sweep.enqueue) > sweep.trials:
        raise ValueError(f"enqueue: {len(sweep.enqueue)} trials, more than the budget of {sweep.trials} (trials)")
    for i, params in enumerate(sweep.enqueue):
        for path, value in params.items():
            dim = sweep.space.get(path)
            if dim is None:
                raise ValueError(f"enqueue.{i}.{path}: not in space; enqueue only the fields the sweep searches")
            if not in_dim(dim, value):
                raise ValueError(f"enqueue.{i}.{path}: {value!r} is outside its space {dim.model_dump()}")
            check_value(sweep.base, path, value, f"enqueue.{i}.{path}")


def check_sweep(sweep: SweepSpec) -> None:
    """Every problem of a sweep that a trial would meet, as a ValueError naming the field."""
    base = sweep.base.model_dump(mode="json")
    for path, dim in sweep.space.items():
        check_path(base, path)
        problem = check_dim(dim)
        if problem:
            raise ValueError(f"space.{path}: {problem}")
        for value in dim_values(dim):
            check_value(sweep.base, path, value, f"space.{path}")
    check_enqueued(sweep)
    if sweep.pruner.kind != "none" and sweep.base.schedule.eval_every == 0:
        raise ValueError(
            "base.schedule.eval_every: pruning judges the periodic evaluations; set eval_every > 0 "
            "or pruner: {kind: none}"
        )
    if sweep.pruner.kind != "none" and sweep.base.resources.gpus > 1:
        raise ValueError(
            "base.resources.gpus: a pruned trial is judged in the process that evaluates it, which a "
            "data-parallel group does not share; use gpus: 1 or pruner: {kind: none}"
        )
