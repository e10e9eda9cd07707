"""The catalogue submit checks a run against: automations (as agents advertised them), pools
and the shapes of enrolled machines. Re-reading every machine per submit would cost more
than the submit, so pools and shapes are cached for a moment and automation specs until
something changes; a change here (or a hint from another replica) drops the caches at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..models import AutomationSpec, MachineShape, Pool
from .replicas import Hints

if TYPE_CHECKING:
    from ..store import Store
    from ..store.runner import StoreRunner

CATALOG_TTL = 2.0  # seconds; enrolments and pool changes invalidate it at once


class Catalogue:
    """``forget_accounts`` drops the vault's own cache of accounts along with this one."""

    def __init__(self, store: Store, db: StoreRunner, replicas: Hints, *,
                 forget_accounts: Callable[[], None]) -> None:
        self.store = store
        self.db = db
        self.replicas = replicas
        self._forget_accounts = forget_accounts
        self._specs: dict[tuple[str, str | None], AutomationSpec | None] = {}
        self._catalog: tuple[float, dict[str, Pool], list[MachineShape]] | None = None

    async def spec_for(self, name: str, version: str | None) -> AutomationSpec | None:
        key = (name, version)
        spec = self._specs.get(key)
        if spec is None:
            spec = await self.db(self.store.get_automation, name, version)
            if spec is not None:
                self._specs[key] = spec
        return spec

    async def automations(self) -> list[AutomationSpec]:
        return await self.db(self.store.list_automations)

    async def pools_and_shapes(self) -> tuple[dict[str, Pool], list[MachineShape]]:
        now = time.monotonic()
        if self._catalog is None or now - self._catalog[0] > CATALOG_TTL:
            pools = {p.name: p for p in await self.db(self.store.list_pools)}
            self._catalog = (now, pools, await self.db(self.store.machine_shapes))
        return self._catalog[1], self._catalog[2]

    def forget(self) -> None:
        """Agents advertised automations, or machines or pools changed: drop the caches."""
        self._specs.clear()
        self._catalog = None
        self._forget_accounts()

    def changed(self) -> None:
        """What submit checks runs against changed (automations offered, machines, pools,
        accounts): drop the caches, here and on the other replicas."""
        self.forget()
        self.replicas.hint("catalog")
