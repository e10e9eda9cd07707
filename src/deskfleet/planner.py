"""The capacity planner: a day's demand replayed through the real scheduler and pool
controller on simulated machines, to find the smallest pool that meets a queue-wait target.

``deskfleet plan --demand day.csv`` reads the day (:func:`read_demand`: when each run
arrives and how long it keeps a machine busy), then evaluates pool policies against it
(:func:`evaluate`) and searches them (:func:`plan`).

**What is real.** Each evaluation is a deskfleet server's own parts on a fresh SQLite
database: runs are submitted (``store.submit``), matched to machines by the scheduler
(``store.schedule`` with the default :class:`~deskfleet.scheduler.Policy`: first come,
first served, the machine idle longest), started and finished through the store as an
agent would (``attempt_start``, ``finish_attempt``); the pool's
:class:`~deskfleet.pools.PoolPolicy` is carried out by the real
:class:`~deskfleet.fleet.controller.Controller`, a pass every ``tick`` seconds, with its
demand read from the store, its warm buffer, schedule floors, stabilisation window and
drains. What the planner reports is what that code did.

**What is simulated.** Time is a fake clock that jumps from one event to the next (an
arrival, a run's end, a machine coming up, a controller pass), so a day takes seconds.
Machines come from a :class:`~deskfleet.providers.FakeProvider` on that clock: one
created is running ``boot`` seconds later, and its agent enrols and connects at once (the
``boot`` is create-to-ready, all of it); one destroyed is gone at once. A run occupies its
machine for exactly its ``seconds`` and succeeds. The scheduler is asked whenever a run
arrives or a machine frees up or comes up, as the server's dispatch is woken.

**The measures.** A run's queue wait is its first attempt's ``assigned_at`` less its
``created_at`` (its submit), as the store recorded them; a run still queued when the
replay gives up (:data:`DRAIN_LIMIT` after the day) waits forever. Percentiles are
nearest-rank. Machine-hours count every machine the provider holds (booting, idle, busy
or draining: all of them are paid for) over the day's hours, sampled at each pass.

**The search** (:func:`plan`): first the smallest static pool (``min = max = N``) that
meets the target, by bisection between no machine (never meets) and the most runs that
would run at once if none waited (always meets). Then autoscaled pools that never exceed
that N (:func:`autoscaled_policy`): from the demand's hourly profile (the most runs at
once in each hour, if none waited) each hour wants ``level`` times that; the day is cut
into a few blocks, each at its highest hour; the lowest block is ``min``, the others are
schedule floors; the warm buffer is the policy's default (arrival rate times the boot, at
most 10). The smallest ``level`` of :data:`LEVELS` that meets the target is found by
bisection too. Both bisections take it that more machines never make the waits longer:
so with a first-come queue, though not a law (who goes first among equals may change).
A candidate is dropped as soon as too many runs have waited too long (``stop_on_miss``),
so misses cost a fraction of a day.

What the model leaves out — machine failures, app restarts, pre-flight time, retries,
queue timeouts, accounts and affinity — is listed in docs/planner.md.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import heapq
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ParamSpec, TypeVar, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .errors import ConfigError
from .fleet.controller import Controller
from .models import AutomationSpec, Ending, Pool, RunSpec
from .pools import PoolPolicy, Recycle, ScheduleFloor
from .providers import FakeProvider, ProviderState
from .scheduler import Policy
from .store import Heartbeat, Store, open_store
from .store.runner import StoreRunner

P = ParamSpec("P")
T = TypeVar("T")

DAY = 86_400.0
POOL = "planned"
PROVIDER = "simulated"
#: the day of a demand file whose rows give times of day only (a Wednesday, far from any
#: change of daylight saving time, so that every hour of it is an hour long)
DEFAULT_DATE = dt.date(2026, 1, 14)
#: seconds after the day a replay waits for its queue to drain before it calls the rest "never"
DRAIN_LIMIT = 3600.0
#: schedule floors tried, as fractions of each hour's most runs at once (bisected)
LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)
#: the most blocks an autoscaled pool's day is cut into (its min and up to four schedule floors)
BLOCKS = 5
#: the lease an assignment takes: never expired here, as the simulated agents never fall silent
LEASE = 60.0
COLUMNS = ("at", "automation", "seconds")


# -- the demand ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Arrival:
    """One run of the day."""

    at: float  # seconds from the day's start
    automation: str
    seconds: float  # how long its run keeps a machine busy


@dataclass(frozen=True)
class Demand:
    """A day's runs, in the order they arrive."""

    arrivals: tuple[Arrival, ...]
    date: dt.date  # the day the runs arrive on (for the controller's schedule floors)
    zone: str  # the time zone of the day's clock (an IANA name)

    @property
    def hours(self) -> int:
        """The whole hours from midnight that the arrivals span."""
        return max(1, math.ceil((self.arrivals[-1].at + 1e-9) / 3600))

    @property
    def start(self) -> float:
        """The day's start (midnight in ``zone``) in epoch seconds: the replay's clock."""
        return dt.datetime.combine(self.date, dt.time(), ZoneInfo(self.zone)).timestamp()

    def work_hours(self) -> float:
        return sum(a.seconds for a in self.arrivals) / 3600

    def busy_peaks(self) -> list[int]:
        """For each hour, the most runs at once if none waited: what that hour's floor is
        scaled from. A run busy across the start of an hour counts in that hour too."""
        # an end before a start at the same instant: the machine is free for the next run
        edges = sorted([(a.at, 1) for a in self.arrivals] + [(a.at + a.seconds, -1) for a in self.arrivals])
        peaks = [0] * self.hours
        running = hour = 0
        for at, step in edges:
            while hour < min(int(at // 3600), self.hours - 1):
                hour += 1
                peaks[hour] = running
            running += step
            peaks[hour] = max(peaks[hour], running)
        return peaks


def read_demand(path: Path, *, zone: str = "UTC") -> Demand:
    """The runs of a demand file (docs/planner.md): a header line naming the columns ``at``
    (seconds from the day's start, an ISO time of day, or an ISO date-time), ``seconds``
    (the run's duration on a machine) and, optionally, ``automation``. Other columns are
    ignored. A row that cannot be read is a :class:`ConfigError` naming its line and column."""
    try:
        tz = ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{zone!r} is not a time zone (IANA names, e.g. 'Europe/Berlin' or 'UTC')") from None
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            # (the line a row ends on, its fields), blank rows left out
            rows = [(reader.line_num, row) for row in reader if any(field.strip() for field in row)]
    except OSError as exc:
        raise ConfigError(f"cannot read the demand file {path}: {exc.strerror}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"{path} is not a CSV text file: {exc}") from None
    if not rows:
        raise ConfigError(f"{path} is empty: it needs a header line ({','.join(COLUMNS)}) and a row per run")
    (_, header), body = rows[0], rows[1:]
    names = [h.strip().lower() for h in header]
    for needed in ("at", "seconds"):
        if needed not in names:
            raise ConfigError(f"{path}, line 1: no column {needed!r} in the header (it names: {', '.join(names)}); "
                              f"the columns are {', '.join(COLUMNS)}")
    col = {name: names.index(name) for name in COLUMNS if name in names}
    if not body:
        raise ConfigError(f"{path} has a header but no runs")
    arrivals: list[Arrival] = []
    dates: dict[dt.date, int] = {}  # the day each date-time names → the first line naming it
    for line, row in body:
        if len(row) != len(names):
            raise ConfigError(f"{path}, line {line}: {len(row)} fields, but the header names {len(names)}")

        def bad(column: str, why: str, line: int = line, row: list[str] = row) -> ConfigError:
            return ConfigError(f"{path}, line {line}, column {column!r}: {row[col[column]].strip()!r} {why}")

        at, date = _time_of_day(row[col["at"]].strip(), tz)
        if at is None:
            raise bad("at", "is neither seconds from the day's start, an ISO time of day (08:15:30) "
                            "nor an ISO date-time (2026-12-07T08:15:30)")
        if not 0 <= at < DAY:
            raise bad("at", "is outside the day: from 0 to 86,400 seconds from its start")
        if date is not None:
            dates.setdefault(date, line)
            if len(dates) > 1:
                first, first_line = next(iter(dates.items()))
                raise bad("at", f"is not on {first}, the day of line {first_line}: a demand file is one day")
        try:
            seconds = float(row[col["seconds"]])
        except ValueError:
            raise bad("seconds", "is not a number of seconds") from None
        if not 0 < seconds <= DAY:  # nan too
            raise bad("seconds", "is not a run's duration: above 0, at most a day")
        automation = row[col["automation"]].strip() if "automation" in col else ""
        arrivals.append(Arrival(at, automation or "job", seconds))
    arrivals.sort(key=lambda a: a.at)
    return Demand(tuple(arrivals), next(iter(dates), DEFAULT_DATE), zone)


def _time_of_day(value: str, tz: ZoneInfo) -> tuple[float | None, dt.date | None]:
    """Seconds from midnight of ``value`` and, for a date-time, its date (in ``tz``)."""
    try:
        seconds = float(value)
        return (seconds if math.isfinite(seconds) else None), None
    except ValueError:
        pass
    try:
        t = dt.time.fromisoformat(value)
        return t.hour * 3600 + t.minute * 60 + t.second + t.microsecond / 1e6, None
    except ValueError:
        pass
    try:
        at = dt.datetime.fromisoformat(value)
    except ValueError:
        return None, None
    at = at.replace(tzinfo=tz) if at.tzinfo is None else at.astimezone(tz)
    # By the wall clock, as the schedule floors' crons count hours.
    midnight = dt.datetime.combine(at.date(), dt.time(), tz)
    return (at - midnight).total_seconds(), at.date()


# -- the target and what a policy achieves -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WaitTarget:
    """The queue waits a pool must keep: a 95th and/or a 99th percentile, in seconds."""

    p95: float | None = None
    p99: float | None = None

    def __post_init__(self) -> None:
        if self.p95 is None and self.p99 is None:
            raise ConfigError("a wait target needs a 95th or a 99th percentile (--wait-p95, --wait-p99)")
        for name, value in self.limits():
            if not 0 <= value < math.inf:
                raise ConfigError(f"a wait target's {name} is seconds, 0 or more, not {value:g}")

    def limits(self) -> list[tuple[str, float]]:
        return [(name, limit) for name, limit in (("p95", self.p95), ("p99", self.p99)) if limit is not None]

    def met_by(self, ordered: Sequence[float]) -> bool:
        """Whether the sorted waits keep every limit."""
        return all(percentile(ordered, QUANTILES[name]) <= limit for name, limit in self.limits())

    def __str__(self) -> str:
        return " and ".join(f"{name} ≤ {limit:g} s" for name, limit in self.limits())


QUANTILES = {"p50": 0.5, "p95": 0.95, "p99": 0.99, "max": 1.0}


def percentile(ordered: Sequence[float], q: float) -> float:
    """The nearest-rank percentile of sorted values: a wait some run actually had."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else 0.0


@dataclass(frozen=True, slots=True)
class Sample:
    """The pool at one controller pass, for the plot."""

    at: float  # seconds from the day's start
    up: int  # machines the provider holds: booting, idle, busy or draining
    busy: int


@dataclass(frozen=True)
class Evaluation:
    """What one policy did with the day."""

    label: str
    policy: PoolPolicy
    target: WaitTarget
    waits: tuple[float, ...]  # each run's queue wait, in arrival order (inf: never started)
    samples: tuple[Sample, ...]  # one per controller pass during the day
    created: int  # machines the controller created
    wall: float  # seconds the replay took
    #: seconds into the day at which the replay stopped, the target already missed (None: it ran to the end)
    stopped_at: float | None = None

    @cached_property
    def ordered(self) -> list[float]:
        return sorted(self.waits)

    @property
    def meets(self) -> bool:
        return self.stopped_at is None and self.target.met_by(self.ordered)

    def wait(self, name: str) -> float:
        """A percentile of the waits by name: p50, p95, p99 or max."""
        return percentile(self.ordered, QUANTILES[name])

    @property
    def machine_hours(self) -> float:
        return sum(s.up for s in self.samples) * _step(self.samples) / 3600

    @property
    def most_machines(self) -> int:
        return max((s.up for s in self.samples), default=0)

    def summary(self) -> str:
        if self.stopped_at is not None:
            return (f"{self.label}: misses {self.target} — stopped at {_clock(self.stopped_at)}, too many runs "
                    f"had waited longer [{self.wall:.1f} s]")
        return (f"{self.label}: wait p95 {format_wait(self.wait('p95'))}, p99 {format_wait(self.wait('p99'))} — "
                f"{'meets' if self.meets else 'misses'} {self.target}; {self.machine_hours:.1f} machine-hours, "
                f"at most {self.most_machines} machines, {self.created} created [{self.wall:.1f} s]")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label, "policy": policy_json(self.policy), "meets": self.meets}
        if self.stopped_at is not None:
            return {**out, "stopped_at": _clock(self.stopped_at), "replay_seconds": round(self.wall, 2)}
        return {**out, "wait": {name: _num(self.wait(name)) for name in QUANTILES},
                "never_started": sum(math.isinf(w) for w in self.waits),
                "machine_hours": round(self.machine_hours, 2), "most_machines": self.most_machines,
                "created": self.created, "replay_seconds": round(self.wall, 2)}


def policy_json(policy: PoolPolicy) -> dict[str, Any]:
    """What the planner decides of a policy, to paste into a pool's (with its provider and
    machine template added)."""
    full = policy.model_dump(mode="json")
    return {k: full[k] for k in ("min", "max", "schedule", "warm", "scale_in")}


def _step(samples: Sequence[Sample]) -> float:
    return samples[1].at - samples[0].at if len(samples) > 1 else 0.0


def format_wait(value: float) -> str:
    """A wait for people: whole seconds, or never."""
    return "never" if math.isinf(value) else f"{value:.0f} s"


def _num(value: float) -> float | None:
    return None if math.isinf(value) else round(value, 2)


def _clock(seconds: float) -> str:
    return f"{int(seconds // 3600):02d}:{int(seconds // 60 % 60):02d}"


# -- one replay ----------------------------------------------------------------------------------------


def evaluate(demand: Demand, policy: PoolPolicy, target: WaitTarget, *, boot: float = 180.0, tick: float = 5.0,
             label: str = "policy", stop_on_miss: bool = False) -> Evaluation:
    """Replay ``demand`` with a pool of ``policy`` (its machines made by the simulated
    provider, whatever it names: :func:`simulated`) on a database of its own, gone
    afterwards. ``stop_on_miss``:
    stop as soon as too many runs have waited too long for the target to be met (a search
    needs only to know that it was missed)."""
    with tempfile.TemporaryDirectory(prefix="deskfleet-plan-") as tmp:
        store = open_store(f"sqlite:///{Path(tmp) / 'plan.db'}", sqlite_synchronous="OFF")
        try:
            replay = _Replay(store, demand, policy, target, boot=boot, tick=tick, stop_on_miss=stop_on_miss)
            return asyncio.run(replay.run(label))
        finally:
            store.close()


class _Inline(StoreRunner):
    """The store runner without its worker thread, and with a memory. The server keeps its
    event loop free of database calls; the replay's loop has nothing else to do, and a
    thread hop per call would cost more than most calls. Nothing writes to the store
    between two of the controller's reads but the replay itself and the controller, so a
    read answered again before any write (:meth:`forget`) is what the store would answer:
    a quiet hour's passes do not read the same machines again and again."""

    #: reads answered from memory until the next write
    KEPT = frozenset({"list_pools", "pool_policy", "list_machines", "get_machine"})
    #: reads asked every time: the demand changes with the time it is asked about; the event log is read rarely
    ASKED = frozenset({"pool_demand", "events", "last_event_id"})

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self._read: dict[tuple[str, tuple[Any, ...], tuple[tuple[str, Any], ...]], Any] = {}

    def forget(self) -> None:
        """Something was written: every read is asked again."""
        self._read.clear()

    async def __call__(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        name = getattr(fn, "__name__", "")
        if name in self.KEPT:
            key = (name, args, tuple(sorted(kwargs.items())))
            if key not in self._read:
                self._read[key] = fn(*args, **kwargs)
            return cast(T, self._read[key])
        if name not in self.ASKED:
            self._read.clear()  # a write, or a call not known to be a read: no memory survives it
        return fn(*args, **kwargs)


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class _Replay:
    """One day on a fake clock: runs ending, machines coming up, arrivals and the
    controller's passes, each at its time and, when they coincide, in that order."""

    def __init__(self, store: Store, demand: Demand, policy: PoolPolicy, target: WaitTarget, *, boot: float,
                 tick: float, stop_on_miss: bool) -> None:
        self.store, self.demand, self.policy, self.target = store, demand, policy, target
        self.boot, self.tick, self.stop_on_miss = boot, tick, stop_on_miss
        self.day_start = demand.start
        self.day_end = self.day_start + demand.hours * 3600
        # The clock starts early enough for the pool's first machines to be up when the day
        # begins, a whole number of passes before it (so that a pass falls on its start).
        self.clock = _Clock(self.day_start - math.ceil((boot + 2 * tick) / tick) * tick)
        self.fake = FakeProvider(clock=self.clock, boot_latency=boot, name=PROVIDER)
        self.runner = _Inline(store)
        self.controller = Controller(store, self.runner, {PROVIDER: self.fake}, leads=lambda: True, tick=tick,
                                     clock=self.clock, ready_time=boot)
        self.specs = [AutomationSpec(name, "1", idempotent=True)
                      for name in sorted({a.automation for a in demand.arrivals})]
        n = len(demand.arrivals)
        self.waits = [math.inf] * n
        self.index: dict[str, int] = {}  # run id → its arrival
        self.queued: dict[int, float] = {}  # arrivals waiting → when they arrived, in arrival order
        self.ending: list[tuple[float, int, str]] = []  # (when, attempt, machine): a heap
        self.coming: list[tuple[float, str]] = []  # (when its agent enrols, machine): a heap
        self.seen: set[str] = set()  # machines made so far
        self.enrolled: set[str] = set()
        self.acted = (0, 0)  # the provider's creates and destroys when it was last listed
        self.up = self.busy = 0
        # runs that may wait longer than each limit, and how many have so far
        self.allowed = {limit: n - math.ceil(QUANTILES[name] * n) for name, limit in target.limits()}
        self.late = dict.fromkeys(self.allowed, 0)
        self.samples: list[Sample] = []

    async def run(self, label: str) -> Evaluation:
        began = time.monotonic()
        store, now = self.store, self.clock.now
        store.put_pool(Pool(POOL, allow_wait_for_capacity=True), now)
        store.put_automations(self.specs, now)
        store.put_pool_policy(POOL, simulated(self.policy).model_dump(mode="json"), expected_version=0, now=now)
        arrivals = self.demand.arrivals
        next_pass, i, stopped = now, 0, None
        while True:
            t = min(next_pass, self.ending[0][0] if self.ending else math.inf,
                    self.coming[0][0] if self.coming else math.inf,
                    self.day_start + arrivals[i].at if i < len(arrivals) else math.inf)
            done = i == len(arrivals) and not self.queued and not self.busy
            if t >= self.day_end and (done or t > self.day_end + DRAIN_LIMIT):
                break
            self.clock.now = t
            woken = False
            while self.ending and self.ending[0][0] <= t:
                _, attempt, machine = heapq.heappop(self.ending)
                self._write(store.finish_attempt, attempt, machine, Ending.SUCCEEDED, output={}, detail="", now=t)
                self.busy -= 1
                woken = True
            while self.coming and self.coming[0][0] <= t:
                self._enrol(heapq.heappop(self.coming)[1], t)
                woken = True
            while i < len(arrivals) and self.day_start + arrivals[i].at <= t:
                run, _ = self._write(store.submit, RunSpec(arrivals[i].automation, pool=POOL), request_hash=None, now=t)
                self.index[run.id] = i
                self.queued[i] = t
                i += 1
                woken = True
            if t >= next_pass:
                await self._pass(t)
                next_pass += self.tick
                woken = True  # a pass may have put a drained machine back in service
                if self.stop_on_miss and self._missed(t):
                    stopped = t - self.day_start
                    break
            if woken and self.queued:
                self._schedule(t)
        return Evaluation(label, self.policy, self.target, tuple(self.waits), tuple(self.samples),
                          self.fake.actions["create"], time.monotonic() - began, stopped)

    async def _pass(self, t: float) -> None:
        """The controller's pass; then the machines it made are followed (their agents
        enrol once they run) and those it destroyed go offline."""
        await self.controller.tick()
        acted = (self.fake.actions["create"], self.fake.actions["destroy"])
        if acted != self.acted:  # machines come and go only by the controller's hand
            self.acted, self.up = acted, 0
            for m in await self.fake.list(pool=POOL):
                if m.name not in self.seen:
                    self.seen.add(m.name)
                    heapq.heappush(self.coming, (m.created_at + self.boot, m.name))
                if m.state in (ProviderState.TERMINATING, ProviderState.TERMINATED):
                    if m.name in self.enrolled:
                        self.enrolled.discard(m.name)
                        self._write(self.store.disconnect_machine, m.name, t)
                else:
                    self.up += 1
        if self.day_start <= t < self.day_end:
            self.samples.append(Sample(t - self.day_start, self.up, self.busy))

    def _missed(self, t: float) -> bool:
        """Whether more runs have waited longer than a limit than the target allows (those
        still waiting included): nothing later can bring their waits back under it."""
        for limit, allowed in self.allowed.items():
            waiting = 0
            for arrived in self.queued.values():  # the longest waiting first
                if t - arrived <= limit:
                    break
                waiting += 1
            if self.late[limit] + waiting > allowed:
                return True
        return False

    def _write(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """A write of the replay's own (what agents and clients would write)."""
        self.runner.forget()
        return fn(*args, **kwargs)

    def _enrol(self, name: str, t: float) -> None:
        self._write(self.store.enrol_machine, name, pool=POOL, labels={}, key_hash="-", now=t)
        self._write(self.store.connect_machine, name, boot_id="-", agent_version="planner", automations=self.specs,
                    labels=None, heartbeat=Heartbeat(name, t), lease_timeout=LEASE, now=t)
        self.enrolled.add(name)

    def _schedule(self, t: float) -> None:
        for a in self._write(self.store.schedule, Policy(), t, LEASE):
            self._write(self.store.attempt_start, a.attempt.id, a.attempt.machine_id, t)
            i = self.index[a.run.id]
            del self.queued[i]
            wait = self.waits[i] = a.attempt.assigned_at - a.run.created_at
            for limit in self.late:
                self.late[limit] += wait > limit
            heapq.heappush(self.ending, (t + self.demand.arrivals[i].seconds, a.attempt.id, a.attempt.machine_id))
            self.busy += 1


# -- the search ----------------------------------------------------------------------------------------


def static_policy(machines: int) -> PoolPolicy:
    """A pool of ``machines`` all day: its floor and its cap."""
    return PoolPolicy(min=machines, max=machines)


def autoscaled_policy(demand: Demand, level: float, cap: int) -> PoolPolicy:
    """A pool whose floors follow the demand: each hour's floor is ``level`` times the most
    runs that hour would have at once if none waited, the day cut into at most
    :data:`BLOCKS` blocks (each at its highest hour's floor) where that costs the fewest
    floor machine-hours; the lowest block is ``min``, the others are schedule floors. Never
    more than ``cap`` machines; the warm buffer is the policy's default."""
    floors = [min(cap, math.ceil(level * peak - 1e-9)) for peak in demand.busy_peaks()]
    blocks = _blocks(floors, BLOCKS)
    low = min(floor for _, _, floor in blocks)
    schedule = [ScheduleFloor(cron=f"0 {first} * * *", hours=hours, floor=floor, timezone=demand.zone)
                for first, hours, floor in blocks if floor > low]
    return PoolPolicy(min=low, max=cap, schedule=schedule)


def _blocks(floors: Sequence[int], most: int) -> list[tuple[int, int, int]]:
    """(first hour, hours, floor) of at most ``most`` consecutive blocks covering ``floors``,
    each at its highest, with the least area: a schedule short enough to read (and for the
    controller to check at every pass) that gives away the fewest machine-hours."""
    n = len(floors)
    # best[k][j]: the least area covering hours [0, j) with k blocks; cut[k][j]: where its last block starts
    best = [[math.inf] * (n + 1) for _ in range(most + 1)]
    cut = [[0] * (n + 1) for _ in range(most + 1)]
    best[0][0] = 0
    for k in range(1, most + 1):
        for j in range(1, n + 1):
            top = 0
            for i in range(j - 1, -1, -1):  # the last block is [i, j)
                top = max(top, floors[i])
                if best[k - 1][i] + top * (j - i) < best[k][j]:
                    best[k][j], cut[k][j] = best[k - 1][i] + top * (j - i), i
    k = min(range(1, most + 1), key=lambda k: (best[k][n], k))
    blocks: list[tuple[int, int, int]] = []
    j = n
    while j > 0:
        i = cut[k][j]
        floor = max(floors[i:j])
        if blocks and blocks[0][2] == floor:  # one block, not two at the same floor
            blocks[0] = (i, blocks[0][1] + j - i, floor)
        else:
            blocks.insert(0, (i, j - i, floor))
        j, k = i, k - 1
    return blocks


@dataclass(frozen=True)
class Plan:
    """The search's answer: the smallest static pool meeting the target, the autoscaled
    pool with the fewest machine-hours meeting it (or the policy given to evaluate), and
    every candidate on the way."""

    demand: Demand
    target: WaitTarget
    boot: float
    tick: float
    static: Evaluation
    autoscaled: Evaluation | None  # None: no autoscaled pool within the static pool's size meets the target
    candidates: tuple[Evaluation, ...]  # in the order they were replayed
    given: bool = False  # ``autoscaled`` is the policy given to evaluate, not one searched for

    @property
    def recommended(self) -> Evaluation:
        a = self.autoscaled
        return a if a is not None and a.meets and a.machine_hours < self.static.machine_hours else self.static

    @property
    def ratio(self) -> float | None:
        """The autoscaled pool's machine-hours over the static pool's."""
        if self.autoscaled is None or not self.autoscaled.meets or not self.static.machine_hours:
            return None
        return self.autoscaled.machine_hours / self.static.machine_hours

    def to_json(self) -> dict[str, Any]:
        d = self.demand
        return {
            "demand": {"runs": len(d.arrivals), "hours": d.hours, "date": d.date.isoformat(), "timezone": d.zone,
                       "work_hours": round(d.work_hours(), 2), "most_at_once": max(d.busy_peaks()),
                       "hourly_most_at_once": d.busy_peaks()},
            "target": {name: limit for name, limit in self.target.limits()},
            "boot": self.boot, "tick": self.tick,
            "static": {"machines": self.static.policy.min, **self.static.to_json()},
            "autoscaled": self.autoscaled.to_json() if self.autoscaled is not None else None,
            "recommended": "static" if self.recommended is self.static else "autoscaled",
            "machine_hours_ratio": round(self.ratio, 3) if self.ratio is not None else None,
            "candidates": [c.summary() for c in self.candidates],
        }


def plan(demand: Demand, target: WaitTarget, *, boot: float = 180.0, tick: float = 5.0,
         policy: PoolPolicy | None = None, progress: Callable[[Evaluation], None] = lambda e: None) -> Plan:
    """The smallest static pool that meets ``target``, then the autoscaled pool of fewest
    machine-hours that does, within the static pool's size — or, given a ``policy``, that
    policy as it is (its provider replaced by the simulated one). ``progress`` hears of
    every candidate replayed."""
    if policy is not None:
        simulated(policy)  # a policy that cannot be planned is refused now, not after the search
    done: dict[str, Evaluation] = {}
    candidates: list[Evaluation] = []

    def replay(p: PoolPolicy, label: str, *, whole: bool = False) -> Evaluation:
        key = p.model_dump_json()
        if key not in done:  # two levels may round to the same floors
            done[key] = evaluate(demand, p, target, boot=boot, tick=tick, label=label, stop_on_miss=not whole)
            candidates.append(done[key])
            progress(done[key])
        return done[key]

    # No machine never meets the target; as many as would run at once if none waited always do.
    lo, hi = 0, max(demand.busy_peaks())
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if replay(static_policy(mid), f"static {mid}").meets:
            hi = mid
        else:
            lo = mid
    static = replay(static_policy(hi), f"static {hi}")

    if policy is not None:
        given = replay(policy, "the given policy", whole=True)  # its whole day, met or not
        return Plan(demand, target, boot, tick, static, given, tuple(candidates), given=True)
    # The levels' bisection: below lo misses, at hi meets (past the last level: the static pool).
    lo, hi = -1, len(LEVELS)
    best: Evaluation | None = None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        e = replay(autoscaled_policy(demand, LEVELS[mid], static.policy.min),
                   f"autoscaled, floors at {LEVELS[mid]:.0%} of each hour's peak")
        if e.meets:
            hi, best = mid, e
        else:
            lo = mid
    # Floors at the cap all day are the static pool itself: no autoscaled answer then.
    return Plan(demand, target, boot, tick, static, best if best is not static else None, tuple(candidates))


def simulated(policy: PoolPolicy) -> PoolPolicy:
    """``policy`` with its machines made by the simulated provider (:data:`PROVIDER`), and
    without recycling: simulated agents report no memory and never restart their apps, so
    a reboot for age would leave its machine drained for good."""
    if policy.max is None:
        raise ConfigError("the policy needs max (the most machines the pool may have) to be planned")
    return policy.model_copy(update={"provider": PROVIDER, "recycle": Recycle()})
