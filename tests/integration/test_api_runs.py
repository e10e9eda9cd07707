"""A run's life over the HTTP API, with a simulated fleet behind the server.

Long-poll, cancel in every state, listing and paging, the timeline (events, attempts,
artifacts), machines (cordon, uncordon, drain), the summary, metrics, and webhooks to a
small receiver on a loopback port.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from support import LiveServer, eventually

LOOKUP = {"automation": "ehr.lookup_patient", "input": {"mrn": "M-1"}}


def http(server: LiveServer) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.url, timeout=30)


def when(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


async def submit(c: httpx.AsyncClient, body: dict[str, Any] | None = None, wait: float = 0) -> dict[str, Any]:
    resp = await c.post("/v1/runs", json=body or LOOKUP, params={"wait": wait} if wait else None)
    assert resp.status_code == 201, resp.text
    return resp.json()


async def get_run(c: httpx.AsyncClient, run_id: str, wait: float = 0) -> dict[str, Any]:
    resp = await c.get(f"/v1/runs/{run_id}", params={"wait": wait} if wait else None)
    assert resp.status_code == 200, resp.text
    return resp.json()


async def machine_action(c: httpx.AsyncClient, machine: str, action: str, reason: str = "") -> dict[str, Any]:
    resp = await c.post(f"/v1/machines/{machine}/{action}", json={"reason": reason})
    assert resp.status_code == 200, resp.text
    return resp.json()


async def reach(server: LiveServer, run_id: str, *states: str, timeout: float = 20) -> None:
    view = server.view()

    def state() -> str | bool:
        run = view.get_run(run_id)
        return run is not None and run.state.value in states and run.state.value

    await eventually(state, timeout=timeout, interval=0.02)


def kinds(events: list[dict[str, Any]]) -> list[str]:
    return [e["kind"] for e in events]


# -- long-poll -----------------------------------------------------------------------------------


async def test_long_poll_returns_as_soon_as_the_run_ends(live_server, fleet_factory):
    await fleet_factory(live_server, count=1, action_delay=0.05)
    async with http(live_server) as c:
        run = await submit(c)
        assert run["state"] == "queued"
        t0 = time.monotonic()
        done = await get_run(c, run["id"], wait=60)
        answered = time.time()
        assert done["state"] == "succeeded", done
        assert done["output"]["mrn"] == "M-1"
        assert time.monotonic() - t0 < 20
        # Answered when the run ended, not at the next poll or when the wait ran out.
        assert answered - when(done["finished_at"]) < 1.0, (answered, done["finished_at"])
        # Waiting on a finished run answers at once.
        t1 = time.monotonic()
        assert (await get_run(c, run["id"], wait=60))["state"] == "succeeded"
        assert time.monotonic() - t1 < 5  # not the 60 s: bounds this loose hold on a stalled host


async def test_long_poll_returns_the_current_state_when_the_wait_expires(live_server, fleet_factory):
    await fleet_factory(live_server, count=1)
    async with http(live_server) as c:
        await machine_action(c, "sim-01", "cordon")
        run = await submit(c)
        t0 = time.monotonic()
        still = await get_run(c, run["id"], wait=1.5)
        elapsed = time.monotonic() - t0
        assert still["state"] == "queued" and still["finished_at"] is None
        assert 1.4 <= elapsed < 4, elapsed
        # wait=0 (the default) does not wait at all.
        t1 = time.monotonic()
        assert (await get_run(c, run["id"]))["state"] == "queued"
        assert time.monotonic() - t1 < 5  # the run stays queued: any wait would last the whole wait
        # An unknown run is a 404 at once, not after the wait.
        t2 = time.monotonic()
        resp = await c.get("/v1/runs/run_nope", params={"wait": 30})
        assert resp.status_code == 404 and resp.json()["error"] == "not_found"
        assert time.monotonic() - t2 < 5


async def test_long_poll_wakes_when_the_queue_wait_runs_out(live_server, fleet_factory):
    await fleet_factory(live_server, count=1)
    async with http(live_server) as c:
        await machine_action(c, "sim-01", "cordon")
        run = await submit(c, {**LOOKUP, "queue_timeout": 1.0})
        t0 = time.monotonic()
        ended = await get_run(c, run["id"], wait=20)
        assert ended["state"] == "timed_out", ended
        assert ended["error"]["error"] == "queue_timeout"
        assert time.monotonic() - t0 < 3


async def test_submit_with_wait_returns_the_result(live_server, fleet_factory):
    await fleet_factory(live_server, count=1)
    async with http(live_server) as c:
        run = await submit(c, wait=30)
        assert run["state"] == "succeeded" and run["output"]["mrn"] == "M-1"
        await machine_action(c, "sim-01", "cordon")
        t0 = time.monotonic()
        queued = await submit(c, wait=1)
        assert queued["state"] == "queued"
        assert 0.9 <= time.monotonic() - t0 < 4


# -- cancel ---------------------------------------------------------------------------------------------


async def test_cancel_a_queued_run_with_no_machine_connected(live_server, fleet_factory):
    fleet = await fleet_factory(live_server, count=1)
    await fleet.shutdown()
    view = live_server.view()
    await eventually(lambda: not view.get_machine("sim-01").connected)  # type: ignore[union-attr]
    async with http(live_server) as c:
        run = await submit(c)  # still servable: sim-01 is enrolled, only offline
        assert run["state"] == "queued"
        resp = await c.post(f"/v1/runs/{run['id']}/cancel")
        assert resp.status_code == 202, resp.text
        cancelled = resp.json()
        assert cancelled["state"] == "cancelled"
        assert cancelled["finished_at"] is not None and cancelled["cancel_requested_at"] is not None
        assert cancelled["error"]["error"] == "cancelled"
        assert (await get_run(c, run["id"]))["state"] == "cancelled"
        events = (await c.get(f"/v1/runs/{run['id']}/events")).json()
        assert [(e["from_state"], e["to_state"]) for e in events if e["kind"] == "run.state"] == [
            (None, "queued"), ("queued", "cancelled")]
        # Cancelling again: the run has ended, nothing to cancel.
        again = await c.post(f"/v1/runs/{run['id']}/cancel")
        assert again.status_code == 409 and again.json()["error"] == "conflict"
        assert "cancelled" in again.json()["message"]
        unknown = await c.post("/v1/runs/run_nope/cancel")
        assert unknown.status_code == 404 and unknown.json()["error"] == "not_found"


async def test_a_submit_answers_the_run_as_get_shows_it(live_server, fleet_factory):
    """POST /v1/runs writes its answer itself (not through response_model): the same bytes as
    GET /v1/runs/{id}, 201 for a new run and 200 for its idempotency key's repeat."""
    fleet = await fleet_factory(live_server, count=1)
    await fleet.shutdown()  # the run stays queued: nothing changes it between the two reads
    body = {**LOOKUP, "idempotency_key": "same-bytes", "deadline": 600, "priority": 3}
    async with http(live_server) as c:
        created = await c.post("/v1/runs", json=body)
        again = await c.post("/v1/runs", json=body)
        shown = await c.get(f"/v1/runs/{created.json()['id']}")
    assert (created.status_code, again.status_code, shown.status_code) == (201, 200, 200)
    assert created.content == again.content == shown.content
    assert created.headers["content-type"] == shown.headers["content-type"] == "application/json"


async def test_cancel_a_queued_run_when_every_machine_is_cordoned_wakes_its_waiters(live_server, fleet_factory):
    await fleet_factory(live_server, count=2)
    async with http(live_server) as c:
        for m in ("sim-01", "sim-02"):
            assert (await machine_action(c, m, "cordon"))["status"] == "cordoned"
        run = await submit(c)
        waiter = asyncio.create_task(get_run(c, run["id"], wait=30))
        await asyncio.sleep(0.5)
        assert (await get_run(c, run["id"]))["state"] == "queued"
        t0 = time.monotonic()
        resp = await c.post(f"/v1/runs/{run['id']}/cancel")
        assert resp.status_code == 202 and resp.json()["state"] == "cancelled", resp.text
        woken = await asyncio.wait_for(waiter, 5)
        assert woken["state"] == "cancelled"
        assert time.monotonic() - t0 < 1
        assert (await c.get(f"/v1/runs/{run['id']}/attempts")).json() == []


@pytest.mark.parametrize("freeze", [False, True], ids=["busy", "frozen_app"])
async def test_cancel_a_running_run_stops_the_agent(live_server, fleet_factory, freeze):
    fleet = await fleet_factory(live_server, count=1, action_delay=0.25)
    async with http(live_server) as c:
        run = await submit(c)
        await reach(live_server, run["id"], "running")
        if freeze:
            fleet.desktops[0].inject("freeze")
        t0 = time.monotonic()
        resp = await c.post(f"/v1/runs/{run['id']}/cancel")
        assert resp.status_code == 202, resp.text
        asked = resp.json()
        assert asked["state"] == "running" and asked["cancel_requested_at"] is not None
        # A second cancel changes nothing: still under way (202) or already done (409).
        second = await c.post(f"/v1/runs/{run['id']}/cancel")
        assert second.status_code in (202, 409), second.text
        ended = await get_run(c, run["id"], wait=20)
        took = time.monotonic() - t0
        assert ended["state"] == "cancelled", ended
        assert ended["error"]["error"] == "cancelled"
        assert ended["output"] is None
        # The agent confirmed the stop: well within the grace period, not forced by the sweep.
        assert took < live_server.settings.stop_grace, took
        attempts = (await c.get(f"/v1/runs/{run['id']}/attempts")).json()
        assert len(attempts) == 1
        assert attempts[0]["ending"] == "stopped" and attempts[0]["state"] == "cancelled"
        assert attempts[0]["stop_reason"] == "cancelled"
        events = (await c.get(f"/v1/runs/{run['id']}/events")).json()
        k = kinds(events)
        assert k.count("run.cancel_requested") == 1 and k.count("attempt.stop_requested") == 1
        assert k.index("attempt.stop_requested") < k.index("attempt.ended")
        ended_event = next(e for e in events if e["kind"] == "attempt.ended")
        assert ended_event["reason"] == "stopped" and ended_event["to_state"] == "cancelled"
        assert events[-1]["kind"] == "run.state" and events[-1]["to_state"] == "cancelled"
        # A confirmed stop does not cost the machine its place: it takes the next run.
        machine = (await c.get("/v1/machines/sim-01")).json()
        assert machine["health"] == "online", machine
        fleet.desktops[0].action_delay = 0.0
        nxt = await submit(c, wait=30)
        assert nxt["state"] == "succeeded" and nxt["current_machine"] == "sim-01"


async def test_cancel_during_preflight(live_server, fleet_factory):
    # The machine starts at its login screen, so pre-flight begins with the login playbook;
    # at 0.4 s an input, that step takes longer than the server's stop grace (1.5 s).
    await fleet_factory(live_server, count=1, action_delay=0.4)
    async with http(live_server) as c:
        run = await submit(c)
        await reach(live_server, run["id"], "preparing")
        t0 = time.monotonic()
        resp = await c.post(f"/v1/runs/{run['id']}/cancel")
        assert resp.status_code == 202, resp.text
        ended = await get_run(c, run["id"], wait=20)
        took = time.monotonic() - t0
        assert ended["state"] == "cancelled", ended
        assert ended["attempts_started"] == 0  # the automation itself never started
        attempts = (await c.get(f"/v1/runs/{run['id']}/attempts")).json()
        assert attempts[0]["started_at"] is None
        k = kinds((await c.get(f"/v1/runs/{run['id']}/events")).json())
        assert "attempt.stop_requested" in k and "attempt.ended" in k
        # The agent must stop mid-playbook and confirm: a forced stop after the grace
        # period would quarantine a healthy machine over a person's cancel.
        assert [a["ending"] for a in attempts] == ["stopped"], attempts
        assert took < live_server.settings.stop_grace, took
        assert (await c.get("/v1/machines/sim-01")).json()["health"] == "online"


async def test_cancel_a_finished_run_is_409_and_changes_nothing(live_server, fleet_factory):
    await fleet_factory(live_server, count=1)
    view = live_server.view()
    async with http(live_server) as c:
        run = await submit(c, wait=30)
        assert run["state"] == "succeeded"
        before = len(view.events(limit=100_000))
        resp = await c.post(f"/v1/runs/{run['id']}/cancel")
        assert resp.status_code == 409, resp.text
        body = resp.json()
        assert body["error"] == "conflict" and "succeeded" in body["message"]
        after = await get_run(c, run["id"])
        assert after["state"] == "succeeded" and after["cancel_requested_at"] is None
        assert len(view.events(limit=100_000)) == before


# -- listing -----------------------------------------------------------------------------------------


async def test_list_runs_pages_and_filters(live_server, fleet_factory):
    await fleet_factory(live_server, count=2)
    async with http(live_server) as c:
        made: list[dict[str, Any]] = []
        for i in range(3):
            made.append(await submit(c, {**LOOKUP, "input": {"mrn": f"L-{i}"}}, wait=30))
        made.append(await submit(c, {"automation": "ehr.create_patient",
                                     "input": {"mrn": "L-9", "name": "Lin Page", "dob": "1970-01-01"}}, wait=30))
        assert [r["state"] for r in made] == ["succeeded"] * 4
        for m in ("sim-01", "sim-02"):
            await machine_action(c, m, "cordon")
        queued = await submit(c, {**LOOKUP, "priority": 3})
        cancelled = await submit(c)
        assert (await c.post(f"/v1/runs/{cancelled['id']}/cancel")).json()["state"] == "cancelled"
        made += [queued, cancelled]
        ids = [r["id"] for r in made]

        everything = (await c.get("/v1/runs")).json()
        assert everything["next_before"] is None
        listed = [r["id"] for r in everything["runs"]]
        assert listed == list(reversed(ids)), "newest first"

        for limit in (1, 2, 4, 5):
            seen: list[str] = []
            before = None
            for _ in range(10):
                params: dict[str, Any] = {"limit": limit}
                if before:
                    params["before"] = before
                page = (await c.get("/v1/runs", params=params)).json()
                assert len(page["runs"]) <= limit
                seen += [r["id"] for r in page["runs"]]
                before = page["next_before"]
                if before is None:
                    break
            assert seen == listed, f"paging by {limit} lost or repeated runs"

        async def ids_for(**params: Any) -> set[str]:
            resp = await c.get("/v1/runs", params=params)
            assert resp.status_code == 200, resp.text
            return {r["id"] for r in resp.json()["runs"]}

        assert await ids_for(state="succeeded") == set(ids[:4])
        assert await ids_for(state=["queued", "cancelled"]) == {queued["id"], cancelled["id"]}
        assert await ids_for(automation="ehr.create_patient") == {ids[3]}
        assert await ids_for(pool="default") == set(ids)
        assert await ids_for(pool="elsewhere") == set()
        for m in ("sim-01", "sim-02"):
            expected = {r["id"] for r in everything["runs"] if r["current_machine"] == m}
            assert await ids_for(machine=m) == expected
        assert await ids_for(machine="sim-01") | await ids_for(machine="sim-02") == set(ids[:4])
        assert await ids_for(state="succeeded", automation="ehr.lookup_patient") == set(ids[:3])

        for bad in ({"state": "done"}, {"limit": 0}, {"limit": 1001}, {"limit": "many"}):
            resp = await c.get("/v1/runs", params=bad)
            assert resp.status_code == 422, (bad, resp.text)
            assert {"error", "message"} <= set(resp.json())


# -- timeline: events, attempts, artifacts ------------------------------------------------------------


async def test_events_attempts_and_preflight_screenshot(live_server, fleet_factory):
    await fleet_factory(live_server, count=1, screenshots="evidence")
    async with http(live_server) as c:
        run = await submit(c, wait=30)
        assert run["state"] == "succeeded", run
        rid = run["id"]

        attempts = (await c.get(f"/v1/runs/{rid}/attempts")).json()
        assert len(attempts) == 1
        a = attempts[0]
        assert (a["number"], a["machine"], a["state"], a["phase"], a["mode"], a["ending"]) == (
            1, "sim-01", "succeeded", "running", "run", "succeeded")
        assert when(a["assigned_at"]) <= when(a["started_at"]) <= when(a["ended_at"])
        assert run["current_attempt"] == a["id"]

        events = (await c.get(f"/v1/runs/{rid}/events")).json()
        assert all(e["run"] == rid for e in events)
        assert [e["id"] for e in events] == sorted(e["id"] for e in events)
        assert [e["to_state"] for e in events if e["kind"] == "run.state"] == [
            "queued", "assigned", "preparing", "running", "succeeded"]
        steps = [e["reason"] for e in events if e["kind"] == "attempt.progress"]
        assert steps == ["open search", "search by MRN", "return home"]
        k = kinds(events)
        assert k.index("preflight.ok") < k.index("attempt.progress") < k.index("attempt.ended")
        assert next(e for e in events if e["kind"] == "attempt.ended")["reason"] == "succeeded"

        # The fleet-wide stream pages by id.
        every = (await c.get("/v1/events", params={"limit": 10_000})).json()
        assert {e["id"] for e in events} <= {e["id"] for e in every}
        tail = (await c.get("/v1/events", params={"after": every[-3]["id"]})).json()
        assert [e["id"] for e in tail] == [e["id"] for e in every[-2:]]
        assert len((await c.get("/v1/events", params={"limit": 2})).json()) == 2
        machine_events = (await c.get("/v1/machines/sim-01/events")).json()
        assert "machine.connected" in kinds(machine_events)
        assert all(e["machine"] == "sim-01" for e in machine_events)

        # The pre-flight proof is a real PNG of the screen.
        artifacts = (await c.get(f"/v1/runs/{rid}/artifacts")).json()
        proof = [x for x in artifacts if x["name"] == "preflight.ok"]
        assert len(proof) == 1, artifacts
        shot = proof[0]
        assert shot["content_type"] == "image/png" and shot["attempt"] == a["id"] and shot["machine"] == "sim-01"
        resp = await c.get(shot["url"])
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "image/png"
        assert resp.content.startswith(b"\x89PNG\r\n\x1a\n") and len(resp.content) == shot["size"]
        image = Image.open(io.BytesIO(resp.content))
        assert image.format == "PNG" and image.size == (1024, 768)
        preflight_event = next(e for e in events if e["kind"] == "preflight.ok")
        assert preflight_event["data"].get("screenshot") == shot["id"]
        machine = (await c.get("/v1/machines/sim-01")).json()
        assert machine["last_screenshot"] is not None
        assert (await c.get(machine["last_screenshot"])).content.startswith(b"\x89PNG")

        for path in ("events", "attempts", "artifacts"):
            resp = await c.get(f"/v1/runs/run_nope/{path}")
            assert resp.status_code == 404 and resp.json()["error"] == "not_found", path
        assert (await c.get("/v1/artifacts/art_nope")).status_code == 404


# -- machines ------------------------------------------------------------------------------------------


async def test_cordon_uncordon_and_drain(live_server, fleet_factory):
    fleet = await fleet_factory(live_server, count=2)
    async with http(live_server) as c:
        machines = (await c.get("/v1/machines")).json()
        assert [m["id"] for m in machines] == ["sim-01", "sim-02"]
        for m in machines:
            assert m["status"] == "ready" and m["connected"] and m["pool"] == "default"
            assert {"ehr.create_patient@1", "ehr.lookup_patient@1", "ehr.export_summary@1"} <= set(m["automations"])
        assert (await c.get("/v1/machines", params={"pool": "elsewhere"})).json() == []
        assert (await c.get("/v1/machines/sim-02")).json()["id"] == "sim-02"

        cordoned = await machine_action(c, "sim-01", "cordon", "disk check")
        assert (cordoned["status"], cordoned["admin"]) == ("cordoned", "cordoned")
        done = [await submit(c, {**LOOKUP, "input": {"mrn": f"C-{i}"}}, wait=30) for i in range(4)]
        assert [r["current_machine"] for r in done] == ["sim-02"] * 4
        events = (await c.get("/v1/machines/sim-01/events")).json()
        cordon_event = next(e for e in events if e["kind"] == "machine.cordoned")
        assert cordon_event["reason"] == "disk check"

        assert (await machine_action(c, "sim-01", "uncordon"))["status"] == "ready"
        await machine_action(c, "sim-02", "cordon")
        back = await submit(c, wait=30)
        assert back["state"] == "succeeded" and back["current_machine"] == "sim-01"
        await machine_action(c, "sim-02", "uncordon")

        # Drain an idle machine: drained at once, and no new work goes there.
        drained = await machine_action(c, "sim-02", "drain", "os update")
        assert (drained["status"], drained["admin"]) == ("drained", "draining")
        more = [await submit(c, {**LOOKUP, "input": {"mrn": f"D-{i}"}}, wait=30) for i in range(2)]
        assert [r["current_machine"] for r in more] == ["sim-01"] * 2

        # Drain a busy machine: its run finishes; then it shows drained.
        fleet.desktops[0].action_delay = 0.2
        slow = await submit(c)
        await reach(live_server, slow["id"], "running")
        busy = await machine_action(c, "sim-01", "drain")
        assert (busy["status"], busy["admin"]) == ("busy", "draining")
        assert (await get_run(c, slow["id"], wait=30))["state"] == "succeeded"
        assert (await c.get("/v1/machines/sim-01")).json()["status"] == "drained"

        # With both drained, a new run waits.
        waiting = await submit(c)
        await asyncio.sleep(0.5)
        assert (await get_run(c, waiting["id"]))["state"] == "queued"

        summary = (await c.get("/v1/summary")).json()
        assert summary["machines"] == {"drained": 2}
        assert summary["runs"] == {"succeeded": 8, "queued": 1}

        for action in ("cordon", "drain", "uncordon"):
            resp = await c.post(f"/v1/machines/ghost-01/{action}", json={})
            assert resp.status_code == 404 and resp.json()["error"] == "not_found"
        assert (await c.get("/v1/machines/ghost-01")).status_code == 404


async def test_summary_counts_runs_and_machines(live_server, fleet_factory):
    await fleet_factory(live_server, count=3, action_delay=0.2)
    view = live_server.view()
    async with http(live_server) as c:
        await submit(c, wait=30)
        await machine_action(c, "sim-03", "cordon")
        running = await submit(c, {**LOOKUP, "input": {"mrn": "S-2"}})
        await reach(live_server, running["id"], "preparing", "running")
        summary = (await c.get("/v1/summary")).json()
        assert summary["runs"] == view.count_runs()
        assert summary["runs"]["succeeded"] == 1 and sum(summary["runs"].values()) == 2
        assert summary["machines"] == {"busy": 1, "ready": 1, "cordoned": 1}
        statuses = [m["status"] for m in (await c.get("/v1/machines")).json()]
        assert sorted(statuses) == ["busy", "cordoned", "ready"]


# -- metrics ----------------------------------------------------------------------------------------


async def test_metrics_are_prometheus_text(live_server, fleet_factory):
    await fleet_factory(live_server, count=2)
    async with http(live_server) as c:
        for i in range(3):
            await submit(c, {**LOOKUP, "input": {"mrn": f"X-{i}"}, "idempotency_key": f"k{i}"}, wait=30)
        replay = await c.post("/v1/runs", json={**LOOKUP, "input": {"mrn": "X-0"}, "idempotency_key": "k0"})
        assert replay.status_code == 200
        for m in ("sim-01", "sim-02"):
            await machine_action(c, m, "cordon")
        doomed = await submit(c)
        await c.post(f"/v1/runs/{doomed['id']}/cancel")
        resp = await c.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(resp.text)
        for s in family.samples
    }
    pool = (("pool", "default"),)
    replica = (("replica", live_server.orch.replica_name),)
    assert samples[("deskfleet_runs_submitted_total", pool)] == 4  # the replay made no run
    assert samples[("deskfleet_runs_finished_total", (("error_code", ""), *pool, ("state", "succeeded")))] == 3
    assert samples[("deskfleet_runs_finished_total", (("error_code", "cancelled"), *pool, ("state", "cancelled")))] == 1
    assert samples[("deskfleet_attempts_started_total", pool)] == 3
    assert samples[("deskfleet_run_duration_seconds_count", (("automation", "ehr.lookup_patient"), *pool))] == 4
    assert samples[("deskfleet_machines", (*pool, ("status", "cordoned")))] == 2
    assert samples[("deskfleet_agents_connected", replica)] == 2
    assert samples[("deskfleet_schedule_pass_seconds_count", replica)] >= 3


# -- webhooks ---------------------------------------------------------------------------------------


@dataclass
class Receiver:
    """A tiny HTTP endpoint that records what it is sent and answers as scripted."""

    statuses: list[int] = field(default_factory=list)  # answers to give, in order; then 200
    got: list[tuple[float, dict[str, str], bytes, str]] = field(default_factory=list)
    url: str = ""

    def __post_init__(self) -> None:
        self.lock = threading.Lock()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            with rec.lock:
                rec.got.append((time.time(), {k.lower(): v for k, v in self.headers.items()}, body, self.path))
                status = rec.statuses.pop(0) if rec.statuses else 200
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    rec.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield rec
    httpd.shutdown()
    httpd.server_close()


SECRET = "whsec-test-7d1f"


def signed(body: bytes) -> str:
    return "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()


async def test_webhook_posts_the_final_run_signed(server_factory, fleet_factory, receiver):
    server = server_factory(webhook_secret=SECRET)
    await fleet_factory(server, count=1)
    hook = f"{receiver.url}/hooks/deskfleet?token=receiver-token-123"
    async with http(server) as c:
        run = await submit(c, {**LOOKUP, "webhook_url": hook}, wait=30)
        assert run["state"] == "succeeded" and run["webhook"] is True
        await eventually(lambda: len(receiver.got) >= 1, timeout=5)
        at, headers, body, path = receiver.got[0]
        assert path == "/hooks/deskfleet?token=receiver-token-123"
        assert headers["content-type"] == "application/json"
        assert headers["x-deskfleet-run"] == run["id"]
        assert hmac.compare_digest(headers["x-deskfleet-signature"], signed(body))
        assert not hmac.compare_digest(headers["x-deskfleet-signature"], signed(body + b" "))
        payload = json.loads(body)
        assert payload["id"] == run["id"] and payload["state"] == "succeeded"
        assert payload["output"] == run["output"]
        assert at - when(payload["finished_at"]) < 3
        # The receiver's URL (and its token) is not shown back through the API.
        shown = (await c.get(f"/v1/runs/{run['id']}")).text + (await c.get(f"/v1/runs/{run['id']}/events")).text
        assert "receiver-token-123" not in shown
        await eventually(lambda: "webhook.delivered" in [e.kind for e in server.view().events(run_id=run["id"])],
                         timeout=3)

        # A cancelled run is announced as well.
        await machine_action(c, "sim-01", "cordon")
        doomed = await submit(c, {**LOOKUP, "webhook_url": hook})
        await c.post(f"/v1/runs/{doomed['id']}/cancel")
        await eventually(lambda: len(receiver.got) >= 2, timeout=5)
        _, headers, body, _ = receiver.got[1]
        assert json.loads(body)["state"] == "cancelled"
        assert headers["x-deskfleet-signature"] == signed(body)
    await asyncio.sleep(1.5)
    assert len(receiver.got) == 2, "each run is announced once"


async def test_webhook_is_retried_after_a_failure(server_factory, fleet_factory, receiver):
    receiver.statuses = [503]
    server = server_factory(webhook_secret=SECRET)
    await fleet_factory(server, count=1)
    async with http(server) as c:
        run = await submit(c, {**LOOKUP, "webhook_url": f"{receiver.url}/hook"}, wait=30)
        assert run["state"] == "succeeded"
        await eventually(lambda: len(receiver.got) >= 2, timeout=8)
        (t1, _, b1, _), (t2, h2, b2, _) = receiver.got[:2]
        assert json.loads(b1)["id"] == json.loads(b2)["id"] == run["id"]
        assert h2["x-deskfleet-signature"] == signed(b2)
        assert 1.0 <= t2 - t1 < 5, "retried after a backoff, not at once and not much later"
        view = server.view()
        await eventually(lambda: [e for e in view.events(run_id=run["id"]) if e.kind == "webhook.delivered"],
                         timeout=3)
        delivered = next(e for e in view.events(run_id=run["id"]) if e.kind == "webhook.delivered")
        assert delivered.data["tries"] == 2
    await asyncio.sleep(1.5)
    assert len(receiver.got) == 2, "delivered once it succeeded, then left alone"
