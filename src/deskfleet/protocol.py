"""The agent protocol: JSON messages over one WebSocket the agent opens to the orchestrator.

Why a WebSocket the agent dials out: machines sit behind NAT and firewalls, so the agent
connects *out*; once connected, the orchestrator pushes an assignment the moment it is
made (no polling interval in the dispatch latency), and a heartbeat costs one small frame
rather than an HTTP request. Bulky uploads (screenshots) go over plain HTTP POST beside it
so that they never delay a heartbeat.

    agent                                   orchestrator
      POST /agent/v1/enrol (enrolment token) ─▶  machine id + agent key
      WS   /agent/v1/connect (agent key)
      hello {boot, automations, attempt?}  ─▶
                                           ◀─  welcome {heartbeat settings, resume?}
      heartbeat {resources, attempt?}      ─▶
                                           ◀─  heartbeat_ack       (a beat naming an attempt, once written)
                                           ◀─  assign {attempt id = fencing token, run, input, account?,
                                                       renewed_by = a beat heard before the lease began}
      preparing / event / progress         ─▶  (fenced: rejected if the lease is gone)
      totp {account} (request)             ─▶  (MFA prompt: only for an account this machine holds)
                                           ◀─  reply {code, valid_for}
      lease {attempt} (request)            ─▶  (an effect outside the desktop is about to happen)
                                           ◀─  reply {ok, valid_for | stop}   the lease, renewed
      human {attempt, kind, prompt, due,   ─▶  (only a person can do it: a push approval, an SMS code)
             escalate_after, secret,
             screenshot} (request)
                                           ◀─  reply {ok, task, due_in | error | stop}
                                           ◀─  human_answer {task, response, by, at}   once a person answered
      human_check {attempt, task} (request) ─▶  (now and then while waiting: a lost answer only delays)
                                           ◀─  reply {ok | stop}   (+ human_answer first, if answered)
      start (request)                      ─▶
                                           ◀─  reply {ok | stop}     the automation may now run
      result {ending, output}              ─▶
                                           ◀─  reply {ok | stale}
                                           ◀─  stop {attempt, reason}  (cancel, timeouts, lease lost)
                                           ◀─  verify {accounts}       (quarantined: re-prove state)
                                           ◀─  recycle {action}        (idle: restart the apps, or
                                                                        run the packs' OS update)
      verified {state, screenshot}         ─▶
                                           ◀─  install {pack, version, sha256, url}  (a pack rollout)
      event pack.installing / installed /  ─▶
            switched / install_failed

Messages that need an answer carry ``id``; the answer is a ``reply`` with ``re`` = id.

Protocol 2 (this one): an idle machine's beats are not acknowledged — only an attempt's
lease needs them, and at 10,000 machines the acknowledgements were most of an idle
orchestrator's work. What an idle beat's acknowledgement told the agent before an
assignment, the assignment tells it now: ``renewed_by`` names the agent's latest beat the
orchestrator heard before the lease began, so the agent may count its lease from that
beat's sending, as it would from an acknowledged beat's. An agent that says protocol 1 (or
nothing) in its hello still has every beat acknowledged.

Protocol 3: ``lease`` renews an attempt's lease on the spot and says for how long, or
says it is gone — what ``ctx.fenced()`` asks before an automation's effect outside the
desktop (an API call, a file). ``welcome`` says which protocol the orchestrator speaks; an
agent asks ``lease`` only of one that speaks 3, and fences from its acknowledged beats
alone otherwise.

Protocol 4: ``recycle {action: restart_app}`` asks an idle machine to restart its apps (a
pool's recycling policy: after N runs, above M MB, a leak); sent only to agents that speak 4.

Protocol 5: ``human`` asks a person for something only a person can do (approve a push,
read out an SMS code): the orchestrator creates a human task fenced by the attempt and
answers with its id; a person completes it through the API or CLI, and the hub holding the
agent's connection sends ``human_answer`` (another replica's completion reaches it by a
hint; ``human_check`` re-reads the task now and then, so a lost hint only delays). At the
task's due time the orchestrator stops the attempt with ``human_timeout``. Meanwhile the
agent keeps beating: the machine stays leased. An agent asks only an orchestrator that
speaks 5, and the orchestrator refuses ``human`` from an agent that said less.

Protocol 6: the hello says which version of each pack the agent runs (``packs``; the
orchestrator shows it as the machine's well-known label ``deskfleet.pack/<name>``), and
``install`` tells it to fetch a pack's version (its archive, from ``url`` with its agent key),
check its sha256, install it into an environment of its own, run ``pack check`` on it, and
switch to it once idle — reporting each step as a machine event (``pack.installing``,
``pack.installed``, ``pack.switched`` or ``pack.install_failed`` with why), then saying hello
again with the new version. Sent only to agents that speak 6.

Protocol 7: ``recycle {action: update}`` asks an idle, drained machine to run its packs'
update hooks (``[hooks] update``: the OS update of a pool's rolling maintenance with
``update: pack``); the agent reports ``event machine.updated {ok, error, seconds}``. An agent
that speaks less is not asked: the orchestrator records that event for it, failed, with why.

Secrets (invariant 6): an account's password travels only inside the ``assign`` or
``verify`` that needs it (:class:`AccountGrant`); a TOTP seed never leaves the
orchestrator — the agent asks for a code when an MFA prompt needs one. A secret human
task's answer travels only inside the ``human_answer`` to the attempt's own agent.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

PROTOCOL_VERSION = 7


class _Msg(BaseModel):
    model_config = ConfigDict(extra="ignore")


class AutomationAd(_Msg):
    name: str
    version: str = "1"
    description: str = ""
    input_schema: dict[str, Any] = Field(default_factory=dict)
    output_schema: dict[str, Any] = Field(default_factory=dict)
    idempotent: bool = False
    has_reconcile: bool = False
    required_state: str = "ready"
    secret_fields: list[str] = Field(default_factory=list)
    pack: str | None = None  # the pack (application) the automation belongs to
    needs_account: bool = False  # pre-flight logs in: give each attempt an account of ``pack``


class Resources(_Msg):
    memory_mb: float = 0.0  # the target application's resident memory
    cpu_percent: float = 0.0
    uptime: float = 0.0
    machine_memory_percent: float | None = None
    app_running: bool = True
    reboot_pending: bool = False  # the OS waits for a reboot to finish an update


# -- agent → orchestrator --------------------------------------------------------------------


class Hello(_Msg):
    type: Literal["hello"] = "hello"
    protocol: int = 1  # what an agent that says nothing speaks; ours say PROTOCOL_VERSION
    boot_id: str
    agent_version: str
    automations: list[AutomationAd]
    labels: dict[str, str] | None = None
    resources: Resources = Field(default_factory=Resources)
    session_key: str | None = None  # the first of ``sessions`` (older agents send only this)
    session_expires_at: float | None = None
    attempt_id: int | None = None  # the attempt this agent is still working on, if any
    #: every account the machine's apps are logged in as (one per app): its account leases
    sessions: list[str] | None = None
    #: the version of each pack the agent runs, by pack name (protocol 6)
    packs: dict[str, str] | None = None


class HeartbeatMsg(_Msg):
    type: Literal["heartbeat"] = "heartbeat"
    seq: int
    resources: Resources = Field(default_factory=Resources)
    session_key: str | None = None
    session_expires_at: float | None = None
    attempt_id: int | None = None
    sessions: list[str] | None = None


def heartbeat_frame(seq: int, resources: dict[str, Any], session_key: str | None, session_expires_at: float | None,
                    attempt_id: int | None, sessions: list[str] | None) -> bytes:
    """``HeartbeatMsg(...)`` encoded without building the model: the frame an agent sends
    most. ``resources`` holds :class:`Resources`' fields (as ``Resources.model_dump()``
    gives them). A property test holds it to what the model encodes."""
    return orjson.dumps({
        "type": "heartbeat", "seq": seq, "resources": resources, "session_key": session_key,
        "session_expires_at": session_expires_at, "attempt_id": attempt_id, "sessions": sessions,
    })


class Preparing(_Msg):
    type: Literal["preparing"] = "preparing"
    attempt_id: int


class AgentEvent(_Msg):
    """A pre-flight or playbook step, a fault the agent saw, anything for the timeline."""

    type: Literal["event"] = "event"
    attempt_id: int | None = None
    kind: str
    data: dict[str, Any] = Field(default_factory=dict)


class Progress(_Msg):
    type: Literal["progress"] = "progress"
    attempt_id: int
    step: str
    percent: float | None = None
    message: str | None = None


class Start(_Msg):
    type: Literal["start"] = "start"
    id: int
    attempt_id: int


class Result(_Msg):
    type: Literal["result"] = "result"
    id: int
    attempt_id: int
    ending: Literal[
        "succeeded", "reconciled", "business_error", "system_error", "preflight_failed", "stopped"
    ]
    output: dict[str, Any] | None = None
    detail: str = ""


class TotpRequest(_Msg):
    """An MFA prompt needs a code: the orchestrator computes it from the account's seed (which
    never leaves it), for an account this machine holds a lease on. Answered by ``reply``
    with ``code`` and ``valid_for``."""

    type: Literal["totp"] = "totp"
    id: int
    account: str


class LeaseCheck(_Msg):
    """An effect outside the desktop is about to happen (``ctx.fenced()``): renew the
    attempt's lease now and say for how long (``reply`` with ``valid_for``), or that the
    attempt must stop (``reply`` with ``stop``). Protocol 3."""

    type: Literal["lease"] = "lease"
    id: int
    attempt_id: int


class HumanRequest(_Msg):
    """Only a person can do this (protocol 5): a human task for the attempt, answered by
    ``reply`` with ``task`` (its id) and ``due_in`` (seconds: the due time, clamped to the
    attempt's timeout), or refused (``error``; ``stop`` if the lease is gone). The screen
    goes beside it as an artifact (``screenshot_id``)."""

    type: Literal["human"] = "human"
    id: int
    attempt_id: int
    kind: str
    prompt: str
    due: float  # seconds from now
    escalate_after: float | None = None  # seconds from now
    secret: bool = False  # the answer is a secret (an SMS code): never shown, logged or kept
    screenshot_id: str | None = None


class HumanCheck(_Msg):
    """How the attempt's human task stands (protocol 5): answered by ``human_answer`` then
    ``reply ok`` once a person completed it, ``reply ok`` while it waits, ``reply`` with
    ``stop`` once it expired or was cancelled. ``received``: the agent has its answer."""

    type: Literal["human_check"] = "human_check"
    id: int
    attempt_id: int
    task: str
    received: bool = False


class Verified(_Msg):
    """The agent re-proved its machine's state after a quarantine."""

    type: Literal["verified"] = "verified"
    ok: bool
    state: str
    detail: str = ""
    screenshot_id: str | None = None


AgentMessage = Annotated[
    Hello | HeartbeatMsg | Preparing | AgentEvent | Progress | Start | Result | TotpRequest | LeaseCheck | Verified
    | HumanRequest | HumanCheck,
    Field(discriminator="type"),
]
agent_message: TypeAdapter[AgentMessage] = TypeAdapter(AgentMessage)


# -- orchestrator → agent --------------------------------------------------------------------


class Welcome(_Msg):
    type: Literal["welcome"] = "welcome"
    machine_id: str
    heartbeat_interval: float
    heartbeat_timeout: float
    resume_attempt_id: int | None = None  # carry on with this one
    protocol: int = 2  # the orchestrator's (an older one says nothing: 2 at most)


class HeartbeatAck(_Msg):
    type: Literal["heartbeat_ack"] = "heartbeat_ack"
    seq: int


class AccountGrant(_Msg):
    """An account's secrets for one login: inside an assignment or a verify order, never
    elsewhere. The agent drops it when the attempt (or verification) ends."""

    name: str  # the vault's account name (= what runs use as session_key)
    app: str | None = None  # the pack (application) the account belongs to
    username: str
    password: str = Field(repr=False)  # secret: never logged, never in events
    totp: bool = False  # the account has a TOTP seed; codes come from the orchestrator (TotpRequest)


class Assign(_Msg):
    type: Literal["assign"] = "assign"
    attempt_id: int  # also the lease's fencing token
    run_id: str
    attempt_number: int
    automation: str
    version: str | None
    mode: Literal["run", "reconcile"]
    input: dict[str, Any]
    required_state: str
    session_key: str | None = None
    attempt_timeout: float
    progress_timeout: float
    account: AccountGrant | None = None  # the account pre-flight logs in as, if the run needs one
    #: the agent's latest beat the orchestrator heard before the lease began (protocol 2),
    #: None if none is known: the lease lasts at least as long from that beat's sending as
    #: from an acknowledged beat's
    renewed_by: int | None = None
    #: the W3C trace context of the assignment (OpenTelemetry on, on the orchestrator): an
    #: agent that traces makes its attempt's spans its children; any other ignores it
    traceparent: str | None = None


class Stop(_Msg):
    type: Literal["stop"] = "stop"
    attempt_id: int
    reason: str


class Verify(_Msg):
    type: Literal["verify"] = "verify"
    reason: str = ""
    accounts: list[AccountGrant] = Field(default_factory=list)  # to log in with, one per pack at most


class Recycle(_Msg):
    """Refresh the machine between runs (protocol 4): ``restart_app`` restarts each of its
    apps — only while no attempt holds the machine; one assigned meanwhile waits, and its
    pre-flight brings the fresh app to the state it needs. The agent reports what it did as
    ``event machine.recycled``. ``update`` (protocol 7) runs each of its packs' update hooks
    (the OS update of a rolling maintenance), only while idle, and reports ``event
    machine.updated``."""

    type: Literal["recycle"] = "recycle"
    action: Literal["restart_app", "update"]
    reason: str = ""


class Install(_Msg):
    """Install a pack's version and switch to it once idle (protocol 6): download ``url``
    (relative to the orchestrator, with the agent key), check ``sha256``, install it into an
    environment of its own, check it there, and switch between runs. A newer order for the
    same pack replaces one not yet switched to."""

    type: Literal["install"] = "install"
    pack: str
    version: str
    sha256: str
    size: int = 0
    url: str
    reason: str = ""


class HumanAnswer(_Msg):
    """A person completed the attempt's human task (protocol 5). ``response`` is what they
    answered (None if the task asked for none); a secret one is never logged."""

    type: Literal["human_answer"] = "human_answer"
    task: str
    response: str | None = Field(default=None, repr=False)
    by: str
    at: float


class Reply(_Msg):
    type: Literal["reply"] = "reply"
    re: int
    ok: bool
    error: str | None = None
    stop: str | None = None  # for a start or lease request: the attempt must stop instead, and why
    code: str | None = None  # for a totp request: the current code
    valid_for: float | None = None  # seconds the code (totp) or the renewed lease (lease) stays valid
    task: str | None = None  # for a human request: the task's id
    due_in: float | None = None  # for a human request: seconds until the task's (clamped) due time


class Error(_Msg):
    type: Literal["error"] = "error"
    message: str


ServerMessage = Annotated[
    Welcome | HeartbeatAck | Assign | Stop | Verify | Recycle | Install | HumanAnswer | Reply | Error,
    Field(discriminator="type"),
]
server_message: TypeAdapter[ServerMessage] = TypeAdapter(ServerMessage)


class EnrolRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    machine: str = Field(
        min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="the machine's name: letters, digits, '.', '_' and '-'",
    )
    pool: str = Field(default="default", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    labels: dict[str, str] = Field(default_factory=dict)


class EnrolResponse(BaseModel):
    machine_id: str
    agent_key: str
    heartbeat_interval: float
    heartbeat_timeout: float
