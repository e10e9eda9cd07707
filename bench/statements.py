"""Where a PostgreSQL orchestrator's round trips go: statements and commits per run.

    .venv/bin/python bench/statements.py                 # 50 machines, 1,000 no-op runs, 1 replica
    .venv/bin/python bench/statements.py --replicas 3 --top 40

Drains a backlog as bench/core.py's saturation does, on a fresh PostgreSQL database, with
every server process counting what it sends through psycopg (``bench/pgcount``, loaded as
``sitecustomize``); prints statements and commits per run, and the most frequent
statements. The counts include the pool's pre-ping (``;``) and everything the servers did
meanwhile (heartbeats, sweeps); each process writes its counts every 0.2 s, so the last
fraction of a second may be missing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import core  # noqa: E402
import replicas  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--machines", type=int, default=50)
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    dbs = replicas.Databases(args.pg)
    with tempfile.TemporaryDirectory(prefix="deskfleet-statements-") as tmp:
        counts_dir = Path(tmp) / "counts"
        counts_dir.mkdir()
        os.environ["DESKFLEET_PGCOUNT_DIR"] = str(counts_dir)
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE / "pgcount"), os.environ.get("PYTHONPATH")]))
        try:
            sat = asyncio.run(core.saturation(args.machines, args.runs, "FULL", Path(tmp) / "s", db=dbs.new(),
                                              replicas=args.replicas))
        finally:
            dbs.drop()
        total: Counter[str] = Counter()
        for f in counts_dir.glob("*.json"):
            total.update(json.loads(f.read_text()))
    commits = total.pop("commit", 0)
    n = args.runs
    print(f"{args.replicas} replica(s), {args.machines} machines, {n} runs: {sat['runs_per_s']:.0f} runs/s, "
          f"CPU ms/run: server {sat['server_cpu_ms_per_run']:.2f}, PostgreSQL {sat['database_cpu_ms_per_run']:.2f}, "
          f"agents {sat['agents_cpu_ms_per_run']:.2f}")
    print(f"statements per run: {sum(total.values()) / n:.1f}   commits per run: {commits / n:.2f}")
    for what, k in total.most_common(args.top):
        print(f"{k / n:7.2f}  {what}")


if __name__ == "__main__":
    main()
