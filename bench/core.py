"""Core benchmarks: dispatch latency, orchestration overhead per run, runs/s at saturation.

    .venv/bin/python bench/core.py                 # everything, results under bench/results/
    .venv/bin/python bench/core.py --quick         # fewer samples
    .venv/bin/python bench/core.py --only dispatch --sync NORMAL

The orchestrator always runs as its own process (`deskfleet server`, default settings
unless stated), reached over real HTTP and WebSockets.

- dispatch: idle pool of 4 simulated machines whose agents live in this process, so the
  moment an agent *holds* the assignment is timed on the same clock as the submit. One run
  at a time (the pool is idle at every submit). Latency = POST /v1/runs sent → agent has
  the assignment.
- overhead: the same pool, ``sim.noop`` (an automation that does nothing), submitted with
  ``?wait=`` — submit → durable → scheduled → leased → started → result → response: what
  a run costs beyond its automation's own time.
- throughput: N machines in 2 agent processes; all machines cordoned, a backlog of runs
  submitted — half one run per request (32 at a time), half in batches of 1,000 (``POST
  /v1/runs:batch``), each half's runs/s measured —, machines uncordoned; completions/s
  measured from the event log between the first assignment and the last final state, and
  the orchestrator's CPU per run. Issue 11's submit goals are printed as ratios: batched
  ≥ 10 x single submits, single submits ≥ the drain rate.

Medians and tails are reported; this machine is shared and noisy, so compare ratios
across runs of this script rather than absolute figures across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

from deskfleet.client import AsyncClient
from deskfleet.sim.fleet import SimFleet, SimFleetConfig

RESULTS = Path(__file__).parent / "results"
console = Console()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


class Server:
    """One ``deskfleet server`` process."""

    def __init__(self, workdir: Path, sync: str, extra: list[str] | None = None, *,
                 db: str | None = None, data: Path | None = None, name: str = "server") -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data = data or workdir / "data"
        self.log = open(workdir / f"{name}.log", "ab")  # noqa: SIM115
        self.args = [sys.executable, "-m", "deskfleet", "--log-level", "warning", "server", "--port", str(self.port),
                     "--data-dir", str(self.data), "--sqlite-synchronous", sync,
                     *(["--db", db] if db else []), *(extra or [])]
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT)
        self.ps = psutil.Process(self.proc.pid)

    async def ready(self, client: AsyncClient) -> None:
        for _ in range(300):
            try:
                await client.health()
            except Exception:
                await asyncio.sleep(0.05)
                continue
            await add_accounts(client)
            return
        raise RuntimeError("server did not start")

    @property
    def token(self) -> str:
        return (self.data / "enrolment-token").read_text().strip()

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def add_accounts(client: AsyncClient) -> None:
    """SimEHR's accounts in the vault, as the agents' fleets expect them (sim.noop and sim.work
    need no login; the other automations get their accounts from here). Every machine may
    share one: SimEHR does not end an older session."""
    from deskfleet.sim import SimBackend

    await client.put_accounts(SimBackend.credentials(1), app="simehr", max_sessions=10_000)


class Cluster:
    """One orchestrator on SQLite, or ``replicas`` of them sharing a PostgreSQL database
    (and one data directory: the same secret key and enrolment token)."""

    def __init__(self, workdir: Path, sync: str = "FULL", *, db: str | None = None, replicas: int = 1,
                 extra: list[str] | None = None) -> None:
        if replicas > 1 and not db:
            raise SystemExit("several replicas need --db postgresql://…")
        data = workdir / "data"
        self.servers = [Server(workdir, sync, extra, db=db, data=data, name=f"server{i}") for i in range(replicas)]

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    @property
    def token(self) -> str:
        return self.servers[0].token

    async def ready(self) -> None:
        for i, server in enumerate(self.servers):
            async with AsyncClient(server.url) as c:
                await server.ready(c)
            if i == 0:
                await asyncio.sleep(0.2)  # the first migrates; the others then start at once

    def cpu(self) -> float:
        return sum(s.cpu() for s in self.servers if s.proc.poll() is None)

    def stop(self) -> None:
        for s in self.servers:
            s.stop()


async def wait_machines(client: AsyncClient, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (await client.summary())["machines"].get("ready", 0) >= n:
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{n} machines did not become ready")


# -- dispatch latency and overhead (agents in this process) -------------------------------------
async def idle_pool(samples: int, sync: str, workdir: Path, *, db: str | None = None, replicas: int = 1) -> dict[str, Any]:
    cluster = Cluster(workdir, sync, db=db, replicas=replicas)
    clients = [AsyncClient(url) for url in cluster.urls]
    try:
        await cluster.ready()
        client = clients[0]
        fleet = SimFleet(SimFleetConfig(
            servers=cluster.urls, prefix="lat", count=4, enrolment_token=cluster.token,
            state_dir=workdir / "agents", backend=workdir / "ehr.db", action_delay=0.0, screenshots="none",
        ))
        received: dict[str, float] = {}
        arrived: dict[str, asyncio.Event] = {}
        for agent in fleet.agents:
            original = agent._accept

            def accept(assign: Any, _orig: Any = original) -> None:
                received[assign.run_id] = time.perf_counter()
                ev = arrived.get(assign.run_id)
                if ev is not None:
                    ev.set()
                _orig(assign)

            agent._accept = accept  # type: ignore[method-assign]
        task = asyncio.create_task(fleet.run())
        try:
            await wait_machines(client, 4)
            dispatch: list[float] = []
            overhead: list[float] = []
            for i in range(samples + 20):  # the first 20 warm caches and connections
                c = clients[i % len(clients)]  # submits go round the replicas
                t0 = time.perf_counter()
                run = await c.submit("sim.noop", {"value": str(i)})
                ev = arrived.setdefault(run["id"], asyncio.Event())
                if run["id"] in received:
                    ev.set()
                await asyncio.wait_for(ev.wait(), 10)
                done = await c.run(run["id"], wait=10)
                assert done["state"] == "succeeded", done
                if i >= 20:
                    dispatch.append((received[run["id"]] - t0) * 1000)
            for i in range(samples + 20):
                c = clients[i % len(clients)]
                t0 = time.perf_counter()
                done = await c.submit("sim.noop", {"value": f"o{i}"}, wait=10)
                t1 = time.perf_counter()
                assert done["state"] == "succeeded", done
                if i >= 20:
                    overhead.append((t1 - t0) * 1000)
        finally:
            await fleet.shutdown()
            task.cancel()
    finally:
        for c in clients:
            await c.aclose()
        cluster.stop()
    return {
        "dispatch_ms": {"p50": statistics.median(dispatch), "p90": pct(dispatch, 90), "p99": pct(dispatch, 99),
                        "max": max(dispatch), "n": len(dispatch)},
        "overhead_ms": {"p50": statistics.median(overhead), "p90": pct(overhead, 90), "p99": pct(overhead, 99),
                        "max": max(overhead), "n": len(overhead)},
    }


# -- throughput at saturation (agents in 2 processes) --------------------------------------------
async def saturation(machines: int, runs: int, sync: str, workdir: Path, *, db: str | None = None,
                     replicas: int = 1) -> dict[str, Any]:
    cluster = Cluster(workdir, sync, db=db, replicas=replicas)
    agents: list[subprocess.Popen[bytes]] = []
    urls = cluster.urls
    orchestrators = [arg for url in urls for arg in ("--orchestrator", url)]
    clients = [AsyncClient(url, timeout=120) for url in urls]
    async with AsyncClient(urls[0], timeout=120) as client:
        await cluster.ready()
        per = [machines // 2 + machines % 2, machines // 2] if machines > 1 else [1]
        first = 1
        for i, n in enumerate(per):
            log = open(workdir / f"agents-{i}.log", "ab")  # noqa: SIM115
            agents.append(subprocess.Popen(
                [sys.executable, "-m", "deskfleet", "--log-level", "warning", "agent", *orchestrators,
                 "--pack", "simehr", "--desktop", "sim", "--machine", "sat", "--count", str(n), "--first", str(first), "--enrolment-token", cluster.token,
                 "--state-dir", str(workdir / "agents"), "--sim-backend", str(workdir / "ehr.db"),
                 "--action-delay", "0", "--screenshots", "none"],
                stdout=log, stderr=subprocess.STDOUT,
            ))
            first += n
        try:
            await wait_machines(client, machines, timeout=300)
            ids = [m["id"] for m in await client.machines()]
            sem = asyncio.Semaphore(32)

            async def act(mid: str, action: str) -> None:
                async with sem:
                    await client.machine_action(mid, action)

            await asyncio.gather(*(act(m, "cordon") for m in ids))

            async def submit(i: int) -> None:
                async with sem:
                    await clients[i % len(clients)].submit("sim.noop", {"value": str(i)}, queue_timeout=3600)

            # Half the backlog one run per request, half in batches of 1,000 (POST /v1/runs:batch).
            singly = runs // 2
            t_sub = time.perf_counter()
            await asyncio.gather(*(submit(i) for i in range(singly)))
            submit_rate = singly / (time.perf_counter() - t_sub)
            t_sub = time.perf_counter()
            batched = await clients[0].submit_many(
                [{"automation": "sim.noop", "input": {"value": str(i)}, "queue_timeout": 3600}
                 for i in range(singly, runs)])
            batch_rate = (runs - singly) / (time.perf_counter() - t_sub)
            assert all(r["status"] == "created" for r in batched), [r for r in batched if r["status"] != "created"][:3]
            cpu0, db0, ag0 = cluster.cpu(), database_cpu(), processes_cpu(agents)
            t0 = time.perf_counter()
            await asyncio.gather(*(act(m, "uncordon") for m in ids))
            while True:
                s = await client.summary()
                if s["runs"].get("succeeded", 0) + s["runs"].get("failed", 0) >= runs:
                    break
                if time.perf_counter() - t0 > 900:
                    raise RuntimeError(f"backlog did not drain: {s}")
                await asyncio.sleep(0.25)
            wall = time.perf_counter() - t0
            cpu = cluster.cpu() - cpu0
            db_cpu, agents_cpu = database_cpu() - db0, processes_cpu(agents) - ag0
            events = await client.every_event()
        finally:
            for p in agents:
                p.send_signal(signal.SIGTERM)
            for p in agents:
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
            for c in clients:
                await c.aclose()
            cluster.stop()
    from datetime import datetime

    def ts(e: dict[str, Any]) -> float:
        return datetime.fromisoformat(e["at"].replace("Z", "+00:00")).timestamp()

    assigned = [ts(e) for e in events if e["kind"] == "run.state" and e["to_state"] == "assigned"]
    finals = sorted(ts(e) for e in events if e["kind"] == "run.state" and e["to_state"] == "succeeded")
    failed = sum(1 for e in events if e["kind"] == "run.state" and e["to_state"] == "failed")
    span = finals[-1] - min(assigned)
    # Steady state: between 10% and 90% of completions, free of ramp-up and tail.
    lo, hi = finals[len(finals) // 10], finals[(9 * len(finals)) // 10]
    steady = (0.8 * len(finals)) / (hi - lo) if hi > lo else float("nan")
    return {
        "machines": machines, "runs": runs, "failed": failed, "submit_per_s": submit_rate,
        "batch_submit_per_s": batch_rate,
        "runs_per_s": len(finals) / span, "steady_runs_per_s": steady, "drain_wall_s": wall,
        "server_cpu_s": cpu, "server_cpu_ms_per_run": 1000 * cpu / runs,
        # PostgreSQL's own processes (0 on SQLite, which runs inside the server) and the
        # simulated agents: on one host, all of them share its cores with the server.
        "database_cpu_ms_per_run": 1000 * db_cpu / runs if db else 0.0,
        "agents_cpu_ms_per_run": 1000 * agents_cpu / runs,
    }


def processes_cpu(procs: list[subprocess.Popen[bytes]]) -> float:
    """CPU seconds (user + system) the processes have used so far."""
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(p.pid).cpu_times()
            total += t.user + t.system
    return total


def database_cpu() -> float:
    """CPU seconds used so far by this host's PostgreSQL processes (its backends, WAL
    writer, checkpointer…); a backend that exits meanwhile takes its share with it."""
    total = 0.0
    for p in psutil.process_iter(["name", "cpu_times"]):
        if p.info["name"] in ("postgres", "postmaster") and p.info["cpu_times"] is not None:
            total += p.info["cpu_times"].user + p.info["cpu_times"].system
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer samples and runs")
    ap.add_argument("--sync", default="FULL", choices=["FULL", "NORMAL"], help="SQLite synchronous setting")
    ap.add_argument("--machines", default="50,500", help="fleet sizes for the saturation scenario")
    ap.add_argument("--only", choices=["dispatch", "throughput"], default=None)
    ap.add_argument("--repeat", type=int, default=3, help="idle-pool repetitions (each a fresh server)")
    args = ap.parse_args()
    samples = 100 if args.quick else 300
    result: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "sqlite_synchronous": args.sync, "quick": args.quick,
    }
    with tempfile.TemporaryDirectory(prefix="deskfleet-bench-") as tmp:
        if args.only in (None, "dispatch"):
            reps = []
            for i in range(args.repeat):
                console.print(f"[bold]idle pool[/] ({i + 1}/{args.repeat}): {samples} runs, one at a time …")
                reps.append(asyncio.run(idle_pool(samples, args.sync, Path(tmp) / f"idle{i}")))
            # Each figure: the median over repetitions (the machine is shared and noisy);
            # the worst repetition is kept beside it.
            result["idle_pool"] = {
                key: {stat: statistics.median(r[key][stat] for r in reps) for stat in ("p50", "p90", "p99", "max", "n")}
                | {"worst_p99": max(r[key]["p99"] for r in reps)}
                for key in ("dispatch_ms", "overhead_ms")
            }
            result["idle_pool_repetitions"] = reps
        if args.only in (None, "throughput"):
            result["saturation"] = []
            for m in (int(x) for x in args.machines.split(",")):
                runs = (10 if args.quick else 20) * m if m <= 100 else (2000 if args.quick else 5000)
                console.print(f"[bold]saturation[/]: {m} machines, backlog of {runs} runs …")
                (Path(tmp) / f"sat{m}").mkdir(parents=True)
                result["saturation"].append(asyncio.run(saturation(m, runs, args.sync, Path(tmp) / f"sat{m}")))
    show(result)
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"core-{stamp}.json"
    path.write_text(json.dumps(result, indent=2))
    console.print(f"results: {path}")


def show(result: dict[str, Any]) -> None:
    if "idle_pool" in result:
        reps = len(result.get("idle_pool_repetitions", [])) or 1
        t = Table(title=f"idle pool (SQLite synchronous={result['sqlite_synchronous']}; median of {reps} repetitions)")
        for col in ("measure", "p50 ms", "p90 ms", "p99 ms", "worst p99 ms", "max ms", "n"):
            t.add_column(col, justify="right" if col != "measure" else "left")
        for key, label in (("dispatch_ms", "dispatch: submit → agent holds assignment"),
                           ("overhead_ms", "overhead: submit → result of a no-op run")):
            d = result["idle_pool"][key]
            t.add_row(label, f"{d['p50']:.2f}", f"{d['p90']:.2f}", f"{d['p99']:.2f}",
                      f"{d.get('worst_p99', d['p99']):.2f}", f"{d['max']:.2f}", str(int(d["n"])))
        console.print(t)
    if result.get("saturation"):
        t = Table(title="saturation: a backlog of no-op runs drained by the fleet")
        for col in ("machines", "runs", "runs/s", "steady runs/s", "server CPU ms/run", "submits/s",
                    "batched runs/s", "failed"):
            t.add_column(col, justify="right")
        for s in result["saturation"]:
            t.add_row(str(s["machines"]), str(s["runs"]), f"{s['runs_per_s']:.0f}", f"{s['steady_runs_per_s']:.0f}",
                      f"{s['server_cpu_ms_per_run']:.2f}", f"{s['submit_per_s']:.0f}",
                      f"{s.get('batch_submit_per_s', float('nan')):.0f}", str(s["failed"]))
        console.print(t)
        # Issue 11's submit goals, as ratios within this run.
        g = Table(title="submit goals (ratios in this run)")
        for col in ("machines", "batched / single submits", "goal ≥ 10", "single submits / drain rate", "goal ≥ 1"):
            g.add_column(col, justify="right")
        for s in result["saturation"]:
            if "batch_submit_per_s" not in s:
                continue
            batch = s["batch_submit_per_s"] / s["submit_per_s"]
            pace = s["submit_per_s"] / s["runs_per_s"]
            g.add_row(str(s["machines"]), f"{batch:.1f}x", "met" if batch >= 10 else "NOT met", f"{pace:.2f}x",
                      "met" if pace >= 1 else "NOT met")
        console.print(g)


if __name__ == "__main__":
    main()
