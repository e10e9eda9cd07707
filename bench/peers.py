"""Side by side: deskfleet, Celery (Redis) and Procrastinate (PostgreSQL) — the same runs, the
same simulated machines, the same kills, in one invocation; every figure also as a ratio to
deskfleet's, which is what holds from one machine to another.

    .venv/bin/pip install -e '.[bench]'            # Celery with Redis, Procrastinate
    .venv/bin/python bench/peers.py                 # 16 machines; 200 + a backlog of 3,000; 400 runs, 4 kills: 4.5-6.5 min
    .venv/bin/python bench/peers.py --quick         # 6 machines; 30 + a backlog of 600; 40 runs, 2 kills: ~2.5-3 min
    .venv/bin/python bench/peers.py --sections throughput --only deskfleet,celery --workdir /tmp/peers  # keep the logs

Needs Redis at 127.0.0.1:6379 and PostgreSQL at 127.0.0.1:5432 (user postgres, trust
auth; a database is created per run and dropped after). Results: tables (throughput,
failover, ratios), then ``bench/results/peers-<stamp>.json`` and ``…-<stamp>.png``; the
JSON records the command, the load average before and after, and the ratios. (Times above
on the shared 2-core machine at a load average of 8-14; less on a quiet one.)

Each system gets fresh machines, then two sections on them:

**Throughput** (first, on the idle machines): empty runs — deskfleet's ``sim.noop``, which
reports one step and returns its input; the peers run the same automation through the same
SDK ``Context`` (``PeerMachine.noop``). First ``warmup`` + ``samples`` runs one at a time,
each submitted once the previous one finished, so the pool is idle at every submit:
**dispatch latency** = the submit call → the run started on a machine (deskfleet: its
``running`` event; peers: the task body's first line). Then a **backlog** submitted at once
by each system's fair best path — deskfleet ``AsyncClient.submit_many`` (``POST
/v1/runs:batch``, 1,000 a request), Celery ``send_task`` on one producer (3x faster than
``group().apply_async()`` here), Procrastinate ``batch_defer_async`` (one ``INSERT`` of 1,000)
— and the **drain rate** = runs ÷ (the last run finished, by the system's own stamp - the
first submit call): a slow submit path counts against its system, as it would for a user.
The single paths and the stamps are in each side's docstring. Beside the rate: the CPU
the machine processes used over the backlog, per run, for every system, and deskfleet's
server's (the peers' Redis and PostgreSQL are shared servers, not measured) — what a run
costs, which on a busy 2-core machine says more than the rate alone; and for deskfleet,
from its events, where a backlog run's time went on its machine (``backlog_phases_ms``).

**Failover** (then, on the same machines): the plan below.

**The workload** (one seeded plan for all three systems): N runs of the automation
``sim.work`` (deskfleet's own, in ``deskfleet.sim.automations``): it sleeps half its time,
records its side effect in the shared ``SimBackend`` SQLite file, sleeps the other half.
Durations are log-normal around 1.2 s, clipped to 0.5 to 3 s; arrivals are Poisson at 75 % of
what the fleet can do, so that queues form and drain. Every system gets the same machines —
one OS process per machine, each with one simulated desktop — and executes the very same
code: deskfleet's agent runs ``sim.work`` after its pre-flight; a Celery or Procrastinate
worker calls ``demo_registry().get("sim.work").execute(ctx, data)`` with an SDK
``Context`` on its own ``SimDesktop`` (``peers.workload.PeerMachine``).

**The kills**: at fixed offsets spread over the arrival window, a busy machine's process is
SIGKILLed — alternately one in the first half of its run (nothing done yet) and one in the
second half (the effect happened but was never reported) — and a replacement machine (a
new process, a new name) starts one second later, so capacity comes back at once.

**The failover measures**, per system:

- queue wait p50 / p99: submit (before the call) → the work started on a machine (deskfleet:
  its ``running`` event; peers: the first line of the task body; same host clock);
- runs lost: never reported finished (succeeded or failed) by the end of the drain period;
- runs executed twice: the side effect's count in ``SimBackend`` greater than one;
- runs failed loudly: reported failed (deskfleet fails a run whose attempt died when
  reconcile cannot decide; here it can, so 0 is expected);
- recovery after a kill: SIGKILL → the killed machine's run taken up on another machine —
  its work started again, or (deskfleet) its reconcile check run — p50 and max, or "never".

Each system's settings, and what each cannot express, are in its module's docstring
(``bench/peers/deskfleet_side.py``, ``celery_side.py``, ``procrastinate_side.py``) and in
bench/README.md. This machine is shared (2 cores), so compare systems within one run.

The code under test is a copy of ``src/deskfleet`` taken when the script starts, put first
on every child process's ``PYTHONPATH`` (``--live-code`` runs the work tree instead), so a
run that lasts minutes executes one version of deskfleet throughout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: core.py and the peers package

from peers.report import failover_tables, plot, ratio_table, ratios, summary_lines, throughput_table
from peers.workload import Plan, Side, Throughput, drive, make_plan, measure, measure_throughput

RESULTS = Path(__file__).resolve().parent / "results"
SYSTEMS = ("deskfleet", "celery", "procrastinate")
# Wide enough for the tables when the output is a file or a pipe (rich would assume 80 columns).
console = Console(width=None if sys.stdout.isatty() else 150)


def snapshot_code(dest: Path) -> dict[str, Any]:
    """Copy ``src/deskfleet`` to ``dest`` and put it first on every child's ``PYTHONPATH`` (and
    this process's ``sys.path``), so that one run executes one version of the code from start
    to end even while someone edits the work tree (the editable install would otherwise let
    the server, agents and workers started minutes apart import different versions)."""
    import hashlib
    import shutil
    import subprocess

    src = Path(__file__).resolve().parent.parent / "src"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src / "deskfleet", dest / "deskfleet", ignore=shutil.ignore_patterns("__pycache__"))
    digest = hashlib.sha256()
    for f in sorted((dest / "deskfleet").rglob("*.py")):
        digest.update(f.relative_to(dest).as_posix().encode() + b"\0" + f.read_bytes())
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(dest), os.environ.get("PYTHONPATH")) if p)
    sys.path.insert(0, str(dest))

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=src.parent, capture_output=True, text=True, timeout=10).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"snapshot": str(dest), "sha256_of_py_files": digest.hexdigest()[:16], "git_head": git("rev-parse", "HEAD"),
            "modified_vs_head": [line[3:] for line in git("status", "--porcelain", "--", "src").splitlines()]}


def make_side(system: str, workdir: Path, args: argparse.Namespace) -> Side:
    # Imported here so that running one system needs only that system's packages.
    if system == "deskfleet":
        from peers.deskfleet_side import DeskfleetSide

        return DeskfleetSide(workdir)
    if system == "celery":
        from peers.celery_side import CelerySide

        return CelerySide(workdir, redis_url=args.redis, visibility_timeout=args.celery_visibility_timeout)
    if system == "procrastinate":
        from peers.procrastinate_side import ProcrastinateSide

        return ProcrastinateSide(workdir, admin_dsn=args.pg, retry_every=args.procrastinate_retry_every)
    raise SystemExit(f"unknown system {system!r}; choose from {', '.join(SYSTEMS)}")


async def run_one(system: str, plan: Plan, workdir: Path, args: argparse.Namespace,
                  throughput: Throughput | None, failover: bool) -> dict[str, Any]:
    side = make_side(system, workdir, args)
    obs = await drive(side, plan, log=lambda msg: console.print(msg, highlight=False), throughput=throughput,
                      failover=failover)
    # without the failover section no run of the plan was submitted: none is "lost"
    out = measure(obs, plan if failover else dataclasses.replace(plan, jobs=(), kills=()))
    if obs.throughput is not None:
        out["throughput"] = measure_throughput(obs.throughput)
    return out


def show(result: dict[str, Any]) -> None:
    if any("throughput" in r for r in result["systems"].values()):
        console.print(throughput_table(result))
        for name, r in result["systems"].items():
            if "throughput" in r:
                console.print(f"  {name}: one at a time by {r['throughput']['single_path']}; "
                              f"the backlog by {r['throughput']['batch_path']}", highlight=False)
                phases = r["throughput"].get("backlog_phases_ms")
                if phases:
                    console.print(f"  {name}, a backlog run on its machine, ms p50/p90: " + "; ".join(
                        f"{k} {v['p50']:.1f}/{v['p90']:.1f}" for k, v in phases.items()), highlight=False)
    if result["plan"]["runs"]:
        for table in failover_tables(result):
            console.print(table)
    console.print(ratio_table(result))
    for line in summary_lines(result):
        console.print(line, highlight=False)
    for name, r in result["systems"].items():
        v = ", ".join(f"{a} {b}" for a, b in r["versions"].items())
        console.print(f"[bold]{name}[/]: {v}; machines ready after {r['ready_s']:.1f} s", highlight=False)
        if r["settings"].get("harness reconnects to PostgreSQL (server restarted under the run)"):
            console.print(f"[bold red]{name}: PostgreSQL was restarted during the run[/] (by someone else): "
                          "its figures are not comparable", highlight=False)
    console.print(f"load average: before {result['loadavg_before']}, after {result['loadavg_after']} "
                  f"({result['cpus']} cpus)", highlight=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="a short run: 6 machines; 30 dispatch samples, a backlog of 600; 40 runs, 2 kills")
    ap.add_argument("--sections", default="throughput,failover",
                    help="throughput, failover or both (default), comma-separated")
    ap.add_argument("--samples", type=int, default=None,
                    help="dispatch samples, empty runs one at a time (default 200; quick 30), after a warm-up")
    ap.add_argument("--backlog", type=int, default=None, help="empty runs in the backlog (default 3000; quick 600)")
    ap.add_argument("--only", default=",".join(SYSTEMS), help="comma-separated systems (default: all three)")
    ap.add_argument("--machines", type=int, default=None, help="machines (default 16; quick 6)")
    ap.add_argument("--runs", type=int, default=None, help="runs (default 400; quick 40)")
    ap.add_argument("--kills", type=int, default=None, help="machines SIGKILLed mid-run (default 4; quick 2)")
    ap.add_argument("--load", type=float, default=0.75, help="offered load, fraction of the fleet's capacity")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--drain", type=float, default=None,
                    help="seconds after the last submit for the system to finish (default 120; quick 60)")
    ap.add_argument("--restart-delay", type=float, default=1.0, help="SIGKILL → replacement machine started, s")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep every log and database file here (default: a temporary directory, removed)")
    ap.add_argument("--live-code", action="store_true",
                    help="run the work tree's src/deskfleet as it is, not a snapshot taken at the start")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres", help="admin connection")
    ap.add_argument("--celery-visibility-timeout", type=float, default=10.0,
                    help="Redis visibility timeout, s (must exceed the longest run: 3 s here)")
    ap.add_argument("--procrastinate-retry-every", type=int, default=10, choices=(1, 2, 5, 10, 15, 20, 30),
                    help="seconds between runs of the retry-stalled-jobs periodic task")
    args = ap.parse_args()
    systems = [s.strip() for s in args.only.split(",") if s.strip()]
    for s in systems:
        if s not in SYSTEMS:
            raise SystemExit(f"unknown system {s!r}; choose from {', '.join(SYSTEMS)}")
    sections = {x.strip() for x in args.sections.split(",") if x.strip()}
    if not sections or sections - {"throughput", "failover"}:
        raise SystemExit("--sections: throughput, failover or both")
    throughput = Throughput(
        samples=args.samples or (30 if args.quick else 200), warmup=10 if args.quick else 20,
        backlog=args.backlog or (600 if args.quick else 3000),
    ) if "throughput" in sections else None
    plan = make_plan(
        seed=args.seed,
        machines=args.machines or (6 if args.quick else 16),
        runs=args.runs or (40 if args.quick else 400),
        kills=args.kills if args.kills is not None else (2 if args.quick else 4),
        load=args.load, restart_delay=args.restart_delay,
        drain=args.drain if args.drain is not None else (60.0 if args.quick else 120.0),
    )
    # A SIGTERM to the benchmark unwinds like Ctrl-C, so every finally block stops its processes.
    signal.signal(signal.SIGTERM, _interrupt)
    failover = "failover" in sections
    console.print(f"[bold]side by side[/]: {plan.machines} machines; "
                  + (f"throughput: {throughput.warmup} + {throughput.samples} empty runs one at a time, a backlog "
                     f"of {throughput.backlog}; " if throughput else "")
                  + (f"failover: {len(plan.jobs)} runs over {plan.window:.0f} s, kills at "
                     f"{', '.join(f'{k.at:.0f} s' for k in plan.kills) or 'none'}; " if failover else "")
                  + f"systems: {', '.join(systems)}")
    result: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "quick": args.quick, "loadavg_before": _loadavg(),
        "command": " ".join([".venv/bin/python", "bench/peers.py", *sys.argv[1:]]),
        "throughput_plan": {"samples": throughput.samples, "warmup": throughput.warmup, "backlog": throughput.backlog,
                            "automation": "sim.noop"} if throughput else None,
        "plan": {"seed": plan.seed, "machines": plan.machines, "runs": len(plan.jobs) if failover else 0,
                 "window_s": plan.window,
                 "load": plan.load, "restart_delay_s": plan.restart_delay, "drain_s": plan.drain,
                 "kills": [{"at": k.at, "phase": k.phase} for k in plan.kills] if failover else [],
                 "seconds": {"min": min(j.seconds for j in plan.jobs), "max": max(j.seconds for j in plan.jobs),
                             "mean": sum(j.seconds for j in plan.jobs) / len(plan.jobs)}},
        "systems": {},
    }
    t_all = time.time()
    with contextlib.ExitStack() as stack:
        tmp = args.workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="deskfleet-peers-"))
        if not args.live_code:
            result["deskfleet_code"] = snapshot_code(Path(tmp) / "code")
        for system in systems:
            console.print(f"[bold]{system}[/] …")
            t = time.time()
            result["systems"][system] = asyncio.run(run_one(system, plan, Path(tmp) / system, args, throughput,
                                                            failover))
            result["systems"][system]["wall_s"] = time.time() - t
            if failover and result["systems"][system]["succeeded"] == 0:
                console.print(f"[bold red]{system} completed no run at all[/]: a broken set-up, not a result "
                              f"(rerun with --workdir DIR to keep its logs)")
    result["wall_s"] = time.time() - t_all
    result["loadavg_after"] = _loadavg()
    result["ratios"] = ratios(result["systems"])
    show(result)
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"peers-{stamp}.json"
    path.write_text(json.dumps(result, indent=2))
    png = RESULTS / f"peers-{stamp}.png"
    plot(result, png)
    console.print(f"results: {path}\nplot: {png}\n(whole comparison: {result['wall_s']:.0f} s)")


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _loadavg() -> str:
    """``uptime``'s three load averages: the machine is shared, so each result says how busy it was."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
