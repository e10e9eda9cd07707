"""The pool controller: machines created for a peak and retired after it, by each pool's policy.

One pass per tick per managed pool (a policy naming a provider), on the leader only. Each
pass reads the pool's demand and policy, its machines as deskfleet sees them (enrolled,
busy, idle) and as its provider sees them (provisioning, booting, running), decides, and
acts through the provider. A decision that changes something is an event with its inputs:
``pool.scaled`` "queued 37, busy 12, booting 4, warm 3, floor 2 → target 58, supply 16 →
create 5".

- **Supply** is every machine that serves or will: idle, busy, and those the provider is
  still bringing up (provisioning, booting, or running but not yet enrolled and ready). A
  machine on its way counts, so a slow boot is never answered with a second machine.
- **Scale out** creates ``target - supply`` machines, never more than ``max`` in all. Each
  create carries a token of its own (the machine's name): a retry of it (``Retrying``), or
  a new leader that finds it in the provider's list, never makes a second one.
- **Scale in** waits until the target stayed below the supply for the policy's
  stabilisation window (no flapping at a burst's edge); then the idle machines go — those
  due for a recycle first (retiring them is their refresh), then the oldest: drained (no
  new work), and destroyed once they hold no lease. A machine holding
  a lease is never destroyed; one still busy after the drain timeout is put back in
  service instead, and the pass says so.
- **Lifecycle**: each machine walks provisioning → booting → enrolling → ready, each step
  an event (``machine.lifecycle``) with the seconds the previous one took. A machine that
  fails, or does not become ready within a boot timeout, is destroyed and replaced, and
  counted (``pool.machine_failed``).
- **Rolling maintenance**: a campaign (``Store.start_maintenance``) takes the pool's
  machines through their OS updates a few at a time — cordon and drain (a run ends
  first), update (through the provider, or — ``update: pack`` — by the machine's agent
  running its pack's update hook, asked as a recycle order is), reboot, re-verify (back
  with a new boot id, then quarantined until its pre-flight passes), back in service —
  within the policy's windows, never more than ``max_unavailable`` out of service (for any
  reason), and never so many that those left serving are fewer than the work in hand. A
  machine that fails or outlasts the timeout stays out of service; when failures hold
  every slot the campaign stalls rather than take more machines down. Each step is an event.
- **Provider faults** (refused creates, timeouts) are counted per pool and operation and
  recorded (``pool.provider_error``); the next pass tries again — with backoff when the
  provider is wrapped in :class:`~deskfleet.providers.Retrying`. A machine deleted behind
  the pool's back (gone from the provider's list and ``get``, or terminated without its
  order) is said and counted once (``pool.machine_vanished``), cordoned and no longer
  counted; its replacement follows from supply, and a run it held moves at its lease's end.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import statistics
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import NotFound
from ..models import Machine, MachineAdmin, MachineHealth
from ..pools import DEFAULT_READY_TIME, Maintenance, PoolPolicy, Recycle
from ..providers import (
    MachineNotFound,
    MachineProvider,
    MachineSpec,
    ProviderError,
    ProviderMachine,
    ProviderState,
)
from ..store.maintenance import AWAY, Campaign, MachineStep
from . import rolling

if TYPE_CHECKING:
    from ..store import Finished, Store
    from ..store.pools import PoolDemand
    from ..store.runner import StoreRunner

log = logging.getLogger(__name__)

#: a machine not ready this many times its pool's ready time after it was created has failed to boot
BOOT_TIMEOUT_FACTOR = 3.0
#: the provider states of a machine on its way up
COMING = frozenset({ProviderState.PROVISIONING, ProviderState.BOOTING, ProviderState.RUNNING,
                    ProviderState.REBOOTING})
GONE = frozenset({ProviderState.TERMINATING, ProviderState.TERMINATED})
#: seconds a machine just made may be missing from its provider's list and get before it
#: counts as vanished (a cloud's listing can lag its create)
LIST_LAG = 60.0
#: seconds after which a recycle order nobody answered may be given again
RECYCLE_RESEND = 60.0


@dataclass(frozen=True, slots=True)
class Decision:
    """One pass's decision for one pool, and what it was made from."""

    pool: str
    target: int
    supply: int
    create: int
    retire: tuple[str, ...]
    inputs: dict[str, int]
    #: machines being retired but still idle and up, put back in service instead of new ones
    restore: tuple[str, ...] = ()

    @property
    def acts(self) -> bool:
        return bool(self.create or self.retire or self.restore)

    def summary(self) -> str:
        said = ", ".join(f"{k} {v}" for k, v in self.inputs.items())
        what = []
        if self.restore:
            what.append(f"back in service {len(self.restore)} ({', '.join(self.restore)})")
        if self.create:
            what.append(f"create {self.create}")
        if self.retire:
            what.append(f"retire {len(self.retire)} ({', '.join(self.retire)})")
        return f"{said} → target {self.target}, supply {self.supply} → {'; '.join(what) or 'hold'}"


def decide(pool: str, policy: PoolPolicy, demand: PoolDemand, *, coming: int, retiring: int, idle: int,
           retirable: list[str], total: int, now: float, recent: deque[tuple[float, int]], since: float,
           ready_time: float, restorable: list[str] | None = None) -> Decision:
    """The decision for one pass (pure but for ``recent``): how many machines to create,
    which idle ones to retire. ``idle``: the pool's idle, schedulable machines;
    ``retirable``: those of them the provider made, the first to retire first; ``total``:
    every machine the pool has (``max`` bounds it); ``retiring``: machines already being
    retired (not supply); ``recent``: the targets of the passes of the last stabilisation
    window, this one added here; ``since``: when this controller's history of the pool began;
    ``restorable``: machines being retired that are still idle and up — when more are wanted,
    they go back in service before any machine is created (a new one would take its boot
    time, and the drained one would be destroyed for nothing).

    Scale-in goes down to the *highest* target of the window, as Kubernetes' autoscaler
    does: a burst's tail, or a second burst close behind the first, keeps the machines it
    will need, and machines go only once a whole window asked for fewer."""
    target = policy.target(queued=demand.queued, busy=demand.busy, arrival_rate=demand.arrival_rate, now=now,
                           ready_time=ready_time)
    recent.append((now, target))
    while recent and recent[0][0] < now - policy.scale_in.stabilization:
        recent.popleft()
    supply = demand.busy + idle + coming
    inputs = {"queued": demand.queued, "busy": demand.busy, "idle": idle, "booting": coming,
              "retiring": retiring, "warm": policy.warm_target(demand.arrival_rate, policy.ready_time or ready_time),
              "floor": max(policy.floor_at(now), policy.floor_at(now + (policy.ready_time or ready_time)))}
    create = 0
    retire: tuple[str, ...] = ()
    restore: tuple[str, ...] = ()
    if target > supply:
        restore = tuple((restorable or [])[: target - supply])
        room = (policy.max if policy.max is not None else target) - total
        create = max(0, min(target - supply - len(restore), room))
    else:
        held = max(t for _, t in recent)
        # Only once a whole window has been seen: a new leader has no history yet.
        if supply > held and now - since >= policy.scale_in.stabilization:
            retire = tuple(retirable[: supply - held])
    return Decision(pool, target, supply, create, retire, inputs, restore)


@dataclass
class _Tracked:
    """A machine this controller created or found at the provider, on its way to ready."""

    name: str
    step: str  # provisioning | booting | enrolling | ready
    since: float
    created_at: float


@dataclass
class _Health:
    """What the leader follows of one machine for recycling."""

    boot_id: str = ""
    base_runs: int = 0  # runs completed when its app last (re)started, as far as this leader knows
    samples: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=1000))  # (runs, app MB)
    pending: tuple[str, int, float] | None = None  # an order not yet done: (action, events after id, sent at)
    fresh_after: float = 0.0  # the app restarted then: heartbeats before it say nothing about the new one


@dataclass
class _PoolState:
    #: (time, target) of the passes of the last stabilisation window, and this leader's first pass
    targets: deque[tuple[float, int]] = field(default_factory=deque)
    since: float | None = None
    ready_times: deque[float] = field(default_factory=lambda: deque(maxlen=20))  # created → ready, seconds
    retiring: dict[str, float] = field(default_factory=dict)  # machine → when its drain began
    tracked: dict[str, _Tracked] = field(default_factory=dict)
    last_target: int | None = None
    errors: Counter[str] = field(default_factory=Counter)  # provider operation → failures
    missing_provider_said: bool = False
    health: dict[str, _Health] = field(default_factory=dict)  # machine → what recycling follows
    rebooting: set[str] = field(default_factory=set)  # rebooted for recycling: back in service on return
    maintenance_said: str = ""  # why the pool's maintenance last waited, said once
    #: the machines last seen up (or on their way) at ``provider``, by name: one it no longer has
    #: — and that this controller did not destroy — vanished
    known: dict[str, ProviderMachine] = field(default_factory=dict)
    provider: str = ""
    vanished: set[str] = field(default_factory=set)  # written off, their agents maybe still connected
    #: made by this controller and not listed yet, by name: when made (a cloud's list may lag its
    #: create — EC2's is eventually consistent — so absence is not vanishing for a while)
    unlisted: dict[str, float] = field(default_factory=dict)

    def rebuilding(self, machine_id: str) -> bool:
        """Retired for a rebuild (its age): destroyed once idle, never put back in service."""
        h = self.health.get(machine_id)
        return h is not None and h.pending is not None and h.pending[0] == "rebuild"


class Controller:
    """Runs :func:`decide` for every managed pool and carries it out through the providers."""

    def __init__(self, store: Store, db: StoreRunner, providers: Mapping[str, MachineProvider], *,
                 leads: Callable[[], bool], tick: float = 5.0, clock: Callable[[], float] = time.time,
                 ready_time: float = DEFAULT_READY_TIME, wake: Callable[[], None] = lambda: None,
                 recycle: Callable[[str, str, str], None] = lambda machine, action, reason: None) -> None:
        self.wake = wake  # a run released from its fence hold may start: schedule now
        self.recycle = recycle  # (machine, action, reason): the order to its agent, wherever it is connected
        self._fencing: set[asyncio.Task[bool]] = set()  # fences under way (kept from the GC)
        self.store = store
        self.db = db
        self.providers = dict(providers)
        self.leads = leads
        self.interval = tick
        self.clock = clock
        self.ready_time = ready_time
        self.pools: dict[str, _PoolState] = {}
        self._names = itertools.count(1)
        self._said: list[tuple[str, str, str, dict[str, Any]]] = []  # maintenance steps to record
        self._task: asyncio.Task[None] | None = None

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.get_running_loop().create_task(self._loop())
        return self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if not self.leads():
                self.pools.clear()  # a new leader rebuilds what it needs from the provider and the store
                continue
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # a pass that failed is tried again next tick
                log.exception("pool controller pass failed")

    async def tick(self) -> list[Decision]:
        decisions = []
        campaigns = {c.pool: c for c in await self.db(self.store.maintenance_campaigns, active=True, limit=10_000)}
        for pool in await self.db(self.store.list_pools):
            stored = await self.db(self.store.pool_policy, pool.name)
            if pool.name in campaigns:
                # before the pool's own pass: machines it takes out are not idle supply to retire
                await self._maintenance_pass(campaigns[pool.name],
                                             PoolPolicy.model_validate(stored.policy) if stored else PoolPolicy())
            if stored is None:
                continue
            policy = PoolPolicy.model_validate(stored.policy)
            if policy.managed:
                decision = await self._pass(pool.name, policy)
                if decision is not None:
                    decisions.append(decision)
            if policy.recycle.any or policy.managed:  # a managed pool's machines are rebooted for updates
                await self._recycle_pass(pool.name, policy)
        return decisions

    # -- recycling ---------------------------------------------------------------------------------
    async def _recycle_pass(self, pool: str, policy: PoolPolicy) -> None:
        """Each idle machine of the pool whose app or age is due for a refresh, refreshed —
        only between runs. An app restart is asked of an idle machine's agent, which does it
        only if no attempt arrived meanwhile. A reboot drains the machine first, reboots it
        through its provider once it holds no lease, and puts it back in service when it
        returns with a new boot id. A rebuild retires it (the pool's supply brings a new one)."""
        state = self.pools.setdefault(pool, _PoolState())
        r, now = policy.recycle, self.clock()
        # Up or busy (what can be recycled), and those away for a recycling reboot.
        listed = await self.db(self.store.list_machines, pool, live_or=tuple(sorted(state.rebooting)))
        for gone in set(state.health) - {m.id for m in listed}:
            del state.health[gone]
        for m in listed:
            h = state.health.setdefault(m.id, _Health(m.boot_id, m.runs_completed))
            if m.boot_id != h.boot_id:  # rebooted: a fresh app, counted from here
                state.health[m.id] = h = _Health(m.boot_id, m.runs_completed)
                if m.id in state.rebooting:
                    state.rebooting.discard(m.id)
                    await self.db(self.store.set_admin, m.id, MachineAdmin.ACTIVE, now, "recycle: back after its reboot")
                    await self._event("machine.recycled", now, pool=pool, machine_id=m.id, reason="rebooted",
                                      data={"action": "reboot", "ok": True})
            if h.pending is None and (m.last_heartbeat_at or 0.0) <= h.fresh_after:
                continue  # its figures are from before the app's restart: wait for a newer beat
            memory = float(m.resources.get("memory_mb") or 0.0)
            if h.pending is None:
                if h.samples and h.samples[-1][0] == m.runs_completed:
                    h.samples[-1] = (m.runs_completed, memory)  # a newer reading after the same run
                else:
                    h.samples.append((m.runs_completed, memory))
            if h.pending is not None:
                await self._follow_recycle(state, pool, policy, h, m, now)
                continue
            if m.status != "ready" or m.id in state.retiring:
                continue  # busy, or out of service: never mid-run
            due = _due(r, h, m)
            if due is None:
                continue
            action, reason, figure, limit = due
            if action == "restart_app":
                h.pending = (action, await self.db(self.store.last_event_id), now)
                self.recycle(m.id, action, reason)
            elif not policy.managed:
                continue  # a reboot or a rebuild goes through the pool's provider
            else:
                await self.db(self.store.set_admin, m.id, MachineAdmin.DRAINING, now, f"recycle: {reason}")
                if action == "rebuild":
                    state.retiring[m.id] = now  # destroyed once idle; the pool's supply brings a new one
                h.pending = (action, 0, now)
            await self._event("machine.recycle", now, pool=pool, machine_id=m.id, reason=reason,
                              data={"action": action, "figure": figure, "threshold": limit})
            log.info("machine %s: %s (%s)", m.id, action, reason)

    async def _follow_recycle(self, state: _PoolState, pool: str, policy: PoolPolicy, h: _Health, m: Machine,
                              now: float) -> None:
        """An order in flight: an app restart is over when its agent says so (or goes
        unanswered long enough to be asked again); a drained machine due for a reboot is
        rebooted once it holds no lease."""
        assert h.pending is not None
        action, after_id, sent_at = h.pending
        if action == "restart_app":
            for e in await self.db(self.store.events, machine_id=m.id, after_id=after_id, limit=100):
                if e.kind == "machine.recycled":
                    h.base_runs = m.runs_completed
                    h.samples.clear()
                    h.pending = None
                    h.fresh_after = e.at
                    return
            if now - sent_at >= RECYCLE_RESEND:
                h.pending = None
        elif (action == "reboot" and m.active_attempt_id is None and m.id not in state.rebooting
              and await self._reboot(state, pool, policy, m.id, now)):
            state.rebooting.add(m.id)

    async def _reboot(self, state: _PoolState, pool: str, policy: PoolPolicy, machine_id: str, now: float) -> bool:
        provider = self.providers.get(policy.provider or "")
        if provider is None:
            return False  # said by the pool's pass (pool.provider_missing)
        try:
            found = [m for m in await provider.list(pool=pool) if m.name == machine_id]
            if not found:
                return False  # not one of the provider's
            await provider.reboot(found[0].id, token=f"reboot:{machine_id}:{int(now)}")
        except ProviderError as exc:
            await self._provider_error(state, pool, "reboot", exc, now)
            return False
        return True

    # -- rolling maintenance ----------------------------------------------------------------------
    async def _maintenance_pass(self, c: Campaign, policy: PoolPolicy) -> None:
        """One step of a campaign: machines on their way moved on, new ones taken out of
        service as the policy allows, the campaign's state and each machine's step saved."""
        mp, now, pool = policy.maintenance, self.clock(), c.pool
        state = self.pools.setdefault(pool, _PoolState())
        provider = self.providers.get(policy.provider or "")
        before = (c.state, c.detail, {m: (s.step, s.detail) for m, s in c.machines.items()})
        machines = {m.id: m for m in await self.db(self.store.list_machines, pool, live_or=tuple(c.machines))}
        at_provider: dict[str, ProviderMachine] | None = None
        if provider is not None:
            try:
                at_provider = {m.name: m for m in await provider.list(pool=pool) if m.state not in GONE}
            except ProviderError as exc:
                await self._provider_error(state, pool, "list", exc, now)
                return
        if c.state == "cancelling":
            for mid, st in c.machines.items():
                if st.step == "draining":  # not yet updated: back in service as it was
                    await self.db(self.store.set_admin, mid, MachineAdmin.ACTIVE, now, f"maintenance {c.id} cancelled")
                    self._step(c, st, mid, "pending", now, "cancelled before its update")
        for mid, st in c.machines.items():
            if st.step in ("pending", "done", "failed", "skipped"):
                continue
            if provider is None or at_provider is None:
                break  # said below: nothing moves without the pool's provider
            await self._maintenance_step(c, st, mid, machines.get(mid), at_provider.get(mid), provider, state, now,
                                         update=mp.update)
            if st.step not in ("done", "failed") and st.started is not None and now - st.started > mp.timeout:
                await self._maintenance_failed(c, st, mid, now, f"not back in service {now - st.started:.0f}s after "
                                               f"its maintenance began (timeout {mp.timeout:g}s)")
        if c.state == "cancelling":
            if not any(st.step in AWAY - {"failed"} for st in c.machines.values()):
                c.state = "cancelled"
        else:
            # Nothing is taken out of service that the pool's provider could not bring back.
            blocked = ("the pool has no provider" if policy.provider is None else
                       f"this server has no provider {policy.provider!r}" if provider is None else
                       f"provider {policy.provider!r} cannot update machines (use update 'reboot', or a "
                       "provider that can)" if mp.update == "provider" and not provider.capabilities.update else "")
            waiting = blocked or await self._take_out(c, mp, machines, at_provider, now) or ""
            if f"{c.id}:{waiting}" != state.maintenance_said:
                state.maintenance_said = f"{c.id}:{waiting}"
                if waiting:
                    await self._event("maintenance.waiting", now, pool=pool, reason=waiting,
                                      data={"maintenance": c.id, **c.counts()})
            c.detail = waiting
            steps = c.counts()
            if not steps.get("pending") and not any(steps.get(s) for s in AWAY - {"failed"}):
                c.state = "done"
            elif steps.get("failed", 0) >= mp.unavailable_allowed(len(c.machines)) and c.state == "running":
                c.state = "stalled"
                c.detail = (f"{steps['failed']} machine(s) failed and stay out of service, as many as "
                            "max_unavailable allows: nothing more is taken out (cancel, fix them, start anew)")
        if c.state in ("done", "cancelled", "stalled") and c.state != before[0]:
            counts = c.counts()
            await self._event(f"maintenance.{c.state}", now, pool=pool, reason=c.detail or None,
                              data={"maintenance": c.id, **counts, "seconds": round(now - c.created_at, 3)})
            log.info("pool %s: maintenance %d %s (%s)", pool, c.id, c.state, counts)
        if (c.state, c.detail, {m: (s.step, s.detail) for m, s in c.machines.items()}) != before:
            saved = await self.db(self.store.save_maintenance, c, now)
            c.state = saved.state
        said, self._said = self._said, []
        for kind, mid, step, data in said:
            await self._event(kind, now, pool=pool, machine_id=mid, reason=step, data=data)

    async def _take_out(self, c: Campaign, mp: Maintenance, machines: dict[str, Machine],
                        at_provider: dict[str, ProviderMachine] | None, now: float) -> str | None:
        """Take pending machines out of service while the policy allows; why it stopped
        taking (None: nothing left to take, or it took all it could)."""
        if c.state != "running" or at_provider is None:
            return None
        pending = [mid for mid, st in c.machines.items() if st.step == "pending"]
        for mid in pending:  # left the pool before its turn (retired by scale-in, destroyed)
            m = machines.get(mid)
            if (m is None or not (m.connected or m.active_attempt_id is not None)) and mid not in at_provider:
                self._step(c, c.machines[mid], mid, "skipped", now, "no longer in the pool")
        pending = [mid for mid in pending if c.machines[mid].step == "pending"]
        if not pending:
            return None
        # The pool as it is: every machine up or busy, and the campaign's (those away are down).
        members = {m.id: m for m in machines.values() if rolling.live(m)}
        away = {mid for mid, st in c.machines.items() if st.step in AWAY}
        allowed = mp.unavailable_allowed(len(set(members) | set(c.machines)))
        if not mp.open_at(now):
            return "outside the pool's maintenance windows"
        demand = await self.db(self.store.pool_demand, c.pool, now, 300.0)
        chosen, why = rolling.choose(pending, members, away, allowed=allowed, busy=demand.busy, queued=demand.queued)
        for mid in chosen:
            st = c.machines[mid]
            await self.db(self.store.set_admin, mid, MachineAdmin.DRAINING, now,
                          f"maintenance {c.id}" + (f": {c.reason}" if c.reason else ""))
            st.started, st.boot_id = now, members[mid].boot_id
            self._step(c, st, mid, "draining", now, "")
        return why

    async def _maintenance_step(self, c: Campaign, st: MachineStep, mid: str, m: Machine | None,
                                pm: ProviderMachine | None, provider: MachineProvider, state: _PoolState,
                                now: float, *, update: str) -> None:
        """Move one machine on: drained → updated → rebooted → re-verified → in service."""
        if pm is None:
            await self._maintenance_failed(c, st, mid, now, f"provider {provider.name} has no machine {mid!r}")
            return
        if pm.state is ProviderState.FAILED:
            await self._maintenance_failed(c, st, mid, now, pm.detail or f"{provider.name} reports it failed")
            return
        if st.step == "draining":
            if m is not None and m.active_attempt_id is not None:
                return  # its run ends first
            if update == "provider":
                if await self._maintenance_call(c, st, mid, state, now, "update",
                                                provider.update(pm.id, token=f"maintenance:{c.id}:{mid}:update")):
                    self._step(c, st, mid, "updating", now)
            elif update == "pack":
                if m is not None and m.connected:  # drained and idle: its agent runs its pack's update hook
                    await self._ask_update(c, st, mid, now, first=True)
                    self._step(c, st, mid, "updating", now)
            elif await self._maintenance_call(c, st, mid, state, now, "reboot",
                                              provider.reboot(pm.id, token=f"maintenance:{c.id}:{mid}:reboot")):
                self._step(c, st, mid, "rebooting", now)
        elif st.step == "updating":
            if update == "pack" and pm.state is ProviderState.RUNNING:
                answer = await self._update_answer(st, mid)
                if answer is None:
                    if now - st.asked_at >= RECYCLE_RESEND and m is not None and m.connected:
                        await self._ask_update(c, st, mid, now, first=False)  # the order may have been lost
                    return
                if not answer.get("ok"):
                    await self._maintenance_failed(c, st, mid, now, f"update: {answer.get('error') or 'failed'}")
                    return
            rebooted_itself = pm.state in (ProviderState.REBOOTING, ProviderState.BOOTING)
            if rebooted_itself or (pm.state is ProviderState.RUNNING and await self._maintenance_call(
                    c, st, mid, state, now, "reboot", provider.reboot(pm.id, token=f"maintenance:{c.id}:{mid}:reboot"))):
                self._step(c, st, mid, "rebooting", now)
        elif st.step == "rebooting" and m is not None and m.connected and m.boot_id != st.boot_id:
            # back with a new boot: re-prove its state (pre-flight) before it serves again
            await self.db(self.store.quarantine, mid, f"maintenance {c.id}: re-verify after its update", now)
            self._step(c, st, mid, "verifying", now)
        elif st.step == "verifying" and m is not None and m.connected and m.health is MachineHealth.ONLINE:
            await self.db(self.store.set_admin, mid, MachineAdmin.ACTIVE, now,
                          f"maintenance {c.id}: updated, rebooted and verified")
            self._step(c, st, mid, "done", now)

    async def _ask_update(self, c: Campaign, st: MachineStep, mid: str, now: float, *, first: bool) -> None:
        """Ask the machine's agent to run its packs' update hook (``update: pack``). Its answer
        is looked for among the events after the first asking: a late one still counts."""
        if first:
            st.asked_after = await self.db(self.store.last_event_id)
        st.asked_at = now
        self.recycle(mid, "update", f"maintenance {c.id}" + (f": {c.reason}" if c.reason else ""))

    async def _update_answer(self, st: MachineStep, mid: str) -> dict[str, Any] | None:
        """The agent's ``machine.updated`` since it was asked: ``{ok, error, seconds}``; None yet."""
        for e in await self.db(self.store.events, machine_id=mid, after_id=st.asked_after, limit=1000):
            if e.kind == "machine.updated":
                return dict(e.data or {})
        return None

    async def _maintenance_call(self, c: Campaign, st: MachineStep, mid: str, state: _PoolState, now: float,
                                op: str, call: Any) -> bool:
        try:
            await call
        except ProviderError as exc:
            await self._provider_error(state, c.pool, op, exc, now)
            if not exc.retryable:
                await self._maintenance_failed(c, st, mid, now, f"{op}: {exc}")
            return False
        return True

    async def _maintenance_failed(self, c: Campaign, st: MachineStep, mid: str, now: float, why: str) -> None:
        """Left out of service (cordoned) for a person to look at; it holds one of the slots."""
        self._step(c, st, mid, "failed", now, why[:300])
        with contextlib.suppress(NotFound):
            await self.db(self.store.set_admin, mid, MachineAdmin.CORDONED, now, f"maintenance {c.id} failed: {why}"[:300])
        await self._event("maintenance.machine_failed", now, pool=c.pool, machine_id=mid, reason=why[:300],
                          data={"maintenance": c.id})
        log.warning("pool %s: maintenance %d of %s failed: %s", c.pool, c.id, mid, why)

    def _step(self, c: Campaign, st: MachineStep, mid: str, step: str, now: float, detail: str | None = None) -> None:
        """A machine's next step; its event is recorded when the pass saves the campaign."""
        if step != st.step:
            self._said.append(("maintenance.step", mid, step, {
                "maintenance": c.id, "step": step, "after": st.step, "seconds": round(now - st.since, 3),
                **({"detail": detail} if detail else {})}))
        st.step, st.since = step, now
        if detail is not None:
            st.detail = detail

    # -- fencing a silent machine ----------------------------------------------------------------
    def fence_soon(self, lost: Finished) -> None:
        """:meth:`fence`, in the background: a provider may take seconds to answer."""
        task = asyncio.get_running_loop().create_task(self.fence(lost))
        self._fencing.add(task)
        task.add_done_callback(self._fencing.discard)

    async def fence(self, lost: Finished) -> bool:
        """Power the machine of a lost attempt off through its pool's provider (the STONITH
        of cluster managers), then release its run, held back since the lease expired
        (``Store.expire_leases``). Without a provider that can, or if it fails, the hold
        stands: the run is retried once the lost attempt's own timeout has passed. Whether
        the machine was fenced."""
        a, run, now = lost.attempt, lost.run, self.clock()
        stored = await self.db(self.store.pool_policy, run.pool)
        policy = PoolPolicy.model_validate(stored.policy) if stored is not None else PoolPolicy()
        provider = self.providers.get(policy.provider or "")
        base = {"attempt": a.id, "run": run.id, "provider": policy.provider}
        if provider is None or not provider.capabilities.fence:
            why = ("the pool has no provider" if policy.provider is None else
                   f"this server has no provider {policy.provider!r}" if provider is None else
                   f"provider {policy.provider!r} cannot power machines off")
            await self._event("machine.fence_unavailable", now, pool=run.pool, machine_id=a.machine_id,
                              reason=f"{why}: the run waits for the lost attempt's own timeout", data=base)
            return False
        t0 = time.monotonic()
        try:
            found = [m for m in await provider.list(pool=run.pool) if m.name == a.machine_id]
            if not found:
                raise ProviderError(f"{provider.name} has no machine {a.machine_id!r} in pool {run.pool!r}",
                                    retryable=False)
            await provider.power_off(found[0].id, token=f"fence:{a.id}")
        except ProviderError as exc:
            state = self.pools.setdefault(run.pool, _PoolState())
            await self._provider_error(state, run.pool, "power_off", exc, self.clock())
            await self._event("machine.fence_failed", self.clock(), pool=run.pool, machine_id=a.machine_id,
                              reason=f"{exc}: the run waits for the lost attempt's own timeout"[:300], data=base)
            return False
        now = self.clock()
        await self._event("machine.fenced", now, pool=run.pool, machine_id=a.machine_id,
                          reason="powered off through its provider before its run moves",
                          data={**base, "provider_id": found[0].id, "seconds": round(time.monotonic() - t0, 3)})
        log.warning("machine %s fenced (powered off through %s) before attempt %d's run moves",
                    a.machine_id, provider.name, a.id)
        if await self.db(self.store.release_fence_hold, run.id, a.id, now, detail=f"{a.machine_id} powered off"):
            self.wake()
        return True

    # -- one pool --------------------------------------------------------------------------------
    async def _pass(self, pool: str, policy: PoolPolicy) -> Decision | None:
        state = self.pools.setdefault(pool, _PoolState())
        assert policy.provider is not None
        provider = self.providers.get(policy.provider)
        now = self.clock()
        if provider is None:
            if not state.missing_provider_said:
                state.missing_provider_said = True
                await self._event("pool.provider_missing", now, pool=pool, data={
                    "provider": policy.provider, "configured": sorted(self.providers)})
                log.warning("pool %s names provider %r, which this server does not have (it has: %s)",
                            pool, policy.provider, ", ".join(sorted(self.providers)) or "none")
            return None
        state.missing_provider_said = False
        try:
            listed = await provider.list(pool=pool)
        except ProviderError as exc:
            await self._provider_error(state, pool, "list", exc, now)
            return None
        # and those its list missed but that are still there (its get says so), or were made
        # too recently to be listed: supply all the same, never made twice
        at_provider = [m for m in listed if m.state not in GONE] + await self._notice_vanished(
            state, pool, provider, listed, now)
        # The machines that matter: up, busy, or the provider's — not every one destroyed before.
        enrolled = {m.id: m for m in await self.db(self.store.list_machines, pool,
                                                     live_or=tuple(m.name for m in at_provider))}
        # The policy's, else as measured here (the median of the pool's latest machines), else the default.
        ready_time = policy.ready_time or (statistics.median(state.ready_times) if state.ready_times else self.ready_time)
        await self._follow(state, pool, provider, at_provider, enrolled, now, ready_time)

        ours = {m.name for m in at_provider}
        # On its way: no agent yet, or enrolled by now but not yet in service (its first pre-flight).
        coming = [m for m in at_provider if m.state in COMING and (
            m.name not in enrolled or (m.name in state.tracked and not _arrived(enrolled[m.name])))]
        idle = [m for m in enrolled.values() if m.status == "ready"]
        # Those due for a recycle first (retiring them is their refresh), then the oldest.
        retirable = sorted((m for m in idle if m.id in ours and m.id not in state.retiring),
                           key=lambda m: (not _recycle_due(policy.recycle, state, m), m.enrolled_at, m.id))
        # Every machine the pool has, for max: the provider's, and any enrolled by hand that is up
        # (not one written off as vanished whose agent has not gone yet).
        state.vanished &= set(enrolled)
        total = len(ours | {m.id for m in enrolled.values() if m.connected and m.id not in state.vanished})
        demand = await self.db(self.store.pool_demand, pool, now, 300.0)
        if state.since is None:
            state.since = now
        # Being retired, but still idle and up: put back in service if more are wanted again
        # (not one retired for its rebuild: its age would only retire it again).
        restorable = sorted((mid for mid in state.retiring if mid in ours and not state.rebuilding(mid)
                             and (m := enrolled.get(mid)) is not None
                             and m.connected and m.active_attempt_id is None and m.health is MachineHealth.ONLINE),
                            key=lambda mid: -state.retiring[mid])  # the latest retired first
        decision = decide(
            pool, policy, demand, coming=len(coming), retiring=len(state.retiring), idle=len(idle),
            retirable=[m.id for m in retirable], total=total, now=now, recent=state.targets, since=state.since,
            ready_time=ready_time, restorable=restorable)
        if decision.acts or decision.target != state.last_target:
            await self._event("pool.scaled", now, pool=pool, reason=decision.summary(), data={
                "target": decision.target, "supply": decision.supply, "create": decision.create,
                "retire": list(decision.retire), "restore": list(decision.restore), "inputs": decision.inputs})
            log.info("pool %s: %s", pool, decision.summary())
        state.last_target = decision.target
        for machine_id in decision.restore:
            await self.db(self.store.set_admin, machine_id, MachineAdmin.ACTIVE, now,
                          "scale-in called off: work came back before it was destroyed")
            del state.retiring[machine_id]
        await self._finish_retiring(state, pool, policy, provider, at_provider, enrolled, now)
        # Side by side: a provider that takes seconds a call does not hold the pass for the sum.
        await asyncio.gather(*(self._create(state, pool, policy, provider, now) for _ in range(decision.create)))
        for machine_id in decision.retire:
            await self.db(self.store.set_admin, machine_id, MachineAdmin.DRAINING, now, "scale-in: retired by the pool controller")
            state.retiring[machine_id] = now
        return decision

    async def _create(self, state: _PoolState, pool: str, policy: PoolPolicy, provider: MachineProvider,
                      now: float) -> None:
        prefix = policy.machine.name_prefix or pool
        name = f"{prefix}-{int(now):x}{next(self._names):03d}"
        spec = MachineSpec(name=name, pool=pool, image=policy.machine.image, labels=dict(policy.machine.labels),
                           tags={"deskfleet.pool": pool})
        try:
            made = await provider.create(spec, token=f"create:{pool}:{name}")
        except ProviderError as exc:
            await self._provider_error(state, pool, "create", exc, now)
            return
        state.tracked[name] = _Tracked(name, "provisioning", now, now)
        if made.state not in GONE:
            state.known[name] = made  # gone before the next pass's list: vanished all the same
            state.unlisted[name] = now
        await self._event("machine.lifecycle", now, pool=pool, machine_id=name, reason="provisioning",
                          data={"step": "provisioning", "provider": provider.name, "provider_id": made.id})

    async def _follow(self, state: _PoolState, pool: str, provider: MachineProvider, at_provider: list[ProviderMachine],
                      enrolled: dict[str, Machine], now: float, ready_time: float) -> None:
        """Each machine on its way up: a lifecycle event at each new step; a machine that failed,
        or is not ready within the boot timeout, destroyed (its replacement follows from supply)."""
        for m in at_provider:
            machine = enrolled.get(m.name)
            t = state.tracked.get(m.name)
            if t is None:
                if machine is not None:
                    continue  # enrolled before this leader looked: nothing to follow
                t = state.tracked[m.name] = _Tracked(m.name, "provisioning", m.created_at, m.created_at)
            step = ("ready" if _arrived(machine)
                    else "enrolling" if machine is not None or m.state is ProviderState.RUNNING
                    else "booting" if m.state in (ProviderState.BOOTING, ProviderState.REBOOTING) else t.step)
            if step != t.step:
                await self._event("machine.lifecycle", now, pool=pool, machine_id=m.name, reason=step, data={
                    "step": step, "after": t.step, "seconds": round(now - t.since, 3),
                    "since_created": round(now - t.created_at, 3)})
                t.step, t.since = step, now
            if step == "ready":
                state.ready_times.append(now - t.created_at)
                del state.tracked[m.name]
                continue
            failed = m.state is ProviderState.FAILED
            if failed or now - t.created_at > BOOT_TIMEOUT_FACTOR * ready_time:
                why = m.detail or m.state.value if failed else f"not ready {now - t.created_at:.0f}s after it was created"
                state.errors["boot"] += 1
                await self._event("pool.machine_failed", now, pool=pool, machine_id=m.name, reason=why[:300],
                                  data={"provider_state": m.state.value, "failures": state.errors["boot"]})
                await self._destroy(state, pool, provider, m, now)
                state.tracked.pop(m.name, None)

    async def _notice_vanished(self, state: _PoolState, pool: str, provider: MachineProvider,
                               listed: list[ProviderMachine], now: float) -> list[ProviderMachine]:
        """Machines deleted behind the pool's back: seen up (or on their way) at the provider
        before, and now missing from its list and its ``get``, or terminated without this
        controller's order. Each is said and counted once (``pool.machine_vanished``) and
        taken out of the pool's bookkeeping: cordoned (no new work: its agent may not have
        noticed yet), neither supply nor on its way, not counted against ``max``, and never
        destroyed — nothing is left to destroy. A run it held moves when its lease expires,
        as any lost attempt's; the pool's supply, one machine short, brings a new one if
        demand needs it."""
        if state.provider != provider.name:  # a policy that changed provider: the old one's machines are not gone
            state.known.clear()
            state.unlisted.clear()
            state.provider = provider.name
        seen = {m.name: m for m in listed}
        unlisted: list[ProviderMachine] = []  # not in the list, yet not gone: returned
        for name, last in list(state.known.items()):
            found = seen.get(name)
            if found is None:
                try:  # the list may have missed it: its get says
                    found = await provider.get(last.id)
                except MachineNotFound:
                    pass
                except ProviderError as exc:
                    await self._provider_error(state, pool, "get", exc, now)
                    unlisted.append(last)  # asked again next pass
                    continue
            if found is not None and found.state not in GONE:
                if name not in seen:
                    unlisted.append(found)
                continue
            if found is None and now - state.unlisted.get(name, -LIST_LAG) < LIST_LAG:
                unlisted.append(last)  # made a moment ago: the provider may not list it yet
                continue
            del state.known[name]
            state.unlisted.pop(name, None)
            await self._vanished(state, pool, provider, last, found, now)
        for m in listed:
            state.unlisted.pop(m.name, None)
            if m.state not in GONE:
                state.known[m.name] = m
        return unlisted

    async def _vanished(self, state: _PoolState, pool: str, provider: MachineProvider, last: ProviderMachine,
                        found: ProviderMachine | None, now: float) -> None:
        name = last.name
        state.errors["vanished"] += 1
        for followed in (state.tracked, state.retiring, state.health):
            followed.pop(name, None)
        state.rebooting.discard(name)
        machine = await self.db(self.store.get_machine, name)
        held = machine is not None and machine.active_attempt_id is not None
        if machine is None:
            did = "it had not enrolled: nothing to take out of service"
        else:
            did = "cordoned: no new work, not counted as supply"
            if machine.admin is not MachineAdmin.CORDONED:
                await self.db(self.store.set_admin, name, MachineAdmin.CORDONED, now,
                              f"vanished from provider {provider.name}")
            if machine.connected:
                state.vanished.add(name)
            if held:
                did += "; its run moves when its lease expires"
        gone_as = found.state.value if found is not None else "absent"
        reason = (f"gone from provider {provider.name} without the pool's order (last seen {last.state.value}, "
                  f"now {gone_as}): {did}; nothing to destroy; a new machine if the pool's demand needs one")
        log.warning("pool %s: machine %s (%s) %s", pool, name, last.id, reason)
        await self._event("pool.machine_vanished", now, pool=pool, machine_id=name, reason=reason[:300], data={
            "provider": provider.name, "provider_id": last.id, "provider_state": last.state.value, "now": gone_as,
            "enrolled": machine is not None, "held_lease": held, "failures": state.errors["vanished"]})

    async def _finish_retiring(self, state: _PoolState, pool: str, policy: PoolPolicy, provider: MachineProvider,
                               at_provider: list[ProviderMachine], enrolled: dict[str, Machine], now: float) -> None:
        by_name = {m.name: m for m in at_provider}
        for machine_id, since in list(state.retiring.items()):
            machine, pm = enrolled.get(machine_id), by_name.get(machine_id)
            if pm is None:
                del state.retiring[machine_id]  # gone already
                continue
            if machine is not None and machine.active_attempt_id is not None:
                if now - since > policy.scale_in.drain_timeout:
                    # Never destroy a machine holding a lease: back in service, and say so.
                    await self.db(self.store.set_admin, machine_id, MachineAdmin.ACTIVE, now,
                                  "scale-in abandoned: still busy after the drain timeout")
                    await self._event("pool.retire_abandoned", now, pool=pool, machine_id=machine_id,
                                      reason=f"busy {now - since:.0f}s after its drain began")
                    del state.retiring[machine_id]
                continue
            if await self._destroy(state, pool, provider, pm, now):
                del state.retiring[machine_id]

    async def _destroy(self, state: _PoolState, pool: str, provider: MachineProvider, m: ProviderMachine,
                       now: float) -> bool:
        # Checked once more right before: a run may have been assigned since the pass read the machines.
        machine = await self.db(self.store.get_machine, m.name)
        if machine is not None and machine.active_attempt_id is not None:
            return False
        state.known.pop(m.name, None)  # gone from the provider's list after this: not vanished
        state.unlisted.pop(m.name, None)
        try:
            await provider.destroy(m.id, token=f"destroy:{pool}:{m.id}")
        except ProviderError as exc:
            await self._provider_error(state, pool, "destroy", exc, now)
            return False
        await self._event("machine.lifecycle", now, pool=pool, machine_id=m.name, reason="destroyed",
                          data={"step": "destroyed", "provider": provider.name, "provider_id": m.id,
                                "age": round(now - m.created_at, 3)})
        return True

    async def _provider_error(self, state: _PoolState, pool: str, op: str, exc: ProviderError, now: float) -> None:
        state.errors[op] += 1
        log.warning("pool %s: provider %s failed (%s so far): %s", pool, op, state.errors[op], exc)
        await self._event("pool.provider_error", now, pool=pool, reason=str(exc)[:300], data={
            "op": op, "retryable": exc.retryable, "failures": state.errors[op]})

    async def _event(self, kind: str, now: float, *, pool: str, machine_id: str | None = None,
                     reason: str | None = None, data: dict[str, Any] | None = None) -> None:
        """Recorded at the time it happens (``now`` is the pass's time, for its decisions:
        a pass that waits on its provider would otherwise date every event to its start)."""
        await self.db(self.store.record_event, kind, max(now, self.clock()), machine_id=machine_id, reason=reason,
                      data={"pool": pool, **(data or {})})


def _due(r: Recycle, h: _Health, m: Machine) -> tuple[str, str, float, float] | None:
    """The first refresh due for a machine, by its latest heartbeat's figures, as (action,
    reason, the figure, its threshold). An OS waiting for a reboot comes first: drained and
    rebooted now, between runs, it does not force the reboot in the middle of one."""
    if m.resources.get("reboot_pending"):
        return "reboot", "the OS waits for a reboot to finish an update", 1, 1
    runs, memory = m.runs_completed, float(m.resources.get("memory_mb") or 0.0)
    uptime = float(m.resources.get("uptime") or 0.0)
    since = runs - h.base_runs
    if r.after_runs is not None and since >= r.after_runs:
        return "restart_app", f"{since} runs since the app started (limit {r.after_runs})", since, r.after_runs
    if r.above_mb is not None and memory > r.above_mb:
        return "restart_app", f"app memory {memory:.0f} MB (limit {r.above_mb:g} MB)", memory, r.above_mb
    window = [p for p in h.samples if p[0] > runs - r.leak_window]  # the last leak_window runs' readings
    if r.leak_mb_per_run is not None and len(window) >= 3 and window[-1][0] - window[0][0] >= r.leak_window - 1:
        slope = _slope(window)
        if slope > r.leak_mb_per_run:
            return ("restart_app", f"app memory grows {slope:.1f} MB a run over {r.leak_window} runs "
                    f"(limit {r.leak_mb_per_run:g})", round(slope, 3), r.leak_mb_per_run)
    if r.max_age_hours is not None and uptime > r.max_age_hours * 3600:
        return r.age_action, f"up {uptime / 3600:.1f} h (limit {r.max_age_hours:g} h)", uptime, r.max_age_hours * 3600
    return None


def _recycle_due(r: Recycle, state: _PoolState, m: Machine) -> bool:
    """Whether a refresh is due for the machine (as far as this leader has followed it)."""
    return _due(r, state.health.get(m.id) or _Health(m.boot_id, m.runs_completed), m) is not None


def _slope(points: list[tuple[int, float]]) -> float:
    """Least-squares MB per run."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0


def _arrived(machine: Machine | None) -> bool:
    """No longer on its way up: in service, or up and held out of it on purpose (cordoned by
    an operator, drained for maintenance) — not a machine that failed to boot."""
    return _in_service(machine) or (machine is not None and machine.connected and machine.admin is not MachineAdmin.ACTIVE)


def _in_service(machine: Machine | None) -> bool:
    """Enrolled, connected and in service (idle or busy): no longer on its way up."""
    return machine is not None and machine.status in ("ready", "busy")
