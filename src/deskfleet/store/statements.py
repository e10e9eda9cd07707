"""The store's hot-path statements, written as SQL — once where SQLite and PostgreSQL agree,
once for each where they differ.

They differ in locking and in types, not in shape:

- row locks: PostgreSQL serves several replicas at once, so a write reads what it will
  change ``FOR UPDATE`` (run, then attempt, then machine: one order for every writer) and a
  scheduling pass takes queued runs ``FOR UPDATE SKIP LOCKED`` (what another replica is
  claiming is not ours to wait for). SQLite has no such clause and needs none: one writer at
  a time, and what a write transaction read stays as read until it commits.
- JSON: a text parameter for a JSON column is cast on PostgreSQL (``CAST(:x AS JSON)``) when
  the statement is sent as SQL text; SQLite keeps JSON as text.

Parameters are named (``:id``); ``store.driver`` turns each statement into its driver's own
parameter style through SQLAlchemy, once, and runs it on the connection of the store's
transaction. Select lists name every column of their table (``columns``), so rows map by
name onto ``store.rows``.
"""

from __future__ import annotations

import functools
from typing import ClassVar

from sqlalchemy import Table, TextClause, text

from ..models import Run
from .schema import attempts, machines, pools, runs


def columns(table: Table, prefix: str = "") -> str:
    """Every column of ``table``, for a SELECT list."""
    return ", ".join(f"{prefix}{c.name}" for c in table.columns)


_RUNS, _ATTEMPTS, _MACHINES = columns(runs), columns(attempts), columns(machines, "m.")
#: a queued run that may start now, in the order a scheduling pass takes them: priority,
#: then deadline (runs with one first), then age
_DUE = "state = 'queued' AND (not_before IS NULL OR not_before <= :now)"
_PASS_ORDER = "ORDER BY priority DESC, deadline_at IS NULL, deadline_at, created_at"


def pass_order(run: Run) -> tuple[int, bool, float, float]:
    """``_PASS_ORDER`` as a sort key, for runs read by more than one statement."""
    return -run.priority, run.deadline_at is None, run.deadline_at or 0.0, run.created_at


#: queued runs in the pass's order: all of them (``ix_runs_due``), or one automation's
#: (``ix_runs_due_automation``); ``{index}`` is SQLite's ``INDEXED BY`` clause (its planner
#: would take ``ix_runs_state`` and sort every queued run otherwise) or nothing
_QUEUED = f"SELECT {_RUNS} FROM runs{{index}} WHERE {_DUE} {_PASS_ORDER} LIMIT :limit"
_QUEUED_OF = (f"SELECT {_RUNS} FROM runs{{index}} WHERE automation = :automation AND {_DUE} {_PASS_ORDER}"
              " LIMIT :limit OFFSET :offset")
#: the automations with queued runs, one index probe each (a loose index scan, not a read of
#: every queued run)
_QUEUED_AUTOMATIONS = (
    "WITH RECURSIVE a(name) AS ("
    " SELECT MIN(automation) FROM runs{index} WHERE state = 'queued'"
    " UNION ALL SELECT (SELECT MIN(automation) FROM runs{index} WHERE state = 'queued' AND automation > a.name)"
    " FROM a WHERE a.name IS NOT NULL)"
    " SELECT name FROM a WHERE name IS NOT NULL"
)


class Statements:
    """What both dialects say alike; each subclass adds its own locking reads and casts."""

    RUN = text(f"SELECT {_RUNS} FROM runs WHERE id = :id")
    ATTEMPT = text(f"SELECT {_ATTEMPTS} FROM attempts WHERE id = :id")
    POOL_EXISTS = text("SELECT 1 FROM pools WHERE name = :name")
    RUN_BY_KEY = text(f"SELECT {_RUNS} FROM runs WHERE tenant = :tenant AND idempotency_key = :key")
    POOLS = text(f"SELECT {columns(pools)} FROM pools")
    #: a heartbeat renews its attempt's lease while the attempt is active on that machine
    RENEW_LEASE = text(
        "UPDATE attempts SET lease_expires_at = :expires"
        " WHERE id = :id AND machine_id = :machine AND state = 'active'"
    )

    # -- the dialect's own ---------------------------------------------------------------
    #: the run (attempt), locked until the transaction ends
    LOCK_RUN: ClassVar[TextClause]
    LOCK_ATTEMPT: ClassVar[TextClause]
    #: a scheduling pass's queued runs (the first ``:limit``), claimed for this transaction
    QUEUED: ClassVar[TextClause]
    #: the same, of one ``:automation``
    QUEUED_OF: ClassVar[TextClause]
    #: the names of the automations that have queued runs
    QUEUED_AUTOMATIONS: ClassVar[TextClause]
    #: a machine's heartbeat; ``:resources`` is JSON text
    BEAT: ClassVar[TextClause]

    @staticmethod
    @functools.cache
    def free_machines(*, replica: bool, order: str | None, paged: bool, if_queued: bool = False) -> TextClause:
        """Machines that could take work now (``Machine.schedulable``, in SQL) — of
        ``:replica`` if ``replica`` — in a selector's ``order`` (``idle_first``,
        ``recent_first``, or by id); the first ``:limit`` if ``paged``; with ``if_queued``,
        none unless a run is queued that may start at ``:now`` (a condition of its own,
        which the database answers once, first, and which ends the read if false)."""
        sql = (
            f"SELECT {_MACHINES}, NULL AS active_attempt_id, NULL AS active_run_id FROM machines m"
            " WHERE m.connected AND m.health = 'online' AND m.admin = 'active'"
            " AND NOT EXISTS (SELECT 1 FROM attempts a WHERE a.machine_id = m.id AND a.state = 'active')"
        )
        if if_queued:
            sql += f" AND EXISTS (SELECT 1 FROM runs WHERE {_DUE})"
        if replica:
            sql += " AND m.replica = :replica"
        sql += {
            "idle_first": " ORDER BY m.idle_since ASC NULLS FIRST, m.id",
            "recent_first": " ORDER BY m.idle_since DESC NULLS LAST, m.id",
            None: " ORDER BY m.id",
        }[order]
        if paged:
            sql += " LIMIT :limit"
        return text(sql)


class SQLiteStatements(Statements):
    # One writer at a time: a read in a write transaction is as good as a lock.
    LOCK_RUN = Statements.RUN
    LOCK_ATTEMPT = Statements.ATTEMPT
    QUEUED = text(_QUEUED.format(index=" INDEXED BY ix_runs_due"))
    QUEUED_OF = text(_QUEUED_OF.format(index=" INDEXED BY ix_runs_due_automation"))
    QUEUED_AUTOMATIONS = text(_QUEUED_AUTOMATIONS.format(index=" INDEXED BY ix_runs_due_automation"))
    BEAT = text(
        "UPDATE machines SET last_heartbeat_at = :at, resources = :resources,"
        " session_key = :session_key, session_expires_at = :session_expires_at WHERE id = :id"
    )


class PostgreSQLStatements(Statements):
    LOCK_RUN = text(f"SELECT {_RUNS} FROM runs WHERE id = :id FOR UPDATE")
    LOCK_ATTEMPT = text(f"SELECT {_ATTEMPTS} FROM attempts WHERE id = :id FOR UPDATE")
    # Several attempts' rows locked at once, in the order every writer takes them: runs (by
    # id), then attempts (by machine, as heartbeats renew them), then machines (by id) — each
    # statement locks its rows in its ORDER BY. A transaction that writes for many attempts
    # (a group commit, a sweep) and took them one after another would hold some while
    # waiting for others: a deadlock with a heartbeat or another replica's batch.
    LOCK_RUNS_OF = text(
        f"SELECT {_RUNS} FROM runs WHERE id IN (SELECT run_id FROM attempts WHERE id = ANY(:ids))"
        " ORDER BY id FOR UPDATE"
    )
    LOCK_ATTEMPTS = text(f"SELECT {_ATTEMPTS} FROM attempts WHERE id = ANY(:ids) ORDER BY machine_id, id FOR UPDATE")
    #: every active attempt (then every connected machine), for a write to all of them at once
    LOCK_ACTIVE_ATTEMPTS = text("SELECT id FROM attempts WHERE state = 'active' ORDER BY machine_id, id FOR UPDATE")
    LOCK_CONNECTED_MACHINES = text("SELECT id FROM machines WHERE connected ORDER BY id FOR UPDATE")
    LOCK_MACHINES_OF = text(
        "SELECT id FROM machines WHERE id IN (SELECT machine_id FROM attempts WHERE id = ANY(:ids))"
        " ORDER BY id FOR UPDATE"
    )
    QUEUED = text(_QUEUED.format(index="") + " FOR UPDATE SKIP LOCKED")
    QUEUED_OF = text(_QUEUED_OF.format(index="") + " FOR UPDATE SKIP LOCKED")
    #: a scheduling pass's new attempts, one row per element of the arrays, in one statement;
    #: a row the one-active-attempt constraint refuses is left out (the runs of those inserted
    #: come back with their ids)
    INSERT_ATTEMPTS = text(
        "INSERT INTO attempts (run_id, machine_id, number, state, phase, mode, assigned_at, lease_expires_at)"
        " SELECT r, m, n, 'active', 'assigned', mode, at, expires"
        " FROM unnest(CAST(:runs AS VARCHAR[]), CAST(:machines AS VARCHAR[]), CAST(:numbers AS INTEGER[]),"
        " CAST(:modes AS VARCHAR[]), CAST(:at AS DOUBLE PRECISION[]), CAST(:expires AS DOUBLE PRECISION[]))"
        " AS u(r, m, n, mode, at, expires)"
        " ON CONFLICT DO NOTHING RETURNING id, run_id"
    )
    #: a transaction's events, one row per element of the arrays, in one statement, in order
    #: (``:data``: JSON text)
    INSERT_EVENTS = text(
        "INSERT INTO events (at, kind, run_id, attempt_id, machine_id, from_state, to_state, reason, data)"
        " SELECT at, kind, run_id, attempt_id, machine_id, from_state, to_state, reason, data"
        " FROM unnest(CAST(:at AS DOUBLE PRECISION[]), CAST(:kind AS VARCHAR[]), CAST(:run_id AS VARCHAR[]),"
        " CAST(:attempt_id AS BIGINT[]), CAST(:machine_id AS VARCHAR[]), CAST(:from_state AS VARCHAR[]),"
        " CAST(:to_state AS VARCHAR[]), CAST(:reason AS TEXT[]), CAST(:data AS JSON[]))"
        " WITH ORDINALITY AS u(at, kind, run_id, attempt_id, machine_id, from_state, to_state, reason, data, n)"
        " ORDER BY n"
    )
    #: machines ``:ids`` that no other writer holds, locked; in the one order of every writer
    LOCK_FREE_MACHINES = text("SELECT id FROM machines WHERE id = ANY(:ids) ORDER BY id FOR UPDATE SKIP LOCKED")
    #: machines ``:ids`` with the attempt that holds each one's lease, if any
    MACHINES_OF = text(
        f"SELECT {_MACHINES}, a.id AS active_attempt_id, a.run_id AS active_run_id FROM machines m"
        " LEFT OUTER JOIN attempts a ON a.machine_id = m.id AND a.state = 'active' WHERE m.id = ANY(:ids)"
    )
    QUEUED_AUTOMATIONS = text(_QUEUED_AUTOMATIONS.format(index=""))
    BEAT = text(
        "UPDATE machines SET last_heartbeat_at = :at, resources = CAST(:resources AS JSON),"
        " session_key = :session_key, session_expires_at = :session_expires_at WHERE id = :id"
    )


def for_dialect(name: str) -> type[Statements]:
    """The statements of a SQLAlchemy dialect (``engine.dialect.name``)."""
    found = {"sqlite": SQLiteStatements, "postgresql": PostgreSQLStatements}.get(name)
    if found is None:
        raise ValueError(f"no statements for the {name!r} dialect")
    return found


__all__ = ["PostgreSQLStatements", "SQLiteStatements", "Statements", "columns", "for_dialect"]
