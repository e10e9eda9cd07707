"""Machines' figures over time (app memory, CPU): kept by the store from the heartbeats the hub
marks, read through the API and drawn by the dashboard; a day of them kept."""

from __future__ import annotations

import asyncio

import httpx
from test_store import T0, add_machine

from deskfleet.sim.faults import FaultPlan
from deskfleet.store import SQLStore
from deskfleet.store.base import Heartbeat
from support import eventually


def test_a_sampled_beat_is_kept_and_a_plain_one_is_not(s: SQLStore) -> None:
    add_machine(s, "m1")
    add_machine(s, "m2")
    s.heartbeat([Heartbeat("m1", T0 + 60, {"memory_mb": 180.0, "cpu_percent": 3.0}, sample=True),
                 Heartbeat("m2", T0 + 60, {"memory_mb": 90.0}, sample=False)], lease_timeout=5)
    s.heartbeat([Heartbeat("m1", T0 + 120, {"memory_mb": 240.5, "cpu_percent": 7.5}, sample=True)], lease_timeout=5)
    assert s.machine_samples(T0) == {"m1": [(T0 + 60, 180.0, 3.0), (T0 + 120, 240.5, 7.5)]}
    assert s.machine_samples(T0 + 100) == {"m1": [(T0 + 120, 240.5, 7.5)]}
    assert s.machine_samples(T0, ["m2"]) == {}
    # Pruned oldest first, a bounded number a call.
    for i in range(5):
        s.heartbeat([Heartbeat("m2", T0 + 200 + i, {"memory_mb": 1.0 + i}, sample=True)], lease_timeout=5)
    assert s.prune_machine_samples(T0 + 203, limit=2) == 2  # m1's two, the oldest
    assert s.prune_machine_samples(T0 + 203, limit=100) == 3  # then m2's before 203
    assert s.machine_samples(T0) == {"m2": [(T0 + 203, 4.0, 0.0), (T0 + 204, 5.0, 0.0)]}


async def test_a_leaking_apps_memory_over_time_through_the_api(server_factory, fleet_factory) -> None:
    server = server_factory(sample_interval=0.2)
    await fleet_factory(server, count=1, fault_plan=FaultPlan(leak_mb_per_txn=50.0))
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
        for i in range(3):
            run = (await c.post("/v1/runs", params={"wait": 30}, json={
                "automation": "ehr.create_patient", "input": {"mrn": f"MS-{i}", "name": "Ada", "dob": "1990-01-01"}}))
            assert run.json()["state"] == "succeeded", run.text
            await asyncio.sleep(0.3)

        async def grown() -> list[dict]:
            # A beat a sample at most every 0.2 s: one during a save may be missed (a loaded
            # host), so wait for the grown figure and a few points, later ones at 330.
            points = (await c.get("/v1/machines/sim-01/samples", params={"hours": 1})).json()
            return points if len(points) >= 4 and points[-1]["memory_mb"] >= 330.0 else []

        points = []
        for _ in range(100):
            if points := await grown():
                break
            await asyncio.sleep(0.1)
        assert points, "the app's memory after three saves"
        memory = [p["memory_mb"] for p in points]
        assert memory[0] == 180.0 and memory == sorted(memory), memory  # it only grows: a leak
        assert all(p["cpu_percent"] >= 0 for p in points)
        assert (await c.get("/v1/machines/nope/samples")).status_code == 404
        assert (await c.get("/v1/machines/sim-01/samples", params={"hours": 25})).status_code == 422
    view = server.view()
    await eventually(lambda: "sim-01" in view.machine_samples(0))
