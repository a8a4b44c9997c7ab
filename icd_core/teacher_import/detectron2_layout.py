"""detectron2's COCO RetinaNet and Faster R-CNN (R50/R101-FPN, the model zoo's MSRA trunks) as our detectors.

What differs from torchvision, and what handles it (docs/teacher_layouts.md#detectron2 has the full list):
keys are renamed; the trunk takes BGR 0-255 minus caffe means (`input_format: bgr_caffe`) and strides in
the 1x1 conv (`stride_in_1x1`); RetinaNet's P6 reads C5 (`extra_levels_from: c5`); anchors are unrounded
and spaced by the level's stride (`anchor_rounding: false`, `anchor_stride: level`); RetinaNet's anchors are
ordered size-major, so its head's output rows are permuted into torchvision's ratio-major order (the same
computation, exactly); Faster R-CNN's classifier puts background last and its box rows have no background
(both rewritten to torchvision's layout) and its RoIAlign is ROIAlignV2 (`roi_align_aligned`,
`roi_sampling_ratio: 0`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from torch import Tensor

from icd_core.engine.checkpoint import load_checkpoint
from icd_core.spec import ModelSpec

from .coco_categories import COCO_IDS
from .keymap import (
    LayoutError,
    Rule,
    add_batchnorm_counters,
    check_shapes,
    move_background_first,
    permute_anchor_rows,
    rename,
    size_major_to_ratio_major,
)
from .layout import ImportedDetector
from .safe_pickle import load_weights_pickle, to_tensors

ARCHS = ("retinanet_R_50_FPN", "retinanet_R_101_FPN", "faster_rcnn_R_50_FPN", "faster_rcnn_R_101_FPN")
_ARCH = re.compile(r"(retinanet|faster_rcnn)_R_(50|101)_FPN(_\w+)?")  # a zoo suffix (_1x, _3x) is allowed
CAFFE_PIXEL_MEAN = (103.53, 116.28, 123.675)  # BGR, MODEL.PIXEL_MEAN of the zoo's MSRA-trunk configs
CAFFE_PIXEL_STD = (1.0, 1.0, 1.0)
RETINANET_SIZES, RETINANET_RATIOS = 3, 3  # per location: 3 octave sizes x 3 aspect ratios
NUM_CLASSES = 80

_BODY = "model.backbone.body.stages"
_TRUNK: list[Rule] = [
    (r"backbone\.bottom_up\.stem\.conv1\.weight", f"{_BODY}.0.0.weight"),
    (r"backbone\.bottom_up\.stem\.conv1\.norm\.(\w+)", rf"{_BODY}.0.1.\1"),
    (r"backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.weight", lambda m: _block(m, f"conv{m[3]}.weight")),
    (r"backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.norm\.(\w+)", lambda m: _block(m, f"bn{m[3]}.{m[4]}")),
    (r"backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.weight", lambda m: _block(m, "downsample.0.weight")),
    (r"backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.norm\.(\w+)", lambda m: _block(m, f"downsample.1.{m[3]}")),
]
_RETINANET_HEAD: list[Rule] = [
    (r"backbone\.top_block\.p6\.(weight|bias)", r"model.backbone.fpn.extra_blocks.convs.0.\1"),
    (r"backbone\.top_block\.p7\.(weight|bias)", r"model.backbone.fpn.extra_blocks.convs.1.\1"),
    (r"head\.cls_subnet\.(\d+)\.(weight|bias)", lambda m: _subnet(m, "classification_head")),
    (r"head\.bbox_subnet\.(\d+)\.(weight|bias)", lambda m: _subnet(m, "regression_head")),
    (r"head\.cls_score\.(weight|bias)", r"model.head.classification_head.cls_logits.\1"),
    (r"head\.bbox_pred\.(weight|bias)", r"model.head.regression_head.bbox_reg.\1"),
]
_RCNN_HEAD: list[Rule] = [
    (r"proposal_generator\.rpn_head\.conv\.(weight|bias)", r"model.rpn.head.conv.0.0.\1"),
    (r"proposal_generator\.rpn_head\.objectness_logits\.(weight|bias)", r"model.rpn.head.cls_logits.\1"),
    (r"proposal_generator\.rpn_head\.anchor_deltas\.(weight|bias)", r"model.rpn.head.bbox_pred.\1"),
    (r"roi_heads\.box_head\.fc1\.(weight|bias)", r"model.roi_heads.box_head.fc6.\1"),
    (r"roi_heads\.box_head\.fc2\.(weight|bias)", r"model.roi_heads.box_head.fc7.\1"),
    (r"roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(weight|bias)", r"model.roi_heads.box_predictor.\1.\2"),
]
# Buffers older checkpoints saved that are recomputed from the config (checked or rebuilt, never loaded).
_IGNORED = (r"pixel_(mean|std)", r"(proposal_generator\.)?anchor_generator\.cell_anchors\.\d+")


def _block(m: re.Match[str], rest: str) -> str:
    return f"{_BODY}.{int(m[1]) - 1}.{m[2]}.{rest}"  # res2..res5 are our stages 1..4


def _subnet(m: re.Match[str], head: str) -> str:
    index = int(m[1])
    if index % 2:  # (conv, ReLU) pairs: an odd index holding weights is a norm layer we do not build
        raise LayoutError(f"head.*_subnet.{index}: a normalized RetinaNet head (RETINANET.NORM) is not supported")
    return f"model.head.{head}.conv.{index // 2}.0.{m[2]}"


def _fpn_rules(first_level: int) -> list[Rule]:
    return [
        (
            r"backbone\.fpn_lateral(\d)\.(weight|bias)",
            lambda m: f"model.backbone.fpn.inner_blocks.{int(m[1]) - first_level}.0.{m[2]}",
        ),
        (
            r"backbone\.fpn_output(\d)\.(weight|bias)",
            lambda m: f"model.backbone.fpn.layer_blocks.{int(m[1]) - first_level}.0.{m[2]}",
        ),
    ]


def model_spec(arch: str) -> ModelSpec:
    """Our spec of a detectron2 model-zoo architecture (e.g. retinanet_R_101_FPN_3x)."""
    m = _ARCH.fullmatch(arch)
    if not m:
        raise LayoutError(f"--arch {arch}: detectron2 architectures are {', '.join(ARCHS)} (a _1x/_3x suffix is fine)")
    common: dict[str, Any] = dict(
        backbone=f"resnet{m[2]}",
        input_format="bgr_caffe",
        stride_in_1x1=True,
        anchor_rounding=False,
        anchor_stride="level",
    )
    if m[1] == "retinanet":
        return ModelSpec(detector="retinanet", extra_levels_from="c5", **common)
    return ModelSpec(detector="faster_rcnn", roi_align_aligned=True, roi_sampling_ratio=0, **common)


def read_state(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(weights, the file's other top-level entries) of a zoo `.pkl` (restricted unpickler) or a `.pth`."""
    obj = load_weights_pickle(path) if Path(path).suffix == ".pkl" else load_checkpoint(path)
    if not isinstance(obj, dict):
        raise LayoutError(f"{path}: holds a {type(obj).__name__}, not a dict of weights")
    if "blobs" in obj or obj.get("matching_heuristics") or obj.get("__author__") == "Caffe2":
        raise LayoutError(
            f"{path}: a Caffe2/Detectron1 file (blob names such as res2_0_branch2a_w), not a detectron2 detector; "
            "use the detectron2 model zoo's model_final_*.pkl"
        )
    weights = obj["model"] if isinstance(obj.get("model"), dict) else obj
    meta = {k: v for k, v in obj.items() if k != "model"} if weights is not obj else {}
    return to_tensors(weights, str(path)), meta


def _check_pixel_stats(state: dict[str, Tensor], source: str) -> None:
    """Older checkpoints store the normalization they were trained with: it must be the caffe one we build."""
    for key, want in (("pixel_mean", CAFFE_PIXEL_MEAN), ("pixel_std", CAFFE_PIXEL_STD)):
        if key in state:
            got = [round(float(v), 3) for v in state[key].flatten()]
            if got != [round(v, 3) for v in want]:
                raise LayoutError(
                    f"{source}: {key} is {got}, not the MSRA trunk's {list(want)}; only caffe-normalized "
                    "(MODEL.PIXEL_MEAN/STD of the COCO-Detection configs) detectron2 models are supported"
                )


def convert_state(raw: dict[str, Tensor], spec: ModelSpec, source: str) -> tuple[dict[str, Tensor], list[str]]:
    """detectron2 keys and head layouts -> ours; returns (state, notes on what was rewritten)."""
    _check_pixel_stats(raw, source)
    retinanet = spec.detector == "retinanet"
    rules = _TRUNK + _fpn_rules(3 if retinanet else 2) + (_RETINANET_HEAD if retinanet else _RCNN_HEAD)
    state = rename(raw, rules, _IGNORED, source)
    notes = ["trunk: MSRA (stride in the 1x1 conv), caffe BGR input; FrozenBN statistics loaded as BatchNorm"]
    if retinanet:
        perm = size_major_to_ratio_major(RETINANET_SIZES, RETINANET_RATIOS)
        for key in [k for k in state if ".cls_logits." in k or ".bbox_reg." in k]:
            state[key] = permute_anchor_rows(state[key], perm)
        notes.append("RetinaNet head rows permuted from size-major to torchvision's ratio-major anchor order")
    else:
        notes.append(move_background_first(state))
    add_batchnorm_counters(state)
    return state, notes


def convert(path: Path, arch: str) -> ImportedDetector:
    """A detectron2 COCO model file as an ImportedDetector over the 80 COCO categories."""
    spec = model_spec(arch)
    raw, _meta = read_state(path)
    state, notes = convert_state(raw, spec, str(path))
    check_shapes(spec, NUM_CLASSES, state, f"{path} (detectron2 {arch})")
    return ImportedDetector(spec, state, list(COCO_IDS), 800, 1333, f"detectron2:{arch}", notes)
