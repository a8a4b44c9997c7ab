"""torchvision's detection state dicts (`torch.save(model.state_dict())`, the model zoo's .pth files) as ours.

torchvision and this service build the same torchvision modules; only the trunk and the P6/P7 convs are
named differently (`backbone.body.conv1/bn1/layer1..4` are our `stages.0..4`, `extra_blocks.p6/p7` our
`extra_blocks.convs.0/1`), and every key gains the `model.` prefix of our `Detector` wrapper. The model
options that make our build compute what torchvision's does are listed per architecture in `ARCHITECTURES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from icd_core.detectors import build_detector
from icd_core.spec import ModelSpec, saved_model_spec

from .coco_categories import COCO_IDS
from .layout import ImportedDetector

TORCHVISION_COCO_LABELS = 91  # torchvision's COCO models predict labels 0..90 = COCO category ids (0: none)


@dataclass(frozen=True)
class TorchvisionArch:
    """How one torchvision builder differs from our defaults (ModelSpec fields), and its zoo settings."""

    fields: dict[str, Any]
    zoo_frozen_bn_eps: float = 1e-5  # the FrozenBatchNorm eps the builder sets for its COCO weights
    test_size: int = 800  # the zoo's transform: GeneralizedRCNNTransform(min_size, max_size)
    max_size: int = 1333
    notes: tuple[str, ...] = field(default_factory=tuple)


_RESNET50_FPN = {"backbone": "resnet50", "fpn_channels": 256, "head_convs": 4}
ARCHITECTURES: dict[str, TorchvisionArch] = {
    "retinanet_resnet50_fpn": TorchvisionArch(
        {**_RESNET50_FPN, "detector": "retinanet", "anchor_scales_truncated": True}, zoo_frozen_bn_eps=0.0
    ),
    "retinanet_resnet50_fpn_v2": TorchvisionArch(
        {
            **_RESNET50_FPN,
            "detector": "retinanet",
            "anchor_scales_truncated": True,
            "head_norm": "gn",
            "extra_levels_from": "c5",
            "box_loss": "giou",
        }
    ),
    "fcos_resnet50_fpn": TorchvisionArch({**_RESNET50_FPN, "detector": "fcos"}),
    "fasterrcnn_resnet50_fpn": TorchvisionArch({**_RESNET50_FPN, "detector": "faster_rcnn"}, zoo_frozen_bn_eps=0.0),
    "fasterrcnn_resnet50_fpn_v2": TorchvisionArch(
        {**_RESNET50_FPN, "detector": "faster_rcnn", "fpn_norm": "bn", "rpn_convs": 2, "box_head": "4conv1fc"}
    ),
}
# Not expressible here (see docs/usage.md#bring-your-own-teacher): fasterrcnn_mobilenet_v3_large_fpn and
# _320_fpn take two FPN inputs at the same stride (32), which a level-per-stride pyramid cannot name.
UNSUPPORTED: dict[str, str] = {
    name: "its FPN reads two trunk outputs at the same stride (32: block 13 and the last 1x1 conv), so two "
    "pyramid levels share one stride; this service names each FPN level by its stride (p2..p7), and its "
    "distillation methods pair teacher and student levels by that name"
    for name in ("fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_mobilenet_v3_large_320_fpn")
}
_TRUNK = {"conv1": "stages.0.0", "bn1": "stages.0.1", **{f"layer{i}": f"stages.{i}" for i in range(1, 5)}}
_EXTRA = {"p6": "convs.0", "p7": "convs.1"}


class LayoutError(ValueError):
    """The file is not a torchvision state dict of the named architecture; the message says what differs."""


def architecture(arch: str) -> TorchvisionArch:
    if arch in UNSUPPORTED:
        raise LayoutError(f"--arch {arch}: not supported: {UNSUPPORTED[arch]}")
    if arch not in ARCHITECTURES:
        raise LayoutError(f"--arch {arch}: unknown torchvision architecture; choose from {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch]


def state_dict_of(obj: dict[str, Any]) -> dict[str, Tensor]:
    """The tensors of a state dict, or of the `model` entry torchvision's reference scripts save beside it."""
    if isinstance(obj.get("model"), dict):
        obj = obj["model"]
    state = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not state:
        raise LayoutError("holds no tensors: not a state dict (save one with torch.save(model.state_dict()))")
    return state


def our_key(key: str) -> str:
    """torchvision's key -> ours (unknown trunk parts pass through, so the strict check names them)."""
    if key.startswith("backbone.body."):
        part, _, rest = key[len("backbone.body.") :].partition(".")
        return f"model.backbone.body.{_TRUNK.get(part, part)}.{rest}"
    if key.startswith("backbone.fpn.extra_blocks."):
        part, _, rest = key[len("backbone.fpn.extra_blocks.") :].partition(".")
        return f"model.backbone.fpn.extra_blocks.{_EXTRA.get(part, part)}.{rest}"
    return f"model.{key}"


def torchvision_key(ours: str) -> str:
    """Our key -> torchvision's (the inverse of `our_key`), to name keys in the user's terms."""
    key = ours.removeprefix("model.")
    for src, dst in (*_TRUNK.items(), *_EXTRA.items()):
        for prefix in ("backbone.body.", "backbone.fpn.extra_blocks."):
            if key.startswith(prefix + dst + "."):
                return prefix + src + key[len(prefix + dst) :]
    return key


def layout_differences(spec: ModelSpec, num_labels: int, state: dict[str, Tensor]) -> list[str]:
    """What keeps `state` (our keys) from loading into the model `spec` builds, in torchvision's key names."""
    own = build_detector(spec, num_labels, 64, 64).state_dict()

    def show(keys: list[str]) -> str:
        named = [torchvision_key(k) for k in keys]
        return ", ".join(named[:4]) + (f" (+{len(named) - 4} more)" if len(named) > 4 else "")

    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    parts = [f"missing keys: {show(missing)}"] if missing else []
    parts += [f"unexpected keys: {show(unexpected)}"] if unexpected else []
    if shapes:
        first = shapes[0]
        parts.append(f"shapes differ: {show(shapes)} (e.g. {tuple(state[first].shape)} vs {tuple(own[first].shape)})")
    return parts


def _trunk_is_frozen(state: dict[str, Tensor]) -> bool:
    """FrozenBatchNorm2d saves no `num_batches_tracked`; BatchNorm2d does."""
    return not any(k.startswith("backbone.body.") and k.endswith("num_batches_tracked") for k in state)


def _label_count(state: dict[str, Tensor], detector: str) -> int:
    """How many labels the classifier predicts (torchvision's COCO count when it is missing: the key check
    then names it). Faster R-CNN's count leaves out its background row."""
    if detector == "faster_rcnn":
        rows = state.get("roi_heads.box_predictor.cls_score.bias")
        return TORCHVISION_COCO_LABELS - 1 if rows is None else rows.shape[0] - 1
    rows = state.get("head.classification_head.cls_logits.bias")
    per_location = 1 if detector == "fcos" else 9
    return TORCHVISION_COCO_LABELS if rows is None else rows.shape[0] // per_location


def _label_cat_ids(detector: str) -> list[int | None]:
    """COCO id of each of our output labels; Faster R-CNN's torchvision label 0 is its background row."""
    first = 1 if detector == "faster_rcnn" else 0
    coco = set(COCO_IDS)
    return [label if label in coco else None for label in range(first, TORCHVISION_COCO_LABELS)]


def convert(obj: dict[str, Any], arch: str) -> ImportedDetector:
    """A loaded torchvision state dict of architecture `arch` as an `ImportedDetector` over its 91 labels.

    The trunk's norm follows the file: FrozenBatchNorm (the zoo's files: no `num_batches_tracked`) or
    BatchNorm (a model built with `weights=None`), so the keys load strictly either way.
    """
    spec_arch = architecture(arch)
    state = state_dict_of(obj)
    frozen = _trunk_is_frozen(state)
    fields = dict(spec_arch.fields)
    notes = list(spec_arch.notes)
    if frozen:
        fields.update(norm="frozen_bn", bn_eps=spec_arch.zoo_frozen_bn_eps)
        if spec_arch.zoo_frozen_bn_eps != 1e-5:
            notes.append(
                f"FrozenBatchNorm trunk: eps {spec_arch.zoo_frozen_bn_eps:g}, as torchvision's {arch} sets for its "
                "COCO weights (one trained from ImageNet trunk weights alone used 1e-5: a tiny difference)"
            )
    else:
        fields["norm"] = "bn"
    spec = saved_model_spec(fields)
    ours = {our_key(k): v for k, v in state.items()}
    labels = _label_cat_ids(spec.detector)
    count = _label_count(state, spec.detector)
    differences = layout_differences(spec, count, ours)
    if differences:
        raise LayoutError(f"not a torchvision {arch} state dict: {'; '.join(differences)}{_guess(state, arch)}")
    if count != len(labels):
        raise LayoutError(
            f"predicts {count} labels, not the {len(labels)} of torchvision's COCO models; only COCO-trained "
            "torchvision detectors can be imported so far"
        )
    return ImportedDetector(
        spec,
        ours,
        labels,
        spec_arch.test_size,
        spec_arch.max_size,
        source=f"torchvision {arch}",
        notes=notes,
    )


def _guess(state: dict[str, Tensor], arch: str) -> str:
    """', it looks like NAME' when the keys fit another architecture (only run when the named one failed)."""
    ours = {our_key(k): v for k, v in state.items()}
    frozen = _trunk_is_frozen(state)
    for name, other in ARCHITECTURES.items():
        if name == arch:
            continue
        spec = saved_model_spec({**other.fields, "norm": "frozen_bn" if frozen else "bn"})
        if not layout_differences(spec, _label_count(state, spec.detector), ours):
            return f"; its keys fit --arch {name}"
    return "; check --arch"
