"""Paired Δ vs `none` with 95 % t intervals, and the verdict sentence, against hand-computed values."""

from __future__ import annotations

import math

import pytest

from icd_core.leaderboard import build_leaderboard, leaderboard_markdown
from icd_core.paired_stats import paired_delta, t975


def test_t_quantiles_match_published_tables() -> None:
    # df 1, 2, 30 from the table; 40, 60, 120 from the expansion (tables: 2.0211, 2.0003, 1.9799).
    assert t975(1) == pytest.approx(12.7062, abs=1e-4)
    assert t975(2) == pytest.approx(4.3027, abs=1e-4)
    assert t975(30) == pytest.approx(2.0423, abs=1e-4)
    assert t975(40) == pytest.approx(2.0211, abs=1e-4)
    assert t975(60) == pytest.approx(2.0003, abs=1e-4)
    assert t975(120) == pytest.approx(1.9799, abs=1e-4)
    with pytest.raises(ValueError):
        t975(0)


def test_interval_by_hand_contains_zero() -> None:
    # diffs 2.0, 3.0, 0.5: mean 1.8333, sd sqrt(3.16667 / 2) = 1.25831, se 0.72648, half 4.3027 * se = 3.12584
    p = paired_delta({0: 12.0, 1: 14.0, 2: 13.0}, {0: 10.0, 1: 11.0, 2: 12.5})
    assert p is not None and p.n == 3 and p.seeds == (0, 1, 2)
    assert p.mean == pytest.approx(1.833333, abs=1e-5)
    assert p.ci_low == pytest.approx(1.833333 - 3.12584, abs=1e-4)
    assert p.ci_high == pytest.approx(1.833333 + 3.12584, abs=1e-4)
    assert not p.distinguishable


def test_interval_by_hand_excludes_zero_and_pairs_by_seed() -> None:
    # seeds 0-2 shared (diffs 2.0, 2.5, 3.0: mean 2.5, sd 0.5, half 4.3027 * 0.5 / sqrt 3 = 1.24208); seed 7 unpaired
    p = paired_delta({0: 12.0, 1: 12.5, 2: 13.0, 7: 99.0}, {0: 10.0, 1: 10.0, 2: 10.0, 5: 0.0})
    assert p is not None and p.seeds == (0, 1, 2)
    assert (p.ci_low, p.ci_high) == pytest.approx((2.5 - 1.24208, 2.5 + 1.24208), abs=1e-4)
    assert p.distinguishable
    # Unpaired, the same numbers would look far noisier: the pairing is what removes the seed effect.
    assert paired_delta({0: 1.0}, {1: 1.0}) is None
    one = paired_delta({0: 3.0}, {0: 1.0})
    assert one is not None and one.ci_low is None and not one.distinguishable and math.isclose(one.mean, 2.0)


def _row(method: str, seed: int, ap: float, **extra: object) -> dict:
    return {"method": method, "seed": seed, "metrics": {"AP": ap}, "sec_per_step": 1.0, **extra}


def test_verdict_names_the_winner_with_its_interval_setting_and_cost() -> None:
    rows = [_row("none", s, 10.0) for s in range(3)]
    rows += [_row("icd", s, ap, params={"distill.weight": 4.0}) for s, ap in enumerate((12.0, 12.5, 13.0))]
    rows += [_row("fitnet", s, ap) for s, ap in enumerate((12.0, 9.0, 10.5))]
    for r in rows:
        if r["method"] == "icd":
            r["sec_per_step"] = 1.5
    report = build_leaderboard(rows)
    assert report["verdict"] == (
        "On this data, icd (weight 4) beats `none` by +2.5 AP (95 % CI [+1.3, +3.7], 3 seeds), "
        "at the student's inference cost and +50 % training time per step."
    )
    icd = next(m for m in report["methods"] if m["method"] == "icd")
    assert icd["setting"] == {"distill.weight": 4.0}
    md = leaderboard_markdown(report)
    assert "+2.5 [+1.3, +3.7] |" in md and "weight 4" in md
    assert "≈0" in md  # fitnet's interval contains 0


def test_verdict_when_nothing_is_distinguishable_or_one_seed() -> None:
    rows = [_row("none", s, 10.0) for s in range(3)] + [_row("icd", s, a) for s, a in enumerate((12.0, 9.0, 10.5))]
    assert build_leaderboard(rows)["verdict"].startswith(
        "No method is distinguishable from `none` at 3 seeds (best: icd +0.5 AP, 95 % CI ["
    )
    assert build_leaderboard(rows)["verdict"].endswith("run more seeds or a longer schedule.")
    worse = [_row("none", s, 10.0) for s in range(3)] + [_row("fgd", s, a) for s, a in enumerate((5.0, 5.5, 6.0))]
    assert "fgd is worse than `none`" in build_leaderboard(worse)["verdict"]
    single = [_row("none", 0, 10.0), _row("icd", 0, 12.0)]
    assert build_leaderboard(single)["verdict"].startswith("One seed per method cannot separate")
    assert build_leaderboard([_row("icd", 0, 12.0)])["verdict"].startswith("No method ran beside `none`")
