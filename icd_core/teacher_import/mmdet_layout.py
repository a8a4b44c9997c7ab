"""MMDetection's COCO RetinaNet and Faster R-CNN (R50/R101-FPN, v2 and v3 checkpoints) as our detectors.

What differs from torchvision, and what handles it (docs/teacher_layouts.md#mmdetection has the full list):
keys are renamed (the trunk's already are torchvision's); RetinaNet's P6 reads C5 and P7 reads P6 without a
ReLU (`extra_levels_from: c5`, `extra_levels_relu: false`); anchors are unrounded and spaced by the level's
stride (`anchor_rounding: false`, `anchor_stride: level`) but already ordered ratio-major, as torchvision's;
Faster R-CNN's classifier puts background last and its box rows have no background (rewritten) and its
RoIAlign is aligned with adaptive sampling (`roi_align_aligned`, `roi_sampling_ratio: 0`). The `pytorch`
style trunks of the named configs take RGB with ImageNet mean/std, as ours; `_caffe_` configs take BGR
0-255 minus caffe means and stride in the 1x1 conv, as detectron2's.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from torch import Tensor

from icd_core.engine.checkpoint import load_checkpoint
from icd_core.spec import ModelSpec

from .coco_categories import COCO_IDS, COCO_NAMES
from .keymap import (
    LayoutError,
    Rule,
    add_batchnorm_counters,
    check_shapes,
    move_background_first,
    rename,
)
from .layout import ImportedDetector

ARCHS = (
    "retinanet_r50_fpn",
    "retinanet_r101_fpn",
    "faster_rcnn_r50_fpn",
    "faster_rcnn_r101_fpn",
    "retinanet_r50_caffe_fpn",
    "faster_rcnn_r50_caffe_fpn",
)
# v2 names (faster_rcnn_r50_fpn_1x_coco) and v3 names (faster-rcnn_r50_fpn_1x_coco) alike.
_ARCH = re.compile(r"(retinanet|faster_rcnn)_r(50|101)(_caffe)?_fpn(_\w+)?")
NUM_CLASSES = 80

_BODY = "model.backbone.body.stages"
_TRUNK: list[Rule] = [
    (r"backbone\.conv1\.weight", f"{_BODY}.0.0.weight"),
    (r"backbone\.bn1\.(\w+)", rf"{_BODY}.0.1.\1"),
    (r"backbone\.layer([1-4])\.(\d+\.(?:conv[123]\.weight|bn[123]\.\w+|downsample\.[01]\.\w+))", rf"{_BODY}.\1.\2"),
]
_RETINANET_HEAD: list[Rule] = [
    (r"bbox_head\.cls_convs\.(\d+)\.conv\.(weight|bias)", r"model.head.classification_head.conv.\1.0.\2"),
    (r"bbox_head\.reg_convs\.(\d+)\.conv\.(weight|bias)", r"model.head.regression_head.conv.\1.0.\2"),
    (r"bbox_head\.retina_cls\.(weight|bias)", r"model.head.classification_head.cls_logits.\1"),
    (r"bbox_head\.retina_reg\.(weight|bias)", r"model.head.regression_head.bbox_reg.\1"),
]
_RCNN_HEAD: list[Rule] = [
    (r"rpn_head\.rpn_conv\.(weight|bias)", r"model.rpn.head.conv.0.0.\1"),
    (r"rpn_head\.rpn_cls\.(weight|bias)", r"model.rpn.head.cls_logits.\1"),
    (r"rpn_head\.rpn_reg\.(weight|bias)", r"model.rpn.head.bbox_pred.\1"),
    (r"roi_head\.bbox_head\.shared_fcs\.0\.(weight|bias)", r"model.roi_heads.box_head.fc6.\1"),
    (r"roi_head\.bbox_head\.shared_fcs\.1\.(weight|bias)", r"model.roi_heads.box_head.fc7.\1"),
    (r"roi_head\.bbox_head\.fc_cls\.(weight|bias)", r"model.roi_heads.box_predictor.cls_score.\1"),
    (r"roi_head\.bbox_head\.fc_reg\.(weight|bias)", r"model.roi_heads.box_predictor.bbox_pred.\1"),
]


def _fpn_rules(trunk_levels: int) -> list[Rule]:
    """fpn_convs holds the trunk levels' output convs, then the extra (P6, P7) convs."""

    def output(m: re.Match[str]) -> str:
        i = int(m[1])
        if i < trunk_levels:
            return f"model.backbone.fpn.layer_blocks.{i}.0.{m[2]}"
        return f"model.backbone.fpn.extra_blocks.convs.{i - trunk_levels}.{m[2]}"

    return [
        (r"neck\.lateral_convs\.(\d+)\.conv\.(weight|bias)", r"model.backbone.fpn.inner_blocks.\1.0.\2"),
        (r"neck\.fpn_convs\.(\d+)\.conv\.(weight|bias)", output),
    ]


def model_spec(arch: str) -> ModelSpec:
    """Our spec of an MMDetection config name (e.g. retinanet_r50_fpn_1x_coco or faster-rcnn_r101_fpn_2x_coco)."""
    m = _ARCH.fullmatch(arch.replace("-", "_"))
    if not m:
        raise LayoutError(
            f"--arch {arch}: MMDetection architectures are {', '.join(ARCHS)} (a _1x_coco suffix is fine)"
        )
    caffe = bool(m[3])
    common: dict[str, Any] = dict(
        backbone=f"resnet{m[2]}",
        input_format="bgr_caffe" if caffe else "rgb_imagenet",
        stride_in_1x1=caffe,
        anchor_rounding=False,
        anchor_stride="level",
    )
    if m[1] == "retinanet":
        return ModelSpec(detector="retinanet", extra_levels_from="c5", extra_levels_relu=False, **common)
    return ModelSpec(detector="faster_rcnn", roi_align_aligned=True, roi_sampling_ratio=0, **common)


def read_state(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state_dict, meta) of an MMDetection checkpoint, read with `torch.load(weights_only=True)` only."""
    obj = load_checkpoint(path)
    state = obj.get("state_dict", obj)
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise LayoutError(f"{path}: its state_dict is not a dict of tensors")
    return dict(state), dict(meta or {})


def class_names(meta: dict[str, Any]) -> list[str] | None:
    """The class names a checkpoint's meta records (v2: CLASSES, v3: dataset_meta.classes), if any."""
    names = meta.get("CLASSES")
    if names is None and isinstance(meta.get("dataset_meta"), dict):
        names = meta["dataset_meta"].get("classes")
    return None if names is None else [str(n) for n in names]


def _check_meta(meta: dict[str, Any], caffe: bool, source: str) -> None:
    names = class_names(meta)
    if names is not None and [n.lower() for n in names] != list(COCO_NAMES):
        raise LayoutError(
            f"{source}: its meta lists {len(names)} classes ({', '.join(names[:4])}, ...), not COCO's 80 in "
            "COCO's order; only COCO-trained models map to category ids"
        )
    config = meta.get("config")
    if isinstance(config, str) and ("style='caffe'" in config or 'style="caffe"' in config) != caffe:
        want = "a _caffe_ arch" if not caffe else "an arch without _caffe_"
        raise LayoutError(f"{source}: its config's trunk style does not match --arch; use {want}")


def convert_state(raw: dict[str, Tensor], spec: ModelSpec, source: str) -> tuple[dict[str, Tensor], list[str]]:
    """MMDetection keys and head layouts -> ours; returns (state, notes on what was rewritten)."""
    retinanet = spec.detector == "retinanet"
    rules = _TRUNK + _fpn_rules(3 if retinanet else 4) + (_RETINANET_HEAD if retinanet else _RCNN_HEAD)
    state = rename(raw, rules, (), source)
    notes: list[str] = []
    if not retinanet:
        notes.append(move_background_first(state))
    add_batchnorm_counters(state)
    return state, notes


def convert(path: Path, arch: str) -> ImportedDetector:
    """An MMDetection COCO checkpoint as an ImportedDetector over the 80 COCO categories."""
    spec = model_spec(arch)
    raw, meta = read_state(path)
    _check_meta(meta, spec.stride_in_1x1, str(path))
    state, notes = convert_state(raw, spec, str(path))
    check_shapes(spec, NUM_CLASSES, state, f"{path} (MMDetection {arch})")
    return ImportedDetector(spec, state, list(COCO_IDS), 800, 1333, f"mmdet:{arch}", notes)
