"""The fleet under faults: watchdogs, timeouts, affinity, pinning, the retry rule.

Real orchestrator over HTTP, real agents over WebSockets; simulated desktops, with faults
injected at the moment a test needs them.
"""

from __future__ import annotations

import asyncio
import itertools
import time

from deskfleet.audit import audit
from deskfleet.client import AsyncClient
from support import eventually, wait_ready

PATIENT = {"name": "Grace Hopper", "dob": "1906-12-09"}


def patient(mrn: str) -> dict[str, str]:
    return {"mrn": mrn, **PATIENT}


async def running_on(c: AsyncClient, run_id: str, timeout: float = 15.0) -> str:
    """Wait until the run's automation is running; return its machine."""
    async def check() -> str | None:
        run = await c.run(run_id)
        return run["current_machine"] if run["state"] == "running" else None

    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        machine = await check()
        if machine:
            return machine
        await asyncio.sleep(0.02)
    raise AssertionError(f"run {run_id} never ran (state {(await c.run(run_id))['state']})")


async def audited(c: AsyncClient) -> None:
    runs = (await c.runs(limit=1000))["runs"]
    events = await c.all_events(limit=10000)
    report = audit(runs, events)
    assert report.ok, report.violations


def desktop(fleet, name):
    return next(d for d in fleet.desktops if d.name == name)


async def test_frozen_app_is_caught_by_the_progress_watchdog(live_server, fleet_factory):
    fleet = await fleet_factory(live_server, count=1, action_delay=0.02)
    d = fleet.desktops[0]
    async with AsyncClient(live_server.url) as c:
        warm = await c.submit("ehr.lookup_patient", {"mrn": "FRZ-0"}, wait=20)  # logs the app in
        assert warm["state"] == "succeeded"
        # Slow input, so that the freeze lands before the automation's first click takes
        # effect: the click is swallowed and the automation waits for a screen that never
        # comes — while its agent keeps heartbeating ("green but stuck").
        d.action_delay = 0.3
        run = await c.submit("ehr.create_patient", patient("FRZ-1"), progress_timeout=0.8)
        machine = await running_on(c, run["id"])
        d.inject("freeze")
        d.action_delay = 0.02
        done = await c.run(run["id"], wait=30)
        assert done["state"] == "succeeded"
        attempts = await c.attempts(run["id"])
        assert attempts[0]["stop_reason"] == "progress_stalled"
        assert attempts[0]["machine"] == machine
        events = await c.events(run["id"])
        assert any(e["kind"] == "reconcile.done" for e in events), "retried only after reconcile"
        # The frozen machine was quarantined, then re-proved its state with a playbook.
        m_events = await c.all_events(limit=10000)
        assert ("machine.quarantined", machine) in [(e["kind"], e["machine"]) for e in m_events]
        restarts = [e for e in m_events if e["kind"].endswith("playbook.step")
                    and e["data"].get("playbook") == "restart_app"]
        assert restarts, "the unresponsive app was restarted by a playbook"
        await eventually(lambda: live_server.view().get_machine(machine).health.value == "online")
        assert fleet.backend.count_by_mrn("FRZ-1") == 1
        await audited(c)


async def test_attempt_timeout_stops_and_retries_until_the_budget_is_spent(live_server, fleet_factory):
    fleet = await fleet_factory(live_server, count=1, action_delay=0.0)
    async with AsyncClient(live_server.url) as c:
        # Log the app in first: the attempt timeout counts pre-flight too.
        assert (await c.submit("ehr.lookup_patient", {"mrn": "W-1"}, wait=20))["state"] == "succeeded"
        # Slow inputs: a lookup then takes seconds, far past the timeout and the sweep that
        # enforces it, even on a loaded machine (at 0.1 s an input it could finish first).
        fleet.desktops[0].action_delay = 0.4
        run = await c.submit("ehr.lookup_patient", {"mrn": "NOPE-1"}, attempt_timeout=0.6,
                             max_attempts=2, backoff_initial=0)
        done = await c.run(run["id"], wait=30)
    assert done["state"] == "failed"
    assert done["error"]["error"] == "retries_exhausted"
    attempts = await AsyncClient(live_server.url).attempts(run["id"])
    assert [a["stop_reason"] for a in attempts] == ["attempt_timeout", "attempt_timeout"]
    assert all(a["state"] == "timed_out" and a["started_at"] for a in attempts)
    assert done["attempts_started"] == 2


async def test_deadline_ends_the_run_wherever_it_is(live_server, fleet_factory):
    await fleet_factory(live_server, count=1, action_delay=0.2)
    async with AsyncClient(live_server.url) as c:
        run = await c.submit("ehr.lookup_patient", {"mrn": "DL-1"}, deadline=0.7)
        done = await c.run(run["id"], wait=30)
    assert done["state"] == "timed_out"
    assert done["error"]["error"] == "deadline"


async def test_queue_wait_times_out_when_no_machine_takes_the_run(live_server, fleet_factory):
    fleet = await fleet_factory(live_server, count=1)
    async with AsyncClient(live_server.url) as c:
        await c.machine_action(fleet.agents[0].machine_id, "cordon", "maintenance")
        run = await c.submit("ehr.lookup_patient", {"mrn": "Q-1"}, queue_timeout=0.4)
        done = await c.run(run["id"], wait=10)
        assert done["state"] == "timed_out"
        assert done["error"]["error"] == "queue_timeout"
        assert done["dispatches"] == 0


async def test_session_affinity_prefers_the_machine_already_logged_in(live_server, fleet_factory):
    await fleet_factory(live_server, count=3)
    async with AsyncClient(live_server.url) as c:
        first = await c.submit("ehr.lookup_patient", {"mrn": "A-0"}, session_key="clinic-a", wait=20)
        assert first["state"] == "succeeded"
        home = first["current_machine"]
        await eventually(lambda: live_server.view().get_machine(home).session_key == "clinic-a")
        for i in range(4):
            r = await c.submit("ehr.lookup_patient", {"mrn": f"A-{i + 1}"}, session_key="clinic-a", wait=20)
            assert r["state"] == "succeeded"
            assert r["current_machine"] == home, "a run with a session key goes where that session lives"


async def test_affinity_falls_back_after_the_pools_wait(live_server, fleet_factory):
    fleet = await fleet_factory(live_server, count=2, action_delay=0.05)
    async with AsyncClient(live_server.url) as c:
        await c.put_pool("default", affinity_wait=0.5)
        first = await c.submit("ehr.lookup_patient", {"mrn": "F-0"}, session_key="robot2", wait=20)
        home = first["current_machine"]
        await eventually(lambda: live_server.view().get_machine(home).session_key == "robot2")
        # Keep the preferred machine busy; the affine run waits, then takes the other one. Its
        # desktop slowed first, so the blocker outlasts the affinity wait however late this
        # test sees it running (on a loaded host it had sometimes all but finished by then).
        desktop(fleet, home).action_delay = 0.5
        blocker = await c.submit("ehr.create_patient", patient("F-BLOCK"), machine=home)
        await running_on(c, blocker["id"])
        r = await c.submit("ehr.lookup_patient", {"mrn": "F-1"}, session_key="robot2", wait=20)
        assert r["state"] == "succeeded"
        assert r["current_machine"] != home
        events = await c.events(r["id"])
        submitted = next(e for e in events if e["to_state"] == "queued")
        assigned = next(e for e in events if e["to_state"] == "assigned")
        from datetime import datetime

        waited = (datetime.fromisoformat(assigned["at"]) - datetime.fromisoformat(submitted["at"])).total_seconds()
        assert waited >= 0.45, f"fell back after {waited:.2f}s, before the pool's affinity wait"


async def test_many_simultaneous_runs_pinned_to_one_machine_never_overlap(live_server, fleet_factory):
    await fleet_factory(live_server, count=3)
    async with AsyncClient(live_server.url) as c:
        runs = await asyncio.gather(*(c.submit("ehr.lookup_patient", {"mrn": f"P-{i}"}, machine="sim-02")
                                      for i in range(25)))
        done = await asyncio.gather(*(c.run(r["id"], wait=60) for r in runs))
        assert {r["state"] for r in done} == {"succeeded"}
        assert {r["current_machine"] for r in done} == {"sim-02"}
        report = audit(done, await c.all_events(limit=10000))
        assert report.ok, report.violations
        assert report.attempts == 25
        ivs = [iv for iv in report.intervals if iv.machine == "sim-02"]
        assert all(a.end_event < b.start_event for a, b in itertools.pairwise(ivs))


async def test_a_non_idempotent_automation_without_reconcile_fails_loudly_when_lost(live_server, fleet_factory):
    fleet = await fleet_factory(live_server, count=2, action_delay=0.05)
    async with AsyncClient(live_server.url) as c:
        seed = await c.submit("ehr.create_patient", patient("EX-1"), wait=20)
        assert seed["state"] == "succeeded"
        run = await c.submit("ehr.export_summary", {"mrn": "EX-1"})
        machine = await running_on(c, run["id"])
        # A reboot mid-run: the agent comes back without the attempt, whose effect is unknown.
        desktop(fleet, machine).inject("reboot")
        done = await c.run(run["id"], wait=30)
        assert done["state"] == "failed"
        assert done["error"]["error"] == "not_retried_unsafe"
        assert "not idempotent" in done["error"]["message"]
        assert done["dispatches"] == 1
        assert fleet.backend.count_exports("EX-1") <= 1


async def test_preflight_failure_requeues_without_spending_retries(live_server, fleet_factory):
    await fleet_factory(live_server, count=1)
    async with AsyncClient(live_server.url) as c:
        # The vault's password for this account is wrong: pre-flight cannot log in.
        await c.put_account("nobody", app="simehr", username="nobody", password="not-the-password")
        run = await c.submit("ehr.lookup_patient", {"mrn": "PF-1"}, session_key="nobody", deadline=3)
        done = await c.run(run["id"], wait=20)
        assert done["state"] == "timed_out"
        assert done["attempts_started"] == 0, "pre-flight failures spend no retries"
        attempts = await c.attempts(run["id"])
        assert attempts and all(a["ending"] == "preflight_failed" for a in attempts[:-1])


async def test_drain_lets_the_current_run_finish_and_takes_no_new_work(live_server, fleet_factory):
    fleet = await fleet_factory(live_server, count=2, action_delay=0.05)
    async with AsyncClient(live_server.url) as c:
        run = await c.submit("ehr.create_patient", patient("DR-1"))
        machine = await running_on(c, run["id"])
        m = await c.machine_action(machine, "drain", "os update")
        assert m["status"] == "busy"
        assert (await c.run(run["id"], wait=20))["state"] == "succeeded"
        await eventually(lambda: live_server.view().get_machine(machine).active_attempt_id is None)
        assert (await c.machine(machine))["status"] == "drained"
        others = [await c.submit("ehr.lookup_patient", {"mrn": f"DR-{i}"}) for i in range(3)]
        for r in others:
            assert (await c.run(r["id"], wait=20))["current_machine"] != machine
        await c.machine_action(machine, "uncordon")
        pinned = await c.submit("ehr.lookup_patient", {"mrn": "DR-9"}, machine=machine, wait=20)
        assert pinned["state"] == "succeeded"
    assert fleet.backend.count_by_mrn("DR-1") == 1


async def test_a_reboot_while_idle_brings_the_machine_back(live_server, fleet_factory):
    fleet = await fleet_factory(live_server, count=1)
    d = fleet.desktops[0]
    d.fault_plan = type(d.fault_plan)(reboot_duration=0.3)
    old_boot = live_server.view().get_machine(d.name).boot_id
    d.inject("reboot")
    await eventually(lambda: live_server.view().get_machine(d.name).boot_id != old_boot)
    await wait_ready(live_server, {d.name})
    async with AsyncClient(live_server.url) as c:
        assert (await c.submit("ehr.lookup_patient", {"mrn": "RB-1"}, wait=20))["state"] == "succeeded"


async def test_a_machine_idle_past_the_heartbeat_timeout_keeps_its_new_lease(live_server, fleet_factory):
    """Idle beats are not acknowledged (protocol 2), so an agent idle for longer than the
    heartbeat timeout has acknowledged nothing lately. Its next assignment names the beat
    that renewed the new lease; counted from that, the agent does not fence itself at once,
    and the run — longer than the timeout, so it lives on acknowledged beats — succeeds on
    its first attempt."""
    fleet = await fleet_factory(live_server, count=1)
    [agent] = fleet.agents
    timeout = live_server.settings.heartbeat_timeout
    await asyncio.sleep(2 * timeout)
    # The premise: nothing acknowledged for longer than the fence allows.
    assert time.monotonic() - agent._last_ack > timeout
    async with AsyncClient(live_server.url) as c:
        run = await c.submit("sim.work", {"key": "idle-then-busy", "seconds": 2.5 * timeout}, wait=30)
        assert run["state"] == "succeeded", run
        attempts = await c.attempts(run["id"])
        assert [(a["number"], a["stop_reason"]) for a in attempts] == [(1, None)], attempts
