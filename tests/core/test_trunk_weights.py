"""ImageNet trunk weights for a resnet from a torchvision classification state dict (`backbone_weights`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from icd_core.detectors import build_detector
from icd_core.spec import ModelSpec
from icd_core.trunk_weights import load_trunk_weights

SPEC = dict(backbone="resnet18", fpn_channels=32, head_convs=1, pretrained_backbone=True, backbone_weights="w.pth")


def test_torchvision_resnet_weights_load_into_the_trunk_and_compute_the_same_features(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None).eval()
    with torch.no_grad():  # non-trivial BN statistics, so a BN mapped to the wrong conv shows
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    torch.save(net.state_dict(), tmp_path / "w.pth")
    det = build_detector(ModelSpec(**SPEC), 3, 128, 160).eval()
    loaded = load_trunk_weights(det, tmp_path / "w.pth", "model.backbone_weights")
    assert loaded == len([k for k in net.state_dict() if not k.startswith("fc.") and "num_batches" not in k])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = net.layer4(net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x))))))))
        ours = det.model.backbone.body(x)["p5"]
    assert torch.allclose(ours, ref, atol=1e-5)


def test_weights_of_another_depth_are_refused_with_the_field(tmp_path: Path) -> None:
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "w.pth")
    det = build_detector(ModelSpec(**SPEC), 3, 128, 160)
    with pytest.raises(ValueError, match=r"student.backbone_weights: .* not a torchvision ImageNet resnet18"):
        load_trunk_weights(det, tmp_path / "w.pth", "student.backbone_weights")


def test_spec_rules_for_backbone_weights() -> None:
    with pytest.raises(ValueError, match="backbone_weights"):
        ModelSpec(backbone="resnet50", pretrained_backbone=True)
    with pytest.raises(ValueError, match="backbone_weights: for a resnet trunk"):
        ModelSpec(backbone="resnet50", backbone_weights="w.pth")
    assert ModelSpec(**SPEC).resolved_norm == "frozen_bn"
