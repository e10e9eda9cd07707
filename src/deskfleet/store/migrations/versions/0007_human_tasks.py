"""human tasks: what only a person can do for a running attempt (push approvals, SMS codes),
and the outbox of their webhooks

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 05:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "human_tasks",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("run_id", sa.String(length=40), nullable=False),
        sa.Column("attempt_id", Id, nullable=False),
        sa.Column("machine_id", sa.String(length=128), nullable=False),
        sa.Column("pool", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("secret", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("screenshot_id", sa.String(length=40), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("due_at", sa.Float(), nullable=False),
        sa.Column("requested_due_at", sa.Float(), nullable=False),
        sa.Column("escalate_at", sa.Float(), nullable=True),
        sa.Column("escalated_at", sa.Float(), nullable=True),
        sa.Column("claimed_by", sa.String(length=200), nullable=True),
        sa.Column("claimed_at", sa.Float(), nullable=True),
        sa.Column("completed_by", sa.String(length=200), nullable=True),
        sa.Column("ended_at", sa.Float(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("response", sa.Text(), nullable=True),
        sa.Column("secret_response", sa.Text(), nullable=True),
        sa.Column("answered", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.CheckConstraint("state IN ('open', 'claimed', 'completed', 'expired', 'cancelled')",
                           name=op.f("ck_human_tasks_state")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_human_tasks")),
    )
    with op.batch_alter_table("human_tasks", schema=None) as batch_op:
        batch_op.create_index("ix_human_tasks_run", ["run_id"], unique=False)
        batch_op.create_index("ix_human_tasks_attempt", ["attempt_id"], unique=False)
        batch_op.create_index("ix_human_tasks_waiting", ["due_at"], unique=False,
                              sqlite_where=sa.text("state IN ('open', 'claimed')"),
                              postgresql_where=sa.text("state IN ('open', 'claimed')"))
        batch_op.create_index("ix_human_tasks_secret_held", ["attempt_id"], unique=False,
                              sqlite_where=sa.text("secret_response IS NOT NULL"),
                              postgresql_where=sa.text("secret_response IS NOT NULL"))

    op.create_table(
        "human_notices",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("task_id", sa.String(length=40), nullable=False),
        sa.Column("event", sa.String(length=64), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("tries", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("next_at", sa.Float(), nullable=False),
        sa.Column("delivered_at", sa.Float(), nullable=True),
        sa.Column("gave_up_at", sa.Float(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_human_notices")),
    )
    with op.batch_alter_table("human_notices", schema=None) as batch_op:
        batch_op.create_index("ix_human_notices_due", ["next_at"], unique=False,
                              sqlite_where=sa.text("delivered_at IS NULL AND gave_up_at IS NULL"),
                              postgresql_where=sa.text("delivered_at IS NULL AND gave_up_at IS NULL"))


def downgrade() -> None:
    op.drop_table("human_notices")
    op.drop_table("human_tasks")
