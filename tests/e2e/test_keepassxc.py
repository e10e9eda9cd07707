"""The KeePassXC pack (examples/keepassxc), end to end: an application nobody here wrote.

Real Xvfb displays, real KeePassXC 2.7.4 processes started by the pack's launcher, real
agents (``AgentHost``, loading the pack by path as a user's agent does) and a real
orchestrator. The master password reaches the unlock playbook as the agent's account; what
the database holds is checked from outside with ``keepassxc-cli``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from deskfleet import AgentHost, AgentHostConfig, Credential, load_pack
from deskfleet.client import AsyncClient
from deskfleet.desktop import Placement
from support import LiveServer, register_accounts, wait_ready

pytestmark = pytest.mark.e2e

PACK = Path(__file__).resolve().parents[2] / "examples" / "keepassxc"
PASSWORD = "kx-e2e-Master.1"
ACCOUNT = "keepassxc"


@pytest.fixture(autouse=True)
def _keepassxc_installed() -> None:
    if shutil.which("keepassxc") is None or shutil.which("keepassxc-cli") is None:
        pytest.fail("the KeePassXC tests need keepassxc (apt-get install keepassxc; ./dev installs it)",
                    pytrace=False)


def entry(title: str, **more: str) -> dict[str, str]:
    return {"title": title, "username": "grace", "password": "Cobol-1959!", "url": "https://navy.example",
            "notes": "first compiler", **more}


def playbooks(events: list[dict[str, Any]], *, mid_run: bool | None = None) -> list[str]:
    return [e["data"]["playbook"] for e in events if e["kind"].endswith("playbook.step")
            and (mid_run is None or bool(e["data"].get("mid_run")) == mid_run)]


class KeePassFleet:
    """KeePassXC machines on Xvfb with their agents, and the database they share."""

    def __init__(self, host: AgentHost, database: Path, kxcli: Any) -> None:
        self.host = host
        self.database = database
        self.kxcli = kxcli
        self.names = host.names
        self.desktops = host.desktops
        self.model = host.model

    def titles(self) -> list[str]:
        return list(self.kxcli.titles(self.database, PASSWORD))

    def entries(self) -> list[dict[str, str]]:
        return list(self.kxcli.entries(self.database, PASSWORD))

    def desktop(self, name: str) -> Any:
        return self.desktops[self.names.index(name)]

    def ledger_holder(self) -> str | None:
        import json

        try:
            holder = json.loads(self.database.with_name(self.database.name + ".ledger.json").read_text()).get("holder")
        except (OSError, ValueError):
            return None
        return holder.get("machine") if holder else None

    async def screen(self, name: str) -> str:
        return (await self.look(name)).state

    async def look(self, name: str) -> Any:
        """What pre-flight would see: the pixels, and the window system's facts beside them."""
        return (await self.model.look(self.desktop(name)))[1]

    async def shows(self, name: str, state: str, timeout: float = 20.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        seen = "?"
        while loop.time() < deadline:
            seen = await self.screen(name)
            if seen == state:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"{name} never showed {state!r} (last: {seen!r})")


@pytest.fixture
def kx_server(server_factory: Callable[..., LiveServer]) -> LiveServer:
    return server_factory(heartbeat_interval=0.3, heartbeat_timeout=3.0, stop_grace=3.0)


@pytest.fixture
async def kx_fleet(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Start KeePassXC machines (the pack loaded by path) with real agents in the test's loop.

    ``lock_after``: KeePassXC's idle lock (the agent is told the same idle timeout)."""
    pack = load_pack(PACK)
    kxcli = importlib.import_module(f"{pack.module.__name__}.kxcli")
    data = tmp_path / "data"
    database = data / "keepassxc" / "keepassxc.kdbx"
    kxcli.create(database, PASSWORD)
    started: list[tuple[AgentHost, asyncio.Task[None]]] = []

    async def make(server: LiveServer, count: int = 1, *, lock_after: float | None = None,
                   **overrides: Any) -> KeePassFleet:
        values: dict[str, Any] = {
            "servers": [server.url], "packs": [pack], "desktop": "xvfb", "count": count,
            "enrolment_token": server.token, "machine": f"kx{len(started)}",
            "state_dir": tmp_path / f"agents{len(started)}", "data_dir": data, "log_dir": tmp_path / "logs",
            "app_args": {"keepassxc": [f"--lock-after={lock_after:g}"]} if lock_after else {},
            "idle_timeouts": {"keepassxc": lock_after} if lock_after else {},
            "upkeep": False,  # the database locks itself as the tests expect; upkeep is tested on its own
        }
        values.update(overrides)
        # The master password goes in the orchestrator's vault; agents get it per attempt.
        await register_accounts(server, {ACCOUNT: Credential("robot", PASSWORD)}, app="keepassxc",
                                max_sessions=16)
        host = AgentHost(AgentHostConfig(**values))
        await host.start()
        task = asyncio.create_task(host.run())
        started.append((host, task))
        await wait_ready(server, {a.machine_id for a in host.agents}, timeout=60)
        return KeePassFleet(host, database, kxcli)

    yield make
    for host, task in started:
        await host.shutdown()
        try:
            await asyncio.wait_for(task, 10)
        except (TimeoutError, asyncio.CancelledError):
            task.cancel()
        await host.close()


async def test_unlock_with_the_accounts_password_then_add_and_find_an_entry(kx_server, kx_fleet):
    fleet = await kx_fleet(kx_server)
    async with AsyncClient(kx_server.url) as c:
        run = await c.submit("keepassxc.add_entry", entry("Hopper Navy"), wait=90)
        assert run["state"] == "succeeded", run
        assert run["output"] == {"title": "Hopper Navy", "username": "grace", "url": "https://navy.example"}
        found = await c.submit("keepassxc.find_entry", {"title": "Hopper"}, wait=90)
        assert found["state"] == "succeeded", found
        events = await c.events(run["id"])
        everything = await c.all_events(limit=10000)
    # The run's pre-flight found the database locked (as KeePassXC starts) and unlocked it with
    # the account's password, in one step.
    [unlocked] = [e["data"] for e in events if e["kind"] == "playbook.step"]
    assert (unlocked["playbook"], unlocked["from_state"], unlocked["to_state"], unlocked["error"]) == (
        "unlock", "locked", "entries", None)
    [saved] = fleet.entries()
    assert (saved["Title"], saved["UserName"] if "UserName" in saved else saved["Username"], saved["Password"],
            saved["URL"], saved["Notes"]) == ("Hopper Navy", "grace", "Cobol-1959!", "https://navy.example",
                                              "first compiler")
    assert found["output"] == {"title": "Hopper", "count": 1, "exact": 0, "entries": [
        {"title": "Hopper Navy", "username": "grace", "url": "https://navy.example"}]}
    assert "Cobol-1959!" not in str(everything), "the entry's password never shows in events"


@pytest.mark.parametrize(("look", "window"), [
    (["--at", "300,200"], (300, 200, 1024, 768)),
    (["--at", "100,50", "--scale", "1.25"], (125, 63, 1280, 960)),  # Qt scales the position too
], ids=["moved", "moved-and-scaled-125"])
async def test_a_window_elsewhere_on_a_larger_screen_changes_nothing(kx_server, kx_fleet, look, window):
    """The model was recorded with KeePassXC's window at 0,0 of a 1024x768 screen. Here the
    screen is 1920x1080 and the window elsewhere — and, with Qt's scale factor at 1.25 (a
    high-DPI display), 1280x960: the model is anchored to the window (its "window" in
    model.json), so recognition, the unlock playbook's typing and the automations' clicks
    and reads all land where the window is now, at its scale."""
    fleet = await kx_fleet(kx_server, screen=(1920, 1080), app_args={"keepassxc": look})
    machine = fleet.names[0]
    desktop = fleet.desktop(machine)
    [main] = [w for w in await asyncio.to_thread(desktop.host.windows) if w.pid == desktop.app_pid]
    assert (main.rect.left, main.rect.top, main.rect.width, main.rect.height) == window
    async with AsyncClient(kx_server.url) as c:
        run = await c.submit("keepassxc.add_entry", entry("Lamport Clocks"), wait=90)
        assert run["state"] == "succeeded", run
        found = await c.submit("keepassxc.find_entry", {"title": "Lamport Clocks"}, wait=90)
        assert found["state"] == "succeeded", found
        events = await c.events(run["id"])
    assert [(e["data"]["playbook"], e["data"]["from_state"], e["data"]["to_state"])
            for e in events if e["kind"] == "playbook.step"] == [("unlock", "locked", "entries")]
    assert found["output"]["exact"] == 1
    assert fleet.titles() == ["Lamport Clocks"]
    frame = await desktop.screenshot()
    assert frame.shape == (768, 1024, 3), "the desktop shows the app as recorded, whatever the screen"


async def test_where_the_window_system_cannot_say_the_primary_anchor_finds_the_window(kx_server, kx_fleet):
    """A host that lists no windows (a desktop reached only through its pixels): the model's
    primary anchor (model.json "anchor": its menu bar) is searched for at the scales the model
    declares, and the window found where Qt put it, scaled by 1.25."""
    fleet = await kx_fleet(kx_server, screen=(1920, 1080), app_args={"keepassxc": ["--at", "100,50", "--scale", "1.25"]})
    desktop = fleet.desktop(fleet.names[0])
    assert desktop.locate_window is not None
    desktop.station.host.windows = None  # this host cannot be asked any more
    desktop._placement = Placement()  # nor does the desktop remember where the window was
    assert await desktop.app_windows() is None
    async with AsyncClient(kx_server.url) as c:
        run = await c.submit("keepassxc.add_entry", entry("Liskov Substitution"), wait=90)
        assert run["state"] == "succeeded", run
    assert fleet.titles() == ["Liskov Substitution"]
    where = desktop.placement
    assert where.scale == 1.25 and abs(where.dx - 125) <= 2 and abs(where.dy - 63) <= 2, where


async def test_the_idle_lock_between_runs_is_undone_by_the_preflight(kx_server, kx_fleet):
    fleet = await kx_fleet(kx_server, lock_after=3)
    machine = fleet.names[0]
    async with AsyncClient(kx_server.url) as c:
        first = await c.submit("keepassxc.add_entry", entry("Lovelace Engine"), wait=90)
        assert first["state"] == "succeeded", first
        await fleet.shows(machine, "locked")  # idle past KeePassXC's lock timeout
        second = await c.submit("keepassxc.find_entry", {"title": "Lovelace Engine"}, wait=90)
        assert second["state"] == "succeeded", second
        events = await c.events(second["id"])
    assert playbooks(events) == ["unlock"]
    assert second["dispatches"] == 1, "unlocked in pre-flight, without a retry"
    assert second["output"]["exact"] == 1 and second["output"]["count"] == 1


class HeldLock:
    """The shared database's write lock, held by the test: another writer, mid-save."""

    def __init__(self, database: Path) -> None:
        import fcntl

        self.fd = os.open(database.with_name(database.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        import fcntl

        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


async def test_the_database_locking_itself_mid_run_is_unlocked_by_the_automation(kx_server, kx_fleet):
    """add_entry waits for the write lock (another writer holds it) longer than KeePassXC's idle
    lock: the database locks itself mid-run. The automation unlocks it (``ctx.recover()``, the
    pack's playbooks with the run's account) and carries on — one attempt, one entry."""
    fleet = await kx_fleet(kx_server, lock_after=3)
    machine = fleet.names[0]
    held = HeldLock(fleet.database)
    try:
        async with AsyncClient(kx_server.url) as c:
            run = await c.submit("keepassxc.add_entry", entry("Turing Bombe"), progress_timeout=8)
            await fleet.shows(machine, "entries")  # the pre-flight unlocked it; now the automation waits
            await fleet.shows(machine, "locked", timeout=15)  # … long enough for the idle lock
            held.release()
            held = None
            done = await c.run(run["id"], wait=90)
            events = await c.events(run["id"])
    finally:
        if held is not None:
            held.release()
    assert done["state"] == "succeeded", done
    assert done["dispatches"] == 1, "recovered within the attempt, not by a retry"
    assert playbooks(events, mid_run=False) == ["unlock"]
    assert playbooks(events, mid_run=True) == ["unlock"]
    steps = [e["reason"] for e in events if e["kind"] == "attempt.progress"]
    assert "wait for the write lock" in steps and "recover from 'locked'" in steps, steps
    assert fleet.titles().count("Turing Bombe") == 1


async def kill_the_writer(fleet: KeePassFleet, *, when: str) -> str:
    """SIGKILL the KeePassXC of the machine holding the write lock: ``saved`` — the moment its
    save reached the file; ``form`` — while its new-entry form is open, before any save."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while (holder := fleet.ledger_holder()) is None:
        assert loop.time() < deadline, "nobody took the write lock"
        await asyncio.sleep(0.01)
    before = fleet.database.stat().st_mtime_ns
    if when == "saved":
        while fleet.database.stat().st_mtime_ns == before:
            assert loop.time() < deadline, "the save never reached the file"
            await asyncio.sleep(0.005)
    else:
        await fleet.shows(holder, "entry_form", timeout=30)
    pid = fleet.desktop(holder).app_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    if when == "form":
        assert fleet.database.stat().st_mtime_ns == before, "the form was saved before the kill"
    return holder


async def test_keepassxc_killed_after_the_save_is_reconciled_on_the_other_desktop(kx_server, kx_fleet):
    fleet = await kx_fleet(kx_server, count=2)
    async with AsyncClient(kx_server.url) as c:
        killer = asyncio.create_task(kill_the_writer(fleet, when="saved"))
        run = await c.submit("keepassxc.add_entry", entry("Hamilton Apollo"))
        killed_on = await asyncio.wait_for(killer, 90)
        done = await c.run(run["id"], wait=120)
        attempts = await c.attempts(run["id"])
        events = await c.events(run["id"])
    assert done["state"] == "succeeded", done
    other = next(n for n in fleet.names if n != killed_on)
    assert [a["machine"] for a in attempts] == [killed_on, other], attempts
    assert attempts[0]["state"] == "failed", attempts
    assert [e["data"]["effect_found"] for e in events if e["kind"] == "reconcile.done"] == [True]
    assert done["output"] == {"title": "Hamilton Apollo", "username": "grace", "url": "https://navy.example"}
    assert fleet.titles().count("Hamilton Apollo") == 1, "the entry exists once"


async def test_keepassxc_killed_before_the_save_is_added_again_once(kx_server, kx_fleet):
    fleet = await kx_fleet(kx_server, count=2)
    async with AsyncClient(kx_server.url) as c:
        killer = asyncio.create_task(kill_the_writer(fleet, when="form"))
        run = await c.submit("keepassxc.add_entry", entry("Liskov Clu"))
        killed_on = await asyncio.wait_for(killer, 90)
        done = await c.run(run["id"], wait=120)
        attempts = await c.attempts(run["id"])
        events = await c.events(run["id"])
    assert done["state"] == "succeeded", done
    assert attempts[0]["machine"] == killed_on and attempts[0]["state"] == "failed", attempts
    assert [e["data"]["effect_found"] for e in events if e["kind"] == "reconcile.done"] == [False]
    assert fleet.titles().count("Liskov Clu") == 1


async def test_an_unknown_modal_dialog_is_never_taken_for_the_list_and_is_closed(kx_server, kx_fleet):
    """Help → About over the entry list: a dialog the model does not know. The window system
    says a dialog of the app lies over the list: the screen is ``covered`` (never ready), the
    event names the dialog and keeps the screenshot, and the built-in ``uncover`` closes it as
    its close button would; the run goes on."""
    layout = importlib.import_module(f"{load_pack(PACK).module.__name__}.layout")
    fleet = await kx_fleet(kx_server)
    machine = fleet.names[0]
    desktop = fleet.desktop(machine)
    async with AsyncClient(kx_server.url) as c:
        first = await c.submit("keepassxc.add_entry", entry("Allen Fortran"), wait=90)
        assert first["state"] == "succeeded", first
        assert await fleet.screen(machine) == "entries"
        await desktop.click(*layout.MENU_HELP.center)
        await desktop.click(*layout.HELP_ABOUT.center)
        await desktop.move(*layout.PARK)
        await asyncio.sleep(1.0)
        seen = await fleet.look(machine)
        assert seen.state == "covered", "the About box over the list is not the list"
        assert seen.detail.startswith("covered by 'About KeePassXC', a dialog "), seen.detail
        run = await c.submit("keepassxc.find_entry", {"title": "Allen Fortran"}, wait=90)
        assert run["state"] == "succeeded", run
        events = await c.events(run["id"])
    steps = [(e["data"]["playbook"], e["data"]["from_state"], e["data"]["to_state"])
             for e in events if e["kind"] == "playbook.step"]
    assert steps == [("uncover", "covered", "entries")], steps
    [step] = [e["data"] for e in events if e["kind"] == "playbook.step"]
    assert "covered by 'About KeePassXC', a dialog" in step["why"], step
    assert step["before_screenshot"], step  # the covered screen, kept with the event
    assert run["dispatches"] == 1 and run["output"]["exact"] == 1


async def test_a_hung_keepassxc_showing_the_list_is_caught_by_the_window_systems_ping(kx_server, kx_fleet):
    """A stopped KeePassXC (SIGSTOP) keeps showing a perfect list: pixels cannot tell. Qt
    answers the window manager's ping (_NET_WM_PING) from its event loop, a stopped one does
    not: pre-flight says so, and the app is restarted — before the pack's probe (a hover) is
    even needed."""
    fleet = await kx_fleet(kx_server)
    machine = fleet.names[0]
    async with AsyncClient(kx_server.url) as c:
        first = await c.submit("keepassxc.add_entry", entry("Perlman Spanning"), wait=90)
        assert first["state"] == "succeeded", first
        pid = fleet.desktop(machine).app_pid
        os.kill(pid, signal.SIGSTOP)
        try:
            run = await c.submit("keepassxc.find_entry", {"title": "Perlman Spanning"}, wait=90)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        assert run["state"] == "succeeded", run
        events = await c.events(run["id"])
    steps = [e["data"] for e in events if e["kind"] == "playbook.step"]
    assert [(s["playbook"], s["from_state"]) for s in steps] == [("restart_app", "entries"), ("unlock", "locked")]
    assert "did not answer the window system's ping within" in steps[0]["why"], steps[0]
    assert fleet.desktop(machine).app_pid != pid
    assert run["output"]["exact"] == 1


async def test_session_upkeep_keeps_the_database_unlocked_on_an_idle_machine(kx_server, kx_fleet):
    # The keep-alive comes half the lock timeout before the lock (the pack's 20 s margin, capped
    # at half a short timeout): 5 s, which a loaded host's stalls do not eat, where 2.5 s of a
    # 5 s lock once did on CI.
    fleet = await kx_fleet(kx_server, lock_after=10, upkeep=True)
    machine = fleet.names[0]
    async with AsyncClient(kx_server.url) as c:
        first = await c.submit("keepassxc.add_entry", entry("Knuth Tex"), wait=90)
        assert first["state"] == "succeeded", first
        await asyncio.sleep(18)  # idle, nearly twice the lock timeout
        screen = await fleet.screen(machine)
        kept = [e for e in await c.all_events(limit=10000) if e["kind"] == "session.keepalive"]
        assert screen == "entries", f"the keep-alive kept KeePassXC unlocked: {kept}"
        run = await c.submit("keepassxc.find_entry", {"title": "Knuth Tex"}, wait=90)
        assert run["state"] == "succeeded", run
        events = await c.events(run["id"])
    assert playbooks(events) == [], "no unlock needed"
    assert kept and all(e["data"]["ok"] for e in kept), kept


def test_pack_check_and_model_test_pass_as_processes():
    check = subprocess.run([sys.executable, "-m", "deskfleet", "pack", "check", str(PACK)],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.startswith("ok: pack keepassxc"), check.stdout
    model = subprocess.run([sys.executable, "-m", "deskfleet", "model", "test", str(PACK / "model")],
                           capture_output=True, text=True, timeout=300)
    assert model.returncode == 0, model.stdout + model.stderr
    assert "false ready: 0" in model.stdout and "accuracy: 100.0%" in model.stdout, model.stdout
