"""Divergence beyond NaN/inf: the spike rules, and a real run whose finite loss explodes stops with
"diverged at step N" and keeps its last good checkpoint; every healthy run of benchmarks/results
replays through the rules without tripping them."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
from test_trainer import cache_dir  # noqa: F401  (session fixture)
from trainer_specs import train_spec

from icd_core.engine import checkpoint as ckpt
from icd_core.engine.callbacks import TrainingDiverged
from icd_core.engine.divergence import LossSpikeGuard
from icd_core.runner import build_trainer
from icd_core.spec import parse_spec

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
LOSS_KEYS = ("loss", "classification", "bbox_regression", "fgd_total")  # and every loss_* key


def test_spike_rule_needs_patience_consecutive_spikes_over_the_running_median() -> None:
    guard = LossSpikeGuard(factor=10, window=5, patience=3, min_history=3, jump_factor=None)
    for step, loss in enumerate([5.0, 3.0, 2.0, 1.5, 1.2], start=1):  # a normal fast fall
        assert guard.update(step, loss) is None
    assert guard.update(6, 40.0) is None and guard.suspect  # one freak batch (> 10 × median 2.0) ...
    assert guard.update(7, 1.1) is None and not guard.suspect  # ... then back: not a divergence
    assert guard.update(8, 1738.0) is None
    assert guard.update(9, 9.0e4) is None
    reason = guard.update(10, 8.3e5)
    assert reason is not None and "since step 8" in reason and "running median 1.5" in reason


def test_spiking_steps_do_not_raise_the_bar() -> None:
    guard = LossSpikeGuard(factor=10, window=3, patience=4, min_history=3)
    for step in range(1, 4):
        guard.update(step, 1.0)
    for step in range(4, 7):
        assert guard.update(step, 50.0) is None  # spikes stay out of the history
    assert list(guard.history) == [1.0, 1.0, 1.0]
    assert guard.update(7, 50.0) is not None


def test_early_steps_only_fill_the_history() -> None:
    guard = LossSpikeGuard(factor=10, window=50, patience=1, min_history=20)
    assert all(guard.update(s, 1000.0 if s == 1 else 1.0) is None for s in range(1, 21))
    with pytest.raises(ValueError):
        LossSpikeGuard(factor=1.0)
    with pytest.raises(ValueError):
        LossSpikeGuard(factor=10, jump_factor=5)


def test_a_one_step_explosion_that_returns_at_once_is_a_divergence() -> None:
    """The reported FGFI run: 22 → 5,872,373 for one step, then back; patience alone let it through."""
    healthy = [30.0, 27.0, 25.0] + [22.0 + (i % 3) for i in range(20)]
    for guard, expect_stop in ((LossSpikeGuard(jump_factor=None), False), (LossSpikeGuard(), True)):
        reasons = [guard.update(s, v) for s, v in enumerate([*healthy, 5_872_373.0, 22.0, 21.0], start=1)]
        stop = [(s, r) for s, r in enumerate(reasons, start=1) if r is not None]
        if expect_stop:
            assert stop == [(24, stop[0][1])] and "in one step (step 24)" in stop[0][1], stop
        else:
            assert stop == []  # the patience rule alone: the run ended `succeeded`


def test_one_step_rule_waits_for_the_warm_up_and_ignores_jumps_below_its_factor() -> None:
    guard = LossSpikeGuard(min_history=20)
    assert all(guard.update(s, 1e6 if s == 2 else 1.0) is None for s in range(1, 21))  # warm-up: history only
    guard = LossSpikeGuard(window=50, min_history=20)
    for step in range(1, 21):
        guard.update(step, 1.0)
    assert guard.update(21, 99.0) is None and guard.suspect  # 99×: a spike for the patience rule only
    assert guard.update(22, 1.0) is None and not guard.suspect
    assert guard.update(23, 101.0) is not None


def _loss_series(path: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Every loss column of a metrics.jsonl (train rows: means over each log_every window) -> (steps, values)."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        if row.get("type") != "train":
            continue
        for key, value in row.items():
            if key in LOSS_KEYS or key.startswith("loss_"):
                steps, values = out.setdefault(key, ([], []))
                steps.append(int(row["step"]))
                values.append(float(value))
    return out


def _worst_window_bound(steps: list[int], values: list[float], window: int = 50, warm_up: int = 20) -> float:
    """Over the logged windows, the most any one step could be × the median of the previous logged means:
    a window of n steps (losses ≥ 0) averaging m holds no step above n·m."""
    worst = 0.0
    for i in range(warm_up, len(values)):
        median = statistics.median(values[max(0, i - window) : i])
        worst = max(worst, (steps[i] - steps[i - 1]) * values[i] / median)
    return worst


def test_every_healthy_benchmark_run_replays_without_tripping_either_rule() -> None:
    """Each loss series of each benchmarks/results/**/metrics.jsonl, fed row by row to a default guard.

    The rows are log_every-step means, so the guard here sees smoother values than the trainer's
    per-step feed; `_worst_window_bound` covers that: even if a whole window's loss had sat in one
    step, that step would stay below jump_factor × the running median.
    """
    files = sorted(RESULTS.rglob("metrics.jsonl"))
    runs = points = compared = 0
    worst = 0.0
    for path in files:
        for key, (steps, values) in _loss_series(path).items():
            guard = LossSpikeGuard()
            tripped = [(s, r) for s, v in zip(steps, values, strict=True) if (r := guard.update(s, v)) is not None]
            assert tripped == [], f"{path.relative_to(RESULTS)} {key}: {tripped}"
            assert not guard.suspect, f"{path.relative_to(RESULTS)} {key} ends on a spike"
            worst = max(worst, _worst_window_bound(steps, values))
            runs += key == "loss"
            points += len(values)
            compared += max(0, len(values) - guard.min_history)  # the rows after the warm-up
    assert len(files) >= 27 and runs == len(files) and points > 10_000 and compared > 5_000, (runs, points, compared)
    assert worst < LossSpikeGuard().jump_factor, worst


def _growing(n: int) -> float:  # from step 7 on the losses grow 1,000× per step, staying finite
    return 1000.0 ** max(0, n - 6)


def _one_step(n: int) -> float:  # step 7 alone is 100,000× its neighbours (the FGFI report's shape)
    return 1e5 if n == 7 else 1.0


@pytest.mark.parametrize(
    ("boost", "jump_factor", "stop_step", "reason", "kept"),
    [
        # step 7 spiked: its checkpoint was skipped; step 8 confirmed the divergence before its update
        (_growing, None, 8, "running median", [5, 6]),
        # the one-step rule stops step 7 before its update and checkpoint, though step 8 would be back
        (_one_step, 100.0, 7, "in one step", [5, 6]),
    ],
)
def test_finite_explosion_stops_the_run_and_keeps_the_last_good_checkpoint(
    cache_dir: Path,  # noqa: F811
    tmp_path: Path,
    boost,
    jump_factor: float | None,
    stop_step: int,
    reason: str,
    kept: list[int],
) -> None:
    spec = parse_spec(train_spec(12, checkpoint_every=1))
    trainer, _ = build_trainer(spec, tmp_path, cache_dir=cache_dir)
    trainer.spike_guard = LossSpikeGuard(factor=10, window=5, patience=2, min_history=3, jump_factor=jump_factor)
    real_forward = trainer.student.forward_train
    calls = {"n": 0}

    def exploding(images, targets):
        out = real_forward(images, targets)
        calls["n"] += 1
        out.losses = {k: v * boost(calls["n"]) for k, v in out.losses.items()}
        return out

    trainer.student.forward_train = exploding
    with pytest.raises(TrainingDiverged, match=f"diverged at step {stop_step}") as err:
        trainer.train()
    assert reason in str(err.value) and "lower schedule.lr" in str(err.value)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [ckpt.periodic_name(s) for s in kept]
    good = ckpt.load_checkpoint(tmp_path / "checkpoints" / ckpt.periodic_name(kept[-1]))
    assert good["step"] == kept[-1]
    assert all(torch.isfinite(v).all() for v in good["model"].values() if v.is_floating_point())
