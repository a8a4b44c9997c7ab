"""Inheriting (docs/method/icd.md#inheriting): the teacher's FPN + head go into the student; the trunk stays its own."""

from __future__ import annotations

import pytest
import torch

from icd_core.detectors import build_detector
from icd_core.distill.inherit import inherit_from_teacher
from icd_core.spec import ModelSpec, inherit_incompatibility


def tiny(detector: str, backbone: str, seed: int):
    torch.manual_seed(seed)
    spec = ModelSpec(detector=detector, backbone=backbone, fpn_channels=16, head_convs=1)
    return build_detector(spec, num_classes=3, min_size=64, max_size=64)


def _is_head(name: str, prefixes: list[str]) -> bool:
    return name.startswith(tuple(prefixes))


def test_retinanet_fpn_and_head_copied_trunk_kept() -> None:
    teacher = tiny("retinanet", "resnet34", seed=0)
    student = tiny("retinanet", "resnet18", seed=1)
    trunk_before = {k: v.clone() for k, v in student.state_dict().items() if k.startswith("model.backbone.body.")}
    report = inherit_from_teacher(teacher, student)

    prefixes = student.head_state_prefixes()
    t_state, s_state = teacher.state_dict(), student.state_dict()
    head_names = [k for k in s_state if _is_head(k, prefixes)]
    assert sorted(report.copied) == sorted(head_names) and report.skipped == []
    assert any(k.startswith("model.backbone.fpn.") for k in report.copied)
    assert any(k.startswith("model.head.") for k in report.copied)
    for k in head_names:
        assert torch.equal(s_state[k], t_state[k]), k
    for k, v in trunk_before.items():
        assert torch.equal(s_state[k], v), k  # the trunk keeps its own init
    assert any(not torch.equal(v, t_state[k]) for k, v in trunk_before.items() if k in t_state)


def test_shape_mismatch_is_skipped_and_reported() -> None:
    teacher = tiny("retinanet", "resnet50", seed=0)  # lateral 1×1 convs see 4× wider trunk outputs
    student = tiny("retinanet", "resnet18", seed=1)
    report = inherit_from_teacher(teacher, student)
    skipped = dict(report.skipped)
    inner = [k for k in skipped if k.startswith("model.backbone.fpn.inner_blocks.") and k.endswith("weight")]
    assert inner and all("shape" in skipped[k] for k in inner)
    s_state, t_state = student.state_dict(), teacher.state_dict()
    for k in report.copied:
        assert torch.equal(s_state[k], t_state[k])
    assert "model.head.classification_head.cls_logits.weight" in report.copied
    assert "skipped" in report.summary()


def test_faster_rcnn_copies_rpn_and_roi_heads() -> None:
    teacher = tiny("faster_rcnn", "resnet34", seed=0)
    student = tiny("faster_rcnn", "resnet18", seed=1)
    report = inherit_from_teacher(teacher, student)
    assert report.skipped == []
    for prefix in ("model.backbone.fpn.", "model.rpn.", "model.roi_heads."):
        assert any(k.startswith(prefix) for k in report.copied), prefix
    s_state, t_state = student.state_dict(), teacher.state_dict()
    assert torch.equal(
        s_state["model.roi_heads.box_predictor.cls_score.weight"],
        t_state["model.roi_heads.box_predictor.cls_score.weight"],
    )


def test_gn_head_is_built_and_inherited_and_mismatch_refused() -> None:
    specs = [
        ModelSpec(detector="retinanet", backbone=b, fpn_channels=32, head_convs=2, head_norm="gn")
        for b in ("resnet34", "resnet18")
    ]
    teacher, student = (build_detector(s, num_classes=3, min_size=64, max_size=64) for s in specs)
    norms = [m for m in student.model.head.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 4 and all(m.num_groups == 32 for m in norms)  # 2 convs × 2 branches
    report = inherit_from_teacher(teacher, student)
    assert "model.head.classification_head.conv.1.1.weight" in report.copied  # the GN affine
    assert inherit_incompatibility(specs[0], specs[1]) == ""
    plain = specs[1].model_copy(update={"head_norm": "none"})
    assert "head_norm: gn vs none" in inherit_incompatibility(specs[0], plain)
    with pytest.raises(ValueError, match="head_norm: only retinanet"):
        ModelSpec(detector="fcos", backbone="resnet18", fpn_channels=32, head_norm="gn")
    with pytest.raises(ValueError, match="GroupNorm"):
        ModelSpec(detector="retinanet", backbone="resnet18", fpn_channels=16, head_norm="gn")
