"""Scheduling (docs/scheduling.md): job priority, devices held, preemption bookkeeping, and per-token quotas.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_GROUP = re.compile(r"-g(\d+)$")


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("priority", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("gpus", sa.Integer(), nullable=False, server_default="1"))
        batch.add_column(sa.Column("preemptions", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("preempt_requested_by", sa.Integer(), nullable=True))
    op.create_index("ix_jobs_status_priority_id", "jobs", ["status", "priority", "id"])
    op.create_index("ix_jobs_owner_started_at", "jobs", ["owner", "started_at"])
    # Jobs of a device group (queue `<base>-gN`) hold N devices.
    conn = op.get_bind()
    for job_id, queue in conn.execute(sa.text("SELECT id, queue FROM jobs WHERE queue LIKE '%-g%'")).all():
        m = _GROUP.search(queue or "")
        if m:
            conn.execute(sa.text("UPDATE jobs SET gpus = :g WHERE id = :i"), {"g": int(m.group(1)), "i": job_id})
    with op.batch_alter_table("api_tokens") as batch:
        batch.add_column(sa.Column("max_running", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("max_gpus", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("max_priority", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_tokens") as batch:
        batch.drop_column("max_priority")
        batch.drop_column("max_gpus")
        batch.drop_column("max_running")
    op.drop_index("ix_jobs_owner_started_at", table_name="jobs")
    op.drop_index("ix_jobs_status_priority_id", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("preempt_requested_by")
        batch.drop_column("preemptions")
        batch.drop_column("gpus")
        batch.drop_column("priority")
