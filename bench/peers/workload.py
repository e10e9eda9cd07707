"""The side-by-side workload: the plan, the harness that drives one system through it, the measures.

Everything here is system-neutral. A :class:`Plan` is drawn once from a seed — each run's
key, duration and arrival offset, and each kill's offset and phase — and every system gets
exactly that plan on freshly started machines. :func:`drive` plays it against a
:class:`Side` (one system's adapter): it starts one OS process per machine, submits the
runs at their offsets, SIGKILLs a busy machine at each kill offset and starts a
replacement a moment later, then waits for the system to finish everything (or for the
drain period to run out) and hands the raw observations to :func:`measure`. Before the
plan, if asked, :func:`play_throughput` feeds the same machines empty runs (``sim.noop``):
one at a time for dispatch latency, then a backlog for the drain rate
(:func:`measure_throughput`).

Peer worker processes (Celery, Procrastinate) run :class:`PeerMachine`: one simulated
desktop per process and the real ``sim.work`` automation, called through a
:class:`deskfleet.sdk.Context` exactly as a deskfleet agent calls it, so the side effect
lands in the same kind of :class:`~deskfleet.sim.SimBackend` file. Those workers also note
when each execution starts and ends in an :class:`AttemptLog` (a small SQLite file of the
benchmark's own), which is how the harness sees a peer's machine at work: the peers have
no event feed that says "started on machine X". deskfleet's starts come from its own event
log instead (``run.state`` → ``running``, ``reconcile.started``), on the same host clock.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import math
import os
import random
import signal
import sqlite3
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

#: run states that mean "the system has finished with it"; anything else at the end is lost
SUCCEEDED = "succeeded"
FAILED = "failed"  # failed, timed out, cancelled…: the system said it did not happen
PENDING = "pending"  # never reported finished: lost once the drain period is over

BEFORE_EFFECT = "before effect"  # killed in the first half: nothing happened yet
AFTER_EFFECT = "after effect"  # killed in the second half: done, but never reported


def machine_name(number: int) -> str:
    """``m-07``: the name deskfleet's ``agent --machine m --sim 1 --sim-first 7`` gives, used for
    every system so that the logs read alike."""
    return f"m-{number:02d}"


def pct(values: list[float], p: float) -> float:
    """The p-th percentile by nearest rank (as bench/core.py reports them)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


# -- the plan ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Job:
    key: str
    seconds: float  # how long sim.work takes; its effect lands at half of it
    at: float  # arrival offset after the start, seconds


@dataclass(frozen=True, slots=True)
class Kill:
    at: float  # offset after the start, seconds
    phase: str  # BEFORE_EFFECT or AFTER_EFFECT: which half of its run the victim is in
    pick: float  # in [0, 1): which of the eligible busy machines (by name order) is killed


@dataclass(frozen=True, slots=True)
class Plan:
    seed: int
    machines: int
    jobs: tuple[Job, ...]
    kills: tuple[Kill, ...]
    restart_delay: float  # SIGKILL → replacement machine process started
    drain: float  # after the last submit, how long the system gets to finish everything
    load: float  # offered load as a fraction of the fleet's capacity

    @property
    def window(self) -> float:
        return self.jobs[-1].at if self.jobs else 0.0

    def seconds_of(self) -> dict[str, float]:
        return {j.key: j.seconds for j in self.jobs}


def make_plan(*, seed: int, machines: int, runs: int, kills: int, load: float = 0.75,
              median_seconds: float = 1.2, min_seconds: float = 0.5, max_seconds: float = 3.0,
              restart_delay: float = 1.0, drain: float = 120.0) -> Plan:
    """Durations log-normal around ``median_seconds`` (clipped), Poisson arrivals at ``load``
    times what the fleet can do, kills spread evenly over the arrival window with alternating
    phases (so both "nothing done yet" and "done but not reported" are struck)."""
    rng = random.Random(seed)
    durations = [min(max_seconds, max(min_seconds, rng.lognormvariate(math.log(median_seconds), 0.5)))
                 for _ in range(runs)]
    mean = statistics.fmean(durations) if durations else median_seconds
    rate = load * machines / mean  # runs per second the arrivals offer
    t = 0.0
    jobs = []
    for i, seconds in enumerate(durations):
        jobs.append(Job(key=f"w{i:04d}", seconds=round(seconds, 3), at=round(t, 3)))
        t += rng.expovariate(rate)
    window = jobs[-1].at if jobs else 0.0
    phases = [AFTER_EFFECT, BEFORE_EFFECT]
    kill_plan = tuple(
        Kill(at=round(window * (i + 1) / (kills + 1), 2), phase=phases[i % 2], pick=rng.random())
        for i in range(kills)
    )
    return Plan(seed=seed, machines=machines, jobs=tuple(jobs), kills=kill_plan,
                restart_delay=restart_delay, drain=drain, load=load)


# -- what the harness sees of a system ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Start:
    """One time a run was taken up on a machine: its work started (``run``), or — deskfleet
    only — its reconcile check ran (``reconcile``) after an attempt was lost."""
    key: str
    machine: str
    at: float  # epoch seconds, this host's clock
    kind: str = "run"


@dataclass(frozen=True, slots=True)
class Busy:
    key: str
    machine: str
    started_at: float


class Side(abc.ABC):
    """One system under test. :func:`drive` calls these in order: ``setup``, ``machine_command``
    for each machine, ``wait_ready``, then ``submit``/``busy`` while the plan plays, then
    ``outcomes``/``starts`` until done, and ``teardown`` always (in a ``finally``)."""

    name: str = "?"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.backend_path = workdir / "sim-backend.db"  # where sim.work leaves its effects

    @abc.abstractmethod
    async def setup(self) -> None: ...

    @abc.abstractmethod
    def machine_command(self, name: str) -> tuple[list[str], dict[str, str]]:
        """argv and extra environment of the one process that *is* machine ``name``."""

    @abc.abstractmethod
    async def wait_ready(self, names: list[str], timeout: float) -> None: ...

    @abc.abstractmethod
    async def submit(self, job: Job) -> None: ...

    @abc.abstractmethod
    async def busy(self) -> list[Busy]:
        """Work executing right now, as far as the harness can tell."""

    @abc.abstractmethod
    async def outcomes(self) -> dict[str, str]:
        """key → SUCCEEDED, FAILED or PENDING, as the system itself reports it."""

    @abc.abstractmethod
    async def starts(self) -> list[Start]: ...

    @abc.abstractmethod
    async def teardown(self) -> None: ...

    def versions(self) -> dict[str, str]:
        return {}

    def settings(self) -> dict[str, Any]:
        return {}

    # The throughput section: empty runs (``sim.noop``), before the failover plan plays.

    #: how one run goes in and is waited for (dispatch latency), and how the backlog goes in
    single_path: str = "?"
    batch_path: str = "?"

    @abc.abstractmethod
    async def run_noop(self, key: str) -> None:
        """Submit one empty run by the single path; return once the system reports it finished."""

    @abc.abstractmethod
    async def submit_noops(self, keys: list[str]) -> None:
        """Submit a backlog of empty runs by the system's batch path (its fair best)."""

    @abc.abstractmethod
    async def noops_done(self) -> int:
        """How many empty runs have finished so far (polled while the backlog drains)."""

    @abc.abstractmethod
    async def noop_starts(self) -> dict[str, float]:
        """key → when the empty run started on a machine (epoch, this host's clock)."""

    @abc.abstractmethod
    async def noop_finishes(self, keys: list[str]) -> dict[str, float]:
        """key → when the system itself recorded the empty run finished (its own stamp)."""

    def server_cpu(self) -> float | None:
        """CPU seconds the system's server process has used so far, where it has one of its own."""
        return None

    def throughput_notes(self, keys: list[str]) -> dict[str, Any]:
        """Anything more a side can tell about the backlog ``keys`` (kept in the JSON as is)."""
        return {}

    def end_throughput(self) -> None:  # noqa: B027 (a hook most sides need not fill)
        """The throughput section is over: forget what only it needed."""


# -- machine processes --------------------------------------------------------------------------


class Machines:
    """One OS process per machine. Every process started here is stopped in :meth:`stop_all`
    (SIGTERM, then SIGKILL), which :func:`drive` calls in a ``finally``."""

    def __init__(self, logs: Path, command: Callable[[str], tuple[list[str], dict[str, str]]]) -> None:
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.command = command
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._files: list[IO[bytes]] = []
        self.dead: set[str] = set()

    def start(self, name: str) -> None:
        argv, env = self.command(name)
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 (closed in stop_all)
        self._files.append(log)
        self.procs[name] = spawn(argv, env, log)

    def kill(self, name: str) -> float:
        """SIGKILL: the machine is gone at once, mid-run, without a word to anyone."""
        proc = self.procs[name]
        at = time.time()
        proc.send_signal(signal.SIGKILL)
        self.dead.add(name)
        proc.wait()
        return at

    def alive(self, name: str) -> bool:
        return name not in self.dead and self.procs[name].poll() is None

    def exited(self) -> list[str]:
        """Machines whose process ended without being killed (a crash in the harness's set-up)."""
        return [n for n, p in self.procs.items() if n not in self.dead and p.poll() is not None]

    def cpu(self) -> float:
        """CPU seconds used so far by the machine processes alive now (user + system)."""
        import psutil

        total = 0.0
        for name, proc in self.procs.items():
            if name in self.dead or proc.poll() is not None:
                continue
            try:
                t = psutil.Process(proc.pid).cpu_times()
            except psutil.Error:
                continue
            total += t.user + t.system
        return total

    def stop_all(self) -> None:
        stop(list(self.procs.values()))
        for f in self._files:
            f.close()
        self._files.clear()


def spawn(argv: list[str], env: dict[str, str], log: IO[bytes]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)


def stop(procs: Iterable[subprocess.Popen[bytes]], grace: float = 15.0) -> None:
    """SIGTERM every process, give them ``grace`` seconds together, SIGKILL what is left."""
    procs = [p for p in procs if p.poll() is None]
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait()


# -- the bench's own log of peer executions -----------------------------------------------------

_LOG_SCHEMA = """
CREATE TABLE IF NOT EXISTS starts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, machine TEXT NOT NULL,
    at REAL NOT NULL, ended_at REAL, outcome TEXT
);
CREATE TABLE IF NOT EXISTS ready (machine TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS noops (key TEXT NOT NULL, machine TEXT NOT NULL, at REAL NOT NULL, ended_at REAL NOT NULL);
"""


class AttemptLog:
    """When each peer execution started and ended, on which machine (SQLite, WAL, autocommit:
    many worker processes write, the harness reads). The harness creates the file first, so
    the workers never race to switch it to WAL."""

    def __init__(self, path: str | Path, *, create: bool = False) -> None:
        self._db = sqlite3.connect(str(path), timeout=30.0, isolation_level=None)
        self._db.execute("PRAGMA busy_timeout = 30000")
        if create:
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.executescript(_LOG_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def started(self, key: str, machine: str) -> int:
        cur = self._db.execute("INSERT INTO starts (key, machine, at) VALUES (?, ?, ?)", (key, machine, time.time()))
        assert cur.lastrowid is not None
        return cur.lastrowid

    def ended(self, row: int, outcome: str) -> None:
        self._db.execute("UPDATE starts SET ended_at = ?, outcome = ? WHERE id = ?", (time.time(), outcome, row))

    def ready(self, machine: str) -> None:
        self._db.execute("INSERT INTO ready (machine, at) VALUES (?, ?)", (machine, time.time()))

    def ready_machines(self) -> set[str]:
        return {m for (m,) in self._db.execute("SELECT machine FROM ready")}

    def busy(self) -> list[Busy]:
        rows = self._db.execute("SELECT key, machine, at FROM starts WHERE ended_at IS NULL").fetchall()
        return [Busy(key=k, machine=m, started_at=at) for k, m, at in rows]

    def starts(self) -> list[Start]:
        rows = self._db.execute("SELECT key, machine, at FROM starts ORDER BY at").fetchall()
        return [Start(key=k, machine=m, at=at) for k, m, at in rows]

    def noop_starts(self) -> dict[str, float]:
        """key → when the empty run's body started (the first, if it ran more than once)."""
        return {k: at for k, at in self._db.execute("SELECT key, min(at) FROM noops GROUP BY key")}

    def noops_done(self) -> int:
        return int(self._db.execute("SELECT count(DISTINCT key) FROM noops").fetchone()[0])


class NoopLog:
    """The empty runs' start and end times, kept in memory by the task body and written to the
    :class:`AttemptLog` by a thread every 20 ms: a write per run inside the body would add
    the log's cost to each peer's cost per run, which is what the throughput section measures
    (the failover section's runs last seconds, so there :class:`AttemptLog` writes at once)."""

    def __init__(self, path: str | Path, machine: str, every: float = 0.02) -> None:
        self.path, self.machine, self.every = str(path), machine, every
        self._rows: list[tuple[str, str, float, float]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._flush_forever, name="noop-log", daemon=True).start()

    def add(self, key: str, started: float, ended: float) -> None:
        with self._lock:
            self._rows.append((key, self.machine, started, ended))

    def _flush_forever(self) -> None:
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA busy_timeout = 30000")
        while True:
            time.sleep(self.every)
            with self._lock:
                rows, self._rows = self._rows, []
            if rows:  # one transaction for them all (the connection is in autocommit mode)
                db.execute("BEGIN")
                db.executemany("INSERT INTO noops (key, machine, at, ended_at) VALUES (?, ?, ?, ?)", rows)
                db.execute("COMMIT")


def effects(backend_path: Path) -> dict[str, list[tuple[float, str]]]:
    """key → every (time, machine) its side effect happened, read straight from the
    SimBackend file (its ``work_done`` table; ``SimBackend.work_counts()`` counts the same rows)."""
    db = sqlite3.connect(f"file:{backend_path}?mode=ro", uri=True, timeout=30.0)
    try:
        out: dict[str, list[tuple[float, str]]] = {}
        for key, at, machine in db.execute("SELECT key, created_at, created_by_machine FROM work_done ORDER BY created_at"):
            out.setdefault(key, []).append((float(at), str(machine)))
        return out
    finally:
        db.close()


# -- inside a peer's worker process -------------------------------------------------------------

ENV_MACHINE = "PEERS_MACHINE"  # this process's machine name
ENV_BACKEND = "PEERS_BACKEND"  # the SimBackend file shared by the machines of one system
ENV_LOG = "PEERS_ATTEMPT_LOG"  # the AttemptLog file


def pythonpath() -> str:
    """``PYTHONPATH`` for a peer's worker process: ``bench/`` first, so ``peers.…`` imports."""
    bench = str(Path(__file__).resolve().parent.parent)
    rest = os.environ.get("PYTHONPATH")
    return bench if not rest else f"{bench}{os.pathsep}{rest}"


class PeerMachine:
    """One simulated machine inside a Celery or Procrastinate worker process: a SimDesktop on
    the shared SimBackend, and ``sim.work`` from deskfleet's own registry, executed through an
    SDK Context as the deskfleet agent executes it (minus pre-flight, which ``sim.work`` —
    ``required_state="any"`` — does not need)."""

    def __init__(self, name: str, backend: str | Path, log: str | Path) -> None:
        from deskfleet.sim import SimBackend, SimDesktop, demo_registry

        self.name = name
        self.backend = SimBackend(backend)
        self.desktop = SimDesktop(name, self.backend, seed=1)
        automation = demo_registry().get("sim.work", None)
        empty = demo_registry().get("sim.noop", None)
        assert automation is not None and empty is not None, "deskfleet's demo registry has no sim.work or sim.noop"
        self.automation = automation
        self.empty = empty
        self.log = AttemptLog(log)
        self.noops = NoopLog(log, name)
        self.executions = 0

    @classmethod
    def from_env(cls) -> PeerMachine:
        return cls(os.environ[ENV_MACHINE], os.environ[ENV_BACKEND], os.environ[ENV_LOG])

    def _context(self, key: str) -> Any:
        from deskfleet.sdk import Context

        self.executions += 1

        async def progress(step: str, percent: float | None, message: str | None) -> None:
            return None  # a peer has nowhere to send progress (and no watchdog reading it)

        async def upload(name: str, data: bytes, content_type: str) -> str:
            return ""

        return Context(run_id=key, attempt_id=self.executions, attempt_number=self.executions,
                       machine_id=self.name, desktop=self.desktop, model=None,
                       report_progress=progress, upload=upload, stop_event=asyncio.Event())

    async def noop(self, key: str) -> dict[str, Any]:
        """An empty run: ``sim.noop`` (it reports one step and returns its input), timed."""
        started = time.time()
        out = await self.empty.execute(self._context(key), {"value": key})
        self.noops.add(key, started, time.time())
        return out

    async def work(self, key: str, seconds: float) -> dict[str, Any]:
        ctx = self._context(key)
        row = self.log.started(key, self.name)
        try:
            out = await self.automation.execute(ctx, {"key": key, "seconds": seconds})
        except BaseException:
            self.log.ended(row, FAILED)
            raise
        self.log.ended(row, SUCCEEDED)
        return out


# -- the harness ---------------------------------------------------------------------------------


@dataclass(slots=True)
class KillRecord:
    planned_at: float
    phase: str  # the phase asked for
    at: float = 0.0  # epoch of the SIGKILL
    offset: float = 0.0  # seconds after the start
    machine: str = ""
    key: str = ""
    seconds: float = 0.0
    elapsed: float = 0.0  # how far into its run the victim was
    phase_hit: bool = False  # a machine in the asked-for phase was found in time
    replacement: str = ""
    note: str = ""


@dataclass(frozen=True, slots=True)
class Throughput:
    """The throughput section, the same for every system: ``warmup`` + ``samples`` empty runs
    one at a time on an idle pool (each submitted once the previous one finished: dispatch
    latency without queueing), then a backlog of ``backlog`` empty runs submitted at once by
    the system's batch path (drain rate)."""

    samples: int
    warmup: int
    backlog: int
    timeout: float = 300.0  # the backlog's submit → all finished, at most


@dataclass(slots=True)
class ThroughputObservations:
    single_path: str
    batch_path: str
    warmup: int
    dispatch_submitted: dict[str, float]  # key → submit call made (epoch), in order
    dispatch_started: dict[str, float]  # key → started on a machine
    backlog_keys: list[str]
    submit_started: float
    submit_ended: float
    backlog_started: dict[str, float]
    backlog_finished: dict[str, float]  # the system's own "finished" stamp
    drained: bool
    server_cpu_s: float | None = None  # the server's CPU while the backlog was submitted and drained
    machines_cpu_s: float | None = None  # the machine processes' CPU over the same time
    notes: dict[str, Any] = field(default_factory=dict)  # Side.throughput_notes


@dataclass(slots=True)
class Observations:
    system: str
    t0: float
    submitted: dict[str, float]
    outcomes: dict[str, str]
    starts: list[Start]
    effects: dict[str, list[tuple[float, str]]]
    kills: list[KillRecord]
    finished_at: float  # when everything was final, or the drain period ran out
    all_final: bool
    ready_s: float  # machine processes started → all ready
    versions: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    throughput: ThroughputObservations | None = None


async def play_throughput(side: Side, spec: Throughput, *, log: Callable[[str], None] = print,
                          machines_cpu: Callable[[], float] | None = None) -> ThroughputObservations:
    """The throughput section against ``side``, whose machines are ready and idle."""
    submitted: dict[str, float] = {}
    t = time.time()
    for i in range(spec.warmup + spec.samples):
        key = f"d{i:05d}"
        submitted[key] = time.time()
        await asyncio.wait_for(side.run_noop(key), 60)
    log(f"  dispatch: {spec.warmup} + {spec.samples} empty runs one at a time, {time.time() - t:.1f} s; "
        f"a backlog of {spec.backlog} …")
    keys = [f"b{i:05d}" for i in range(spec.backlog)]
    cpu0, mcpu0 = side.server_cpu(), machines_cpu() if machines_cpu else None
    t0 = time.time()
    await side.submit_noops(keys)
    t1 = time.time()
    total = len(submitted) + len(keys)
    done = await side.noops_done()
    while done < total and time.time() < t1 + spec.timeout:
        await asyncio.sleep(0.05)
        done = await side.noops_done()
    cpu1, mcpu1 = side.server_cpu(), machines_cpu() if machines_cpu else None
    # a worker may note its end a moment before the system stores its own stamp
    finished = await side.noop_finishes(keys)
    for _ in range(100):
        if len(finished) >= done - len(submitted):
            break
        await asyncio.sleep(0.1)
        finished = await side.noop_finishes(keys)
    starts = await side.noop_starts()
    notes = side.throughput_notes(keys)
    log(f"  backlog: submitted in {t1 - t0:.1f} s, {len(finished)} finished after {time.time() - t0:.1f} s")
    side.end_throughput()
    return ThroughputObservations(
        single_path=side.single_path, batch_path=side.batch_path, warmup=spec.warmup,
        dispatch_submitted=submitted, dispatch_started={k: starts[k] for k in submitted if k in starts},
        backlog_keys=keys, submit_started=t0, submit_ended=t1,
        backlog_started={k: starts[k] for k in keys if k in starts}, backlog_finished=finished,
        drained=done >= total, server_cpu_s=None if cpu0 is None or cpu1 is None else cpu1 - cpu0,
        machines_cpu_s=None if mcpu0 is None or mcpu1 is None else mcpu1 - mcpu0, notes=notes,
    )


async def drive(side: Side, plan: Plan, *, log: Callable[[str], None] = print,
                throughput: Throughput | None = None, failover: bool = True) -> Observations:
    """Play the throughput section (if asked) then ``plan`` against ``side`` once; always stop
    every process it started. Without ``failover`` the plan is not played (no runs, no kills)."""
    machines = Machines(side.workdir / "logs", side.machine_command)
    try:
        await side.setup()
        names = [machine_name(i) for i in range(1, plan.machines + 1)]
        t_start = time.time()
        for name in names:
            machines.start(name)
        await side.wait_ready(names, timeout=240)
        ready_s = time.time() - t_start
        if machines.exited():
            raise RuntimeError(f"{side.name}: machine processes exited: {machines.exited()} (see {machines.logs})")
        log(f"  {plan.machines} machines ready after {ready_s:.1f} s")
        await asyncio.sleep(1.0)  # let start-up work (imports, first heartbeats) settle
        tput = None
        if throughput is not None:
            tput = await play_throughput(side, throughput, log=log, machines_cpu=machines.cpu)
            await asyncio.sleep(1.0)
        if not failover:
            plan = dataclasses.replace(plan, jobs=(), kills=(), drain=0.0)
        log(f"  playing {len(plan.jobs)} runs, {len(plan.kills)} kills …")
        t0 = time.time() + 0.1
        submitted: dict[str, float] = {}
        seconds = plan.seconds_of()
        next_number = plan.machines + 1

        async def submitter() -> None:
            for job in plan.jobs:
                delay = t0 + job.at - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                submitted[job.key] = time.time()
                await side.submit(job)

        async def killer() -> list[KillRecord]:
            nonlocal next_number
            records = []
            struck: set[str] = set()  # each kill strikes a fresh run, not one already retried
            for kill in plan.kills:
                rec = KillRecord(planned_at=kill.at, phase=kill.phase)
                records.append(rec)
                delay = t0 + kill.at - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                victim = await _find_victim(side, machines, kill, seconds, struck, window=15.0)
                if victim is None:
                    rec.note = "no machine was busy"
                    log(f"  kill at {kill.at:.1f} s: {rec.note}")
                    continue
                busy, hit = victim
                struck.add(busy.key)
                rec.at = machines.kill(busy.machine)
                rec.offset = rec.at - t0
                rec.machine, rec.key, rec.seconds = busy.machine, busy.key, seconds.get(busy.key, 0.0)
                rec.elapsed = rec.at - busy.started_at
                rec.phase_hit = hit
                log(f"  SIGKILL {busy.machine} at {rec.offset:.1f} s, {rec.elapsed:.2f} s into "
                    f"{busy.key} ({rec.seconds:.2f} s, {kill.phase if hit else 'whatever phase it was in'})")
                await asyncio.sleep(plan.restart_delay)
                rec.replacement = machine_name(next_number)
                next_number += 1
                machines.start(rec.replacement)
            return records

        kill_task = asyncio.create_task(killer())
        await submitter()
        kills = await kill_task
        last_submit = time.time()
        log(f"  all submitted after {last_submit - t0:.1f} s; draining (at most {plan.drain:.0f} s) …")
        deadline = last_submit + plan.drain
        all_final = False
        while time.time() < deadline:
            outcomes = await side.outcomes()
            if len(outcomes) >= len(plan.jobs) and all(o != PENDING for o in outcomes.values()):
                all_final = True
                break
            await asyncio.sleep(0.5)
        finished_at = time.time()
        outcomes = await side.outcomes()
        starts = await side.starts()
        return Observations(
            system=side.name, t0=t0, submitted=submitted, outcomes=outcomes, starts=starts,
            effects=effects(side.backend_path), kills=kills, finished_at=finished_at, all_final=all_final,
            ready_s=ready_s, versions=side.versions(), settings=side.settings(), throughput=tput,
        )
    finally:
        machines.stop_all()
        await side.teardown()


async def _find_victim(side: Side, machines: Machines, kill: Kill, seconds: dict[str, float],
                       struck: set[str], window: float) -> tuple[Busy, bool] | None:
    """A busy machine in the asked-for phase of its run, chosen by ``kill.pick`` among those
    eligible (name order); after ``window`` seconds without one, any busy machine. Runs in
    ``struck`` (hit by an earlier kill) are left alone, so every kill strikes a fresh run."""
    deadline = time.time() + window
    last: list[Busy] = []
    while True:
        now = time.time()
        running = [b for b in await side.busy() if machines.alive(b.machine) and b.key not in struck]
        last = running or last
        eligible = []
        for b in running:
            s = seconds.get(b.key, 0.0)
            # a margin either side of the halfway effect, and runs long enough that the
            # harness's polling delay cannot carry the kill into the other half
            frac = (now - b.started_at) / s if s else 0.0
            lo, hi = (0.1, 0.35) if kill.phase == BEFORE_EFFECT else (0.6, 0.85)
            if s >= 1.0 and lo <= frac <= hi:
                eligible.append(b)
        if eligible:
            eligible.sort(key=lambda b: b.machine)
            return eligible[int(kill.pick * len(eligible))], True
        if now > deadline:
            alive = [b for b in last if machines.alive(b.machine)]
            if not alive:
                return None
            alive.sort(key=lambda b: b.machine)
            return alive[int(kill.pick * len(alive))], False
        await asyncio.sleep(0.03)


# -- the measures ----------------------------------------------------------------------------------


def measure(obs: Observations, plan: Plan) -> dict[str, Any]:
    """The figures for one system, from its raw observations."""
    by_key: dict[str, list[Start]] = {}
    for s in sorted(obs.starts, key=lambda s: s.at):
        by_key.setdefault(s.key, []).append(s)
    keys = [j.key for j in plan.jobs]
    waits = []
    for key in keys:
        first_run = next((s for s in by_key.get(key, []) if s.kind == "run"), None)
        if first_run is not None and key in obs.submitted:
            waits.append(max(0.0, first_run.at - obs.submitted[key]))
    outcome = {k: obs.outcomes.get(k, PENDING) for k in keys}
    lost = sorted(k for k, o in outcome.items() if o == PENDING)
    failed = sorted(k for k, o in outcome.items() if o == FAILED)
    counts = {k: len(v) for k, v in obs.effects.items()}
    twice = sorted(k for k in keys if counts.get(k, 0) > 1)
    kills = []
    recoveries = []
    for rec in obs.kills:
        d = asdict(rec)
        if not rec.machine:
            kills.append(d)
            continue
        effect_done = [at for at, m in obs.effects.get(rec.key, []) if at <= rec.at and m == rec.machine]
        later = [s for s in by_key.get(rec.key, []) if s.at > rec.at and s.machine != rec.machine]
        d["effect_before_kill"] = bool(effect_done)
        d["effects"] = counts.get(rec.key, 0)
        d["outcome"] = outcome.get(rec.key, PENDING)
        if later:
            d["recovered_after_s"] = later[0].at - rec.at
            d["recovered_on"] = later[0].machine
            again = any(s.kind == "run" for s in later)
            if later[0].kind == "reconcile":
                d["recovered_by"] = "reconciled, executed again" if again else "reconciled: already done"
            else:
                d["recovered_by"] = "executed again"
            recoveries.append(d["recovered_after_s"])
        else:
            d["recovered_after_s"] = None
            d["recovered_by"] = "never"
        kills.append(d)
    struck = [k for k in kills if k.get("machine")]
    never = sum(1 for k in struck if k["recovered_after_s"] is None)
    ok_ends = [s.at for s in obs.starts]  # for the span of activity
    return {
        "system": obs.system,
        "versions": obs.versions,
        "settings": obs.settings,
        "runs": len(keys),
        "machines": plan.machines,
        "ready_s": obs.ready_s,
        "queue_wait_ms": {
            "p50": 1000 * statistics.median(waits) if waits else math.nan,
            "p90": 1000 * pct(waits, 90), "p99": 1000 * pct(waits, 99),
            "max": 1000 * max(waits) if waits else math.nan, "n": len(waits),
        },
        "queue_waits_s": waits,
        "succeeded": sum(1 for o in outcome.values() if o == SUCCEEDED),
        "lost": len(lost), "lost_keys": lost,
        "failed": len(failed), "failed_keys": failed,
        "executed_twice": len(twice), "executed_twice_keys": {k: counts[k] for k in twice},
        "never_executed_but_succeeded": sorted(k for k, o in outcome.items() if o == SUCCEEDED and counts.get(k, 0) == 0),
        "kills": kills,
        "recovery_s": {
            "p50": statistics.median(recoveries) if recoveries else None,
            "max": max(recoveries) if recoveries else None,
            "never": never, "n": len(struck),
        },
        "all_final": obs.all_final,
        "done_after_s": obs.finished_at - obs.t0,
        "last_start_s": (max(ok_ends) - obs.t0) if ok_ends else None,
    }


def measure_throughput(t: ThroughputObservations) -> dict[str, Any]:
    """The throughput section's figures for one system: dispatch latency over the samples
    after the warm-up, and the backlog's drain rate — runs finished ÷ (the system's last
    "finished" stamp - the first submit call), so a slow submit path counts against it —
    beside its rate between 10 % and 90 % of the finishes (free of ramp-up and tail) and the
    submit rate alone."""
    keys = list(t.dispatch_submitted)[t.warmup:]
    dispatch = [max(0.0, t.dispatch_started[k] - t.dispatch_submitted[k]) for k in keys if k in t.dispatch_started]
    finishes = sorted(t.backlog_finished[k] for k in t.backlog_keys if k in t.backlog_finished)
    n = len(finishes)
    span = finishes[-1] - t.submit_started if finishes else math.nan
    lo, hi = n // 10, (9 * n) // 10  # the finishes between these places: (hi - lo) runs
    steady = (hi - lo) / (finishes[hi] - finishes[lo]) if n >= 10 and finishes[hi] > finishes[lo] else math.nan
    submit_s = t.submit_ended - t.submit_started
    return {
        "single_path": t.single_path, "batch_path": t.batch_path,
        "dispatch_ms": {
            "p50": 1000 * statistics.median(dispatch) if dispatch else math.nan,
            "p90": 1000 * pct(dispatch, 90), "p99": 1000 * pct(dispatch, 99),
            "max": 1000 * max(dispatch) if dispatch else math.nan, "n": len(dispatch),
        },
        "dispatch_s": dispatch,
        "backlog": {
            "runs": len(t.backlog_keys), "finished": n, "drained": t.drained,
            "submit_s": submit_s, "submit_per_s": len(t.backlog_keys) / submit_s if submit_s > 0 else math.nan,
            "drain_s": span, "runs_per_s": n / span if n and span > 0 else math.nan,
            "steady_runs_per_s": steady,
            "server_cpu_ms_per_run": None if t.server_cpu_s is None or not t.backlog_keys
            else 1000 * t.server_cpu_s / len(t.backlog_keys),
            "machines_cpu_ms_per_run": None if t.machines_cpu_s is None or not t.backlog_keys
            else 1000 * t.machines_cpu_s / len(t.backlog_keys),
        },
        # for the plot: seconds after the first submit call at which each run finished
        "finished_after_s": [f - t.submit_started for f in finishes],
        **t.notes,
    }
