"""pool policies: a versioned policy per pool (min, max, schedule floors, warm buffer, scale-in)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 02:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pool_policies",
        sa.Column("pool", sa.String(128), sa.ForeignKey("pools.name", ondelete="CASCADE"), primary_key=True),
        sa.Column("version", sa.Integer(), primary_key=True),
        sa.Column("policy", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("comment", sa.Text(), nullable=False, server_default=""),
        sa.CheckConstraint("version >= 1", name="ck_pool_policies_version"),
    )


def downgrade() -> None:
    op.drop_table("pool_policies")
