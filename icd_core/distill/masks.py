"""Ground-truth and anchor masks for the feature-KD baselines, plus the small bits of level geometry they share.

Everything here is a pure function on tensors, so each mask can be checked by hand in a unit test.
Coordinates are those of the padded batch: boxes are in resized-image pixels (padding only extends the
image to the bottom and right), and a level's stride is `padded size / feature size` on each axis
(docs/method/baselines.md#padded-batch-coordinates).

Also here: `resolve_options`, the one place that reads `DistillSpec.options` for the baselines, so an
unknown option name is a clear error instead of a silently ignored typo.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import box_iou

from icd_core.spec import Method

# Option names each baseline reads from DistillSpec.options (defaults live in each method's module).
BASELINE_OPTIONS: dict[Method, tuple[str, ...]] = {
    "fitnet": (),
    "fgfi": ("psi",),
    "defeat": ("w_fg", "w_bg", "canonical_size"),
    "fgd": ("alpha", "beta", "gamma", "lambda", "temperature"),
}

RETINA_RATIOS = (0.5, 1.0, 2.0)  # torchvision's height/width ratios


def resolve_options(method: str, options: Mapping[str, float], defaults: Mapping[str, float]) -> dict[str, float]:
    """Defaults overridden by `options`.

    A study shares one options dict across methods, so a name that belongs to another baseline is
    ignored here; a name no baseline knows is a typo and raises a ValueError naming it.
    """
    known = {name for names in BASELINE_OPTIONS.values() for name in names}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"distill.options: unknown option(s) {unknown}; {method} reads {sorted(defaults) or 'none'} "
            f"(all baseline options: {sorted(known)})"
        )
    out = {k: float(v) for k, v in defaults.items()}
    out.update({k: float(v) for k, v in options.items() if k in defaults})
    return out


def level_stride(padded_size: Sequence[int], feature_size: Sequence[int]) -> tuple[float, float]:
    """(stride_y, stride_x) of a level in padded-batch pixels."""
    return padded_size[0] / feature_size[0], padded_size[1] / feature_size[1]


def nominal_stride(level: str) -> int:
    """p3 -> 8, ..., p7 -> 128."""
    return 2 ** int(level[1:])


def default_anchor_size(detector: str, levels: Sequence[str], index: int) -> float:
    """The detector's base anchor size at level `index` when ModelSpec.anchor_sizes is null (see detectors.py)."""
    if detector == "fcos":
        return float(nominal_stride(levels[index]))
    return 32.0 * 2**index


def anchor_scale(detector: str, levels: Sequence[str], anchor_sizes: Sequence[float] | None, index: int) -> float:
    """How much the configured anchors are scaled against the default ones at level `index` (1.0 for defaults)."""
    if anchor_sizes is None:
        return 1.0
    return float(anchor_sizes[index]) / default_anchor_size(detector, levels, index)


def virtual_anchor_sizes(
    detector: str, levels: Sequence[str], anchor_sizes: Sequence[float] | None
) -> list[tuple[float, float, float]]:
    """RetinaNet-style (s, s·2^(1/3), s·2^(2/3)) per level, for detectors whose anchors we do not get.

    FCOS [ours, docs/method/baselines.md#fgfi]: s = 4·stride (4 · the FCOS virtual box size when anchor_sizes is set).
    Faster R-CNN / RetinaNet [ours]: s = the detector's own base anchor size on that level.
    """
    out = []
    for i, level in enumerate(levels):
        if detector == "fcos":
            base = 4.0 * (float(anchor_sizes[i]) if anchor_sizes is not None else nominal_stride(level))
        else:
            base = float(anchor_sizes[i]) if anchor_sizes is not None else default_anchor_size(detector, levels, i)
        out.append((base, base * 2 ** (1 / 3), base * 2 ** (2 / 3)))
    return out


def virtual_anchors(
    padded_size: Sequence[int],
    grid_sizes: Sequence[Sequence[int]],
    sizes: Sequence[Sequence[float]],
    ratios: Sequence[float] = RETINA_RATIOS,
    device: torch.device | None = None,
) -> tuple[Tensor, list[int]]:
    """Anchors [A, 4] laid out exactly as torchvision's AnchorGenerator does, and the count per level.

    Order: level by level; within a level positions row-major (y, then x); at each position its
    len(sizes[l])·len(ratios) anchors. Placement uses torchvision's integer stride (padded // grid).
    """
    gen = AnchorGenerator(tuple(tuple(s) for s in sizes), (tuple(ratios),) * len(sizes))
    dev = device or torch.device("cpu")
    gen.set_cell_anchors(torch.float32, dev)
    strides = [
        [torch.tensor(padded_size[0] // g[0], device=dev), torch.tensor(padded_size[1] // g[1], device=dev)]
        for g in grid_sizes
    ]
    per_level = gen.grid_anchors([list(g) for g in grid_sizes], strides)
    return torch.cat(per_level), [int(a.shape[0]) for a in per_level]


def fgfi_mask(
    anchors: Tensor,
    boxes: Tensor,
    grid_sizes: Sequence[Sequence[int]],
    anchors_per_level: Sequence[int],
    psi: float = 0.5,
) -> list[Tensor]:
    """FGFI imitation mask of one image: a bool [H_l, W_l] per level.

    For each GT g, F_g = psi · max over *all* anchors (every level) of IoU(a, g); a location is positive
    when any of its anchors has IoU > F_g for some g; hits are marked on every level (docs/method/baselines.md#fgfi,
    the recommended FPN variant).
    """
    if sum(anchors_per_level) != anchors.shape[0]:
        total = sum(anchors_per_level)
        raise ValueError(f"anchors_per_level sums to {total}, but there are {anchors.shape[0]} anchors")
    if boxes.numel() == 0:
        hit = torch.zeros(anchors.shape[0], dtype=torch.bool, device=anchors.device)
    else:
        iou = box_iou(anchors.float(), boxes.float().to(anchors.device))  # [A, G]
        threshold = psi * iou.max(dim=0).values  # [G]
        hit = (iou > threshold[None, :]).any(dim=1)
    masks, start = [], 0
    for (h, w), count in zip(grid_sizes, anchors_per_level):
        per_location, rest = divmod(count, h * w)
        if rest or per_location == 0:
            raise ValueError(f"{count} anchors do not tile a {h}x{w} level")
        masks.append(hit[start : start + count].view(h * w, per_location).any(dim=1).view(h, w))
        start += count
    return masks


def assign_levels(boxes: Tensor, num_levels: int, canonical_size: float = 56.0) -> Tensor:
    """DeFeat's level of each box: clamp(floor(log2(sqrt((w+1)(h+1)) / canonical)), 0, L-1)."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    scale = torch.sqrt((w + 1).clamp(min=1e-6) * (h + 1).clamp(min=1e-6))
    level = torch.floor(torch.log2(scale / canonical_size + 1e-6))
    return level.clamp(0, num_levels - 1).long()


def _cells(extent: int, device: torch.device) -> Tensor:
    return torch.arange(extent, device=device)


def box_fill_mask(boxes: Tensor, grid_size: Sequence[int], stride: tuple[float, float]) -> Tensor:
    """DeFeat's binary GT mask on one level: each box / stride truncated to int, filled half-open
    [y1:y2, x1:x2) and clipped to the map; a box thinner than a cell marks one cell."""
    h, w = int(grid_size[0]), int(grid_size[1])
    device = boxes.device
    if boxes.numel() == 0:
        return torch.zeros(h, w, device=device)
    sy, sx = stride
    x1 = torch.floor(boxes[:, 0] / sx).long().clamp(0, w - 1)
    y1 = torch.floor(boxes[:, 1] / sy).long().clamp(0, h - 1)
    x2 = torch.maximum(torch.floor(boxes[:, 2] / sx).long().clamp(max=w), x1 + 1)
    y2 = torch.maximum(torch.floor(boxes[:, 3] / sy).long().clamp(max=h), y1 + 1)
    ys = _cells(h, device)[None, :, None]
    xs = _cells(w, device)[None, None, :]
    inside = (ys >= y1[:, None, None]) & (ys < y2[:, None, None]) & (xs >= x1[:, None, None]) & (xs < x2[:, None, None])
    return inside.any(dim=0).float()


def defeat_masks(
    boxes: Tensor,
    grid_sizes: Sequence[Sequence[int]],
    padded_size: Sequence[int],
    canonical_size: float = 56.0,
) -> list[Tensor]:
    """DeFeat neck masks of one image: a binary float [H_l, W_l] per level, each GT on its assigned level only."""
    levels = assign_levels(boxes, len(grid_sizes), canonical_size) if boxes.numel() else None
    out = []
    for i, grid in enumerate(grid_sizes):
        chosen = boxes[levels == i] if levels is not None else boxes
        out.append(box_fill_mask(chosen, grid, level_stride(padded_size, grid)))
    return out


def fgd_masks(boxes: Tensor, grid_size: Sequence[int], padded_size: Sequence[int]) -> tuple[Tensor, Tensor]:
    """FGD's foreground and background masks of one image on one level, each float [H, W].

    Boxes / stride, x1,y1 floored and x2,y2 ceiled; the inclusive rectangle gets 1/((y2-y1+1)(x2-x1+1))
    (area from the unclipped extents, as in the reference code), the max where boxes overlap, so the
    smaller box wins. Background = 1 where fg is 0, divided by the count of such cells.
    """
    h, w = int(grid_size[0]), int(grid_size[1])
    device = boxes.device
    fg = torch.zeros(h, w, device=device)
    if boxes.numel():
        sy, sx = level_stride(padded_size, grid_size)
        x1 = torch.floor(boxes[:, 0] / sx)
        y1 = torch.floor(boxes[:, 1] / sy)
        x2 = torch.ceil(boxes[:, 2] / sx)
        y2 = torch.ceil(boxes[:, 3] / sy)
        area = 1.0 / ((y2 - y1 + 1) * (x2 - x1 + 1))
        ys = _cells(h, device)[None, :, None].float()
        xs = _cells(w, device)[None, None, :].float()
        inside = (
            (ys >= y1[:, None, None])
            & (ys <= y2[:, None, None])
            & (xs >= x1[:, None, None])
            & (xs <= x2[:, None, None])
        )
        fg = (inside.float() * area[:, None, None].float()).amax(dim=0)
    bg = (fg == 0).float()
    return fg, bg / bg.sum().clamp(min=1.0)  # an all-foreground map keeps bg = 0


def feature_grid_sizes(features: Mapping[str, Tensor], levels: Sequence[str]) -> list[tuple[int, int]]:
    """(H, W) of each named level, in order."""
    return [(int(features[lv].shape[-2]), int(features[lv].shape[-1])) for lv in levels]
