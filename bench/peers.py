"""Side by side: deskfleet, Celery (Redis) and Procrastinate (PostgreSQL) — the same runs, the
same simulated machines, the same kills, in one invocation.

    .venv/bin/pip install -e '.[bench]'            # Celery with Redis, Procrastinate
    .venv/bin/python bench/peers.py                 # 16 machines, 400 runs, 4 kills: ~3.5 minutes
    .venv/bin/python bench/peers.py --quick         # 6 machines, 40 runs, 2 kills: ~1.5 minutes
    .venv/bin/python bench/peers.py --only celery --quick --workdir /tmp/peers   # keep the logs

Needs Redis at 127.0.0.1:6379 and PostgreSQL at 127.0.0.1:5432 (user postgres, trust
auth; a database is created per run and dropped after). Results: a table, then
``bench/results/peers-<stamp>.json`` and ``…-<stamp>.png``.

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

**The measures**, per system:

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
import json
import math
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: core.py and the peers package

from peers.workload import Plan, Side, drive, make_plan, measure

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


async def run_one(system: str, plan: Plan, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    side = make_side(system, workdir, args)
    obs = await drive(side, plan, log=lambda msg: console.print(msg, highlight=False))
    return measure(obs, plan)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short smoke run: 6 machines, 40 runs, 2 kills")
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
    console.print(f"[bold]side by side[/]: {plan.machines} machines, {len(plan.jobs)} runs over "
                  f"{plan.window:.0f} s, kills at {', '.join(f'{k.at:.0f} s' for k in plan.kills) or 'none'}; "
                  f"systems: {', '.join(systems)}")
    result: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "quick": args.quick,
        "plan": {"seed": plan.seed, "machines": plan.machines, "runs": len(plan.jobs), "window_s": plan.window,
                 "load": plan.load, "restart_delay_s": plan.restart_delay, "drain_s": plan.drain,
                 "kills": [{"at": k.at, "phase": k.phase} for k in plan.kills],
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
            result["systems"][system] = asyncio.run(run_one(system, plan, Path(tmp) / system, args))
            result["systems"][system]["wall_s"] = time.time() - t
            if result["systems"][system]["succeeded"] == 0:
                console.print(f"[bold red]{system} completed no run at all[/]: a broken set-up, not a result "
                              f"(rerun with --workdir DIR to keep its logs)")
    result["wall_s"] = time.time() - t_all
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


def _s(v: float | None, digits: int = 1) -> str:
    return "never" if v is None else "—" if isinstance(v, float) and math.isnan(v) else f"{v:.{digits}f}"


def show(result: dict[str, Any]) -> None:
    plan = result["plan"]
    t = Table(title=f"side by side: {plan['machines']} machines, {plan['runs']} runs, {len(plan['kills'])} kills "
                    f"(seed {plan['seed']})")
    for col in ("system", "queue wait p50 ms", "p99 ms", "lost", "executed twice", "failed loudly",
                "recovery p50 s", "recovery max s", "all done after s"):
        t.add_column(col, justify="left" if col == "system" else "right")
    for name, r in result["systems"].items():
        rec = r["recovery_s"]
        worst = "never" if rec["never"] else _s(rec["max"])
        p50 = _s(rec["p50"]) if rec["n"] else "—"
        if rec["never"] and rec["p50"] is None:
            p50 = "never"
        done = _s(r["done_after_s"]) + ("" if r["all_final"] else " (not all)")
        t.add_row(name, _s(r["queue_wait_ms"]["p50"]), _s(r["queue_wait_ms"]["p99"]), str(r["lost"]),
                  str(r["executed_twice"]), str(r["failed"]), p50, worst, done)
    console.print(t)
    k = Table(title="the kills")
    for col in ("system", "at s", "machine", "run", "into its run", "effect before kill", "recovered after s",
                "how", "effects", "outcome"):
        k.add_column(col)
    for name, r in result["systems"].items():
        for d in r["kills"]:
            if not d.get("machine"):
                k.add_row(name, f"{d['planned_at']:.1f}", "—", d.get("note", ""), "", "", "", "", "", "")
                continue
            k.add_row(name, f"{d['offset']:.1f}", d["machine"], d["key"], f"{d['elapsed']:.2f} of {d['seconds']:.2f} s",
                      "yes" if d["effect_before_kill"] else "no", _s(d["recovered_after_s"]), d["recovered_by"],
                      str(d["effects"]), d["outcome"])
    console.print(k)
    for name, r in result["systems"].items():
        v = ", ".join(f"{a} {b}" for a, b in r["versions"].items())
        console.print(f"[bold]{name}[/]: {v}; machines ready after {r['ready_s']:.1f} s", highlight=False)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(result["systems"])
    colors = {"deskfleet": "#1f77b4", "celery": "#2ca02c", "procrastinate": "#d62728"}
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.6))
    for s in systems:
        waits = sorted(1000 * w for w in result["systems"][s]["queue_waits_s"])
        if waits:
            ys = [(i + 1) / len(waits) for i in range(len(waits))]
            ax1.step([max(w, 0.1) for w in waits], ys, where="post", label=s, color=colors.get(s))
    ax1.set_xscale("log")
    ax1.set_xlabel("queue wait, ms (submit → work started)")
    ax1.set_ylabel("fraction of runs")
    ax1.set_title("queue wait")
    ax1.grid(True, alpha=0.3)
    ax1.legend()
    horizon = max(r["done_after_s"] for r in result["systems"].values())
    for i, s in enumerate(systems):
        for d in result["systems"][s]["kills"]:
            if not d.get("machine"):
                continue
            v = d["recovered_after_s"]
            marker = "s" if d["effect_before_kill"] else "o"
            if v is None:
                ax2.scatter([i], [horizon], marker="x", color=colors.get(s), s=60)
            else:
                ax2.scatter([i], [v], marker=marker, color=colors.get(s), s=50, alpha=0.8)
    ax2.set_xticks(range(len(systems)), systems)
    ax2.set_ylabel("seconds")
    ax2.set_title("SIGKILL → run taken up elsewhere\n(● before its effect, ■ after, x never)")
    ax2.grid(True, axis="y", alpha=0.3)
    ax2.set_xlim(-0.5, len(systems) - 0.5)
    ax2.set_ylim(bottom=0)
    measures = ("lost", "executed_twice", "failed")
    width = 0.8 / max(1, len(systems))
    for i, s in enumerate(systems):
        vals = [result["systems"][s][m] for m in measures]
        xs = [j + (i - (len(systems) - 1) / 2) * width for j in range(len(measures))]
        ax3.bar(xs, vals, width=width, label=s, color=colors.get(s))
        for x, v in zip(xs, vals, strict=True):
            ax3.text(x, v, str(v), ha="center", va="bottom", fontsize=9)
    ax3.set_xticks(range(len(measures)), ["lost", "executed twice", "failed loudly"])
    ax3.set_title("runs")
    ax3.yaxis.get_major_locator().set_params(integer=True)
    ax3.legend()
    plan = result["plan"]
    fig.suptitle(f"deskfleet, Celery, Procrastinate: {plan['machines']} machines, {plan['runs']} runs, "
                 f"{len(plan['kills'])} machines SIGKILLed mid-run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
