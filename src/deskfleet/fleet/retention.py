"""The retention sweep: artifacts (screenshots, files automations attach) past their
retention are deleted, on the leader only — and machines' samples older than a day.

Each artifact's retention is, first, its automation's own (``@automation(...,
artifact_retention="7d")``, sent by the agent with each upload); else its pool's policy
(``artifacts.retention``, read afresh at each sweep: shortening it applies to what is
already stored); else the server's ``--artifact-retention``. Zero keeps them for good.

A sweep deletes in batches of :data:`BATCH`, each one short transaction, pausing between
them, and at most :data:`MAX_BATCHES` batches a sweep: a backlog (the first sweep after an
upgrade, a retention just shortened) is worked off over several sweeps rather than holding
the database. It runs in a task of its own, beside the fleet manager's tick, so that a long
sweep never delays the heartbeats the tick writes. It records one ``artifacts.expired``
event per sweep that deleted anything — counts, never an event per artifact. Runs stay: a
run's timeline outlives its screenshots, whose links then answer 404.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import StoreUnavailable
from ..pools import PoolPolicy

if TYPE_CHECKING:
    from ..store import Store
    from ..store.runner import StoreRunner

log = logging.getLogger(__name__)

INTERVAL = 60.0  # seconds between sweeps
BATCH = 200  # artifacts deleted per transaction
MAX_BATCHES = 50  # per sweep: a backlog is worked off over several sweeps
PAUSE = 0.05  # seconds between two batches: other writers get the database in between
SAMPLES_KEPT = 86400.0  # seconds of machines' samples (app memory, CPU) kept for the dashboard


@dataclass(slots=True)
class Swept:
    deleted: int = 0
    bytes: int = 0
    batches: int = 0
    more: bool = False  # stopped at MAX_BATCHES: the next sweep goes on


class Retention:
    """Deletes expired artifacts while ``leads()`` says this replica is the leader."""

    def __init__(self, store: Store, db: StoreRunner, *, default: float, leads: Callable[[], bool],
                 interval: float = INTERVAL, batch: int = BATCH, max_batches: int = MAX_BATCHES) -> None:
        self.store = store
        self.db = db
        self.default = default  # seconds (0: for good)
        self.leads = leads
        self.interval = interval
        self.batch = batch
        self.max_batches = max_batches

    def start(self) -> asyncio.Task[None]:
        return asyncio.create_task(self._loop(), name="deskfleet-retention")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if not self.leads():
                continue
            try:
                now = time.time()
                await self.sweep(now)
                await self.db(self.store.prune_machine_samples, now - SAMPLES_KEPT)
            except asyncio.CancelledError:
                raise
            except StoreUnavailable:
                pass  # the fleet manager reports the outage; the next sweep catches up
            except Exception:
                log.exception("artifact retention sweep failed; retrying at the next one")

    async def pools(self) -> dict[str, float | None]:
        """Each pool whose policy sets ``artifacts.retention``: its seconds (0: for good)."""
        out: dict[str, float | None] = {}
        for pool in await self.db(self.store.list_pools):
            stored = await self.db(self.store.pool_policy, pool.name)
            if stored is None:
                continue
            seconds = PoolPolicy.model_validate(stored.policy).artifacts.retention_seconds
            if seconds is not None:
                out[pool.name] = seconds
        return out

    async def sweep(self, now: float) -> Swept:
        """One sweep as of ``now`` (a fake clock in tests): batches until none is left or
        :attr:`max_batches` were deleted; one event if anything went."""
        pools = await self.pools()
        done = Swept()
        while done.batches < self.max_batches:
            batch = await self.db(self.store.expire_artifacts, now, default=self.default or None, pools=pools,
                                  limit=self.batch)
            if batch.deleted == 0:
                break
            done.deleted += batch.deleted
            done.bytes += batch.bytes
            done.batches += 1
            if batch.deleted < self.batch:
                break
            await asyncio.sleep(PAUSE)
        else:
            done.more = True
        if done.deleted:
            log.info("retention: %d artifacts (%d bytes) deleted in %d batches%s", done.deleted, done.bytes,
                     done.batches, "; more next sweep" if done.more else "")
            await self.db(self.store.record_event, "artifacts.expired", time.time(), data={
                "deleted": done.deleted, "bytes": done.bytes, "batches": done.batches, "more": done.more,
                "retention": {"default": self.default, "pools": dict(sorted(pools.items()))}})
        return done
