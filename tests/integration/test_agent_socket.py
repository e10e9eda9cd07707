"""The agent's WebSocket as the hub serves it: raw clients speaking the protocol by hand.

The hub serves agents beneath the web framework and reads heartbeats without the model
(``fleet.hub``): these tests hold it to the protocol from outside — a silent agent's
connection is closed, odd frames get an error and leave the connection up, a beat is
acknowledged only once written, a bad key is refused with 4401.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import orjson
import pytest
import websockets
from hypothesis import given
from hypothesis import strategies as st

from deskfleet.client import AsyncClient
from deskfleet.fleet.hub import Beat, binary_frame, heartbeat_ack, quick_heartbeat
from deskfleet.protocol import (
    AutomationAd,
    HeartbeatAck,
    HeartbeatMsg,
    Hello,
    LeaseCheck,
    Result,
    Start,
    server_message,
)
from support import eventually


async def enrol(server, machine: str) -> str:
    async with httpx.AsyncClient() as http:
        resp = await http.post(f"{server.url}/agent/v1/enrol", json={"machine": machine},
                               headers={"authorization": f"Bearer {server.token}"})
    assert resp.status_code == 200, resp.text
    return str(resp.json()["agent_key"])


async def connect(server, machine: str, key: str, automations: list[AutomationAd] | None = None,
                  ) -> websockets.ClientConnection:
    ws = await websockets.connect(
        server.url.replace("http://", "ws://") + "/agent/v1/connect", compression=None,
        additional_headers={"authorization": f"Bearer {key}", "x-deskfleet-machine": machine},
    )
    hello = Hello(boot_id="boot-1", agent_version="test", automations=automations or [])
    await ws.send(orjson.dumps(hello.model_dump(mode="json")))
    welcome = server_message.validate_python(orjson.loads(await asyncio.wait_for(ws.recv(), 5)))
    assert welcome.type == "welcome"
    return ws


async def test_a_silent_agent_is_disconnected_after_the_heartbeat_timeout(live_server):
    key = await enrol(live_server, "mute-1")
    ws = await connect(live_server, "mute-1", key)
    t0 = time.monotonic()
    # Beats are acknowledged, once written, with their own sequence number.
    await ws.send(orjson.dumps(HeartbeatMsg(seq=7).model_dump(mode="json")))
    ack = server_message.validate_python(orjson.loads(await asyncio.wait_for(ws.recv(), 5)))
    assert ack == HeartbeatAck(seq=7)
    # Then silence (a machine gone without closing its socket): the hub closes it. (What
    # it says meanwhile — a request to re-prove its state, once quarantined — is not
    # answered either.)
    heard = []
    with pytest.raises(websockets.ConnectionClosed) as closed:
        while True:
            heard.append(orjson.loads(await asyncio.wait_for(ws.recv(), 10))["type"])
    waited = time.monotonic() - t0
    assert set(heard) <= {"verify"}, heard
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
    assert live_server.settings.heartbeat_timeout <= waited < live_server.settings.heartbeat_timeout + 3
    await eventually(lambda: not live_server.view().get_machine("mute-1").connected)


async def test_unreadable_frames_get_an_error_and_the_connection_stays_up(live_server):
    key = await enrol(live_server, "odd-1")
    ws = await connect(live_server, "odd-1", key)
    try:
        for frame in (b"not json", b'{"type": "heartbeat", "seq": "many"}', b'{"type": "nonsense"}'):
            await ws.send(frame)
            reply = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
            assert reply["type"] == "error" and "unreadable message" in reply["message"], reply
        # A beat in an unusual but valid shape (a float uptime given as an int, an unknown
        # field) still counts: the model reads what the quick path declines.
        await ws.send(orjson.dumps({"type": "heartbeat", "seq": 1, "resources": {"uptime": 5, "gpu": 1}}))
        ack = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
        assert ack == {"type": "heartbeat_ack", "seq": 1}
    finally:
        await ws.close()


async def test_a_wrong_agent_key_is_refused_with_4401(live_server):
    await enrol(live_server, "key-1")
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await connect(live_server, "key-1", "not-the-key")
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401


async def test_a_results_reply_reaches_the_agent_before_its_next_assignment(live_server):
    """The machine is free the moment its result commits, and a scheduling pass may claim it
    then; an assignment that overtook the reply would reach an agent that still thinks it
    is busy (and refuses it). Here the reply is held back after the commit, a second run is
    waiting, and the scheduler ticks meanwhile: the assignment must still come second."""
    key = await enrol(live_server, "ord-1")
    ws = await connect(live_server, "ord-1", key, [AutomationAd(name="t.job", required_state="any", idempotent=True)])
    runner = live_server.orch.db
    real_write = runner.write

    async def slow_finish(fn, *args, **kwargs):
        result = await real_write(fn, *args, **kwargs)
        if getattr(fn, "__name__", "") == "finish_attempt":
            await asyncio.sleep(0.5)  # committed; the reply is not sent yet
        return result

    runner.write = slow_finish

    async def frames(n: int) -> list[dict]:
        got = []
        while len(got) < n:
            msg = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
            if msg["type"] != "heartbeat_ack":
                got.append(msg)
        return got

    try:
        async with AsyncClient(live_server.url) as c:
            first = await c.submit("t.job", {})
            [assign] = await frames(1)
            assert assign["type"] == "assign" and assign["run_id"] == first["id"]
            await ws.send(orjson.dumps(Start(id=1, attempt_id=assign["attempt_id"]).model_dump(mode="json")))
            reply = (await frames(1))[0]
            assert {k: v for k, v in reply.items() if v is not None} == {"type": "reply", "re": 1, "ok": True}
            second = await c.submit("t.job", {})  # waits for the machine
            await ws.send(orjson.dumps(Result(id=2, attempt_id=assign["attempt_id"], ending="succeeded",
                                              output={}).model_dump(mode="json")))
            reply, next_assign = await frames(2)
        assert (reply["type"], reply["re"], reply["ok"]) == ("reply", 2, True)
        assert (next_assign["type"], next_assign["run_id"]) == ("assign", second["id"])
    finally:
        runner.write = real_write
        await ws.close()


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_a_frame_written_straight_to_the_transport_is_websockets_own(size):
    from websockets.frames import Frame, Opcode

    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    assert binary_frame(data) == Frame(Opcode.BINARY, data).serialize(mask=False, extensions=[])


def test_the_encoded_ack_is_the_models():
    assert orjson.loads(heartbeat_ack(42)) == HeartbeatAck(seq=42).model_dump(mode="json")


numbers = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False))
anything = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=5), st.lists(st.integers(), max_size=2))
resources = st.dictionaries(
    st.sampled_from(["memory_mb", "cpu_percent", "uptime", "machine_memory_percent", "app_running", "reboot_pending",
                     "extra"]),
    anything, max_size=6)
beats = st.fixed_dictionaries(
    {"type": st.just("heartbeat"), "seq": st.one_of(st.integers(0, 10**9), anything)},
    optional={"resources": st.one_of(resources, anything), "session_key": anything,
              "session_expires_at": anything, "attempt_id": anything, "other": anything,
              "sessions": st.one_of(anything, st.lists(st.one_of(st.text(max_size=4), anything), max_size=3))},
)


@given(beats)
def test_the_quick_heartbeat_reads_what_the_model_reads_or_declines(data):
    quick = quick_heartbeat(data)
    if quick is None:
        return  # declined: the model decides (and explains) instead
    # Whatever the quick path accepts, the model accepts too, with the same values.
    assert quick == Beat.of(HeartbeatMsg.model_validate(data))


async def test_heartbeats_are_taken_where_parsed_but_never_ahead_of_a_message_in_hand(live_server):
    """On uvicorn, a beat is read in the protocol's callback when the connection's task is
    idle (no task wake-up per beat); one that arrives while an earlier message of the same
    agent is being handled waits its turn in the queue, as every message did before."""
    key = await enrol(live_server, "inl-1")
    ws = await connect(live_server, "inl-1", key, [AutomationAd(name="t.job", required_state="any", idempotent=True)])
    hub = live_server.orch.hub
    runner = live_server.orch.db
    real_write = runner.write

    async def slow_start(fn, *args, **kwargs):
        if getattr(fn, "__name__", "") == "attempt_start":
            await asyncio.sleep(0.5)  # the Start in hand while the beat behind it arrives
        return await real_write(fn, *args, **kwargs)

    async def next_frame(kind: str) -> dict:
        while True:
            msg = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
            if msg["type"] == kind:
                return msg

    try:
        for seq in (1, 2, 3, 4):
            await ws.send(orjson.dumps(HeartbeatMsg(seq=seq).model_dump(mode="json")))
            assert await next_frame("heartbeat_ack") == {"type": "heartbeat_ack", "seq": seq}
        assert hub.beats_inline >= 3  # the first may come while the hello is still in hand
        async with AsyncClient(live_server.url) as c:
            await c.submit("t.job", {})
            assign = await next_frame("assign")
        inline_before = hub.beats_inline
        runner.write = slow_start
        await ws.send(orjson.dumps(Start(id=1, attempt_id=assign["attempt_id"]).model_dump(mode="json")))
        await ws.send(orjson.dumps(HeartbeatMsg(seq=5, attempt_id=assign["attempt_id"]).model_dump(mode="json")))
        assert (await next_frame("reply"))["ok"] is True
        assert await next_frame("heartbeat_ack") == {"type": "heartbeat_ack", "seq": 5}
        assert hub.beats_inline == inline_before  # it went through the queue, after the Start
        assert live_server.view().get_attempt(assign["attempt_id"]).phase.value == "running"
    finally:
        runner.write = real_write
        await ws.close()


async def test_an_idle_machines_beats_are_written_when_they_say_something_new_or_the_last_grows_old(
        server_factory):
    """Every beat of a protocol-1 agent is acknowledged; the database sees an idle machine's beat only when it says
    something new about the session (or names an attempt), or the last one written is
    ``REFRESH_SHARE`` of the heartbeat timeout old — so a big idle fleet's heartbeats do not
    fill the store's transactions, and none looks silent."""
    from deskfleet.fleet.manager import REFRESH_SHARE

    server = server_factory(heartbeat_timeout=6.0, heartbeat_interval=1.0)
    key = await enrol(server, "calm-1")
    ws = await connect(server, "calm-1", key)
    view = server.view()

    async def beat(seq: int, **fields) -> None:
        await ws.send(orjson.dumps({"type": "heartbeat", "seq": seq, **fields}))
        while True:
            msg = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
            if msg["type"] == "heartbeat_ack":
                assert msg["seq"] == seq
                return

    def machine():
        return view.get_machine("calm-1")

    try:
        await beat(1, resources={"uptime": 1})
        first = machine()
        assert first.resources["uptime"] == 1
        t_written = time.monotonic()
        await beat(2, resources={"uptime": 2})  # nothing new but a figure: acknowledged, not written
        assert (machine().resources["uptime"], machine().last_heartbeat_at) == (1, first.last_heartbeat_at)
        await beat(3, resources={"uptime": 3}, session_key="robot1")  # a session: written at once
        assert (machine().resources["uptime"], machine().session_key) == (3, "robot1")
        t_written = time.monotonic()
        await asyncio.sleep(REFRESH_SHARE * 6.0 - (time.monotonic() - t_written) + 0.2)
        await beat(4, resources={"uptime": 4}, session_key="robot1")  # the last written grew old
        assert machine().resources["uptime"] == 4 and machine().last_heartbeat_at > first.last_heartbeat_at
    finally:
        await ws.close()


async def test_an_idle_machines_sampled_beat_is_written_though_it_says_nothing_new(server_factory):
    """The hub marks a beat a ``sample_interval`` as a sample of the machine's figures (its
    app's memory over time); an idle machine's sampled beat is written at once, not only when
    it happens to fall on a refresh, so its trend keeps every sample."""
    server = server_factory(heartbeat_timeout=60.0, heartbeat_interval=1.0, sample_interval=0.5)
    key = await enrol(server, "calm-2")
    ws = await connect(server, "calm-2", key)
    view = server.view()

    async def beat(seq: int, memory_mb: float) -> float:
        await ws.send(orjson.dumps({"type": "heartbeat", "seq": seq, "resources": {"memory_mb": memory_mb}}))
        while True:
            msg = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
            if msg["type"] == "heartbeat_ack":
                return float(view.get_machine("calm-2").resources["memory_mb"])

    try:
        assert await beat(1, 100.0) == 100.0  # the first: written, and a sample
        t_sampled = time.monotonic()
        assert await beat(2, 110.0) == 100.0  # nothing new, no sample due: not written
        await asyncio.sleep(0.5 - (time.monotonic() - t_sampled) + 0.1)
        assert await beat(3, 120.0) == 120.0  # a sample due: written, though no refresh is (18 s)
        assert [mb for _, mb, _ in view.machine_samples(0)["calm-2"]] == [100.0, 120.0]
    finally:
        await ws.close()


@pytest.mark.parametrize(("waits_on", "said"), [
    ("connect_machine", "agent connecting as the server stops"),
    ("disconnect_machine", "agent disconnected as the server stops"),
])
async def test_a_connection_cancelled_while_the_store_keeps_it_waiting_ends_quietly(live_server, captured,
                                                                                    waits_on, said):
    """A server stopping while thousands of agents connect or disconnect runs out of its
    graceful time with their hellos or disconnects queued on the store; each connection's
    task is then cancelled. It must end quietly (no traceback per agent): an agent
    reconnects to a replica that is up, and the replica's leave records the disconnects."""
    import threading

    hub = live_server.orch.hub
    real_db = hub.db
    waiting = threading.Event()
    task: list[asyncio.Task] = []
    machine = f"quiet-{waits_on[:4]}"

    async def busy_store(fn, *args, **kwargs):
        if getattr(fn, "__name__", "") == waits_on:
            task.append(asyncio.current_task())
            waiting.set()
            await asyncio.Event().wait()  # a store too busy to get to it before the server stops
        return await real_db(fn, *args, **kwargs)

    key = await enrol(live_server, machine)
    hub.db = busy_store
    try:
        if waits_on == "connect_machine":  # a hello, never answered
            ws = await websockets.connect(
                live_server.url.replace("http://", "ws://") + "/agent/v1/connect", compression=None,
                additional_headers={"authorization": f"Bearer {key}", "x-deskfleet-machine": machine},
            )
            await ws.send(orjson.dumps(Hello(protocol=2, boot_id="b", agent_version="t", automations=[])
                                       .model_dump(mode="json")))
        else:  # connected, then gone
            ws = await connect(live_server, machine, key)
            await ws.close()
        assert await asyncio.to_thread(waiting.wait, 5)
        (t,) = task
        t.get_loop().call_soon_threadsafe(t.cancel)  # what uvicorn does when its graceful time is up
        await eventually(t.done)
        assert not t.cancelled() and t.exception() is None
        await ws.close()
    finally:
        hub.db = real_db
    lines = [text for _, text in captured.lines if machine in text or "server stops" in text]
    assert any(said in text for text in lines), lines
    assert not any("Traceback" in text for _, text in captured.lines)
    assert machine not in hub.connections


async def test_protocol_2_acknowledges_only_an_attempts_beats_and_an_assignment_names_the_beat_that_renewed_it(
        server_factory):
    """An idle machine's beats are written (now and then) but not acknowledged: only a lease
    needs acknowledgements, and 10,000 idle machines' made most of the orchestrator's idle
    work. The assignment names instead the latest beat heard before the lease began, which
    renews the new lease for the agent as an acknowledgement would have."""
    from deskfleet.protocol import PROTOCOL_VERSION

    assert PROTOCOL_VERSION >= 2
    live_server = server_factory(heartbeat_timeout=6.0, heartbeat_interval=1.0)  # beats sent by hand, slowly
    key = await enrol(live_server, "p2-1")
    ws = await websockets.connect(
        live_server.url.replace("http://", "ws://") + "/agent/v1/connect", compression=None,
        additional_headers={"authorization": f"Bearer {key}", "x-deskfleet-machine": "p2-1"},
    )
    ad = AutomationAd(name="t.job", required_state="any", idempotent=True)
    await ws.send(orjson.dumps(Hello(protocol=2, boot_id="b", agent_version="test", automations=[ad])
                               .model_dump(mode="json")))
    assert orjson.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "welcome"
    hub, view = live_server.orch.hub, live_server.view()
    heard: list[dict] = []

    async def until(kind: str) -> dict:
        while True:
            msg = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
            heard.append(msg)
            if msg["type"] == kind:
                return msg

    async def beat(seq: int, **fields) -> None:
        await ws.send(orjson.dumps({"type": "heartbeat", "seq": seq, **fields}))
        await eventually(lambda: hub.connections["p2-1"].heard and hub.connections["p2-1"].heard[-1][1] == seq)

    try:
        await beat(1, resources={"uptime": 1})
        await beat(2, resources={"uptime": 2})
        # Both taken by the fleet's ticks (written, at least the first), neither acknowledged.
        await eventually(lambda: view.get_machine("p2-1").resources.get("uptime") in (1, 2) and not hub.beats)
        await asyncio.sleep(5 * live_server.settings.sweep_interval)
        async with AsyncClient(live_server.url) as c:
            run = await c.submit("t.job", {})
            assign = await until("assign")
            assert [m["type"] for m in heard] == ["assign"], "an idle beat was acknowledged"
            assert assign["run_id"] == run["id"] and assign["renewed_by"] == 2
            # A beat naming the attempt renews its lease: acknowledged once written.
            await ws.send(orjson.dumps({"type": "heartbeat", "seq": 3, "attempt_id": assign["attempt_id"]}))
            assert (await until("heartbeat_ack"))["seq"] == 3
            await ws.send(orjson.dumps(Start(id=1, attempt_id=assign["attempt_id"]).model_dump(mode="json")))
            assert (await until("reply"))["ok"] is True
            await ws.send(orjson.dumps(Result(id=2, attempt_id=assign["attempt_id"], ending="succeeded",
                                              output={}).model_dump(mode="json")))
            assert (await until("reply"))["ok"] is True
            # Idle again; the next lease names the beat heard before it.
            heard.clear()
            await beat(4)
            await eventually(lambda: not hub.beats)
            await asyncio.sleep(5 * live_server.settings.sweep_interval)
            await c.submit("t.job", {})
            second = await until("assign")
            assert [m["type"] for m in heard] == ["assign"] and second["renewed_by"] == 4
    finally:
        await ws.close()


async def test_a_lease_request_renews_a_held_lease_and_refuses_a_cancelled_or_lost_one(server_factory):
    """``lease`` (protocol 3) is what ``ctx.fenced()`` asks right before an effect outside
    the desktop: renewed for the lease timeout from now, or refused with the reason to stop
    — and a beat naming an attempt that no longer holds its lease is not acknowledged."""
    live_server = server_factory(heartbeat_timeout=6.0, heartbeat_interval=1.0)  # nothing expires by itself
    key = await enrol(live_server, "fx-1")
    ws = await websockets.connect(
        live_server.url.replace("http://", "ws://") + "/agent/v1/connect", compression=None,
        additional_headers={"authorization": f"Bearer {key}", "x-deskfleet-machine": "fx-1"},
    )
    ad = AutomationAd(name="t.effect", required_state="any", idempotent=True)
    await ws.send(orjson.dumps(Hello(protocol=3, boot_id="b", agent_version="test", automations=[ad])
                               .model_dump(mode="json")))
    welcome = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
    assert welcome["type"] == "welcome" and welcome["protocol"] >= 3
    view = live_server.view()

    async def until(kind: str) -> dict:
        while True:
            msg = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
            if msg["type"] == kind:
                return msg

    async def ask(msg_id: int, attempt_id: int) -> dict:
        await ws.send(orjson.dumps(LeaseCheck(id=msg_id, attempt_id=attempt_id).model_dump(mode="json")))
        return await until("reply")

    try:
        async with AsyncClient(live_server.url) as c:
            run = await c.submit("t.effect", {})
            attempt = (await until("assign"))["attempt_id"]
            await ws.send(orjson.dumps(Start(id=1, attempt_id=attempt).model_dump(mode="json")))
            assert (await until("reply"))["ok"] is True
            before = view.get_attempt(attempt).lease_expires_at
            t0 = time.time()
            reply = await ask(2, attempt)
            assert (reply["re"], reply["ok"]) == (2, True), reply
            assert 5.0 < reply["valid_for"] <= 6.0
            renewed = view.get_attempt(attempt).lease_expires_at
            assert renewed >= before and renewed >= t0 + 5.0

            # Cancelled: the effect must not happen, and the reply says why.
            await c.cancel(run["id"])
            reply = await ask(3, attempt)
            assert (reply["ok"], reply["stop"]) == (False, "cancelled"), reply
            # The attempt ends; another request for it is a stale one.
            await ws.send(orjson.dumps(Result(id=4, attempt_id=attempt, ending="stopped").model_dump(mode="json")))
            assert (await until("reply"))["ok"] is True
            reply = await ask(5, attempt)
            assert (reply["ok"], reply["stop"]) == (False, "lease_lost"), reply
            assert "stale_lease" in reply["error"]
            assert (await until("stop"))["attempt_id"] == attempt
            # A beat naming it renews nothing: a stop order, no acknowledgement.
            await ws.send(orjson.dumps({"type": "heartbeat", "seq": 9, "attempt_id": attempt}))
            heard = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
            assert (heard["type"], heard.get("attempt_id")) == ("stop", attempt), heard
            with pytest.raises(TimeoutError):
                heard = orjson.loads(await asyncio.wait_for(ws.recv(), 1.0))
                raise AssertionError(f"heard after the stop order: {heard}")
            events = await c.all_events(limit=1000)
            refused = [e for e in events if e["kind"] == "lease.stale_write_rejected" and e["attempt"] == attempt]
            assert [e["data"]["op"] for e in refused] == ["renew"], refused
    finally:
        await ws.close()


def test_an_assignment_names_the_latest_beat_heard_by_the_time_its_lease_began():
    from deskfleet.fleet.hub import HEARD_KEPT, Connection, Hub

    hub = Hub.__new__(Hub)
    hub.connections = {}
    assert hub.heard_before("m", 100.0) is None  # not connected here
    conn = Connection("m", ws=None, protocol=2)  # type: ignore[arg-type]
    hub.connections["m"] = conn
    assert hub.heard_before("m", 100.0) is None  # nothing heard yet: the hello's renewal stands
    for seq, at in enumerate([98.0, 99.0, 100.0, 101.0], 1):
        conn.heard.append((at, seq))
    assert hub.heard_before("m", 100.0) == 3  # heard exactly then: counts
    assert hub.heard_before("m", 99.5) == 2
    assert hub.heard_before("m", 50.0) is None  # every beat remembered came after the lease began
    assert len(conn.heard) <= HEARD_KEPT
    assert Connection("old", ws=None, protocol=1).idle_acks  # type: ignore[arg-type]


floats = st.floats(allow_nan=False, allow_infinity=False)
texts = st.text(max_size=8)


@given(seq=st.integers(0, 2**53), memory=floats, cpu=floats, uptime=floats, running=st.booleans(),
       key=st.one_of(st.none(), texts), expires=st.one_of(st.none(), floats),
       attempt=st.one_of(st.none(), st.integers(1, 2**53)), sessions=st.one_of(st.none(), st.lists(texts, max_size=3)))
def test_the_agents_encoded_heartbeat_is_the_models_and_the_quick_reader_takes_it(
        seq, memory, cpu, uptime, running, key, expires, attempt, sessions):
    from deskfleet.protocol import Resources, heartbeat_frame

    resources = Resources(memory_mb=memory, cpu_percent=cpu, uptime=uptime, app_running=running,
                          reboot_pending=not running)
    msg = HeartbeatMsg(seq=seq, resources=resources, session_key=key, session_expires_at=expires,
                       attempt_id=attempt, sessions=sessions)
    frame = heartbeat_frame(seq, resources.model_dump(), key, expires, attempt, sessions)
    assert orjson.loads(frame) == msg.model_dump(mode="json")
    assert quick_heartbeat(orjson.loads(frame)) == Beat.of(msg)  # the server's usual path, not the model's
