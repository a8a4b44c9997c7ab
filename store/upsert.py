"""Batched upserts: `INSERT ... ON CONFLICT (key) DO UPDATE`, one statement per batch on PostgreSQL.

Why: a worker flushes ~240 metric points a second per job. Sent as an executemany, PostgreSQL runs one
INSERT per row and SQLAlchemy processes every row's parameters in Python; sent as columns of arrays
through `unnest`, it is one statement and one parameter per column: a 240-point flush with its rollups
took 25 ms, now 13 ms, and benchmarks/ingest_load.py stores 23.6k instead of 20.5k of 24k offered points/s
(benchmarks/results/scale-quiet-2026-12-01). SQLite keeps the executemany, which costs it nothing extra.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Table, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session


def dialect_insert(s: Session, table: Any) -> Any:
    """The dialect's INSERT (both support ON CONFLICT ... DO UPDATE)."""
    name = s.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"upserts are implemented for sqlite and postgresql, not {name}")


def upsert_rows(s: Session, table: Table, rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> None:
    """Insert `rows` (dicts with the same columns), replacing the non-key columns of rows whose `keys` exist
    (the caller commits)."""
    if not rows:
        return
    # One statement may not touch a row twice (PostgreSQL refuses it); the last write of a key wins, as it
    # does when the rows are upserted one by one.
    rows = list({tuple(r[k] for k in keys): r for r in rows}.values())
    columns = list(rows[0])
    updates = [c for c in columns if c not in keys]
    if s.get_bind().dialect.name != "postgresql":
        ins = dialect_insert(s, table)
        s.execute(
            ins.on_conflict_do_update(index_elements=list(keys), set_={c: ins.excluded[c] for c in updates}), rows
        )
        return
    dialect = postgresql.dialect()
    arrays = ", ".join(f"CAST(:{c} AS {table.c[c].type.compile(dialect=dialect)}[])" for c in columns)
    sql = (
        f"INSERT INTO {table.name} ({', '.join(columns)}) SELECT * FROM unnest({arrays}) "
        f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in updates)}"
    )
    s.execute(text(sql), {c: [r[c] for r in rows] for c in columns})
