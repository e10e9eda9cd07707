"""The orchestrator: what the API server runs — store, scheduler, agent hub, fleet loops.

One :class:`Orchestrator` per server process. Client requests (through ``api``) and agent
messages (through ``fleet.hub``) arrive on the event loop; every durable change goes
through the store on its worker thread; every change that may free a machine or queue a
run wakes the scheduler, so dispatch waits for no polling interval.

It is the composition root: it builds the store runner, the vault, the hub and the fleet
manager and hands each what it needs. They never import it; what they call back on it is
a small protocol each defines (``fleet.hub.RunListener``, ``fleet.manager.Core``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import jsonschema
import orjson

from .config import ServerSettings
from .crypto import SecretBox, legacy_mac_key, redact
from .errors import (
    ConfigError,
    InvalidInput,
    InvalidRequest,
    NotFound,
    StoreUnavailable,
    Unservable,
)
from .fleet.bus import LocalBus, PgBus
from .fleet.hub import Hub
from .fleet.manager import FleetManager
from .metrics import Metrics
from .models import (
    Assignment,
    AutomationSpec,
    Ending,
    Machine,
    MachineAdmin,
    MachineShape,
    Pool,
    Run,
    RunSpec,
    StopOrder,
)
from .protocol import Assign, Stop
from .scheduler import DurationBook, Policy, serviceable
from .store import Finished, Store, is_postgres, open_leadership, open_store
from .store.runner import StoreRunner
from .vault import Vault

log = logging.getLogger(__name__)

CATALOG_TTL = 2.0  # seconds; enrolments and pool changes invalidate it at once


class Orchestrator:
    def __init__(self, settings: ServerSettings, *, store: Store | None = None, policy: Policy | None = None) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = store or open_store(settings.db_url, sqlite_synchronous=settings.sqlite_synchronous)
        self.db = StoreRunner(self.store, threads=4 if is_postgres(settings.db_url) else 1)
        self.secrets = SecretBox.from_file(settings.secret_key_file or settings.data_dir / "secret.key")
        self.vault = Vault(self.store, self.db, self.secrets, on_change=self._accounts_changed)
        self.enrolment_token = settings.resolve_enrolment_token()
        self.policy = policy or Policy()
        if self.policy.durations is None and settings.backlog_order == "longest-first":
            self.policy.durations = DurationBook()  # learnt from every attempt that succeeds
        self.metrics = Metrics()
        # Each process is a replica with an identity of its own; with SQLite there is one.
        self.replica_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.replica_name = f"{socket.gethostname()}:{settings.port}"
        self.multi = is_postgres(settings.db_url)
        self.leadership = open_leadership(settings.db_url)
        self.bus: LocalBus | PgBus = PgBus(settings.db_url, self.replica_id) if self.multi else LocalBus()
        self._hints: set[asyncio.Task[Any]] = set()
        self._prepared = False
        self._woke_others_at = 0.0
        self.hub = Hub(self.store, self.db, settings, replica_id=self.replica_id, metrics=self.metrics,
                       vault=self.vault, runs=self)
        self.fleet = FleetManager(self.store, self.db, settings, self.hub, self, leadership=self.leadership,
                                  secrets=self.secrets, replica_id=self.replica_id, replica_name=self.replica_name,
                                  multi=self.multi)
        self._wake = asyncio.Event()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._specs: dict[tuple[str, str | None], AutomationSpec | None] = {}
        # What submit checks a request against (pools, enrolled machines), cached for a
        # moment: re-reading every machine per submit would cost more than the submit.
        self._catalog: tuple[float, dict[str, Pool], list[MachineShape]] | None = None

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
        if not self.store.claim_key(self.secrets.fingerprints):
            missing = [f[:8] for f in self.store.keys_in_use() if f not in self.secrets.fingerprints]
            raise ConfigError(
                "this server's secret keys do not include every key that encrypted the secrets already "
                f"in the database (missing: {', '.join(missing)}); every replica needs the same keyring "
                "(--secret-key-file), and a key may leave it only after 'deskfleet keys rotate' "
                "re-encrypted everything (docs/credentials.md)"
            )
        # Request fingerprints (idempotency) use a key of their own, kept in the database, so
        # that rotating the encryption key leaves them valid.
        box = self.secrets
        token = self.store.fingerprint_key(lambda: box.encrypt_bytes(legacy_mac_key(box.keys[0])))
        box.set_mac_key(box.decrypt_bytes(token))
        self._prepared = True

    async def refresh_keys(self) -> None:
        """Re-read the key file if it changed (a rotation in progress): the newest key
        encrypts from now on — once the database counts it among the keys in use. A file
        that lost a key still in use is refused, and the keys read before stay."""
        try:
            fresh = self.secrets.changed_file()
        except ConfigError as exc:
            log.error("the secret key file changed but cannot be used (%s); still using the keys read before", exc)
            return
        if fresh is None:
            return
        if not await self.db(self.store.claim_key, fresh.fingerprints):
            log.error("the secret key file no longer holds every key that encrypted stored secrets; still "
                      "using the keys read before (a key may leave only after 'deskfleet keys rotate')")
            return
        self.secrets.adopt(fresh)
        log.warning("secret keys re-read: %d keys, encrypting with %s…", len(fresh.fingerprints),
                    fresh.key_fingerprint()[:8])

    async def start(self) -> None:
        await self.db(self.prepare)
        if not self.multi:
            leases = await self.db(self.store.recover, time.time(), self.settings.heartbeat_timeout)
            if leases:
                log.info("recovered %d active leases; agents have %.0fs to reconnect",
                         leases, self.settings.heartbeat_timeout)
        await self.db(self.store.replica_alive, self.replica_id, self.replica_name, time.time(),
                      self.secrets.key_fingerprint())
        await self.bus.start(self._on_hint)
        self._tasks = [
            asyncio.create_task(self._schedule_loop(), name="deskfleet-scheduler"),
            *self.fleet.start(),
        ]

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.hub.close_all()
        with contextlib.suppress(Exception):  # a database that is down cannot be told
            await self.db(self.store.leave, self.replica_id, time.time())
        await self.bus.close()
        self.leadership.release()
        self.db.close()
        self.store.close()

    def wake(self, *, others: bool = False) -> None:
        """Run the scheduler now (and, with ``others``, on the other replicas too)."""
        self._wake.set()
        if others:
            self.hint("wake")

    def hint(self, kind: str, payload: str = "") -> None:
        """Tell the other replicas (see fleet.bus); never waits, never fails the caller."""
        if not self.multi:
            return
        task = asyncio.get_running_loop().create_task(self.bus.publish(kind, payload))
        self._hints.add(task)
        task.add_done_callback(self._hints.discard)

    def _on_hint(self, kind: str, payload: str) -> None:
        if kind == "wake":
            self._wake.set()
        elif kind == "final":
            self._resolve_waiters(payload)
        elif kind == "catalog":
            self.forget_specs()
        elif kind in ("stop", "verify"):
            machine_id, _, rest = payload.partition(":")
            conn = self.hub.connections.get(machine_id)
            if conn is None:
                return
            task: asyncio.Task[Any]
            if kind == "verify":
                task = asyncio.get_running_loop().create_task(self.hub.request_verify(conn, rest))
            else:
                attempt, _, reason = rest.partition(":")
                task = asyncio.get_running_loop().create_task(conn.send(Stop(attempt_id=int(attempt), reason=reason)))
            self._hints.add(task)
            task.add_done_callback(self._hints.discard)

    # -- scheduling --------------------------------------------------------------------------
    async def _schedule_loop(self) -> None:
        limit = 500
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.settings.schedule_tick)
            self._wake.clear()
            try:
                t0 = time.perf_counter()
                assignments = await self.db(
                    self.store.schedule, self.policy, time.time(), self.settings.lease_timeout, limit,
                    self.replica_id,
                )
                self.metrics.schedule_seconds.observe(time.perf_counter() - t0)
            except StoreUnavailable as exc:
                log.warning("scheduling paused: %s", exc)
                await asyncio.sleep(max(1.0, self.settings.schedule_tick))
                continue
            except Exception:
                log.exception("scheduling pass failed; retrying")
                await asyncio.sleep(self.settings.schedule_tick)
                continue
            for a in assignments:
                await self.send_assignment(a)
            if len(assignments) >= limit:
                self._wake.set()
            now = time.monotonic()
            if getattr(assignments, "unclaimed", 0) and now - self._woke_others_at >= self.settings.schedule_tick:
                # Runs this replica held but could not place: another replica's machines may
                # fit them, and it skipped them while we held them. (At most one such hint
                # per tick: two replicas with unplaceable runs must not ping-pong.)
                self._woke_others_at = now
                self.hint("wake")

    async def send_assignment(self, a: Assignment) -> None:
        self.metrics.assigned.inc()
        spec = a.spec
        data = self.secrets.decrypt_fields(a.run.input, spec.secret_fields if spec else ())
        msg = Assign(
            attempt_id=a.attempt.id,
            run_id=a.run.id,
            attempt_number=a.attempt.number,
            automation=a.run.automation,
            version=a.run.version,
            mode=a.attempt.mode.value,
            input=data,
            required_state=spec.required_state if spec else "ready",
            session_key=a.run.session_key,
            attempt_timeout=a.run.attempt_timeout,
            progress_timeout=a.run.progress_timeout,
            account=self.vault.grant(a.account) if a.account is not None else None,
        )
        log.info("assigned attempt %d (%s)", a.attempt.id, a.run.automation,
                 extra={"run": a.run.id, "attempt": a.attempt.id, "machine": a.attempt.machine_id})
        await self.hub.send_assignment(a.attempt.machine_id, msg)

    async def send_stop(self, order: StopOrder) -> None:
        log.info("telling the agent to stop: %s", order.reason.value,
                 extra={"run": order.run_id, "attempt": order.attempt_id, "machine": order.machine_id})
        if not await self.hub.send(order.machine_id, Stop(attempt_id=order.attempt_id, reason=order.reason.value)):
            # Its agent is connected to another replica (or to none: then the order waits
            # in the database for it to reconnect).
            self.hint("stop", f"{order.machine_id}:{order.attempt_id}:{order.reason.value}")

    # -- outcomes ------------------------------------------------------------------------------
    def after_finished(self, items: Iterable[Finished]) -> None:
        retried = False
        book = self.policy.durations
        for f in items:
            a = f.attempt
            if book is not None and a.ending is Ending.SUCCEEDED and a.ended_at is not None:
                # how long the machine was held: from its assignment (pre-flight included)
                book.observe(f.run.automation, a.ended_at - a.assigned_at)
            if f.retried:
                retried = True
                self.metrics.retried.labels(f.attempt.ending.value if f.attempt.ending else "?").inc()
            self.run_changed(f.run)
        # A machine is free here; a requeued run may fit a machine of another replica.
        self.wake(others=retried)

    def run_changed(self, run: Run) -> None:
        if run.state.final:
            self.metrics.finished.labels(run.state.value).inc()
            self._resolve_waiters(run.id)
            if self.multi:
                self.hint("final", run.id)

    def _resolve_waiters(self, run_id: str) -> None:
        for fut in self._waiters.pop(run_id, []):
            if not fut.done():
                fut.set_result(None)

    # -- client operations -----------------------------------------------------------------------
    async def spec_for(self, name: str, version: str | None) -> AutomationSpec | None:
        key = (name, version)
        spec = self._specs.get(key)
        if spec is None:
            spec = await self.db(self.store.get_automation, name, version)
            if spec is not None:
                self._specs[key] = spec
        return spec

    def forget_specs(self) -> None:
        """Agents advertised automations, or machines or pools changed: drop the caches."""
        self._specs.clear()
        self._catalog = None
        self.vault.forget()

    def catalog_changed(self) -> None:
        """What submit checks runs against changed (automations offered, machines, pools,
        accounts): drop the caches, here and on the other replicas."""
        self.forget_specs()
        self.hint("catalog")

    def _accounts_changed(self) -> None:
        self.catalog_changed()
        self.wake(others=True)  # runs that waited for an account may fit now

    async def _pools_and_shapes(self) -> tuple[dict[str, Pool], list[MachineShape]]:
        now = time.monotonic()
        if self._catalog is None or now - self._catalog[0] > CATALOG_TTL:
            pools = {p.name: p for p in await self.db(self.store.list_pools)}
            self._catalog = (now, pools, await self.db(self.store.machine_shapes))
        return self._catalog[1], self._catalog[2]

    async def submit(self, spec: RunSpec, body: dict[str, Any]) -> tuple[Run, bool]:
        """Validate a run request against what exists, then store it; nothing is written
        for a request that fails any check."""
        stored, fingerprint = await self._admit(spec, body)
        run, created = await self.db.write(self.store.submit, stored, request_hash=fingerprint, now=time.time())
        if created:
            self._submitted(run, 1)
        return run, created

    async def submit_batch(self, requests: Sequence[tuple[RunSpec, dict[str, Any]] | InvalidRequest],
                           ) -> list[tuple[Run, bool] | InvalidRequest]:
        """Several run requests, each checked as :meth:`submit` checks one, the admitted ones
        stored in one transaction; one answer per request, in order — the run and whether it
        was created, or the error that refused that request alone. A request given as an
        error (it did not parse) is answered with it."""
        answers: list[tuple[Run, bool] | InvalidRequest | None] = []
        admitted: list[tuple[int, tuple[RunSpec, str]]] = []
        for i, request in enumerate(requests):
            if isinstance(request, InvalidRequest):
                answers.append(request)
                continue
            try:
                stored, fingerprint = await self._admit(*request)
            except InvalidRequest as exc:
                answers.append(exc)
                continue
            answers.append(None)
            admitted.append((i, (stored, fingerprint)))
        if admitted:
            stored_runs = await self.db.write(self.store.submit_many, [item for _, item in admitted], now=time.time())
            for (i, _), answer in zip(admitted, stored_runs, strict=True):
                answers[i] = answer
            created = [a[0] for a in stored_runs if not isinstance(a, InvalidRequest) and a[1]]
            if created:
                self._submitted(created[0], len(created))
        return [a for a in answers if a is not None]

    def _submitted(self, run: Run, count: int) -> None:
        self.metrics.submitted.inc(count)
        if count == 1:
            log.info("run submitted: %s", run.automation, extra={"run": run.id})
        else:
            log.info("%d runs submitted in one batch", count)
        self.wake(others=True)

    async def _admit(self, spec: RunSpec, body: dict[str, Any]) -> tuple[RunSpec, str]:
        """The run as it is to be stored (secret input fields encrypted) and the request's
        fingerprint, once it passes every check against what exists; else the error."""
        pools, shapes = await self._pools_and_shapes()
        pool = pools.get(spec.pool)
        if pool is None:
            known = ", ".join(sorted(pools)) or "none yet"
            raise NotFound(f"unknown pool {spec.pool!r} (known pools: {known})", field="pool")
        auto = await self.spec_for(spec.automation, spec.version)
        if auto is None:
            known_specs = await self.db(self.store.list_automations)
            names = sorted({f"{s.name}@{s.version}" for s in known_specs}) or ["none yet: no agent has advertised any"]
            what = spec.automation if spec.version is None else f"{spec.automation}@{spec.version}"
            raise NotFound(f"unknown automation {what!r}; known: {', '.join(names)}", field="automation")
        _validate_input(auto, spec.input)
        await self.vault.check_run(spec, auto, pool)
        if not pool.allow_wait_for_capacity:
            # A pinned run needs that machine; any other, some shape of machine that fits.
            pinned = await self.db(self.store.get_machine, spec.machine) if spec.machine else None
            candidates: list[Machine] | list[MachineShape] = [pinned] if pinned else [] if spec.machine else shapes
            if not serviceable(spec.pool, spec.labels, spec.automation, spec.version, spec.machine, candidates):
                in_pool = sum(s.count for s in shapes if s.pool == spec.pool)
                raise Unservable(_unservable_message(spec, in_pool))
        stored = replace(spec, input=self.secrets.encrypt_fields(spec.input, auto.secret_fields))
        return stored, self.secrets.fingerprint(body)

    async def cancel(self, run_id: str) -> Run:
        run, order = await self.db(self.store.request_cancel, run_id, time.time())
        if order is not None:
            await self.send_stop(order)
        self.run_changed(run)
        return run

    async def wait(self, run_id: str, timeout: float) -> Run:
        """Long-poll: the run once final, or as it stands after ``timeout`` seconds."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(run_id, []).append(fut)
        try:
            run = await self.db(self.store.get_run, run_id)
            if run is None:
                raise NotFound(f"no run {run_id!r}")
            if run.state.final or timeout <= 0:
                return run
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while True:
                # With several replicas the news may come as a lost hint: look again now and then.
                step = deadline - loop.time() if not self.multi else min(1.0, deadline - loop.time())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(fut), max(step, 0.0))
                run = await self.db(self.store.get_run, run_id)
                assert run is not None
                if run.state.final or fut.done() or loop.time() >= deadline:
                    return run
        finally:
            waiters = self._waiters.get(run_id)
            if waiters and fut in waiters:
                waiters.remove(fut)
                if not waiters:
                    del self._waiters[run_id]

    async def redacted_input(self, run: Run) -> dict[str, Any]:
        spec = await self.spec_for(run.automation, run.version)
        return redact(run.input, spec.secret_fields if spec else ()) or {}

    async def set_admin(self, machine_id: str, admin: MachineAdmin, reason: str = "") -> Any:
        machine = await self.db(self.store.set_admin, machine_id, admin, time.time(), reason)
        self.wake(others=True)
        return machine

    async def put_pool(self, pool: Pool) -> Pool:
        result = await self.db(self.store.put_pool, pool, time.time())
        self.catalog_changed()
        self.wake(others=True)
        return result

    async def enrol(self, machine_id: str, *, pool: str, labels: dict[str, str], key_hash: str) -> Machine:
        machine = await self.db(self.store.enrol_machine, machine_id, pool=pool, labels=labels,
                                key_hash=key_hash, now=time.time())
        self.catalog_changed()
        return machine


_VALIDATORS: dict[bytes, jsonschema.Draft202012Validator] = {}


def _validator(schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    """One validator per input schema (building one costs more than validating)."""
    key = orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)
    v = _VALIDATORS.get(key)
    if v is None:
        if len(_VALIDATORS) > 1000:
            _VALIDATORS.clear()
        v = _VALIDATORS[key] = jsonschema.Draft202012Validator(
            schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    return v


def _validate_input(spec: AutomationSpec, data: dict[str, Any]) -> None:
    validator = _validator(spec.input_schema)
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        parts = []
        for e in errors[:5]:
            where = ".".join(str(p) for p in e.absolute_path)
            message = e.message
            if spec.secret_fields and any(str(p) in spec.secret_fields for p in e.absolute_path):
                message = "invalid value (not shown: the field is secret)"
            parts.append(f"input{'.' + where if where else ''}: {message}")
        more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
        raise InvalidInput(
            f"input does not match {spec.name}@{spec.version}'s schema: " + "; ".join(parts) + more,
            field="input",
        )


def _unservable_message(spec: RunSpec, enrolled: int) -> str:
    if not enrolled:
        return (
            f"no machine is enrolled in pool {spec.pool!r}, so this run could never start; "
            "enrol an agent in the pool, or let the pool wait for capacity "
            f"(PUT /v1/pools/{spec.pool} with allow_wait_for_capacity=true)"
        )
    wants = [f"automation {spec.automation}" + (f"@{spec.version}" if spec.version else "")]
    if spec.labels:
        wants.append("labels " + ", ".join(f"{k}={v}" for k, v in spec.labels.items()))
    if spec.machine:
        wants.append(f"machine {spec.machine}")
    return (
        f"no machine in pool {spec.pool!r} offers {' and '.join(wants)}, so this run could "
        f"never start ({enrolled} machines enrolled there); fix the request, or let the pool "
        "wait for capacity (allow_wait_for_capacity=true)"
    )
