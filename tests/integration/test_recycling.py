"""Recycling a leaking app between runs: a real orchestrator and real agents over their
WebSockets, on simulated machines whose app leaks memory with every record it saves.

The pool's policy says when; the leader's controller sees each machine's app memory (from
its heartbeats) and runs (from the store), and asks an idle machine's agent to restart its
app. Never mid-run: checked against every attempt's span on the machine.

The same order updates a machine in a rolling maintenance with ``update: pack``: its agent
runs SimEHR's update hook, then a provider of the simulated machines (one that can reboot
them and not update them, as libvirt's and EC2's) reboots it.
"""

from __future__ import annotations

import asyncio
import builtins
import itertools
import time
from collections import Counter
from typing import Any

import pytest

from deskfleet.client import AsyncClient
from deskfleet.providers import (
    Capabilities,
    MachineProvider,
    ProviderError,
    ProviderMachine,
    ProviderState,
)
from deskfleet.sim.faults import FaultPlan
from support import eventually

LEAK = 60.0  # MB a saved record adds to the app's memory
counter = itertools.count(1)


def patient() -> dict[str, str]:
    return {"mrn": f"RC-{next(counter)}", "name": "Grace Hopper", "dob": "1906-12-09"}


async def recycled_between_runs(c: AsyncClient, machine: str, kind: str = "machine.recycled") -> list[dict]:
    """The machine's recycle events (or its ``kind`` of them), each checked to lie outside
    every attempt's span there."""
    events = await c.all_events(limit=10_000)
    spans = []
    for run in (await c.runs(limit=1000))["runs"]:
        for a in await c.attempts(run["id"]):
            if a["machine"] == machine:
                spans.append((a["assigned_at"], a["ended_at"] or "9999"))
    recycled = [e for e in events if e["kind"] == kind and e["machine"] == machine]
    for e in recycled:
        inside = [s for s in spans if s[0] < e["at"] < s[1]]
        assert not inside, f"{machine}: {kind} mid-run: {e} during {inside}"
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


# -- rolling maintenance with update "pack" -------------------------------------------------------

class SimMachines(MachineProvider):
    """The fleet's simulated machines as their hypervisor sees them: running, or rebooting.
    It reboots them (in the fleet's event loop: the server runs in a thread of its own) and
    can do nothing else — no update, as libvirt and EC2."""

    name = "sim"
    capabilities = Capabilities()

    def __init__(self) -> None:
        self.desktops: dict[str, Any] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.reboots: Counter[str] = Counter()
        self.created_at = time.time()

    def _machine(self, name: str) -> ProviderMachine:
        state = ProviderState.REBOOTING if self.desktops[name].rebooting else ProviderState.RUNNING
        return ProviderMachine(name, name, "default", state, {}, self.created_at, self.created_at)

    async def list(self, *, pool: str | None = None) -> builtins.list[ProviderMachine]:
        return [self._machine(n) for n in self.desktops]

    async def get(self, machine_id: str) -> ProviderMachine:
        return self._machine(machine_id)

    async def reboot(self, machine_id: str, *, token: str) -> None:
        assert self.loop is not None
        self.reboots[machine_id] += 1
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self.desktops[machine_id].reboot(), self.loop))

    async def _cannot(self, *args: object, **kwargs: object) -> Any:
        raise ProviderError("the simulated machines' provider only reboots", retryable=False)

    create = start = stop = power_off = destroy = tag = _cannot  # type: ignore[assignment]


UPDATE_POLICY = {"min": 3, "max": 3, "provider": "sim", "warm": {"min": 0, "max": 0},
                 "maintenance": {"max_unavailable": 1, "update": "pack", "timeout": 60}}


async def pack_update_world(server_factory, fleet_factory, tmp_path):
    provider = SimMachines()
    server = server_factory(controller_tick=0.1, providers={"sim": provider})
    fleet = await fleet_factory(server, count=3, fault_plan=FaultPlan(reboot_duration=0.3),
                                state_dir=tmp_path / "agents")
    provider.loop = asyncio.get_running_loop()
    provider.desktops = {d.name: d for d in fleet.desktops}
    view = server.view()
    await eventually(lambda: any(e.kind == "replica.leader" for e in view.events(limit=10_000)))
    return server, fleet, provider, view, tmp_path / "agents" / "data" / "simehr"


async def test_a_rolling_update_through_the_pack_runs_each_machines_hook_once_between_runs(
        server_factory, fleet_factory, tmp_path):
    server, fleet, provider, view, data = await pack_update_world(server_factory, fleet_factory, tmp_path)
    names = sorted(provider.desktops)
    boots = {d.name: d.boot_id for d in fleet.desktops}
    async with AsyncClient(server.url) as c:
        await c.put_pool_policy("default", UPDATE_POLICY, version=0)
        # Runs keep arriving: a busy machine is drained (its run ends first), never updated mid-run.
        runs = [(await c.submit("sim.work", {"key": f"up-{i}", "seconds": 0.4}))["id"] for i in range(3)]
        campaign = await c.start_maintenance("default", reason="2026-12 patches")
        for i in range(3, 12):
            runs.append((await c.submit("sim.work", {"key": f"up-{i}", "seconds": 0.3}))["id"])
            await asyncio.sleep(0.3)
        done = await eventually(lambda: (m := view.maintenance_campaign(campaign["id"])).finished
                                or m.state == "stalled", timeout=60)
        done = await c.maintenance("default", campaign["id"])
        assert done["state"] == "done" and done["counts"] == {"done": 3}, done
        # Each machine's hook ran once, by its own agent, between runs; then it was rebooted
        # through the provider, came back from a new boot and was verified.
        assert sorted((data / "os-updates").read_text().split()) == names
        for name in names:
            [updated] = await recycled_between_runs(c, name, "machine.updated")
            assert updated["data"]["ok"] is True and updated["data"]["packs"] == ["simehr"], updated
            assert "2026-12 patches" in updated["data"]["reason"]
        assert provider.reboots == Counter(names)
        assert all(d.boot_id != boots[d.name] for d in fleet.desktops)
        events = await c.all_events(limit=10_000)
        steps: dict[str, list[str]] = {}
        for e in events:
            if e["kind"] == "maintenance.step":
                steps.setdefault(e["machine"], []).append(e["reason"])
        assert steps == {n: ["draining", "updating", "rebooting", "verifying", "done"] for n in names}, steps
        assert {m["id"]: m["status"] for m in await c.machines()} == dict.fromkeys(names, "ready")
        for rid in runs:
            assert (await c.run(rid, wait=30))["state"] == "succeeded"


@pytest.mark.parametrize("how", ["the hook fails", "an agent older than protocol 7"])
async def test_a_failed_pack_update_fails_the_machine_and_stalls_the_campaign(server_factory, fleet_factory, tmp_path,
                                                                              how):
    server, _fleet, provider, view, data = await pack_update_world(server_factory, fleet_factory, tmp_path)
    first = sorted(provider.desktops)[0]  # taken out first (idle machines go by name)
    if how == "the hook fails":
        data.mkdir(parents=True, exist_ok=True)
        (data / "os-updates.fail").write_text(f"{first}\n")
        why = "RuntimeError: update KB5031356 failed to install"
    else:
        server.orch.hub.connections[first].protocol = 6  # as it said in its hello
        why = "its agent speaks protocol 6; running its pack's update hook needs 7"
    async with AsyncClient(server.url) as c:
        await c.put_pool_policy("default", UPDATE_POLICY, version=0)
        campaign = await c.start_maintenance("default")
        await eventually(lambda: view.maintenance_campaign(campaign["id"]).state != "running", timeout=30)
        after = await c.maintenance("default", campaign["id"])
        assert after["state"] == "stalled" and after["counts"] == {"failed": 1, "pending": 2}, after
        assert why in after["machines"][first]["detail"], after["machines"][first]
        # Left out of service for a person to look at, not rebooted; nothing more taken out.
        assert provider.reboots == Counter()
        machines = {m["id"]: m["status"] for m in await c.machines()}
        assert machines[first] == "cordoned" and list(machines.values()).count("ready") == 2, machines
        [failed] = [e for e in await c.all_events(limit=10_000) if e["kind"] == "maintenance.machine_failed"]
        assert failed["machine"] == first and why in failed["reason"]
        assert not (data / "os-updates").exists()


async def test_an_update_order_repeated_after_it_ran_is_answered_again_not_run_twice(
        server_factory, fleet_factory, tmp_path):
    """The controller asks again when an answer is late; an order that crossed the answer
    gets the same report (``repeated``), and the hook does not run a second time. Another
    campaign's order (another reason) runs it again."""
    server, _fleet, provider, view, data = await pack_update_world(server_factory, fleet_factory, tmp_path)
    first = sorted(provider.desktops)[0]

    def answers() -> list:
        return [e for e in view.events(limit=10_000) if e.kind == "machine.updated" and e.machine_id == first]

    for asked in range(1, 4):
        server.orch.dispatch.recycle(first, "update", "maintenance 7: 2026-12 patches" if asked < 3 else "maintenance 8")
        await eventually(lambda n=asked: len(answers()) == n, timeout=10)
    said = [(e.data["reason"], e.data["ok"], e.data.get("repeated", False)) for e in answers()]
    assert said == [("maintenance 7: 2026-12 patches", True, False), ("maintenance 7: 2026-12 patches", True, True),
                    ("maintenance 8", True, False)], said
    assert (data / "os-updates").read_text().split() == [first, first]  # once per campaign
