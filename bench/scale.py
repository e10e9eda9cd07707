"""Scale: thousands of machines on one orchestrator, failover after agent death, utilisation.

    .venv/bin/python bench/scale.py fleet          # 1,000 and 5,000 simulated machines (~10 min)
    .venv/bin/python bench/scale.py fleet10k       # 500 and 10,000 machines, issue 11's goals (~25 min)
    .venv/bin/python bench/scale.py failover       # 100 SIGKILLed agents, 24 machines (~11 min)
    .venv/bin/python bench/scale.py utilisation    # 100 machines, a varied backlog (~1.5 min)
    .venv/bin/python bench/scale.py all            # the three, one after the other, one code snapshot
    .venv/bin/python bench/scale.py fleet --quick  # small sizes: a smoke run of about a minute
    .venv/bin/python bench/scale.py fleet --machines 2000 --idle 60 --workdir /tmp/scale   # keep the logs

Every scenario runs a real ``deskfleet server`` process with its default settings (SQLite
synchronous=FULL, heartbeats every 2 s, lease lost after 10 s of silence, fleet-manager
sweep every 0.25 s) and simulated machines in ``deskfleet agent --sim N`` processes, all on
this host (one clock: client times and the server's event times compare directly). Each
prints a table and writes ``bench/results/scale-<scenario>-<stamp>.json`` and ``….png``.
The code under test is a copy of ``src/deskfleet`` taken at the start and put first on every
child's ``PYTHONPATH`` (bench/peers.py's ``snapshot_code``), so edits made to the work tree
while a scenario runs cannot mix two versions (``--live-code`` runs the work tree as is).

**fleet** — for each N (``--machines 1000,5000``): one server; N machines in agent processes
of 1,250 each (``--per-agent``; ``--action-delay 0 --screenshots none``, as bench/core.py).

- connect: agent processes started → ``summary()["machines"]["ready"] == N`` (the curve of
  ready machines against time is kept; the summary is one SQL count, cheap to poll);
- idle cost: the empty server's CPU and RSS over a few seconds before any agent exists; then,
  with all N connected and idle, after a settling pause, over ``--idle`` seconds (≥ 20 s) with
  no API call at all: the server's CPU (user+system from psutil, as % of one core: the cost
  of N/2 heartbeats a second, the fleet-manager ticks and the sockets) and RSS (median of
  1 s samples), each also per machine net of the empty server; the agent processes' CPU and
  RSS beside it (they share this host's 2 cores with the server);
- dispatch under that fleet: one ``sim.noop`` run at a time (the pool otherwise idle), 20
  warm-up runs, then ``--samples``: ``submit(…, wait=10)`` sent (client clock) → the run's
  ``run.state`` event with reason ``agent_accepted`` (stamped by the server when the agent's
  "preparing" arrives: the agent holds the assignment; an agent whose automation needs no
  pre-flight skips "preparing", and the server stamps it on the agent's "start", in the same
  commit as ``automation_started``); and the whole round trip, submit
  sent → the succeeded answer. The server-side steps (submitted, scheduled, accepted) are
  split out from the same run's events;
- saturation under that fleet: every machine cordoned (32 requests at a time), a backlog of
  no-op runs (``--backlog``; default 8 per machine, at least 15,000) submitted with
  ``queue_timeout=3600`` in batches of 1,000, every machine uncordoned; completions/s from the event log (first
  assignment → last final state, and "steady" between 10 % and 90 % of completions, as
  bench/core.py ``saturation``; also from the last uncordon answered to the 90 % mark, since
  uncordoning thousands of machines one request at a time takes tens of seconds during
  which runs already drain, more slowly: each uncordon is a commit and a scheduling pass),
  and the server's CPU per run: from the start of the uncordon to the last completion
  (gross, as bench/core.py, and net of the idle fleet's own cost over the same time), within
  the steady window, and after the last uncordon (CPU sampled every 0.25 s, interpolated).
  Everything is stopped between sizes; each size has a fresh data directory and a fresh
  agent ``--state-dir`` (enrolment keys live there).

**fleet10k** — fleet at 500 and 10,000 machines (``--machines 500,10000``, 2,500 machines to an
agent process: 4 processes for 10,000, each one asyncio loop, started 20 s apart; a backlog of
30,000 no-op runs at each size), judged against issue 11's goals for 10,000 machines on one
orchestrator process, in the one run:

- heartbeats under a quarter of a core: the server process's CPU (user + system, every
  thread) per wall second over the idle window at the largest size, gross (fleet-manager
  ticks and the empty server's own cost included);
- dispatch p99 ≤ 25 ms at the largest size (submit sent → the agent holds the assignment);
- drain rate at the largest size ≥ 0.8x the smallest's: completions/s once the whole backlog
  is in (the last batch accepted → 90 % of completions), or the steady 10-90 % rate where
  the backlog was mostly gone by then. The backlog is not held behind cordoned machines here
  (``--hold none``): cordoning and uncordoning 10,000 machines one request at a time takes
  minutes on a busy host; it is submitted in batches of 1,000 while every machine drains it,
  which accepts runs several times faster than they drain (``--hold cordon`` as fleet).

**failover** — ``--machines 24`` machines, each its own ``deskfleet agent --sim 1`` process,
so one SIGKILL takes exactly one machine. Long ``sim.work`` runs (``--run-seconds 60``, far
longer than a recovery) keep about half the machines busy (topped up before every wave) and
leave the rest idle, so a retried run can start at once. In waves of ``--wave 6``, that many
busy machines' agent processes are SIGKILLed at once (each a run never struck before, at
least 2 s into its work and 3 s from its end; kill time recorded per process), until
``--kills 100``; kill by kill, the victim alternates between a run in the first half of its
work (its effect not done yet) and one in the second half (done, never reported), waiting
up to 30 s for such runs before taking whatever is running. Per kill, from the global event
feed (server clock):

- recovery = SIGKILL → the run's next attempt, on another machine, starting: the earlier of
  its ``reconcile.started`` event and its ``run.state`` reason ``automation_started``;
- lease lost = SIGKILL → the killed attempt's ``attempt.ended`` with reason ``lost`` (the
  run's ``run.state`` reason ``retry_after_reconcile`` is written in the same transaction);
- where the time goes: the machine's last heartbeat received before the kill (its
  ``last_heartbeat_at``) + the 10 s heartbeat timeout = when the lease fell due; → the
  sweep that expired it (ticks every 0.25 s); → the next attempt's assignment (a scheduler
  pass: a run whose machine was lost is retried at once, with no backoff); → the agent's
  "preparing"; → its reconcile check starting.

The killed machines' agents are restarted (same name, same ``--state-dir``, so they keep
their keys) ``--restart-pause`` seconds after the whole wave has recovered — not earlier:
an agent that reconnects before its lease expired tells the orchestrator it holds no
attempt, which ends the lease at once (a different, faster path), and a restart's imports
would compete for the CPU with the recovery being measured. The next wave waits until every
machine is back (connected, re-verified out of quarantine). At the end the long runs are
cancelled (quick teardown), and ``SimBackend.work_counts()`` shows whether any run's effect
happened twice. Goal: failover within 2 x the heartbeat timeout (20 s), at p99.

**utilisation** — ``--machines 100`` machines in 2 agent processes; a backlog of runs of three
automations that typically take different times, as users' do (``MIX``: half
``sim.work_short`` around 0.4 s, a third ``sim.work`` around 1.2 s, the rest ``sim.work_long``
around 3.5 s; seeded log-normal, clipped to 0.1-8 s, mean ≈ 1.2 s), in random order, as many
as make ``--work-per-machine 60`` seconds of work per machine. A few runs of each automation
go first (the orchestrator learns their durations, as one that has been running a while
knows them); then cordon → submit the backlog in batches → uncordon as in fleet.
``--server-order`` is the server's ``--backlog-order``: ``longest-first`` (its default: by the
durations it learnt) or ``queued`` (first come, first served). From the event log: each attempt is busy from its assignment (``run.state``
reason ``scheduled``) to its ``attempt.ended``, clipped to [first assignment, last
completion] (= the makespan); utilisation = busy machine-time / (machines x makespan). The
ideal makespan's lower bound = max(total requested work / machines, longest run); reported:
makespan / bound. The idle machine-time is split into the orchestration gap (an attempt's
end → the same machine's next assignment; p50/p99 of each gap), the head (start → a
machine's first assignment) and the tail (a machine's last end → the makespan's end); and
the busy time into the requested work and the overhead inside each attempt (assignment →
start, and the end of the work → the attempt ended); and utilisation while runs were still
queued (first assignment → the moment every run had been assigned once: idle time there is
the orchestrator's, while the tail after it is the backlog running out unevenly). ``--order longest-first``
submits the same backlog longest runs first (the LPT rule, by a client that knows each run's
length), which shrinks that tail. Goal (issue 11): utilisation ≥ 98 % over a backlog submitted
first come first served, the server ordering it.

This machine is shared (2 cores, another engineer's work running at times): load averages at
the start and end are recorded, and figures compare best between runs of this script.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import itertools
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: core.py and the peers package

# peers.workload imports nothing of deskfleet: safe before the code snapshot is on sys.path.
from peers.workload import Machines, effects, pct

if TYPE_CHECKING:
    import core

    from deskfleet.client import AsyncClient

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
SCENARIOS = ("fleet", "failover", "utilisation")
FINAL = ("succeeded", "failed", "timed_out", "cancelled")
MiB = 1 << 20
# Wide enough for the tables when the output is a file or a pipe (rich would assume 80 columns).
console = Console(width=None if sys.stdout.isatty() else 160)


# -- shared helpers ------------------------------------------------------------------------------


def epoch(at: str) -> float:
    """An API timestamp (ISO 8601, UTC) as epoch seconds: comparable with ``time.time()`` here."""
    return datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()


def dist(values: Iterable[float], scale: float = 1.0) -> dict[str, Any]:
    """n, min, p50, p90, p99, max, mean of ``values`` x ``scale`` (nearest-rank percentiles, as
    bench/core.py); ``None`` for each figure of an empty list (JSON has no NaN)."""
    vs = [v * scale for v in values]
    if not vs:
        return {"n": 0, "min": None, "p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    return {"n": len(vs), "min": min(vs), "p50": statistics.median(vs), "p90": pct(vs, 90), "p99": pct(vs, 99),
            "max": max(vs), "mean": statistics.fmean(vs)}


def snapshot_code(dest: Path) -> dict[str, Any]:
    """bench/peers.py's ``snapshot_code``: copy ``src/deskfleet`` to ``dest`` and put the copy first
    on every child's ``PYTHONPATH`` and on this process's ``sys.path``. Loaded from that file by
    path, because the name ``peers`` is taken by the package ``bench/peers/``."""
    spec = importlib.util.spec_from_file_location("bench_peers_script", BENCH / "peers.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.snapshot_code(dest)  # type: ignore[no-any-return]


def snapshot_ref(dest: Path, ref: str) -> dict[str, Any]:
    """``src/deskfleet`` as committed at ``ref`` (``git archive``), first on every child's
    ``PYTHONPATH`` and this process's ``sys.path``: a committed version, without whatever the
    work tree holds that is not committed yet."""
    import subprocess

    root = BENCH.parent
    commit = subprocess.run(["git", "rev-parse", ref], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", commit, "src/deskfleet"], cwd=root, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "--strip-components=1", "-C", str(dest)], input=archive, check=True)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(dest), os.environ.get("PYTHONPATH")) if p)
    sys.path.insert(0, str(dest))
    return {"snapshot": str(dest), "git_ref": ref, "git_commit": commit}


class Reaper:
    """Every server and agent process this script starts, so that a failure anywhere (or
    Ctrl-C, or SIGTERM) still stops them all: each scenario stops its own in ``finally``,
    and ``main`` calls :meth:`reap` in its own ``finally`` as a last resort."""

    def __init__(self) -> None:
        self.servers: list[core.Server] = []
        self.machines: list[Machines] = []

    def reap(self) -> None:
        for m in self.machines:
            with contextlib.suppress(Exception):
                m.stop_all()  # SIGTERM, SIGKILL after 15 s
        for s in self.servers:
            with contextlib.suppress(Exception):
                s.stop()  # SIGTERM, SIGKILL after 10 s


reaper = Reaper()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # a SIGTERM unwinds like Ctrl-C, through every finally


def processes(procs: Iterable[Any]) -> list[psutil.Process]:
    return [psutil.Process(p.pid) for p in procs]


def cpu_s(ps: Sequence[psutil.Process]) -> float:
    """User + system CPU seconds of ``ps`` so far (a process that is gone counts 0)."""
    total = 0.0
    for p in ps:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def rss_b(ps: Sequence[psutil.Process]) -> int:
    total = 0
    for p in ps:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


async def usage_window(groups: dict[str, list[psutil.Process]], seconds: float) -> dict[str, dict[str, Any]]:
    """CPU (% of one core, over the window) and RSS (MiB, median and max of 1 s samples) of each
    group of processes over ``seconds``, making no request to anyone meanwhile."""
    c0 = {g: cpu_s(ps) for g, ps in groups.items()}
    t0 = time.monotonic()
    samples: dict[str, list[int]] = {g: [] for g in groups}
    while time.monotonic() - t0 < seconds:
        for g, ps in groups.items():
            samples[g].append(rss_b(ps))
        await asyncio.sleep(min(1.0, max(0.0, seconds - (time.monotonic() - t0))))
    wall = time.monotonic() - t0
    out = {}
    for g, ps in groups.items():
        samples[g].append(rss_b(ps))
        used = cpu_s(ps) - c0[g]
        out[g] = {"cpu_pct": 100 * used / wall, "cpu_s": used, "wall_s": wall, "processes": len(ps),
                  "rss_mib": statistics.median(samples[g]) / MiB, "rss_mib_max": max(samples[g]) / MiB}
    return out


_LOG_LINE = re.compile(r"Z (WARNING|ERROR|CRITICAL) +(\S+): (.*?)(?: \[[^\]]*\])?$")


def log_problems(paths: Iterable[Path]) -> dict[str, Any]:
    """Warnings, errors and tracebacks in the processes' logs: counts by level, and the most
    frequent messages (digits and ids blurred so that alike lines count together)."""
    levels: Counter[str] = Counter()
    messages: Counter[str] = Counter()
    tracebacks = 0
    for path in paths:
        with contextlib.suppress(OSError), open(path, errors="replace") as f:
            for line in f:
                if line.startswith("Traceback"):
                    tracebacks += 1
                m = _LOG_LINE.search(line.rstrip("\n"))
                if m:
                    levels[m.group(1)] += 1
                    text = re.sub(r"[0-9a-f]{8,}|\d+(\.\d+)?", "#", m.group(3))[:160]
                    messages[f"{m.group(1)} {m.group(2)}: {text}"] += 1
    return {"by_level": dict(levels), "tracebacks": tracebacks,
            "top": [{"count": n, "message": msg} for msg, n in messages.most_common(8)]}


def machine_name(prefix: str, number: int) -> str:
    """The name ``deskfleet agent --machine prefix --sim 1 --sim-first number`` gives its machine."""
    return f"{prefix}-{number:0{max(2, len(str(number)))}d}"


def agent_argv(server: core.Server, workdir: Path, prefix: str, count: int, first: int) -> list[str]:
    """``deskfleet agent`` for ``count`` simulated machines, as bench/core.py starts them."""
    return [sys.executable, "-m", "deskfleet", "--log-level", "warning", "agent", "--orchestrator", server.url,
            "--pack", "simehr", "--desktop", "sim", "--machine", prefix, "--count", str(count), "--first", str(first),
            "--enrolment-token", server.token, "--state-dir", str(workdir / "agents"),
            "--sim-backend", str(workdir / "sim-backend.db"), "--action-delay", "0", "--screenshots", "none"]


def split(n: int, per: int) -> list[tuple[int, int]]:
    """(first, count) of each agent process for ``n`` machines, ``per`` to a process."""
    return [(first, min(per, n - first + 1)) for first in range(1, n + 1, per)]


async def act_all(client: AsyncClient, ids: Sequence[str], action: str, concurrency: int = 32) -> float:
    """``machine_action`` on every machine, ``concurrency`` requests at a time; seconds taken."""
    sem = asyncio.Semaphore(concurrency)

    async def one(mid: str) -> None:
        async with sem:
            await client.machine_action(mid, action)

    t = time.perf_counter()
    await asyncio.gather(*(one(m) for m in ids))
    return time.perf_counter() - t


async def wait_final(client: AsyncClient, done_before: int, runs: int, timeout: float) -> None:
    """Until ``runs`` more runs than ``done_before`` are final (summary counts, polled)."""
    deadline = time.monotonic() + timeout
    while True:
        s = (await client.summary())["runs"]
        if sum(s.get(k, 0) for k in FINAL) - done_before >= runs:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the backlog did not drain within {timeout:.0f} s: {s}")
        await asyncio.sleep(0.5)


def fresh(workdir: Path) -> None:
    """An empty directory for one server and its agents: a database or agent keys left by an
    earlier run (``--workdir`` reused) would bring back its machines, cordoned or busy."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)


def stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def header(args: argparse.Namespace) -> dict[str, Any]:
    return {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "quick": args.quick, "loadavg_start": os.getloadavg(),
            "server_settings": "defaults: SQLite synchronous=FULL, heartbeat 2 s / timeout 10 s, sweep 0.25 s"}


def _f(v: float | None, digits: int = 1) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:,.{digits}f}"


# == fleet ==========================================================================================


async def fleet_size(n: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One fleet size, from an empty server to saturation; everything stopped at the end."""
    import core

    from deskfleet.client import AsyncClient
    from deskfleet.errors import ServerUnreachable

    fresh(workdir)
    server = core.Server(workdir, "FULL")  # "FULL" is the server's default
    reaper.servers.append(server)
    parts = split(n, args.per_agent)
    part = {f"agents-{i}": p for i, p in enumerate(parts)}  # process name → (first machine, count)
    # argv built at start: the enrolment token exists only once the server has started
    agents = Machines(workdir / "logs", lambda name: (agent_argv(server, workdir, "fl", part[name][1], part[name][0]), {}))
    reaper.machines.append(agents)
    client = AsyncClient(server.url, timeout=120)
    out: dict[str, Any] = {"machines": n, "agent_processes": len(parts), "machines_per_agent_process": args.per_agent}
    try:
        await server.ready(client)
        await asyncio.sleep(1.0)  # start-up work (migrations, first ticks) out of the way
        empty = await usage_window({"server": [server.ps]}, args.base_window)
        out["empty_server"] = empty["server"]
        console.print(f"  empty server: CPU {empty['server']['cpu_pct']:.1f} %, RSS {empty['server']['rss_mib']:.0f} MiB;"
                      f" starting {len(parts)} agent process(es) for {n} machines …", highlight=False)

        # -- connect
        t0 = time.monotonic()
        for i, name in enumerate(part):
            if i:
                # Each process connects its machines all at once: one such storm at a time
                # (every connection is a few store calls, in one queue with everything else).
                await asyncio.sleep(args.agent_stagger)
            agents.start(name)
        curve: list[tuple[float, int]] = []
        progress_at = time.monotonic()
        ready = 0
        while True:
            try:
                status = (await client.summary())["machines"]
            except ServerUnreachable:
                # A summary stuck behind a connection storm's store calls: ask again (the
                # watchdog below still gives up on a fleet that stopped coming).
                status = {"ready": ready, "summary": "timed out"}
            ready = status.get("ready", 0)
            if curve and ready > curve[-1][1]:
                progress_at = time.monotonic()
            curve.append((round(time.monotonic() - t0, 2), ready))
            if ready >= n:
                break
            if agents.exited():
                raise RuntimeError(f"agent processes exited: {agents.exited()} (see {agents.logs})")
            now = time.monotonic()
            if now - t0 > args.connect_timeout or now - progress_at > 300:
                raise RuntimeError(f"only {ready} of {n} machines ready after {now - t0:.0f} s: {status}")
            await asyncio.sleep(0.5)
        out["connect_s"] = curve[-1][0]
        out["connect_curve"] = curve
        half = next(t for t, r in curve if r >= n / 2)
        out["half_connected_s"] = half
        console.print(f"  {n} machines ready after {out['connect_s']:.1f} s; settling {args.settle:.0f} s, "
                      f"then {args.idle:.0f} s idle …", highlight=False)

        # -- idle: heartbeats only, no API call during the window
        await asyncio.sleep(args.settle)
        agent_ps = processes(agents.procs.values())
        idle = await usage_window({"server": [server.ps], "agents": agent_ps}, args.idle)
        sv, ag = idle["server"], idle["agents"]
        base_cpu, base_rss = empty["server"]["cpu_pct"], empty["server"]["rss_mib"]
        out["idle"] = {
            "server": sv, "agents": ag, "loadavg": os.getloadavg(),
            "server_cpu_pct_net": sv["cpu_pct"] - base_cpu,
            "server_cpu_pct_per_1000_machines": 1000 * (sv["cpu_pct"] - base_cpu) / n,
            # N machines beat every 2 s: CPU per heartbeat, net of the empty server's ticks
            "server_cpu_us_per_heartbeat": 1e6 * (sv["cpu_pct"] - base_cpu) / 100 / (n / 2.0),
            "server_rss_mib_net": sv["rss_mib"] - base_rss,
            "server_rss_kib_per_machine": 1024 * (sv["rss_mib"] - base_rss) / n,
            "agents_cpu_pct_per_1000_machines": 1000 * ag["cpu_pct"] / n,
            "agents_rss_kib_per_machine": 1024 * ag["rss_mib"] / n,
            "agents_rss_mib_each": [rss_b([p]) / MiB for p in agent_ps],
        }
        console.print(f"  idle: server CPU {sv['cpu_pct']:.1f} % of a core, RSS {sv['rss_mib']:.0f} MiB; "
                      f"agents CPU {ag['cpu_pct']:.1f} %, RSS {ag['rss_mib']:.0f} MiB", highlight=False)

        # -- dispatch latency, one no-op run at a time
        console.print(f"  dispatch: {args.warmup} + {args.samples} no-op runs, one at a time …", highlight=False)
        dispatch, round_trip, to_submitted, to_scheduled, to_accepted = [], [], [], [], []
        not_ok = 0
        cursor = 0
        for i in range(args.warmup + args.samples):
            t_send = time.time()
            done = await client.submit("sim.noop", {"value": f"d{i}"}, wait=10)
            t_answer = time.time()
            if done["state"] != "succeeded":
                not_ok += 1
                continue
            evs = await client.events(done["id"])
            cursor = max([cursor, *(e["id"] for e in evs)])
            at = {e["reason"]: epoch(e["at"]) for e in evs if e["kind"] == "run.state"}
            if i < args.warmup or "agent_accepted" not in at:
                continue
            dispatch.append(at["agent_accepted"] - t_send)
            round_trip.append(t_answer - t_send)
            to_submitted.append(at.get("submitted", math.nan) - t_send)
            to_scheduled.append(at.get("scheduled", math.nan) - at.get("submitted", math.nan))
            to_accepted.append(at["agent_accepted"] - at.get("scheduled", math.nan))
        out["dispatch_ms"] = dist(dispatch, 1000)
        out["round_trip_ms"] = dist(round_trip, 1000)
        out["dispatch_steps_ms_p50"] = {
            "submit sent → submitted (durable)": 1000 * statistics.median(to_submitted),
            "submitted → scheduled": 1000 * statistics.median(to_scheduled),
            "scheduled → agent accepted": 1000 * statistics.median(to_accepted),
        } if dispatch else {}
        out["dispatch_not_succeeded"] = not_ok
        out["dispatch_loadavg"] = os.getloadavg()
        out["dispatch_samples_ms"] = [round(1000 * v, 3) for v in dispatch]
        out["round_trip_samples_ms"] = [round(1000 * v, 3) for v in round_trip]
        console.print(f"  dispatch p50 {out['dispatch_ms']['p50']:.1f} ms, p99 {out['dispatch_ms']['p99']:.1f} ms; "
                      f"round trip p50 {out['round_trip_ms']['p50']:.1f} ms", highlight=False)

        # -- saturation
        # Enough that a good part drains after the last uncordon: uncordoning is one request
        # (a commit and a scheduling pass) per machine, ~30 s for 5,000, and runs drain meanwhile.
        runs = args.backlog or max(15000, 8 * n)
        hold = getattr(args, "hold", "cordon")
        body = [{"automation": "sim.noop", "input": {"value": f"s{i}"}, "queue_timeout": 3600} for i in range(runs)]
        ids = [m["id"] for m in await client.machines()]
        before = (await client.summary())["runs"]
        done_before = sum(before.get(k, 0) for k in FINAL)
        # CPU sampled beside the progress polls, so that any window of the drain can be costed
        cpu_trace: list[tuple[float, float, float]] = []
        sampling = True

        async def sample_cpu() -> None:
            while sampling:
                await asyncio.sleep(0.25)
                cpu_trace.append((time.time(), server.cpu(), cpu_s(agent_ps)))

        cordon_s = uncordon_s = None
        if hold == "cordon":
            console.print(f"  saturation: cordon {n}, submit {runs} no-op runs, uncordon …", highlight=False)
            cordon_s = await act_all(client, ids, "cordon")
            # In batches of 1,000 (POST /v1/runs:batch): tens of thousands of single submits
            # would take minutes, while the machines wait cordoned.
            t_sub = time.perf_counter()
            answers = await client.submit_many(body)
            submit_s = time.perf_counter() - t_sub
            cpu_trace.append((time.time(), server.cpu(), cpu_s(agent_ps)))
            sampler = asyncio.create_task(sample_cpu())
            t_drain = time.time()
            try:
                uncordon_s = await act_all(client, ids, "uncordon")
                uncordoned_at = time.time()
                await wait_final(client, done_before, runs, timeout=args.drain_timeout)
            finally:
                sampling = False
                await sampler
        else:
            # Machines left as they are; the backlog submitted in batches of 1,000 while they
            # drain it (a batch is accepted several times faster than runs drain): once the
            # last batch is in, every machine has work waiting for it.
            console.print(f"  saturation: submit {runs} no-op runs in batches, every machine open …",
                          highlight=False)
            cpu_trace.append((time.time(), server.cpu(), cpu_s(agent_ps)))
            sampler = asyncio.create_task(sample_cpu())
            t_drain = time.time()
            try:
                t_sub = time.perf_counter()
                answers = await client.submit_many(body)
                submit_s = time.perf_counter() - t_sub
                uncordoned_at = time.time()
                await wait_final(client, done_before, runs, timeout=args.drain_timeout)
            finally:
                sampling = False
                await sampler
        backlog = {a["run"]["id"] for a in answers}
        cpu_trace.append((time.time(), server.cpu(), cpu_s(agent_ps)))
        drain_s = cpu_trace[-1][0] - t_drain
        s_cpu, a_cpu = cpu_trace[-1][1] - cpu_trace[0][1], cpu_trace[-1][2] - cpu_trace[0][2]
        events = [e for e in await client.every_event(after=cursor) if e.get("run") in backlog]
        sat = drain_figures(events, uncordoned_at)
        idle_cost = sv["cpu_pct"] / 100 * drain_s  # what the fleet's heartbeats alone would have cost
        sat.update({
            "runs": runs, "hold": hold, "cordon_s": cordon_s, "submit_s": submit_s, "submit_per_s": runs / submit_s,
            "uncordon_s": uncordon_s, "drain_wall_s": drain_s,
            "server_cpu_s": s_cpu, "server_cpu_pct": 100 * s_cpu / drain_s,
            "server_cpu_ms_per_run": 1000 * s_cpu / runs,
            "server_cpu_ms_per_run_net_of_idle": 1000 * (s_cpu - idle_cost) / runs,
            "agents_cpu_pct": 100 * a_cpu / drain_s,
            "cpu_trace": [(round(t - t_drain, 3), round(c, 3), round(a, 3)) for t, c, a in cpu_trace],
        })
        if sat.get("after_uncordon_runs_per_s") is not None:
            # the same from the last uncordon answered to the 90 % mark: the fleet's own rate,
            # without 32 uncordon requests at a time (each a commit and a scheduling pass)
            hi = sat["steady_to"]
            used = cpu_at(cpu_trace, hi, 1) - cpu_at(cpu_trace, uncordoned_at, 1)
            sat["server_cpu_ms_per_run_after_uncordon"] = 1000 * used / max(1, sat["completed_after_uncordon"])
            sat["server_cpu_pct_after_uncordon"] = 100 * used / (hi - uncordoned_at)
        if sat.get("steady_from") is not None:
            # CPU per run in the steady window (10 % → 90 % of completions): free of the
            # uncordon requests' cost at the start and of the tail at the end
            lo, hi = sat.pop("steady_from"), sat.pop("steady_to")
            used = cpu_at(cpu_trace, hi, 1) - cpu_at(cpu_trace, lo, 1)
            sat["server_cpu_ms_per_run_steady"] = 1000 * used / (0.8 * sat["succeeded"])
            sat["server_cpu_pct_steady"] = 100 * used / (hi - lo)
            sat["agents_cpu_pct_steady"] = 100 * (cpu_at(cpu_trace, hi, 2) - cpu_at(cpu_trace, lo, 2)) / (hi - lo)
        out["saturation"] = sat
        console.print(f"  drained {runs} runs: {sat['runs_per_s']:.0f} runs/s (steady {sat['steady_runs_per_s']:.0f}), "
                      f"server {sat['server_cpu_ms_per_run']:.1f} ms CPU/run", highlight=False)
        out["server_rss_mib_end"] = server.ps.memory_info().rss / MiB
    finally:
        agents.stop_all()
        await client.aclose()
        server.stop()
    out["logs"] = log_problems(workdir.rglob("*.log"))
    return out


def drain_figures(events: Sequence[dict[str, Any]], uncordoned_at: float | None = None) -> dict[str, Any]:
    """Completions/s of a drained backlog from its events, as bench/core.py ``saturation``:
    first assignment → last success, and "steady" between 10 % and 90 % of completions;
    also from the moment every machine was uncordoned (``uncordoned_at``, epoch) to the
    90 % mark, when that moment comes before it (uncordoning thousands of machines one
    request at a time takes a while, and runs are drained meanwhile)."""
    assigned = [epoch(e["at"]) for e in events if e["kind"] == "run.state" and e.get("to_state") == "assigned"]
    finals = sorted(epoch(e["at"]) for e in events if e["kind"] == "run.state" and e.get("to_state") == "succeeded")
    failed = sum(1 for e in events if e["kind"] == "run.state" and e.get("to_state") in FINAL[1:])
    requeued = sum(1 for e in events if e["kind"] == "run.state" and e.get("to_state") == "queued"
                   and e.get("reason") != "submitted")
    out: dict[str, Any] = {"runs_per_s": math.nan, "steady_runs_per_s": math.nan, "succeeded": len(finals),
                           "not_succeeded": failed, "requeued": requeued, "after_uncordon_runs_per_s": None}
    if not finals or not assigned:
        return out
    span = finals[-1] - min(assigned)
    lo, hi = finals[len(finals) // 10], finals[(9 * len(finals)) // 10]
    out.update({"runs_per_s": len(finals) / span if span > 0 else math.nan,
                "steady_runs_per_s": (0.8 * len(finals)) / (hi - lo) if hi > lo else math.nan,
                "span_s": span, "steady_from": lo, "steady_to": hi,
                "last_completion_after_90pct_s": finals[-1] - hi})
    if uncordoned_at is not None and uncordoned_at < hi:
        n = sum(1 for t in finals if uncordoned_at < t <= hi)
        out["after_uncordon_runs_per_s"] = n / (hi - uncordoned_at)
        out["completed_after_uncordon"] = n
        out["after_uncordon_window_s"] = hi - uncordoned_at
        out["completed_before_uncordon_finished"] = sum(1 for t in finals if t <= uncordoned_at)
    return out


#: issue 11, item 4: 10,000 machines on one orchestrator process
HEARTBEAT_CORE_MAX = 0.25  # the idle fleet's server CPU, cores
DISPATCH_P99_MAX_MS = 25.0
DRAIN_RATIO_MIN = 0.8  # the largest fleet's drain rate / the smallest's, same run


def drain_rate(sat: dict[str, Any]) -> float | None:
    """The fleet's own drain rate: all uncordoned → 90 % of completions when that window
    exists, else the steady 10-90 % rate."""
    rate = sat.get("after_uncordon_runs_per_s")
    if rate is None or (isinstance(rate, float) and math.isnan(rate)):
        rate = sat.get("steady_runs_per_s")
    return None if rate is None or (isinstance(rate, float) and math.isnan(rate)) else float(rate)


def fleet_goals(sizes: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 11's goals for the largest fleet of a run, its drain rate against the smallest's."""
    if not sizes:
        return []
    base, big = min(sizes, key=lambda s: s["machines"]), max(sizes, key=lambda s: s["machines"])
    n = f"{big['machines']:,} machines"
    cores = big["idle"]["server"]["cpu_pct"] / 100
    p99 = big["dispatch_ms"]["p99"]
    rate, base_rate = drain_rate(big["saturation"]), drain_rate(base["saturation"])
    ratio = rate / base_rate if rate is not None and base_rate else None
    return [
        {"goal": f"{n}: heartbeats (idle fleet), server CPU < {HEARTBEAT_CORE_MAX} core",
         "measured": f"{cores:.3f} core", "value": cores, "met": cores < HEARTBEAT_CORE_MAX},
        {"goal": f"{n}: dispatch p99 ≤ {DISPATCH_P99_MAX_MS:.0f} ms", "measured": f"{_f(p99)} ms", "value": p99,
         "met": p99 is not None and p99 <= DISPATCH_P99_MAX_MS},
        {"goal": f"{n}: drain rate ≥ {DRAIN_RATIO_MIN}x {base['machines']:,} machines'",
         "measured": f"{_f(rate, 0)} / {_f(base_rate, 0)} runs/s = {_f(ratio, 2)}x", "value": ratio,
         "met": ratio is not None and ratio >= DRAIN_RATIO_MIN},
    ]


async def fleet10k(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    result = await fleet(args, tmp)
    result["scenario"] = "fleet10k"
    result["goals"] = fleet_goals(result["sizes"])
    return result


def fleet10k_show(result: dict[str, Any]) -> None:
    fleet_show(result)
    t = Table(title="issue 11, item 4: 10,000 machines on one orchestrator process "
                    f"(load average at the start {', '.join(f'{x:.1f}' for x in result.get('loadavg_start', ()))})")
    for c in ("goal", "measured", ""):
        t.add_column(c)
    for g in result["goals"]:
        t.add_row(g["goal"], g["measured"], "met" if g["met"] else "NOT met")
    console.print(t)


def fleet10k_plot(result: dict[str, Any], path: Path) -> None:
    fleet_plot(result, path, goals=result["goals"])


def cpu_at(trace: Sequence[tuple[float, float, float]], t: float, column: int) -> float:
    """CPU seconds in ``column`` of a (time, server CPU, agents' CPU) trace at time ``t``,
    interpolated linearly between samples."""
    for a, b in itertools.pairwise(trace):
        if a[0] <= t <= b[0]:
            f = (t - a[0]) / (b[0] - a[0]) if b[0] > a[0] else 0.0
            return a[column] + f * (b[column] - a[column])
    return trace[0][column] if t < trace[0][0] else trace[-1][column]


async def fleet(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    sizes = [int(x) for x in args.machines.split(",") if x.strip()]
    result: dict[str, Any] = {"scenario": "fleet", "sizes": []}
    for n in sizes:
        console.print(f"[bold]fleet[/]: {n} machines …")
        t = time.time()
        r = await fleet_size(n, args, tmp / f"fleet-{n}")
        r["wall_s"] = time.time() - t
        result["sizes"].append(r)
    return result


def fleet_show(result: dict[str, Any]) -> None:
    t = Table(title="fleet: one orchestrator process, N simulated machines (default settings, heartbeat every 2 s)")
    t.add_column("measure")
    for s in result["sizes"]:
        t.add_column(f"{s['machines']:,} machines", justify="right")

    def row(label: str, fn: Callable[[dict[str, Any]], str]) -> None:
        t.add_row(label, *(fn(s) for s in result["sizes"]))

    row("agent processes", lambda s: str(s["agent_processes"]))
    row("all connected and ready after, s", lambda s: _f(s["connect_s"]))
    row("server CPU idle, % of a core (empty server)",
        lambda s: f"{_f(s['idle']['server']['cpu_pct'])} ({_f(s['empty_server']['cpu_pct'])})")
    row("  per 1,000 machines, net", lambda s: _f(s["idle"]["server_cpu_pct_per_1000_machines"], 2))
    row("  per heartbeat, µs", lambda s: _f(s["idle"]["server_cpu_us_per_heartbeat"], 0))
    row("server RSS idle, MiB (empty server)",
        lambda s: f"{_f(s['idle']['server']['rss_mib'], 0)} ({_f(s['empty_server']['rss_mib'], 0)})")
    row("  per machine, KiB", lambda s: _f(s["idle"]["server_rss_kib_per_machine"], 0))
    row("agent processes CPU idle, % of a core", lambda s: _f(s["idle"]["agents"]["cpu_pct"]))
    row("agent processes RSS, MiB (KiB/machine)",
        lambda s: f"{_f(s['idle']['agents']['rss_mib'], 0)} ({_f(s['idle']['agents_rss_kib_per_machine'], 0)})")
    row("dispatch p50 / p90 / p99, ms", lambda s: " / ".join(_f(s["dispatch_ms"][k]) for k in ("p50", "p90", "p99")))
    row("no-op round trip p50 / p90 / p99, ms",
        lambda s: " / ".join(_f(s["round_trip_ms"][k]) for k in ("p50", "p90", "p99")))
    row("saturation: backlog runs", lambda s: f"{s['saturation']['runs']:,}")
    row("  runs/s overall / steady 10-90 %", lambda s: f"{_f(s['saturation']['runs_per_s'], 0)} / "
        f"{_f(s['saturation']['steady_runs_per_s'], 0)}")
    row("  runs/s, all uncordoned → 90 % (window, s)", lambda s: f"{_f(s['saturation'].get('after_uncordon_runs_per_s'), 0)} "
        f"({_f(s['saturation'].get('after_uncordon_window_s'), 1)})")
    row("  server CPU ms/run (% of a core), all uncordoned", lambda s: f"{_f(s['saturation'].get('server_cpu_ms_per_run_after_uncordon'), 2)} "
        f"({_f(s['saturation'].get('server_cpu_pct_after_uncordon'), 0)})")
    row("  server CPU ms/run: gross / net of idle / steady", lambda s: " / ".join(
        _f(s["saturation"].get(k), 2) for k in ("server_cpu_ms_per_run", "server_cpu_ms_per_run_net_of_idle",
                                                "server_cpu_ms_per_run_steady")))
    row("  server / agents CPU in the steady window, %", lambda s: f"{_f(s['saturation'].get('server_cpu_pct_steady'), 0)} / "
        f"{_f(s['saturation'].get('agents_cpu_pct_steady'), 0)}")
    row("  runs requeued (lost or refused)", lambda s: str(s["saturation"]["requeued"]))
    row("  cordon / submit / uncordon, s", lambda s: " / ".join(
        _f(s["saturation"][k], 1) for k in ("cordon_s", "submit_s", "uncordon_s")))
    row("log warnings / errors / tracebacks", lambda s: "{} / {} / {}".format(
        s["logs"]["by_level"].get("WARNING", 0), s["logs"]["by_level"].get("ERROR", 0), s["logs"]["tracebacks"]))
    console.print(t)


def fleet_plot(result: dict[str, Any], path: Path, goals: Sequence[dict[str, Any]] = ()) -> None:
    plt = _pyplot()
    sizes = result["sizes"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    (ax1, ax2), (ax3, ax4) = axes
    xs = [0] + [s["machines"] for s in sizes]
    cpu = [sizes[0]["empty_server"]["cpu_pct"]] + [s["idle"]["server"]["cpu_pct"] for s in sizes] if sizes else []
    rss = [sizes[0]["empty_server"]["rss_mib"]] + [s["idle"]["server"]["rss_mib"] for s in sizes] if sizes else []
    agents = [0.0] + [s["idle"]["agents"]["cpu_pct"] for s in sizes] if sizes else []
    ax1.plot(xs, cpu, "o-", color="#1f77b4", label="server CPU, % of a core")
    ax1.plot(xs, agents, "s--", color="#9467bd", label="agent processes' CPU, %")
    ax1.set_xlabel("connected machines (idle; a heartbeat every 2 s each)")
    ax1.set_ylabel("CPU, % of one core")
    ax1.grid(True, alpha=0.3)
    ax1b = ax1.twinx()
    ax1b.plot(xs, rss, "^-", color="#d62728", label="server RSS, MiB")
    ax1b.set_ylabel("server RSS, MiB")
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = ax1b.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, loc="upper left")
    ax1.set_title("idle cost of the fleet")
    for i, s in enumerate(sizes):
        color = f"C{i}"
        for key, style, what in (("dispatch_samples_ms", "-", "dispatch"), ("round_trip_samples_ms", ":", "round trip")):
            v = sorted(s[key])
            if v:
                ax2.step(v, [(j + 1) / len(v) for j in range(len(v))], style, where="post", color=color,
                         label=f"{s['machines']:,}: {what}")
    ax2.set_xscale("log")
    ax2.xaxis.set_minor_formatter(_null_formatter())
    ax2.set_xlabel("ms (one no-op run at a time)")
    ax2.set_ylabel("fraction of runs")
    ax2.set_title("submit → agent holds the assignment (—), → result (···)")
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=8)
    for i, s in enumerate(sizes):
        ts, rs = zip(*s["connect_curve"], strict=True) if s["connect_curve"] else ((), ())
        ax3.plot(ts, rs, color=f"C{i}", label=f"{s['machines']:,} machines")
    ax3.set_xlabel("seconds since the agent processes started")
    ax3.set_ylabel("machines ready")
    ax3.set_title("connecting the fleet")
    ax3.grid(True, alpha=0.3)
    ax3.legend()
    labels = [f"{s['machines']:,}" for s in sizes]
    pos = list(range(len(sizes)))
    for j, (key, what) in enumerate((("runs_per_s", "overall"), ("steady_runs_per_s", "steady, 10-90 %"),
                                     ("after_uncordon_runs_per_s", "all uncordoned → 90 %"))):
        ax4.bar([p + (j - 1) * 0.27 for p in pos], [s["saturation"].get(key) or 0.0 for s in sizes], 0.27, label=what)
    for p, s in zip(pos, sizes, strict=True):
        top = max(s["saturation"].get(k) or 0.0 for k in ("runs_per_s", "steady_runs_per_s", "after_uncordon_runs_per_s"))
        sat = s["saturation"]
        cost = " / ".join(_f(sat.get(k), 2) for k in ("server_cpu_ms_per_run_steady", "server_cpu_ms_per_run_after_uncordon"))
        ax4.text(p, top * 1.02, f"server CPU ms/run\nsteady / uncordoned:\n{cost}", ha="center", va="bottom", fontsize=8)
    ax4.set_ylim(0, 1.45 * max([1.0, *(s["saturation"].get(k) or 0.0 for s in sizes
                                      for k in ("runs_per_s", "steady_runs_per_s", "after_uncordon_runs_per_s"))]))
    ax4.set_xticks(pos, labels)
    ax4.set_xlabel("machines")
    ax4.set_ylabel("no-op runs completed per second")
    ax4.set_title("saturation: a backlog of no-op runs")
    ax4.legend(loc="upper right", fontsize=8)
    title = f"bench/scale.py {result['scenario']}: one deskfleet server, default settings"
    if goals:
        title += "".join(f"\n{g['goal']}: {g['measured']} ({'met' if g['met'] else 'NOT met'})" for g in goals)
    fig.suptitle(title, fontsize=10 if goals else None)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _null_formatter() -> Any:
    from matplotlib.ticker import NullFormatter

    return NullFormatter()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# == failover =======================================================================================


@dataclass(slots=True)
class RunView:
    """What the event feed says about one run now."""
    key: str = ""
    seconds: float = 0.0
    state: str = "queued"
    attempt: int | None = None
    machine: str | None = None
    running_since: float | None = None  # server time of its automation_started

    @property
    def final(self) -> bool:
        return self.state in FINAL


@dataclass(slots=True)
class Kill:
    wave: int
    machine: str
    run: str
    key: str
    attempt: int
    at: float  # epoch of the SIGKILL (this host's clock)
    into_run_s: float  # how far into its work the run was (from its automation_started)
    seconds: float
    last_beat: float | None = None  # the machine's last heartbeat received, server clock
    trace: dict[str, Any] = field(default_factory=dict)


def trace_recovery(attempt: int, victim: str, run_events: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """From one run's events, what became of its killed ``attempt`` (epoch seconds, server clock):
    ``lost`` (its ``attempt.ended`` and that event's reason), ``requeued`` (the run back to
    queued, and why), the ``next`` attempt on another machine — its assignment, ``accepted``
    (the agent's preparing), ``started`` (the earlier of ``reconcile.started`` and the
    ``automation_started`` state), how it started, and what the reconcile check found —
    and the run's final state."""
    out: dict[str, Any] = {"lost": None, "lost_reason": None, "requeued": None, "requeued_reason": None,
                           "next": None, "next_machine": None, "assigned": None, "accepted": None,
                           "started": None, "started_by": None, "effect_found": None, "final": None}
    for e in sorted(run_events, key=lambda e: e["id"]):
        kind, a, at = e["kind"], e.get("attempt"), epoch(e["at"])
        if kind == "attempt.ended" and a == attempt and out["lost"] is None:
            out["lost"], out["lost_reason"] = at, e.get("reason")
        elif kind == "run.state" and a == attempt and e.get("to_state") == "queued" and out["requeued"] is None:
            out["requeued"], out["requeued_reason"] = at, e.get("reason")
        elif (kind == "run.state" and e.get("reason") == "scheduled" and a is not None and a > attempt
              and e.get("machine") != victim and out["next"] is None):
            out["next"], out["next_machine"], out["assigned"] = a, e.get("machine"), at
        if out["next"] is not None and a == out["next"]:
            if kind == "run.state" and e.get("reason") == "agent_accepted" and out["accepted"] is None:
                out["accepted"] = at
            starts = (kind == "reconcile.started"
                      or (kind == "run.state" and e.get("reason") == "automation_started"))
            if starts and out["started"] is None:
                out["started"] = at
                out["started_by"] = "reconcile" if kind == "reconcile.started" else "automation"
            if kind == "reconcile.done":
                out["effect_found"] = bool((e.get("data") or {}).get("effect_found"))
        if kind == "run.state" and e.get("to_state") in FINAL:
            out["final"] = e["to_state"]
    return out


def failover_figures(kills: Sequence[Kill], heartbeat_timeout: float = 10.0) -> dict[str, Any]:
    """Recovery and lease-lost distributions, and where the time went, from traced kills."""
    recovered = [k for k in kills if k.trace.get("started") is not None]
    lost = [k for k in kills if k.trace.get("lost") is not None]
    steps: dict[str, list[float]] = {
        "last heartbeat received → SIGKILL": [], "SIGKILL → lease due (last beat + timeout)": [],
        "lease due → expired by the sweep": [], "expired → next attempt assigned (scheduling)": [],
        "assigned → agent accepted": [], "accepted → reconcile started": [],
    }
    for k in recovered:
        tr = k.trace
        if k.last_beat is not None and tr["lost"] is not None:
            due = k.last_beat + heartbeat_timeout
            steps["last heartbeat received → SIGKILL"].append(k.at - k.last_beat)
            steps["SIGKILL → lease due (last beat + timeout)"].append(due - k.at)
            steps["lease due → expired by the sweep"].append(tr["lost"] - due)
        if tr["lost"] is not None and tr["assigned"] is not None:
            steps["expired → next attempt assigned (scheduling)"].append(tr["assigned"] - tr["lost"])
        if tr["assigned"] is not None and tr["accepted"] is not None:
            steps["assigned → agent accepted"].append(tr["accepted"] - tr["assigned"])
        if tr["accepted"] is not None and tr["started"] is not None:
            steps["accepted → reconcile started"].append(tr["started"] - tr["accepted"])
    recovery = [k.trace["started"] - k.at for k in recovered]
    goal = 2 * heartbeat_timeout
    return {
        "kills": len(kills),
        "recovery_s": dist(recovery),
        "lease_lost_s": dist(k.trace["lost"] - k.at for k in lost),
        "never_recovered": len(kills) - len(recovered),
        "lost_reasons": dict(Counter(str(k.trace.get("lost_reason")) for k in kills)),
        "requeued_reasons": dict(Counter(str(k.trace.get("requeued_reason")) for k in kills)),
        "started_by": dict(Counter(str(k.trace.get("started_by")) for k in kills)),
        "within_goal": sum(1 for r in recovery if r <= goal),
        "goal_s": goal,
        "goal_met_at_p99": bool(recovery) and len(recovery) == len(kills) and pct(recovery, 99) <= goal,
        "steps_s": {name: dist(v) for name, v in steps.items()},
    }


class Feed:
    """The global event feed, read incrementally, folded into one :class:`RunView` per run."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.cursor = 0
        self.runs: dict[str, RunView] = {}
        self.by_run: dict[str, list[dict[str, Any]]] = {}

    async def catch_up(self) -> None:
        batch = await self.client.every_event(after=self.cursor)
        for e in batch:
            self._fold(e)
        if batch:
            self.cursor = batch[-1]["id"]

    def _fold(self, e: dict[str, Any]) -> None:
        run = e.get("run")
        if run is None:
            return
        self.by_run.setdefault(run, []).append(e)
        if e["kind"] != "run.state":
            return
        v = self.runs.setdefault(run, RunView())  # its submit may not have returned yet
        v.state = e.get("to_state") or v.state
        if e.get("reason") == "scheduled":
            v.attempt, v.machine, v.running_since = e.get("attempt"), e.get("machine"), None
        elif e.get("reason") == "automation_started":
            v.running_since = epoch(e["at"])
        elif v.state == "queued":
            v.attempt, v.machine, v.running_since = None, None, None


async def failover(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import core

    from deskfleet.client import AsyncClient
    from deskfleet.sim.backend import SimBackend

    workdir = tmp / "failover"
    n, total, wave = args.machines, args.kills, args.wave
    busy_target = max(1, n // 2)
    if wave > n - busy_target:
        raise SystemExit(f"--wave {wave} exceeds the idle machines ({n - busy_target}): retries could not start at once")
    rng = random.Random(args.seed)
    fresh(workdir)
    server = core.Server(workdir, "FULL")
    reaper.servers.append(server)
    names = [machine_name("fo", i) for i in range(1, n + 1)]
    number = {name: i for i, name in enumerate(names, start=1)}
    machines = Machines(workdir / "logs", lambda name: (agent_argv(server, workdir, "fo", 1, number[name]), {}))
    reaper.machines.append(machines)
    client = AsyncClient(server.url, timeout=60)
    feed = Feed(client)
    kills: list[Kill] = []
    struck: set[str] = set()  # runs hit once: each kill strikes a fresh run (max_attempts is 3)
    mine: dict[str, RunView] = {}
    waves: list[dict[str, Any]] = []
    slow_returns: list[dict[str, Any]] = []
    result: dict[str, Any] = {"scenario": "failover", "machines": n, "busy_target": busy_target, "wave": wave,
                              "run_seconds": args.run_seconds, "restart_pause_s": args.restart_pause}
    seq = 0

    async def top_up() -> None:
        nonlocal seq
        active = sum(1 for v in mine.values() if not v.final)
        for _ in range(busy_target - active):
            seq += 1
            key = f"fo{seq:05d}"
            run = await client.submit("sim.work", {"key": key, "seconds": args.run_seconds})
            v = feed.runs.setdefault(run["id"], RunView())
            v.key, v.seconds = key, args.run_seconds
            mine[run["id"]] = v

    try:
        await server.ready(client)
        t0 = time.monotonic()
        for name in names:
            machines.start(name)
        await core.wait_machines(client, n, timeout=300)
        result["ready_s"] = time.monotonic() - t0
        console.print(f"  {n} machines (one process each) ready after {result['ready_s']:.1f} s; "
                      f"{busy_target} runs of {args.run_seconds:.0f} s kept going; {total} kills in waves of {wave} …",
                      highlight=False)
        w = 0
        while len(kills) < total:
            w += 1
            want = min(wave, total - len(kills))
            await top_up()
            t_wait = time.monotonic()
            deadline = t_wait + args.run_seconds + 60
            # Phases alternate kill by kill: one before its run's effect (nothing done yet), one
            # after it (done, never reported), so that reconcile meets both answers.
            want_after = sum(1 for i in range(want) if (len(kills) + i) % 2 == 1)
            want_before = want - want_after
            while True:  # victims running long enough, and idle machines for their retries
                await feed.catch_up()
                now = time.time()
                eligible = sorted(((rid, v) for rid, v in mine.items()
                                   if v.state == "running" and v.running_since is not None and v.machine in number
                                   and rid not in struck and machines.alive(v.machine)
                                   and 2.0 <= now - v.running_since <= v.seconds - 3.0),
                                  key=lambda x: x[1].machine or "")
                # a margin either side of the halfway effect, where the phase would be a toss-up
                before = [x for x in eligible if now - (x[1].running_since or now) < x[1].seconds / 2 - 1]
                after = [x for x in eligible if now - (x[1].running_since or now) > x[1].seconds / 2 + 1]
                ready = (await client.summary())["machines"].get("ready", 0)
                if len(before) >= want_before and len(after) >= want_after and ready >= want:
                    chosen = rng.sample(before, want_before) + rng.sample(after, want_after)
                    break
                if eligible and ready > 0 and time.monotonic() - t_wait > args.phase_wait:
                    # struck runs executing again hold slots for a whole run, and a run needs
                    # half of it to pass its effect: take what there is rather than wait longer
                    chosen = (rng.sample(before, min(want_before, len(before)))
                              + rng.sample(after, min(want_after, len(after))))
                    rest = [x for x in eligible if x not in chosen]
                    chosen += rng.sample(rest, min(len(rest), want - len(chosen)))
                    chosen = chosen[:ready]
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"wave {w}: {len(eligible)} eligible victims and {ready} idle machines "
                                       f"for {want} kills after waiting {args.run_seconds + 60:.0f} s")
                await asyncio.sleep(0.2)
                await top_up()
            wave_kills = []
            for rid, v in chosen:
                assert v.machine is not None and v.attempt is not None and v.running_since is not None
                at = machines.kill(v.machine)
                struck.add(rid)
                wave_kills.append(Kill(wave=w, machine=v.machine, run=rid, key=v.key, attempt=v.attempt, at=at,
                                       into_run_s=at - v.running_since, seconds=v.seconds))
            kills.extend(wave_kills)
            # -- until every struck run has started again elsewhere
            deadline = time.monotonic() + args.recovery_timeout
            while True:
                await feed.catch_up()
                for k in wave_kills:
                    k.trace = trace_recovery(k.attempt, k.machine, feed.by_run.get(k.run, []))
                if all(k.trace["started"] is not None for k in wave_kills) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            for k in wave_kills:  # unchanged until the agent reconnects
                beat = (await client.machine(k.machine)).get("last_heartbeat_at")
                k.last_beat = epoch(beat) if beat else None
            rec = [k.trace["started"] - k.at for k in wave_kills if k.trace["started"] is not None]
            # -- capacity back: the same machines, restarted with their keys
            await asyncio.sleep(args.restart_pause)
            t_restart = time.monotonic()
            for k in wave_kills:
                machines.dead.discard(k.machine)  # Machines keeps killed names; this one lives again
                machines.start(k.machine)
            back_s = None
            status: dict[str, int] = {}
            while time.monotonic() - t_restart < args.return_timeout:
                status = (await client.summary())["machines"]
                if status.get("ready", 0) + status.get("busy", 0) >= n:
                    back_s = time.monotonic() - t_restart
                    break
                await asyncio.sleep(0.25)
            if back_s is None:
                slow_returns.append({"wave": w, "machines": status})
            waves.append({"wave": w, "kills": len(wave_kills), "recovered": len(rec),
                          "recovery_max_s": max(rec) if rec else None, "machines_back_after_restart_s": back_s})
            console.print(f"  wave {w}: {len(wave_kills)} SIGKILLs, {len(rec)} recovered "
                          f"(max {_f(max(rec) if rec else None)} s); machines back "
                          f"{_f(back_s)} s after restart; {len(kills)}/{total}", highlight=False)
        # the rest of the long runs' work is of no interest: cancel it, so that teardown is quick
        await feed.catch_up()
        for rid, v in mine.items():
            if not v.final:
                with contextlib.suppress(Exception):
                    await client.cancel(rid)
        end = time.monotonic() + 30
        while time.monotonic() < end:
            await feed.catch_up()
            if all(v.final for v in mine.values()):
                break
            await asyncio.sleep(0.25)
        await feed.catch_up()
        for k in kills:
            k.trace = trace_recovery(k.attempt, k.machine, feed.by_run.get(k.run, []))
    finally:
        machines.stop_all()
        await client.aclose()
        server.stop()
    backend_path = workdir / "sim-backend.db"
    counts = SimBackend(backend_path).work_counts()
    done = effects(backend_path)
    twice = {key: c for key, c in counts.items() if c > 1}
    per_kill = []
    for k in kills:
        d = asdict(k)
        d["effect_before_kill"] = any(t <= k.at and m == k.machine for t, m in done.get(k.key, []))
        d["effects"] = counts.get(k.key, 0)
        d["recovery_s"] = k.trace["started"] - k.at if k.trace.get("started") else None
        d["lease_lost_s"] = k.trace["lost"] - k.at if k.trace.get("lost") else None
        per_kill.append(d)
    result.update(failover_figures(kills))
    result.update({
        "waves": waves, "machines_slow_to_return": slow_returns,
        "runs_submitted": len(mine), "runs_final": dict(Counter(v.state for v in mine.values())),
        "struck_before_effect": sum(1 for d in per_kill if not d["effect_before_kill"]),
        "struck_after_effect": sum(1 for d in per_kill if d["effect_before_kill"]),
        "reconcile_found_effect": sum(1 for k in kills if k.trace.get("effect_found") is True),
        "reconcile_found_nothing": sum(1 for k in kills if k.trace.get("effect_found") is False),
        "effects_twice": len(twice), "effects_twice_keys": twice,
        "struck_runs_failed": sum(1 for k in kills if k.trace.get("final") == "failed"),
        "per_kill": per_kill, "logs": log_problems(workdir.rglob("*.log")),
    })
    return result


def failover_show(r: dict[str, Any]) -> None:
    t = Table(title=f"failover: {r['kills']} SIGKILLs of busy agents ({r['machines']} machines, one process each; "
                    f"waves of {r['wave']}; runs of {r['run_seconds']:.0f} s; default settings)")
    for col in ("measure", "n", "p50 s", "p90 s", "p99 s", "max s"):
        t.add_column(col, justify="left" if col == "measure" else "right")
    for label, d in (("SIGKILL → run's next attempt starting elsewhere", r["recovery_s"]),
                     ("SIGKILL → lease expired (attempt lost)", r["lease_lost_s"])):
        t.add_row(label, str(d["n"]), *(_f(d[k], 2) for k in ("p50", "p90", "p99", "max")))
    t.add_section()
    for label, d in r["steps_s"].items():
        t.add_row(f"  {label}", str(d["n"]), *(_f(d[k], 2) for k in ("p50", "p90", "p99", "max")))
    console.print(t)
    goal = "met" if r["goal_met_at_p99"] else "NOT met"
    console.print(
        f"goal: failover within {r['goal_s']:.0f} s (2 x heartbeat timeout) at p99 — {goal} "
        f"({r['within_goal']}/{r['kills']} within it; never recovered: {r['never_recovered']}). "
        f"Struck before their effect: {r['struck_before_effect']}, after: {r['struck_after_effect']}; "
        f"reconcile found the effect {r['reconcile_found_effect']}x, nothing {r['reconcile_found_nothing']}x. "
        f"Effects that happened twice: {r['effects_twice']}. Struck runs that failed: {r['struck_runs_failed']}. "
        f"Waves whose machines were slow to return: {len(r['machines_slow_to_return'])}.", highlight=False)


def failover_plot(r: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    rec = sorted(d["recovery_s"] for d in r["per_kill"] if d["recovery_s"] is not None)
    lost = sorted(d["lease_lost_s"] for d in r["per_kill"] if d["lease_lost_s"] is not None)
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.8))
    lo = min([*rec, *lost, 8.0])
    hi = max([*rec, *lost, 12.0])
    bins = [lo + i * (hi - lo) / 40 for i in range(41)]
    ax1.hist(lost, bins=bins, alpha=0.6, label="SIGKILL → lease expired", color="#ff7f0e")
    ax1.hist(rec, bins=bins, alpha=0.6, label="SIGKILL → next attempt starting", color="#1f77b4")
    ax1.axvline(10, color="grey", ls="--", lw=1, label="heartbeat timeout, 10 s")
    ax1.set_xlabel("seconds")
    ax1.set_ylabel("kills")
    ax1.set_title(f"{r['kills']} kills: histogram")
    ax1.legend(fontsize=8, loc="upper left")
    for v, label, color in ((lost, "lease expired", "#ff7f0e"), (rec, "next attempt starting", "#1f77b4")):
        if v:
            ax2.step([0.0, *v], [0.0] + [(i + 1) / len(v) for i in range(len(v))], where="post", label=label,
                     color=color)
    ax2.axvline(r["goal_s"], color="#d62728", ls="--", lw=1, label=f"goal: {r['goal_s']:.0f} s (2 x timeout)")
    ax2.axvline(10, color="grey", ls=":", lw=1, label="heartbeat timeout, 10 s")
    ax2.set_xlim(0, max(r["goal_s"] + 2, hi + 1))
    ax2.set_ylim(0, 1.02)
    ax2.set_xlabel("seconds after SIGKILL")
    ax2.set_ylabel("fraction of kills")
    ax2.set_title("CDF")
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=8, loc="center left")
    names = [k for k in r["steps_s"] if k != "last heartbeat received → SIGKILL"]
    meds = [r["steps_s"][k]["p50"] or 0.0 for k in names]
    left = 0.0
    for i, (name, m) in enumerate(zip(names, meds, strict=True)):
        ax3.barh([0], [m], height=0.6, left=[left], color=f"C{i}", label=f"{name}: {m:.2f} s")
        left += m
    ax3.set_ylim(-1.2, 1.2)
    ax3.set_yticks([])
    ax3.set_xlabel("seconds after SIGKILL (medians of each step)")
    ax3.set_title("where the time goes")
    ax3.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=1)
    fig.suptitle(f"bench/scale.py failover: {r['machines']} machines, agent SIGKILLed mid-run, default settings "
                 f"(heartbeat 2 s, timeout 10 s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# == utilisation ====================================================================================


#: the utilisation backlog's mix, as users' is: automations whose runs typically take different
#: times (a lookup, a form, a report) — (automation, share of the runs, median s, log-normal sigma)
MIX = (("sim.work_short", 0.5, 0.4, 0.35), ("sim.work", 0.35, 1.2, 0.35), ("sim.work_long", 0.15, 3.5, 0.35))


def work_plan(seed: int, machines: int, per_machine_s: float, *, lo: float = 0.1,
              hi: float = 8.0) -> list[tuple[str, str, float]]:
    """(key, automation, seconds) of a backlog drawn from :data:`MIX` (each automation's
    durations log-normal around its median, clipped to [``lo``, ``hi``]; mean ≈ 1.2 s), in
    random order, as many as make ``per_machine_s`` seconds of work per machine; seeded, so
    every run of the scenario gets the same plan."""
    rng = random.Random(seed)
    plan: list[tuple[str, str, float]] = []
    total = 0.0
    names, shares = [m[0] for m in MIX], [m[1] for m in MIX]
    shape = {m[0]: (m[2], m[3]) for m in MIX}
    while total < machines * per_machine_s:
        name = rng.choices(names, shares)[0]
        median, sigma = shape[name]
        s = round(min(hi, max(lo, rng.lognormvariate(math.log(median), sigma))), 3)
        plan.append((f"u{len(plan):05d}", name, s))
        total += s
    return plan


def utilisation_figures(events: Sequence[dict[str, Any]], seconds_of: dict[str, float],
                        machines: Sequence[str]) -> dict[str, Any]:
    """Busy machine-time, makespan against its ideal bound, and where idle time went, from the
    events of the runs in ``seconds_of`` (run id → requested seconds) on ``machines``."""
    att: dict[int, dict[str, Any]] = {}
    started: dict[int, float] = {}
    finals: dict[str, str] = {}
    for e in events:
        run, a = e.get("run"), e.get("attempt")
        if run not in seconds_of:
            continue
        if e["kind"] == "run.state":
            if e.get("reason") == "scheduled" and a is not None:
                att[a] = {"run": run, "machine": e.get("machine"), "assigned": epoch(e["at"]), "ended": None}
            elif e.get("reason") == "automation_started" and a is not None:
                started[a] = epoch(e["at"])
            if e.get("to_state") in FINAL:
                finals[run] = e["to_state"]
        elif e["kind"] == "attempt.ended" and a in att:
            att[a]["ended"] = epoch(e["at"])
            att[a]["ending"] = e.get("reason")
    done = [x | {"attempt": a} for a, x in att.items() if x["ended"] is not None]
    if not done:
        raise ValueError("no attempt ended: nothing to measure")
    t0 = min(x["assigned"] for x in done)
    t1 = max(x["ended"] for x in done)
    makespan = t1 - t0
    by_machine: dict[str, list[dict[str, Any]]] = {m: [] for m in machines}
    for x in sorted(done, key=lambda x: x["assigned"]):
        by_machine.setdefault(x["machine"], []).append(x)
    busy: dict[str, float] = {}
    gaps: list[float] = []
    head = tail = 0.0
    timeline: dict[str, list[tuple[float, float]]] = {}
    for m, xs in by_machine.items():
        busy[m] = sum(min(x["ended"], t1) - max(x["assigned"], t0) for x in xs)
        timeline[m] = [(round(x["assigned"] - t0, 4), round(x["ended"] - t0, 4)) for x in xs]
        if not xs:
            head += makespan
            continue
        head += xs[0]["assigned"] - t0
        tail += t1 - xs[-1]["ended"]
        gaps.extend(max(0.0, b["assigned"] - a["ended"]) for a, b in itertools.pairwise(xs))
    # Until every run had been assigned once, the backlog had work for every machine, so idle
    # time there is the orchestrator's doing; after it, machines run out of work one by one
    # whatever the orchestrator does. (A run requeued later, e.g. after a lost attempt, does
    # not extend that window.)
    first: dict[str, float] = {}
    for x in done:
        first[x["run"]] = min(first.get(x["run"], math.inf), x["assigned"])
    t_last = max(first.values())
    queued_busy = sum(max(0.0, min(x["ended"], t_last) - max(x["assigned"], t0)) for x in done)
    n = len(by_machine)
    total_busy = sum(busy.values())
    work = sum(seconds_of.values())
    succeeded_work = sum(s for r, s in seconds_of.items() if finals.get(r) == "succeeded")
    bound = max(work / n, max(seconds_of.values()))
    ok = [x for x in done if x.get("ending") == "succeeded" and x["attempt"] in started]
    capacity = n * makespan
    return {
        "machines": n, "runs": len(seconds_of), "attempts": len(done),
        "runs_final": dict(Counter(finals.values())), "runs_not_final": len(seconds_of) - len(finals),
        "attempt_endings": dict(Counter(str(x.get("ending")) for x in done)),
        "work_s": work, "mean_seconds": work / len(seconds_of), "longest_s": max(seconds_of.values()),
        "makespan_s": makespan, "ideal_makespan_s": bound, "makespan_over_bound": makespan / bound,
        "utilisation": total_busy / capacity,
        "utilisation_while_queued": queued_busy / (n * (t_last - t0)) if t_last > t0 else None,
        "last_assignment_s": t_last - t0,
        "work_fraction": succeeded_work / capacity,
        "idle_fraction": {"gaps between attempts": sum(gaps) / capacity, "head (before a machine's first run)": head / capacity,
                          "tail (after a machine's last run)": tail / capacity},
        "busy_fraction": {"requested work": succeeded_work / capacity,
                          "overhead inside attempts": (total_busy - succeeded_work) / capacity},
        "gap_ms": dist(gaps, 1000),
        "attempt_overhead_ms": dist(((x["ended"] - x["assigned"]) - seconds_of[x["run"]] for x in ok), 1000),
        "assigned_to_started_ms": dist((started[x["attempt"]] - x["assigned"] for x in ok), 1000),
        "work_end_to_attempt_ended_ms": dist(
            (x["ended"] - started[x["attempt"]] - seconds_of[x["run"]] for x in ok), 1000),
        "machine_busy_fraction": dist(b / makespan for b in busy.values()) if makespan > 0 else {},
        "timeline": timeline,
    }


async def utilisation(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import core

    from deskfleet.client import AsyncClient
    from deskfleet.sim.backend import SimBackend

    workdir = tmp / "utilisation"
    n = args.machines
    plan = work_plan(args.seed, n, args.work_per_machine)
    if args.order == "longest-first":
        # the classic LPT rule, by the client that knows each run's length: short runs last,
        # so that machines run out of work together
        plan.sort(key=lambda ks: -ks[2])
    fresh(workdir)
    server = core.Server(workdir, "FULL", ["--backlog-order", args.server_order])
    reaper.servers.append(server)
    parts = split(n, (n + args.agent_processes - 1) // args.agent_processes)
    part = {f"agents-{i}": p for i, p in enumerate(parts)}
    agents = Machines(workdir / "logs", lambda name: (agent_argv(server, workdir, "ut", part[name][1], part[name][0]), {}))
    reaper.machines.append(agents)
    client = AsyncClient(server.url, timeout=120)
    result: dict[str, Any] = {"scenario": "utilisation", "agent_processes": len(parts), "order": args.order,
                              "server_order": args.server_order,
                              "work_per_machine_s": args.work_per_machine, "seed": args.seed}
    seconds_of: dict[str, float] = {}
    try:
        await server.ready(client)
        t0 = time.monotonic()
        for name in part:
            agents.start(name)
        await core.wait_machines(client, n, timeout=300)
        result["ready_s"] = time.monotonic() - t0
        ids = [m["id"] for m in await client.machines()]
        console.print(f"  {n} machines ready after {result['ready_s']:.1f} s; cordon, submit {len(plan)} sim.work* runs "
                      f"({sum(s for *_, s in plan):.0f} s of work), uncordon …", highlight=False)
        # The orchestrator learns each automation's duration from the runs that end: a few of
        # each kind first, as a fleet that has been running a while knows them.
        for i, (name, _share, median, _sigma) in enumerate(MIX * 2):
            await client.submit(name, {"key": f"warm{i}", "seconds": median}, wait=60)
        await act_all(client, ids, "cordon")
        # In plan order, in batches of 1,000: the queue's order is the plan's (FIFO by submit).
        answers = await client.submit_many([{"automation": name, "input": {"key": key, "seconds": seconds},
                                             "queue_timeout": 3600} for key, name, seconds in plan])
        for (_, _, seconds), answer in zip(plan, answers, strict=True):
            seconds_of[answer["run"]["id"]] = seconds
        agent_ps = processes(agents.procs.values())
        s_cpu0, a_cpu0, t_drain = server.cpu(), cpu_s(agent_ps), time.perf_counter()
        await act_all(client, ids, "uncordon")
        await wait_final(client, 0, len(plan), timeout=args.drain_timeout)
        wall = time.perf_counter() - t_drain
        result["drain_wall_s"] = wall
        result["server_cpu_pct"] = 100 * (server.cpu() - s_cpu0) / wall
        result["agents_cpu_pct"] = 100 * (cpu_s(agent_ps) - a_cpu0) / wall
        result["server_cpu_ms_per_run"] = 1000 * (server.cpu() - s_cpu0) / len(plan)
        events = await client.every_event()
    finally:
        agents.stop_all()
        await client.aclose()
        server.stop()
    result.update(utilisation_figures(events, seconds_of, ids))
    counts = SimBackend(workdir / "sim-backend.db").work_counts()
    result["effects_twice"] = sum(1 for c in counts.values() if c > 1)
    result["effects_missing"] = sum(1 for k, *_ in plan if counts.get(k, 0) == 0)
    result["logs"] = log_problems(workdir.rglob("*.log"))
    return result


def utilisation_show(r: dict[str, Any]) -> None:
    t = Table(title=f"utilisation: {r['machines']} machines ({r['agent_processes']} agent processes), "
                    f"a backlog of {r['runs']:,} sim.work* runs submitted in {r['order']} order, server "
                    f"{r.get('server_order', 'queued')}, {r['work_s']:,.0f} s of work "
                    f"(mean {r['mean_seconds']:.2f} s, longest {r['longest_s']:.2f} s)")
    t.add_column("measure")
    t.add_column("value", justify="right")
    goal = "met" if r["utilisation"] >= 0.98 else "NOT met"
    t.add_row("utilisation: busy machine-time / (machines x makespan)", f"{100 * r['utilisation']:.1f} % (goal ≥ 98 %: {goal})")
    t.add_row("  requested work / (machines x makespan)", f"{100 * r['work_fraction']:.1f} %")
    t.add_row(f"  until every run had been assigned once (first {r['last_assignment_s']:.1f} s)",
              f"{100 * (r['utilisation_while_queued'] or 0):.2f} %")
    t.add_row("makespan, s (ideal lower bound)", f"{r['makespan_s']:.1f} ({r['ideal_makespan_s']:.1f})")
    t.add_row("makespan / bound", f"{r['makespan_over_bound']:.3f}")
    for k, v in r["idle_fraction"].items():
        t.add_row(f"  idle: {k}", f"{100 * v:.2f} %")
    t.add_row("  busy, but overhead inside attempts", f"{100 * r['busy_fraction']['overhead inside attempts']:.2f} %")
    for label, key in (("orchestration gap: attempt end → next assignment", "gap_ms"),
                       ("overhead per attempt (assigned → ended - work)", "attempt_overhead_ms"),
                       ("  assigned → automation started", "assigned_to_started_ms"),
                       ("  work done → attempt ended", "work_end_to_attempt_ended_ms")):
        d = r[key]
        t.add_row(f"{label}, p50 / p99 ms", f"{_f(d['p50'])} / {_f(d['p99'])}")
    t.add_row("server CPU during the drain, % of a core (ms/run)",
              f"{r['server_cpu_pct']:.0f} ({r['server_cpu_ms_per_run']:.1f})")
    t.add_row("agent processes' CPU during the drain, %", f"{r['agents_cpu_pct']:.0f}")
    t.add_row("runs final", ", ".join(f"{k} {v}" for k, v in r["runs_final"].items()))
    t.add_row("attempts by ending", ", ".join(f"{k} {v}" for k, v in r["attempt_endings"].items()))
    t.add_row("effects twice / missing", f"{r['effects_twice']} / {r['effects_missing']}")
    console.print(t)


def utilisation_plot(r: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig = plt.figure(figsize=(15, 10))
    grid = fig.add_gridspec(2, 3, height_ratios=[1.4, 1])
    ax0 = fig.add_subplot(grid[0, :])
    machines = sorted(r["timeline"])
    for i, m in enumerate(machines):
        spans = [(s, e - s) for s, e in r["timeline"][m]]
        # alternate colours, so that back-to-back attempts (gaps of a few ms) stay distinct
        ax0.broken_barh(spans, (i - 0.4, 0.8), facecolors=["#1f77b4", "#aec7e8"] * (len(spans) // 2 + 1),
                        linewidth=0)
    ax0.axvline(r["ideal_makespan_s"], color="#d62728", ls="--", lw=1, label=f"ideal bound {r['ideal_makespan_s']:.1f} s")
    ax0.set_xlim(0, r["makespan_s"] * 1.01)
    ax0.set_ylim(-1, len(machines))
    ax0.set_xlabel("seconds since the first assignment")
    ax0.set_ylabel("machine")
    ax0.set_yticks([])
    ax0.set_title(f"per machine: busy (assigned → attempt ended); utilisation {100 * r['utilisation']:.1f} %")
    ax0.legend(loc="lower right")
    ax1 = fig.add_subplot(grid[1, 0])
    # busy machine-time per time bin (gaps of a few ms would show as spikes at any instant)
    bins = 200
    width = r["makespan_s"] / bins
    busy = [0.0] * bins
    for spans in r["timeline"].values():
        for s, e in spans:
            for b in range(max(0, int(s / width)), min(bins, int(e / width) + 1)):
                busy[b] += max(0.0, min(e, (b + 1) * width) - max(s, b * width))
    ax1.step([b * width for b in range(bins + 1)], [100 * v / (r["machines"] * width) for v in [*busy, busy[-1]]],
             where="post", lw=0.8)
    ax1.axvline(r["last_assignment_s"], color="#ff7f0e", ls=":", lw=1, label="backlog all assigned")
    ax1.legend(loc="lower left", fontsize=8)
    ax1.set_ylim(0, 105)
    ax1.set_xlabel("seconds")
    ax1.set_ylabel("% of machine-time busy")
    ax1.set_title(f"busy machines over time (bins of {1000 * width:.0f} ms)")
    ax1.grid(True, alpha=0.3)
    ax2 = fig.add_subplot(grid[1, 1])
    ax2.bar(["ideal bound", "makespan"], [r["ideal_makespan_s"], r["makespan_s"]], color=["#7f7f7f", "#1f77b4"])
    ax2.text(1, r["makespan_s"], f"x{r['makespan_over_bound']:.3f}", ha="center", va="bottom")
    ax2.set_ylabel("seconds")
    parts = {"work": r["busy_fraction"]["requested work"],
             "overhead in attempts": r["busy_fraction"]["overhead inside attempts"], **r["idle_fraction"]}
    text = "\n".join(f"{k.split(' (')[0]}: {100 * v:.2f} %" for k, v in parts.items())
    ax2.set_ylim(0, r["makespan_s"] * 1.7)
    ax2.text(0.02, 0.98, "machine-time:\n" + text, transform=ax2.transAxes, fontsize=8, va="top",
             bbox={"facecolor": "white", "alpha": 0.8})
    ax2.set_title("makespan against its lower bound")
    ax3 = fig.add_subplot(grid[1, 2])
    gaps = sorted(g for m in r["timeline"].values() for g in (b[0] - a[1] for a, b in itertools.pairwise(m)))
    if gaps:
        ax3.step([max(1000 * g, 0.01) for g in gaps], [(i + 1) / len(gaps) for i in range(len(gaps))], where="post")
    ax3.set_xscale("log")
    ax3.xaxis.set_minor_formatter(_null_formatter())
    ax3.set_xlabel("ms, attempt ended → the machine's next assignment")
    ax3.set_ylabel("fraction of gaps")
    ax3.set_title(f"orchestration gap (p50 {_f(r['gap_ms']['p50'])} ms, p99 {_f(r['gap_ms']['p99'])} ms)")
    ax3.grid(True, alpha=0.3)
    fig.suptitle(f"bench/scale.py utilisation: {r['machines']} machines, {r['runs']:,} runs of 3 automations "
                 f"(mean {r['mean_seconds']:.2f} s) submitted in {r['order']} order; server backlog order "
                 f"{r.get('server_order', 'queued')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# == main ===========================================================================================

SHOW = {"fleet": (fleet_show, fleet_plot), "fleet10k": (fleet10k_show, fleet10k_plot), "failover": (failover_show, failover_plot),
        "utilisation": (utilisation_show, utilisation_plot)}


def defaults(scenario: str, args: argparse.Namespace) -> argparse.Namespace:
    """The scenario's settings: flags given, else its defaults (smaller with --quick)."""
    q = args.quick
    d: dict[str, Any] = {
        "fleet": {"machines": "200,1500" if q else "1000,5000", "per_agent": 1250, "agent_stagger": 0.0, "idle": 10.0 if q else 30.0,
                  "base_window": 3.0 if q else 10.0, "settle": 3.0 if q else 5.0, "warmup": 10 if q else 20,
                  "samples": 50 if q else 300, "backlog": 2000 if q else 0, "connect_timeout": 900.0,
                  "drain_timeout": 1800.0},
        "fleet10k": {"machines": "200,2000" if q else "500,10000", "per_agent": 2500, "agent_stagger": 20.0, "idle": 10.0 if q else 30.0,
                     "base_window": 3.0 if q else 10.0, "settle": 3.0 if q else 10.0, "warmup": 10 if q else 20,
                     "samples": 50 if q else 300, "backlog": 4000 if q else 30000, "connect_timeout": 1800.0,
                     "drain_timeout": 1800.0, "hold": "none"},
        "failover": {"machines": 8 if q else 24, "kills": 6 if q else 100, "wave": 3 if q else 6,
                     "run_seconds": 30.0 if q else 60.0, "restart_pause": 1.0, "recovery_timeout": 60.0,
                     "phase_wait": 20.0 if q else 30.0,
                     "return_timeout": 60.0},
        "utilisation": {"machines": 20 if q else 100, "agent_processes": 2, "work_per_machine": 10.0 if q else 60.0,
                        "drain_timeout": 1800.0, "order": "fifo"},
    }[scenario]
    values = {k: (getattr(args, k, None) if getattr(args, k, None) is not None else v) for k, v in d.items()}
    return argparse.Namespace(**{**vars(args), **values})


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quick", action="store_true", help="small sizes: a smoke run of about a minute")
    common.add_argument("--seed", type=int, default=7)
    common.add_argument("--workdir", type=Path, default=None,
                        help="keep every log and database here (default: a temporary directory, removed)")
    common.add_argument("--live-code", action="store_true",
                        help="run the work tree's src/deskfleet as it is, not a snapshot taken at the start")
    common.add_argument("--code-ref", default=None,
                        help="run src/deskfleet as committed at this git ref (e.g. HEAD), not the work tree's")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="scenario", required=True)
    f = sub.add_parser("fleet", parents=[common], help="1,000 and 5,000 machines on one orchestrator")
    f.add_argument("--machines", default=None, help="fleet sizes, comma-separated (default 1000,5000; quick 200,1500)")
    f.add_argument("--per-agent", type=int, default=None, help="machines per agent process (default 1250)")
    f.add_argument("--idle", type=float, default=None, help="idle measuring window, s (default 30; quick 10)")
    f.add_argument("--samples", type=int, default=None, help="dispatch samples after warm-up (default 300; quick 50)")
    f.add_argument("--backlog", type=int, default=None,
                   help="no-op runs drained at saturation (default 8 per machine, at least 15000; quick 2000)")
    k = sub.add_parser("fleet10k", parents=[common],
                       help="500 and 10,000 machines on one orchestrator, judged against issue 11's goals")
    k.add_argument("--machines", default=None, help="fleet sizes, comma-separated (default 500,10000; quick 200,2000)")
    k.add_argument("--per-agent", type=int, default=None, help="machines per agent process (default 2500)")
    k.add_argument("--idle", type=float, default=None, help="idle measuring window, s (default 30; quick 10)")
    k.add_argument("--samples", type=int, default=None, help="dispatch samples after warm-up (default 300; quick 50)")
    k.add_argument("--backlog", type=int, default=None,
                   help="no-op runs drained at saturation, the same for each size (default 30000; quick 4000)")
    k.add_argument("--hold", choices=["none", "cordon"], default=None,
                   help="the backlog: submitted while every machine drains it (default), or behind "
                        "cordoned machines, then uncordoned one request at a time (as fleet)")
    o = sub.add_parser("failover", parents=[common], help="agent death → the run starting on another machine")
    o.add_argument("--machines", type=int, default=None, help="machines, one agent process each (default 24; quick 8)")
    o.add_argument("--kills", type=int, default=None, help="SIGKILLs in all (default 100; quick 6)")
    o.add_argument("--wave", type=int, default=None, help="SIGKILLs at once (default 6; quick 3)")
    o.add_argument("--run-seconds", type=float, default=None, help="sim.work duration (default 60; quick 30)")
    o.add_argument("--restart-pause", type=float, default=None,
                   help="a wave recovered → its machines' agents restarted, s (default 1)")
    u = sub.add_parser("utilisation", parents=[common], help="saturating load with varied durations")
    u.add_argument("--machines", type=int, default=None, help="machines (default 100; quick 20)")
    u.add_argument("--agent-processes", type=int, default=None, help="agent processes they live in (default 2)")
    u.add_argument("--work-per-machine", type=float, default=None,
                   help="seconds of requested work per machine in the backlog (default 60; quick 10)")
    u.add_argument("--order", choices=["fifo", "longest-first"], default=None,
                   help="the order the client submits the backlog in: as drawn (default), or longest runs first")
    u.add_argument("--server-order", choices=["longest-first", "queued"], default="longest-first",
                   help="deskfleet server --backlog-order: by the durations it learnt (default), or as queued")
    sub.add_parser("all", parents=[common], help="fleet, failover and utilisation, each with its defaults")
    return ap


RUNNERS: dict[str, Callable[[argparse.Namespace, Path], Any]] = {
    "fleet": fleet, "fleet10k": fleet10k, "failover": failover, "utilisation": utilisation}


def main() -> None:
    args = parser().parse_args()
    scenarios = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    signal.signal(signal.SIGTERM, _interrupt)
    written: list[str] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(args.workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="deskfleet-scale-")))
        tmp.mkdir(parents=True, exist_ok=True)
        code = (snapshot_ref(tmp / "code", args.code_ref) if args.code_ref
                else None if args.live_code else snapshot_code(tmp / "code"))
        try:
            for scenario in scenarios:
                a = defaults(scenario, args)
                result = header(a)
                result["deskfleet_code"] = code or "live work tree"
                result["settings"] = {k: v for k, v in vars(a).items() if k not in ("workdir",)} | {
                    "workdir": str(a.workdir) if a.workdir else None}
                console.print(f"[bold]{scenario}[/] …")
                t = time.time()
                result.update(asyncio.run(RUNNERS[scenario](a, tmp)))
                result["wall_s"] = time.time() - t
                result["loadavg_end"] = os.getloadavg()
                show, plot = SHOW[scenario]
                show(result)
                RESULTS.mkdir(exist_ok=True)
                name = f"scale-{scenario}-{stamp()}"
                (RESULTS / f"{name}.json").write_text(json.dumps(_clean(result), indent=2))
                plot(result, RESULTS / f"{name}.png")
                written += [f"bench/results/{name}.json", f"bench/results/{name}.png"]
                console.print(f"{scenario}: {result['wall_s']:.0f} s; results: bench/results/{name}.json, "
                              f"plot: bench/results/{name}.png", highlight=False)
        finally:
            reaper.reap()
    if len(written) > 2:
        console.print("written: " + ", ".join(written), highlight=False)


def _clean(v: Any) -> Any:
    """JSON-ready: NaN → null (JSON has no NaN), paths and tuples as strings and lists."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_clean(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


if __name__ == "__main__":
    main()
