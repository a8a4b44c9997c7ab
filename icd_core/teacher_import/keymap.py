"""Renaming another project's state dict onto ours, and the two head rewrites other layouts need.

A layout is a list of rules `(pattern, template)`: every source key must match exactly one pattern (a key
nothing matches is named in the error, so a wrong `--arch` or a new upstream key fails loudly), and the
template, filled with the match's groups, is our key. `check_shapes` then compares the result against the
model the spec builds, naming each missing key and each shape that disagrees.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor

from icd_core.detectors import build_detector
from icd_core.spec import ModelSpec

Rule = tuple[str, str | Callable[[re.Match[str]], str]]


class LayoutError(ValueError):
    """The source file does not have the layout the converter was asked for."""


def _show(keys: list[str], limit: int = 6) -> str:
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def rename(state: Mapping[str, Tensor], rules: Iterable[Rule], ignore: Iterable[str], source: str) -> dict[str, Tensor]:
    """Our-keyed copy of `state`; keys matching an `ignore` pattern are dropped, any other unmatched key fails."""
    compiled = [(re.compile(p), t) for p, t in rules]
    ignored = [re.compile(p) for p in ignore]
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        if any(p.fullmatch(key) for p in ignored):
            continue
        for pattern, template in compiled:
            m = pattern.fullmatch(key)
            if m:
                new = template(m) if callable(template) else m.expand(template)
                out[new] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise LayoutError(
            f"{source}: keys this layout does not have: {_show(sorted(unknown))}; check --from and --arch"
        )
    return out


def add_batchnorm_counters(state: dict[str, Tensor]) -> None:
    """BatchNorm2d's `num_batches_tracked`, which frozen-BN layouts (detectron2) do not store; eval ignores it."""
    for key in [k for k in state if k.endswith(".running_var")]:
        state.setdefault(key[: -len("running_var")] + "num_batches_tracked", torch.tensor(0))


def check_shapes(spec: ModelSpec, num_classes: int, state: Mapping[str, Tensor], source: str) -> None:
    """Fail naming keys when the converted state cannot load strictly into the model `spec` builds."""
    with torch.device("meta"):
        own = {k: v.shape for k, v in build_detector(spec, num_classes).state_dict().items()}
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k])}" for k in set(own) & set(state) if own[k] != state[k].shape
    )
    problems = [
        f"{label}: {_show(keys)}"
        for label, keys in (("missing", missing), ("not in the model", extra), ("shape (file vs model)", shapes))
        if keys
    ]
    if problems:
        raise LayoutError(f"{source} does not convert to {spec.detector}/{spec.backbone} ({'; '.join(problems)})")


def size_major_to_ratio_major(num_sizes: int, num_ratios: int) -> list[int]:
    """perm[j] = the size-major anchor index (size outer, ratio inner: detectron2) of torchvision's j-th
    anchor (ratio outer, size inner)."""
    return [s * num_ratios + r for r in range(num_ratios) for s in range(num_sizes)]


def permute_anchor_rows(t: Tensor, perm: list[int]) -> Tensor:
    """Reorder the per-anchor blocks of a conv's output rows (anchor-major: anchor * per_anchor + j)."""
    blocks = t.reshape(len(perm), -1, *t.shape[1:])
    return blocks[torch.tensor(perm)].reshape(t.shape)


def background_first(cls_score: Tensor) -> Tensor:
    """A softmax classifier's rows with the background, last in detectron2/MMDetection, moved to row 0."""
    return torch.cat([cls_score[-1:], cls_score[:-1]])


def with_background_boxes(bbox_pred: Tensor) -> Tensor:
    """Class-specific box rows (4 per class) preceded by 4 zero rows for the background (torchvision's layout;
    its decoder never reads them)."""
    return torch.cat([bbox_pred.new_zeros((4, *bbox_pred.shape[1:])), bbox_pred])


def move_background_first(state: dict[str, Tensor]) -> str:
    """Faster R-CNN predictor of detectron2/MMDetection (background last, class-specific boxes without one)
    rewritten in place to torchvision's (background row 0, zero background boxes); returns the note."""
    for key in [k for k in state if ".box_predictor.cls_score." in k]:
        state[key] = background_first(state[key])
    for key in [k for k in state if ".box_predictor.bbox_pred." in k]:
        state[key] = with_background_boxes(state[key])
    return "Faster R-CNN classifier: background moved from the last row to row 0; zero background boxes"
