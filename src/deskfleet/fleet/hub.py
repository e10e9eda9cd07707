"""The agent hub: one WebSocket per connected agent, and what each message does.

Messages from one agent are handled in order, so a progress report never overtakes the
result that follows it. Heartbeats do not touch the database one by one: the hub keeps
the latest per machine and the fleet manager writes them in one transaction a tick, and
only then acknowledges them. An agent hears "your lease is renewed" only once it is — so
a replica that cannot reach the database (while another replica, which can, expires the
lease) never keeps an agent working on a lease it no longer has: the agent fences itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import BaseModel, ValidationError
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from ..errors import StaleLease, Stopped, StoreUnavailable
from ..models import AutomationSpec, Ending, MachineHealth
from ..protocol import (
    AgentEvent,
    Error,
    HeartbeatAck,
    HeartbeatMsg,
    Hello,
    Preparing,
    Progress,
    Reply,
    Result,
    Start,
    Stop,
    Verified,
    Verify,
    Welcome,
    agent_message,
)
from ..store import Heartbeat

if TYPE_CHECKING:
    from ..orchestrator import Orchestrator

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 10.0


class Connection:
    def __init__(self, machine_id: str, ws: WebSocket) -> None:
        self.machine_id = machine_id
        self.ws = ws
        self.lock = asyncio.Lock()
        self.verify_sent_at = 0.0

    async def send(self, msg: BaseModel) -> bool:
        if self.ws.client_state is not WebSocketState.CONNECTED:
            return False
        try:
            async with self.lock:
                await self.ws.send_bytes(orjson.dumps(msg.model_dump(mode="json")))
            return True
        except (WebSocketDisconnect, RuntimeError, OSError):
            return False


class Hub:
    def __init__(self, orch: Orchestrator) -> None:
        self.orch = orch
        self.connections: dict[str, Connection] = {}
        self.beats: dict[str, Heartbeat] = {}
        self.beat_seqs: dict[str, int] = {}  # the sequence number of each machine's latest beat

    def _ctx(self, machine_id: str, attempt_id: int | None = None, run_id: str | None = None) -> dict[str, Any]:
        return {"machine": machine_id, "attempt": attempt_id, "run": run_id}

    async def send(self, machine_id: str, msg: BaseModel) -> bool:
        conn = self.connections.get(machine_id)
        if conn is None:
            return False
        return await conn.send(msg)

    def drain_heartbeats(self) -> tuple[list[Heartbeat], dict[str, int]]:
        beats, self.beats = list(self.beats.values()), {}
        seqs, self.beat_seqs = self.beat_seqs, {}
        return beats, seqs

    def requeue_heartbeats(self, beats: list[Heartbeat], seqs: dict[str, int]) -> None:
        """Beats a failed write did not record: keep them unless a newer one arrived."""
        for b in beats:
            if b.machine_id not in self.beats:
                self.beats[b.machine_id] = b
                self.beat_seqs[b.machine_id] = seqs[b.machine_id]

    async def acknowledge(self, seqs: dict[str, int]) -> None:
        """The beats were written: their leases are renewed; tell the agents."""
        for machine_id, seq in seqs.items():
            conn = self.connections.get(machine_id)
            if conn is not None:
                await conn.send(HeartbeatAck(seq=seq))

    async def close_all(self) -> None:
        for conn in list(self.connections.values()):
            with contextlib.suppress(RuntimeError, OSError):
                await conn.ws.close(code=1012)  # service restart: agents reconnect

    async def serve(self, ws: WebSocket, machine_id: str) -> None:
        """Run one agent's connection until it closes."""
        orch = self.orch
        try:
            raw = await asyncio.wait_for(ws.receive_bytes(), HELLO_TIMEOUT)
            hello = agent_message.validate_python(orjson.loads(raw))
            if not isinstance(hello, Hello):
                raise ValueError("the first message must be hello")
        except (TimeoutError, ValueError, ValidationError, orjson.JSONDecodeError, KeyError) as exc:
            await ws.send_bytes(orjson.dumps(Error(message=f"bad hello: {exc}").model_dump()))
            await ws.close(code=1002)
            return
        except WebSocketDisconnect:
            return

        now = time.time()
        specs = [AutomationSpec(**ad.model_dump()) for ad in hello.automations]
        beat = Heartbeat(
            machine_id, now, hello.resources.model_dump(), hello.session_key,
            hello.session_expires_at, hello.attempt_id,
        )
        try:
            result = await orch.db(
                orch.store.connect_machine, machine_id, boot_id=hello.boot_id,
                agent_version=hello.agent_version, automations=specs, labels=hello.labels,
                heartbeat=beat, lease_timeout=orch.settings.lease_timeout, now=now,
                replica=orch.replica_id,
            )
        except StoreUnavailable:
            await ws.close(code=1013)  # try again later: the agent reconnects with backoff
            return
        orch.forget_specs()
        previous = self.connections.get(machine_id)
        conn = Connection(machine_id, ws)
        self.connections[machine_id] = conn
        orch.metrics.connected.set(len(self.connections))
        if previous is not None:
            # The newest connection for a machine wins; the old one is a ghost.
            with contextlib.suppress(RuntimeError, OSError):
                await previous.ws.close(code=1008)
        log.info("agent connected (boot %s)", hello.boot_id[:8], extra=self._ctx(machine_id, hello.attempt_id))
        await conn.send(Welcome(
            machine_id=machine_id,
            heartbeat_interval=orch.settings.heartbeat_interval,
            heartbeat_timeout=orch.settings.heartbeat_timeout,
            resume_attempt_id=result.resume.id if result.resume else None,
        ))
        if result.resend is not None:
            await orch.send_assignment(result.resend)
        if result.stale_attempt_id is not None:
            await conn.send(Stop(attempt_id=result.stale_attempt_id, reason="lease_lost"))
        if result.ended_run is not None:
            orch.run_changed(result.ended_run)
        for order in await orch.db(orch.store.pending_stops, machine_id):
            await orch.send_stop(order)
        if result.machine.health is MachineHealth.QUARANTINED:
            await self.request_verify(conn, result.machine.quarantine_reason or "")
        orch.wake()

        try:
            while True:
                raw = await ws.receive_bytes()
                try:
                    msg = agent_message.validate_python(orjson.loads(raw))
                except (ValidationError, orjson.JSONDecodeError) as exc:
                    await conn.send(Error(message=f"unreadable message: {str(exc)[:200]}"))
                    continue
                await self._handle(conn, msg)
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            if self.connections.get(machine_id) is conn:
                del self.connections[machine_id]
                orch.metrics.connected.set(len(self.connections))
                self.beats.pop(machine_id, None)
                self.beat_seqs.pop(machine_id, None)
                try:
                    await orch.db(orch.store.disconnect_machine, machine_id, time.time(), orch.replica_id)
                except Exception:
                    log.exception("could not record the disconnect", extra=self._ctx(machine_id))
                log.info("agent disconnected", extra=self._ctx(machine_id))

    async def request_verify(self, conn: Connection, reason: str) -> None:
        conn.verify_sent_at = time.time()
        await conn.send(Verify(reason=reason))

    async def _handle(self, conn: Connection, msg: Any) -> None:
        orch, mid, now = self.orch, conn.machine_id, time.time()
        store = orch.store
        if isinstance(msg, HeartbeatMsg):
            self.beats[mid] = Heartbeat(
                mid, now, msg.resources.model_dump(), msg.session_key, msg.session_expires_at, msg.attempt_id
            )
            self.beat_seqs[mid] = msg.seq  # acknowledged once written (see the module's docstring)
            return
        try:
            if isinstance(msg, Preparing):
                await orch.db(store.attempt_preparing, msg.attempt_id, mid, now)
            elif isinstance(msg, Progress):
                data = {k: v for k, v in (("percent", msg.percent), ("message", msg.message)) if v is not None}
                await orch.db(store.attempt_progress, msg.attempt_id, mid, msg.step, data, now)
            elif isinstance(msg, AgentEvent):
                if msg.attempt_id is None:
                    await orch.db(store.record_event, msg.kind, now, machine_id=mid, data=msg.data)
                else:
                    await orch.db(store.attempt_event, msg.attempt_id, mid, msg.kind, msg.data, now)
            elif isinstance(msg, Start):
                try:
                    await orch.db(store.attempt_start, msg.attempt_id, mid, now)
                except Stopped as exc:
                    await conn.send(Reply(re=msg.id, ok=False, stop=exc.reason))
                    return
                await conn.send(Reply(re=msg.id, ok=True))
            elif isinstance(msg, Result):
                finished = await orch.db(
                    store.finish_attempt, msg.attempt_id, mid, Ending(msg.ending),
                    output=msg.output, detail=msg.detail[:2000], now=now,
                )
                await conn.send(Reply(re=msg.id, ok=True))
                log.info("attempt ended: %s → run %s", msg.ending, finished.run.state.value,
                         extra=self._ctx(mid, msg.attempt_id, finished.run.id))
                orch.after_finished([finished])
            elif isinstance(msg, Verified):
                if msg.ok:
                    await orch.db(store.release_quarantine, mid, {"state": msg.state, "screenshot": msg.screenshot_id}, now)
                    log.info("machine re-proved its state (%s)", msg.state, extra=self._ctx(mid))
                    orch.wake()
                else:
                    await orch.db(store.record_event, "machine.verify_failed", now, machine_id=mid,
                                  reason=msg.detail[:500], data={"state": msg.state})
        except StoreUnavailable:
            # The database is away: a request is answered "retry", a report is dropped
            # (progress resumes, the watchdog forgives the outage); the connection stays up.
            if isinstance(msg, (Start, Result)):
                await conn.send(Reply(re=msg.id, ok=False, error="unavailable: the database is away; retry"))
        except StaleLease as exc:
            orch.metrics.stale.inc()
            if isinstance(msg, (Start, Result)):
                await conn.send(Reply(re=msg.id, ok=False, error=f"stale_lease: {exc.reason}"))
            attempt_id = getattr(msg, "attempt_id", None)
            if attempt_id is not None:
                await conn.send(Stop(attempt_id=attempt_id, reason="lease_lost"))
