"""deskfleet in the side-by-side: a real ``deskfleet server`` and one agent process per machine.

The server runs with its default settings (SQLite, synchronous=FULL, heartbeats every 2 s,
lease lost after 10 s of silence), started by ``bench/core.py``'s :class:`Server`. Each
machine is its own ``deskfleet agent --sim 1`` process, so one SIGKILL takes exactly one
machine, as it does for the peers' one-process workers; a replacement machine is a new agent
with a new name that enrols with the token, as a freshly provisioned VM would. Runs are
submitted over HTTP with :class:`deskfleet.client.AsyncClient`, with the API's defaults
(``sim.work`` is not idempotent and has a reconcile check, so a lost attempt is retried only
after that check).

The harness learns what happens from the global event feed (``GET /v1/events``), polled a
few times a second: ``run.state`` → ``running`` is the moment the work starts on a machine,
``reconcile.started`` a retry's check, ``attempt.ended`` the machine free again, and the
run's final state its outcome. (Those polls are a little extra work for the server that the
peers' harness sides do not impose on Redis or PostgreSQL: an event page every 0.2 s.)

**Throughput section** (empty runs, ``sim.noop`` — the agent runs it as any automation: no
pre-flight, since it needs no screen state, one progress step, the result): one run at a time
by ``AsyncClient.submit`` (``POST /v1/runs``) then ``AsyncClient.run(id, wait=…)`` until it
finished; the backlog by ``AsyncClient.submit_many`` — ``POST /v1/runs:batch``, 1,000 runs a
request, one request after the other, each run with ``queue_timeout`` one hour so that none
times out in the queue. Started = the run's ``running`` event, finished = its ``succeeded``
event (the server's own stamps). The server's CPU time over the backlog is noted too
(``server_cpu_ms_per_run``): is the drain rate the server's limit or the agents'?
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import statistics
import sys
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import core  # bench/core.py: the Server helper

from deskfleet.client import AsyncClient
from peers.workload import FAILED, PENDING, SUCCEEDED, Busy, Job, Side, Start, pct

_FINAL = {"succeeded": SUCCEEDED, "failed": FAILED, "timed_out": FAILED, "cancelled": FAILED}


def _epoch(at: str) -> float:
    return datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()


class DeskfleetSide(Side):
    name = "deskfleet"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.server: core.Server | None = None
        self.client: AsyncClient | None = None
        self._poller: asyncio.Task[None] | None = None
        self._cursor = 0
        self._key_of: dict[str, str] = {}  # run id → key
        self._running: dict[int, Busy] = {}  # attempt id → the work it is doing
        self._starts: list[Start] = []
        self._final: dict[str, str] = {}  # run id → outcome
        self._early: list[dict[str, Any]] = []  # events of runs whose submit has not returned yet
        self._noop_key_of: dict[str, str] = {}  # run id → key, the throughput section's runs
        self._running_at: dict[str, float] = {}  # run id → its first running event, every run
        self._final_at: dict[str, float] = {}  # run id → its final state's event, every run
        self._assigned: dict[str, tuple[float, str]] = {}  # run id → its first assignment: when, which machine
        self.poll_errors = 0
        self.last_poll_error = ""

    async def setup(self) -> None:
        self.server = core.Server(self.workdir, "FULL")  # "FULL" is the server's default
        self.client = AsyncClient(self.server.url, timeout=60)
        await self.server.ready(self.client)
        self._poller = asyncio.create_task(self._poll())

    def machine_command(self, name: str) -> tuple[list[str], dict[str, str]]:
        assert self.server is not None
        prefix, number = name.rsplit("-", 1)
        return [sys.executable, "-m", "deskfleet", "--log-level", "warning", "agent",
                "--orchestrator", self.server.url, "--pack", "simehr", "--desktop", "sim", "--machine", prefix,
                "--count", "1", "--first", str(int(number)), "--enrolment-token", self.server.token,
                "--state-dir", str(self.workdir / "agents"), "--sim-backend", str(self.backend_path),
                "--action-delay", "0", "--screenshots", "none"], {}

    async def wait_ready(self, names: list[str], timeout: float) -> None:
        assert self.client is not None
        await core.wait_machines(self.client, len(names), timeout=timeout)

    async def submit(self, job: Job) -> None:
        assert self.client is not None
        run = await self.client.submit("sim.work", {"key": job.key, "seconds": job.seconds})
        self._key_of[run["id"]] = job.key
        early, self._early = self._early, []
        for e in early:  # seen before we knew which key the run is
            self._on_event(e)

    single_path = "AsyncClient.submit (POST /v1/runs), then AsyncClient.run(id, wait=30)"
    batch_path = "AsyncClient.submit_many: POST /v1/runs:batch, 1,000 runs a request"

    async def run_noop(self, key: str) -> None:
        assert self.client is not None
        run = await self.client.submit("sim.noop", {"value": key})
        self._noop_key_of[run["id"]] = key
        done = await self.client.run(run["id"], wait=30)
        if done["state"] != "succeeded":
            raise RuntimeError(f"deskfleet: empty run {key} ended {done['state']}")

    async def submit_noops(self, keys: list[str]) -> None:
        assert self.client is not None
        answers = await self.client.submit_many(
            [{"automation": "sim.noop", "input": {"value": k}, "queue_timeout": 3600} for k in keys])
        for a in answers:
            if a["status"] != "created":
                raise RuntimeError(f"deskfleet: batch submit answered {a}")
            self._noop_key_of[a["run"]["id"]] = keys[a["index"]]

    async def noops_done(self) -> int:
        return sum(1 for run in self._noop_key_of if run in self._final_at)

    async def noop_starts(self) -> dict[str, float]:
        while await self._catch_up():
            pass
        return {key: self._running_at[run] for run, key in self._noop_key_of.items() if run in self._running_at}

    async def noop_finishes(self, keys: list[str]) -> dict[str, float]:
        while await self._catch_up():
            pass
        wanted = set(keys)
        return {key: self._final_at[run] for run, key in self._noop_key_of.items()
                if key in wanted and run in self._final_at}

    def throughput_notes(self, keys: list[str]) -> dict[str, Any]:
        """Where a backlog run's time went on its machine, from the server's events (ms, p50 and
        p90): assigned → running (the assignment to the agent and its start handshake),
        running → succeeded (the empty run, its progress step and its result), and succeeded →
        the machine's next assignment (the scheduler's turn)."""
        wanted = set(keys)
        runs = [r for r, k in self._noop_key_of.items() if k in wanted and r in self._assigned
                and r in self._running_at and r in self._final_at]
        phases: dict[str, list[float]] = {"assigned → running": [], "running → succeeded": [],
                                          "succeeded → next assigned, same machine": []}
        by_machine: dict[str, list[tuple[float, float]]] = {}
        for r in runs:
            at, machine = self._assigned[r]
            phases["assigned → running"].append(self._running_at[r] - at)
            phases["running → succeeded"].append(self._final_at[r] - self._running_at[r])
            by_machine.setdefault(machine, []).append((at, self._final_at[r]))
        for spans in by_machine.values():
            spans.sort()
            phases["succeeded → next assigned, same machine"] += [b[0] - a[1] for a, b in itertools.pairwise(spans)]
        return {"backlog_phases_ms": {
            name: {"p50": 1000 * statistics.median(v), "p90": 1000 * pct(v, 90), "n": len(v)}
            for name, v in phases.items() if v}}

    def server_cpu(self) -> float | None:
        return None if self.server is None else self.server.cpu()

    def end_throughput(self) -> None:
        self._early.clear()  # the empty runs' events that came before their submit returned

    async def busy(self) -> list[Busy]:
        return list(self._running.values())

    async def outcomes(self) -> dict[str, str]:
        return {key: self._final.get(run, PENDING) for run, key in self._key_of.items()}

    async def starts(self) -> list[Start]:
        await self._catch_up()
        return list(self._starts)

    async def teardown(self) -> None:
        try:
            if self._poller is not None:
                self._poller.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._poller
            if self.client is not None:
                await self.client.aclose()
        finally:
            if self.server is not None:
                self.server.stop()  # SIGTERM, SIGKILL after 10 s

    def versions(self) -> dict[str, str]:
        return {"deskfleet": version("deskfleet")}

    def settings(self) -> dict[str, Any]:
        return {"store": "SQLite (synchronous=FULL)", "heartbeat_interval_s": 2.0, "heartbeat_timeout_s": 10.0,
                "server": "default settings", "run options": "API defaults (max_attempts 3)",
                "agents": "one process per machine (--sim 1)",
                "harness event-feed errors": self.poll_errors, "last event-feed error": self.last_poll_error}

    # -- the event feed ---------------------------------------------------------------------

    async def _poll(self) -> None:
        while True:
            try:
                n = await self._catch_up()
            except Exception as exc:
                n = 0  # a slow answer under load: try again (and say so at the end)
                self.poll_errors += 1
                self.last_poll_error = repr(exc)
            if n < 1000:
                await asyncio.sleep(0.2)

    async def _catch_up(self) -> int:
        assert self.client is not None
        batch = await self.client.every_event(after=self._cursor)
        for e in batch:
            self._on_event(e)
        if batch:
            self._cursor = batch[-1]["id"]
        return len(batch)

    def _on_event(self, e: dict[str, Any]) -> None:
        run = e.get("run")
        if run is None:
            return
        if e["kind"] == "run.state":
            if e.get("to_state") == "assigned":
                self._assigned.setdefault(run, (_epoch(e["at"]), e.get("machine") or ""))
            elif e.get("to_state") == "running":
                self._running_at.setdefault(run, _epoch(e["at"]))
            elif e.get("to_state") in _FINAL:
                self._final_at.setdefault(run, _epoch(e["at"]))
        if run in self._noop_key_of:
            return  # the throughput section's: nothing the failover measures need
        key = self._key_of.get(run)
        if key is None:
            self._early.append(e)
            return
        kind, attempt, machine = e["kind"], e.get("attempt"), e.get("machine") or ""
        if kind == "run.state" and e.get("to_state") == "running":
            at = _epoch(e["at"])
            self._starts.append(Start(key=key, machine=machine, at=at, kind="run"))
            if attempt is not None:
                self._running[attempt] = Busy(key=key, machine=machine, started_at=at)
        elif kind == "reconcile.started":
            self._starts.append(Start(key=key, machine=machine, at=_epoch(e["at"]), kind="reconcile"))
        elif kind == "attempt.ended" and attempt is not None:
            self._running.pop(attempt, None)
        if kind == "run.state" and e.get("to_state") in _FINAL:
            self._final[run] = _FINAL[e["to_state"]]
