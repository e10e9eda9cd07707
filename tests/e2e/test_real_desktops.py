"""The real path, end to end: Xvfb displays, DemoEHR, agents, an orchestrator.

Each test starts its own machines (an X server and DemoEHR each), with DemoEHR's fault
switches set as the scenario needs, submits runs through the HTTP API, and checks both
what the orchestrator recorded and what DemoEHR's records file holds.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from deskfleet.client import AsyncClient
from deskfleet.demoapp import Records

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
    records = Records(fleet.config.data)
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
    records = Records(fleet.config.data)
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
    assert len(Records(fleet.config.data).find("E2E-4")) == 1


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
    assert restarts and "does not respond" in restarts[0]["data"]["why"]
    assert restarts[0]["data"]["from_state"] == "home"
    assert len(Records(fleet.config.data).find("E2E-5")) == 1


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
