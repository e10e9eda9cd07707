"""The main path end to end: submit over HTTP → simulated machine → result."""

from __future__ import annotations

import asyncio

from deskfleet.client import AsyncClient


async def test_create_patient_end_to_end(live_server, fleet_factory):
    fleet = await fleet_factory(live_server, count=2)
    async with AsyncClient(live_server.url) as c:
        runs = [await c.submit("ehr.create_patient", {"mrn": f"S{i}", "name": f"P {i}", "dob": "1990-02-03"})
                for i in range(6)]
        done = await asyncio.gather(*(c.run(r["id"], wait=30) for r in runs))
    assert [r["state"] for r in done] == ["succeeded"] * 6
    for i, r in enumerate(done):
        assert r["output"]["mrn"] == f"S{i}"
        assert fleet.backend.count_by_mrn(f"S{i}") == 1
    assert {r["current_machine"] for r in done} <= {"sim-01", "sim-02"}
