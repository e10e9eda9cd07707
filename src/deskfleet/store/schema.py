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
    Column("data", LargeBinary, nullable=False),
    Column("created_at", Float, nullable=False),
    Index("ix_artifacts_run", "run_id"),
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
