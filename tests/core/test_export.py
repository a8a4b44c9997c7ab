"""Export to TorchScript and ONNX: exported detectors reproduce eager detections, a broken export fails
verification, the metadata round-trips, and an exported checkpoint's COCO AP equals the eager AP."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from onnx import numpy_helper
from trainer_specs import TINY_MODEL, distill_spec, train_spec

from icd_core.data.coco import decode_rgb
from icd_core.detectors import Detector, build_detector, read_checkpoint
from icd_core.export import (
    ExportedDetector,
    ExportError,
    Tolerance,
    compare_detections,
    detection_cap,
    export_checkpoint,
    export_detector,
    export_meta,
    read_export_meta,
    verification_probes,
    verify_export,
    write_export,
)
from icd_core.runner import run_spec
from icd_core.spec import ModelSpec, parse_spec

DETECTORS = {
    "retinanet": {**TINY_MODEL},
    "fcos": {**TINY_MODEL, "detector": "fcos"},
    "faster_rcnn": {
        **TINY_MODEL,
        "detector": "faster_rcnn",
        "levels": ["p2", "p3", "p4", "p5"],
        "anchor_sizes": [8, 16, 32, 64],
    },
    # The options torchvision's v2 detectors are imported with (docs/usage.md#bring-your-own-teacher).
    "retinanet_v2_options": {
        **TINY_MODEL,
        "fpn_channels": 64,  # GroupNorm(32) needs more than one value per group on a 1x1 P6
        "levels": ["p3", "p4", "p5", "p6"],  # P6 from C5
        "anchor_sizes": [8, 16, 32, 64],
        "extra_levels_from": "c5",
        "head_norm": "gn",
        "anchor_scales_truncated": True,
        "box_loss": "giou",
    },
    "faster_rcnn_v2_options": {
        **TINY_MODEL,
        "detector": "faster_rcnn",
        "levels": ["p2", "p3", "p4", "p5"],
        "anchor_sizes": [8, 16, 32, 64],
        "fpn_norm": "bn",
        "rpn_convs": 2,
        "box_head": "4conv1fc",
        "bn_eps": 0.0,
    },
}
CHECKPOINT_META = {
    "class_names": ["a", "b", "c", "d"],
    "label_to_cat_id": [1, 2, 5, 7],
    "spec": {"name": "tiny"},
    "step": 3,
}


def tiny_detector(kind: str) -> Detector:
    """A random tiny detector whose scores spread over 0..1 (a fresh RetinaNet/FCOS prior keeps all below 0.05)."""
    torch.manual_seed(0)
    det = build_detector(ModelSpec.model_validate(DETECTORS[kind]), 4, 64, 64).eval()
    if det.spec.detector != "faster_rcnn":
        torch.nn.init.normal_(det.model.head.classification_head.cls_logits.bias, 0.0, 1.0)
    return det


@pytest.fixture(scope="module")
def images(shapes_tiny: tuple[Path, Path]) -> list[tuple[int, torch.Tensor]]:
    """Three real generated images at different sizes (the exported graph must not fix H and W)."""
    files = sorted(shapes_tiny[0].iterdir())[:3]
    out = []
    for i, f in enumerate(files):
        img = decode_rgb(f).float() / 255.0
        out.append((i, img[:, : 96 - 8 * i, : 96 - 16 * i]))
    return out


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.parametrize("kind", list(DETECTORS))
def test_exported_detector_reproduces_eager_detections(kind: str, fmt: str, images, tmp_path: Path) -> None:
    det = tiny_detector(kind)
    path = tmp_path / f"model.{'ts' if fmt == 'torchscript' else 'onnx'}"
    result = export_detector(det, CHECKPOINT_META, fmt, path, images[:2])
    assert result.path == path and path.is_file()
    assert result.verification.ok and result.verification.images == 2 + len(verification_probes(det, images))

    exported = ExportedDetector(path)
    image_id, image = images[2]  # not used in the verification, and of another size
    eager = det.predict([image])[0]
    got = exported.predict([image])[0]
    assert len(eager["scores"]) > 0, "the tiny detector must detect something for the comparison to mean anything"
    assert compare_detections(eager, got, Tolerance(), detection_cap(det)) is None
    assert got["labels"].min() >= 0 and got["labels"].max() < 4  # 0-based, Faster R-CNN's background removed


def test_verification_fails_loudly_on_a_broken_export(images, tmp_path: Path) -> None:
    det = tiny_detector("retinanet")
    good = write_export(det, export_meta(det, CHECKPOINT_META, "onnx"), tmp_path / "good.onnx")
    assert verify_export(det, ExportedDetector(good), images).ok

    # Break it: scale the first convolution's weights in the ONNX file.
    model = onnx.load(str(good))
    init = next(t for t in model.graph.initializer if numpy_helper.to_array(t).ndim == 4)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    report = verify_export(det, ExportedDetector(broken), images)
    assert not report.ok and "no exported match" in report.mismatches[0]


def test_export_that_fails_verification_raises_and_leaves_no_file(images, tmp_path: Path, monkeypatch) -> None:
    det = tiny_detector("fcos")
    import icd_core.export as export

    real = export.write_export

    def off_by_one_labels(detector: Detector, meta: dict, path: Path, opset: int = 17) -> Path:
        detector.label_offset = -1  # every exported label shifted by one class
        try:
            return real(detector, meta, path, opset)
        finally:
            detector.label_offset = 0

    monkeypatch.setattr(export, "write_export", off_by_one_labels)
    target = tmp_path / "model.ts"
    with pytest.raises(ExportError, match="does not reproduce the eager one: image 0: .* no exported match"):
        export_detector(det, CHECKPOINT_META, "torchscript", target, images)
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_unsupported_opset_and_format_are_named(tmp_path: Path) -> None:
    det = tiny_detector("retinanet")
    with pytest.raises(ExportError, match=r"opset 9: .* need ONNX opset >= 11"):
        write_export(det, {**export_meta(det, {}, "onnx")}, tmp_path / "m.onnx", opset=9)
    with pytest.raises(ExportError, match="format: 'tflite' is not one of torchscript, onnx"):
        write_export(det, {**export_meta(det, {}, "onnx"), "format": "tflite"}, tmp_path / "m.tflite")


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_metadata_round_trips(fmt: str, images, tmp_path: Path) -> None:
    det = tiny_detector("retinanet")
    result = export_detector(
        det,
        CHECKPOINT_META,
        fmt,
        tmp_path / f"m.{'ts' if fmt == 'torchscript' else 'onnx'}",
        images[:1],
        source="ckpt.pt",
    )
    meta = read_export_meta(result.path)
    assert meta == json.loads(json.dumps(result.meta))
    assert meta["format"] == fmt and meta["class_names"] == ["a", "b", "c", "d"]
    assert meta["label_to_cat_id"] == [1, 2, 5, 7] and meta["source_spec"] == {"name": "tiny"}
    assert meta["image_mean"] == pytest.approx([0.485, 0.456, 0.406]) and meta["min_size"] == 64
    assert meta["model_spec"]["detector"] == "retinanet" and meta["source_checkpoint"] == "ckpt.pt"
    assert meta["verification"]["tolerance"]["iou"] == Tolerance().iou and meta["verification"]["mismatches"] == []
    assert (meta["opset"] == 17) == (fmt == "onnx")


def test_read_export_meta_refuses_a_foreign_file(tmp_path: Path) -> None:
    plain = tmp_path / "plain.ts"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(plain))
    with pytest.raises(ValueError, match="not exported by icd export"):
        read_export_meta(plain)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_checkpoint_keeps_coco_ap(fmt: str, tmp_path: Path) -> None:
    """A trained tiny run's final checkpoint: the export's COCO AP (onnxruntime for ONNX) equals eager AP."""
    run = run_spec(parse_spec(train_spec(6)), tmp_path / "run", cache_dir=tmp_path / "cache")
    # Six steps leave every score under the threshold (AP 0 on both sides would prove nothing): spread the
    # classification bias so the model returns hundreds of boxes, some of them on objects.
    saved = read_checkpoint(run.final_checkpoint)
    key = "model.head.classification_head.cls_logits.bias"
    saved["model"][key] = torch.randn(saved["model"][key].shape, generator=torch.Generator().manual_seed(0)) + 1.0
    hot = tmp_path / "hot.pt"
    torch.save(saved, hot)
    result = export_checkpoint(hot, fmt, tmp_path / "exports", tmp_path / "cache")
    v = result.verification
    assert v.ok and v.eval_images == 4 and v.eager_AP > 0 and abs(v.eager_AP - v.exported_AP) <= 0.1
    assert v.max_box_diff_px is not None and v.max_box_diff_px <= 0.5
    meta = read_export_meta(result.path)
    assert result.path == tmp_path / "exports" / f"model.{'onnx' if fmt == 'onnx' else 'ts'}"
    assert meta["source_spec"] == saved["spec"] and meta["label_to_cat_id"] == saved["label_to_cat_id"]
    assert meta["verification"]["eager_AP"] == pytest.approx(v.eager_AP)


@pytest.mark.slow
def test_a_distill_checkpoint_exports_the_student_alone(tmp_path: Path) -> None:
    """No teacher and no ICD modules in the file: its weights are the student's, counted."""
    teacher = run_spec(parse_spec(train_spec(1)), tmp_path / "t", cache_dir=tmp_path / "cache")
    spec = distill_spec(str(teacher.final_checkpoint), "icd", 2)  # teacher as large as the student: twice the weights
    student = run_spec(parse_spec(spec), tmp_path / "s", cache_dir=tmp_path / "cache")
    saved = read_checkpoint(student.final_checkpoint)
    assert saved["distiller"], "premise: an ICD checkpoint carries distiller modules"
    result = export_checkpoint(student.final_checkpoint, "onnx", tmp_path / "x", tmp_path / "cache", eval_images=2)
    weights = sum(numpy_helper.to_array(t).size for t in onnx.load(str(result.path)).graph.initializer)
    student_params = sum(v.numel() for k, v in saved["model"].items() if not k.endswith("num_batches_tracked"))
    assert weights <= student_params and result.meta["model_spec"] == saved["model_spec"]
    assert result.meta["source_spec"]["kind"] == "distill"
