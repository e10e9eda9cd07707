"""The agent: the long-lived process on each machine.

It enrols with the orchestrator, keeps one WebSocket open (reconnecting with backoff, and
moving on to the next orchestrator URL when one dies), heartbeats with resource figures,
and runs each assignment: pre-flight, reconcile when asked, the automation under a
watchdog, then a result it re-sends until the orchestrator acknowledges it.

Accounts: the agent holds no credentials of its own. An assignment (or a verify order)
that needs a login carries the account's password (``AccountGrant``); the agent builds the
:class:`~deskfleet.appmodel.Account` pre-flight logs in with, asks the orchestrator for a
TOTP code when an MFA prompt needs one, and drops the grant when the attempt (or the
verification) ends. Embedders and tests may still give an agent accounts of its own
(``accounts=``), used when an assignment brings none.

Self-fencing: if no heartbeat has been acknowledged for the heartbeat timeout, the agent
stops its attempt on its own. Its last acknowledged beat is never later than the last beat
the orchestrator received, so the agent stops *before* the orchestrator expires the lease
and hands the run to another machine — a partitioned agent does not keep clicking while
its replacement starts. An idle machine's beats are not acknowledged (protocol 2): a new
lease counts from the beat its assignment names (``Assign.renewed_by``), heard before the
lease began.

Screenshots are redacted here, before their bytes leave the machine: every one the agent
uploads — pre-flight evidence, failure screens, a human task's screen, a verification's,
the images an automation attaches — has the regions its app model declares blacked out
(:meth:`~deskfleet.appmodel.AppModel.redact`; blanked whole where they cannot be placed),
and says so in the upload's metadata.

Effects outside the desktop (an API call, a file) go through ``ctx.fenced()``: the same
reckoning, then the lease renewed with the orchestrator at that moment (``lease``, protocol
3). The self-fencing check runs in a timer's callback, so that a process paused past its
lease (SIGSTOP, a frozen VM) stops its automation before the automation runs again.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import random
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import httpx
import numpy as np
import orjson
import websockets
from pydantic import BaseModel
from websockets.asyncio.client import ClientConnection

from .. import tracing
from ..appmodel import Account, AppModel, Credential, PlaybookContext
from ..appmodel import HumanAnswer as Answer
from ..crypto import REDACTED
from ..desktop import Desktop, Frame
from ..errors import BusinessError, ConfigError, Stopped
from ..protocol import (
    PROTOCOL_VERSION,
    AccountGrant,
    AgentEvent,
    Assign,
    AutomationAd,
    EnrolResponse,
    HeartbeatAck,
    Hello,
    HumanAnswer,
    HumanCheck,
    HumanRequest,
    Install,
    LeaseCheck,
    Preparing,
    Progress,
    Recycle,
    Reply,
    Resources,
    Result,
    Start,
    Stop,
    TotpRequest,
    Verified,
    Verify,
    Welcome,
    heartbeat_frame,
    server_message,
)
from ..sdk import Context, Registry, UpdateContext, encode_png
from ..version import __version__
from ..vision.templates import decode_image
from .preflight import PreflightResult, preflight

log = logging.getLogger(__name__)

REPLY_TIMEOUT = 10.0
#: seconds between re-reads of a human task the agent waits on (``human_check``): the answer
#: is pushed the moment a person gives it; this only covers one that was lost on the way
HUMAN_RECHECK = 3.0
#: the protocol an orchestrator must speak to take human tasks
HUMAN_PROTOCOL = 5
#: seconds between checks of whether an idle session needs its keep-alive
UPKEEP_POLL = 1.0
#: seconds session upkeep waits at most before it looks at the sessions again, unless a
#: heartbeat's reading of them changed or the next is due sooner
UPKEEP_MAX_WAIT = 10.0
#: seconds a keep-alive playbook may take
UPKEEP_TIMEOUT = 20.0
#: The agent treats its lease as gone this far into the heartbeat timeout, counted from
#: the *sending* of the last acknowledged beat — before the orchestrator, which counts from
#: receiving it, can expire the lease.
FENCE_FRACTION = 0.9
#: seconds the event loop must not have run (a paused process) to be reported as a pause
PAUSE_REPORTED = 1.0


@dataclass(slots=True)
class AgentConfig:
    servers: list[str]  # base URLs, e.g. ["http://127.0.0.1:8470"]; tried in turn
    machine: str
    pool: str = "default"
    labels: dict[str, str] = field(default_factory=dict)
    enrolment_token: str | None = None
    agent_key: str | None = None
    key_file: Path | None = None  # where the agent key is kept between restarts
    screenshots: str = "evidence"  # evidence (pre-flight proof, playbook steps, failures) | none
    preflight_steps: int = 8
    reconnect_max: float = 5.0

    def __post_init__(self) -> None:
        if not self.servers:
            raise ConfigError("the agent needs at least one orchestrator URL")
        if self.screenshots not in ("evidence", "none"):
            raise ConfigError("screenshots must be 'evidence' or 'none'")


@dataclass(slots=True)
class App:
    """One application an agent drives: the desktop its automations see, its app model and
    its automations — what a pack gives, on one machine. A machine may run several."""

    desktop: Desktop
    registry: Registry
    model: AppModel | None = None
    name: str | None = None  # the pack's name
    #: session upkeep: seconds before the app's idle logout at which an idle machine runs
    #: ``keepalive`` (a playbook of the model); None: no upkeep
    keepalive: str | None = None
    keepalive_margin: float = 30.0
    idle_timeout: float | None = None  # the app's idle logout, if known (bounds the keep-alive margin)
    data_dir: Path | None = None  # the pack's {data} directory on this machine (ctx.data_dir)
    version: str | None = None  # the pack's version (reported in the hello: protocol 6)
    #: the pack's update hook (``[hooks] update``): the OS update a rolling maintenance with
    #: ``update: pack`` asks for (protocol 7); None: the pack has none
    update: Callable[[UpdateContext], Any] | None = None


class _Disconnected(Exception):
    pass


class Installer(Protocol):
    """Carries out the orchestrator's ``install`` orders (``agent.packs.PackInstaller``)."""

    def order(self, agent: Agent, order: Install) -> None: ...


@dataclass(slots=True)
class _Current:
    assign: Assign  # without its account grant: that is ``account``, dropped when the attempt ends
    account: Account | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    stop_reason: str | None = None
    task: asyncio.Task[None] | None = None
    automation_task: asyncio.Task[Any] | None = None
    result_id: int | None = None  # the message id of the result report in flight
    forgotten: bool = False  # the machine rebooted: this attempt no longer exists here
    received: float = field(default_factory=time.monotonic)
    fence_timer: asyncio.TimerHandle | None = None  # see Agent._watch_fence
    #: secret answers a person gave this attempt (ctx.ask_human): kept out of its error text
    secrets: list[str] = field(default_factory=list)
    steps: tracing.Steps | None = None  # the spans of its automation's progress steps (tracing on)


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        apps: App | Sequence[App],
        *,
        accounts: Mapping[str, Account] | None = None,
        credentials: Mapping[str, Credential] | None = None,
        boot_id: str | None = None,
        http: httpx.AsyncClient | None = None,
        installer: Installer | None = None,
    ) -> None:
        """``accounts``: accounts of the agent's own, for assignments that bring none
        (embedders, tests); agents of a fleet get theirs from the orchestrator's vault.
        ``credentials`` is the older form of the same (account name → Credential)."""
        self.config = config
        # Agents packed many to a process (simulated fleets) share one HTTP client: each
        # client builds its own TLS context, which costs tens of milliseconds.
        self._shared_http = http
        self._http: httpx.AsyncClient | None = http
        self.apps = [apps] if isinstance(apps, App) else list(apps)
        if not self.apps:
            raise ConfigError("an agent needs at least one application to drive")
        self.registry = Registry([a for app in self.apps for a in app.registry])
        self._app_of = {id(a): app for app in self.apps for a in app.registry}
        self.accounts: dict[str, Account] = dict(accounts or {})
        for name, cred in (credentials or {}).items():
            self.accounts.setdefault(name, Account.from_credential(name, cred))
        # Which account each username is (learned from grants; not a secret): session notes
        # name usernames, leases go by account name.
        self._account_names: dict[str, str] = {a.username: a.name for a in self.accounts.values()}
        self.boot_id = boot_id or uuid.uuid4().hex
        self.machine_id = config.machine
        self._key = config.agent_key
        self._ws: ClientConnection | None = None
        self._connected = asyncio.Event()
        # Start at a server chosen by the machine's name, so that agents spread over the
        # orchestrator replicas instead of all crowding the first URL.
        self._server_index = zlib.crc32(config.machine.encode()) % len(config.servers)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._current: _Current | None = None
        self._hb_interval = 2.0
        self._hb_timeout = 10.0
        self._last_ack = time.monotonic()  # when the last acknowledged beat was *sent*
        self._beats_sent: dict[int, float] = {}
        self._server_protocol = 2  # what the orchestrator speaks (its welcome says)
        self._outbox: list[AgentEvent] = []  # reports that wait for a connection known to work
        self._outbox_after: int | None = None  # ... shown by a reply to this request or a later one
        self._seq = itertools.count(1)
        self._verifying = False
        self._updating = False  # the packs' update hooks run (a repeated order is ignored meanwhile)
        self._updated: tuple[str, dict[str, Any]] | None = None  # the last update's order (its reason) and report
        self._stopped = asyncio.Event()
        self._offline_until = 0.0
        self.completed = 0
        for app in self.apps:
            if hasattr(app.desktop, "input_gate"):
                app.desktop.input_gate = self._gate
        self._upkeep_lock = asyncio.Lock()  # session upkeep and attempts take turns on the desktop
        self._sessions_changed = asyncio.Event()  # a heartbeat read different sessions: upkeep looks again
        self._infos: list[Any] = []  # each app's DesktopInfo, as of the last heartbeat
        self._answers: dict[str, asyncio.Future[HumanAnswer]] = {}  # human task id → its answer
        self.installer = installer  # carries out install orders (agent.packs); None: this agent installs none

    # -- public ------------------------------------------------------------------------------
    @property
    def desktop(self) -> Desktop:
        """The machine's (first) desktop."""
        return self.apps[0].desktop

    @property
    def model(self) -> AppModel | None:
        """The (first) application's model."""
        return self.apps[0].model

    @property
    def server(self) -> str:
        return self.config.servers[self._server_index % len(self.config.servers)].rstrip("/")

    @property
    def busy(self) -> bool:
        return self._current is not None

    async def run(self) -> None:
        """Stay connected until :meth:`shutdown`; reconnect with backoff in between."""
        delay = 0.1
        own = httpx.AsyncClient(timeout=10.0) if self._shared_http is None else None
        upkeep = asyncio.get_running_loop().create_task(self._upkeep())
        async with own if own is not None else contextlib.nullcontext():
            self._http = own if own is not None else self._shared_http
            while not self._stopped.is_set():
                try:
                    await self._session()
                    delay = 0.1
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # every failure here means: reconnect
                    log.info("connection to %s ended: %s", self.server, _short(exc), extra=self._ctx())
                    self._server_index += 1
                finally:
                    self._on_disconnect()
                if self._stopped.is_set():
                    break
                pause = max(delay * (0.5 + random.random()), self._offline_until - time.monotonic())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopped.wait(), pause)
                # Come back well within the heartbeat timeout: after an orchestrator restart
                # a lease in flight survives only if its agent reconnects in time.
                delay = min(delay * 2, self.config.reconnect_max, max(0.2, self._hb_timeout / 4))
        upkeep.cancel()
        if self._current is not None and self._current.task is not None:
            self._current.task.cancel()
            with contextlib.suppress(BaseException):
                await self._current.task

    async def shutdown(self) -> None:
        self._stopped.set()
        if self._ws is not None:
            await self._ws.close()

    def forget_everything(self, *, offline_for: float = 0.0, boot_id: str | None = None) -> None:
        """What a machine reboot does to the agent process: in-flight work is gone, and
        the agent is back (with a new boot id) only once the machine is up again."""
        if self._current is not None:
            self._current.forgotten = True
            if self._current.task is not None:
                self._current.task.cancel()
            self._current = None
        self.boot_id = boot_id or uuid.uuid4().hex
        self._offline_until = time.monotonic() + offline_for
        if self._ws is not None:
            asyncio.get_running_loop().create_task(self._ws.close())

    # -- connection ----------------------------------------------------------------------------
    def _ctx(self, attempt: int | None = None, run: str | None = None) -> dict[str, Any]:
        return {"machine": self.machine_id, "attempt": attempt, "run": run}

    async def _enrol(self) -> None:
        if self._key is None and self.config.key_file is not None and self.config.key_file.exists():
            self._key = self.config.key_file.read_text().strip() or None
        if self._key is not None:
            return
        if not self.config.enrolment_token:
            raise ConfigError("the agent is not enrolled and has no enrolment token")
        assert self._http is not None  # set by run()
        resp = await self._http.post(
            f"{self.server}/agent/v1/enrol",
            json={"machine": self.config.machine, "pool": self.config.pool, "labels": self.config.labels},
            headers={"authorization": f"Bearer {self.config.enrolment_token}"},
        )
        if resp.status_code != 200:
            raise ConfigError(f"enrolment refused ({resp.status_code}): {resp.json().get('message', resp.text)}")
        enrolled = EnrolResponse.model_validate(resp.json())
        self._key = enrolled.agent_key
        if self.config.key_file is not None:
            self.config.key_file.parent.mkdir(parents=True, exist_ok=True)
            self.config.key_file.write_text(self._key)
            self.config.key_file.chmod(0o600)
        log.info("enrolled in pool %s", self.config.pool, extra=self._ctx())

    async def _session(self) -> None:
        await self._enrol()
        ws_url = self.server.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        try:
            ws = await websockets.connect(
                f"{ws_url}/agent/v1/connect",
                additional_headers={"authorization": f"Bearer {self._key}", "x-deskfleet-machine": self.machine_id},
                open_timeout=10, ping_interval=None, max_size=16 << 20,
                compression=None,  # small JSON frames: deflate costs more CPU than it saves
            )
        except websockets.InvalidStatus as exc:
            if exc.response.status_code in (401, 403):
                self._key = None  # enrol again on the next try
            raise
        self._ws = ws
        try:
            hello_sent = time.monotonic()
            await self._send(await self._hello())
            welcome = server_message.validate_python(orjson.loads(await asyncio.wait_for(ws.recv(), REPLY_TIMEOUT)))
            if not isinstance(welcome, Welcome):
                raise _Disconnected(f"expected welcome, got {welcome.type}")
            self._hb_interval, self._hb_timeout = welcome.heartbeat_interval, welcome.heartbeat_timeout
            self._server_protocol = welcome.protocol
            self._last_ack = hello_sent  # the hello renewed the lease when it arrived
            self._beats_sent.clear()
            self._connected.set()
            log.info("connected to %s", self.server, extra=self._ctx(welcome.resume_attempt_id))
            self._flush_outbox()
            beat = asyncio.create_task(self._heartbeats())
            try:
                async for raw in ws:
                    await self._dispatch(server_message.validate_python(orjson.loads(raw)))
            finally:
                beat.cancel()
        except websockets.ConnectionClosed as exc:
            if exc.rcvd is not None and exc.rcvd.code == 4401:
                self._key = None
            raise _Disconnected(str(exc)) from exc
        finally:
            self._ws = None

    def _on_disconnect(self) -> None:
        self._connected.clear()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(_Disconnected("connection lost"))
        self._pending.clear()

    async def _hello(self) -> Hello:
        res, info = await self._resources()
        sessions = self._sessions()
        return Hello(
            protocol=PROTOCOL_VERSION,
            boot_id=self.boot_id,
            agent_version=__version__,
            automations=[AutomationAd(**_spec_dict(s)) for s in self.registry.specs()],
            labels=self.config.labels or None,
            resources=Resources(**res),
            session_key=sessions[0] if sessions else None,
            session_expires_at=info.session_expires_at if info else None,
            attempt_id=self._current.assign.attempt_id if self._current else None,
            sessions=sessions,
            packs={app.name: app.version for app in self.apps if app.name and app.version} or None,
        )

    def _sessions(self) -> list[str]:
        """The accounts the machine's apps are logged in as (their session notes, as of the
        last reading), by the vault's names where the agent knows them (it was granted them)."""
        notes = [i.session_key for i in self._infos if i is not None and i.session_key]
        return [self._account_names.get(n, n) for n in notes]

    async def _resources(self) -> tuple[dict[str, Any], Any]:
        try:
            before = [(i.session_key, i.session_expires_at) if i is not None else None for i in self._infos]
            if len(self.apps) == 1:
                info = await self.desktop.info()
                self._infos = [info]
            else:  # one machine, several apps: their figures add up, the first session leads
                infos = self._infos = [await app.desktop.info() for app in self.apps]
                info = replace(infos[0], memory_mb=sum(i.memory_mb for i in infos),
                               cpu_percent=sum(i.cpu_percent for i in infos),
                               app_running=all(i.app_running for i in infos),
                               reboot_pending=any(i.reboot_pending for i in infos),
                               session_key=next((i.session_key for i in infos if i.session_key), None),
                               session_expires_at=min((i.session_expires_at for i in infos
                                                       if i.session_expires_at is not None), default=None))
        except Exception:
            return Resources().model_dump(), None
        if before != [(i.session_key, i.session_expires_at) for i in self._infos]:
            self._sessions_changed.set()  # session upkeep looks again
        # Resources' fields, as its model_dump gives them (no model built: every beat asks)
        return {"memory_mb": float(info.memory_mb), "cpu_percent": float(info.cpu_percent), "uptime": float(info.uptime),
                "machine_memory_percent": None, "app_running": bool(info.app_running),
                "reboot_pending": bool(info.reboot_pending)}, info

    async def _send(self, msg: BaseModel) -> None:
        await self._send_raw(orjson.dumps(msg.model_dump(mode="json")))

    async def _send_raw(self, data: bytes) -> None:
        ws = self._ws
        if ws is None:
            raise _Disconnected("not connected")
        try:
            await ws.send(data)
        except websockets.ConnectionClosed as exc:
            raise _Disconnected(str(exc)) from exc

    async def _request(self, make: Any) -> Reply:
        """Send a message that needs an answer; ``make(id)`` builds it."""
        msg_id = next(self._ids)
        if self._outbox and self._outbox_after is None:
            self._outbox_after = msg_id
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        try:
            await self._send(make(msg_id))
            return await asyncio.wait_for(fut, REPLY_TIMEOUT)
        finally:
            self._pending.pop(msg_id, None)
            if fut.done() and not fut.cancelled():
                fut.exception()  # the connection dropped while the send failed: seen, not "never retrieved"

    async def _heartbeats(self) -> None:
        while True:
            res, info = await self._resources()
            cur = self._current
            seq = next(self._seq)
            now = time.monotonic()
            sent = self._beats_sent
            while sent and next(iter(sent.values())) < now - self._hb_timeout:
                del sent[next(iter(sent))]  # unacknowledged (idle) and too old to count for anything
            sent[seq] = now
            sessions = self._sessions()
            await self._send_raw(heartbeat_frame(
                seq, res, sessions[0] if sessions else None, info.session_expires_at if info else None,
                cur.assign.attempt_id if cur else None, sessions,
            ))
            await asyncio.sleep(self._hb_interval)

    def _lease_presumed_lost(self) -> bool:
        return time.monotonic() - self._last_ack > FENCE_FRACTION * self._hb_timeout

    def _gate(self) -> None:
        """Checked immediately before any input reaches the desktop (see Desktop.input_gate)."""
        cur = self._current
        if cur is None:
            return  # no attempt, no lease to protect (a verify pre-flight)
        if not cur.stop.is_set() and self._lease_presumed_lost():
            self._fence(cur)
        if cur.stop.is_set():
            raise Stopped(cur.stop_reason or "stopped")

    def _fence(self, cur: _Current) -> None:
        log.warning("no heartbeat acknowledged in time: stopping the attempt (lease presumed lost)",
                    extra=self._ctx(cur.assign.attempt_id, cur.assign.run_id))
        self._stop_current(cur, "lease_presumed_lost")

    def _watch_fence(self, cur: _Current) -> None:
        """Stop ``cur`` if the orchestrator has been silent too long — checked by a timer's
        callback, not by a task, for the sake of a process that was paused (SIGSTOP, a VM
        frozen by its hypervisor, a stalled loop). When it runs again, every timer that fell
        due in the pause is due at once, and the event loop runs a due timer's callback in
        the iteration that finds it due, while a task woken by a timer (``asyncio.sleep``)
        or by I/O takes its step only in the next: so this check runs, and fences, before
        the automation's code resumes — unless the automation's step was already on its way
        when the pause began. How long the loop did not run (the monotonic clock's jump) is
        reported as ``agent.paused``."""
        loop = asyncio.get_running_loop()
        period = min(self._hb_interval, 0.5, self._hb_timeout / 10)

        def tick(due: float) -> None:
            if self._current is not cur or cur.task is None or cur.task.done():
                return
            now = loop.time()
            if not cur.stop.is_set() and self._lease_presumed_lost():
                self._fence(cur)
            if now - due >= PAUSE_REPORTED:
                self._paused(cur, now - due)
            cur.fence_timer = loop.call_at(now + period, tick, now + period)

        cur.fence_timer = loop.call_at(loop.time() + period, tick, loop.time() + period)

    def _paused(self, cur: _Current, seconds: float) -> None:
        fenced = cur.stop_reason == "lease_presumed_lost"
        log.warning("this process did not run for %.1fs (paused, or its event loop blocked)%s", seconds,
                    ": the attempt is stopped, its lease presumed lost" if fenced else "",
                    extra=self._ctx(cur.assign.attempt_id, cur.assign.run_id))
        # A machine's event, not the attempt's (whose lease may be gone). Sent once the
        # connection is known to have outlived the pause — the orchestrator answers a request
        # made after it — or on the next connection: the one in hand may be closed by now.
        self._outbox.append(AgentEvent(kind="agent.paused", data={
            "seconds": round(seconds, 3), "attempt": cur.assign.attempt_id, "run": cur.assign.run_id,
            "fenced": fenced}))
        self._outbox_after = None

    def _flush_outbox(self) -> None:
        out, self._outbox, self._outbox_after = self._outbox, [], None
        for msg in out:
            asyncio.get_running_loop().create_task(self._send_quiet(msg))

    async def _renew(self, cur: _Current) -> float:
        """``ctx.fenced()``: the lease, checked and renewed for an effect outside the desktop;
        the ``time.monotonic()`` by which the effect must be done. Stopped if it is gone."""
        if cur.stop.is_set():
            raise Stopped(cur.stop_reason or "stopped")
        if self._lease_presumed_lost():
            self._fence(cur)
            raise Stopped("lease_presumed_lost")
        deadline = self._last_ack + FENCE_FRACTION * self._hb_timeout  # what the acknowledged beats give
        if self._server_protocol >= 3 and self._connected.is_set():
            sent = time.monotonic()
            try:
                reply = await asyncio.wait_for(
                    self._request(lambda i: LeaseCheck(id=i, attempt_id=cur.assign.attempt_id)),
                    max(0.0, deadline - sent))
            except (TimeoutError, _Disconnected):
                reply = None  # no answer in time: the acknowledged beats' guarantee alone
            if reply is not None and reply.ok and reply.valid_for is not None:
                # Renewed no earlier than it was asked for: it runs that long from the asking.
                deadline = max(deadline, sent + FENCE_FRACTION * reply.valid_for)
            elif reply is not None and not _unavailable(reply):
                self._stop_current(cur, reply.stop or "lease_lost")
        if cur.stop.is_set():
            raise Stopped(cur.stop_reason or "stopped")
        if time.monotonic() >= deadline:
            self._fence(cur)
            raise Stopped("lease_presumed_lost")
        return deadline

    async def _ask_human(self, cur: _Current, app: App, kind: str, prompt: str, *, due: float,
                         escalate_after: float | None, screenshot: bool, secret: bool) -> Answer:
        """``ctx.ask_human``: a human task for this attempt (protocol 5), and the person's
        answer once they gave it. Heartbeats go on meanwhile (the lease holds); at the task's
        due time the orchestrator stops the attempt (``human_timeout``), which cancels this
        wait like any other stop."""
        a = cur.assign
        if self._server_protocol < HUMAN_PROTOCOL:
            raise ConfigError(f"the orchestrator speaks protocol {self._server_protocol}; asking a person "
                              f"(ctx.ask_human) needs {HUMAN_PROTOCOL}: upgrade the server")
        shot: str | None = None
        if screenshot and self.config.screenshots != "none":
            try:
                data, redaction = self._redacted(app, await app.desktop.screenshot())
                shot = await self._upload(a.attempt_id, f"human-{kind}", data, "image/png", redaction=redaction)
            except Stopped:
                raise
            except Exception as exc:  # the screen helps the person; the task goes without it
                log.info("could not upload the screen for a human task: %s", _short(exc),
                         extra=self._ctx(a.attempt_id, a.run_id))
        while True:
            reply = await self._request(lambda i: HumanRequest(
                id=i, attempt_id=a.attempt_id, kind=kind, prompt=prompt, due=due, escalate_after=escalate_after,
                secret=secret, screenshot_id=shot))
            if reply.ok or not _unavailable(reply):
                break
            await asyncio.sleep(1.0)  # the orchestrator's database is away: ask again
        if not reply.ok or reply.task is None:
            if reply.stop:
                self._stop_current(cur, reply.stop)
                raise Stopped(reply.stop)
            raise ConfigError(f"the orchestrator refused the human task: {reply.error or 'no reason given'}")
        task = reply.task
        log.info("waiting for a person: human task %s (%s), due in %.0fs", task, kind, reply.due_in or 0.0,
                 extra=self._ctx(a.attempt_id, a.run_id))
        fut = self._answers.get(task)
        if fut is None:
            fut = self._answers[task] = asyncio.get_running_loop().create_future()
        try:
            while True:
                try:
                    answer = await asyncio.wait_for(asyncio.shield(fut), HUMAN_RECHECK)
                    break
                except TimeoutError:
                    pass
                # Not pushed yet: ask how it stands (a hint between replicas may have been lost).
                try:
                    reply = await self._request(lambda i: HumanCheck(id=i, attempt_id=a.attempt_id, task=task))
                except (TimeoutError, _Disconnected):
                    continue
                if not reply.ok and reply.stop:
                    self._stop_current(cur, reply.stop)
                    raise Stopped(reply.stop)
        finally:
            self._answers.pop(task, None)
        if secret and answer.response:
            cur.secrets.append(answer.response)
        # Got it: a secret answer need not be kept by the orchestrator any longer.
        with contextlib.suppress(_Disconnected):
            await self._send(HumanCheck(id=next(self._ids), attempt_id=a.attempt_id, task=task, received=True))
        log.info("human task %s answered by %s", task, answer.by, extra=self._ctx(a.attempt_id, a.run_id))
        return Answer(response=answer.response, by=answer.by, at=answer.at, task=task)

    async def _dispatch(self, msg: Any) -> None:
        if isinstance(msg, HeartbeatAck):
            sent = self._beats_sent.pop(msg.seq, None)
            if sent is not None:
                self._last_ack = max(self._last_ack, sent)
            for old in [s for s in self._beats_sent if s < msg.seq]:
                del self._beats_sent[old]
        elif isinstance(msg, Reply):
            cur = self._current
            if cur is not None and cur.result_id == msg.re and not _unavailable(msg):
                # Free the machine now, in message order: the orchestrator may send the
                # next assignment right behind this reply.
                self._current = None
            fut = self._pending.get(msg.re)
            if fut is not None and not fut.done():
                fut.set_result(msg)
            if self._outbox_after is not None and msg.re >= self._outbox_after:
                self._flush_outbox()  # this connection outlived the pause: the report can go
        elif isinstance(msg, Assign):
            self._accept(msg)
        elif isinstance(msg, Stop):
            cur = self._current
            if cur is not None and cur.assign.attempt_id == msg.attempt_id:
                self._stop_current(cur, msg.reason)
        elif isinstance(msg, Verify):
            if self._current is None and not self._verifying:
                asyncio.get_running_loop().create_task(self._verify(msg.accounts))
        elif isinstance(msg, HumanAnswer):
            answer = self._answers.get(msg.task)
            if answer is None and len(self._answers) < 64:  # before the reply that named the task
                answer = self._answers[msg.task] = asyncio.get_running_loop().create_future()
            if answer is not None and not answer.done():
                answer.set_result(msg)
        elif isinstance(msg, Recycle):
            if self._current is None and not self._verifying and not self._updating:
                asyncio.get_running_loop().create_task(
                    self._update(msg) if msg.action == "update" else self._recycle(msg))
        elif isinstance(msg, Install):
            if self.installer is not None:
                self.installer.order(self, msg)
            else:
                asyncio.get_running_loop().create_task(self.report("pack.install_failed", {
                    "pack": msg.pack, "version": msg.version, "sha256": msg.sha256, "stage": "install",
                    "why": "this agent installs no packs (it was built without an installer)"}))
        elif msg.type == "error":
            log.warning("orchestrator says: %s", msg.message, extra=self._ctx())

    # -- attempts ------------------------------------------------------------------------------
    def _accept(self, assign: Assign) -> None:
        cur = self._current
        if cur is not None:
            if cur.assign.attempt_id == assign.attempt_id:
                return  # re-sent after a reconnect: already on it
            log.error("assigned attempt %d while busy with %d; refusing", assign.attempt_id,
                      cur.assign.attempt_id, extra=self._ctx(assign.attempt_id, assign.run_id))
            return
        automation = self.registry.get(assign.automation, assign.version)
        app = self._app_of.get(id(automation)) if automation is not None else None
        # The grant lives only in ``cur.account``, for the attempt's duration.
        cur = _Current(assign.model_copy(update={"account": None}),
                       account=self._account(assign.account, assign.session_key, app))
        sent = self._beats_sent.get(assign.renewed_by) if assign.renewed_by is not None else None
        if sent is not None:
            # The orchestrator heard that beat before the lease began: the lease runs at
            # least as long from the beat's sending as from an acknowledged one's (idle
            # beats are not acknowledged).
            self._last_ack = max(self._last_ack, sent)
        self._current = cur
        cur.task = asyncio.get_running_loop().create_task(self._execute(cur))

    def _account(self, grant: AccountGrant | None, session_key: str | None, app: App | None) -> Account | None:
        """The account a login uses: the grant that came with the order, else one of the
        agent's own accounts (the run's session_key, or the app model's default)."""
        if grant is None:
            default = app.model.default_account if app is not None and app.model is not None else None
            key = session_key or default
            return self.accounts.get(key) if key is not None else None
        self._account_names[grant.username] = grant.name
        return Account(grant.name, grant.username, grant.password, app=grant.app, has_totp=grant.totp,
                       codes=self._codes_for(grant.name) if grant.totp else None)

    def _codes_for(self, account: str) -> Any:
        async def codes() -> tuple[str, float]:
            """A code computed by the orchestrator: the seed never leaves it."""
            reply = await self._request(lambda i: TotpRequest(id=i, account=account))
            if not reply.ok or reply.code is None:
                raise LookupError(f"no TOTP code for account {account!r}: {reply.error or 'refused'}")
            return reply.code, float(reply.valid_for or 0.0)

        return codes

    def _stop_current(self, cur: _Current, reason: str) -> None:
        if cur.stop.is_set():
            return
        cur.stop_reason = reason
        cur.stop.set()
        if cur.automation_task is not None:
            cur.automation_task.cancel()

    async def _execute(self, cur: _Current) -> None:
        a = cur.assign
        ctx_log = self._ctx(a.attempt_id, a.run_id)
        self._watch_fence(cur)
        result: tuple[str, dict[str, Any] | None, str]
        # The attempt's span continues the run's trace (Assign.traceparent), to its result.
        span = tracing.start_span("deskfleet.attempt", {
            "deskfleet.run": a.run_id, "deskfleet.attempt": a.attempt_id, "deskfleet.machine": self.machine_id,
            "deskfleet.automation": a.automation, "deskfleet.mode": a.mode}, parent=a.traceparent)
        try:
            with tracing.current(span):
                result = await self._attempt(cur)
        except Stopped as exc:
            result = ("stopped", None, cur.stop_reason or exc.reason)
        except asyncio.CancelledError:
            if not cur.stop.is_set():
                _cancel(cur.fence_timer)
                tracing.end(span)
                raise  # the agent itself is going away
            result = ("stopped", None, cur.stop_reason or "stopped")
        except BusinessError as exc:
            result = ("business_error", None, str(exc) or type(exc).__name__)
        except Exception as exc:
            result = ("system_error", None, f"{type(exc).__name__}: {exc}"[:2000])
            await self._evidence(cur, "failure", None, self._app_for(cur))
        finally:
            _cancel(cur.fence_timer)
            # The attempt is over: drop the account's secrets (the result may take a while to
            # be acknowledged; it needs none of them).
            granted, cur.account = cur.account, None
        ending, output, detail = result
        span.set_attribute("deskfleet.ending", ending)
        if ending not in ("succeeded", "reconciled"):
            tracing.failed(span, ending)  # (its detail may quote the app: not in the trace)
        tracing.end(span)
        detail = _scrub(detail, self.registry, a, granted.password if granted is not None else None)
        for secret in cur.secrets:
            detail = _scrub_secret(detail, secret)
        cur.secrets.clear()
        del granted
        if cur.forgotten:
            return  # rebooted: nobody here remembers this attempt to report it
        log.info("attempt finished locally: %s %s", ending, detail[:200], extra=ctx_log)
        await self._report(cur, ending, output, detail)

    async def _attempt(self, cur: _Current) -> tuple[str, dict[str, Any] | None, str]:
        a = cur.assign
        if a.required_state != "any" or a.mode == "reconcile":
            # Pre-flight or reconcile comes first: say the assignment is taken (the progress
            # watchdog counts from here). Otherwise "start" follows at once and says it.
            await self._send_quiet(Preparing(attempt_id=a.attempt_id))
        automation = self.registry.get(a.automation, a.version)
        if automation is None:
            return "preflight_failed", None, f"automation {a.automation}@{a.version} is not installed on this agent"
        app = self._app_of[id(automation)]

        async def record(kind: str, data: dict[str, Any], frame: Frame | None) -> str | None:
            shot = await self._evidence(cur, kind, frame, app)
            if kind == "playbook.before":
                return shot  # the step's own event carries it as before_screenshot
            if shot:
                data = {**data, "screenshot": shot}
            # A playbook's error may quote what it typed: never the granted password.
            data = _scrub_values(data, cur.account)
            await self._send_quiet(AgentEvent(attempt_id=a.attempt_id, kind=kind, data=data))
            return shot

        def ask(kind: str, prompt: str, **kw: Any) -> Awaitable[Answer]:
            """A person, for an MFA prompt no TOTP seed answers (a playbook's ctx.ask_human)."""
            return self._ask_human(cur, app, kind, prompt, **kw)

        async def ensure(state: str) -> PreflightResult:
            assert app.model is not None  # Context refuses before calling without a model
            return await preflight(app.desktop, app.model, state, session_key=a.session_key,
                                   account=cur.account, record=record, stop=cur.stop,
                                   max_steps=self.config.preflight_steps, human=ask)

        async def ensure_mid_run(state: str) -> PreflightResult:
            """``ctx.ensure``: the same loop, its steps marked as taken mid-run."""
            async def marked(kind: str, data: dict[str, Any], frame: Frame | None) -> str | None:
                return await record(kind, {**data, "mid_run": True}, frame)

            assert app.model is not None
            return await preflight(app.desktop, app.model, state, session_key=a.session_key,
                                   account=cur.account, record=marked, stop=cur.stop,
                                   max_steps=self.config.preflight_steps, human=ask)

        ctx = Context(
            run_id=a.run_id, attempt_id=a.attempt_id, attempt_number=a.attempt_number,
            machine_id=self.machine_id, desktop=app.desktop, model=app.model,
            report_progress=lambda step, pct, msg: self._progress(a.attempt_id, step, pct, msg, cur),
            upload=lambda name, data, ctype: self._attach(app, a.attempt_id, name, data, ctype),
            stop_event=cur.stop, ensure=ensure_mid_run if app.model is not None else None,
            renew=lambda: self._renew(cur),
            ask_human=ask,
            required_state=a.required_state, data_dir=app.data_dir,
        )
        if a.required_state != "any":
            if app.model is None:
                return "preflight_failed", None, "this agent has no app model, so it cannot prove the screen state"
            # Session upkeep (a keep-alive on an idle machine) finishes before pre-flight looks.
            async with self._upkeep_lock:
                pass
            await _activate(app)
            # A stop order cancels pre-flight too, even in the middle of a playbook step.
            with tracing.span("deskfleet.preflight", {"deskfleet.state": a.required_state}) as span:
                pre = await self._guarded(cur, ensure(a.required_state))
                span.set_attribute("deskfleet.screen", pre.state)
                if not pre.ok:
                    tracing.failed(span, "preflight_failed")
            if not pre.ok:
                return "preflight_failed", None, pre.detail
        if a.mode == "reconcile":
            await self._send_quiet(AgentEvent(attempt_id=a.attempt_id, kind="reconcile.started", data={}))
            with tracing.span("deskfleet.reconcile", {"deskfleet.automation": a.automation}):
                found = await self._guarded(cur, automation.run_reconcile(ctx, a.input))
            await self._send_quiet(AgentEvent(attempt_id=a.attempt_id, kind="reconcile.done",
                                              data={"effect_found": found is not None}))
            if found is not None:
                return "reconciled", found, "the effect of an earlier attempt was found"
        while True:
            reply = await self._request(lambda i: Start(id=i, attempt_id=a.attempt_id))
            if reply.ok or not _unavailable(reply):
                break
            await asyncio.sleep(1.0)  # the orchestrator's database is away: ask again
            if cur.stop.is_set():
                raise Stopped(cur.stop_reason or "stopped")
        if not reply.ok:
            raise Stopped(reply.stop or reply.error or "start refused")
        with tracing.span("deskfleet.automation", {"deskfleet.automation": a.automation}):
            cur.steps = tracing.Steps() if tracing.enabled() else None
            try:
                output = await self._guarded(cur, automation.execute(ctx, a.input))
            finally:
                if cur.steps is not None:
                    cur.steps.close()
        return "succeeded", output, ""

    async def _guarded(self, cur: _Current, coro: Any) -> Any:
        """Run automation code as a task the stop order can cancel, within the attempt timeout."""
        if cur.stop.is_set():
            coro.close()
            raise Stopped(cur.stop_reason or "stopped")
        task = asyncio.ensure_future(coro)
        cur.automation_task = task
        # A backstop for when the orchestrator's stop order cannot arrive: a little later
        # than the orchestrator's own timeout, so that its order normally comes first.
        deadline = cur.received + cur.assign.attempt_timeout + max(1.0, 2 * self._hb_interval)
        try:
            return await asyncio.wait_for(task, max(0.0, deadline - time.monotonic()))
        except TimeoutError as exc:
            cur.stop_reason = "attempt_timeout"
            raise Stopped("attempt timeout reached (agent-side watchdog)") from exc
        except asyncio.CancelledError:
            if cur.stop.is_set():
                raise Stopped(cur.stop_reason or "stopped") from None
            raise
        finally:
            cur.automation_task = None

    async def _report(self, cur: _Current, ending: str, output: dict[str, Any] | None, detail: str) -> None:
        """Deliver the result until acknowledged (or refused as stale), across reconnects."""
        a = cur.assign

        def result(msg_id: int) -> Result:
            cur.result_id = msg_id
            return Result(id=msg_id, attempt_id=a.attempt_id, ending=ending, output=output,  # type: ignore[arg-type]
                          detail=detail)

        try:
            while not self._stopped.is_set() and not cur.forgotten:
                try:
                    await asyncio.wait_for(self._connected.wait(), REPLY_TIMEOUT)
                    reply = await self._request(result)
                except (TimeoutError, _Disconnected):
                    await asyncio.sleep(0.2)
                    continue
                if _unavailable(reply):
                    await asyncio.sleep(1.0)  # not recorded yet: the database is away
                    continue
                if not reply.ok:
                    log.info("result refused: %s", reply.error, extra=self._ctx(a.attempt_id, a.run_id))
                self.completed += 1
                return
        finally:
            if self._current is cur:
                self._current = None

    async def _progress(self, attempt_id: int, step: str, pct: float | None, message: str | None,
                        cur: _Current | None = None) -> None:
        if cur is not None and cur.steps is not None:
            cur.steps.step(step, {"deskfleet.percent": pct} if pct is not None else None)
        await self._send_quiet(Progress(attempt_id=attempt_id, step=step, percent=pct, message=message))

    async def _send_quiet(self, msg: BaseModel) -> None:
        """Fire-and-forget: a lost progress event is not worth failing an attempt over."""
        with contextlib.suppress(_Disconnected):
            await self._send(msg)

    async def _upload(self, attempt_id: int | None, name: str, data: bytes, ctype: str, *,
                      redaction: dict[str, Any] | None = None) -> str:
        """Send an artifact (its bytes already redacted), with what was redacted and the
        retention its automation declares, if any."""
        assert self._http is not None  # set by run()
        headers = {"authorization": f"Bearer {self._key}", "x-deskfleet-machine": self.machine_id,
                   "content-type": ctype}
        if redaction is not None:
            headers["x-deskfleet-redaction"] = orjson.dumps(redaction).decode()
        retention = self._retention(attempt_id)
        if retention is not None:
            headers["x-deskfleet-retention"] = repr(retention)
        resp = await self._http.post(
            f"{self.server}/agent/v1/artifacts",
            params={"name": name, **({"attempt_id": attempt_id} if attempt_id is not None else {})},
            content=data,
            headers=headers,
        )
        if resp.status_code == 409:
            raise Stopped("lease lost (artifact refused)")
        resp.raise_for_status()
        return str(resp.json()["id"])

    def _retention(self, attempt_id: int | None) -> float | None:
        """How long the orchestrator is to keep this attempt's artifacts: its automation's
        ``artifact_retention`` (None: the pool's, else the server's)."""
        cur = self._current
        if attempt_id is None or cur is None or cur.assign.attempt_id != attempt_id:
            return None
        automation = self.registry.get(cur.assign.automation, cur.assign.version)
        return automation.artifact_retention if automation is not None else None

    def _app_for(self, cur: _Current | None) -> App:
        """The app an attempt works in (the machine's first, for none)."""
        automation = self.registry.get(cur.assign.automation, cur.assign.version) if cur is not None else None
        found = self._app_of.get(id(automation)) if automation is not None else None
        return found or self.apps[0]

    @staticmethod
    def _redacted(app: App, frame: Frame) -> tuple[bytes, dict[str, Any] | None]:
        """A screenshot as it may leave the machine: PNG, the regions ``app``'s model declares
        blacked out; and what was done (None: the model declares no redaction)."""
        done = app.model.redact(frame) if app.model is not None else None
        if done is None:
            return encode_png(frame), None
        return encode_png(done.frame), done.info

    async def _attach(self, app: App, attempt_id: int, name: str, data: bytes, ctype: str) -> str:
        """An automation's upload (``ctx.screenshot``, ``ctx.artifact``). Under a model that
        declares redaction, every image is taken for a screenshot: redacted (as PNG), or —
        an image the model's regions cannot be placed on, one of another size — blanked."""
        redaction = None
        if ctype.startswith("image/") and app.model is not None and app.model.redaction.declared:
            try:
                frame = decode_image(data)
            except ValueError:  # not an image after all: nothing of the screen to show either
                frame = np.zeros((1, 1, 3), np.uint8)
            data, redaction = self._redacted(app, frame)
            ctype = "image/png"
        return await self._upload(attempt_id, name, data, ctype, redaction=redaction)

    async def _evidence(self, cur: _Current | None, name: str, frame: Frame | None, app: App | None = None,
                        ) -> str | None:
        if self.config.screenshots == "none":
            return None
        app = app or self._app_for(cur)
        try:
            if frame is None:
                frame = await app.desktop.screenshot()
            data, redaction = self._redacted(app, frame)
            return await self._upload(cur.assign.attempt_id if cur else None, name, data, "image/png",
                                      redaction=redaction)
        except Exception as exc:  # evidence is best effort; never fail work over it
            log.info("could not upload %s screenshot: %s", name, _short(exc), extra=self._ctx())
            return None

    async def _verify(self, grants: list[AccountGrant] | None = None) -> None:
        """Re-prove the machine's state after a quarantine: every app with a model, ready —
        logging in with the account the order brought for that app, if it needs one. The
        grants are dropped when the verification ends."""
        apps = [app for app in self.apps if app.model is not None]
        if not apps:
            return
        self._verifying = True
        accounts = {app.name: self._account(_pick(grants or [], app.name, len(apps)), None, app) for app in apps}
        secrets = [acc for acc in accounts.values() if acc is not None]
        try:
            looking = apps[0]  # the app being verified: its model redacts the evidence

            async def record(kind: str, data: dict[str, Any], frame: Frame | None) -> str | None:
                if kind != "preflight.ok":
                    for acc in secrets:
                        data = _scrub_values(data, acc)
                    await self._send_quiet(AgentEvent(kind=f"verify.{kind}", data=data))
                    return None
                return await self._evidence(None, "verify", frame, looking)

            pre: PreflightResult | None = None
            async with self._upkeep_lock:
                for app in apps:
                    assert app.model is not None
                    looking = app
                    await _activate(app)
                    pre = await preflight(app.desktop, app.model, "ready", session_key=None,
                                          account=accounts[app.name], record=record,
                                          max_steps=self.config.preflight_steps)
                    if not pre.ok:
                        break
            assert pre is not None
            await self._send_quiet(Verified(ok=pre.ok, state=pre.state, detail=_scrub_all(pre.detail, secrets),
                                            screenshot_id=pre.evidence_id))
        except Exception as exc:
            await self._send_quiet(Verified(ok=False, state="unknown", detail=_scrub_all(_short(exc), secrets)))
        finally:
            self._verifying = False
            accounts.clear()  # the grants are dropped with the verification
            secrets.clear()

    async def _recycle(self, order: Recycle) -> None:
        """Restart the machine's apps between runs (a pool's recycling policy). Under the
        upkeep lock, which an attempt's pre-flight waits for: a run assigned meanwhile starts
        on the fresh app, never on one being restarted; and not at all if one arrived first."""
        async with self._upkeep_lock:
            if self._current is not None or self._verifying:
                return  # the orchestrator asks again once the machine is idle
            t0 = time.monotonic()
            before = sum(i.memory_mb for i in self._infos if i is not None)
            error = ""
            try:
                for app in self.apps:
                    await app.desktop.restart_app()
            except Exception as exc:  # the next pre-flight recovers the app; say what happened
                error = _short(exc)
            with contextlib.suppress(Exception):
                self._infos = [await app.desktop.info() for app in self.apps]
            after = sum(i.memory_mb for i in self._infos if i is not None)
            log.info("apps restarted (%s): %.0f MB before, %.0f MB after", order.reason or order.action, before, after,
                     extra=self._ctx())
        await self._send_quiet(AgentEvent(kind="machine.recycled", data={
            "action": order.action, "reason": order.reason, "ok": not error, "error": error or None,
            "memory_mb_before": round(before, 1), "memory_mb_after": round(after, 1),
            "seconds": round(time.monotonic() - t0, 3)}))

    async def _update(self, order: Recycle) -> None:
        """Run each pack's update hook (the OS update of a rolling maintenance: protocol 7),
        only while no attempt holds the machine, under the upkeep lock (an attempt assigned
        meanwhile waits for it). Said as ``event machine.updated``: ok, the error's text, the
        seconds it took. Not done at all if an attempt arrived first: the orchestrator asks again.
        An order repeated after its update ran (the orchestrator asks again when an answer is
        late; the two crossed) is answered with the same report, not run twice."""
        if self._updating:
            return  # a repeated order while the first runs
        if self._updated is not None and self._updated[0] == order.reason:
            await self.report("machine.updated", {**self._updated[1], "repeated": True})
            return
        self._updating = True
        try:
            async with self._upkeep_lock:
                if self._current is not None or self._verifying:
                    return
                t0 = time.monotonic()
                hooks = [(app, app.update) for app in self.apps if app.update is not None]
                error = "" if hooks else "no pack on this machine has an update hook ([hooks] update in its pack.toml)"
                for app, hook in hooks:
                    ctx = UpdateContext(machine=self.machine_id, pack=app.name or "", data_dir=app.data_dir,
                                        log=logging.getLogger(f"deskfleet.pack.{app.name}.update"),
                                        reason=order.reason)
                    log.info("running pack %s's update hook (%s)", app.name, order.reason, extra=self._ctx())
                    try:
                        if inspect.iscoroutinefunction(hook):
                            await hook(ctx)
                        else:  # a plain def blocks (a Windows Update may take an hour): beats go on meanwhile
                            outcome = await asyncio.to_thread(hook, ctx)
                            if inspect.isawaitable(outcome):
                                await outcome
                    except Exception as exc:
                        error = f"pack {app.name}: {_short(exc)}"
                        log.warning("update failed: %s", error, extra=self._ctx())
                        break
                seconds = round(time.monotonic() - t0, 3)
            said = {"reason": order.reason, "ok": not error, "error": error or None,
                    "packs": [app.name for app, _ in hooks], "seconds": seconds}
            self._updated = (order.reason, said)
            # sent on the next connection if this one is gone (an update may take the network down)
            await self.report("machine.updated", said)
        finally:
            self._updating = False

    # -- pack versions (protocol 6; agent.packs carries out the orders) ---------------------------------
    async def report(self, kind: str, data: dict[str, Any]) -> None:
        """A machine event: sent now, or on the next connection if there is none."""
        msg = AgentEvent(kind=kind, data=data)
        if not self._connected.is_set():
            self._outbox.append(msg)
            return
        try:
            await self._send(msg)
        except _Disconnected:
            self._outbox.append(msg)

    async def fetch(self, url: str) -> bytes:
        """GET ``url`` (relative to the orchestrator) with the agent key: a pack's archive."""
        assert self._http is not None  # set by run()
        resp = await self._http.get(f"{self.server}{url}", timeout=300.0, headers={
            "authorization": f"Bearer {self._key}", "x-deskfleet-machine": self.machine_id})
        if resp.status_code != 200:
            raise ConfigError(f"the orchestrator answered {resp.status_code}: {resp.text[:200]}")
        return resp.content

    async def switch_app(self, name: str, app: App) -> bool:
        """Run ``app`` in place of the app of pack ``name`` — only while no attempt holds the
        machine, under the lock pre-flight and recycling take; False if one does (ask again)."""
        async with self._upkeep_lock:
            if self._current is not None or self._verifying:
                return False
            i = next(i for i, a in enumerate(self.apps) if a.name == name)
            apps = [*self.apps[:i], app, *self.apps[i + 1:]]
            registry = Registry([a for each in apps for a in each.registry])
            # No await from the check above to here: an assignment cannot slip in between.
            self.apps, self.registry = apps, registry
            self._app_of = {id(a): each for each in apps for a in each.registry}
            return True

    def say_hello_again(self) -> None:
        """Reconnect, so that the hello tells the orchestrator what the machine runs now."""
        if self._ws is not None:
            asyncio.get_running_loop().create_task(self._ws.close())

    # -- session upkeep ----------------------------------------------------------------------------
    async def _upkeep(self) -> None:
        """Keep idle sessions alive: an app whose idle logout is near runs its keep-alive
        playbook — only while the machine is idle, never during an attempt, so that a run
        seldom pays for a login (or an MFA prompt) in its pre-flight."""
        if not any(app.keepalive and app.model is not None for app in self.apps):
            return
        # Look again when the next session is due, or when a heartbeat's reading of the
        # sessions changed (a login, a run's activity) — not every second: a thousand idle
        # machines in one agent process, as in benchmarks, would wake it a thousand times a
        # second.
        wait = min(UPKEEP_POLL, self._hb_interval)
        while True:
            # The heartbeats read each app's session (DesktopInfo) anyway: look at their last reading.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._sessions_changed.wait(), wait)
            self._sessions_changed.clear()
            poll = min(UPKEEP_POLL, self._hb_interval)
            wait = UPKEEP_MAX_WAIT
            for i, (app, info) in enumerate(zip(self.apps, self._infos, strict=False)):
                due = info.session_expires_at
                if not app.keepalive or app.model is None or info.session_key is None or due is None:
                    continue
                # A margin longer than half the idle timeout (a short timeout set for a test or
                # a demo) would keep the machine clicking: take at most half.
                margin = min(app.keepalive_margin, app.idle_timeout / 2) if app.idle_timeout else app.keepalive_margin
                if due - margin > time.time():
                    wait = min(wait, due - margin - time.time())
                    continue
                if self._current is not None or self._verifying or not self._connected.is_set():
                    wait = poll  # due, but the machine is busy: look again soon
                    continue
                await self._keep_alive(app, info.session_key)
                with contextlib.suppress(Exception):  # what the keep-alive did to the session
                    self._infos[i] = await app.desktop.info()
                wait = poll  # look at the new reading soon
            wait = max(wait, poll)

    async def _keep_alive(self, app: App, account: str) -> None:
        assert app.model is not None and app.keepalive is not None
        async with self._upkeep_lock:
            if self._current is not None:
                return  # an assignment arrived meanwhile: its pre-flight deals with the session
            t0 = time.monotonic()
            await _activate(app)
            _, seen = await app.model.look(app.desktop)
            error = ""
            if not app.model.is_ready(seen.state):
                error = f"the screen shows {seen.state!r}, not a ready state: left for the next pre-flight"
            else:
                # A keep-alive logs nobody in: it needs no account's secrets.
                ctx = PlaybookContext(app.desktop, app.model, None, account, seen)
                try:
                    await asyncio.wait_for(app.model.playbooks[app.keepalive](ctx), UPKEEP_TIMEOUT)
                except Exception as exc:  # upkeep is a courtesy: the next pre-flight recovers
                    error = _short(exc)
            await self._send_quiet(AgentEvent(kind="session.keepalive", data={
                "app": app.name, "account": account, "playbook": app.keepalive, "state": seen.state,
                "ok": not error, "error": error or None, "seconds": round(time.monotonic() - t0, 3)}))


async def _activate(app: App) -> None:
    """Bring the app to the front of a screen it shares with other apps (real desktops)."""
    activate = getattr(app.desktop, "activate", None)
    if activate is not None:
        await activate()


def _cancel(timer: asyncio.TimerHandle | None) -> None:
    if timer is not None:
        timer.cancel()


def _unavailable(reply: Reply) -> bool:
    return not reply.ok and (reply.error or "").startswith("unavailable")


def _scrub(text: str, registry: Registry, a: Assign, password: str | None = None) -> str:
    """Keep secret input values and the granted password out of error text (a library, or
    a playbook, may quote what it typed)."""
    if not text:
        return text
    text = _scrub_secret(text, password)
    automation = registry.get(a.automation, a.version)
    if automation is None:
        return text
    for name in automation.spec.secret_fields:
        value = a.input.get(name)
        if isinstance(value, str) and len(value) >= 3:
            text = text.replace(value, REDACTED)
    return text


def _scrub_secret(text: str, secret: Account | str | None) -> str:
    value = secret.password if isinstance(secret, Account) else secret
    if value and len(value) >= 3:
        return text.replace(value, REDACTED)
    return text


def _scrub_all(text: str, accounts: list[Account]) -> str:
    for account in accounts:
        text = _scrub_secret(text, account)
    return text


def _scrub_values(data: dict[str, Any], account: Account | None) -> dict[str, Any]:
    if account is None:
        return data
    return {k: _scrub_secret(v, account) if isinstance(v, str) else v for k, v in data.items()}


def _pick(grants: list[AccountGrant], app: str | None, apps: int) -> AccountGrant | None:
    """The grant for ``app`` (its pack's); with one app on the machine, the only one."""
    for g in grants:
        if g.app == app:
            return g
    return grants[0] if grants and apps == 1 else None


def _spec_dict(spec: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(spec)


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]
