"""People in the loop: human tasks, for what an automation cannot do itself — approve a
push notification, read out an SMS code, solve a captcha.

An automation asks (``ctx.ask_human``); its agent sends ``human`` (protocol 5) and the
hub hands it here: the task is created in the store, fenced by the attempt, and the agent
is told its id. People list, claim and complete tasks through the API or the CLI (and hear
of them by webhook); the answer goes to the agent of the attempt — from this replica if
the agent is connected here, else by a hint to the replica that holds its connection. The
agent re-reads the task now and then (``human_check``), so a lost hint only delays.

On the leader, a loop escalates tasks past their ``escalate_after``, expires those past
their due time — their attempts are told to stop with ``human_timeout``, retried per their
run's policy — and cancels those whose attempt ended otherwise (a cancel, a lost lease).

Secrets: a secret task's answer (an SMS code) is encrypted before it reaches the store,
decrypted only into the ``human_answer`` to its own agent, wiped from the store once that
agent has it (or the attempt is over), and never logged, put in an event or shown by the
API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel

from ..errors import Conflict, InvalidRequest, NotFound, StaleLease, StoreUnavailable
from ..fleet.hub import Connection
from ..models import HumanTask, HumanTaskState, StopOrder
from ..protocol import PROTOCOL_VERSION, HumanAnswer, HumanCheck, HumanRequest, Reply
from .replicas import Hints

if TYPE_CHECKING:
    from ..config import ServerSettings
    from ..crypto import SecretBox
    from ..store import Store
    from ..store.runner import StoreRunner

log = logging.getLogger(__name__)

#: the protocol an agent must speak to ask (``Hello.protocol``)
HUMAN_PROTOCOL = 5
#: the common kinds (any name will do; these are the ones the docs and the CLI know)
KINDS = ("push_approval", "sms_code", "captcha", "confirm")


class Agents(Protocol):
    """The agents connected to this replica (``fleet.hub.Hub``)."""

    @property
    def connections(self) -> Mapping[str, Connection]: ...

    async def send(self, machine_id: str, msg: BaseModel) -> bool: ...


class Stops(Protocol):
    """Who tells an attempt to stop, wherever its agent is connected (``services.dispatch``)."""

    async def send_stop(self, order: StopOrder) -> None: ...


class HumanDesk:
    def __init__(self, store: Store, db: StoreRunner, settings: ServerSettings, *, secrets: SecretBox,
                 agents: Agents, stops: Stops, replicas: Hints, leads: Callable[[], bool]) -> None:
        self.store = store
        self.db = db
        self.settings = settings
        self.secrets = secrets
        self.agents = agents
        self.stops = stops
        self.replicas = replicas
        self.leads = leads
        self._sends: set[asyncio.Task[object]] = set()

    @property
    def notify(self) -> dict[str, list[str]]:
        """Which webhook URLs hear which transition: the human webhook all four, the
        escalation webhook escalations."""
        out: dict[str, list[str]] = {}
        if self.settings.human_webhook:
            for kind in ("created", "escalated", "expired", "completed"):
                out[f"human_task.{kind}"] = [self.settings.human_webhook]
        if self.settings.human_escalation_webhook:
            urls = out.setdefault("human_task.escalated", [])
            if self.settings.human_escalation_webhook not in urls:
                urls.append(self.settings.human_escalation_webhook)
        return out

    def start(self) -> asyncio.Task[None]:
        return asyncio.create_task(self._loop(), name="deskfleet-human-tasks")

    # -- from agents (the hub) ---------------------------------------------------------------------
    async def request(self, conn: Connection, msg: HumanRequest) -> None:
        """``human``: create the task, fenced by the attempt; reply with its id."""
        ctx = {"machine": conn.machine_id, "attempt": msg.attempt_id}
        if conn.protocol < HUMAN_PROTOCOL:
            await conn.send(Reply(re=msg.id, ok=False, error=(
                f"human tasks need agent protocol {HUMAN_PROTOCOL}; this agent speaks {conn.protocol}: "
                "upgrade deskfleet on the machine")))
            return
        now = time.time()
        try:
            task = await self.db(self.store.create_human_task, msg.attempt_id, conn.machine_id, kind=msg.kind,
                                 prompt=msg.prompt, due=msg.due, escalate_after=msg.escalate_after,
                                 secret=msg.secret, screenshot_id=msg.screenshot_id, now=now, notify=self.notify)
        except InvalidRequest as exc:
            await conn.send(Reply(re=msg.id, ok=False, error=exc.message))
            return
        except StaleLease as exc:
            await conn.send(Reply(re=msg.id, ok=False, stop="lease_lost", error=f"stale_lease: {exc.reason}"))
            return
        log.info("human task %s (%s) asked, due in %.0fs%s", task.id, task.kind, task.due_at - now,
                 " (clamped to the attempt's time)" if task.due_at < task.requested_due_at else "",
                 extra={**ctx, "run": task.run_id})
        await conn.send(Reply(re=msg.id, ok=True, task=task.id, due_in=max(0.0, task.due_at - now)))

    async def check(self, conn: Connection, msg: HumanCheck) -> None:
        """``human_check``: the answer if there is one (``human_answer`` first), else whether
        the task still waits."""
        try:
            task = await self.db(self.store.check_human_task, msg.task, msg.attempt_id, conn.machine_id,
                                 received=msg.received, now=time.time())
        except NotFound as exc:
            await conn.send(Reply(re=msg.id, ok=False, error=exc.message))
            return
        except StaleLease as exc:
            await conn.send(Reply(re=msg.id, ok=False, stop="lease_lost", error=f"stale_lease: {exc.reason}"))
            return
        if msg.received:
            await conn.send(Reply(re=msg.id, ok=True))
        elif task.state is HumanTaskState.COMPLETED:
            await conn.send(self._answer(task))
            await conn.send(Reply(re=msg.id, ok=True))
        elif task.state.waiting:
            await conn.send(Reply(re=msg.id, ok=True))
        else:
            stop = "human_timeout" if task.state is HumanTaskState.EXPIRED else "cancelled"
            await conn.send(Reply(re=msg.id, ok=False, stop=stop, error=task.reason))

    def _answer(self, task: HumanTask) -> HumanAnswer:
        """The task's answer for its agent — a secret one decrypted for this message only."""
        response = self.secrets.decrypt(task.secret_response) if task.secret_response is not None else task.response
        return HumanAnswer(task=task.id, response=response, by=task.completed_by or "",
                           at=task.ended_at or time.time())

    # -- from people (the API) ----------------------------------------------------------------------
    async def find(self, *, states: tuple[HumanTaskState, ...] = (), pool: str | None = None,
                   run_id: str | None = None, limit: int = 100, tenant: str | None = None) -> list[HumanTask]:
        return await self.db(self.store.list_human_tasks, states=states, pool=pool, run_id=run_id, limit=limit,
                             tenant=tenant)

    async def get(self, task_id: str) -> HumanTask:
        task = await self.db(self.store.get_human_task, task_id)
        if task is None:
            raise NotFound(f"no human task {task_id!r}")
        return task

    async def screenshot(self, task_id: str) -> tuple[str, bytes]:
        """The screen the agent saw when it asked: (content type, bytes)."""
        task = await self.get(task_id)
        found = await self.db(self.store.get_artifact, task.screenshot_id) if task.screenshot_id else None
        if found is None:
            raise NotFound(f"human task {task_id} has no screenshot (the agent sent none, or it was past "
                           "its retention)")
        meta, data = found
        return meta.content_type, self.secrets.unseal(data) if meta.encrypted else data

    async def claim(self, task_id: str, by: str) -> HumanTask:
        return await self.db(self.store.claim_human_task, task_id, by, time.time())

    async def release(self, task_id: str, by: str) -> HumanTask:
        return await self.db(self.store.release_human_task, task_id, by, time.time())

    async def complete(self, task_id: str, by: str, response: str | None) -> HumanTask:
        task = await self.get(task_id)
        secret = self.secrets.encrypt(response) if task.secret and response is not None else None
        done = await self.db(self.store.complete_human_task, task_id, by, response=None if task.secret else response,
                             secret_response=secret, now=time.time(), notify=self.notify)
        if done.state is not HumanTaskState.COMPLETED:
            raise Conflict(f"human task {task_id} is no longer open: {done.state.value}"
                           + (f" ({done.reason})" if done.reason else ""))
        log.info("human task %s completed by %s", task_id, by,
                 extra={"run": done.run_id, "attempt": done.attempt_id, "machine": done.machine_id})
        self.deliver(done)
        return done

    def deliver(self, task: HumanTask) -> None:
        """Send a completed task's answer to its agent: here, or through a hint to the replica
        that holds its connection (which reads it from the store)."""
        if task.machine_id in self.agents.connections:
            self._send(task.machine_id, self._answer(task))
        else:
            self.replicas.hint("human", task.id)

    def answer_hinted(self, task_id: str) -> None:
        """Another replica's person answered a task whose agent may be connected here."""
        async def look() -> None:
            with contextlib.suppress(StoreUnavailable):  # the agent's human_check asks again
                task = await self.db(self.store.get_human_task, task_id)
                if task is not None and task.state is HumanTaskState.COMPLETED \
                        and task.machine_id in self.agents.connections:
                    await self.agents.send(task.machine_id, self._answer(task))

        self._spawn(look())

    def _send(self, machine_id: str, msg: BaseModel) -> None:
        self._spawn(self.agents.send(machine_id, msg))

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    # -- the leader's loop -------------------------------------------------------------------------
    async def _loop(self) -> None:
        interval = min(1.0, max(0.1, 4 * self.settings.sweep_interval))
        while True:
            await asyncio.sleep(interval)
            if not self.leads():
                continue
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except StoreUnavailable:
                continue  # the fleet manager reports the outage
            except Exception:
                log.exception("human-task sweep failed; retrying")

    async def sweep(self) -> None:
        swept = await self.db(self.store.sweep_human_tasks, time.time(), self.notify)
        for t in swept.escalated:
            log.warning("human task %s (%s) escalated: nobody has answered it yet", t.id, t.kind,
                        extra={"run": t.run_id, "attempt": t.attempt_id, "machine": t.machine_id})
        for t in swept.expired:
            log.warning("human task %s (%s) expired: nobody answered it in time", t.id, t.kind,
                        extra={"run": t.run_id, "attempt": t.attempt_id, "machine": t.machine_id})
        for t in swept.cancelled:
            log.info("human task %s cancelled: %s", t.id, t.reason,
                     extra={"run": t.run_id, "attempt": t.attempt_id, "machine": t.machine_id})
        for order in swept.stop_orders:
            await self.stops.send_stop(order)


__all__ = ["HUMAN_PROTOCOL", "KINDS", "HumanDesk"]

assert HUMAN_PROTOCOL <= PROTOCOL_VERSION
