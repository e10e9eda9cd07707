"""The agent hub: one WebSocket per connected agent, and what each message does.

Messages from one agent are handled in order, so a progress report never overtakes the
result that follows it. Heartbeats do not touch the database one by one: the hub keeps
the latest per machine and the fleet manager writes them in one transaction a tick, and
only then acknowledges those that renew a lease (an idle machine's beats renew none and get
no answer from protocol 2 on: an assignment names instead the beat heard before its lease
began, :meth:`Hub.heard_before`).

Heartbeats are most of what arrives (10,000 machines send 5,000 a second), so on uvicorn's
WebSocket protocol a beat is read where the frame is parsed, in the protocol's callback,
when nothing else of that agent's is waiting or being handled (so the order holds), and an
acknowledgement is written straight to the transport when no other frame is being sent:
neither wakes the connection's task, nor passes through the ASGI layers (see
:class:`AgentSocket`). An agent hears "your lease is renewed" only once it is — so
a replica that cannot reach the database (while another replica, which can, expires the
lease) never keeps an agent working on a lease it no longer has: the agent fences itself.

The hub does not own runs: what it learns that matters to them (a result recorded, a run
ended, a machine free, an agent's offer changed) it tells a :class:`RunListener` — the
orchestrator, which built it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from pydantic import BaseModel, ValidationError
from starlette.types import Message, Receive, Scope, Send

from ..errors import InvalidRequest, StaleLease, Stopped, StoreUnavailable
from ..models import Assignment, AutomationSpec, Ending, MachineHealth, Run, StopOrder
from ..packfile import pack_labels
from ..protocol import (
    PROTOCOL_VERSION,
    AgentEvent,
    Error,
    HeartbeatMsg,
    Hello,
    HumanCheck,
    HumanRequest,
    LeaseCheck,
    Preparing,
    Progress,
    Reply,
    Resources,
    Result,
    Start,
    Stop,
    TotpRequest,
    Verified,
    Verify,
    Welcome,
    agent_message,
)
from ..store import Finished, Heartbeat

if TYPE_CHECKING:
    from ..config import ServerSettings
    from ..metrics import Metrics
    from ..store import Store
    from ..store.runner import StoreRunner
    from ..vault import Vault

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 10.0
ACK_SLICE = 64  # heartbeat acknowledgements sent between two yields to the event loop
HEARD_KEPT = 4  # beats remembered per connection, for an assignment's ``renewed_by``


class Disconnected(Exception):
    """The agent's WebSocket closed (or never opened)."""


class _InlineQueue(asyncio.Queue):  # type: ignore[type-arg]
    """uvicorn's receive queue of one agent's WebSocket, with a first look at each message:
    ``inline`` takes a message the moment its frame is parsed if it can (a heartbeat, while
    nothing else of the agent's is queued or being handled); the rest is queued as before.

    uvicorn pauses reading after each message it queues and resumes once the queue is
    read; a message taken inline is never read from the queue, so its ``read_paused`` is
    set as if it had paused (reading simply goes on), and cleared before a message is
    queued, so that uvicorn pauses then as it always does.
    """

    inline: Callable[[Any], bool] | None = None
    proto: Any = None
    taken = False  # read_paused was set by a message taken inline, not by a pause

    def put_nowait(self, item: Any) -> None:
        take = self.inline
        if take is not None and self.empty() and item.get("type") == "websocket.receive":
            data = item.get("bytes")
            if take(data if data is not None else item.get("text")):
                self.proto.read_paused = self.taken = True
                return
        if self.taken:
            self.proto.read_paused = self.taken = False
        super().put_nowait(item)


def binary_frame(data: bytes) -> bytes:
    """``data`` as one final, unmasked binary WebSocket frame (a server's frames are never
    masked): what websockets writes, without a Frame object and a buffer to build it in."""
    n = len(data)
    if n < 126:
        return b"\x82" + n.to_bytes(1, "big") + data
    if n < 65536:
        return b"\x82\x7e" + n.to_bytes(2, "big") + data
    return b"\x82\x7f" + n.to_bytes(8, "big") + data


def _uvicorn_protocol(receive: Receive) -> Any:
    """uvicorn's sans-I/O WebSocket protocol behind ``receive``, or None for any other server."""
    proto = getattr(receive, "__self__", None)
    if type(proto).__module__ != "uvicorn.protocols.websockets.websockets_sansio_impl":
        return None
    if type(getattr(proto, "queue", None)) is not asyncio.Queue:
        return None
    if not all(hasattr(proto, a) for a in ("conn", "transport", "read_paused", "close_sent", "disconnected",
                                            "writable", "handshake_complete")):
        return None
    return proto


class AgentSocket:
    """One agent's WebSocket, spoken in ASGI messages directly.

    The agent endpoint is served beneath the web framework (``api.app.AgentSockets``): a
    machine's connection carries a heartbeat every couple of seconds for as long as the
    machine lives, thousands of connections at once, so each frame skips the framework's
    per-message layers (its WebSocket wrapper and exception middleware around ``send``).
    On uvicorn's sans-I/O protocol it goes further (:meth:`take_inline`, :meth:`send_now`).
    """

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self.headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        self.closed = False
        self._proto = _uvicorn_protocol(receive)
        self._open: Any = None
        if self._proto is not None:
            from websockets.protocol import State

            self._open = State.OPEN

    def take_inline(self, handler: Callable[[Any], bool] | None) -> bool:
        """From now on, offer each message to ``handler`` (bytes or str) as its frame is parsed,
        when no earlier message waits in the queue; what it takes (returns True for) is never
        returned by :meth:`receive`. None stops it. False: this server has no such hook."""
        proto = self._proto
        if proto is None:
            return False
        queue = proto.queue
        if handler is not None and type(queue) is asyncio.Queue:
            queue.__class__ = _InlineQueue  # the same queue (and its waiters), with a first look
        if isinstance(queue, _InlineQueue):
            queue.proto, queue.inline = proto, handler
        return True

    def send_now(self, data: bytes) -> bool | None:
        """Write one binary frame to the transport without waiting, when the socket can take it
        at once; None when it cannot be sent this way (then :meth:`send`)."""
        p = self._proto
        if p is None or self.closed:
            return None
        if p.close_sent or p.disconnected or not p.handshake_complete or not p.writable.is_set():
            return None
        ws = p.conn
        if ws.state is not self._open or ws.extensions or ws.expect_continuation_frame or ws.writes:
            return None  # closing, compressed or mid-message: websockets' own way
        p.transport.write(binary_frame(data))
        return True

    async def accept(self) -> None:
        if (await self._receive())["type"] != "websocket.connect":
            raise Disconnected("the client went away before the handshake")
        await self._send({"type": "websocket.accept"})

    async def receive(self) -> bytes:
        msg: Message = await self._receive()
        if msg["type"] == "websocket.receive":
            data = msg.get("bytes")
            return data if data is not None else str(msg.get("text") or "").encode()
        self.closed = True
        raise Disconnected(f"closed ({msg.get('code', 1000)})")

    async def send(self, data: bytes) -> bool:
        if self.closed:
            return False
        try:
            await self._send({"type": "websocket.send", "bytes": data})
            return True
        except (OSError, RuntimeError):  # uvicorn's ClientDisconnected is an OSError
            self.closed = True
            return False

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(OSError, RuntimeError):
            await self._send({"type": "websocket.close", "code": code, "reason": reason})


class Connection:
    def __init__(self, machine_id: str, ws: AgentSocket, protocol: int = PROTOCOL_VERSION) -> None:
        self.machine_id = machine_id
        self.ws = ws
        self.protocol = protocol  # what the agent said it speaks in its hello
        #: every beat acknowledged (protocol 1); else only those naming an attempt (the
        #: assignment says which beat renewed a new lease: :meth:`Hub.heard_before`)
        self.idle_acks = protocol < 2
        self.heard: deque[tuple[float, int]] = deque(maxlen=HEARD_KEPT)  # (received at, seq) of the latest beats
        self.lock = asyncio.Lock()  # one frame at a time
        self.order = asyncio.Lock()  # a result's reply before the next assignment (see serve)
        self.verify_sent_at = 0.0
        self.last_seen = time.time()  # the last message from the agent
        self.sessions: list[str] = []  # the session notes of its last beat (leases follow changes)
        #: the connection's task waits for the next message (nothing of the agent's in hand):
        #: a heartbeat may then be taken where its frame is parsed, and order still holds
        self.waiting = False

    async def send(self, msg: BaseModel) -> bool:
        return await self.send_raw(orjson.dumps(msg.model_dump(mode="json")))

    async def send_raw(self, data: bytes) -> bool:
        if not self.lock.locked():
            sent = self.ws.send_now(data)
            if sent is not None:
                return sent
        async with self.lock:
            return await self.ws.send(data)


def heartbeat_ack(seq: int) -> bytes:
    """``HeartbeatAck(seq=seq)`` encoded: the frame the hub sends most, built without a model."""
    return b'{"type":"heartbeat_ack","seq":%d}' % seq


_RESOURCE_DEFAULTS = Resources().model_dump()
_RESOURCE_FLOATS = ("memory_mb", "cpu_percent", "uptime", "machine_memory_percent")
_RESOURCE_KEYS = frozenset(_RESOURCE_DEFAULTS)


@dataclass(slots=True)
class Beat:
    """A heartbeat as the hub keeps it (see :func:`quick_heartbeat`)."""

    seq: int
    resources: dict[str, Any]
    session_key: str | None
    session_expires_at: float | None
    attempt_id: int | None
    sessions: list[str] | None = None

    @classmethod
    def of(cls, msg: HeartbeatMsg) -> Beat:
        return cls(msg.seq, msg.resources.model_dump(), msg.session_key, msg.session_expires_at, msg.attempt_id,
                   msg.sessions)

    def notes(self) -> list[str]:
        if self.sessions is not None:
            return self.sessions
        return [self.session_key] if self.session_key else []


def quick_heartbeat(data: Any) -> Beat | None:
    """A heartbeat read without the model when it has exactly the usual shape (most frames
    on the wire are heartbeats); None for anything else, which then goes through the model
    and its error messages. Accepts only what the model would, and gives the same values."""
    if type(data) is not dict or data.get("type") != "heartbeat":
        return None
    seq, res = data.get("seq"), data.get("resources", {})
    key, expires, attempt = data.get("session_key"), data.get("session_expires_at"), data.get("attempt_id")
    if type(seq) is not int or type(res) is not dict:
        return None
    if not (key is None or type(key) is str) or not (attempt is None or type(attempt) is int):
        return None
    if not (expires is None or type(expires) in (int, float)):
        return None
    sessions = data.get("sessions")
    if sessions is not None and (type(sessions) is not list or any(type(x) is not str for x in sessions)):
        return None
    if res.keys() == _RESOURCE_KEYS and type(res["memory_mb"]) is float and type(res["cpu_percent"]) is float \
            and type(res["uptime"]) is float and type(res["app_running"]) is bool \
            and type(res["reboot_pending"]) is bool \
            and (res["machine_memory_percent"] is None or type(res["machine_memory_percent"]) is float):
        # the agent's own model_dump: every field, each of its type — what the model would give
        return Beat(seq, res, key, None if expires is None else float(expires), attempt, sessions)
    values = dict(_RESOURCE_DEFAULTS)
    for name, value in res.items():
        if name in _RESOURCE_FLOATS:
            if type(value) in (int, float):
                values[name] = float(value)
            elif value is None and name == "machine_memory_percent":
                values[name] = None
            else:
                return None
        elif name in ("app_running", "reboot_pending"):
            if type(value) is not bool:
                return None
            values[name] = value
    return Beat(seq, values, key, None if expires is None else float(expires), attempt, sessions)


class HumanRequests(Protocol):
    """Who handles agents' human tasks (``services.human.HumanDesk``): each answers the
    request on the connection itself."""

    async def request(self, conn: Connection, msg: HumanRequest) -> None: ...

    async def check(self, conn: Connection, msg: HumanCheck) -> None: ...


class RunListener(Protocol):
    """What the hub tells the part that owns runs and dispatch (the orchestrator)."""

    async def send_assignment(self, a: Assignment) -> None:
        """Send an attempt's assignment to its machine (again, after a reconnect)."""

    async def send_stop(self, order: StopOrder) -> None: ...

    def run_changed(self, run: Run) -> None: ...

    def after_finished(self, items: Iterable[Finished]) -> None:
        """Attempts ended and were recorded (their machines are free)."""

    def wake(self, *, others: bool = False) -> None:
        """Schedule now: a machine may be free or back."""

    def catalog_changed(self) -> None:
        """What an agent's machine offers changed (automations, labels)."""


class Hub:
    def __init__(self, store: Store, db: StoreRunner, settings: ServerSettings, *, replica_id: str,
                 metrics: Metrics, vault: Vault, runs: RunListener) -> None:
        self.store = store
        self.db = db
        self.settings = settings
        self.replica_id = replica_id
        self.metrics = metrics
        self.vault = vault
        self.runs = runs
        self.connections: dict[str, Connection] = {}
        self.beats: dict[str, Heartbeat] = {}
        self.beat_seqs: dict[str, int] = {}  # the sequence number of each machine's latest beat
        self.beats_inline = 0  # beats taken where their frames were parsed (see AgentSocket)
        self._sampled: dict[str, float] = {}  # when each machine's figures were last kept as a sample
        #: human tasks (protocol 5), set by the composition root once the service exists
        self.human: HumanRequests | None = None

    def _ctx(self, machine_id: str, attempt_id: int | None = None, run_id: str | None = None) -> dict[str, Any]:
        return {"machine": machine_id, "attempt": attempt_id, "run": run_id}

    async def send(self, machine_id: str, msg: BaseModel) -> bool:
        conn = self.connections.get(machine_id)
        if conn is None:
            return False
        return await conn.send(msg)

    async def send_assignment(self, machine_id: str, msg: BaseModel) -> bool:
        """An assignment goes out only after the reply to a result being recorded on the
        same connection: the scheduler may claim the machine the moment the result commits."""
        conn = self.connections.get(machine_id)
        if conn is None:
            return False
        async with conn.order:
            return await conn.send(msg)

    def heard_before(self, machine_id: str, at: float) -> int | None:
        """The latest beat of the machine's agent received by ``at`` (on this connection),
        or None. A lease that began at ``at`` lasts at least as long from that beat's sending
        as from an acknowledged beat's: the agent may count from it (``Assign.renewed_by``)."""
        conn = self.connections.get(machine_id)
        if conn is None:
            return None
        for received, seq in reversed(conn.heard):
            if received <= at:
                return seq
        return None

    def drain_heartbeats(self) -> tuple[list[Heartbeat], dict[str, int]]:
        beats, self.beats = list(self.beats.values()), {}
        seqs, self.beat_seqs = self.beat_seqs, {}
        return beats, seqs

    def requeue_heartbeats(self, beats: list[Heartbeat], seqs: dict[str, int]) -> None:
        """Beats a failed write did not record: keep them unless a newer one arrived."""
        for b in beats:
            newer = self.beats.get(b.machine_id)
            if newer is None:
                self.beats[b.machine_id] = b
                if b.machine_id in seqs:  # an idle beat (protocol 2) waits for no acknowledgement
                    self.beat_seqs[b.machine_id] = seqs[b.machine_id]
            elif b.sessions_changed:
                newer.sessions_changed = True  # compared with the unwritten beat: write it all the same

    async def acknowledge(self, seqs: dict[str, int]) -> None:
        """The beats were written: their leases are renewed; tell the agents."""
        connections = self.connections
        for n, (machine_id, seq) in enumerate(seqs.items(), 1):
            conn = connections.get(machine_id)
            if conn is not None:
                data = heartbeat_ack(seq)
                if conn.lock.locked() or conn.ws.send_now(data) is None:
                    await conn.send_raw(data)
            if n % ACK_SLICE == 0:
                # A tick acknowledges hundreds of beats; sends that do not block never yield,
                # so let a submit or an assignment through now and then.
                await asyncio.sleep(0)

    async def close_silent(self, now: float, timeout: float) -> list[str]:
        """Close the connections of agents silent for ``timeout``: a machine that vanished
        without closing its socket (power cut, network gone) must reconnect to be heard
        again. Heartbeats are the liveness check; the connection needs no pings of its own."""
        silent = [c for c in self.connections.values() if now - c.last_seen > timeout]
        for conn in silent:
            log.warning("agent silent for %.0fs: closing its connection", now - conn.last_seen,
                        extra=self._ctx(conn.machine_id))
            await conn.ws.close(1011)
        return [c.machine_id for c in silent]

    async def close_all(self) -> None:
        for conn in list(self.connections.values()):
            await conn.ws.close(1012)  # service restart: agents reconnect

    async def serve(self, ws: AgentSocket, machine_id: str) -> None:
        """Run one agent's (accepted, authenticated) connection until it closes."""
        runs = self.runs
        try:
            raw = await asyncio.wait_for(ws.receive(), HELLO_TIMEOUT)
            hello = agent_message.validate_python(orjson.loads(raw))
            if not isinstance(hello, Hello):
                raise ValueError("the first message must be hello")
        except (TimeoutError, ValueError, ValidationError, orjson.JSONDecodeError, KeyError) as exc:
            await ws.send(orjson.dumps(Error(message=f"bad hello: {exc}").model_dump()))
            await ws.close(1002)
            return
        except Disconnected:
            return

        now = time.time()
        specs = [AutomationSpec(**ad.model_dump()) for ad in hello.automations]
        beat = Heartbeat(
            machine_id, now, hello.resources.model_dump(), hello.session_key,
            hello.session_expires_at, hello.attempt_id, hello.sessions,
        )
        try:
            result = await self.db(
                self.store.connect_machine, machine_id, boot_id=hello.boot_id,
                agent_version=hello.agent_version, automations=specs,
                # protocol 6: the packs it runs, as well-known labels (a run may pin a version)
                labels=hello.labels if hello.packs is None else pack_labels(hello.labels, hello.packs),
                heartbeat=beat, lease_timeout=self.settings.lease_timeout, now=now,
                replica=self.replica_id,
            )
        except StoreUnavailable:
            await ws.close(1013)  # try again later: the agent reconnects with backoff
            return
        except asyncio.CancelledError:
            # The server is stopping and ran out of time while thousands of hellos queued
            # on the store: the agent reconnects to whichever replica is up, and a connect
            # that still commits is undone by the replica's leave (or, failing that, by the
            # leader reaping a replica gone silent). End quietly.
            log.info("agent connecting as the server stops: not connected", extra=self._ctx(machine_id))
            return
        if result.offers_changed:
            runs.catalog_changed()
        previous = self.connections.get(machine_id)
        conn = Connection(machine_id, ws, hello.protocol)
        conn.sessions = beat.notes()  # connect_machine brought the leases in line with them
        self.connections[machine_id] = conn
        self.metrics.connected.set(len(self.connections))
        if previous is not None:
            # The newest connection for a machine wins; the old one is a ghost.
            await previous.ws.close(1008)
        log.info("agent connected (boot %s)", hello.boot_id[:8], extra=self._ctx(machine_id, hello.attempt_id))
        await conn.send(Welcome(
            machine_id=machine_id,
            heartbeat_interval=self.settings.heartbeat_interval,
            heartbeat_timeout=self.settings.heartbeat_timeout,
            resume_attempt_id=result.resume.id if result.resume else None,
            protocol=PROTOCOL_VERSION,
        ))
        if result.resend is not None:
            await runs.send_assignment(result.resend)
        if result.stale_attempt_id is not None:
            await conn.send(Stop(attempt_id=result.stale_attempt_id, reason="lease_lost"))
        if result.ended_run is not None:
            runs.run_changed(result.ended_run)
        for order in await self.db(self.store.pending_stops, machine_id):
            await runs.send_stop(order)
        if result.machine.health is MachineHealth.QUARANTINED:
            await self.request_verify(conn, result.machine.quarantine_reason or "")
        runs.wake()

        def inline(raw: Any) -> bool:
            """A heartbeat, taken where its frame is parsed while the connection's task is idle."""
            if not conn.waiting:
                return False
            try:
                beat = quick_heartbeat(orjson.loads(raw))
            except orjson.JSONDecodeError:
                return False  # the connection's task answers it with an error
            if beat is None:
                return False
            self._beat(conn, beat, time.time())
            self.beats_inline += 1
            return True

        ws.take_inline(inline)
        try:
            while True:
                conn.waiting = True
                try:
                    raw = await ws.receive()
                finally:
                    conn.waiting = False
                try:
                    data = orjson.loads(raw)
                    msg: Any = quick_heartbeat(data) or agent_message.validate_python(data)
                    if isinstance(msg, HeartbeatMsg):
                        msg = Beat.of(msg)
                except (ValidationError, orjson.JSONDecodeError) as exc:
                    await conn.send(Error(message=f"unreadable message: {str(exc)[:200]}"))
                    continue
                if isinstance(msg, Result):
                    # The machine is free once the result is recorded; its next assignment
                    # must not overtake the reply that tells the agent so (it would refuse it).
                    async with conn.order:
                        await self._handle(conn, msg)
                else:
                    await self._handle(conn, msg)
        except Disconnected:
            pass
        finally:
            ws.take_inline(None)
            if self.connections.get(machine_id) is conn:
                del self.connections[machine_id]
                self.metrics.connected.set(len(self.connections))
                self.beats.pop(machine_id, None)
                self.beat_seqs.pop(machine_id, None)
                self._sampled.pop(machine_id, None)  # a machine gone (a scale-in's) leaves nothing behind
                said = "agent disconnected"
                try:
                    await self.db(self.store.disconnect_machine, machine_id, time.time(), self.replica_id)
                except asyncio.CancelledError:
                    # The server is stopping and ran out of time for this connection (ten
                    # thousand disconnects queue on the store): the replica's own leave
                    # (Orchestrator.stop) marks all its machines disconnected at once. The
                    # connection's task ends quietly, as its agent's socket did.
                    said = "agent disconnected as the server stops; recorded by the replica's leave"
                except Exception:
                    log.exception("could not record the disconnect", extra=self._ctx(machine_id))
                log.info(said, extra=self._ctx(machine_id))

    async def request_verify(self, conn: Connection, reason: str) -> None:
        conn.verify_sent_at = time.time()
        try:
            # The accounts it may have to log in with to reach "ready" (reserved for it).
            grants = await self.vault.verify_grants(conn.machine_id)
        except StoreUnavailable:
            return  # asked again at the next verify interval
        await conn.send(Verify(reason=reason, accounts=grants))

    def _beat(self, conn: Connection, msg: Beat, now: float) -> None:
        """A heartbeat: kept as the machine's latest, for the fleet manager's next write."""
        mid = conn.machine_id
        conn.last_seen = now
        notes = msg.notes()
        changed = notes != conn.sessions
        if changed:
            conn.sessions = notes
            log.info("sessions now: %s", ", ".join(notes) or "none", extra=self._ctx(mid))
        pending = self.beats.get(mid)
        sample = now - self._sampled.get(mid, 0.0) >= self.settings.sample_interval
        if sample:
            self._sampled[mid] = now
        self.beats[mid] = Heartbeat(mid, now, msg.resources, msg.session_key, msg.session_expires_at,
                                    msg.attempt_id, msg.sessions,
                                    changed or (pending is not None and pending.sessions_changed),
                                    sample or (pending is not None and pending.sample))
        conn.heard.append((now, msg.seq))
        if msg.attempt_id is not None or conn.idle_acks:
            self.beat_seqs[mid] = msg.seq  # acknowledged once written (see the module's docstring)
        else:
            self.beat_seqs.pop(mid, None)  # idle: the latest beat renews no lease, and is not acknowledged

    async def _handle(self, conn: Connection, msg: Any) -> None:
        db, store, mid, now = self.db, self.store, conn.machine_id, time.time()
        if isinstance(msg, Beat):
            self._beat(conn, msg, now)
            return
        conn.last_seen = now
        try:
            if isinstance(msg, Preparing):
                await db.write(store.attempt_preparing, msg.attempt_id, mid, now)
            elif isinstance(msg, Progress):
                data = {k: v for k, v in (("percent", msg.percent), ("message", msg.message)) if v is not None}
                await db.write(store.attempt_progress, msg.attempt_id, mid, msg.step, data, now)
            elif isinstance(msg, AgentEvent):
                if msg.attempt_id is None:
                    await db(store.record_event, msg.kind, now, machine_id=mid, data=msg.data)
                else:
                    await db.write(store.attempt_event, msg.attempt_id, mid, msg.kind, msg.data, now)
            elif isinstance(msg, Start):
                try:
                    await db.write(store.attempt_start, msg.attempt_id, mid, now)
                except Stopped as exc:
                    await conn.send(Reply(re=msg.id, ok=False, stop=exc.reason))
                    return
                await conn.send(Reply(re=msg.id, ok=True))
            elif isinstance(msg, Result):
                finished = await db.write(
                    store.finish_attempt, msg.attempt_id, mid, Ending(msg.ending),
                    output=msg.output, detail=msg.detail[:2000], now=now,
                )
                await conn.send(Reply(re=msg.id, ok=True))
                log.info("attempt ended: %s → run %s", msg.ending, finished.run.state.value,
                         extra=self._ctx(mid, msg.attempt_id, finished.run.id))
                self.runs.after_finished([finished])
            elif isinstance(msg, LeaseCheck):
                # An effect outside the desktop is about to happen: renewed now, or refused.
                try:
                    valid_for = await db.write(store.attempt_renew, msg.attempt_id, mid, now,
                                               self.settings.lease_timeout)
                except Stopped as exc:
                    await conn.send(Reply(re=msg.id, ok=False, stop=exc.reason))
                    return
                await conn.send(Reply(re=msg.id, ok=True, valid_for=valid_for))
            elif isinstance(msg, (HumanRequest, HumanCheck)):
                if self.human is None:
                    await conn.send(Reply(re=msg.id, ok=False, error="this orchestrator takes no human tasks"))
                elif isinstance(msg, HumanRequest):
                    await self.human.request(conn, msg)
                else:
                    await self.human.check(conn, msg)
            elif isinstance(msg, TotpRequest):
                try:
                    code, valid_for = await self.vault.totp(mid, msg.account)
                except InvalidRequest as exc:
                    log.warning("TOTP code refused: %s", exc.message, extra=self._ctx(mid))
                    await conn.send(Reply(re=msg.id, ok=False, error=exc.message))
                    return
                await conn.send(Reply(re=msg.id, ok=True, code=code, valid_for=valid_for))
            elif isinstance(msg, Verified):
                # The accounts reserved for it may settle now (held if the notes say so) — also
                # after a reconnect, when this connection did not send the order.
                await db(store.verify_ended, mid, now)
                if msg.ok:
                    await db(store.release_quarantine, mid, {"state": msg.state, "screenshot": msg.screenshot_id}, now)
                    log.info("machine re-proved its state (%s)", msg.state, extra=self._ctx(mid))
                    self.runs.wake()
                else:
                    await db(store.record_event, "machine.verify_failed", now, machine_id=mid,
                             reason=msg.detail[:500], data={"state": msg.state})
        except StoreUnavailable:
            # The database is away: a request is answered "retry", a report is dropped
            # (progress resumes, the watchdog forgives the outage); the connection stays up.
            if isinstance(msg, (Start, Result, TotpRequest, LeaseCheck, HumanRequest, HumanCheck)):
                await conn.send(Reply(re=msg.id, ok=False, error="unavailable: the database is away; retry"))
        except StaleLease as exc:  # (counted by the store: deskfleet_stale_writes_refused_total)
            if isinstance(msg, (Start, Result, LeaseCheck)):
                await conn.send(Reply(re=msg.id, ok=False, stop="lease_lost" if isinstance(msg, LeaseCheck) else None,
                                      error=f"stale_lease: {exc.reason}"))
            attempt_id = getattr(msg, "attempt_id", None)
            if attempt_id is not None:
                await conn.send(Stop(attempt_id=attempt_id, reason="lease_lost"))
