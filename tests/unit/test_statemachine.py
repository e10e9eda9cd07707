"""The run/attempt decision rules and the scheduler's matching policy, as pure functions.

Property tests (hypothesis) generate runs in any shape — any attempts spent, any budget,
cancelled or not, past their deadline or not — and every way an attempt can end, and check
the rules of DESIGN.md against :func:`deskfleet.statemachine.decide`:

* success (or a reconcile that found the effect done) → ``succeeded``, whatever else;
* a person's cancel → ``cancelled``; a passed deadline → ``timed_out``;
* an attempt that never reached ``running`` spends no retry and is requeued (up to the
  dispatch cap);
* an attempt that started and died is retried only if the automation is idempotent or has
  a reconcile check (then ``needs_reconcile``), and only while retries remain; otherwise
  the run fails and says why (invariant 4: no silent double effects);
* a business error is never retried; lost/pre-flight/forced-stop/stalled machines are
  quarantined; every decision is a transition the store accepts.

The scheduler's policy is tested with hand-built fleets and with generated ones.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from deskfleet.models import (
    AttemptPhase,
    AttemptState,
    Ending,
    Machine,
    MachineAdmin,
    MachineHealth,
    Pool,
    Run,
    RunState,
    StopReason,
)
from deskfleet.scheduler import (
    LongestIdle,
    MostRecentlyUsed,
    Policy,
    eligible,
    prefers,
    serviceable,
    wants_affinity,
)
from deskfleet.statemachine import (
    MAX_DISPATCHES_NOT_STARTED,
    RUN_TRANSITIONS,
    backoff_delay,
    can_transition,
    decide,
    overdue_reason,
    queued_expiry,
)

T0 = 1_700_000_000.0

#: The run's state while its attempt is in each phase (the store keeps them in step).
STATE_OF_PHASE = {
    AttemptPhase.ASSIGNED: RunState.ASSIGNED,
    AttemptPhase.PREPARING: RunState.PREPARING,
    AttemptPhase.RUNNING: RunState.RUNNING,
}
ACTIVE_STATES = [s for s in RunState if s.active]
SUCCESS = (Ending.SUCCEEDED, Ending.RECONCILED)
FAILURES = [e for e in Ending if e not in SUCCESS]
QUARANTINE_ENDINGS = (Ending.LOST, Ending.PREFLIGHT_FAILED, Ending.STOP_FORCED)


def make_run(**overrides: Any) -> Run:
    values: dict[str, Any] = {
        "id": "run_1", "automation": "ehr.create", "version": None, "input": {}, "pool": "default",
        "labels": {}, "machine": None, "prefer_machine": None, "session_key": None, "priority": 0,
        "tenant": "default", "queue_timeout": 3600.0, "attempt_timeout": 900.0,
        "progress_timeout": 120.0, "deadline_at": None, "max_attempts": 3,
        "backoff_initial": 1.0, "backoff_max": 60.0, "idempotency_key": None,
        "request_hash": None, "webhook_url": None, "state": RunState.RUNNING,
        "created_at": T0, "updated_at": T0, "queued_at": T0,
    }
    values.update(overrides)
    return Run(**values)


def make_machine(mid: str, **overrides: Any) -> Machine:
    values: dict[str, Any] = {
        "id": mid, "pool": "default", "automations": ["ehr.create@1"],
        "health": MachineHealth.ONLINE, "connected": True, "idle_since": T0,
    }
    values.update(overrides)
    return Machine(**values)


# -- strategies ---------------------------------------------------------------------------------

times = st.floats(min_value=T0 - 10_000, max_value=T0 + 10_000, allow_nan=False)
durations = st.floats(min_value=0.0, max_value=5_000.0, allow_nan=False)


@st.composite
def runs(draw: st.DrawFn) -> Run:
    max_attempts = draw(st.integers(1, 20))  # the API's bound (config.MAX_ATTEMPTS)
    return make_run(
        attempts_started=draw(st.integers(0, 25)),
        max_attempts=max_attempts,
        dispatches=draw(st.integers(0, MAX_DISPATCHES_NOT_STARTED + 5)),
        cancel_requested_at=draw(st.none() | times),
        deadline_at=draw(st.none() | times),
        needs_reconcile=draw(st.booleans()),
        backoff_initial=draw(st.floats(0.0, 3600.0)),
        backoff_max=draw(st.floats(0.0, 86_400.0)),
        queued_at=draw(times),
        queue_timeout=draw(st.floats(0.1, 5_000.0)),
        attempt_timeout=draw(st.floats(0.1, 5_000.0)),
        progress_timeout=draw(st.floats(0.1, 5_000.0)),
    )


endings = st.sampled_from(list(Ending))
phases = st.sampled_from(list(AttemptPhase))
stop_reasons = st.none() | st.sampled_from(list(StopReason))


def call_decide(run: Run, phase: AttemptPhase, ending: Ending, stop: StopReason | None,
                idempotent: bool, has_reconcile: bool, now: float, machine_id: str = "m1"):
    return decide(run, phase=phase, ending=ending, stop_reason=stop, idempotent=idempotent,
                  has_reconcile=has_reconcile, now=now, detail="", machine_id=machine_id)


def cancelled(run: Run, stop: StopReason | None) -> bool:
    return run.cancel_requested_at is not None or stop is StopReason.CANCELLED


def past_deadline(run: Run, stop: StopReason | None, now: float) -> bool:
    return stop is StopReason.DEADLINE or (run.deadline_at is not None and now >= run.deadline_at)


def calm(run: Run, stop: StopReason | None, now: float) -> tuple[Run, StopReason | None]:
    """The same inputs without a cancel and without a passed deadline (instead of filtering)."""
    deadline = run.deadline_at
    if deadline is not None and now >= deadline:
        deadline = now + 1.0 + (now - deadline)
    if stop in (StopReason.CANCELLED, StopReason.DEADLINE):
        stop = None
    return replace(run, cancel_requested_at=None, deadline_at=deadline), stop


decide_args = {
    "run": runs(), "phase": phases, "ending": endings, "stop": stop_reasons,
    "idempotent": st.booleans(), "has_reconcile": st.booleans(), "now": times,
}


# -- decide: the rules, one property each --------------------------------------------------------

@given(**decide_args)
def test_success_always_wins(run, phase, ending, stop, idempotent, has_reconcile, now):
    assume(ending in SUCCESS)
    d = call_decide(run, phase, ending, stop, idempotent, has_reconcile, now)
    assert d.run_state is RunState.SUCCEEDED
    assert d.attempt_state is AttemptState.SUCCEEDED
    assert not d.retried and not d.quarantine
    assert d.code == ("succeeded" if ending is Ending.SUCCEEDED else "reconciled")


@given(**decide_args)
def test_cancel_wins_over_everything_but_success(run, phase, ending, stop, idempotent, has_reconcile, now):
    assume(ending not in SUCCESS)
    if not cancelled(run, stop):
        run = replace(run, cancel_requested_at=now)
    d = call_decide(run, phase, ending, stop, idempotent, has_reconcile, now)
    assert d.run_state is RunState.CANCELLED
    assert d.code == "cancelled"
    if ending is Ending.STOPPED:
        assert d.attempt_state is AttemptState.CANCELLED
    else:
        assert ending.value in d.message  # what actually ended the attempt is said


@given(**decide_args)
def test_deadline_wins_over_retries_and_errors(run, phase, ending, stop, idempotent, has_reconcile, now):
    assume(ending not in SUCCESS)
    run = replace(run, cancel_requested_at=None)
    if stop is StopReason.CANCELLED:
        stop = StopReason.DEADLINE
    if not past_deadline(run, stop, now):
        run = replace(run, deadline_at=now - (run.deadline_at or now) % 100)
    d = call_decide(run, phase, ending, stop, idempotent, has_reconcile, now)
    assert d.run_state is RunState.TIMED_OUT
    assert d.code == "deadline"
    if ending is Ending.STOPPED:
        assert d.attempt_state is AttemptState.TIMED_OUT


@given(**decide_args)
def test_business_error_is_never_retried(run, phase, ending, stop, idempotent, has_reconcile, now):
    run, stop = calm(run, stop, now)
    d = call_decide(run, phase, Ending.BUSINESS_ERROR, stop, idempotent, has_reconcile, now)
    assert d.run_state is RunState.FAILED
    assert d.attempt_state is AttemptState.FAILED
    assert d.code == "business_error"
    assert not d.retried


@given(**decide_args)
def test_attempt_that_never_ran_spends_no_retry(run, phase, ending, stop, idempotent, has_reconcile, now):
    """Nothing of the automation ran: requeued even with the retry budget spent, even for an
    unsafe automation, and the run keeps any pending reconcile. Only the dispatch cap stops it."""
    assume(ending not in (*SUCCESS, Ending.BUSINESS_ERROR))
    assume(phase is not AttemptPhase.RUNNING or ending is Ending.PREFLIGHT_FAILED)
    assume(not (ending is Ending.SYSTEM_ERROR and phase is not AttemptPhase.RUNNING and run.needs_reconcile))
    run, stop = calm(run, stop, now)
    d = call_decide(run, phase, ending, stop, idempotent, has_reconcile, now)
    if run.dispatches >= MAX_DISPATCHES_NOT_STARTED:
        assert d.run_state is RunState.FAILED
        assert d.code == "too_many_dispatches"
        assert str(run.dispatches) in d.message
    else:
        assert d.run_state is RunState.QUEUED
        assert d.code == "requeued_not_started"
        assert d.needs_reconcile == run.needs_reconcile
        assert d.not_before is None  # no backoff: nothing was tried


@given(**decide_args)
def test_a_failing_reconcile_check_spends_attempts_and_then_fails_loudly(run, phase, ending, stop, idempotent,
                                                                           has_reconcile, now):
    """The reconcile check raised: the automation's own code failed. It is tried again with a
    backoff, never without one, and after max_attempts such failures the run fails saying
    that whether the earlier effect happened is unknown (never an endless requeue)."""
    assume(phase is not AttemptPhase.RUNNING)
    run, stop = calm(run, stop, now)
    run = replace(run, needs_reconcile=True)
    d = call_decide(run, phase, Ending.SYSTEM_ERROR, stop, idempotent, has_reconcile, now)
    if run.dispatches - run.attempts_started >= run.max_attempts:
        assert (d.run_state, d.code) == (RunState.FAILED, "reconcile_failed")
        assert "unknown" in d.message
    else:
        assert (d.run_state, d.code) == (RunState.QUEUED, "retry_reconcile_failed")
        assert d.needs_reconcile and d.not_before is not None and d.not_before >= now


@example(run=make_run(attempts_started=1, max_attempts=3), ending=Ending.SYSTEM_ERROR, stop=None,
         idempotent=False, has_reconcile=False, now=T0)
@given(run=runs(), ending=endings, stop=stop_reasons, idempotent=st.booleans(),
       has_reconcile=st.booleans(), now=times)
def test_started_attempt_is_retried_only_when_safe(run, ending, stop, idempotent, has_reconcile, now):
    """Invariant 4: the automation started, so its effect may have happened."""
    assume(ending not in (*SUCCESS, Ending.BUSINESS_ERROR, Ending.PREFLIGHT_FAILED))
    run, stop = calm(run, stop, now)
    # The store counted this attempt when it started.
    run = replace(run, attempts_started=max(run.attempts_started, 1))
    d = call_decide(run, AttemptPhase.RUNNING, ending, stop, idempotent, has_reconcile, now)
    if run.attempts_started >= run.max_attempts:
        assert d.run_state is RunState.FAILED
        assert d.code == "retries_exhausted"
        assert "no retries left" in d.message
        assert f"{run.attempts_started} of {run.max_attempts}" in d.message
    elif idempotent:
        assert d.run_state is RunState.QUEUED
        assert d.code == "retry_idempotent"
        assert d.needs_reconcile is False
        assert d.not_before == (None if ending is Ending.LOST else now + backoff_delay(run))
    elif has_reconcile:
        assert d.run_state is RunState.QUEUED
        assert d.code == "retry_after_reconcile"
        assert d.needs_reconcile is True  # the next attempt asks first whether it is done
        # A lost machine says nothing about the run: retried elsewhere at once; errors back off.
        assert d.not_before == (None if ending is Ending.LOST else now + backoff_delay(run))
    else:
        assert d.run_state is RunState.FAILED
        assert d.code == "not_retried_unsafe"
        # Fails loudly, and says why.
        assert "not idempotent" in d.message and "reconcile" in d.message
        assert "m1" in d.message


@given(**decide_args)
def test_no_retry_can_repeat_an_effect_unchecked(run, phase, ending, stop, idempotent, has_reconcile, now):
    """Whatever the inputs: a retry after a started attempt is idempotent or reconciled."""
    d = call_decide(run, phase, ending, stop, idempotent, has_reconcile, now)
    started = phase is AttemptPhase.RUNNING and ending is not Ending.PREFLIGHT_FAILED
    if d.retried and started:
        assert idempotent or (has_reconcile and d.needs_reconcile)
    if d.retried and not idempotent and (started or run.needs_reconcile):
        assert d.needs_reconcile


@given(**decide_args)
def test_failures_say_why(run, phase, ending, stop, idempotent, has_reconcile, now):
    d = call_decide(run, phase, ending, stop, idempotent, has_reconcile, now)
    assert d.code and d.message
    assert d.attempt_state is not AttemptState.ACTIVE


@example(run=make_run(), phase=AttemptPhase.RUNNING, ending=Ending.BUSINESS_ERROR,
         stop=StopReason.PROGRESS_STALLED, idempotent=False, has_reconcile=False, now=T0)
@given(**decide_args)
def test_quarantine_for_untrustworthy_machines(run, phase, ending, stop, idempotent, has_reconcile, now):
    """A machine whose agent was lost, failed pre-flight, ignored a stop or stalled must
    re-prove its state before new work, whatever the run's fate."""
    assume(ending not in SUCCESS)
    d = call_decide(run, phase, ending, stop, idempotent, has_reconcile, now)
    expected = ending in QUARANTINE_ENDINGS or stop is StopReason.PROGRESS_STALLED
    assert d.quarantine == expected, (ending, stop, d)


@given(**decide_args)
def test_attempt_states(run, phase, ending, stop, idempotent, has_reconcile, now):
    d = call_decide(run, phase, ending, stop, idempotent, has_reconcile, now)
    if ending is Ending.LOST:
        assert d.attempt_state is AttemptState.LOST
    elif ending in SUCCESS:
        assert d.attempt_state is AttemptState.SUCCEEDED
    elif ending in (Ending.BUSINESS_ERROR, Ending.SYSTEM_ERROR):
        assert d.attempt_state is AttemptState.FAILED
    elif ending is Ending.PREFLIGHT_FAILED:
        assert d.attempt_state is AttemptState.ABORTED
    elif ending is Ending.STOPPED:
        # The attempt ended as the stop's reason says; a cancel or a passed deadline names it.
        if cancelled(run, stop):
            assert d.attempt_state is AttemptState.CANCELLED
        elif past_deadline(run, stop, now) or stop in (StopReason.ATTEMPT_TIMEOUT, StopReason.HUMAN_TIMEOUT):
            assert d.attempt_state is AttemptState.TIMED_OUT
        else:
            assert d.attempt_state is AttemptState.ABORTED
    else:  # STOP_FORCED: by the reason the stop was ordered for
        expected = {StopReason.CANCELLED: AttemptState.CANCELLED, StopReason.DEADLINE: AttemptState.TIMED_OUT,
                    StopReason.ATTEMPT_TIMEOUT: AttemptState.TIMED_OUT,
                    StopReason.HUMAN_TIMEOUT: AttemptState.TIMED_OUT}.get(stop, AttemptState.ABORTED)
        assert d.attempt_state is expected


# The agent reconciles during pre-flight; if its ``preparing`` message was lost (it is sent
# without waiting for an answer) the attempt is still ``assigned`` when RECONCILED arrives.
@example(run=make_run(needs_reconcile=True), phase=AttemptPhase.ASSIGNED, ending=Ending.RECONCILED,
         stop=None, idempotent=False, has_reconcile=True, now=T0)
@given(**decide_args)
def test_decision_is_a_transition_the_store_accepts(run, phase, ending, stop, idempotent, has_reconcile, now):
    """The store applies the decision from the run's current state, which follows the
    attempt's phase; an illegal one makes ``_set_run_state`` raise inside the transaction."""
    d = call_decide(run, phase, ending, stop, idempotent, has_reconcile, now)
    src = STATE_OF_PHASE[phase]
    assert can_transition(src, d.run_state), f"{src} → {d.run_state} for {ending} in phase {phase}"


@given(**decide_args)
def test_decision_is_legal_from_every_active_state(run, phase, ending, stop, idempotent, has_reconcile, now):
    d = call_decide(run, phase, ending, stop, idempotent, has_reconcile, now)
    for src in ACTIVE_STATES:
        assert d.run_state in RUN_TRANSITIONS[src], f"{src} → {d.run_state} ({ending}, phase {phase})"


def test_transition_table_shape():
    assert set(RUN_TRANSITIONS) == set(RunState)
    for state in RunState:
        if state.final:
            assert RUN_TRANSITIONS[state] == frozenset(), f"{state} is final but may change"
        else:
            assert RUN_TRANSITIONS[state], f"{state} is a dead end"
    # Nothing goes back to an earlier active phase, and a queued run is only ever claimed.
    assert RunState.RUNNING not in RUN_TRANSITIONS[RunState.QUEUED]
    assert RunState.ASSIGNED not in RUN_TRANSITIONS[RunState.RUNNING]
    assert RunState.PREPARING not in RUN_TRANSITIONS[RunState.RUNNING]
    # Every final state is reachable from every active state except success from a run
    # that was only assigned (the agent never accepted it).
    for src in ACTIVE_STATES:
        for dst in (RunState.FAILED, RunState.CANCELLED, RunState.TIMED_OUT, RunState.QUEUED):
            assert can_transition(src, dst)


def test_unsafe_failure_message_example():
    run = make_run(attempts_started=1, max_attempts=3)
    d = decide(run, phase=AttemptPhase.RUNNING, ending=Ending.LOST, stop_reason=None,
               idempotent=False, has_reconcile=False, now=T0, detail="no heartbeat", machine_id="vm-7")
    assert d.run_state is RunState.FAILED
    assert d.attempt_state is AttemptState.LOST
    assert d.quarantine
    assert "no heartbeat on vm-7" in d.message
    assert "could repeat its effect" in d.message


# -- backoff ---------------------------------------------------------------------------------------

@given(run=runs(), more=st.integers(0, 25))
def test_backoff_monotone_and_capped(run, more):
    later = replace(run, attempts_started=run.attempts_started + more)
    a, b = backoff_delay(run), backoff_delay(later)
    assert 0.0 <= a <= b <= run.backoff_max
    assert a == min(run.backoff_initial * 2 ** max(run.attempts_started - 1, 0), run.backoff_max)


def test_backoff_examples():
    run = make_run(backoff_initial=2.0, backoff_max=30.0)
    got = [backoff_delay(replace(run, attempts_started=n)) for n in range(7)]
    assert got == [2.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


# -- queued_expiry / overdue_reason ---------------------------------------------------------------

@given(run=runs(), now=times, later=durations)
def test_queued_expiry_rules(run, now, later):
    why = queued_expiry(run, now)
    if run.deadline_at is not None and now >= run.deadline_at:
        assert why is not None and why[0] == "deadline"
    elif now - run.queued_at >= run.queue_timeout:
        assert why is not None and why[0] == "queue_timeout"
        assert f"{run.queue_timeout:g}s" in why[1]
    else:
        assert why is None
    # Time only makes it worse: once expired, expired for good.
    if why is not None:
        assert queued_expiry(run, now + later) is not None


@given(run=runs(), assigned=times, started=st.none() | durations, progress=st.none() | durations,
       since_assigned=durations, later=durations)
def test_overdue_rules(run, assigned, started, progress, since_assigned, later):
    started_at = None if started is None else assigned + started
    last_progress_at = None if progress is None else assigned + progress
    now = assigned + since_assigned
    got = overdue_reason(run, assigned_at=assigned, started_at=started_at,
                         last_progress_at=last_progress_at, now=now)
    last_sign = max(t for t in (assigned, started_at, last_progress_at) if t is not None)
    if run.cancel_requested_at is not None:
        assert got is StopReason.CANCELLED
    elif run.deadline_at is not None and now >= run.deadline_at:
        assert got is StopReason.DEADLINE
    elif now - assigned >= run.attempt_timeout:
        assert got is StopReason.ATTEMPT_TIMEOUT
    elif now - last_sign >= run.progress_timeout:
        assert got is StopReason.PROGRESS_STALLED
    else:
        assert got is None
    if got is not None:  # without new progress, an overdue attempt stays overdue
        assert overdue_reason(run, assigned_at=assigned, started_at=started_at,
                              last_progress_at=last_progress_at, now=now + later) is not None


def test_progress_resets_the_watchdog():
    run = make_run(progress_timeout=60.0, attempt_timeout=900.0)
    kw = {"assigned_at": T0, "started_at": T0 + 10}
    assert overdue_reason(run, last_progress_at=None, now=T0 + 70, **kw) is StopReason.PROGRESS_STALLED
    assert overdue_reason(run, last_progress_at=T0 + 50, now=T0 + 70, **kw) is None
    assert overdue_reason(run, last_progress_at=T0 + 50, now=T0 + 110, **kw) is StopReason.PROGRESS_STALLED
    # A stalled pre-flight (never started) is caught too.
    assert overdue_reason(run, assigned_at=T0, started_at=None, last_progress_at=None,
                          now=T0 + 60) is StopReason.PROGRESS_STALLED


# -- scheduler: eligibility and preference --------------------------------------------------------

def test_eligible_rules():
    m = make_machine("m1", pool="p", labels={"os": "win", "site": "a"},
                     automations=["ehr.create@1", "ehr.create@2", "erp.post@1"])
    assert eligible(make_run(pool="p"), m)
    assert not eligible(make_run(pool="other"), m)
    assert eligible(make_run(pool="p", labels={"os": "win"}), m)
    assert not eligible(make_run(pool="p", labels={"os": "linux"}), m)
    assert not eligible(make_run(pool="p", labels={"gpu": "yes"}), m)
    assert eligible(make_run(pool="p", automation="erp.post"), m)
    assert not eligible(make_run(pool="p", automation="erp"), m)  # a prefix is not a name
    assert not eligible(make_run(pool="p", automation="ehr.cre"), m)
    assert eligible(make_run(pool="p", version="2"), m)
    assert not eligible(make_run(pool="p", version="3"), m)
    assert eligible(make_run(pool="p", machine="m1"), m)
    assert not eligible(make_run(pool="p", machine="m2"), m)


def test_prefers_and_wants_affinity():
    m = make_machine("m1", session_key="alice")
    assert not wants_affinity(make_run())
    assert not prefers(make_run(), m)
    assert wants_affinity(make_run(prefer_machine="m1"))
    assert prefers(make_run(prefer_machine="m1"), m)
    assert not prefers(make_run(prefer_machine="m2"), m)
    assert prefers(make_run(session_key="alice"), m)
    assert not prefers(make_run(session_key="bob"), m)
    assert not prefers(make_run(session_key="x"), make_machine("m2", session_key=None))


def test_serviceable():
    fleet = [make_machine("m1", pool="p", labels={"os": "win"})]
    assert serviceable("p", {"os": "win"}, "ehr.create", None, None, fleet)
    assert serviceable("p", {}, "ehr.create", "1", "m1", fleet)
    assert not serviceable("q", {}, "ehr.create", None, None, fleet)
    assert not serviceable("p", {}, "ehr.create", "2", None, fleet)
    assert not serviceable("p", {}, "ehr.create", None, "m9", fleet)
    assert not serviceable("p", {"os": "mac"}, "ehr.create", None, None, fleet)
    assert not serviceable("p", {}, "ehr.create", None, None, [])


def test_longest_idle_and_most_recently_used():
    ms = [make_machine("b", idle_since=T0 + 5), make_machine("a", idle_since=T0 + 5),
          make_machine("c", idle_since=T0 + 1), make_machine("d", idle_since=T0 + 9)]
    run = make_run()
    assert LongestIdle().choose(run, ms).id == "c"
    assert MostRecentlyUsed().choose(run, ms).id == "d"
    assert LongestIdle().choose(run, ms[:2]).id == "a"  # ties by id
    # Affinity beats idleness in both.
    assert LongestIdle().choose(make_run(prefer_machine="d"), ms).id == "d"
    assert MostRecentlyUsed().choose(make_run(prefer_machine="c"), ms).id == "c"
    d = make_machine("d", idle_since=T0 + 9, session_key="alice")
    assert LongestIdle().choose(make_run(session_key="alice"), [*ms[:3], d]).id == "d"


# -- scheduler: Policy.match -----------------------------------------------------------------------

POOLS = {"default": Pool("default", affinity_wait=10.0), "p2": Pool("p2", affinity_wait=0.0)}


def match(runs_: list[Run], free: list[Machine], online: list[Machine] | None = None,
          now: float = T0, pools: dict[str, Pool] | None = None):
    online = list(free) if online is None else online
    pairs = Policy().match(runs_, free, online=online, pools=POOLS if pools is None else pools, now=now)
    return [(r.id, m.id) for r, m in pairs]


def test_match_respects_the_given_priority_order():
    runs_ = [make_run(id=f"r{i}") for i in range(3)]
    assert match(runs_, [make_machine("m1")]) == [("r0", "m1")]
    assert match(runs_, [make_machine("m1"), make_machine("m2", idle_since=T0 - 1)]) == [
        ("r0", "m2"), ("r1", "m1"),
    ]


def test_match_skips_runs_no_free_machine_can_serve():
    runs_ = [make_run(id="r0", labels={"gpu": "yes"}), make_run(id="r1", automation="erp.post"),
             make_run(id="r2")]
    assert match(runs_, [make_machine("m1")]) == [("r2", "m1")]


def test_match_hard_pin():
    runs_ = [make_run(id="r0", machine="m2"), make_run(id="r1", machine="m2"), make_run(id="r2")]
    got = match(runs_, [make_machine("m1", idle_since=T0 - 100), make_machine("m2")])
    assert got == [("r0", "m2"), ("r2", "m1")]


def test_affinity_waits_for_busy_preferred_machine_then_falls_back():
    busy = make_machine("m1")  # connected but not free
    free = [make_machine("m2")]
    online = [busy, *free]
    waiting = make_run(id="r0", prefer_machine="m1", queued_at=T0)
    behind = make_run(id="r1", queued_at=T0)
    # Within the pool's affinity wait the run waits, and does not block the run behind it.
    assert match([waiting, behind], free, online, now=T0 + 9.9) == [("r1", "m2")]
    assert match([waiting], free, online, now=T0) == []
    # After the wait it takes any eligible machine.
    assert match([waiting, behind], free, online, now=T0 + 10.0) == [("r0", "m2")]


def test_session_affinity():
    busy = make_machine("m1", session_key="alice")
    free = [make_machine("m2", session_key="bob", idle_since=T0 + 50),
            make_machine("m3", idle_since=T0)]
    run = make_run(id="r0", session_key="bob", queued_at=T0)
    assert match([run], free, [busy, *free]) == [("r0", "m2")]  # free and matching: taken
    alice = make_run(id="r1", session_key="alice", queued_at=T0)
    assert match([alice], free, [busy, *free], now=T0 + 5) == []
    assert match([alice], free, [busy, *free], now=T0 + 10) == [("r1", "m3")]


def test_affinity_does_not_wait_for_a_machine_that_could_not_serve():
    busy_elsewhere = make_machine("m1", pool="p2")
    free = [make_machine("m2")]
    run = make_run(id="r0", prefer_machine="m1", queued_at=T0)
    assert match([run], free, [busy_elsewhere, *free]) == [("r0", "m2")]
    # Nor for one that is not connected at all, nor when the pool has no affinity wait.
    assert match([run], free, free) == [("r0", "m2")]
    p2 = make_run(id="r1", pool="p2", prefer_machine="m9", queued_at=T0)
    m9, m3 = make_machine("m9", pool="p2"), make_machine("m3", pool="p2")
    assert match([p2], [m3], [m9, m3]) == [("r1", "m3")]
    # An unknown pool counts as no wait.
    assert match([run], free, [make_machine("m1"), *free], pools={}) == [("r0", "m2")]


# Generated fleets: small alphabets so that runs and machines collide often.
POOL_NAMES = ["default", "p2"]
AUTOMATIONS = ["ehr.create@1", "ehr.create@2", "erp.post@1"]


@st.composite
def fleets(draw: st.DrawFn) -> tuple[list[Run], list[Machine], list[Machine], float]:
    n_machines = draw(st.integers(0, 6))
    machines = []
    for i in range(n_machines):
        machines.append(make_machine(
            f"m{i}",
            pool=draw(st.sampled_from(POOL_NAMES)),
            labels=draw(st.dictionaries(st.sampled_from(["os", "site"]), st.sampled_from(["a", "b"]), max_size=2)),
            automations=draw(st.lists(st.sampled_from(AUTOMATIONS), unique=True, max_size=3)),
            idle_since=draw(st.none() | st.floats(T0 - 100, T0)),
            session_key=draw(st.none() | st.sampled_from(["alice", "bob"])),
        ))
    free_flags = draw(st.lists(st.booleans(), min_size=n_machines, max_size=n_machines))
    free = [m for m, f in zip(machines, free_flags, strict=True) if f]
    ids = [m.id for m in machines] + ["m-gone"]
    runs_ = []
    for i in range(draw(st.integers(0, 8))):
        automation, _, version = draw(st.sampled_from(AUTOMATIONS)).partition("@")
        runs_.append(make_run(
            id=f"r{i}",
            pool=draw(st.sampled_from(POOL_NAMES)),
            automation=automation,
            version=draw(st.sampled_from([None, version])),
            labels=draw(st.dictionaries(st.sampled_from(["os", "site"]), st.sampled_from(["a", "b"]), max_size=1)),
            machine=draw(st.none() | st.sampled_from(ids)),
            prefer_machine=draw(st.none() | st.sampled_from(ids)),
            session_key=draw(st.none() | st.sampled_from(["alice", "bob"])),
            queued_at=draw(st.floats(T0 - 20, T0)),
        ))
    return runs_, free, machines, T0


@settings(max_examples=300)
@given(fleets())
def test_match_properties(fleet):
    runs_, free, online, now = fleet
    pairs = Policy().match(runs_, free, online=online, pools=POOLS, now=now)
    chosen = [m.id for _, m in pairs]
    # Each pair is eligible, each machine used at most once, only free machines used.
    assert len(chosen) == len(set(chosen))
    assert set(chosen) <= {m.id for m in free}
    for run, m in pairs:
        assert eligible(run, m)
    # Runs keep the given order.
    order = [r.id for r in runs_]
    got = [r.id for r, _ in pairs]
    assert got == sorted(got, key=order.index)
    # Nothing better was left on the table: a run left unmatched either had no eligible
    # machine among those still free when its turn came (so none remains free now), or it
    # is waiting, within the pool's wait, for a preferred busy machine.
    matched = {r.id for r, _ in pairs}
    left = [m for m in free if m.id not in set(chosen)]
    for i, run in enumerate(runs_):
        if run.id in matched:
            continue
        waiting = (
            wants_affinity(run)
            and any(prefers(run, m) and eligible(run, m) for m in online)
            and now - run.queued_at < POOLS[run.pool].affinity_wait
        )
        if not waiting:
            assert not any(eligible(run, m) for m in left), f"{run.id} starved with a free machine"
            # ... and no later run took a machine it could have had.
            for later, m in pairs:
                if order.index(later.id) > i:
                    assert not eligible(run, m), f"{later.id} took {m.id}, which {run.id} (ahead) could use"
    # A run takes a free machine it prefers, unless a run ahead of it took every such one.
    for run, m in pairs:
        free_pref = [x for x in free if prefers(run, x) and eligible(run, x)]
        if free_pref and m.id not in {x.id for x in free_pref}:
            # Only if every free preferred machine went to a run ahead of it.
            taken_before = {mm.id for rr, mm in pairs if order.index(rr.id) < order.index(run.id)}
            assert {x.id for x in free_pref} <= taken_before


@pytest.mark.parametrize("admin", list(MachineAdmin))
def test_schedulable(admin):
    m = make_machine("m1", admin=admin)
    assert m.schedulable == (admin is MachineAdmin.ACTIVE)
    assert not make_machine("m1", health=MachineHealth.QUARANTINED).schedulable
    assert not make_machine("m1", connected=False).schedulable
    assert not make_machine("m1", active_attempt_id=7).schedulable
