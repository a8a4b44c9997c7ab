"""Sweeps: job kind 'sweep', the terminal status 'pruned', and the sweep_trials table (docs/sweeps.md).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KINDS = ("train", "distill", "evaluate", "study")
STATUSES = ("waiting", "queued", "running", "succeeded", "failed", "canceled")


def _in(values: Sequence[str]) -> str:
    return ", ".join(f"'{v}'" for v in values)


def _constraints(kinds: Sequence[str], statuses: Sequence[str]) -> None:
    """Replace the jobs table's kind and status checks (SQLite: batch mode copies the table)."""
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(op.f("ck_jobs_kind"), type_="check")
        batch.drop_constraint(op.f("ck_jobs_status"), type_="check")
        batch.create_check_constraint("kind", f"kind IN ({_in(kinds)})")
        batch.create_check_constraint("status", f"status IN ({_in(statuses)})")


def upgrade() -> None:
    _constraints((*KINDS, "sweep"), (*STATUSES, "pruned"))
    op.create_table(
        "sweep_trials",
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("sweep_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("system_attrs", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_sweep_trials_job_id_jobs"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(
            ["sweep_id"], ["jobs.id"], name=op.f("fk_sweep_trials_sweep_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_sweep_trials")),
        sa.UniqueConstraint("sweep_id", "number", name=op.f("uq_sweep_trials_sweep_id_number")),
    )
    op.create_index(op.f("ix_sweep_trials_sweep_id"), "sweep_trials", ["sweep_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_sweep_trials_sweep_id"), table_name="sweep_trials")
    op.drop_table("sweep_trials")
    op.execute("DELETE FROM jobs WHERE kind = 'sweep'")  # their trials go with them (ON DELETE CASCADE)
    op.execute("UPDATE jobs SET status = 'canceled' WHERE status = 'pruned'")
    _constraints(KINDS, STATUSES)
