"""The demo's moving parts: processes, workload in waves, live view, the agent kill.

What differs between packs and desktops (agent command line, workload, faults, the
double-effect check) is the pack's demo hook (:func:`.plan.demo_for`); this module drives any.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psutil
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..client import ApiError, AsyncClient
from ..errors import DeskfleetError
from ..procs import descendants, kill_all
from .config import DemoConfig
from .plan import BURST_POOL, Work, data_dir, demo_for
from .state import DemoState, Moment, Submitted

MARKER = ".deskfleet-demo"
FINAL = ("succeeded", "failed", "cancelled", "timed_out")
NOTABLE = ("machine.quarantined", "machine.verified", "lease.stale_write_rejected", "attempt.stop_requested",
           "reconcile.done", "playbook.step", "verify.playbook.step", "attempt.ended")
#: seconds a SIGKILLed agent process stays down before it is started again
KILLED_FOR = 5.0
#: the most machines the burst pool may have
BURST_MAX = 3


class Demo:
    def __init__(self, config: DemoConfig) -> None:
        self.cfg = config
        self.out = config.out.resolve()
        self.console = Console()
        self.state = DemoState()
        self.pack_ref, self.pack_name, self.desktops = demo_for(config, self.out)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.agent_args: dict[str, list[str]] = {}
        self.machines_of: dict[str, list[str]] = {}  # agent process → its machines
        self.port = config.port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.live = config.live if config.live is not None else sys.stdout.isatty()
        self.total = 0  # runs planned, over every wave
        self._chaos = _Chaos()
        self._deadline = 0.0
        self._after = 0  # the last event id fed to the live view
        self._progress = Progress(TextColumn("runs"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self._task = self._progress.add_task("runs", total=0)
        self._view_live: Live | None = None
        self._last_line = 0.0
        self._machines: list[dict[str, Any]] = []  # as of the last tick

    # -- the whole show ---------------------------------------------------------------------
    async def run(self) -> bool:
        from .report import build_report, print_summary, write_report

        self._prepare_dir()
        prepare = getattr(self.desktops, "prepare", None)
        if prepare is not None:
            prepare()  # the pack's app data on the demo's machines (a database to create…)
        c = self.console
        c.print(f"[bold]deskfleet demo[/]: {self.cfg.machines} {self.desktops.noun}, {self.cfg.runs} runs, "
                f"faults '{self.cfg.faults}', seed {self.cfg.seed} → {self.out}")
        try:
            self._start_server()
            async with AsyncClient(self.url) as client:
                await self._wait_health(client)
                # The app's accounts go in the vault first: the agents log in from there.
                await client.put_accounts(self.desktops.accounts(), app=self.pack_name,
                                          max_sessions=self.desktops.max_sessions)
                self._start_agents()
                await self._wait_machines(client)
                await self._workload(client)
                runs, events = await self._collect(client)
                report = build_report(self.cfg, self.out, self.state, runs, events, self.desktops)
                await write_report(report, self.out, client)
        finally:
            self._stop_processes()
            close = getattr(self.desktops, "close", None)
            if close is not None:
                close()
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
        burst = []
        if getattr(self.desktops, "burst", None) is not None:
            # The burst pool's machines: each a `deskfleet agent` process the server's local
            # provider starts (and stops) as the pool controller decides.
            agent = shlex.join([
                sys.executable, "-m", "deskfleet", "--log-format", "json", "agent", "--orchestrator", self.url,
                "--pack", self.pack_ref, "--desktop", self.cfg.desktop, "--machine", "{name}", "--exact-name",
                "--pool", BURST_POOL, "--state-dir", str(self.out / "agents"), "--data-dir", str(data_dir(self.out)),
                "--enrolment-token-file", str(self.out / "data" / "enrolment-token"), *self.desktops.agent_args()])
            burst = ["--provider", f"{BURST_POOL}=local:{agent}", "--controller-tick", "0.5"]
        self._spawn("server", [
            "server", "--port", str(self.port), "--data-dir", str(self.out / "data"),
            "--heartbeat-interval", "0.5", "--heartbeat-timeout", "3", "--stop-grace", "5",
            "--sqlite-synchronous", "NORMAL", *burst,
        ])

    def _start_agents(self) -> None:
        n, k = self.cfg.machines, max(1, min(self.cfg.agent_processes, self.cfg.machines))
        first = 1
        for i in range(k):
            count = n // k + (1 if i < n % k else 0)
            name = f"agents-{chr(ord('a') + i)}"
            self.agent_args[name] = [
                "agent", "--orchestrator", self.url, "--pack", self.pack_ref, "--desktop", self.cfg.desktop,
                "--machine", "desk", "--count", str(count), "--first", str(first),
                "--state-dir", str(self.out / "agents"), "--data-dir", str(data_dir(self.out)),
                "--enrolment-token-file", str(self.out / "data" / "enrolment-token"),
                *self.desktops.agent_args()]
            width = max(2, len(str(first + count - 1)))  # as the agent names them: desk-01…
            self.machines_of[name] = [f"desk-{j:0{width}d}" for j in range(first, first + count)]
            first += count
            self._spawn(name, self.agent_args[name])

    def _stop_processes(self) -> None:
        # What the agents started (X servers, apps) is collected first: an agent that has to
        # be killed below leaves them behind.
        started = [p for proc in self.procs.values() for p in descendants(proc.pid)]
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
        kill_all(started, wait=5)

    def _kill_agent_process(self, name: str) -> int:
        """SIGKILL an agent process and what it started: its machines go dark at once, as
        when a VM dies (its X servers and apps would otherwise live on as orphans).
        Returns how many X servers went with it."""
        proc = self.procs[name]
        started = descendants(proc.pid)
        displays = 0
        for p in started:
            with contextlib.suppress(psutil.Error):
                displays += "Xvfb" in p.name()
        proc.kill()
        proc.wait()
        kill_all(started, wait=5)
        return displays

    def _kill_display(self) -> tuple[str, str] | None:
        """SIGKILL the X server of the first real desktop of the first agent process (the
        agent describes each machine's display in <state-dir>/machines/<name>.json)."""
        proc = self.procs.get("agents-a")
        if proc is None or proc.poll() is not None:
            return None
        mine = {p.pid: p for p in descendants(proc.pid)}
        for machine in self.machines_of.get("agents-a", []):
            try:
                described = json.loads((self.out / "agents" / "machines" / f"{machine}.json").read_text())
            except (OSError, ValueError):
                continue
            server = mine.get(described.get("display_pid") or -1)
            if server is None:
                continue
            with contextlib.suppress(psutil.Error):
                server.kill()
                return machine, str(described.get("display"))
        return None

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
        deadline = time.monotonic() + 90
        while True:
            machines = await client.machines()
            ready = sum(1 for m in machines if m["status"] == "ready")
            if ready >= self.cfg.machines:
                self.console.print(f"  {ready} machines enrolled and ready; watch them at {self.url}/ui/")
                return
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise DeskfleetError(f"{name} exited at start; see {self.out / 'logs' / (name + '.log')}")
            if time.monotonic() > deadline:
                raise DeskfleetError(f"only {ready} of {self.cfg.machines} machines became ready; "
                                     f"see {self.out / 'logs'}")
            await asyncio.sleep(0.1)

    # -- workload ---------------------------------------------------------------------------------
    async def _workload(self, client: AsyncClient) -> None:
        waves = self.desktops.waves()
        self.total = sum(len(w.work) for w in waves)
        self._progress.update(self._task, total=self.total)
        self._deadline = time.monotonic() + self.cfg.timeout
        with self._live_view():
            for number, wave in enumerate(waves):
                if number > 0:
                    if not await self._watch(client, until_final=True):
                        return
                    if wave.quiet_before:
                        # Machines still recovering (re-proving their state, logging in again)
                        # would not be idle long enough: the spell starts once all are ready.
                        await self._watch(client, until_settled=30)
                        self._moment(wave.why)
                        if self.cfg.desktop == "xvfb":
                            killed = self._kill_display()
                            if killed:
                                machine, display = killed
                                self._moment(f"killed the X server of {machine} (display {display}) between "
                                             "runs: its next pre-flight finds no screen and restarts the desktop",
                                             "display_killed", [machine])
                        await self._watch(client, for_seconds=wave.quiet_before)
                    self._moment(f"wave {number + 1}: {len(wave.work)} more runs")
                await self._submit(client, wave.work, refuse=number == 0)
            await self._watch(client, until_final=True)
            await self._burst(client)

    async def _burst(self, client: AsyncClient) -> None:
        """The autoscaling phase: a burst of runs for a pool with no machines, whose policy
        names the server's local provider. The pool controller makes machines for it (each a
        new `deskfleet agent` process), and retires them once the burst is over."""
        burst = getattr(self.desktops, "burst", None)
        if burst is None:
            return
        work = [(a, data, {**options, "pool": BURST_POOL}) for a, data, options in burst()]
        size = min(BURST_MAX, max(1, len(work) // 2))
        await client.put_pool(BURST_POOL, allow_wait_for_capacity=True,
                              description="the demo's autoscaling pool: machines only while there is work")
        await client.put_pool_policy(BURST_POOL, {
            "min": 0, "max": size, "provider": BURST_POOL, "warm": {"min": 0, "max": 0}, "ready_time": 20,
            "scale_in": {"stabilization": 3, "drain_timeout": 60}}, comment="deskfleet demo")
        self.total += len(work)
        self._progress.update(self._task, total=self.total)
        self._moment(f"burst: {len(work)} runs for pool '{BURST_POOL}', which has no machines; its policy "
                     f"allows {size}, made on demand through the local provider", "burst")
        await self._submit(client, work, refuse=False)
        if not await self._watch(client, until_final=True):
            return
        made = len({e["machine"] for e in await client.every_event()
                    if e["kind"] == "machine.lifecycle" and e["reason"] == "ready" and e["data"].get("pool") == BURST_POOL})
        self._moment(f"scale-out: {made} machines made for the burst ran its {len(work)} runs", "scaled_out")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            # Done when every machine made for the pool has been destroyed (the event, not the
            # machine's status: an agent stopped by its destroy shows offline a moment before
            # the provider has finished with it).
            life = [e for e in await client.every_event()
                    if e["kind"] == "machine.lifecycle" and e["data"].get("pool") == BURST_POOL]
            made_ids = {e["machine"] for e in life if e["reason"] == "provisioning"}
            gone = {e["machine"] for e in life if e["reason"] == "destroyed"}
            if made_ids <= gone:
                self._moment(f"scale-in: the burst is over, pool '{BURST_POOL}' is back to no machines", "scaled_in")
                return
            await self._watch(client, for_seconds=1.0)
        self._moment(f"scale-in: pool '{BURST_POOL}' still has machines 60s after its burst", "scaled_in")

    async def _submit(self, client: AsyncClient, work: list[Work], *, refuse: bool) -> None:
        cancel_at = self.desktops.queued_cancels(work) if refuse else set()
        sem = asyncio.Semaphore(16)
        accepted: list[Submitted] = []

        async def one(i: int, automation: str, data: dict[str, Any], options: dict[str, Any]) -> None:
            async with sem:
                run = await client.submit(automation, data, **options)
            accepted.append(Submitted(run["id"], automation, data.get("mrn", ""), i in cancel_at))

        await asyncio.gather(*(one(i, *w) for i, w in enumerate(work)))
        self.state.accepted += accepted
        if refuse:
            # Requests that must be refused with a clear message, and nothing written.
            for what, automation, data, options in self.desktops.bad_requests():
                try:
                    await client.submit(automation, data, **options)
                    self.state.rejected.append((what, "accepted (unexpected!)"))
                except ApiError as exc:
                    self.state.rejected.append((what, f"{exc.status} {exc.error}: {exc.message}"))
        for s in accepted:
            if s.cancel:
                with contextlib.suppress(ApiError):
                    await client.cancel(s.run_id)
                self._moment(f"cancelled {s.run_id} while queued")
        self._say(f"  {len(accepted)} runs accepted" +
                  (f", {len(self.state.rejected)} bad requests refused" if refuse else ""))

    def _moment(self, what: str, kind: str = "", machines: list[str] | None = None) -> None:
        self.state.moments.append(Moment(time.time(), what, kind, machines or []))
        self.state.feed.append(f"[bold magenta]{time.strftime('%H:%M:%S')} {what}[/]")
        if self._view_live is None:
            self.console.print(f"  {time.strftime('%H:%M:%S')} {what}")

    def _say(self, text: str) -> None:
        if self._view_live is not None:
            self._view_live.console.print(text)
        else:
            self.console.print(text)

    # -- watching -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _live_view(self) -> Iterator[None]:
        if not self.live:
            yield
            return
        with Live(console=self.console, refresh_per_second=4, transient=False) as live:
            self._view_live = live
            try:
                yield
            finally:
                self._view_live = None

    async def _watch(self, client: AsyncClient, *, until_final: bool = False, until_settled: float = 0.0,
                     for_seconds: float = 0.0) -> bool:
        """Poll the fleet (live view, chaos) until every accepted run is final, until every
        machine is ready (for at most ``until_settled`` seconds), or for a while. False once
        the demo's timeout has passed."""
        stop_at = time.monotonic() + (until_settled or for_seconds)
        while True:
            done = await self._tick(client)
            if until_final and done >= len(self.state.accepted):
                if done >= self.total:
                    self.state.finished_in = time.time() - self.state.started
                return True
            if until_settled and all(m["status"] == "ready" for m in self._machines):
                return True
            if not until_final and time.monotonic() >= stop_at:
                return True
            if time.monotonic() > self._deadline:
                self._moment(f"gave up waiting after {self.cfg.timeout:g}s")
                return False
            await asyncio.sleep(0.5)

    async def _tick(self, client: AsyncClient) -> int:
        summary = await client.summary()
        machines = self._machines = await client.machines()
        events = await client.all_events(after=self._after, limit=500)
        if events:
            self._after = events[-1]["id"]
            self._feed(events)
        done = int(sum(summary["runs"].get(s, 0) for s in FINAL))
        self._progress.update(self._task, completed=done)
        if self._view_live is not None:
            self._view_live.update(self._view(self._progress, summary, machines))
        elif time.monotonic() - self._last_line > 2:
            self._last_line = time.monotonic()
            self.console.print(f"  {done}/{self.total} runs final; " +
                               ", ".join(f"{k} {v}" for k, v in sorted(summary["runs"].items())))
        await self._chaos_step(client, done)
        return done

    async def _chaos_step(self, client: AsyncClient, done: int) -> None:
        """What the demo does to the fleet from outside, mid-run: a cancel, an agent killed,
        and the faults only the pack's app can suffer (its demo's ``strike``)."""
        ch, total = self._chaos, self.total
        strike = getattr(self.desktops, "strike", None)
        if strike is not None:
            for what in await strike(done, total, self._machines):
                self._moment(what)
        agents = sorted(n for n in self.procs if n.startswith("agents-"))
        if ch.cancel_target is not None:
            # A run cancelled while it was finishing ends as it ended (its effect happened):
            # then cancel another one, a few times at most.
            target = await client.run(ch.cancel_target)
            if target["state"] in FINAL:
                if target["state"] != "cancelled" and ch.cancel_tries < 3:
                    ch.cancelled_running = False
                ch.cancel_target = None
        if not ch.cancelled_running and done >= total * 0.15:
            running = await client.runs(state=["running"], limit=20)
            wanted = self.desktops.cancel_running
            which = [r for r in running["runs"] if not wanted or r["automation"] in wanted]
            if which:
                rid = which[0]["id"]
                try:
                    await client.cancel(rid)
                except ApiError:
                    return  # it ended meanwhile: try another on the next tick
                self._moment(f"cancelled {rid} while running: its agent is told to stop")
                ch.cancelled_running = True
                ch.cancel_target = rid
                ch.cancel_tries += 1
        if self.cfg.kill_agent and ch.killed_at is None and done >= total * 0.3 and len(agents) > 1:
            name = agents[-1]
            took = self._kill_agent_process(name)
            ch.killed_at = time.monotonic()
            with_it = f" with its {took} desktops (X server and app each)" if took else ""
            self._moment(f"SIGKILLed agent process {name}{with_it}: its machines go silent mid-run",
                         "agent_killed", self.machines_of[name])
        if ch.killed_at is not None and not ch.restarted and time.monotonic() - ch.killed_at > KILLED_FOR:
            name = agents[-1]
            self._spawn(name, self.agent_args[name])
            ch.restarted = True
            self._moment(f"restarted {name}: its machines reconnect and must re-prove their state")

    def _feed(self, events: list[dict[str, Any]]) -> None:
        for e in events:
            kind = e["kind"]
            if kind not in NOTABLE:
                continue
            reason, m = e.get("reason") or "", e.get("machine") or ""
            if kind == "attempt.ended" and reason == "succeeded":
                continue
            if kind.endswith("playbook.step"):
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


@dataclass
class _Chaos:
    cancelled_running: bool = False
    cancel_target: str | None = None  # the running run cancelled, until it is final
    cancel_tries: int = 0
    killed_at: float | None = None
    restarted: bool = False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
