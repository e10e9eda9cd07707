"""The fleet's figures for ``GET /metrics``, kept and read by the store — so that every
replica reports the same fleet, and a restart resets nothing.

Counters (runs submitted and finished, attempts started and retried, stale writes refused)
and the histograms' buckets (queue wait, run duration) are rows of ``metric_counts``, added
to by the transactions that make what they count: a run that finishes adds one to its
counter in the transaction that finishes it, so a counter is exactly the rows it counts
whichever replica did the work, and a rolled-back transaction counts nothing. A
transaction gathers its additions and writes them just before it commits, in one
``executemany`` (on PostgreSQL in the same pipeline as its other writes: no round trip
of its own), however many runs a batch finished.

On PostgreSQL a counter is spread over :data:`SHARDS` rows (the shard drawn per
transaction): replicas finishing runs of one pool at once would otherwise all wait for
one row's lock until each commits. The additions come last in a transaction and in one
order, so two transactions cannot deadlock over them. A scrape sums the shards.

A histogram's rows are its buckets' own counts (not cumulative: an observation adds to one
row), with ``le`` the bucket's upper bound, and the sum in a row of its own; the scrape
accumulates them. Gauges — runs not yet final, the oldest queued run, machines by status,
human tasks waiting — are counted from the tables at the scrape.

The runs' ``traceparent`` (the trace a run's submit belongs to, with OpenTelemetry on) is
read here too: dispatch continues the run's trace when it assigns an attempt.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import orjson
from sqlalchemy import Connection, bindparam, text

from ..models import Ending, Run, RunState

if TYPE_CHECKING:
    from .driver import Driver

#: where a transaction gathers its additions (``Connection.info``, emptied as it begins)
COUNTS = "deskfleet_counts"
#: rows per counter on PostgreSQL (see the module's docstring)
SHARDS = 8

# Families kept in metric_counts, named as /metrics names them (a counter without _total).
RUNS_SUBMITTED = "deskfleet_runs_submitted"
RUNS_FINISHED = "deskfleet_runs_finished"
ATTEMPTS_STARTED = "deskfleet_attempts_started"
ATTEMPTS_RETRIED = "deskfleet_attempts_retried"
STALE_WRITES = "deskfleet_stale_writes_refused"
QUEUE_WAIT = "deskfleet_run_queue_wait_seconds"
RUN_DURATION = "deskfleet_run_duration_seconds"
COUNTERS = (RUNS_SUBMITTED, RUNS_FINISHED, ATTEMPTS_STARTED, ATTEMPTS_RETRIED, STALE_WRITES)
#: a histogram's sum is the row named thus
SUM = ":sum"

#: bucket bounds, in seconds: a run waits from a moment to an hour for a machine, and runs
#: for seconds to hours
QUEUE_WAIT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
RUN_DURATION_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0)
HISTOGRAMS = {QUEUE_WAIT: QUEUE_WAIT_BUCKETS, RUN_DURATION: RUN_DURATION_BUCKETS}

#: what a stale write was, as a label: the kinds of write there are (an agent's event kinds
#: are its own: one label value for them all)
_STALE_OPS = frozenset({"preparing", "start", "renew", "progress", "artifact", "finish"})
UNFINISHED = tuple(s.value for s in RunState if not s.final)
HUMAN_WAITING = ("open", "claimed")

_ADD = text(
    "INSERT INTO metric_counts (name, labels, shard, value) VALUES (:name, :labels, :shard, :value)"
    " ON CONFLICT (name, labels, shard) DO UPDATE SET value = metric_counts.value + excluded.value"
)
_COUNTS = text("SELECT name, labels, SUM(value) FROM metric_counts GROUP BY name, labels")
_POOLS = text("SELECT name FROM pools")
_RUNS = text(
    "SELECT pool, state, COUNT(*), MIN(queued_at) FROM runs"
    f" WHERE state IN ({', '.join(repr(s) for s in UNFINISHED)}) GROUP BY pool, state"
)
# Machine.status in SQL (as Store.count_machines counts it), for every pool at once.
_MACHINES = text(
    "SELECT m.pool, CASE"
    " WHEN EXISTS (SELECT 1 FROM attempts a WHERE a.machine_id = m.id AND a.state = 'active') THEN 'busy'"
    " WHEN NOT m.connected THEN 'offline' WHEN m.health = 'quarantined' THEN 'quarantined'"
    " WHEN m.admin = 'cordoned' THEN 'cordoned' WHEN m.admin = 'draining' THEN 'drained'"
    " ELSE 'ready' END AS status, COUNT(*) FROM machines m GROUP BY 1, 2"
)
_TRACEPARENTS = text("SELECT id, traceparent FROM runs WHERE id IN :ids AND traceparent IS NOT NULL").bindparams(
    bindparam("ids", expanding=True))
_HUMAN = text(
    "SELECT pool, state, COUNT(*) FROM human_tasks WHERE state IN ('open', 'claimed') GROUP BY pool, state"
)


@dataclass(slots=True)
class FleetFigures:
    """The fleet as the store saw it at ``at``: what ``GET /metrics`` shows, whichever
    replica answers."""

    at: float
    #: (family, labels, value): counters, and histograms' bucket counts (``le``) and sums
    #: (family + SUM), each summed over its shards
    counts: list[tuple[str, dict[str, str], float]] = field(default_factory=list)
    pools: list[str] = field(default_factory=list)
    runs: dict[tuple[str, str], int] = field(default_factory=dict)  # (pool, state) → unfinished runs
    oldest_queued: dict[str, float] = field(default_factory=dict)  # pool → queued_at of its oldest queued run
    machines: dict[tuple[str, str], int] = field(default_factory=dict)  # (pool, status) → machines
    human_tasks: dict[tuple[str, str], int] = field(default_factory=dict)  # (pool, state) → tasks waiting


def bucket(value: float, bounds: Sequence[float]) -> str:
    """The ``le`` of the bucket an observation falls in: the least bound it does not exceed."""
    i = bisect.bisect_left(bounds, value)
    return "+Inf" if i == len(bounds) else repr(float(bounds[i]))


def _key(labels: Mapping[str, str]) -> str:
    return orjson.dumps(labels, option=orjson.OPT_SORT_KEYS).decode()


class MetricOps:
    """Counting as transactions go, and reading the figures; mixed into SQLStore."""

    _pg: bool
    _drv: Driver

    if TYPE_CHECKING:
        def _tx(self, write: bool = True) -> AbstractContextManager[Connection]: ...

    # -- counting, within the transaction that makes what is counted --------------------------
    @staticmethod
    def _count(conn: Connection, family: str, labels: Mapping[str, str], value: float = 1.0) -> None:
        gathered: dict[tuple[str, str], float] = conn.info[COUNTS]
        key = (family, _key(labels))
        gathered[key] = gathered.get(key, 0.0) + value

    def _observe(self, conn: Connection, family: str, labels: Mapping[str, str], value: float) -> None:
        if not math.isfinite(value):
            return
        value = max(value, 0.0)  # clocks of replicas differ a little: never a negative wait
        self._count(conn, family, {**labels, "le": bucket(value, HISTOGRAMS[family])})
        self._count(conn, family + SUM, labels, value)

    def _count_run(self, conn: Connection, run: Run, to: RunState, now: float, error_code: str | None) -> None:
        """A run moved to ``to`` (``SQLStore._set_run_state``): an assignment starts an attempt
        after a wait in the queue; a final state ends the run."""
        if to is RunState.ASSIGNED:
            self._count(conn, ATTEMPTS_STARTED, {"pool": run.pool})
            self._observe(conn, QUEUE_WAIT, {"pool": run.pool, "automation": run.automation}, now - run.queued_at)
        elif to.final:
            self._count(conn, RUNS_FINISHED, {"pool": run.pool, "state": to.value, "error_code": error_code or ""})
            self._observe(conn, RUN_DURATION, {"pool": run.pool, "automation": run.automation}, now - run.created_at)

    def _count_retry(self, conn: Connection, run: Run, ending: Ending, reason: str) -> None:
        self._count(conn, ATTEMPTS_RETRIED, {"pool": run.pool, "ending": ending.value, "reason": reason})

    def _count_stale(self, conn: Connection, op: str) -> None:
        kind = op.partition(":")[0]
        self._count(conn, STALE_WRITES, {"op": kind if kind in _STALE_OPS else "event"})

    def _flush_counts(self, conn: Connection) -> None:
        """Write what the transaction counted (the last of its writes, in one order)."""
        gathered: dict[tuple[str, str], float] = conn.info.get(COUNTS) or {}
        if not gathered:
            return
        conn.info[COUNTS] = {}
        shard = random.randrange(SHARDS) if self._pg else 0
        self._drv.execute_many(conn, _ADD, [
            {"name": name, "labels": labels, "shard": shard, "value": value}
            for (name, labels), value in sorted(gathered.items())])

    # -- reading ----------------------------------------------------------------------------------
    def fleet_figures(self, now: float) -> FleetFigures:
        out = FleetFigures(at=now)
        # One snapshot for every figure (PostgreSQL: REPEATABLE READ would cost a round trip
        # of its own; a scrape's reads a few milliseconds apart are as good as one).
        with self._tx(write=False) as conn:
            out.counts = [(name, orjson.loads(labels), float(value))
                          for name, labels, value in conn.execute(_COUNTS)]
            out.pools = sorted(r[0] for r in conn.execute(_POOLS))
            for pool, state, n, oldest in conn.execute(_RUNS):
                out.runs[(pool, state)] = int(n)
                if state == RunState.QUEUED.value and oldest is not None:
                    out.oldest_queued[pool] = float(oldest)
            out.machines = {(pool, status): int(n) for pool, status, n in conn.execute(_MACHINES)}
            out.human_tasks = {(pool, state): int(n) for pool, state, n in conn.execute(_HUMAN)}
        return out

    def run_traceparents(self, run_ids: Sequence[str]) -> dict[str, str]:
        """The trace each run's submit belongs to (runs submitted without one are left out)."""
        if not run_ids:
            return {}
        with self._tx(write=False) as conn:
            return {rid: tp for rid, tp in conn.execute(_TRACEPARENTS, {"ids": list(run_ids)})}
