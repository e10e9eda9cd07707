"""A backlog starts longest first, by durations the orchestrator learnt from the runs that
ended — or strictly as queued, when the server is told so (``--backlog-order queued``).
Real server, real agent, simulated desktop; the order is read from the event log."""

from __future__ import annotations

import pytest

from deskfleet.client import AsyncClient
from support import LiveServer

LONG, SHORT = ("sim.work_long", 0.3), ("sim.work_short", 0.02)


async def assignment_order(server: LiveServer, c: AsyncClient, backlog: list[tuple[str, float]]) -> list[str]:
    """Cordon the only machine, queue ``backlog`` in order, uncordon: the automations in the
    order their runs were assigned."""
    [machine] = [m["id"] for m in await c.machines()]
    await c.machine_action(machine, "cordon")
    ids = []
    for i, (name, seconds) in enumerate(backlog):
        ids.append((await c.submit(name, {"key": f"b{i}-{name}", "seconds": seconds}))["id"])
    await c.machine_action(machine, "uncordon")
    for run_id in ids:
        assert (await c.run(run_id, wait=30))["state"] == "succeeded"
    names = {run_id: name for run_id, (name, _) in zip(ids, backlog, strict=True)}
    events = await c.all_events(limit=10000)
    return [names[e["run"]] for e in events
            if e["kind"] == "run.state" and e["to_state"] == "assigned" and e["run"] in names]


async def learn(c: AsyncClient) -> None:
    for name, seconds in (LONG, SHORT, LONG, SHORT):
        assert (await c.submit(name, {"key": f"learn-{name}-{seconds}", "seconds": seconds}, wait=30))["state"] \
            == "succeeded"


BACKLOG = [SHORT, SHORT, LONG, SHORT, LONG]


async def test_a_backlog_starts_longest_first_once_durations_are_known(live_server, fleet_factory):
    await fleet_factory(live_server, count=1)
    async with AsyncClient(live_server.url) as c:
        await learn(c)
        book = live_server.orch.policy.durations
        assert book is not None
        long_s, short_s = book.estimate("sim.work_long"), book.estimate("sim.work_short")
        assert long_s is not None and short_s is not None and long_s > 0.3 > short_s
        order = await assignment_order(live_server, c, BACKLOG)
    assert order == ["sim.work_long", "sim.work_long", "sim.work_short", "sim.work_short", "sim.work_short"]


async def test_the_server_can_keep_a_backlog_strictly_as_queued(server_factory, fleet_factory):
    server = server_factory(backlog_order="queued")
    await fleet_factory(server, count=1)
    assert server.orch.policy.durations is None
    async with AsyncClient(server.url) as c:
        await learn(c)
        order = await assignment_order(server, c, BACKLOG)
    assert order == [name for name, _ in BACKLOG]


def test_an_unknown_backlog_order_is_refused(tmp_path):
    from deskfleet.config import ServerSettings
    from deskfleet.errors import ConfigError

    with pytest.raises(ConfigError, match="backlog order 'random': choose longest-first or queued"):
        ServerSettings(data_dir=tmp_path, backlog_order="random")
