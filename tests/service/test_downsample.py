"""max_points downsampling in SQL (SQLite and PostgreSQL) against a plain-Python reference of the same rule:
buckets by step keep their min and max points, plus the series' last point, in at most max_points points."""

from __future__ import annotations

import random

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from store import jobs as q
from store.downsample import raw_buckets, rollup_buckets
from store.models import ROLLUP_BLOCK_STEPS, MetricRollup
from store.results import add_metrics, get_metrics

Point = tuple[int, float]


def _extremes(points: list[Point]) -> set[Point]:
    return {min(points, key=lambda p: (p[1], p[0])), min(points, key=lambda p: (-p[1], p[0]))}


def reference_rows(points: list[Point], max_points: int) -> set[Point]:
    """The row path: nb buckets of equal step span."""
    if len(points) <= max_points:
        return set(points)
    nb, lo, hi = raw_buckets(max_points), points[0][0], points[-1][0]
    buckets: dict[int, list[Point]] = {}
    for p in points:
        buckets.setdefault((p[0] - lo) * nb // (hi - lo + 1), []).append(p)
    return set().union(*(_extremes(b) for b in buckets.values())) | {points[-1]}


def reference_blocks(points: list[Point], max_points: int, since_step: int | None) -> set[Point]:
    """The rollup path: buckets of whole blocks; a partial first block after since_step is its own bucket."""
    first = -(-(since_step + 1) // ROLLUP_BLOCK_STEPS) if since_step is not None else min(p[0] for p in points)
    head = [p for p in points if p[0] < first * ROLLUP_BLOCK_STEPS] if since_step is not None else []
    body = [p for p in points if p not in head]
    nb = rollup_buckets(max_points)
    lo, hi = body[0][0] // ROLLUP_BLOCK_STEPS, body[-1][0] // ROLLUP_BLOCK_STEPS
    buckets: dict[int, list[Point]] = {}
    for p in body:
        buckets.setdefault((p[0] // ROLLUP_BLOCK_STEPS - lo) * nb // (hi - lo + 1), []).append(p)
    out = set().union(*(_extremes(b) for b in buckets.values())) | {points[-1]}
    return out | (_extremes(head) if head else set())


def reference(points: list[Point], max_points: int, since_step: int | None = None) -> set[Point]:
    """The documented choice: the rollup path once the series spans at least one block per bucket."""
    first = -(-(since_step + 1) // ROLLUP_BLOCK_STEPS) if since_step is not None else -(2**31)
    span = points[-1][0] // ROLLUP_BLOCK_STEPS - max(points[0][0] // ROLLUP_BLOCK_STEPS, first) + 1
    if len(points) > max_points and span >= rollup_buckets(max_points):
        return reference_blocks(points, max_points, since_step)
    return reference_rows(points, max_points)


def _job(s: Session) -> int:
    return q.create_job(s, {"kind": "train"}, "train", "j", "any").id


def _write(s: Session, job_id: int, name: str, points: list[Point], batch: int = 500) -> None:
    for i in range(0, len(points), batch):
        add_metrics(s, job_id, 1, [(name, st, v) for st, v in points[i : i + batch]])


def _check(got: list[Point], want: set[Point], points: list[Point], max_points: int) -> None:
    assert len(got) <= max_points
    assert [p[0] for p in got] == sorted({p[0] for p in got})  # ascending, one point per step
    assert set(got) == want
    assert got[-1] == points[-1]  # the series' last point
    assert _extremes(points) <= set(got)  # global min and max survive


def test_short_series_match_the_reference(session: Session) -> None:
    rng = random.Random(1)
    jid = _job(session)
    points = [(st, rng.uniform(-1, 1)) for st in range(3, 900, 3)]  # 299 points over 7 blocks
    _write(session, jid, "loss", points)
    for mp in (3, 5, 50, 298, 299, 1000):
        _check(get_metrics(session, jid, max_points=mp)["loss"], reference(points, mp), points, mp)
    assert reference(points, 50) == reference_rows(points, 50)  # 7 blocks < 23 buckets: from rows
    after = [p for p in points if p[0] > 450]
    got = get_metrics(session, jid, since_step=450, max_points=20)["loss"]
    _check(got, reference(after, 20, 450), after, 20)


def test_long_series_are_bucketed_from_rollups(session: Session) -> None:
    rng = random.Random(2)
    jid = _job(session)
    points = [(st, rng.gauss(0, 1)) for st in range(1, 30_001)]
    points[12_345] = (points[12_345][0], 50.0)  # a spike must survive downsampling
    _write(session, jid, "loss", points, batch=2_000)
    _write(session, jid, "lr", [(st, 0.1) for st in range(1, 30_001, 10)], batch=2_000)
    for mp in (10, 100, 333):
        series = get_metrics(session, jid, max_points=mp)
        assert set(series) == {"loss", "lr"}
        assert reference(points, mp) == reference_blocks(points, mp, None)
        _check(series["loss"], reference_blocks(points, mp, None), points, mp)
        assert (points[12_345][0], 50.0) in series["loss"]
    for since in (7_000, 7_039):  # block-aligned (7,040 = 55 * 128 starts a block) and not
        after = [p for p in points if p[0] > since]
        got = get_metrics(session, jid, names=["loss"], since_step=since, max_points=101)
        _check(got["loss"], reference_blocks(after, 101, since), after, 101)


def test_rollups_follow_rewrites_of_a_resumed_run(session: Session) -> None:
    jid = _job(session)
    _write(session, jid, "loss", [(st, float(st)) for st in range(1, 1_001)])
    add_metrics(session, jid, 2, [("loss", 300, -5.0), ("loss", 1_000, 0.5)])  # the old max is replaced
    block = session.scalars(select(MetricRollup).where(MetricRollup.job_id == jid, MetricRollup.block == 2)).one()
    assert (block.n, block.min_step, block.min_value, block.max_value) == (128, 300, -5.0, 383.0)
    last = session.scalars(select(MetricRollup).where(MetricRollup.job_id == jid, MetricRollup.block == 7)).one()
    assert (last.last_step, last.last_value, last.max_step) == (1_000, 0.5, 999)
    points = sorted(get_metrics(session, jid)["loss"])
    got = get_metrics(session, jid, max_points=9)["loss"]
    _check(got, reference_blocks(points, 9, None), points, 9)


@pytest.mark.parametrize("mp", [3, 4, 5])
def test_tiny_max_points_still_bounded(session: Session, mp: int) -> None:
    jid = _job(session)
    points = [(st, float(st % 17)) for st in range(0, 5_000)]
    _write(session, jid, "loss", points, batch=2_500)
    got = get_metrics(session, jid, max_points=mp)["loss"]
    assert len(got) <= mp and got[-1] == points[-1]
    assert get_metrics(session, jid, max_points=2)["loss"] == [points[0], points[-1]]  # the ends only
    assert get_metrics(session, jid, since_step=4_000, max_points=2)["loss"] == [points[4_001], points[-1]]
    with pytest.raises(ValueError, match="max_points"):
        get_metrics(session, jid, max_points=1)


def test_rollups_equal_a_rebuild_after_appends_rewrites_and_out_of_order_writes(session: Session) -> None:
    from sqlalchemy import delete, text

    from store.rollups import REBUILD_SQL, ROLLUP_COLUMNS

    rng = random.Random(3)
    jid = _job(session)
    steps = list(range(0, 2_000, 3))
    for i in range(0, len(steps), 50):  # appends (merged without reading rows)
        add_metrics(session, jid, 1, [(n, st, rng.random()) for st in steps[i : i + 50] for n in ("a", "b")])
    for _ in range(20):  # a resumed run: rewrites, some out of order, some new steps in the middle
        lo = rng.randrange(0, 1_900)
        add_metrics(session, jid, 2, [("a", st, rng.uniform(-2, 2)) for st in range(lo, lo + rng.randrange(1, 90))])
    add_metrics(session, jid, 2, [("b", 5_000, 9.0), ("b", 4_000, -9.0)])  # a new block, written backwards

    def rollups() -> list[tuple[object, ...]]:
        cols = ", ".join(("name", "block", *ROLLUP_COLUMNS))
        return [
            tuple(r)
            for r in session.execute(
                text(f"SELECT {cols} FROM metric_rollups WHERE job_id = :j ORDER BY name, block"), {"j": jid}
            )
        ]

    kept = rollups()
    session.execute(delete(MetricRollup).where(MetricRollup.job_id == jid))
    session.execute(text(REBUILD_SQL.format(where="job_id = :j")), {"j": jid})
    assert kept == rollups()
    session.rollback()


def test_rollups_are_repaired_after_points_are_deleted(session: Session) -> None:
    from sqlalchemy import delete, text

    from store.models import Metric
    from store.rollups import REBUILD_SQL, ROLLUP_COLUMNS, refresh_after_delete

    jid = _job(session)
    for name in ("a", "b"):
        _write(session, jid, name, [(st, float(st % 50)) for st in range(1, 1_500)])
    session.execute(delete(Metric).where(Metric.job_id == jid, Metric.step > 700))  # a resume at step 700
    refresh_after_delete(session, jid, 700)
    session.commit()
    cols = ", ".join(("name", "block", *ROLLUP_COLUMNS))
    query = text(f"SELECT {cols} FROM metric_rollups WHERE job_id = :j ORDER BY name, block")
    kept = [tuple(r) for r in session.execute(query, {"j": jid})]
    assert max(r[1] for r in kept) == 700 // ROLLUP_BLOCK_STEPS and kept[-1][-2] == 700  # no empty blocks left
    session.execute(delete(MetricRollup).where(MetricRollup.job_id == jid))
    session.execute(text(REBUILD_SQL.format(where="job_id = :j")), {"j": jid})
    assert kept == [tuple(r) for r in session.execute(query, {"j": jid})]
    got = get_metrics(session, jid, names=["a"], max_points=10)["a"]
    assert got[-1] == (700, 0.0) and len(got) <= 10
