"""due runs indexes: a scheduling pass's page of queued runs, in its order, without sorting them all

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 17:20:00

``ix_runs_queue`` (priority, created_at) did not match the pass's order (priority, then runs
with a deadline first, then age), so every pass read and sorted every queued run. The new
indexes are in that order, over all queued runs and per automation.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_QUEUED = sa.text("state = 'queued'")
_ORDER: list[str | sa.TextClause] = [sa.text("priority DESC"), sa.text("(deadline_at IS NULL)"), "deadline_at", "created_at"]


def upgrade() -> None:
    op.drop_index("ix_runs_queue", table_name="runs")
    op.create_index("ix_runs_due", "runs", _ORDER, sqlite_where=_QUEUED, postgresql_where=_QUEUED)
    op.create_index("ix_runs_due_automation", "runs", ["automation", *_ORDER],
                    sqlite_where=_QUEUED, postgresql_where=_QUEUED)


def downgrade() -> None:
    op.drop_index("ix_runs_due_automation", table_name="runs")
    op.drop_index("ix_runs_due", table_name="runs")
    op.create_index("ix_runs_queue", "runs", ["priority", "created_at"], sqlite_where=_QUEUED,
                    postgresql_where=_QUEUED)
