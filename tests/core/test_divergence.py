"""Divergence beyond NaN/inf: the spike rule, and a real run whose finite loss explodes stops with
"diverged at step N" and keeps its last good checkpoint."""

from __future__ import annotations

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


def test_spike_rule_needs_patience_consecutive_spikes_over_the_running_median() -> None:
    guard = LossSpikeGuard(factor=10, window=5, patience=3, min_history=3)
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


def test_finite_explosion_stops_the_run_and_keeps_the_last_good_checkpoint(
    cache_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    spec = parse_spec(train_spec(12, checkpoint_every=1))
    trainer, _ = build_trainer(spec, tmp_path, cache_dir=cache_dir)
    trainer.spike_guard = LossSpikeGuard(factor=10, window=5, patience=2, min_history=3)
    real_forward = trainer.student.forward_train
    calls = {"n": 0}

    def exploding(images, targets):  # from step 7 on the losses grow 1,000× per step, staying finite
        out = real_forward(images, targets)
        calls["n"] += 1
        boost = 1000.0 ** max(0, calls["n"] - 6)
        out.losses = {k: v * boost for k, v in out.losses.items()}
        return out

    trainer.student.forward_train = exploding
    with pytest.raises(TrainingDiverged, match="diverged at step 8") as err:
        trainer.train()
    assert "running median" in str(err.value)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    # step 7 spiked: its checkpoint was skipped; step 8 confirmed the divergence before its update
    assert names == [ckpt.periodic_name(5), ckpt.periodic_name(6)]
    good = ckpt.load_checkpoint(tmp_path / "checkpoints" / ckpt.periodic_name(6))
    assert good["step"] == 6 and all(torch.isfinite(v).all() for v in good["model"].values() if v.is_floating_point())
