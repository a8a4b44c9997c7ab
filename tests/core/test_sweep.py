"""Sweeps without training: the search space's parsing and validation, sampling, pruning decisions, the report."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from icd_core.engine.callbacks import EvalResult
from icd_core.spec import SweepSpec, parse_spec
from icd_core.sweep import (
    PruneDecision,
    PruneOnEvaluation,
    TrialRecord,
    best_params,
    judge,
    report_markdown,
    suggest,
    sweep_report,
    trial_spec,
)
from tests.helpers import tiny_distill_spec, tiny_train_spec


def sweep(**over: Any) -> SweepSpec:
    data = {
        "kind": "sweep",
        "name": "s",
        "base": tiny_train_spec(iterations=8, every=2),
        "space": {"schedule.lr": {"log_uniform": [1e-5, 1.0]}, "schedule.momentum": {"choice": [0.0, 0.9]}},
        "trials": 6,
        **over,
    }
    spec = parse_spec(data)
    assert isinstance(spec, SweepSpec)
    return spec


def refused(**over: Any) -> str:
    with pytest.raises(ValidationError) as info:
        sweep(**over)
    return str(info.value)


# --- the space ---------------------------------------------------------------------------------------------
def test_a_sweep_spec_round_trips_and_applies_its_values() -> None:
    s = sweep(enqueue=[{"schedule.lr": 1e-3}])
    assert parse_spec(s.model_dump(mode="json")) == s  # stored and re-read by the worker
    assert s.device == "cpu" and s.pruner.kind == "median" and s.metric == "AP"
    child = trial_spec(s, 3, {"schedule.lr": 0.02, "schedule.momentum": 0.0})
    assert child.name == "s/trial3" and child.schedule.lr == 0.02 and child.schedule.momentum == 0.0
    assert child.model.fpn_channels == s.base.model.fpn_channels  # the rest is the base's


def test_distill_fields_and_baseline_options_can_be_searched() -> None:
    base = tiny_distill_spec("/x/teacher.pt")
    space = {
        "distill.weight": {"log_uniform": [0.5, 32]},
        "distill.icd.adapter_lr": {"log_uniform": [1e-4, 1e-2]},
        "distill.options.alpha": {"uniform": [0.0, 1.0]},
        "distill.icd.heads": {"choice": [4, 8]},
    }
    s = sweep(base=base, space=space)
    child = trial_spec(s, 0, {"distill.weight": 2.0, "distill.options.alpha": 0.5, "distill.icd.heads": 4})
    assert child.distill.weight == 2.0 and child.distill.options == {"alpha": 0.5} and child.distill.icd.heads == 4


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"schedule.lrr": {"uniform": [0, 1]}}, "space.schedule.lrr: not a field of base (schedule has no field"),
        ({"schedule.lr": {"log_uniform": [1e-5, 20]}}, "space.schedule.lr: 20.0 makes base invalid (schedule.lr:"),
        ({"schedule.lr": {"log_uniform": [0, 1]}}, "space.schedule.lr: log_uniform: lo 0.0 must be above 0"),
        ({"schedule.lr": {"uniform": [1, 0.5]}}, "space.schedule.lr: uniform: lo 1.0 must be below hi 0.5"),
        ({"model.backbone": {"choice": ["resnet18", "vgg"]}}, "space.model.backbone: 'vgg' makes base invalid"),
        ({"schedule.lr": {"uniform": [0.1, 1], "choice": [1]}}, "give exactly one of log_uniform, uniform, int"),
        ({"schedule.lr": {"normal": [0, 1]}}, "give exactly one of log_uniform, uniform, int"),
        ({"name": {"choice": ["a", "b"]}}, "space.name: a trial's name is set by the sweep"),
        ({"schedule.batch_size": {"int": [1, 5000]}}, "space.schedule.batch_size: 5000 makes base invalid"),
        ({"schedule.momentum": {"choice": [0.9, 0.9]}}, "space.schedule.momentum: choice: values repeat"),
    ],
)
def test_a_bad_space_names_the_field(space: dict[str, Any], message: str) -> None:
    assert message in refused(space=space)


def test_enqueued_trials_and_pruning_prerequisites_are_checked() -> None:
    assert "enqueue.0.schedule.lr: 5.0 is outside its space" in refused(enqueue=[{"schedule.lr": 5.0}])
    assert "enqueue.0.schedule.gamma: not in space" in refused(enqueue=[{"schedule.gamma": 0.5}])
    assert "more than the budget" in refused(trials=1, enqueue=[{"schedule.lr": 0.1}, {"schedule.lr": 0.2}])
    no_eval = tiny_train_spec(iterations=8, every=0)
    assert "base.schedule.eval_every: pruning judges the periodic evaluations" in refused(base=no_eval)
    sweep(base=no_eval, pruner={"kind": "none"})  # without a pruner that is fine
    assert "pruner" in refused(pruner={"kind": "hyperband"})


# --- sampling ----------------------------------------------------------------------------------------------
def test_suggest_takes_enqueued_values_first_then_samples_within_the_space_reproducibly() -> None:
    s = sweep(enqueue=[{"schedule.lr": 1e-3}])
    first = suggest(s, [])
    assert first["schedule.lr"] == 1e-3 and first["schedule.momentum"] in (0.0, 0.9)
    history = [TrialRecord(0, first, "succeeded", value=1.0)]
    second = suggest(s, history)
    assert 1e-5 <= second["schedule.lr"] <= 1.0 and second == suggest(s, history)  # same history, same answer
    other_seed = sweep(enqueue=[{"schedule.lr": 1e-3}], sampler={"kind": "tpe", "seed": 7})
    assert suggest(other_seed, history) != second


def test_int_and_random_sampler() -> None:
    s = sweep(space={"schedule.warmup_iters": {"int": [0, 3]}}, sampler={"kind": "random", "seed": 1})
    values = []
    for _n in range(6):
        p = suggest(s, [TrialRecord(i, {"schedule.warmup_iters": v}, "succeeded", 0.0) for i, v in enumerate(values)])
        values.append(p["schedule.warmup_iters"])
    assert all(isinstance(v, int) and 0 <= v <= 3 for v in values) and len(set(values)) > 1


# --- pruning -----------------------------------------------------------------------------------------------
def finished(n: int, values: dict[int, float]) -> TrialRecord:
    return TrialRecord(n, {"schedule.lr": 0.01, "schedule.momentum": 0.9}, "succeeded", 9.0, dict(values))


def test_median_pruner_prunes_below_the_median_of_finished_trials_and_says_so() -> None:
    s = sweep(pruner={"kind": "median", "startup_trials": 2})
    me = TrialRecord(4, {"schedule.lr": 0.5, "schedule.momentum": 0.9})
    history = [finished(0, {2: 10.0, 4: 12.0}), finished(1, {2: 14.0}), finished(2, {2: 20.0})]
    history.append(TrialRecord(3, {"schedule.lr": 0.1}, "pruned", intermediate={2: 1.0}))  # not a finished trial
    low = judge(s, history, me, 2, 12.1)
    assert low.prune and low.reason == "AP 12.1 at step 2, below the median (14.0) of 3 finished trials at that step"
    assert not judge(s, history, me, 2, 14.5).prune
    assert not judge(s, history[:1], me, 2, 0.0).prune  # fewer finished trials than startup_trials


def test_median_pruner_waits_for_its_warmup_and_nan_is_pruned() -> None:
    s = sweep(pruner={"kind": "median", "startup_trials": 1, "warmup_steps": 4})
    me = TrialRecord(1, {"schedule.lr": 0.5})
    history = [finished(0, {2: 10.0, 4: 10.0})]
    assert not judge(s, history, me, 2, 0.0).prune
    assert judge(s, history, me, 4, 0.0).prune
    nan = judge(s, history, me, 4, float("nan"))
    assert nan.prune and nan.reason == "AP is not a number at step 4"


def test_successive_halving_keeps_the_top_fraction_and_records_its_rung() -> None:
    s = sweep(pruner={"kind": "successive_halving", "min_resource": 2, "reduction_factor": 2})
    rivals = [
        TrialRecord(i, {"schedule.lr": 0.01}, "running", intermediate={2: v}, system_attrs={"completed_rung_0": v})
        for i, v in enumerate([1.0, 2.0, 3.0])
    ]
    me = TrialRecord(3, {"schedule.lr": 0.5})
    low = judge(s, rivals, me, 2, 1.5)
    assert low.prune and low.system_attrs == {"completed_rung_0": 1.5}
    assert low.reason == "AP 1.5 at step 2, not in the top 1/2 of the 4 trials that reached rung 0"
    high = judge(s, rivals, me, 2, 2.5)
    assert not high.prune and high.system_attrs == {"completed_rung_0": 2.5}
    assert not judge(sweep(pruner={"kind": "none"}), rivals, me, 2, 0.0).prune


def test_prune_callback_stops_after_a_pruning_verdict_only_before_the_last_step() -> None:
    calls: list[tuple[int, float]] = []

    def ask(step: int, value: float) -> PruneDecision:
        calls.append((step, value))
        return PruneDecision(value < 1.0, "low", {})

    cb = PruneOnEvaluation(ask)
    cb.on_start(0, 8)
    cb.on_evaluation(EvalResult(2, {"AP": 5.0}))
    assert not cb.should_stop()
    cb.on_evaluation(EvalResult(8, {"AP": 0.0}))  # the final evaluation: a trained trial is complete
    assert not cb.should_stop() and calls == [(2, 5.0)]
    cb.on_evaluation(EvalResult(4, {"AP": 0.5}))
    assert cb.should_stop() and cb.decided_at == 4 and cb.decided_value == 0.5


def test_a_failing_pruning_check_never_stops_the_trial() -> None:
    def ask(step: int, value: float) -> PruneDecision:
        raise ConnectionError("database away")

    cb = PruneOnEvaluation(ask)
    cb.on_start(0, 8)
    cb.on_evaluation(EvalResult(2, {"AP": 0.0}))
    assert not cb.should_stop()


# --- the report --------------------------------------------------------------------------------------------
def test_the_report_names_the_best_trial_and_the_pruned_ones_with_their_reasons() -> None:
    s = sweep()
    records = [
        TrialRecord(0, {"schedule.lr": 0.01, "schedule.momentum": 0.9}, "succeeded", 20.0, {2: 10.0}, steps=8),
        TrialRecord(1, {"schedule.lr": 0.02, "schedule.momentum": 0.0}, "succeeded", 25.0, {2: 12.0}, steps=8),
        TrialRecord(2, {"schedule.lr": 0.9, "schedule.momentum": 0.0}, "pruned", 1.0, {2: 1.0}, reason="AP 1.0 ..."),
        TrialRecord(3, {"schedule.lr": 0.7, "schedule.momentum": 0.9}, "failed", reason="diverged at step 3"),
    ]
    records[2].steps = 2
    report = sweep_report(s, records)
    assert report["best"]["number"] == 1 and best_params(report) == {"schedule.lr": 0.02, "schedule.momentum": 0.0}
    assert report["counts"] == {"succeeded": 2, "pruned": 1, "failed": 1} and report["steps_total"] == 18
    md = report_markdown(report)
    assert "Best: trial 1 with schedule.lr=0.02, schedule.momentum=0: AP 25.00." in md
    assert "| 2 | pruned | 0.9 | 0 | 1.00 | 2 | AP 1.0 ... |" in md
    assert best_params(sweep_report(s, records[2:])) is None
    assert report["lineage"] is None and "Lineage" not in md  # no trial recorded one


def test_the_report_warns_when_trials_ran_on_other_code() -> None:
    def lineage(code: str) -> dict:
        return {"code": {"version": code}, "data": {"train": "sha256:aa"}, "teacher_sha256": None}

    records = [
        TrialRecord(0, {"schedule.lr": 0.01}, "succeeded", 20.0, job_id=5, lineage=lineage("abc")),
        TrialRecord(1, {"schedule.lr": 0.02}, "succeeded", 25.0, job_id=6, lineage=lineage("def-dirty")),
        TrialRecord(2, {"schedule.lr": 0.03}, "queued", job_id=7),
    ]
    md = report_markdown(sweep_report(sweep(), records))
    assert md.index("**Warning: the runs did not all run on the same code.version**") < md.index("| trial |")
    assert "| **code.version (differs)** | `def-dirty` | trial 1 (job 6) |" in md
    assert "| data.train | `sha256:aa` | all |" in md and "trial 2 (job 7)." in md
