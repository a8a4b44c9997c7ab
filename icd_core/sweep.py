"""Sweeps, the library side: Optuna's samplers and pruners over trial records we keep ourselves.

Optuna is used as an algorithm library, not as a store. Every decision rebuilds an in-memory Optuna
study from `TrialRecord`s (the service reads them from its own tables, `icd sweep` from trials.json),
asks it, and keeps what it answered (the parameters; the pruner's rung bookkeeping). A decision is
therefore a function of persisted state only, which is what lets a sweep survive a restart of any
process (docs/sweeps.md#storage-and-restarts). Trial n is sampled with seed + n: the same history
gives the same parameters.

- `suggest` gives trial n's parameters (an enqueued trial's first);
- `judge` decides at an evaluation whether a running trial is pruned, and says why;
- `PruneOnEvaluation` is the trainer callback that asks `judge` and stops a pruned trial at that step;
- `sweep_report` / `write_sweep_report` summarise the trials; `run_sweep_local` is `icd sweep`.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .atomic_files import write_text_atomic
from .engine.callbacks import Callback, EvalResult, TrainingDiverged, TrainingStopped
from .lineage_report import lineage_markdown, lineage_summary, lineage_warning
from .spec import DistillJobSpec, SweepSpec, TrainSpec
from .sweep_space import apply_params

log = logging.getLogger(__name__)

# Trial statuses are the job statuses (a trial is a job); the ones that have not ended are "running" to Optuna.
ENDED = ("succeeded", "pruned", "failed", "canceled")
STUDY_NAME = "sweep"


@dataclass
class TrialRecord:
    """One trial as the sweep remembers it: enough to rebuild Optuna's view of it."""

    number: int
    params: dict[str, Any]
    status: str = "running"  # a job status: waiting/queued/running, succeeded, pruned, failed, canceled
    value: float | None = None  # the metric at the end (succeeded trials)
    intermediate: dict[int, float] = field(default_factory=dict)  # step -> metric, from the evaluations
    system_attrs: dict[str, Any] = field(default_factory=dict)  # the pruner's bookkeeping (rungs)
    reason: str | None = None  # why it was pruned or failed
    steps: int | None = None  # training steps it ran
    job_id: int | None = None  # the service's child job
    lineage: dict[str, Any] | None = None  # what it ran on (icd_core.lineage), once its run started


@dataclass
class PruneDecision:
    prune: bool
    reason: str | None
    system_attrs: dict[str, Any]


# --- Optuna --------------------------------------------------------------------------------------------
def _optuna() -> Any:
    import optuna  # imported when a sweep decides something: the API validates sweeps without it

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def distributions(sweep: SweepSpec) -> dict[str, Any]:
    """Optuna's distribution of each searched field."""
    optuna = _optuna()
    d = optuna.distributions
    out: dict[str, Any] = {}
    for path, dim in sweep.space.items():
        kind = next(iter(type(dim).model_fields))
        values = getattr(dim, kind)
        if kind == "log_uniform":
            out[path] = d.FloatDistribution(values[0], values[1], log=True)
        elif kind == "uniform":
            out[path] = d.FloatDistribution(values[0], values[1])
        elif kind == "int":
            out[path] = d.IntDistribution(values[0], values[1])
        else:
            out[path] = d.CategoricalDistribution(tuple(values))
    return out


def _sampler(sweep: SweepSpec, number: int) -> Any:
    optuna = _optuna()
    seed = (sweep.sampler.seed + number) % 2**32
    if sweep.sampler.kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar: parallel trials still running count as bad results, so they are not proposed twice.
    return optuna.samplers.TPESampler(n_startup_trials=sweep.sampler.startup_trials, seed=seed, constant_liar=True)


def _pruner(sweep: SweepSpec) -> Any:
    optuna = _optuna()
    p = sweep.pruner
    if p.kind == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=p.startup_trials,
            n_warmup_steps=p.warmup_steps,
            interval_steps=1,
            n_min_trials=p.min_trials,
        )
    if p.kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=p.min_resource if p.min_resource is not None else "auto",
            reduction_factor=p.reduction_factor,
            min_early_stopping_rate=p.min_early_stopping_rate,
        )
    return optuna.pruners.NopPruner()


def _state(record: TrialRecord) -> Any:
    states = _optuna().trial.TrialState
    if record.status == "succeeded":
        return states.COMPLETE if record.value is not None and math.isfinite(record.value) else states.FAIL
    if record.status == "pruned":
        return states.PRUNED
    if record.status in ("failed", "canceled"):
        return states.FAIL
    return states.RUNNING


def _frozen(record: TrialRecord, dists: dict[str, Any]) -> Any:
    optuna = _optuna()
    state = _state(record)
    params = {k: v for k, v in record.params.items() if k in dists}
    return optuna.trial.create_trial(
        state=state,
        value=record.value if state == optuna.trial.TrialState.COMPLETE else None,
        params=params,
        distributions={k: dists[k] for k in params},
        intermediate_values={int(k): float(v) for k, v in record.intermediate.items()},
        system_attrs=dict(record.system_attrs),
    )


def rebuild(sweep: SweepSpec, records: Sequence[TrialRecord], number: int) -> tuple[Any, Any, int]:
    """(study, storage, study id): an in-memory Optuna study holding `records` as trials 0..n-1."""
    optuna = _optuna()
    storage = optuna.storages.InMemoryStorage()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant_liar is marked experimental
        study = optuna.create_study(
            storage=storage,
            sampler=_sampler(sweep, number),
            pruner=_pruner(sweep),
            study_name=STUDY_NAME,
            direction="maximize",
        )
    dists = distributions(sweep)
    for record in sorted(records, key=lambda r: r.number):
        study.add_trial(_frozen(record, dists))
    return study, storage, storage.get_study_id_from_name(STUDY_NAME)


def suggest(sweep: SweepSpec, records: Sequence[TrialRecord]) -> dict[str, Any]:
    """The parameters of the next trial (number len(records)): its enqueued values, the rest sampled."""
    number = len(records)
    study, _storage, _sid = rebuild(sweep, records, number)
    if number < len(sweep.enqueue):
        study.enqueue_trial(dict(sweep.enqueue[number]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trial = study.ask(fixed_distributions=distributions(sweep))
    return dict(trial.params)


def trial_name(sweep: SweepSpec, number: int) -> str:
    return f"{sweep.name}/trial{number}"


def trial_spec(sweep: SweepSpec, number: int, params: dict[str, Any]) -> TrainSpec | DistillJobSpec:
    """The child job of trial `number`: the base spec with the parameters set."""
    return apply_params(sweep.base, params, name=trial_name(sweep, number))


# --- pruning -------------------------------------------------------------------------------------------
def judge(sweep: SweepSpec, others: Sequence[TrialRecord], me: TrialRecord, step: int, value: float) -> PruneDecision:
    """Whether trial `me`, evaluated at `step` with `value`, stops here: Optuna's pruner over every other
    trial's record, plus the reason in words. `system_attrs` is what the pruner wrote on `me` (keep it)."""
    current = replace(me, status="running", intermediate={**me.intermediate, step: value})
    records = [r for r in others if r.number != me.number] + [current]
    study, storage, sid = rebuild(sweep, records, me.number)
    position = sorted(r.number for r in records).index(me.number)  # Optuna numbers the trials as added
    trial_id = storage.get_trial_id_from_study_id_trial_number(sid, position)
    pruned = bool(study.pruner.prune(study, storage.get_trial(trial_id)))
    attrs = {k: v for k, v in storage.get_trial(trial_id).system_attrs.items() if k != "fixed_params"}
    reason = _reason(sweep, records, current, step, value, attrs) if pruned else None
    return PruneDecision(pruned, reason, attrs)


def _reason(
    sweep: SweepSpec, records: Sequence[TrialRecord], me: TrialRecord, step: int, value: float, attrs: dict[str, Any]
) -> str:
    metric = sweep.metric
    if math.isnan(value):
        return f"{metric} is not a number at step {step}"
    if sweep.pruner.kind == "median":
        finished = [r.intermediate[step] for r in records if _finished(r) and step in r.intermediate]
        best = max(me.intermediate.values())
        median = statistics.median(finished) if finished else float("nan")
        return (
            f"{metric} {best:.1f} at step {step}, below the median ({median:.1f}) of {len(finished)} "
            f"finished trial{'s' if len(finished) != 1 else ''} at that step"
        )
    rungs = sorted(int(k.rsplit("_", 1)[1]) for k in attrs if k.startswith("completed_rung_"))
    rung = rungs[-1] if rungs else 0
    key = f"completed_rung_{rung}"
    reached = sum(1 for r in records if r.number != me.number and key in r.system_attrs) + 1
    factor = getattr(sweep.pruner, "reduction_factor", 3)
    return (
        f"{metric} {value:.1f} at step {step}, not in the top 1/{factor} of the {reached} "
        f"trial{'s' if reached != 1 else ''} that reached rung {rung}"
    )


def _finished(record: TrialRecord) -> bool:
    return record.status == "succeeded" and record.value is not None


class KeepLineage(Callback):
    """Puts a trial's lineage on its record as its run starts, so a pruned or failed trial keeps it too."""

    def __init__(self, record: TrialRecord) -> None:
        self.record = record

    def on_lineage(self, lineage: dict[str, Any]) -> None:
        self.record.lineage = lineage


class PruneOnEvaluation(Callback):
    """Asks the sweep at each periodic evaluation whether this trial goes on; a pruned trial stops at that
    step (the trainer checkpoints it and raises TrainingStopped) with `decision` set.

    `ask(step, value)` is the sweep's judge (the service's reads its database, `icd sweep`'s its trial
    file). The final evaluation is not judged: a trial that trained to the end is complete. A judge that
    fails is logged and the trial goes on: a pruning check never costs a trial.
    """

    def __init__(self, ask: Callable[[int, float], PruneDecision], metric: str = "AP") -> None:
        self.ask = ask
        self.metric = metric
        self.total: int | None = None
        self.decision: PruneDecision | None = None
        self.decided_at: int | None = None
        self.decided_value: float | None = None

    def on_start(self, step: int, total_steps: int) -> None:
        self.total = total_steps

    def on_evaluation(self, result: EvalResult) -> None:
        value = result.metrics.get(self.metric)
        if value is None or self.decision is not None or (self.total is not None and result.step >= self.total):
            return
        try:
            decision = self.ask(result.step, float(value))
        except Exception:  # noqa: BLE001 - a failed check must not fail the trial
            log.exception("pruning check at step %s failed; the trial goes on", result.step)
            return
        if decision.prune:
            log.info("trial pruned at step %s: %s", result.step, decision.reason)
            self.decision, self.decided_at, self.decided_value = decision, result.step, float(value)

    def should_stop(self) -> bool:
        return self.decision is not None


# --- the report ----------------------------------------------------------------------------------------
def best_trial(records: Sequence[TrialRecord]) -> TrialRecord | None:
    """The succeeded trial with the highest metric (the lowest number on a tie), or None."""
    done = [r for r in records if _finished(r) and r.value is not None and math.isfinite(r.value)]
    return max(done, key=lambda r: (r.value, -r.number)) if done else None


def sweep_report(sweep: SweepSpec, records: Sequence[TrialRecord]) -> dict[str, Any]:
    """The sweep's result: the best trial, every trial (params, status, metric, steps, reason), counts."""
    best = best_trial(records)
    counts: dict[str, int] = {}
    for r in records:
        counts[r.status] = counts.get(r.status, 0) + 1
    return {
        "name": sweep.name,
        "metric": sweep.metric,
        "budget": sweep.trials,
        "sampler": sweep.sampler.model_dump(mode="json"),
        "pruner": sweep.pruner.model_dump(mode="json"),
        "space": {k: v.model_dump(mode="json") for k, v in sweep.space.items()},
        "best": asdict(best) if best else None,
        "counts": counts,
        "steps_total": sum(r.steps or 0 for r in records),
        "trials": [asdict(r) for r in sorted(records, key=lambda r: r.number)],
        "lineage": lineage_summary([asdict(r) for r in sorted(records, key=lambda r: r.number)]),
    }


def best_params(report: dict[str, Any]) -> dict[str, Any] | None:
    """The best trial's parameters (dotted field -> value), for a caller that tunes before it compares."""
    best = report.get("best")
    return dict(best["params"]) if best else None


def report_markdown(report: dict[str, Any]) -> str:
    metric = report["metric"]
    best = report["best"]
    lines = [f"# Sweep {report['name']}", ""]
    if best:
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in best["params"].items())
        lines.append(f"Best: trial {best['number']} with {params}: {metric} {best['value']:.2f}.")
    else:
        lines.append(f"No trial finished with a {metric}.")
    counts = ", ".join(f"{n} {status}" for status, n in sorted(report["counts"].items()))
    lines += [f"Trials: {counts} (budget {report['budget']}); {report['steps_total']} training steps in all.", ""]
    warning = lineage_warning(report.get("lineage"))
    lines += [warning, ""] if warning else []
    names = list(report["space"])
    lines.append("| trial | status | " + " | ".join(names) + f" | {metric} | steps | note |")
    lines.append("|---" * (len(names) + 5) + "|")
    for t in report["trials"]:
        value = f"{t['value']:.2f}" if t["value"] is not None else "-"
        cells = [str(t["number"]), t["status"], *(_fmt(t["params"].get(n)) for n in names), value]
        lines.append("| " + " | ".join([*cells, str(t["steps"] or "-"), (t["reason"] or "").replace("|", "/")]) + " |")
    lines += lineage_markdown(report.get("lineage"))
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_sweep_report(report: dict[str, Any], folder: Path) -> dict[str, Path]:
    """report.json and report.md in `folder` (atomic writes: a reader never sees half a report)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "report.json", "md": folder / "report.md"}
    write_text_atomic(paths["json"], json.dumps(report, indent=2))
    write_text_atomic(paths["md"], report_markdown(report))
    return paths


# --- running a sweep locally (`icd sweep`) ---------------------------------------------------------------
TRIALS_FILE = "trials.json"
CallbacksFactory = Callable[[str], Sequence[Callback]]


def _load_records(path: Path) -> list[TrialRecord]:
    if not path.is_file():
        return []
    rows = json.loads(path.read_text())
    return [TrialRecord(**{**r, "intermediate": {int(k): v for k, v in r["intermediate"].items()}}) for r in rows]


def _save_records(path: Path, records: Sequence[TrialRecord]) -> None:
    write_text_atomic(path, json.dumps([asdict(r) for r in records], indent=2))


def run_sweep_local(
    sweep: SweepSpec, output_dir: str | Path, cache_dir: str | Path, callbacks_factory: CallbacksFactory | None = None
) -> dict[str, Any]:
    """Run the trials one after another into output_dir/trial<N>/, pruning by the same rules as the service.

    Resumable: trials.json records every trial as it starts and ends, so a rerun skips the ended ones and
    resumes an interrupted one from its last checkpoint. `parallel` does not apply: one process, one trial.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "sweep.json"
    spec_json = sweep.model_dump(mode="json")
    if saved.is_file() and json.loads(saved.read_text()) != spec_json:
        raise ValueError(f"{out} holds another sweep; choose another --output folder (or delete it to rerun)")
    write_text_atomic(saved, json.dumps(spec_json, indent=2))
    path = out / TRIALS_FILE
    records = _load_records(path)
    while True:
        pending = [r for r in records if r.status not in ENDED]
        if not pending and len(records) >= sweep.trials:
            break
        record = pending[0] if pending else TrialRecord(len(records), suggest(sweep, records))
        if not pending:
            records.append(record)
            _save_records(path, records)
        _run_local_trial(sweep, records, record, out, Path(cache_dir), callbacks_factory)
        _save_records(path, records)
    report = sweep_report(sweep, records)
    write_sweep_report(report, out)
    return report


def _run_local_trial(
    sweep: SweepSpec,
    records: list[TrialRecord],
    record: TrialRecord,
    out: Path,
    cache: Path,
    callbacks_factory: CallbacksFactory | None,
) -> None:
    """Run one trial to its end (succeeded, pruned or failed), updating `record` in place."""
    from .runner import run_spec  # torch-heavy

    spec = trial_spec(sweep, record.number, record.params)

    def ask(step: int, value: float) -> PruneDecision:
        record.intermediate[step] = value
        decision = judge(sweep, records, record, step, value)
        record.system_attrs.update(decision.system_attrs)
        return decision

    pruner = PruneOnEvaluation(ask, sweep.metric)
    extra = list(callbacks_factory(spec.name)) if callbacks_factory else []
    log.info("trial %d: %s", record.number, record.params)
    try:
        folder = out / f"trial{record.number}"
        result = run_spec(spec, folder, [*extra, pruner, KeepLineage(record)], resume=True, cache_dir=cache)
    except TrainingStopped as stop:
        if pruner.decision is None:
            raise
        record.status, record.reason, record.steps = "pruned", pruner.decision.reason, stop.step
        record.value = pruner.decided_value  # the metric where it stopped (as the service reports it)
        return
    except TrainingDiverged as exc:
        record.status, record.reason, record.steps = "failed", str(exc), exc.step
        return
    value = result.final_metrics.get(sweep.metric)
    record.value = float(value) if value is not None else None
    record.status, record.steps = "succeeded", int(result.final_metrics.get("step", 0)) or None
    if result.evaluation is not None and record.value is not None:
        record.intermediate[result.evaluation.step] = record.value


def tune_local(
    base: TrainSpec | DistillJobSpec,
    space: dict[str, Any],
    output_dir: str | Path,
    cache_dir: str | Path,
    callbacks_factory: CallbacksFactory | None = None,
    **options: Any,
) -> dict[str, Any] | None:
    """Run a sweep over `base` locally and return its best parameters (None when no trial finished): the
    hook a study that tunes each method before it compares calls. `options` are SweepSpec fields
    (trials, sampler, pruner, enqueue, metric, name)."""
    data = {"kind": "sweep", "name": f"{base.name}/tune", **options, "base": base.model_dump(mode="json")}
    sweep = SweepSpec.model_validate({**data, "space": space})
    return best_params(run_sweep_local(sweep, output_dir, cache_dir, callbacks_factory))
