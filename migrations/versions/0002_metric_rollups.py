"""metric_rollups: per-block summaries (count, min, max and last point) for downsampling long series in SQL.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BLOCK_STEPS = 128  # store.models.ROLLUP_BLOCK_STEPS at this revision

# Existing series are summarised once, with the same rule store.rollups applies on every write.
BACKFILL = f"""
INSERT INTO metric_rollups (job_id, name, block, n, min_step, min_value, max_step, max_value, last_step, last_value)
SELECT job_id, name, block, n, min_step, min_value, max_step, max_value, last_step, last_value FROM (
    SELECT job_id, name, step / {BLOCK_STEPS} AS block,
           COUNT(*) OVER w AS n,
           FIRST_VALUE(step) OVER (w ORDER BY value, step) AS min_step,
           FIRST_VALUE(value) OVER (w ORDER BY value, step) AS min_value,
           FIRST_VALUE(step) OVER (w ORDER BY value DESC, step) AS max_step,
           FIRST_VALUE(value) OVER (w ORDER BY value DESC, step) AS max_value,
           FIRST_VALUE(step) OVER (w ORDER BY step DESC) AS last_step,
           FIRST_VALUE(value) OVER (w ORDER BY step DESC) AS last_value,
           ROW_NUMBER() OVER (w ORDER BY step) AS rn
    FROM metrics
    WINDOW w AS (PARTITION BY job_id, name, step / {BLOCK_STEPS})
) AS blocks WHERE rn = 1
"""


def upgrade() -> None:
    op.create_table(
        "metric_rollups",
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("block", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("min_step", sa.Integer(), nullable=False),
        sa.Column("min_value", sa.Float(), nullable=False),
        sa.Column("max_step", sa.Integer(), nullable=False),
        sa.Column("max_value", sa.Float(), nullable=False),
        sa.Column("last_step", sa.Integer(), nullable=False),
        sa.Column("last_value", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_metric_rollups_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", "name", "block", name=op.f("pk_metric_rollups")),
    )
    op.execute(BACKFILL)


def downgrade() -> None:
    op.drop_table("metric_rollups")
