"""Effects outside the desktop, and a process that was paused past its lease.

A real orchestrator over HTTP and a real agent over its WebSocket, driving automations of
this test's own (an effect appended to a list stands for an API call or a file written).
A pause is a stall of the agent's event loop (``time.sleep`` in a callback): to the agent
the same as a SIGSTOP — the monotonic clock jumps, and every timer is due at once. The
orchestrator runs in its own thread and keeps time meanwhile. The real SIGSTOP, of real
processes, is in tests/acceptance/test_faults.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from deskfleet import Agent, AgentConfig, App, Context, Lease, Registry, automation
from deskfleet.client import AsyncClient
from deskfleet.protocol import Stop
from deskfleet.sim.backend import SimBackend
from deskfleet.sim.desktop import SimDesktop
from support import eventually, running_agent

effects: list[tuple[str, int]] = []  # (key, attempt): the effects made, as the outside world saw them
sleeping = asyncio.Event()
sleeping_sync = threading.Event()
leases: list[tuple[Lease, float, float]] = []  # what t.fenced was handed: (lease, asked at, last ack then)
running: list[Agent] = []


class Work(BaseModel):
    key: str
    seconds: float = 0.5


class Done(BaseModel):
    key: str


@automation(name="t.unfenced", required_state="any", idempotent=True)
async def unfenced(ctx: Context, data: Work) -> Done:
    """Its effect goes neither through the desktop nor through ctx.fenced()."""
    await ctx.progress("work")
    sleeping.set()
    await asyncio.sleep(data.seconds)
    effects.append((data.key, ctx.attempt_id))
    return Done(key=data.key)


@automation(name="t.fenced", required_state="any", idempotent=True)
async def fenced(ctx: Context, data: Work) -> Done:
    await ctx.progress("work")
    sleeping.set()
    await asyncio.sleep(data.seconds)
    asked = time.monotonic()
    async with ctx.fenced() as lease:
        effects.append((data.key, lease.token))
        leases.append((lease, asked, running[0]._last_ack))
    return Done(key=data.key)


@automation(name="t.fenced_sync", required_state="any")
def fenced_sync(ctx: Context, data: Work) -> Done:
    """A plain function, run in a worker thread: cancelling its task cannot stop the thread,
    so the fence is what keeps the effect from happening."""
    sleeping_sync.set()
    time.sleep(data.seconds)
    with ctx.fenced() as lease:
        effects.append((data.key, lease.token))
    return Done(key=data.key)


@pytest.fixture
async def agent(live_server, tmp_path: Path) -> AsyncIterator[Agent]:
    global sleeping
    sleeping = asyncio.Event()  # of this test's event loop
    effects.clear()
    leases.clear()
    sleeping_sync.clear()
    backend = SimBackend(tmp_path / "ehr.db")
    app = App(desktop=SimDesktop("fx-01", backend), registry=Registry([unfenced, fenced, fenced_sync]))
    a = Agent(AgentConfig(servers=[live_server.url], machine="fx-01", enrolment_token=live_server.token), app)
    running[:] = [a]
    try:
        async with running_agent(live_server, a, "fx-01"):
            yield a
    finally:
        backend.close()


async def pause_before_the_effect(seconds: float, pause: float) -> None:
    """Stall this event loop for ``pause`` seconds, from 30 ms before the automation's sleep ends
    (so that the automation's timer, not a periodic check's, is likely the next one due)."""
    await asyncio.wait_for(sleeping.wait(), 10)
    await asyncio.sleep(seconds - 0.03)
    time.sleep(pause)


@pytest.fixture
def stop_orders_lost(live_server, monkeypatch):
    """The orchestrator's stop orders never arrive — as when the hub closed a silent agent's
    connection before the lease expired: the agent must stop on its own."""
    hub = live_server.orch.hub
    send = hub.send

    async def no_stops(machine_id: str, msg) -> bool:
        return False if isinstance(msg, Stop) else await send(machine_id, msg)

    monkeypatch.setattr(hub, "send", no_stops)


@pytest.mark.parametrize("name", ["t.unfenced", "t.fenced"])
async def test_an_agent_paused_past_its_lease_stops_its_automation_before_it_runs_again(
        live_server, agent, stop_orders_lost, name):
    timeout = live_server.settings.heartbeat_timeout
    async with AsyncClient(live_server.url) as c:
        run = await c.submit(name, {"key": "K", "seconds": 0.5})
        await pause_before_the_effect(0.5, 2 * timeout)
        # The lease expired meanwhile; the agent stops, reports, and its report is refused.
        await eventually(lambda: not agent.busy, timeout=10)
        [first] = await c.attempts(run["id"])
        assert (first["state"], first["ending"]) == ("lost", "lost"), first
        await asyncio.sleep(0.5)
        assert effects == []  # the paused attempt's effect never happened
        events = await c.all_events(limit=1000)
        paused = [e for e in events if e["kind"] == "agent.paused"]
        assert len(paused) == 1 and paused[0]["machine"] == "fx-01", paused
        assert paused[0]["data"]["attempt"] == first["id"] and paused[0]["data"]["fenced"] is True
        assert paused[0]["data"]["seconds"] >= 2 * timeout - 0.2


async def test_a_short_pause_within_the_lease_is_reported_and_the_run_goes_on(live_server, agent):
    async with AsyncClient(live_server.url) as c:
        live = live_server.settings.heartbeat_timeout
        run = await c.submit("t.fenced", {"key": "S", "seconds": 0.5})
        await pause_before_the_effect(0.5, 0.3 * live)
        done = await c.run(run["id"], wait=30)
        assert done["state"] == "succeeded", done
        assert [a["number"] for a in await c.attempts(run["id"])] == [1]
        assert effects == [("S", done["current_attempt"])]


async def test_a_cancelled_runs_fenced_effect_is_refused_even_from_a_thread(live_server, agent):
    async with AsyncClient(live_server.url) as c:
        run = await c.submit("t.fenced_sync", {"key": "C", "seconds": 1.0})
        await asyncio.to_thread(sleeping_sync.wait, 10)
        await c.cancel(run["id"])
        done = await c.run(run["id"], wait=30)
        assert done["state"] == "cancelled", done
        await asyncio.sleep(1.2)  # the thread wakes up and tries its effect
        assert effects == []


async def test_a_fenced_effects_deadline_counts_from_a_lease_renewed_for_it(live_server, agent):
    """The lease is renewed with the orchestrator at the moment of the effect: the deadline
    handed to the block counts from that renewal (a little before the heartbeat timeout
    from asking), later than the last acknowledged heartbeat alone would give."""
    timeout = live_server.settings.heartbeat_timeout
    async with AsyncClient(live_server.url) as c:
        run = await c.submit("t.fenced", {"key": "R", "seconds": 0.3}, wait=20)
        assert run["state"] == "succeeded", run
    [(lease, asked, last_ack)] = leases
    assert lease.token == run["current_attempt"]
    assert lease.deadline > last_ack + 0.9 * timeout
    assert asked + 0.9 * timeout <= lease.deadline <= asked + 0.9 * timeout + 0.5
