"""ICD readiness diagnostics on hand-made logits and attention maps (icd_core.distill.icd_diagnostics)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from icd_core.distill.icd_diagnostics import (
    edge_distances,
    identification_auc,
    in_box_mass,
    inside_boxes,
    key_centres,
    localization_error,
    real_recall,
)
from tests.core.test_icd import ONE, TWO, batch, make_distiller
from tests.core.test_trainer import cache_dir, teacher_run  # noqa: F401  (session fixtures)


def _brute_auc(x: list[float], real: list[bool]) -> float:
    pos = [a for a, r in zip(x, real) if r]
    neg = [a for a, r in zip(x, real) if not r]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auc_matches_pair_counting_with_ties_and_ignores_padding() -> None:
    x = [0.3, -1.0, 0.3, 2.0, 0.3, -0.5, 5.0]
    real = [True, False, False, True, True, False, False]
    valid = [True] * 6 + [False]  # the padded slot (5.0, fake) must not count
    auc = identification_auc(torch.tensor([x]), torch.tensor([real]), torch.tensor([valid]))
    assert float(auc) == pytest.approx(_brute_auc(x[:6], real[:6]))
    # all fakes called "fake" yet ranked below every real: accuracy at 0 is the fake share, AUC is 1
    logits = torch.tensor([[-0.1, -0.2, -3.0, -3.0, -3.0, -3.0]])
    real_mask = torch.tensor([[True, True, False, False, False, False]])
    assert float(identification_auc(logits, real_mask, torch.ones_like(real_mask))) == 1.0
    hits, n = real_recall(logits, real_mask)
    assert (float(hits), float(n)) == (0.0, 2.0)
    assert math.isnan(float(identification_auc(logits, torch.ones_like(real_mask), torch.ones_like(real_mask))))


def test_in_box_mass_on_a_hand_made_attention_map() -> None:
    # one 64×64 image, one 4×4 level (stride 16): the box covers the top-left 2×2 cells (4 of 16 keys)
    centres = key_centres([(64, 64)], (64, 64), [(4, 4)])
    assert torch.allclose(centres[0, 0], torch.tensor([0.125, 0.125])) and centres.shape == (1, 16, 2)
    boxes = torch.tensor([[[0.25, 0.25, 0.5, 0.5]]])
    inside = inside_boxes(centres, boxes)
    assert inside[0, 0].nonzero().flatten().tolist() == [0, 1, 4, 5]
    # attention p: 0.7 over the four in-box keys, 0.3 over the other twelve; logits = log p with d = 1, q = 1
    p = torch.full((16,), 0.3 / 12)
    p[[0, 1, 4, 5]] = 0.7 / 4
    k = p.log().view(1, 1, 16, 1)
    q = torch.ones(1, 1, 1, 1)
    valid = torch.ones(1, 16, dtype=torch.bool)
    mass, uniform, pairs = in_box_mass(q, k, valid, torch.tensor([[True]]), inside)
    assert float(mass / pairs) == pytest.approx(0.7, abs=1e-6)
    assert float(uniform / pairs) == pytest.approx(4 / 16)
    # padded keys count neither in the attention nor in the uniform reference
    valid[0, 8:] = False
    mass, uniform, pairs = in_box_mass(q, k, valid, torch.tensor([[True]]), inside)
    assert float(mass / pairs) == pytest.approx(0.7 / (0.7 + 0.3 / 12 * 4), abs=1e-6)
    assert float(uniform / pairs) == pytest.approx(4 / 8)


def test_localization_error_in_box_units() -> None:
    boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.2]]])
    ref = torch.tensor([[[0.5, 0.5]]])
    ltrb = edge_distances(ref, boxes)
    torch.testing.assert_close(ltrb, torch.tensor([[[0.2, 0.1, 0.2, 0.1]]]))
    exact = torch.logit(ltrb)
    total, n = localization_error(exact, ltrb, boxes, torch.tensor([[True]]))
    assert float(total) == pytest.approx(0.0, abs=1e-5) and float(n) == 1.0
    off = torch.logit(ltrb + torch.tensor([0.04, 0.0, 0.0, 0.02]))  # 0.1 of the width, 0.1 of the height
    total, _ = localization_error(off, ltrb, boxes, torch.tensor([[True]]))
    assert float(total) == pytest.approx((0.1 + 0.1) / 4, abs=1e-4)


def test_every_icd_step_reports_the_diagnostics() -> None:
    d = make_distiller()
    d.compute(batch([TWO, ONE], [(128, 128), (96, 128)]))
    stats = d.report()
    for key in ("icd_ident_auc", "icd_real_recall", "icd_inbox_mass", "icd_inbox_uniform", "icd_loc_error"):
        assert key in stats and math.isfinite(stats[key]), key
    assert 0.0 < stats["icd_inbox_uniform"] < 1.0 and 0.0 <= stats["icd_inbox_mass"] <= 1.0
    # an untrained decoder attends almost uniformly: in-box mass close to the uniform share
    assert abs(stats["icd_inbox_mass"] - stats["icd_inbox_uniform"]) < 0.1


def test_every_evaluation_of_an_icd_run_measures_a_held_out_batch(teacher_run, cache_dir, tmp_path):  # noqa: F811
    from trainer_specs import distill_spec

    from icd_core.engine.metrics_log import read_metrics_log
    from icd_core.runner import run_spec
    from icd_core.spec import parse_spec

    teacher_dir, _ = teacher_run
    spec = parse_spec(distill_spec(str(teacher_dir / "checkpoints" / "final.pt"), "icd", iterations=2))
    result = run_spec(spec, tmp_path / "run", cache_dir=cache_dir)
    for key in ("icd_heldout_auc", "icd_heldout_inbox_mass", "icd_heldout_inbox_uniform", "icd_heldout_loc_error"):
        assert key in result.final_metrics and math.isfinite(result.final_metrics[key]), key
    evals = [r for r in read_metrics_log(tmp_path / "run") if r["type"] == "eval"]
    assert evals and "icd_heldout_auc" in evals[-1] and "AP" in evals[-1]
