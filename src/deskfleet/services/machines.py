"""Machines and pools: enrolment and agent keys, an agent's uploads, an operator's cordon,
drain and uncordon, pools, and reads of the fleet (machines, their events, counts).

An upload's bytes are encrypted with the server's keyring before they reach the store
(screenshots show patient records and bank screens); they are decrypted only to be served
to a key that may see them (``services.runs``, ``services.human``).

A change that may let a run start (a machine back, a pool changed) wakes the scheduler on
every replica; one that changes what submit checks runs against (an enrolment, a pool)
drops the catalogue there too.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Protocol

from ..crypto import SecretBox, hash_key, same
from ..errors import InvalidInput, NotFound
from ..models import Artifact, Event, Machine, MachineAdmin, Pool
from ..pools import DEFAULT_READY_TIME, PoolPolicy

if TYPE_CHECKING:
    from ..store import Store
    from ..store.maintenance import Campaign
    from ..store.pools import PolicyVersion, PoolDemand
    from ..store.runner import StoreRunner

#: bytes above which an upload is encrypted in a worker thread
BIG = 256 << 10
#: seconds over which a pool's arrival rate is measured (for its warm buffer)
ARRIVAL_WINDOW = 300.0


class Changes(Protocol):
    """Who hears of a change here: the catalogue (``changed``) and dispatch (``wake``)."""

    def changed(self) -> None: ...


class Waker(Protocol):
    def wake(self, *, others: bool = False) -> None: ...


class Machines:
    def __init__(self, store: Store, db: StoreRunner, *, catalogue: Changes, dispatch: Waker,
                 secrets: SecretBox) -> None:
        self.store = store
        self.db = db
        self.secrets = secrets
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
                           data: bytes, redaction: dict[str, Any] | None = None,
                           retention: float | None = None) -> Artifact:
        """Store an upload, its bytes encrypted with the keyring's newest key; ``redaction``:
        what the agent blacked out (names); ``retention``: its automation's, in seconds."""
        box = self.secrets
        # Encrypting megabytes takes milliseconds: off the event loop, which serves the agents.
        sealed = box.seal(data) if len(data) < BIG else await asyncio.to_thread(box.seal, data)
        return await self.db(self.store.add_artifact, attempt_id=attempt_id, machine_id=machine_id, name=name,
                             content_type=content_type, data=sealed, size=len(data), now=time.time(),
                             encrypted_with=box.key_fingerprint(), redaction=redaction, retention=retention)

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

    async def events(self, machine_id: str, *, after_id: int, limit: int, tenant: str | None = None) -> list[Event]:
        return await self.db(self.store.events, machine_id=machine_id, after_id=after_id, limit=limit, tenant=tenant)

    async def samples(self, since: float, machine_ids: list[str] | None = None,
                      ) -> dict[str, list[tuple[float, float, float]]]:
        """Machines' figures over time (at, app memory MB, CPU %), oldest first."""
        return await self.db(self.store.machine_samples, since, machine_ids)

    async def counts(self) -> dict[str, int]:
        """Machines by status (busy, offline, quarantined, cordoned, drained, ready)."""
        return await self.db(self.store.count_machines)

    async def pools(self) -> list[Pool]:
        return await self.db(self.store.list_pools)

    async def pool(self, name: str) -> Pool | None:
        return await self.db(self.store.get_pool, name)

    # -- pool policies and demand ------------------------------------------------------------------
    async def pool_policy(self, name: str) -> tuple[int, PoolPolicy, PolicyVersion | None]:
        """The pool's policy in force: (version, policy, the stored version); a pool that never
        had one has version 0 and the defaults. NotFound for an unknown pool."""
        if await self.pool(name) is None:
            raise NotFound(f"no pool {name!r}")
        stored = await self.db(self.store.pool_policy, name)
        if stored is None:
            return 0, PoolPolicy(), None
        return stored.version, PoolPolicy.model_validate(stored.policy), stored

    async def pool_policy_history(self, name: str, limit: int = 50) -> list[PolicyVersion]:
        if await self.pool(name) is None:
            raise NotFound(f"no pool {name!r}")
        return await self.db(self.store.pool_policy_history, name, limit)

    async def put_pool_policy(self, name: str, policy: PoolPolicy, *, expected_version: int | None,
                              comment: str = "") -> PolicyVersion:
        made = await self.db(self.store.put_pool_policy, name, policy.model_dump(mode="json"),
                             expected_version=expected_version, comment=comment, now=time.time())
        self.dispatch.wake(others=True)
        return made

    async def start_maintenance(self, name: str, machine_ids: list[str] | None, reason: str = "") -> Campaign:
        """A rolling update of the pool's machines (the leader's pool controller carries it out)."""
        _, policy, _ = await self.pool_policy(name)
        if policy.provider is None:
            raise InvalidInput(f"pool {name!r} has no provider: maintenance updates and reboots machines through "
                               "the pool's provider; name one in its policy (provider)", field="pool")
        return await self.db(self.store.start_maintenance, name, machine_ids, reason=reason, now=time.time())

    async def maintenance(self, name: str, limit: int = 20) -> list[Campaign]:
        if await self.pool(name) is None:
            raise NotFound(f"no pool {name!r}")
        return await self.db(self.store.maintenance_campaigns, name, limit=limit)

    async def maintenance_campaign(self, name: str, campaign_id: int) -> Campaign:
        found = await self.db(self.store.maintenance_campaign, campaign_id)
        if found is None or found.pool != name:
            raise NotFound(f"no maintenance {campaign_id} in pool {name!r}")
        return found

    async def cancel_maintenance(self, name: str, campaign_id: int, reason: str = "") -> Campaign:
        return await self.db(self.store.cancel_maintenance, name, campaign_id, now=time.time(), reason=reason)

    async def demand(self, name: str) -> tuple[PoolDemand, int, PoolPolicy, int]:
        """What the pool's work asks for now: (demand, policy version, policy, target machines)."""
        version, policy, _ = await self.pool_policy(name)
        now = time.time()
        d = await self.db(self.store.pool_demand, name, now, ARRIVAL_WINDOW)
        target = policy.target(queued=d.queued, busy=d.busy, arrival_rate=d.arrival_rate, now=now,
                               ready_time=DEFAULT_READY_TIME)
        return d, version, policy, target
