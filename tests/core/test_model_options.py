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
