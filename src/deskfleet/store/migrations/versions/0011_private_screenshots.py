"""private screenshots: artifacts encrypted at rest, what was redacted, and what their
retention goes by (the machine's pool, the automation's own retention)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-08 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Added columns only: SQLite adds them in place (no table rebuild of a table of blobs).
    # Rows stored before keep encrypted_with NULL: plain, still served as they are, and
    # encrypted by the next `deskfleet keys rotate`.
    with op.batch_alter_table("artifacts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("encrypted_with", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("redaction", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("pool", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("retention", sa.Float(), nullable=True))
        batch_op.create_index("ix_artifacts_created", ["created_at"], unique=False)
        batch_op.create_index("ix_artifacts_pool_created", ["pool", "created_at"], unique=False)
        batch_op.create_index("ix_artifacts_retention_created", ["retention", "created_at"], unique=False)
    # Earlier artifacts belong to their machine's pool, so that its retention applies to them.
    op.execute("UPDATE artifacts SET pool = (SELECT machines.pool FROM machines "
               "WHERE machines.id = artifacts.machine_id) WHERE pool IS NULL")


def downgrade() -> None:
    with op.batch_alter_table("artifacts", schema=None) as batch_op:
        batch_op.drop_index("ix_artifacts_retention_created")
        batch_op.drop_index("ix_artifacts_pool_created")
        batch_op.drop_index("ix_artifacts_created")
        batch_op.drop_column("retention")
        batch_op.drop_column("pool")
        batch_op.drop_column("redaction")
        batch_op.drop_column("encrypted_with")
