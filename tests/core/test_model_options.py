"""Model options that express other projects' layouts (P6 input, caffe input, MSRA strides, anchors)."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from icd_core.detectors import build_detector
from icd_core.spec import ModelSpec

SMALL = dict(backbone="resnet50", fpn_channels=32, head_convs=1)


def _det(**kw: object):
    det = build_detector(ModelSpec(**{**SMALL, **kw}), 3, 128, 160)
    return det.eval()


def test_p6_from_c5_matches_torchvision_last_level_p6p7() -> None:
    torch.manual_seed(0)
    det = _det(extra_levels_from="c5")
    ref = LastLevelP6P7(2048, 32)
    convs = det.model.backbone.fpn.extra_blocks.convs
    ref.p6.load_state_dict(convs[0].state_dict())
    ref.p7.load_state_dict(convs[1].state_dict())
    x = torch.randn(1, 3, 128, 128)
    trunk = det.model.backbone.body(x)
    out = det.model.backbone(x)
    p, _ = ref([out["p5"]], list(trunk.values()), ["p5"])
    assert torch.equal(out["p6"], p[1]) and torch.equal(out["p7"], p[2])
    assert convs[0].in_channels == 2048


def test_p7_without_relu_reads_p6_as_is() -> None:
    torch.manual_seed(0)
    det = _det(extra_levels_from="c5", extra_levels_relu=False)
    convs = det.model.backbone.fpn.extra_blocks.convs
    out = det.model.backbone(torch.randn(1, 3, 128, 128))
    assert torch.allclose(out["p7"], convs[1](out["p6"]), atol=1e-6)
    assert (out["p6"] < 0).any()  # so a ReLU would have changed P7


def test_caffe_input_reaches_the_trunk_as_bgr_0_255_minus_means() -> None:
    det = _det(input_format="bgr_caffe")
    image = torch.rand(3, 128, 128)
    seen = []
    det.model.backbone.body.stages[0].register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    det.predict([image])
    means_bgr = torch.tensor([103.53, 116.28, 123.675])[:, None, None]
    expected = image.flip(0) * 255 - means_bgr
    assert torch.allclose(seen[0][0, :, :128, :128], expected, atol=1e-3)


def test_msra_stride_in_1x1_keeps_shapes_and_moves_the_stride() -> None:
    det = _det(stride_in_1x1=True)
    torch_det = _det()
    assert {k: v.shape for k, v in det.state_dict().items()} == {k: v.shape for k, v in torch_det.state_dict().items()}
    for layer in det.model.backbone.body.stages[2:]:
        assert layer[0].conv1.stride == (2, 2) and layer[0].conv2.stride == (1, 1)
    feats = det.model.backbone.body(torch.randn(1, 3, 128, 128))
    assert [f.shape[-1] for f in feats.values()] == [16, 8, 4]


def test_unrounded_anchors_are_the_exact_area_and_ratio() -> None:
    det = _det(anchor_rounding=False)
    cell = det.model.anchor_generator.cell_anchors[0]
    sizes = [32 * 2 ** (i / 3) for i in range(3)]
    expected = []
    for ratio in (0.5, 1.0, 2.0):  # torchvision's order: ratio outer, size inner
        for size in sizes:
            w = math.sqrt(size * size / ratio)
            h = ratio * w
            expected.append([-w / 2, -h / 2, w / 2, h / 2])
    assert torch.allclose(cell, torch.tensor(expected), atol=1e-4)
    rounded = _det().model.anchor_generator.cell_anchors[0]
    assert torch.equal(rounded, cell.round())
    assert not torch.equal(rounded, cell)


def test_option_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="stride_in_1x1"):
        ModelSpec(backbone="resnet18", stride_in_1x1=True)
    with pytest.raises(ValueError, match="extra_levels_from"):
        ModelSpec(detector="faster_rcnn", extra_levels_from="c5")


def test_level_stride_anchors_sit_every_2_to_the_l_pixels() -> None:
    """torchvision spaces anchors by padded side // feature side: 160 // 2 = 80 px on P7, not 128."""
    images = [torch.rand(3, 128, 160)]
    level, grid = _det(anchor_stride="level"), _det()
    for det, p7_step in ((level, 128.0), (grid, 80.0)):
        image_list, _ = det.prepare(images)
        feats = list(det.extract_features(image_list).values())
        p7 = det.model.anchor_generator(image_list, feats)[0][-feats[-1].shape[-1] * 9 :]
        assert feats[-1].shape[-1] == 2 and p7[9, 0] - p7[0, 0] == p7_step
    square = [torch.rand(3, 128, 128)]  # a padded side that every level's stride divides: no difference
    a = level.model.anchor_generator(*_features(level, square))[0]
    b = grid.model.anchor_generator(*_features(grid, square))[0]
    assert torch.equal(a, b)


def _features(det, images):
    image_list, _ = det.prepare(images)
    return image_list, list(det.extract_features(image_list).values())


def test_aligned_roi_align_differs_from_torchvisions_and_adaptive_sampling_is_passed_on() -> None:
    kw = dict(detector="faster_rcnn", levels=["p2", "p3", "p4", "p5", "p6"])
    aligned = _det(roi_align_aligned=True, roi_sampling_ratio=0, **kw).model.roi_heads.box_roi_pool
    plain = _det(**kw).model.roi_heads.box_roi_pool
    assert aligned.sampling_ratio == 0 and plain.sampling_ratio == 2
    feats = {name: torch.randn(1, 4, 32 // 2**i, 32 // 2**i) for i, name in enumerate(["p2", "p3", "p4", "p5"])}
    boxes = [torch.tensor([[10.0, 12.0, 60.0, 90.0], [0.0, 0.0, 127.0, 127.0]])]
    out_a, out_p = aligned(feats, boxes, [(128, 128)]), plain(feats, boxes, [(128, 128)])
    assert out_a.shape == out_p.shape == (2, 4, 7, 7) and not torch.allclose(out_a, out_p)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.parametrize("detector", ["retinanet", "faster_rcnn"])
def test_imported_layout_options_stay_exportable(detector: str, fmt: str, tmp_path) -> None:
    from icd_core.export import export_detector

    opts: dict[str, object] = dict(anchor_stride="level", anchor_rounding=False, input_format="bgr_caffe")
    if detector == "faster_rcnn":
        opts |= dict(detector="faster_rcnn", levels=["p2", "p3", "p4", "p5", "p6"], roi_align_aligned=True)
        opts |= dict(roi_sampling_ratio=0)
    else:  # stride_in_1x1 (resnet50/101 only) swaps two convs' strides: nothing an export could lose
        opts |= dict(extra_levels_from="c5", extra_levels_relu=False)
    torch.manual_seed(0)
    det = build_detector(ModelSpec(**{**SMALL, "backbone": "resnet18", **opts}), 3, 64, 96).eval()
    if detector == "retinanet":
        torch.nn.init.normal_(det.model.head.classification_head.cls_logits.bias, 0.0, 1.0)
    meta = {"class_names": ["a", "b", "c"], "label_to_cat_id": [1, 2, 3], "spec": {"name": "x"}, "step": 0}
    images = [(0, torch.rand(3, 80, 96)), (1, torch.rand(3, 64, 72))]
    result = export_detector(det, meta, fmt, tmp_path / f"m.{'ts' if fmt == 'torchscript' else 'onnx'}", images)
    assert result.verification.ok


def test_inheriting_a_head_needs_the_anchors_it_was_trained_with() -> None:
    from icd_core.spec import inherit_incompatibility

    teacher = ModelSpec(extra_levels_from="c5", anchor_rounding=False, anchor_stride="level")
    assert inherit_incompatibility(teacher, teacher.model_copy(update={"backbone": "resnet101"})) == ""
    problems = inherit_incompatibility(teacher, ModelSpec(extra_levels_from="c5"))
    assert "anchor_rounding: False vs True" in problems and "anchor_stride: level vs image_over_grid" in problems


def test_truncated_octave_sizes_give_torchvisions_retinanet_anchors() -> None:
    from torchvision.models.detection.retinanet import _default_anchorgen

    det = build_detector(ModelSpec(backbone="resnet18", fpn_channels=32, anchor_scales_truncated=True), 3, 128, 160)
    ours, ref = det.model.anchor_generator.cell_anchors, _default_anchorgen().cell_anchors
    assert all(torch.equal(a, b) for a, b in zip(ours, ref, strict=True))
    assert not torch.equal(_det().model.anchor_generator.cell_anchors[0], ref[0])  # the exact sizes differ


def test_frozen_bn_needs_trained_weights_and_detector_options_stay_on_their_detector() -> None:
    from pydantic import ValidationError

    from icd_core.spec import saved_model_spec

    with pytest.raises(ValidationError, match="name the trained weights in checkpoint"):
        ModelSpec(norm="frozen_bn")
    assert ModelSpec(norm="frozen_bn", checkpoint="teacher.pt").resolved_norm == "frozen_bn"
    assert saved_model_spec({"norm": "frozen_bn", "bn_eps": 0.0}).bn_eps == 0.0  # a checkpoint's own weights
    with pytest.raises(ValidationError, match="rpn_convs: only faster_rcnn"):
        ModelSpec(rpn_convs=2)
    with pytest.raises(ValidationError, match="box_loss: only retinanet"):
        ModelSpec(detector="fcos", box_loss="giou")


def test_no_extra_levels_build_nothing_and_draw_no_random_numbers() -> None:
    """A p3-p5 model must initialise exactly as before these options: an unused P6 conv would shift the RNG
    and so every later layer's initial weights (it did once: the demo's teacher fell from 25.8 to 11.9 AP)."""
    from icd_core.detectors import ExtraLevels

    state = torch.random.get_rng_state()
    block = ExtraLevels([], 32, maxpool=False, in_channels=2048, from_trunk=True)
    assert torch.equal(torch.random.get_rng_state(), state) and not list(block.parameters())
