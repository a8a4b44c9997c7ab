"""Trainer: schedule, checkpoints (atomic, retained, loadable), callbacks, frozen teacher, stop and NaN guards."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from trainer_specs import distill_spec, train_spec

from icd_core.detectors import load_detector
from icd_core.engine import checkpoint as ckpt
from icd_core.engine.amp import resolve_amp
from icd_core.engine.callbacks import Callback, CheckpointInfo, EvalResult, TrainingDiverged, TrainingStopped
from icd_core.engine.schedule import warmup_multistep
from icd_core.runner import build_trainer, run_spec
from icd_core.spec import parse_spec


class Recorder(Callback):
    """Collects every callback event; optionally requests a stop after a given step."""

    def __init__(self, stop_at: int | None = None):
        self.starts: list[tuple[int, int]] = []
        self.metrics: dict[int, dict[str, float]] = {}
        self.evals: list[EvalResult] = []
        self.checkpoints: list[CheckpointInfo] = []
        self.ends: list[int] = []
        self.lineages: list[dict] = []
        self.stop_at = stop_at
        self.step = 0

    def on_start(self, step: int, total_steps: int) -> None:
        self.starts.append((step, total_steps))

    def on_lineage(self, lineage: dict) -> None:
        assert not self.starts, "the lineage is told before training starts"
        self.lineages.append(lineage)

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics[step] = dict(metrics)
        self.step = step

    def on_evaluation(self, result: EvalResult) -> None:
        self.evals.append(result)

    def on_checkpoint(self, info: CheckpointInfo) -> None:
        self.checkpoints.append(info)

    def on_end(self, step: int, final_metrics: dict[str, float]) -> None:
        self.ends.append(step)

    def should_stop(self) -> bool:
        return self.stop_at is not None and self.step >= self.stop_at


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("icd-cache")


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tuple[Path, Recorder]:
    """A 4-step tiny teacher with evaluation every 2 steps and a checkpoint every step."""
    out = tmp_path_factory.mktemp("teacher")
    rec = Recorder()
    spec = parse_spec(train_spec(4, eval_every=2, checkpoint_every=1))
    run_spec(spec, out, callbacks=[rec], cache_dir=cache_dir)
    return out, rec


def test_warmup_multistep_factors() -> None:
    f = warmup_multistep(warmup_iters=10, warmup_factor=0.001, steps=[20, 30], gamma=0.1)
    assert f(0) == pytest.approx(0.001)
    assert f(5) == pytest.approx(0.001 * 0.5 + 0.5)
    assert f(10) == 1.0 and f(19) == 1.0
    assert f(20) == pytest.approx(0.1) and f(30) == pytest.approx(0.01)
    assert warmup_multistep(0, 0.001, [], 0.1)(0) == 1.0


def test_amp_is_off_on_cpu() -> None:
    for mode in ("auto", "bf16", "fp16", "off"):
        amp = resolve_amp(mode, torch.device("cpu"))
        assert not amp.enabled and not amp.needs_scaler


def test_atomic_save_leaves_no_tmp_and_keeps_old_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    ckpt.atomic_save({"a": torch.ones(2)}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    with pytest.raises((pickle.PicklingError, AttributeError)):
        ckpt.atomic_save({"bad": lambda: 0}, path)  # unpicklable: the write fails midway
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    assert torch.equal(ckpt.load_checkpoint(path)["a"], torch.ones(2))


def test_retention_and_latest(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        ckpt.atomic_save({"step": step}, tmp_path / ckpt.periodic_name(step))
    ckpt.prune_periodic(tmp_path, keep=2)
    assert [s for s, _ in ckpt.periodic_checkpoints(tmp_path)] == [2, 3]
    assert ckpt.latest_checkpoint(tmp_path).name == ckpt.periodic_name(3)
    ckpt.atomic_save({"step": 4}, tmp_path / ckpt.FINAL_NAME)
    assert ckpt.latest_checkpoint(tmp_path).name == ckpt.FINAL_NAME
    assert ckpt.latest_checkpoint(tmp_path / "missing") is None


def test_rng_state_round_trip() -> None:
    import random

    import numpy as np

    ckpt.seed_everything(3)
    state = ckpt.capture_rng()
    a = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.restore_rng(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_train_run_events_checkpoints_and_summary(teacher_run: tuple[Path, Recorder]) -> None:
    out, rec = teacher_run
    assert rec.starts == [(0, 4)] and rec.ends == [4]
    assert sorted(rec.metrics) == [1, 2, 3, 4]
    m = rec.metrics[1]
    for key in ("classification", "bbox_regression", "loss", "lr", "sec_per_step", "data_time", "peak_memory_mb"):
        assert key in m
    assert m["lr"] == pytest.approx(0.01 * 0.001)  # first warm-up step uses warmup_factor x lr
    assert rec.metrics[3]["lr"] == pytest.approx(0.001)  # default steps [2, 3] of 4: one drop passed
    assert [e.step for e in rec.evals] == [2, 4]
    assert set(rec.evals[-1].metrics) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    # every step checkpointed, the last two periodic ones kept, plus final.pt; never a .tmp left
    assert [c.name for c in rec.checkpoints] == [ckpt.periodic_name(s) for s in (1, 2, 3)] + ["final.pt"]
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == sorted([ckpt.periodic_name(2), ckpt.periodic_name(3), "final.pt"])
    final = rec.checkpoints[-1]
    assert final.final and final.step == 4 and final.sha256 == ckpt.sha256_file(final.path)
    assert final.size_bytes == final.path.stat().st_size
    # final.pt is a detector checkpoint too
    det, meta = load_detector(final.path, 64, 64)
    assert meta["num_classes"] == det.num_classes == 6 and len(meta["class_names"]) == 6
    assert meta["step"] == 4 and meta["data_position"] == 8
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_checkpoint"] == str(final.path)
    assert summary["final_metrics"]["AP"] == rec.evals[-1].metrics["AP"]
    # what it ran on: told to the callbacks once, before the first step, and kept in summary.json
    assert len(rec.lineages) == 1 and summary["lineage"] == rec.lineages[0]
    lineage = summary["lineage"]
    assert lineage["code"]["version"] and len(lineage["code"]["sources_sha256"]) == 64
    assert lineage["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert set(lineage["data"]) == {"train", "val"} and all(h.startswith("sha256:") for h in lineage["data"].values())
    assert lineage["teacher_sha256"] is None


@pytest.mark.parametrize("method", ["icd", "fitnet"])
def test_teacher_is_frozen_and_bit_identical(
    method: str, teacher_run: tuple[Path, Recorder], cache_dir: Path, tmp_path: Path
) -> None:
    teacher_ckpt = teacher_run[0] / "checkpoints" / "final.pt"
    spec = parse_spec(distill_spec(str(teacher_ckpt), method=method, iterations=3))
    trainer, extra = build_trainer(spec, tmp_path, cache_dir=cache_dir)
    assert extra["inherit_copied"] > 0
    before_teacher = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    before_student = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    teacher_ids = {id(p) for p in trainer.teacher.parameters()}
    for opt in filter(None, (trainer.optimizer, trainer.distill_optimizer)):
        assert not any(id(p) in teacher_ids for g in opt.param_groups for p in g["params"])
    trainer.train()
    assert not trainer.teacher.training
    assert all(not p.requires_grad for p in trainer.teacher.parameters())
    after = trainer.teacher.state_dict()
    assert all(torch.equal(before_teacher[k], after[k]) for k in before_teacher)
    student_after = trainer.student.state_dict()
    assert any(not torch.equal(before_student[k], student_after[k]) for k in before_student)
    state = ckpt.load_checkpoint(tmp_path / "checkpoints" / "final.pt")
    assert state["distill_method"] == method
    assert not any(k.startswith(("teacher.", "student.")) for k in state["distiller"])


class PoisonAfterCheckpoint(Recorder):
    """Writes NaN into a student weight right after the step-`at` checkpoint is on disk."""

    def __init__(self, model: torch.nn.Module, at: int):
        super().__init__()
        self.model, self.at = model, at

    def on_checkpoint(self, info: CheckpointInfo) -> None:
        super().on_checkpoint(info)
        if info.step == self.at:
            with torch.no_grad():
                next(p for p in self.model.parameters() if p.requires_grad).fill_(float("nan"))


def test_nan_guard_raises_and_keeps_last_good_checkpoint(cache_dir: Path, tmp_path: Path) -> None:
    spec = parse_spec(train_spec(6, checkpoint_every=1))
    trainer, _ = build_trainer(spec, tmp_path, cache_dir=cache_dir)
    poison = PoisonAfterCheckpoint(trainer.student, at=2)
    trainer.callbacks.append(poison)
    with pytest.raises(TrainingDiverged, match="diverged at step 3"):
        trainer.train()
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [ckpt.periodic_name(1), ckpt.periodic_name(2)]
    good = ckpt.load_checkpoint(folder / ckpt.periodic_name(2))
    assert good["step"] == 2
    assert all(torch.isfinite(v).all() for v in good["model"].values() if v.is_floating_point())


def test_should_stop_writes_checkpoint_and_raises(cache_dir: Path, tmp_path: Path) -> None:
    rec = Recorder(stop_at=2)
    spec = parse_spec(train_spec(5, checkpoint_every=0))
    with pytest.raises(TrainingStopped) as info:
        run_spec(spec, tmp_path, callbacks=[rec], cache_dir=cache_dir)
    assert info.value.step == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [ckpt.periodic_name(2)]
    assert [c.step for c in rec.checkpoints] == [2] and rec.ends == []
    # a second run into the same folder must resume explicitly
    with pytest.raises(ValueError, match="resume"):
        run_spec(spec, tmp_path, cache_dir=cache_dir)


def test_runner_user_errors(teacher_run: tuple[Path, Recorder], cache_dir: Path, tmp_path: Path) -> None:
    teacher_ckpt = str(teacher_run[0] / "checkpoints" / "final.pt")
    with pytest.raises(ValueError, match="job:<id> references need the service"):
        run_spec(parse_spec(distill_spec("job:7")), tmp_path / "a", cache_dir=cache_dir)
    with pytest.raises(FileNotFoundError, match="teacher.checkpoint"):
        run_spec(parse_spec(distill_spec(str(tmp_path / "nope.pt"))), tmp_path / "b", cache_dir=cache_dir)
    fewer = distill_spec(teacher_ckpt)
    fewer["data"]["train"]["num_classes"] = 3
    fewer["data"]["val"]["num_classes"] = 3
    with pytest.raises(ValueError, match="teacher.checkpoint: .* 6 classes but data.train has 3"):
        run_spec(parse_spec(fewer), tmp_path / "c", cache_dir=cache_dir)
    other = distill_spec(teacher_ckpt)
    other["teacher"]["backbone"] = "resnet34"
    with pytest.raises(ValueError, match="backbone"):
        run_spec(parse_spec(other), tmp_path / "d", cache_dir=cache_dir)
    with pytest.raises(NotImplementedError):
        study = {**distill_spec(teacher_ckpt), "kind": "study"}
        study.pop("distill")
        run_spec(parse_spec(study), tmp_path / "e", cache_dir=cache_dir)
