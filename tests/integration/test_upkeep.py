"""Session upkeep: an idle machine runs its pack's keep-alive before the app's idle logout,
never during a run — so the next run's pre-flight finds the session alive (no login, no
MFA prompt). Real orchestrator and agents; SimEHR with an idle timeout."""

from __future__ import annotations

import asyncio

from deskfleet.client import AsyncClient
from deskfleet.sim import FaultPlan

IDLE = FaultPlan(session_ttl=7.0, session_idle=True)  # SimEHR's keep-alive margin is 5 s


def playbooks(events: list[dict]) -> list[str]:
    return [e["data"]["playbook"] for e in events if e["kind"] == "playbook.step"]


async def quiet_then_run(server, fleet_factory, *, upkeep: bool) -> tuple[list[str], list[dict]]:
    await fleet_factory(server, count=1, fault_plan=IDLE, upkeep=upkeep)
    async with AsyncClient(server.url) as c:
        first = await c.submit("ehr.lookup_patient", {"mrn": "UP-1"}, wait=20)
        assert first["state"] == "succeeded", first
        assert playbooks(await c.events(first["id"])) == ["login"]
        await asyncio.sleep(12.0)  # idle for longer than the app's 7 s idle timeout
        second = await c.submit("ehr.lookup_patient", {"mrn": "UP-1"}, wait=20)
        assert second["state"] == "succeeded", second
        steps = playbooks(await c.events(second["id"]))
        machine_events = [e for e in await c.all_events(limit=10000) if e["kind"] == "session.keepalive"]
    return steps, machine_events


async def test_an_idle_machine_keeps_its_session_alive(live_server, fleet_factory):
    steps, keepalives = await quiet_then_run(live_server, fleet_factory, upkeep=True)
    assert steps == [], "the session survived the quiet spell: no login in pre-flight"
    assert keepalives and all(e["data"]["ok"] for e in keepalives), keepalives
    assert {e["data"]["account"] for e in keepalives} == {"robot1"}


async def test_without_upkeep_the_session_lapses_and_preflight_logs_in_again(live_server, fleet_factory):
    steps, keepalives = await quiet_then_run(live_server, fleet_factory, upkeep=False)
    assert steps == ["dismiss", "login"]
    assert keepalives == []
