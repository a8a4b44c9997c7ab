"""Resume is exact: k steps + stop + resume to n gives the per-step losses and weights of n straight steps.

Tolerance: rtol 1e-5 / atol 1e-6 on CPU (0 DataLoader workers). In practice the runs match bit for
bit; the tolerance only absorbs reduction-order noise should a kernel pick another thread split.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from trainer_specs import distill_spec, train_spec

from icd_core.engine import checkpoint as ckpt
from icd_core.engine.callbacks import Callback, TrainingStopped
from icd_core.engine.metrics_log import read_metrics_log
from icd_core.runner import run_spec
from icd_core.spec import parse_spec

RTOL, ATOL = 1e-5, 1e-6
LOSS_KEYS_SKIP = ("lr", "sec_per_step", "data_time", "peak_memory_mb")


class LossLog(Callback):
    def __init__(self, stop_at: int | None = None):
        self.losses: dict[int, dict[str, float]] = {}
        self.stop_at = stop_at
        self.step = 0
        self.start_step: int | None = None

    def on_start(self, step: int, total_steps: int) -> None:
        self.start_step = step

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.losses[step] = {k: v for k, v in metrics.items() if k not in LOSS_KEYS_SKIP}
        self.step = step

    def should_stop(self) -> bool:
        return self.stop_at is not None and self.step >= self.stop_at


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("resume-cache")


def _assert_same_run(straight: LossLog, resumed: dict[int, dict[str, float]], out_a: Path, out_b: Path) -> None:
    assert sorted(resumed) == sorted(straight.losses)
    for step, values in straight.losses.items():
        assert resumed[step].keys() == values.keys()
        for name, v in values.items():
            assert resumed[step][name] == pytest.approx(v, rel=RTOL, abs=ATOL), (step, name)
    a = ckpt.load_checkpoint(out_a / "checkpoints" / "final.pt")
    b = ckpt.load_checkpoint(out_b / "checkpoints" / "final.pt")
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=RTOL, atol=ATOL)
    if "distiller" in a:
        for key, value in a["distiller"].items():
            torch.testing.assert_close(b["distiller"][key], value, rtol=RTOL, atol=ATOL)


def _stop_and_resume(spec_dict: dict, out: Path, cache_dir: Path, k: int) -> dict[int, dict[str, float]]:
    first = LossLog(stop_at=k)
    with pytest.raises(TrainingStopped):
        run_spec(parse_spec(spec_dict), out, callbacks=[first], cache_dir=cache_dir)
    assert ckpt.latest_checkpoint(out / "checkpoints").name == ckpt.periodic_name(k)
    second = LossLog()
    run_spec(parse_spec(spec_dict), out, callbacks=[second], resume=True, cache_dir=cache_dir)
    assert second.start_step == k
    return {**first.losses, **second.losses}


def test_train_resume_matches_straight_run(cache_dir: Path, tmp_path: Path) -> None:
    # multi-scale + flips exercise the data position and the global RNG; lr drops at 3 and 5
    spec = train_spec(5, steps=[3, 5], checkpoint_every=0)
    spec["data"]["min_size"] = [56, 64]
    straight = LossLog()
    run_spec(parse_spec(spec), tmp_path / "a", callbacks=[straight], cache_dir=cache_dir)
    resumed = _stop_and_resume(spec, tmp_path / "b", cache_dir, k=2)
    _assert_same_run(straight, resumed, tmp_path / "a", tmp_path / "b")


def test_icd_distill_resume_matches_straight_run(cache_dir: Path, tmp_path: Path) -> None:
    teacher = run_spec(parse_spec(train_spec(2)), tmp_path / "teacher", cache_dir=cache_dir)
    # bypass ends at step 2, so the resumed half trains the student through ICD; AdamW + cosine resume too
    spec = distill_spec(str(teacher.final_checkpoint), method="icd", iterations=4)
    spec["distill"]["icd"]["bypass_iters"] = 2
    straight = LossLog()
    run_spec(parse_spec(spec), tmp_path / "a", callbacks=[straight], cache_dir=cache_dir)
    resumed = _stop_and_resume(spec, tmp_path / "b", cache_dir, k=2)
    _assert_same_run(straight, resumed, tmp_path / "a", tmp_path / "b")
    # metrics.jsonl: the resumed run's curves equal the straight run's, ICD's diagnostics included
    straight_log, resumed_log = read_metrics_log(tmp_path / "a"), read_metrics_log(tmp_path / "b")
    assert [(r["type"], r["step"]) for r in resumed_log] == [(r["type"], r["step"]) for r in straight_log]
    train_records = [r for r in resumed_log if r["type"] == "train"]
    assert [r["step"] for r in train_records] == list(range(1, 5))
    assert all(0.0 <= r["icd_ident_acc"] <= 1.0 and r["icd_attn_entropy"] >= 0.0 for r in train_records)
    assert any(r["icd_attn_entropy"] > 0.0 for r in train_records)  # 0 only in a batch without objects
    straight_train = [r for r in straight_log if r["type"] == "train"]
    for a, b in zip(straight_train, train_records, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
