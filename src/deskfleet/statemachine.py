"""The run and attempt state machines as pure functions.

The store applies these decisions inside its transactions; nothing here does I/O, so the
rules can be tested exhaustively (see tests/unit/test_statemachine.py).

The retry rule is the heart of invariant 4 (no silent double effects): an attempt that
died *after the automation started* may have done its side effect. It is retried only if
the automation is idempotent, or with ``needs_reconcile`` so that the next attempt first
asks the automation's reconcile check whether the effect already happened. Otherwise the
run fails loudly and says why. An attempt that died *before* the automation started
cannot have done anything, so it is requeued without spending the retry budget — the
agent only starts an automation after the orchestrator has recorded ``running``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .models import (
    AttemptPhase,
    AttemptState,
    Ending,
    Run,
    RunState,
    StopReason,
)

#: Every transition a run may make. The store refuses any other.
RUN_TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    RunState.QUEUED: frozenset(
        {RunState.ASSIGNED, RunState.CANCELLED, RunState.TIMED_OUT, RunState.FAILED}
    ),
    RunState.ASSIGNED: frozenset(
        {
            RunState.PREPARING,
            RunState.QUEUED,
            # a reconcile result can arrive before the (fire-and-forget) "preparing" report
            RunState.SUCCEEDED,
            RunState.CANCELLED,
            RunState.TIMED_OUT,
            RunState.FAILED,
        }
    ),
    RunState.PREPARING: frozenset(
        {
            RunState.RUNNING,
            RunState.QUEUED,
            RunState.SUCCEEDED,  # reconcile found the effect already done
            RunState.FAILED,
            RunState.CANCELLED,
            RunState.TIMED_OUT,
        }
    ),
    RunState.RUNNING: frozenset(
        {RunState.SUCCEEDED, RunState.FAILED, RunState.QUEUED, RunState.CANCELLED, RunState.TIMED_OUT}
    ),
    RunState.SUCCEEDED: frozenset(),
    RunState.FAILED: frozenset(),
    RunState.CANCELLED: frozenset(),
    RunState.TIMED_OUT: frozenset(),
}

#: Attempts that never started running and were requeued: past this many, stop trying.
MAX_DISPATCHES_NOT_STARTED = 20


def can_transition(src: RunState, dst: RunState) -> bool:
    return dst in RUN_TRANSITIONS[src]


@dataclass(frozen=True, slots=True)
class Decision:
    """What happens to a run (and its attempt and machine) when an attempt ends."""

    run_state: RunState
    attempt_state: AttemptState
    code: str  # short machine-readable reason, e.g. "retry_after_reconcile"
    message: str  # what a person reads in the run's error or timeline
    needs_reconcile: bool = False
    not_before: float | None = None
    quarantine: bool = False  # the machine must re-prove its state before new work

    @property
    def retried(self) -> bool:
        return self.run_state is RunState.QUEUED


def backoff_delay(run: Run) -> float:
    """Exponential backoff from the run's policy, by attempts already started."""
    exponent = min(max(run.attempts_started - 1, 0), 62)  # 2**big would overflow the float
    return float(min(run.backoff_initial * (2**exponent), run.backoff_max))


def decide(
    run: Run,
    *,
    phase: AttemptPhase,
    ending: Ending,
    stop_reason: StopReason | None,
    idempotent: bool,
    has_reconcile: bool,
    now: float,
    detail: str = "",
    machine_id: str = "",
) -> Decision:
    """Decide the run's fate when its attempt ends with ``ending``.

    ``run.attempts_started`` already counts this attempt if it reached ``running``.
    """
    started = phase is AttemptPhase.RUNNING
    where = f" on {machine_id}" if machine_id else ""
    what = detail or ending.value

    if ending is Ending.SUCCEEDED:
        return Decision(RunState.SUCCEEDED, AttemptState.SUCCEEDED, "succeeded", "succeeded")
    if ending is Ending.RECONCILED:
        return Decision(
            RunState.SUCCEEDED,
            AttemptState.SUCCEEDED,
            "reconciled",
            "reconcile check found the effect of an earlier attempt; its result is the run's result",
        )

    quarantine = quarantines(ending, stop_reason)
    attempt_state = _attempt_state_for(ending, stop_reason)

    # A person's cancel and the run's deadline win over any retry.
    if run.cancel_requested_at is not None or stop_reason is StopReason.CANCELLED:
        return Decision(
            RunState.CANCELLED,
            AttemptState.CANCELLED if ending is Ending.STOPPED else attempt_state,
            "cancelled",
            "cancelled on request" + ("" if ending is Ending.STOPPED else f" (attempt ended: {what})"),
            quarantine=quarantine,
        )
    if stop_reason is StopReason.DEADLINE or (run.deadline_at is not None and now >= run.deadline_at):
        return Decision(
            RunState.TIMED_OUT,
            AttemptState.TIMED_OUT if ending is Ending.STOPPED else attempt_state,
            "deadline",
            "the run's deadline passed" + ("" if ending is Ending.STOPPED else f" (attempt ended: {what})"),
            quarantine=quarantine,
        )

    if ending is Ending.BUSINESS_ERROR:
        return Decision(RunState.FAILED, AttemptState.FAILED, "business_error", what, quarantine=quarantine)

    if ending is Ending.SYSTEM_ERROR and not started and run.needs_reconcile:
        # The reconcile check itself raised: the automation's own code failed, and another
        # machine would likely fail the same way. Unlike a machine that could not get ready,
        # that spends an attempt: back off, and give up after max_attempts such failures —
        # loudly, since whether the earlier attempt's effect happened is still unknown.
        failed_checks = run.dispatches - run.attempts_started
        if failed_checks >= run.max_attempts:
            return Decision(
                RunState.FAILED,
                attempt_state,
                "reconcile_failed",
                f"the reconcile check failed {failed_checks} times (last: {what}{where}); whether an earlier "
                "attempt's effect happened is unknown, so the run is not retried: a person must look",
                quarantine=quarantine,
            )
        return Decision(
            RunState.QUEUED,
            attempt_state,
            "retry_reconcile_failed",
            f"the reconcile check failed ({what}{where}); trying it again",
            needs_reconcile=True,
            not_before=now + backoff_delay(run),
            quarantine=quarantine,
        )
    if ending is Ending.PREFLIGHT_FAILED or not started:
        # Nothing of the automation ran: requeue without spending a retry.
        if run.dispatches >= MAX_DISPATCHES_NOT_STARTED:
            return Decision(
                RunState.FAILED,
                attempt_state,
                "too_many_dispatches",
                f"gave up after {run.dispatches} attempts that never started the automation; "
                f"last: {what}{where}",
                quarantine=quarantine,
            )
        return Decision(
            RunState.QUEUED,
            attempt_state,
            "requeued_not_started",
            f"attempt ended before the automation started ({what}{where}); requeued",
            needs_reconcile=run.needs_reconcile,
            quarantine=quarantine,
        )

    # The automation started, so its side effect may have happened.
    if run.attempts_started >= run.max_attempts:
        return Decision(
            RunState.FAILED,
            attempt_state,
            "retries_exhausted",
            f"attempt {run.attempts_started} of {run.max_attempts} ended: {what}{where}; no retries left",
            quarantine=quarantine,
        )
    # Errors back off before the retry. A lost attempt does not: its machine went silent or
    # rebooted, which says nothing about the run, and noticing it already took a heartbeat
    # timeout — the retry goes to another machine at once (max_attempts still bounds a run
    # that takes its machines down with it).
    not_before = None if ending is Ending.LOST else now + backoff_delay(run)
    if idempotent:
        return Decision(
            RunState.QUEUED,
            attempt_state,
            "retry_idempotent",
            f"attempt ended: {what}{where}; the automation is idempotent, retrying",
            needs_reconcile=False,
            not_before=not_before,
            quarantine=quarantine,
        )
    if has_reconcile:
        return Decision(
            RunState.QUEUED,
            attempt_state,
            "retry_after_reconcile",
            f"attempt ended: {what}{where}; retrying after the reconcile check",
            needs_reconcile=True,
            not_before=not_before,
            quarantine=quarantine,
        )
    return Decision(
        RunState.FAILED,
        attempt_state,
        "not_retried_unsafe",
        f"attempt ended after the automation started: {what}{where}. Not retried: the automation "
        "is not idempotent and has no reconcile check, so a retry could repeat its effect",
        quarantine=quarantine,
    )


def quarantines(ending: Ending, stop_reason: StopReason | None) -> bool:
    """Whether the machine must re-prove its state after an attempt ended this way: its
    agent was lost, failed pre-flight, ignored a stop, or its app stalled."""
    if ending in (Ending.SUCCEEDED, Ending.RECONCILED):
        return False
    return ending in (Ending.LOST, Ending.PREFLIGHT_FAILED, Ending.STOP_FORCED) or (
        stop_reason is StopReason.PROGRESS_STALLED
    )


def _attempt_state_for(ending: Ending, stop_reason: StopReason | None) -> AttemptState:
    if ending is Ending.LOST:
        return AttemptState.LOST
    if ending in (Ending.STOPPED, Ending.STOP_FORCED):
        return {
            StopReason.CANCELLED: AttemptState.CANCELLED,
            StopReason.DEADLINE: AttemptState.TIMED_OUT,
            StopReason.ATTEMPT_TIMEOUT: AttemptState.TIMED_OUT,
            StopReason.HUMAN_TIMEOUT: AttemptState.TIMED_OUT,
            StopReason.PROGRESS_STALLED: AttemptState.ABORTED,
            None: AttemptState.ABORTED,
        }[stop_reason]
    if ending is Ending.PREFLIGHT_FAILED:
        return AttemptState.ABORTED
    return AttemptState.FAILED


def queued_expiry(run: Run, now: float) -> tuple[str, str] | None:
    """Whether a queued run must end now: (code, message) or None."""
    if run.deadline_at is not None and now >= run.deadline_at:
        return "deadline", "the run's deadline passed while it waited for a machine"
    if now - run.queued_at >= run.queue_timeout:
        return (
            "queue_timeout",
            f"no machine took the run within its queue wait of {run.queue_timeout:g}s",
        )
    return None


def overdue_reason(
    run: Run,
    *,
    assigned_at: float,
    started_at: float | None,
    last_progress_at: float | None,
    now: float,
) -> StopReason | None:
    """Whether an active attempt must be told to stop now, and why."""
    if run.cancel_requested_at is not None:
        return StopReason.CANCELLED
    if run.deadline_at is not None and now >= run.deadline_at:
        return StopReason.DEADLINE
    if now - assigned_at >= run.attempt_timeout:
        return StopReason.ATTEMPT_TIMEOUT
    # Every phase reports progress (pre-flight steps too), so one watchdog covers a frozen
    # playbook as well as a frozen automation.
    since = max(t for t in (last_progress_at, started_at, assigned_at) if t is not None)
    if now - since >= run.progress_timeout:
        return StopReason.PROGRESS_STALLED
    return None
