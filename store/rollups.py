"""metric_rollups maintenance: after each metrics write, the touched blocks are recomputed from their rows.

A block is ROLLUP_BLOCK_STEPS consecutive steps of one series; its row keeps the point count and the min,
max and last points. Recomputing (instead of merging) keeps it exact when a resumed run rewrites steps
with new values; it reads at most one block of rows per series in the batch, all from the batch's pages.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from store.models import ROLLUP_BLOCK_STEPS, Metric, MetricRollup

ROLLUP_COLUMNS = ("n", "min_step", "min_value", "max_step", "max_value", "last_step", "last_value")


def touched_ranges(points: Iterable[tuple[str, int]]) -> dict[str, tuple[int, int]]:
    """Series name -> (first block, last block) written by a batch of (name, step)."""
    out: dict[str, tuple[int, int]] = {}
    for name, step in points:
        b = int(step) // ROLLUP_BLOCK_STEPS
        lo, hi = out.get(name, (b, b))
        out[name] = (min(lo, b), max(hi, b))
    return out


def refresh_rollups(s: Session, job_id: int, ranges: dict[str, tuple[int, int]]) -> None:
    """Recompute the rollup rows of these block ranges in the current transaction (the caller commits)."""
    if not ranges:
        return
    from store.results import dialect_insert  # results imports this module

    block = (Metric.step // ROLLUP_BLOCK_STEPS).label("block")
    part = (Metric.name, Metric.step // ROLLUP_BLOCK_STEPS)
    inner = (
        select(
            Metric.name,
            block,
            func.count().over(partition_by=part).label("n"),
            func.first_value(Metric.step).over(partition_by=part, order_by=(Metric.value, Metric.step)).label(
                "min_step"
            ),
            func.first_value(Metric.value).over(partition_by=part, order_by=(Metric.value, Metric.step)).label(
                "min_value"
            ),
            func.first_value(Metric.step).over(partition_by=part, order_by=(Metric.value.desc(), Metric.step)).label(
                "max_step"
            ),
            func.first_value(Metric.value).over(partition_by=part, order_by=(Metric.value.desc(), Metric.step)).label(
                "max_value"
            ),
            func.first_value(Metric.step).over(partition_by=part, order_by=Metric.step.desc()).label("last_step"),
            func.first_value(Metric.value).over(partition_by=part, order_by=Metric.step.desc()).label("last_value"),
            func.row_number().over(partition_by=part, order_by=Metric.step).label("rn"),
        )
        .where(
            Metric.job_id == job_id,
            or_(
                *(
                    and_(
                        Metric.name == name,
                        Metric.step >= lo * ROLLUP_BLOCK_STEPS,
                        Metric.step < (hi + 1) * ROLLUP_BLOCK_STEPS,
                    )
                    for name, (lo, hi) in ranges.items()
                )
            ),
        )
        .subquery()
    )
    rows = s.execute(select(inner.c.name, inner.c.block, *(inner.c[c] for c in ROLLUP_COLUMNS)).where(inner.c.rn == 1))
    params = [{"job_id": job_id, **r._mapping} for r in rows]
    if not params:
        return
    ins = dialect_insert(s, MetricRollup)
    stmt = ins.on_conflict_do_update(
        index_elements=[MetricRollup.job_id, MetricRollup.name, MetricRollup.block],
        set_={c: ins.excluded[c] for c in ROLLUP_COLUMNS},
    )
    s.execute(stmt, params)


# The same summaries for every series of a range of jobs in one statement (bulk loads, benchmarks);
# `{where}` filters metrics rows, e.g. "job_id BETWEEN :lo AND :hi". PostgreSQL and SQLite alike.
REBUILD_SQL = f"""
INSERT INTO metric_rollups (job_id, name, block, n, min_step, min_value, max_step, max_value, last_step, last_value)
SELECT job_id, name, block, n, min_step, min_value, max_step, max_value, last_step, last_value FROM (
    SELECT job_id, name, step / {ROLLUP_BLOCK_STEPS} AS block,
           COUNT(*) OVER w AS n,
           FIRST_VALUE(step) OVER (w ORDER BY value, step) AS min_step,
           FIRST_VALUE(value) OVER (w ORDER BY value, step) AS min_value,
           FIRST_VALUE(step) OVER (w ORDER BY value DESC, step) AS max_step,
           FIRST_VALUE(value) OVER (w ORDER BY value DESC, step) AS max_value,
           FIRST_VALUE(step) OVER (w ORDER BY step DESC) AS last_step,
           FIRST_VALUE(value) OVER (w ORDER BY step DESC) AS last_value,
           ROW_NUMBER() OVER (w ORDER BY step) AS rn
    FROM metrics WHERE {{where}}
    WINDOW w AS (PARTITION BY job_id, name, step / {ROLLUP_BLOCK_STEPS})
) AS blocks WHERE rn = 1
"""
