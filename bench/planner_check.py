"""The capacity planner's prediction against a real run of the same demand (issue 12's benchmark).

    .venv/bin/python bench/planner_check.py                # 15 minutes of demand: ~19 minutes in all
    .venv/bin/python bench/planner_check.py --quick        # 3 minutes of demand: ~5 minutes
    .venv/bin/python bench/planner_check.py --minutes 20 --seed 3 --tick 2
    .venv/bin/python bench/planner_check.py --workdir /tmp/pc   # keep the CSV, logs and databases

One demand, two ways, in this order:

1. **The demand**: ``--minutes`` of ``sim.work`` runs, written as a demand CSV in the
   planner's format (``at,automation,seconds``; ``at`` in seconds from the start). Arrivals
   are a Poisson process (a fixed ``--seed``) whose rate follows a peak: quiet (the first
   15 % of the time, ``--quiet-rate``), a ramp (25 %), the peak (25 %, ``--peak-rate``), a
   tail back down (35 %). Each run keeps its machine 2 to 45 s (log-normal, median 9 s).
2. **Calibration**: a ``deskfleet server`` of its own, the local provider, a pool of
   ``--calibrate`` machines created at once; each machine's boot is its ``provisioning``
   lifecycle event → its agent's ``machine.connected`` (from then on it takes runs). The
   median is the planner's ``--boot``; the slowest ``ready`` event (``since_created``,
   rounded up) is the policy's ``ready_time``, as bench/autoscale.py sets it. Everything it
   started is stopped before the next step.
3. **The prediction**: ``deskfleet plan --demand day.csv --policy policy.json --boot B
   --tick T --json`` — the policy evaluated as it is; its figures are read from that JSON.
   The same replay is made in-process (``planner.evaluate``, the same arguments) for what
   the JSON does not hold: each run's wait and the supply at each pass, for the plot and
   for machine-hours over the run's window. Both must agree (recorded as ``consistent``).
4. **The real run**: bench/autoscale.py's ``LocalServer`` — ``deskfleet server --provider
   here=local:… --controller-tick T``, each machine a ``deskfleet agent --desktop sim``
   process of its own — with the same policy. Once its ``min`` machines are up (and no
   sooner than the planner's own lead before the day: ``ceil((boot + 2 tick) / tick)``
   ticks after the policy was set), the submitter sends each CSV row at its time after
   that start as a ``sim.work`` run of its ``seconds`` (``POST /v1/runs``, one task a row,
   so a slow answer holds no other). The run lasts until every run is final, the pool is
   back at its ``min`` and the predicted return to it has passed, then ``--after`` seconds.

Figures, predicted and real, and real ÷ predicted:

- queue wait p50, p95, p99, max: a run's creation → its first attempt's assignment (the
  planner's own measure), nearest rank; runs that waited over 1 s;
- machine-hours over the window [start, W], W the later of the two pools' return to
  ``min`` after their last run: every machine held (``provisioning`` → ``destroyed``
  events; the planner's supply at each pass); and over the hour the planner counts (the
  real pool taken as held at ``min`` after W: nothing arrives then, it is not run);
- peak machines held; machines created (those of the floor included); the last run's end;
  the return to ``min``.

Also: the real boots of the machines created during the run (against ``--boot``), each run's
time on its machine beyond its ``seconds``, the submits' lateness, and the figures of a second
in-process replay with ``--boot`` set to the run's own median boot (what a better boot
estimate would have predicted). Progress on stderr; the table on stdout; results in
``bench/results/planner-check-<stamp>.json`` and ``.png``. At the end the server is stopped
first, then every machine of the local provider powered off (``LocalProvider.power_off``) and
their pids checked gone — on Ctrl-C or an error too (bench/autoscale.py's teardown).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import logging
import math
import os
import platform
import random
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import autoscale  # its helpers import deskfleet only inside functions: safe before the code snapshot
import scale

RESULTS = autoscale.RESULTS
POOL = autoscale.POOL
AUTOMATION = "sim.work"
#: the demand's phases, as fractions of its length: quiet, a ramp up, the peak, a tail down
PHASES = (("quiet", 0.15), ("ramp", 0.25), ("peak", 0.25), ("tail", 0.35))
#: run durations: log-normal around a median, clipped (sim.work keeps its machine that long)
MEDIAN_S, SIGMA, SHORTEST_S, LONGEST_S = 9.0, 0.6, 2.0, 45.0
#: a wait above this counts as "waited" (the real dispatch takes milliseconds; the planner's, none)
WAITED_S = 1.0
progress = autoscale.progress
console = autoscale.console


# -- the demand -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    """One run of the demand: the planner's CSV columns."""

    at: float  # seconds from the demand's start
    automation: str
    seconds: float


def rate_at(frac: float, quiet: float, peak: float) -> float:
    """Arrivals a second at ``frac`` (0 to 1) of the demand's length: :data:`PHASES`' shape."""
    (_, q), (_, r), (_, p), _ = PHASES
    if frac < q:
        return quiet
    if frac < q + r:
        return quiet + (peak - quiet) * (frac - q) / r
    if frac < q + r + p:
        return peak
    return peak + (quiet - peak) * min(1.0, (frac - q - r - p) / (1.0 - q - r - p))


def phase_of(frac: float) -> str:
    edge = 0.0
    for name, share in PHASES:
        edge += share
        if frac < edge:
            return name
    return PHASES[-1][0]


def make_demand(minutes: float, seed: int, *, quiet: float = 0.04, peak: float = 0.55) -> list[Row]:
    """The runs of ``minutes`` of demand, the same for the same seed: a Poisson process of rate
    :func:`rate_at` (by thinning), each run of a log-normal duration (:data:`MEDIAN_S`)."""
    rng = random.Random(seed)
    length = minutes * 60.0
    top = max(quiet, peak)
    rows: list[Row] = []
    t = 0.0
    while True:
        t += rng.expovariate(top)
        if t >= length:
            return rows
        if rng.random() * top < rate_at(t / length, quiet, peak):
            seconds = min(LONGEST_S, max(SHORTEST_S, rng.lognormvariate(math.log(MEDIAN_S), SIGMA)))
            rows.append(Row(round(t, 3), AUTOMATION, round(seconds, 1)))


def write_demand(rows: Sequence[Row], path: Path) -> None:
    """The planner's demand file (docs/planner.md): a header line, a row per run."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("at", "automation", "seconds"))
        for r in rows:
            w.writerow((f"{r.at:.3f}", r.automation, f"{r.seconds:.1f}"))


def none_waiting(rows: Sequence[Row]) -> list[tuple[float, int]]:
    """Runs in progress if none waited, as levels (time, runs after it): the least supply."""
    return autoscale.levels([(r.at, 1) for r in rows] + [(r.at + r.seconds, -1) for r in rows])


# -- figures, from levels and waits (the same for both) --------------------------------------------


def wait_stats(waits: Sequence[float]) -> dict[str, Any]:
    """p50, p95, p99, max (nearest rank, as the planner's), and the runs that waited over
    :data:`WAITED_S`."""
    return {"p50": autoscale.pct(list(waits), 50), "p95": autoscale.pct(list(waits), 95),
            "p99": autoscale.pct(list(waits), 99), "max": max(waits, default=None),
            "waited": sum(w > WAITED_S for w in waits), "n": len(waits)}


def peak_level(lv: list[tuple[float, int]], t0: float, t1: float) -> int:
    return max([autoscale.level_at(lv, t0), *(n for at, n in lv if t0 <= at <= t1)])


def pool_figures(held: list[tuple[float, int]], busy: list[tuple[float, int]], waits: Sequence[float],
                 ends: Sequence[float], *, floor: int, created: int) -> dict[str, Any]:
    """One pool's figures, every time in seconds from the demand's start: ``held``, machines
    held (levels); ``busy``, machines busy; ``waits``, each run's; ``ends``, each run's end."""
    last_end = max(ends, default=None)
    back = autoscale.first_at(held, last_end, lambda n: n <= floor) if last_end is not None else None
    return {"wait_s": wait_stats(waits), "last_end_s": last_end, "back_at_floor_s": back,
            "machines_created": created, "busy_max": peak_level(busy, 0.0, math.inf)}


def in_window(fig: dict[str, Any], held: list[tuple[float, int]], window: float, *, floor: int, observed: float,
              hour: float = 3600.0) -> dict[str, Any]:
    """``fig`` with the machine-hours over [0, ``window``] and the peak held in it; and over the
    planner's ``hour``, the pool taken as held at ``floor`` past ``observed`` (when ``held``
    was last known: nothing arrives after the demand, so a pool back at its floor stays there)."""
    known = min(max(observed, window), hour)
    mh_hour = (autoscale.integral(held, 0.0, known) + floor * (hour - known)) / 3600
    return {**fig, "window_s": window, "machine_hours": autoscale.integral(held, 0.0, window) / 3600,
            "peak_machines": peak_level(held, 0.0, window), "machine_hours_hour": mh_hour,
            "hour_extrapolated_from_s": known if known < hour else None}


def predicted_pool(samples: Sequence[Sequence[float]], waits: Sequence[float], rows: Sequence[Row], *,
                   floor: int, created: int) -> tuple[dict[str, Any], list[tuple[float, int]], list[tuple[float, int]]]:
    """The planner's pool from its replay: ``samples`` (at, up, busy) at each pass and each
    run's wait, in arrival order. Runs end ``seconds`` after they start, exactly."""
    held = [(float(s[0]), int(s[1])) for s in samples]
    busy = [(float(s[0]), int(s[2])) for s in samples]
    ends = [r.at + w + r.seconds for r, w in zip(rows, waits, strict=True) if math.isfinite(w)]
    return pool_figures(held, busy, [w for w in waits if math.isfinite(w)], ends, floor=floor,
                        created=created), held, busy


def real_pool(events: Sequence[dict[str, Any]], runs: Sequence[dict[str, Any]], *, t0: float, floor: int,
              ) -> tuple[dict[str, Any], list[tuple[float, int]], list[tuple[float, int]], dict[str, dict[str, Any]]]:
    """The real pool from the API: machines held from their ``provisioning`` to their
    ``destroyed`` lifecycle event, busy from each run's first assignment to its end;
    times from ``t0`` (the demand's start, epoch seconds)."""
    ms = autoscale.machines_of(list(events), list(runs))
    made = [m for m in ms.values() if "created" in m]
    held = autoscale.levels([(m["created"] - t0, 1) for m in made]
                            + [(m["destroyed"] - t0, -1) for m in made if "destroyed" in m])
    done = [r for r in runs if r["assigned"] is not None and r["ended"] is not None]
    busy = autoscale.levels([(r["assigned"] - t0, 1) for r in done] + [(r["ended"] - t0, -1) for r in done])
    waits = [r["assigned"] - r["created"] for r in runs if r["assigned"] is not None]
    fig = pool_figures(held, busy, waits, [r["ended"] - t0 for r in done], floor=floor, created=len(made))
    return fig, held, busy, ms


def boots(ms: dict[str, dict[str, Any]], *, since: float = -math.inf) -> list[float]:
    """Each machine's ``provisioning`` event → its agent's first ``machine.connected``, for
    the machines created at or after ``since``."""
    return sorted(m["connected"] - m["created"] for m in ms.values()
                  if "connected" in m and "created" in m and m["created"] >= since)


def ratio(real: float | None, predicted: float | None) -> float | None:
    """real ÷ predicted; None where the prediction is 0 or either is missing."""
    if real is None or predicted is None or predicted == 0:
        return None
    return real / predicted


#: (figure, its path in a pool's figures, digits) — the comparison's rows, in order
ROWS: tuple[tuple[str, tuple[str, ...], int], ...] = (
    ("queue wait p50, s", ("wait_s", "p50"), 2),
    ("queue wait p95, s", ("wait_s", "p95"), 1),
    ("queue wait p99, s", ("wait_s", "p99"), 1),
    ("queue wait max, s", ("wait_s", "max"), 1),
    (f"runs that waited over {WAITED_S:g} s", ("wait_s", "waited"), 0),
    ("machine-hours, start → both back at min", ("machine_hours",), 3),
    ("machine-hours, the planner's hour (real: at min after)", ("machine_hours_hour",), 3),
    ("peak machines held", ("peak_machines",), 0),
    ("machines created (the floor's included)", ("machines_created",), 0),
    ("busy machines, most at once", ("busy_max",), 0),
    ("last run finished, s from the start", ("last_end_s",), 1),
    ("pool back at min, s from the start", ("back_at_floor_s",), 1),
)


def get(fig: dict[str, Any], path: tuple[str, ...]) -> Any:
    for k in path:
        fig = fig[k]
    return fig


def compare(predicted: dict[str, Any], real: dict[str, Any]) -> list[dict[str, Any]]:
    """A row per figure of :data:`ROWS`: predicted, real and real ÷ predicted."""
    return [{"figure": name, "predicted": get(predicted, path), "real": get(real, path),
             "ratio": ratio(get(real, path), get(predicted, path))} for name, path, _ in ROWS]


# -- the three steps --------------------------------------------------------------------------------


async def calibrate(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Boot times of the local provider here and now: ``--calibrate`` machines created at once
    by a server of their own; everything stopped before it returns."""
    from deskfleet.client import AsyncClient

    n = args.calibrate
    policy = {"min": n, "max": n, "provider": "here", "warm": {"min": 0, "max": 0}, "ready_time": 60}
    server = autoscale.LocalServer(workdir / "calibration", tick=args.tick)
    autoscale.SERVERS.append(server)
    sampler: asyncio.Task[None] | None = None
    try:
        async with AsyncClient(server.url, timeout=60) as client:
            await server.healthy(client)
            await client.put_pool(POOL, allow_wait_for_capacity=True)
            await client.put_pool_policy(POOL, policy, version=0, comment="bench/planner_check.py: calibration")
            watch = autoscale.Watch(client, args.sample, "calibration")
            sampler = asyncio.create_task(watch.run())
            await watch.until(lambda s: s["serving"] >= n and s["booting"] == 0, 240, f"{n} machines ready")
            sampler.cancel()
            await watch.look()
    finally:
        if sampler is not None:
            sampler.cancel()
        left = await server.shutdown()
        autoscale.SERVERS.remove(server)
    ms = autoscale.machines_of(watch.events, [])
    connected = boots(ms)
    ready = sorted(m["since_created"] for m in ms.values() if m.get("since_created") is not None)
    if not connected or not ready:
        raise RuntimeError(f"calibration: no boot measured ({len(ms)} machines)")
    out = {"machines": n, "connect_s": [round(b, 3) for b in connected], "ready_event_s": ready,
           "boot_s": round(statistics.median(connected), 1), "ready_time_s": float(math.ceil(max(ready))),
           "agents_left_running": left}
    progress.print(f"calibration: {n} machines at once, created → agent connected {min(connected):.1f}-"
                   f"{max(connected):.1f} s (median {out['boot_s']:g} s: --boot), 'ready' events "
                   f"{min(ready):g}-{max(ready):g} s (the policy's ready_time: {out['ready_time_s']:g} s)",
                   highlight=False)
    return out


def predict(args: argparse.Namespace, workdir: Path, demand: Path, policy: dict[str, Any], boot: float,
            ) -> dict[str, Any]:
    """``deskfleet plan`` on the demand with the policy as it is; its JSON, and the same replay
    in-process for each run's wait and the supply at each pass."""
    from deskfleet.planner import WaitTarget, evaluate, read_demand
    from deskfleet.pools import PoolPolicy

    policy_file = workdir / "policy.json"
    policy_file.write_text(json.dumps(policy, indent=1))
    argv = [sys.executable, "-m", "deskfleet", "plan", "--demand", str(demand), "--policy", str(policy_file),
            "--boot", f"{boot:g}", "--tick", f"{args.tick:g}", "--json", "--out", str(workdir / "plan")]
    shown = ["deskfleet", "plan", "--demand", demand.name, "--policy", policy_file.name, *argv[8:-2]]
    progress.print(f"prediction: {shlex.join(shown)}", highlight=False)
    began = time.monotonic()
    done = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=True)  # its progress: our stderr
    cli = json.loads(done.stdout)
    cli_s = time.monotonic() - began
    target = WaitTarget(p95=float(cli["target"]["p95"]) if "p95" in cli["target"] else None,
                        p99=float(cli["target"]["p99"]) if "p99" in cli["target"] else None)
    e = evaluate(read_demand(demand), PoolPolicy.model_validate(policy), target, boot=boot, tick=args.tick,
                 label="the given policy")
    mine = e.to_json()
    consistent = all(mine[k] == cli["autoscaled"][k] for k in ("wait", "machine_hours", "most_machines", "created"))
    if not consistent:
        progress.print(f"[yellow]prediction: the in-process replay differs from the CLI's: {mine} vs "
                       f"{cli['autoscaled']}[/]")
    return {"command": shlex.join(shown), "cli": cli, "cli_s": round(cli_s, 1), "consistent": consistent,
            "waits": list(e.waits), "samples": [(s.at, s.up, s.busy) for s in e.samples], "created": e.created}


def replay(demand: Path, policy: dict[str, Any], boot: float, tick: float) -> dict[str, Any]:
    """The in-process replay alone (the hindsight prediction: another ``boot``)."""
    from deskfleet.planner import WaitTarget, evaluate, read_demand
    from deskfleet.pools import PoolPolicy

    e = evaluate(read_demand(demand), PoolPolicy.model_validate(policy), WaitTarget(p95=60.0), boot=boot, tick=tick)
    return {"boot": boot, "waits": list(e.waits), "samples": [(s.at, s.up, s.busy) for s in e.samples],
            "created": e.created}


async def real_run(args: argparse.Namespace, workdir: Path, rows: Sequence[Row], policy: dict[str, Any], *,
                   lead: float, predicted_back: float | None, predicted_up: list[tuple[float, int]]) -> dict[str, Any]:
    """The demand for real: a server, the policy, each row submitted at its time."""
    from deskfleet.client import AsyncClient

    floor = int(policy["min"])
    server = autoscale.LocalServer(workdir / "real", tick=args.tick)
    autoscale.SERVERS.append(server)
    sampler: asyncio.Task[None] | None = None
    sending: list[asyncio.Task[None]] = []
    ids: list[str | None] = [None] * len(rows)
    try:
        async with AsyncClient(server.url, timeout=60) as client:
            await server.healthy(client)
            await client.put_pool(POOL, allow_wait_for_capacity=True)
            await client.put_pool_policy(POOL, policy, version=0, comment="bench/planner_check.py")
            policy_at = time.time()
            watch = autoscale.Watch(client, args.sample, "real")
            sampler = asyncio.create_task(watch.run())
            progress.print(f"real: policy {json.dumps(policy)}; waiting for its {floor} machine(s)", highlight=False)
            await watch.until(lambda s: s["serving"] >= floor and s["booting"] == 0, 240, f"{floor} machines ready")
            await asyncio.sleep(max(0.0, policy_at + lead - time.time()))
            t0 = time.time()
            progress.print(f"real: the demand starts {t0 - policy_at:.1f} s after the policy (the planner's lead: "
                           f"{lead:g} s); {len(rows)} runs over {rows[-1].at / 60:.1f} min", highlight=False)

            async def send(i: int, row: Row) -> None:
                await asyncio.sleep(max(0.0, t0 + row.at - time.time()))
                made = await client.submit(AUTOMATION, {"key": f"row-{i}", "seconds": row.seconds})
                ids[i] = made["id"]

            sending = [asyncio.create_task(send(i, r)) for i, r in enumerate(rows)]
            deadline = t0 + rows[-1].at + 600 + 3 * max(r.seconds for r in rows)
            said = 0.0
            while True:
                await asyncio.sleep(2.0)
                for task in sending:
                    if task.done() and task.exception() is not None:
                        raise RuntimeError("real: a submit failed") from task.exception()
                submitted = [i for i in ids if i is not None]
                states = Counter(r["state"] for r in await client.every_run(pool=POOL))
                finished = sum(states[s] for s in autoscale.FINAL)
                now = time.time()
                if now - said >= args.every:
                    said = now
                    s = watch.samples[-1]
                    progress.print(f"  real t+{now - t0:5.0f}s  submitted {len(submitted):3d}/{len(rows)}  "
                                   f"queued {s['queued']:3d}  busy {s['busy']:2d}  held {s['held']:2d} "
                                   f"(predicted {autoscale.level_at(predicted_up, now - t0):2d})  booting "
                                   f"{s['booting']:2d}  finished {finished:3d}", highlight=False)
                if len(submitted) == len(rows) and finished == len(rows):
                    break
                if now > deadline:
                    raise RuntimeError(f"real: the runs did not finish: {dict(states)}")
            done_at = time.time()
            progress.print(f"real: every run finished {done_at - t0:.1f} s after the start; waiting for the pool "
                           f"to be back at {floor}", highlight=False)
            until = t0 + (predicted_back or 0.0)
            with contextlib.suppress(RuntimeError):  # not back: the figures say so
                await watch.until(lambda s: s["held"] <= floor and s["booting"] == 0 and s["serving"] == floor
                                  and time.time() >= until, args.stabilization + 300, "return to the floor")
            await asyncio.sleep(args.after)  # anything created or destroyed after it (flapping) shows here
            sampler.cancel()
            await watch.look()
            runs = await autoscale._runs(client, [i for i in ids if i is not None])
    finally:
        if sampler is not None:
            sampler.cancel()
        for task in sending:
            task.cancel()
        left = await server.shutdown()
        autoscale.SERVERS.remove(server)
        if left:
            progress.print(f"[red]real: agents still alive after power-off, killed: {left}[/]")
    return {"t0": t0, "policy_at": policy_at, "runs": runs, "events": watch.events, "samples": watch.samples,
            "agents_left_running": left, "ids": ids}


# -- output -------------------------------------------------------------------------------------------


def _cell(v: float | None, digits: int) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


def show(result: dict[str, Any]) -> None:
    c = result["comparison"]
    d = result["demand"]
    table = Table(title=f"{d['runs']} runs over {d['minutes']:g} min (seed {d['seed']}); policy min "
                        f"{result['policy']['min']}, max {result['policy']['max']}; --boot {result['boot_s']:g} s, "
                        f"--tick {result['settings']['tick']:g} s")
    for col in ("", "predicted", "real", "real ÷ predicted", f"predicted, boot {result['hindsight']['boot']:g} s"):
        table.add_column(col, justify="left" if not col else "right")
    digits = {name: dg for name, _, dg in ROWS}
    for row, h in zip(c["rows"], c["hindsight"], strict=True):
        dg = digits[row["figure"]]
        table.add_row(row["figure"], _cell(row["predicted"], dg), _cell(row["real"], dg),
                      "—" if row["ratio"] is None else f"{row['ratio']:.2f}x", _cell(h, dg))
    console.print(table)
    r = result["real"]
    console.print(f"window: start → {c['window_s']:.0f} s. Real boots during the run: "
                  f"{_cell(r['boot_s']['p50'], 1)} s median, {_cell(r['boot_s']['max'], 1)} s max "
                  f"({r['boot_s']['n']} machines); run time on a machine beyond its seconds: p50 "
                  f"{_cell(r['overhead_s']['p50'], 3)} s; submits late by p50 {_cell(r['late_s']['p50'], 3)} s, "
                  f"max {_cell(r['late_s']['max'], 3)} s", highlight=False)


def plot(result: dict[str, Any], series: dict[str, Any], path: Path) -> None:
    """Demand; supply predicted and real (and busy); each run's wait, predicted and real."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows: list[Row] = series["rows"]
    window = result["comparison"]["window_s"]
    end = max(window, rows[-1].at) + 30
    fig = Figure(figsize=(12, 10), layout="constrained")
    FigureCanvasAgg(fig)
    demand_ax, machines_ax, wait_ax = fig.subplots(3, 1, sharex=True)
    ratios = {row["figure"]: row["ratio"] for row in result["comparison"]["rows"]}
    fig.suptitle(f"The planner's prediction against a real run: {len(rows)} runs over "
                 f"{result['demand']['minutes']:g} min, local provider, --boot {result['boot_s']:g} s, --tick "
                 f"{result['settings']['tick']:g} s\nreal ÷ predicted: queue wait p95 "
                 f"{_x(ratios['queue wait p95, s'])}, p99 {_x(ratios['queue wait p99, s'])}; machine-hours "
                 f"{_x(ratios['machine-hours, start → both back at min'])}; peak machines "
                 f"{_x(ratios['peak machines held'])}")

    bucket = 30.0
    counts = Counter(int(r.at // bucket) for r in rows)
    n = int(end // bucket) + 1
    demand_ax.bar([(i + 0.5) * bucket / 60 for i in range(n)], [counts.get(i, 0) for i in range(n)],
                  width=bucket / 60, color="tab:gray")
    demand_ax.set_ylabel(f"runs arriving\nper {bucket:g} s")

    def step(ax: Any, lv: list[tuple[float, int]], **kw: Any) -> None:
        xs = [0.0] + [t / 60 for t, _ in lv if 0 <= t <= end] + [end / 60]
        ys = [autoscale.level_at(lv, 0.0)] + [n for t, n in lv if 0 <= t <= end]
        ys.append(ys[-1])
        ax.step(xs, ys, where="post", **kw)

    step(machines_ax, none_waiting(rows), color="tab:gray", alpha=0.5, label="runs in progress if none waited")
    step(machines_ax, series["predicted_held"], color="tab:blue", linewidth=2, label="predicted: machines held")
    step(machines_ax, series["real_held"], color="tab:orange", linewidth=2, label="real: machines held")
    step(machines_ax, series["predicted_busy"], color="tab:blue", linestyle=":", label="predicted: busy")
    step(machines_ax, series["real_busy"], color="tab:orange", linestyle=":", label="real: busy")
    machines_ax.axhline(result["policy"]["max"], color="tab:red", linestyle="--", linewidth=0.8, label="max")
    machines_ax.set_ylabel("machines")
    machines_ax.legend(loc="upper left", fontsize="small")

    p, r = result["predicted"]["wait_s"], result["real"]["wait_s"]
    wait_ax.plot([a / 60 for a in series["arrivals"]], series["predicted_waits"], ".", color="tab:blue",
                 markersize=5, label=f"predicted (p95 {_cell(p['p95'], 1)} s)")
    wait_ax.plot([a / 60 for a in series["real_arrivals"]], series["real_waits"], "x", color="tab:orange",
                 markersize=4, label=f"real (p95 {_cell(r['p95'], 1)} s)")
    wait_ax.set_ylabel("queue wait (s)\nof each run, by its arrival")
    wait_ax.set_xlabel("minutes from the demand's start")
    wait_ax.set_xlim(0, end / 60)
    wait_ax.legend(loc="upper left", fontsize="small")
    for ax in (demand_ax, machines_ax, wait_ax):
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)


def _x(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}x"


def _dist(values: Sequence[float]) -> dict[str, Any]:
    d = scale.dist(values)
    return {k: d[k] for k in ("n", "min", "p50", "p90", "max")}


# -- the whole ------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 minutes of demand, scale-in stabilisation 30 s")
    ap.add_argument("--minutes", type=float, default=None, help="the demand's length (15; quick 3)")
    ap.add_argument("--seed", type=int, default=7, help="the demand's random seed (7)")
    ap.add_argument("--tick", type=float, default=1.0,
                    help="the pool controller's pass, s: deskfleet server --controller-tick and plan --tick (1)")
    ap.add_argument("--peak-rate", type=float, default=0.55, help="arrivals a second at the peak (0.55)")
    ap.add_argument("--quiet-rate", type=float, default=0.04, help="arrivals a second when quiet (0.04)")
    ap.add_argument("--min", type=int, default=1, help="the policy's min (1)")
    ap.add_argument("--max", type=int, default=8, help="the policy's max (8)")
    ap.add_argument("--warm-max", type=int, default=4, help="the policy's warm.max (4; warm.min 0, headroom 1)")
    ap.add_argument("--stabilization", type=float, default=None, help="the policy's scale_in.stabilization (60; quick 30)")
    ap.add_argument("--calibrate", type=int, default=3, help="machines booted at once to measure the boot (3)")
    ap.add_argument("--sample", type=float, default=0.5, help="seconds between two looks at the API (0.5)")
    ap.add_argument("--every", type=float, default=15.0, help="seconds between two progress lines (15)")
    ap.add_argument("--after", type=float, default=5.0, help="seconds watched after the pool is back at min (5)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the CSV, logs and databases here (a temp dir)")
    ap.add_argument("--code-ref", default=None, help="run src/deskfleet as committed at this git ref (git archive)")
    ap.add_argument("--live-code", action="store_true",
                    help="run the work tree's src/deskfleet as it is, not a snapshot taken at the start")
    return ap


def main() -> None:
    args = parser().parse_args()
    args.minutes = args.minutes or (3.0 if args.quick else 15.0)
    args.stabilization = args.stabilization if args.stabilization is not None else (30.0 if args.quick else 60.0)
    signal.signal(signal.SIGTERM, scale._interrupt)  # unwinds like Ctrl-C, through every finally
    logging.basicConfig(level=logging.ERROR)  # the in-process replay's scale decisions are not news
    result: dict[str, Any] = {
        "bench": "planner-check", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": shlex.join([".venv/bin/python", "bench/planner_check.py", *sys.argv[1:]]),
        "host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    began = time.time()
    rows = make_demand(args.minutes, args.seed, quiet=args.quiet_rate, peak=args.peak_rate)
    peak_if_none = max(n for _, n in none_waiting(rows))
    result["demand"] = {"minutes": args.minutes, "seed": args.seed, "runs": len(rows),
                        "work_machine_hours": round(sum(r.seconds for r in rows) / 3600, 3),
                        "most_at_once_if_none_waited": peak_if_none,
                        "phases": {name: sum(phase_of(r.at / (args.minutes * 60)) == name for r in rows)
                                   for name, _ in PHASES}}
    progress.print(f"demand: {len(rows)} runs over {args.minutes:g} min (seed {args.seed}), "
                   f"{result['demand']['work_machine_hours']:.2f} machine-hours of work, at most {peak_if_none} at "
                   f"once if none waited; by phase {result['demand']['phases']}", highlight=False)
    with contextlib.ExitStack() as stack:
        tmp = Path(args.workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="deskfleet-planner-check-")))
        tmp.mkdir(parents=True, exist_ok=True)
        if args.live_code:
            result["deskfleet_code"] = "live work tree"
        elif args.code_ref:
            result["deskfleet_code"] = scale.snapshot_ref(tmp / "code", args.code_ref)
        else:
            result["deskfleet_code"] = scale.snapshot_code(tmp / "code")
        demand = tmp / f"planner-check-{args.minutes:g}min-seed{args.seed}.csv"
        write_demand(rows, demand)
        try:
            cal = asyncio.run(calibrate(args, tmp))
            boot = cal["boot_s"]
            policy = {"min": args.min, "max": args.max, "provider": "here",
                      "warm": {"min": 0, "max": args.warm_max, "headroom": 1.0},
                      "scale_in": {"stabilization": args.stabilization, "drain_timeout": 120},
                      "ready_time": cal["ready_time_s"]}
            pred = predict(args, tmp, demand, policy, boot)
            pfig, pheld, pbusy = predicted_pool(pred["samples"], pred["waits"], rows, floor=args.min,
                                                created=pred["created"])
            progress.print(f"prediction: wait p50/p95/p99 {_cell(pfig['wait_s']['p50'], 1)} / "
                           f"{_cell(pfig['wait_s']['p95'], 1)} / {_cell(pfig['wait_s']['p99'], 1)} s; back at min "
                           f"{_cell(pfig['back_at_floor_s'], 0)} s after the start; {pred['cli_s']:.0f} s for the "
                           f"CLI (the static search included)", highlight=False)
            lead = math.ceil((boot + 2 * args.tick) / args.tick) * args.tick
            real = asyncio.run(real_run(args, tmp, rows, policy, lead=lead, predicted_back=pfig["back_at_floor_s"],
                                        predicted_up=pheld))
        finally:
            for server in list(autoscale.SERVERS):  # the last resort: Ctrl-C or an error mid-way
                server.stop()
                left = asyncio.run(server.power_off())
                progress.print(f"stopped a server left running and its machines (agents killed: {left})")
    t0 = real["t0"]
    rfig, rheld, rbusy, ms = real_pool(real["events"], real["runs"], t0=t0, floor=args.min)
    window = max(x for x in (pfig["back_at_floor_s"], rfig["back_at_floor_s"], rfig["last_end_s"]) if x is not None)
    pfig = in_window(pfig, pheld, window, floor=args.min, observed=3600.0)  # the replay's hour, every pass of it
    rfig = in_window(rfig, rheld, window, floor=args.min, observed=real["samples"][-1]["t"] - t0)
    run_boots = boots(ms, since=t0)
    hind = replay(demand, policy, round(statistics.median(run_boots), 1) if run_boots else boot, args.tick)
    hfig, hheld, _ = predicted_pool(hind["samples"], hind["waits"], rows, floor=args.min, created=hind["created"])
    hfig = in_window(hfig, hheld, window, floor=args.min, observed=3600.0)
    by_id = {r["id"]: r for r in real["runs"]}
    real_rows = [(row, by_id[i]) for row, i in zip(rows, real["ids"], strict=True) if i in by_id]
    rfig.update({
        "boot_s": _dist(run_boots), "boot_all_s": [round(b, 2) for b in run_boots],
        "overhead_s": _dist([(r["ended"] - r["assigned"]) - row.seconds for row, r in real_rows
                             if r["ended"] is not None and r["assigned"] is not None]),
        "late_s": _dist([r["created"] - (t0 + row.at) for row, r in real_rows]),
        "states": dict(Counter(r["state"] for r in real["runs"])),
        "attempts_over_one": sum(r["attempts"] > 1 for r in real["runs"]),
        "events": {k: sum(e["kind"] == k for e in real["events"])
                   for k in ("pool.machine_failed", "pool.provider_error", "pool.retire_abandoned")},
        "agents_left_running": real["agents_left_running"],
        "start_after_policy_s": t0 - real["policy_at"], "lead_s": lead})
    cli = pred["cli"]
    result.update({
        "calibration": cal, "policy": policy, "boot_s": boot,
        "planner": {"command": pred["command"], "consistent_with_in_process_replay": pred["consistent"],
                    "cli_seconds": pred["cli_s"], "json": cli},
        "predicted": pfig, "real": rfig, "hindsight": {"boot": hind["boot"], **hfig},
        "comparison": {"window_s": window, "rows": compare(pfig, rfig),
                       "hindsight": [row["predicted"] for row in compare(hfig, rfig)]},
        "series": {"at": [r.at for r in rows], "seconds": [r.seconds for r in rows],
                   "predicted_wait": [None if math.isinf(w) else round(w, 3) for w in pred["waits"]],
                   "real_wait": [round(by_id[i]["assigned"] - by_id[i]["created"], 3)
                                 if i in by_id and by_id[i]["assigned"] is not None else None for i in real["ids"]],
                   "predicted_held": pheld, "real_held": [(round(t, 3), n) for t, n in rheld],
                   "real_busy": [(round(t, 3), n) for t, n in rbusy],
                   "real_scaled": [{"t": round(e["at"] - t0, 3), "reason": e["reason"]}
                                   for e in real["events"] if e["kind"] == "pool.scaled"]}})
    # the planner's own JSON figures, beside those recomputed from its replay
    result["predicted"]["planner_json"] = {k: cli["autoscaled"][k] for k in ("wait", "machine_hours",
                                                                               "most_machines", "created")}
    result["wall_s"] = time.time() - began
    result["loadavg_end"] = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    name = f"planner-check-{scale.stamp()}"
    (RESULTS / f"{name}.json").write_text(json.dumps(scale._clean(result), indent=1))
    arrivals = [row.at for row, _ in real_rows]
    plot(result, {"rows": rows, "predicted_held": pheld, "predicted_busy": pbusy, "real_held": rheld,
                  "real_busy": rbusy, "arrivals": [r.at for r in rows],
                  "predicted_waits": [w if math.isfinite(w) else math.nan for w in pred["waits"]],
                  "real_arrivals": arrivals,
                  "real_waits": [r["assigned"] - r["created"] if r["assigned"] is not None else math.nan
                                 for _, r in real_rows]}, RESULTS / f"{name}.png")
    show(result)
    progress.print(f"{result['wall_s']:.0f} s; results: bench/results/{name}.json, plot: bench/results/{name}.png",
                   highlight=False)


if __name__ == "__main__":
    main()
