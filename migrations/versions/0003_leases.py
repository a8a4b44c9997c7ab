"""Leases: the worker that runs a job holds it until lease_expires_at; attempts record their resume step.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_index("ix_jobs_status_lease_expires_at", ["status", "lease_expires_at"])
    with op.batch_alter_table("attempts") as batch:
        batch.add_column(sa.Column("resumed_from_step", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("attempts") as batch:
        batch.drop_column("resumed_from_step")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_status_lease_expires_at")
        batch.drop_column("lease_expires_at")
