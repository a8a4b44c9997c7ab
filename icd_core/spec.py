"""The job spec: one pydantic model shared by the CLI, the API and the workers.

It is the public contract. Extend it; never rename a field without a migration path.
Defaults are the paper's (ICD, NeurIPS 2021) unless a comment says otherwise.
"""

from __future__ import annotations

import builtins
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .safe_yaml import YamlRefused, load_yaml

# Each name list is written once, as a Literal; the tuples derive from it.
Detector = Literal["retinanet", "fcos", "faster_rcnn"]
Backbone = Literal["resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2", "mobilenet_v3_large"]
Method = Literal["none", "fitnet", "fgfi", "defeat", "fgd", "icd"]
# A study row, not a distill method: `icd` whose decoder is pre-trained on the teacher first (distill.icd.pretrain).
StudyMethod = Literal[Method, "icd_pretrained"]
DETECTORS: tuple[str, ...] = get_args(Detector)
BACKBONES: tuple[str, ...] = get_args(Backbone)
METHODS: tuple[str, ...] = get_args(Method)
ICD_PRETRAINED = "icd_pretrained"
# Each method's loss weight in its paper (distill.weight: null). The distillers use these; a tuned study
# centres its default search range on them (icd_core.tuning).
PAPER_WEIGHT: dict[str, float] = {"fitnet": 1.0, "fgfi": 0.01, "defeat": 1.0, "fgd": 1.0}
ICD_PAPER_WEIGHT: dict[str, float] = {"retinanet": 8.0, "fcos": 8.0, "faster_rcnn": 3.0}
LEVEL_NAMES = ("p2", "p3", "p4", "p5", "p6", "p7")
DEFAULT_LEVELS = {
    "retinanet": ["p3", "p4", "p5", "p6", "p7"],
    "fcos": ["p3", "p4", "p5", "p6", "p7"],
    "faster_rcnn": ["p2", "p3", "p4", "p5", "p6"],
}
# COCO "1x" = 90k iterations at batch 16; steps at 2/3 and 8/9 of training (docs/method/icd.md#student-schedule).
PRESET_ITERS_AT_16 = {"1x": 90_000, "3x": 270_000}
PAPER_WARMUP_ITERS = 1000  # the paper's LR warm-up (at 1x); short integer schedules warm up for a tenth
SEED_MAX = 2**63 - 1  # torch.manual_seed's range; larger seeds would fail on the worker, not at submit
# Steps, ids and counts are 32-bit INTEGER columns in the database: the one bound every such field shares.
INT32_MAX = 2**31 - 1
INT32_MIN = -(2**31)
MAX_IMAGE_SIDE = 8192  # no detector here is trained or evaluated on larger images; caps anchors and sizes too
MAX_CUDA_INDEX = 63


class StrictModel(BaseModel):
    """Rejects unknown keys so a typo is a 422 naming the field, not a silently ignored option.

    Floats must be finite: an Infinity or NaN (JSON extensions Python accepts, YAML's .inf) would train
    nothing and cannot be stored as JSON by PostgreSQL.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


@dataclass(frozen=True)
class UserPath:
    """Marks a spec field that names a file or folder on the server. Every field so marked, and only
    those, is resolved inside the allowed roots and checked for ownership (icd_core.data_roots); a
    test walks the spec and fails on a string field that is neither marked nor declared not a path."""

    kind: Literal["data", "checkpoint"]


DataPath = Annotated[str, UserPath("data")]
# A file path, or job:<id> for another job's final checkpoint.
CheckpointRef = Annotated[str, UserPath("checkpoint")]


class SubsetSpec(StrictModel):
    """A seeded part of a source's images: the tuning split a tuned study carves from data.train.

    `round(fraction · n)` images, drawn with `seed`, are the held-out part; the rest are the other part. The
    two parts of one (fraction, seed) are disjoint and together are the whole source (icd_core.data.subset).
    """

    fraction: float = Field(gt=0.0, lt=1.0, description="Share of the images that is held out.")
    seed: int = Field(0, ge=0, le=SEED_MAX)
    part: Literal["held_out", "rest"] = Field(description="held_out: the drawn images; rest: the others.")


class CocoSource(StrictModel):
    format: Literal["coco"] = "coco"
    images: DataPath = Field(description="Folder holding the images named in the annotation file.")
    annotations: DataPath = Field(description="COCO-format instances JSON.")
    subset: SubsetSpec | None = Field(None, description="Use only a seeded part of the images (null: all).")


class ShapesSource(StrictModel):
    format: Literal["shapes"] = "shapes"
    num_images: int = Field(512, ge=1, le=1_000_000)
    image_size: int = Field(256, ge=32, le=4096)
    seed: int = Field(0, ge=0, le=SEED_MAX)
    num_classes: int = Field(6, ge=1, le=12)
    min_object: int = Field(8, ge=2, le=4096, description="Smallest object side in pixels.")
    max_object: int = Field(96, ge=4, le=4096, description="Largest object side in pixels.")
    max_objects: int = Field(8, ge=1, le=100, description="Objects per image drawn from 0..max_objects.")
    subset: SubsetSpec | None = Field(None, description="Use only a seeded part of the images (null: all).")

    @model_validator(mode="after")
    def _objects_fit(self) -> ShapesSource:
        if self.min_object > self.max_object:
            raise ValueError(f"min_object: {self.min_object} is above max_object ({self.max_object})")
        if self.max_object > self.image_size:
            raise ValueError(
                f"max_object: {self.max_object} px does not fit in image_size {self.image_size}; "
                "lower it or raise image_size"
            )
        return self


DataSource = Annotated[CocoSource | ShapesSource, Field(discriminator="format")]
DATA_FORMATS = ("coco", "shapes")


class DataSpec(StrictModel):
    train: DataSource
    val: DataSource
    # An int, or a list of short sides to pick from per batch (multi-scale training).
    min_size: int | list[int] = 320
    max_size: int = Field(512, ge=32, le=MAX_IMAGE_SIDE)
    hflip: float = Field(0.5, ge=0.0, le=1.0, description="Horizontal flip probability in training.")
    workers: int = Field(2, ge=0, le=64, description="DataLoader worker processes.")

    @field_validator("min_size")
    @classmethod
    def _positive_sizes(cls, v: int | list[int]) -> int | list[int]:
        sizes = v if isinstance(v, list) else [v]
        if not sizes or any(s < 32 or s > MAX_IMAGE_SIDE for s in sizes):
            raise ValueError(f"min_size must be within 32..{MAX_IMAGE_SIDE} (an int or a non-empty list of ints)")
        return v

    @property
    def train_sizes(self) -> tuple[int, ...]:
        return tuple(self.min_size) if isinstance(self.min_size, list) else (self.min_size,)

    @property
    def test_size(self) -> int:
        return max(self.train_sizes)


class ModelSpec(StrictModel):
    detector: Detector = "retinanet"
    backbone: Backbone = "resnet50"
    pretrained_backbone: bool = Field(
        False,
        description="Start the trunk from ImageNet: mobilenet_v2's ship offline; a resnet names its file in "
        "backbone_weights.",
    )
    backbone_weights: CheckpointRef | None = Field(
        None,
        description="A torchvision ImageNet classification state dict for a resnet trunk (e.g. "
        "resnet50-0676ba61.pth), read when the job starts unless `checkpoint` is given.",
    )
    norm: Literal["auto", "frozen_bn", "bn", "gn"] = Field(
        "auto", description="auto: frozen_bn for a pretrained trunk, bn when trained from random init."
    )
    fpn_channels: int = Field(256, ge=8, le=1024)
    levels: list[str] | None = Field(None, description="FPN levels, e.g. [p3, p4, p5]; null: the detector's default.")
    anchor_sizes: list[Annotated[float, Field(gt=0.0, le=MAX_IMAGE_SIDE)]] | None = Field(
        None, description="Base anchor (or FCOS virtual box) size per level in px; null: torchvision defaults."
    )
    head_convs: int = Field(4, ge=1, le=8, description="Conv layers in each RetinaNet/FCOS head branch.")
    head_norm: Literal["none", "gn"] = Field(
        "none", description="RetinaNet head convs: none (the paper's head) or gn (GroupNorm(32), as torchvision v2)."
    )
    extra_levels_from: Literal["p5", "c5"] = Field(
        "p5",
        description="Input of the P6 conv: the FPN's P5 (torchvision v1) or the trunk's C5 "
        "(detectron2, MMDetection, torchvision retinanet v2).",
    )
    extra_levels_relu: bool = Field(
        True, description="ReLU between the P6 and P7 convs (torchvision, detectron2); MMDetection's RetinaNet: none."
    )
    input_format: Literal["rgb_imagenet", "bgr_caffe"] = Field(
        "rgb_imagenet",
        description="What the trunk was trained on: RGB in 0-1 with ImageNet mean/std, or BGR in 0-255 minus the "
        "caffe means (detectron2's MSRA trunks, MMDetection's caffe style).",
    )
    stride_in_1x1: bool = Field(
        False,
        description="ResNet bottlenecks downsample in their first 1x1 conv (MSRA/caffe trunks) "
        "instead of the 3x3 (torchvision).",
    )
    anchor_rounding: bool = Field(
        True,
        description="Round base anchors to whole pixels (torchvision); detectron2 and MMDetection v2 do not.",
    )
    anchor_stride: Literal["image_over_grid", "level"] = Field(
        "image_over_grid",
        description="Spacing of anchor centres: the padded image side divided by the feature map's (torchvision; "
        "uneven at P6/P7 when the padded side is not a multiple of 64/128) or the level's stride 2^l "
        "(detectron2, MMDetection).",
    )
    roi_align_aligned: bool = Field(
        False,
        description="faster_rcnn: RoIAlign samples with the half-pixel shift (detectron2's ROIAlignV2, "
        "MMDetection); torchvision: without.",
    )
    roi_sampling_ratio: int = Field(
        2,
        ge=0,
        le=16,
        description="faster_rcnn: RoIAlign sample points per bin side (torchvision 2); 0: adaptive, "
        "ceil(RoI side / 7) (detectron2, MMDetection).",
    )
    anchor_scales_truncated: bool = Field(
        False,
        description="RetinaNet: cut each level's octave sizes s*2^(1/3), s*2^(2/3) to whole pixels before the "
        "aspect ratios are applied (torchvision's retinanet_resnet50_fpn and _v2 do); false keeps them exact.",
    )
    bn_eps: float = Field(
        1e-5,
        ge=0.0,
        le=0.01,
        description="Epsilon of the trunk's batch norms. torchvision's COCO zoo retinanet_resnet50_fpn and "
        "fasterrcnn_resnet50_fpn (FrozenBatchNorm) evaluate with 0.",
    )
    fpn_norm: Literal["auto", "none", "bn", "gn"] = Field(
        "auto",
        description="Norm after each FPN conv. auto: gn when norm is gn, else none; bn: torchvision's "
        "fasterrcnn_resnet50_fpn_v2.",
    )
    rpn_convs: int = Field(
        1, ge=1, le=4, description="Faster R-CNN: 3x3 convs in the RPN head (torchvision's fasterrcnn _v2: 2)."
    )
    box_head: Literal["2fc", "4conv1fc"] = Field(
        "2fc",
        description="Faster R-CNN box head: two 1024-wide fc layers, or four 3x3 convs with BatchNorm and one fc "
        "(torchvision's fasterrcnn_resnet50_fpn_v2).",
    )
    box_loss: Literal["l1", "giou"] = Field(
        "l1",
        description="RetinaNet box regression loss: L1 on the encoded deltas, or GIoU on the decoded boxes "
        "(torchvision's retinanet_resnet50_fpn_v2). Training only: inference is the same.",
    )
    fg_iou_thresh: float = Field(0.5, gt=0.0, le=1.0, description="RetinaNet: anchor IoU to count as foreground.")
    bg_iou_thresh: float = Field(0.4, ge=0.0, le=1.0, description="RetinaNet: anchor IoU below which it is background.")
    trainable_layers: int = Field(3, ge=0, le=5, description="Trunk stages trained when pretrained.")
    checkpoint: CheckpointRef | None = Field(
        None, description="A path, or job:<id> for another job's final checkpoint."
    )

    @field_validator("levels")
    @classmethod
    def _known_levels(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("give at least one level, e.g. [p3, p4, p5], or null for the detector's default")
        bad = [lv for lv in v if lv not in LEVEL_NAMES]
        if bad:
            raise ValueError(f"unknown level(s) {bad}; choose from {list(LEVEL_NAMES)}")
        idx = [LEVEL_NAMES.index(lv) for lv in v]
        if idx != list(range(idx[0], idx[0] + len(idx))):
            raise ValueError("levels must be consecutive and increasing, e.g. [p3, p4, p5]")
        return v

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> ModelSpec:  # noqa: C901 - a flat list of independent guards, one message each
        if self.pretrained_backbone and self.backbone != "mobilenet_v2" and not self.backbone_weights:
            raise ValueError(
                f"pretrained_backbone: no offline ImageNet weights for {self.backbone}; name the file in "
                "backbone_weights (a torchvision ImageNet state dict), or use mobilenet_v2"
            )
        if self.backbone_weights and not (self.pretrained_backbone and self.backbone.startswith("resnet")):
            raise ValueError(
                "backbone_weights: for a resnet trunk with pretrained_backbone: true "
                "(mobilenet_v2's ImageNet weights ship offline)"
            )
        if self.norm == "frozen_bn" and not (self.pretrained_backbone or self.checkpoint or _weights_loaded(info)):
            raise ValueError(
                "norm: frozen_bn with a randomly initialized trunk normalizes nothing; use bn or gn (or auto), "
                "or name the trained weights in checkpoint (frozen_bn is for a pretrained trunk or a checkpoint's)"
            )
        if self.bg_iou_thresh > self.fg_iou_thresh:
            raise ValueError("bg_iou_thresh must not exceed fg_iou_thresh")
        lv = self.resolved_levels
        if self.detector == "faster_rcnn" and lv[0] != "p2":
            raise ValueError("levels: faster_rcnn starts at p2")
        if self.detector != "faster_rcnn" and lv[0] not in ("p3",):
            raise ValueError(f"levels: {self.detector} starts at p3")
        if self.anchor_sizes is not None and len(self.anchor_sizes) != len(lv):
            raise ValueError(f"anchor_sizes: need one size per level ({len(lv)} levels: {lv})")
        if self.fpn_channels % 8:
            raise ValueError("fpn_channels must be a multiple of 8 (ICD uses 8 heads)")
        if self.detector == "fcos" and self.fpn_channels % 32:
            raise ValueError("fpn_channels: fcos heads use GroupNorm(32), so use a multiple of 32")
        if self.head_norm == "gn" and self.detector != "retinanet":
            raise ValueError(
                f"head_norm: only retinanet has the choice ({self.detector}'s head is fixed); leave it none"
            )
        if self.head_norm == "gn" and self.fpn_channels % 32:
            raise ValueError("fpn_channels: head_norm gn uses GroupNorm(32), so use a multiple of 32")
        if self.stride_in_1x1 and self.backbone not in ("resnet50", "resnet101"):
            raise ValueError(f"stride_in_1x1: {self.backbone} has no bottleneck blocks; leave it false")
        if self.detector != "faster_rcnn" and (self.roi_align_aligned or self.roi_sampling_ratio != 2):
            raise ValueError(
                f"roi_align_aligned / roi_sampling_ratio: {self.detector} has no RoIAlign; leave them false / 2"
            )
        if self.extra_levels_from == "c5" and self.detector == "faster_rcnn":
            raise ValueError("extra_levels_from: faster_rcnn's P6 is a max-pool of P5; leave it p5")
        return self

    @model_validator(mode="after")
    def _check_detector_options(self) -> ModelSpec:
        """Options that belong to one detector: set on another, they would be silently ignored."""
        only = {
            "anchor_scales_truncated": ("retinanet", False),
            "box_loss": ("retinanet", "l1"),
            "rpn_convs": ("faster_rcnn", 1),
            "box_head": ("faster_rcnn", "2fc"),
        }
        for field, (detector, default) in only.items():
            if self.detector != detector and getattr(self, field) != default:
                raise ValueError(f"{field}: only {detector} has it; leave it {default!r} for {self.detector}")
        return self

    @property
    def resolved_levels(self) -> list[str]:
        return list(self.levels or DEFAULT_LEVELS[self.detector])

    @property
    def resolved_norm(self) -> str:
        if self.norm != "auto":
            return self.norm
        return "frozen_bn" if self.pretrained_backbone else "bn"

    @property
    def resolved_fpn_norm(self) -> str:
        if self.fpn_norm != "auto":
            return self.fpn_norm
        return "gn" if self.resolved_norm == "gn" else "none"


class ICDPretrainSpec(StrictModel):
    """Train the decoder side (encoder, decoder, aux head) on the frozen teacher before distillation
    (PRETRAIN_TEACHER_ITERS, docs/method/icd.md#decoder-pre-training), cached per (teacher, data, ICD settings)."""

    steps: int = Field(3000, ge=1, le=1_000_000, description="Step budget; stops earlier once ready.")
    lr: float = Field(1.0e-3, gt=0.0, le=1.0, description="AdamW lr (the release: the decoder's maximum lr).")
    schedule: Literal["constant", "cosine"] = Field("constant", description="cosine: decay to 0 over `steps`.")
    batch_size: int | None = Field(None, ge=1, le=1024, description="null: the job's schedule.batch_size.")
    min_auc: float | None = Field(
        0.9, gt=0.5, le=1.0, description="Ready when held-out identification AUC ≥ this (null: steps only)."
    )
    min_inbox_ratio: float | None = Field(
        3.0,
        gt=1.0,
        le=1000.0,
        description="... and held-out in-box attention mass ≥ this × uniform's (null: AUC only).",
    )
    check_every: int = Field(100, ge=1, le=INT32_MAX, description="Held-out readiness check every this many steps.")
    holdout_images: int = Field(16, ge=1, le=10_000, description="Training images held out for the check.")
    cache_features: bool = Field(True, description="Compute teacher features once and reuse them (no flip).")
    seed: int = Field(
        0, ge=0, le=SEED_MAX, description="Pre-training's own seed: every student of a teacher shares it."
    )


class ICDOptions(StrictModel):
    heads: int = Field(8, ge=1, le=64)
    layers: int = Field(1, ge=1, le=6)
    neg_per_pos: float = Field(5.0, ge=0.0, le=50.0, description="rho: fake queries per real one.")
    max_queries: int | None = Field(None, ge=1, le=2000, description="null: 300 (100 for faster_rcnn).")
    jitter: float = Field(0.3, ge=0.0, lt=1.0)
    bypass_iters: int | None = Field(
        None,
        ge=0,
        le=INT32_MAX,
        description="Student features detached for this many steps; null: the paper's 1,000, capped at a third of "
        "the schedule (see icd_core.distill.icd.bypass_steps). An integer is taken as given.",
    )
    temperature: float = Field(1.0, gt=0.0, le=100.0)
    lr: float = Field(1.0e-4, gt=0.0, le=1.0)
    adapter_lr: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="The student adapter's own AdamW lr (same cosine); null: `lr`, the paper's. A labelled variant: "
        "in a short schedule the adapter barely moves during the bypass at 1e-4, so the student is pulled toward "
        "a random projection of the teacher when the bypass ends.",
    )
    weight_decay: float = Field(1.0e-4, ge=0.0, le=1.0)
    grad_clip: float = Field(0.01, gt=0.0, le=1.0e6, description="Global grad-norm clip of the ICD modules.")
    query_chunk: int = Field(64, ge=1, le=4096, description="Queries per attention chunk (memory bound).")
    pretrain: ICDPretrainSpec | None = Field(
        None, description="Pre-train the decoder on the teacher first (null: joint training from step 0, the paper's)."
    )
    decoder: CheckpointRef | None = Field(
        None, description="Start from this decoder: a pre-training artifact path, a distill checkpoint, or job:<id>."
    )

    @model_validator(mode="after")
    def _one_decoder_source(self) -> ICDOptions:
        if self.pretrain is not None and self.decoder:
            raise ValueError("distill.icd: set either pretrain (train a decoder) or decoder (reuse one), not both")
        return self


class DistillSpec(StrictModel):
    method: Method = "icd"
    weight: float | None = Field(None, ge=0.0, le=1.0e6, description="null: the method's paper default.")
    inherit: bool = True
    icd: ICDOptions = Field(default_factory=ICDOptions)
    # Baseline overrides (null: paper default). Kept flat and explicit on purpose.
    options: dict[str, Annotated[float, Field(ge=-1.0e6, le=1.0e6)]] = Field(
        default_factory=dict, description="Method-specific numeric overrides."
    )


class ScheduleSpec(StrictModel):
    iterations: int | Literal["1x", "3x"] = 2000
    batch_size: int = Field(4, ge=1, le=1024)
    lr: float | None = Field(None, gt=0.0, le=10.0, description="null: 0.01 (0.02 faster_rcnn) scaled by batch/16.")
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(1.0e-4, ge=0.0, le=1.0)
    warmup_iters: int | None = Field(None, ge=0, le=INT32_MAX, description="null: 1000 (scaled like the schedule).")
    warmup_factor: float = Field(0.001, gt=0.0, le=1.0)
    steps: list[Annotated[int, Field(le=INT32_MAX)]] | None = Field(
        None, description="LR drop steps; null: 2/3 and 8/9 of training."
    )
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    grad_clip: float | None = Field(
        None,
        gt=0.0,
        le=1.0e6,
        description="Clip student grads by value; null: 1.0 in distill jobs (the paper's), off otherwise.",
    )
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    eval_every: int = Field(500, ge=0, le=INT32_MAX, description="0: only at the end.")
    checkpoint_every: int = Field(500, ge=0, le=INT32_MAX, description="0: only at the end.")
    log_every: int = Field(10, ge=1, le=INT32_MAX)

    @field_validator("iterations")
    @classmethod
    def _at_least_one(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= INT32_MAX:
            raise ValueError(f"iterations must be >= 1 and <= {INT32_MAX} (or a preset: 1x, 3x), got {v}")
        return v

    @model_validator(mode="after")
    def _steps_in_range(self) -> ScheduleSpec:
        if self.steps is not None and isinstance(self.iterations, int):
            if sorted(self.steps) != self.steps or any(s <= 0 or s > self.iterations for s in self.steps):
                raise ValueError(f"steps must be increasing and within 1..{self.iterations}")
        return self

    def total_iterations(self) -> int:
        if isinstance(self.iterations, int):
            return self.iterations
        return max(1, round(PRESET_ITERS_AT_16[self.iterations] * 16 / self.batch_size))

    def resolved_lr(self, detector: str) -> float:
        if self.lr is not None:
            return self.lr
        base = 0.02 if detector == "faster_rcnn" else 0.01
        return base * self.batch_size / 16

    def resolved_warmup(self) -> int:
        if self.warmup_iters is not None:
            return self.warmup_iters
        if not isinstance(self.iterations, int):
            return PAPER_WARMUP_ITERS
        return min(PAPER_WARMUP_ITERS, max(0, self.total_iterations() // 10))

    def resolved_steps(self) -> list[int]:
        if self.steps is not None:
            return list(self.steps)
        n = self.total_iterations()
        return [math.floor(n * 2 / 3), math.floor(n * 8 / 9)]


MAX_GPUS_PER_JOB = 64


class ResourcesSpec(StrictModel):
    """What one job needs from the worker that runs it."""

    gpus: int = Field(
        1,
        ge=1,
        le=MAX_GPUS_PER_JOB,
        description="Devices of one data-parallel group (torchrun ranks); on CPU, gloo processes. "
        "schedule.batch_size is the global batch: each rank takes batch_size / gpus.",
    )


class DeploySpec(StrictModel):
    """What a finished train/distill run measures about its model for deployment (summary.json)."""

    cost: bool = Field(True, description="Measure params, GFLOPs, peak inference memory and latency.")
    latency_repeats: int = Field(20, ge=1, le=1000, description="Timed batch-1 forwards (the median is reported).")
    latency_warmup: int = Field(3, ge=0, le=100, description="Untimed forwards before timing.")
    exported_latency: bool = Field(True, description="Also time the TorchScript and ONNX Runtime exports (CPU).")
    prediction_images: int = Field(4, ge=0, le=32, description="Validation images rendered with detections.")


PRIORITY_MIN, PRIORITY_MAX, DEFAULT_PRIORITY = -100, 100, 0  # higher runs first (docs/scheduling.md)


class _JobBase(StrictModel):
    name: str = Field("job", max_length=200)
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Seeds every RNG of the run.")
    data: DataSpec
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    deploy: DeploySpec = Field(default_factory=DeploySpec)
    device: Literal["auto", "cpu", "cuda"] | str = "auto"
    # How many times the service starts this job when its worker is lost (null: the server's setting).
    max_attempts: int | None = Field(None, ge=1, le=100)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    priority: int = Field(
        DEFAULT_PRIORITY,
        ge=PRIORITY_MIN,
        le=PRIORITY_MAX,
        description="The service runs higher first (a study's children inherit it); a non-admin token may go "
        "up to the cap its admin set (default 0). Ignored by the local runner.",
    )

    @model_validator(mode="after")
    def _check_group(self) -> _JobBase:
        """A group splits the global batch evenly; only training runs as a group."""
        gpus = self.resources.gpus
        if gpus == 1:
            return self
        if getattr(self, "kind", None) not in ("train", "distill"):
            raise ValueError(f"resources.gpus: a {getattr(self, 'kind', '?')} job runs on one device; use gpus: 1")
        if self.schedule.batch_size % gpus:
            raise ValueError(
                f"resources.gpus: schedule.batch_size {self.schedule.batch_size} is the global batch "
                f"and must divide evenly over {gpus} ranks; use a multiple of {gpus}"
            )
        if self.device.startswith("cuda:"):
            raise ValueError(f"device: {self.device} names one GPU but resources.gpus is {gpus}; use cuda or auto")
        return self

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda"):
            return v
        index = v.removeprefix("cuda:")
        if v.startswith("cuda:") and index.isascii() and index.isdigit() and int(index) <= MAX_CUDA_INDEX:
            return f"cuda:{int(index)}"
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N with N in 0..{MAX_CUDA_INDEX}, got {v!r}")


class TrainSpec(_JobBase):
    """Train one detector (a teacher, or a student baseline without distillation)."""

    kind: Literal["train"] = "train"
    model: ModelSpec


class EvaluateSpec(_JobBase):
    """COCO-evaluate a checkpoint on data.val."""

    kind: Literal["evaluate"] = "evaluate"
    model: ModelSpec

    @model_validator(mode="after")
    def _needs_checkpoint(self) -> EvaluateSpec:
        if not self.model.checkpoint:
            raise ValueError("model.checkpoint: an evaluate job needs a checkpoint (a path or job:<id>)")
        return self


class DistillJobSpec(_JobBase):
    """Train a student with a frozen teacher and a distillation method."""

    kind: Literal["distill"] = "distill"
    teacher: ModelSpec
    student: ModelSpec
    distill: DistillSpec = Field(default_factory=DistillSpec)
    teacher_min_ap: float | None = Field(
        None,
        ge=0.0,
        le=100.0,
        description="Fail the job before training when the teacher's AP on data.val is below this "
        "(null: record the teacher's AP, refuse none).",
    )

    @model_validator(mode="after")
    def _check_pair(self) -> DistillJobSpec:
        if self.schedule.grad_clip is None:  # the paper clips at 1.0 (docs/method/icd.md#student-schedule)
            self.schedule = self.schedule.model_copy(update={"grad_clip": 1.0})
        if not self.teacher.checkpoint:
            raise ValueError("teacher.checkpoint: a distill job needs a trained teacher (a path or job:<id>)")
        if self.distill.method != "none":
            if self.teacher.detector != self.student.detector:
                raise ValueError(
                    f"student.detector: feature distillation needs the same detector family as the teacher "
                    f"({self.teacher.detector})"
                )
            if self.teacher.resolved_levels != self.student.resolved_levels:
                raise ValueError("student.levels: teacher and student must use the same FPN levels")
            if self.distill.method == "icd" and self.teacher.fpn_channels % self.distill.icd.heads:
                raise ValueError("distill.icd.heads must divide teacher.fpn_channels")
        if self.distill.inherit:
            problems = inherit_incompatibility(self.teacher, self.student)
            if problems:
                raise ValueError(
                    f"distill.inherit: teacher and student necks/heads differ ({problems}); "
                    "set inherit: false or match them"
                )
        return self


class StudySpec(_JobBase):
    """Teacher check, then one child distill job per (method, seed), then a leaderboard."""

    kind: Literal["study"] = "study"
    teacher: ModelSpec
    student: ModelSpec
    methods: list[StudyMethod] = Field(
        default_factory=lambda: list(METHODS),
        description="icd_pretrained: icd with a decoder pre-trained once per teacher (distill.icd.pretrain; "
        "its defaults when null); plain icd always trains jointly from step 0.",
    )
    seeds: list[Annotated[int, Field(ge=0, le=SEED_MAX)]] = Field(default_factory=lambda: [0, 1, 2])
    distill: DistillSpec = Field(default_factory=DistillSpec, description="Shared options (inherit, icd, ...).")
    teacher_min_ap: float = Field(1.0, ge=0.0, le=100.0, description="Refuse a teacher below this AP.")
    teacher_schedule: ScheduleSpec | None = Field(None, description="Train the teacher first if it has no checkpoint.")
    require_teacher_better: bool = Field(
        True, description="Stop the study when the teacher's AP is not above the first `none` student's."
    )
    teacher_lead_ap: float = Field(
        0.0,
        ge=0.0,
        le=100.0,
        description="With require_teacher_better: the teacher must lead the first `none` student by at least "
        "this many AP points (0: any lead). A teacher barely above its student leaves nothing to distil.",
    )
    scale_iterations: bool = Field(
        True, description="Scale the paper's 1x iteration counts (warm-up, ICD bypass) to this schedule's length."
    )
    settings: dict[StudyMethod, dict[str, ChoiceValue]] = Field(
        default_factory=dict,
        description="Per-method values of the child spec's dotted fields, e.g. {fgd: {distill.weight: 0.5}}: "
        "each method at its own setting (a tuned study fills this from its sweeps). Shown in the row.",
    )
    tune: TuneSpec | None = Field(
        None,
        description="Tune each method on a split carved from data.train before the seeds run at its best "
        "setting (docs/sweeps.md#tuned-studies); null: every method at its paper setting.",
    )

    @model_validator(mode="after")
    def _check(self) -> StudySpec:
        if not self.methods:
            raise ValueError("methods: give at least one")
        if not self.seeds:
            raise ValueError("seeds: give at least one")
        if not self.teacher.checkpoint and self.teacher_schedule is None:
            raise ValueError("teacher: give teacher.checkpoint or a teacher_schedule to train it")
        from .tuning import check_settings, check_tune  # pure; imported here because they import this module

        if self.settings:
            check_settings(self)
        if self.tune is not None:
            check_tune(self)
        return self


ExportFormat = Literal["onnx", "torchscript"]
EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormat)
EXPORT_SUFFIX = {"torchscript": ".ts", "onnx": ".onnx"}  # model.ts, model.onnx


class ExportSpec(StrictModel):
    """Export a finished train/distill run's model (a distill run's student) to TorchScript and/or ONNX,
    each verified against the eager model on the run's validation images. A job of its own kind, claimed,
    leased and retried like any other; it keeps no checkpoint, so a retry starts over
    (docs/architecture.md#exports-are-jobs). Submitted by `POST /jobs/{id}/exports`, not `POST /jobs`."""

    kind: Literal["export"] = "export"
    name: str = Field("export", max_length=200)
    checkpoint: CheckpointRef = Field(description="job:<id> of a succeeded train or distill job, or its final.pt.")
    formats: list[ExportFormat] = Field(default_factory=lambda: ["onnx"], min_length=1, max_length=2)
    verify_images: int = Field(4, ge=1, le=100, description="Validation images whose detections must match eager.")
    eval_images: int | None = Field(
        None, ge=1, le=INT32_MAX, description="Limit the COCO AP check (null: the whole validation set)."
    )
    max_attempts: int | None = Field(None, ge=1, le=100)
    priority: int = Field(DEFAULT_PRIORITY, ge=PRIORITY_MIN, le=PRIORITY_MAX)

    @field_validator("formats")
    @classmethod
    def _once_each(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"formats: name each format once, got {v}")
        return v


# --- sweeps (docs/sweeps.md) ------------------------------------------------------------------------------
SWEEP_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCO metrics: higher is better
ChoiceValue = float | int | str | bool | None


class LogUniformDim(StrictModel):
    log_uniform: tuple[float, float] = Field(description="[lo, hi], 0 < lo < hi, sampled on a log scale.")


class UniformDim(StrictModel):
    uniform: tuple[float, float] = Field(description="[lo, hi], lo < hi.")


class IntDim(StrictModel):
    int: tuple[builtins.int, builtins.int] = Field(description="[lo, hi], both included.")


class ChoiceDim(StrictModel):
    choice: list[ChoiceValue] = Field(min_length=1, max_length=64, description="Values to choose from.")


def _dim_kind(value: Any) -> str | None:
    """The one key of a search dimension ({log_uniform: [...]}, ...), or None (pydantic names the problem)."""
    if isinstance(value, BaseModel):
        value = dict.fromkeys(type(value).model_fields)
    keys = list(value) if isinstance(value, dict) else []
    return keys[0] if len(keys) == 1 and keys[0] in SPACE_KINDS else None


SPACE_KINDS = ("log_uniform", "uniform", "int", "choice")
SearchDim = Annotated[
    Annotated[LogUniformDim, Tag("log_uniform")]
    | Annotated[UniformDim, Tag("uniform")]
    | Annotated[IntDim, Tag("int")]
    | Annotated[ChoiceDim, Tag("choice")],
    Discriminator(
        _dim_kind,
        custom_error_type="space_dimension",
        custom_error_message="give exactly one of log_uniform, uniform, int or choice",
    ),
]


class SamplerSpec(StrictModel):
    kind: Literal["tpe", "random"] = Field("tpe", description="Optuna's TPE, or uniform random sampling.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Trial n is sampled with seed + n: reruns repeat.")
    startup_trials: int = Field(
        4, ge=0, le=1000, description="TPE: random trials before it models the results (Optuna's n_startup_trials)."
    )


class MedianPrunerSpec(StrictModel):
    """Prune a trial whose best AP so far is below the median of the finished trials' AP at the same step."""

    kind: Literal["median"] = "median"
    startup_trials: int = Field(2, ge=0, le=1000, description="Finished trials needed before anything is pruned.")
    warmup_steps: int = Field(0, ge=0, le=INT32_MAX, description="No trial is pruned before this training step.")
    min_trials: int = Field(1, ge=1, le=1000, description="Finished trials that evaluated at a step to judge there.")


class SuccessiveHalvingPrunerSpec(StrictModel):
    """Asynchronous successive halving: at rung r (step min_resource * reduction_factor**r) a trial goes on
    only if it is in the top 1/reduction_factor of the trials that reached that rung."""

    kind: Literal["successive_halving"] = "successive_halving"
    min_resource: int | None = Field(
        None, ge=1, le=INT32_MAX, description="Steps of the first rung; null: 1 % of the longest finished trial."
    )
    reduction_factor: int = Field(3, ge=2, le=100)
    min_early_stopping_rate: int = Field(0, ge=0, le=30)


class NoPrunerSpec(StrictModel):
    kind: Literal["none"] = "none"


PrunerSpec = Annotated[MedianPrunerSpec | SuccessiveHalvingPrunerSpec | NoPrunerSpec, Field(discriminator="kind")]
MAX_SWEEP_TRIALS = 1000


class TuneSpec(StrictModel):
    """How a study tunes each method before comparing: one sweep per method on the tuning split."""

    trials: int = Field(6, ge=1, le=MAX_SWEEP_TRIALS, description="Trials per method (pruned ones included).")
    space: dict[StudyMethod, dict[str, SearchDim]] = Field(
        default_factory=dict,
        description="Per-method search space; a method not named gets the default: distill.weight log-uniform "
        "over [paper weight / 8, paper weight × 8], and for icd/icd_pretrained also distill.icd.adapter_lr "
        "over [1e-4, 1e-2]. `none` is not tuned unless named here.",
    )
    split: float = Field(
        0.2, gt=0.0, lt=1.0, description="Share of data.train held out to evaluate the trials (the tuning split)."
    )
    split_seed: int = Field(0, ge=0, le=SEED_MAX)
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    pruner: PrunerSpec = Field(default_factory=MedianPrunerSpec)
    metric: Literal["AP", "AP50", "AP75", "APs", "APm", "APl"] = "AP"
    seed: int | None = Field(
        None, ge=0, le=SEED_MAX, description="The trials' training seed (null: the study's first seed)."
    )


StudySpec.model_rebuild()  # its `tune` and `settings` refer to the sweep types defined above


class SweepSpec(StrictModel):
    """Search a train or distill spec's fields: each trial is a child job; the periodic evaluations prune."""

    kind: Literal["sweep"] = "sweep"
    name: str = Field("sweep", max_length=200)
    base: Annotated[TrainSpec | DistillJobSpec, Field(discriminator="kind")] = Field(
        description="The train or distill spec each trial runs, with the space's values set (its name is not "
        "used: trials are named <sweep name>/trial<N>)."
    )
    space: dict[str, SearchDim] = Field(
        min_length=1,
        max_length=32,
        description="Dotted field of `base` -> {log_uniform: [lo, hi]} | {uniform: [lo, hi]} | {int: [lo, hi]} "
        "| {choice: [...]}, e.g. distill.weight: {log_uniform: [0.5, 32]}.",
    )
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    pruner: PrunerSpec = Field(default_factory=MedianPrunerSpec)
    trials: int = Field(20, ge=1, le=MAX_SWEEP_TRIALS, description="The trial budget (pruned ones included).")
    parallel: int = Field(1, ge=1, le=64, description="Trials that run at once.")
    metric: Literal["AP", "AP50", "AP75", "APs", "APm", "APl"] = Field("AP", description="Maximised.")
    enqueue: list[dict[str, ChoiceValue]] = Field(
        default_factory=list,
        max_length=MAX_SWEEP_TRIALS,
        description="Parameters of the first trials, in order (e.g. the paper's weight); each names space fields.",
    )
    max_attempts: int | None = Field(None, ge=1, le=100)
    priority: int = Field(
        DEFAULT_PRIORITY,
        ge=PRIORITY_MIN,
        le=PRIORITY_MAX,
        description="The service runs higher first; the trials inherit it (a non-admin token: up to its cap).",
    )

    @property
    def device(self) -> str:
        """The sweep's own task runs where its trials run (dispatch.queue_for reads this)."""
        return self.base.device

    @model_validator(mode="after")
    def _check(self) -> SweepSpec:
        from .sweep_space import check_sweep  # pure; imported here because it imports this module

        check_sweep(self)
        return self


JobSpec = Annotated[TrainSpec | DistillJobSpec | EvaluateSpec | StudySpec | SweepSpec, Field(discriminator="kind")]
AnyJobSpec = TrainSpec | DistillJobSpec | EvaluateSpec | StudySpec | SweepSpec

_SPEC_ADAPTER: TypeAdapter[AnyJobSpec] = TypeAdapter(JobSpec)


# What an inherited FPN and head were trained with: their shapes, and the anchors and RoI sampling their
# outputs are relative to (an imported detectron2 head predicts offsets from unrounded, level-spaced anchors).
_INHERIT_FIELDS = (
    "detector",
    "fpn_channels",
    "head_convs",
    "head_norm",
    "extra_levels_from",
    "extra_levels_relu",
    "anchor_rounding",
    "anchor_stride",
    "roi_align_aligned",
    "roi_sampling_ratio",
)


def inherit_incompatibility(teacher: ModelSpec, student: ModelSpec) -> str:
    """Why the teacher's FPN and head cannot be copied into the student ('' when they can)."""
    diffs = []
    for field in _INHERIT_FIELDS:
        if getattr(teacher, field) != getattr(student, field):
            diffs.append(f"{field}: {getattr(teacher, field)} vs {getattr(student, field)}")
    if teacher.resolved_levels != student.resolved_levels:
        diffs.append("levels differ")
    if (teacher.anchor_sizes or None) != (student.anchor_sizes or None):
        diffs.append("anchor_sizes differ")
    return "; ".join(diffs)


ARCHITECTURE_FIELDS = (
    "detector",
    "backbone",
    "fpn_channels",
    "head_convs",
    "head_norm",
    "anchor_sizes",
    "extra_levels_from",
    "extra_levels_relu",
    "input_format",
    "stride_in_1x1",
    "anchor_rounding",
    "anchor_stride",
    "roi_align_aligned",
    "roi_sampling_ratio",
    "anchor_scales_truncated",
    "bn_eps",
    "fpn_norm",
    "rpn_convs",
    "box_head",
)
# Not architecture: box_loss (training only; a teacher or a loaded checkpoint computes the same with either).
WEIGHTS_LOADED = "weights_loaded"  # validation context: the spec is rebuilt to load a checkpoint's own weights


def _weights_loaded(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get(WEIGHTS_LOADED))


def saved_model_spec(fields: dict[str, Any]) -> ModelSpec:
    """The ModelSpec a checkpoint records, rebuilt to load that checkpoint's weights (so frozen_bn is allowed:
    the statistics come with the weights, e.g. an imported torchvision zoo model)."""
    return ModelSpec.model_validate({**fields, "checkpoint": None}, context={WEIGHTS_LOADED: True})


def architecture_diffs(expected: ModelSpec, saved: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, spec value, checkpoint value) for each way a checkpoint trained as `saved` cannot be
    `expected`; field "" with the reason when `saved` is no valid model spec at all."""
    try:
        other = saved_model_spec(saved)
    except ValueError as exc:
        return [("", f"its model spec is invalid ({exc.__class__.__name__})", None)]
    diffs: list[tuple[str, Any, Any]] = [
        (f, getattr(expected, f), getattr(other, f))
        for f in ARCHITECTURE_FIELDS
        if getattr(expected, f) != getattr(other, f)
    ]
    if expected.resolved_levels != other.resolved_levels:
        diffs.append(("levels", expected.resolved_levels, other.resolved_levels))
    return diffs


def architecture_mismatch(expected: ModelSpec, saved: dict[str, Any]) -> list[str]:
    """'field: spec X vs checkpoint Y' for each way a checkpoint trained as `saved` cannot be `expected`."""
    return [
        f"{f}: spec {mine} vs checkpoint {theirs}" if f else str(mine)
        for f, mine, theirs in architecture_diffs(expected, saved)
    ]


def parse_spec(data: dict[str, Any]) -> AnyJobSpec:
    """Validate a plain dict (from YAML, JSON or an HTTP body) into the matching spec class."""
    return _SPEC_ADAPTER.validate_python(data)


class SpecSyntaxError(ValueError):
    """A spec file that is not valid YAML/JSON; the message is one line: `path:line:column: problem`."""


def _parse_text(path: str | Path, text: str) -> Any:
    """YAML or JSON by the file's suffix; a syntax error names the file, line and column (1-based),
    because the parser's own message points at "<unicode string>" over several lines."""
    if str(path).endswith(".json"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise SpecSyntaxError(f"{path}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}") from err
    try:
        return load_yaml(text)
    except YamlRefused as err:
        raise SpecSyntaxError(f"{path}:{err.where or '?:?'}: {err.problem}") from err


def load_spec(path: str | Path) -> AnyJobSpec:
    """Read a YAML or JSON spec file (SpecSyntaxError, a ValueError, when it does not parse)."""
    data = _parse_text(path, Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a spec must be a mapping")
    return parse_spec(data)


JOB_REF_PREFIX = "job:"


def parse_job_ref(ref: str) -> int | None:
    """The job id of a `job:<id>` checkpoint reference, None for a path (or a malformed reference)."""
    digits = ref.removeprefix(JOB_REF_PREFIX)
    if ref.startswith(JOB_REF_PREFIX) and digits.isascii() and digits.isdigit():
        return int(digits)
    return None


def _path_kind(annotation: Any, metadata: list[Any]) -> str | None:
    """The UserPath kind a field's type carries (through Optional/Annotated), or None."""
    for m in metadata:
        if isinstance(m, UserPath):
            return m.kind
    args = get_args(annotation)
    if get_origin(annotation) is Annotated:
        return _path_kind(args[0], list(args[1:]))
    for arg in args:
        kind = _path_kind(arg, [])
        if kind is not None:
            return kind
    return None


def iter_user_paths(spec: BaseModel, prefix: str = "") -> Iterator[tuple[str, str, str]]:
    """(dotted field, value, kind) of every file or folder the spec names, found by the UserPath mark:
    the single list that path confinement, ownership checks and submit-time existence checks share."""
    for name, info in type(spec).model_fields.items():
        value = getattr(spec, name)
        field = f"{prefix}{name}"
        kind = _path_kind(info.annotation, list(info.metadata))
        if kind is not None and isinstance(value, str) and value:
            yield field, value, kind
        elif isinstance(value, BaseModel):
            yield from iter_user_paths(value, f"{field}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    yield from iter_user_paths(item, f"{field}.{i}.")


def iter_checkpoint_refs(spec: BaseModel) -> list[tuple[str, str]]:
    """(field path, value) of every checkpoint the spec names, for path checks and job:<id> links."""
    return [(field, value) for field, value, kind in iter_user_paths(spec) if kind == "checkpoint"]


def with_values(spec: BaseModel, values: dict[str, str]) -> BaseModel:
    """A copy of the spec with the string fields named by dotted path replaced (resolved paths)."""
    data = spec.model_dump(mode="json")
    for field, value in values.items():
        *parents, last = field.split(".")
        node: Any = data
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[last] = value
    return type(spec).model_validate(data)


def check_paths(spec: BaseModel) -> list[tuple[str, str]]:
    """Return (field, reason) for every missing data or checkpoint file (job:<id> checked for form only)."""
    errors = []
    for field, p, kind in iter_user_paths(spec):
        path = Path(p)
        if kind == "data" and field.endswith("images") and not path.is_dir():
            errors.append((field, f"not a readable folder: {p}"))
        elif kind == "data" and not field.endswith("images") and not path.is_file():
            errors.append((field, f"not a readable file: {p}"))
        elif kind == "checkpoint" and p.startswith(JOB_REF_PREFIX) and parse_job_ref(p) is None:
            errors.append((field, f"job reference must be job:<integer id>, got {p}"))
        elif kind == "checkpoint" and not p.startswith(JOB_REF_PREFIX) and not path.is_file():
            errors.append((field, f"checkpoint not found: {p}"))
    return errors
