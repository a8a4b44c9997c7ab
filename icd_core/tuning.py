"""Tuned studies, planning side: each method's sweep on the tuning split, and its best setting.

Pure (no torch): the API checks a `tune:` block at submit time with `check_tune`; `icd_core.study` runs
the sweeps. The protocol (docs/sweeps.md#tuned-studies):

- the **tuning split** is carved from data.train: a trial trains on the rest of data.train and is
  evaluated on the held-out part; data.val, which the leaderboard reports, is never read while tuning;
- each method gets one sweep over its own space (default: its loss weight around the paper's, and for
  ICD also the adapter's lr), the paper setting enqueued as trial 0 so tuning can only match or beat it;
- the seeds then run on the full data.train at each method's best setting (`StudySpec.settings`).
"""

from __future__ import annotations

from typing import Any

from .spec import (
    ICD_PAPER_WEIGHT,
    ICD_PRETRAINED,
    PAPER_WEIGHT,
    DataSpec,
    DistillJobSpec,
    StudySpec,
    SubsetSpec,
    SweepSpec,
)
from .sweep_space import apply_params, check_path, check_value

WEIGHT_SPAN = 8.0  # the default weight range: paper weight / 8 .. × 8 (three octaves each way)
ADAPTER_LR_RANGE = (1.0e-4, 1.0e-2)  # the paper's ICD lr (1e-4) up to 100x: short schedules need more


def paper_weight(method: str, detector: str) -> float | None:
    """The method's paper loss weight (None for `none`)."""
    if method in ("icd", ICD_PRETRAINED):
        return ICD_PAPER_WEIGHT[detector]
    return PAPER_WEIGHT.get(method)


def default_space(method: str, detector: str) -> dict[str, dict[str, list[float]]]:
    """The default search space of a method: its weight around the paper's; ICD also its adapter lr."""
    weight = paper_weight(method, detector)
    if weight is None:
        return {}
    space: dict[str, dict[str, list[float]]] = {
        "distill.weight": {"log_uniform": [weight / WEIGHT_SPAN, weight * WEIGHT_SPAN]}
    }
    if method in ("icd", ICD_PRETRAINED):
        space["distill.icd.adapter_lr"] = {"log_uniform": list(ADAPTER_LR_RANGE)}
    return space


def tuned_methods(study: StudySpec) -> list[str]:
    """The methods a tuned study sweeps: every method with a space (`none` only when tune.space names it)."""
    assert study.tune is not None
    detector = study.student.detector
    return [m for m in dict.fromkeys(["none", *study.methods]) if m in study.tune.space or default_space(m, detector)]


def tuning_split(data: DataSpec, fraction: float, seed: int) -> DataSpec:
    """Train on data.train less a held-out part, evaluate on that part: data.val is not used."""
    train = data.train.model_dump(mode="json")

    def part(name: str) -> dict[str, Any]:
        return {**train, "subset": SubsetSpec(fraction=fraction, seed=seed, part=name).model_dump(mode="json")}

    return DataSpec.model_validate({**data.model_dump(mode="json"), "train": part("rest"), "val": part("held_out")})


def paper_setting(method: str, detector: str, space: dict[str, Any]) -> dict[str, Any]:
    """Trial 0 of a method's sweep: the paper's value of each searched field that has one, when in range."""
    paper = {"distill.weight": paper_weight(method, detector), "distill.icd.adapter_lr": 1.0e-4}
    out = {}
    for path, dim in space.items():
        value = paper.get(path)
        if value is None or not isinstance(dim, dict):
            continue
        ((kind, bounds),) = dim.items()
        if kind in ("log_uniform", "uniform") and bounds[0] <= value <= bounds[1]:
            out[path] = value
    return out if len(out) == len(space) else {}


def tuning_sweep(study: StudySpec, method: str, child: DistillJobSpec) -> SweepSpec:
    """The sweep that tunes `method`: `child` (its seed spec) on the tuning split, over the method's space."""
    assert study.tune is not None
    tune = study.tune
    space = {k: v.model_dump(mode="json") for k, v in tune.space.get(method, {}).items()} or default_space(
        method, study.student.detector
    )
    base = apply_params(child, {}, name=f"{study.name}/tune/{method}")
    data = tuning_split(study.data, tune.split, tune.split_seed)
    base = type(child).model_validate({**base.model_dump(mode="json"), "data": data.model_dump(mode="json")})
    enqueue = paper_setting(method, study.student.detector, space)
    return SweepSpec.model_validate(
        {
            "kind": "sweep",
            "name": f"{study.name}/tune/{method}"[-200:],
            "base": base.model_dump(mode="json"),
            "space": space,
            "sampler": tune.sampler.model_dump(mode="json"),
            "pruner": tune.pruner.model_dump(mode="json"),
            "trials": tune.trials,
            "metric": tune.metric,
            "enqueue": [enqueue] if enqueue else [],
            "priority": study.priority,
        }
    )


def tuning_seed(study: StudySpec) -> int:
    assert study.tune is not None
    return study.tune.seed if study.tune.seed is not None else study.seeds[0]


def check_tune(study: StudySpec) -> None:
    """ValueError naming `tune.…` when a method's sweep would be refused (a bad path, range or schedule)."""
    from .study_plan import child_specs

    assert study.tune is not None
    for method in study.tune.space:
        if method not in study.methods and method != "none":
            raise ValueError(f"tune.space.{method}: not one of methods {study.methods}")
    seed = tuning_seed(study)
    teacher = study.teacher.checkpoint or "job:0"
    children = {m: spec for m, s, spec in child_specs(study, teacher) if s == study.seeds[0]}
    for method in tuned_methods(study):
        child = children[method].model_copy(update={"seed": seed})
        try:
            tuning_sweep(study, method, child)
        except ValueError as exc:
            raise ValueError(f"tune ({method}): {_first_problem(exc)}") from None


def check_settings(study: StudySpec) -> None:
    """ValueError naming `settings.<method>.<field>` for a field the method's children do not have, a value
    they refuse, or a field a setting may not change (the child's name, kind, seed, data or teacher)."""
    from .study_plan import child_specs

    children = {m: spec for m, _s, spec in child_specs(study.model_copy(update={"settings": {}}), "job:0")}
    for method, values in study.settings.items():
        child = children.get(method)
        if child is None:
            raise ValueError(f"settings.{method}: not one of methods {study.methods}")
        for path, value in values.items():
            where = f"settings.{method}.{path}"
            if path.split(".")[0] in ("seed", "data", "teacher"):
                raise ValueError(f"{where}: the study sets {path.split('.')[0]} for every child alike")
            try:
                check_path(child.model_dump(mode="json"), path)
            except ValueError as exc:
                raise ValueError(f"{where}: {str(exc).split(': ', 1)[1]}") from None
            check_value(child, path, value, where)


def _first_problem(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        loc = ".".join(str(x) for x in first.get("loc", ()))
        msg = str(first.get("msg", exc)).removeprefix("Value error, ")
        return f"{loc + ': ' if loc else ''}{msg}"
    return str(exc)
