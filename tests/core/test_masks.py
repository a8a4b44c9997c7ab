"""Hand-checked masks of the KD baselines (icd_core/distill/masks.py)."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from icd_core.distill.masks import (
    assign_levels,
    box_fill_mask,
    defeat_masks,
    fgd_masks,
    fgfi_mask,
    resolve_options,
    virtual_anchor_sizes,
    virtual_anchors,
)


def cells(mask: torch.Tensor) -> set[tuple[int, int]]:
    return {tuple(int(v) for v in idx) for idx in mask.nonzero()}


def test_virtual_anchors_match_torchvision_order() -> None:
    sizes = [(32.0, 40.0, 50.0), (64.0, 80.0, 101.0)]
    grids = [(4, 6), (2, 3)]
    padded = (32, 48)
    ours, per_level = virtual_anchors(padded, grids, sizes)
    gen = AnchorGenerator(tuple(sizes), ((0.5, 1.0, 2.0),) * 2)
    image_list = ImageList(torch.zeros(1, 3, *padded), [padded])
    theirs = gen(image_list, [torch.zeros(1, 1, *g) for g in grids])[0]
    assert per_level == [4 * 6 * 9, 2 * 3 * 9]
    assert torch.equal(ours, theirs)
    # Row-major positions, the 9 anchors of a position together: anchor 9 is centred at (x=8, y=0).
    centre = (ours[9, :2] + ours[9, 2:]) / 2
    assert centre.tolist() == [8.0, 0.0]
    centre = (ours[6 * 9, :2] + ours[6 * 9, 2:]) / 2  # first anchor of the second row
    assert centre.tolist() == [0.0, 8.0]


def test_virtual_anchor_sizes() -> None:
    fcos = virtual_anchor_sizes("fcos", ["p3", "p4"], None)
    assert fcos[0][0] == 32.0 and fcos[1][0] == 64.0  # 4·stride
    assert fcos[0][2] == pytest.approx(32.0 * 2 ** (2 / 3))
    assert virtual_anchor_sizes("fcos", ["p3"], [4.0])[0][0] == 16.0
    assert virtual_anchor_sizes("faster_rcnn", ["p2", "p3"], None)[1][0] == 64.0  # the RPN's own size
    assert virtual_anchor_sizes("retinanet", ["p3"], [8.0])[0][0] == 8.0


def two_level_anchors() -> tuple[torch.Tensor, list[tuple[int, int]], list[int]]:
    """Level A: 2x2 grid, 2 anchors per position; level B: 1x1, one big anchor."""
    level_a = [
        [0, 0, 10, 10],
        [0, 0, 20, 20],  # (0,0): IoU with g1 1.0, 0.25
        [10, 0, 20, 10],
        [5, 0, 15, 10],  # (0,1): 0, 1/3
        [0, 5, 10, 15],
        [0, 10, 10, 20],  # (1,0): 1/3, 0
        [5, 5, 15, 15],
        [20, 20, 30, 30],  # (1,1): 1/7, 0
    ]
    level_b = [[0, 0, 40, 40]]  # IoU with g1 1/16, with g2 1.0
    anchors = torch.tensor(level_a + level_b, dtype=torch.float32)
    return anchors, [(2, 2), (1, 1)], [8, 1]


def test_fgfi_mask_by_hand() -> None:
    anchors, grids, per_level = two_level_anchors()
    g1 = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    a, b = fgfi_mask(anchors, g1, grids, per_level, psi=0.5)
    assert cells(a) == {(0, 0)} and cells(b) == set()
    a, b = fgfi_mask(anchors, g1, grids, per_level, psi=0.3)
    assert cells(a) == {(0, 0), (0, 1), (1, 0)} and cells(b) == set()
    # g2's best anchor is on level B; its threshold 0.3 excludes the 0.25 anchor on level A.
    both = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 40.0, 40.0]])
    a, b = fgfi_mask(anchors, both, grids, per_level, psi=0.3)
    assert cells(a) == {(0, 0), (0, 1), (1, 0)} and cells(b) == {(0, 0)}
    # The max over all levels sets the threshold: g2 alone at psi 0.2 reaches the 0.25 anchor on level A.
    a, b = fgfi_mask(anchors, both[1:], grids, per_level, psi=0.2)
    assert cells(a) == {(0, 0)} and cells(b) == {(0, 0)}
    # Strictly greater: at psi 1 nothing exceeds the max.
    a, b = fgfi_mask(anchors, both, grids, per_level, psi=1.0)
    assert not a.any() and not b.any()
    a, b = fgfi_mask(anchors, torch.zeros(0, 4), grids, per_level)
    assert not a.any() and not b.any()


def test_fgfi_mask_locates_torchvision_anchor_positions() -> None:
    """A GT equal to the anchor at (y=2, x=7) on a non-square grid lights exactly that cell."""
    padded, grid = (64, 96), (8, 12)
    anchors, per_level = virtual_anchors(padded, [grid], [(16.0,)], ratios=(1.0,))
    gt = torch.tensor([[7 * 8 - 8.0, 2 * 8 - 8.0, 7 * 8 + 8.0, 2 * 8 + 8.0]])
    (mask,) = fgfi_mask(anchors, gt, [grid], per_level, psi=0.99)
    assert cells(mask) == {(2, 7)}


def test_fgfi_mask_rejects_wrong_counts() -> None:
    anchors, grids, _ = two_level_anchors()
    with pytest.raises(ValueError):
        fgfi_mask(anchors, anchors[:1], grids, [6, 3])


def test_assign_levels() -> None:
    boxes = torch.tensor([[0, 0, 30, 30], [0, 0, 111, 111], [0, 0, 223, 223], [0, 0, 5000, 5000.0]])
    assert assign_levels(boxes, 5).tolist() == [0, 1, 2, 4]
    assert assign_levels(boxes, 2).tolist() == [0, 1, 1, 1]


def test_defeat_masks_level_assignment_and_fill() -> None:
    padded, grids = (32, 32), [(4, 4), (2, 2)]
    boxes = torch.tensor(
        [
            [3.0, 9.0, 20.0, 17.0],  # sqrt(18·9) ≈ 12.7 < 16 -> level 0; cols [0, 2), rows [1, 2)
            [0.0, 0.0, 31.0, 31.0],  # sqrt(32·32) = 32 -> level 1; stride 16: cols [0, 1), rows [0, 1)
            [9.0, 25.0, 10.0, 26.0],  # thinner than a cell -> level 0, the one cell (3, 1)
        ]
    )
    low, high = defeat_masks(boxes, grids, padded, canonical_size=16.0)
    assert cells(low) == {(1, 0), (1, 1), (3, 1)}
    assert cells(high) == {(0, 0)}
    assert set(low.unique().tolist()) == {0.0, 1.0}
    low, high = defeat_masks(torch.zeros(0, 4), grids, padded)
    assert not low.any() and not high.any()


def test_box_fill_clips_to_map() -> None:
    mask = box_fill_mask(torch.tensor([[20.0, 20.0, 100.0, 100.0]]), (4, 4), (8.0, 8.0))
    assert cells(mask) == {(y, x) for y in (2, 3) for x in (2, 3)}


def test_fgd_masks_area_overlap_and_background() -> None:
    boxes = torch.tensor(
        [
            [0.0, 0.0, 16.0, 16.0],  # cells 0..2 x 0..2 (inclusive, ceil) -> 1/9
            [8.0, 8.0, 12.0, 12.0],  # cells 1..2 x 1..2 -> 1/4, wins on the overlap
        ]
    )
    fg, bg = fgd_masks(boxes, (4, 4), (32, 32))
    expected = torch.zeros(4, 4)
    expected[0:3, 0:3] = 1 / 9
    expected[1:3, 1:3] = 1 / 4
    assert torch.allclose(fg, expected)
    assert torch.allclose(bg[fg == 0], torch.full((7,), 1 / 7))
    assert (bg[fg > 0] == 0).all() and bg.sum().item() == pytest.approx(1.0)
    fg, bg = fgd_masks(torch.zeros(0, 4), (4, 4), (32, 32))
    assert not fg.any() and torch.allclose(bg, torch.full((4, 4), 1 / 16))


def test_fgd_masks_use_padded_stride() -> None:
    """A batch padded to 32x64 with an 8x16 map: stride 4 on both axes, whatever the image size."""
    fg, _ = fgd_masks(torch.tensor([[40.0, 4.0, 44.0, 8.0]]), (8, 16), (32, 64))
    assert cells(fg) == {(y, x) for y in (1, 2) for x in (10, 11)}


def test_resolve_options() -> None:
    assert resolve_options("fgfi", {"psi": 0.3, "alpha": 1.0}, {"psi": 0.5}) == {"psi": 0.3}
    with pytest.raises(ValueError, match="alpah"):
        resolve_options("fgd", {"alpah": 1.0}, {"alpha": 1e-3})
