"""`max_points` downsampling in the database: per series, buckets by step keep their min and max points,
plus the series' last point, so a curve's spikes survive and its end is exact. At most max_points points.

Two sources, one rule. A short or medium series is bucketed from its rows (`RAW_SQL`). A long one is
bucketed from `metric_rollups` (`ROLLUP_SQL`): each block of ROLLUP_BLOCK_STEPS steps already knows its
min, max and last point, so a 1M-point series costs ~7.8k summary rows instead of 1M rows. Buckets are
then whole blocks; points after `since_step` inside the first, partial block form one extra bucket.
Nothing but the answer (<= max_points rows per series) reaches Python.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import bindparam, text
from sqlalchemy.orm import Session

from icd_core.spec import INT32_MIN
from store.models import ROLLUP_BLOCK_STEPS

MIN_POINTS = 2
Series = dict[str, list[tuple[int, float]]]

# One series per statement (name fixed), so windows partition by an integer bucket only.
# Buckets by step span: bucket = (step - first) * nb / span. Each bucket gives its min and its max point
# (ties: the earliest step); a series no longer than max_points is returned whole.
RAW_SQL = """
WITH s AS (
    SELECT step, value FROM metrics WHERE job_id = :job_id AND name = :name {since}
), r AS (
    SELECT MIN(step) AS lo, MAX(step) AS hi, COUNT(*) AS n FROM s
), b AS (
    SELECT s.step, s.value, r.hi,
           CASE WHEN r.n <= :max_points THEN s.step
                ELSE CAST(s.step - r.lo AS BIGINT) * :nb / (r.hi - r.lo + 1) END AS bk
    FROM s CROSS JOIN r
), k AS (
    SELECT step, value, hi,
           ROW_NUMBER() OVER (PARTITION BY bk ORDER BY value, step) AS rmin,
           ROW_NUMBER() OVER (PARTITION BY bk ORDER BY value DESC, step) AS rmax
    FROM b
)
SELECT step, value FROM k WHERE rmin = 1 OR rmax = 1 OR step = hi ORDER BY step
"""

# Buckets of whole blocks: bucket = (block - first block) * nb / block span. A bucket's min is the least
# of its blocks' mins, its max the greatest of their maxes; bucket -1 holds the rows of a partial first
# block after since_step.
ROLLUP_SQL = """
WITH blocks AS (
    SELECT block, min_step, min_value, max_step, max_value, last_step, last_value
    FROM metric_rollups WHERE job_id = :job_id AND name = :name AND block >= :first_block
), r AS (
    SELECT MIN(block) AS lo, MAX(block) AS hi FROM blocks
), head AS (
    SELECT step, value FROM metrics
    WHERE job_id = :job_id AND name = :name AND step > :since AND step < :first_block * {block_steps}
), mins AS (
    SELECT CAST(b.block - r.lo AS BIGINT) * :nb / (r.hi - r.lo + 1) AS bk, b.min_step AS step, b.min_value AS value
    FROM blocks b CROSS JOIN r
    UNION ALL
    SELECT -1, step, value FROM head
), maxes AS (
    SELECT CAST(b.block - r.lo AS BIGINT) * :nb / (r.hi - r.lo + 1) AS bk, b.max_step AS step, b.max_value AS value
    FROM blocks b CROSS JOIN r
    UNION ALL
    SELECT -1, step, value FROM head
), picked AS (
    SELECT step, value, ROW_NUMBER() OVER (PARTITION BY bk ORDER BY value, step) AS rk FROM mins
    UNION ALL
    SELECT step, value, ROW_NUMBER() OVER (PARTITION BY bk ORDER BY value DESC, step) AS rk FROM maxes
)
SELECT step, value FROM picked WHERE rk = 1
UNION
SELECT b.last_step, b.last_value FROM blocks b CROSS JOIN r WHERE b.block = r.hi
ORDER BY 1
"""

# max_points=2 has no room for a bucket's min, max and the last point: the series' first and last point
# (what a client listing series names asks for).
ENDS_SQL = """
SELECT step, value FROM metrics WHERE job_id = :job_id AND name = :name AND step IN (
    (SELECT MIN(step) FROM metrics WHERE job_id = :job_id AND name = :name {since}),
    (SELECT MAX(step) FROM metrics WHERE job_id = :job_id AND name = :name {since})
) ORDER BY step
"""

SUMMARY_SQL = """
SELECT name, SUM(n) AS n, MIN(block) AS lo, MAX(block) AS hi
FROM metric_rollups WHERE job_id = :job_id {names} AND block >= :from_block GROUP BY name
"""


def raw_buckets(max_points: int) -> int:
    """Buckets of the row path: 2 points each plus the last point fit in max_points."""
    return (max_points - 1) // 2


def rollup_buckets(max_points: int) -> int:
    """Buckets of the rollup path: room is also left for the partial first block's 2 points."""
    return max(1, (max_points - 3) // 2)


def _first_full_block(since_step: int | None) -> int:
    if since_step is None:
        return INT32_MIN // ROLLUP_BLOCK_STEPS
    return -(-(since_step + 1) // ROLLUP_BLOCK_STEPS)  # ceil((since_step + 1) / block)


def _points(s: Session, sql: str, params: dict[str, object]) -> list[tuple[int, float]]:
    return [(int(step), float(value)) for step, value in s.execute(text(sql), params)]


def downsample(s: Session, job_id: int, names: Sequence[str] | None, since_step: int | None, max_points: int) -> Series:
    """Each series after since_step in at most max_points points: every bucket's min and max, and the last."""
    if max_points < MIN_POINTS:
        raise ValueError(f"max_points: at least {MIN_POINTS}")
    first_block = _first_full_block(since_step)
    head_block = first_block - 1 if since_step is not None else first_block
    summary = text(SUMMARY_SQL.format(names="AND name IN :names" if names else ""))
    params: dict[str, object] = {"job_id": job_id, "from_block": head_block}
    if names:
        summary = summary.bindparams(bindparam("names", expanding=True))
        params["names"] = list(names)
    by_rollup: list[str] = []
    by_rows: list[str] = []
    for name, n, lo, hi in s.execute(summary, params):
        span = int(hi) - max(int(lo), first_block) + 1
        long_enough = max_points > 2 and int(n) > max_points and span >= rollup_buckets(max_points)
        (by_rollup if long_enough else by_rows).append(name)
    out: Series = {}
    since = "AND step > :since" if since_step is not None else ""
    for name in by_rows:
        params = {"job_id": job_id, "name": name, "max_points": max_points, "nb": raw_buckets(max_points)}
        if since_step is not None:
            params["since"] = since_step
        sql = ENDS_SQL if max_points == 2 else RAW_SQL
        out[name] = _points(s, sql.format(since=since), params)
    for name in by_rollup:
        params = {
            "job_id": job_id,
            "name": name,
            "nb": rollup_buckets(max_points),
            "first_block": first_block,
            "since": since_step if since_step is not None else INT32_MIN,
        }
        out[name] = _points(s, ROLLUP_SQL.format(block_steps=ROLLUP_BLOCK_STEPS), params)
    return {name: pts for name, pts in sorted(out.items()) if pts}
