"""The declared schema: one source of truth for migrations on SQLite and PostgreSQL.

Invariant 1 lives here, not in code: a partial unique index allows at most one ``active``
attempt per machine (and one per run). A bug in the scheduler cannot double-book a
machine; the database refuses the second row. ``attempts.id`` is the lease's fencing
token, so it must only grow: SQLite's AUTOINCREMENT never reuses an id.

Times are float seconds since the epoch; JSON columns hold labels, inputs, outputs and
event data.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

# 64-bit ids on PostgreSQL (a busy fleet writes billions of events); on SQLite an INTEGER
# PRIMARY KEY is the 64-bit rowid already, and must be spelled INTEGER to be one.
Id = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

RUN_STATES = ("queued", "assigned", "preparing", "running", "succeeded", "failed", "cancelled", "timed_out")
ATTEMPT_STATES = ("active", "succeeded", "failed", "lost", "aborted", "cancelled", "timed_out")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


pools = Table(
    "pools",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("description", Text, nullable=False, server_default=""),
    Column("allow_wait_for_capacity", Boolean, nullable=False, server_default=text("false")),
    Column("affinity_wait", Float, nullable=False, server_default=text("10")),
    Column("created_at", Float, nullable=False),
)

automations = Table(
    "automations",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("version", String(64), primary_key=True),
    Column("description", Text, nullable=False, server_default=""),
    Column("input_schema", JSON, nullable=False),
    Column("output_schema", JSON, nullable=False),
    Column("idempotent", Boolean, nullable=False),
    Column("has_reconcile", Boolean, nullable=False),
    Column("required_state", String(128), nullable=False),
    Column("secret_fields", JSON, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("pack", String(128)),
    Column("needs_account", Boolean, nullable=False, server_default=text("false")),
)

machines = Table(
    "machines",
    metadata,
    Column("id", String(128), primary_key=True),
    Column("pool", String(128), ForeignKey("pools.name"), nullable=False),
    Column("labels", JSON, nullable=False),
    Column("automations", JSON, nullable=False),
    Column("health", String(16), nullable=False),
    Column("admin", String(16), nullable=False),
    Column("connected", Boolean, nullable=False),
    Column("boot_id", String(128), nullable=False, server_default=""),
    Column("agent_version", String(64), nullable=False, server_default=""),
    Column("key_hash", String(128), nullable=False),
    Column("enrolled_at", Float, nullable=False),
    Column("last_heartbeat_at", Float),
    Column("idle_since", Float),
    Column("resources", JSON, nullable=False),
    Column("session_key", String(200)),
    Column("session_expires_at", Float),
    Column("replica", String(64)),  # the orchestrator replica holding the agent's connection
    Column("quarantine_reason", Text),
    Column("runs_completed", Integer, nullable=False, server_default=text("0")),
    Column("last_screenshot_id", String(64)),
    Column("sessions", JSON),  # account names from the session notes (see account_leases)
    CheckConstraint(_in("health", ("online", "offline", "quarantined")), name="health"),
    CheckConstraint(_in("admin", ("active", "cordoned", "draining")), name="admin"),
    Index("ix_machines_pool", "pool"),
    # A scheduling pass reads the first page of free machines, idle longest first
    # (``Statements.free_machines``): walked in this index's order, it stops after the page,
    # where without it every machine is read and sorted at every pass.
    Index(
        "ix_machines_free",
        "idle_since",
        "id",
        sqlite_where=text("connected AND health = 'online' AND admin = 'active'"),
        postgresql_where=text("connected AND health = 'online' AND admin = 'active'"),
    ),
)

runs = Table(
    "runs",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("automation", String(200), nullable=False),
    Column("version", String(64)),
    Column("input", JSON, nullable=False),
    Column("pool", String(128), ForeignKey("pools.name"), nullable=False),
    Column("labels", JSON, nullable=False),
    Column("machine", String(128)),
    Column("prefer_machine", String(128)),
    Column("session_key", String(200)),
    Column("priority", Integer, nullable=False),
    Column("tenant", String(128), nullable=False),
    Column("queue_timeout", Float, nullable=False),
    Column("attempt_timeout", Float, nullable=False),
    Column("progress_timeout", Float, nullable=False),
    Column("deadline_at", Float),
    Column("max_attempts", Integer, nullable=False),
    Column("backoff_initial", Float, nullable=False),
    Column("backoff_max", Float, nullable=False),
    Column("idempotency_key", String(200)),
    Column("request_hash", String(128)),
    Column("webhook_url", Text),
    Column("state", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("queued_at", Float, nullable=False),
    Column("not_before", Float),
    Column("attempts_started", Integer, nullable=False, server_default=text("0")),
    Column("dispatches", Integer, nullable=False, server_default=text("0")),
    Column("needs_reconcile", Boolean, nullable=False, server_default=text("false")),
    Column("cancel_requested_at", Float),
    Column("output", JSON),
    Column("error_code", String(64)),
    Column("error_message", Text),
    Column("finished_at", Float),
    Column("current_attempt_id", Id),
    Column("current_machine_id", String(128)),
    Column("traceparent", String(64)),  # the W3C trace context of its submit (OpenTelemetry on)
    CheckConstraint(_in("state", RUN_STATES), name="state"),
    UniqueConstraint("tenant", "idempotency_key", name="uq_runs_idempotency"),
    Index("ix_runs_state", "state"),
    Index("ix_runs_created", "created_at"),
)

# A scheduling pass reads queued runs in its order (``statements._PASS_ORDER``: priority,
# runs with a deadline first, then age) a page at a time: walked in these indexes' order it
# stops after the page, where without them every queued run is read and sorted at every pass
# (measured: 9.8 ms against 0.9 ms a pass for a backlog of 40,000). The second is the same
# order for one automation: a pass that starts long runs first reads the head of each.
_DUE_ORDER = (runs.c.priority.desc(), runs.c.deadline_at.is_(None), runs.c.deadline_at, runs.c.created_at)
Index("ix_runs_due", *_DUE_ORDER,
      sqlite_where=text("state = 'queued'"), postgresql_where=text("state = 'queued'"))
Index("ix_runs_due_automation", runs.c.automation, *_DUE_ORDER,
      sqlite_where=text("state = 'queued'"), postgresql_where=text("state = 'queued'"))

attempts = Table(
    "attempts",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("run_id", String(40), ForeignKey("runs.id"), nullable=False),
    Column("machine_id", String(128), ForeignKey("machines.id"), nullable=False),
    Column("number", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("phase", String(16), nullable=False),
    Column("mode", String(16), nullable=False),
    Column("assigned_at", Float, nullable=False),
    Column("lease_expires_at", Float, nullable=False),
    Column("started_at", Float),
    Column("ended_at", Float),
    Column("last_progress_at", Float),
    Column("progress_step", Text),
    Column("stop_requested_at", Float),
    Column("stop_reason", String(32)),
    Column("ending", String(32)),
    Column("reason", Text),
    Column("account", String(200)),  # the vault account granted with the attempt
    CheckConstraint(_in("state", ATTEMPT_STATES), name="state"),
    CheckConstraint(_in("phase", ("assigned", "preparing", "running")), name="phase"),
    # Invariant 1: at most one active attempt per machine, and per run.
    Index(
        "uq_attempts_active_machine",
        "machine_id",
        unique=True,
        sqlite_where=text("state = 'active'"),
        postgresql_where=text("state = 'active'"),
    ),
    Index(
        "uq_attempts_active_run",
        "run_id",
        unique=True,
        sqlite_where=text("state = 'active'"),
        postgresql_where=text("state = 'active'"),
    ),
    Index("ix_attempts_run", "run_id"),
    sqlite_autoincrement=True,
)

events = Table(
    "events",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("kind", String(64), nullable=False),
    Column("run_id", String(40)),
    Column("attempt_id", Id),
    Column("machine_id", String(128)),
    Column("from_state", String(32)),
    Column("to_state", String(32)),
    Column("reason", Text),
    Column("data", JSON, nullable=False),
    Index("ix_events_run", "run_id", "id"),
    Index("ix_events_machine", "machine_id", "id"),
    sqlite_autoincrement=True,
)

artifacts = Table(
    "artifacts",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("run_id", String(40)),
    Column("attempt_id", Id),
    Column("machine_id", String(128)),
    Column("name", String(200), nullable=False),
    Column("content_type", String(100), nullable=False),
    Column("size", Integer, nullable=False),
    Column("data", LargeBinary, nullable=False),  # encrypted: see encrypted_with
    Column("created_at", Float, nullable=False),
    # Private screenshots (0011): the fingerprint of the key that encrypted ``data`` (NULL:
    # stored in the clear, before 0011); what the agent redacted (names, never content); the
    # machine's pool and the automation's retention, which the leader's sweep goes by.
    Column("encrypted_with", String(64)),
    Column("redaction", JSON),
    Column("pool", String(128)),
    Column("retention", Float),
    Index("ix_artifacts_run", "run_id"),
    Index("ix_artifacts_created", "created_at"),
    Index("ix_artifacts_pool_created", "pool", "created_at"),
    Index("ix_artifacts_retention_created", "retention", "created_at"),
)

webhooks = Table(
    "webhooks",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("run_id", String(40), nullable=False),
    Column("url", Text, nullable=False),
    Column("tries", Integer, nullable=False, server_default=text("0")),
    Column("next_at", Float, nullable=False),
    Column("delivered_at", Float),
    Column("gave_up_at", Float),
    Column("last_error", Text),
    Column("created_at", Float, nullable=False),
    Index(
        "ix_webhooks_due",
        "next_at",
        sqlite_where=text("delivered_at IS NULL AND gave_up_at IS NULL"),
        postgresql_where=text("delivered_at IS NULL AND gave_up_at IS NULL"),
    ),
)

# Orchestrator processes sharing one database (PostgreSQL): who is alive, for the leader to
# notice a replica that died with agents connected to it.
replicas = Table(
    "replicas",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("started_at", Float, nullable=False),
    Column("last_seen", Float, nullable=False),
    Column("key", String(64)),  # the fingerprint of the secret key it encrypts with
)

# Facts about the installation itself, e.g. which secret key encrypted the stored secrets.
meta = Table(
    "meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

# The credential vault. Passwords and TOTP seeds are stored encrypted with the server's key
# (``enc:v1:…``); usernames are not secrets and stay readable (leases are matched by them).
accounts = Table(
    "accounts",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("app", String(128)),
    Column("username", String(200), nullable=False),
    Column("password", Text, nullable=False),
    Column("totp_seed", Text),
    Column("labels", JSON, nullable=False),
    Column("max_sessions", Integer, nullable=False, server_default=text("1")),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    CheckConstraint("max_sessions >= 1", name="max_sessions"),
    Index("ix_accounts_app", "app"),
)

# Account leases: which machine may be logged in as which account. The claim that reserves
# one locks its account row first and counts these, so an account never has more than
# ``max_sessions`` (the store enforces it under concurrent replicas). No foreign keys: a
# heartbeat that records a session must never fail because the account was just removed.
account_leases = Table(
    "account_leases",
    metadata,
    Column("account", String(200), primary_key=True),
    Column("machine_id", String(128), primary_key=True),
    Column("state", String(16), nullable=False),
    Column("since", Float, nullable=False),
    Column("attempt_id", Id),
    Column("settle_at", Float),  # a verification's reservation settles then (its end, or a deadline)
    CheckConstraint(_in("state", ("reserved", "held")), name="state"),
    Index("ix_account_leases_machine", "machine_id"),
)

# Pool policies (deskfleet.pools): every version kept, the latest in force. A change names
# the version it was made against; the store refuses it if that is no longer the latest.
pool_policies = Table(
    "pool_policies",
    metadata,
    Column("pool", String(128), ForeignKey("pools.name", ondelete="CASCADE"), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("policy", JSON, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("comment", Text, nullable=False, server_default=""),
    CheckConstraint("version >= 1", name="version"),
)

# Rolling maintenance (deskfleet.fleet.controller): one row per campaign; ``machines`` maps
# each machine to its step ({"step", "since", "boot_id", "detail"}), written by the leader.
maintenance = Table(
    "maintenance",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("pool", String(128), ForeignKey("pools.name", ondelete="CASCADE"), nullable=False),
    Column("state", String(16), nullable=False),  # running | done | stalled | cancelled
    Column("reason", Text, nullable=False, server_default=""),
    Column("machines", JSON, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("detail", Text, nullable=False, server_default=""),
    Index("ix_maintenance_pool_state", "pool", "state"),
    sqlite_autoincrement=True,
)

# Human tasks (deskfleet.services.human): what only a person can do for a running attempt —
# approve a push, read out an SMS code. A secret task's response is stored encrypted
# (``enc:v1:…``, in ``secret_response``) and wiped once its agent has it or its attempt is
# over. No foreign keys, as for events: the
# rows outlive nothing they point at, and a task is written in the attempt's own
# transaction, under its lock.
HUMAN_TASK_STATES = ("open", "claimed", "completed", "expired", "cancelled")

human_tasks = Table(
    "human_tasks",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("run_id", String(40), nullable=False),
    Column("attempt_id", Id, nullable=False),
    Column("machine_id", String(128), nullable=False),
    Column("pool", String(128), nullable=False),
    Column("kind", String(64), nullable=False),
    Column("prompt", Text, nullable=False),
    Column("state", String(16), nullable=False),
    Column("secret", Boolean, nullable=False, server_default=text("false")),
    Column("screenshot_id", String(40)),
    Column("created_at", Float, nullable=False),
    Column("due_at", Float, nullable=False),
    Column("requested_due_at", Float, nullable=False),
    Column("escalate_at", Float),
    Column("escalated_at", Float),
    Column("claimed_by", String(200)),
    Column("claimed_at", Float),
    Column("completed_by", String(200)),
    Column("ended_at", Float),
    Column("reason", Text),
    Column("response", Text),  # a task's answer; a secret task's is never here
    Column("secret_response", Text),  # a secret task's answer, encrypted, until its agent has it
    Column("answered", Boolean, nullable=False, server_default=text("false")),
    CheckConstraint(_in("state", HUMAN_TASK_STATES), name="state"),
    Index("ix_human_tasks_run", "run_id"),
    Index("ix_human_tasks_attempt", "attempt_id"),
    # the leader's sweep (due, escalation, orphans) reads only the tasks still waiting
    Index("ix_human_tasks_waiting", "due_at",
          sqlite_where=text("state IN ('open', 'claimed')"), postgresql_where=text("state IN ('open', 'claimed')")),
    # secret answers still held: wiped once their attempt is over
    Index("ix_human_tasks_secret_held", "attempt_id",
          sqlite_where=text("secret_response IS NOT NULL"), postgresql_where=text("secret_response IS NOT NULL")),
)

# Human-task webhooks: an outbox like ``webhooks``, written in the transaction of the task's
# transition, delivered by the leader (services.webhooks).
human_notices = Table(
    "human_notices",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("task_id", String(40), nullable=False),
    Column("event", String(64), nullable=False),
    Column("url", Text, nullable=False),
    Column("tries", Integer, nullable=False, server_default=text("0")),
    Column("next_at", Float, nullable=False),
    Column("delivered_at", Float),
    Column("gave_up_at", Float),
    Column("last_error", Text),
    Column("created_at", Float, nullable=False),
    Index(
        "ix_human_notices_due",
        "next_at",
        sqlite_where=text("delivered_at IS NULL AND gave_up_at IS NULL"),
        postgresql_where=text("delivered_at IS NULL AND gave_up_at IS NULL"),
    ),
)

# Published packs (deskfleet.store.packs): one row per name and version, the archive's bytes
# kept here, so that every replica serves them to agents (a replica-local file would not
# be). ``automations``: what the pack offers, as its build wrote it; ``manifest``: pack.toml.
packs = Table(
    "packs",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("version", String(64), primary_key=True),
    Column("sha256", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("manifest", JSON, nullable=False),
    Column("automations", JSON, nullable=False),
    Column("archive", LargeBinary, nullable=False),
    Column("created_at", Float, nullable=False),
)

# Pack rollouts: a pool assigned a pack's version, its machines moved to it a few at a time
# by the leader (deskfleet.fleet.rollout). The newest rollout of a pool and pack is the
# assignment in force; ``from_version`` is what the pool ran before (what a rollback goes
# back to). ``machines`` maps each machine to its step ({"step", "since", "started", "detail"}).
pack_rollouts = Table(
    "pack_rollouts",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("pool", String(128), ForeignKey("pools.name", ondelete="CASCADE"), nullable=False),
    Column("pack", String(64), nullable=False),
    Column("version", String(64), nullable=False),
    Column("from_version", String(64)),
    Column("max_unavailable", String(16), nullable=False),
    Column("state", String(16), nullable=False),  # running | stalled | done | superseded
    Column("reason", Text, nullable=False, server_default=""),
    Column("machines", JSON, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("detail", Text, nullable=False, server_default=""),
    Index("ix_pack_rollouts_pool_pack", "pool", "pack"),
    sqlite_autoincrement=True,
)

# The fleet's counters and histogram buckets for /metrics (deskfleet.store.metrics): added to
# by the transactions that make what they count, so that they add up across replicas and
# survive restarts. ``labels``: the label values as JSON (sorted keys); ``shard``: one of a
# few rows per counter on PostgreSQL, summed when read (replicas do not queue on one row).
metric_counts = Table(
    "metric_counts",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("labels", String(1000), primary_key=True),
    Column("shard", Integer, primary_key=True),
    Column("value", Float, nullable=False),
)

# Machines' figures over time (app memory, CPU), one row a minute or so per machine, taken
# from its heartbeats by the hub and written with them; the leader prunes what is older than
# a day. The dashboard draws them (deskfleet.ui).
machine_samples = Table(
    "machine_samples",
    metadata,
    Column("machine_id", String(128), primary_key=True),
    Column("at", Float, primary_key=True),
    Column("memory_mb", Float, nullable=False),
    Column("cpu_percent", Float, nullable=False),
    Index("ix_machine_samples_at", "at"),
)

# API keys (deskfleet.access): the public prefix names a key; only the SHA-256 of the whole
# key is kept. ``tenant`` is one tenant or "*" (every tenant).
api_keys = Table(
    "api_keys",
    metadata,
    Column("prefix", String(32), primary_key=True),
    Column("digest", String(64), nullable=False),
    Column("name", String(128), nullable=False),
    Column("role", String(16), nullable=False),
    Column("tenant", String(128), nullable=False),
    Column("screenshots", Boolean, nullable=False, server_default=text("false")),
    Column("created_at", Float, nullable=False),
    Column("created_by", String(64), nullable=False),
    Column("expires_at", Float),
    Column("revoked_at", Float),
    Column("revoked_by", String(64)),
    Column("last_used_at", Float),
    CheckConstraint(_in("role", ("submitter", "operator", "admin")), name="role"),
)

# The audit log: who did what, append-only — triggers (migration 0010) refuse to update or
# delete a row, on SQLite and PostgreSQL alike. ``actor`` is a key's prefix, "bootstrap",
# "anonymous" or "machine:<id>" (a credential handed to an agent); ``outcome`` is "ok",
# "denied" (401, 403, another tenant's 404) or "failed" (any other refusal).
audit_log = Table(
    "audit_log",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("actor", String(64), nullable=False),
    Column("role", String(16)),
    Column("tenant", String(128)),
    Column("action", String(200), nullable=False),
    Column("target", String(200), nullable=False, server_default=""),
    Column("outcome", String(16), nullable=False),
    Column("status", Integer),
    Column("detail", JSON, nullable=False),
    Column("remote", String(64), nullable=False, server_default=""),
    Index("ix_audit_log_actor", "actor", "id"),
    Index("ix_audit_log_action", "action", "id"),
    sqlite_autoincrement=True,
)
