"""Machines and pools: enrolment and agent keys, an agent's uploads, an operator's cordon,
drain and uncordon, pools, and reads of the fleet (machines, their events, counts).

A change that may let a run start (a machine back, a pool changed) wakes the scheduler on
every replica; one that changes what submit checks runs against (an enrolment, a pool)
drops the catalogue there too.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Protocol

from ..crypto import hash_key, same
from ..models import Artifact, Event, Machine, MachineAdmin, Pool

if TYPE_CHECKING:
    from ..store import Store
    from ..store.runner import StoreRunner


class Changes(Protocol):
    """Who hears of a change here: the catalogue (``changed``) and dispatch (``wake``)."""

    def changed(self) -> None: ...


class Waker(Protocol):
    def wake(self, *, others: bool = False) -> None: ...


class Machines:
    def __init__(self, store: Store, db: StoreRunner, *, catalogue: Changes, dispatch: Waker) -> None:
        self.store = store
        self.db = db
        self.catalogue = catalogue
        self.dispatch = dispatch

    # -- agents ------------------------------------------------------------------------------------
    async def enrol(self, machine_id: str, *, pool: str, labels: dict[str, str], key_hash: str) -> Machine:
        machine = await self.db(self.store.enrol_machine, machine_id, pool=pool, labels=labels,
                                key_hash=key_hash, now=time.time())
        self.catalogue.changed()
        return machine

    async def agent_key_matches(self, machine_id: str, key: str) -> bool:
        """Whether ``key`` is the agent key ``machine_id`` was enrolled with."""
        stored = await self.db(self.store.machine_key_hash, machine_id) if machine_id else None
        return bool(key) and stored is not None and same(hash_key(key), stored)

    async def add_artifact(self, *, attempt_id: int | None, machine_id: str, name: str, content_type: str,
                           data: bytes) -> Artifact:
        return await self.db(self.store.add_artifact, attempt_id=attempt_id, machine_id=machine_id, name=name,
                             content_type=content_type, data=data, now=time.time())

    # -- operators ---------------------------------------------------------------------------------
    async def set_admin(self, machine_id: str, admin: MachineAdmin, reason: str = "") -> Machine:
        machine = await self.db(self.store.set_admin, machine_id, admin, time.time(), reason)
        self.dispatch.wake(others=True)
        return machine

    async def put_pool(self, pool: Pool) -> Pool:
        result = await self.db(self.store.put_pool, pool, time.time())
        self.catalogue.changed()
        self.dispatch.wake(others=True)
        return result

    # -- reads ---------------------------------------------------------------------------------------
    async def machines(self, pool: str | None = None) -> list[Machine]:
        return await self.db(self.store.list_machines, pool)

    async def machine(self, machine_id: str) -> Machine | None:
        return await self.db(self.store.get_machine, machine_id)

    async def events(self, machine_id: str, *, after_id: int, limit: int) -> list[Event]:
        return await self.db(self.store.events, machine_id=machine_id, after_id=after_id, limit=limit)

    async def counts(self) -> dict[str, int]:
        """Machines by status (busy, offline, quarantined, cordoned, drained, ready)."""
        return await self.db(self.store.count_machines)

    async def pools(self) -> list[Pool]:
        return await self.db(self.store.list_pools)

    async def pool(self, name: str) -> Pool | None:
        return await self.db(self.store.get_pool, name)
