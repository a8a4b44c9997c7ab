"""metric_rollups maintenance: every metrics write updates the summaries of the blocks it touches.

A block is ROLLUP_BLOCK_STEPS consecutive steps of one series; its row keeps the point count and the min,
max and last points. The common write appends steps after a block's last one: the batch's own summary is
merged into the stored row, with no read of metric rows. A write that lands on or before a block's last
step (a resumed run rewriting steps with new values) recomputes that block from its rows, so the
summaries stay exact either way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import and_, delete, func, or_, select
from sqlalchemy.orm import Session

from store.models import ROLLUP_BLOCK_STEPS, Metric, MetricRollup
from store.upsert import upsert_rows

ROLLUP_COLUMNS = ("n", "min_step", "min_value", "max_step", "max_value", "last_step", "last_value")


@dataclass
class Summary:
    """One block's rollup row (plus the first step of the batch it came from, to detect appends)."""

    n: int
    min_step: int
    min_value: float
    max_step: int
    max_value: float
    last_step: int
    last_value: float
    first_step: int = 0

    @classmethod
    def of_point(cls, step: int, value: float) -> Summary:
        return cls(1, step, value, step, value, step, value, step)

    def add(self, step: int, value: float) -> None:
        """Fold one more point in (ties keep the earliest step, as the SQL does)."""
        self.n += 1
        if (value, step) < (self.min_value, self.min_step):
            self.min_step, self.min_value = step, value
        if (-value, step) < (-self.max_value, self.max_step):
            self.max_step, self.max_value = step, value
        if step > self.last_step:
            self.last_step, self.last_value = step, value
        self.first_step = min(self.first_step, step)

    def merged_after(self, older: Summary) -> Summary:
        """This batch appended after `older` (every step later than older.last_step)."""
        lo = min((older.min_value, older.min_step), (self.min_value, self.min_step))
        hi = min((-older.max_value, older.max_step), (-self.max_value, self.max_step))
        return Summary(older.n + self.n, lo[1], lo[0], hi[1], -hi[0], self.last_step, self.last_value)

    def row(self) -> dict[str, float | int]:
        return {c: getattr(self, c) for c in ROLLUP_COLUMNS}


def summarize(rows: Sequence[tuple[str, int, float]]) -> tuple[dict[tuple[str, int], Summary], bool]:
    """(name, block) -> the batch's summary, and whether some (name, step) occurs twice in the batch."""
    out: dict[tuple[str, int], Summary] = {}
    seen: set[tuple[str, int]] = set()
    for name, step, value in rows:
        seen.add((name, step))
        key = (name, step // ROLLUP_BLOCK_STEPS)
        if key in out:
            out[key].add(step, value)
        else:
            out[key] = Summary.of_point(step, value)
    return out, len(seen) != len(rows)


def update_rollups(s: Session, job_id: int, rows: Sequence[tuple[str, int, float]]) -> None:
    """Bring the rollups of the blocks a just-upserted batch touched up to date (the caller commits)."""
    if not rows:
        return
    batch, repeats = summarize(rows)
    ranges = touched_ranges((name, block * ROLLUP_BLOCK_STEPS) for name, block in batch)
    stored: dict[tuple[str, int], Summary] = {}
    if not repeats:
        columns = [getattr(MetricRollup, c) for c in ROLLUP_COLUMNS]
        q = select(MetricRollup.name, MetricRollup.block, *columns).where(
            MetricRollup.job_id == job_id,
            or_(*(and_(MetricRollup.name == n, MetricRollup.block.between(lo, hi)) for n, (lo, hi) in ranges.items())),
        )
        for name, block, *values in s.execute(q):  # plain rows: no ORM objects on the hot path
            stored[(name, block)] = Summary(*values)
    appended: list[dict[str, object]] = []
    rewritten: list[tuple[str, int]] = []
    for key, summary in batch.items():
        old = stored.get(key)
        if repeats or (old is not None and summary.first_step <= old.last_step):
            rewritten.append(key)
        else:
            merged = summary if old is None else summary.merged_after(old)
            appended.append({"job_id": job_id, "name": key[0], "block": key[1], **merged.row()})
    _upsert(s, appended)
    if rewritten:
        refresh_rollups(s, job_id, touched_ranges((name, block * ROLLUP_BLOCK_STEPS) for name, block in rewritten))


def _upsert(s: Session, params: list[dict[str, object]]) -> None:
    upsert_rows(s, MetricRollup.__table__, params, keys=("job_id", "name", "block"))


def touched_ranges(points: Iterable[tuple[str, int]]) -> dict[str, tuple[int, int]]:
    """Series name -> (first block, last block) written by a batch of (name, step)."""
    out: dict[str, tuple[int, int]] = {}
    for name, step in points:
        b = int(step) // ROLLUP_BLOCK_STEPS
        lo, hi = out.get(name, (b, b))
        out[name] = (min(lo, b), max(hi, b))
    return out


def refresh_rollups(s: Session, job_id: int, ranges: dict[str, tuple[int, int]]) -> None:
    """Recompute the rollup rows of these block ranges from the metric rows (the caller commits).

    Also the repair after metric rows are deleted: a block left empty keeps no row (it is deleted).
    """
    if not ranges:
        return
    s.execute(
        delete(MetricRollup)
        .where(
            MetricRollup.job_id == job_id,
            or_(*(and_(MetricRollup.name == n, MetricRollup.block.between(lo, hi)) for n, (lo, hi) in ranges.items())),
        )
        .execution_options(synchronize_session=False)
    )
    block = (Metric.step // ROLLUP_BLOCK_STEPS).label("block")
    part = (Metric.name, Metric.step // ROLLUP_BLOCK_STEPS)
    inner = (
        select(
            Metric.name,
            block,
            func.count().over(partition_by=part).label("n"),
            func.first_value(Metric.step)
            .over(partition_by=part, order_by=(Metric.value, Metric.step))
            .label("min_step"),
            func.first_value(Metric.value)
            .over(partition_by=part, order_by=(Metric.value, Metric.step))
            .label("min_value"),
            func.first_value(Metric.step)
            .over(partition_by=part, order_by=(Metric.value.desc(), Metric.step))
            .label("max_step"),
            func.first_value(Metric.value)
            .over(partition_by=part, order_by=(Metric.value.desc(), Metric.step))
            .label("max_value"),
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
    _upsert(s, [{"job_id": job_id, **r._mapping} for r in rows])


def refresh_after_delete(s: Session, job_id: int, after_step: int) -> None:
    """Repair a job's rollups after its metric rows above `after_step` were deleted (e.g. a resumed
    attempt dropping superseded points): every series' blocks from that step on are recomputed."""
    first = (after_step + 1) // ROLLUP_BLOCK_STEPS
    rows = s.execute(
        select(MetricRollup.name, func.max(MetricRollup.block))
        .where(MetricRollup.job_id == job_id, MetricRollup.block >= first)
        .group_by(MetricRollup.name)
    )
    refresh_rollups(s, job_id, {name: (first, last) for name, last in rows})


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
