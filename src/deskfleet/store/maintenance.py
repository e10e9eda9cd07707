"""Rolling maintenance campaigns (a part of :class:`~deskfleet.store.sql.SQLStore`).

A campaign takes a pool's machines through their OS updates a few at a time: each machine
walks ``pending → draining → updating → rebooting → verifying → done`` (or ``failed``).
The leader's pool controller moves them (``fleet.controller``) and writes each machine's
step here, so that a new leader carries on where the old one stopped; an operator starts
and cancels campaigns through the API. One campaign at a time per pool.

A campaign is ``running``, ``stalled`` (failed machines hold every slot the pool's
``max_unavailable`` allows: nothing more is taken out until someone looks), ``cancelling``
(cancelled: machines already on their way finish, the others stay as they are), and at
last ``done`` or ``cancelled``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, or_, select, update

from ..errors import Conflict, InvalidInput, NotFound
from .schema import attempts, machines, maintenance, pools

#: the states of a campaign the controller still works on
ACTIVE = ("running", "stalled", "cancelling")
#: a machine's steps, in order; ``failed`` may follow any step after ``pending``, and
#: ``skipped`` a ``pending`` machine that left the pool before its turn (retired, destroyed)
STEPS = ("pending", "draining", "updating", "rebooting", "verifying", "done", "failed", "skipped")
#: the steps of a machine out of service for the campaign
AWAY = frozenset({"draining", "updating", "rebooting", "verifying", "failed"})


@dataclass(slots=True)
class MachineStep:
    """Where one machine is in a campaign."""

    step: str = "pending"
    since: float = 0.0  # when it entered the step
    started: float | None = None  # when it left service for the campaign
    boot_id: str = ""  # its boot id before the reboot: a new one proves the reboot
    detail: str = ""
    #: update "pack": the last event before its agent was asked to update (its answer, ``event
    #: machine.updated``, comes after it), and when it was last asked
    asked_after: int = 0
    asked_at: float = 0.0


@dataclass(slots=True)
class Campaign:
    id: int
    pool: str
    state: str
    reason: str
    machines: dict[str, MachineStep]
    created_at: float
    updated_at: float
    detail: str = ""

    def counts(self) -> dict[str, int]:
        return dict(Counter(s.step for s in self.machines.values()))

    @property
    def finished(self) -> bool:
        return self.state in ("done", "cancelled")


class MaintenanceOps:
    _event: Any

    if TYPE_CHECKING:
        def _tx(self, write: bool = True) -> AbstractContextManager[Connection]: ...

    def start_maintenance(self, pool: str, machine_ids: Sequence[str] | None, *, reason: str = "",
                          now: float) -> Campaign:
        """A new campaign over ``machine_ids`` (None: every machine of the pool that is up or
        busy). NotFound for an unknown pool; Conflict while another campaign of the pool is
        under way; InvalidInput for machines not in the pool, or none at all."""
        with self._tx() as conn:
            if conn.execute(select(pools.c.name).where(pools.c.name == pool).with_for_update()).first() is None:
                raise NotFound(f"no pool {pool!r}", field="pool")
            busy = conn.execute(select(maintenance.c.id, maintenance.c.state).where(
                maintenance.c.pool == pool, maintenance.c.state.in_(ACTIVE))).first()
            if busy is not None:
                raise Conflict(f"maintenance {busy[0]} of pool {pool!r} is {busy[1]}: let it finish, or cancel it "
                               f"(POST /v1/pools/{pool}/maintenance/{busy[0]}/cancel)", field="pool")
            members = select(machines.c.id).where(machines.c.pool == pool)
            if machine_ids is None:
                holding = select(attempts.c.id).where(attempts.c.machine_id == machines.c.id,
                                                      attempts.c.state == "active").exists()
                live = or_(machines.c.connected.is_(True), holding)
                chosen = [r[0] for r in conn.execute(members.where(live).order_by(machines.c.id))]
                if not chosen:
                    raise InvalidInput(f"pool {pool!r} has no machine up to maintain", field="machines")
            else:
                chosen = list(dict.fromkeys(machine_ids))
                if not chosen:
                    raise InvalidInput("machines is empty: name some, or leave it out for all of the pool's",
                                       field="machines")
                known = {r[0] for r in conn.execute(members.where(machines.c.id.in_(chosen)))}
                if unknown := [m for m in chosen if m not in known]:
                    raise InvalidInput(f"not machines of pool {pool!r}: {', '.join(unknown[:10])}", field="machines")
            steps = {m: MachineStep(since=now) for m in chosen}
            campaign_id = int(conn.execute(maintenance.insert().values(
                pool=pool, state="running", reason=reason, machines=_dump(steps), created_at=now,
                updated_at=now, detail="").returning(maintenance.c.id)).scalar_one())
            self._event(conn, "maintenance.started", now, reason=reason or None,
                        data={"pool": pool, "maintenance": campaign_id, "machines": len(chosen)})
            return self._must(conn, campaign_id)

    def maintenance_campaign(self, campaign_id: int) -> Campaign | None:
        with self._tx(write=False) as conn:
            return self._campaign(conn, campaign_id)

    def maintenance_campaigns(self, pool: str | None = None, *, active: bool = False, limit: int = 20) -> list[Campaign]:
        """Campaigns, newest first: of ``pool``, or only those still under way."""
        q = select(maintenance).order_by(maintenance.c.id.desc()).limit(limit)
        if pool is not None:
            q = q.where(maintenance.c.pool == pool)
        if active:
            q = q.where(maintenance.c.state.in_(ACTIVE))
        with self._tx(write=False) as conn:
            return [_campaign(r) for r in conn.execute(q).mappings()]

    def save_maintenance(self, campaign: Campaign, now: float) -> Campaign:
        """The controller's progress: the machines' steps and the campaign's state. A cancel
        that came meanwhile stands (``running``/``stalled`` written over ``cancelling`` stays
        ``cancelling``)."""
        with self._tx() as conn:
            current = conn.execute(select(maintenance.c.state).where(maintenance.c.id == campaign.id)
                                   .with_for_update()).scalar_one_or_none()
            if current is None:
                raise NotFound(f"no maintenance {campaign.id}")
            state = campaign.state
            if current == "cancelling" and state in ("running", "stalled"):
                state = "cancelling"
            elif current in ("done", "cancelled"):
                state = current
            conn.execute(update(maintenance).where(maintenance.c.id == campaign.id).values(
                state=state, machines=_dump(campaign.machines), detail=campaign.detail, updated_at=now))
            return self._must(conn, campaign.id)

    def cancel_maintenance(self, pool: str, campaign_id: int, *, now: float, reason: str = "") -> Campaign:
        """No machine more is taken out of service; those on their way finish (``cancelling``)."""
        with self._tx() as conn:
            row = conn.execute(select(maintenance.c.state).where(
                maintenance.c.id == campaign_id, maintenance.c.pool == pool).with_for_update()).first()
            if row is None:
                raise NotFound(f"no maintenance {campaign_id} in pool {pool!r}")
            if row[0] not in ("running", "stalled"):
                raise Conflict(f"maintenance {campaign_id} is {row[0]}: there is nothing to cancel")
            conn.execute(update(maintenance).where(maintenance.c.id == campaign_id).values(
                state="cancelling", updated_at=now))
            self._event(conn, "maintenance.cancelling", now, reason=reason or None,
                        data={"pool": pool, "maintenance": campaign_id})
            return self._must(conn, campaign_id)

    def _campaign(self, conn: Connection, campaign_id: int) -> Campaign | None:
        row = conn.execute(select(maintenance).where(maintenance.c.id == campaign_id)).mappings().first()
        return _campaign(row) if row is not None else None

    def _must(self, conn: Connection, campaign_id: int) -> Campaign:
        found = self._campaign(conn, campaign_id)
        assert found is not None
        return found


def _dump(steps: dict[str, MachineStep]) -> dict[str, Any]:
    return {m: asdict(s) for m, s in steps.items()}


def _campaign(r: Any) -> Campaign:
    return Campaign(id=int(r["id"]), pool=r["pool"], state=r["state"], reason=r["reason"],
                    machines={m: MachineStep(**s) for m, s in dict(r["machines"]).items()},
                    created_at=r["created_at"], updated_at=r["updated_at"], detail=r["detail"])
