"""The server's services on their own, each given fakes for the protocols it calls (no
store, no sockets): what one service tells another, and what reaches the other replicas.
The services together, over HTTP and real agents, are the integration tests' business."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

from pydantic import BaseModel

from deskfleet.fleet.bus import LocalBus
from deskfleet.metrics import Metrics
from deskfleet.models import RunState, StopOrder, StopReason
from deskfleet.protocol import Stop
from deskfleet.scheduler import Policy
from deskfleet.services.dispatch import Dispatch
from deskfleet.services.finals import Finals
from deskfleet.services.replicas import Replicas
from support import fast_settings, queued_run


class Heard:
    """Hints a service sent (``services.replicas.Hints``)."""

    def __init__(self) -> None:
        self.hints: list[tuple[str, str]] = []

    def hint(self, kind: str, payload: str = "") -> None:
        self.hints.append((kind, payload))


class Bus(LocalBus):
    def __init__(self) -> None:
        self.published: list[tuple[str, str]] = []

    async def publish(self, kind: str, payload: str = "") -> None:
        self.published.append((kind, payload))


class Conn:
    def __init__(self) -> None:
        self.sent: list[BaseModel] = []

    async def send(self, msg: BaseModel) -> bool:
        self.sent.append(msg)
        return True


class Agents:
    """Agents connected to this replica (``services.dispatch.AgentLink``)."""

    def __init__(self, *machines: str) -> None:
        self.connections = {m: Conn() for m in machines}
        self.verify: list[tuple[str, str]] = []

    async def send(self, machine_id: str, msg: BaseModel) -> bool:
        conn = self.connections.get(machine_id)
        return conn is not None and await conn.send(msg)

    async def send_assignment(self, machine_id: str, msg: BaseModel) -> bool:
        return await self.send(machine_id, msg)

    async def request_verify(self, conn: Any, reason: str) -> None:
        self.verify.append((next(m for m, c in self.connections.items() if c is conn), reason))


def dispatch(tmp_path: Path, agents: Agents, heard: Heard) -> Dispatch:
    unused = cast(Any, None)  # the store side: these tests never reach it
    return Dispatch(unused, unused, fast_settings(tmp_path), policy=Policy(), agents=cast(Any, agents),
                    grants=unused, secrets=unused, metrics=Metrics(), finals=Finals(heard, multi=False),
                    replicas=heard, replica_id="r-test")


async def test_hints_go_out_only_with_several_replicas_and_come_in_to_their_handler() -> None:
    alone = Bus()
    Replicas(alone, multi=False).hint("wake")
    bus = Bus()
    replicas = Replicas(bus, multi=True)
    replicas.hint("final", "run-1")
    await asyncio.sleep(0)
    assert (alone.published, bus.published) == ([], [("final", "run-1")])

    got: list[str] = []
    replicas.on("catalog", got.append)
    replicas._received("catalog", "")
    replicas._received("something-newer", "x")  # a newer replica's hint: ignored
    assert got == [""]


async def test_hints_given_while_one_is_sent_go_together_one_notification_per_kind() -> None:
    class SlowBus(Bus):
        async def publish(self, kind: str, payload: str = "") -> None:
            await asyncio.sleep(0.01)
            await super().publish(kind, payload)

    bus = SlowBus()
    replicas = Replicas(bus, multi=True)
    replicas.hint("final", "run-0")
    await asyncio.sleep(0)  # run-0 is being sent
    for i in range(1, 2001):
        replicas.hint("final", f"run-{i}")
        replicas.hint("wake")
    replicas.hint("verify", "m-1:screen\nnot as expected")
    while replicas._sender is not None and not replicas._sender.done():
        await asyncio.sleep(0.01)
    kinds = [k for k, _ in bus.published]
    assert kinds[0] == "final" and kinds.count("wake") == 1 and kinds.count("verify") == 1
    assert all(len(p.encode()) < 8000 for _, p in bus.published)  # PostgreSQL's limit
    assert 3 <= kinds.count("final") <= 5  # 2,001 ids of ~9 bytes in chunks under the limit
    got: dict[str, list[str]] = {"final": [], "wake": [], "verify": []}
    for kind in got:
        replicas.on(kind, got[kind].append)
    for kind, payload in bus.published:
        replicas._received(kind, payload)
    assert got["final"] == [f"run-{i}" for i in range(2001)]  # each once, in order
    assert got["wake"] == [""] and got["verify"] == ["m-1:screen not as expected"]


async def test_a_final_run_wakes_its_waiters_and_tells_the_other_replicas() -> None:
    heard = Heard()
    finals = Finals(heard, multi=True)
    waiting, gave_up = finals.watch("run-1"), finals.watch("run-1")
    finals.unwatch("run-1", gave_up)
    finals.run_changed(queued_run("run-1", state=RunState.RUNNING))
    assert not waiting.done() and heard.hints == []
    finals.run_changed(queued_run("run-1", state=RunState.SUCCEEDED))
    assert waiting.done() and not gave_up.done()
    assert heard.hints == [("final", "run-1")]
    finals.resolve("run-1")  # another replica's hint after ours: nobody left to wake


async def test_a_stop_order_goes_to_the_agent_here_or_as_a_hint_to_the_replica_that_has_it(tmp_path: Path) -> None:
    agents, heard = Agents("m-1"), Heard()
    d = dispatch(tmp_path, agents, heard)
    await d.send_stop(StopOrder(machine_id="m-1", attempt_id=7, run_id="run-1", reason=StopReason.CANCELLED))
    await d.send_stop(StopOrder(machine_id="m-2", attempt_id=8, run_id="run-2", reason=StopReason.DEADLINE))
    assert agents.connections["m-1"].sent == [Stop(attempt_id=7, reason="cancelled")]
    assert heard.hints == [("stop", "m-2:8:deadline")]

    # …and on the replica the agent is connected to, the hint becomes the order
    d.stop_hinted("m-1:8:deadline")
    d.stop_hinted("m-3:9:deadline")  # not connected here either: the order waits in the database
    d.verify_hinted("m-1:stuck on a dialog")
    await asyncio.sleep(0)
    assert agents.connections["m-1"].sent[1:] == [Stop(attempt_id=8, reason="deadline")]
    assert agents.verify == [("m-1", "stuck on a dialog")]


async def test_a_wake_is_told_to_the_other_replicas_only_when_asked(tmp_path: Path) -> None:
    heard = Heard()
    d = dispatch(tmp_path, Agents(), heard)
    d.wake()
    d.wake(others=True)
    d.woken("")
    assert heard.hints == [("wake", "")]
