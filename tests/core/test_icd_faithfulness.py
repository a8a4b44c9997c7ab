"""ICD details that must match the authors' release (docs/method/icd.md#initialisation, #fake-instances, #bypass)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from icd_core.distill.icd import PAPER_BYPASS_ITERS, ICDDistiller, bypass_steps
from icd_core.distill.icd_decoder import ConditionalDecoder
from icd_core.distill.icd_queries import ClassPriorTensors, clamp_to_image, sample_fakes
from icd_core.spec import DistillSpec, ICDOptions
from tests.core.test_icd import fake_detector

C = 256


def _uniform_bound(weight: torch.Tensor) -> float:
    """The bound of a U(-b, b) tensor, estimated from its std (std = b / √3)."""
    return float(weight.detach().std()) * math.sqrt(3)


def test_in_projection_is_xavier_over_the_stacked_three_c_by_c_matrix() -> None:
    torch.manual_seed(0)
    layer = ConditionalDecoder(C, heads=8).layers[0]
    stacked = torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight])
    expected = math.sqrt(6.0 / (C + 3 * C))  # xavier on [3C, C]; per-projection xavier would be √(6 / 2C)
    assert _uniform_bound(stacked) == pytest.approx(expected, rel=0.02)
    assert stacked.abs().max() <= expected + 1e-6
    for proj in (layer.q_proj, layer.k_proj, layer.v_proj, layer.out_proj):
        assert (proj.bias == 0).all()


def test_position_projection_ffn_and_out_projection_keep_pytorch_default_init() -> None:
    torch.manual_seed(0)
    decoder = ConditionalDecoder(C, heads=8)
    layer = decoder.layers[0]
    default_bound = 1 / math.sqrt(C)  # nn.Linear: kaiming_uniform(a=√5) → U(−1/√fan_in, 1/√fan_in)
    for linear in (decoder.pos_proj, layer.out_proj, layer.ffn[0]):
        assert _uniform_bound(linear.weight) == pytest.approx(default_bound, rel=0.03)
    assert _uniform_bound(layer.ffn[2].weight) == pytest.approx(1 / math.sqrt(4 * C), rel=0.03)
    assert decoder.pos_proj.bias.abs().max() > 0 and layer.ffn[0].bias.abs().max() > 0  # default bias, not zero
    assert isinstance(layer.norm1, nn.LayerNorm) and (layer.norm1.weight == 1).all()


def test_fake_boxes_are_clamped_to_the_image() -> None:
    priors = ClassPriorTensors(torch.ones(2), torch.full((2, 2), 0.6), torch.full((2, 2), 0.05))
    _, boxes = sample_fakes(2000, priors, torch.Generator().manual_seed(0))
    x1y1, x2y2 = boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2
    assert (x1y1 >= -1e-6).all() and (x2y2 <= 1 + 1e-6).all()
    assert (boxes[:, 2:] < 0.5 - 1e-3).any()  # big boxes near the border really were cut


def test_clamp_to_image_cuts_only_what_sticks_out() -> None:
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.95, 0.1, 0.3, 0.4]])
    out = clamp_to_image(boxes)
    torch.testing.assert_close(out[0], boxes[0])
    # x: 0.8..1.1 → 0.8..1.0; y: −0.1..0.3 → 0..0.3
    torch.testing.assert_close(out[1], torch.tensor([0.9, 0.15, 0.2, 0.3]))


@pytest.mark.parametrize(
    ("requested", "total", "expected"),
    [
        (None, 90_000, PAPER_BYPASS_ITERS),
        (None, 3_000, 1000),
        (None, 1_200, 400),
        (None, 600, 200),
        (None, 2, 0),
        (50, 600, 50),
        (0, 90_000, 0),
        (5000, 600, 5000),
    ],
)
def test_bypass_rule(requested: int | None, total: int, expected: int) -> None:
    assert bypass_steps(requested, total) == expected


def test_distiller_uses_the_bypass_rule() -> None:
    det = fake_detector()
    assert ICDDistiller(DistillSpec(icd=ICDOptions()), det, det, total_steps=600, seed=0).bypass_iters == 200
    assert ICDDistiller(DistillSpec(icd=ICDOptions()), det, det, total_steps=90_000, seed=0).bypass_iters == 1000
