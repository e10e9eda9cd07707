"""What a ``GET /metrics`` scrape costs the database: ``Store.fleet_figures`` on a store with
a long history, on SQLite and PostgreSQL.

    .venv/bin/python bench/metrics_scrape.py                      # 200,000 runs, both databases
    .venv/bin/python bench/metrics_scrape.py --runs 1000000 --only postgresql

The database is filled directly (it is the reads that are measured, not how the rows came):
``--runs`` runs over ``--pools`` pools and ``--automations`` automations, of which
``--queued`` wait in the queue and one per busy machine runs (``--machines``, a fifth of
them busy), the rest final; ``metric_counts`` holds what the store's counting would have
added for them (every counter and histogram bucket, spread over the shards on PostgreSQL).
Then the scrape's read (``fleet_figures``) and the whole exposition (the read and the
rendering) are timed ``--repeat`` times; the table shows the median, p90 and the worst.
The raw figures go to ``bench/results/metrics-scrape-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "src"))

from deskfleet.metrics import Metrics  # noqa: E402
from deskfleet.store import SQLStore, open_store  # noqa: E402
from deskfleet.store.metrics import (  # noqa: E402
    ATTEMPTS_STARTED,
    HISTOGRAMS,
    QUEUE_WAIT,
    RUN_DURATION,
    RUNS_FINISHED,
    RUNS_SUBMITTED,
    SHARDS,
    SUM,
    bucket,
)
from deskfleet.store.schema import attempts, machines, metric_counts, pools, runs  # noqa: E402

NOW = time.time()
CHUNK = 5000


def fill(store: SQLStore, args: argparse.Namespace, shards: int) -> dict[str, int]:
    rng = random.Random(7)
    pool_names = [f"pool-{i}" for i in range(args.pools)]
    autos = [f"app.task_{i}" for i in range(args.automations)]
    counts: Counter[tuple[str, str]] = Counter()

    def add(name: str, labels: dict[str, str], value: float = 1.0) -> None:
        counts[(name, json.dumps(labels, sort_keys=True, separators=(",", ":")))] += value

    with store.engine.begin() as conn:
        conn.execute(pools.insert(), [{"name": p, "created_at": NOW} for p in pool_names])
        conn.execute(machines.insert(), [{
            "id": f"m-{i:05d}", "pool": pool_names[i % args.pools], "labels": {}, "automations": autos,
            "health": "online", "admin": "active", "connected": True, "key_hash": "x", "enrolled_at": NOW,
            "resources": {}, "last_heartbeat_at": NOW, "idle_since": NOW,
        } for i in range(args.machines)])
        busy = args.machines // 5
        rows: list[dict[str, Any]] = []
        active: list[dict[str, Any]] = []
        for i in range(args.runs):
            pool, auto = pool_names[i % args.pools], rng.choice(autos)
            created = NOW - rng.uniform(0, 30 * 86400)
            wait, took = rng.expovariate(1 / 20), rng.expovariate(1 / 90)
            if i < args.queued:
                state, created = "queued", NOW - rng.uniform(0, 600)
            elif i < args.queued + busy:
                state = "running"
                active.append({"run_id": f"run-{i:08d}", "machine_id": f"m-{i - args.queued:05d}", "number": 1,
                               "state": "active", "phase": "running", "mode": "run", "assigned_at": NOW,
                               "lease_expires_at": NOW + 30})
            else:
                state = rng.choices(["succeeded", "failed", "cancelled", "timed_out"], [90, 6, 2, 2])[0]
            rows.append({
                "id": f"run-{i:08d}", "automation": auto, "version": "1", "input": {}, "pool": pool, "labels": {},
                "priority": 0, "tenant": "default", "queue_timeout": 3600.0, "attempt_timeout": 600.0,
                "progress_timeout": 120.0, "max_attempts": 3, "backoff_initial": 1.0, "backoff_max": 60.0,
                "state": state, "created_at": created, "updated_at": created + wait + took, "queued_at": created,
                "finished_at": created + wait + took if state not in ("queued", "running") else None,
                "error_code": {"failed": "business_error", "cancelled": "cancelled", "timed_out": "queue_timeout"}.get(state),
            })
            add(RUNS_SUBMITTED, {"pool": pool})
            if state != "queued":
                add(ATTEMPTS_STARTED, {"pool": pool})
                add(QUEUE_WAIT, {"pool": pool, "automation": auto, "le": bucket(wait, HISTOGRAMS[QUEUE_WAIT])})
                add(QUEUE_WAIT + SUM, {"pool": pool, "automation": auto}, wait)
            if state not in ("queued", "running"):
                add(RUNS_FINISHED, {"pool": pool, "state": state, "error_code": rows[-1]["error_code"] or ""})
                add(RUN_DURATION, {"pool": pool, "automation": auto,
                                   "le": bucket(wait + took, HISTOGRAMS[RUN_DURATION])})
                add(RUN_DURATION + SUM, {"pool": pool, "automation": auto}, wait + took)
            if len(rows) >= CHUNK:
                conn.execute(runs.insert(), rows)
                rows = []
        if rows:
            conn.execute(runs.insert(), rows)
        conn.execute(attempts.insert(), active)
        # What the counting would have left: each counter's additions spread over the shards.
        conn.execute(metric_counts.insert(), [
            {"name": name, "labels": labels, "shard": shard, "value": value / shards}
            for (name, labels), value in counts.items() for shard in range(shards)])
    with store.engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE")
    return {"runs": args.runs, "queued": args.queued, "busy": busy, "machines": args.machines,
            "metric_counts_rows": len(counts) * shards}


def timed(fn: Any, repeat: int) -> dict[str, float]:
    fn()  # warm: the first read plans and caches
    ms = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t0) * 1000)
    ms.sort()
    return {"median_ms": statistics.median(ms), "p90_ms": ms[int(0.9 * (len(ms) - 1))], "max_ms": ms[-1]}


def bench(url: str, args: argparse.Namespace, shards: int) -> dict[str, Any]:
    store = open_store(url)
    assert isinstance(store, SQLStore)
    try:
        t0 = time.perf_counter()
        sizes = fill(store, args, shards)
        sizes["fill_s"] = round(time.perf_counter() - t0, 1)
        metrics = Metrics()
        read = timed(lambda: store.fleet_figures(time.time()), args.repeat)
        whole = timed(lambda: metrics.exposition(store.fleet_figures(time.time()), replica="bench"), args.repeat)
        body = metrics.exposition(store.fleet_figures(time.time()), replica="bench")
        return {**sizes, "read": read, "exposition": whole, "exposition_bytes": len(body),
                "exposition_lines": body.count(b"\n")}
    finally:
        store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--runs", type=int, default=200_000)
    ap.add_argument("--queued", type=int, default=5_000)
    ap.add_argument("--machines", type=int, default=1_000)
    ap.add_argument("--pools", type=int, default=5)
    ap.add_argument("--automations", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--only", choices=["sqlite", "postgresql"])
    args = ap.parse_args()
    results: dict[str, Any] = {"args": vars(args)}
    if args.only != "postgresql":
        with tempfile.TemporaryDirectory(prefix="deskfleet-metrics-") as tmp:
            results["sqlite"] = bench(f"sqlite:///{tmp}/bench.db", args, shards=1)
    if args.only != "sqlite":
        import psycopg
        from sqlalchemy.engine import make_url

        from deskfleet.store.postgres import libpq_url

        name = f"deskfleet_bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(libpq_url(args.pg), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        try:
            results["postgresql"] = bench(make_url(args.pg).set(database=name).render_as_string(hide_password=False),
                                          args, shards=SHARDS)
        finally:
            with psycopg.connect(libpq_url(args.pg), autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    print(f"{args.runs:,} runs ({args.queued:,} queued), {args.machines:,} machines, {args.pools} pools x "
          f"{args.automations} automations; {args.repeat} scrapes each")
    print(f"{'database':<11} {'counter rows':>12} {'read p50':>9} {'p90':>7} {'max':>7} {'whole p50':>10} {'p90':>7} "
          f"{'max':>7} {'bytes':>8}")
    for db in ("sqlite", "postgresql"):
        r = results.get(db)
        if r is None:
            continue
        print(f"{db:<11} {r['metric_counts_rows']:>12,} {r['read']['median_ms']:>8.1f}ms {r['read']['p90_ms']:>6.1f} "
              f"{r['read']['max_ms']:>7.1f} {r['exposition']['median_ms']:>9.1f}ms {r['exposition']['p90_ms']:>6.1f} "
              f"{r['exposition']['max_ms']:>7.1f} {r['exposition_bytes']:>8,}")
    out = HERE / "results" / f"metrics-scrape-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"raw figures: {out}")


if __name__ == "__main__":
    main()
