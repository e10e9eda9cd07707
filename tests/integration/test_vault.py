"""The credential vault with real agents over real HTTP and WebSockets: account leases
honoured by the scheduler, TOTP codes only for a lease holder, grants dropped after the
attempt, and invariant 6 — an account's password and seed never in logs, events, errors or
responses.

SimEHR checks logins against its own accounts (``SimBackend``), so a vault account here is
one of those under a name of our choosing: ``solo`` logs in as SimEHR's ``robot1``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import websockets
from pydantic import BaseModel

from deskfleet.agent.runtime import Agent, AgentConfig, App
from deskfleet.client import AsyncClient
from deskfleet.crypto import REDACTED
from deskfleet.protocol import Hello, Reply, TotpRequest, server_message
from deskfleet.sdk import Context, Registry, automation
from deskfleet.sim import SimBackend, SimDesktop, ehr_model
from support import LiveServer, eventually, wait_ready

SEED = 1  # the fleets' SimEHR seed
CREDS = SimBackend.credentials(SEED)
SEED_B32 = CREDS["clinic-a"].totp_seed or ""


async def put(c: AsyncClient, name: str, as_user: str, **kw: Any) -> dict[str, Any]:
    cred = CREDS[as_user]
    return await c.put_account(name, app="simehr", username=cred.username, password=cred.password,
                               totp_seed=cred.totp_seed, **kw)


# -- the API ------------------------------------------------------------------------------------------

async def test_bad_account_requests_say_what_to_fix_and_write_nothing(live_server):
    async with httpx.AsyncClient(base_url=live_server.url) as http:
        ok = {"app": "simehr", "username": "u", "password": "Pw-0f-the-test"}
        cases = [
            ("/v1/accounts/a1", {**ok, "totp_seed": "this is not base32!"}, 422, "base32", "totp_seed"),
            ("/v1/accounts/a1", {**ok, "totp_seed": "JBSWY3DP"}, 422, "at least 16", "totp_seed"),
            ("/v1/accounts/a1", {**ok, "max_sessions": 0}, 422, "at least 1", "max_sessions"),
            ("/v1/accounts/a1", {**ok, "max_sessions": "2"}, 422, "integer", "max_sessions"),
            ("/v1/accounts/a1", {"app": "simehr", "username": "u"}, 422, "password", "password"),
            ("/v1/accounts/a1", {**ok, "pasword": "x"}, 422, "unknown field", "pasword"),
            ("/v1/accounts/-bad", ok, 422, "account names are", "name"),
        ]
        for path, body, status, says, field in cases:
            resp = await http.put(path, json=body)
            assert resp.status_code == status, resp.text
            err = resp.json()
            assert says in err["message"] and err["field"] == field, err
            assert "Pw-0f-the-test" not in resp.text and "this is not base32" not in resp.text
        for method, path in (("GET", "/v1/accounts/nobody"), ("PATCH", "/v1/accounts/nobody"),
                             ("DELETE", "/v1/accounts/nobody")):
            resp = await http.request(method, path, **({"json": {"max_sessions": 2}} if method == "PATCH" else {}))
            assert resp.status_code == 404 and "no account 'nobody'" in resp.json()["message"], resp.text
        resp = await http.patch("/v1/accounts/nobody", json={"password": None})
        assert resp.status_code in (404, 422)
        assert (await http.get("/v1/accounts")).json() == []
    assert [e for e in live_server.view().events() if e.kind.startswith("account.")] == []


async def test_no_account_endpoint_or_event_shows_a_secret(live_server):
    password, seed = "Correct-Horse-Battery-9", "jbsw y3dp ehpk 3pxp jbsw y3dp ehpk 3pxp"
    async with httpx.AsyncClient(base_url=live_server.url) as http:
        texts = []
        made = await http.put("/v1/accounts/alice", json={"app": "ehr", "username": "alice", "password": password,
                                                          "totp_seed": seed, "labels": {"site": "lyon"}})
        assert made.status_code == 201, made.text
        assert made.json()["has_password"] and made.json()["has_totp"] and made.json()["leases"] == []
        texts.append(made.text)
        again = await http.put("/v1/accounts/alice", json={"app": "ehr", "username": "alice", "password": password})
        assert again.status_code == 200 and not again.json()["has_totp"]
        texts.append(again.text)
        patched = await http.patch("/v1/accounts/alice", json={"totp_seed": seed, "max_sessions": 3})
        assert patched.status_code == 200 and patched.json()["has_totp"] and patched.json()["max_sessions"] == 3
        texts.append(patched.text)
        for path in ("/v1/accounts", "/v1/accounts/alice", "/v1/events?limit=10000", "/v1/machines", "/metrics",
                     "/openapi.json"):
            texts.append((await http.get(path)).text)
        texts.append((await http.delete("/v1/accounts/alice")).text)
    normalized = seed.replace(" ", "").upper()
    for text in texts:
        for secret in (password, seed, normalized, normalized.lower()):
            assert secret not in text
    stored = [e for e in live_server.view().events() if e.kind.startswith("account.")]
    assert [e.kind for e in stored] == ["account.created", "account.updated", "account.updated", "account.removed"]


async def test_submit_refuses_a_run_the_vault_cannot_serve(live_server, fleet_factory):
    await fleet_factory(live_server, count=1, accounts=False)
    async with AsyncClient(live_server.url) as c:
        resp = await httpx.AsyncClient(base_url=live_server.url).post(
            "/v1/runs", json={"automation": "ehr.lookup_patient", "input": {"mrn": "X"}})
        assert resp.status_code == 422, resp.text
        err = resp.json()
        assert err["error"] == "unservable" and "pack 'simehr'" in err["message"]
        assert "deskfleet accounts set NAME --app simehr" in err["message"]
        await put(c, "solo", "robot1")
        resp2 = await httpx.AsyncClient(base_url=live_server.url).post(
            "/v1/runs", json={"automation": "ehr.lookup_patient", "input": {"mrn": "X"}, "session_key": "nobody"})
        assert resp2.status_code == 422 and "no account 'nobody'" in resp2.json()["message"]
        assert resp2.json()["field"] == "session_key"
        await c.put_account("erp-user", app="erp", username="u", password="p")
        resp3 = await httpx.AsyncClient(base_url=live_server.url).post(
            "/v1/runs", json={"automation": "ehr.lookup_patient", "input": {"mrn": "X"}, "session_key": "erp-user"})
        assert resp3.status_code == 422 and "logs in to 'erp'" in resp3.json()["message"]
        # An automation that does not log in needs no account, whatever the vault holds.
        ok = await c.submit("sim.noop", {"value": "x"}, wait=20)
        assert ok["state"] == "succeeded"
        assert (await c.attempts(ok["id"]))[0]["account"] is None
        # A pool that waits for capacity accepts it: an account may be added later.
        await c.put_pool("default", allow_wait_for_capacity=True)
        waiting = await c.submit("ehr.lookup_patient", {"mrn": "W-1"}, session_key="later")
        await asyncio.sleep(0.5)
        assert (await c.run(waiting["id"]))["state"] == "queued"
        await put(c, "later", "robot2")
        assert (await c.run(waiting["id"], wait=20))["state"] == "succeeded"
    assert live_server.view().count_runs() == {"succeeded": 2}


# -- leases with real agents ---------------------------------------------------------------------------

def logged_in(fleet: Any, username: str) -> set[str]:
    """The simulated desktops whose SimEHR is logged in as ``username`` — the truth, in-process."""
    return {d.name for d in fleet.desktops if d.app.session_user == username}


@asynccontextmanager
async def watching(fleet: Any, username: str) -> AsyncIterator[list[set[str]]]:
    """Sample every desktop's session every few milliseconds while the block runs."""
    seen: list[set[str]] = []
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            seen.append(logged_in(fleet, username))
            await asyncio.sleep(0.002)

    task = asyncio.create_task(sample())
    try:
        yield seen
    finally:
        stop.set()
        await task


def holders_over_time(events: list[dict[str, Any]], account: str) -> list[set[str]]:
    held: set[str] = set()
    out = []
    for e in events:
        if e["data"].get("account") != account:
            continue
        if e["kind"] == "account.leased":
            held.add(e["machine"])
        elif e["kind"] == "account.released":
            held.discard(e["machine"])
        out.append(set(held))
    return out


async def test_an_account_of_one_session_is_never_logged_in_on_two_machines(live_server, fleet_factory):
    fleet = await fleet_factory(live_server, count=2, accounts=False, action_delay=0.002)
    async with AsyncClient(live_server.url) as c:
        await put(c, "solo", "robot1", max_sessions=1)
        async with watching(fleet, "robot1") as seen:
            done: list[dict[str, Any]] = []
            for wave in range(3):
                runs = await asyncio.gather(*(c.submit("ehr.lookup_patient", {"mrn": f"S-{wave}-{i}"},
                                                       session_key="solo") for i in range(6)))
                done += await asyncio.gather(*(c.run(r["id"], wait=60) for r in runs))
                # The holder's session ends (expiry): its lease goes, and the next wave may
                # log in anywhere — but only once the old session is gone.
                [holder] = logged_in(fleet, "robot1")
                next(d for d in fleet.desktops if d.name == holder).app.expire_session()
                await eventually(lambda: not live_server.view().account_leases("solo"), timeout=10)
        events = await c.every_event()
        attempts = [a for r in done for a in await c.attempts(r["id"])]
    assert {r["state"] for r in done} == {"succeeded"}, [r["error"] for r in done]
    assert {a["account"] for a in attempts} == {"solo"}
    assert max(len(s) for s in seen) == 1, "robot1 was logged in on two machines at once"
    assert max(len(h) for h in holders_over_time(events, "solo")) == 1
    assert len({a["machine"] for a in attempts}) == 2, "the lease moved once the session ended"
    # The run's machine was logged in as the account during it: never as another.
    assert all(len(s) <= 1 for s in seen)


async def test_a_run_without_session_key_gets_a_free_account(live_server, fleet_factory):
    fleet = await fleet_factory(live_server, count=2, accounts=False)
    async with AsyncClient(live_server.url) as c:
        await put(c, "solo", "robot1", max_sessions=1)
        await put(c, "spare", "robot2", max_sessions=1)
        first = await c.submit("ehr.lookup_patient", {"mrn": "F-0"}, session_key="solo", wait=30)
        holder = first["current_machine"]
        await eventually(lambda: live_server.view().get_machine(holder).sessions == ["solo"])
        # Two at once: one on the machine logged in as solo, the other logs in with the free one.
        runs = await asyncio.gather(*(c.submit("ehr.lookup_patient", {"mrn": f"F-{i}"}) for i in (1, 2)))
        done = await asyncio.gather(*(c.run(r["id"], wait=30) for r in runs))
        got = {(await c.attempts(r["id"]))[-1]["machine"]: (await c.attempts(r["id"]))[-1]["account"] for r in done}
        other = next(d.name for d in fleet.desktops if d.name != holder)
        assert got == {holder: "solo", other: "spare"}
        await eventually(lambda: live_server.view().get_machine(other).sessions == ["spare"])
        shown = await c.account("spare")
        assert [x["machine"] for x in shown["leases"]] == [other] and shown["sessions_in_use"] == 1


# -- TOTP codes ------------------------------------------------------------------------------------------

async def raw_agent(server: LiveServer, machine: str) -> websockets.ClientConnection:
    async with httpx.AsyncClient() as http:
        resp = await http.post(f"{server.url}/agent/v1/enrol", json={"machine": machine},
                               headers={"authorization": f"Bearer {server.token}"})
    key = resp.json()["agent_key"]
    ws = await websockets.connect(server.url.replace("http://", "ws://") + "/agent/v1/connect",
                                  additional_headers={"authorization": f"Bearer {key}", "x-deskfleet-machine": machine})
    await ws.send(orjson.dumps(Hello(boot_id="b", agent_version="t", automations=[]).model_dump(mode="json")))
    await asyncio.wait_for(ws.recv(), 5)  # welcome
    return ws


async def ask_code(ws: websockets.ClientConnection, account: str) -> Reply:
    await ws.send(orjson.dumps(TotpRequest(id=9, account=account).model_dump(mode="json")))
    while True:
        msg = server_message.validate_python(orjson.loads(await asyncio.wait_for(ws.recv(), 5)))
        if isinstance(msg, Reply):
            return msg


async def test_totp_codes_go_only_to_the_machine_holding_the_lease(live_server, fleet_factory):
    fleet = await fleet_factory(live_server, count=1, accounts=False)
    async with AsyncClient(live_server.url) as c:
        await put(c, "mfa", "clinic-a")  # SimEHR asks clinic-a for a code at every login
        run = await c.submit("ehr.lookup_patient", {"mrn": "T-1"}, session_key="mfa", wait=30)
        assert run["state"] == "succeeded", run
        # One code per MFA prompt (two if the first was about to expire: the agent waits for the next).
        issued = [e for e in await c.every_event() if e["kind"] == "account.totp_issued"]
        assert 1 <= len(issued) <= 2
        for e in issued:
            assert e["machine"] == fleet.agents[0].machine_id and e["attempt"] == run["current_attempt"]
            assert e["data"] == {"account": "mfa"}
        intruder = await raw_agent(live_server, "intruder-1")
        try:
            refused = await ask_code(intruder, "mfa")
            assert not refused.ok and refused.code is None and "holds no lease" in (refused.error or "")
            unknown = await ask_code(intruder, "nobody")
            assert not unknown.ok and "no account 'nobody'" in (unknown.error or "")
        finally:
            await intruder.close()
        assert len([e for e in await c.every_event() if e["kind"] == "account.totp_issued"]) == len(issued)


# -- the agent drops the grant; invariant 6 --------------------------------------------------------------

class Echo(BaseModel):
    echo: bool = False


class Seen(BaseModel):
    ok: bool


held: list[Any] = []  # what the automation saw of its agent's attempt


def peeking(agent_box: list[Agent]) -> Registry:
    @automation(name="test.peek", version="1", pack="simehr", needs_account=True)
    async def peek(ctx: Context, data: Echo) -> Seen:
        cur = agent_box[0]._current
        held.append(cur)
        assert cur is not None and cur.account is not None and cur.assign.account is None
        if data.echo:
            # A library that quotes what it was given: the error must not carry the password.
            raise RuntimeError(f"the app refused the password {cur.account.password!r}")
        return Seen(ok=True)

    return Registry([peek])


def clumsy_model() -> Any:
    """SimEHR's model whose login fails once quoting what it typed, as a careless playbook
    or library might: the step's event must not carry the password."""
    import dataclasses

    from deskfleet.errors import DesktopError

    model = ehr_model()
    real_login = model.playbooks["login"]
    failed: list[bool] = []

    async def login(ctx: Any) -> None:
        if not failed:
            failed.append(True)
            raise DesktopError(f"typed {ctx.account.password!r} into the wrong field")
        await real_login(ctx)

    return dataclasses.replace(model, playbooks={**model.playbooks, "login": login})


@asynccontextmanager
async def own_agent(server: LiveServer, tmp_path: Path) -> AsyncIterator[Agent]:
    backend = SimBackend(tmp_path / "own-ehr.db", seed=SEED)
    box: list[Agent] = []
    agent = Agent(AgentConfig(servers=[server.url], machine="own-01", enrolment_token=server.token,
                              key_file=tmp_path / "own-01.key", screenshots="none"),
                  App(SimDesktop("own-01", backend, seed=5), peeking(box), clumsy_model()))
    box.append(agent)
    task = asyncio.create_task(agent.run())
    try:
        await wait_ready(server, {"own-01"})
        yield agent
    finally:
        await agent.shutdown()
        try:
            await asyncio.wait_for(task, 10)
        except (TimeoutError, asyncio.CancelledError):
            task.cancel()
        backend.close()


async def test_the_agent_drops_the_grant_and_no_secret_leaks_anywhere(server_factory, tmp_path, captured):
    server = server_factory()
    password = CREDS["clinic-a"].password
    held.clear()
    async with own_agent(server, tmp_path) as agent, AsyncClient(server.url) as c:
        await put(c, "mfa", "clinic-a")
        run = await c.submit("test.peek", {}, wait=30)
        assert run["state"] == "succeeded", run
        steps = [e for e in await c.events(run["id"]) if e["kind"] == "playbook.step"]
        assert any(REDACTED in (e["data"].get("error") or "") for e in steps), steps
        [cur] = held
        assert cur.account is None, "the attempt is over: its grant is gone"
        assert cur.assign.account is None and agent._current is None
        failed = await c.submit("test.peek", {"echo": True}, max_attempts=1, wait=30)
        assert failed["state"] == "failed"
        assert REDACTED in failed["error"]["message"] and password not in failed["error"]["message"]
        assert held[-1].account is None
        assert any(e["kind"] == "account.totp_issued" for e in await c.every_event())
        answers = [json.dumps(failed), json.dumps(run)]
        for path in ("/v1/events?limit=10000", "/v1/accounts", "/v1/accounts/mfa", "/v1/machines", "/v1/runs",
                     f"/v1/runs/{failed['id']}/events", f"/v1/runs/{failed['id']}/attempts"):
            async with httpx.AsyncClient(base_url=server.url) as http:
                answers.append((await http.get(path)).text)
    for text in answers:
        assert password not in text and SEED_B32 not in text
    db = b"".join(p.read_bytes() for p in sorted(server.settings.data_dir.glob("deskfleet.db*")))
    assert password.encode() not in db and SEED_B32.encode() not in db, "encrypted at rest"
    assert captured.lines, "the log capture saw nothing: the check would prove nothing"
    assert not captured.leaks(password), captured.leaks(password)
    assert not captured.leaks(SEED_B32), captured.leaks(SEED_B32)


@pytest.mark.parametrize("with_seed", [True, False])
async def test_a_quarantined_machine_verifies_with_an_account_from_the_vault(live_server, fleet_factory, with_seed):
    fleet = await fleet_factory(live_server, count=1, accounts=False)
    desktop, mid = fleet.desktops[0], fleet.agents[0].machine_id
    async with AsyncClient(live_server.url) as c:
        await put(c, "solo", "robot1")
        if not with_seed:
            await c.patch_account("solo", totp_seed=None)
        assert (await c.submit("ehr.lookup_patient", {"mrn": "V-1"}, wait=30))["state"] == "succeeded"
        live_server.view().quarantine(mid, "test: re-prove your state", 0.0)
        desktop.app.expire_session()  # logged out: verifying means logging in again
        await eventually(lambda: live_server.view().get_machine(mid).health.value == "online", timeout=20)
        assert desktop.app.session_user == "robot1"
        kinds = [(e["kind"], e["reason"]) for e in await c.every_event() if e["kind"] == "account.granted"]
        assert ("account.granted", "verify") in kinds


async def test_an_account_a_machine_holds_is_removed_only_with_force(live_server, fleet_factory):
    fleet = await fleet_factory(live_server, count=1, accounts=False)
    mid = fleet.agents[0].machine_id
    async with AsyncClient(live_server.url) as c, httpx.AsyncClient(base_url=live_server.url) as http:
        await put(c, "solo", "robot1")
        assert (await c.submit("ehr.lookup_patient", {"mrn": "D-1"}, wait=30))["state"] == "succeeded"
        await eventually(lambda: live_server.view().account_leases("solo"))
        refused = await http.delete("/v1/accounts/solo")
        assert refused.status_code == 409, refused.text
        assert mid in refused.json()["message"] and "force=true" in refused.json()["message"]
        assert (await c.account("solo"))["leases"][0]["machine"] == mid
        forced = await http.delete("/v1/accounts/solo", params={"force": "true"})
        assert forced.status_code == 200
        assert forced.json()["removed"] == "solo" and [x["machine"] for x in forced.json()["leases_released"]] == [mid]
        assert await c.accounts() == []
        # The machine is still logged in as robot1; with no account of the pack left, a run
        # that logs in is refused at submit.
        resp = await http.post("/v1/runs", json={"automation": "ehr.lookup_patient", "input": {"mrn": "D-2"}})
        assert resp.status_code == 422
