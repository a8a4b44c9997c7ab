"""detectron2 and MMDetection detectors convert to ours (docs/teacher_layouts.md).

Structural: every manifest (tests/fixtures/teacher_layouts, key names and shapes written from the upstream
model code) converts and loads strictly. Numeric: the upstream computations that differ from torchvision are
re-created here from their definitions (anchor generation and order, caffe input, MSRA strides, the FPNs'
P6/P7, background-last classifiers, aligned RoIAlign) and compared with the converted model. End to end: a
detectron2 `.pkl` and an MMDetection `.pth` RetinaNet-R50 import and teach a tiny distill job.
"""

from __future__ import annotations

import json
import math
import pickle
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from icd_core.detectors import AlignedMultiScaleRoIAlign, build_detector, load_weights, read_checkpoint
from icd_core.runner import run_spec
from icd_core.spec import parse_spec
from icd_core.teacher_import import detectron2_layout, mmdet_layout
from icd_core.teacher_import.classes import select_classes
from icd_core.teacher_import.keymap import LayoutError, size_major_to_ratio_major
from icd_core.teacher_import.write import write_imported

MANIFESTS = Path(__file__).resolve().parents[1] / "fixtures" / "teacher_layouts"
LAYOUTS = {"detectron2": detectron2_layout, "mmdet": mmdet_layout}


def manifest(name: str) -> dict[str, Any]:
    return json.loads((MANIFESTS / f"{name}.json").read_text())


def random_state(keys: dict[str, list[int]], seed: int = 0, values: bool = True) -> dict[str, Tensor]:
    """Tensors of the manifest's shapes, scaled like a trained model (fan-in-scaled weights, sane BN statistics);
    values=False: shapes only (uninitialized memory, for structural checks)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    for key, shape in keys.items():
        if not values:
            out[key] = torch.empty(shape)
        elif not shape:
            out[key] = torch.tensor(0)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=g) + 0.5
        elif len(shape) == 1:  # biases, BN weights and means
            base = 1.0 if key.endswith("norm.weight") or ".bn" in key and key.endswith(".weight") else 0.0
            out[key] = base + 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:])
            out[key] = torch.randn(shape, generator=g) * math.sqrt(1.0 / fan_in)
    return out


def converted(name: str, values: bool = True) -> tuple[Any, dict[str, Tensor], dict[str, Tensor]]:
    """(spec, our state, the source state) of a manifest's random model."""
    man = manifest(name)
    layout = LAYOUTS[man["layout"]]
    spec = layout.model_spec(man["arch"])
    raw = random_state(man["keys"], values=values)
    state, _ = layout.convert_state(raw, spec, name)
    return spec, state, raw


@cache
def loaded(name: str, min_size: int = 128, max_size: int = 256):
    spec, state, raw = converted(name)
    det = build_detector(spec, 80, min_size, max_size).eval()
    load_weights(det, state, source=name)
    return det, raw


# --- structural: every manifest ----------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:for model.*meta parameter")
@pytest.mark.parametrize("name", sorted(p.stem for p in MANIFESTS.glob("*.json")))
def test_manifest_converts_and_loads_strictly(name: str) -> None:
    man = manifest(name)
    spec, state, _ = converted(name, values=False)
    with torch.device("meta"):  # shapes and names only: a meta model loads without copying 40M numbers
        det = build_detector(spec, 80)
    load_weights(det, state, source=name)  # strict: names any missing, extra or mis-shaped key
    assert spec.backbone == ("resnet101" if "101" in man["arch"] else "resnet50")
    assert len(state) == len(det.state_dict())


def test_a_foreign_key_or_wrong_arch_is_named(tmp_path: Path) -> None:
    raw = random_state(manifest("mmdet_retinanet_r50_fpn")["keys"], values=False)
    raw["bbox_head.retina_extra.weight"] = torch.zeros(1)
    spec = mmdet_layout.model_spec("retinanet_r50_fpn")
    with pytest.raises(LayoutError, match=r"bbox_head\.retina_extra\.weight"):
        mmdet_layout.convert_state(raw, spec, "x.pth")
    path = tmp_path / "r50.pth"
    torch.save({"state_dict": random_state(manifest("mmdet_retinanet_r50_fpn")["keys"], values=False)}, path)
    with pytest.raises(LayoutError, match=r"missing: model\.backbone\.body\.stages\.3\.\d+\."):
        mmdet_layout.convert(path, "retinanet_r101_fpn_1x_coco")
    with pytest.raises(LayoutError, match="detectron2 architectures are"):
        detectron2_layout.model_spec("retinanet_X_101_FPN")
    assert mmdet_layout.model_spec("faster-rcnn_r101_fpn_2x_coco").backbone == "resnet101"
    caffe = mmdet_layout.model_spec("retinanet_r50_caffe_fpn_1x_coco")
    assert caffe.input_format == "bgr_caffe" and caffe.stride_in_1x1


def test_mmdet_meta_with_other_classes_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "voc.pth"
    state = random_state(manifest("mmdet_retinanet_r50_fpn")["keys"], values=False)
    torch.save({"state_dict": state, "meta": {"CLASSES": ["aeroplane", "bicycle"]}}, path)
    with pytest.raises(LayoutError, match="not COCO's 80"):
        mmdet_layout.convert(path, "retinanet_r50_fpn")


# --- numeric: re-created upstream computations --------------------------------------------------------


def d2_cell_anchors(sizes: list[float], ratios: list[float]) -> Tensor:
    """detectron2's generate_cell_anchors: size outer, ratio inner; w = sqrt(size^2 / ratio), h = ratio * w."""
    rows = []
    for size in sizes:
        for ratio in ratios:
            w = math.sqrt(size * size / ratio)
            h = ratio * w
            rows.append([-w / 2, -h / 2, w / 2, h / 2])
    return torch.tensor(rows)


def grid(cell: Tensor, height: int, width: int, stride: int, offset: float = 0.0) -> Tensor:
    """Cell anchors shifted to every location (row-major locations, anchors inner), `offset` in strides."""
    ys, xs = torch.meshgrid(
        torch.arange(height) * stride + offset * stride, torch.arange(width) * stride + offset * stride, indexing="ij"
    )
    shifts = torch.stack([xs, ys, xs, ys], dim=-1).reshape(-1, 1, 4).float()
    return (shifts + cell[None]).reshape(-1, 4)


def decode(deltas: Tensor, anchors: Tensor, weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """The (dx, dy, dw, dh) box transform both projects use (no +1), dw/dh clamped at log(1000/16)."""
    w, h = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    cx, cy = anchors[:, 0] + 0.5 * w, anchors[:, 1] + 0.5 * h
    dx, dy, dw, dh = (deltas[:, i] / weights[i] for i in range(4))
    clamp = math.log(1000.0 / 16)
    pw, ph = torch.exp(dw.clamp(max=clamp)) * w, torch.exp(dh.clamp(max=clamp)) * h
    px, py = dx * w + cx, dy * h + cy
    return torch.stack([px - pw / 2, py - ph / 2, px + pw / 2, py + ph / 2], dim=1)


def test_detectron2_retinanet_permuted_head_decodes_the_same_boxes() -> None:
    """Source head + detectron2's size-major anchors == our permuted head + our anchors, exactly per anchor."""
    det, raw = loaded("detectron2_retinanet_R_50_FPN")
    image = torch.rand(3, 160, 224)  # padded 160 x 224: P6/P7 strides differ from torchvision's side // grid
    images, _ = det.prepare([image])
    feats = list(det.extract_features(images).values())
    ours_anchors = det.model.anchor_generator(images, feats)[0]
    head = det.model.head
    ours_cls = head.classification_head(feats)[0]
    ours_box = head.regression_head(feats)[0]
    sizes = [[x, x * 2 ** (1 / 3), x * 2 ** (2 / 3)] for x in (32, 64, 128, 256, 512)]
    src_cls, src_box, src_anchors = [], [], []
    for level, feat in enumerate(feats):
        cls_tower = feat
        box_tower = feat
        for i in range(4):  # detectron2's cls_subnet / bbox_subnet, from the source weights
            cls_tower = F.relu(
                F.conv2d(
                    cls_tower, raw[f"head.cls_subnet.{2 * i}.weight"], raw[f"head.cls_subnet.{2 * i}.bias"], padding=1
                )
            )
            box_tower = F.relu(
                F.conv2d(
                    box_tower, raw[f"head.bbox_subnet.{2 * i}.weight"], raw[f"head.bbox_subnet.{2 * i}.bias"], padding=1
                )
            )
        logits = F.conv2d(cls_tower, raw["head.cls_score.weight"], raw["head.cls_score.bias"], padding=1)
        deltas = F.conv2d(box_tower, raw["head.bbox_pred.weight"], raw["head.bbox_pred.bias"], padding=1)
        n, _, h, w = logits.shape
        # detectron2's permute_to_N_HWA_K: (N, A*K, H, W) -> (N, H*W*A, K)
        src_cls.append(logits.view(n, -1, 80, h, w).permute(0, 3, 4, 1, 2).reshape(-1, 80))
        src_box.append(deltas.view(n, -1, 4, h, w).permute(0, 3, 4, 1, 2).reshape(-1, 4))
        src_anchors.append(grid(d2_cell_anchors(sizes[level], [0.5, 1.0, 2.0]), h, w, 2 ** (level + 3)))
    src_cls_t, src_box_t, src_anchor_t = torch.cat(src_cls), torch.cat(src_box), torch.cat(src_anchors)
    src_boxes = decode(src_box_t, src_anchor_t)
    ours_boxes = decode(ours_box, ours_anchors)
    perm = torch.tensor(size_major_to_ratio_major(3, 3))
    index = (torch.arange(len(src_boxes)).view(-1, 9))[:, perm].reshape(-1)  # our anchor j = source anchor perm[j]
    assert torch.allclose(ours_anchors, src_anchor_t[index], atol=1e-4)
    assert torch.allclose(ours_cls, src_cls_t[index], atol=1e-4)
    assert torch.allclose(ours_boxes, src_boxes[index], atol=1e-3)
    assert not torch.allclose(ours_cls, src_cls_t, atol=1e-2)  # without the permutation they would differ


def test_mmdet_retinanet_anchors_need_no_permutation() -> None:
    """MMDetection's AnchorGenerator (ratio outer, octave scale inner, base size = stride, centre offset 0,
    nominal strides) equals our generator for the converted spec, anchor for anchor."""
    det, _ = loaded("mmdet_retinanet_r50_fpn")
    images, _ = det.prepare([torch.rand(3, 160, 224)])
    feats = list(det.extract_features(images).values())
    ours = det.model.anchor_generator(images, feats)[0]
    scales = torch.tensor([4 * 2 ** (i / 3) for i in range(3)])
    h_ratios = torch.sqrt(torch.tensor([0.5, 1.0, 2.0]))
    expected = []
    for level, feat in enumerate(feats):
        stride = 2 ** (level + 3)
        ws = (stride * (1 / h_ratios)[:, None] * scales[None, :]).reshape(-1)
        hs = (stride * h_ratios[:, None] * scales[None, :]).reshape(-1)
        cell = torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1)
        expected.append(grid(cell, feat.shape[-2], feat.shape[-1], stride))
    assert torch.allclose(ours, torch.cat(expected), atol=1e-4)


def _frozen_bn(x: Tensor, raw: dict[str, Tensor], prefix: str) -> Tensor:
    scale = raw[f"{prefix}.weight"] / torch.sqrt(raw[f"{prefix}.running_var"] + 1e-5)
    shift = raw[f"{prefix}.bias"] - raw[f"{prefix}.running_mean"] * scale
    return x * scale[None, :, None, None] + shift[None, :, None, None]


def _d2_bottleneck(x: Tensor, raw: dict[str, Tensor], p: str, stride: int) -> Tensor:
    """detectron2's BottleneckBlock with STRIDE_IN_1X1 (the MSRA trunk): the stride is in conv1."""
    out = F.relu(_frozen_bn(F.conv2d(x, raw[f"{p}.conv1.weight"], stride=stride), raw, f"{p}.conv1.norm"))
    out = F.relu(_frozen_bn(F.conv2d(out, raw[f"{p}.conv2.weight"], padding=1), raw, f"{p}.conv2.norm"))
    out = _frozen_bn(F.conv2d(out, raw[f"{p}.conv3.weight"]), raw, f"{p}.conv3.norm")
    short = x
    if f"{p}.shortcut.weight" in raw:
        short = _frozen_bn(F.conv2d(x, raw[f"{p}.shortcut.weight"], stride=stride), raw, f"{p}.shortcut.norm")
    return F.relu(out + short)


def test_detectron2_trunk_caffe_input_and_msra_strides_match_the_reference() -> None:
    """Preprocessing (BGR 0-255 minus PIXEL_MEAN) + stem + res2 + res3 re-created from detectron2's definitions."""
    det, raw = loaded("detectron2_retinanet_R_50_FPN")
    meta = manifest("detectron2_retinanet_R_50_FPN")["metadata"]
    image = torch.rand(3, 64, 96)
    bgr = image.flip(0) * 255.0
    x = (bgr - torch.tensor(meta["pixel_mean"])[:, None, None]) / torch.tensor(meta["pixel_std"])[:, None, None]
    b = "backbone.bottom_up"
    x = F.relu(
        _frozen_bn(F.conv2d(x[None], raw[f"{b}.stem.conv1.weight"], stride=2, padding=3), raw, f"{b}.stem.conv1.norm")
    )
    x = F.max_pool2d(x, 3, 2, 1)
    for stage, blocks in ((2, 3), (3, 4)):
        for i in range(blocks):
            x = _d2_bottleneck(x, raw, f"{b}.res{stage}.{i}", 2 if stage > 2 and i == 0 else 1)
    ours = det.model.backbone.body(det.model.transform.normalize(image)[None])
    assert ours["p3"].shape == x.shape
    torch.testing.assert_close(ours["p3"], x, rtol=1e-4, atol=1e-5 * float(x.abs().max()))  # 0-255 input scale


def _trunk_features(shape: tuple[int, ...], channels: list[int]) -> list[Tensor]:
    h, w = shape
    return [torch.randn(1, c, h // 2**i, w // 2**i) for i, c in enumerate(channels)]


def test_detectron2_fpn_and_top_block_match_the_reference() -> None:
    """detectron2's FPN (scale-factor-2 top-down) with LastLevelP6P7 on res5 and a ReLU before P7."""
    det, raw = loaded("detectron2_retinanet_R_50_FPN")
    c3, c4, c5 = _trunk_features((32, 48), [512, 1024, 2048])
    b = "backbone"
    lat = {
        lv: F.conv2d(c, raw[f"{b}.fpn_lateral{lv}.weight"], raw[f"{b}.fpn_lateral{lv}.bias"])
        for lv, c in zip((3, 4, 5), (c3, c4, c5))
    }
    top = {5: lat[5]}
    top[4] = lat[4] + F.interpolate(top[5], scale_factor=2.0, mode="nearest")
    top[3] = lat[3] + F.interpolate(top[4], scale_factor=2.0, mode="nearest")
    out = {
        f"p{lv}": F.conv2d(top[lv], raw[f"{b}.fpn_output{lv}.weight"], raw[f"{b}.fpn_output{lv}.bias"], padding=1)
        for lv in (3, 4, 5)
    }
    out["p6"] = F.conv2d(c5, raw[f"{b}.top_block.p6.weight"], raw[f"{b}.top_block.p6.bias"], stride=2, padding=1)
    out["p7"] = F.conv2d(
        F.relu(out["p6"]), raw[f"{b}.top_block.p7.weight"], raw[f"{b}.top_block.p7.bias"], stride=2, padding=1
    )
    ours = det.model.backbone.fpn({"p3": c3, "p4": c4, "p5": c5})
    for name, ref in out.items():
        assert torch.allclose(ours[name], ref, atol=1e-4), name


def test_mmdet_fpn_extra_convs_on_input_without_relu_match_the_reference() -> None:
    """MMDetection's FPN: start_level 1, size-matched nearest upsampling, P6 = conv(C5), P7 = conv(P6), no ReLU."""
    det, raw = loaded("mmdet_retinanet_r50_fpn")
    inputs = _trunk_features((32, 48), [512, 1024, 2048])
    n = "neck"
    lat = [
        F.conv2d(x, raw[f"{n}.lateral_convs.{i}.conv.weight"], raw[f"{n}.lateral_convs.{i}.conv.bias"])
        for i, x in enumerate(inputs)
    ]
    for i in (2, 1):
        lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[2:], mode="nearest")
    conv = [(raw[f"{n}.fpn_convs.{i}.conv.weight"], raw[f"{n}.fpn_convs.{i}.conv.bias"]) for i in range(5)]
    outs = [F.conv2d(lat[i], *conv[i], padding=1) for i in range(3)]
    outs.append(F.conv2d(inputs[-1], *conv[3], stride=2, padding=1))
    outs.append(F.conv2d(outs[-1], *conv[4], stride=2, padding=1))
    ours = det.model.backbone.fpn({"p3": inputs[0], "p4": inputs[1], "p5": inputs[2]})
    for name, ref in zip(("p3", "p4", "p5", "p6", "p7"), outs, strict=True):
        assert torch.allclose(ours[name], ref, atol=1e-4), name
    assert (outs[3] < 0).any()  # a ReLU before P7 would have changed it


@pytest.mark.parametrize(
    ("name", "cls", "box"),
    [
        ("detectron2_faster_rcnn_R_50_FPN", "roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred"),
        ("mmdet_faster_rcnn_r50_fpn", "roi_head.bbox_head.fc_cls", "roi_head.bbox_head.fc_reg"),
    ],
)
def test_background_last_classifier_gives_the_same_scores_and_boxes(name: str, cls: str, box: str) -> None:
    """Source: softmax over K+1 with background last, class c's deltas at rows 4c..4c+3. Ours: background first."""
    spec, state, raw = converted(name)
    x = torch.randn(5, 1024)
    src_scores = F.softmax(F.linear(x, raw[f"{cls}.weight"], raw[f"{cls}.bias"]), -1)[:, :-1]
    src_deltas = F.linear(x, raw[f"{box}.weight"], raw[f"{box}.bias"]).view(5, 80, 4)
    p = "model.roi_heads.box_predictor"
    ours_scores = F.softmax(F.linear(x, state[f"{p}.cls_score.weight"], state[f"{p}.cls_score.bias"]), -1)[:, 1:]
    ours_deltas = F.linear(x, state[f"{p}.bbox_pred.weight"], state[f"{p}.bbox_pred.bias"]).view(5, 81, 4)[:, 1:]
    assert torch.allclose(ours_scores, src_scores, atol=1e-6)
    assert torch.equal(ours_deltas, src_deltas)


def test_rpn_anchors_match_detectron2_with_one_size_per_level() -> None:
    """One size per level: size-major and ratio-major orders coincide, so the RPN needs no permutation."""
    det, _ = loaded("detectron2_faster_rcnn_R_50_FPN")
    images, _ = det.prepare([torch.rand(3, 160, 224)])
    feats = list(det.extract_features(images).values())
    ours = det.model.rpn.anchor_generator(images, feats)[0]
    expected = [
        grid(d2_cell_anchors([32.0 * 2**i], [0.5, 1.0, 2.0]), f.shape[-2], f.shape[-1], 2 ** (i + 2))
        for i, f in enumerate(feats)
    ]
    assert torch.allclose(ours, torch.cat(expected), atol=1e-4)


def test_aligned_roi_align_samples_half_a_pixel_earlier() -> None:
    """ROIAlignV2 / mmcv RoIAlign(aligned=True): a box from x1 to x2 (image px) covers feature coordinates
    x1*s - 0.5 .. x2*s - 0.5; on a ramp f(x) = x each bin's mean is its centre."""
    pool = AlignedMultiScaleRoIAlign(["p2"], 7, 0)
    ramp = torch.arange(32, dtype=torch.float32).expand(1, 1, 32, 32).contiguous()
    box = torch.tensor([[16.0, 16.0, 72.0, 72.0]])
    out = pool({"p2": ramp}, [box], [(128, 128)])
    s = 0.25
    start, width = 16 * s - 0.5, (72 - 16) * s / 7
    centres = torch.tensor([start + (i + 0.5) * width for i in range(7)])
    assert torch.allclose(out[0, 0, 0], centres, atol=1e-4)


# --- end to end: import, then teach a tiny distill job ------------------------------------------------


def _d2_pkl(path: Path, raw: dict[str, Tensor]) -> Path:
    """The model zoo's format: a pickle of numpy arrays under 'model'."""
    zoo = {"model": {k: v.numpy() for k, v in raw.items()}, "__author__": "Detectron2 Model Zoo"}
    path.write_bytes(pickle.dumps(zoo, protocol=pickle.HIGHEST_PROTOCOL))
    return path


def _mmdet_pth(path: Path, raw: dict[str, Tensor]) -> Path:
    names = [
        n
        for n in json.loads((MANIFESTS / "mmdet_retinanet_r50_fpn.json").read_text())["metadata"]["meta"]["v2"][
            "CLASSES"
        ]
    ]
    torch.save({"state_dict": raw, "meta": {"mmdet_version": "2.28.2", "CLASSES": tuple(names), "epoch": 12}}, path)
    return path


@pytest.mark.parametrize("layout", ["detectron2", "mmdet"])
def test_imported_retinanet_r50_teaches_a_tiny_distill_job(layout: str, tmp_path: Path, coco_mini) -> None:
    images, annotations = coco_mini
    if layout == "detectron2":
        name, arch = "detectron2_retinanet_R_50_FPN", "retinanet_R_50_FPN_3x"
        source = _d2_pkl(tmp_path / "model_final.pkl", random_state(manifest(name)["keys"]))
    else:
        name, arch = "mmdet_retinanet_r50_fpn", "retinanet_r50_fpn_1x_coco"
        source = _mmdet_pth(tmp_path / "retinanet.pth", random_state(manifest(name)["keys"]))
    imported = LAYOUTS[layout].convert(source, arch)
    model, class_names, cat_ids, untrained = select_classes(imported, annotations)
    out = tmp_path / "teacher.pt"
    write_imported(model, out, class_names, cat_ids, source, untrained)
    ckpt = read_checkpoint(out)
    assert ckpt["label_to_cat_id"] == [c["id"] for c in json.loads(annotations.read_text())["categories"]]
    assert ckpt["imported_from"]["layout"] == f"{layout}:{arch}"

    data = {"format": "coco", "images": str(images), "annotations": str(annotations)}
    student = {"detector": "retinanet", "backbone": "resnet18", "head_convs": 1}  # ICD: FPN widths match (256)
    spec = {
        "kind": "distill",
        "name": f"{layout}-teacher",
        "seed": 0,
        "device": "cpu",
        "data": {"train": data, "val": data, "min_size": 64, "max_size": 96, "workers": 0},
        "teacher": {**ckpt["model_spec"], "checkpoint": str(out)},
        "student": student,
        "distill": {"method": "icd", "inherit": False, "icd": {"bypass_iters": 0}},
        "schedule": {
            "iterations": 2,
            "batch_size": 2,
            "lr": 0.01,
            "warmup_iters": 0,
            "eval_every": 0,
            "checkpoint_every": 0,
            "log_every": 1,
        },  # fmt: skip
        "deploy": {"latency_repeats": 1, "latency_warmup": 0, "exported_latency": False, "prediction_images": 0},
    }
    result = run_spec(parse_spec(spec), tmp_path / "job", cache_dir=tmp_path / "cache")
    losses = [v for k, v in result.final_metrics.items() if "loss" in k]
    assert losses and all(np.isfinite(v) for v in losses)
