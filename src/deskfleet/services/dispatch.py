"""Dispatch: the scheduling loop, and what goes to agents because of it.

Every change that may free a machine or queue a run wakes the loop (:meth:`Dispatch.wake`),
so dispatch waits for no polling interval; a pass matches queued runs to free machines in
the store (``Store.schedule``, with the scheduler's policy) and each claimed pair goes to its
agent as an assignment, its secret input decrypted and its account granted. Stop orders go
the same way, or, for an agent connected to another replica, as a hint to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel

from .. import tracing
from ..errors import StoreUnavailable
from ..fleet.hub import Connection
from ..models import Assignment, Ending, Run, StopOrder, VaultAccount
from ..protocol import Assign, Recycle, Stop
from .replicas import Hints

if TYPE_CHECKING:
    from ..config import ServerSettings
    from ..crypto import SecretBox
    from ..metrics import Metrics
    from ..protocol import AccountGrant
    from ..scheduler import Policy
    from ..store import Finished, Store
    from ..store.runner import StoreRunner

log = logging.getLogger(__name__)

PASS_LIMIT = 500  # assignments claimed in one scheduling pass at most
#: the protocol an agent must speak to be asked to run its packs' update hooks (``Recycle``)
UPDATE_PROTOCOL = 7


class AgentLink(Protocol):
    """The agents connected to this replica (``fleet.hub.Hub``)."""

    @property
    def connections(self) -> Mapping[str, Connection]: ...

    async def send(self, machine_id: str, msg: BaseModel) -> bool: ...

    async def send_assignment(self, machine_id: str, msg: BaseModel) -> bool: ...

    def heard_before(self, machine_id: str, at: float) -> int | None: ...

    async def request_verify(self, conn: Connection, reason: str) -> None: ...


class Grants(Protocol):
    """The vault's part: the account an assignment logs in with (``vault.Vault``)."""

    def grant(self, acct: VaultAccount) -> AccountGrant: ...


class Finals(Protocol):
    """Who hears that a run changed (``services.finals.Finals``)."""

    def run_changed(self, run: Run) -> None: ...


class Dispatch:
    def __init__(self, store: Store, db: StoreRunner, settings: ServerSettings, *, policy: Policy,
                 agents: AgentLink, grants: Grants, secrets: SecretBox, metrics: Metrics, finals: Finals,
                 replicas: Hints, replica_id: str) -> None:
        self.store = store
        self.db = db
        self.settings = settings
        self.policy = policy
        self.agents = agents
        self.grants = grants
        self.secrets = secrets
        self.metrics = metrics
        self.finals = finals
        self.replicas = replicas
        self.replica_id = replica_id
        self._wake = asyncio.Event()
        self._stopping = False
        self._woke_others_at = 0.0
        self._orders: set[asyncio.Task[object]] = set()  # stop and verify orders hinted by other replicas

    def start(self) -> asyncio.Task[None]:
        return asyncio.create_task(self._schedule_loop(), name="deskfleet-scheduler")

    def stop(self) -> None:
        """End the loop after its pass (the root cancels the task besides)."""
        self._stopping = True
        self._wake.set()

    def wake(self, *, others: bool = False) -> None:
        """Run the scheduler now (and, with ``others``, on the other replicas too)."""
        self._wake.set()
        if others:
            self.replicas.hint("wake")

    def woken(self, payload: str = "") -> None:
        """Another replica said "wake"."""
        del payload
        self._wake.set()

    # -- scheduling --------------------------------------------------------------------------
    async def _schedule_loop(self) -> None:
        limit = PASS_LIMIT
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.settings.schedule_tick)
            self._wake.clear()
            try:
                t0 = time.perf_counter()
                assignments = await self.db(
                    self.store.schedule, self.policy, time.time(), self.settings.lease_timeout, limit,
                    self.replica_id,
                )
                self.metrics.schedule_seconds.observe(time.perf_counter() - t0)
            except StoreUnavailable as exc:
                log.warning("scheduling paused: %s", exc)
                await asyncio.sleep(max(1.0, self.settings.schedule_tick))
                continue
            except Exception:
                log.exception("scheduling pass failed; retrying")
                await asyncio.sleep(self.settings.schedule_tick)
                continue
            # With tracing on, each attempt's spans continue its run's trace (one read a pass).
            traces = (await self.db(self.store.run_traceparents, [a.run.id for a in assignments])
                      if assignments and tracing.enabled() else {})
            for a in assignments:
                await self.send_assignment(a, traces.get(a.run.id))
            if len(assignments) >= limit:
                self._wake.set()
            now = time.monotonic()
            if getattr(assignments, "unclaimed", 0) and now - self._woke_others_at >= self.settings.schedule_tick:
                # Runs this replica held but could not place: another replica's machines may
                # fit them, and it skipped them while we held them. (At most one such hint
                # per tick: two replicas with unplaceable runs must not ping-pong.)
                self._woke_others_at = now
                self.replicas.hint("wake")

    # -- to agents ---------------------------------------------------------------------------
    async def send_assignment(self, a: Assignment, trace: str | None = None) -> None:
        """Send an assignment to its agent; ``trace``: the run's (tracing on; read if not given)."""
        if not tracing.enabled():
            await self._send_assignment(a, None)
            return
        if trace is None:
            trace = (await self.db(self.store.run_traceparents, [a.run.id])).get(a.run.id)
        where = {"deskfleet.run": a.run.id, "deskfleet.pool": a.run.pool, "deskfleet.automation": a.run.automation}
        # The wait in the queue, as a span of its own; then the assignment, the agent's parent.
        tracing.end(tracing.start_span("deskfleet.queued", where, parent=trace, start=a.run.queued_at),
                    a.attempt.assigned_at)
        with tracing.span("deskfleet.assign", {**where, "deskfleet.attempt": a.attempt.id,
                                               "deskfleet.machine": a.attempt.machine_id,
                                               "deskfleet.replica": self.replica_id},
                          parent=trace, start=a.attempt.assigned_at):
            await self._send_assignment(a, tracing.traceparent())

    async def _send_assignment(self, a: Assignment, trace: str | None) -> None:
        spec = a.spec
        data = self.secrets.decrypt_fields(a.run.input, spec.secret_fields if spec else ())
        msg = Assign(
            attempt_id=a.attempt.id,
            run_id=a.run.id,
            attempt_number=a.attempt.number,
            automation=a.run.automation,
            version=a.run.version,
            mode=a.attempt.mode.value,
            input=data,
            required_state=spec.required_state if spec else "ready",
            session_key=a.run.session_key,
            attempt_timeout=a.run.attempt_timeout,
            progress_timeout=a.run.progress_timeout,
            account=self.grants.grant(a.account) if a.account is not None else None,
            # the lease began at its last renewal: a beat heard by then renews it for the agent
            renewed_by=self.agents.heard_before(a.attempt.machine_id,
                                                a.attempt.lease_expires_at - self.settings.lease_timeout),
            traceparent=trace,
        )
        log.info("assigned attempt %d (%s)", a.attempt.id, a.run.automation,
                 extra={"run": a.run.id, "attempt": a.attempt.id, "machine": a.attempt.machine_id})
        await self.agents.send_assignment(a.attempt.machine_id, msg)

    async def send_stop(self, order: StopOrder) -> None:
        log.info("telling the agent to stop: %s", order.reason.value,
                 extra={"run": order.run_id, "attempt": order.attempt_id, "machine": order.machine_id})
        if not await self.agents.send(order.machine_id, Stop(attempt_id=order.attempt_id, reason=order.reason.value)):
            # Its agent is connected to another replica (or to none: then the order waits
            # in the database for it to reconnect).
            self.replicas.hint("stop", f"{order.machine_id}:{order.attempt_id}:{order.reason.value}")

    def stop_hinted(self, payload: str) -> None:
        """Another replica's stop order for an agent connected here: ``machine:attempt:reason``."""
        machine_id, _, rest = payload.partition(":")
        conn = self.agents.connections.get(machine_id)
        if conn is None:
            return
        attempt, _, reason = rest.partition(":")
        self._order(conn.send(Stop(attempt_id=int(attempt), reason=reason)))

    def verify_hinted(self, payload: str) -> None:
        """Another replica's leader asks a quarantined machine connected here to re-prove
        its state: ``machine:reason``."""
        machine_id, _, reason = payload.partition(":")
        conn = self.agents.connections.get(machine_id)
        if conn is None:
            return
        self._order(self.agents.request_verify(conn, reason))

    def recycle(self, machine_id: str, action: str, reason: str) -> None:
        """Ask a machine's agent to refresh it between runs (``Recycle``), wherever it is
        connected: here, or through a hint to the replica that holds its connection."""
        if machine_id in self.agents.connections:
            self.recycle_hinted(f"{machine_id}:{action}:{reason}")
        else:
            self.replicas.hint("recycle", f"{machine_id}:{action}:{reason}")

    def recycle_hinted(self, payload: str) -> None:
        """``machine:action:reason``; an agent older than protocol 4 is not asked. Nor is one
        older than 7 asked to ``update``: its failure is recorded for it at once (``event
        machine.updated``), so that its maintenance fails with why rather than wait out its timeout."""
        machine_id, _, rest = payload.partition(":")
        action, _, reason = rest.partition(":")
        conn = self.agents.connections.get(machine_id)
        if conn is None or action not in ("restart_app", "update"):
            return
        if action == "update" and conn.protocol < UPDATE_PROTOCOL:
            why = (f"its agent speaks protocol {conn.protocol}; running its pack's update hook needs "
                   f"{UPDATE_PROTOCOL} (update the agent, or use update 'provider' or 'reboot')")
            self._order(self.db(self.store.record_event, "machine.updated", time.time(), machine_id=machine_id,
                                data={"reason": reason, "ok": False, "error": why, "packs": [], "seconds": 0}))
        elif action == "update":
            self._order(conn.send(Recycle(action="update", reason=reason)))
        elif conn.protocol >= 4:
            self._order(conn.send(Recycle(action="restart_app", reason=reason)))

    def _order(self, coro: Coroutine[Any, Any, object]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._orders.add(task)
        task.add_done_callback(self._orders.discard)

    # -- outcomes ------------------------------------------------------------------------------
    def after_finished(self, items: Iterable[Finished]) -> None:
        retried = False
        book = self.policy.durations
        for f in items:
            a = f.attempt
            if book is not None and a.ending is Ending.SUCCEEDED and a.ended_at is not None:
                # how long the machine was held: from its assignment (pre-flight included)
                book.observe(f.run.automation, a.ended_at - a.assigned_at)
            if f.retried:
                retried = True
            self.finals.run_changed(f.run)
        # A machine is free here; a requeued run may fit a machine of another replica.
        self.wake(others=retried)
