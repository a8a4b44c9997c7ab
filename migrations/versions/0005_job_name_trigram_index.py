"""A trigram index on jobs.name, so `GET /jobs?search=` (name contains, any case) is an index scan on
PostgreSQL (pg_trgm, in PostgreSQL's contrib); on SQLite it is a plain index the planner may ignore.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    op.create_index(
        "ix_jobs_name_trgm", "jobs", ["name"], postgresql_using="gin", postgresql_ops={"name": "gin_trgm_ops"}
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_name_trgm", table_name="jobs")
