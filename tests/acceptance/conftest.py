"""Process helpers for acceptance tests: the real CLI as separate processes, killed for real.

A :class:`Cluster` starts ``deskfleet server`` and ``deskfleet agent`` subprocesses with
short heartbeat settings (so failover happens in test time), writes each one's JSON log
to a file under the test's tmp directory, and waits by polling the API — never by
sleeping blindly. Every process it started is killed at teardown, whatever the test did
to it (a SIGSTOPped agent is continued first, so it can die). When a test fails, the tail
of every log is shown with the failure.

Test modules reach these helpers through the ``cluster`` fixture (``cluster.wait_until``,
``Cluster.FINAL``); no test imports a conftest (shared helpers are in tests/support.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from deskfleet.audit import AuditReport, audit
from deskfleet.client import Client
from deskfleet.errors import DeskfleetError
from support import free_port

#: Failover in test time: a silent agent loses its lease after 1.5s.
HEARTBEAT_INTERVAL = 0.2
HEARTBEAT_TIMEOUT = 1.5
STOP_GRACE = 2.0
FINAL = frozenset({"succeeded", "failed", "cancelled", "timed_out"})


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``check()`` until it returns something truthy; fail saying what never happened."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
        except DeskfleetError as exc:  # e.g. the server is restarting: keep polling
            last = exc
        if last and not isinstance(last, Exception):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


def _clean_env() -> dict[str, str]:
    # A DESKFLEET_* variable in the developer's shell would silently change the flags.
    env = {k: v for k, v in os.environ.items() if not k.startswith("DESKFLEET_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Proc:
    """One ``deskfleet`` subprocess: its arguments, its log file, and signals to send it."""

    def __init__(self, name: str, args: list[str], log: Path, cwd: Path) -> None:
        self.name = name
        self.args = args
        self.log = log
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None
        self.stopped = False  # SIGSTOPped and not yet continued

    def start(self) -> Proc:
        assert self.popen is None or self.popen.poll() is not None, f"{self.name} is already running"
        with open(self.log, "ab") as out:
            out.write(f"---- start {' '.join(self.args)}\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "deskfleet", "--log-format", "json", *self.args],
                stdout=out, stderr=subprocess.STDOUT, cwd=self.cwd, env=_clean_env(),
                start_new_session=True,
            )
        self.stopped = False
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def send(self, sig: signal.Signals) -> None:
        os.kill(self.pid, sig)
        if sig is signal.SIGSTOP:
            self.stopped = True
        elif sig is signal.SIGCONT:
            self.stopped = False

    def kill9(self) -> int:
        """SIGKILL and reap; returns the exit status (``-9``)."""
        assert self.popen is not None
        os.kill(self.pid, signal.SIGKILL)
        return self.popen.wait(10)

    def terminate(self, timeout: float = 10.0) -> None:
        if not self.alive:
            return
        assert self.popen is not None
        if self.stopped:
            os.kill(self.pid, signal.SIGCONT)
            self.stopped = False
        os.kill(self.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            self.popen.wait(10)

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])


class Cluster:
    """An orchestrator process and agent processes on loopback, in one tmp directory."""

    FINAL = FINAL
    wait_until = staticmethod(wait_until)

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = root / "server"
        self.backend = root / "ehr.db"  # the simulated EHR's records, shared by every agent
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, Proc] = {}
        self._client: Client | None = None

    # -- processes ------------------------------------------------------------------------------
    def _proc(self, name: str, args: list[str]) -> Proc:
        proc = Proc(name, args, self.logs / f"{name}.log", self.root)
        self.procs[name] = proc
        return proc.start()

    def start_server(self, *extra: str, heartbeat_interval: float = HEARTBEAT_INTERVAL) -> Proc:
        """The orchestrator on this cluster's port and data directory (the same on a restart)."""
        return self._proc("server", [
            "server", "--port", str(self.port), "--data-dir", str(self.data_dir),
            "--heartbeat-interval", str(heartbeat_interval), "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT),
            "--stop-grace", str(STOP_GRACE), *extra,
        ])

    def start_agent(self, name: str, *, count: int = 1, action_delay: float = 0.1, faults: str = "none",
                    extra: tuple[str, ...] = ()) -> Proc:
        """An agent process for ``count`` simulated machines named ``<name>-01``…; its keys
        live in ``<root>/agent-<name>``, so a restart under the same name is the same machine."""
        return self._proc(name, [
            "agent", "--orchestrator", self.url, "--machine", name, "--sim", str(count),
            "--sim-faults", faults, "--sim-backend", str(self.backend),
            "--state-dir", str(self.root / f"agent-{name}"),
            "--enrolment-token-file", str(self.data_dir / "enrolment-token"),
            "--action-delay", str(action_delay), *extra,
        ])

    def restart(self, name: str) -> Proc:
        proc = self.procs[name]
        assert not proc.alive, f"{name} is still running"
        return proc.start()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        for proc in self.procs.values():
            with contextlib.suppress(OSError):
                proc.terminate()

    # -- the API -----------------------------------------------------------------------------------
    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.url, timeout=15.0)
        return self._client

    def wait_healthy(self, timeout: float = 30.0) -> None:
        server = self.procs["server"]

        def up() -> bool:
            assert server.alive, f"the server exited at start:\n{server.tail()}"
            return bool(self.client.health()["ok"])

        wait_until(up, timeout, "the orchestrator's /healthz")

    def wait_ready(self, machines: set[str], timeout: float = 45.0) -> None:
        def ready() -> bool:
            for proc in self.procs.values():
                assert proc.alive or proc.popen is None or proc.popen.returncode == -signal.SIGKILL, (
                    f"{proc.name} exited unexpectedly:\n{proc.tail()}")
            status = {m["id"]: m["status"] for m in self.client.machines()}
            return all(status.get(m) == "ready" for m in machines)

        wait_until(ready, timeout, f"machines ready: {sorted(machines)}", interval=0.1)

    def machine(self, machine_id: str) -> dict[str, Any]:
        return dict(self.client.machine(machine_id))

    def all_runs(self) -> list[dict[str, Any]]:
        return self.client.every_run()

    def all_events(self) -> list[dict[str, Any]]:
        return self.client.every_event()

    def audit(self, *, require_final: bool = True) -> tuple[AuditReport, list[dict[str, Any]], list[dict[str, Any]]]:
        """The invariant checker over every run and every event, as the API serves them."""
        runs, events = self.all_runs(), self.all_events()
        return audit(runs, events, require_final=require_final), runs, events

    def wait_final(self, run_ids: set[str], timeout: float) -> dict[str, dict[str, Any]]:
        def done() -> dict[str, dict[str, Any]] | None:
            runs = {r["id"]: r for r in self.all_runs() if r["id"] in run_ids}
            if len(runs) == len(run_ids) and all(r["state"] in FINAL for r in runs.values()):
                return runs
            return None

        return wait_until(done, timeout, f"{len(run_ids)} runs to reach a final state", interval=0.25)

    def tails(self) -> str:
        return "\n".join(f"==== {p.name} ({p.log}) ====\n{p.tail()}" for p in self.procs.values())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failing test that used a cluster shows the tail of every process's log."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    c = getattr(item, "funcargs", {}).get("cluster")
    if report.when == "call" and report.failed and isinstance(c, Cluster):
        report.sections.append(("cluster logs", c.tails()))


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.close()
