"""Autoscaling: a surge of runs → the capacity the pool controller adds, and the pool back at its floor after it.

    .venv/bin/python bench/autoscale.py                 # both measures: ~2 minutes
    .venv/bin/python bench/autoscale.py --quick         # max 6, a smaller surge: ~75 s
    .venv/bin/python bench/autoscale.py --only fake     # the fake-clock measure alone: seconds
    .venv/bin/python bench/autoscale.py --workdir /tmp/autoscale   # keep every log and database

Two measures in one run, each against a static pool of ``max`` machines (``min = max``,
every machine ready before the surge) that takes the same surge:

**local** — for real: a ``deskfleet server`` process (default settings, the pool controller
every ``--controller-tick`` s) with the local provider ``here``, each machine a
``deskfleet agent --desktop sim --pack simehr --exact-name`` process of its own, started by
the server's controller. The static pool goes first; its machines' boot times (the
controller's ``provisioning`` → ``ready`` lifecycle events, 12 starting at once on this
host) give the autoscaled policy its ``ready_time`` (the slowest, rounded up: "measured").
The autoscaled policy: ``min`` 2, ``max`` N, warm 0, scale-in stabilisation 10 s. Once the
floor is ready, a surge of ``sim.work`` runs (4 x N of 8 s) is submitted at once
(``POST /v1/runs:batch``). Every ``--sample`` s the API is read: ``/v1/pools/default/demand``
(queued, busy), ``/v1/machines`` (serving = ready + busy) and the events since the last
look (machines booting = a ``provisioning`` lifecycle event, no ``ready`` or ``destroyed``
yet; held = created and not destroyed: what a cloud bills).

**fake** — the same controller (``fleet.controller.Controller``) against a real SQLite
store and the :class:`~deskfleet.providers.FakeProvider` on a fake clock (no sleeping):
provisioning 30 s, boot 120 s, the agent enrolled 15 s after the machine runs; the
controller's pass every 5 s (the server's default), the scheduler after every change; the
same surge shape with runs of 4 minutes and the policy's default stabilisation (300 s). Its
harness plays the agents: a machine running for 15 s enrols and connects; a run assigned
starts at once and succeeds ``--fake-run-seconds`` later.

Figures, for each (from the events and the runs' attempts, one clock):

- per machine: its ``provisioning`` event → its ``ready`` event (``since_created``; the
  controller notices each step at its next pass) and → its agent's ``machine.connected``;
- surge → the first added machine serving (its ``ready`` event, or its first assignment if
  earlier), → full capacity (N machines serving), → the last run finished;
- queue wait of the surge's runs: the run created → its first attempt assigned (p50, p95,
  max, nearest rank);
- the last run finished → the pool back at its floor (held machines = ``min``);
- machine-seconds held over the window "surge → autoscaled pool back at its floor", the
  static pool's over a window of the same length; and the ratios autoscaled / static of
  queue-wait p95 and machine-seconds.

Every process started is stopped at the end, on Ctrl-C or an error too: the server first
(its controller would replace machines), then every machine of the local provider powered
off through ``LocalProvider.power_off`` on the server's state directory; the agents' pids
are then checked gone. The code under test is a snapshot of ``src/deskfleet`` taken at the
start (bench/peers.py's ``snapshot_code``; ``--live-code`` runs the work tree as it is).
Results: ``bench/results/autoscale-<stamp>.json`` and ``.png``; progress on stderr, the
table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale  # its helpers import nothing of deskfleet: safe before the code snapshot is on sys.path

RESULTS = Path(__file__).resolve().parent / "results"
FINAL = frozenset({"succeeded", "failed", "timed_out", "cancelled"})
POOL = "default"
console = Console(width=None if sys.stdout.isatty() else 200)  # the table
progress = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

# -- figures, the same for both measures ------------------------------------------------------------


def pct(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def levels(changes: Iterable[tuple[float, int]]) -> list[tuple[float, int]]:
    """(time, level after it) from (time, +n/-n) changes."""
    level, out = 0, []
    for t, d in sorted(changes):
        level += d
        out.append((t, level))
    return out


def level_at(lv: list[tuple[float, int]], t: float) -> int:
    level = 0
    for at, n in lv:
        if at > t:
            break
        level = n
    return level


def first_at(lv: list[tuple[float, int]], t0: float, ok: Callable[[int], bool]) -> float | None:
    """The first time at or after ``t0`` the level satisfies ``ok``."""
    if ok(level_at(lv, t0)):
        return t0
    return next((at for at, n in lv if at > t0 and ok(n)), None)


def integral(lv: list[tuple[float, int]], t0: float, t1: float) -> float:
    """Level-seconds over [t0, t1] (the last level holds on past the last change)."""
    total, level, prev = 0.0, level_at(lv, t0), t0
    for at, n in lv:
        if at <= t0:
            continue
        if at >= t1:
            break
        total += level * (at - prev)
        prev, level = at, n
    return total + level * (t1 - prev)


def machines_of(events: list[dict[str, Any]], runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each machine the provider made: when it was created, connected, ready, first assigned,
    retired and destroyed, and its lifecycle steps (seconds each took, as the events say)."""
    ms: dict[str, dict[str, Any]] = {}
    for e in events:
        m = e["machine"]
        if e["kind"] == "machine.lifecycle":
            rec = ms.setdefault(m, {"steps": []})
            step = e["reason"]
            rec["steps"].append([step, e["at"], e["data"].get("seconds")])
            if step == "provisioning":
                rec["created"] = e["at"]
            elif step == "ready":
                rec["ready"] = e["at"]
                rec["since_created"] = e["data"].get("since_created")
            elif step == "destroyed":
                rec["destroyed"] = e["at"]
        elif m in ms and e["kind"] == "machine.connected":
            ms[m].setdefault("connected", e["at"])
        elif m in ms and e["kind"] == "machine.draining":
            ms[m].setdefault("retired", e["at"])
    for r in runs:
        if r["machine"] in ms and r["assigned"] is not None:
            rec = ms[r["machine"]]
            rec["first_assigned"] = min(rec.get("first_assigned", math.inf), r["assigned"])
    for rec in ms.values():
        ready = [t for t in (rec.get("ready"), rec.get("first_assigned")) if t is not None]
        rec["serving"] = min(ready) if ready else None
    return ms


def figures(events: list[dict[str, Any]], runs: list[dict[str, Any]], *, surge_at: float, floor: int, cap: int,
            window: float | None) -> dict[str, Any]:
    """The figures of one pool's surge; ``window``: machine-seconds over [surge, surge + window]
    (None: surge → back at its floor, this pool's own)."""
    ms = machines_of(events, runs)
    held = levels([(m["created"], 1) for m in ms.values() if "created" in m]
                  + [(m["destroyed"], -1) for m in ms.values() if "destroyed" in m and "created" in m])
    serving = levels([(m["serving"], 1) for m in ms.values() if m["serving"] is not None]
                     + [(min(m.get("retired", math.inf), m.get("destroyed", math.inf)), -1)
                        for m in ms.values() if m["serving"] is not None and ("retired" in m or "destroyed" in m)])
    added = [m for m in ms.values() if m.get("created", -math.inf) >= surge_at]
    waits = [r["assigned"] - r["created"] for r in runs if r["assigned"] is not None]
    last_end = max((r["ended"] for r in runs if r["ended"] is not None), default=None)
    first = min((m["serving"] for m in added if m["serving"] is not None), default=None)
    full = first_at(serving, surge_at, lambda n: n >= cap)
    back = first_at(held, last_end, lambda n: n <= floor) if last_end is not None else None
    if window is None:
        window = (back - surge_at) if back is not None else None
    boots = [m["since_created"] for m in ms.values() if m.get("since_created") is not None]
    connects = [m["connected"] - m["created"] for m in ms.values() if "connected" in m and "created" in m]
    scaled = [e for e in events if e["kind"] == "pool.scaled"]
    destroyed_at = sorted(m["destroyed"] for m in ms.values() if "destroyed" in m and m["destroyed"] >= surge_at)
    recreated = [m for m in added if destroyed_at and m["created"] > destroyed_at[0]]
    counts = Counter(e["kind"] for e in events)
    return {
        "runs": len(runs), "runs_unfinished": sum(r["ended"] is None for r in runs),
        "machine_boot_s": {"n": len(boots), "p50": pct(boots, 50), "max": max(boots, default=None),
                           "all": sorted(round(b, 3) for b in boots)},
        "machine_connect_s": {"p50": pct(connects, 50), "max": max(connects, default=None)},
        "machines_created_for_surge": len(added),
        "machines_held_max": max((n for _, n in held), default=0),
        "machines_created_s": min(m["created"] for m in added) - surge_at if added else None,
        "first_added_serving_s": None if first is None else first - surge_at,
        "full_capacity_s": None if full is None else full - surge_at,
        "surge_done_s": None if last_end is None else last_end - surge_at,
        "queue_wait_s": {"p50": pct(waits, 50), "p95": pct(waits, 95), "max": max(waits, default=None)},
        "back_at_floor_after_last_run_s": None if back is None or last_end is None else back - last_end,
        "back_at_floor_s": None if back is None else back - surge_at,
        "window_s": window,
        "machine_seconds": None if window is None else integral(held, surge_at, surge_at + window),
        # nothing more arriving after the surge: the last level holds to the hour's end
        "machine_hours_first_hour": integral(held, surge_at, surge_at + 3600.0) / 3600.0,
        "created_after_scale_in_began": len(recreated),
        "scale_passes_that_acted": sum(1 for e in scaled if e["data"].get("create") or e["data"].get("retire")),
        "events": {k: counts[k] for k in ("pool.machine_failed", "pool.provider_error", "pool.retire_abandoned")},
        "scaled": [{"t": round(e["at"] - surge_at, 3), "reason": e["reason"]} for e in scaled],
        "machines": {name: {k: (round(v - surge_at, 3) if isinstance(v, float) and k != "since_created" else v)
                            for k, v in m.items() if k != "steps"} for name, m in ms.items()},
    }


def ratios(auto: dict[str, Any], static: dict[str, Any]) -> dict[str, float | None]:
    def r(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else a / b

    return {"queue_wait_p95": r(auto["queue_wait_s"]["p95"], static["queue_wait_s"]["p95"]),
            "queue_wait_p50": r(auto["queue_wait_s"]["p50"], static["queue_wait_s"]["p50"]),
            "machine_seconds": r(auto["machine_seconds"], static["machine_seconds"]),
            "surge_done": r(auto["surge_done_s"], static["surge_done_s"]),
            "machine_hours_first_hour": r(auto["machine_hours_first_hour"], static["machine_hours_first_hour"])}


# == local: a real server, real agent processes =======================================================


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalServer:
    """``deskfleet server`` with the local provider ``here``: each machine its controller makes
    is a ``deskfleet agent`` process of its own, which outlives the server (as a VM would)."""

    def __init__(self, workdir: Path, *, tick: float) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data = workdir / "data"
        agent = [sys.executable, "-m", "deskfleet", "--log-level", "warning", "agent", "--orchestrator", self.url,
                 "--pack", "simehr", "--desktop", "sim", "--machine", "{name}", "--exact-name",
                 "--sim-backend", str(workdir / "ehr.db"), "--state-dir", "{state_dir}",
                 "--enrolment-token-file", str(self.data / "enrolment-token"), "--action-delay", "0.01",
                 "--screenshots", "none"]
        args = [sys.executable, "-m", "deskfleet", "--log-level", "info", "server", "--port", str(self.port),
                "--data-dir", str(self.data), "--provider", f"here=local:{shlex.join(agent)}",
                "--controller-tick", str(tick)]
        with open(workdir / "server.log", "ab") as log:
            # A session of its own: Ctrl-C reaches this script, which stops the server first.
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    async def healthy(self, client: Any) -> None:
        for _ in range(600):
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}: see {self.data.parent / 'server.log'}")
            with contextlib.suppress(Exception):
                await client.health()
                return
            await asyncio.sleep(0.05)
        raise RuntimeError("the server did not start within 30 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    async def power_off(self) -> list[str]:
        """Every machine of the provider powered off (the acceptance tests' teardown); the
        names of any agent still alive after that — killed by pid as a last resort."""
        from deskfleet.providers import LocalProvider
        from deskfleet.providers.local import running

        state = self.data / "providers" / "here"
        if not (state / "local-provider.json").exists():
            return []
        provider = LocalProvider([sys.executable], state_dir=state, name="here")
        machines = await provider.list()
        for m in machines:
            with contextlib.suppress(Exception):
                await provider.power_off(m.id, token=f"bench-teardown-{m.id}")
        left = []
        for name, m in json.loads((state / "local-provider.json").read_text())["machines"].items():
            pid = m.get("pid")
            if pid and running(pid):
                left.append(name)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
        progress.print(f"  {self.data.parent.name}: server stopped, {len(machines)} machines of its provider powered "
                       f"off, {len(left)} agents left running", highlight=False)
        return left

    async def shutdown(self) -> list[str]:
        await asyncio.to_thread(self.stop)
        return await self.power_off()


SERVERS: list[LocalServer] = []  # every server started: main's last resort stops them and their machines


def _epoch_event(e: dict[str, Any]) -> dict[str, Any]:
    return {"at": scale.epoch(e["at"]), "kind": e["kind"], "machine": e["machine"], "run": e["run"],
            "reason": e["reason"], "data": e["data"]}


class Watch:
    """The API read every ``every`` seconds: the pool's demand, its machines, the events since
    the last look. Booting and held machines follow from the lifecycle events."""

    def __init__(self, client: Any, every: float, label: str) -> None:
        self.client, self.every, self.label = client, every, label
        self.samples: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.after = 0
        self.coming: set[str] = set()
        self.held: set[str] = set()
        self.surge_at: float | None = None

    async def look(self) -> dict[str, Any]:
        t = time.time()
        demand, machines = await asyncio.gather(self.client.pool_demand(POOL), self.client.machines(POOL))
        while batch := await self.client.all_events(after=self.after, limit=1000):
            self.after = batch[-1]["id"]
            for e in map(_epoch_event, batch):
                self.events.append(e)
                if e["kind"] == "machine.lifecycle":
                    step = e["reason"]
                    if step == "provisioning":
                        self.coming.add(e["machine"])
                        self.held.add(e["machine"])
                    elif step in ("ready", "destroyed"):
                        self.coming.discard(e["machine"])
                        if step == "destroyed":
                            self.held.discard(e["machine"])
            if len(batch) < 1000:
                break
        status = Counter(m["status"] for m in machines)
        sample = {"t": t, "queued": demand["queued"], "busy": demand["busy"], "serving": status["ready"] + status["busy"],
                  "booting": len(self.coming), "held": len(self.held), "drained": status["drained"],
                  "target": demand["target"]}
        self.samples.append(sample)
        return sample

    async def run(self) -> None:
        said = 0.0
        while True:
            t0 = time.monotonic()
            s = await self.look()
            if self.surge_at is not None and t0 - said >= 5:
                said = t0
                progress.print(f"  {self.label}: t+{s['t'] - self.surge_at:5.1f}s  queued {s['queued']:3d}  "
                               f"busy {s['busy']:3d}  serving {s['serving']:3d}  booting {s['booting']:3d}  "
                               f"held {s['held']:3d}", highlight=False)
            await asyncio.sleep(max(0.0, self.every - (time.monotonic() - t0)))

    async def until(self, ok: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not (self.samples and ok(self.samples[-1])):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.label}: no {what} within {timeout:g} s (last: {self.samples[-1:]})")
            await asyncio.sleep(self.every / 2)


async def local_pool(kind: str, args: argparse.Namespace, workdir: Path, ready_time: float) -> dict[str, Any]:
    """One pool, static or autoscaled, from a fresh server to the surge's end (autoscaled: and
    back at its floor); everything it started stopped before it returns."""
    from deskfleet.client import AsyncClient

    n = args.max
    floor = n if kind == "static" else args.min
    policy = {"min": floor, "max": n, "provider": "here", "warm": {"min": 0, "max": 0}, "ready_time": ready_time,
              "scale_in": {"stabilization": args.stabilization, "drain_timeout": 120}}
    server = LocalServer(workdir / kind, tick=args.controller_tick)
    SERVERS.append(server)
    sampler: asyncio.Task[None] | None = None
    try:
        async with AsyncClient(server.url, timeout=60) as client:
            await server.healthy(client)
            await client.put_pool(POOL, allow_wait_for_capacity=True)
            await client.put_pool_policy(POOL, policy, version=0, comment=f"bench/autoscale.py, {kind}")
            watch = Watch(client, args.sample, f"local {kind}")
            sampler = asyncio.create_task(watch.run())
            progress.print(f"local {kind}: policy {json.dumps(policy)}; waiting for {floor} machines", highlight=False)
            t0 = time.time()
            await watch.until(lambda s: s["serving"] >= floor and s["booting"] == 0, 240, f"{floor} machines ready")
            progress.print(f"local {kind}: {floor} machines ready after {time.time() - t0:.1f} s", highlight=False)
            await asyncio.sleep(args.settle)
            runs_n = args.surge_factor * n
            watch.surge_at = surge_at = time.time()
            made = await client.submit_many([{"automation": "sim.work", "input": {"key": f"{kind}-{i}",
                                                                                  "seconds": args.run_seconds}}
                                             for i in range(runs_n)])
            submitted = time.time() - surge_at
            ids = [r["run"]["id"] for r in made]
            progress.print(f"local {kind}: surge of {runs_n} runs of {args.run_seconds:g} s submitted in "
                           f"{submitted * 1000:.0f} ms", highlight=False)
            deadline = time.monotonic() + 60 + 3 * runs_n * args.run_seconds
            while True:
                states = {r["id"]: r["state"] for r in await client.every_run(pool=POOL)}
                if all(states.get(i) in FINAL for i in ids):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"local {kind}: the surge did not finish: {Counter(states.values())}")
                await asyncio.sleep(1.0)
            done_at = time.time()
            progress.print(f"local {kind}: surge done after {done_at - surge_at:.1f} s", highlight=False)
            if kind == "autoscaled":
                await watch.until(lambda s: s["held"] <= floor and s["booting"] == 0 and s["serving"] == floor,
                                  args.stabilization + 180, "return to the floor")
                progress.print(f"local {kind}: back at the floor {time.time() - done_at:.1f} s after the surge's "
                               f"end; watching {args.after:g} s more", highlight=False)
            await asyncio.sleep(args.after)  # anything more created or destroyed (flapping) shows here
            sampler.cancel()
            await watch.look()
            runs = await _runs(client, ids)
    finally:
        if sampler is not None:
            sampler.cancel()
        left = await server.shutdown()
        SERVERS.remove(server)
        if left:
            progress.print(f"[red]local {kind}: agents still alive after power-off, killed: {left}[/]")
    return {"kind": kind, "policy": policy, "surge_at": surge_at, "submit_s": submitted, "runs": runs,
            "events": watch.events, "samples": watch.samples, "agents_left_running": left}


async def _runs(client: Any, ids: list[str]) -> list[dict[str, Any]]:
    """Each run: created, its first attempt's assignment and machine, finished."""
    sem = asyncio.Semaphore(8)

    async def one(run_id: str) -> dict[str, Any]:
        async with sem:
            run, attempts = await asyncio.gather(client.run(run_id), client.attempts(run_id))
        first = min(attempts, key=lambda a: a["number"]) if attempts else None
        return {"id": run_id, "state": run["state"], "created": scale.epoch(run["created_at"]),
                "assigned": scale.epoch(first["assigned_at"]) if first else None,
                "machine": first["machine"] if first else None, "attempts": len(attempts),
                "ended": scale.epoch(run["finished_at"]) if run["finished_at"] else None}

    return list(await asyncio.gather(*(one(i) for i in ids)))


async def local(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    static = await local_pool("static", args, workdir, ready_time=args.ready_time)
    boots = [e["data"]["since_created"] for e in static["events"]
             if e["kind"] == "machine.lifecycle" and e["reason"] == "ready"]
    measured = float(math.ceil(max(boots))) if boots and args.measure_ready_time else args.ready_time
    progress.print(f"local: the static pool's {len(boots)} boots took {min(boots):.1f}-{max(boots):.1f} s; "
                   f"the autoscaled policy's ready_time: {measured:g} s", highlight=False)
    auto = await local_pool("autoscaled", args, workdir, ready_time=measured)
    out = _both(auto, static, cap=args.max, floor=args.min, unit=1.0)
    for part in (out["autoscaled"], out["static"], out["ratios"]):
        part.pop("machine_hours_first_hour")  # a surge of a minute: an hour says nothing here
    return out


def _both(auto: dict[str, Any], static: dict[str, Any], *, cap: int, floor: int, unit: float) -> dict[str, Any]:
    a = figures(auto["events"], auto["runs"], surge_at=auto["surge_at"], floor=floor, cap=cap, window=None)
    s = figures(static["events"], static["runs"], surge_at=static["surge_at"], floor=cap, cap=cap,
                window=a["window_s"] if a["window_s"] is not None else None)
    s["back_at_floor_s"] = s["back_at_floor_after_last_run_s"] = None  # its floor is its size
    if s["window_s"] is None:  # the autoscaled pool never came back: the static pool over its own surge
        s["window_s"] = s["surge_done_s"]
        s["machine_seconds"] = cap * s["window_s"] if s["window_s"] is not None else None
    out: dict[str, Any] = {"ratios": ratios(a, s), "time_unit_s": unit}
    for name, raw, fig in (("autoscaled", auto, a), ("static", static, s)):
        t0 = raw["surge_at"]
        out[name] = {**fig, "policy": raw["policy"], "submit_s": raw.get("submit_s"),
                     "agents_left_running": raw.get("agents_left_running"),
                     "samples": [[round(x["t"] - t0, 3), x["queued"], x["busy"], x["serving"], x["booting"], x["held"]]
                                 for x in raw["samples"]],
                     "waits_s": sorted(round(r["assigned"] - r["created"], 3) for r in raw["runs"] if r["assigned"])}
    return out


# == fake: the controller on a fake clock ============================================================


T0 = 1_800_000_000.0  # a fake clock's start (08:00 UTC)


class FakeFleet:
    """The pool controller against a real SQLite store and the fake provider, on a fake clock.

    As tests/integration/test_controller.py's ``World``: a machine running for ``enrol``
    seconds has its agent enrolled and connected; one destroyed is disconnected; a run
    assigned starts at once and succeeds ``run_seconds`` later; the scheduler is asked
    after every change, the controller every ``tick`` seconds."""

    LEASE = 86_400.0  # no heartbeats here: leases must not lapse

    def __init__(self, path: Path, policy: dict[str, Any], *, provisioning: float, boot: float, enrol: float,
                 tick: float, run_seconds: float, sample: float) -> None:
        from deskfleet.fleet.controller import Controller
        from deskfleet.models import AutomationSpec, Pool
        from deskfleet.pools import PoolPolicy
        from deskfleet.providers import FakeProvider
        from deskfleet.store import open_store
        from deskfleet.store.runner import StoreRunner

        self.now = T0
        self.spec = AutomationSpec("sim.work", "1", idempotent=True)
        self.store = open_store(f"sqlite:///{path}", sqlite_synchronous="NORMAL")
        self.store.put_pool(Pool(POOL, allow_wait_for_capacity=True), T0)
        self.store.put_automations([self.spec], T0)
        self.store.put_pool_policy(POOL, PoolPolicy.model_validate(policy).model_dump(mode="json"),
                                   expected_version=0, now=T0)
        self.fake = FakeProvider(clock=lambda: self.now, boot_latency=boot, provisioning_latency=provisioning,
                                 name="fake")
        self.controller = Controller(self.store, StoreRunner(self.store), {"fake": self.fake}, leads=lambda: True,
                                     clock=lambda: self.now, tick=tick, ready_time=provisioning + boot + enrol)
        self.enrol_s, self.tick, self.run_seconds, self.every = enrol, tick, run_seconds, sample
        self.next_tick, self.next_sample = T0 + tick, T0
        self.ending: dict[int, tuple[float, str]] = {}  # attempt → (when it ends, its machine)
        self.samples: list[dict[str, Any]] = []
        self.at_provider: list[Any] = []  # the provider's machines, not gone, at the end of the last step
        self.changed = False

    def close(self) -> None:
        self.store.close()

    async def advance(self, until: Callable[[], bool], limit: float, what: str, dt: float = 1.0) -> None:
        """Time passes, a second at a time, until ``until()`` holds."""
        from deskfleet.fleet.controller import GONE

        deadline = self.now + limit
        while not until():
            if self.now > deadline:
                raise RuntimeError(f"fake: no {what} within {limit:g} s of fake time")
            self.now += dt
            await self._enrol()
            self._finish_due()
            if self.now >= self.next_tick - 1e-9:
                await self.controller.tick()
                self.next_tick += self.tick
                self.changed = True
            if self.changed:
                self._schedule()
            self.at_provider = [m for m in await self.fake.list(pool=POOL) if m.state not in GONE]
            if self.now >= self.next_sample - 1e-9:
                await self._sample()
                self.next_sample += self.every

    async def _enrol(self) -> None:
        from deskfleet.providers import ProviderState
        from deskfleet.store import Heartbeat

        at_provider = await self.fake.list(pool=POOL)
        known = {m.id: m for m in self.store.list_machines(POOL)}
        for m in at_provider:
            if m.state is ProviderState.RUNNING and m.name not in known and self.now - m.state_since >= self.enrol_s:
                self.store.enrol_machine(m.name, pool=POOL, labels={}, key_hash="h", now=self.now)
                self.store.connect_machine(m.name, boot_id="b", agent_version="bench", automations=[self.spec],
                                           labels=None, heartbeat=Heartbeat(m.name, self.now),
                                           lease_timeout=self.LEASE, now=self.now)
                self.changed = True
        up = {m.name for m in at_provider if m.state is ProviderState.RUNNING}
        for machine in known.values():
            if machine.connected and machine.id not in up:
                self.store.disconnect_machine(machine.id, self.now)

    def _finish_due(self) -> None:
        from deskfleet.models import Ending

        for attempt, (end, machine) in list(self.ending.items()):
            if end <= self.now + 1e-9:
                self.store.finish_attempt(attempt, machine, Ending.SUCCEEDED, output={}, detail="", now=self.now)
                del self.ending[attempt]
                self.changed = True

    def _schedule(self) -> None:
        from deskfleet.scheduler import Policy

        for a in self.store.schedule(Policy(), self.now, self.LEASE):
            self.store.attempt_start(a.attempt.id, a.attempt.machine_id, self.now)
            self.ending[a.attempt.id] = (self.now + self.run_seconds, a.attempt.machine_id)
        self.changed = False

    async def _sample(self) -> None:
        from deskfleet.fleet.controller import COMING

        demand = self.store.pool_demand(POOL, self.now, 300.0)
        status = self.store.count_machines(POOL)
        enrolled = self.store.list_machines(POOL)
        serving = sum(1 for m in enrolled if m.status in ("ready", "busy"))
        at_provider = self.at_provider
        known = {m.id for m in enrolled}  # an agent here is in service once it connects: no pre-flight
        self.samples.append({"t": self.now, "queued": demand.queued, "busy": status.get("busy", 0),
                             "serving": serving, "held": len(at_provider),
                             "booting": sum(1 for m in at_provider if m.state in COMING and m.name not in known)})

    def submit(self, n: int) -> list[str]:
        from deskfleet.models import RunSpec

        ids = [self.store.submit(RunSpec("sim.work", {"key": f"fake-{i}"}, pool=POOL), request_hash=None,
                                 now=self.now)[0].id for i in range(n)]
        self.changed = True
        return ids

    def serving(self) -> int:
        return sum(1 for m in self.store.list_machines(POOL) if m.status in ("ready", "busy"))

    def done(self, ids: list[str]) -> bool:
        return all((r := self.store.get_run(i)) is not None and r.state.value in FINAL for i in ids)

    def held(self) -> int:
        """Machines the provider holds (booting, idle, busy, draining: all paid for)."""
        return len(self.at_provider)

    def events(self) -> list[dict[str, Any]]:
        out, after = [], 0
        while batch := self.store.events(after_id=after, limit=1000):
            out += [{"at": e.at, "kind": e.kind, "machine": e.machine_id, "run": e.run_id, "reason": e.reason,
                     "data": e.data} for e in batch]
            after = batch[-1].id
        return out

    def runs(self, ids: list[str]) -> list[dict[str, Any]]:
        out = []
        for i in ids:
            run = self.store.get_run(i)
            assert run is not None
            attempts = self.store.list_attempts(i)
            first = min(attempts, key=lambda a: a.number) if attempts else None
            out.append({"id": i, "state": run.state.value, "created": run.created_at,
                        "assigned": first.assigned_at if first else None,
                        "machine": first.machine_id if first else None, "attempts": len(attempts),
                        "ended": run.finished_at})
        return out


async def fake_pool(kind: str, args: argparse.Namespace, workdir: Path, window: float | None) -> dict[str, Any]:
    n = args.max
    floor = n if kind == "static" else args.min
    ready_time = args.fake_provisioning + args.fake_boot + args.fake_enrol
    policy = {"min": floor, "max": n, "provider": "fake", "warm": {"min": 0, "max": 0}, "ready_time": ready_time,
              "scale_in": {"stabilization": args.fake_stabilization, "drain_timeout": 600}}
    db = workdir / f"fake-{kind}.db"
    for old in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        old.unlink(missing_ok=True)  # a fresh store, also in a --workdir used before
    w = FakeFleet(db, policy, provisioning=args.fake_provisioning, boot=args.fake_boot,
                  enrol=args.fake_enrol, tick=args.fake_tick, run_seconds=args.fake_run_seconds, sample=args.fake_sample)
    try:
        await w.advance(lambda: w.serving() >= floor, 10 * ready_time, f"{floor} machines ready")
        settle_until = w.now + 60
        await w.advance(lambda: w.now >= settle_until, 120, "settling")
        surge_at = w.now
        ids = w.submit(args.surge_factor * n)
        await w.advance(lambda: w.done(ids), 3 * args.surge_factor * n * args.fake_run_seconds, "end of the surge")
        if kind == "autoscaled":
            await w.advance(lambda: w.held() <= floor, args.fake_stabilization + 3600, "return to the floor")
        end = w.now + 120 if window is None else max(w.now, surge_at + window) + 60
        await w.advance(lambda: w.now >= end, 7200, "the end of the window")
        progress.print(f"fake {kind}: surge of {len(ids)} runs of {args.fake_run_seconds:g} s done "
                       f"{max(r['ended'] for r in w.runs(ids)) - surge_at:.0f} s after it (fake time)", highlight=False)
        return {"kind": kind, "policy": policy, "surge_at": surge_at, "runs": w.runs(ids), "events": w.events(),
                "samples": w.samples}
    finally:
        w.close()


async def fake(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    auto = await fake_pool("autoscaled", args, workdir, window=None)
    a = figures(auto["events"], auto["runs"], surge_at=auto["surge_at"], floor=args.min, cap=args.max, window=None)
    static = await fake_pool("static", args, workdir, window=a["window_s"])
    out = _both(auto, static, cap=args.max, floor=args.min, unit=60.0)
    out["settings"] = {"provisioning_s": args.fake_provisioning, "boot_s": args.fake_boot,
                       "enrol_s": args.fake_enrol, "tick_s": args.fake_tick, "run_seconds": args.fake_run_seconds}
    return out


# == output ============================================================================================


def _f(v: float | None, digits: int = 1, unit: float = 1.0) -> str:
    return "—" if v is None else f"{v / unit:,.{digits}f}"


def _x(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}x"


def show(result: dict[str, Any]) -> None:
    table = Table(title=f"A surge of {result['surge_factor']} x max runs on a pool of min {result['min']}, "
                        f"max {result['max']} (static: {result['max']} machines ready)")
    table.add_column("")
    parts = [(name, result[name]) for name in ("local", "fake") if name in result]
    for name, part in parts:
        u = "s" if part["time_unit_s"] == 1 else "min"
        for col in ("autoscaled", "static", "auto / static"):
            table.add_column(f"{name}: {col} ({u})" if col != "auto / static" else f"{name}: {col}", justify="right")

    def row(label: str, get: Callable[[dict[str, Any]], float | None], ratio: str | None = None,
            digits: int = 1, count: bool = False) -> None:
        cells = []
        for _, part in parts:
            u = 1.0 if count else part["time_unit_s"]
            cells += [_f(get(part["autoscaled"]), digits, u), _f(get(part["static"]), digits, u),
                      _x(part["ratios"].get(ratio)) if ratio else ""]
        table.add_row(label, *cells)

    row("machine boot, provisioning → ready, p50", lambda f: f["machine_boot_s"]["p50"])
    row("machine boot, max", lambda f: f["machine_boot_s"]["max"])
    row("surge → machines created (the controller's next pass)", lambda f: f["machines_created_s"])
    row("surge → first added machine serving", lambda f: f["first_added_serving_s"])
    row("surge → full capacity (max serving)", lambda f: f["full_capacity_s"])
    row("surge → last run finished", lambda f: f["surge_done_s"], "surge_done")
    row("queue wait p50", lambda f: f["queue_wait_s"]["p50"], "queue_wait_p50")
    row("queue wait p95", lambda f: f["queue_wait_s"]["p95"], "queue_wait_p95")
    row("queue wait max", lambda f: f["queue_wait_s"]["max"])
    row("last run finished → back at floor", lambda f: f["back_at_floor_after_last_run_s"])
    row("machine-time held over the window", lambda f: f["machine_seconds"], "machine_seconds")
    row("machines created for the surge", lambda f: f["machines_created_for_surge"], digits=0, count=True)
    if any("machine_hours_first_hour" in part["autoscaled"] for _, part in parts):
        row("machine-hours held in the hour from the surge", lambda f: f.get("machine_hours_first_hour"),
            "machine_hours_first_hour", digits=2, count=True)
    console.print(table)
    console.print("machine-time: machine-seconds (local) and machine-minutes (fake) held from the surge until the "
                  "autoscaled pool was back at its floor (the static pool: over a window of the same length)",
                  highlight=False)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [(name, result[name]) for name in ("local", "fake") if name in result]
    fig, axes = plt.subplots(len(parts), 1, figsize=(12.5, 4.2 * len(parts)), squeeze=False)
    colors = {"queued": "tab:red", "busy": "tab:orange", "serving": "tab:green", "booting": "tab:blue"}
    for ax, (name, part) in zip(axes[:, 0], parts, strict=True):
        u = part["time_unit_s"]
        a, s = part["autoscaled"], part["static"]
        for i, key in ((3, "serving"), (1, "queued"), (2, "busy"), (4, "booting")):
            ax.step([x[0] / u for x in a["samples"]], [x[i] for x in a["samples"]], where="post",
                    color=colors[key], label=f"{key} (autoscaled)",
                    **({"linewidth": 3, "alpha": 0.5} if key == "serving" else {}))
        for i, key in ((1, "queued"), (3, "serving")):
            ax.step([x[0] / u for x in s["samples"]], [x[i] for x in s["samples"]], where="post",
                    color=colors[key], linestyle=":", alpha=0.7, label=f"{key} (static pool)")
        ax.axvline(0, color="black", linewidth=1)
        ax.annotate("surge", (0, 1), xycoords=("data", "axes fraction"), xytext=(3, -12), textcoords="offset points")
        if a["back_at_floor_s"] is not None:
            ax.axvline(a["back_at_floor_s"] / u, color="grey", linestyle="--", linewidth=1)
            ax.annotate("back at floor", (a["back_at_floor_s"] / u, 1), xycoords=("data", "axes fraction"),
                        xytext=(3, -12), textcoords="offset points", color="grey")
        what = ("local provider: real agent processes" if name == "local"
                else f"fake provider: provisioning {part['settings']['provisioning_s']:g} s + boot "
                     f"{part['settings']['boot_s']:g} s + enrolment {part['settings']['enrol_s']:g} s, fake clock")
        ax.set_title(f"{what} — queue wait p95 x{part['ratios']['queue_wait_p95'] or 0:.2f}, "
                     f"machine-time x{part['ratios']['machine_seconds'] or 0:.2f} of a static pool", fontsize=10)
        ax.set_xlabel("seconds since the surge" if u == 1 else "minutes since the surge")
        ax.set_ylabel("runs / machines")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="max 6, 3 x max runs of 5 s (local)")
    ap.add_argument("--only", choices=["local", "fake"], default=None, help="one of the two measures")
    ap.add_argument("--min", type=int, default=2, help="the autoscaled pool's floor (default 2)")
    ap.add_argument("--max", type=int, default=None, help="machines at most, and the static pool's size (12; quick 6)")
    ap.add_argument("--surge-factor", type=int, default=None, help="runs in the surge, times max (4; quick 3)")
    ap.add_argument("--run-seconds", type=float, default=None, help="local: sim.work duration (8; quick 5)")
    ap.add_argument("--stabilization", type=float, default=10.0, help="local: scale_in.stabilization, s (10)")
    ap.add_argument("--controller-tick", type=float, default=1.0, help="local: deskfleet server --controller-tick (1)")
    ap.add_argument("--ready-time", type=float, default=20.0,
                    help="local: the policies' ready_time, s, until the static pool's boots are measured (20)")
    ap.add_argument("--no-measure-ready-time", dest="measure_ready_time", action="store_false",
                    help="local: keep --ready-time for the autoscaled policy too")
    ap.add_argument("--sample", type=float, default=0.5, help="local: seconds between two looks at the API (0.5)")
    ap.add_argument("--settle", type=float, default=3.0, help="local: seconds between the floor ready and the surge")
    ap.add_argument("--after", type=float, default=5.0, help="local: seconds watched after the end (flapping)")
    ap.add_argument("--fake-provisioning", type=float, default=30.0)
    ap.add_argument("--fake-boot", type=float, default=120.0)
    ap.add_argument("--fake-enrol", type=float, default=15.0, help="fake: machine running → its agent enrolled, s")
    ap.add_argument("--fake-tick", type=float, default=5.0, help="fake: the controller's tick (the server's default)")
    ap.add_argument("--fake-run-seconds", type=float, default=240.0)
    ap.add_argument("--fake-stabilization", type=float, default=300.0, help="fake: scale_in.stabilization (default)")
    ap.add_argument("--fake-sample", type=float, default=5.0)
    ap.add_argument("--workdir", type=Path, default=None, help="keep logs and databases here (default: a temp dir)")
    ap.add_argument("--live-code", action="store_true",
                    help="run the work tree's src/deskfleet as it is, not a snapshot taken at the start")
    return ap


def main() -> None:
    args = parser().parse_args()
    q = args.quick
    args.max = args.max or (6 if q else 12)
    args.surge_factor = args.surge_factor or (3 if q else 4)
    args.run_seconds = args.run_seconds or (5.0 if q else 8.0)
    signal.signal(signal.SIGTERM, scale._interrupt)  # unwinds like Ctrl-C, through every finally
    logging.basicConfig(level=logging.ERROR)  # the teardown's power-offs are counted below, not logged one by one
    result: dict[str, Any] = {"bench": "autoscale", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "command": shlex.join([".venv/bin/python", "bench/autoscale.py", *sys.argv[1:]]),
                              "host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
                              "loadavg_start": os.getloadavg(), "quick": q, "min": args.min, "max": args.max,
                              "surge_factor": args.surge_factor,
                              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    t = time.time()
    with contextlib.ExitStack() as stack:
        tmp = Path(args.workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="deskfleet-autoscale-")))
        tmp.mkdir(parents=True, exist_ok=True)
        result["deskfleet_code"] = "live work tree" if args.live_code else scale.snapshot_code(tmp / "code")
        try:
            if args.only in (None, "local"):
                result["local"] = asyncio.run(local(args, tmp))
                result["local"]["settings"] = {"controller_tick_s": args.controller_tick,
                                               "run_seconds": args.run_seconds, "stabilization_s": args.stabilization}
            if args.only in (None, "fake"):
                result["fake"] = asyncio.run(fake(args, tmp))
        finally:
            for server in list(SERVERS):  # the last resort: Ctrl-C or an error mid-way
                server.stop()
                left = asyncio.run(server.power_off())
                progress.print(f"stopped a server left running and its machines (agents killed: {left})")
    result["wall_s"] = time.time() - t
    result["loadavg_end"] = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    name = f"autoscale-{scale.stamp()}"
    (RESULTS / f"{name}.json").write_text(json.dumps(scale._clean(result), indent=1))
    plot(result, RESULTS / f"{name}.png")
    show(result)
    progress.print(f"{result['wall_s']:.0f} s; results: bench/results/{name}.json, plot: bench/results/{name}.png",
                   highlight=False)


if __name__ == "__main__":
    main()
