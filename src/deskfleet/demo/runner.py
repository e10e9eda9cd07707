"""The demo's moving parts: processes, workload, live view, the agent kill."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..client import ApiError, AsyncClient
from ..errors import DeskfleetError
from . import DemoConfig

MARKER = ".deskfleet-demo"
FINAL = ("succeeded", "failed", "cancelled", "timed_out")
NAMES = ("Ada Lovelace", "Alan Turing", "Grace Hopper", "Edsger Dijkstra", "Barbara Liskov",
         "Donald Knuth", "Frances Allen", "John Backus", "Leslie Lamport", "Radia Perlman")
NOTABLE = ("machine.quarantined", "machine.verified", "lease.stale_write_rejected", "attempt.stop_requested",
           "reconcile.done", "playbook.step", "attempt.ended")


@dataclass
class Submitted:
    run_id: str
    automation: str
    mrn: str
    cancel: bool = False


@dataclass
class Moment:
    at: float
    what: str


@dataclass
class DemoState:
    accepted: list[Submitted] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (what was asked, the API's answer)
    moments: list[Moment] = field(default_factory=list)
    feed: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    finished_in: float | None = None


class Demo:
    def __init__(self, config: DemoConfig) -> None:
        self.cfg = config
        self.out = config.out.resolve()
        self.console = Console()
        self.state = DemoState()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.agent_args: dict[str, list[str]] = {}
        self.port = config.port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.live = config.live if config.live is not None else sys.stdout.isatty()

    # -- the whole show ---------------------------------------------------------------------
    async def run(self) -> bool:
        from .report import build_report, print_summary, write_report

        self._prepare_dir()
        c = self.console
        c.print(f"[bold]deskfleet demo[/]: {self.cfg.machines} simulated desktops, {self.cfg.runs} runs, "
                f"faults '{self.cfg.faults}', seed {self.cfg.seed} → {self.out}")
        try:
            self._start_server()
            async with AsyncClient(self.url) as client:
                await self._wait_health(client)
                self._start_agents()
                await self._wait_machines(client)
                await self._submit_workload(client)
                await self._watch(client)
                runs, events = await self._collect(client)
                report = build_report(self.cfg, self.out, self.state, runs, events)
                await write_report(report, self.out, client)
        finally:
            self._stop_processes()
        print_summary(self.console, report, self.out)
        return report.ok

    def _prepare_dir(self) -> None:
        if self.out.exists() and any(self.out.iterdir()):
            if not (self.out / MARKER).exists():
                raise DeskfleetError(f"{self.out} exists and is not a demo output directory; choose another --out")
            shutil.rmtree(self.out)
        for sub in ("data", "agents", "logs", "screenshots"):
            (self.out / sub).mkdir(parents=True, exist_ok=True)
        (self.out / MARKER).write_text("written by deskfleet demo; safe to delete\n")

    # -- processes ------------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.out / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "deskfleet", "--log-format", "json", *args],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )

    def _start_server(self) -> None:
        self._spawn("server", [
            "server", "--port", str(self.port), "--data-dir", str(self.out / "data"),
            "--heartbeat-interval", "0.5", "--heartbeat-timeout", "3", "--stop-grace", "5",
            "--sqlite-synchronous", "NORMAL",
        ])

    def _start_agents(self) -> None:
        n, k = self.cfg.machines, max(1, min(self.cfg.agent_processes, self.cfg.machines))
        first = 1
        for i in range(k):
            count = n // k + (1 if i < n % k else 0)
            name = f"agents-{chr(ord('a') + i)}"
            self.agent_args[name] = [
                "agent", "--orchestrator", self.url, "--machine", "desk", "--sim", str(count),
                "--sim-first", str(first), "--sim-faults", self.cfg.faults, "--sim-seed", str(self.cfg.seed),
                "--sim-backend", str(self.out / "agents" / "ehr.db"), "--state-dir", str(self.out / "agents"),
                "--enrolment-token-file", str(self.out / "data" / "enrolment-token"),
                "--action-delay", str(self.cfg.action_delay),
            ]
            first += count
            self._spawn(name, self.agent_args[name])

    def _stop_processes(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()

    async def _wait_health(self, client: AsyncClient) -> None:
        deadline = time.monotonic() + 30
        while True:
            if self.procs["server"].poll() is not None:
                raise DeskfleetError(f"the orchestrator exited at start; see {self.out / 'logs' / 'server.log'}")
            with contextlib.suppress(DeskfleetError):
                await client.health()
                return
            if time.monotonic() > deadline:
                raise DeskfleetError("the orchestrator did not come up within 30s")
            await asyncio.sleep(0.1)

    async def _wait_machines(self, client: AsyncClient) -> None:
        deadline = time.monotonic() + 60
        while True:
            machines = await client.machines()
            ready = sum(1 for m in machines if m["status"] == "ready")
            if ready >= self.cfg.machines:
                self.console.print(f"  {ready} machines enrolled and ready")
                return
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise DeskfleetError(f"{name} exited at start; see {self.out / 'logs' / (name + '.log')}")
            if time.monotonic() > deadline:
                raise DeskfleetError(f"only {ready} of {self.cfg.machines} machines became ready")
            await asyncio.sleep(0.1)

    # -- workload ---------------------------------------------------------------------------------
    def _workload(self) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
        rng = random.Random(self.cfg.seed)
        created: list[str] = []
        out = []
        for i in range(self.cfg.runs):
            options: dict[str, Any] = {"deadline": 600, "progress_timeout": 6, "attempt_timeout": 120,
                                       "idempotency_key": f"demo-{self.cfg.seed}-{i}"}
            roll = rng.random()
            if rng.random() < 0.15:
                options["session_key"] = rng.choice(["clinic-a", "robot2"])
            if rng.random() < 0.1:
                options["priority"] = 5
            if i < 3 or roll < 0.6 or not created:
                mrn = f"D{self.cfg.seed}-{i:05d}"
                created.append(mrn)
                dob = f"{rng.randint(1930, 2020)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
                out.append(("ehr.create_patient", {"mrn": mrn, "name": rng.choice(NAMES), "dob": dob}, options))
            elif roll < 0.88:
                out.append(("ehr.lookup_patient", {"mrn": rng.choice(created)}, options))
            else:
                out.append(("ehr.export_summary", {"mrn": rng.choice(created)}, options))
        return out

    async def _submit_workload(self, client: AsyncClient) -> None:
        rng = random.Random(self.cfg.seed + 1)
        work = self._workload()
        cancel_at = set(rng.sample(range(len(work) // 2, len(work)), min(2, len(work) // 2))) if len(work) >= 8 else set()
        sem = asyncio.Semaphore(16)

        async def one(i: int, automation: str, data: dict[str, Any], options: dict[str, Any]) -> None:
            async with sem:
                run = await client.submit(automation, data, **options)
            self.state.accepted.append(Submitted(run["id"], automation, data.get("mrn", ""), i in cancel_at))

        await asyncio.gather(*(one(i, *w) for i, w in enumerate(work)))
        # Requests that must be refused with a clear message, and nothing written.
        for what, automation, data, options in (
            ("an automation nobody offers", "ehr.discharge_patient", {"mrn": "X"}, {}),
            ("input that fails the schema", "ehr.create_patient", {"mrn": "bad mrn!", "name": "X"}, {}),
            ("labels no machine has", "ehr.lookup_patient", {"mrn": "X"}, {"labels": {"site": "mars"}}),
        ):
            try:
                await client.submit(automation, data, **options)
                self.state.rejected.append((what, "accepted (unexpected!)"))
            except ApiError as exc:
                self.state.rejected.append((what, f"{exc.status} {exc.error}: {exc.message}"))
        for s in self.state.accepted:
            if s.cancel:
                with contextlib.suppress(ApiError):
                    await client.cancel(s.run_id)
                self._moment(f"cancelled {s.run_id} while queued")
        self.console.print(f"  {len(self.state.accepted)} runs accepted, {len(self.state.rejected)} bad requests refused")

    def _moment(self, what: str) -> None:
        self.state.moments.append(Moment(time.time(), what))
        self.state.feed.append(f"[bold magenta]{time.strftime('%H:%M:%S')} {what}[/]")

    # -- watching -----------------------------------------------------------------------------------
    async def _watch(self, client: AsyncClient) -> None:
        total = len(self.state.accepted)
        killed_at: float | None = None
        restarted = False
        cancelled_running = False
        after = 0
        progress = Progress(TextColumn("runs"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        task = progress.add_task("runs", total=total)
        deadline = time.monotonic() + self.cfg.timeout
        live = Live(console=self.console, refresh_per_second=4, transient=False) if self.live else None
        last_line = 0.0
        with live if live is not None else contextlib.nullcontext():
            while True:
                summary = await client.summary()
                machines = await client.machines()
                events = await client.all_events(after=after, limit=500)
                if events:
                    after = events[-1]["id"]
                    self._feed(events)
                done = sum(summary["runs"].get(s, 0) for s in FINAL)
                progress.update(task, completed=done)
                if live is not None:
                    live.update(self._view(progress, summary, machines))
                elif time.monotonic() - last_line > 2:
                    last_line = time.monotonic()
                    self.console.print(f"  {done}/{total} runs final; " +
                                       ", ".join(f"{k} {v}" for k, v in sorted(summary["runs"].items())))
                if done >= total:
                    self.state.finished_in = time.time() - self.state.started
                    break
                if time.monotonic() > deadline:
                    self._moment(f"gave up waiting after {self.cfg.timeout:g}s")
                    break
                if not cancelled_running and done >= total * 0.15:
                    running = await client.runs(state=["running"], limit=1)
                    if running["runs"]:
                        rid = running["runs"][0]["id"]
                        await client.cancel(rid)
                        self._moment(f"cancelled {rid} while running: its agent is told to stop")
                        cancelled_running = True
                if self.cfg.kill_agent and killed_at is None and done >= total * 0.3 and len(self.procs) > 2:
                    name = sorted(n for n in self.procs if n.startswith("agents-"))[-1]
                    self.procs[name].kill()
                    self.procs[name].wait()
                    killed_at = time.monotonic()
                    self._moment(f"SIGKILLed agent process {name}: its machines go silent mid-run")
                if killed_at is not None and not restarted and time.monotonic() - killed_at > 5:
                    name = sorted(n for n in self.procs if n.startswith("agents-"))[-1]
                    self._spawn(name, self.agent_args[name])
                    restarted = True
                    self._moment(f"restarted {name}: its machines reconnect and must re-prove their state")
                await asyncio.sleep(0.5)

    def _feed(self, events: list[dict[str, Any]]) -> None:
        for e in events:
            kind = e["kind"]
            if kind not in NOTABLE:
                continue
            reason, m = e.get("reason") or "", e.get("machine") or ""
            if kind == "attempt.ended" and reason == "succeeded":
                continue
            if kind == "playbook.step":
                d = e["data"]
                text = f"{m}: {d.get('from_state')} → playbook {d.get('playbook')} → {d.get('to_state')}"
            elif kind == "attempt.ended":
                text = f"{m}: attempt {e['attempt']} ended {reason}: {(e['data'].get('detail') or '')[:70]}"
            elif kind == "reconcile.done":
                found = e["data"].get("effect_found")
                text = f"{m}: reconcile check — effect {'already there' if found else 'not found, running again'}"
            else:
                text = f"{m}: {kind.split('.', 1)[1].replace('_', ' ')} {reason[:80]}"
            self.state.feed.append(f"{e['at'][11:19]} {text}")
        del self.state.feed[:-12]

    def _view(self, progress: Progress, summary: dict[str, Any], machines: list[dict[str, Any]]) -> Group:
        table = Table("machine", "status", "run", "done", "mem MB", "session", "note", expand=True)
        colours = {"ready": "green", "busy": "cyan", "quarantined": "yellow", "offline": "red"}
        for m in machines:
            col = colours.get(m["status"], "white")
            table.add_row(m["id"], f"[{col}]{m['status']}[/]", (m.get("current_run") or "")[-10:],
                          str(m["runs_completed"]), f"{m['resources'].get('memory_mb', 0):.0f}",
                          m.get("session_key") or "", (m.get("quarantine_reason") or "")[:48])
        counts = "  ".join(f"{k}: {v}" for k, v in sorted(summary["runs"].items()))
        return Group(progress, Panel(counts, title="runs"), table,
                     Panel("\n".join(self.state.feed[-12:]) or "…", title="what the orchestrator saw"))

    async def _collect(self, client: AsyncClient) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        runs = await client.every_run()
        events = await client.every_event()
        return runs, events


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
