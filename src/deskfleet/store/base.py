"""The store interface: operations on runs, attempts, leases and machines — not SQL.

Callers (the engine, the fleet loops, the CLI) speak only this interface, so that the
embedded SQLite store and the PostgreSQL store for several replicas can differ in how
they lock and notify without touching them. Every operation is one transaction; every
state change it makes is recorded as an event in the same transaction.

Writes on behalf of an agent name the attempt (whose id is the lease's fencing token) and
the machine; if that attempt no longer holds its lease the store raises
:class:`~deskfleet.errors.StaleLease` and records the rejection as an event.

Methods are synchronous; the server calls them from a worker thread
(``deskfleet.store.runner``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import Conflict, InvalidRequest, NotFound, StaleLease, Stopped
from ..models import (
    AccountLease,
    Artifact,
    Assignment,
    Attempt,
    AutomationSpec,
    Ending,
    Event,
    Machine,
    MachineAdmin,
    MachineHealth,
    MachineShape,
    Pool,
    Run,
    RunSpec,
    RunState,
    StopOrder,
    VaultAccount,
)

if TYPE_CHECKING:
    from ..access import ApiKey, AuditEntry
    from ..models import HumanTask, HumanTaskState
    from ..scheduler import Policy
    from .artifacts import Expired
    from .human import HumanSweep, Notify
    from .maintenance import Campaign
    from .metrics import FleetFigures
    from .packs import PackRecord, Rollout
    from .pools import PolicyVersion, PoolDemand


@dataclass(slots=True)
class Heartbeat:
    machine_id: str
    at: float
    resources: dict[str, Any] = field(default_factory=dict)
    session_key: str | None = None
    session_expires_at: float | None = None
    attempt_id: int | None = None  # the attempt the agent believes it holds
    #: every account the machine's apps are logged in as (None: an agent that sends only session_key)
    sessions: list[str] | None = None
    #: the notes differ from the machine's previous beat: its account leases must follow
    sessions_changed: bool = False
    #: keep this beat's figures (app memory, CPU) as a sample of the machine's history
    sample: bool = False

    def notes(self) -> list[str]:
        if self.sessions is not None:
            return self.sessions
        return [self.session_key] if self.session_key else []


@dataclass(slots=True)
class ConnectResult:
    """What the store decided when an agent (re)connected, about the attempt it reported."""

    machine: Machine
    resume: Attempt | None = None  # the agent still holds this lease: carry on
    resend: Assignment | None = None  # assigned while the agent was away: send it again
    stale_attempt_id: int | None = None  # the agent reported an attempt it no longer holds
    ended_run: Run | None = None  # the machine's attempt was lost with the agent's restart
    offers_changed: bool = False  # its automations or labels are not what they were


@dataclass(slots=True)
class Finished:
    """An attempt that ended, and the run as it stands afterwards."""

    run: Run
    attempt: Attempt
    retried: bool
    machine_quarantined: bool
    #: how the silent machine is fenced before the run is retried (its pool's policy):
    #: "provider" (power it off, then release the hold) or "attempt_timeout" (the hold runs
    #: out); None: no hold
    fence: str | None = None


@dataclass(slots=True)
class SweepResult:
    stop_orders: list[StopOrder] = field(default_factory=list)  # attempts to tell to stop
    finished: list[Finished] = field(default_factory=list)  # attempts ended by the sweep
    expired_runs: list[Run] = field(default_factory=list)  # queued runs that ran out of time


class Store(ABC):
    #: whether agents' fenced writes gain from sharing a transaction (see :meth:`batch`)
    batches_writes: bool = False

    def batch(self, calls: Sequence[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]]) -> list[Any]:
        """Apply several writes of this store (agents' fenced writes ``attempt_*`` and
        ``finish_attempt``, and ``submit``); each answers on its own: its result, or the
        StaleLease, Stopped, Conflict or NotFound it raised. Here one by one; a store with one
        writer at a time applies them in one transaction."""
        out: list[Any] = []
        for fn, args, kwargs in calls:
            try:
                out.append(fn(*args, **kwargs))
            except (StaleLease, Stopped, Conflict, NotFound) as exc:
                out.append(exc)
        return out

    # -- lifecycle -----------------------------------------------------------------------
    @abstractmethod
    def migrate(self) -> None:
        """Bring the schema to the latest migration."""

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def recover(self, now: float, grace: float, *, disconnect: bool = True) -> int:
        """Give every active lease at least ``grace`` seconds. After the (only) orchestrator
        starts (``disconnect``): every agent is marked disconnected, and has that long to
        reconnect before failover. After a database outage (``disconnect=False``): the
        outage does not count against leases or the progress watchdog. Returns the number
        of active leases."""

    @abstractmethod
    def replica_alive(self, replica: str, name: str, now: float, key: str | None = None) -> bool:
        """An orchestrator replica's own heartbeat (with the fingerprint of the key it
        encrypts with). False if the replica was not registered (first beat — or it was
        silent so long that the leader reaped it and marked its agents' connections gone)."""

    @abstractmethod
    def reap_replicas(self, now: float, timeout: float) -> list[str]:
        """Replicas silent past ``timeout``: their agents' connections are marked gone."""

    @abstractmethod
    def leave(self, replica: str, now: float) -> None:
        """A replica shutting down cleanly: its agents will reconnect elsewhere."""

    def refresh_statistics(self) -> list[str]:
        """Bring the database's planner statistics up to date where they fell behind the
        tables (a backlog submitted in seconds; a queue drained); the tables analysed. Called
        by the leader about once a second. A store whose plans need no statistics does
        nothing."""
        return []

    # -- secret keys (see store.keys) -------------------------------------------------------
    @abstractmethod
    def claim_key(self, ring: Sequence[str] | str) -> bool:
        """``ring``: the fingerprints of a server's keys, the one it encrypts with first.
        Whether it holds every key that encrypted the secrets stored (the first caller's key
        on a new database); if so, its first key counts as in use from now on."""

    @abstractmethod
    def keys_in_use(self) -> list[str]:
        """Fingerprints of the keys that may have encrypted a stored secret."""

    @abstractmethod
    def settle_keys(self, expected: Sequence[str], newest: str) -> bool:
        """After every secret was re-encrypted with ``newest``: only it is in use — unless
        the keys in use are no longer ``expected`` (then False, nothing changed)."""

    @abstractmethod
    def fingerprint_key(self, make: Callable[[], str]) -> str:
        """The encrypted key of request fingerprints; ``make()`` makes it the first time."""

    @abstractmethod
    def replica_keys(self) -> list[tuple[str, str, str | None, float]]:
        """(replica id, name, fingerprint of the key it encrypts with, last seen)."""

    @abstractmethod
    def rewrap_runs(self, after: str | None, limit: int, rewrap: Callable[[str], str | None]) -> tuple[str | None, int]:
        """Re-encrypt the secret inputs of up to ``limit`` runs after run id ``after``, in
        one transaction: (where to go on from, None when done; runs rewritten)."""

    @abstractmethod
    def rewrap_accounts(self, rewrap: Callable[[str], str | None]) -> int:
        """Re-encrypt every account's secrets; how many accounts changed."""

    @abstractmethod
    def rewrap_meta(self, rewrap: Callable[[str], str | None]) -> int:
        """Re-encrypt the fingerprint key; 1 if it changed."""

    # -- the credential vault and account leases (see store.accounts) ---------------------------
    @abstractmethod
    def put_account(self, account: VaultAccount, now: float) -> tuple[VaultAccount, bool]:
        """Create or replace an account (its secrets already encrypted); whether created."""

    @abstractmethod
    def update_account(self, name: str, values: dict[str, Any], now: float) -> VaultAccount:
        """Change some fields of an account (NotFound if there is none)."""

    @abstractmethod
    def get_account(self, name: str) -> VaultAccount | None: ...

    @abstractmethod
    def list_accounts(self) -> list[VaultAccount]: ...

    @abstractmethod
    def account_leases(self, account: str | None = None, machine_id: str | None = None) -> list[AccountLease]: ...

    @abstractmethod
    def remove_account(self, name: str, now: float, *, force: bool = False) -> list[AccountLease]:
        """Remove an account: Conflict while a machine holds a lease on it, unless ``force``
        (its leases are released, and returned). NotFound if there is none."""

    @abstractmethod
    def issue_totp(self, account: str, machine_id: str, now: float) -> str:
        """The account's encrypted TOTP seed, only for a machine holding a lease on it
        (Conflict otherwise; NotFound for no such account); the issue is an event."""

    @abstractmethod
    def reserve_for_verify(self, machine_id: str, now: float) -> list[VaultAccount]:
        """Accounts (reserved) for a quarantined machine's verification to log in with."""

    @abstractmethod
    def verify_ended(self, machine_id: str, now: float) -> None:
        """The machine's verification ended: its reservations may settle."""

    @abstractmethod
    def sweep_account_leases(self, now: float, heartbeat_timeout: float, margin: float) -> list[AccountLease]:
        """Release the leases of silent machines and of logins that did not happen; turn
        reservations the session notes confirm into held leases. The leases released."""

    # -- pools and the automation catalogue ----------------------------------------------
    @abstractmethod
    def put_pool(self, pool: Pool, now: float) -> Pool: ...

    @abstractmethod
    def get_pool(self, name: str) -> Pool | None: ...

    @abstractmethod
    def list_pools(self) -> list[Pool]: ...

    @abstractmethod
    def put_automations(self, specs: Sequence[AutomationSpec], now: float) -> None: ...

    @abstractmethod
    def get_automation(self, name: str, version: str | None = None) -> AutomationSpec | None:
        """The named version, or the newest one known."""

    @abstractmethod
    def list_automations(self) -> list[AutomationSpec]: ...

    # -- machines --------------------------------------------------------------------------
    @abstractmethod
    def enrol_machine(
        self, machine_id: str, *, pool: str, labels: dict[str, str], key_hash: str, now: float
    ) -> Machine:
        """Create or re-enrol a machine (creating its pool with defaults if new)."""

    @abstractmethod
    def machine_key_hash(self, machine_id: str) -> str | None: ...

    @abstractmethod
    def connect_machine(
        self,
        machine_id: str,
        *,
        boot_id: str,
        agent_version: str,
        automations: Sequence[AutomationSpec],
        labels: dict[str, str] | None,
        heartbeat: Heartbeat,
        lease_timeout: float,
        now: float,
        replica: str | None = None,
    ) -> ConnectResult: ...

    @abstractmethod
    def disconnect_machine(self, machine_id: str, now: float, replica: str | None = None) -> None:
        """The agent's connection closed (only if it was still held by ``replica``)."""

    @abstractmethod
    def heartbeat(self, beats: Sequence[Heartbeat], lease_timeout: float) -> dict[str, bool]:
        """Record heartbeats and renew the leases they carry, in one transaction.

        Returns, for each beat that named an attempt, whether that lease is still held.
        """

    @abstractmethod
    def set_admin(self, machine_id: str, admin: MachineAdmin, now: float, reason: str = "") -> Machine: ...

    @abstractmethod
    def quarantine(self, machine_id: str, reason: str, now: float) -> Machine: ...

    @abstractmethod
    def release_quarantine(self, machine_id: str, evidence: dict[str, Any], now: float) -> Machine:
        """The machine re-proved its state: it may get work again."""

    @abstractmethod
    def get_machine(self, machine_id: str) -> Machine | None: ...

    @abstractmethod
    def list_machines(self, pool: str | None = None, *, health: MachineHealth | None = None,
                      live_or: Collection[str] | None = None) -> list[Machine]:
        """``live_or``: only machines connected, holding a lease, or named in it — not every
        machine a pool ever had (a pool that scales keeps the rows of those it destroyed)."""

    @abstractmethod
    def machine_shapes(self) -> list[MachineShape]:
        """Enrolled machines grouped by what they offer (pool, labels, automations)."""

    @abstractmethod
    def count_machines(self, pool: str | None = None) -> dict[str, int]:
        """Machines (of ``pool``) by ``Machine.status`` (busy, offline, quarantined, cordoned, drained, ready)."""

    # -- pool policies and demand (store.pools) -----------------------------------------------------
    @abstractmethod
    def pool_policy(self, pool: str) -> PolicyVersion | None:
        """The policy in force for ``pool`` (its latest version), None if it never had one."""

    @abstractmethod
    def pool_policy_history(self, pool: str, limit: int = 50) -> list[PolicyVersion]: ...

    @abstractmethod
    def put_pool_policy(self, pool: str, policy: dict[str, Any], *, expected_version: int | None,
                        comment: str = "", now: float) -> PolicyVersion:
        """A new version; NotFound for an unknown pool, Conflict if ``expected_version`` is not the latest."""

    @abstractmethod
    def pool_demand(self, pool: str, now: float, window: float = 300.0) -> PoolDemand: ...

    @abstractmethod
    def last_event_id(self) -> int: ...

    # -- API keys and the audit log (store.access) ---------------------------------------------------
    @abstractmethod
    def create_api_key(self, key: ApiKey, digest: str, audit: AuditEntry) -> ApiKey: ...

    @abstractmethod
    def api_key(self, prefix: str) -> tuple[ApiKey, str] | None:
        """The key with that prefix and its digest."""

    @abstractmethod
    def api_keys(self, *, tenant: str | None = None) -> list[ApiKey]: ...

    @abstractmethod
    def has_api_keys(self) -> bool: ...

    @abstractmethod
    def revoke_api_key(self, prefix: str, *, now: float, audit: AuditEntry) -> ApiKey: ...

    @abstractmethod
    def touch_api_key(self, prefix: str, now: float) -> None: ...

    @abstractmethod
    def append_audit(self, entries: Sequence[AuditEntry]) -> None: ...

    @abstractmethod
    def audit_entries(self, *, actor: str | None = None, action: str | None = None, target: str | None = None,
                      outcome: str | None = None, since: float | None = None, tenant: str | None = None,
                      after: int | None = None, before: int | None = None, limit: int = 100) -> list[AuditEntry]: ...

    # -- rolling maintenance (store.maintenance) ------------------------------------------------------
    @abstractmethod
    def start_maintenance(self, pool: str, machine_ids: Sequence[str] | None, *, reason: str = "",
                          now: float) -> Campaign:
        """A campaign over these machines (None: the pool's machines that are up or busy)."""

    @abstractmethod
    def maintenance_campaign(self, campaign_id: int) -> Campaign | None: ...

    @abstractmethod
    def maintenance_campaigns(self, pool: str | None = None, *, active: bool = False,
                              limit: int = 20) -> list[Campaign]: ...

    @abstractmethod
    def save_maintenance(self, campaign: Campaign, now: float) -> Campaign: ...

    @abstractmethod
    def cancel_maintenance(self, pool: str, campaign_id: int, *, now: float, reason: str = "") -> Campaign: ...

    # -- published packs and their rollouts (store.packs) -------------------------------------------
    @abstractmethod
    def publish_pack(self, name: str, version: str, *, sha256: str, manifest: dict[str, Any],
                     automations: Sequence[AutomationSpec], archive: bytes, now: float) -> tuple[PackRecord, bool]:
        """Store a pack version and register its automations; whether it is new. Conflict if
        that version is published with another archive (sha256)."""

    @abstractmethod
    def get_pack(self, name: str, version: str) -> PackRecord | None: ...

    @abstractmethod
    def list_packs(self, name: str | None = None) -> list[PackRecord]: ...

    @abstractmethod
    def pack_archive(self, name: str, version: str) -> tuple[PackRecord, bytes] | None: ...

    @abstractmethod
    def assign_pack(self, pool: str, pack: str, version: str | None, *, max_unavailable: str | None = None,
                    reason: str = "", rollback: bool = False, now: float) -> Rollout:
        """A rollout of ``pack``'s ``version`` (with ``rollback``: the version before) to ``pool``."""

    @abstractmethod
    def pack_rollout(self, rollout_id: int) -> Rollout | None: ...

    @abstractmethod
    def pack_rollouts(self, pool: str | None = None, pack: str | None = None, *, active: bool = False,
                      limit: int = 20) -> list[Rollout]: ...

    @abstractmethod
    def pool_packs(self, pool: str) -> dict[str, Rollout]:
        """The pack versions assigned to ``pool`` (each pack's newest rollout)."""

    @abstractmethod
    def save_rollout(self, rollout: Rollout, now: float) -> Rollout: ...

    @abstractmethod
    def release_fence_hold(self, run_id: str, attempt_id: int, now: float, *, detail: str = "") -> bool:
        """The machine of ``attempt_id`` is fenced: its run, held back since the attempt was
        lost (``expire_leases``), may be retried now. False if the run moved on meanwhile."""

    @abstractmethod
    def set_machine_screenshot(self, machine_id: str, artifact_id: str) -> None: ...

    @abstractmethod
    def machine_samples(self, since: float, machine_ids: Sequence[str] | None = None,
                        ) -> dict[str, list[tuple[float, float, float]]]:
        """Each machine's samples since ``since``, oldest first: (at, app memory MB, CPU %)."""

    @abstractmethod
    def prune_machine_samples(self, before: float, limit: int = 10_000) -> int:
        """Delete up to ``limit`` samples older than ``before``; how many."""

    # -- runs ------------------------------------------------------------------------------
    @abstractmethod
    def submit(self, spec: RunSpec, *, request_hash: str | None, now: float,
               traceparent: str | None = None) -> tuple[Run, bool]:
        """Store a new queued run; with an idempotency key already used with the same
        request hash, return the existing run and False. A different hash → Conflict. (A run
        without a key needs no hash.) ``traceparent``: the trace its submit belongs to
        (OpenTelemetry), kept for its attempts' spans."""

    def submit_many(self, items: Sequence[tuple[RunSpec, str | None]], *, now: float,
                    traceparent: str | None = None) -> list[tuple[Run, bool] | InvalidRequest]:
        """Store several runs (each with its request hash) in one transaction, each answered
        on its own as :meth:`submit` would answer it — the run and whether it was created — or
        with the error that refused it alone (a Conflict, an unknown pool): one refused run
        does not refuse the others. This default submits them one at a time."""
        out: list[tuple[Run, bool] | InvalidRequest] = []
        for spec, request_hash in items:
            try:
                out.append(self.submit(spec, request_hash=request_hash, now=now, traceparent=traceparent))
            except InvalidRequest as exc:
                out.append(exc)
        return out

    @abstractmethod
    def get_run(self, run_id: str) -> Run | None: ...

    # -- metrics and traces -------------------------------------------------------------------
    @abstractmethod
    def fleet_figures(self, now: float) -> FleetFigures:
        """The fleet's figures for ``GET /metrics`` (``store.metrics``): the counters and
        histograms that the transactions finishing runs and attempts added to, and the
        gauges counted now — the same whichever replica asks."""

    @abstractmethod
    def run_traceparents(self, run_ids: Sequence[str]) -> dict[str, str]:
        """The trace each run's submit belongs to, by run id (those submitted with one)."""

    @abstractmethod
    def list_runs(
        self,
        *,
        states: Sequence[RunState] = (),
        pool: str | None = None,
        automation: str | None = None,
        machine: str | None = None,
        limit: int = 100,
        before: str | None = None,
        tenant: str | None = None,
    ) -> list[Run]:
        """Newest first; ``before`` is a run id for paging."""

    @abstractmethod
    def count_runs(self, tenant: str | None = None) -> dict[str, int]:
        """Runs by state (of one tenant)."""

    @abstractmethod
    def request_cancel(self, run_id: str, now: float) -> tuple[Run, StopOrder | None]:
        """Cancel a queued run at once; ask a running one's agent to stop (the returned
        order). A finished run → Conflict."""

    @abstractmethod
    def list_attempts(self, run_id: str) -> list[Attempt]: ...

    @abstractmethod
    def get_attempt(self, attempt_id: int) -> Attempt | None: ...

    @abstractmethod
    def events(
        self,
        *,
        run_id: str | None = None,
        machine_id: str | None = None,
        after_id: int = 0,
        limit: int = 1000,
        tenant: str | None = None,
    ) -> list[Event]:
        """Oldest first; with ``tenant``, only the events of that tenant's runs."""

    @abstractmethod
    def record_event(
        self,
        kind: str,
        now: float,
        *,
        run_id: str | None = None,
        attempt_id: int | None = None,
        machine_id: str | None = None,
        reason: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> None: ...

    # -- scheduling --------------------------------------------------------------------------
    @abstractmethod
    def schedule(
        self, policy: Policy, now: float, lease_timeout: float, limit: int = 500, replica: str | None = None,
    ) -> list[Assignment]:
        """Match queued runs to ready machines with ``policy`` and claim each pair:
        the run becomes ``assigned`` and an active attempt holds the machine's lease.
        With ``replica``, only machines whose agents are connected to that replica."""

    # -- attempt writes from agents (fenced) ---------------------------------------------------
    @abstractmethod
    def attempt_preparing(self, attempt_id: int, machine_id: str, now: float) -> Attempt: ...

    @abstractmethod
    def attempt_start(self, attempt_id: int, machine_id: str, now: float) -> Attempt:
        """The agent asks to start the automation itself; after this the effect may happen."""

    @abstractmethod
    def attempt_renew(self, attempt_id: int, machine_id: str, now: float, lease_timeout: float) -> float:
        """Renew the attempt's lease for an effect about to happen (``ctx.fenced()``) and
        return the seconds it now runs from ``now``: StaleLease if the attempt no longer
        holds it, Stopped if the orchestrator asked it to stop (a cancel, a timeout)."""

    @abstractmethod
    def attempt_progress(
        self, attempt_id: int, machine_id: str, step: str, data: dict[str, Any], now: float
    ) -> None: ...

    @abstractmethod
    def attempt_event(
        self, attempt_id: int, machine_id: str, kind: str, data: dict[str, Any], now: float
    ) -> None: ...

    @abstractmethod
    def finish_attempt(
        self,
        attempt_id: int,
        machine_id: str,
        ending: Ending,
        *,
        output: dict[str, Any] | None,
        detail: str,
        now: float,
    ) -> Finished:
        """The agent reports how its attempt ended. A repeat of an already recorded report
        (a retry after a lost acknowledgement) returns the same result."""

    # -- the fleet manager's sweeps -----------------------------------------------------------
    @abstractmethod
    def expire_leases(self, now: float) -> list[Finished]:
        """Attempts whose lease ran out are lost; their machines are quarantined."""

    @abstractmethod
    def expire_silent_machines(self, now: float, heartbeat_timeout: float) -> list[str]:
        """Connected machines silent past the heartbeat timeout are quarantined; their ids."""

    @abstractmethod
    def pending_stops(self, machine_id: str | None = None, *, replica: str | None = None) -> list[StopOrder]:
        """Stops ordered and unconfirmed, for a machine or for a replica's machines."""

    @abstractmethod
    def sweep(self, now: float, stop_grace: float) -> SweepResult:
        """Queue waits and deadlines of queued runs; attempts past their attempt timeout,
        deadline or progress limit (stop orders); stops not confirmed within
        ``stop_grace`` (forced end, machine quarantined)."""

    # -- artifacts (store.artifacts) -----------------------------------------------------------------
    @abstractmethod
    def add_artifact(
        self,
        *,
        attempt_id: int | None,
        machine_id: str,
        name: str,
        content_type: str,
        data: bytes,
        now: float,
        size: int | None = None,
        encrypted_with: str | None = None,
        redaction: dict[str, Any] | None = None,
        retention: float | None = None,
    ) -> Artifact:
        """Attach an artifact; with an attempt id it is fenced like any agent write. ``data``
        is kept as given: encrypted by the caller with the key whose fingerprint is
        ``encrypted_with`` (None: in the clear); ``size`` is its content's (default: len(data));
        ``retention``: its automation's, in seconds (0: for good; None: its pool's)."""

    @abstractmethod
    def get_artifact(self, artifact_id: str) -> tuple[Artifact, bytes] | None:
        """The artifact and its bytes as stored (encrypted when ``Artifact.encrypted``)."""

    @abstractmethod
    def list_artifacts(self, run_id: str) -> list[Artifact]: ...

    @abstractmethod
    def rewrap_artifacts(self, after: str | None, limit: int, key: str,
                         reseal: Callable[[bytes, bool], bytes]) -> tuple[str | None, int]:
        """Encrypt with key ``key`` (a fingerprint) a batch of artifacts not yet encrypted
        with it, by ``reseal(data, encrypted)``; (the last id looked at, None when done; how many)."""

    @abstractmethod
    def expire_artifacts(self, now: float, *, default: float | None, pools: Mapping[str, float | None],
                         limit: int) -> Expired:
        """Delete up to ``limit`` artifacts past their retention (their own, else their pool's
        in ``pools``, else ``default``; 0 or None: for good), oldest first, in one transaction."""

    # -- webhooks (an outbox: written with the final state, delivered by a loop) -----------
    @abstractmethod
    def due_webhooks(self, now: float, limit: int = 50) -> list[tuple[int, str, str]]:
        """(webhook id, run id, url) due for delivery."""

    @abstractmethod
    def webhook_done(self, webhook_id: int, *, ok: bool, error: str | None, now: float) -> None: ...

    # -- human tasks (store.human) -----------------------------------------------------------------
    @abstractmethod
    def create_human_task(self, attempt_id: int, machine_id: str, *, kind: str, prompt: str, due: float,
                          escalate_after: float | None = None, secret: bool = False,
                          screenshot_id: str | None = None, now: float, notify: Notify | None = None) -> HumanTask:
        """A task for a person, asked by the attempt holding its lease (fenced: StaleLease
        otherwise); ``due`` clamped to the attempt's timeout and the run's deadline."""

    @abstractmethod
    def check_human_task(self, task_id: str, attempt_id: int, machine_id: str, *, received: bool = False,
                         now: float) -> HumanTask:
        """The task as its attempt's agent sees it; with ``received``, its secret answer is wiped."""

    @abstractmethod
    def get_human_task(self, task_id: str) -> HumanTask | None: ...

    @abstractmethod
    def list_human_tasks(self, *, states: Collection[HumanTaskState] = (), pool: str | None = None,
                         run_id: str | None = None, limit: int = 100, tenant: str | None = None) -> list[HumanTask]: ...

    @abstractmethod
    def claim_human_task(self, task_id: str, by: str, now: float) -> HumanTask:
        """Exclusive: Conflict (naming who holds it) if somebody else claimed it, or it is over."""

    @abstractmethod
    def release_human_task(self, task_id: str, by: str, now: float) -> HumanTask: ...

    @abstractmethod
    def complete_human_task(self, task_id: str, by: str, *, response: str | None = None,
                            secret_response: str | None = None, now: float,
                            notify: Notify | None = None) -> HumanTask:
        """Answer it (Conflict if another holds it or it is over); cancelled instead, and
        returned so, if its attempt ended meanwhile."""

    @abstractmethod
    def sweep_human_tasks(self, now: float, notify: Notify | None = None) -> HumanSweep:
        """The leader's: escalate, expire (their attempts told to stop: human_timeout),
        cancel the tasks of attempts that ended otherwise."""

    @abstractmethod
    def due_human_notices(self, now: float, limit: int = 50) -> list[tuple[int, str, str, str]]:
        """(notice id, task id, event, url) of human-task webhooks due for delivery."""

    @abstractmethod
    def human_notice_done(self, notice_id: int, *, ok: bool, error: str | None, now: float) -> None: ...

    @abstractmethod
    def rewrap_human_tasks(self, rewrap: Callable[[str], str | None]) -> int:
        """Re-encrypt the secret answers still held; how many changed."""
