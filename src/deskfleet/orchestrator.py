"""The composition root: what the API server runs, built and wired in one place.

One :class:`Orchestrator` per server process. It builds the store and its runner, the
keyring and the vault, the agent hub, the fleet manager and the services
(``deskfleet.services``: runs, dispatch, finals, machines and pools, the catalogue, keys,
webhooks, human tasks, packs and their rollouts, hints between replicas), hands each only what it needs, and starts and stops them. It holds no
logic of its own beyond that: client requests reach the services through the API, agent
messages reach them through the hub, and nothing calls back on the orchestrator.

The parts below never import it. What the hub and the fleet manager call back
(``fleet.hub.RunListener``, ``fleet.manager.Core``) is :class:`Callbacks`, which hands each
call to the service whose job it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterable

from .config import ServerSettings, is_loopback
from .crypto import SecretBox
from .errors import ConfigError
from .fleet.bus import LocalBus, PgBus
from .fleet.controller import Controller
from .fleet.hub import Hub
from .fleet.manager import FleetManager
from .fleet.rollout import Rollouts
from .metrics import Metrics
from .models import Assignment, Run, StopOrder
from .providers import MachineProvider
from .providers.configure import open_providers
from .scheduler import DurationBook, Policy
from .services.access import Access
from .services.catalog import Catalogue
from .services.dispatch import Dispatch
from .services.finals import Finals
from .services.human import HumanDesk
from .services.keys import Keyring
from .services.machines import Machines
from .services.packs import Packs
from .services.replicas import Replicas
from .services.runs import Runs
from .services.webhooks import Webhooks
from .store import Finished, Store, is_postgres, open_leadership, open_store
from .store.runner import StoreRunner
from .vault import Vault

log = logging.getLogger(__name__)


class Callbacks:
    """What the hub and the fleet manager tell the services (``fleet.hub.RunListener``,
    ``fleet.manager.Core``), each call handed to the one whose job it is. Built empty and
    filled once the services exist: the hub is built before dispatch, which sends through it."""

    dispatch: Dispatch
    finals: Finals
    catalogue: Catalogue
    replicas: Replicas
    keys: Keyring
    controller: Controller

    async def send_assignment(self, a: Assignment) -> None:
        await self.dispatch.send_assignment(a)

    async def send_stop(self, order: StopOrder) -> None:
        await self.dispatch.send_stop(order)

    def after_finished(self, items: Iterable[Finished]) -> None:
        self.dispatch.after_finished(items)

    def wake(self, *, others: bool = False) -> None:
        self.dispatch.wake(others=others)

    def run_changed(self, run: Run) -> None:
        self.finals.run_changed(run)

    def catalog_changed(self) -> None:
        self.catalogue.changed()

    def accounts_changed(self) -> None:
        """The vault changed: submit checks must see it, and runs that waited for an
        account may fit now."""
        self.catalogue.changed()
        self.dispatch.wake(others=True)

    def hint(self, kind: str, payload: str = "") -> None:
        self.replicas.hint(kind, payload)

    async def refresh_keys(self) -> None:
        await self.keys.refresh()

    def fence(self, lost: Finished) -> None:
        self.controller.fence_soon(lost)


class Orchestrator:
    def __init__(self, settings: ServerSettings, *, store: Store | None = None, policy: Policy | None = None,
                 providers: dict[str, MachineProvider] | None = None) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        # -- state, and the server's identity -------------------------------------------------------
        self.store = store or open_store(settings.db_url, sqlite_synchronous=settings.sqlite_synchronous)
        self.multi = is_postgres(settings.db_url)  # replicas on one database, or the embedded store alone
        self.db = StoreRunner(self.store, threads=4 if self.multi else 1)
        self.secrets = SecretBox.from_file(settings.secret_key_file or settings.data_dir / "secret.key")
        self.enrolment_token = settings.resolve_enrolment_token()
        self.policy = policy or Policy()
        if self.policy.durations is None and settings.backlog_order == "longest-first":
            self.policy.durations = DurationBook()  # learnt from every attempt that succeeds
        self.metrics = Metrics()
        # Each process is a replica with an identity of its own; with SQLite there is one.
        self.replica_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.replica_name = f"{socket.gethostname()}:{settings.port}"
        self.leadership = open_leadership(settings.db_url)
        self.bus: LocalBus | PgBus = PgBus(settings.db_url, self.replica_id) if self.multi else LocalBus()

        # -- the parts, bottom up ----------------------------------------------------------------------
        calls = self.callbacks = Callbacks()
        self.replicas = calls.replicas = Replicas(self.bus, multi=self.multi)
        self.keys = calls.keys = Keyring(self.store, self.db, self.secrets)
        self.vault = Vault(self.store, self.db, self.secrets, on_change=calls.accounts_changed)
        self.catalogue = calls.catalogue = Catalogue(self.store, self.db, self.replicas,
                                                     forget_accounts=self.vault.forget)
        self.finals = calls.finals = Finals(self.replicas, multi=self.multi)
        self.hub = Hub(self.store, self.db, settings, replica_id=self.replica_id, metrics=self.metrics,
                       vault=self.vault, runs=calls)
        self.dispatch = calls.dispatch = Dispatch(
            self.store, self.db, settings, policy=self.policy, agents=self.hub, grants=self.vault,
            secrets=self.secrets, metrics=self.metrics, finals=self.finals, replicas=self.replicas,
            replica_id=self.replica_id)
        self.runs = Runs(self.store, self.db, specs=self.catalogue, accounts=self.vault, dispatch=self.dispatch,
                         finals=self.finals, secrets=self.secrets, multi=self.multi)
        self.machines = Machines(self.store, self.db, catalogue=self.catalogue, dispatch=self.dispatch,
                                 secrets=self.secrets)
        self.fleet = FleetManager(self.store, self.db, settings, self.hub, calls, leadership=self.leadership,
                                  secrets=self.secrets, replica_id=self.replica_id, replica_name=self.replica_name,
                                  multi=self.multi)
        self.webhooks = Webhooks(self.store, self.db, settings, leads=lambda: self.fleet.leader_since is not None)
        self.human = HumanDesk(self.store, self.db, settings, secrets=self.secrets, agents=self.hub,
                               stops=self.dispatch, replicas=self.replicas,
                               leads=lambda: self.fleet.leader_since is not None)
        self.hub.human = self.human
        self.providers = providers if providers is not None else open_providers(settings.providers,
                                                                                data_dir=settings.data_dir,
                                                                                updates=settings.provider_updates)
        self.controller = calls.controller = Controller(
            self.store, self.db, self.providers, tick=settings.controller_tick,
            leads=lambda: self.fleet.leader_since is not None, wake=lambda: calls.wake(others=True),
            recycle=self.dispatch.recycle)
        self.packs = Packs(self.store, self.db, agents=self.hub, replicas=self.replicas, catalogue=self.catalogue)
        self.access = Access(self.store, self.db, bootstrap=settings.api_key,
                             open_when_keyless=is_loopback(settings.host))
        self.rollouts = Rollouts(self.store, self.db, leads=lambda: self.fleet.leader_since is not None,
                                 install=self.packs.install, tick=settings.controller_tick)
        # -- what other replicas' hints mean here --------------------------------------------------------
        self.replicas.on("wake", self.dispatch.woken)
        self.replicas.on("final", self.finals.resolve)
        self.replicas.on("catalog", lambda _payload: self.catalogue.forget())
        self.replicas.on("stop", self.dispatch.stop_hinted)
        self.replicas.on("verify", self.dispatch.verify_hinted)
        self.replicas.on("recycle", self.dispatch.recycle_hinted)
        self.replicas.on("human", self.human.answer_hinted)
        self.replicas.on("install", self.packs.install_hinted)

        self._tasks: list[asyncio.Task[None]] = []
        self._prepared = False

    # -- lifecycle ---------------------------------------------------------------------------
    def prepare(self) -> None:
        """Checks that must pass before serving (the CLI runs them first, to fail with one
        clear line rather than a server that dies while starting)."""
        if self._prepared:
            return
        if not self.multi and not self.leadership.try_acquire():
            # The embedded store serves one orchestrator: be it, or refuse to start.
            raise ConfigError(
                f"another deskfleet server is using {self.settings.db_url}; the embedded SQLite "
                "store serves one orchestrator (use PostgreSQL for several)"
            )
        self.keys.prepare()
        self._prepared = True

    async def start(self) -> None:
        await self.db(self.prepare)
        if not self.multi:
            leases = await self.db(self.store.recover, time.time(), self.settings.heartbeat_timeout)
            if leases:
                log.info("recovered %d active leases; agents have %.0fs to reconnect",
                         leases, self.settings.heartbeat_timeout)
        await self.db(self.store.replica_alive, self.replica_id, self.replica_name, time.time(),
                      self.secrets.key_fingerprint())
        await self.replicas.start()
        self._tasks = [self.dispatch.start(), *self.fleet.start(), self.webhooks.start(), self.controller.start(),
                       self.human.start(), self.rollouts.start()]

    async def stop(self) -> None:
        self.dispatch.stop()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.hub.close_all()
        with contextlib.suppress(Exception):  # a database that is down cannot be told
            await self.db(self.store.leave, self.replica_id, time.time())
        await self.replicas.close()
        self.leadership.release()
        self.db.close()
        self.store.close()
