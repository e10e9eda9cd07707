"""The HTTP API's request and response models (pydantic, so they are the OpenAPI schema)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator

from .. import config as limits
from ..models import Artifact, Attempt, AutomationSpec, Event, Machine, Pool, Run, RunSpec
from ..pools import PoolPolicy
from ..store.maintenance import Campaign

NAME = r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$"


def _check_ints(value: Any) -> None:
    """JSON numbers are stored as 64-bit integers: a larger one is refused here, not at the database."""
    if isinstance(value, bool):
        return
    if isinstance(value, int) and not -(2**63) <= value < 2**64:
        raise ValueError("an integer beyond 64 bits; send it as a string")
    for item in value.values() if isinstance(value, dict) else value if isinstance(value, list) else ():
        _check_ints(item)


def ts(t: float | None) -> datetime | None:
    return None if t is None else datetime.fromtimestamp(t, UTC)


class RunRequest(BaseModel):
    """A request to run an automation."""

    model_config = ConfigDict(extra="forbid")

    automation: str = Field(min_length=1, max_length=200, pattern=NAME, examples=["ehr.create_patient"])
    version: str | None = Field(default=None, max_length=64, description="pin a version; default: newest")
    pack_version: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$",
                                     description="run only on a machine that runs this version of the automation's "
                                                 "pack (a published one); it waits for one")
    input: dict[str, Any] = Field(default_factory=dict)
    pool: str = Field(default="default", min_length=1, max_length=128, pattern=NAME)
    labels: dict[str, str] = Field(default_factory=dict, description="every one must match the machine's")
    machine: str | None = Field(default=None, min_length=1, max_length=128, description="run only on this machine")
    prefer_machine: str | None = Field(default=None, max_length=128, description="prefer this machine, fall back after the pool's affinity wait")
    session_key: str | None = Field(default=None, max_length=200, description="the vault account to run as: a machine logged in as it (or one that may log in, within its max_sessions)")
    priority: int = Field(default=0, strict=True, ge=-limits.MAX_PRIORITY, le=limits.MAX_PRIORITY, description="higher runs first")
    tenant: str = Field(default="default", min_length=1, max_length=128, pattern=NAME)
    queue_timeout: float = Field(default=3600.0, strict=True, ge=limits.MIN_TIMEOUT, le=limits.MAX_QUEUE_TIMEOUT, description="seconds the run may wait for a machine")
    attempt_timeout: float = Field(default=900.0, strict=True, ge=limits.MIN_TIMEOUT, le=limits.MAX_ATTEMPT_TIMEOUT, description="seconds one attempt may take")
    progress_timeout: float = Field(default=120.0, strict=True, ge=limits.MIN_TIMEOUT, le=limits.MAX_PROGRESS_TIMEOUT, description="seconds an attempt may go without reporting a step")
    deadline: float | None = Field(default=None, strict=True, ge=limits.MIN_TIMEOUT, le=limits.MAX_DEADLINE, description="seconds from now for the whole run, all attempts")
    max_attempts: int = Field(default=3, strict=True, ge=1, le=limits.MAX_ATTEMPTS)
    backoff_initial: float = Field(default=1.0, strict=True, ge=0, le=3600)
    backoff_max: float = Field(default=60.0, strict=True, ge=0, le=86400)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200, description="same key and body → the same run")
    webhook_url: HttpUrl | None = Field(default=None, description="POSTed the run when it ends")

    @field_validator("input")
    @classmethod
    def _input(cls, v: dict[str, Any]) -> dict[str, Any]:
        _check_ints(v)
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > 64:
            raise ValueError("at most 64 labels")
        for k in v:
            if not 0 < len(k) <= 128:
                raise ValueError("label names are 1 to 128 characters")
        return v

    def to_spec(self) -> RunSpec:
        return RunSpec(
            automation=self.automation,
            version=self.version,
            input=self.input,
            pool=self.pool,
            labels=self.labels,
            machine=self.machine,
            prefer_machine=self.prefer_machine,
            session_key=self.session_key,
            priority=self.priority,
            tenant=self.tenant,
            queue_timeout=self.queue_timeout,
            attempt_timeout=self.attempt_timeout,
            progress_timeout=self.progress_timeout,
            deadline=self.deadline,
            max_attempts=self.max_attempts,
            backoff_initial=self.backoff_initial,
            backoff_max=self.backoff_max,
            idempotency_key=self.idempotency_key,
            webhook_url=str(self.webhook_url) if self.webhook_url else None,
            pack_version=self.pack_version,
        )


class ErrorOut(BaseModel):
    """Every error the API answers (and a run's or a batch item's error): what went wrong,
    for programs and for people."""

    error: str = Field(description="what went wrong, for programs: not_found, invalid_request, conflict…",
                       examples=["not_found"])
    message: str = Field(description="what went wrong and what to do about it, for people")
    field: str | None = Field(default=None, description="the request's field at fault, dotted (input.mrn), if one is")


class BatchRequest(BaseModel):
    """Several run requests in one: each is checked and answered on its own."""

    model_config = ConfigDict(extra="forbid")

    runs: list[dict[str, Any]] = Field(
        min_length=1, max_length=limits.MAX_BATCH,
        description=f"1 to {limits.MAX_BATCH} run requests, each as POST /v1/runs takes it",
        json_schema_extra={"items": {"$ref": "#/components/schemas/RunRequest"}})


class RunOut(BaseModel):
    id: str
    automation: str
    version: str | None
    state: str
    input: dict[str, Any]
    output: dict[str, Any] | None
    error: ErrorOut | None
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
    deadline_at: datetime | None
    max_attempts: int
    attempts_started: int
    dispatches: int
    needs_reconcile: bool
    idempotency_key: str | None
    webhook: bool
    cancel_requested_at: datetime | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    current_machine: str | None
    current_attempt: int | None


class BatchResult(BaseModel):
    index: int = Field(description="the run request's place in the batch, from 0")
    status: Literal["created", "existing", "conflict", "invalid"] = Field(
        description="created; existing: its idempotency key made this run before, for the same request; conflict: "
                    "its idempotency key was used for another request; invalid: refused, error says why")
    run: RunOut | None = None
    error: ErrorOut | None = None


class BatchOut(BaseModel):
    results: list[BatchResult]
    created: int
    existing: int
    conflict: int
    invalid: int


def run_out(run: Run, redacted_input: dict[str, Any]) -> RunOut:
    return RunOut(
        id=run.id,
        automation=run.automation,
        version=run.version,
        state=run.state.value,
        input=redacted_input,
        output=run.output,
        error=ErrorOut(error=run.error_code, message=run.error_message or "") if run.error_code else None,
        pool=run.pool,
        labels=run.labels,
        machine=run.machine,
        prefer_machine=run.prefer_machine,
        session_key=run.session_key,
        priority=run.priority,
        tenant=run.tenant,
        queue_timeout=run.queue_timeout,
        attempt_timeout=run.attempt_timeout,
        progress_timeout=run.progress_timeout,
        deadline_at=ts(run.deadline_at),
        max_attempts=run.max_attempts,
        attempts_started=run.attempts_started,
        dispatches=run.dispatches,
        needs_reconcile=run.needs_reconcile,
        idempotency_key=run.idempotency_key,
        webhook=run.webhook_url is not None,
        cancel_requested_at=ts(run.cancel_requested_at),
        created_at=ts(run.created_at),  # type: ignore[arg-type]
        updated_at=ts(run.updated_at),  # type: ignore[arg-type]
        finished_at=ts(run.finished_at),
        current_machine=run.current_machine_id,
        current_attempt=run.current_attempt_id,
    )


class RunList(BaseModel):
    runs: list[RunOut]
    next_before: str | None = Field(description="pass as ?before= for the next page")


class AttemptOut(BaseModel):
    id: int
    number: int
    machine: str
    state: str
    phase: str
    mode: str
    ending: str | None
    reason: str | None
    assigned_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    progress_step: str | None
    stop_reason: str | None
    account: str | None = Field(default=None, description="the vault account granted to the attempt")

    @classmethod
    def of(cls, a: Attempt) -> AttemptOut:
        return cls(
            id=a.id, number=a.number, machine=a.machine_id, state=a.state.value, phase=a.phase.value,
            mode=a.mode.value, ending=a.ending.value if a.ending else None, reason=a.reason,
            assigned_at=ts(a.assigned_at), started_at=ts(a.started_at),  # type: ignore[arg-type]
            ended_at=ts(a.ended_at), progress_step=a.progress_step,
            stop_reason=a.stop_reason.value if a.stop_reason else None, account=a.account,
        )


class EventOut(BaseModel):
    id: int
    at: datetime
    kind: str
    run: str | None
    attempt: int | None
    machine: str | None
    from_state: str | None
    to_state: str | None
    reason: str | None
    data: dict[str, Any]

    @classmethod
    def of(cls, e: Event) -> EventOut:
        return cls(
            id=e.id, at=ts(e.at), kind=e.kind, run=e.run_id, attempt=e.attempt_id,  # type: ignore[arg-type]
            machine=e.machine_id, from_state=e.from_state, to_state=e.to_state, reason=e.reason, data=e.data,
        )


class ArtifactOut(BaseModel):
    id: str
    name: str
    content_type: str
    size: int
    attempt: int | None
    machine: str | None
    created_at: datetime
    url: str
    encrypted: bool = Field(description="kept encrypted at rest (artifacts stored before 0011 are not)")
    redaction: dict[str, Any] | None = Field(
        default=None, description="what the agent blacked out before upload: region names and the state they were "
                                  "placed for (whole_frame: all of it), never the content; null: nothing declared")

    @classmethod
    def of(cls, a: Artifact) -> ArtifactOut:
        return cls(
            id=a.id, name=a.name, content_type=a.content_type, size=a.size, attempt=a.attempt_id,
            machine=a.machine_id, created_at=ts(a.created_at), url=f"/v1/artifacts/{a.id}",  # type: ignore[arg-type]
            encrypted=a.encrypted, redaction=a.redaction,
        )


class MachineOut(BaseModel):
    id: str
    pool: str
    labels: dict[str, str]
    automations: list[str]
    status: str = Field(description="ready | busy | offline | quarantined | cordoned | draining | drained")
    health: str
    admin: str
    connected: bool
    boot_id: str
    agent_version: str
    last_heartbeat_at: datetime | None
    idle_since: datetime | None
    resources: dict[str, Any]
    session_key: str | None
    sessions: list[str] = Field(default_factory=list, description="accounts its apps are logged in as")
    quarantine_reason: str | None
    runs_completed: int
    current_run: str | None
    current_attempt: int | None
    last_screenshot: str | None

    @classmethod
    def of(cls, m: Machine) -> MachineOut:
        return cls(
            id=m.id, pool=m.pool, labels=m.labels, automations=m.automations, status=m.status,
            health=m.health.value, admin=m.admin.value, connected=m.connected, boot_id=m.boot_id,
            agent_version=m.agent_version, last_heartbeat_at=ts(m.last_heartbeat_at),
            idle_since=ts(m.idle_since), resources=m.resources, session_key=m.session_key, sessions=m.sessions,
            quarantine_reason=m.quarantine_reason, runs_completed=m.runs_completed,
            current_run=m.active_run_id, current_attempt=m.active_attempt_id,
            last_screenshot=f"/v1/artifacts/{m.last_screenshot_id}" if m.last_screenshot_id else None,
        )


class SampleOut(BaseModel):
    """A machine's figures at one moment, from its heartbeat."""

    at: datetime
    memory_mb: float = Field(description="its application's resident memory")
    cpu_percent: float


class PoolIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str = Field(default="", max_length=1000)
    allow_wait_for_capacity: bool = Field(default=False, strict=True, description="accept runs no enrolled machine can serve yet")
    affinity_wait: float = Field(default=10.0, strict=True, ge=0, le=3600, description="seconds a run waits for its preferred machine")


class PoolOut(BaseModel):
    name: str
    description: str
    allow_wait_for_capacity: bool
    affinity_wait: float
    created_at: datetime

    @classmethod
    def of(cls, p: Pool) -> PoolOut:
        return cls(name=p.name, description=p.description, allow_wait_for_capacity=p.allow_wait_for_capacity,
                   affinity_wait=p.affinity_wait, created_at=ts(p.created_at))  # type: ignore[arg-type]


class PolicyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    policy: PoolPolicy
    version: int | None = Field(default=None, ge=0, description=(
        "the version this change was made to (0: the pool had none); 409 if it is no longer the latest. "
        "Leave it out to replace whatever is current"))
    comment: str = Field(default="", max_length=500, description="why: kept with the version and its event")


class PolicyOut(BaseModel):
    pool: str
    version: int = Field(description="0: the pool never had a policy (these are the defaults)")
    policy: PoolPolicy
    created_at: datetime | None
    comment: str = ""


class DemandOut(BaseModel):
    """A pool's demand, in the shape an external autoscaler reads (KEDA's metrics API
    scaler: ``valueLocation: target``, ``targetValue: 1``)."""

    pool: str
    at: datetime
    target: int = Field(description="machines wanted now: queued + busy + warm buffer, within the policy's floor and max")
    queued: int = Field(description="runs waiting for a machine")
    delayed: int = Field(description="queued runs waiting for their retry backoff")
    busy: int
    idle: int = Field(description="machines ready and free")
    machines: dict[str, int] = Field(description="the pool's machines by status")
    oldest_wait_seconds: float | None
    arrival_rate: float = Field(description="runs a second, over window_seconds")
    window_seconds: float
    policy_version: int


class AutomationOut(BaseModel):
    name: str
    version: str
    description: str
    idempotent: bool
    has_reconcile: bool
    required_state: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]
    pack: str | None = None
    needs_account: bool = Field(default=False, description="each attempt is given an account of its pack")

    @classmethod
    def of(cls, s: AutomationSpec) -> AutomationOut:
        return cls(name=s.name, version=s.version, description=s.description, idempotent=s.idempotent,
                   has_reconcile=s.has_reconcile, required_state=s.required_state,
                   input_schema=s.input_schema, output_schema=s.output_schema, pack=s.pack,
                   needs_account=s.needs_account)


class MaintenanceIn(BaseModel):
    """A rolling update of a pool's machines, as its policy's ``maintenance`` says."""

    model_config = ConfigDict(extra="forbid")
    reason: str = Field(default="", max_length=500, description="why: kept with the campaign and its events")
    machines: list[Annotated[str, Field(min_length=1, max_length=128)]] | None = Field(
        default=None, max_length=10_000, description="the machines to update; leave it out for every machine of the pool that is up")


class MaintenanceStepOut(BaseModel):
    step: str = Field(description="pending, draining, updating, rebooting, verifying, done, failed or skipped")
    since: datetime | None = Field(description="when it entered the step")
    started: datetime | None = Field(description="when it left service for the campaign")
    detail: str = ""


class MaintenanceOut(BaseModel):
    id: int
    pool: str
    state: str = Field(description="running, stalled, cancelling, done or cancelled")
    reason: str
    detail: str = Field(description="why it waits (a window, max_unavailable, the work in hand), or why it stalled")
    created_at: datetime
    updated_at: datetime
    counts: dict[str, int] = Field(description="machines by step")
    machines: dict[str, MaintenanceStepOut]

    @classmethod
    def of(cls, c: Campaign) -> MaintenanceOut:
        return cls(id=c.id, pool=c.pool, state=c.state, reason=c.reason, detail=c.detail,
                   created_at=datetime.fromtimestamp(c.created_at, UTC), updated_at=datetime.fromtimestamp(c.updated_at, UTC),
                   counts=c.counts(), machines={m: MaintenanceStepOut(step=st.step, since=ts(st.since), started=ts(st.started),
                                                                      detail=st.detail) for m, st in c.machines.items()})


class CordonIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(default="", max_length=500)


class Summary(BaseModel):
    runs: dict[str, int]
    machines: dict[str, int]
