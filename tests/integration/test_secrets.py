"""Invariant 6: secrets are encrypted at rest and never appear in logs, events, errors or
API responses — yet the agent that runs the attempt gets the real value.

A small automation signs in to SimEHR with a password given as a ``SecretStr`` input. The
agent has *no* stored credentials, so the run can only succeed if the password the client
sent reached the machine intact. Everything else — the database file, every API answer,
the webhook, the event stream, every log record at DEBUG — must not contain it.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import BaseModel, Field, SecretStr, field_validator

from deskfleet.agent.runtime import Agent, AgentConfig, App
from deskfleet.crypto import REDACTED
from deskfleet.errors import BusinessError
from deskfleet.sdk import Context, Registry, automation
from deskfleet.sim import SimBackend, SimDesktop, ehr_model
from deskfleet.sim.layout import layout_for
from support import LiveServer, wait_ready

SEED = 4
PASSWORD = SimBackend.accounts(SEED)["robot1"].credential.password  # "robot1-<8 hex>"

received: list[str] = []  # what the automation saw, as the machine saw it


class SignIn(BaseModel):
    username: str = Field(min_length=1, max_length=32)
    password: SecretStr = Field(min_length=8, max_length=64)


class Strict(SignIn):
    """The same, with a rule JSON schema cannot carry: only the machine can check it."""

    @field_validator("password")
    @classmethod
    def _not_the_default(cls, v: SecretStr) -> SecretStr:
        if v.get_secret_value().startswith("robot1-"):
            raise ValueError("this password is the factory default; rotate it first")
        return v


class SignedIn(BaseModel):
    username: str
    screen: str


class Account(BaseModel):
    username: str
    password: SecretStr


class Nested(BaseModel):
    account: Account


class Checked(BaseModel):
    ok: bool


async def _sign_in(ctx: Context, username: str, password: str) -> str:
    layout = layout_for(1024, 768)
    desktop = ctx.desktop
    await ctx.progress("sign in")
    if await ctx.wait_for("login", "home", timeout=10) == "home":  # an earlier run left it signed in
        await desktop.click(*layout.widget("home", "sign_out").center)
        await ctx.wait_for("login", timeout=10)
    for name, text in (("username", username), ("password", password)):
        await desktop.click(*layout.widget("login", name).center)
        await desktop.press("ctrl", "a")
        await desktop.type_text(text)
    await desktop.click(*layout.widget("login", "sign_in").center)
    await asyncio.sleep(0.05)
    screen = await ctx.wait_for("home", "mfa", timeout=3, interval=0.05)
    return screen


@automation(name="test.sign_in", version="1", required_state="any")
async def sign_in(ctx: Context, data: SignIn) -> SignedIn:
    """Sign in with the password the client sent; fails unless it is the real one."""
    received.append(data.password.get_secret_value())
    try:
        screen = await _sign_in(ctx, data.username, data.password.get_secret_value())
    except Exception as exc:
        raise BusinessError(f"SimEHR refused the sign-in: {type(exc).__name__}: {exc}") from exc
    return SignedIn(username=data.username, screen=screen)


@automation(name="test.sign_in_strict", version="1", required_state="any")
async def sign_in_strict(ctx: Context, data: Strict) -> SignedIn:
    screen = await _sign_in(ctx, data.username, data.password.get_secret_value())
    return SignedIn(username=data.username, screen=screen)


# -- harness -----------------------------------------------------------------------------------


@asynccontextmanager
async def vault_machine(server: LiveServer, tmp_path: Path) -> AsyncIterator[Agent]:
    backend = SimBackend(tmp_path / "vault-ehr.db", seed=SEED)
    agent = Agent(
        AgentConfig(servers=[server.url], machine="vault-01", enrolment_token=server.token,
                    key_file=tmp_path / "vault-01.key", screenshots="none"),
        App(SimDesktop("vault-01", backend, seed=3), Registry([sign_in, sign_in_strict]), ehr_model()),
        # no accounts of its own, none in the vault: the run must bring the password
    )
    task = asyncio.create_task(agent.run())
    try:
        await wait_ready(server, {"vault-01"})
        yield agent
    finally:
        await agent.shutdown()
        try:
            await asyncio.wait_for(task, 10)
        except (TimeoutError, asyncio.CancelledError):
            task.cancel()
        backend.close()


@pytest.fixture
def hooks() -> Iterator[tuple[str, list[bytes]]]:
    bodies: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            bodies.append(self.rfile.read(int(self.headers.get("content-length", "0"))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/hook", bodies
    httpd.shutdown()
    httpd.server_close()


def database_bytes(server: LiveServer) -> bytes:
    data_dir = server.settings.data_dir
    return b"".join(p.read_bytes() for p in sorted(data_dir.glob("deskfleet.db*")))


def stored_input(server: LiveServer, run_id: str) -> dict[str, Any]:
    path = server.settings.data_dir / "deskfleet.db"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        raw = db.execute("SELECT input FROM runs WHERE id = ?", (run_id,)).fetchone()[0]
    return raw if isinstance(raw, dict) else json.loads(raw)


# -- tests ----------------------------------------------------------------------------------------


async def test_a_secret_input_is_encrypted_redacted_and_still_delivered(server_factory, tmp_path, captured, hooks):
    hook_url, hook_bodies = hooks
    received.clear()
    server = server_factory(webhook_secret="whsec-secrets")
    body = {"automation": "test.sign_in", "input": {"username": "robot1", "password": PASSWORD},
            "webhook_url": hook_url, "idempotency_key": "sign-in-1"}
    async with vault_machine(server, tmp_path), httpx.AsyncClient(base_url=server.url, timeout=30) as c:
        answers: list[httpx.Response] = []
        first = await c.post("/v1/runs", json=body)
        answers.append(first)
        assert first.status_code == 201, first.text
        run_id = first.json()["id"]
        answers.append(await c.post("/v1/runs", json=body))  # idempotent replay
        assert answers[-1].status_code == 200
        done = await c.get(f"/v1/runs/{run_id}", params={"wait": 30})
        answers.append(done)
        run = done.json()
        # The run could only sign in with the real password: the agent got it.
        assert run["state"] == "succeeded", run
        assert run["output"] == {"username": "robot1", "screen": "home"}
        assert received == [PASSWORD]

        # Redacted in every answer that shows the input.
        for resp in answers:
            assert resp.json()["input"] == {"username": "robot1", "password": REDACTED}, resp.text
        listed = await c.get("/v1/runs")
        answers.append(listed)
        assert [r["input"]["password"] for r in listed.json()["runs"]] == [REDACTED]
        answers.append(await c.post("/v1/runs", params={"wait": 30},
                                    json={**body, "idempotency_key": "sign-in-2"}))
        assert answers[-1].json()["input"]["password"] == REDACTED
        assert answers[-1].json()["state"] == "succeeded"
        for path in (f"/v1/runs/{run_id}/events", f"/v1/runs/{run_id}/attempts", "/v1/events?limit=10000",
                     "/v1/machines", "/v1/summary", "/v1/automations", "/metrics"):
            answers.append(await c.get(path))
        for resp in answers:
            assert PASSWORD not in resp.text, f"{resp.request.url.path} shows the secret"

        # The webhook carries the redacted run.
        deadline = time.monotonic() + 6
        while len(hook_bodies) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert len(hook_bodies) == 2, "both runs announced"
        for raw in hook_bodies:
            assert json.loads(raw)["input"]["password"] == REDACTED
            assert PASSWORD.encode() not in raw

    # At rest: the stored input holds ciphertext, and the plaintext is nowhere in the file.
    stored = stored_input(server, run_id)
    assert stored["username"] == "robot1"
    assert stored["password"].startswith("enc:v1:") and PASSWORD not in stored["password"]
    assert PASSWORD.encode() not in database_bytes(server)
    assert all(PASSWORD not in json.dumps(e.data) and PASSWORD not in (e.reason or "")
               for e in server.view().events(limit=100_000))
    key_file = server.settings.data_dir / "secret.key"
    assert key_file.stat().st_mode & 0o077 == 0, "the key that decrypts secrets is private"

    # Logs, at DEBUG, from the server and everything around it.
    assert captured.lines, "the log capture saw nothing: the check would prove nothing"
    assert not captured.leaks(PASSWORD), captured.leaks(PASSWORD)


async def test_a_bad_secret_is_refused_without_echoing_it(server_factory, tmp_path, captured):
    server = server_factory()
    async with vault_machine(server, tmp_path), httpx.AsyncClient(base_url=server.url, timeout=30) as c:
        before = server.view().count_runs()
        for bad in ("Zq7xK", 12345678901, ["Yv83mmA0pq"], "W" * 65 + "Kj9"):
            resp = await c.post("/v1/runs", json={"automation": "test.sign_in",
                                                  "input": {"username": "robot1", "password": bad}})
            assert 400 <= resp.status_code < 500, resp.text
            body = resp.json()
            assert body.get("field") == "input" and "password" in body["message"], body
            shown = json.dumps(bad).strip('"[]')
            assert shown not in resp.text, f"the refused secret is echoed: {resp.text}"
            assert not captured.leaks(shown)
        assert server.view().count_runs() == before


async def test_a_secret_never_leaks_through_a_failing_attempt(server_factory, tmp_path, captured):
    """The machine's own validation refuses the input (a rule JSON schema cannot carry).
    The run fails — and its error, events and logs must still not show the password."""
    server = server_factory()
    async with vault_machine(server, tmp_path), httpx.AsyncClient(base_url=server.url, timeout=30) as c:
        resp = await c.post("/v1/runs", params={"wait": 30}, json={
            "automation": "test.sign_in_strict", "input": {"username": "robot1", "password": PASSWORD}})
        assert resp.status_code == 201, resp.text
        run = resp.json()
        assert run["state"] == "failed", run
        assert "factory default" in run["error"]["message"], "the reason is still reported"
        texts = {
            "run": resp.text,
            "run again": (await c.get(f"/v1/runs/{run['id']}")).text,
            "events": (await c.get(f"/v1/runs/{run['id']}/events")).text,
            "attempts": (await c.get(f"/v1/runs/{run['id']}/attempts")).text,
        }
    leaked = [where for where, text in texts.items() if PASSWORD in text]
    assert not leaked, f"the secret appears in: {leaked}"
    assert PASSWORD.encode() not in database_bytes(server)
    assert not captured.leaks(PASSWORD), captured.leaks(PASSWORD)


def test_a_secret_inside_a_nested_model_is_refused_when_declared():
    """``SecretStr`` one level down could not be encrypted or redacted by the orchestrator,
    which sees top-level fields: the SDK refuses such an automation outright."""
    with pytest.raises(TypeError, match="top-level"):

        @automation(name="test.check_account", version="1", required_state="any")
        async def check_account(ctx: Context, data: Nested) -> Checked:
            return Checked(ok=True)



async def test_a_retried_run_gets_the_same_secret_and_keeps_it_encrypted(server_factory, tmp_path):
    """Retry: a new run with the ended run's request — its secret input delivered again to the
    agent, still encrypted at rest and redacted in every answer; asked again, the same run."""
    received.clear()
    server = server_factory()
    wrong = "not-" + PASSWORD
    async with vault_machine(server, tmp_path), httpx.AsyncClient(base_url=server.url, timeout=30) as c:
        first = (await c.post("/v1/runs", params={"wait": 30}, json={
            "automation": "test.sign_in", "input": {"username": "robot1", "password": wrong}})).json()
        assert first["state"] == "failed" and first["error"]["error"] == "business_error", first
        retried = await c.post(f"/v1/runs/{first['id']}/retry")
        assert retried.status_code == 201, retried.text
        again = await c.post(f"/v1/runs/{first['id']}/retry")
        assert again.status_code == 200 and again.json()["id"] == retried.json()["id"], "a retry is made once"
        second = (await c.get(f"/v1/runs/{retried.json()['id']}", params={"wait": 30})).json()
        assert second["input"] == {"username": "robot1", "password": REDACTED}
        assert second["state"] == "failed"
        assert received == [wrong, wrong], "the agent got the secret again"
        assert PASSWORD.encode() not in database_bytes(server) and wrong.encode() not in database_bytes(server)
        assert stored_input(server, second["id"])["password"] != wrong
        events = (await c.get(f"/v1/runs/{first['id']}/events")).json()
        assert [e["data"]["retry"] for e in events if e["kind"] == "run.retried"] == [second["id"]]
        # A run that did not end in failure is not retried.
        ok = (await c.post("/v1/runs", params={"wait": 30}, json={
            "automation": "test.sign_in", "input": {"username": "robot1", "password": PASSWORD}})).json()
        assert ok["state"] == "succeeded", ok
        refused = await c.post(f"/v1/runs/{ok['id']}/retry")
        assert refused.status_code == 409 and "succeeded" in refused.json()["message"]
        assert (await c.post("/v1/runs/run_nope/retry")).status_code == 404
