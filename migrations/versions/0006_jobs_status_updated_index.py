"""An index on jobs (status, updated_at): the reaper's "queued and untouched for N s" scan (unservable
jobs) reads only the rows it fails, not every queued job, on each pass (every 2 s, API and workers).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_jobs_status_updated_at", "jobs", ["status", "updated_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_status_updated_at", table_name="jobs")
