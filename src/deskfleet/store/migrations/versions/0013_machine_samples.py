"""machine samples: each machine's app memory and CPU over time, for the dashboard

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 09:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "machine_samples",
        sa.Column("machine_id", sa.String(length=128), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("memory_mb", sa.Float(), nullable=False),
        sa.Column("cpu_percent", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("machine_id", "at", name=op.f("pk_machine_samples")),
    )
    with op.batch_alter_table("machine_samples", schema=None) as batch_op:
        batch_op.create_index("ix_machine_samples_at", ["at"], unique=False)


def downgrade() -> None:
    op.drop_table("machine_samples")
