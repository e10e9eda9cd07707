"""Packs on the fleet: published versions, a pool's assigned version and its rollouts, and the
``install`` order to an agent wherever it is connected.

Publishing checks the archive (``deskfleet.packfile``: a zip made by ``deskfleet pack
build``, whole, with a manifest and the build's metadata, and the sha256 the publisher
computed, if given) and registers the pack's automations in the catalogue: a pool with no
machine yet (an autoscaled pool before its first) accepts runs of them. The archive is kept
in the database, so any replica serves it to agents. The pack's code never runs here.

Assigning a version starts a rollout, which the leader carries out (``fleet.rollout``); a
rollback assigns the version the pool ran before.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from pydantic import ValidationError

from .. import packfile
from ..errors import InvalidInput, NotFound
from ..models import AutomationSpec
from ..protocol import AutomationAd, Install

if TYPE_CHECKING:
    from ..store import Store
    from ..store.packs import PackRecord, Rollout
    from ..store.runner import StoreRunner

log = logging.getLogger(__name__)

#: the protocol an agent must speak to be sent ``install``
INSTALL_PROTOCOL = 6


class AgentLink(Protocol):
    protocol: int

    async def send(self, msg: Any) -> bool: ...


class Agents(Protocol):
    """The agents connected to this replica (the hub)."""

    @property
    def connections(self) -> Mapping[str, AgentLink]: ...


class Hints(Protocol):
    def hint(self, kind: str, payload: str = "") -> None: ...


class Changes(Protocol):
    def changed(self) -> None: ...


def archive_url(pack: str, version: str) -> str:
    """Where an agent downloads a version's archive (relative to the orchestrator)."""
    return f"/agent/v1/packs/{pack}/{version}/archive"


class Packs:
    def __init__(self, store: Store, db: StoreRunner, *, agents: Agents, replicas: Hints, catalogue: Changes) -> None:
        self.store = store
        self.db = db
        self.agents = agents
        self.replicas = replicas
        self.catalogue = catalogue
        self._orders: set[Any] = set()

    # -- published packs ---------------------------------------------------------------------------
    async def publish(self, data: bytes, *, sha256: str | None = None) -> tuple[PackRecord, bool]:
        """Check and store an archive; (the record, whether this version is new)."""
        if not data:
            raise InvalidInput("the request body is empty: send the archive (deskfleet pack build makes it)",
                               field="archive")
        info = packfile.read(data, expected_sha256=sha256)
        specs = []
        for raw in info.automations:
            try:
                ad = AutomationAd.model_validate(raw)
            except ValidationError as exc:
                raise InvalidInput(f"the archive's {packfile.META} describes automation {raw.get('name')!r} "
                                   f"wrongly: {exc.errors()[0]['msg']}; build it again", field="archive") from None
            specs.append(AutomationSpec(**{**ad.model_dump(), "pack": info.name}))
        record, created = await self.db(self.store.publish_pack, info.name, info.version, sha256=info.sha256,
                                        manifest=info.manifest, automations=specs, archive=data, now=time.time())
        if created:
            log.info("pack %s %s published (%d bytes, %d automations)", info.name, info.version, info.size, len(specs))
            self.catalogue.changed()
        return record, created

    async def published(self, name: str | None = None) -> list[PackRecord]:
        return await self.db(self.store.list_packs, name)

    async def get(self, name: str, version: str) -> PackRecord:
        found = await self.db(self.store.get_pack, name, version)
        if found is None:
            raise NotFound(f"no pack {name} {version} is published")
        return found

    async def archive(self, name: str, version: str) -> tuple[PackRecord, bytes]:
        found = await self.db(self.store.pack_archive, name, version)
        if found is None:
            raise NotFound(f"no pack {name} {version} is published")
        return found

    # -- assignments and rollouts ------------------------------------------------------------------
    async def assign(self, pool: str, pack: str, version: str | None, *, max_unavailable: str | None,
                     reason: str = "", rollback: bool = False) -> Rollout:
        return await self.db(self.store.assign_pack, pool, pack, version, max_unavailable=max_unavailable,
                             reason=reason, rollback=rollback, now=time.time())

    async def assignments(self, pool: str) -> dict[str, Rollout]:
        if await self.db(self.store.get_pool, pool) is None:
            raise NotFound(f"no pool {pool!r}")
        return await self.db(self.store.pool_packs, pool)

    async def rollouts(self, pool: str, pack: str | None = None, limit: int = 20) -> list[Rollout]:
        return await self.db(self.store.pack_rollouts, pool, pack, limit=limit)

    async def rollout(self, pool: str, rollout_id: int) -> Rollout:
        found = await self.db(self.store.pack_rollout, rollout_id)
        if found is None or found.pool != pool:
            raise NotFound(f"no rollout {rollout_id} in pool {pool!r}")
        return found

    # -- orders to agents --------------------------------------------------------------------------
    def install(self, machine_id: str, record: PackRecord, reason: str = "") -> None:
        """Tell a machine's agent to install ``record`` (here, or through the replica that
        holds its connection). An agent older than protocol 6 is not told."""
        order = Install(pack=record.name, version=record.version, sha256=record.sha256, size=record.size,
                        url=archive_url(record.name, record.version), reason=reason)
        payload = orjson.dumps({"machine": machine_id, **order.model_dump()}).decode()
        if machine_id in self.agents.connections:
            self.install_hinted(payload)
        else:
            self.replicas.hint("install", payload)

    def install_hinted(self, payload: str) -> None:
        import asyncio

        try:
            data = orjson.loads(payload)
            machine_id = data.pop("machine")
            order = Install.model_validate(data)
        except (orjson.JSONDecodeError, KeyError, ValidationError):
            return
        conn = self.agents.connections.get(machine_id)
        if conn is None or conn.protocol < INSTALL_PROTOCOL:
            return
        task = asyncio.get_running_loop().create_task(conn.send(order))
        self._orders.add(task)
        task.add_done_callback(self._orders.discard)
