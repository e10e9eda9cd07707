"""Runs as clients see them: submit (one, or a batch in one transaction), cancel, long-poll,
and reads — a run, its attempts, events and artifacts, the event log, counts by state.

A submit is checked against what exists before anything is written: the pool, the
automation (as agents advertised it) and its input schema, the account it needs, and —
unless the pool waits for capacity — some enrolled machine that could ever serve it. Secret
input fields are stored encrypted and shown redacted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

import jsonschema
import orjson

from .. import tracing
from ..crypto import SecretBox, redact
from ..errors import Conflict, InvalidInput, InvalidRequest, NotFound, Unservable
from ..models import (
    Artifact,
    Attempt,
    AutomationSpec,
    Event,
    Machine,
    MachineShape,
    Pool,
    Run,
    RunSpec,
    RunState,
    StopOrder,
)
from ..packfile import label
from ..scheduler import serviceable

if TYPE_CHECKING:
    from ..store import Store
    from ..store.metrics import FleetFigures
    from ..store.runner import StoreRunner

log = logging.getLogger(__name__)


class Dispatcher(Protocol):
    """What runs ask of dispatch (``services.dispatch.Dispatch``)."""

    def wake(self, *, others: bool = False) -> None: ...

    async def send_stop(self, order: StopOrder) -> None: ...


class Specs(Protocol):
    """What a submit is checked against (``services.catalog.Catalogue``)."""

    async def spec_for(self, name: str, version: str | None) -> AutomationSpec | None: ...

    async def automations(self) -> list[AutomationSpec]: ...

    async def pools_and_shapes(self) -> tuple[dict[str, Pool], list[MachineShape]]: ...


class Accounts(Protocol):
    """The vault's check that a run's account exists and fits (``vault.Vault``)."""

    async def check_run(self, spec: RunSpec, auto: AutomationSpec, pool: Pool) -> None: ...


class Finals(Protocol):
    """Runs known final (``services.finals.Finals``)."""

    def run_changed(self, run: Run) -> None: ...

    def watch(self, run_id: str) -> asyncio.Future[None]: ...

    def unwatch(self, run_id: str, fut: asyncio.Future[None]) -> None: ...


class Runs:
    def __init__(self, store: Store, db: StoreRunner, *, specs: Specs, accounts: Accounts, dispatch: Dispatcher,
                 finals: Finals, secrets: SecretBox, multi: bool) -> None:
        self.store = store
        self.db = db
        self.specs = specs
        self.accounts = accounts
        self.dispatch = dispatch
        self.finals = finals
        self.secrets = secrets
        self.multi = multi

    # -- submit ----------------------------------------------------------------------------------
    async def submit(self, spec: RunSpec, body: dict[str, Any]) -> tuple[Run, bool]:
        """Validate a run request against what exists, then store it; nothing is written
        for a request that fails any check."""
        stored, fingerprint = await self._admit(spec, body)
        with tracing.span("deskfleet.submit", {"deskfleet.automation": spec.automation,
                                               "deskfleet.pool": spec.pool}) as span:
            # The run keeps its submit's trace: its attempts' spans continue it.
            run, created = await self.db.write(self.store.submit, stored, request_hash=fingerprint, now=time.time(),
                                               traceparent=tracing.traceparent())
            span.set_attribute("deskfleet.run", run.id)
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
        admitted: list[tuple[int, tuple[RunSpec, str | None]]] = []
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
            with tracing.span("deskfleet.submit", {"deskfleet.runs": len(admitted)}):
                stored_runs = await self.db.write(self.store.submit_many, [item for _, item in admitted],
                                                  now=time.time(), traceparent=tracing.traceparent())
            for (i, _), answer in zip(admitted, stored_runs, strict=True):
                answers[i] = answer
            created = [a[0] for a in stored_runs if not isinstance(a, InvalidRequest) and a[1]]
            if created:
                self._submitted(created[0], len(created))
        return [a for a in answers if a is not None]

    def _submitted(self, run: Run, count: int) -> None:
        if count == 1:
            log.info("run submitted: %s", run.automation, extra={"run": run.id})
        else:
            log.info("%d runs submitted in one batch", count)
        self.dispatch.wake(others=True)

    async def _admit(self, spec: RunSpec, body: dict[str, Any]) -> tuple[RunSpec, str | None]:
        """The run as it is to be stored (secret input fields encrypted) and the request's
        fingerprint, once it passes every check against what exists; else the error."""
        pools, shapes = await self.specs.pools_and_shapes()
        pool = pools.get(spec.pool)
        if pool is None:
            known = ", ".join(sorted(pools)) or "none yet"
            raise NotFound(f"unknown pool {spec.pool!r} (known pools: {known})", field="pool")
        auto = await self.specs.spec_for(spec.automation, spec.version)
        if auto is None:
            known_specs = await self.specs.automations()
            names = sorted({f"{s.name}@{s.version}" for s in known_specs}) or ["none yet: no agent has advertised any"]
            what = spec.automation if spec.version is None else f"{spec.automation}@{spec.version}"
            raise NotFound(f"unknown automation {what!r}; known: {', '.join(names)}", field="automation")
        _validate_input(auto, spec.input)
        pin: dict[str, str] = {}
        if spec.pack_version is not None:
            pin = await self._pack_pin(spec, auto)
            spec = replace(spec, labels={**spec.labels, **pin}, pack_version=None)
        await self.accounts.check_run(spec, auto, pool)
        if not pool.allow_wait_for_capacity:
            # A pinned run needs that machine; any other, some shape of machine that fits. A
            # published pack version pinned is waited for (a rollout may bring it).
            pinned = await self.db(self.store.get_machine, spec.machine) if spec.machine else None
            candidates: list[Machine] | list[MachineShape] = [pinned] if pinned else [] if spec.machine else shapes
            labels = {k: v for k, v in spec.labels.items() if k not in pin}
            if not serviceable(spec.pool, labels, spec.automation, spec.version, spec.machine, candidates) \
                    and not await self._assigned(spec, auto):
                in_pool = sum(s.count for s in shapes if s.pool == spec.pool)
                raise Unservable(_unservable_message(spec, in_pool))
        stored = replace(spec, input=self.secrets.encrypt_fields(spec.input, auto.secret_fields)) if auto.secret_fields else spec
        # The request's fingerprint tells a repeat from a conflict under one idempotency key.
        return stored, self.secrets.fingerprint(body) if spec.idempotency_key is not None else None

    async def _pack_pin(self, spec: RunSpec, auto: AutomationSpec) -> dict[str, str]:
        """A run pinned to a version of its automation's pack: the label it requires."""
        assert spec.pack_version is not None
        if auto.pack is None:
            raise InvalidInput(f"{auto.name} belongs to no pack its agents said, so pack_version cannot pin it; "
                               "leave pack_version out", field="pack_version")
        if await self.db(self.store.get_pack, auto.pack, spec.pack_version) is None:
            published = sorted(p.version for p in await self.db(self.store.list_packs, auto.pack))
            raise NotFound(f"pack {auto.pack} {spec.pack_version} is not published, so no machine can ever run it "
                           f"(published: {', '.join(published) or 'no version'}); publish it with deskfleet pack "
                           "publish, or pin a published version", field="pack_version")
        return {label(auto.pack): spec.pack_version}

    async def _assigned(self, spec: RunSpec, auto: AutomationSpec) -> bool:
        """Whether the pool is assigned a version of the automation's pack: the machines it
        gets will run it (a pool with none yet — an autoscaled one before its first — accepts
        the run). Asked only of a run no machine could serve now."""
        if auto.pack is None or spec.machine is not None:
            return False
        assigned = await self.db(self.store.pool_packs, spec.pool)
        return auto.pack in assigned

    # -- retry, cancel, wait ---------------------------------------------------------------------
    async def retry(self, run_id: str, *, by: str = "") -> tuple[Run, bool]:
        """A new run with the ended run's request — its automation, input (secrets too),
        pool, pins and limits — checked as any submit is. Idempotent: asking again returns
        the run the first retry made (its idempotency key is ``retry-of:<run>``). The ended
        run's timeline says it was retried, by whom, and as which run."""
        old = await self.db(self.store.get_run, run_id)
        if old is None:
            raise NotFound(f"no run {run_id!r}")
        if not old.state.final or old.state is RunState.SUCCEEDED:
            raise Conflict(f"run {run_id} is {old.state.value}: only a run that failed, timed out or was "
                           "cancelled can be retried")
        auto = await self.specs.spec_for(old.automation, old.version)
        secret = auto.secret_fields if auto else ()
        spec = RunSpec(
            automation=old.automation, input=self.secrets.decrypt_fields(old.input, secret), pool=old.pool,
            version=old.version, labels=dict(old.labels), machine=old.machine, prefer_machine=old.prefer_machine,
            session_key=old.session_key, priority=old.priority, tenant=old.tenant, queue_timeout=old.queue_timeout,
            attempt_timeout=old.attempt_timeout, progress_timeout=old.progress_timeout,
            deadline=(old.deadline_at - old.created_at) if old.deadline_at is not None else None,
            max_attempts=old.max_attempts, backoff_initial=old.backoff_initial, backoff_max=old.backoff_max,
            idempotency_key=f"retry-of:{old.id}", webhook_url=old.webhook_url)
        run, created = await self.submit(spec, {"retry_of": old.id})
        if created:
            await self.db(self.store.record_event, "run.retried", time.time(), run_id=old.id,
                          reason=f"retried as {run.id}", data={"retry": run.id, "by": by})
        return run, created

    async def cancel(self, run_id: str) -> Run:
        run, order = await self.db(self.store.request_cancel, run_id, time.time())
        if order is not None:
            await self.dispatch.send_stop(order)
        self.finals.run_changed(run)
        return run

    async def wait(self, run_id: str, timeout: float) -> Run:
        """Long-poll: the run once final, or as it stands after ``timeout`` seconds."""
        fut = self.finals.watch(run_id)
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
            self.finals.unwatch(run_id, fut)

    # -- reads ---------------------------------------------------------------------------------------
    async def redacted_input(self, run: Run) -> dict[str, Any]:
        spec = await self.specs.spec_for(run.automation, run.version)
        return redact(run.input, spec.secret_fields if spec else ()) or {}

    async def get(self, run_id: str) -> Run | None:
        return await self.db(self.store.get_run, run_id)

    async def find(self, *, states: Sequence[RunState], pool: str | None, automation: str | None,
                   machine: str | None, limit: int, before: str | None, tenant: str | None = None) -> list[Run]:
        """Newest first; ``before`` is a run id for paging."""
        return await self.db(self.store.list_runs, states=states, pool=pool, automation=automation,
                             machine=machine, limit=limit, before=before, tenant=tenant)

    async def attempts(self, run_id: str) -> list[Attempt]:
        return await self.db(self.store.list_attempts, run_id)

    async def events(self, run_id: str) -> list[Event]:
        return await self.db(self.store.events, run_id=run_id, limit=10000)

    async def artifacts(self, run_id: str) -> list[Artifact]:
        return await self.db(self.store.list_artifacts, run_id)

    async def artifact(self, artifact_id: str, check: Callable[[Artifact], Awaitable[None]] | None = None,
                       ) -> tuple[Artifact, bytes] | None:
        """The artifact and its content, decrypted (rows stored before 0011 are plain) — only
        once ``check`` accepted it (it raises to refuse): nothing is decrypted for a caller
        who may not see it."""
        found = await self.db(self.store.get_artifact, artifact_id)
        if found is None:
            return None
        if check is not None:
            await check(found[0])
        if not found[0].encrypted:
            return found
        return found[0], await asyncio.to_thread(self.secrets.unseal, found[1])

    async def log(self, *, after_id: int, limit: int, tenant: str | None = None) -> list[Event]:
        """The event log (runs, machines, replicas), oldest first from ``after_id``; with
        ``tenant``, only the events of that tenant's runs."""
        return await self.db(self.store.events, after_id=after_id, limit=limit, tenant=tenant)

    async def last_event_id(self) -> int:
        """The event log's newest id (what a live view watches move)."""
        return await self.db(self.store.last_event_id)

    async def counts(self, tenant: str | None = None) -> dict[str, int]:
        """Runs by state (of one tenant)."""
        return await self.db(self.store.count_runs, tenant)

    async def figures(self) -> FleetFigures:
        """The fleet's figures for ``GET /metrics``, as the store keeps and counts them."""
        return await self.db(self.store.fleet_figures, time.time())


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
