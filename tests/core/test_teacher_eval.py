"""Every distill run measures its teacher on data.val before training: once per (teacher file, validation
data, sizes), cached; teacher_min_ap fails the run before a step; `inherit` that copies nothing fails it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from trainer_specs import TINY_MODEL, distill_spec, train_spec

from icd_core.detectors import build_detector
from icd_core.distill.inherit import inherit_from_teacher, require_inherited
from icd_core.engine.metrics_log import read_metrics_log
from icd_core.leaderboard import build_leaderboard
from icd_core.runner import run_spec
from icd_core.spec import ModelSpec, parse_spec
from icd_core.teacher_eval import CACHE_FOLDER, evaluate_teacher


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    run_spec(parse_spec(train_spec(4)), out, cache_dir=out / "cache")
    return out / "checkpoints" / "final.pt"


def _losses(folder: Path) -> list[float]:
    return [r["loss"] for r in read_metrics_log(folder) if r["type"] == "train"]


def test_the_teacher_ap_is_recorded_beside_the_students_and_evaluated_once(
    teacher: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    spec = parse_spec(distill_spec(str(teacher), iterations=2))
    with caplog.at_level(logging.INFO, logger="icd_core"):
        first = run_spec(spec, tmp_path / "a", cache_dir=cache)
    assert "evaluating on data.val once" in caplog.text and "reused" not in caplog.text
    [cached] = (cache / CACHE_FOLDER).iterdir()
    record = json.loads(cached.read_text())
    assert first.final_metrics["teacher_AP"] == record["metrics"]["AP"]
    assert {"teacher_AP", "teacher_AP50", "teacher_AP75", "AP", "AP50"} <= set(first.final_metrics)
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["final_metrics"]["teacher_AP"] == record["metrics"]["AP"]
    assert summary["teacher_eval"]["checkpoint"] == str(teacher) and summary["teacher_eval"]["reused"] is False

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="icd_core"):
        second = run_spec(spec, tmp_path / "b", cache_dir=cache)
    assert f"reused from the teacher-evaluation cache {cached}" in caplog.text
    assert "evaluating on data.val once" not in caplog.text
    assert second.final_metrics["teacher_AP"] == first.final_metrics["teacher_AP"]
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["teacher_eval"]["reused"] is True
    # The evaluation leaves the run's random streams alone: a cache hit trains exactly as a miss did.
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")


def test_other_validation_data_or_sizes_are_evaluated_again(teacher: Path, tmp_path: Path) -> None:
    spec = parse_spec(distill_spec(str(teacher)))
    base = evaluate_teacher(teacher, spec.data, tmp_path)
    assert evaluate_teacher(teacher, spec.data, tmp_path).reused
    bigger = spec.data.model_copy(update={"min_size": 96, "max_size": 96})
    other_val = spec.data.model_copy(update={"val": spec.data.val.model_copy(update={"seed": 5})})
    for data in (bigger, other_val):
        again = evaluate_teacher(teacher, data, tmp_path)
        assert not again.reused and again.key != base.key
    assert len(list((tmp_path / CACHE_FOLDER).iterdir())) == 3


def test_teacher_min_ap_fails_the_run_before_training(teacher: Path, tmp_path: Path) -> None:
    data = distill_spec(str(teacher))
    data["teacher_min_ap"] = 99.0
    with pytest.raises(ValueError, match=r"teacher AP \d+\.\d is below teacher_min_ap 99\.0 \(AP50 \d+\.\d, on data"):
        run_spec(parse_spec(data), tmp_path / "run", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()
    data["teacher_min_ap"] = 0.0
    run_spec(
        parse_spec({**data, "schedule": {**data["schedule"], "iterations": 1}}),
        tmp_path / "ok",
        cache_dir=tmp_path / "cache",
    )


def test_inheriting_nothing_is_a_failure_that_says_what_to_change() -> None:
    other = {"detector": "faster_rcnn", "backbone": "resnet18", "fpn_channels": 64}  # other names and shapes
    teacher = build_detector(ModelSpec.model_validate(other), 6, 64, 64)
    student = build_detector(ModelSpec.model_validate(TINY_MODEL), 6, 64, 64)
    report = inherit_from_teacher(teacher, student)
    assert report.copied == [] and report.skipped
    with pytest.raises(ValueError) as info:
        require_inherited(report)
    msg = str(info.value)
    assert msg.startswith("distill.inherit: nothing was copied from the teacher")
    assert "model.backbone.fpn., model.head." in msg and "differ in shape" in msg
    assert "not in teacher" in msg and "set distill.inherit: false" in msg and "fpn_channels" in msg
    require_inherited(inherit_from_teacher(student, student))  # something copied: fine


def test_a_run_that_inherits_nothing_fails_before_training(
    teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spec refuses pairs whose necks differ, so an empty copy means the teacher's tensors were named
    unlike the student's; the run stops there instead of training from a random head."""
    import icd_core.runner as runner
    from icd_core.distill.inherit import InheritReport

    monkeypatch.setattr(
        runner, "inherit_from_teacher", lambda t, s: InheritReport([], [("head.x", "not in teacher")], ("head.",))
    )
    with pytest.raises(ValueError, match="distill.inherit: nothing was copied"):
        run_spec(parse_spec(distill_spec(str(teacher))), tmp_path / "run", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_leaderboard_shows_the_teacher_the_runs_measured() -> None:
    rows = [
        {"method": "none", "seed": 0, "metrics": {"AP": 10.0, "teacher_AP": 30.0, "teacher_AP50": 50.0}},
        {"method": "icd", "seed": 0, "metrics": {"AP": 12.0, "teacher_AP": 30.0, "teacher_AP50": 50.0}},
    ]
    report = build_leaderboard(rows)
    assert report["teacher"]["AP"] == 30.0 and report["teacher"]["AP50"] == 50.0
    assert [r["teacher_AP"] for r in report["runs"]] == [30.0, 30.0]
    assert build_leaderboard(rows, teacher={"metrics": {"AP": 31.0}})["teacher"]["AP"] == 31.0
