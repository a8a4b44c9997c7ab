"""Pages of GET /jobs that stay flat at a million jobs: keyset cursors and a total that never scans the table.

The cursor is an opaque token naming the last job of a page; the next page is `id < that` on the same
(filter, id) index, as cheap at page 10,000 as at page 1, and never repeats or skips a job while new ones
arrive. The total is exact up to EXACT_TOTAL_LIMIT (a count bounded by LIMIT); beyond it PostgreSQL's
planner estimate is returned and marked as one. SQLite, the small embedded mode, always counts exactly.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from icd_core.spec import INT32_MAX
from store.jobs import _filters, list_jobs
from store.models import Job

EXACT_TOTAL_LIMIT = 10_000


class BadCursor(ValueError):
    """The cursor is not one this service produced (the API answers 422 naming `cursor`)."""


@dataclass(frozen=True)
class JobPage:
    items: list[Job]
    next_cursor: str | None
    total: int
    total_is_estimate: bool


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"before": last_id}).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        before = data["before"]
    except (binascii.Error, ValueError, TypeError, KeyError) as exc:
        raise BadCursor("cursor: not a cursor from this API; pass next_cursor of the previous page") from exc
    if (
        not isinstance(before, int) or isinstance(before, bool) or not 0 < before <= INT32_MAX + 1
    ):  # just past the last int32 id
        raise BadCursor("cursor: not a cursor from this API; pass next_cursor of the previous page")
    return before


def count_total(
    s: Session,
    status: str | Iterable[str] | None = None,
    kind: str | None = None,
    name: str | None = None,
    parent_id: int | None = None,
    search: str | None = None,
    owner: str | None = None,
) -> tuple[int, bool]:
    """(total, is_estimate): exact below EXACT_TOTAL_LIMIT, PostgreSQL's row estimate above it."""
    conds = _filters(status, kind, name, parent_id, search, owner)
    bounded = select(Job.id).where(*conds)
    if s.get_bind().dialect.name != "postgresql":
        return int(s.scalar(select(func.count()).select_from(bounded.subquery())) or 0), False
    n = int(s.scalar(select(func.count()).select_from(bounded.limit(EXACT_TOTAL_LIMIT + 1).subquery())) or 0)
    if n <= EXACT_TOTAL_LIMIT:
        return n, False
    return max(planner_rows(s, bounded), EXACT_TOTAL_LIMIT + 1), True


def planner_rows(s: Session, query: object) -> int:
    """PostgreSQL's estimate of the rows a query returns (EXPLAIN, nothing executed)."""
    compiled = query.compile(dialect=s.get_bind().dialect, compile_kwargs={"literal_binds": True})  # type: ignore[attr-defined]
    plan = s.execute(text(f"EXPLAIN (FORMAT JSON) {compiled}")).scalar_one()
    if isinstance(plan, str):
        plan = json.loads(plan)
    return int(plan[0]["Plan"]["Plan Rows"])


def page_jobs(
    s: Session,
    status: str | Iterable[str] | None = None,
    kind: str | None = None,
    name: str | None = None,
    parent_id: int | None = None,
    limit: int = 50,
    offset: int = 0,
    cursor: str | None = None,
    search: str | None = None,
    owner: str | None = None,
    by_priority: bool = False,
) -> JobPage:
    """One page newest first, by cursor (preferred) or offset, with the cursor of the next page; `owner`
    None: every owner's jobs. `by_priority`: highest priority first, oldest first within one, by offset
    (the claim order within a queue, without the owner turns)."""
    if by_priority:
        rows = list_jobs(
            s, status, kind, name, parent_id, limit=limit, offset=offset, search=search, owner=owner, by_priority=True
        )
        total, estimated = count_total(s, status, kind, name, parent_id, search, owner)
        return JobPage(rows, None, total, estimated)
    before = decode_cursor(cursor) if cursor else None
    rows = list_jobs(
        s,
        status,
        kind,
        name,
        parent_id,
        limit=limit + 1,
        offset=offset,
        search=search,
        before_id=before,
        owner=owner,
    )
    items = rows[:limit]
    next_cursor = encode_cursor(items[-1].id) if len(rows) > limit else None
    total, estimated = count_total(s, status, kind, name, parent_id, search, owner)
    return JobPage(items, next_cursor, total, estimated)
