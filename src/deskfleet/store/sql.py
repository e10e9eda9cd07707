"""The SQL implementation of the store (SQLAlchemy Core), shared by SQLite and PostgreSQL.

Each operation is one transaction. Decisions about runs come from ``statemachine``; this
module only applies them atomically and records the events. Dialect differences are not
made here: how a write transaction begins and how migrations run are in the engine factories
(``store.sqlite``, ``store.postgres``); the hot path's statements, with their row locks, are
written for each dialect in ``store.statements``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any, TypeVar

import orjson
from sqlalchemy import (
    Connection,
    Engine,
    Text,
    and_,
    bindparam,
    case,
    cast,
    delete,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.sql import Select

from .. import ids
from ..errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    StaleLease,
    Stopped,
    StoreRetry,
    StoreUnavailable,
)
from ..models import (
    Assignment,
    Attempt,
    AttemptMode,
    AttemptPhase,
    AttemptState,
    AutomationSpec,
    Ending,
    Event,
    Machine,
    MachineAdmin,
    MachineHealth,
    MachineShape,
    Pool,
    Run,
    RunSpec,
    RunState,
    StopOrder,
    StopReason,
    VaultAccount,
    version_key,
)
from ..pools import PoolPolicy
from ..scheduler import AccountBook, DurationBook, Policy, eligible
from ..statemachine import can_transition, decide, overdue_reason, quarantines, queued_expiry
from . import rows
from .access import AccessOps
from .accounts import AccountOps
from .artifacts import ArtifactOps
from .base import ConnectResult, Finished, Heartbeat, Store, SweepResult
from .driver import Driver, Raw, send_before_statements
from .human import HumanOps
from .keys import KeyOps
from .maintenance import MaintenanceOps
from .metrics import COUNTS, RUNS_SUBMITTED, MetricOps
from .packs import PackOps
from .pools import PoolOps
from .schema import (
    attempts,
    automations,
    events,
    machine_samples,
    machines,
    pools,
    replicas,
    runs,
    webhooks,
)
from .statements import PostgreSQLStatements as PG
from .statements import for_dialect, pass_order

log = logging.getLogger(__name__)
T = TypeVar("T")

WEBHOOK_MAX_TRIES = 12

# Statements on the hot path, built once: building a statement costs more than running it.
_SELECT_ATTEMPT = select(attempts).where(attempts.c.id == bindparam("id"))
# Write paths lock rows in one order — run, then attempt, then machine — so that replicas
# writing at once wait for each other instead of deadlocking. (SQLite ignores FOR UPDATE:
# it has one writer at a time anyway.)
_LOCK_RUN = select(runs).where(runs.c.id == bindparam("id")).with_for_update()
_LOCK_ATTEMPT = select(attempts).where(attempts.c.id == bindparam("id")).with_for_update()
_INSERT_EVENT = events.insert()


class _SubmitBatch:
    """What a batch of submits shares in its transaction: the pools found, and the rows of
    runs without an idempotency key, not inserted yet (one ``executemany`` for them all)."""

    def __init__(self) -> None:
        self.pools: set[str] = set()
        self.rows: list[dict[str, Any]] = []

    def flush(self, drv: Driver, conn: Connection) -> None:
        if self.rows:
            drv.insert_many(conn, runs, self.rows)
            self.rows = []


class Claims(list[Assignment]):
    """What a scheduling pass claimed; ``unclaimed`` counts the queued runs it held locked
    and did not take (another replica's machines may fit them: worth a wake hint)."""

    unclaimed: int = 0


def _retryable(exc: DBAPIError) -> bool:
    """A deadlock, a serialization failure, a lock wait that timed out, or a row another
    writer created first (two replicas enrolling into one new pool): the whole operation may
    simply run again — the second time it finds the row and takes the update path."""
    state = str(getattr(exc.orig, "sqlstate", "") or "")
    return state.startswith("40") or state in ("55P03", "23505")


def _first_line(exc: object) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _build_machines_query() -> Select[Any]:
    """Machines with the attempt that holds each one's lease, if any."""
    active = attempts.alias("active")
    return select(
        machines,
        active.c.id.label("active_attempt_id"),
        active.c.run_id.label("active_run_id"),
    ).select_from(
        machines.outerjoin(
            active, and_(active.c.machine_id == machines.c.id, active.c.state == "active")
        )
    )


_MACHINES = _build_machines_query()
_ANY_QUEUED = (
    select(runs.c.id)
    .where(runs.c.state == "queued", or_(runs.c.not_before.is_(None), runs.c.not_before <= bindparam("now")))
    .limit(1)
)
_PREFERRED = _MACHINES.where(
    machines.c.connected.is_(True),
    or_(machines.c.session_key.in_(bindparam("keys", expanding=True)),
        machines.c.id.in_(bindparam("ids", expanding=True))),
)
#: seconds an automation spec read from the database is trusted (see ``SQLStore._spec``)
SPEC_TTL = 2.0
#: the writes that may share a transaction (``SQLStore.batch``): each raises its expected
#: errors (StaleLease, Stopped) before it writes anything
BATCHABLE = frozenset({"attempt_preparing", "attempt_start", "attempt_progress", "attempt_event", "attempt_renew",
                       "finish_attempt", "submit", "submit_many"})
#: the errors a batched write answers with on its own (all raised before it writes)
ANSWERS = (StaleLease, Stopped, Conflict, NotFound)
#: the batchable writes of an agent, fenced by their attempt's lease (``attempt_id`` first)
FENCED = frozenset({"attempt_preparing", "attempt_start", "attempt_progress", "attempt_event", "attempt_renew",
                    "finish_attempt"})


def _attempt_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """The attempt a fenced write is for."""
    found = args[0] if args else kwargs.get("attempt_id")
    return found if isinstance(found, int) else None


@dataclass
class Held:
    """Rows a batch read under its locks, by id, each to serve one write (see SQLStore.batch)."""

    runs: dict[str, dict[str, Any]]
    attempts: dict[int, dict[str, Any]]


def _attempt_mode(run: Run) -> AttemptMode:
    """How a new attempt of ``run`` runs: a reconcile first if an earlier one may have acted."""
    return AttemptMode.RECONCILE if run.needs_reconcile else AttemptMode.RUN


_EVENT_COLUMNS = ("at", "kind", "run_id", "attempt_id", "machine_id", "from_state", "to_state", "reason", "data")
#: the tables whose statistics the leader keeps current (see SQLStore.refresh_statistics),
#: analysed when rows changed since the last analysis exceed STATS_BASE + STATS_SHARE * rows
STATS_TABLES = ("runs", "attempts", "machines")
STATS_BASE, STATS_SHARE = 500, 0.1
_STALE_STATISTICS = text(
    "SELECT s.relname FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid"
    " WHERE s.schemaname = current_schema() AND s.relname = ANY(:tables)"
    " AND s.n_mod_since_analyze > :base + :share * GREATEST(c.reltuples, 0) ORDER BY s.relname"
)
#: scheduling passes read free machines a page at a time, in the selector's order
MACHINE_PAGE = 256
#: and queued runs this many per free machine (at least RUN_PAGE_MIN), up to the pass's limit
RUNS_PER_FREE = 2
RUN_PAGE_MIN = 16


class SQLStore(AccessOps, AccountOps, ArtifactOps, HumanOps, KeyOps, MaintenanceOps, MetricOps, PackOps, PoolOps, Store):
    def __init__(self, engine: Engine, *, migrate: Callable[[Engine], None]) -> None:
        self.engine = engine
        self._migrate = migrate
        self._written_specs: dict[str, bytes] = {}  # automation key → the spec as last written
        self._specs: dict[tuple[str, str | None], tuple[float, AutomationSpec | None]] = {}  # see _spec
        self._pg = engine.dialect.name == "postgresql"
        self._drv = Driver(engine.dialect)
        if self._drv.pipelines:
            send_before_statements(engine, self._drv)
        self._sql = for_dialect(engine.dialect.name)  # the hot path's statements (store.statements)
        # Agents' writes and submits share a transaction (group commit, see batch): one commit
        # — one fsync on SQLite, one WAL flush and one round trip on PostgreSQL — for many. On
        # PostgreSQL a batch locks all its rows first, in every writer's order (see batch).
        self.batches_writes = True
        # How many batches may be applied at once: one writer at a time on SQLite; on
        # PostgreSQL a batch is a chain of round trips, and batches that lock in one order
        # can run side by side (a replica's writes would otherwise wait in one line).
        self.batch_lanes = 3 if self._pg else 1
        self._joined = threading.local()  # the transaction of the batch being applied, if any
        self._accounts_cache: tuple[float, dict[str, Any]] | None = None  # see AccountOps._catalog

    # -- plumbing -------------------------------------------------------------------------
    def batch(self, calls: Sequence[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]]) -> list[Any]:
        """Apply several of this store's writes (agents' fenced writes, submits) in one
        transaction. Each answers on its own — its result, or the StaleLease, Stopped,
        Conflict or NotFound it raised (which those writes raise before they write anything,
        so the others are unaffected); any other error rolls the whole batch back and is
        raised."""
        if any(getattr(fn, "__name__", "") not in BATCHABLE or getattr(fn, "__self__", None) is not self
               for fn, _, _ in calls):
            raise ValueError(f"only these writes can share a transaction: {', '.join(sorted(BATCHABLE))}")
        out: list[Any] = []
        with self._tx() as conn:
            self._joined.conn = conn
            try:
                if self._pg:
                    # Every row the batch's agents' writes lock, locked first, in the order
                    # every writer takes them (store.statements): a batch that locked them write
                    # by write would hold some while it waited for others — a deadlock with the
                    # heartbeats' transaction, a sweep or another replica's batch. What it read
                    # under those locks serves each write once (see _fenced).
                    fenced = [(fn.__name__, aid) for fn, args, kwargs in calls
                              if fn.__name__ in FENCED and (aid := _attempt_of(args, kwargs)) is not None]
                    self._joined.held = self._lock_in_order(
                        conn, sorted({aid for _, aid in fenced}),
                        machines_of=sorted({aid for name, aid in fenced if name == "finish_attempt"}))
                for fn, args, kwargs in calls:
                    try:
                        out.append(fn(*args, **kwargs))
                    except ANSWERS as exc:
                        out.append(exc)
            finally:
                self._joined.conn = self._joined.held = None
        return out

    def _lock_in_order(
        self, conn: Connection, attempt_ids: Sequence[int], *, machines_of: Sequence[int] = (),
    ) -> Held | None:
        """Lock the runs and the attempts ``attempt_ids`` and the machines of ``machines_of``
        (PostgreSQL), in the one order of every writer; the rows as locked."""
        if not self._pg or not attempt_ids:
            return None
        ids = list(attempt_ids)
        # Both reads in one round trip, runs locked before attempts (one pipeline, in order).
        run_rows, attempt_rows = self._drv.rows_together(
            conn, [(PG.LOCK_RUNS_OF, {"ids": ids}, runs), (PG.LOCK_ATTEMPTS, {"ids": ids}, attempts)])
        held = Held({r["id"]: r for r in run_rows}, {r["id"]: r for r in attempt_rows})
        if machines_of:
            self._drv.later(conn, PG.LOCK_MACHINES_OF, {"ids": list(machines_of)})  # nothing to read back
        return held

    @contextmanager
    def _tx(self, write: bool = True) -> Iterator[Connection]:
        joined = getattr(self._joined, "conn", None)
        if joined is not None:
            yield joined  # inside batch(): its transaction, committed at its end
            return
        try:
            with self.engine.connect() as conn:
                conn = conn.execution_options(deskfleet_write=write)
                conn.info["deskfleet_specs"] = []  # nothing of a rolled-back transaction's
                conn.info["deskfleet_events"] = []  # see _event
                conn.info[COUNTS] = {}  # see MetricOps._count
                try:
                    with conn.begin():
                        yield conn
                        self._flush_events(conn)
                        self._flush_counts(conn)  # last: see store.metrics
                        self._drv.send(conn)  # the writes still waiting (store.driver), before COMMIT
                finally:
                    self._drv.forget(conn)  # nothing of a rolled-back transaction's is sent later
                # Committed: what it wrote may be remembered (see _put_automations).
                written = conn.info.pop("deskfleet_specs", ())
                if written:
                    self._written_specs.update(written)
                    self._specs.clear()
        except DBAPIError as exc:
            if _retryable(exc):
                raise StoreRetry(f"transaction conflict: {_first_line(exc.orig)}") from exc
            if isinstance(exc, (OperationalError, InterfaceError)) or exc.connection_invalidated:
                raise StoreUnavailable(f"database error: {_first_line(exc.orig)}") from exc
            raise

    def _fenced(
        self, op: str, attempt_id: int, machine_id: str, now: float, fn: Callable[[Connection, Attempt, Run | None], T],
        *, repeat: Callable[[Connection, Any], T | None] | None = None, needs_run: bool = True,
    ) -> T:
        """Run ``fn(conn, attempt, run)`` if the attempt still holds its lease; otherwise
        record the rejected write (in its own transaction, since the failed one rolls back)
        and raise. ``repeat`` may answer a harmless repeat of an earlier write instead. The
        run is read only if ``needs_run`` (always on PostgreSQL, where it is locked first)."""
        try:
            with self._tx() as conn:
                # Read under lock by the batch this write is part of (once: a second write for
                # the same attempt in the batch reads what the first one left).
                held: Held | None = getattr(self._joined, "held", None)
                locked = held.attempts.pop(attempt_id, None) if held is not None else None
                row = locked or self._drv.one(conn, self._sql.ATTEMPT, {"id": attempt_id}, attempts)
                if row is not None and repeat is not None and (answer := repeat(conn, row)) is not None:
                    return answer
                if row is None or row["machine_id"] != machine_id:
                    raise StaleLease(attempt_id, "no such attempt on this machine")
                run: Run | None = None
                run_row = held.runs.pop(row["run_id"], None) if locked is not None and held is not None else None
                if run_row is not None:
                    run = rows.run(run_row)
                elif self._pg:
                    # Lock order: the run, then its attempt — read again once locked.
                    run = self._get_run(conn, row["run_id"], lock=True)
                    row = self._drv.one(conn, self._sql.LOCK_ATTEMPT, {"id": attempt_id}, attempts)
                    assert row is not None
                elif needs_run:
                    run = self._get_run(conn, row["run_id"])  # one writer: what was read still is
                a = rows.attempt(row)
                if a.state is not AttemptState.ACTIVE:
                    raise StaleLease(attempt_id, f"attempt already ended: {a.state.value}")
                return fn(conn, a, run)
        except StaleLease as exc:
            with self._tx() as conn:
                row = self._drv.one(conn, self._sql.ATTEMPT, {"id": attempt_id}, attempts)
                self._event(
                    conn, "lease.stale_write_rejected", now, attempt_id=attempt_id,
                    run_id=row["run_id"] if row is not None and row["machine_id"] == machine_id else None,
                    machine_id=machine_id, reason=exc.reason, data={"op": op},
                )
                self._count_stale(conn, op)
            log.warning("rejected %s from a stale lease: %s", op, exc.reason,
                        extra={"attempt": attempt_id, "machine": machine_id})
            raise

    def _held(self, conn: Connection, attempt_id: int, machine_id: str) -> Attempt:
        """The attempt, locked, if it still holds its lease on this machine (lock its run first)."""
        row = conn.execute(_LOCK_ATTEMPT, {"id": attempt_id}).mappings().first()
        if row is None or row["machine_id"] != machine_id:
            raise StaleLease(attempt_id, "no such attempt on this machine")
        a = rows.attempt(row)
        if a.state is not AttemptState.ACTIVE:
            raise StaleLease(attempt_id, f"attempt already ended: {a.state.value}")
        return a

    def _event(
        self,
        conn: Connection,
        kind: str,
        now: float,
        *,
        run_id: str | None = None,
        attempt_id: int | None = None,
        machine_id: str | None = None,
        from_state: str | None = None,
        to_state: str | None = None,
        reason: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        # Written with the transaction's other events in one executemany just before it
        # commits (on PostgreSQL one round trip for all of them, not one each).
        conn.info["deskfleet_events"].append({
            "at": now, "kind": kind, "run_id": run_id, "attempt_id": attempt_id, "machine_id": machine_id,
            "from_state": from_state, "to_state": to_state, "reason": reason, "data": data or {},
        })

    def _flush_events(self, conn: Connection) -> None:
        """Write the events this transaction recorded so far (before it commits, or reads events)."""
        pending = conn.info["deskfleet_events"]
        if not pending:
            return
        conn.info["deskfleet_events"] = []
        if self._pg:
            # One statement from arrays: one bind and one execution for them all, where an
            # executemany is one per event.
            values = {k: [e[k] for e in pending] for k in _EVENT_COLUMNS}
            values["data"] = [orjson.dumps(d).decode() for d in values["data"]]
            self._drv.later(conn, PG.INSERT_EVENTS, values)
        else:
            self._drv.insert_many(conn, events, pending)

    def _get_run(self, conn: Connection, run_id: str, *, lock: bool = False) -> Run:
        row = self._drv.one(conn, self._sql.LOCK_RUN if lock else self._sql.RUN, {"id": run_id}, runs)
        if row is None:
            raise NotFound(f"no run {run_id!r}")
        return rows.run(row)

    def _spec(self, conn: Connection, name: str, version: str | None) -> AutomationSpec | None:
        """The automation (its latest version if ``version`` is None), as read at most
        SPEC_TTL seconds ago: every attempt's end needs its retry policy, and specs change
        only when agents advertise new ones (this store forgets what it rewrote at once)."""
        key = (name, version)
        cached = self._specs.get(key)
        now = time.monotonic()
        if cached is not None and now - cached[0] < SPEC_TTL:
            return cached[1]
        spec = self._read_spec(conn, name, version)
        self._specs[key] = (now, spec)
        return spec

    def _read_spec(self, conn: Connection, name: str, version: str | None) -> AutomationSpec | None:
        q = select(automations).where(automations.c.name == name)
        if version is not None:
            q = q.where(automations.c.version == version)
        found = [rows.automation(r) for r in conn.execute(q).mappings()]
        if not found:
            return None
        return max(found, key=lambda s: version_key(s.version))

    def _set_run_state(
        self, conn: Connection, run: Run, to: RunState, now: float, *, reason: str,
        message: str = "", attempt_id: int | None = None, machine_id: str | None = None,
        via: tuple[RunState, str] | None = None, **values: Any,
    ) -> Run:
        """Move a run to ``to`` (a legal transition, checked), record the event; the run as it
        now is. ``values`` are other columns to set, named as the Run's fields. ``via``: a
        state the run passes through on the way (and that step's reason), recorded as an
        event of its own but written with the same one update."""
        steps = [(via[0], via[1], ""), (to, reason, message)] if via is not None else [(to, reason, message)]
        at = run.state
        for state, _, _ in steps:
            if not can_transition(at, state):
                raise AssertionError(f"run {run.id}: illegal transition {at} → {state}")
            at = state
        # One row, or the run changed under this transaction (checked when the write is sent).
        self._drv.update(conn, runs, {"state": to.value, "updated_at": now, **values},
                         {"id": run.id, "state": run.state.value}, expect=1)
        self._count_run(conn, run, to, now, values.get("error_code"))
        at = run.state
        for state, why, said in steps:
            self._event(
                conn, "run.state", now, run_id=run.id, attempt_id=attempt_id, machine_id=machine_id,
                from_state=at.value, to_state=state.value, reason=why, data={"message": said} if said else None,
            )
            at = state
        if to.final and run.webhook_url:
            conn.execute(webhooks.insert().values(
                run_id=run.id, url=run.webhook_url, next_at=now, created_at=now,
            ))
        return replace(run, state=to, updated_at=now, **values)

    # -- lifecycle ---------------------------------------------------------------------------
    def migrate(self) -> None:
        self._migrate(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def recover(self, now: float, grace: float, *, disconnect: bool = True) -> int:
        with self._tx() as conn:
            if self._pg:
                # Other replicas write on: take the rows in every writer's order (store.statements)
                # before writing them all, rather than in whatever order the updates find them.
                self._drv.execute(conn, PG.LOCK_ACTIVE_ATTEMPTS)
                if disconnect:
                    self._drv.execute(conn, PG.LOCK_CONNECTED_MACHINES)
            if disconnect:
                conn.execute(update(machines).where(machines.c.connected.is_(True))
                             .values(connected=False, replica=None))
            until = now + grace
            res = conn.execute(
                update(attempts).where(attempts.c.state == "active").values(
                    lease_expires_at=case(
                        (attempts.c.lease_expires_at < until, until),
                        else_=attempts.c.lease_expires_at,
                    )
                )
            )
            self._event(conn, "orchestrator.started" if disconnect else "orchestrator.forgave_outage", now,
                        data={"active_leases": res.rowcount, "grace": grace})
            if not disconnect:
                # Progress reports sent while the database was away were lost: do not let the
                # watchdog count the outage against the attempts.
                conn.execute(update(attempts).where(attempts.c.state == "active").values(
                    last_progress_at=case(
                        (func.coalesce(attempts.c.last_progress_at, 0.0) < now, now),
                        else_=attempts.c.last_progress_at,
                    )
                ))
            return int(res.rowcount)

    def replica_alive(self, replica: str, name: str, now: float, key: str | None = None) -> bool:
        with self._tx() as conn:
            res = conn.execute(update(replicas).where(replicas.c.id == replica).values(last_seen=now, key=key))
            if res.rowcount:
                return True
            conn.execute(replicas.insert().values(id=replica, name=name, started_at=now, last_seen=now, key=key))
            self._event(conn, "replica.started", now, data={"replica": replica, "name": name})
            return False

    def refresh_statistics(self) -> list[str]:
        """PostgreSQL plans the scheduler's reads from its statistics. A backlog submitted in
        seconds leaves them describing a queue of a few runs (autovacuum looks again only
        once a minute), and the queue is then read by sorting every queued run instead of
        from ``ix_runs_due`` in order: 10 to 30 ms a pass against 0.2 ms, measured on 6,000
        queued runs. So the hot tables are analysed as soon as they changed by autovacuum's
        own measure (``STATS_BASE`` rows plus ``STATS_SHARE`` of the table). SQLite's
        reads name their index and need no statistics."""
        if not self._pg:
            return []
        with self._tx() as conn:
            stale = [r[0] for r in conn.execute(_STALE_STATISTICS, {
                "tables": list(STATS_TABLES), "base": STATS_BASE, "share": STATS_SHARE})]
            for table in stale:
                conn.execute(text(f"ANALYZE {table}"))  # a name from STATS_TABLES, not from input
        if stale:
            log.debug("planner statistics refreshed: %s", ", ".join(stale))
        return stale

    def reap_replicas(self, now: float, timeout: float) -> list[str]:
        with self._tx() as conn:
            dead = [r[0] for r in conn.execute(select(replicas.c.id).where(replicas.c.last_seen < now - timeout))]
            for rid in dead:
                res = conn.execute(update(machines).where(machines.c.replica == rid)
                                   .values(connected=False, replica=None))
                conn.execute(replicas.delete().where(replicas.c.id == rid))
                self._event(conn, "replica.lost", now, reason=f"silent for {timeout:g}s",
                            data={"replica": rid, "machines_disconnected": res.rowcount})
            return dead

    def leave(self, replica: str, now: float) -> None:
        """A replica shutting down cleanly."""
        with self._tx() as conn:
            conn.execute(update(machines).where(machines.c.replica == replica).values(connected=False, replica=None))
            conn.execute(replicas.delete().where(replicas.c.id == replica))

    # -- pools and automations -------------------------------------------------------------
    def put_pool(self, pool: Pool, now: float) -> Pool:
        with self._tx() as conn:
            existing = conn.execute(select(pools).where(pools.c.name == pool.name)).mappings().first()
            values = {
                "description": pool.description,
                "allow_wait_for_capacity": pool.allow_wait_for_capacity,
                "affinity_wait": pool.affinity_wait,
            }
            if existing is None:
                conn.execute(pools.insert().values(name=pool.name, created_at=now, **values))
                self._event(conn, "pool.created", now, data={"pool": pool.name, **values})
            else:
                conn.execute(update(pools).where(pools.c.name == pool.name).values(**values))
                self._event(conn, "pool.updated", now, data={"pool": pool.name, **values})
            return rows.pool(conn.execute(select(pools).where(pools.c.name == pool.name)).mappings().one())

    def get_pool(self, name: str) -> Pool | None:
        with self._tx(write=False) as conn:
            row = conn.execute(select(pools).where(pools.c.name == name)).mappings().first()
            return rows.pool(row) if row else None

    def list_pools(self) -> list[Pool]:
        with self._tx(write=False) as conn:
            return [rows.pool(r) for r in conn.execute(select(pools).order_by(pools.c.name)).mappings()]

    def put_automations(self, specs: Sequence[AutomationSpec], now: float) -> None:
        with self._tx() as conn:
            self._put_automations(conn, specs, now)

    def _put_automations(self, conn: Connection, specs: Sequence[AutomationSpec], now: float) -> None:
        # Every agent advertises its automations at every connect, thousands of agents the
        # same few: a spec this store wrote (or read) as it is now is not written again.
        for spec in specs:
            values = asdict(spec)
            fingerprint = orjson.dumps(values, option=orjson.OPT_SORT_KEYS)
            if self._written_specs.get(spec.key) == fingerprint:
                continue
            conn.info["deskfleet_specs"].append((spec.key, fingerprint))
            values.pop("name")
            values.pop("version")
            res = conn.execute(
                update(automations)
                .where(automations.c.name == spec.name, automations.c.version == spec.version)
                .values(updated_at=now, **values)
            )
            if res.rowcount == 0:
                conn.execute(automations.insert().values(
                    name=spec.name, version=spec.version, updated_at=now, **values
                ))

    def get_automation(self, name: str, version: str | None = None) -> AutomationSpec | None:
        with self._tx(write=False) as conn:
            return self._read_spec(conn, name, version)

    def list_automations(self) -> list[AutomationSpec]:
        with self._tx(write=False) as conn:
            q = select(automations).order_by(automations.c.name, automations.c.version)
            return [rows.automation(r) for r in conn.execute(q).mappings()]

    # -- machines ------------------------------------------------------------------------------
    def enrol_machine(
        self, machine_id: str, *, pool: str, labels: dict[str, str], key_hash: str, now: float
    ) -> Machine:
        with self._tx() as conn:
            if conn.execute(select(pools.c.name).where(pools.c.name == pool)).first() is None:
                conn.execute(pools.insert().values(name=pool, created_at=now))
                self._event(conn, "pool.created", now, data={"pool": pool, "by": f"enrolment of {machine_id}"})
            existing = conn.execute(select(machines.c.id).where(machines.c.id == machine_id)).first()
            if existing is None:
                conn.execute(machines.insert().values(
                    id=machine_id, pool=pool, labels=labels, automations=[], health="offline",
                    admin="active", connected=False, key_hash=key_hash, enrolled_at=now,
                    resources={},
                ))
                self._event(conn, "machine.enrolled", now, machine_id=machine_id, data={"pool": pool, "labels": labels})
            else:
                conn.execute(update(machines).where(machines.c.id == machine_id).values(
                    pool=pool, labels=labels, key_hash=key_hash,
                ))
                self._event(conn, "machine.re_enrolled", now, machine_id=machine_id, data={"pool": pool, "labels": labels})
            return self._machine(conn, machine_id)

    def _machine(self, conn: Connection, machine_id: str) -> Machine:
        row = conn.execute(_MACHINES.where(machines.c.id == machine_id)).mappings().first()
        if row is None:
            raise NotFound(f"no machine {machine_id!r}")
        return rows.machine(row)

    def machine_key_hash(self, machine_id: str) -> str | None:
        with self._tx(write=False) as conn:
            row = conn.execute(select(machines.c.key_hash).where(machines.c.id == machine_id)).first()
            return row[0] if row else None

    def connect_machine(
        self,
        machine_id: str,
        *,
        boot_id: str,
        agent_version: str,
        automations: Sequence[AutomationSpec],
        labels: dict[str, str] | None,
        heartbeat: Heartbeat,
        lease_timeout: float,
        now: float,
        replica: str | None = None,
    ) -> ConnectResult:
        with self._tx() as conn:
            before = self._machine(conn, machine_id)
            if before.active_attempt_id is not None:
                # Lock order: the run, then its attempt (in _held below), then the machine.
                conn.execute(_LOCK_RUN, {"id": before.active_run_id})
            self._put_automations(conn, automations, now)
            values: dict[str, Any] = {
                "connected": True,
                "replica": replica,
                "boot_id": boot_id,
                "agent_version": agent_version,
                "automations": sorted(s.key for s in automations),
                "last_heartbeat_at": now,
                "resources": heartbeat.resources,
                "session_key": heartbeat.session_key,
                "session_expires_at": heartbeat.session_expires_at,
            }
            if labels is not None:
                values["labels"] = labels
            offers_changed = values["automations"] != before.automations or (
                labels is not None and labels != before.labels)
            if before.health is MachineHealth.OFFLINE:
                values["health"] = "online"
            if before.active_attempt_id is None and before.idle_since is None:
                values["idle_since"] = now
            conn.execute(update(machines).where(machines.c.id == machine_id).values(**values))
            self._event(conn, "machine.connected", now, machine_id=machine_id, data={
                "boot_id": boot_id, "agent_version": agent_version,
                "reported_attempt": heartbeat.attempt_id,
                "rebooted": bool(before.boot_id) and before.boot_id != boot_id,
            })
            result = ConnectResult(machine=before, offers_changed=offers_changed)
            reported = heartbeat.attempt_id
            if before.active_attempt_id is not None:
                active = self._held(conn, before.active_attempt_id, machine_id)
                if reported == active.id:
                    conn.execute(update(attempts).where(attempts.c.id == active.id)
                                 .values(lease_expires_at=now + lease_timeout))
                    result.resume = active
                elif reported is None and active.phase is AttemptPhase.ASSIGNED:
                    conn.execute(update(attempts).where(attempts.c.id == active.id)
                                 .values(lease_expires_at=now + lease_timeout))
                    run = self._get_run(conn, active.run_id)
                    result.resend = Assignment(run, active, self._spec(conn, run.automation, run.version),
                                               self._grant_again(conn, active, now))
                else:
                    finished = self._end_attempt(
                        conn, active, Ending.LOST, now=now,
                        detail="the agent came back without its attempt (restarted or rebooted)",
                    )
                    result.ended_run = finished.run
                    if reported is not None:
                        result.stale_attempt_id = reported
            elif reported is not None:
                result.stale_attempt_id = reported
            # Whatever the machine was logged in as before, its hello says what it is now.
            self._sync_sessions(conn, machine_id, heartbeat.notes(), now, before.sessions)
            result.machine = self._machine(conn, machine_id)
            return result

    def disconnect_machine(self, machine_id: str, now: float, replica: str | None = None) -> None:
        with self._tx() as conn:
            q = update(machines).where(machines.c.id == machine_id)
            if replica is not None:
                # The agent may already be connected to another replica: leave that alone.
                q = q.where(machines.c.replica == replica)
            if conn.execute(q.values(connected=False, replica=None)).rowcount:
                self._event(conn, "machine.disconnected", now, machine_id=machine_id)

    def heartbeat(self, beats: Sequence[Heartbeat], lease_timeout: float) -> dict[str, bool]:
        if not beats:
            return {}
        beats = sorted(beats, key=lambda b: b.machine_id)  # one lock order for every writer
        # Thousands of machines beat every couple of seconds: the rows go to the driver's
        # executemany as they are, without a statement per row to compile.
        with self._tx() as conn:
            held: set[tuple[int, str]] = set()
            claimed = [b for b in beats if b.attempt_id is not None]
            if claimed:
                held = {
                    (r[0], r[1]) for r in conn.execute(
                        select(attempts.c.id, attempts.c.machine_id).where(
                            attempts.c.state == "active",
                            attempts.c.id.in_([b.attempt_id for b in claimed]),
                        )
                    )
                }
                renew = [b for b in claimed if (b.attempt_id, b.machine_id) in held]
                if renew:
                    # Attempts before machines: the order every other writer takes them in.
                    self._drv.execute_many(conn, self._sql.RENEW_LEASE, [
                        {"expires": b.at + lease_timeout, "id": b.attempt_id, "machine": b.machine_id}
                        for b in renew
                    ])
            self._drv.execute_many(conn, self._sql.BEAT, [
                {"at": b.at, "resources": orjson.dumps(b.resources).decode(), "session_key": b.session_key,
                 "session_expires_at": b.session_expires_at, "id": b.machine_id}
                for b in beats
            ])
            sampled = [b for b in beats if b.sample]
            if sampled:
                conn.execute(insert(machine_samples), [
                    {"machine_id": b.machine_id, "at": b.at, "memory_mb": float(b.resources.get("memory_mb") or 0.0),
                     "cpu_percent": float(b.resources.get("cpu_percent") or 0.0)} for b in sampled])
            # Account leases follow the session notes, written only when a note changed.
            for b in beats:
                if b.sessions_changed:
                    self._sync_sessions(conn, b.machine_id, b.notes(), b.at)
            return {b.machine_id: (b.attempt_id, b.machine_id) in held for b in claimed}

    def set_admin(self, machine_id: str, admin: MachineAdmin, now: float, reason: str = "") -> Machine:
        with self._tx() as conn:
            before = self._machine(conn, machine_id)
            conn.execute(update(machines).where(machines.c.id == machine_id).values(admin=admin.value))
            self._event(conn, f"machine.{admin.value}", now, machine_id=machine_id,
                        from_state=before.admin.value, to_state=admin.value, reason=reason or None)
            return self._machine(conn, machine_id)

    def quarantine(self, machine_id: str, reason: str, now: float) -> Machine:
        with self._tx() as conn:
            self._quarantine(conn, machine_id, reason, now)
            return self._machine(conn, machine_id)

    def _quarantine(self, conn: Connection, machine_id: str, reason: str, now: float) -> None:
        conn.execute(update(machines).where(machines.c.id == machine_id).values(
            health="quarantined", quarantine_reason=reason,
        ))
        self._event(conn, "machine.quarantined", now, machine_id=machine_id, reason=reason)

    def release_quarantine(self, machine_id: str, evidence: dict[str, Any], now: float) -> Machine:
        with self._tx() as conn:
            before = self._machine(conn, machine_id)
            conn.execute(update(machines).where(machines.c.id == machine_id).values(
                health="online", quarantine_reason=None,
                idle_since=func.coalesce(machines.c.idle_since, now),
            ))
            self._event(conn, "machine.verified", now, machine_id=machine_id,
                        from_state=before.health.value, to_state="online", data=evidence)
            return self._machine(conn, machine_id)

    def get_machine(self, machine_id: str) -> Machine | None:
        with self._tx(write=False) as conn:
            row = conn.execute(_MACHINES.where(machines.c.id == machine_id)).mappings().first()
            return rows.machine(row) if row else None

    def list_machines(self, pool: str | None = None, *, health: MachineHealth | None = None,
                      live_or: Collection[str] | None = None) -> list[Machine]:
        with self._tx(write=False) as conn:
            q = _MACHINES.order_by(machines.c.id)
            if pool is not None:
                q = q.where(machines.c.pool == pool)
            if health is not None:
                q = q.where(machines.c.health == health.value)
            if live_or is not None:
                q = q.where(or_(machines.c.connected.is_(True), _MACHINES.selected_columns.active_attempt_id.is_not(None),
                                machines.c.id.in_(list(live_or))))
            return [rows.machine(r) for r in conn.execute(q).mappings()]

    def machine_shapes(self) -> list[MachineShape]:
        labels, offered = cast(machines.c.labels, Text), cast(machines.c.automations, Text)
        q = select(machines.c.pool, labels, offered, func.count()).group_by(machines.c.pool, labels, offered)
        with self._tx(write=False) as conn:
            return [MachineShape(pool, orjson.loads(lab), orjson.loads(auto), int(n))
                    for pool, lab, auto, n in conn.execute(q)]

    def count_machines(self, pool: str | None = None) -> dict[str, int]:
        with self._tx(write=False) as conn:
            return self._count_machines(conn, pool)

    def _count_machines(self, conn: Connection, pool: str | None) -> dict[str, int]:
        # Machine.status, in SQL: a fleet of thousands is counted, not read.
        busy = _MACHINES.selected_columns.active_attempt_id.is_not(None)
        status = case(
            (busy, "busy"), (machines.c.connected.is_(False), "offline"),
            (machines.c.health == "quarantined", "quarantined"), (machines.c.admin == "cordoned", "cordoned"),
            (machines.c.admin == "draining", "drained"), else_="ready",
        ).label("status")
        q = _MACHINES.with_only_columns(status, func.count()).group_by(status)
        if pool is not None:
            q = q.where(machines.c.pool == pool)
        return {name: int(n) for name, n in conn.execute(q)}

    def set_machine_screenshot(self, machine_id: str, artifact_id: str) -> None:
        with self._tx() as conn:
            conn.execute(update(machines).where(machines.c.id == machine_id)
                         .values(last_screenshot_id=artifact_id))

    def machine_samples(self, since: float, machine_ids: Sequence[str] | None = None,
                        ) -> dict[str, list[tuple[float, float, float]]]:
        q = select(machine_samples).where(machine_samples.c.at >= since).order_by(
            machine_samples.c.machine_id, machine_samples.c.at)
        if machine_ids is not None:
            q = q.where(machine_samples.c.machine_id.in_(list(machine_ids)))
        out: dict[str, list[tuple[float, float, float]]] = {}
        with self._tx(write=False) as conn:
            for r in conn.execute(q):
                out.setdefault(r[0], []).append((r[1], r[2], r[3]))
        return out

    def prune_machine_samples(self, before: float, limit: int = 10_000) -> int:
        with self._tx() as conn:
            # About ``limit`` rows a call: up to the time of the limit-th oldest (one statement,
            # on the index of ``at``; a few more go when samples share that time).
            edge = conn.execute(select(machine_samples.c.at).where(machine_samples.c.at < before)
                                .order_by(machine_samples.c.at).offset(limit - 1).limit(1)).scalar()
            cut = machine_samples.c.at < before if edge is None else machine_samples.c.at <= edge
            return int(conn.execute(delete(machine_samples).where(cut)).rowcount or 0)

    # -- runs -----------------------------------------------------------------------------------
    def submit(self, spec: RunSpec, *, request_hash: str | None, now: float,
               traceparent: str | None = None) -> tuple[Run, bool]:
        try:
            return self._submit(spec, request_hash, now, traceparent)
        except (IntegrityError, StoreRetry):
            # A concurrent submit with the same idempotency key won the insert: answer as
            # the second of two identical requests would be answered.
            if spec.idempotency_key is None:
                raise
            return self._submit(spec, request_hash, now, traceparent)

    def submit_many(self, items: Sequence[tuple[RunSpec, str | None]], *, now: float,
                    traceparent: str | None = None) -> list[tuple[Run, bool] | InvalidRequest]:
        try:
            return self._submit_many(items, now, traceparent)
        except (IntegrityError, StoreRetry):
            # A concurrent submit took one of the batch's idempotency keys between our look
            # and our insert: the whole transaction went; again, that key is now found.
            return self._submit_many(items, now, traceparent)

    def _submit_many(self, items: Sequence[tuple[RunSpec, str | None]], now: float, traceparent: str | None,
                     ) -> list[tuple[Run, bool] | InvalidRequest]:
        out: list[tuple[Run, bool] | InvalidRequest] = []
        batch = _SubmitBatch()
        with self._tx() as conn:
            for spec, request_hash in items:
                try:  # a refusal comes before anything of its run is written
                    out.append(self._submit_in(conn, spec, request_hash, now, batch, traceparent))
                except (NotFound, Conflict) as exc:
                    out.append(exc)
            batch.flush(self._drv, conn)
        return out

    def _submit(self, spec: RunSpec, request_hash: str | None, now: float,
                traceparent: str | None) -> tuple[Run, bool]:
        with self._tx() as conn:
            return self._submit_in(conn, spec, request_hash, now, traceparent=traceparent)

    def _submit_in(self, conn: Connection, spec: RunSpec, request_hash: str | None, now: float,
                   batch: _SubmitBatch | None = None, traceparent: str | None = None) -> tuple[Run, bool]:
        """Submit within the transaction ``conn``; a refusal (NotFound, Conflict) is raised
        before anything is written. Within a ``batch``, each pool is looked up once and runs
        without an idempotency key are inserted together (in order: before any keyed one)."""
        if batch is None or spec.pool not in batch.pools:
            if self._drv.execute(conn, self._sql.POOL_EXISTS, {"name": spec.pool}).fetchone() is None:
                raise NotFound(f"unknown pool {spec.pool!r}", field="pool")
            if batch is not None:
                batch.pools.add(spec.pool)
        if spec.idempotency_key is not None:
            if batch is not None:
                batch.flush(self._drv, conn)
            if (existing := self._by_key(conn, spec, request_hash)) is not None:
                return existing, False
        run_id = ids.new_id("run")
        values = {
            "id": run_id, "automation": spec.automation, "version": spec.version, "input": spec.input,
            "pool": spec.pool, "labels": spec.labels, "machine": spec.machine,
            "prefer_machine": spec.prefer_machine, "session_key": spec.session_key,
            "priority": spec.priority, "tenant": spec.tenant, "queue_timeout": spec.queue_timeout,
            "attempt_timeout": spec.attempt_timeout, "progress_timeout": spec.progress_timeout,
            "deadline_at": None if spec.deadline is None else now + spec.deadline,
            "max_attempts": spec.max_attempts, "backoff_initial": spec.backoff_initial,
            "backoff_max": spec.backoff_max, "idempotency_key": spec.idempotency_key,
            "request_hash": request_hash, "webhook_url": spec.webhook_url, "state": "queued",
            "created_at": now, "updated_at": now, "queued_at": now,
            # the schema's defaults, said here: the driver path sends what it is given
            "attempts_started": 0, "dispatches": 0, "needs_reconcile": False, "traceparent": traceparent,
        }
        # With a key, ON CONFLICT DO NOTHING: a concurrent submit (another replica's) that
        # took the key first is waited for and found, instead of an error that would abort
        # this transaction — and with it the batch of writes it may be part of.
        if batch is not None and spec.idempotency_key is None:
            batch.rows.append(values)
        elif not self._drv.insert(conn, runs, values, skip_conflict=spec.idempotency_key is not None):
            existing = self._by_key(conn, spec, request_hash)
            if existing is None:
                raise StoreRetry(f"idempotency key {spec.idempotency_key!r}: taken, then not found")
            return existing, False
        self._event(conn, "run.state", now, run_id=run_id, to_state="queued", reason="submitted",
                    data={"automation": spec.automation, "pool": spec.pool, "priority": spec.priority})
        self._count(conn, RUNS_SUBMITTED, {"pool": spec.pool})
        return rows.run({c.name: None for c in runs.columns} | values), True

    def _by_key(self, conn: Connection, spec: RunSpec, request_hash: str | None) -> Run | None:
        """The run already submitted with ``spec``'s idempotency key, if any (Conflict if its
        request differed)."""
        row = self._drv.one(conn, self._sql.RUN_BY_KEY, {"tenant": spec.tenant, "key": spec.idempotency_key}, runs)
        if row is None:
            return None
        existing = rows.run(row)
        if existing.request_hash != request_hash:
            raise Conflict(
                f"idempotency key {spec.idempotency_key!r} was already used for a "
                f"different request (run {existing.id}); send the same body again to "
                "get that run, or use a new key for a new run",
                field="idempotency_key",
            )
        return existing

    def get_run(self, run_id: str) -> Run | None:
        with self._tx(write=False) as conn:
            row = conn.execute(select(runs).where(runs.c.id == run_id)).mappings().first()
            return rows.run(row) if row else None

    def list_runs(
        self,
        *,
        states: Sequence[RunState] = (),
        pool: str | None = None,
        automation: str | None = None,
        machine: str | None = None,
        limit: int = 100,
        before: str | None = None,
        tenant: str | None = None,
    ) -> list[Run]:
        # Newest first by creation time, ties broken by id; ids alone are random within a
        # millisecond.
        q = select(runs).order_by(runs.c.created_at.desc(), runs.c.id.desc()).limit(limit)
        if states:
            q = q.where(runs.c.state.in_([s.value for s in states]))
        if pool is not None:
            q = q.where(runs.c.pool == pool)
        if automation is not None:
            q = q.where(runs.c.automation == automation)
        if machine is not None:
            q = q.where(runs.c.current_machine_id == machine)
        if tenant is not None:
            q = q.where(runs.c.tenant == tenant)
        with self._tx(write=False) as conn:
            if before is not None:
                edge = conn.execute(select(runs.c.created_at).where(runs.c.id == before)).scalar()
                if edge is None:
                    raise NotFound(f"no run {before!r} to page from", field="before")
                q = q.where(or_(runs.c.created_at < edge, and_(runs.c.created_at == edge, runs.c.id < before)))
            return [rows.run(r) for r in conn.execute(q).mappings()]

    def count_runs(self, tenant: str | None = None) -> dict[str, int]:
        with self._tx(write=False) as conn:
            q = select(runs.c.state, func.count()).group_by(runs.c.state)
            if tenant is not None:
                q = q.where(runs.c.tenant == tenant)
            return {state: n for state, n in conn.execute(q)}

    def request_cancel(self, run_id: str, now: float) -> tuple[Run, StopOrder | None]:
        with self._tx() as conn:
            run = self._get_run(conn, run_id, lock=True)
            if run.state.final:
                raise Conflict(f"run {run_id} already ended ({run.state.value}); nothing to cancel")
            if run.state is RunState.QUEUED:
                return self._set_run_state(conn, run, RunState.CANCELLED, now, reason="cancelled",
                                           message="cancelled on request while queued",
                                           cancel_requested_at=now, finished_at=now,
                                           error_code="cancelled", error_message="cancelled on request"), None
            if run.cancel_requested_at is None:
                conn.execute(update(runs).where(runs.c.id == run_id).values(cancel_requested_at=now, updated_at=now))
                self._event(conn, "run.cancel_requested", now, run_id=run_id,
                            attempt_id=run.current_attempt_id, machine_id=run.current_machine_id)
            order = None
            if run.current_attempt_id is not None:
                order = self._request_stop(conn, run.current_attempt_id, StopReason.CANCELLED, now)
            return self._get_run(conn, run_id), order

    def _request_stop(self, conn: Connection, attempt_id: int, reason: StopReason, now: float) -> StopOrder | None:
        row = conn.execute(_LOCK_ATTEMPT, {"id": attempt_id}).mappings().first()
        if row is None or row["state"] != "active":
            return None
        a = rows.attempt(row)
        if a.stop_requested_at is None:
            conn.execute(update(attempts).where(attempts.c.id == attempt_id).values(
                stop_requested_at=now, stop_reason=reason.value,
            ))
            self._event(conn, "attempt.stop_requested", now, run_id=a.run_id, attempt_id=a.id,
                        machine_id=a.machine_id, reason=reason.value)
            a.stop_reason = reason
        return StopOrder(a.machine_id, a.id, a.run_id, a.stop_reason or reason)

    def list_attempts(self, run_id: str) -> list[Attempt]:
        with self._tx(write=False) as conn:
            q = select(attempts).where(attempts.c.run_id == run_id).order_by(attempts.c.id)
            return [rows.attempt(r) for r in conn.execute(q).mappings()]

    def get_attempt(self, attempt_id: int) -> Attempt | None:
        with self._tx(write=False) as conn:
            row = conn.execute(select(attempts).where(attempts.c.id == attempt_id)).mappings().first()
            return rows.attempt(row) if row else None

    def events(
        self,
        *,
        run_id: str | None = None,
        machine_id: str | None = None,
        after_id: int = 0,
        limit: int = 1000,
        tenant: str | None = None,
    ) -> list[Event]:
        q = select(events).where(events.c.id > after_id).order_by(events.c.id).limit(limit)
        if run_id is not None:
            q = q.where(events.c.run_id == run_id)
        if machine_id is not None:
            q = q.where(events.c.machine_id == machine_id)
        if tenant is not None:
            q = q.where(events.c.run_id.in_(select(runs.c.id).where(runs.c.tenant == tenant)))
        with self._tx(write=False) as conn:
            return [rows.event(r) for r in conn.execute(q).mappings()]

    def record_event(
        self,
        kind: str,
        now: float,
        *,
        run_id: str | None = None,
        attempt_id: int | None = None,
        machine_id: str | None = None,
        reason: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        with self._tx() as conn:
            self._event(conn, kind, now, run_id=run_id, attempt_id=attempt_id,
                        machine_id=machine_id, reason=reason, data=data)

    # -- scheduling ---------------------------------------------------------------------------
    def schedule(
        self, policy: Policy, now: float, lease_timeout: float, limit: int = 500, replica: str | None = None,
    ) -> list[Assignment]:
        claims = Claims()
        with self._tx() as conn:
            # The cheapest question first: an idle fleet of thousands must not pay for reading
            # its machines at every tick. (On PostgreSQL the question is part of the read of
            # free machines, which it ends at once if nothing is queued: a round trip saved.)
            if not self._pg and conn.execute(_ANY_QUEUED, {"now": now}).first() is None:
                return claims
            # A replica assigns work to the machines whose agents it holds a connection to;
            # with none free, it must not lock runs another replica could take right now.
            # Free machines come a page at a time, in the selector's own order, so that a big
            # idle fleet is read in full only when a pass cannot place its runs otherwise.
            order = getattr(policy.selector, "prefetch", None)
            free, more_machines = self._free_machines(conn, replica, order, MACHINE_PAGE if order else None,
                                                      now=now if self._pg else None)
            if not free:
                return claims
            # SKIP LOCKED: runs another replica is claiming right now are not ours to take.
            page = min(limit, max(RUN_PAGE_MIN, RUNS_PER_FREE * len(free)))
            # The queue's head, the pools and (for a policy that knows durations) the
            # automations with queued runs in one round trip (on PostgreSQL, one pipeline).
            reads = [(self._sql.QUEUED, {"now": now, "limit": page}, runs), (self._sql.POOLS, {}, pools)]
            if policy.durations is not None:
                reads.append((self._sql.QUEUED_AUTOMATIONS, {}, automations))
            queued_rows, pool_rows, *named = self._drv.rows_together(conn, reads)
            queued = [rows.run(r) for r in queued_rows]
            if not queued:
                return claims
            more_runs = len(queued) == page < limit
            if policy.durations is not None and len(queued) == page:
                # A policy that starts long runs first must see the long runs wherever they
                # wait, not only those at the head of the queue.
                queued = self._with_longest(conn, queued, policy.durations, now, page,
                                            [r["name"] for r in named[0]])
            pool_map = {p["name"]: rows.pool(p) for p in pool_rows}
            specs: dict[tuple[str, str | None], AutomationSpec | None] = {}
            used: set[str] = set()  # machines claimed by this pass
            while True:
                # What the runs need from the vault (nothing read if none needs an account);
                # read again on a second look: its claims are leases in this transaction.
                book = self._book(conn, queued)
                online = self._preferred(conn, queued, book)
                # A preferred machine that is free belongs in the pass even if its page did not
                # bring it (the selector puts it first).
                seen = {m.id for m in free}
                free += [m for m in online if m.schedulable and m.id not in seen and m.id not in used
                         and (replica is None or m.replica == replica)]
                free, locked_any = self._lock_free(conn, free)
                if not locked_any:
                    claims.unclaimed = len(queued)
                    return claims
                placed: set[str] = set()
                placements = list(policy.place(queued, free, online=online, pools=pool_map, now=now, accounts=book))
                for (run, machine, _), claimed in zip(
                        placements, self._claim_all(conn, placements, now, lease_timeout), strict=True):
                    key = (run.automation, run.version)
                    if key not in specs:
                        specs[key] = self._spec(conn, run.automation, run.version)
                    if claimed is not None:
                        claims.append(Assignment(claimed[0], claimed[1], specs[key], claimed[2]))
                        placed.add(run.id)
                        used.add(machine.id)
                queued = [r for r in queued if r.id not in placed]
                left = [m for m in free if m.id not in used]
                # A second look only where it can change the outcome: a run left over that no
                # machine read so far could serve, while free machines were not all read; or
                # free machines left over while queued runs were not all read.
                if more_machines and any(not any(eligible(r, m) for m in left) for r in queued):
                    free, more_machines = self._free_machines(conn, replica, None, None)
                    free = [m for m in free if m.id not in used]
                elif more_runs and left:
                    placed_ids = {c.run.id for c in claims}
                    queued = [r for r in self._queued(conn, now, limit) if r.id not in placed_ids]
                    free, more_runs = left, False
                else:
                    break
                if not queued or not free:
                    break
            claims.unclaimed = len(queued)
            return claims

    def _free_machines(
        self, conn: Connection, replica: str | None, order: str | None, page: int | None, *,
        now: float | None = None,
    ) -> tuple[list[Machine], bool]:
        """Free machines (of ``replica``), in the selector's order; whether there are more.
        With ``now``: none unless some run is queued and may start at ``now``."""
        stmt = self._sql.free_machines(replica=replica is not None, order=order, paged=page is not None,
                                       if_queued=now is not None)
        values = {"replica": replica, "limit": None if page is None else page + 1, "now": now}
        found = [rows.machine(r) for r in self._drv.rows(conn, stmt, values, machines)]
        if page is not None and len(found) > page:
            return found[:page], True
        return found, False

    def _queued(self, conn: Connection, now: float, limit: int) -> list[Run]:
        # On PostgreSQL FOR UPDATE SKIP LOCKED: runs another replica is claiming are not ours.
        return [rows.run(r) for r in self._drv.rows(conn, self._sql.QUEUED, {"now": now, "limit": limit}, runs)]

    def _with_longest(self, conn: Connection, head: list[Run], book: DurationBook, now: float,
                      page: int, names: list[str]) -> list[Run]:
        """``head`` (the queue's first ``page`` runs) and the first runs of the automations
        that take longest (those not yet learnt first), until ``page`` of those are read; in
        the pass's order. The head keeps the runs that must not wait (high priority, a
        deadline, waited long); the rest give the longest-first order its long runs.
        (Within a priority; a long run of a lower priority sorts after the head's.)
        ``names``: the automations that have queued runs."""
        if len(names) < 2:
            return head
        estimates = {name: book.estimate(name) for name in names}
        # An automation's runs in the head are the first of its own queue: read on after them.
        in_head = Counter(r.automation for r in head)
        more: list[Run] = []
        for name in sorted(names, key=lambda n: -(estimates[n] or math.inf)):
            if len(more) >= page:
                break
            more += [rows.run(r) for r in self._drv.rows(conn, self._sql.QUEUED_OF, {
                "automation": name, "now": now, "limit": page - len(more), "offset": in_head[name]}, runs)]
        if not more:
            return head
        return sorted(head + more, key=pass_order)

    def _lock_free(self, conn: Connection, free: list[Machine]) -> tuple[list[Machine], bool]:
        """Lock the machines (skipping any another writer holds), then look again: the first
        read may predate an attempt that ended or began since, and a claim made from a stale
        view would wait on that writer while holding the machine it needs — a deadlock."""
        if not self._pg:
            return free, bool(free)  # one writer at a time: what was read is what is
        # The lock, then a fresh read of the same machines in a statement of its own (so with
        # a snapshot taken once the locks are held): one round trip, one pipeline. Only those
        # locked are kept.
        ids = sorted(m.id for m in free)
        locked, fresh = self._drv.rows_together(
            conn, [(PG.LOCK_FREE_MACHINES, {"ids": ids}, machines), (PG.MACHINES_OF, {"ids": ids}, machines)])
        if not locked:
            return [], False
        mine = {r["id"] for r in locked}
        return [m for m in (rows.machine(r) for r in fresh if r["id"] in mine) if m.schedulable], True

    def _book(self, conn: Connection, queued: list[Run]) -> AccountBook | None:
        """The vault as this pass sees it, if some queued run needs an account (else None,
        and nothing read)."""
        needs, slots = self._needs(conn, queued, lambda name, version: self._spec(conn, name, version))
        return AccountBook(slots, needs) if needs else None

    def _preferred(self, conn: Connection, queued: list[Run], book: AccountBook | None = None) -> list[Machine]:
        """The connected machines some queued run prefers (busy ones too): the policy waits
        a while for such a machine rather than give the run to another."""
        keys = sorted({r.session_key for r in queued if r.session_key is not None})
        ids = {r.prefer_machine for r in queued if r.prefer_machine is not None}
        if book is not None:
            for key in keys:
                ids |= book.holders(key)  # logged in as that account (or logging in)
        if not keys and not ids:
            return []
        return [rows.machine(r) for r in conn.execute(_PREFERRED, {"keys": keys, "ids": sorted(ids)}).mappings()]

    def _claim_all(
        self, conn: Connection, placements: Sequence[tuple[Run, Machine, str | None]], now: float,
        lease_timeout: float,
    ) -> list[tuple[Run, Attempt, VaultAccount | None] | None]:
        """Claim each placement (None where the store refused it), in order. Those without an
        account insert their attempts together (on PostgreSQL one statement, one round trip,
        not one each); one with an account is claimed on its own, after the slots taken
        before it."""
        out: list[tuple[Run, Attempt, VaultAccount | None] | None] = [None] * len(placements)
        together = [i for i, (_, _, account) in enumerate(placements) if account is None]
        if self._pg and together:
            # One statement for all of them (arrays, not a statement per row).
            chosen = [placements[i] for i in together]
            found = {r["run_id"]: r["id"] for r in self._drv.rows(conn, PG.INSERT_ATTEMPTS, {
                "runs": [r.id for r, _, _ in chosen], "machines": [m.id for _, m, _ in chosen],
                "numbers": [r.dispatches + 1 for r, _, _ in chosen],
                "modes": [_attempt_mode(r).value for r, _, _ in chosen],
                "at": [now] * len(chosen), "expires": [now + lease_timeout] * len(chosen)}, attempts)}
            ids: list[int | None] = [found.get(r.id) for r, _, _ in chosen]
        else:
            ids = [self._drv.insert(conn, attempts, self._attempt_row(run, machine, now, lease_timeout, None),
                                    returning_id=True, skip_conflict=True)
                   for run, machine, _ in (placements[i] for i in together)]
        for i, attempt_id in zip(together, ids, strict=True):
            run, machine, _ = placements[i]
            out[i] = self._claimed(conn, run, machine, attempt_id, now, lease_timeout, None)
        for i, (run, machine, account) in enumerate(placements):
            if account is not None:
                out[i] = self._claim(conn, run, machine, now, lease_timeout, account)
        return out

    @staticmethod
    def _attempt_row(run: Run, machine: Machine, now: float, lease_timeout: float,
                     account: str | None) -> dict[str, Any]:
        return {"run_id": run.id, "machine_id": machine.id, "number": run.dispatches + 1, "state": "active",
                "phase": "assigned", "mode": _attempt_mode(run).value, "assigned_at": now, "lease_expires_at": now + lease_timeout,
                "account": account}

    def _claim(
        self, conn: Connection, run: Run, machine: Machine, now: float, lease_timeout: float,
        account: str | None = None,
    ) -> tuple[Run, Attempt, VaultAccount | None] | None:
        acct: VaultAccount | None = None
        if account is not None:
            # The account row locked and its leases counted, in the claim's transaction: two
            # replicas claiming at once cannot both take its last slot.
            acct = self._claim_slot(conn, account, machine.id)
            if acct is None:
                return None
        values = self._attempt_row(run, machine, now, lease_timeout, account)
        # ON CONFLICT DO NOTHING: a refused row is not an error, which on PostgreSQL would
        # abort the whole pass (or cost a savepoint's two round trips per claim).
        attempt_id = self._drv.insert(conn, attempts, values, returning_id=True, skip_conflict=True)
        return self._claimed(conn, run, machine, attempt_id, now, lease_timeout, acct)

    def _claimed(
        self, conn: Connection, run: Run, machine: Machine, attempt_id: int | None, now: float,
        lease_timeout: float, acct: VaultAccount | None,
    ) -> tuple[Run, Attempt, VaultAccount | None] | None:
        """The claim once its attempt is inserted (``attempt_id``; None if the store refused it)."""
        if attempt_id is None:
            # The schema's one-active-attempt constraint refused it: the machine (or run)
            # is already taken. Never two at once, whatever the code above believed.
            log.warning("claim refused by the store: machine %s or run %s already has an active attempt",
                        machine.id, run.id)
            return None
        claimed = self._set_run_state(
            conn, run, RunState.ASSIGNED, now, reason="scheduled", attempt_id=attempt_id,
            machine_id=machine.id, dispatches=run.dispatches + 1, current_attempt_id=attempt_id,
            current_machine_id=machine.id, not_before=None,
        )
        self._drv.update(conn, machines, {"idle_since": None}, {"id": machine.id})
        attempt = Attempt(
            id=attempt_id, run_id=run.id, machine_id=machine.id, number=run.dispatches + 1,
            state=AttemptState.ACTIVE, phase=AttemptPhase.ASSIGNED,
            mode=_attempt_mode(run), assigned_at=now,
            lease_expires_at=now + lease_timeout, account=acct.name if acct is not None else None,
        )
        if acct is not None:
            self._reserve(conn, acct, machine.id, attempt_id, run.id, now)
        return claimed, attempt, acct

    # -- attempt writes from agents -----------------------------------------------------------
    def attempt_preparing(self, attempt_id: int, machine_id: str, now: float) -> Attempt:
        def fn(conn: Connection, a: Attempt, run: Run | None) -> Attempt:
            assert run is not None
            if a.phase is AttemptPhase.ASSIGNED:
                self._drv.update(conn, attempts, {"phase": "preparing", "last_progress_at": now}, {"id": a.id})
                self._set_run_state(conn, run, RunState.PREPARING, now, reason="agent_accepted",
                                    attempt_id=a.id, machine_id=machine_id)
                a.phase = AttemptPhase.PREPARING
            return a

        return self._fenced("preparing", attempt_id, machine_id, now, fn)

    def attempt_start(self, attempt_id: int, machine_id: str, now: float) -> Attempt:
        def fn(conn: Connection, a: Attempt, run: Run | None) -> Attempt:
            assert run is not None
            if a.stop_requested_at is not None:
                raise Stopped((a.stop_reason or StopReason.CANCELLED).value)
            if a.phase is AttemptPhase.RUNNING:
                return a
            self._drv.update(conn, attempts, {"phase": "running", "started_at": now, "last_progress_at": now},
                             {"id": a.id})
            # An agent that starts without saying "preparing" first: the run passes through
            # it (its event recorded) in the same one write.
            via = (RunState.PREPARING, "agent_accepted") if a.phase is AttemptPhase.ASSIGNED else None
            self._set_run_state(conn, run, RunState.RUNNING, now, reason="automation_started",
                                attempt_id=a.id, machine_id=machine_id, via=via,
                                attempts_started=run.attempts_started + 1)
            a.phase, a.started_at = AttemptPhase.RUNNING, now
            return a

        return self._fenced("start", attempt_id, machine_id, now, fn)

    def attempt_renew(self, attempt_id: int, machine_id: str, now: float, lease_timeout: float) -> float:
        def fn(conn: Connection, a: Attempt, _run: Run | None) -> float:
            if a.stop_requested_at is not None:
                raise Stopped((a.stop_reason or StopReason.CANCELLED).value)
            expires = max(a.lease_expires_at, now + lease_timeout)  # a renewal never shortens a lease
            self._drv.update(conn, attempts, {"lease_expires_at": expires}, {"id": a.id})
            return expires - now

        return self._fenced("renew", attempt_id, machine_id, now, fn, needs_run=False)

    def attempt_progress(self, attempt_id: int, machine_id: str, step: str, data: dict[str, Any], now: float) -> None:
        def fn(conn: Connection, a: Attempt, _run: Run | None) -> None:
            self._drv.update(conn, attempts, {"last_progress_at": now, "progress_step": step}, {"id": a.id})
            self._event(conn, "attempt.progress", now, run_id=a.run_id, attempt_id=a.id,
                        machine_id=machine_id, reason=step, data=data)

        self._fenced("progress", attempt_id, machine_id, now, fn, needs_run=False)

    def attempt_event(self, attempt_id: int, machine_id: str, kind: str, data: dict[str, Any], now: float) -> None:
        def fn(conn: Connection, a: Attempt, _run: Run | None) -> None:
            # Pre-flight and playbook steps are progress too: a frozen playbook stalls.
            self._drv.update(conn, attempts, {"last_progress_at": now}, {"id": a.id})
            self._event(conn, kind, now, run_id=a.run_id, attempt_id=a.id, machine_id=machine_id,
                        reason=str(data.get("playbook") or data.get("state") or "") or None, data=data)

        self._fenced(kind, attempt_id, machine_id, now, fn, needs_run=False)

    def finish_attempt(
        self,
        attempt_id: int,
        machine_id: str,
        ending: Ending,
        *,
        output: dict[str, Any] | None,
        detail: str,
        now: float,
    ) -> Finished:
        def repeat(conn: Connection, row: Any) -> Finished | None:
            if row["machine_id"] == machine_id and row["state"] != "active" and row["ending"] == ending.value:
                # The same report again (its acknowledgement was lost): the same answer.
                a = rows.attempt(row)
                self._flush_events(conn)  # this batch may have ended it
                last = conn.execute(
                    select(events.c.to_state).where(events.c.kind == "run.state", events.c.attempt_id == a.id)
                    .order_by(events.c.id.desc()).limit(1)
                ).scalar()
                return Finished(self._get_run(conn, a.run_id), a, retried=last == RunState.QUEUED.value,
                                machine_quarantined=quarantines(ending, a.stop_reason))
            return None

        def fn(conn: Connection, a: Attempt, run: Run | None) -> Finished:
            return self._end_attempt(conn, a, ending, now=now, detail=detail, output=output, run=run)

        return self._fenced(f"finish:{ending.value}", attempt_id, machine_id, now, fn, repeat=repeat)

    def _end_attempt(
        self,
        conn: Connection,
        a: Attempt,
        ending: Ending,
        *,
        now: float,
        detail: str,
        output: dict[str, Any] | None = None,
        run: Run | None = None,  # the attempt's run, if the caller has read it already
    ) -> Finished:
        run = run or self._get_run(conn, a.run_id)
        spec = self._spec(conn, run.automation, run.version)
        if ending is Ending.STOPPED and a.stop_reason is None:
            # The agent stopped on its own (its backstop timer): classify it as we would have.
            a.stop_reason = overdue_reason(run, assigned_at=a.assigned_at, started_at=a.started_at,
                                           last_progress_at=a.last_progress_at, now=now)
            if a.stop_reason is not None:
                self._drv.update(conn, attempts, {"stop_reason": a.stop_reason.value}, {"id": a.id})
        d = decide(
            run, phase=a.phase, ending=ending, stop_reason=a.stop_reason,
            idempotent=bool(spec and spec.idempotent), has_reconcile=bool(spec and spec.has_reconcile),
            now=now, detail=detail, machine_id=a.machine_id,
        )
        self._drv.update(conn, attempts, {"state": d.attempt_state.value, "ended_at": now, "ending": ending.value,
                                          "reason": detail or d.message}, {"id": a.id, "state": "active"})
        self._event(conn, "attempt.ended", now, run_id=run.id, attempt_id=a.id, machine_id=a.machine_id,
                    from_state=a.phase.value, to_state=d.attempt_state.value, reason=ending.value,
                    data={"detail": detail} if detail else None)
        if d.retried:
            self._count_retry(conn, run, ending, d.code)
            after = self._set_run_state(
                conn, run, RunState.QUEUED, now, reason=d.code, message=d.message, attempt_id=a.id,
                machine_id=a.machine_id, queued_at=now, not_before=d.not_before,
                needs_reconcile=d.needs_reconcile, current_attempt_id=None, current_machine_id=None,
            )
        elif d.run_state is RunState.SUCCEEDED:
            after = self._set_run_state(conn, run, d.run_state, now, reason=d.code, message=d.message,
                                        attempt_id=a.id, machine_id=a.machine_id, finished_at=now, output=output)
        else:
            after = self._set_run_state(conn, run, d.run_state, now, reason=d.code, message=d.message,
                                        attempt_id=a.id, machine_id=a.machine_id, finished_at=now,
                                        error_code=d.code, error_message=d.message)
        machine_values: dict[str, Any] = {"idle_since": now}
        if a.phase is AttemptPhase.RUNNING:
            machine_values["runs_completed"] = Raw("runs_completed + 1")
        self._drv.update(conn, machines, machine_values, {"id": a.machine_id})
        if d.quarantine:
            self._quarantine(conn, a.machine_id, f"attempt {a.id} {ending.value}: {detail or d.message}", now)
        a.state, a.ended_at, a.ending = d.attempt_state, now, ending
        return Finished(after, a, retried=d.retried, machine_quarantined=d.quarantine)

    # -- sweeps --------------------------------------------------------------------------------
    def expire_leases(self, now: float) -> list[Finished]:
        with self._tx() as conn:
            expired = [rows.attempt(r) for r in conn.execute(
                select(attempts).where(attempts.c.state == "active", attempts.c.lease_expires_at < now)
            ).mappings()]
            ids = sorted(a.id for a in expired)
            self._lock_in_order(conn, ids, machines_of=ids)  # all at once, in every writer's order
            out = []
            fencing: dict[str, str] = {}  # pool → how its silent machines are fenced
            for candidate in expired:
                a = self._relock(conn, candidate)
                if a is None or a.lease_expires_at >= now:
                    continue  # ended or renewed meanwhile (another replica's write)
                f = self._end_attempt(
                    conn, a, Ending.LOST, now=now,
                    detail=f"no heartbeat from {a.machine_id}: its lease expired",
                )
                if f.retried and f.run.needs_reconcile:
                    # The machine may only be paused, its automation mid-effect: by the pool's
                    # policy, hold the retry back until the machine is fenced.
                    if f.run.pool not in fencing:
                        fencing[f.run.pool] = self._fencing(conn, f.run.pool)
                    mode = fencing[f.run.pool]
                    if mode != "agent":
                        f = self._hold_for_fence(conn, f, mode, now)
                out.append(f)
            return out

    def _fencing(self, conn: Connection, pool: str) -> str:
        stored = self._latest_policy(conn, pool)
        return PoolPolicy.model_validate(stored.policy).fencing if stored is not None else "agent"

    def _hold_for_fence(self, conn: Connection, f: Finished, mode: str, now: float) -> Finished:
        """Hold the run back until the lost attempt's own timeout has passed — or, with a
        provider, until the leader has powered its machine off and released it sooner."""
        a, run = f.attempt, f.run
        until = max(now, (a.started_at or a.assigned_at) + run.attempt_timeout)
        if run.not_before is None or run.not_before < until:
            self._drv.update(conn, runs, {"not_before": until}, {"id": run.id})
        self._event(conn, "run.fence_hold", now, run_id=run.id, attempt_id=a.id, machine_id=a.machine_id,
                    reason=mode, data={"until": until, "mode": mode})
        return replace(f, run=self._get_run(conn, run.id), fence=mode)

    def release_fence_hold(self, run_id: str, attempt_id: int, now: float, *, detail: str = "") -> bool:
        with self._tx() as conn:
            run = self._get_run(conn, run_id, lock=True)
            if run.state is not RunState.QUEUED or run.not_before is None or run.not_before <= now:
                return False
            latest = conn.execute(select(func.max(attempts.c.id)).where(attempts.c.run_id == run_id)).scalar_one()
            if latest != attempt_id:
                return False  # a newer attempt exists: the hold is not this fence's to release
            self._drv.update(conn, runs, {"not_before": now}, {"id": run_id})
            self._event(conn, "run.fence_released", now, run_id=run_id, attempt_id=attempt_id,
                        reason=detail or None)
            return True

    def _relock(self, conn: Connection, a: Attempt) -> Attempt | None:
        """Lock an attempt read without a lock (its run first) and return it as it is now,
        or None if it is no longer active."""
        conn.execute(_LOCK_RUN, {"id": a.run_id})
        row = conn.execute(_LOCK_ATTEMPT, {"id": a.id}).mappings().first()
        if row is None or row["state"] != "active":
            return None
        return rows.attempt(row)

    def expire_silent_machines(self, now: float, heartbeat_timeout: float) -> list[str]:
        """Connected machines silent past the heartbeat timeout are quarantined."""
        with self._tx() as conn:
            silent = [r[0] for r in conn.execute(
                select(machines.c.id).where(
                    machines.c.connected.is_(True), machines.c.health == "online",
                    machines.c.last_heartbeat_at < now - heartbeat_timeout,
                )
            )]
            for mid in silent:
                self._quarantine(conn, mid, f"no heartbeat for {heartbeat_timeout:g}s", now)
            return silent

    def sweep(self, now: float, stop_grace: float) -> SweepResult:
        result = SweepResult()
        with self._tx() as conn:
            late = conn.execute(select(runs).where(
                runs.c.state == "queued",
                or_(runs.c.deadline_at <= now, runs.c.queued_at + runs.c.queue_timeout <= now),
            ).with_for_update(skip_locked=True)).mappings()  # a run being claimed right now is not late
            for r in list(late):
                run = rows.run(r)
                why = queued_expiry(run, now)
                if why is None:
                    continue
                code, message = why
                result.expired_runs.append(self._set_run_state(
                    conn, run, RunState.TIMED_OUT, now, reason=code, message=message,
                    finished_at=now, error_code=code, error_message=message,
                ))

            # Only attempts that may be overdue: the database filters, Python decides.
            last_sign = func.coalesce(attempts.c.last_progress_at, attempts.c.started_at, attempts.c.assigned_at)
            pairs = conn.execute(
                select(attempts)
                .select_from(attempts.join(runs, runs.c.id == attempts.c.run_id))
                .where(
                    attempts.c.state == "active",
                    or_(
                        and_(attempts.c.stop_requested_at.is_not(None),
                             attempts.c.stop_requested_at <= now - stop_grace),
                        and_(
                            attempts.c.stop_requested_at.is_(None),
                            or_(
                                runs.c.cancel_requested_at.is_not(None),
                                runs.c.deadline_at <= now,
                                attempts.c.assigned_at + runs.c.attempt_timeout <= now,
                                last_sign + runs.c.progress_timeout <= now,
                            ),
                        ),
                    ),
                )
            ).mappings()
            overdue = [rows.attempt(r) for r in pairs]
            ids = sorted(a.id for a in overdue)
            self._lock_in_order(conn, ids, machines_of=ids)  # all at once, in every writer's order
            for candidate in overdue:
                a = self._relock(conn, candidate)
                if a is None:
                    continue
                if a.stop_requested_at is not None:
                    if now - a.stop_requested_at >= stop_grace:
                        result.finished.append(self._end_attempt(
                            conn, a, Ending.STOP_FORCED, now=now,
                            detail=f"the agent did not confirm the stop ({a.stop_reason}) within {stop_grace:g}s",
                        ))
                    continue
                run = self._get_run(conn, a.run_id)
                reason = overdue_reason(
                    run, assigned_at=a.assigned_at, started_at=a.started_at,
                    last_progress_at=a.last_progress_at, now=now,
                )
                if reason is not None:
                    order = self._request_stop(conn, a.id, reason, now)
                    if order is not None:
                        result.stop_orders.append(order)
        return result

    def pending_stops(self, machine_id: str | None = None, *, replica: str | None = None) -> list[StopOrder]:
        """Stops ordered and not yet confirmed, for one machine or a replica's machines (sent
        again when an agent reconnects, and now and then in case a notification was lost)."""
        with self._tx(write=False) as conn:
            q = select(attempts).where(
                attempts.c.state == "active", attempts.c.stop_requested_at.is_not(None),
            )
            if machine_id is not None:
                q = q.where(attempts.c.machine_id == machine_id)
            if replica is not None:
                q = q.where(attempts.c.machine_id.in_(select(machines.c.id).where(machines.c.replica == replica)))
            return [
                StopOrder(a.machine_id, a.id, a.run_id, a.stop_reason or StopReason.CANCELLED)
                for a in (rows.attempt(r) for r in conn.execute(q).mappings())
            ]

    # -- artifacts: store.artifacts --------------------------------------------------------------

    # -- webhooks ----------------------------------------------------------------------------------
    def due_webhooks(self, now: float, limit: int = 50) -> list[tuple[int, str, str]]:
        with self._tx(write=False) as conn:
            q = select(webhooks.c.id, webhooks.c.run_id, webhooks.c.url).where(
                webhooks.c.delivered_at.is_(None), webhooks.c.gave_up_at.is_(None),
                webhooks.c.next_at <= now,
            ).order_by(webhooks.c.next_at).limit(limit)
            return [(r[0], r[1], r[2]) for r in conn.execute(q)]

    def webhook_done(self, webhook_id: int, *, ok: bool, error: str | None, now: float) -> None:
        with self._tx() as conn:
            row = conn.execute(select(webhooks).where(webhooks.c.id == webhook_id)).mappings().one()
            tries = row["tries"] + 1
            if ok:
                conn.execute(update(webhooks).where(webhooks.c.id == webhook_id)
                             .values(tries=tries, delivered_at=now, last_error=None))
                self._event(conn, "webhook.delivered", now, run_id=row["run_id"], data={"tries": tries})
            elif tries >= WEBHOOK_MAX_TRIES:
                conn.execute(update(webhooks).where(webhooks.c.id == webhook_id)
                             .values(tries=tries, gave_up_at=now, last_error=error))
                self._event(conn, "webhook.gave_up", now, run_id=row["run_id"], reason=error, data={"tries": tries})
            else:
                delay = min(2.0 ** tries, 600.0)
                conn.execute(update(webhooks).where(webhooks.c.id == webhook_id)
                             .values(tries=tries, next_at=now + delay, last_error=error))
