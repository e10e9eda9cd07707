"""The domain's nouns as plain dataclasses: runs, attempts, machines, pools, automations, events.

These are what the store returns and the scheduler and fleet loops reason about. Pydantic
models live at the edges (``api.schemas``, ``protocol``); inside, plain data. Times are
float seconds since the epoch (UTC) everywhere inside; the API renders them as ISO 8601.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

JSON = dict[str, Any]


class RunState(enum.StrEnum):
    QUEUED = "queued"
    ASSIGNED = "assigned"
    PREPARING = "preparing"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"

    @property
    def final(self) -> bool:
        return self in FINAL_RUN_STATES

    @property
    def active(self) -> bool:
        return self in (RunState.ASSIGNED, RunState.PREPARING, RunState.RUNNING)


FINAL_RUN_STATES = frozenset(
    {RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED, RunState.TIMED_OUT}
)


class AttemptState(enum.StrEnum):
    """An attempt is ``active`` while it holds its machine's lease; every other state is final."""

    ACTIVE = "active"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    LOST = "lost"
    ABORTED = "aborted"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"


class AttemptPhase(enum.StrEnum):
    ASSIGNED = "assigned"  # lease granted, assignment sent
    PREPARING = "preparing"  # agent holds it: pre-flight check, playbooks, reconcile
    RUNNING = "running"  # the automation itself has been allowed to start


class AttemptMode(enum.StrEnum):
    RUN = "run"
    RECONCILE = "reconcile"  # run the automation's reconcile check first; run it only if not done


class StopReason(enum.StrEnum):
    CANCELLED = "cancelled"
    DEADLINE = "deadline"
    ATTEMPT_TIMEOUT = "attempt_timeout"
    PROGRESS_STALLED = "progress_stalled"
    HUMAN_TIMEOUT = "human_timeout"  # nobody answered the attempt's human task by its due time


class Ending(enum.StrEnum):
    """Why an attempt ended: reported by the agent, or decided by the orchestrator."""

    SUCCEEDED = "succeeded"  # the automation returned its output
    RECONCILED = "reconciled"  # reconcile found the effect already done; its output is the result
    BUSINESS_ERROR = "business_error"  # the automation raised BusinessError: never retried
    SYSTEM_ERROR = "system_error"  # the automation or desktop failed unexpectedly
    PREFLIGHT_FAILED = "preflight_failed"  # the machine could not reach the required state
    STOPPED = "stopped"  # the agent confirmed a stop the orchestrator asked for
    STOP_FORCED = "stop_forced"  # the agent did not confirm a stop within the grace period
    LOST = "lost"  # heartbeat timeout, or the agent came back without the attempt


class MachineHealth(enum.StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"
    QUARANTINED = "quarantined"  # must re-prove its state before it gets work again


class MachineAdmin(enum.StrEnum):
    ACTIVE = "active"
    CORDONED = "cordoned"  # no new work; current work continues
    DRAINING = "draining"  # no new work; shown as drained once idle


@dataclass(slots=True)
class Pool:
    name: str
    description: str = ""
    allow_wait_for_capacity: bool = False
    affinity_wait: float = 10.0  # seconds a run waits for its preferred machine before falling back
    created_at: float = 0.0


@dataclass(slots=True)
class AutomationSpec:
    """What an agent advertises about one automation; the orchestrator validates input with it."""

    name: str
    version: str = "1"
    description: str = ""
    input_schema: JSON = field(default_factory=dict)
    output_schema: JSON = field(default_factory=dict)
    idempotent: bool = False
    has_reconcile: bool = False
    required_state: str = "ready"
    secret_fields: list[str] = field(default_factory=list)
    pack: str | None = None  # the pack (application) the automation belongs to
    needs_account: bool = False  # its pre-flight logs in: each attempt gets an account of ``pack``

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"


def version_key(version: str) -> tuple[Any, ...]:
    """How versions of an automation order (the newest is the greatest): dotted parts compared
    one by one, numbers as numbers ("1.10" after "1.9"), and after any number a part that is not one."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in version.split("."))


#: the words of :attr:`Machine.status`, what a machine is doing, in the order a person reads them
MACHINE_STATUSES = ("ready", "busy", "cordoned", "drained", "quarantined", "offline")


@dataclass(slots=True)
class Machine:
    id: str
    pool: str
    labels: dict[str, str] = field(default_factory=dict)
    automations: list[str] = field(default_factory=list)  # "name@version"
    health: MachineHealth = MachineHealth.OFFLINE
    admin: MachineAdmin = MachineAdmin.ACTIVE
    connected: bool = False
    replica: str | None = None  # the orchestrator replica holding its agent's connection
    boot_id: str = ""
    agent_version: str = ""
    enrolled_at: float = 0.0
    last_heartbeat_at: float | None = None
    idle_since: float | None = None
    resources: JSON = field(default_factory=dict)
    session_key: str | None = None
    session_expires_at: float | None = None
    #: every account the machine's apps are logged in as (its session notes), by account name
    sessions: list[str] = field(default_factory=list)
    quarantine_reason: str | None = None
    runs_completed: int = 0
    active_attempt_id: int | None = None
    active_run_id: str | None = None
    last_screenshot_id: str | None = None

    def offers(self, automation: str, version: str | None = None) -> bool:
        return _offers(self.automations, automation, version)

    def has_labels(self, required: dict[str, str]) -> bool:
        return all(self.labels.get(k) == v for k, v in required.items())

    @property
    def status(self) -> str:
        """One word for a person: what the machine is doing and whether it can take work
        (``Store.count_machines`` counts the same in SQL)."""
        if self.active_attempt_id is not None:
            return "busy"
        if not self.connected:
            return "offline"
        if self.health is MachineHealth.QUARANTINED:
            return "quarantined"
        if self.admin is MachineAdmin.CORDONED:
            return "cordoned"
        if self.admin is MachineAdmin.DRAINING:
            return "drained"
        return "ready"

    @property
    def schedulable(self) -> bool:
        return (
            self.connected
            and self.health is MachineHealth.ONLINE
            and self.admin is MachineAdmin.ACTIVE
            and self.active_attempt_id is None
        )


def _offers(automations: list[str], automation: str, version: str | None) -> bool:
    if version is not None:
        return f"{automation}@{version}" in automations
    prefix = f"{automation}@"
    return any(a.startswith(prefix) for a in automations)


@dataclass(slots=True)
class MachineShape:
    """What a group of enrolled machines offers alike — pool, labels, automations — and
    how many they are: enough to tell whether a run could ever be served, without reading
    every machine of a big fleet."""

    pool: str
    labels: dict[str, str]
    automations: list[str]
    count: int
    id: None = None  # a shape is no particular machine: it matches no pin

    def offers(self, automation: str, version: str | None = None) -> bool:
        return _offers(self.automations, automation, version)

    def has_labels(self, required: dict[str, str]) -> bool:
        return all(self.labels.get(k) == v for k, v in required.items())


@dataclass(slots=True)
class RunSpec:
    """What a client asks for. Defaults here are the product's defaults."""

    automation: str
    input: JSON = field(default_factory=dict)
    pool: str = "default"
    version: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    machine: str | None = None  # hard pin: only this machine
    prefer_machine: str | None = None  # soft: this machine if free within the pool's affinity wait
    session_key: str | None = None  # soft: the machine logged in as this account
    priority: int = 0
    tenant: str = "default"
    queue_timeout: float = 3600.0
    attempt_timeout: float = 900.0
    progress_timeout: float = 120.0
    deadline: float | None = None  # seconds from submit, for the run as a whole
    max_attempts: int = 3
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    idempotency_key: str | None = None
    webhook_url: str | None = None
    #: run only on a machine that runs this version of the automation's pack; at submit it
    #: becomes a requirement on the machine's well-known label ``deskfleet.pack/<pack>``
    pack_version: str | None = None


@dataclass(slots=True)
class Run:
    id: str
    automation: str
    version: str | None
    input: JSON
    pool: str
    labels: dict[str, str]
    machine: str | None
    prefer_machine: str | None
    session_key: str | None
    priority: int
    tenant: str
    queue_timeout: float
    attempt_timeout: float
    progress_timeout: float
    deadline_at: float | None
    max_attempts: int
    backoff_initial: float
    backoff_max: float
    idempotency_key: str | None
    request_hash: str | None
    webhook_url: str | None
    state: RunState
    created_at: float
    updated_at: float
    queued_at: float  # when it last entered the queue
    not_before: float | None = None  # backoff: not scheduled before this time
    attempts_started: int = 0  # attempts that reached ``running``: these spend the retry budget
    dispatches: int = 0  # attempts of any kind
    needs_reconcile: bool = False
    cancel_requested_at: float | None = None
    output: JSON | None = None
    error_code: str | None = None
    error_message: str | None = None
    finished_at: float | None = None
    current_attempt_id: int | None = None
    current_machine_id: str | None = None


@dataclass(slots=True)
class Attempt:
    id: int  # also the lease's fencing token: ids only grow, so a newer lease has a larger token
    run_id: str
    machine_id: str
    number: int
    state: AttemptState
    phase: AttemptPhase
    mode: AttemptMode
    assigned_at: float
    lease_expires_at: float
    started_at: float | None = None
    ended_at: float | None = None
    last_progress_at: float | None = None
    progress_step: str | None = None
    stop_requested_at: float | None = None
    stop_reason: StopReason | None = None
    ending: Ending | None = None
    reason: str | None = None
    account: str | None = None  # the vault account this attempt was granted, if any

    @property
    def token(self) -> int:
        return self.id


@dataclass(slots=True)
class Event:
    id: int
    at: float
    kind: str
    run_id: str | None = None
    attempt_id: int | None = None
    machine_id: str | None = None
    from_state: str | None = None
    to_state: str | None = None
    reason: str | None = None
    data: JSON = field(default_factory=dict)


@dataclass(slots=True)
class Artifact:
    id: str
    run_id: str | None
    attempt_id: int | None
    machine_id: str | None
    name: str
    content_type: str
    size: int  # of its content (what the API serves), whatever it takes at rest
    created_at: float
    #: its bytes are encrypted at rest with the server's keyring (not those stored before 0.11)
    encrypted: bool = False
    #: what the agent blacked out before the bytes left the machine (region names, the state
    #: they were placed for; never the content); None: the app model declares no redaction
    redaction: dict[str, Any] | None = None
    #: seconds its automation keeps it (``@automation(artifact_retention=…)``; 0: for good);
    #: None: its pool's policy, else the server's default
    retention: float | None = None
    pool: str | None = None  # the machine's pool when it was uploaded (whose retention applies)


@dataclass(slots=True)
class Assignment:
    """A claim the scheduler made: what is sent to the agent."""

    run: Run
    attempt: Attempt
    spec: AutomationSpec | None
    account: VaultAccount | None = None  # the account granted with it (secrets still encrypted)


@dataclass(slots=True)
class VaultAccount:
    """An account in the orchestrator's vault. ``password`` and ``totp_seed`` are held as
    the store holds them: encrypted (``enc:v1:…``); only the vault decrypts them."""

    name: str  # what runs name as their session_key
    username: str
    password: str = field(repr=False)
    app: str | None = None  # the pack (application) the account logs in to
    totp_seed: str | None = field(default=None, repr=False)
    labels: dict[str, str] = field(default_factory=dict)
    max_sessions: int = 1
    created_at: float = 0.0
    updated_at: float = 0.0


class LeaseState(enum.StrEnum):
    RESERVED = "reserved"  # handed to a machine for a login in progress; not yet seen in its session note
    HELD = "held"  # the machine's session note says it is logged in as the account


@dataclass(slots=True)
class AccountLease:
    """The right of one machine to be logged in as an account (at most ``max_sessions``)."""

    account: str
    machine_id: str
    state: LeaseState
    since: float
    attempt_id: int | None = None  # the attempt it was reserved for (None: a verification)


@dataclass(slots=True)
class StopOrder:
    """An attempt that must stop; the engine tells its agent."""

    machine_id: str
    attempt_id: int
    run_id: str
    reason: StopReason


class HumanTaskState(enum.StrEnum):
    """A human task: ``open`` → ``claimed`` (a person took it; released: open again) →
    ``completed`` | ``expired`` (its due time passed) | ``cancelled`` (its attempt ended
    otherwise: the run cancelled, the lease lost, the attempt timed out)."""

    OPEN = "open"
    CLAIMED = "claimed"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"

    @property
    def waiting(self) -> bool:
        return self in (HumanTaskState.OPEN, HumanTaskState.CLAIMED)


@dataclass(slots=True)
class HumanTask:
    """Something only a person can do for a running attempt (approve a push, read an SMS
    code): asked by the automation (``ctx.ask_human``), answered through the API or CLI.
    A ``secret`` task's answer is never in ``response``: it is ``secret_response``, held as
    the store holds it — encrypted (``enc:v1:…``) — and wiped once its agent has it or its
    attempt is over."""

    id: str
    run_id: str
    attempt_id: int
    machine_id: str
    pool: str
    kind: str
    prompt: str
    state: HumanTaskState
    secret: bool
    created_at: float
    due_at: float
    requested_due_at: float  # what the automation asked for (due_at is clamped to the attempt's time)
    escalate_at: float | None = None
    escalated_at: float | None = None
    screenshot_id: str | None = None
    claimed_by: str | None = None
    claimed_at: float | None = None
    completed_by: str | None = None
    ended_at: float | None = None
    reason: str | None = None  # why it expired or was cancelled
    response: str | None = None
    secret_response: str | None = field(default=None, repr=False)
    answered: bool = False
