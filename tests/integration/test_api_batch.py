"""Batch submit: ``POST /v1/runs:batch`` and the clients' ``submit_batch`` / ``submit_many``.

Each run of a batch is checked and answered on its own — created, existing (its idempotency
key made a run before, for the same request), conflict (the key was used for another
request) or invalid — and one refused run never refuses the others; the admitted ones are
stored in one transaction and then run like any other.
"""

from __future__ import annotations

import httpx
import pytest

from deskfleet.client import AsyncClient
from support import LiveServer


def lookup(mrn: str, **options: object) -> dict[str, object]:
    return {"automation": "ehr.lookup_patient", "input": {"mrn": mrn}, **options}


async def batch(server: LiveServer, runs: list[dict[str, object]], status: int = 200) -> dict:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
        resp = await c.post("/v1/runs:batch", json={"runs": runs})
    assert resp.status_code == status, resp.text
    return resp.json()


async def test_each_run_of_a_batch_is_answered_on_its_own(live_server, fleet_factory):
    await fleet_factory(live_server, count=2)
    async with AsyncClient(live_server.url) as c:
        before = await c.submit("ehr.lookup_patient", {"mrn": "B-0"}, idempotency_key="b-0")
    answer = await batch(live_server, [
        lookup("B-1", idempotency_key="b-1"),
        lookup("B-0", idempotency_key="b-0"),  # the same request as before: that run
        lookup("B-other", idempotency_key="b-0"),  # the same key, another request
        lookup("B-2", priority="high"),  # not a number
        {"automation": "ehr.delete_everything", "input": {}},  # no such automation
        lookup("B-3", colour="blue"),  # no such field
        lookup("B-1", idempotency_key="b-1"),  # twice in one batch: the first one's run
        lookup("B-4", pool="nowhere"),
    ])
    results = answer["results"]
    assert [r["index"] for r in results] == list(range(8))
    assert [r["status"] for r in results] == ["created", "existing", "conflict", "invalid", "invalid", "invalid",
                                               "existing", "invalid"]
    assert (answer["created"], answer["existing"], answer["conflict"], answer["invalid"]) == (1, 2, 1, 4)
    assert results[1]["run"]["id"] == before["id"] and results[6]["run"]["id"] == results[0]["run"]["id"]
    assert results[2]["error"]["error"] == "conflict" and before["id"] in results[2]["error"]["message"]
    assert results[3]["error"]["field"] == "priority"
    assert results[4]["error"]["error"] == "not_found" and "ehr.lookup_patient" in results[4]["error"]["message"]
    assert "colour: unknown field" in results[5]["error"]["message"]
    assert "unknown pool 'nowhere'" in results[7]["error"]["message"]
    assert all(r["run"] is None for r in results if r["status"] in ("conflict", "invalid"))
    # the created run runs like any other
    async with AsyncClient(live_server.url) as c:
        done = await c.run(results[0]["run"]["id"], wait=20)
        assert done["state"] == "succeeded" and done["output"]["mrn"] == "B-1"
        # the same batch again: nothing new is created
        every = len(await c.every_run())
    again = await batch(live_server, [lookup("B-1", idempotency_key="b-1"), lookup("B-0", idempotency_key="b-0")])
    assert [r["status"] for r in again["results"]] == ["existing", "existing"]
    async with AsyncClient(live_server.url) as c:
        assert len(await c.every_run()) == every


async def test_a_batch_out_of_bounds_is_refused_whole(server_factory, fleet_factory):
    server = server_factory(max_batch_bytes=64 << 10)
    await fleet_factory(server, count=1)
    empty = await batch(server, [], status=422)
    assert empty["field"] == "runs" and "at least 1" in empty["message"]
    too_many = await batch(server, [lookup(f"M-{i}") for i in range(1001)], status=422)
    assert "at most 1000" in too_many["message"]
    big = await batch(server, [lookup("X" * 200) for _ in range(400)], status=413)
    assert big["error"] == "payload_too_large"
    async with AsyncClient(server.url) as c:
        assert await c.every_run() == []  # nothing of a refused batch was stored


async def test_submit_many_sends_any_number_in_batches_and_keeps_their_order(live_server, fleet_factory):
    await fleet_factory(live_server, count=2)
    runs = [lookup(f"MANY-{i}", idempotency_key=f"many-{i}") for i in range(1200)]
    async with AsyncClient(live_server.url) as c:
        results = await c.submit_many(runs, batch=500)
        assert [r["index"] for r in results] == list(range(1200))
        assert {r["status"] for r in results} == {"created"}
        assert [r["run"]["input"]["mrn"] for r in results] == [f"MANY-{i}" for i in range(1200)]
        again = await c.submit_many([*runs[:10], lookup("MANY-NEW")], batch=1000)
        assert [r["status"] for r in again] == ["existing"] * 10 + ["created"]
        with pytest.raises(ValueError, match="a batch holds 1 to 1000 runs"):
            await c.submit_many(runs, batch=1001)


async def test_the_batch_is_in_the_openapi_document(live_server):
    async with httpx.AsyncClient(base_url=live_server.url) as c:
        doc = (await c.get("/openapi.json")).json()
    op = doc["paths"]["/v1/runs:batch"]["post"]
    schema = doc["components"]["schemas"]["BatchRequest"]["properties"]["runs"]
    assert schema["items"] == {"$ref": "#/components/schemas/RunRequest"} and schema["maxItems"] == 1000
    assert "413" in op["responses"] and "200" in op["responses"]
