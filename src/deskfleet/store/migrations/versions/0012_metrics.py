"""metrics: the fleet's counters and histogram buckets kept by the store (``metric_counts``),
and the trace context of each run's submit (``runs.traceparent``)

Counters start at zero with this migration: the runs that ended before it are not counted
(Prometheus takes a counter that starts afresh as a reset).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-08 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "metric_counts",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("labels", sa.String(1000), primary_key=True),
        sa.Column("shard", sa.Integer(), primary_key=True),
        sa.Column("value", sa.Float(), nullable=False),
    )
    op.add_column("runs", sa.Column("traceparent", sa.String(64)))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("traceparent")
    op.drop_table("metric_counts")
