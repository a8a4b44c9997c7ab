"""Tuned studies: the tuning split, each method's sweep, settings in the children and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from icd_core.data import resolve_source
from icd_core.data.subset import split_image_ids
from icd_core.leaderboard import build_leaderboard, leaderboard_markdown
from icd_core.spec import CocoSource, SubsetSpec
from icd_core.study import run_study_local
from icd_core.study_plan import child_result, child_specs
from icd_core.tuning import default_space, paper_setting, tuned_methods, tuning_split, tuning_sweep
from tests.core.test_study import tiny_study

NO_PRUNER = {"kind": "none"}  # the tiny study evaluates only at its end
FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "coco_mini"


def test_the_two_parts_of_a_split_are_disjoint_cover_every_image_and_repeat() -> None:
    ids = list(range(100, 150))
    held, rest = split_image_ids(ids, 0.2, seed=3)
    assert len(held) == 10 and len(rest) == 40
    assert set(held).isdisjoint(rest) and sorted(held + rest) == ids
    assert split_image_ids(list(reversed(ids)), 0.2, seed=3) == (held, rest)  # the file's order does not matter
    assert split_image_ids(ids, 0.2, seed=4)[0] != held
    assert len(split_image_ids([1, 2], 0.01, 0)[0]) == 1  # at least one held out, never all
    with pytest.raises(ValueError, match="cannot be split"):
        split_image_ids([7], 0.5, 0)


def test_a_coco_subset_is_a_filtered_annotation_file_and_its_parts_share_no_image(tmp_path: Path) -> None:
    ann = next(FIXTURE.glob("*.json"))
    full = json.loads(ann.read_text())
    parts = {}
    for part in ("held_out", "rest"):
        source = CocoSource(
            images=str(FIXTURE), annotations=str(ann), subset=SubsetSpec(fraction=0.3, seed=0, part=part)
        )
        _, path = resolve_source(source, tmp_path)
        data = json.loads(path.read_text())
        names = {img["file_name"] for img in data["images"]}
        kept = {img["id"] for img in data["images"]}
        assert {a["image_id"] for a in data["annotations"]} <= kept
        assert data["categories"] == full["categories"]  # same label space in both parts
        parts[part] = names
    assert parts["held_out"].isdisjoint(parts["rest"])
    assert parts["held_out"] | parts["rest"] == {img["file_name"] for img in full["images"]}
    assert json.loads(ann.read_text()) == full  # the source file is not touched


def test_tuning_trials_train_and_evaluate_on_data_train_only_never_data_val() -> None:
    study = tiny_study(
        methods=["icd", "fitnet"], seeds=[0, 1], tune={"trials": 3, "split": 0.25, "split_seed": 7, "pruner": NO_PRUNER}
    )
    children = {m: spec for m, s, spec in child_specs(study, "job:1") if s == 0}
    for method in tuned_methods(study):
        sweep = tuning_sweep(study, method, children[method])
        data = sweep.base.data
        study_train = study.data.train.model_dump(exclude={"subset"})
        assert data.train.model_dump(exclude={"subset"}) == study_train
        assert data.val.model_dump(exclude={"subset"}) == study_train  # evaluated on a part of data.train
        assert data.val != study.data.val
        assert (data.train.subset.part, data.val.subset.part) == ("rest", "held_out")
        assert data.train.subset.seed == data.val.subset.seed == 7
        assert data.val.subset.fraction == 0.25
    # The split itself is disjoint: the parts of one (fraction, seed) never share an image (test above).
    assert tuning_split(study.data, 0.25, 7).val.subset.part == "held_out"


def test_each_method_gets_its_own_default_space_and_the_paper_setting_first() -> None:
    assert default_space("none", "retinanet") == {}
    assert default_space("fgfi", "retinanet") == {"distill.weight": {"log_uniform": [0.01 / 8, 0.01 * 8]}}
    icd = default_space("icd", "faster_rcnn")
    assert icd["distill.weight"] == {"log_uniform": [3.0 / 8, 3.0 * 8]}
    assert icd["distill.icd.adapter_lr"] == {"log_uniform": [1e-4, 1e-2]}
    assert paper_setting("icd", "retinanet", default_space("icd", "retinanet")) == {
        "distill.weight": 8.0,
        "distill.icd.adapter_lr": 1e-4,
    }
    study = tiny_study(methods=["icd", "fgd"], tune={"trials": 4, "pruner": NO_PRUNER})
    assert tuned_methods(study) == ["icd", "fgd"]  # `none` has no knob unless the space names one
    sweep = tuning_sweep(study, "fgd", {m: s for m, _, s in child_specs(study, "job:1")}["fgd"])
    assert sweep.enqueue == [{"distill.weight": 1.0}] and sweep.trials == 4
    assert sweep.name == "tiny/tune/fgd"


def test_a_bad_tuning_space_is_refused_at_validation_naming_the_method() -> None:
    with pytest.raises(ValidationError, match=r"tune \(fitnet\): space.distill.wieght: not a field"):
        tiny_study(
            methods=["fitnet"],
            tune={"pruner": NO_PRUNER, "space": {"fitnet": {"distill.wieght": {"uniform": [0.1, 1]}}}},
        )
    with pytest.raises(ValidationError, match="tune.space.fgd: not one of methods"):
        tiny_study(
            methods=["fitnet"], tune={"pruner": NO_PRUNER, "space": {"fgd": {"distill.weight": {"uniform": [0.1, 1]}}}}
        )
    with pytest.raises(ValidationError, match="settings.fgd: not one of methods"):
        tiny_study(methods=["fitnet"], settings={"fgd": {"distill.weight": 0.5}})
    with pytest.raises(ValidationError, match="settings.fitnet.distill.wieght: not a field of base"):
        tiny_study(methods=["fitnet"], settings={"fitnet": {"distill.wieght": 0.5}})
    with pytest.raises(ValidationError, match="settings.fitnet.distill.weight: -1.0 makes base invalid"):
        tiny_study(methods=["fitnet"], settings={"fitnet": {"distill.weight": -1.0}})
    with pytest.raises(ValidationError, match="settings.fitnet.teacher.checkpoint: the study sets teacher"):
        tiny_study(methods=["fitnet"], settings={"fitnet": {"teacher.checkpoint": "/etc/passwd"}})


def test_settings_reach_only_their_methods_children_and_show_in_the_row() -> None:
    study = tiny_study(methods=["fitnet", "fgd"], seeds=[0, 1], settings={"fgd": {"distill.weight": 0.25}})
    for method, _, spec in child_specs(study, "job:1"):
        assert spec.distill.weight == (0.25 if method == "fgd" else 2.0)
    rows = [
        child_result(m, s, {"final_metrics": {"AP": ap}}, params=study.settings.get(m))
        for (m, s), ap in {("none", 0): 10.0, ("none", 1): 11.0, ("fgd", 0): 14.0, ("fgd", 1): 15.5}.items()
    ]
    report = build_leaderboard(rows)
    fgd = next(m for m in report["methods"] if m["method"] == "fgd")
    assert fgd["setting"] == {"distill.weight": 0.25}
    assert "| weight 0.25 |" in leaderboard_markdown(report)


@pytest.mark.slow
def test_a_tiny_tuned_study_tunes_each_method_then_runs_the_seeds_at_its_best(tmp_path: Path) -> None:
    study = tiny_study(
        deploy={"cost": False, "prediction_images": 0},  # 7 tiny runs: no exports or renders (not tested here)
        methods=["fitnet"],
        seeds=[0, 1],
        tune={
            "trials": 2,
            "pruner": {"kind": "none"},
            "space": {"fitnet": {"distill.weight": {"choice": [0.5, 4.0]}}},
        },
    )
    report = run_study_local(study, tmp_path / "out", tmp_path / "cache")
    tuning = report["tuning"]
    fitnet = tuning["methods"]["fitnet"]
    assert sum(fitnet["counts"].values()) == 2 and fitnet["counts"].get("succeeded") == 2
    best = fitnet["best_params"]["distill.weight"]
    assert best in (0.5, 4.0)
    assert tuning["split"]["trained_on_images"] + tuning["split"]["evaluated_on_images"] == 16
    # The seeds ran at the tuned weight: their saved specs say so, and the row shows it.
    for seed in (0, 1):
        spec = json.loads((tmp_path / "out" / f"fitnet-seed{seed}" / "spec.json").read_text())
        assert spec["distill"]["weight"] == best
        assert spec["data"]["val"] == study.data.val.model_dump(mode="json")
    row = next(m for m in report["methods"] if m["method"] == "fitnet")
    assert row["setting"] == {"distill.weight": best}
    trials = json.loads((tmp_path / "out" / "tune" / "fitnet" / "trials.json").read_text())
    trial_spec = json.loads((tmp_path / "out" / "tune" / "fitnet" / "trial0" / "spec.json").read_text())
    assert trial_spec["data"]["val"]["subset"]["part"] == "held_out" and len(trials) == 2
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Tuned on a split of data.train" in md and "| fitnet | weight" in md


def test_pruning_needs_the_studys_periodic_evaluations() -> None:
    with pytest.raises(ValidationError, match=r"tune \(fitnet\): base.schedule.eval_every: pruning judges"):
        tiny_study(methods=["fitnet"], tune={"trials": 2})
