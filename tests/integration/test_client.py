"""The async client under concurrency: requests spread over a few connection pools ("lanes"),
each answered as one pool would answer it."""

from __future__ import annotations

import asyncio

from deskfleet import client as client_module
from deskfleet.client import ApiError, AsyncClient
from support import LiveServer


async def test_concurrent_requests_share_lanes_and_each_gets_its_answer(live_server: LiveServer,
                                                                       fleet_factory) -> None:
    await fleet_factory(live_server, count=1)
    n = 3 * client_module.LANES * client_module.LANE_SIZE
    async with AsyncClient(live_server.url) as c:
        one = await c.submit("ehr.lookup_patient", {"mrn": "L-one"})
        assert len(c._lanes) == 1  # one request at a time: one pool
        runs = await asyncio.gather(*(c.submit("ehr.lookup_patient", {"mrn": f"L-{i}"}) for i in range(n)))
        assert [r["input"]["mrn"] for r in runs] == [f"L-{i}" for i in range(n)]
        assert len({r["id"] for r in runs} | {one["id"]}) == n + 1
        assert 1 < len(c._lanes) <= client_module.LANES
        assert c._busy == [0] * len(c._lanes)
        # an error is still the server's answer, and the lane is free again after it
        try:
            await c.submit("ehr.no_such_thing", {})
        except ApiError as exc:
            assert exc.status == 404 and exc.field == "automation"
        else:
            raise AssertionError("expected a 404")
        assert c._busy == [0] * len(c._lanes)
    assert all(lane.is_closed for lane in c._lanes)
