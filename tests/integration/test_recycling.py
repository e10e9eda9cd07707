"""Recycling a leaking app between runs: a real orchestrator and real agents over their
WebSockets, on simulated machines whose app leaks memory with every record it saves.

The pool's policy says when; the leader's controller sees each machine's app memory (from
its heartbeats) and runs (from the store), and asks an idle machine's agent to restart its
app. Never mid-run: checked against every attempt's span on the machine.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest

from deskfleet.client import AsyncClient
from deskfleet.sim.faults import FaultPlan
from support import eventually

LEAK = 60.0  # MB a saved record adds to the app's memory
counter = itertools.count(1)


def patient() -> dict[str, str]:
    return {"mrn": f"RC-{next(counter)}", "name": "Grace Hopper", "dob": "1906-12-09"}


async def recycled_between_runs(c: AsyncClient, machine: str) -> list[dict]:
    """The machine's recycle events, each checked to lie outside every attempt's span there."""
    events = await c.all_events(limit=10_000)
    spans = []
    for run in (await c.runs(limit=1000))["runs"]:
        for a in await c.attempts(run["id"]):
            if a["machine"] == machine:
                spans.append((a["assigned_at"], a["ended_at"] or "9999"))
    recycled = [e for e in events if e["kind"] == "machine.recycled" and e["machine"] == machine]
    for e in recycled:
        inside = [s for s in spans if s[0] < e["at"] < s[1]]
        assert not inside, f"{machine} restarted its app mid-run: {e} during {inside}"
    return recycled


# Each rule comes due with the fourth run (the app starts at 180 MB; the first figures the
# controller sees are taken before any run): not before, so that there is one recycle.
@pytest.mark.parametrize(("rule", "why"), [
    ({"above_mb": 180 + 3.5 * LEAK}, "app memory"),
    ({"leak_mb_per_run": 20, "leak_window": 5}, "grows"),
    ({"after_runs": 4}, "runs since the app started"),
])
async def test_a_leaking_app_is_restarted_between_runs_by_the_pools_policy(server_factory, fleet_factory, rule, why):
    server = server_factory(controller_tick=0.1)
    fleet = await fleet_factory(server, count=1, fault_plan=FaultPlan(leak_mb_per_txn=LEAK))
    [d] = fleet.desktops
    async with AsyncClient(server.url) as c:
        await c.put_pool_policy("default", {"recycle": rule}, version=0)
        base = d.app.memory_mb
        assert base == 180.0
        # The controller's first look, before any run: once this server leads (which may take
        # longer than the fleet took to be ready), a few of its ticks.
        view = server.view()
        await eventually(lambda: any(e.kind == "replica.leader" for e in view.events(limit=10_000)))
        await asyncio.sleep(0.5)
        for _ in range(4):
            run = await c.submit("ehr.create_patient", patient(), wait=30)
            assert run["state"] == "succeeded", run
            # A real run takes minutes and the controller reads each machine's memory after it;
            # these take milliseconds: a heartbeat and a tick, so the trend has its readings.
            await asyncio.sleep(0.4)
        # Recycled once it was due and idle: the app restarted, its memory back to its base.
        await eventually(lambda: d.app.memory_mb == base, timeout=15)
        recycled = await recycled_between_runs(c, d.name)
        assert len(recycled) == 1 and recycled[0]["data"]["ok"] is True, recycled
        assert recycled[0]["data"]["memory_mb_before"] > recycled[0]["data"]["memory_mb_after"]
        [order] = [e for e in await c.all_events(limit=10_000) if e["kind"] == "machine.recycle"]
        assert why in order["reason"] and order["data"]["action"] == "restart_app", order
        assert order["data"]["figure"] > order["data"]["threshold"] or "runs" in why
        # The machine works on: the next run logs the fresh app in and succeeds.
        run = await c.submit("ehr.create_patient", patient(), wait=30)
        assert run["state"] == "succeeded", run


async def test_a_busy_machine_is_recycled_only_once_its_run_is_over(server_factory, fleet_factory):
    server = server_factory(controller_tick=0.1)
    fleet = await fleet_factory(server, count=1, fault_plan=FaultPlan(leak_mb_per_txn=LEAK))
    [d] = fleet.desktops
    async with AsyncClient(server.url) as c:
        for _ in range(3):
            assert (await c.submit("ehr.create_patient", patient(), wait=30))["state"] == "succeeded"
        # Due (memory above the limit) while a long run holds the machine.
        long_run = await c.submit("sim.work", {"key": "long", "seconds": 2.0})
        await eventually(lambda: server.view().get_machine(d.name).active_attempt_id is not None, timeout=10)
        await c.put_pool_policy("default", {"recycle": {"above_mb": 300}}, version=0)
        await asyncio.sleep(1.0)
        assert [e for e in await c.all_events(limit=10_000) if e["kind"] == "machine.recycled"] == []
        done = await c.run(long_run["id"], wait=30)
        assert done["state"] == "succeeded" and done["attempts_started"] == 1, done
        await eventually(lambda: d.app.memory_mb == 180.0, timeout=15)
        assert len(await recycled_between_runs(c, d.name)) == 1


async def test_the_agent_reports_an_os_waiting_for_a_reboot(live_server, fleet_factory):
    fleet = await fleet_factory(live_server, count=1)
    [d] = fleet.desktops
    view = live_server.view()
    assert view.get_machine(d.name).resources.get("reboot_pending") is False
    d.reboot_pending = True
    await eventually(lambda: view.get_machine(d.name).resources.get("reboot_pending") is True, timeout=10)
    await d.reboot()  # the update done
    await eventually(lambda: view.get_machine(d.name).resources.get("reboot_pending") is False, timeout=20)
