"""The real path, end to end: Xvfb displays, DemoEHR, agents, an orchestrator.

Each test starts its own machines (an X server and DemoEHR each), with DemoEHR's fault
switches set as the scenario needs, submits runs through the HTTP API, and checks both
what the orchestrator recorded and what DemoEHR's records file holds.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import numpy as np
import pytest

from deskfleet.client import AsyncClient
from deskfleet.demoapp import Records
from deskfleet.errors import DesktopError

pytestmark = pytest.mark.e2e

PATIENT = {"name": "Grace Hopper", "dob": "1906-12-09"}


def patient(mrn: str) -> dict[str, str]:
    return {"mrn": mrn, **PATIENT}


def playbooks(events: list[dict]) -> list[str]:
    return [e["data"]["playbook"] for e in events if e["kind"].endswith("playbook.step")]


async def test_login_mfa_and_create_patient(e2e_server, real_fleet, tmp_path):
    fleet = await real_fleet(e2e_server, app_options=["--mfa"])
    async with AsyncClient(e2e_server.url) as c:
        run = await c.submit("demoehr.create_patient", patient("E2E-1"), wait=90)
        assert run["state"] == "succeeded", run
        events = await c.events(run["id"])
    assert playbooks(events) == ["login", "mfa"]
    records = Records(fleet.data)
    [saved] = records.find("E2E-1")
    assert run["output"] == {"record_id": saved.record_id, "mrn": "E2E-1"}
    assert (saved.name, saved.dob, saved.created_by) == ("Grace Hopper", "1906-12-09", fleet.names[0])


async def screen_shows(fleet, state: str, timeout: float = 20.0) -> None:
    """Wait until the first desktop's screen is recognised as ``state``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    seen = "?"
    while loop.time() < deadline:
        seen = fleet.model.classify(await fleet.desktops[0].screenshot()).state
        if seen == state:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the screen never showed {state!r} (last: {seen!r})")


async def test_session_expiry_between_runs_is_recovered_by_the_preflight(e2e_server, real_fleet):
    fleet = await real_fleet(e2e_server, app_options=["--session-timeout", "3"])
    async with AsyncClient(e2e_server.url) as c:
        first = await c.submit("demoehr.create_patient", patient("E2E-2"), wait=90)
        assert first["state"] == "succeeded", first
        await screen_shows(fleet, "session_expired")  # idle past the timeout: back at login
        second = await c.submit("demoehr.search_patient", {"mrn": "E2E-2"}, wait=90)
        assert second["state"] == "succeeded", second
        events = await c.events(second["id"])
    assert playbooks(events) == ["dismiss", "login"]
    steps = [e for e in events if e["kind"] == "playbook.step"]
    assert [(s["data"]["from_state"], s["data"]["to_state"]) for s in steps] == [
        ("session_expired", "login"), ("login", "home")]
    assert second["output"]["count"] == 1
    assert second["output"]["records"][0]["name"] == "Grace Hopper"
    assert second["dispatches"] == 1, "recovered in pre-flight, without a retry"


async def test_crash_mid_create_is_reconciled_and_retried_on_another_desktop(e2e_server, real_fleet):
    # Both DemoEHRs carry the switch; the first to reach "saved" (after the database
    # write, before the confirmation) takes the crash, the other goes through.
    fleet = await real_fleet(e2e_server, count=2, app_options=["--crash-at", "saved"])
    async with AsyncClient(e2e_server.url) as c:
        run = await c.submit("demoehr.create_patient", patient("E2E-3"), wait=120)
        assert run["state"] == "succeeded", run
        attempts = await c.attempts(run["id"])
        events = await c.events(run["id"])
    records = Records(fleet.data)
    [(kind, step, crashed_on, _)] = records.faults()
    assert (kind, step) == ("crash", "saved")
    assert [a["machine"] for a in attempts] == [crashed_on, next(n for n in fleet.names if n != crashed_on)], attempts
    assert attempts[0]["state"] == "failed" and "desktop" in attempts[0]["reason"]
    reconciled = [e for e in events if e["kind"] == "reconcile.done"]
    assert [e["data"]["effect_found"] for e in reconciled] == [True]
    [saved] = records.find("E2E-3")  # exactly once
    assert run["output"] == {"record_id": saved.record_id, "mrn": "E2E-3"}
    assert saved.created_by == crashed_on


async def test_modal_error_dialogs_are_recovered(e2e_server, real_fleet):
    # One dialog is up before any run (the pre-flight dismisses it); another replaces the
    # new-patient form mid-run (the attempt fails, the retry dismisses it and reconciles).
    fleet = await real_fleet(e2e_server, app_options=["--show-dialog", "error_dialog", "--error-at", "open_form"])
    async with AsyncClient(e2e_server.url) as c:
        run = await c.submit("demoehr.create_patient", patient("E2E-4"), wait=120)
        assert run["state"] == "succeeded", run
        attempts = await c.attempts(run["id"])
        events = await c.events(run["id"])
    assert [a["state"] for a in attempts] == ["failed", "succeeded"]
    assert "error_dialog" in attempts[0]["reason"]
    dismissed = [e for e in events if e["kind"] == "playbook.step" and e["data"]["playbook"] == "dismiss"]
    assert [e["data"]["from_state"] for e in dismissed] == ["error_dialog", "error_dialog"]
    assert [e["attempt"] for e in dismissed] == [a["id"] for a in attempts]
    assert [e["data"]["effect_found"] for e in events if e["kind"] == "reconcile.done"] == [False]
    assert len(Records(fleet.data).find("E2E-4")) == 1


async def test_frozen_app_is_caught_by_the_progress_watchdog(e2e_server, real_fleet):
    fleet = await real_fleet(e2e_server, app_options=["--freeze-at", "open_form"])
    machine = fleet.names[0]
    async with AsyncClient(e2e_server.url) as c:
        run = await c.submit("demoehr.create_patient", patient("E2E-5"), progress_timeout=4.0)
        done = await c.run(run["id"], wait=120)
        assert done["state"] == "succeeded", done
        attempts = await c.attempts(run["id"])
        everything = await c.all_events(limit=10000)
    assert attempts[0]["stop_reason"] == "progress_stalled"
    assert [a["machine"] for a in attempts] == [machine, machine]
    assert ("machine.quarantined", machine) in [(e["kind"], e["machine"]) for e in everything]
    # The frozen app showed a perfect "home": only the probe could tell, and it was restarted.
    restarts = [e for e in everything if e["kind"] == "verify.playbook.step" and e["data"]["playbook"] == "restart_app"]
    assert restarts and "did not highlight" in restarts[0]["data"]["why"]  # the probe says why
    assert restarts[0]["data"]["from_state"] == "home"
    assert len(Records(fleet.data).find("E2E-5")) == 1


async def test_a_rebooted_desktop_comes_back_with_a_new_boot_id_and_serves_runs(e2e_server, real_fleet):
    fleet = await real_fleet(e2e_server)
    desktop, agent = fleet.desktops[0], fleet.agents[0]
    old_boot, old_x = desktop.boot_id, desktop.host.pid
    async with AsyncClient(e2e_server.url) as c:
        assert (await c.submit("demoehr.create_patient", patient("E2E-6"), wait=90))["state"] == "succeeded"
        await desktop.reboot()  # the X server and DemoEHR restart; the agent forgets and reconnects
        assert desktop.boot_id != old_boot and desktop.host.pid != old_x
        assert agent.boot_id == desktop.boot_id
        run = await c.submit("demoehr.search_patient", {"mrn": "E2E-6"}, wait=90)
        assert run["state"] == "succeeded", run
        events = await c.events(run["id"])
    assert run["output"]["count"] == 1
    assert playbooks(events) == ["login"], "a rebooted machine starts at the login screen"


async def test_input_is_refused_by_the_gate_and_never_reaches_the_app(e2e_server, real_fleet):
    from deskfleet.demoapp import layout as L
    from deskfleet.errors import Stopped

    fleet = await real_fleet(e2e_server)
    desktop = fleet.desktops[0]
    agent_gate = desktop.input_gate
    before = await desktop.screenshot()

    def refuse() -> None:
        raise Stopped("lease presumed lost")

    desktop.input_gate = refuse
    try:
        for send in (desktop.click(*L.USERNAME.center), desktop.type_text("robot1"), desktop.press("enter")):
            with pytest.raises(Stopped):
                await send
    finally:
        desktop.input_gate = agent_gate
    await asyncio.sleep(0.3)
    assert np.array_equal(await desktop.screenshot(), before), "nothing reached the screen"


async def sessions(client: AsyncClient) -> dict[str, str | None]:
    return {m["id"]: m.get("session_key") for m in await client.machines()}


async def test_a_run_with_a_session_key_goes_to_the_machine_logged_in_as_that_account(e2e_server, real_fleet):
    fleet = await real_fleet(e2e_server, count=2, app_options=["--session-timeout", "600"])
    a, b = fleet.names
    async with AsyncClient(e2e_server.url) as c:
        assert await sessions(c) == {a: None, b: None}, "nobody is logged in at start"
        # b logs in as robot1 (the default account), then a as robot2 — so that a is the
        # machine idle the shortest, the one the scheduler takes last without affinity.
        first = await c.submit("demoehr.create_patient", patient("E2E-7"), machine=b, wait=90)
        assert first["state"] == "succeeded", first
        second = await c.submit("demoehr.search_patient", {"mrn": "E2E-7"}, machine=a, session_key="robot2", wait=90)
        assert second["state"] == "succeeded", second
        # The heartbeats now carry each machine's account (noted by the login playbooks).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while (seen := await sessions(c)) != {a: "robot2", b: "robot1"} and loop.time() < deadline:
            await asyncio.sleep(0.2)
        assert seen == {a: "robot2", b: "robot1"}
        run = await c.submit("demoehr.search_patient", {"mrn": "E2E-7"}, session_key="robot2", wait=90)
        assert run["state"] == "succeeded", run
        [attempt] = await c.attempts(run["id"])
        events = await c.events(run["id"])
        assert attempt["machine"] == a, "the run went to the machine already logged in as robot2"
        assert playbooks(events) == [], "no login needed: the session was there"
        # An app restart ends the session, and the next heartbeats say so.
        await fleet.desktops[0].restart_app()
        assert (await fleet.desktops[0].info()).session_key is None
        deadline = loop.time() + 10
        while (seen := await sessions(c)) != {a: None, b: "robot1"} and loop.time() < deadline:
            await asyncio.sleep(0.2)
        assert seen == {a: None, b: "robot1"}


async def test_the_session_note_lapses_with_the_apps_idle_timeout(e2e_server, real_fleet):
    fleet = await real_fleet(e2e_server, app_options=["--session-timeout", "3"])
    desktop = fleet.desktops[0]
    async with AsyncClient(e2e_server.url) as c:
        run = await c.submit("demoehr.create_patient", patient("E2E-8"), wait=90)
        assert run["state"] == "succeeded", run
        info = await desktop.info()
        assert info.session_key == "robot1" and info.session_expires_at is not None
        # The note lapses when the app's session does, and the app agrees: it shows login.
        await asyncio.sleep(max(0.0, info.session_expires_at - time.time()) + 0.1)
        assert (await desktop.info()).session_key is None
        await screen_shows(fleet, "session_expired", timeout=5)


async def test_x_server_death_between_runs_is_recovered_by_the_preflight(e2e_server, real_fleet):
    fleet = await real_fleet(e2e_server)
    desktop, agent = fleet.desktops[0], fleet.agents[0]
    async with AsyncClient(e2e_server.url) as c:
        first = await c.submit("demoehr.create_patient", patient("E2E-9"), wait=90)
        assert first["state"] == "succeeded", first
        old_x, old_boot = desktop.host.pid, desktop.boot_id
        os.kill(old_x, signal.SIGKILL)  # the display server dies between runs; DemoEHR with it
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while (await desktop.info()).app_running:
            assert loop.time() < deadline, "DemoEHR outlived its X server"
            await asyncio.sleep(0.1)
        with pytest.raises(DesktopError):
            await desktop.screenshot()
        run = await c.submit("demoehr.search_patient", {"mrn": "E2E-9"}, wait=90)
        assert run["state"] == "succeeded", run
        attempts = await c.attempts(run["id"])
        events = await c.events(run["id"])
        everything = await c.all_events(limit=10000)
    assert run["output"]["count"] == 1
    # Pre-flight found no screen to capture and restarted the desktop: a new X server.
    assert desktop.host.pid != old_x and desktop.boot_id != old_boot == first_boot(everything, desktop.name)
    assert agent.boot_id == desktop.boot_id
    # The restart took the attempt with it, as a real reboot does: it had not started the
    # automation, so the run went back to the queue without spending a retry...
    assert [a["state"] for a in attempts] == ["lost", "succeeded"], attempts
    assert "came back without its attempt" in attempts[0]["reason"]
    requeued = [e["reason"] for e in events if e["kind"] == "run.state" and e["to_state"] == "queued"]
    assert requeued[1:] == ["requeued_not_started"], requeued
    # ...and the machine re-proved its state (login on the new display) before serving it.
    mine = [e for e in everything if e["machine"] == desktop.name]
    reboots = [e for e in mine if e["kind"] == "machine.connected" and e["data"]["rebooted"]]
    assert [e["data"]["boot_id"] for e in reboots] == [desktop.boot_id]
    kinds = [e["kind"] for e in mine if e["id"] > reboots[0]["id"]]
    assert kinds.index("machine.quarantined") < kinds.index("machine.verified")
    verified = next(e["id"] for e in mine if e["kind"] == "machine.verified" and e["id"] > reboots[0]["id"])
    [retried] = [e["id"] for e in events if e.get("to_state") == "assigned" and e["attempt"] == attempts[1]["id"]]
    assert verified < retried
    assert [e["data"]["playbook"] for e in mine if e["kind"] == "verify.playbook.step"] == ["login"]


def first_boot(events: list[dict], machine: str) -> str:
    return next(e["data"]["boot_id"] for e in events if e["kind"] == "machine.connected" and e["machine"] == machine)


def test_an_x_server_restart_takes_another_number_when_its_own_was_taken():
    from deskfleet.desktop.driver import capture_screen
    from deskfleet.desktop.xvfb import XvfbDisplay

    display = XvfbDisplay().start()
    number = display.number
    squatter = None
    try:
        os.kill(display.pid, signal.SIGKILL)  # dies; another desktop's Xvfb then takes its number
        squatter = XvfbDisplay(number=number)
        for _ in range(50):
            try:
                squatter.start()
                break
            except DesktopError:
                time.sleep(0.1)  # the killed server's socket is still going away
        assert squatter.display == f":{number}"
        display.restart()
        assert display.number != number
        assert capture_screen(display.display).shape[:2] == (768, 1024)
    finally:
        display.close()
        if squatter is not None:
            squatter.close()


async def test_a_session_that_ends_mid_run_is_recovered_by_the_automation(e2e_server, real_fleet):
    """DemoEHR ends the session when the form is opened (``--expire-at open_form``): the
    automation sees the login screen mid-run, calls ``ctx.recover()`` — the model's playbooks
    with the run's account — and carries on. One attempt, one patient."""
    fleet = await real_fleet(e2e_server, app_options=["--mfa", "--expire-at", "open_form"])
    async with AsyncClient(e2e_server.url) as c:
        run = await c.submit("demoehr.create_patient", patient("E2E-MID"), wait=120)
        assert run["state"] == "succeeded", run
        events = await c.events(run["id"])
    assert run["dispatches"] == 1, "recovered within the attempt, not by a retry"
    steps = [e["data"] for e in events if e["kind"] == "playbook.step"]
    before = [s["playbook"] for s in steps if not s.get("mid_run")]
    during = [s["playbook"] for s in steps if s.get("mid_run")]
    assert before == ["login", "mfa"]
    assert during == ["dismiss", "login", "mfa"], steps
    records = Records(fleet.data)
    assert len(records.find("E2E-MID")) == 1
    assert ("session_expired", "open_form") in {(k, s) for k, s, _, _ in records.faults()}
