"""The GPU recipes stay runnable as the spec evolves: each parses, and its teacher block describes exactly the
checkpoint `icd import-teacher` writes for the source it names (so the job's architecture check passes).
The 20-iteration CPU smoke runs of each are `benchmarks/recipes/smoke.py` (results in benchmarks/results/)."""

from __future__ import annotations

from pathlib import Path

import pytest

from icd_core.spec import DistillJobSpec, architecture_diffs, inherit_incompatibility, load_spec
from icd_core.teacher_import import detectron2_layout, torchvision_layout

RECIPES = sorted((Path(__file__).resolve().parents[2] / "benchmarks" / "recipes").glob("*.yaml"))


def _imported_spec(recipe: Path) -> dict:
    if "_d2_" in recipe.name:
        return detectron2_layout.model_spec("retinanet_R_101_FPN").model_dump(mode="json")
    arch = torchvision_layout.architecture("retinanet_resnet50_fpn_v2")
    return {**arch.fields, "norm": "frozen_bn"}


def test_there_are_the_paper_and_the_torchvision_pairings() -> None:
    names = {p.stem for p in RECIPES}
    assert {"coco_d2_r101_to_r50_icd", "coco_d2_r101_to_r50_icd_noinherit"} <= names
    assert {f"coco_tv_v2_to_r50_{m}" for m in ("none", "fgd", "icd")} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses_and_its_teacher_matches_the_import(recipe: Path) -> None:
    spec = load_spec(recipe)
    assert isinstance(spec, DistillJobSpec)
    assert spec.resources.gpus == 8 and spec.schedule.batch_size == 16 and spec.schedule.iterations == "1x"
    assert architecture_diffs(spec.teacher, _imported_spec(recipe)) == []
    if spec.distill.inherit:  # the paper's pairing: every FPN and head tensor can be copied
        assert inherit_incompatibility(spec.teacher, spec.student) == ""
