"""The phase after training (predictions, exports, latency, summary) obeys a stop like training steps do,
and writes summary.json only once ownership was confirmed (issue 23, item 7: a job ran twice at once
because nothing in that phase looked at the lease)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from icd_core.detectors import build_detector
from icd_core.engine.callbacks import Callback, TrainingStopped
from icd_core.export_process import export_in_child
from icd_core.runner import run_spec
from icd_core.spec import ModelSpec, parse_spec
from tests.helpers import TINY_MODEL, tiny_train_spec


class StopAfterTraining(Callback):
    """Asks to stop only once training ended (as a lost lease noticed during the exports would)."""

    def __init__(self, confirm: bool = True, stop: bool = True) -> None:
        self.ended = False
        self.asked_after_end = 0
        self.confirm, self.stop = confirm, stop

    def on_end(self, step: int, final_metrics: dict[str, float]) -> None:
        self.ended = True

    def should_stop(self) -> bool:
        if self.ended:
            self.asked_after_end += 1
        return self.ended and self.stop

    def confirm_ownership(self) -> bool:
        return self.confirm


def _spec(exported: bool = True) -> object:
    spec = tiny_train_spec(iterations=2)
    spec["deploy"] = {"exported_latency": exported, "latency_repeats": 1, "latency_warmup": 0, "prediction_images": 1}
    return parse_spec(spec)


def test_a_stop_during_the_post_training_phase_stops_it_before_any_file(tmp_path: Path) -> None:
    cb = StopAfterTraining()
    with pytest.raises(TrainingStopped):
        run_spec(_spec(), tmp_path, callbacks=[cb])  # type: ignore[arg-type]
    assert cb.asked_after_end >= 1
    assert (tmp_path / "checkpoints" / "final.pt").is_file()  # the trained model is kept
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "predictions").exists()


def test_summary_is_written_only_when_ownership_is_confirmed(tmp_path: Path) -> None:
    with pytest.raises(TrainingStopped):
        run_spec(_spec(exported=False), tmp_path / "a", callbacks=[StopAfterTraining(confirm=False, stop=False)])  # type: ignore[arg-type]
    assert not (tmp_path / "a" / "summary.json").exists()
    run_spec(_spec(exported=False), tmp_path / "b", callbacks=[StopAfterTraining(confirm=True, stop=False)])  # type: ignore[arg-type]
    assert (tmp_path / "b" / "summary.json").is_file()


def test_exports_run_in_a_child_that_a_stop_kills(tmp_path: Path) -> None:
    detector = build_detector(ModelSpec.model_validate(TINY_MODEL), 3, (64,), 64).eval()
    calls = []

    def check() -> None:
        calls.append(1)
        if len(calls) >= 3:
            raise TrainingStopped(7)

    with pytest.raises(TrainingStopped):
        export_in_child(detector, tmp_path / "stopped", ["torchscript", "onnx"], check, poll_s=0.05)
    assert len(calls) == 3 and not (tmp_path / "stopped" / "model.onnx").exists()  # killed before it finished

    errors = export_in_child(detector, tmp_path / "done", ["torchscript", "onnx"], lambda: None)
    assert errors == {}
    loaded = torch.jit.load(str(tmp_path / "done" / "model.torchscript"))
    boxes, scores, labels = loaded(torch.rand(3, 64, 80))
    assert boxes.shape[-1] == 4 and scores.shape == labels.shape
