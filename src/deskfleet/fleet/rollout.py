"""Pack rollouts: a pool's machines moved to its assigned pack version a few at a time.

On the leader only, one pass per tick per rollout under way (``Store.assign_pack`` starts
one; ``store.packs`` keeps each machine's step, so a new leader carries on). The shape is
rolling maintenance's (``fleet.controller``):

- every machine of the pool that runs the pack at another version joins the rollout as
  ``pending`` — also one that connects later (a new machine of an autoscaled pool, one that
  was offline); a machine whose agent reports no packs at all speaks an older protocol
  (< 6): it is ``skipped`` and says so, never sent ``install``;
- at most ``max_unavailable`` machines of the pool are out of service at once (for any
  reason: maintenance, quarantine…), and never so many that those left serving are fewer
  than the work in hand (busy + queued). Idle machines go first;
- a machine is **drained** (its run ends first: nothing is interrupted), then told to
  **install**; its agent downloads the archive, checks its hash, installs it into an
  environment of its own, runs ``pack check`` on it in a subprocess, and switches only
  while idle — each step a machine event. Once it says hello with the new version it is put
  back in service: ``done``;
- a machine whose install failed (``pack.install_failed``: a download cut short, a hash that
  differs, requirements that do not install, a check that fails) stays on its old version,
  back in service, ``failed`` with its agent's reason; so does one not back within the
  timeout. When as many machines failed as ``max_unavailable`` allows, the rollout
  **stalls** rather than try the version on more machines: a rollback (or a new version)
  is the way on.

Every step is an event: ``rollout.step`` (machine, step, the step before, seconds in it,
detail), ``rollout.machine_failed``, ``rollout.done``, ``rollout.stalled``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import NotFound
from ..models import Machine, MachineAdmin
from ..packfile import LABEL_PREFIX, label
from ..store.packs import AWAY, PackRecord, Rollout, RolloutStep
from . import rolling

if TYPE_CHECKING:
    from ..store import Store
    from ..store.runner import StoreRunner

log = logging.getLogger(__name__)

#: seconds a machine may take from leaving service until it is back on the new version
INSTALL_TIMEOUT = 900.0
#: seconds after which an install order not yet answered is sent again (a lost order, an
#: agent that reconnected meanwhile; the agent ignores a repeat of an order it works on)
RESEND = 20.0


class Rollouts:
    """``install(machine, record, reason)``: the order to a machine's agent, wherever it is connected."""

    def __init__(self, store: Store, db: StoreRunner, *, leads: Callable[[], bool],
                 install: Callable[[str, PackRecord, str], None], tick: float = 5.0,
                 clock: Callable[[], float] = time.time, timeout: float = INSTALL_TIMEOUT) -> None:
        self.store = store
        self.db = db
        self.leads = leads
        self.install = install
        self.interval = tick
        self.clock = clock
        self.timeout = timeout
        self._sent: dict[tuple[int, str], float] = {}  # (rollout, machine) → when install was last sent
        self._said: list[tuple[str, str, dict[str, Any]]] = []
        self._waiting: dict[int, str] = {}  # rollout → why it last waited (said once)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.get_running_loop().create_task(self._loop())
        return self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if not self.leads():
                self._sent.clear()
                continue
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # a pass that failed is tried again next tick
                log.exception("pack rollout pass failed")

    async def tick(self) -> None:
        for r in await self.db(self.store.pack_rollouts, active=True, limit=10_000):
            await self.step(r)

    async def step(self, r: Rollout) -> Rollout:
        """One pass over one rollout: machines joined, moved on and taken out as allowed; saved."""
        now = self.clock()
        record = await self.db(self.store.get_pack, r.pack, r.version)
        if record is None:  # published packs are never deleted; a rollout names a published one
            return r
        before = (r.state, r.detail, {m: (s.step, s.detail) for m, s in r.machines.items()})
        listed = await self.db(self.store.list_machines, r.pool, live_or=tuple(r.machines))
        machines = {m.id: m for m in listed}
        key = label(r.pack)
        for m in listed:  # machines of the pool that run the pack at another version join
            if m.id in r.machines or not rolling.live(m):
                continue
            if not any(k.startswith(LABEL_PREFIX) for k in m.labels):
                r.machines[m.id] = RolloutStep("skipped", now, detail=(
                    "its agent does not report its packs (protocol < 6): it is never sent install; update the agent"))
                self._say("rollout.step", m.id, {"step": "skipped", "after": None, "detail": r.machines[m.id].detail})
            elif key in m.labels and m.labels[key] != r.version:
                r.machines[m.id] = RolloutStep("pending", now)
        moved = False
        for mid, st in r.machines.items():
            moved = await self._move(r, record, mid, st, machines.get(mid), now) or moved
        if moved:  # machines back in service count as serving again
            machines = {m.id: m for m in await self.db(self.store.list_machines, r.pool, live_or=tuple(r.machines))}
        failed = r.counts().get("failed", 0)
        if failed >= r.allowed(max(1, len(machines))) and r.state == "running":
            # Before any more are taken: a version that fails is not tried on more machines.
            r.state = "stalled"
            r.detail = (f"{failed} machine(s) failed to install {r.pack} {r.version} (they stay on their "
                        "old version), as many as max_unavailable allows: no more are tried; roll back, or assign "
                        "a fixed version")
        taken = await self._take_out(r, record, machines, now)
        counts = r.counts()
        if not counts.get("pending") and not any(counts.get(s) for s in AWAY):
            r.state, r.detail = "done", ""
        elif r.state == "running":
            r.detail = taken or ""
            if taken and self._waiting.get(r.id) != taken:
                self._waiting[r.id] = taken
                await self._event("rollout.waiting", now, r, reason=taken, data=counts)
        if (r.state, r.detail, {m: (s.step, s.detail) for m, s in r.machines.items()}) != before:
            saved = await self.db(self.store.save_rollout, r, now)
            if saved.state == "superseded":  # a new assignment came meanwhile: it carries on
                self._said.clear()
                return saved
        said, self._said = self._said, []
        for kind, mid, data in said:
            await self._event(kind, now, r, machine_id=mid, reason=data.get("step"), data=data)
        if r.state != before[0]:
            await self._event(f"rollout.{r.state}", now, r, reason=r.detail or None,
                              data={**r.counts(), "seconds": round(now - r.created_at, 3)})
            log.info("pool %s: rollout %d of %s %s %s (%s)", r.pool, r.id, r.pack, r.version, r.state, r.counts())
        return r

    async def _move(self, r: Rollout, record: PackRecord, mid: str, st: RolloutStep, m: Machine | None,
                    now: float) -> bool:
        """Move one machine on: drained → told to install → back on the new version, in
        service. Whether it was put back in service."""
        if st.step not in ("pending", *AWAY):
            return False
        if m is not None and m.connected and m.labels.get(label(r.pack)) == r.version:
            back = st.step in AWAY
            if back:
                await self._admin(mid, MachineAdmin.ACTIVE, now, f"rollout {r.id}: on {r.pack} {r.version}")
            self._step(r, st, mid, "done", now, "" if back else "already on it")
            return back
        if st.step == "pending":
            if m is None or not rolling.live(m):
                self._step(r, st, mid, "skipped", now, "no longer in the pool")
            return False
        if st.started is not None and now - st.started > self.timeout:
            await self._failed(r, st, mid, now, f"not back on {r.pack} {r.version} {now - st.started:.0f}s after it "
                                                f"left service (timeout {self.timeout:g}s)")
            return True
        if st.step == "draining":
            if m is not None and m.connected and m.active_attempt_id is None:
                st.after = await self.db(self.store.last_event_id)
                self._send(r, record, mid, now)
                self._step(r, st, mid, "installing", now)
            return False
        # installing: its agent reports how it went
        for e in await self.db(self.store.events, machine_id=mid, after_id=st.after, limit=500):
            if e.kind == "pack.install_failed" and e.data.get("pack") == r.pack and e.data.get("version") == r.version:
                why = str(e.data.get("why") or e.reason or "the agent gave no reason")
                await self._failed(r, st, mid, now, f"{e.data.get('stage', 'install')}: {why}")
                return True
        if m is not None and m.connected and now - self._sent.get((r.id, mid), 0.0) >= RESEND:
            self._send(r, record, mid, now)
        return False

    async def _take_out(self, r: Rollout, record: PackRecord, machines: dict[str, Machine], now: float) -> str | None:
        """Take pending machines out of service while the rollout's limits allow; why it
        stopped taking (None: nothing left, or it took all it could)."""
        if r.state != "running":
            return None
        pending = [mid for mid, st in r.machines.items() if st.step == "pending"]
        if not pending:
            return None
        members = {mid: m for mid, m in machines.items() if rolling.live(m)}
        away = {mid for mid, st in r.machines.items() if st.step in AWAY}
        demand = await self.db(self.store.pool_demand, r.pool, now, 300.0)
        chosen, why = rolling.choose(pending, members, away, allowed=r.allowed(len(members)), busy=demand.busy,
                                     queued=demand.queued)
        for mid in chosen:
            st = r.machines[mid]
            await self._admin(mid, MachineAdmin.DRAINING, now, f"rollout {r.id}: {r.pack} {r.version}")
            st.started = now
            self._step(r, st, mid, "draining", now)
            if members[mid].active_attempt_id is None:  # idle: told at once, not a tick later
                st.after = await self.db(self.store.last_event_id)
                self._send(r, record, mid, now)
                self._step(r, st, mid, "installing", now)
        return why

    def _send(self, r: Rollout, record: PackRecord, mid: str, now: float) -> None:
        self._sent[(r.id, mid)] = now
        self.install(mid, record, f"rollout {r.id}" + (f": {r.reason}" if r.reason else ""))

    async def _failed(self, r: Rollout, st: RolloutStep, mid: str, now: float, why: str) -> None:
        """It stays on its old version, back in service; the failure counts toward a stall."""
        self._step(r, st, mid, "failed", now, why[:300])
        await self._admin(mid, MachineAdmin.ACTIVE, now, f"rollout {r.id}: stays on its old version")
        self._say("rollout.machine_failed", mid, {"step": "failed", "why": why[:300]})
        log.warning("pool %s: %s could not move to %s %s: %s", r.pool, mid, r.pack, r.version, why)

    async def _admin(self, mid: str, admin: MachineAdmin, now: float, reason: str) -> None:
        with contextlib.suppress(NotFound):
            await self.db(self.store.set_admin, mid, admin, now, reason[:300])

    def _step(self, r: Rollout, st: RolloutStep, mid: str, step: str, now: float, detail: str | None = None) -> None:
        """A machine's next step; its event is recorded when the pass saves the rollout."""
        if step != st.step:
            self._say("rollout.step", mid, {"step": step, "after": st.step, "seconds": round(now - st.since, 3),
                                            **({"detail": detail} if detail else {})})
        st.step, st.since = step, now
        if detail is not None:
            st.detail = detail

    def _say(self, kind: str, mid: str, data: dict[str, Any]) -> None:
        self._said.append((kind, mid, data))

    async def _event(self, kind: str, now: float, r: Rollout, *, machine_id: str | None = None,
                     reason: str | None = None, data: dict[str, Any] | None = None) -> None:
        await self.db(self.store.record_event, kind, max(now, self.clock()), machine_id=machine_id, reason=reason,
                      data={"pool": r.pool, "pack": r.pack, "version": r.version, "rollout": r.id, **(data or {})})


