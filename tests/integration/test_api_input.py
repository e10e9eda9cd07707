"""Bad input over the HTTP API: a 4xx whose message says what to fix, and nothing written.

Every refusal here is checked twice: the answer (status, ``error``, ``field``, a message
that names the problem, never a traceback) and the database afterwards, read through a
second store on the same SQLite file — no run, no event, no machine, no pool may appear
because of a request the API refused.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from pydantic import BaseModel

from deskfleet.agent.runtime import Agent, AgentConfig, App
from deskfleet.client import ApiError
from deskfleet.config import ServerSettings
from deskfleet.errors import ConfigError
from deskfleet.sdk import Context, Registry, automation
from deskfleet.sim import SimBackend, SimDesktop, ehr_model
from support import LiveServer, wait_ready

LOOKUP = {"automation": "ehr.lookup_patient", "input": {"mrn": "M-1"}}
PATIENT = {"mrn": "P-1", "name": "Ada Lovelace", "dob": "1990-02-03"}


# -- helpers ------------------------------------------------------------------------------


def http(server: LiveServer, **headers: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.url, timeout=15, headers=headers)


def assert_error(
    resp: httpx.Response,
    status: int,
    error: str | None = None,
    *,
    field: str | None = None,
    mentions: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The answer is ours: the status, JSON with ``error`` and ``message``, no traceback."""
    where = f"{resp.request.method} {resp.request.url.path}"
    assert resp.status_code == status, f"{where}: expected {status}, got {resp.status_code}: {resp.text[:500]}"
    assert "Traceback" not in resp.text and 'File "' not in resp.text, f"{where}: a traceback leaked: {resp.text}"
    try:
        body = resp.json()
    except ValueError:
        pytest.fail(f"{where}: error body is not JSON: {resp.text[:300]!r}")
    assert isinstance(body, dict) and {"error", "message"} <= set(body), (
        f"{where}: error body lacks 'error'/'message': {body}"
    )
    assert isinstance(body["message"], str) and body["message"].strip(), f"{where}: empty message: {body}"
    if error is not None:
        assert body["error"] == error, f"{where}: error {body['error']!r}, expected {error!r}: {body}"
    if field is not None:
        assert body.get("field") == field, f"{where}: field {body.get('field')!r}, expected {field!r}: {body}"
    for word in mentions:
        assert word in body["message"], f"{where}: message does not mention {word!r}: {body['message']!r}"
    return body


class Ledger:
    """What the server has written, as another reader of its database sees it."""

    def __init__(self, server: LiveServer) -> None:
        self.server = server
        self.view = server.view()

    def snapshot(self) -> dict[str, Any]:
        events = self.view.events(limit=1_000_000)
        with sqlite3.connect(self.server.settings.data_dir / "deskfleet.db") as db:
            artifacts = db.execute("SELECT count(*) FROM artifacts").fetchone()[0]
            webhooks = db.execute("SELECT count(*) FROM webhooks").fetchone()[0]
        return {
            "runs": self.view.count_runs(),
            "events": [(e.id, e.kind) for e in events if not _background(e.kind)],
            "machines": sorted(m.id for m in self.view.list_machines()),
            "pools": sorted((p.name, p.allow_wait_for_capacity) for p in self.view.list_pools()),
            "artifacts": artifacts,
            "webhooks": webhooks,
        }


def _background(kind: str) -> bool:
    """Health bookkeeping the fleet may do at any moment (a starved agent is quarantined and
    re-verified): not something a request wrote."""
    return (kind in ("machine.quarantined", "machine.verified", "machine.verify_failed")
            or kind.startswith(("verify.", "replica.", "orchestrator.")))


@asynccontextmanager
async def unchanged(ledger: Ledger) -> AsyncIterator[None]:
    """Fail if anything was written inside the block."""
    before = ledger.snapshot()
    yield
    await asyncio.sleep(0.1)  # let anything the request set off land
    after = ledger.snapshot()
    assert after == before, f"a refused request wrote something:\nbefore={before}\nafter={after}"


# A second version of a demo automation, offered only by a machine in another pool: the
# catalogue knows ehr.lookup_patient@2, yet no machine in pool "default" can run it.
class _Mrn(BaseModel):
    mrn: str


class _Found(BaseModel):
    mrn: str


@automation(name="ehr.lookup_patient", version="2", required_state="any")
async def lookup_v2(ctx: Context, data: _Mrn) -> _Found:
    return _Found(mrn=data.mrn)


@asynccontextmanager
async def agent_in_pool(server: LiveServer, tmp_path: Path, pool: str, machine: str) -> AsyncIterator[Agent]:
    backend = SimBackend(tmp_path / f"{machine}-ehr.db", seed=1)
    agent = Agent(
        AgentConfig(servers=[server.url], machine=machine, pool=pool, enrolment_token=server.token,
                    key_file=tmp_path / f"{machine}.key", screenshots="none"),
        App(SimDesktop(machine, backend, seed=11), Registry([lookup_v2]), ehr_model()),
        # lookup_v2 needs no screen state, so no account
    )
    task = asyncio.create_task(agent.run())
    try:
        await wait_ready(server, {machine})
        yield agent
    finally:
        await agent.shutdown()
        try:
            await asyncio.wait_for(task, 10)
        except (TimeoutError, asyncio.CancelledError):
            task.cancel()
        backend.close()


# -- malformed and unknown ------------------------------------------------------------------


@pytest.mark.parametrize("body", [
    b"{bad",
    b'{"automation": "ehr.lookup_patient",}',
    b'{"automation": "ehr.lookup_patient", "input": {"mrn": "M-1"}',
    b"\xff\xfe\x00",
])
async def test_malformed_json_is_400_and_writes_nothing(live_server, fleet_factory, body):
    await fleet_factory(live_server, count=1)
    ledger = Ledger(live_server)
    async with http(live_server) as c, unchanged(ledger):
        resp = await c.post("/v1/runs", content=body, headers={"content-type": "application/json"})
        assert_error(resp, 400, "malformed_json", mentions=("not valid JSON",))


async def test_a_body_that_is_not_an_object_is_422(live_server, fleet_factory):
    await fleet_factory(live_server, count=1)
    ledger = Ledger(live_server)
    async with http(live_server) as c, unchanged(ledger):
        for body in (b"[1, 2]", b'"ehr.lookup_patient"', b"null", b""):
            resp = await c.post("/v1/runs", content=body, headers={"content-type": "application/json"})
            assert_error(resp, 422, "invalid_request")


async def test_unknown_automation_is_404_and_lists_the_known_ones(live_server, fleet_factory):
    await fleet_factory(live_server, count=1)
    ledger = Ledger(live_server)
    async with http(live_server) as c, unchanged(ledger):
        resp = await c.post("/v1/runs", json={"automation": "ehr.delete_everything", "input": {}})
        body = assert_error(resp, 404, "not_found", field="automation",
                            mentions=("ehr.delete_everything", "ehr.create_patient", "ehr.lookup_patient",
                                      "ehr.export_summary"))
        assert "known" in body["message"]
        # A known automation in a version nobody ever advertised is just as unknown.
        resp = await c.post("/v1/runs", json={**LOOKUP, "version": "9"})
        assert_error(resp, 404, "not_found", field="automation", mentions=("ehr.lookup_patient@9", "ehr.lookup_patient@1"))


@pytest.mark.parametrize(("data", "named"), [
    ({"mrn": "P-1", "name": "Ada Lovelace"}, "dob"),  # missing
    ({**PATIENT, "dob": "the third of February"}, "dob"),  # not a date
    ({**PATIENT, "mrn": "has spaces"}, "mrn"),  # fails the pattern
    ({**PATIENT, "name": 42}, "name"),  # wrong type
    ({**PATIENT, "name": "tab\there"}, "name"),  # a tab would move focus in the form
])
async def test_input_failing_the_automations_schema_is_422_naming_the_field(live_server, fleet_factory, data, named):
    await fleet_factory(live_server, count=1)
    ledger = Ledger(live_server)
    async with http(live_server) as c, unchanged(ledger):
        resp = await c.post("/v1/runs", json={"automation": "ehr.create_patient", "input": data})
        assert_error(resp, 422, field="input", mentions=(named, "ehr.create_patient"))


async def test_unknown_pool_is_404_and_lists_the_known_pools(live_server, fleet_factory):
    await fleet_factory(live_server, count=1)
    ledger = Ledger(live_server)
    async with http(live_server) as c, unchanged(ledger):
        resp = await c.post("/v1/runs", json={**LOOKUP, "pool": "nowhere"})
        assert_error(resp, 404, "not_found", field="pool", mentions=("nowhere", "default"))


# -- numbers out of bounds ---------------------------------------------------------------------

OUT_OF_BOUNDS: list[tuple[str, Any]] = [
    ("queue_timeout", -1), ("queue_timeout", 0), ("queue_timeout", 0.001), ("queue_timeout", 1e12),
    ("queue_timeout", "soon"), ("queue_timeout", "NaN"), ("queue_timeout", "Infinity"),
    ("attempt_timeout", -5), ("attempt_timeout", 0), ("attempt_timeout", 10 * 24 * 3600), ("attempt_timeout", "NaN"),
    ("progress_timeout", 0), ("progress_timeout", -1), ("progress_timeout", 1e9),
    ("deadline", -1), ("deadline", 0), ("deadline", 1e12), ("deadline", "-Infinity"),
    ("priority", 1_000_000), ("priority", -1_000_000), ("priority", 10**30), ("priority", 1.5),
    ("max_attempts", 0), ("max_attempts", -1), ("max_attempts", 21), ("max_attempts", 10**9),
    ("backoff_initial", -1), ("backoff_initial", "NaN"), ("backoff_max", 1e9),
]


def _raw_body(fields: dict[str, Any], name: str, value: Any) -> bytes:
    """JSON with the value in place; NaN/Infinity spelled as Python's json module accepts them."""
    if value in ("NaN", "Infinity", "-Infinity"):
        text = json.dumps({**fields, name: "__X__"}).replace('"__X__"', value)
        return text.encode()
    return json.dumps({**fields, name: value}).encode()


async def test_timeouts_deadline_priority_and_attempts_out_of_bounds_are_422_naming_the_field(live_server, fleet_factory):
    await fleet_factory(live_server, count=1)
    ledger = Ledger(live_server)
    wrong: list[str] = []
    async with http(live_server) as c, unchanged(ledger):
        for name, value in OUT_OF_BOUNDS:
            resp = await c.post("/v1/runs", content=_raw_body(LOOKUP, name, value),
                                headers={"content-type": "application/json"})
            try:
                assert_error(resp, 422, "invalid_request", field=name, mentions=(name,))
            except AssertionError as exc:
                wrong.append(f"{name}={value!r}: {exc}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("wait", ["-1", "121", "1e9", "soon", "nan"])
async def test_wait_out_of_bounds_is_422(live_server, fleet_factory, wait):
    await fleet_factory(live_server, count=1)
    ledger = Ledger(live_server)
    async with http(live_server) as c, unchanged(ledger):
        resp = await c.post(f"/v1/runs?wait={wait}", json=LOOKUP)
        assert_error(resp, 422, "invalid_request", mentions=("wait",))
        resp = await c.get(f"/v1/runs/run_x?wait={wait}")
        assert_error(resp, 422, "invalid_request", mentions=("wait",))


async def test_unknown_fields_are_422_and_say_so(live_server, fleet_factory):
    await fleet_factory(live_server, count=1)
    ledger = Ledger(live_server)
    async with http(live_server) as c, unchanged(ledger):
        resp = await c.post("/v1/runs", json={"automation": "ehr.lookup_patient", "inputs": {"mrn": "M-1"}})
        assert_error(resp, 422, "invalid_request", field="inputs", mentions=("inputs", "unknown field"))
        resp = await c.post("/v1/runs", json={**LOOKUP, "timeout": 30})
        assert_error(resp, 422, "invalid_request", field="timeout", mentions=("timeout", "unknown field"))
        resp = await c.put("/v1/pools/extra", json={"allow_wait": True})
        assert_error(resp, 422, "invalid_request", mentions=("allow_wait", "unknown field"))
        resp = await c.post("/v1/machines/sim-01/cordon", json={"why": "maintenance"})
        assert_error(resp, 422, "invalid_request", mentions=("why", "unknown field"))
        resp = await c.post("/v1/runs", json={**LOOKUP, "labels": {"os": 7}})
        assert_error(resp, 422, "invalid_request", mentions=("labels",))
        resp = await c.put("/v1/pools/extra", json={"affinity_wait": -1})
        assert_error(resp, 422, "invalid_request", field="affinity_wait", mentions=("affinity_wait",))
        resp = await c.put("/v1/pools/-starts-with-a-dash", json={})
        assert_error(resp, 400, field="name", mentions=("pool names",))
    machine = ledger.view.get_machine("sim-01")
    assert machine is not None and machine.admin.value == "active", "a refused cordon still cordoned the machine"


# -- size -------------------------------------------------------------------------------------

LIMIT = 64 * 1024


def _big_request(size: int) -> bytes:
    body = json.dumps({**LOOKUP, "input": {"mrn": "M-1", "note": "x" * size}}).encode()
    return body


async def test_oversized_body_with_content_length_is_413(server_factory, fleet_factory):
    server = server_factory(max_body_bytes=LIMIT)
    await fleet_factory(server, count=1)
    ledger = Ledger(server)
    async with http(server) as c:
        async with unchanged(ledger):
            resp = await c.post("/v1/runs", content=_big_request(LIMIT + 1000),
                                headers={"content-type": "application/json"})
            assert_error(resp, 413, "payload_too_large", mentions=(str(LIMIT),))
        # Just under the limit is fine: the limit is the limit, not a guess.
        resp = await c.post("/v1/runs", content=_big_request(LIMIT - 1000), headers={"content-type": "application/json"})
        assert resp.status_code == 201, resp.text


async def _chunks(data: bytes, size: int = 8192) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


async def test_oversized_chunked_body_without_content_length_is_413(server_factory, fleet_factory):
    server = server_factory(max_body_bytes=LIMIT)
    await fleet_factory(server, count=1)
    ledger = Ledger(server)
    async with http(server) as c:
        # A chunked body under the limit is read and accepted like any other.
        small = await c.post("/v1/runs", content=_chunks(_big_request(LIMIT // 4)),
                             headers={"content-type": "application/json"})
        assert "content-length" not in small.request.headers
        assert small.status_code == 201, small.text
        # Let it finish first, so that the agent's work on it does not count as a write below.
        done = await c.get(f"/v1/runs/{small.json()['id']}", params={"wait": 30})
        assert done.json()["state"] in ("succeeded", "failed"), done.text
        async with unchanged(ledger):
            resp = await c.post("/v1/runs", content=_chunks(_big_request(LIMIT * 4)),
                                headers={"content-type": "application/json"})
            assert "content-length" not in resp.request.headers
            assert_error(resp, 413, "payload_too_large", mentions=(str(LIMIT),))


# -- runs no machine could ever serve -------------------------------------------------------------


async def test_unservable_runs_are_422_unless_the_pool_waits_for_capacity(live_server, fleet_factory, tmp_path):
    await fleet_factory(live_server, count=1)
    ledger = Ledger(live_server)
    async with agent_in_pool(live_server, tmp_path, "other", "other-01"), http(live_server) as c:
        never = [
            ({**LOOKUP, "labels": {"os": "windows-11"}}, ("labels", "os=windows-11")),
            ({**LOOKUP, "machine": "ghost-99"}, ("ghost-99",)),
            # @2 exists (other-01 offers it) but nobody in pool "default" does.
            ({**LOOKUP, "version": "2"}, ("ehr.lookup_patient@2",)),
        ]
        # A pool with no machine at all.
        resp = await c.put("/v1/pools/empty", json={"description": "nobody here"})
        assert resp.status_code == 200, resp.text
        async with unchanged(ledger):
            for body, mentions in never:
                resp = await c.post("/v1/runs", json=body)
                assert_error(resp, 422, "unservable", mentions=(*mentions, "allow_wait_for_capacity"))
            resp = await c.post("/v1/runs", json={**LOOKUP, "pool": "empty"})
            assert_error(resp, 422, "unservable", mentions=("no machine is enrolled", "empty"))

        resp = await c.put("/v1/pools/default", json={"allow_wait_for_capacity": True})
        assert resp.status_code == 200 and resp.json()["allow_wait_for_capacity"] is True, resp.text
        accepted = []
        for body, _ in never:
            resp = await c.post("/v1/runs", json=body)
            assert resp.status_code == 201, resp.text
            assert resp.json()["state"] == "queued"
            accepted.append(resp.json()["id"])
        assert ledger.view.count_runs() == {"queued": 3}
        await asyncio.sleep(1.0)  # several scheduling passes: none may hand them to a wrong machine
        for run_id in accepted:
            run = ledger.view.get_run(run_id)
            assert run is not None and run.state.value == "queued" and run.current_machine_id is None


# -- agents' credentials -------------------------------------------------------------------------


async def test_enrolment_with_a_missing_or_wrong_token_is_401_and_enrols_nothing(live_server):
    ledger = Ledger(live_server)
    request = {"machine": "intruder-01", "pool": "intruders", "labels": {"evil": "yes"}}
    async with http(live_server) as c:
        async with unchanged(ledger):
            for headers in ({}, {"authorization": "Bearer wrong-token"}, {"authorization": "Bearer"},
                            {"authorization": f"Bearer {live_server.token}x"}):
                resp = await c.post("/agent/v1/enrol", json=request, headers=headers)
                assert_error(resp, 401, "unauthorized", mentions=("enrolment token",))
        assert ledger.view.get_machine("intruder-01") is None
        assert "intruders" not in {p.name for p in ledger.view.list_pools()}
        # The same request with the right token is accepted: the refusals were about the token.
        resp = await c.post("/agent/v1/enrol", json=request, headers={"authorization": f"Bearer {live_server.token}"})
        assert resp.status_code == 200, resp.text
        assert resp.json()["agent_key"]
        assert ledger.view.get_machine("intruder-01") is not None


async def _ws_refusal(url: str, headers: dict[str, str]) -> int | None:
    """Connect to the agent socket; return the close code the server ends it with."""
    try:
        async with websockets.connect(url, additional_headers=headers, open_timeout=5) as ws:
            await asyncio.wait_for(ws.recv(), 5)
    except websockets.ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd is not None else None
    except websockets.InvalidStatus as exc:
        pytest.fail(f"the handshake was refused with HTTP {exc.response.status_code} instead of "
                    "an accepted connection closed with code 4401")
    pytest.fail("the server kept a connection with a wrong agent key open")


async def test_agent_websocket_with_a_wrong_key_is_closed_with_4401(live_server, fleet_factory):
    fleet = await fleet_factory(live_server, count=1)
    key_file = fleet.agents[0].config.key_file
    assert key_file is not None
    key = key_file.read_text().strip()
    ledger = Ledger(live_server)
    url = live_server.url.replace("http://", "ws://") + "/agent/v1/connect"
    async with unchanged(ledger):
        for headers in (
            {"authorization": "Bearer not-the-key", "x-deskfleet-machine": "sim-01"},
            {"x-deskfleet-machine": "sim-01"},
            {"authorization": f"Bearer {key}", "x-deskfleet-machine": "ghost-01"},
            {"authorization": f"Bearer {key}"},
        ):
            assert await _ws_refusal(url, headers) == 4401, headers
    # The real agent kept its connection.
    machine = ledger.view.get_machine("sim-01")
    assert machine is not None and machine.connected and machine.schedulable


async def test_artifact_upload_with_a_wrong_key_is_401_and_stores_nothing(live_server, fleet_factory):
    fleet = await fleet_factory(live_server, count=1)
    key_file = fleet.agents[0].config.key_file
    assert key_file is not None
    key = key_file.read_text().strip()
    ledger = Ledger(live_server)
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
    async with http(live_server) as c:
        async with unchanged(ledger):
            for headers in (
                {"authorization": "Bearer wrong", "x-deskfleet-machine": "sim-01"},
                {"x-deskfleet-machine": "sim-01"},
                {"authorization": f"Bearer {key}", "x-deskfleet-machine": "ghost-01"},
                {"authorization": f"Bearer {key}"},
            ):
                resp = await c.post("/agent/v1/artifacts", params={"name": "shot"}, content=png,
                                    headers={**headers, "content-type": "image/png"})
                assert_error(resp, 401, "unauthorized")
        # With the machine's own key the same upload is stored.
        resp = await c.post("/agent/v1/artifacts", params={"name": "shot"}, content=png,
                            headers={"authorization": f"Bearer {key}", "x-deskfleet-machine": "sim-01",
                                     "content-type": "image/png"})
        assert resp.status_code == 201, resp.text
        assert ledger.snapshot()["artifacts"] == 1


# -- idempotency --------------------------------------------------------------------------------


async def test_same_idempotency_key_and_body_returns_the_same_run(live_server, fleet_factory):
    await fleet_factory(live_server, count=1)
    ledger = Ledger(live_server)
    body = {**LOOKUP, "idempotency_key": "order-42", "priority": 5}
    async with http(live_server) as c:
        first = await c.post("/v1/runs", json=body)
        assert first.status_code == 201, first.text
        run_id = first.json()["id"]
        # Same body, keys in another order: the same request.
        again = await c.post("/v1/runs", content=json.dumps(dict(reversed(list(body.items())))).encode(),
                             headers={"content-type": "application/json"})
        assert again.status_code == 200, again.text
        assert again.json()["id"] == run_id
        # Retries racing each other still make one run.
        many = await asyncio.gather(*(c.post("/v1/runs", json=body) for _ in range(5)))
        assert {r.status_code for r in many} == {200}, [r.text for r in many]
        assert {r.json()["id"] for r in many} == {run_id}
        assert sum(ledger.view.count_runs().values()) == 1
        # After the run has finished, the key still answers with that run.
        done = await c.get(f"/v1/runs/{run_id}", params={"wait": 20})
        assert done.json()["state"] == "succeeded"
        late = await c.post("/v1/runs", json=body)
        assert late.status_code == 200 and late.json()["id"] == run_id
        assert late.json()["state"] == "succeeded"
        submitted = [e for e in ledger.view.events(run_id=run_id) if e.reason == "submitted"]
        assert len(submitted) == 1


async def test_same_idempotency_key_with_another_body_is_409_and_makes_no_run(live_server, fleet_factory):
    await fleet_factory(live_server, count=1)
    ledger = Ledger(live_server)
    body = {**LOOKUP, "idempotency_key": "order-43"}
    async with http(live_server) as c:
        first = await c.post("/v1/runs", json=body)
        assert first.status_code == 201, first.text
        run_id = first.json()["id"]
        done = await c.get(f"/v1/runs/{run_id}", params={"wait": 20})  # let the run settle first
        assert done.json()["state"] == "succeeded", done.text
        async with unchanged(ledger):
            for changed in ({**body, "input": {"mrn": "M-2"}}, {**body, "priority": 9},
                            {**body, "automation": "ehr.export_summary"}):
                resp = await c.post("/v1/runs", json=changed)
                assert_error(resp, 409, "conflict", field="idempotency_key", mentions=("order-43", run_id))
    # The client's wrapper reports the same.
    with live_server.client() as client, pytest.raises(ApiError) as caught:
        client.submit("ehr.lookup_patient", {"mrn": "M-3"}, idempotency_key="order-43")
    assert caught.value.status == 409


# -- pool policies --------------------------------------------------------------------------------

async def test_a_bad_pool_policy_is_422_naming_the_field_and_a_stale_change_409(live_server, fleet_factory):
    await fleet_factory(live_server, count=1)
    async with http(live_server) as c:
        ok = await c.put("/v1/pools/default/policy", json={"policy": {"min": 1, "max": 3}, "version": 0})
        assert ok.status_code == 200, ok.text
        assert (ok.json()["version"], ok.json()["policy"]["max"]) == (1, 3)
        resp = await c.put("/v1/pools/default/policy", json={"policy": {"min": 1, "max": 3}, "version": 0})
        assert_error(resp, 409, "conflict", field="version", mentions=("at version 1, not 0",))
        resp = await c.put("/v1/pools/default/policy", json={"policy": {"min": 4, "max": 3}})
        assert_error(resp, 422, "invalid_request", mentions=("max (3) is below min (4)",))
        resp = await c.put("/v1/pools/default/policy", json={"policy": {"schedule": [
            {"cron": "0 8 * * mon-fri", "hours": 10, "floor": 2, "timezone": "Berlin"}]}})
        assert_error(resp, 422, "invalid_request", mentions=("'Berlin' is not a time zone", "timezone"))
        resp = await c.put("/v1/pools/default/policy", json={"policy": {"mim": 1}})
        assert_error(resp, 422, "invalid_request", mentions=("mim",))
        for path in ("/v1/pools/ghost/policy", "/v1/pools/ghost/demand", "/v1/pools/ghost/policy/history"):
            assert_error(await c.get(path), 404, "not_found", mentions=("ghost",))
        resp = await c.put("/v1/pools/ghost/policy", json={"policy": {}})
        assert_error(resp, 404, "not_found", mentions=("no pool 'ghost'", "create it first"))
        # Nothing refused was kept.
        history = (await c.get("/v1/pools/default/policy/history")).json()
        assert [v["version"] for v in history] == [1]


async def test_a_pools_demand_is_what_an_external_autoscaler_reads(live_server, fleet_factory):
    """KEDA's metrics API scaler reads one number from a JSON answer (``valueLocation``):
    ``target``, the machines the pool's work asks for now."""
    fleet = await fleet_factory(live_server, count=2)
    async with http(live_server) as c:
        put = await c.put("/v1/pools/default/policy", json={"policy": {"min": 1, "warm": {"min": 0, "max": 0}}})
        assert put.status_code == 200, put.text
        for d in fleet.desktops:
            await c.post(f"/v1/machines/{d.name}/cordon", json={"reason": "test: runs must wait"})
        for i in range(3):
            assert (await c.post("/v1/runs", json={**LOOKUP, "input": {"mrn": f"D-{i}"}})).status_code == 201
        demand = (await c.get("/v1/pools/default/demand")).json()
        assert (demand["queued"], demand["busy"], demand["idle"], demand["target"]) == (3, 0, 0, 3)
        assert demand["machines"] == {"cordoned": 2} and demand["policy_version"] == 1
        assert demand["arrival_rate"] == pytest.approx(3 / demand["window_seconds"])
        assert demand["oldest_wait_seconds"] >= 0


async def test_maintenance_is_started_shown_and_cancelled_and_bad_requests_say_what_to_fix(live_server, fleet_factory):
    fleet = await fleet_factory(live_server, count=2)
    names = sorted(d.name for d in fleet.desktops)
    async with http(live_server) as c:
        resp = await c.post("/v1/pools/default/maintenance", json={"reason": "patches"})
        assert_error(resp, 422, "invalid_input", field="pool", mentions=("has no provider", "name one in its policy"))
        put = await c.put("/v1/pools/default/policy", json={"policy": {"min": 0, "max": 4, "provider": "here"}})
        assert put.status_code == 200, put.text
        resp = await c.post("/v1/pools/default/maintenance", json={"machines": ["ghost-7"]})
        assert_error(resp, 422, "invalid_input", field="machines", mentions=("not machines of pool 'default': ghost-7",))
        resp = await c.post("/v1/pools/default/maintenance", json={"reason": "x" * 501})
        assert_error(resp, 422, "invalid_request", mentions=("reason",))
        assert_error(await c.post("/v1/pools/ghost/maintenance", json={}), 404, "not_found", mentions=("ghost",))
        made = await c.post("/v1/pools/default/maintenance", json={"reason": "patches"})
        assert made.status_code == 201, made.text
        body = made.json()
        assert (body["state"], body["reason"], sorted(body["machines"]), body["counts"]) == \
            ("running", "patches", names, {"pending": 2})
        resp = await c.post("/v1/pools/default/maintenance", json={})
        assert_error(resp, 409, "conflict", mentions=(f"maintenance {body['id']} of pool 'default' is running", "cancel it"))
        one = (await c.get(f"/v1/pools/default/maintenance/{body['id']}")).json()
        assert one["id"] == body["id"] and one["machines"][names[0]]["step"] == "pending"
        assert [x["id"] for x in (await c.get("/v1/pools/default/maintenance")).json()] == [body["id"]]
        assert_error(await c.get("/v1/pools/default/maintenance/999999"), 404, "not_found", mentions=("999999",))
        cancelled = await c.post(f"/v1/pools/default/maintenance/{body['id']}/cancel", json={"reason": "freeze"})
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelling", cancelled.text
        resp = await c.post(f"/v1/pools/default/maintenance/{body['id']}/cancel")
        assert_error(resp, 409, "conflict", mentions=("nothing to cancel",))


# -- the API key --------------------------------------------------------------------------------

CLIENT_ROUTES = [
    ("GET", "/v1/runs", None), ("GET", "/v1/runs/run_x", None), ("GET", "/v1/machines", None),
    ("GET", "/v1/pools", None), ("GET", "/v1/automations", None), ("GET", "/v1/summary", None),
    ("GET", "/v1/events", None), ("GET", "/metrics", None), ("POST", "/v1/runs", LOOKUP),
    ("PUT", "/v1/pools/sneaky", {"allow_wait_for_capacity": True}),
    ("GET", "/v1/pools/default/policy", None), ("GET", "/v1/pools/default/policy/history", None),
    ("PUT", "/v1/pools/default/policy", {"policy": {"min": 1}}), ("GET", "/v1/pools/default/demand", None),
    ("POST", "/v1/pools/default/maintenance", {}), ("GET", "/v1/pools/default/maintenance", None),
    ("POST", "/v1/pools/default/maintenance/1/cancel", None),
    ("POST", "/v1/machines/sim-01/cordon", {"reason": "sneaky"}),
    ("POST", "/v1/runs/run_x/cancel", None),
]


async def test_api_key_is_required_on_client_endpoints(server_factory, fleet_factory):
    server = server_factory(api_key="k-3f9a1c")
    await fleet_factory(server, count=1)  # agents authenticate with their own keys, not the API key
    ledger = Ledger(server)
    async with unchanged(ledger):
        for headers in ({}, {"authorization": "Bearer wrong"}, {"x-api-key": "wrong"},
                        {"authorization": "Basic k-3f9a1c"}, {"authorization": "Bearer"}):
            async with http(server, **headers) as c:
                for method, path, body in CLIENT_ROUTES:
                    resp = await c.request(method, path, json=body)
                    assert_error(resp, 401, "unauthorized", mentions=("API key",))
    async with http(server) as c:
        health = await c.get("/healthz")
        assert health.status_code == 200 and health.json()["ok"] is True
    for headers in ({"authorization": "Bearer k-3f9a1c"}, {"x-api-key": "k-3f9a1c"}):
        async with http(server, **headers) as c:
            assert (await c.get("/v1/machines")).status_code == 200
            assert (await c.get("/metrics")).status_code == 200
            resp = await c.post("/v1/runs", json=LOOKUP)
            assert resp.status_code == 201, resp.text
    with server.client(api_key="k-3f9a1c") as client:
        assert sum(client.summary()["runs"].values()) == 2
    with server.client(api_key="nope") as client, pytest.raises(ApiError) as caught:
        client.runs()
    assert caught.value.status == 401


def test_listening_beyond_loopback_needs_an_api_key(tmp_path):
    for host in ("0.0.0.0", "::", "192.0.2.10", "deskfleet.example.com"):
        with pytest.raises(ConfigError, match="API key"):
            ServerSettings(data_dir=tmp_path, host=host).check_exposure()
        ServerSettings(data_dir=tmp_path, host=host, api_key="k").check_exposure()
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        ServerSettings(data_dir=tmp_path, host=host).check_exposure()


# -- the error format everywhere -------------------------------------------------------------------


async def test_errors_outside_our_routes_use_the_same_format(live_server):
    ledger = Ledger(live_server)
    async with http(live_server) as c, unchanged(ledger):
        assert_error(await c.get("/v1/no-such-thing"), 404)
        assert_error(await c.delete("/v1/runs"), 405)
        assert_error(await c.get("/v1/runs/run_nope"), 404, "not_found", mentions=("run_nope",))
        assert_error(await c.get("/v1/artifacts/art_nope"), 404, "not_found", mentions=("art_nope",))
        assert_error(await c.get("/v1/machines/ghost"), 404, "not_found", mentions=("ghost",))
        assert_error(await c.get("/v1/pools/ghost"), 404, "not_found", mentions=("ghost",))
        # Valid JSON that Python's parser cannot take (too deep): still a clean 4xx in our format.
        deep = b'{"automation": "x", "input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        resp = await c.post("/v1/runs", content=deep, headers={"content-type": "application/json"})
        assert 400 <= resp.status_code < 500
        assert_error(resp, resp.status_code)
