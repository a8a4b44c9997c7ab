"""The study job: expansion into children, the teacher pre-flight, the leaderboard, and a tiny local run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from icd_core.data_roots import resolve_data_roots
from icd_core.engine.callbacks import EvalResult
from icd_core.leaderboard import build_leaderboard, leaderboard_markdown, mean_std, write_report
from icd_core.spec import StudySpec, parse_spec
from icd_core.study_plan import (
    child_folder,
    child_result,
    child_specs,
    preflight,
    result_from_job,
    row_label,
    scaled_iterations,
    teacher_train_spec,
)

SHAPES = {
    "format": "shapes",
    "num_images": 16,
    "image_size": 64,
    "num_classes": 3,
    "min_object": 8,
    "max_object": 32,
    "max_objects": 3,
}
TINY_MODEL = {
    "detector": "retinanet",
    "fpn_channels": 32,
    "levels": ["p3", "p4", "p5"],
    "anchor_sizes": [8, 16, 32],
    "head_convs": 1,
}


def tiny_study(**overrides) -> StudySpec:
    data = {
        "name": "tiny",
        "kind": "study",
        "data": {
            "train": {**SHAPES, "seed": 1},
            "val": {**SHAPES, "seed": 2, "num_images": 8},
            "min_size": 64,
            "max_size": 64,
            "workers": 0,
        },
        "teacher": {**TINY_MODEL, "backbone": "resnet18"},
        "student": {**TINY_MODEL, "backbone": "resnet18"},
        "methods": ["icd"],
        "seeds": [0],
        "distill": {"inherit": True, "weight": 2.0},
        "teacher_schedule": {
            "iterations": 4,
            "batch_size": 2,
            "lr": 0.01,
            "eval_every": 0,
            "checkpoint_every": 0,
            "log_every": 2,
        },
        "schedule": {
            "iterations": 2,
            "batch_size": 2,
            "lr": 0.01,
            "eval_every": 0,
            "checkpoint_every": 0,
            "log_every": 1,
        },
        "teacher_min_ap": 0.0,
        "require_teacher_better": False,
        "device": "cpu",
    }
    data.update(overrides)
    spec = parse_spec(data)
    assert isinstance(spec, StudySpec)
    return spec


# --- child_specs ------------------------------------------------------------------------------------------
def test_child_specs_one_per_method_and_seed_none_first() -> None:
    study = tiny_study(methods=["icd", "fitnet", "fgd"], seeds=[3, 7])
    children = child_specs(study, "/ckpt/teacher.pt")
    assert [(m, s) for m, s, _ in children] == [
        ("none", 3),
        ("icd", 3),
        ("fitnet", 3),
        ("fgd", 3),
        ("none", 7),
        ("icd", 7),
        ("fitnet", 7),
        ("fgd", 7),
    ]
    assert [c.name for _, _, c in children][:2] == ["tiny/none/seed3", "tiny/icd/seed3"]
    assert child_folder("icd", 3) == "icd-seed3"


def test_child_specs_differ_only_in_method_and_seed() -> None:
    study = tiny_study(methods=["none", "icd", "defeat"], seeds=[0, 1])
    children = child_specs(study, "job:12")
    dumps = []
    for method, seed, spec in children:
        assert spec.kind == "distill" and spec.seed == seed and spec.distill.method == method
        assert spec.teacher.checkpoint == "job:12"
        assert spec.student == study.student and spec.data == study.data and spec.device == "cpu"
        d = spec.model_dump(mode="json")
        d.pop("name"), d.pop("seed"), d["distill"].pop("method")
        dumps.append(d)
    assert all(d == dumps[0] for d in dumps)
    assert dumps[0]["distill"]["inherit"] is True and dumps[0]["distill"]["weight"] == 2.0


def test_scaling_rule_for_warmup_bypass_and_steps() -> None:
    assert scaled_iterations(1000, 90_000) == 1000
    assert scaled_iterations(1000, 1_500) == 17
    assert scaled_iterations(1000, 3) == 1  # never below one step
    assert scaled_iterations(0, 1_500) == 0

    study = tiny_study(schedule={"iterations": 1800, "batch_size": 8})
    _, _, spec = child_specs(study, "t.pt")[1]
    assert spec.schedule.warmup_iters == 20 and spec.distill.icd.bypass_iters is None  # bypass: absolute rule
    assert spec.schedule.steps == [1200, 1600]

    # Explicit values are kept; scale_iterations: false keeps the paper's numbers.
    study = tiny_study(
        schedule={"iterations": 1800, "warmup_iters": 50, "steps": [900]}, distill={"icd": {"bypass_iters": 300}}
    )
    _, _, spec = child_specs(study, "t.pt")[1]
    assert (spec.schedule.warmup_iters, spec.distill.icd.bypass_iters, spec.schedule.steps) == (50, 300, [900])
    study = tiny_study(schedule={"iterations": 1800}, scale_iterations=False)
    _, _, spec = child_specs(study, "t.pt")[1]
    assert spec.distill.icd.bypass_iters is None and spec.schedule.warmup_iters is None

    # A preset at batch 16 is the paper's own schedule: nothing changes.
    study = tiny_study(schedule={"iterations": "1x", "batch_size": 16})
    _, _, spec = child_specs(study, "t.pt")[1]
    assert (spec.schedule.warmup_iters, spec.distill.icd.bypass_iters) == (1000, None)
    assert spec.schedule.steps == [60_000, 80_000]


def test_teacher_train_spec() -> None:
    study = tiny_study()
    train = teacher_train_spec(study)
    assert train is not None and train.kind == "train" and train.name == "tiny/teacher"
    assert train.model == study.teacher and train.schedule == study.teacher_schedule
    given = tiny_study(teacher={**TINY_MODEL, "backbone": "resnet18", "checkpoint": "t.pt"}, teacher_schedule=None)
    assert teacher_train_spec(given) is None


def test_relative_coco_paths_resolve_against_data_roots(tmp_path: Path) -> None:
    (tmp_path / "coco128" / "images").mkdir(parents=True)
    (tmp_path / "coco128" / "annotations").mkdir()
    (tmp_path / "coco128" / "annotations" / "instances.json").write_text("{}")
    coco = {"format": "coco", "images": "coco128/images", "annotations": "coco128/annotations/instances.json"}
    study = tiny_study(data={"train": coco, "val": coco})
    resolved = resolve_data_roots(study, ["/nonexistent", str(tmp_path)])
    assert resolved.data.train.images == str(tmp_path / "coco128" / "images")
    assert resolved.data.val.annotations == str(tmp_path / "coco128" / "annotations" / "instances.json")
    assert resolve_data_roots(study, []).data.train.images == "coco128/images"


# --- preflight --------------------------------------------------------------------------------------------
def _eval(ap: float) -> EvalResult:
    return EvalResult(step=100, metrics={"AP": ap, "AP50": 2 * ap})


def test_preflight_refuses_weak_teacher_with_its_ap() -> None:
    with pytest.raises(ValueError, match=r"teacher AP 0\.4 is below teacher_min_ap 1\.0"):
        preflight(_eval(0.4), None, 1.0)
    with pytest.raises(
        ValueError,
        match=r"teacher AP 3\.1 is not above the student baseline 4\.0: check "
        r"teacher\.checkpoint",
    ):
        preflight(_eval(3.1), 4.0, 1.0)
    with pytest.raises(ValueError, match="not above"):
        preflight({"AP": 4.0}, 4.0, 0.0)  # equal is not better; plain dicts are accepted


def test_preflight_asks_for_the_lead_the_study_sets() -> None:
    with pytest.raises(ValueError, match=r"leads the student baseline 50\.0 by 3\.0, less than teacher_lead_ap 5\.0"):
        preflight(_eval(53.0), 50.0, 1.0, min_lead=5.0)
    preflight(_eval(55.0), 50.0, 1.0, min_lead=5.0)
    preflight(_eval(53.0), 50.0, 1.0)  # no lead asked: above is enough
    preflight(_eval(53.0), 50.0, 1.0, require_better=False, min_lead=5.0)


def test_preflight_passes() -> None:
    preflight(_eval(20.0), None, 1.0)
    preflight(_eval(20.0), 8.0, 1.0)
    preflight(_eval(3.1), 4.0, 1.0, require_better=False)
    preflight({"AP": 0.0}, 0.0, 0.0, require_better=False)


# --- leaderboard ------------------------------------------------------------------------------------------
def _row(method: str, seed: int, ap: float, sps: float, mem: float) -> dict:
    return {
        "method": method,
        "seed": seed,
        "sec_per_step": sps,
        "peak_memory_mb": mem,
        "metrics": {"AP": ap, "AP50": ap + 20, "AP75": ap - 1, "APs": ap / 2, "APm": ap, "APl": ap * 2},
    }


HAND_MADE = [
    _row("none", 0, 10.0, 1.0, 100.0),
    _row("none", 1, 12.0, 1.0, 100.0),
    _row("icd", 0, 14.0, 1.1, 130.0),
    _row("icd", 1, 16.0, 1.3, 130.0),
    _row("fitnet", 0, 13.0, 1.0, 110.0),
    _row("fitnet", 1, 11.0, 1.0, 110.0),
    _row("fgd", 0, 20.0, 2.0, 200.0),
    {"method": "defeat", "seed": 0, "metrics": None, "status": "failed", "error": "diverged"},
]
TEACHER = {
    "name": "retinanet mobilenet_v2",
    "metrics": {"AP": 40.0, "AP50": 60.0, "AP75": 42.0, "APs": 30.0, "APm": 45.0, "APl": 50.0},
}


def test_mean_and_sample_std() -> None:
    assert mean_std([10.0, 12.0]) == (11.0, pytest.approx(math.sqrt(2.0)))
    assert mean_std([5.0]) == (5.0, 0.0)
    assert mean_std([1.0, 2.0, 3.0, 4.0])[1] == pytest.approx(1.2909944)


def test_leaderboard_math_and_order() -> None:
    report = build_leaderboard(HAND_MADE, TEACHER, name="hand")
    order = [m["method"] for m in report["methods"]]
    assert order == ["fgd", "icd", "fitnet", "none", "defeat"]  # by mean AP, the failed one last
    by = {m["method"]: m for m in report["methods"]}
    icd, none = by["icd"], by["none"]
    assert icd["n"] == 2 and icd["seeds"] == [0, 1]
    assert icd["AP"]["mean"] == 15.0 and icd["AP"]["std"] == pytest.approx(math.sqrt(2.0))
    assert icd["AP50"]["mean"] == 35.0 and icd["APl"]["mean"] == 30.0
    assert icd["delta_AP"] == 4.0 and icd["delta"]["APs"] == 2.0 and none["delta_AP"] == 0.0
    assert icd["sec_per_step"] == pytest.approx(1.2)
    assert icd["extra_sec_per_step"] == pytest.approx(0.2) and icd["extra_sec_per_step_pct"] == pytest.approx(20.0)
    assert icd["extra_peak_memory_mb"] == 30.0
    assert by["fgd"]["AP"]["std"] == 0.0 and by["fgd"]["n"] == 1 and by["fgd"]["delta_AP"] == 9.0
    assert by["defeat"]["n"] == 0 and by["defeat"]["failed"] == 1 and by["defeat"]["AP"]["mean"] is None
    assert report["teacher"]["AP"] == 40.0 and report["baseline"] == "none"
    assert len(report["runs"]) == len(HAND_MADE)
    json.dumps(report, allow_nan=False)  # strict JSON: no NaN for the failed method


def test_leaderboard_without_baseline_has_no_deltas() -> None:
    report = build_leaderboard([_row("icd", 0, 5.0, 1.0, 10.0)], None)
    assert report["teacher"] is None and report["baseline"] is None
    assert report["methods"][0]["delta_AP"] is None and report["methods"][0]["extra_sec_per_step"] is None


def test_markdown_has_teacher_first_and_every_method() -> None:
    md = leaderboard_markdown(build_leaderboard(HAND_MADE, TEACHER))
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split("|")[1].strip() for r in rows] == [
        "teacher (retinanet mobilenet_v2)",
        "fgd",
        "icd",
        "fitnet",
        "none",
        "defeat",
    ]
    assert "15.0 ± 1.4" in md and "+4.0" in md and "(+20%)" in md and "(+1 failed)" in md


def test_write_report_files(tmp_path: Path) -> None:
    paths = write_report(HAND_MADE, tmp_path / "out", teacher=TEACHER, name="hand")
    assert json.loads(paths["json"].read_text())["name"] == "hand"
    assert "| icd |" in paths["md"].read_text()
    with Image.open(paths["png"]) as im:
        assert im.format == "PNG" and im.size[0] > 0 and im.size[1] > 0


def test_child_result_from_summary() -> None:
    summary = {
        "evaluation": {"step": 3, "metrics": {"AP": 1.5}},
        "final_metrics": {"AP": 1.5, "loss": 2.0},
        "sec_per_step": 0.5,
        "peak_memory_mb": 300.0,
    }
    row = child_result("icd", 0, summary)
    assert row["metrics"] == {"AP": 1.5} and row["sec_per_step"] == 0.5 and row["status"] == "succeeded"
    assert child_result("icd", 1, None, error="boom")["metrics"] is None


def test_rows_from_service_jobs_feed_the_leaderboard() -> None:
    study = tiny_study(methods=["icd"], seeds=[0])
    (_, _, none), (_, _, icd) = child_specs(study, "job:1")
    rows = [
        result_from_job(
            none.model_dump(mode="json"), "succeeded", {"AP": 4.0, "step": 2.0, "loss": 1.0}, 1.0, 50.0, job_id=2
        ),
        result_from_job(icd.model_dump(mode="json"), "failed", None, error="diverged", job_id=3),
    ]
    report = build_leaderboard(rows, {"AP": 9.0}, notes=["measured on a test"])
    by = {m["method"]: m for m in report["methods"]}
    assert by["none"]["AP"]["mean"] == 4.0 and by["icd"]["failed"] == 1
    assert report["runs"][1]["job_id"] == 3 and report["runs"][0]["metrics"] == {"AP": 4.0}
    assert "Note: measured on a test" in leaderboard_markdown(report)


# --- end to end -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path: Path) -> None:
    from icd_core.study import run_study_local

    study = tiny_study()
    out = tmp_path / "study"
    report = run_study_local(study, out, tmp_path / "cache")
    assert {m["method"] for m in report["methods"]} == {"none", "icd"}
    assert all(m["n"] == 1 for m in report["methods"]) and report["teacher"] is not None
    for name in (
        "report.json",
        "report.md",
        "report.png",
        "teacher/summary.json",
        "none-seed0/summary.json",
        "icd-seed0/summary.json",
    ):
        assert (out / name).is_file(), name
    md = (out / "report.md").read_text()
    assert "| teacher" in md and "| none |" in md and "| icd |" in md and "resident-set" in md
    with Image.open(out / "report.png") as im:
        assert im.size[0] > 0
    icd_spec = json.loads((out / "icd-seed0" / "spec.json").read_text())
    assert icd_spec["distill"]["method"] == "icd" and icd_spec["teacher"]["checkpoint"].endswith(".pt")

    # Rerunning resumes: nothing is trained again (summaries untouched), the report is rebuilt.
    before = (out / "icd-seed0" / "summary.json").stat().st_mtime_ns
    again = run_study_local(study, out, tmp_path / "cache")
    assert (out / "icd-seed0" / "summary.json").stat().st_mtime_ns == before
    assert [m["method"] for m in again["methods"]] == [m["method"] for m in report["methods"]]

    # The same folder with the teacher-better check on: a 4-step teacher is not above the `none` student,
    # so the study stops right after that child, naming both APs.
    none_ap = next(m for m in report["methods"] if m["method"] == "none")["AP"]["mean"]
    assert report["teacher"]["AP"] <= none_ap, "premise: a 4-step teacher is no better than the student"
    strict = tiny_study(require_teacher_better=True)
    with pytest.raises(ValueError, match=r"teacher AP \d+\.\d is not above the student baseline \d+\.\d"):
        run_study_local(strict, out, tmp_path / "cache")


def test_check_study_rejects_an_incompatible_pair_before_any_work() -> None:
    from icd_core.study_plan import check_study

    check_study(tiny_study())
    bad = tiny_study(student={**TINY_MODEL, "backbone": "resnet18", "fpn_channels": 64})
    with pytest.raises(ValueError, match="inherit"):
        check_study(bad)


def test_leaderboard_shows_icd_diagnostics_from_cli_and_service_rows() -> None:
    summary = {
        "evaluation": {"step": 3, "metrics": {"AP": 2.0}},
        "sec_per_step": 0.5,
        "final_metrics": {"AP": 2.0, "icd_ident_auc": 0.9, "icd_inbox_mass": 0.3, "icd_inbox_uniform": 0.05},
    }
    cli_row = child_result("icd", 0, summary)
    study = tiny_study(methods=["icd"], seeds=[0])
    _, (_, _, icd) = child_specs(study, "job:1")
    service_row = result_from_job(
        icd.model_dump(mode="json") | {"seed": 1},
        "succeeded",
        {"AP": 4.0, "icd_ident_auc": 0.7, "icd_inbox_mass": 0.1, "icd_inbox_uniform": 0.05},
    )
    report = build_leaderboard([cli_row, service_row, _row("none", 0, 1.0, 0.4, 10.0)])
    icd_entry = next(m for m in report["methods"] if m["method"] == "icd")
    assert icd_entry["icd_diagnostics"]["icd_ident_auc"] == pytest.approx(0.8)
    assert icd_entry["icd_diagnostics"]["icd_inbox_mass"] == pytest.approx(0.2)
    assert "icd_diagnostics" not in next(m for m in report["methods"] if m["method"] == "none")
    md = leaderboard_markdown(report)
    assert "| ident AUC |" in md and "| icd | 0.800 |" in md and "| 4.0 |" in md  # 0.2 / 0.05 = 4.0× uniform


def test_pretrained_icd_is_its_own_row_and_plain_icd_stays_joint() -> None:
    study = tiny_study(
        methods=["icd", "icd_pretrained"], seeds=[0, 1], distill={"icd": {"pretrain": {"steps": 500, "lr": 2e-3}}}
    )
    children = {(m, s): spec for m, s, spec in child_specs(study, "job:1")}
    joint, pre = children[("icd", 0)], children[("icd_pretrained", 0)]
    assert joint.distill.method == pre.distill.method == "icd"
    assert joint.distill.icd.pretrain is None  # the paper's protocol, whatever the study's pretrain options
    assert pre.distill.icd.pretrain is not None and pre.distill.icd.pretrain.steps == 500
    assert pre.distill.icd.pretrain == children[("icd_pretrained", 1)].distill.icd.pretrain  # one key per teacher
    row = result_from_job(pre.model_dump(mode="json"), "succeeded", {"AP": 3.0, "icd_pretrain_seconds": 40.0})
    assert row["method"] == "icd_pretrained"
    assert result_from_job(joint.model_dump(mode="json"), "succeeded", {"AP": 2.0})["method"] == "icd"
    defaults = {(m, s): spec for m, s, spec in child_specs(tiny_study(methods=["icd_pretrained"]), "t.pt")}
    assert defaults[("icd_pretrained", 0)].distill.icd.pretrain.steps == 3000


def test_a_changed_icd_knob_is_a_labelled_row_and_the_paper_protocol_is_not() -> None:
    study = tiny_study(methods=["icd", "icd_pretrained", "fitnet"], distill={"icd": {"adapter_lr": 1e-3}})
    children = {(m, s): spec for m, s, spec in child_specs(study, "job:1")}
    labels = {m: row_label(m, spec) for (m, _), spec in children.items()}
    assert labels == {
        "none": "none",
        "icd": "icd (adapter_lr=0.001)",
        "icd_pretrained": "icd_pretrained (adapter_lr=0.001)",
        "fitnet": "fitnet",
    }
    service = result_from_job(children[("icd_pretrained", 0)].model_dump(mode="json"), "succeeded", {"AP": 1.0})
    assert service["method"] == "icd_pretrained (adapter_lr=0.001)"  # the service labels it the same way
    paper = child_specs(tiny_study(methods=["icd"], distill={"icd": {"lr": 1e-4}}), "t.pt")[1][2]
    assert row_label("icd", paper) == "icd"  # the paper's value, written out, is not a variant
    tuned = child_specs(tiny_study(methods=["icd"], distill={"weight": 2.0, "icd": {"lr": 3e-4}}), "t.pt")[1][2]
    assert row_label("icd", tuned) == "icd (lr=0.0003)"  # the shared distill.weight is every method's


@pytest.mark.slow
def test_tiny_study_pretrains_the_decoder_once_for_both_seeds(tmp_path: Path) -> None:
    from icd_core.study import run_study_local

    study = tiny_study(
        methods=["icd_pretrained"],
        seeds=[0, 1],
        distill={"icd": {"pretrain": {"steps": 4, "check_every": 2, "holdout_images": 4}}},
    )
    out = tmp_path / "study"
    report = run_study_local(study, out, tmp_path / "cache")
    first = json.loads((out / "icd_pretrained-seed0" / "summary.json").read_text())["icd_decoder"]
    second = json.loads((out / "icd_pretrained-seed1" / "summary.json").read_text())["icd_decoder"]
    assert first["reused"] is False and second["reused"] is True and first["key"] == second["key"]
    row = next(m for m in report["methods"] if m["method"] == "icd_pretrained")
    assert row["n"] == 2 and row["icd_diagnostics"]["icd_pretrain_steps"] == 4.0
    md = (out / "report.md").read_text()
    assert "| icd_pretrained |" in md and "pre-train s (once per teacher)" in md
