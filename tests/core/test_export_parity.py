"""Exports resize like eager PyTorch and script at every detector's default levels.

torchvision's transform picks the resize scale in float32 when scripted or traced, so a 375x500 photo at
min_size 128 became 127x170 in TorchScript/ONNX but 128x170 in eager mode; the default RetinaNet/FCOS
levels (with P6/P7 convs) did not script at all. A verification on a few same-shaped images let both
through.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from torch import Tensor, nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

import icd_core.export as export
from icd_core.detectors import Detector, build_detector
from icd_core.export import (
    ExportedDetector,
    ExportError,
    Tolerance,
    compare_detections,
    detection_cap,
    export_detector,
    export_meta,
    write_export,
)
from icd_core.export_resize import (
    ExactResizeTransform,
    eager_resized_size,
    float32_scale_floors_low,
    probe_shapes,
)
from icd_core.spec import DEFAULT_LEVELS, ModelSpec

MIN_SIZE, MAX_SIZE = 128, 192
# landscape and portrait 375x500 (the photo that became 127x170), a square, and 1:5 extremes where
# max_size binds; each one's bounding side is one whose float32 scale floors a pixel low.
SHAPES = [(375, 500), (500, 375), (375, 375), (58, 290), (290, 58)]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def default_levels_detector(kind: str) -> Detector:
    """A tiny random detector at its default levels; spread classification biases give it detections."""
    torch.manual_seed(0)
    # FCOS's head convs carry GroupNorm(32): 64 channels keep two per group on the 1x1 P7 of a small image
    channels = 64 if kind == "fcos" else 32
    spec = ModelSpec.model_validate(
        {"detector": kind, "backbone": "resnet18", "fpn_channels": channels, "head_convs": 1}
    )
    assert spec.resolved_levels == DEFAULT_LEVELS[kind]
    det = build_detector(spec, 3, MIN_SIZE, MAX_SIZE).eval()
    if kind != "faster_rcnn":
        nn.init.normal_(det.model.head.classification_head.cls_logits.bias, -3.0, 1.0)
    return det


def image(h: int, w: int, seed: int = 0) -> Tensor:
    """Smooth noise: blobs a random detector responds to unevenly, at any size."""
    coarse = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    return nn.functional.interpolate(coarse, size=[h, w], mode="bilinear", align_corners=False)[0]


def test_premise_torchvision_scripted_resize_rounds_unlike_eager() -> None:
    """The bug this file guards against, in torchvision itself (fails if torchvision ever fixes it)."""
    stock = GeneralizedRCNNTransform(MIN_SIZE, MAX_SIZE, MEAN, STD).eval()
    scripted = torch.jit.script(stock)
    x = torch.rand(3, 375, 500)
    assert stock([x])[0].image_sizes == [(128, 170)]
    assert scripted([x])[0].image_sizes == [(127, 170)]
    for h, w in SHAPES:
        bound = MIN_SIZE if MIN_SIZE / min(h, w) <= MAX_SIZE / max(h, w) else MAX_SIZE
        side = min(h, w) if bound == MIN_SIZE else max(h, w)
        assert float32_scale_floors_low(side, bound), (h, w)


class ResizeOnly(nn.Module):
    def __init__(self, transform: GeneralizedRCNNTransform):
        super().__init__()
        self.transform = transform

    def forward(self, x: Tensor) -> Tensor:
        return self.transform.resize(x)[0]


def test_exact_resize_gives_eager_sizes_scripted_and_in_onnx(tmp_path: Path) -> None:
    stock = GeneralizedRCNNTransform(MIN_SIZE, MAX_SIZE, MEAN, STD).eval()
    exact = ResizeOnly(ExactResizeTransform(MIN_SIZE, MAX_SIZE, MEAN, STD)).eval()
    scripted = torch.jit.script(exact)
    path = tmp_path / "resize.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            exact, (torch.rand(3, 64, 80),), str(path), dynamo=False, opset_version=17,
            input_names=["x"], dynamic_axes={"x": {1: "h", 2: "w"}},
        )  # fmt: skip
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for h, w in [*SHAPES, (480, 640), (427, 640), (333, 500), (1, 7)]:
        x = torch.rand(3, h, w)
        eager = stock.resize(x)[0]
        assert list(eager.shape[-2:]) == eager_resized_size(h, w, MIN_SIZE, MAX_SIZE)
        assert torch.equal(exact(x), eager) and torch.equal(scripted(x), eager)
        onnx_out = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
        assert onnx_out.shape == eager.shape, (h, w)
        assert torch.allclose(onnx_out, eager, atol=1e-4)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.parametrize("kind", list(DEFAULT_LEVELS))
def test_default_levels_export_matches_eager_on_every_aspect_ratio(kind: str, fmt: str, tmp_path: Path) -> None:
    det = default_levels_detector(kind)
    path = write_export(det, export_meta(det, {}, fmt), tmp_path / f"m.{'ts' if fmt == 'torchscript' else 'onnx'}")
    exported = ExportedDetector(path)
    for i, (h, w) in enumerate(SHAPES):
        x = image(h, w, seed=i)
        eager = det.predict([x])[0]
        got = exported.predict([x])[0]
        assert len(eager["scores"]) > 0, "a comparison of empty outputs would prove nothing"
        assert len(got["scores"]) == len(eager["scores"]), (h, w)
        assert compare_detections(eager, got, Tolerance(), detection_cap(det)) is None, (h, w)


def test_export_that_resizes_unlike_eager_is_not_verified(tmp_path: Path, monkeypatch) -> None:
    """The stock transform passes a square image (same size both ways) but not the aspect-ratio probes."""
    det = default_levels_detector("retinanet")
    monkeypatch.setattr(export, "with_exact_resize", lambda model: model)
    square = [(0, image(256, 256))]  # 128 / 256 is exact in float32: resized alike
    target = tmp_path / "model.ts"
    probe = r"image (landscape|portrait|square|wide|tall) \d+x\d+: "
    with pytest.raises(ExportError, match="does not reproduce the eager one: " + probe):
        export_detector(det, {}, "torchscript", target, square)
    assert not target.exists()


def test_verification_records_the_probe_shapes(tmp_path: Path) -> None:
    det = default_levels_detector("fcos")
    result = export_detector(det, {}, "torchscript", tmp_path / "model.ts", [(7, image(256, 256))])
    v = result.verification
    probes = probe_shapes(MIN_SIZE, MAX_SIZE)
    assert v.ok and v.images == 1 + len(probes)
    assert v.shapes == [[256, 256], *[list(s) for s in probes.values()]]
    assert result.meta["verification"]["shapes"] == v.shapes
