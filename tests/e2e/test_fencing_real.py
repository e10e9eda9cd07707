"""Issue 12, item 8c on real desktops: a whole machine — its agent, its X server and
DemoEHR — paused (SIGSTOP, what a hypervisor's pause does to a VM) with the Save click of
``demoehr.create_patient`` already inside the app, is powered off through its provider
before its run is reconciled and retried on the other machine. Checked from outside: the
API's run and events, DemoEHR's shared records file, and the processes themselves.

The orchestrator is ``deskfleet server`` with the local provider; each machine it makes is
one ``deskfleet agent --desktop xvfb --pack demoehr`` process that starts its own Xvfb and
DemoEHR. The machines share one records file (``--data-dir``, DemoEHR's ``{data}``), as
clinics share a hospital's database, so a reconcile check on one machine sees what
another saved.

The moment of the pause is picked, not raced: the test holds the records file's write lock
while the run goes, so DemoEHR, given the Save click, stops inside its INSERT (SQLite's
busy handler: it sleeps and retries) — the click has landed in the app, its effect has not.
Once the app's main thread is seen sleeping there, the machine is paused and the lock let
go. From then on nothing the agent does can stop that save: its self-fencing (the input
gate, the lease reckoning on waking) guards input still to come, not input the app already
has. Only the fence can, by killing the app before it runs again. Without it (``fence:
agent``: the run retried at once, trusting the agent) the app, continued, saves the patient
a second time — every time, which is what makes this test able to fail: with ``fence:
agent`` in ``POLICY`` it fails on the recount ("saved by [the other machine, the paused
one]").

What the machine is: the local provider's machine is the agent's process group, which
holds the agent and DemoEHR; Xvfb runs in a session of its own (``XvfbDisplay`` starts it
so, that a terminal's Ctrl-C reaches the app before its display), so it is outside the
group. The test pauses both, and checks that the fence — which looks for the machine's
descendants outside its group while its agent lives — leaves none of them running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from deskfleet.client import Client
from deskfleet.demoapp import Records
from deskfleet.errors import DeskfleetError
from deskfleet.providers import LocalProvider
from deskfleet.providers.local import running
from support import free_port

pytestmark = pytest.mark.e2e  # ≈ 15 s here: two real desktops boot, one run, one fence

MRN = "STONITH-X1"
PATIENT = {"mrn": MRN, "name": "Ada Lovelace", "dob": "1815-12-10"}
#: as the e2e server's: a loaded 2-core machine rendering, capturing and reading real
#: screens keeps up with it
HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT = 0.3, 3.0
#: two machines, made by the local provider ``here``, fenced through it (STONITH)
POLICY = {"min": 2, "max": 2, "provider": "here", "fence": "provider", "warm": {"min": 0, "max": 0},
          "ready_time": 60, "scale_in": {"stabilization": 600}}


def _env() -> dict[str, str]:
    # A DESKFLEET_* variable in the developer's shell would silently change the flags.
    return {**{k: v for k, v in os.environ.items() if not k.startswith("DESKFLEET_")}, "PYTHONUNBUFFERED": "1"}


def _wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``check()`` until it returns something truthy; fail saying what never happened."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
        except DeskfleetError as exc:  # the server busy or restarting: keep polling
            last = exc
        if last and not isinstance(last, Exception):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


class _Orchestrator:
    """``deskfleet server`` on loopback with the local provider ``here`` making real-desktop
    machines, and what it leaves behind: its provider's state, the machines' logs, DemoEHR's
    records file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = f"http://127.0.0.1:{free_port()}"
        self.data_dir = root / "server"
        self.apps_data = root / "data"  # every machine's --data-dir: one DemoEHR records file
        self.records = self.apps_data / "demoehr" / "demoehr.db"
        self.provider_dir = self.data_dir / "providers" / "here"
        self.log = root / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = Client(self.url, timeout=15.0)

    def start(self) -> None:
        agent = shlex.join([
            sys.executable, "-m", "deskfleet", "--log-format", "json", "agent", "--orchestrator", self.url,
            "--pack", "demoehr", "--desktop", "xvfb", "--machine", "{name}", "--exact-name", "--pool", "{pool}",
            "--state-dir", "{state_dir}", "--data-dir", str(self.apps_data),
            "--enrolment-token-file", str(self.data_dir / "enrolment-token")])
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "deskfleet", "--log-format", "json", "server", "--port",
                 self.url.rsplit(":", 1)[1], "--data-dir", str(self.data_dir),
                 "--heartbeat-interval", str(HEARTBEAT_INTERVAL), "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT),
                 "--stop-grace", "3", "--provider", f"here=local:{agent}", "--controller-tick", "0.5"],
                stdout=out, stderr=subprocess.STDOUT, cwd=self.root, env=_env(), start_new_session=True)

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, f"the server exited:\n{self.tails()}"
            return bool(self.client.health()["ok"])

        _wait_until(up, 30, "the server's /healthz")
        # DemoEHR's accounts for its seed (0: the machines' DemoEHR is given none), as an operator adds them.
        added = subprocess.run([sys.executable, "-m", "deskfleet", "--server", self.url, "accounts", "add-demo",
                                "demoehr", "--seed", "0"], env=_env(), capture_output=True, text=True, timeout=60)
        assert added.returncode == 0, added.stderr

    def agent_pid(self, machine: str) -> int:
        state = json.loads((self.provider_dir / "local-provider.json").read_text())
        return int(state["machines"][machine]["pid"])

    def close(self) -> None:
        """The server first (its controller would replace what is powered off), then every
        machine it made — which outlive it, as VMs would — powered off."""
        self.client.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if (self.provider_dir / "local-provider.json").exists():
            provider = LocalProvider([sys.executable], state_dir=self.provider_dir, name="here")
            for m in asyncio.run(provider.list()):
                with contextlib.suppress(Exception):
                    asyncio.run(provider.power_off(m.id, token=f"test-teardown-{m.id}"))

    def tails(self, lines: int = 30) -> str:
        logs = [self.log, *sorted(self.provider_dir.glob("machines/*/machine.log")),
                *sorted(self.provider_dir.glob("machines/*/logs/*.log"))]
        out = []
        for log in logs:
            try:
                text = log.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                text = ["(no log)"]
            out.append(f"==== {log} ====\n" + "\n".join(text))
        return "\n".join(out)


@pytest.fixture
def orchestrator(tmp_path: Path) -> Iterator[_Orchestrator]:
    o = _Orchestrator(tmp_path)
    try:
        yield o
    finally:
        o.close()


def _machine(agent_pid: int) -> list[psutil.Process]:
    """The machine's processes: its agent and everything the agent started (Xvfb, DemoEHR)."""
    agent = psutil.Process(agent_pid)
    return [agent, *agent.children(recursive=True)]


def _alive(p: psutil.Process) -> bool:
    """Whether ``p`` still runs (or is stopped): a zombie, dead and waiting for its parent to
    collect it, does not, nor does a later process given its pid."""
    return running(p.pid) and p.is_running()


def _is_app(p: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return "deskfleet.demoapp" in " ".join(p.cmdline())
    return False


def _inside_its_insert(pid: int) -> bool:
    """Whether DemoEHR's main thread sleeps in SQLite's busy handler — its INSERT waiting for
    the lock this test holds — rather than in Tk's wait for events (a futex): seen in three
    looks, 20 ms apart (the handler sleeps 1 ms, then longer and longer)."""
    for look in range(3):
        try:
            if "nanosleep" not in Path(f"/proc/{pid}/wchan").read_text():
                return False
        except OSError:
            return False
        if look < 2:
            time.sleep(0.02)
    return True


def _count(path: Path) -> list[str]:
    """Who saved the patient ``MRN``, one entry a record: DemoEHR's own account of its effects."""
    with contextlib.closing(Records(path)) as records:
        return [r.created_by for r in records.find(MRN)]


def test_a_desktop_paused_with_the_save_click_inside_the_app_is_powered_off_before_its_run_moves(
        orchestrator: _Orchestrator) -> None:
    o = orchestrator
    try:
        o.start()
        o.client.put_pool("default", allow_wait_for_capacity=True)
        o.client.put_pool_policy("default", POLICY, version=0, comment="e2e: STONITH on real desktops")
        _wait_until(lambda: len([m for m in o.client.machines() if m["status"] == "ready"]) == 2, 90,
                    "two real-desktop machines made by the provider")
        run, machine, attempt, paused = _pause_a_machine_mid_save(o)

        # Past the lease: held, fenced (powered off through the provider), then reconciled
        # ("not done") and run on the other machine.
        done = o.client.run(run, wait=90)
        saved = _count(o.records)
        # Powered off: the agent, its X server and DemoEHR are gone (a zombie — dead, its
        # parent yet to collect it — counts as gone).
        survivors = [f"{p.pid} {p.name()}" for p in paused if _alive(p)]
        # Whatever survived (nothing should have) is continued, and given the time to finish
        # what it was doing — the paused app's save — before the records are counted again.
        for p in paused:
            if _alive(p):
                with contextlib.suppress(psutil.Error):
                    p.send_signal(signal.SIGCONT)
        if survivors:
            with contextlib.suppress(AssertionError):
                _wait_until(lambda: len(_count(o.records)) > len(saved), 10, "the woken app's save")
        recounted = _count(o.records)

        # 0 double effects: one record, saved by the machine the run succeeded on.
        assert done["state"] == "succeeded" and done["current_machine"] != machine, done
        assert saved == [done["current_machine"]], f"patient {MRN} saved by {saved}"
        assert recounted == saved, f"after the paused machine was continued, patient {MRN} saved by {recounted}"
        events = o.client.every_event()
        fenced = [e for e in events if e["kind"] == "machine.fenced"]
        assert [(e["machine"], e["data"]["attempt"]) for e in fenced] == [(machine, attempt)], fenced
        mine = [e for e in events if e["run"] == run or e["kind"] == "machine.fenced"]
        kinds = [e["kind"] for e in mine]
        print("\n".join(f"{e['at']} {e['kind']} {e['machine']} attempt {e['attempt']}: {e['reason']}" for e in mine))
        retried = min(i for i, e in enumerate(mine) if e["attempt"] not in (None, attempt))
        assert kinds.index("run.fence_hold") < kinds.index("machine.fenced") < kinds.index("run.fence_released") \
            < retried < kinds.index("reconcile.started"), [(e["kind"], e["attempt"], e["reason"]) for e in mine]
        assert not survivors, f"the fenced machine's processes survived its fence: {survivors}"
    except BaseException:
        print(o.tails())
        raise


def _pause_a_machine_mid_save(o: _Orchestrator) -> tuple[str, str, int, list[psutil.Process]]:
    """Submit the run and pause its machine once DemoEHR has the Save click and waits inside
    its INSERT; returns the run, the machine, the attempt and the processes paused."""
    # The records file's write lock, held: a Save reaches DemoEHR and waits there.
    lock = sqlite3.connect(o.records, timeout=30.0, isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")
        run = o.client.submit("demoehr.create_patient", PATIENT)["id"]
        save = _wait_until(lambda: next((e for e in o.client.events(run)
                                         if e["kind"] == "attempt.progress" and e["reason"] == "save"), None),
                           60, "the automation's save step")
        machine, attempt = save["machine"], save["attempt"]
        agent = o.agent_pid(machine)
        procs = _machine(agent)
        [app] = [p for p in procs if _is_app(p)]
        assert [p.name() for p in procs if p.name() == "Xvfb"] == ["Xvfb"], [p.name() for p in procs]
        _wait_until(lambda: _inside_its_insert(app.pid), 8,
                    "DemoEHR to take the Save click and wait inside its INSERT", interval=0.02)
        # The whole machine, as a hypervisor pauses a VM: the agent's process group (the agent,
        # DemoEHR) and any process of it that left the group (Xvfb runs in a session of its own).
        group = os.getpgid(agent)
        outside = [p for p in procs if os.getpgid(p.pid) != group]
        os.killpg(group, signal.SIGSTOP)
        for p in outside:
            p.send_signal(signal.SIGSTOP)
        print(f"paused {machine}: in its group {[p.name() for p in procs if p not in outside]}, "
              f"outside it {[p.name() for p in outside]}")
        # (read through the lock's own connection: a new one might want the lock to open the file)
        assert lock.execute("SELECT created_by FROM patients WHERE mrn = ?", (MRN,)).fetchall() == [], \
            "the Save landed before the pause"
    finally:
        if lock.in_transaction:
            lock.execute("ROLLBACK")
        lock.close()
    return run, machine, attempt, procs
