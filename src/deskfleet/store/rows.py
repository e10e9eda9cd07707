"""Row ↔ dataclass conversion for the SQL stores."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..models import (
    AccountLease,
    Artifact,
    Attempt,
    AttemptMode,
    AttemptPhase,
    AttemptState,
    AutomationSpec,
    Ending,
    Event,
    LeaseState,
    Machine,
    MachineAdmin,
    MachineHealth,
    Pool,
    Run,
    RunState,
    StopReason,
    VaultAccount,
)

Row = Mapping[Any, Any]  # SQLAlchemy RowMapping, or a dict from the driver path


def pool(r: Row) -> Pool:
    return Pool(
        name=r["name"],
        description=r["description"],
        allow_wait_for_capacity=bool(r["allow_wait_for_capacity"]),
        affinity_wait=r["affinity_wait"],
        created_at=r["created_at"],
    )


def automation(r: Row) -> AutomationSpec:
    return AutomationSpec(
        name=r["name"],
        version=r["version"],
        description=r["description"],
        input_schema=r["input_schema"],
        output_schema=r["output_schema"],
        idempotent=bool(r["idempotent"]),
        has_reconcile=bool(r["has_reconcile"]),
        required_state=r["required_state"],
        secret_fields=list(r["secret_fields"]),
        pack=r.get("pack"),
        needs_account=bool(r.get("needs_account")),
    )


def machine(r: Row) -> Machine:
    return Machine(
        id=r["id"],
        pool=r["pool"],
        labels=dict(r["labels"]),
        automations=list(r["automations"]),
        health=MachineHealth(r["health"]),
        admin=MachineAdmin(r["admin"]),
        connected=bool(r["connected"]),
        replica=r["replica"],
        boot_id=r["boot_id"],
        agent_version=r["agent_version"],
        enrolled_at=r["enrolled_at"],
        last_heartbeat_at=r["last_heartbeat_at"],
        idle_since=r["idle_since"],
        resources=dict(r["resources"]),
        session_key=r["session_key"],
        session_expires_at=r["session_expires_at"],
        sessions=list(r.get("sessions") or ()),
        quarantine_reason=r["quarantine_reason"],
        runs_completed=r["runs_completed"],
        active_attempt_id=r.get("active_attempt_id"),
        active_run_id=r.get("active_run_id"),
        last_screenshot_id=r["last_screenshot_id"],
    )


def run(r: Row) -> Run:
    return Run(
        id=r["id"],
        automation=r["automation"],
        version=r["version"],
        input=dict(r["input"]),
        pool=r["pool"],
        labels=dict(r["labels"]),
        machine=r["machine"],
        prefer_machine=r["prefer_machine"],
        session_key=r["session_key"],
        priority=r["priority"],
        tenant=r["tenant"],
        queue_timeout=r["queue_timeout"],
        attempt_timeout=r["attempt_timeout"],
        progress_timeout=r["progress_timeout"],
        deadline_at=r["deadline_at"],
        max_attempts=r["max_attempts"],
        backoff_initial=r["backoff_initial"],
        backoff_max=r["backoff_max"],
        idempotency_key=r["idempotency_key"],
        request_hash=r["request_hash"],
        webhook_url=r["webhook_url"],
        state=RunState(r["state"]),
        created_at=r["created_at"],
        updated_at=r["updated_at"],
        queued_at=r["queued_at"],
        not_before=r["not_before"],
        attempts_started=r["attempts_started"],
        dispatches=r["dispatches"],
        needs_reconcile=bool(r["needs_reconcile"]),
        cancel_requested_at=r["cancel_requested_at"],
        output=r["output"],
        error_code=r["error_code"],
        error_message=r["error_message"],
        finished_at=r["finished_at"],
        current_attempt_id=r["current_attempt_id"],
        current_machine_id=r["current_machine_id"],
    )


def attempt(r: Row) -> Attempt:
    return Attempt(
        id=r["id"],
        run_id=r["run_id"],
        machine_id=r["machine_id"],
        number=r["number"],
        state=AttemptState(r["state"]),
        phase=AttemptPhase(r["phase"]),
        mode=AttemptMode(r["mode"]),
        assigned_at=r["assigned_at"],
        lease_expires_at=r["lease_expires_at"],
        started_at=r["started_at"],
        ended_at=r["ended_at"],
        last_progress_at=r["last_progress_at"],
        progress_step=r["progress_step"],
        stop_requested_at=r["stop_requested_at"],
        stop_reason=StopReason(r["stop_reason"]) if r["stop_reason"] else None,
        ending=Ending(r["ending"]) if r["ending"] else None,
        reason=r["reason"],
        account=r.get("account"),
    )


def event(r: Row) -> Event:
    return Event(
        id=r["id"],
        at=r["at"],
        kind=r["kind"],
        run_id=r["run_id"],
        attempt_id=r["attempt_id"],
        machine_id=r["machine_id"],
        from_state=r["from_state"],
        to_state=r["to_state"],
        reason=r["reason"],
        data=dict(r["data"] or {}),
    )


def artifact(r: Row) -> Artifact:
    return Artifact(
        id=r["id"],
        run_id=r["run_id"],
        attempt_id=r["attempt_id"],
        machine_id=r["machine_id"],
        name=r["name"],
        content_type=r["content_type"],
        size=r["size"],
        created_at=r["created_at"],
    )


def vault_account(r: Row) -> VaultAccount:
    return VaultAccount(
        name=r["name"],
        app=r["app"],
        username=r["username"],
        password=r["password"],
        totp_seed=r["totp_seed"],
        labels=dict(r["labels"] or {}),
        max_sessions=r["max_sessions"],
        created_at=r["created_at"],
        updated_at=r["updated_at"],
    )


def account_lease(r: Row) -> AccountLease:
    return AccountLease(
        account=r["account"],
        machine_id=r["machine_id"],
        state=LeaseState(r["state"]),
        since=r["since"],
        attempt_id=r["attempt_id"],
    )
