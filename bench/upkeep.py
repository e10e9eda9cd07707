"""Session upkeep: what keeping idle sessions alive saves the runs that follow a quiet spell.

    .venv/bin/python bench/upkeep.py            # results under bench/results/
    .venv/bin/python bench/upkeep.py --quick    # fewer bursts

Real desktops: two Xvfb displays with DemoEHR (the demoehr pack), MFA at every login and
an idle logout after ``--idle-timeout`` seconds, served by real agents (in this process)
and a real ``deskfleet server`` process. The workload comes in bursts of patient searches
separated by quiet spells *longer* than the idle timeout — the shape of office hours with
pauses, where sessions lapse between bursts. It runs twice on fresh machines: with upkeep
off (every burst's first run on each machine logs in again, MFA included) and on (an idle
machine runs the pack's keep-alive playbook before its session lapses; never during a run).

Per run: whether its pre-flight had to log in (a ``login`` playbook step before the
automation started), and its pre-flight time (the attempt's assignment to the start of the
automation). Reported: the share of runs that logged in, pre-flight p50 and p99, the MFA
prompts answered and the keep-alives run, for each mode, and the ratios between them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from core import Server, wait_machines

from deskfleet import AgentHost, AgentHostConfig, load_pack
from deskfleet.client import AsyncClient
from deskfleet.demoapp import credentials

RESULTS = Path(__file__).parent / "results"
console = Console()
SEED = 0


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))]


async def one_mode(workdir: Path, *, upkeep: bool, machines: int, bursts: int, per_burst: int,
                   idle_timeout: float) -> dict[str, Any]:
    quiet = idle_timeout + 4.0
    server = Server(workdir / "server", "NORMAL")
    host: AgentHost | None = None
    task: asyncio.Task[None] | None = None
    try:
        async with AsyncClient(server.url, timeout=120) as client:
            await server.ready(client)
            await client.put_accounts(credentials(SEED), app="demoehr")  # the vault hands them out
            host = AgentHost(AgentHostConfig(
                servers=[server.url], packs=[load_pack("demoehr")], desktop="xvfb", machine="up", count=machines,
                enrolment_token=server.token, state_dir=workdir / "agents", data_dir=workdir / "data",
                app_args={"demoehr": [f"--seed={SEED}", "--mfa", f"--session-timeout={idle_timeout:g}"]},
                idle_timeouts={"demoehr": idle_timeout}, screenshots="none",
                upkeep=upkeep, log_dir=workdir / "logs",
            ))
            await host.start()
            task = asyncio.create_task(host.run())
            await wait_machines(client, machines, timeout=120)
            made = await client.submit("demoehr.create_patient", {"mrn": "UP-1", "name": "Ada Lovelace",
                                                                  "dob": "1815-12-10"}, wait=120)
            assert made["state"] == "succeeded", made
            runs: list[str] = []
            t0 = time.monotonic()
            for burst in range(bursts):
                await asyncio.sleep(quiet)  # every session lapses unless kept alive
                submitted = await asyncio.gather(*(client.submit("demoehr.search_patient", {"mrn": "UP-1"})
                                                   for _ in range(per_burst)))
                for run in submitted:
                    done = await client.run(run["id"], wait=120)
                    assert done["state"] == "succeeded", done
                    runs.append(run["id"])
                console.print(f"  upkeep {'on ' if upkeep else 'off'}: burst {burst + 1}/{bursts} done")
            elapsed = time.monotonic() - t0
            preflights, logged_in, mfa = [], 0, 0
            for run_id in runs:
                events = await client.events(run_id)
                attempts = await client.attempts(run_id)
                ok = next(a for a in attempts if a["ending"] == "succeeded")
                preflights.append((_ts(ok["started_at"]) - _ts(ok["assigned_at"])) * 1000)
                steps = [e["data"]["playbook"] for e in events
                         if e["kind"] == "playbook.step" and not e["data"].get("mid_run")]
                logged_in += "login" in steps
                mfa += steps.count("mfa")
            everything = await client.every_event()
            keepalives = [e for e in everything if e["kind"] == "session.keepalive"]
    finally:
        if host is not None:
            await host.shutdown()
            if task is not None:
                task.cancel()
            await host.close()
        server.stop()
    return {
        "upkeep": upkeep, "runs": len(runs), "runs_that_logged_in": logged_in,
        "share_logged_in": logged_in / len(runs), "mfa_prompts": mfa,
        "preflight_ms": {"p50": statistics.median(preflights), "p99": _pct(preflights, 0.99),
                         "max": max(preflights), "samples": [round(p, 1) for p in preflights]},
        "keepalives": len(keepalives), "keepalives_failed": sum(1 for e in keepalives if not e["data"]["ok"]),
        "workload_s": elapsed,
    }


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    data = [r["preflight_ms"]["samples"] for r in results]
    ax.boxplot(data, orientation="horizontal", showfliers=True)
    ax.set_yticks([1, 2], [f"upkeep {'on' if r['upkeep'] else 'off'}\n{r['share_logged_in']:.0%} logged in"
                           for r in results])
    ax.set_xlabel("pre-flight time per run (ms)")
    ax.set_title("Runs after quiet spells longer than the idle timeout (DemoEHR, MFA at each login)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 bursts instead of 6")
    parser.add_argument("--machines", type=int, default=2)
    parser.add_argument("--per-burst", type=int, default=6)
    parser.add_argument("--idle-timeout", type=float, default=6.0)
    args = parser.parse_args()
    bursts = 3 if args.quick else 6
    results = []
    with tempfile.TemporaryDirectory(prefix="deskfleet-upkeep-") as tmp:
        for upkeep in (False, True):
            results.append(await one_mode(Path(tmp) / ("on" if upkeep else "off"), upkeep=upkeep,
                                          machines=args.machines, bursts=bursts, per_burst=args.per_burst,
                                          idle_timeout=args.idle_timeout))
    off, on = results
    table = Table(title=f"{args.machines} DemoEHR desktops, {bursts} bursts of {args.per_burst} runs after "
                        f"quiet spells of {args.idle_timeout + 4:g}s (idle timeout {args.idle_timeout:g}s)")
    for column in ("", "runs", "logged in", "MFA", "pre-flight p50 ms", "p99 ms", "keep-alives"):
        table.add_column(column, justify="right" if column else "left")
    for r in results:
        table.add_row(f"upkeep {'on' if r['upkeep'] else 'off'}", str(r["runs"]),
                      f"{r['runs_that_logged_in']} ({r['share_logged_in']:.0%})", str(r["mfa_prompts"]),
                      f"{r['preflight_ms']['p50']:.0f}", f"{r['preflight_ms']['p99']:.0f}",
                      f"{r['keepalives']} ({r['keepalives_failed']} failed)")
    console.print(table)
    ratio = {"preflight_p50": on["preflight_ms"]["p50"] / off["preflight_ms"]["p50"],
             "preflight_p99": on["preflight_ms"]["p99"] / off["preflight_ms"]["p99"]}
    console.print(f"with upkeep: pre-flight p50 x{ratio['preflight_p50']:.2f}, p99 x{ratio['preflight_p99']:.2f}")
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = {"bench": "upkeep", "when": stamp, "host": platform.node(), "python": platform.python_version(),
           "machines": args.machines, "bursts": bursts, "per_burst": args.per_burst,
           "idle_timeout": args.idle_timeout, "results": results, "ratio_on_off": ratio}
    (RESULTS / f"upkeep-{stamp}.json").write_text(json.dumps(out, indent=1))
    plot(results, RESULTS / f"upkeep-{stamp}.png")
    console.print(f"results: {RESULTS / f'upkeep-{stamp}.json'}")


if __name__ == "__main__":
    asyncio.run(main())
