"""free machines index: a scheduling pass's page of free machines without reading them all

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 15:05:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_FREE = "connected AND health = 'online' AND admin = 'active'"


def upgrade() -> None:
    op.create_index(
        "ix_machines_free", "machines", ["idle_since", "id"], unique=False,
        sqlite_where=sa.text(_FREE), postgresql_where=sa.text(_FREE),
    )


def downgrade() -> None:
    op.drop_index("ix_machines_free", table_name="machines")
