"""People in the loop: human tasks (issue 12, item 7).

The store's transitions on every backend (SQLite and PostgreSQL); then a real orchestrator
over HTTP with real agents over the real WebSocket — simulated desktops running
``sim.approval`` (SimEHR's pack: ``ctx.ask_human`` as a user writes it) or an automation of
this test's own — and people played by the test through the API and the real CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest
import websockets
from pydantic import BaseModel
from sqlalchemy import select

from deskfleet import Agent, AgentConfig, App, Context, HumanAnswer, Registry, automation
from deskfleet.client import ApiError, AsyncClient
from deskfleet.errors import Conflict, InvalidRequest, NotFound, StaleLease
from deskfleet.models import AutomationSpec, Ending, HumanTaskState, RunState, StopReason
from deskfleet.protocol import AutomationAd, Hello, HumanRequest
from deskfleet.sim.backend import SimBackend
from deskfleet.sim.desktop import SimDesktop
from deskfleet.store import SQLStore
from deskfleet.store.human import DUE_MARGIN
from deskfleet.store.schema import human_tasks
from support import eventually, wait_ready

T0 = 1_700_000_000.0
LEASE = 30.0
RECONCILING = AutomationSpec("t.ask", "1", has_reconcile=True)
NOTIFY = {"human_task.created": ["http://h/all"], "human_task.completed": ["http://h/all"],
          "human_task.expired": ["http://h/all"], "human_task.escalated": ["http://h/all", "http://h/esc"]}


# -- the store, on every backend -----------------------------------------------------------------

def running(s: SQLStore, **kw: Any) -> tuple[str, int, str]:
    """A run of t.ask whose attempt is running on m1: (run id, attempt id, machine id)."""
    from deskfleet.models import RunSpec
    from deskfleet.scheduler import Policy
    from deskfleet.store import Heartbeat

    if s.get_machine("m1") is None:
        s.enrol_machine("m1", pool="default", labels={}, key_hash="h", now=T0)
        s.connect_machine("m1", boot_id="b", agent_version="1", automations=[RECONCILING], labels=None,
                          heartbeat=Heartbeat("m1", T0), lease_timeout=LEASE, now=T0)
    run, _ = s.submit(RunSpec("t.ask", **kw), request_hash="h", now=T0)
    [a] = [a for a in s.schedule(Policy(), T0, LEASE) if a.run.id == run.id]
    s.attempt_preparing(a.attempt.id, "m1", T0)
    s.attempt_start(a.attempt.id, "m1", T0)
    return run.id, a.attempt.id, "m1"


def task_events(s: SQLStore, run_id: str) -> list[tuple[str, str | None]]:
    return [(e.kind, e.data.get("by")) for e in s.events(run_id=run_id) if e.kind.startswith("human_task.")]


def notices(s: SQLStore) -> list[tuple[str, str]]:
    return sorted((event, url) for _, _, event, url in s.due_human_notices(T0 + 10_000, limit=100))


def test_a_task_is_claimed_exclusively_released_and_completed_each_step_on_the_timeline(s):
    run_id, attempt_id, mid = running(s, attempt_timeout=600.0)
    t = s.create_human_task(attempt_id, mid, kind="push_approval", prompt="Approve the sign-in", due=3600.0,
                            now=T0 + 1, notify=NOTIFY)
    # Clamped to a little before the attempt's own timeout; the asked-for time is kept.
    assert t.due_at == pytest.approx(T0 + 600.0 - DUE_MARGIN) and t.requested_due_at == T0 + 3601
    assert (t.state, t.pool, t.run_id, t.machine_id) == (HumanTaskState.OPEN, "default", run_id, mid)

    assert s.claim_human_task(t.id, "ada", T0 + 2).claimed_by == "ada"
    assert s.claim_human_task(t.id, "ada", T0 + 2).state is HumanTaskState.CLAIMED  # again: harmless
    with pytest.raises(Conflict, match="claimed by ada"):
        s.claim_human_task(t.id, "bob", T0 + 3)
    with pytest.raises(Conflict, match="claimed by ada"):
        s.complete_human_task(t.id, "bob", response="yes", now=T0 + 3)
    with pytest.raises(Conflict, match="claimed by ada"):
        s.release_human_task(t.id, "bob", T0 + 3)
    assert s.release_human_task(t.id, "ada", T0 + 4).state is HumanTaskState.OPEN
    with pytest.raises(Conflict, match="not claimed"):
        s.release_human_task(t.id, "ada", T0 + 4)
    done = s.complete_human_task(t.id, "bob", response="approved", now=T0 + 5, notify=NOTIFY)
    assert (done.state, done.completed_by, done.response, done.ended_at) == (
        HumanTaskState.COMPLETED, "bob", "approved", T0 + 5)
    with pytest.raises(Conflict, match="already completed by bob"):
        s.complete_human_task(t.id, "ada", now=T0 + 6)
    with pytest.raises(Conflict):
        s.claim_human_task(t.id, "ada", T0 + 6)
    with pytest.raises(NotFound):
        s.claim_human_task("hum_nope", "ada", T0 + 6)
    assert task_events(s, run_id) == [("human_task.created", None), ("human_task.claimed", "ada"),
                                      ("human_task.released", "ada"), ("human_task.completed", "bob")]
    assert notices(s) == [("human_task.completed", "http://h/all"), ("human_task.created", "http://h/all")]
    assert [x.id for x in s.list_human_tasks(states=[HumanTaskState.COMPLETED], run_id=run_id)] == [t.id]
    assert s.list_human_tasks(states=[HumanTaskState.OPEN]) == []
    assert s.list_human_tasks(pool="other") == []


def test_only_an_attempt_holding_its_lease_may_ask(s):
    run_id, attempt_id, mid = running(s)
    with pytest.raises(StaleLease):
        s.create_human_task(attempt_id, "m2", kind="confirm", prompt="p", due=60.0, now=T0 + 1)
    s.finish_attempt(attempt_id, mid, Ending.SYSTEM_ERROR, output=None, detail="boom", now=T0 + 2)
    with pytest.raises(StaleLease):
        s.create_human_task(attempt_id, mid, kind="confirm", prompt="p", due=60.0, now=T0 + 3)
    with pytest.raises(InvalidRequest, match="kind"):
        s.create_human_task(attempt_id, mid, kind="no spaces", prompt="p", due=60.0, now=T0 + 3)
    assert s.list_human_tasks(run_id=run_id) == []


def test_the_sweep_escalates_once_then_expires_and_stops_the_attempt_with_human_timeout(s):
    run_id, attempt_id, mid = running(s, progress_timeout=5.0, max_attempts=3)
    t = s.create_human_task(attempt_id, mid, kind="push_approval", prompt="Approve", due=60.0,
                            escalate_after=10.0, now=T0 + 1, notify=NOTIFY)
    assert s.sweep_human_tasks(T0 + 5, NOTIFY).escalated == []
    # The progress watchdog waits for the person (5 s without a step would stop the attempt).
    assert s.sweep(T0 + 40, stop_grace=15.0).stop_orders == []
    swept = s.sweep_human_tasks(T0 + 12, NOTIFY)
    assert [x.id for x in swept.escalated] == [t.id] and swept.expired == [] and swept.stop_orders == []
    assert s.sweep_human_tasks(T0 + 13, NOTIFY).escalated == []  # once
    swept = s.sweep_human_tasks(T0 + 61.5, NOTIFY)
    assert [x.state for x in swept.expired] == [HumanTaskState.EXPIRED]
    assert [(o.attempt_id, o.reason) for o in swept.stop_orders] == [(attempt_id, StopReason.HUMAN_TIMEOUT)]
    # The agent confirms the stop: the attempt timed out, the run is retried after its reconcile check.
    f = s.finish_attempt(attempt_id, mid, Ending.STOPPED, output=None, detail="human_timeout", now=T0 + 62)
    assert f.retried and f.run.state is RunState.QUEUED and f.run.needs_reconcile
    a = s.get_attempt(attempt_id)
    assert (a.state.value, a.stop_reason) == ("timed_out", StopReason.HUMAN_TIMEOUT)
    assert [k for k, _ in task_events(s, run_id)] == ["human_task.created", "human_task.escalated",
                                                      "human_task.expired"]
    assert notices(s) == [("human_task.created", "http://h/all"), ("human_task.escalated", "http://h/all"),
                          ("human_task.escalated", "http://h/esc"), ("human_task.expired", "http://h/all")]


def test_a_task_whose_attempt_ended_otherwise_is_cancelled(s):
    run_id, attempt_id, mid = running(s)
    t = s.create_human_task(attempt_id, mid, kind="confirm", prompt="Sure?", due=60.0, now=T0 + 1)
    _, order = s.request_cancel(run_id, T0 + 2)
    assert order is not None
    s.finish_attempt(attempt_id, mid, Ending.STOPPED, output=None, detail="cancelled", now=T0 + 3)
    # Before the sweep saw it, a person's answer cancels it instead, and is told why.
    cancelled = s.complete_human_task(t.id, "ada", response="yes", now=T0 + 4)
    assert cancelled.state is HumanTaskState.CANCELLED and "attempt ended" in (cancelled.reason or "")
    run2, attempt2, _ = running(s)
    t2 = s.create_human_task(attempt2, mid, kind="confirm", prompt="Sure?", due=60.0, now=T0 + 5)
    s.request_cancel(run2, T0 + 6)
    s.finish_attempt(attempt2, mid, Ending.STOPPED, output=None, detail="cancelled", now=T0 + 7)
    swept = s.sweep_human_tasks(T0 + 8)
    assert [x.id for x in swept.cancelled] == [t2.id] and swept.stop_orders == []
    assert s.get_human_task(t2.id).state is HumanTaskState.CANCELLED
    assert task_events(s, run2)[-1] == ("human_task.cancelled", None)


def test_a_secret_answer_is_held_encrypted_only_until_its_agent_has_it(s):
    from deskfleet.crypto import SecretBox, new_key

    sealed = SecretBox(new_key()).encrypt("493817")
    _, attempt_id, mid = running(s)
    t = s.create_human_task(attempt_id, mid, kind="sms_code", prompt="The code", due=60.0, secret=True, now=T0 + 1)
    with pytest.raises(InvalidRequest, match="secret"):
        s.complete_human_task(t.id, "ada", now=T0 + 2)
    done = s.complete_human_task(t.id, "ada", secret_response=sealed, now=T0 + 2)
    assert done.response is None and done.secret_response == sealed and done.answered
    assert "493817" not in repr(done)
    with pytest.raises(NotFound):
        s.check_human_task(t.id, attempt_id + 1, mid, now=T0 + 3)
    assert s.check_human_task(t.id, attempt_id, mid, received=True, now=T0 + 3).secret_response == sealed
    assert s.get_human_task(t.id).secret_response is None  # wiped once the agent has it
    s.finish_attempt(attempt_id, mid, Ending.SUCCEEDED, output={}, detail="", now=T0 + 3.5)
    # Not received (the agent died): wiped once the attempt is over.
    _, attempt2, _ = running(s)
    t2 = s.create_human_task(attempt2, mid, kind="sms_code", prompt="The code", due=60.0, secret=True, now=T0 + 4)
    s.complete_human_task(t2.id, "ada", secret_response=sealed, now=T0 + 5)
    s.sweep_human_tasks(T0 + 6)
    assert s.get_human_task(t2.id).secret_response == sealed
    s.finish_attempt(attempt2, mid, Ending.SUCCEEDED, output={}, detail="", now=T0 + 7)
    s.sweep_human_tasks(T0 + 8)
    assert s.get_human_task(t2.id).secret_response is None
    assert all("493817" not in json.dumps(e.data) for e in s.events())


# -- a real orchestrator, real agents ------------------------------------------------------------

class Receiver:
    """A webhook receiver on a loopback port: every POST, with its headers."""

    def __init__(self) -> None:
        got = self.got = []  # type: list[tuple[str, dict[str, str], bytes]]

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                got.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self, path: str) -> list[str]:
        return [orjson.loads(b)["event"] for p, _, b in self.got if p == path]

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


async def open_task(c: AsyncClient, run_id: str, number: int = 1, timeout: float = 15.0) -> dict[str, Any]:
    """The run's ``number``-th human task, once asked."""
    async def asked() -> dict[str, Any] | None:
        found = (await c.human_tasks(run=run_id, state=[]))["tasks"]
        return sorted(found, key=lambda t: t["created_at"])[number - 1] if len(found) >= number else None

    return await until(asked, timeout=timeout)


async def until(check: Callable[[], Awaitable[Any]], timeout: float = 15.0) -> Any:
    """``eventually`` for a check that awaits."""
    deadline = asyncio.get_running_loop().time() + timeout
    last: Any = None
    while asyncio.get_running_loop().time() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout}s (last: {last!r})")


async def test_a_push_approval_answered_by_a_person_keeps_the_machine_leased_until_the_run_succeeds(
        live_server, fleet_factory):
    fleet = await fleet_factory(live_server, count=1)
    [machine] = [a.machine_id for a in fleet.agents]
    async with AsyncClient(live_server.url) as c:
        # progress_timeout 2 s: the watchdog waits with the person, or this run would be stopped.
        run = await c.submit("sim.approval", {"key": "P-1", "due": 60, "prompt": "Approve the sign-in for P-1"},
                             progress_timeout=2.0)
        task = await open_task(c, run["id"])
        assert (task["kind"], task["state"], task["machine"], task["secret"]) == (
            "push_approval", "open", machine, False)
        assert task["screenshot_url"] is None  # this fleet sends no screenshots (screenshots="none")
        # Another run arrives meanwhile: the machine is leased to the waiting one.
        other = await c.submit("sim.noop", {"value": "x"})
        await asyncio.sleep(3 * live_server.settings.heartbeat_timeout)
        assert (await c.run(other["id"]))["state"] == "queued"
        assert (await c.run(run["id"]))["state"] == "running"
        [m] = await c.machines()
        assert (m["status"], m.get("current_run")) == ("busy", run["id"])
        # A person claims it, then completes it.
        claimed = await c.claim_human_task(task["id"], "ada@example.com")
        assert claimed["state"] == "claimed"
        with pytest.raises(ApiError) as err:
            await c.claim_human_task(task["id"], "bob@example.com")
        assert err.value.status == 409 and "ada@example.com" in err.value.message
        done = await c.complete_human_task(task["id"], "ada@example.com", "approved")
        assert (done["state"], done["response"], done["completed_by"]) == ("completed", "approved", "ada@example.com")
        finished = await c.run(run["id"], wait=20)
        assert finished["state"] == "succeeded", finished
        assert finished["output"] == {"key": "P-1", "by": "ada@example.com", "response": "approved",
                                      "machine": machine}
        assert (await c.run(other["id"], wait=20))["state"] == "succeeded"
        # One attempt, its lease never lost; the other run got the machine only afterwards.
        [attempt] = await c.attempts(run["id"])
        assert (attempt["state"], attempt["ending"]) == ("succeeded", "succeeded")
        events = await c.events(run["id"])
        kinds = [e["kind"] for e in events]
        assert kinds.index("human_task.created") < kinds.index("human_task.claimed") < kinds.index(
            "human_task.completed")
        assert not [e for e in await c.all_events(limit=10000) if "stale" in e["kind"] or e["kind"] == "agent.paused"]
        [other_attempt] = await c.attempts(other["id"])
        assert _t(other_attempt["assigned_at"]) >= _t(attempt["ended_at"])
        assert fleet.backend.work_count("P-1") == 1


async def test_nobody_answers_so_the_attempt_fails_with_human_timeout_and_the_run_is_retried(
        live_server, fleet_factory):
    await fleet_factory(live_server, count=1)
    async with AsyncClient(live_server.url) as c:
        run = await c.submit("sim.approval", {"key": "T-1", "due": 1.5}, max_attempts=2, backoff_initial=0.1)
        first = await open_task(c, run["id"])
        # Nobody answers: the task expires, the attempt is stopped, the run retried (after reconcile).
        second = await open_task(c, run["id"], 2)
        assert (await c.human_task(first["id"]))["state"] == "expired"
        attempts = await c.attempts(run["id"])
        assert (attempts[0]["state"], attempts[0]["stop_reason"]) == ("timed_out", "human_timeout")
        reasons = [e["reason"] for e in await c.events(run["id"]) if e["kind"] == "run.state"]
        assert "retry_after_reconcile" in reasons
        await c.complete_human_task(second["id"], "ada")
        done = await c.run(run["id"], wait=20)
        assert done["state"] == "succeeded" and done["output"]["response"] is None
        # With no attempt left, the run fails and says why.
        once = await c.submit("sim.approval", {"key": "T-2", "due": 1.0}, max_attempts=1)
        failed = await c.run(once["id"], wait=30)
        assert failed["state"] == "failed" and "human_timeout" in failed["error"]["message"], failed


asked: list[HumanAnswer] = []


class Ask(BaseModel):
    kind: str = "sms_code"
    secret: bool = True
    due: float = 60.0


class Asked(BaseModel):
    length: int


@automation(name="t.ask_code", required_state="any", idempotent=True)
async def ask_code(ctx: Context, data: Ask) -> Asked:
    """Types an SMS code a person read out (here: keeps it for the test to compare)."""
    answer = await ctx.ask_human(data.kind, "Read out the code the bank texted", due=data.due, secret=data.secret)
    asked.append(answer)
    ctx.log.info("got an answer from %s", answer.by)
    return Asked(length=len(answer.response or ""))


@automation(name="t.ask_code_sync", required_state="any", idempotent=True)
def ask_code_sync(ctx: Context, data: Ask) -> Asked:
    """The same, as a plain function: ctx.ask_human blocks its worker thread."""
    answer = ctx.ask_human(data.kind, "Read out the code", due=data.due, secret=data.secret)
    asked.append(answer)
    return Asked(length=len(answer.response or ""))


def cli(server: Any, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deskfleet", "--server", server.url, "tasks", *args],
                          input=stdin, capture_output=True, text=True, timeout=60)


SECRET = "493817"


@pytest.mark.parametrize("name", ["t.ask_code", "t.ask_code_sync"])
async def test_a_secret_answer_reaches_the_automation_and_nowhere_else(
        agent_factory_secret, name, captured):
    server, receiver = agent_factory_secret
    async with AsyncClient(server.url) as c:
        run = await c.submit(name, {})
        task = await open_task(c, run["id"])
        assert task["secret"] is True and task["screenshot_url"] is not None
        shot = await c.human_task_screenshot(task["id"])
        assert shot[:8] == b"\x89PNG\r\n\x1a\n"
        # The CLI refuses a secret on its command line, without repeating it.
        refused = await asyncio.to_thread(cli, server, "complete", task["id"], "--by", "ada", "--response", SECRET)
        assert refused.returncode == 2 and "--response-stdin" in refused.stderr
        assert SECRET not in refused.stdout + refused.stderr
        done = await asyncio.to_thread(cli, server, "complete", task["id"], "--by", "ada", "--response-stdin",
                                       "--json", stdin=SECRET + "\n")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["state"] == "completed" and SECRET not in done.stdout
        finished = await c.run(run["id"], wait=20)
        assert finished["state"] == "succeeded" and finished["output"] == {"length": len(SECRET)}
        assert [(a.response, a.by) for a in asked] == [(SECRET, "ada")]
        assert SECRET not in repr(asked[0])
        await eventually(lambda: len(receiver.got) >= 2, timeout=10)
        # Nowhere else: API answers, events, webhooks, logs, the database once the agent has it.
        seen = [await c.human_task(task["id"]), await c.human_tasks(state=[]), await c.run(run["id"]),
                await c.events(run["id"]), await c.attempts(run["id"]), await c.all_events(limit=10000)]
        assert SECRET not in json.dumps(seen)
        assert all(SECRET.encode() not in body for _, _, body in receiver.got)
        assert captured.leaks(SECRET) == []
        view = server.view()
        assert isinstance(view, SQLStore)

        def held() -> Any:
            with view.engine.connect() as conn:
                return conn.execute(select(human_tasks.c.response, human_tasks.c.secret_response)).all()

        await eventually(lambda: held() == [(None, None)], timeout=10)


@pytest.fixture
async def agent_factory_secret(server_factory, receiver, tmp_path: Path) -> AsyncIterator[tuple[Any, Receiver]]:
    server = server_factory(human_webhook=receiver.url + "/all", webhook_secret="s3")
    asked.clear()
    backend = SimBackend(tmp_path / "ehr2.db")
    app = App(desktop=SimDesktop("hx-02", backend), registry=Registry([ask_code, ask_code_sync]))
    a = Agent(AgentConfig(servers=[server.url], machine="hx-02", enrolment_token=server.token), app)
    task = asyncio.create_task(a.run())
    await wait_ready(server, {"hx-02"})
    try:
        yield server, receiver
    finally:
        await a.shutdown()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
        backend.close()


async def test_escalation_and_the_other_transitions_reach_the_webhooks_signed(server_factory, receiver, fleet_factory):
    server = server_factory(human_webhook=receiver.url + "/all", human_escalation_webhook=receiver.url + "/esc",
                            webhook_secret="s3cret")
    await fleet_factory(server, count=1)
    async with AsyncClient(server.url) as c:
        run = await c.submit("sim.approval", {"key": "E-1", "due": 60, "escalate_after": 0.5})
        task = await open_task(c, run["id"])
        await eventually(lambda: "human_task.escalated" in receiver.events("/esc"), timeout=15)
        assert (await c.human_task(task["id"]))["escalated_at"] is not None
        await c.complete_human_task(task["id"], "lead", "approved")
        assert (await c.run(run["id"], wait=20))["state"] == "succeeded"
        await eventually(lambda: "human_task.completed" in receiver.events("/all"), timeout=15)
    assert receiver.events("/all") == ["human_task.created", "human_task.escalated", "human_task.completed"]
    assert receiver.events("/esc") == ["human_task.escalated"]
    for path, headers, body in receiver.got:
        expected = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
        assert headers["x-deskfleet-signature"] == f"sha256={expected}", path
        payload = orjson.loads(body)
        assert headers["x-deskfleet-event"] == payload["event"] and payload["task"]["id"] == task["id"]
        assert headers["x-deskfleet-run"] == run["id"]


async def test_cancelling_the_run_cancels_its_open_task(live_server, fleet_factory):
    await fleet_factory(live_server, count=1)
    async with AsyncClient(live_server.url) as c:
        run = await c.submit("sim.approval", {"key": "C-1", "due": 60})
        task = await open_task(c, run["id"])
        await c.cancel(run["id"])
        assert (await c.run(run["id"], wait=20))["state"] == "cancelled"

        async def cancelled() -> bool:
            return (await c.human_task(task["id"]))["state"] == "cancelled"

        await until(cancelled, timeout=10)
        got = await c.human_task(task["id"])
        assert "attempt ended" in got["reason"]
        with pytest.raises(ApiError) as err:
            await c.complete_human_task(task["id"], "ada", "approved")
        assert err.value.status == 409 and "cancelled" in err.value.message
        assert "human_task.cancelled" in [e["kind"] for e in await c.events(run["id"])]


async def test_the_api_says_what_to_fix(live_server, fleet_factory):
    await fleet_factory(live_server, count=1)
    async with AsyncClient(live_server.url) as c:
        with pytest.raises(ApiError) as err:
            await c.human_task("hum_nope")
        assert err.value.status == 404
        run = await c.submit("sim.approval", {"key": "A-1", "due": 60, "secret": True, "kind": "sms_code"})
        task = await open_task(c, run["id"])
        assert [t["id"] for t in (await c.human_tasks(state=["open"], pool="default"))["tasks"]] == [task["id"]]
        assert (await c.human_tasks(pool="elsewhere"))["tasks"] == []
        for body, field in (({}, "by"), ({"by": " "}, "by"), ({"by": "ada", "answer": "x"}, "answer")):
            with pytest.raises(ApiError) as err:
                await c._do(_call("POST", f"/v1/human-tasks/{task['id']}/claim", body))
            assert err.value.status == 422 and field in err.value.message, err.value.message
        with pytest.raises(ApiError) as err:
            await c.complete_human_task(task["id"], "ada")  # a secret task wants its answer
        assert err.value.status == 422 and "response" in err.value.message
        with pytest.raises(ApiError) as err:
            await c.human_tasks(state=["waiting"])
        assert err.value.status == 422 and "state" in err.value.message
        with pytest.raises(ApiError) as err:
            await c.human_task_screenshot(task["id"])
        assert err.value.status == 404 and "screenshot" in err.value.message
        await c.claim_human_task(task["id"], "ada")
        with pytest.raises(ApiError) as err:
            await c.complete_human_task(task["id"], "bob", "1234")
        assert err.value.status == 409 and "claimed by ada" in err.value.message
        with pytest.raises(ApiError) as err:
            await c.release_human_task(task["id"], "bob")
        assert err.value.status == 409
        await c.release_human_task(task["id"], "ada")
        await c.complete_human_task(task["id"], "bob", "1234")
        assert (await c.run(run["id"], wait=20))["state"] == "succeeded"


def _call(method: str, path: str, body: Any) -> Any:
    from deskfleet.client import _Call

    return _Call(method, path, body)


async def test_the_cli_lists_claims_and_completes(live_server, fleet_factory):
    await fleet_factory(live_server, count=1)
    async with AsyncClient(live_server.url) as c:
        run = await c.submit("sim.approval", {"key": "L-1", "due": 60, "prompt": "Approve L-1"})
        task = await open_task(c, run["id"])
        listed = await asyncio.to_thread(cli, live_server, "list", "--json")
        assert listed.returncode == 0 and [t["id"] for t in json.loads(listed.stdout)] == [task["id"]]
        table = await asyncio.to_thread(cli, live_server, "list")
        assert task["id"] in table.stdout and "push_approval" in table.stdout
        claimed = await asyncio.to_thread(cli, live_server, "claim", task["id"], "--by", "ada")
        assert claimed.returncode == 0 and "claimed (ada)" in claimed.stdout
        taken = await asyncio.to_thread(cli, live_server, "claim", task["id"], "--by", "bob")
        assert taken.returncode == 1 and "claimed by ada" in taken.stderr and "Traceback" not in taken.stderr
        missing = await asyncio.to_thread(cli, live_server, "show", "hum_nope")
        assert missing.returncode == 1 and "no human task" in missing.stderr and "Traceback" not in missing.stderr
        done = await asyncio.to_thread(cli, live_server, "complete", task["id"], "--by", "ada",
                                       "--response", "approved")
        assert done.returncode == 0 and "completed (ada)" in done.stdout, done.stderr
        assert (await c.run(run["id"], wait=20))["output"]["response"] == "approved"
        shown = await asyncio.to_thread(cli, live_server, "show", task["id"])
        assert json.loads(shown.stdout)["state"] == "completed"
        empty = await asyncio.to_thread(cli, live_server, "list")
        assert "no human tasks waiting" in empty.stdout


async def test_only_an_agent_that_speaks_protocol_5_may_ask(live_server):
    import httpx

    async with httpx.AsyncClient() as http:
        resp = await http.post(f"{live_server.url}/agent/v1/enrol", json={"machine": "old-1"},
                               headers={"authorization": f"Bearer {live_server.token}"})
    key = resp.json()["agent_key"]
    ws = await websockets.connect(
        live_server.url.replace("http://", "ws://") + "/agent/v1/connect", compression=None,
        additional_headers={"authorization": f"Bearer {key}", "x-deskfleet-machine": "old-1"})
    ad = AutomationAd(name="t.old", required_state="any", idempotent=True)
    await ws.send(orjson.dumps(Hello(protocol=4, boot_id="b", agent_version="old", automations=[ad])
                               .model_dump(mode="json")))
    welcome = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
    assert welcome["type"] == "welcome" and welcome["protocol"] >= 5
    try:
        await ws.send(orjson.dumps(HumanRequest(id=7, attempt_id=1, kind="confirm", prompt="p", due=5.0)
                                   .model_dump(mode="json")))
        while (reply := orjson.loads(await asyncio.wait_for(ws.recv(), 5)))["type"] != "reply":
            pass
        assert (reply["re"], reply["ok"]) == (7, False)
        assert "protocol 5" in reply["error"] and "speaks 4" in reply["error"]
    finally:
        await ws.close()



def _t(iso: str) -> datetime:
    return datetime.fromisoformat(iso)
