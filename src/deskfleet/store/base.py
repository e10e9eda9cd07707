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
from collections.abc import Callable, Collection, Sequence
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
    from ..scheduler import Policy
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

    @abstractmethod
    def release_fence_hold(self, run_id: str, attempt_id: int, now: float, *, detail: str = "") -> bool:
        """The machine of ``attempt_id`` is fenced: its run, held back since the attempt was
        lost (``expire_leases``), may be retried now. False if the run moved on meanwhile."""

    @abstractmethod
    def set_machine_screenshot(self, machine_id: str, artifact_id: str) -> None: ...

    # -- runs ------------------------------------------------------------------------------
    @abstractmethod
    def submit(self, spec: RunSpec, *, request_hash: str | None, now: float) -> tuple[Run, bool]:
        """Store a new queued run; with an idempotency key already used with the same
        request hash, return the existing run and False. A different hash → Conflict. (A run
        without a key needs no hash.)"""

    def submit_many(self, items: Sequence[tuple[RunSpec, str | None]], *, now: float,
                    ) -> list[tuple[Run, bool] | InvalidRequest]:
        """Store several runs (each with its request hash) in one transaction, each answered
        on its own as :meth:`submit` would answer it — the run and whether it was created — or
        with the error that refused it alone (a Conflict, an unknown pool): one refused run
        does not refuse the others. This default submits them one at a time."""
        out: list[tuple[Run, bool] | InvalidRequest] = []
        for spec, request_hash in items:
            try:
                out.append(self.submit(spec, request_hash=request_hash, now=now))
            except InvalidRequest as exc:
                out.append(exc)
        return out

    @abstractmethod
    def get_run(self, run_id: str) -> Run | None: ...

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
    ) -> list[Run]:
        """Newest first; ``before`` is a run id for paging."""

    @abstractmethod
    def count_runs(self) -> dict[str, int]:
        """Runs by state."""

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
    ) -> list[Event]: ...

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

    # -- artifacts -------------------------------------------------------------------------------
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
    ) -> Artifact:
        """Attach an artifact; with an attempt id it is fenced like any agent write."""

    @abstractmethod
    def get_artifact(self, artifact_id: str) -> tuple[Artifact, bytes] | None: ...

    @abstractmethod
    def list_artifacts(self, run_id: str) -> list[Artifact]: ...

    # -- webhooks (an outbox: written with the final state, delivered by a loop) -----------
    @abstractmethod
    def due_webhooks(self, now: float, limit: int = 50) -> list[tuple[int, str, str]]:
        """(webhook id, run id, url) due for delivery."""

    @abstractmethod
    def webhook_done(self, webhook_id: int, *, ok: bool, error: str | None, now: float) -> None: ...
