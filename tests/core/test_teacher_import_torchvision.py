"""Importing torchvision detectors: `icd import-teacher --from torchvision`, then `icd predict`, must give
torchvision's own detections (same COCO ids, scores within 1e-4, boxes IoU >= 0.99) on real photos.

The source models are torchvision's own builders with `weights=None` (no download), made to look trained
where a random init would hide a wrong mapping or detect nothing:
- batch-norm statistics are random, so a norm layer loaded into the wrong place changes the output;
- the classifier's rows for the labels torchvision reserves but COCO never uses (label 0 and the ten
  unused ids) get bias -20, as a COCO-trained model has learned: cutting to the 80 categories then cannot
  change which detections win;
- the other class rows get bias 0 and spread weights, so detections pass torchvision's own score
  thresholds (unchanged) with scores that differ from each other.
Images run at short side 256 / long side 416 on both sides (the zoo's 800/1333 is slow on a CPU).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from click.testing import CliRunner
from torch import Tensor, nn
from torchvision.models import detection as tv_detection
from torchvision.ops.misc import FrozenBatchNorm2d

from icd_cli.main import main as cli
from icd_core.data.coco import decode_rgb
from icd_core.detectors import load_detector
from icd_core.teacher_import import torchvision_layout
from icd_core.teacher_import.coco_categories import COCO_IDS
from icd_core.teacher_import.torchvision_layout import LayoutError, convert, our_key, torchvision_key

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "coco_mini" / "images"
PHOTOS = [FIXTURES / "000000000149.jpg", FIXTURES / "000000000250.jpg"]
SIZE, MAX_SIZE = 256, 416
UNUSED_LABELS = [label for label in range(91) if label not in COCO_IDS]  # 0 and the ten ids COCO skips


def _frozen(model: nn.Module, eps: float) -> None:
    """Swap the trunk's BatchNorm2d for FrozenBatchNorm2d (what the zoo's files hold), with the zoo's eps."""
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(model, name, frozen)
        else:
            _frozen(child, eps)


def _look_trained(state: dict[str, Tensor], detector: str, seed: int) -> None:
    """Random batch-norm statistics and a classifier whose reserved rows never fire (see the module doc)."""
    g = torch.Generator().manual_seed(seed)
    for key, value in state.items():
        if key.endswith("running_var"):
            value.copy_(torch.rand(value.shape, generator=g) * 1.5 + 0.5)
        elif key.endswith("running_mean"):
            value.copy_(torch.randn(value.shape, generator=g) * 0.1)
    if detector == "faster_rcnn":
        weight, bias = (
            state["roi_heads.box_predictor.cls_score.weight"],
            state["roi_heads.box_predictor.cls_score.bias"],
        )
        rows = bias[None]  # one row per label, background (label 0) included and kept
        reserved = [label for label in UNUSED_LABELS if label > 0]
    else:
        weight = state["head.classification_head.cls_logits.weight"]
        bias = state["head.classification_head.cls_logits.bias"]
        rows = bias.view(-1, 91)  # anchor-major: row a * 91 + label
        reserved = UNUSED_LABELS
    weight.copy_(torch.randn(weight.shape, generator=g) * 0.05)
    bias.zero_()
    rows[:, reserved] = -20.0


def _torchvision_model(arch: str, frozen: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(tv_detection, arch)(weights=None, weights_backbone=None, min_size=SIZE, max_size=MAX_SIZE)
    if frozen:
        _frozen(model.backbone.body, eps=torchvision_layout.ARCHITECTURES[arch].zoo_frozen_bn_eps)
    state = model.state_dict()
    _look_trained(state, torchvision_layout.ARCHITECTURES[arch].fields["detector"], seed=1)
    model.load_state_dict(state)
    return model.eval()


def _import(src: Path, arch: str, out: Path, *extra: str) -> Any:
    return CliRunner().invoke(
        cli, ["import-teacher", str(src), "--from", "torchvision", "--arch", arch, "-o", str(out), *extra]
    )


def _at_test_size(checkpoint: Path) -> None:
    """The imported checkpoint's input size lowered to the test's (what `icd predict` then uses)."""
    ckpt = torch.load(checkpoint, weights_only=True)
    assert ckpt["input_size"] == {"test_size": 800, "max_size": 1333}  # the zoo's transform
    ckpt["input_size"] = {"test_size": SIZE, "max_size": MAX_SIZE}
    torch.save(ckpt, checkpoint)


def _iou(a: list[float], b: Tensor) -> Tensor:
    """IoU of one xyxy box with many; identical boxes count as 1 (FCOS can return zero-area boxes)."""
    box = torch.tensor(a)
    iou = torchvision.ops.box_iou(box[None], b)[0].nan_to_num(0.0)
    return torch.where((b == box).all(dim=1), torch.ones_like(iou), iou)


def _compare(ours: list[dict[str, Any]], ref: dict[str, Tensor]) -> tuple[float, float]:
    """Every torchvision detection has one of ours with the same COCO id, score within 1e-4 and IoU >= 0.99
    (and the counts agree); returns (max score difference, min IoU)."""
    assert len(ours) == len(ref["scores"]) > 0
    boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in ours)])
    scores = torch.tensor([d["score"] for d in ours])
    cats = torch.tensor([d["category_id"] for d in ours])
    worst_score, worst_iou = 0.0, 1.0
    for box, score, label in zip(ref["boxes"].tolist(), ref["scores"], ref["labels"].tolist(), strict=True):
        candidates = (cats == label) & ((scores - score).abs() <= 1e-4)
        assert candidates.any(), f"no detection of category {label} near score {float(score):.5f}"
        iou = torch.where(candidates, _iou(box, boxes), torch.zeros_like(scores))
        best = int(iou.argmax())
        worst_iou = min(worst_iou, float(iou[best]))
        worst_score = max(worst_score, float((scores[best] - score).abs()))
    assert worst_iou >= 0.99
    return worst_score, worst_iou


@torch.no_grad()
def _same_layers(model: nn.Module, checkpoint: Path) -> None:
    """Every FPN level and every head output equal torchvision's, on a random input.

    The detections alone may all come from P3-P5 (the most locations), so a swap of P6 and P7 (same shapes)
    could pass them; this check sees every level. Class columns are compared over the 80 kept labels.
    """
    det, _ = load_detector(checkpoint, SIZE, MAX_SIZE)
    det.eval()
    torch.manual_seed(2)
    x = torch.randn(1, 3, 128, 160)
    ref, ours = list(model.backbone(x).values()), list(det.model.backbone(x).values())
    assert len(ref) == len(ours) and all(torch.allclose(r, o, atol=1e-5) for r, o in zip(ref, ours, strict=True))
    if det.spec.detector == "faster_rcnn":
        for r, o in zip(model.rpn.head(ref), det.model.rpn.head(ours), strict=True):
            assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(r, o, strict=True))
        pooled = torch.randn(16, 256, 7, 7)
        r_cls, r_box = model.roi_heads.box_predictor(model.roi_heads.box_head(pooled))
        o_cls, o_box = det.model.roi_heads.box_predictor(det.model.roi_heads.box_head(pooled))
        keep = [0, *COCO_IDS]  # background, then the 80 categories
        assert torch.allclose(r_cls[:, keep], o_cls, atol=1e-5)
        assert torch.allclose(r_box.view(16, 91, 4)[:, keep], o_box.view(16, 81, 4), atol=1e-5)
        return
    r_head, o_head = model.head(ref), det.model.head(ours)
    assert torch.allclose(r_head["cls_logits"][..., list(COCO_IDS)], o_head["cls_logits"], atol=1e-5)
    for key in r_head.keys() - {"cls_logits"}:
        assert torch.allclose(r_head[key], o_head[key], atol=1e-5), key


CASES = [
    # (torchvision builder, photo, trunk as the zoo's FrozenBatchNorm files hold it)
    ("retinanet_resnet50_fpn", PHOTOS[0], False),
    ("retinanet_resnet50_fpn", PHOTOS[1], True),
    ("fcos_resnet50_fpn", PHOTOS[1], False),
    ("fasterrcnn_resnet50_fpn", PHOTOS[0], False),
    ("retinanet_resnet50_fpn_v2", PHOTOS[1], False),
    ("fasterrcnn_resnet50_fpn_v2", PHOTOS[0], False),
]


@pytest.mark.parametrize(("arch", "photo", "frozen"), CASES, ids=[f"{a}{'-frozen' if f else ''}" for a, _, f in CASES])
def test_imported_model_detects_what_torchvision_does(arch: str, photo: Path, frozen: bool, tmp_path: Path) -> None:
    model = _torchvision_model(arch, frozen)
    with torch.no_grad():
        ref = model([decode_rgb(photo).float() / 255])[0]
    src = tmp_path / f"{arch}.pth"
    torch.save(model.state_dict(), src)

    res = _import(src, arch, tmp_path / "teacher.pt")
    assert res.exit_code == 0, res.output
    assert "classes kept: 80 (person, bicycle" in res.output and "untrained categories: none" in res.output
    _at_test_size(tmp_path / "teacher.pt")
    res = CliRunner().invoke(
        cli, ["predict", str(tmp_path / "teacher.pt"), str(photo), "--score-min", "0", "-o", str(tmp_path / "p")]
    )
    assert res.exit_code == 0, res.output
    written = json.loads((tmp_path / "p" / "detections.json").read_text())
    assert [c["id"] for c in written["categories"]] == list(COCO_IDS)
    worst_score, worst_iou = _compare(written["annotations"], ref)
    _same_layers(model, tmp_path / "teacher.pt")
    n = len(ref["scores"])
    print(f"{arch} frozen={frozen}: {n} detections, max score diff {worst_score:.2e}, min IoU {worst_iou}")


def test_keys_map_both_ways_for_every_architecture() -> None:
    for arch in torchvision_layout.ARCHITECTURES:
        keys = getattr(tv_detection, arch)(weights=None, weights_backbone=None).state_dict().keys()
        assert all(torchvision_key(our_key(k)) == k for k in keys), arch


@pytest.fixture(scope="module")
def retinanet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("tv") / "retinanet.pth"
    torch.save(_torchvision_model("retinanet_resnet50_fpn").state_dict(), src)
    return src


def _annotations(tmp_path: Path, categories: list[tuple[int, str]]) -> Path:
    path = tmp_path / "instances.json"
    cats = [{"id": i, "name": n} for i, n in categories]
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": cats}))
    return path


def test_classes_keep_the_annotation_files_order_ids_and_names(retinanet_file: Path, tmp_path: Path) -> None:
    ann = _annotations(tmp_path, [(7, "Dog"), (3, "person"), (12, "traffic  light")])
    res = _import(retinanet_file, "retinanet_resnet50_fpn", tmp_path / "t.pt", "--classes", str(ann))
    assert res.exit_code == 0, res.output
    ckpt = torch.load(tmp_path / "t.pt", weights_only=True)
    assert ckpt["class_names"] == ["Dog", "person", "traffic  light"] and ckpt["label_to_cat_id"] == [7, 3, 12]
    source = torch.load(retinanet_file, weights_only=True)["head.classification_head.cls_logits.weight"]
    kept = ckpt["model"]["model.head.classification_head.cls_logits.weight"]
    # our label 0 is COCO's dog (torchvision label 18), 1 person (1), 2 traffic light (10); 9 anchors each
    assert torch.equal(kept.view(9, 3, *kept.shape[1:]), source.view(9, 91, *source.shape[1:])[:, [18, 1, 10]])
    det, _ = load_detector(tmp_path / "t.pt", SIZE, MAX_SIZE)
    assert det.num_classes == 3


def test_a_category_the_teacher_never_learned_is_refused_by_name_unless_allowed(
    retinanet_file: Path, tmp_path: Path
) -> None:
    ann = _annotations(tmp_path, [(1, "person"), (2, "unicorn")])
    res = _import(retinanet_file, "retinanet_resnet50_fpn", tmp_path / "t.pt", "--classes", str(ann))
    assert res.exit_code == 2 and "never learned unicorn" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "t.pt").exists()
    res = _import(
        retinanet_file, "retinanet_resnet50_fpn", tmp_path / "t.pt", "--classes", str(ann), "--allow-untrained"
    )
    assert res.exit_code == 0 and "untrained categories: unicorn" in res.output
    ckpt = torch.load(tmp_path / "t.pt", weights_only=True)
    assert ckpt["class_names"] == ["person", "unicorn"]
    assert ckpt["imported_from"]["untrained_categories"] == ["unicorn"]


def test_user_errors_are_one_message_with_exit_code_2(retinanet_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.pt"
    res = _import(retinanet_file, "retinanet_resnet50", out)
    assert res.exit_code == 2 and "choose from retinanet_resnet50_fpn, retinanet_resnet50_fpn_v2" in res.output
    res = _import(retinanet_file, "fasterrcnn_mobilenet_v3_large_fpn", out)
    assert res.exit_code == 2 and "same stride" in res.output
    res = _import(tmp_path / "missing.pth", "retinanet_resnet50_fpn", out)
    assert res.exit_code == 2 and "not found" in res.output
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    res = _import(garbage, "retinanet_resnet50_fpn", out)
    assert res.exit_code == 2 and "not a torch file that loads as data" in res.output
    res = _import(retinanet_file, "fcos_resnet50_fpn", out)  # the right file, the wrong --arch
    assert res.exit_code == 2 and "not a torchvision fcos_resnet50_fpn state dict: missing keys: head." in res.output
    assert "unexpected keys: head.classification_head.conv.0.0.bias" in res.output  # in torchvision's names
    assert "its keys fit --arch retinanet_resnet50_fpn" in res.output
    assert all("Traceback" not in line for line in res.output.splitlines()) and not out.exists()


def test_the_command_imports_detectron2_and_mmdet_files_and_names_a_wrong_arch(tmp_path: Path) -> None:
    from icd_core.detectors import load_detector
    from tests.core.test_teacher_import_layouts import _d2_pkl, _mmdet_pth, manifest, random_state

    classes = Path(__file__).resolve().parents[1] / "fixtures" / "coco_mini" / "instances.json"
    d2 = _d2_pkl(tmp_path / "model_final.pkl", random_state(manifest("detectron2_retinanet_R_50_FPN")["keys"]))
    mm = _mmdet_pth(tmp_path / "retinanet_mmdet.pth", random_state(manifest("mmdet_retinanet_r50_fpn")["keys"]))
    for src, source, arch in ((d2, "detectron2", "retinanet_R_50_FPN"), (mm, "mmdet", "retinanet_r50_fpn")):
        out = tmp_path / f"{source}.pt"
        args = ["import-teacher", str(src), "--from", source, "--arch", arch, "--classes", str(classes), "-o", str(out)]
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 0, res.output
        detector, saved = load_detector(out, 128, 160)
        assert detector.num_classes == 16 and saved["imported_from"]["layout"].startswith(source)
        wrong = CliRunner().invoke(cli, [*args[:4], "--arch", "resnet_nonsense", "-o", str(tmp_path / "x.pt")])
        assert wrong.exit_code == 2 and "--arch resnet_nonsense" in wrong.output and "Traceback" not in wrong.output


def test_a_classifier_that_is_not_cocos_is_refused() -> None:
    model = tv_detection.fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5)
    with pytest.raises(LayoutError, match="predicts 5 labels"):
        convert(model.state_dict(), "fcos_resnet50_fpn")
