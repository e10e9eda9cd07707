"""PostgreSQL against SQLite, one replica against three, and leader failover — in one run.

    .venv/bin/python bench/replicas.py                       # needs a PostgreSQL server
    .venv/bin/python bench/replicas.py --pg postgresql://postgres@127.0.0.1/postgres --quick

For each setup — SQLite (1 orchestrator), PostgreSQL with 1 replica, PostgreSQL with 3
replicas — the same two measures as bench/core.py: dispatch latency on an idle pool of 4
machines (submits go round the replicas; the agents spread over them) and runs/s draining
a backlog of no-op runs with 50 machines, in rounds (one drain of each setup in turn; the
median of each setup's rounds), so that a slow minute of the shared machine weighs on every
setup alike. Then leader failover on 3 replicas: SIGKILL the
leader, time until another replica records that it leads; repeated, the killed replica
restarted in between. Each PostgreSQL setup gets a fresh database.

Then issue 11's goals, as ratios to SQLite in the same run (absolute figures differ ~3x
between two machines of our kind), each printed met / not met and kept in the JSON: a
backlog drained by PostgreSQL with one replica at >= 0.8x SQLite's rate, with three at
>= 1.2x (replicas must add capacity, not cost it), and dispatch p99 on PostgreSQL (one and
three replicas) <= 2x SQLite's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
import core

from deskfleet.client import AsyncClient
from deskfleet.store.postgres import libpq_url

console = core.console


class Databases:
    def __init__(self, admin_url: str) -> None:
        self.admin = admin_url
        self.made: list[str] = []

    def new(self) -> str:
        from sqlalchemy.engine import make_url

        name = f"deskfleet_bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(libpq_url(self.admin), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self.made.append(name)
        return make_url(self.admin).set(database=name).render_as_string(hide_password=False)

    def drop(self) -> None:
        with psycopg.connect(libpq_url(self.admin), autocommit=True) as conn:
            for name in self.made:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def failover(db: str, workdir: Path, kills: int) -> dict[str, Any]:
    cluster = core.Cluster(workdir, db=db, replicas=3,
                           extra=["--heartbeat-interval", "2", "--heartbeat-timeout", "10"])
    times: list[float] = []
    try:
        await cluster.ready()
        for _ in range(kills):
            leader = await current_leader(cluster)
            victim = next(s for s in cluster.servers if f":{s.port}" in leader["name"])
            survivor = next(s for s in cluster.servers if s is not victim and s.proc.poll() is None)
            after = leader["id"]
            t0 = time.time()
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait()
            async with AsyncClient(survivor.url) as c:
                while True:
                    new = [e for e in await c.every_event(after) if e["kind"] == "replica.leader"]
                    if new:
                        times.append(core_ts(new[0]["at"]) - t0)
                        break
                    if time.time() - t0 > 60:
                        raise RuntimeError("no new leader within 60 s")
                    await asyncio.sleep(0.05)
            victim.start()  # back as a follower, for the next round
            async with AsyncClient(victim.url) as c:
                await victim.ready(c)
    finally:
        cluster.stop()
    return {"kills": len(times), "median_s": statistics.median(times), "max_s": max(times),
            "all_s": [round(t, 3) for t in times]}


async def current_leader(cluster: core.Cluster) -> dict[str, Any]:
    alive = next(s for s in cluster.servers if s.proc.poll() is None)
    async with AsyncClient(alive.url) as c:
        for _ in range(200):
            leaders = [e for e in await c.every_event() if e["kind"] == "replica.leader"]
            if leaders:
                e = leaders[-1]
                return {"id": e["id"], "name": e["data"]["name"]}
            await asyncio.sleep(0.05)
    raise RuntimeError("no leader")


def core_ts(at: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()


#: issue 11's goals: (what, setup's replicas, measure, bound, at least or at most)
GOALS = [
    ("drain rate, PostgreSQL x1 / SQLite", 1, "runs_per_s", 0.8, ">="),
    ("drain rate, PostgreSQL x3 / SQLite", 3, "runs_per_s", 1.2, ">="),
    ("dispatch p99, PostgreSQL x1 / SQLite", 1, "dispatch_p99_ms", 2.0, "<="),
    ("dispatch p99, PostgreSQL x3 / SQLite", 3, "dispatch_p99_ms", 2.0, "<="),
]


def judge(setups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The goals, as ratios of this run's PostgreSQL figures to its SQLite ones."""
    sqlite = next(r for r in setups if r["store"] == "SQLite")
    out = []
    for what, replicas, measure, bound, sense in GOALS:
        pg = next(r for r in setups if r["store"] == "PostgreSQL" and r["replicas"] == replicas)
        ratio = pg[measure] / sqlite[measure]
        out.append({"goal": f"{what} {sense} {bound:g}", "ratio": round(ratio, 3),
                    "met": ratio >= bound if sense == ">=" else ratio <= bound})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres",
                    help="a PostgreSQL server (admin URL: databases are created and dropped)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--machines", type=int, default=50)
    ap.add_argument("--runs", type=int, default=None,
                    help="the backlog each setup drains (default: 20 per machine; 10 with --quick)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="drains per setup, taken in turns (SQLite, x1, x3, SQLite, …); figures are medians")
    args = ap.parse_args()
    samples, reps = (100, 1) if args.quick else (200, 3)
    runs = args.runs or (20 * args.machines if not args.quick else 10 * args.machines)
    dbs = Databases(args.pg)
    setups: list[tuple[str, str | None, int]] = [("SQLite", None, 1), ("PostgreSQL", "pg", 1), ("PostgreSQL", "pg", 3)]
    result: dict[str, Any] = {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "setups": [], "quick": args.quick,
                              "runs": runs, "rounds": args.rounds}
    try:
        with tempfile.TemporaryDirectory(prefix="deskfleet-bench-") as tmp:
            for n, (label, db, replicas) in enumerate(setups):
                row: dict[str, Any] = {"store": label, "replicas": replicas}
                lat = []
                for r in range(reps):
                    console.print(f"[bold]{label} x{replicas}[/]: idle pool ({r + 1}/{reps}) …")
                    url = dbs.new() if db else None
                    lat.append(asyncio.run(core.idle_pool(samples, "FULL", Path(tmp) / f"i{n}-{r}",
                                                          db=url, replicas=replicas)))
                row["dispatch_p50_ms"] = statistics.median(x["dispatch_ms"]["p50"] for x in lat)
                row["dispatch_p99_ms"] = statistics.median(x["dispatch_ms"]["p99"] for x in lat)
                result["setups"].append(row)
            # The drains in turns, so that a slow minute of this shared machine falls on every
            # setup alike rather than on one of them; each figure is the median of its rounds.
            drains: list[list[dict[str, Any]]] = [[] for _ in setups]
            for k in range(args.rounds):
                for n, (label, db, replicas) in enumerate(setups):
                    console.print(f"[bold]{label} x{replicas}[/]: saturation {k + 1}/{args.rounds}, "
                                  f"{args.machines} machines, {runs} runs …")
                    url = dbs.new() if db else None
                    drains[n].append(asyncio.run(core.saturation(args.machines, runs, "FULL", Path(tmp) / f"s{n}-{k}",
                                                                 db=url, replicas=replicas)))
            for row, sats in zip(result["setups"], drains, strict=True):
                for key, measure in (("runs_per_s", "runs_per_s"), ("steady_runs_per_s", "steady_runs_per_s"),
                                     ("orchestrator_cpu_ms_per_run", "server_cpu_ms_per_run"),
                                     ("database_cpu_ms_per_run", "database_cpu_ms_per_run"),
                                     ("agents_cpu_ms_per_run", "agents_cpu_ms_per_run")):
                    row[key] = statistics.median(x[measure] for x in sats)
                row["runs_per_s_rounds"] = [round(x["runs_per_s"], 1) for x in sats]
                row["failed"] = sum(x["failed"] for x in sats)
            console.print("[bold]leader failover[/] on 3 replicas …")
            result["failover"] = asyncio.run(failover(dbs.new(), Path(tmp) / "failover", 3 if args.quick else 7))
    finally:
        with contextlib.suppress(Exception):
            dbs.drop()
    t = Table(title=f"stores and replicas ({args.machines} machines for saturation)")
    for col in ("store", "replicas", "dispatch p50 ms", "dispatch p99 ms", "runs/s", "steady runs/s",
                "CPU ms/run: orchestrators", "PostgreSQL", "agents", "failed"):
        t.add_column(col, justify="right" if col not in ("store",) else "left")
    for r in result["setups"]:
        t.add_row(r["store"], str(r["replicas"]), f"{r['dispatch_p50_ms']:.1f}", f"{r['dispatch_p99_ms']:.1f}",
                  f"{r['runs_per_s']:.0f}", f"{r['steady_runs_per_s']:.0f}",
                  f"{r['orchestrator_cpu_ms_per_run']:.2f}", f"{r['database_cpu_ms_per_run']:.2f}",
                  f"{r['agents_cpu_ms_per_run']:.2f}", str(r["failed"]))
    console.print(t)
    result["goals"] = judge(result["setups"])
    g = Table(title="issue 11's goals (ratios within this run)")
    for col in ("goal", "measured", ""):
        g.add_column(col, justify="left" if col == "goal" else "right")
    for goal in result["goals"]:
        g.add_row(goal["goal"], f"{goal['ratio']:.2f}x", "[green]met[/]" if goal["met"] else "[red]not met[/]")
    console.print(g)
    f = result["failover"]
    console.print(f"leader failover (SIGKILL → new leader), {f['kills']} kills: median {f['median_s']:.2f} s, "
                  f"max {f['max_s']:.2f} s")
    core.RESULTS.mkdir(exist_ok=True)
    path = core.RESULTS / f"replicas-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    console.print(f"results: {path}")


if __name__ == "__main__":
    main()
