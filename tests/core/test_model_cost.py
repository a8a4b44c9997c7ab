"""Model cost: the figures are what they claim (FLOPs scale with pixels, memory covers the weights), every
train/distill summary carries them, and the study leaderboard turns them into columns and ratios."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from trainer_specs import CHEAP_DEPLOY, TINY_MODEL, distill_spec, train_spec

from icd_core.detectors import build_detector
from icd_core.hashing import sha256_file
from icd_core.leaderboard import build_leaderboard, leaderboard_markdown, vs_teacher_text, write_report
from icd_core.model_cost import count_gflops, measure_cost, peak_inference_mb
from icd_core.runner import run_spec
from icd_core.spec import ModelSpec, parse_spec
from icd_core.study import child_result


def tiny_model() -> torch.nn.Module:
    return build_detector(ModelSpec.model_validate(TINY_MODEL), 4, 64, 64).model.eval()


def test_flops_scale_with_pixels_and_memory_covers_the_weights() -> None:
    model = tiny_model()
    small = count_gflops(lambda: model([torch.rand(3, 64, 64)]))
    # The model resizes to min_size 64 / max_size 64 itself: give it room for a 4x larger input.
    model.transform.min_size, model.transform.max_size = (128,), 128
    big = count_gflops(lambda: model([torch.rand(3, 128, 128)]))
    assert small > 0 and 3.5 < big / small < 4.5  # convolutions dominate: FLOPs ~ pixels
    weights_mb = sum(p.numel() * 4 for p in model.parameters()) / 2**20
    peak = peak_inference_mb(model, lambda: model([torch.rand(3, 128, 128)]), torch.device("cpu"))
    assert weights_mb < peak < weights_mb + 200


def test_measure_cost_reports_every_runtime_given() -> None:
    model = tiny_model()
    calls = []
    cost = measure_cost(
        model, torch.rand(3, 64, 64), repeats=3, warmup=1, exported={"other": lambda image: calls.append(image.shape)}
    )
    assert cost.params_m == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6)
    assert set(cost.latency_ms) == {"eager", "other"} and all(v > 0 for v in cost.latency_ms.values())
    assert len(calls) == 4 and cost.image_size == [64, 64] and cost.repeats == 3 and not model.training


def test_train_and_distill_summaries_carry_cost_and_predictions(tmp_path: Path) -> None:
    deploy = {**CHEAP_DEPLOY, "exported_latency": True, "prediction_images": 2}
    teacher = run_spec(parse_spec({**train_spec(2), "deploy": deploy}), tmp_path / "t", cache_dir=tmp_path / "c")
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    cost = summary["model_cost"]
    assert set(cost["latency_ms"]) == {"eager", "torchscript", "onnxruntime"} and cost["gflops"] > 0
    assert cost["device"] == "cpu" and cost["repeats"] == 2 and "export_errors" not in cost
    assert teacher.final_metrics["cost_latency_ms_onnxruntime"] == cost["latency_ms"]["onnxruntime"]
    assert teacher.final_metrics["cost_params_m"] == pytest.approx(cost["params_m"])
    preds = tmp_path / "t" / "predictions"
    assert len(json.loads((preds / "detections.json").read_text())["images"]) == 2
    assert len(list(preds.glob("*.png"))) == 2

    spec = {**distill_spec(str(teacher.final_checkpoint), "none", 2), "deploy": CHEAP_DEPLOY}
    student = run_spec(parse_spec(spec), tmp_path / "s", cache_dir=tmp_path / "c")
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert set(summary["model_cost"]["latency_ms"]) == {"eager"}  # exported timing off in CHEAP_DEPLOY
    assert summary["teacher_model_cost"]["params_m"] == pytest.approx(cost["params_m"])
    assert "teacher_cost_latency_ms" in student.final_metrics
    assert (tmp_path / "s" / "predictions" / "teacher" / "detections.json").is_file()
    row = child_result("none", 0, summary)
    assert row["cost_gflops"] == summary["model_cost"]["gflops"] and "AP" in row["metrics"]
    # lineage: the teacher file's sha256, the same data as the teacher's run
    assert summary["lineage"]["teacher_sha256"] == sha256_file(teacher.final_checkpoint)
    assert row["lineage"] == summary["lineage"]
    teacher_lineage = json.loads((tmp_path / "t" / "summary.json").read_text())["lineage"]
    assert teacher_lineage["data"] == summary["lineage"]["data"] and teacher_lineage["teacher_sha256"] is None


def test_cost_off_leaves_the_summary_without_it(tmp_path: Path) -> None:
    spec = {**train_spec(1), "deploy": {"cost": False, "prediction_images": 0}}
    result = run_spec(parse_spec(spec), tmp_path / "t", cache_dir=tmp_path / "c")
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert "model_cost" not in summary and not (tmp_path / "t" / "predictions").exists()
    assert not any("cost" in k for k in result.final_metrics)


# --- the leaderboard ---------------------------------------------------------------------------------
def _row(method: str, seed: int, ap: float, ms: float, gflops: float) -> dict:
    return {
        "method": method,
        "seed": seed,
        "metrics": {
            "AP": ap,
            "cost_latency_ms": ms,
            "cost_gflops": gflops,
            "cost_params_m": 5.0,
            "teacher_cost_latency_ms": 29.0,
            "teacher_cost_gflops": 40.0,
            "teacher_cost_params_m": 20.0,
        },
    }


ROWS = [_row("none", 0, 30.0, 10.0, 10.0), _row("icd", 0, 37.0, 9.0, 10.0), _row("icd", 1, 38.2, 11.0, 10.0)]
TEACHER = {"name": "r50", "metrics": {"AP": 40.0}}


def test_leaderboard_has_cost_columns_and_teacher_ratios() -> None:
    report = build_leaderboard(ROWS, TEACHER)
    teacher = report["teacher"]
    assert teacher["model_cost"]["latency_ms"] == 29.0 and teacher["model_cost"]["gflops"] == 40.0
    icd = next(m for m in report["methods"] if m["method"] == "icd")
    assert icd["model_cost"]["latency_ms"] == 10.0
    vs = icd["vs_teacher"]
    assert vs["speedup"] == pytest.approx(2.9) and vs["flops_fraction"] == 0.25 and vs["params_fraction"] == 0.25
    assert vs["ap_pct"] == pytest.approx(94.0)
    assert vs_teacher_text(vs) == "2.9× faster, 1/4 the FLOPs, 94 % of the teacher's AP"
    md = leaderboard_markdown(report)
    assert "| GFLOPs |" in md and "| ms |" in md and "2.9× faster, 1/4 the FLOPs, 94 % of the teacher's AP" in md
    teacher_line = next(line for line in md.splitlines() if line.startswith("| teacher"))
    assert "| 29.0 |" in teacher_line and "| 40.00 |" in teacher_line


def test_teacher_row_cost_wins_over_the_childrens_measurement() -> None:
    teacher = {"metrics": {"AP": 40.0, "cost_latency_ms": 58.0, "cost_gflops": 40.0}}
    vs = next(m for m in build_leaderboard(ROWS, teacher)["methods"] if m["method"] == "none")["vs_teacher"]
    assert vs["speedup"] == pytest.approx(5.8) and vs["ap_pct"] == pytest.approx(75.0)


def test_leaderboard_without_costs_says_so() -> None:
    report = build_leaderboard([{"method": "none", "seed": 0, "metrics": {"AP": 1.0}}], {"AP": 2.0})
    assert report["methods"][0]["vs_teacher"]["speedup"] is None
    assert vs_teacher_text(report["methods"][0]["vs_teacher"]) == "50 % of the teacher's AP"


def test_ap_latency_plot_is_written_with_the_report(tmp_path: Path) -> None:
    paths = write_report(ROWS, tmp_path, teacher=TEACHER, name="cost")
    with Image.open(paths["ap_latency"]) as im:
        assert im.format == "PNG" and im.size[0] > 100
    no_cost = write_report([{"method": "none", "seed": 0, "metrics": {"AP": 1.0}}], tmp_path / "b")
    assert "ap_latency" not in no_cost


def test_a_failed_measurement_keeps_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import icd_core.runner as runner

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no timer today")

    monkeypatch.setattr(runner, "deploy_report", broken)
    result = run_spec(parse_spec(train_spec(1)), tmp_path / "t", cache_dir=tmp_path / "c")
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert result.final_checkpoint is not None and summary["deploy_error"] == "RuntimeError: no timer today"
