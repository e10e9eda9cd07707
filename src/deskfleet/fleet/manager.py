"""The fleet manager's background loop: heartbeats, leases, timeouts, quarantine.

Every replica, each tick: write the heartbeats its agents sent since the last tick
(renewing their leases; an idle machine's beat only when it says something new or the last
one written is getting old) and its own heartbeat. The *leader* only — one replica at a time,
chosen by the store's leadership lock, taken over by another when it dies — then expires
the leases still past due (after the heartbeats, so a beat that arrived in time is never
outrun by the expiry sweep), quarantines silent machines, notices dead replicas, enforces
queue waits, deadlines, attempt timeouts and the progress watchdog, asks quarantined
machines to re-prove themselves. (Webhooks are delivered by ``services.webhooks``, on the
leader too: :attr:`FleetManager.leader_since`; artifacts past their retention are deleted by
:mod:`.retention`, in a task of its own beside the tick.)

When the database goes away, ticks fail and heartbeats wait in memory (agents keep being
acknowledged, so they keep working); when it comes back, the leader forgives the outage:
leases and the progress watchdog do not count the time the database could not record.

What the sweeps find that matters to runs (attempts lost or timed out, stop orders, runs
expired) goes to the services through the small :class:`Core` protocol.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Protocol

from ..errors import StoreUnavailable
from ..models import MachineHealth
from ..protocol import Stop
from .hub import Hub, RunListener
from .retention import Retention

if TYPE_CHECKING:
    from ..config import ServerSettings
    from ..crypto import SecretBox
    from ..store import Finished, Heartbeat, Leadership, Store
    from ..store.runner import StoreRunner

log = logging.getLogger(__name__)

RESEND_INTERVAL = 2.0  # seconds between re-sends of unconfirmed stop orders
#: an idle machine's heartbeat is written at least once in this share of the heartbeat timeout
REFRESH_SHARE = 0.3


class Core(RunListener, Protocol):
    """What the fleet manager calls on the orchestrator: what the hub tells it (lost and swept
    attempts, stop orders and expired runs are reported alike), plus hints to the other
    replicas (``fleet.bus``) and re-reading the keyring."""

    def hint(self, kind: str, payload: str = "") -> None: ...

    async def refresh_keys(self) -> None: ...

    def fence(self, lost: Finished) -> None:
        """Power the lost attempt's machine off through its pool's provider, then release the
        run held back for it (``Finished.fence == "provider"``); returns at once."""


class FleetManager:
    def __init__(self, store: Store, db: StoreRunner, settings: ServerSettings, hub: Hub, core: Core, *,
                 leadership: Leadership, secrets: SecretBox, replica_id: str, replica_name: str,
                 multi: bool) -> None:
        self.store = store
        self.db = db
        self.settings = settings
        self.hub = hub
        self.core = core
        self.leadership = leadership
        self.secrets = secrets
        self.replica_id = replica_id
        self.replica_name = replica_name
        self.multi = multi
        self._verified_at = 0.0
        self._resent_at = 0.0
        self._silence_checked_at = 0.0
        self._keys_checked_at = 0.0
        self._leases_swept_at = 0.0
        self._statistics_at = 0.0
        self._outage_since: float | None = None
        #: per machine, the last beat written: (at, attempt, session key, session expiry)
        self._written: dict[str, tuple[float, int | None, str | None, float | None]] = {}
        self.leader_since: float | None = None
        #: artifacts past their retention, deleted on the leader (in a task of its own: a
        #: long sweep must not delay the heartbeats the tick writes)
        self.retention = Retention(store, db, default=settings.artifact_retention,
                                   leads=lambda: self.leader_since is not None)

    def start(self) -> list[asyncio.Task[None]]:
        return [asyncio.create_task(self._tick_loop(), name="deskfleet-fleet"), self.retention.start()]

    async def _tick_loop(self) -> None:
        interval = self.settings.sweep_interval
        while True:
            await asyncio.sleep(interval)
            try:
                await self.tick()
                if self._outage_since is not None:
                    await self._outage_over()
            except asyncio.CancelledError:
                raise
            except StoreUnavailable as exc:
                if self._outage_since is None:
                    self._outage_since = time.time()
                    log.warning("database unavailable (%s); agents are still acknowledged, "
                                "their leases will be kept", exc)
            except Exception:
                log.exception("fleet tick failed; retrying next tick")

    async def _outage_over(self) -> None:
        since, self._outage_since = self._outage_since, None
        assert since is not None
        log.warning("database back after %.1fs", time.time() - since)
        if await self._lead():
            await self.db(self.store.recover, time.time(), self.settings.lease_timeout, disconnect=False)

    async def _lead(self) -> bool:
        """Whether this replica leads now (taking leadership if it is free)."""
        held = await asyncio.to_thread(self.leadership.try_acquire)
        if held and self.leader_since is None:
            self.leader_since = time.time()
            (log.warning if self.multi else log.info)("this replica (%s) is now the leader", self.replica_name)
            await self.db(self.store.record_event, "replica.leader", time.time(),
                           data={"replica": self.replica_id, "name": self.replica_name})
        elif not held and self.leader_since is not None:
            self.leader_since = None
            log.warning("this replica lost the leadership")
        return held

    def _worth_writing(self, beats: list[Heartbeat]) -> list[Heartbeat]:
        """The beats the database must see now. An idle machine's beat that says nothing new
        only renews its ``last_heartbeat_at``: written once in :data:`REFRESH_SHARE` of the
        heartbeat timeout, it is never old enough to look silent, and a big idle fleet's
        heartbeats cost a fraction of the writes (each a row the scheduler's transactions
        wait behind). Written every time: a beat naming an attempt (its lease is renewed),
        the first after one that did (an account's reservation settles on it), any whose
        session changed, and one the hub marked as a sample of the machine's figures (one a
        ``sample_interval``: else an idle machine's trend keeps only the samples that fell on
        a refresh); the machine's other figures (``resources``) go with the next one
        written. The hub, which holds the connection, still sees every beat and closes a
        silent agent's connection at the timeout itself."""
        every = REFRESH_SHARE * self.settings.heartbeat_timeout
        written = self._written
        out = []
        for b in beats:
            last = written.get(b.machine_id)
            if (last is None or b.attempt_id is not None or b.sessions_changed or b.sample or b.at - last[0] >= every
                    or last[1:] != (b.attempt_id, b.session_key, b.session_expires_at)):
                out.append(b)
        return out

    async def tick(self) -> None:
        store, s = self.store, self.settings
        beats, seqs = self.hub.drain_heartbeats()
        if beats:
            due = self._worth_writing(beats)
            try:
                held = await self.db(store.heartbeat, due, s.lease_timeout) if due else {}
            except Exception:
                self.hub.requeue_heartbeats(beats, seqs)  # written (and acknowledged) by the next tick that can
                raise
            for b in due:
                self._written[b.machine_id] = (b.at, b.attempt_id, b.session_key, b.session_expires_at)
            unheld = [machine_id for machine_id, ok in held.items() if not ok]
            for machine_id in unheld:
                seqs.pop(machine_id, None)  # it renewed nothing: no acknowledgement, a stop order
            await self.hub.acknowledge(seqs)
            if unheld:
                named = {b.machine_id: b.attempt_id for b in due}
                for machine_id in unheld:
                    attempt_id = named[machine_id]
                    assert attempt_id is not None
                    await self.hub.send(machine_id, Stop(attempt_id=attempt_id, reason="lease_lost"))
        now = time.time()
        if now - self._silence_checked_at >= 1.0:
            self._silence_checked_at = now
            await self.hub.close_silent(now, s.heartbeat_timeout)
        if now - self._keys_checked_at >= 1.0:
            self._keys_checked_at = now
            await self.core.refresh_keys()
        if not await self.db(store.replica_alive, self.replica_id, self.replica_name, now,
                               self.secrets.key_fingerprint()):
            # The leader took this replica for dead (it was silent too long) and marked its
            # agents disconnected: let them reconnect, so that the database knows them again.
            log.warning("this replica was presumed dead and reaped; its agents will reconnect")
            await self.hub.close_all()
        if now - self._resent_at >= RESEND_INTERVAL:
            # Stop orders whose hint may have been lost on the way to this replica.
            self._resent_at = now
            for order in await self.db(store.pending_stops, replica=self.replica_id):
                await self.hub.send(order.machine_id, Stop(attempt_id=order.attempt_id, reason=order.reason.value))
        if not await self._lead():
            return
        await self.db(store.reap_replicas, now, max(s.heartbeat_timeout, 10 * s.sweep_interval))
        lost = await self.db(store.expire_leases, now)
        for f in lost:
            log.warning("lease expired: attempt lost → run %s", f.run.state.value,
                        extra={"run": f.run.id, "attempt": f.attempt.id, "machine": f.attempt.machine_id})
            if not await self.hub.send(f.attempt.machine_id, Stop(attempt_id=f.attempt.id, reason="lease_lost")):
                self.core.hint("stop", f"{f.attempt.machine_id}:{f.attempt.id}:lease_lost")
        for f in lost:
            if f.fence == "provider":
                self.core.fence(f)
        if lost:
            self.core.after_finished(lost)
        await self.db(store.expire_silent_machines, now, s.heartbeat_timeout)
        if now - self._statistics_at >= 1.0:
            # The planner's view of the tables a scheduling pass reads (store.sql).
            self._statistics_at = now
            await self.db(store.refresh_statistics)
        if now - self._leases_swept_at >= 1.0:
            # Account leases of silent machines, and of logins that did not happen.
            self._leases_swept_at = now
            for lease in await self.db(store.sweep_account_leases, now, s.heartbeat_timeout, s.heartbeat_interval):
                log.info("account lease released: %s", lease.account, extra={"machine": lease.machine_id})
        swept = await self.db(store.sweep, now, s.stop_grace)
        for order in swept.stop_orders:
            await self.core.send_stop(order)
        for run in swept.expired_runs:
            self.core.run_changed(run)
        if swept.finished:
            self.core.after_finished(swept.finished)
        await self._verify_quarantined(now)

    async def _verify_quarantined(self, now: float) -> None:
        """Ask connected, quarantined machines to re-prove their state, now and then."""
        if now - self._verified_at < self.settings.verify_interval:
            return
        self._verified_at = now
        hub = self.hub
        for m in await self.db(self.store.list_machines, health=MachineHealth.QUARANTINED):
            if not m.connected or m.active_attempt_id is not None:
                continue
            conn = hub.connections.get(m.id)
            if conn is None:
                self.core.hint("verify", f"{m.id}:{m.quarantine_reason or ''}")  # another replica's agent
            elif now - conn.verify_sent_at >= self.settings.verify_interval:
                await hub.request_verify(conn, m.quarantine_reason or "")
