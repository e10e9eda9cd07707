"""The store suite: every operation of :class:`deskfleet.store.Store`, on every backend.

One suite, parametrized over backends through the ``backend`` fixture (STYLE 5): today
SQLite; PostgreSQL is one more fixture param (a fresh database per test). Each test opens
its own database. Time is a fake clock: the store takes ``now`` as an argument, so every
lease, timeout and backoff here is exact.

The invariants of DESIGN.md are tested where they live: invariant 1 against the schema
itself (rows written with plain SQL, bypassing the store's code), fencing and "final at most
once" through every fenced write, and all of them together by a stateful property test that
drives a real store through random interleavings of agents, sweeps and clients.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import IntegrityError

from deskfleet.errors import Conflict, DeskfleetError, InvalidInput, NotFound, StaleLease, Stopped
from deskfleet.models import (
    Assignment,
    AttemptMode,
    AttemptPhase,
    AttemptState,
    AutomationSpec,
    Ending,
    MachineAdmin,
    MachineHealth,
    Pool,
    Run,
    RunSpec,
    RunState,
    StopOrder,
    StopReason,
)
from deskfleet.scheduler import DurationBook, Policy
from deskfleet.store import ConnectResult, Heartbeat, SQLStore
from deskfleet.store.schema import attempts, events, machines, metadata, runs

T0 = 1_700_000_000.0
LEASE = 30.0
GRACE = 5.0
POLICY = Policy()

UNSAFE = AutomationSpec("ehr.create", "1")  # neither idempotent nor reconcilable
IDEMPOTENT = AutomationSpec("ehr.lookup", "1", idempotent=True)
RECONCILING = AutomationSpec("ehr.pay", "1", has_reconcile=True)
SPECS = (UNSAFE, IDEMPOTENT, RECONCILING)
FINAL = [s.value for s in RunState if s.final]


# -- backends: the ``backend``, ``backend_store`` and ``s`` fixtures (tests/integration/conftest.py)
# open a fresh database per test on every backend of support.BACKENDS.

# -- helpers -------------------------------------------------------------------------------------

def connect(store: SQLStore, mid: str, now: float, *, attempt_id: int | None = None,
            boot: str = "boot-1", specs: tuple[AutomationSpec, ...] = SPECS,
            lease: float = LEASE) -> ConnectResult:
    return store.connect_machine(
        mid, boot_id=boot, agent_version="1.0", automations=specs, labels=None,
        heartbeat=Heartbeat(mid, now, attempt_id=attempt_id), lease_timeout=lease, now=now,
    )


def add_machine(store: SQLStore, mid: str, now: float = T0, *, pool: str = "default",
                labels: dict[str, str] | None = None,
                specs: tuple[AutomationSpec, ...] = SPECS) -> None:
    store.enrol_machine(mid, pool=pool, labels=labels or {}, key_hash=f"hash-{mid}", now=now)
    connect(store, mid, now, specs=specs)


def submit(store: SQLStore, now: float = T0, automation: str = "ehr.create", **kw: Any) -> Run:
    run, created = store.submit(RunSpec(automation, **kw), request_hash="h", now=now)
    assert created
    return run


def claim(store: SQLStore, now: float = T0, automation: str = "ehr.create", **kw: Any) -> Assignment:
    """Submit a run and schedule it; the one assignment for that run."""
    run = submit(store, now, automation, **kw)
    got = [a for a in store.schedule(POLICY, now, LEASE) if a.run.id == run.id]
    assert len(got) == 1, f"run {run.id} was not scheduled"
    return got[0]


def advance(store: SQLStore, a: Assignment, phase: AttemptPhase, now: float) -> None:
    if phase in (AttemptPhase.PREPARING, AttemptPhase.RUNNING):
        store.attempt_preparing(a.attempt.id, a.attempt.machine_id, now)
    if phase is AttemptPhase.RUNNING:
        store.attempt_start(a.attempt.id, a.attempt.machine_id, now)


def kinds(store: SQLStore, **kw: Any) -> list[str]:
    return [e.kind for e in store.events(**kw)]


def run_state(store: SQLStore, run_id: str) -> RunState:
    run = store.get_run(run_id)
    assert run is not None
    return run.state


def table_digest(store: SQLStore) -> tuple[Any, ...]:
    """Everything but the event log and artifacts: what a rejected write must not touch."""
    with store.engine.connect() as c:
        c = c.execution_options(deskfleet_write=False)
        return (
            tuple(tuple(r) for r in c.execute(select(runs).order_by(runs.c.id))),
            tuple(tuple(r) for r in c.execute(select(attempts).order_by(attempts.c.id))),
            tuple(tuple(r) for r in c.execute(text("SELECT * FROM machines ORDER BY id"))),
        )


# -- pools and the automation catalogue ----------------------------------------------------------

def test_pools(s):
    assert s.get_pool("p1") is None
    assert s.list_pools() == []
    p = s.put_pool(Pool("p1", description="EHR", affinity_wait=3.0), T0)
    assert (p.name, p.description, p.affinity_wait, p.created_at) == ("p1", "EHR", 3.0, T0)
    s.put_pool(Pool("a0"), T0 + 1)
    p = s.put_pool(Pool("p1", description="EHR v2", allow_wait_for_capacity=True), T0 + 2)
    assert p.description == "EHR v2" and p.allow_wait_for_capacity and p.affinity_wait == 10.0
    assert p.created_at == T0  # an update keeps the creation time
    assert [x.name for x in s.list_pools()] == ["a0", "p1"]
    assert s.get_pool("p1") == p
    assert kinds(s) == ["pool.created", "pool.created", "pool.updated"]


def test_pool_policies_are_versioned_and_a_change_to_an_old_version_is_refused(s):
    with pytest.raises(NotFound, match="no pool 'p1'"):
        s.put_pool_policy("p1", {"min": 1}, expected_version=0, now=T0)
    s.put_pool(Pool("p1"), T0)
    assert s.pool_policy("p1") is None and s.pool_policy_history("p1") == []
    v1 = s.put_pool_policy("p1", {"min": 1, "max": 4}, expected_version=0, comment="first", now=T0 + 1)
    assert (v1.version, v1.policy, v1.created_at, v1.comment) == (1, {"min": 1, "max": 4}, T0 + 1, "first")
    # Two people read version 1; the first change wins, the second is refused, not lost silently.
    s.put_pool_policy("p1", {"min": 2, "max": 4}, expected_version=1, now=T0 + 2)
    with pytest.raises(Conflict, match="at version 2, not 1") as refused:
        s.put_pool_policy("p1", {"min": 3, "max": 4}, expected_version=1, now=T0 + 3)
    assert refused.value.field == "version"
    assert s.pool_policy("p1").policy == {"min": 2, "max": 4}
    blind = s.put_pool_policy("p1", {"min": 0, "max": 9}, expected_version=None, now=T0 + 4)  # whatever is current
    assert blind.version == 3 and s.pool_policy("p1") == blind
    assert [v.version for v in s.pool_policy_history("p1")] == [3, 2, 1]
    assert [v.version for v in s.pool_policy_history("p1", limit=2)] == [3, 2]
    events = [e for e in s.events(limit=100) if e.kind == "pool.policy"]
    assert [(e.data["version"], e.data["from_version"]) for e in events] == [(1, 0), (2, 1), (3, 2)]
    assert events[0].reason == "first"


def test_maintenance_campaigns_one_at_a_time_per_pool_their_steps_kept_and_a_cancel_that_stands(s):
    with pytest.raises(NotFound, match="no pool 'p'"):
        s.start_maintenance("p", None, now=T0)
    s.put_pool(Pool("p"), T0)
    with pytest.raises(InvalidInput, match="no machine up to maintain"):
        s.start_maintenance("p", None, now=T0)
    for mid in ("m1", "m2", "m3", "gone"):
        add_machine(s, mid, pool="p")
    add_machine(s, "elsewhere", pool="q")
    s.disconnect_machine("gone", T0 + 1)
    with pytest.raises(InvalidInput, match="not machines of pool 'p': elsewhere, ghost") as bad:
        s.start_maintenance("p", ["m1", "elsewhere", "ghost"], now=T0 + 2)
    assert bad.value.field == "machines"
    with pytest.raises(InvalidInput, match="machines is empty"):
        s.start_maintenance("p", [], now=T0 + 2)
    c = s.start_maintenance("p", None, reason="patch tuesday", now=T0 + 3)
    assert (c.pool, c.state, c.reason, sorted(c.machines)) == ("p", "running", "patch tuesday", ["m1", "m2", "m3"])
    assert c.counts() == {"pending": 3} and c.machines["m1"].since == T0 + 3
    with pytest.raises(Conflict, match=f"maintenance {c.id} of pool 'p' is running"):
        s.start_maintenance("p", ["m1"], now=T0 + 4)
    # The leader's progress, read back as written (a JSON column on either backend).
    c.machines["m1"].step, c.machines["m1"].started, c.machines["m1"].boot_id = "updating", T0 + 5, "b-1"
    c.detail = "1 machine(s) out of service, max_unavailable 1"
    saved = s.save_maintenance(c, T0 + 5)
    assert saved.machines["m1"] == c.machines["m1"] and saved.detail == c.detail and saved.updated_at == T0 + 5
    # A cancel stands against a leader that wrote "running" over it.
    s.cancel_maintenance("p", c.id, now=T0 + 6, reason="freeze")
    assert s.save_maintenance(c, T0 + 7).state == "cancelling"
    with pytest.raises(Conflict, match="is cancelling: there is nothing to cancel"):
        s.cancel_maintenance("p", c.id, now=T0 + 8)
    with pytest.raises(NotFound, match=f"no maintenance {c.id} in pool 'q'"):
        s.cancel_maintenance("q", c.id, now=T0 + 8)
    c.state = "cancelled"
    s.save_maintenance(c, T0 + 9)
    # Over: the next may start; the newest first; only those under way when asked.
    d = s.start_maintenance("p", ["m2"], now=T0 + 10)
    assert [x.id for x in s.maintenance_campaigns("p")] == [d.id, c.id]
    assert [x.id for x in s.maintenance_campaigns(active=True)] == [d.id]
    assert s.maintenance_campaign(d.id).machines.keys() == {"m2"} and s.maintenance_campaign(10**9) is None
    events = [(e.kind, e.reason) for e in s.events(limit=100) if e.kind.startswith("maintenance.")]
    assert events == [("maintenance.started", "patch tuesday"), ("maintenance.cancelling", "freeze"),
                      ("maintenance.started", None)]


def test_a_pools_live_machines_leave_out_those_gone_for_good(s):
    """A pool that scales keeps the rows of the machines it destroyed: ``live_or`` reads only
    those connected, holding a lease, or named."""
    for mid in ("up", "busy", "gone", "named"):
        add_machine(s, mid, pool="p")
    s.put_automations(SPECS, T0)
    claimed = claim(s, T0 + 1, pool="p", machine="busy")
    for mid in ("busy", "gone", "named"):
        s.disconnect_machine(mid, T0 + 2)
    assert [m.id for m in s.list_machines("p")] == ["busy", "gone", "named", "up"]
    assert [m.id for m in s.list_machines("p", live_or=("named",))] == ["busy", "named", "up"]
    assert [m.id for m in s.list_machines("p", live_or=())] == ["busy", "up"]
    assert claimed.attempt.machine_id == "busy"


def test_a_pools_demand_counts_its_own_queue_machines_and_arrivals(s):
    s.put_pool(Pool("p1", allow_wait_for_capacity=True), T0)
    s.put_pool(Pool("p2", allow_wait_for_capacity=True), T0)
    add_machine(s, "m1", pool="p1")
    add_machine(s, "m2", pool="p1")
    add_machine(s, "x1", pool="p2")
    s.put_automations(SPECS, T0)
    busy = claim(s, T0 + 1, pool="p1")
    assert busy.attempt.machine_id in ("m1", "m2")
    s.set_admin("m2" if busy.attempt.machine_id == "m1" else "m1", MachineAdmin.CORDONED, T0 + 1)
    for i in range(3):
        submit(s, T0 + 10 + i, pool="p1")  # nowhere to go: queued
    backing_off = submit(s, T0 + 2, pool="p1")
    with s.engine.begin() as conn:  # as a retry's backoff leaves it (plain SQL)
        conn.execute(runs.update().where(runs.c.id == backing_off.id).values(not_before=T0 + 60))
    submit(s, T0 + 5, pool="p2")
    d = s.pool_demand("p1", T0 + 20, window=15.0)
    assert (d.pool, d.queued, d.delayed, d.busy, d.idle) == ("p1", 3, 1, 1, 0)
    assert d.machines == {"busy": 1, "cordoned": 1}
    assert d.oldest_wait == pytest.approx(10.0)
    assert (d.arrivals, d.window) == (3, 15.0)  # the claimed and the delayed run came before the window
    assert d.arrival_rate == pytest.approx(3 / 15.0)
    other = s.pool_demand("p2", T0 + 20, window=15.0)  # not scheduled since its submit: waiting, beside a free machine
    assert (other.queued, other.machines, other.oldest_wait, other.arrivals) == (1, {"ready": 1}, 15.0, 1)


def test_automation_catalogue_resolves_the_newest_version(s):
    assert s.get_automation("ehr.create") is None
    s.put_automations([AutomationSpec("ehr.create", v, description=v) for v in ("1", "2", "10", "1.5")], T0)
    s.put_automations([AutomationSpec("other", "1")], T0)
    assert s.get_automation("ehr.create").version == "10"  # numeric order, not "2" > "10"
    assert s.get_automation("ehr.create", "1.5").version == "1.5"
    assert s.get_automation("ehr.create", "3") is None
    # An agent advertising a spec again updates it in place.
    s.put_automations([AutomationSpec("ehr.create", "2", idempotent=True, has_reconcile=True,
                                      input_schema={"type": "object"}, secret_fields=["pw"])], T0 + 1)
    got = s.get_automation("ehr.create", "2")
    assert got.idempotent and got.has_reconcile and got.input_schema == {"type": "object"}
    assert got.secret_fields == ["pw"]
    assert [a.key for a in s.list_automations()] == [
        "ehr.create@1", "ehr.create@1.5", "ehr.create@10", "ehr.create@2", "other@1",
    ]


# -- machines ------------------------------------------------------------------------------------

def test_enrol_creates_the_pool_and_re_enrol_updates(s):
    m = s.enrol_machine("m1", pool="p1", labels={"os": "win"}, key_hash="k1", now=T0)
    assert (m.pool, m.labels, m.health, m.connected, m.enrolled_at) == (
        "p1", {"os": "win"}, MachineHealth.OFFLINE, False, T0)
    assert s.get_pool("p1") is not None  # created with defaults
    assert s.machine_key_hash("m1") == "k1"
    assert s.machine_key_hash("nope") is None
    m = s.enrol_machine("m1", pool="p2", labels={"os": "linux"}, key_hash="k2", now=T0 + 5)
    assert (m.pool, m.labels, m.enrolled_at) == ("p2", {"os": "linux"}, T0)
    assert s.machine_key_hash("m1") == "k2"
    assert kinds(s) == ["pool.created", "machine.enrolled", "pool.created", "machine.re_enrolled"]
    assert [x.id for x in s.list_machines()] == ["m1"]
    assert s.list_machines(pool="p1") == []
    assert s.get_machine("nope") is None


def test_connect_fresh_machine(s):
    s.enrol_machine("m1", pool="default", labels={"os": "win"}, key_hash="k", now=T0)
    res = connect(s, "m1", T0 + 1)
    assert res.resume is None and res.resend is None and res.ended_run is None
    assert res.stale_attempt_id is None
    m = res.machine
    assert m.connected and m.health is MachineHealth.ONLINE and m.schedulable
    assert m.automations == sorted(x.key for x in SPECS)
    assert (m.idle_since, m.last_heartbeat_at, m.boot_id) == (T0 + 1, T0 + 1, "boot-1")
    assert m.labels == {"os": "win"}  # labels=None keeps the enrolled ones
    assert s.get_automation("ehr.pay").has_reconcile  # the catalogue learned the specs
    ev = s.events(machine_id="m1")[-1]
    assert ev.kind == "machine.connected" and ev.data["rebooted"] is False
    assert connect(s, "m1", T0 + 2, boot="boot-2").machine.boot_id == "boot-2"
    assert s.events(machine_id="m1")[-1].data["rebooted"] is True
    with pytest.raises(NotFound):
        connect(s, "ghost", T0)


def test_connect_reporting_an_attempt_it_does_not_hold(s):
    add_machine(s, "m1")
    res = connect(s, "m1", T0 + 1, attempt_id=12345)
    assert res.stale_attempt_id == 12345 and res.resume is None and res.ended_run is None


def test_connect_resumes_the_held_attempt(s):
    add_machine(s, "m1")
    a = claim(s)
    advance(s, a, AttemptPhase.RUNNING, T0 + 1)
    res = connect(s, "m1", T0 + 20, attempt_id=a.attempt.id)
    assert res.resume is not None and res.resume.id == a.attempt.id
    assert res.resend is None and res.ended_run is None and res.stale_attempt_id is None
    assert s.get_attempt(a.attempt.id).lease_expires_at == T0 + 20 + LEASE
    assert run_state(s, a.run.id) is RunState.RUNNING


def test_connect_resends_an_unacknowledged_assignment(s):
    add_machine(s, "m1")
    a = claim(s, automation="ehr.pay")
    res = connect(s, "m1", T0 + 20)  # the agent never saw the assignment
    assert res.resend is not None
    assert res.resend.attempt.id == a.attempt.id and res.resend.run.id == a.run.id
    assert res.resend.spec == RECONCILING
    assert res.resume is None and res.ended_run is None
    assert s.get_attempt(a.attempt.id).lease_expires_at == T0 + 20 + LEASE
    assert s.get_attempt(a.attempt.id).state is AttemptState.ACTIVE


@pytest.mark.parametrize(
    ("automation", "phase", "state", "code"),
    [
        ("ehr.create", AttemptPhase.PREPARING, RunState.QUEUED, "requeued_not_started"),
        ("ehr.create", AttemptPhase.RUNNING, RunState.FAILED, "not_retried_unsafe"),
        ("ehr.lookup", AttemptPhase.RUNNING, RunState.QUEUED, "retry_idempotent"),
        ("ehr.pay", AttemptPhase.RUNNING, RunState.QUEUED, "retry_after_reconcile"),
    ],
)
def test_agent_came_back_without_its_attempt(s, automation, phase, state, code):
    add_machine(s, "m1")
    a = claim(s, automation=automation)
    advance(s, a, phase, T0 + 1)
    res = connect(s, "m1", T0 + 5, boot="boot-2")  # rebooted: reports no attempt
    assert res.resume is None and res.resend is None and res.stale_attempt_id is None
    assert res.ended_run is not None and res.ended_run.state is state
    att = s.get_attempt(a.attempt.id)
    assert (att.state, att.ending, att.ended_at) == (AttemptState.LOST, Ending.LOST, T0 + 5)
    assert "came back without its attempt" in att.reason
    run = s.get_run(a.run.id)
    assert run.state is state
    if state is RunState.QUEUED:
        assert run.current_attempt_id is None and run.current_machine_id is None
    last = [e for e in s.events(run_id=run.id) if e.kind == "run.state"][-1]
    assert last.reason == code
    if state is RunState.FAILED:
        assert run.error_code == code and "not idempotent" in run.error_message
    if code == "retry_after_reconcile":
        assert run.needs_reconcile and run.not_before is None  # lost, not failed: no backoff
    # The machine must re-prove its state before it gets work again.
    m = s.get_machine("m1")
    assert m.health is MachineHealth.QUARANTINED and res.machine.health is MachineHealth.QUARANTINED
    assert m.active_attempt_id is None and m.connected


def test_connect_reporting_an_older_attempt_loses_the_current_one(s):
    add_machine(s, "m1")
    first = claim(s)
    s.finish_attempt(first.attempt.id, "m1", Ending.BUSINESS_ERROR, output=None, detail="no", now=T0 + 1)
    second = claim(s, now=T0 + 2)
    res = connect(s, "m1", T0 + 3, attempt_id=first.attempt.id)
    assert res.stale_attempt_id == first.attempt.id
    assert res.ended_run is not None and res.ended_run.id == second.run.id
    assert res.ended_run.state is RunState.QUEUED  # it never started: requeued
    assert s.get_attempt(second.attempt.id).state is AttemptState.LOST


def test_connect_keeps_a_quarantined_machine_quarantined(s):
    add_machine(s, "m1")
    s.quarantine("m1", "flaky", T0 + 1)
    s.disconnect_machine("m1", T0 + 2)
    m = connect(s, "m1", T0 + 3).machine
    assert m.health is MachineHealth.QUARANTINED and m.connected and not m.schedulable


def test_disconnect(s):
    add_machine(s, "m1")
    s.disconnect_machine("m1", T0 + 1)
    assert not s.get_machine("m1").connected
    assert kinds(s, machine_id="m1")[-1] == "machine.disconnected"
    submit(s)
    assert s.schedule(POLICY, T0 + 2, LEASE) == []


# -- heartbeats ------------------------------------------------------------------------------------

def test_heartbeat_batch_renews_held_leases(s):
    for m in ("m1", "m2", "m3"):
        add_machine(s, m)
    a1 = claim(s, machine="m1")
    a2 = claim(s, machine="m2")
    got = s.heartbeat([
        Heartbeat("m1", T0 + 10, {"cpu": 1}, "alice", T0 + 999, a1.attempt.id),
        Heartbeat("m2", T0 + 11, {}, None, None, a2.attempt.id),
        Heartbeat("m3", T0 + 12, {"cpu": 3}),
    ], LEASE)
    assert got == {"m1": True, "m2": True}
    assert s.get_attempt(a1.attempt.id).lease_expires_at == T0 + 10 + LEASE
    assert s.get_attempt(a2.attempt.id).lease_expires_at == T0 + 11 + LEASE
    m1, m3 = s.get_machine("m1"), s.get_machine("m3")
    assert (m1.last_heartbeat_at, m1.resources, m1.session_key, m1.session_expires_at) == (
        T0 + 10, {"cpu": 1}, "alice", T0 + 999)
    assert (m3.last_heartbeat_at, m3.resources) == (T0 + 12, {"cpu": 3})
    assert s.heartbeat([], LEASE) == {}


def test_heartbeat_naming_an_ended_attempt_renews_nothing(s):
    add_machine(s, "m1")
    a = claim(s)
    s.finish_attempt(a.attempt.id, "m1", Ending.BUSINESS_ERROR, output=None, detail="x", now=T0 + 1)
    before = s.get_attempt(a.attempt.id)
    assert s.heartbeat([Heartbeat("m1", T0 + 50, attempt_id=a.attempt.id)], LEASE) == {"m1": False}
    assert s.get_attempt(a.attempt.id) == before


def test_heartbeat_naming_another_machines_attempt_is_not_held(s):
    """The lease belongs to (attempt, machine): m2 cannot be told it holds m1's lease."""
    add_machine(s, "m1")
    add_machine(s, "m2")
    a = claim(s, machine="m1")
    got = s.heartbeat([Heartbeat("m2", T0 + 20, attempt_id=a.attempt.id)], LEASE)
    assert s.get_attempt(a.attempt.id).lease_expires_at == T0 + LEASE  # not renewed
    assert got == {"m2": False}


# -- submit ----------------------------------------------------------------------------------------

def test_submit_stores_a_queued_run(s):
    s.put_pool(Pool("default"), T0)
    run, created = s.submit(
        RunSpec("ehr.create", {"mrn": "1"}, labels={"os": "win"}, priority=5, tenant="t1",
                deadline=100.0, max_attempts=2, webhook_url="http://hook"),
        request_hash="abc", now=T0,
    )
    assert created
    assert run.state is RunState.QUEUED and run.input == {"mrn": "1"} and run.labels == {"os": "win"}
    assert (run.created_at, run.queued_at, run.deadline_at) == (T0, T0, T0 + 100)
    assert (run.priority, run.tenant, run.max_attempts, run.request_hash) == (5, "t1", 2, "abc")
    assert (run.attempts_started, run.dispatches, run.needs_reconcile) == (0, 0, False)
    assert s.get_run(run.id) == run
    ev = s.events(run_id=run.id)
    assert [(e.kind, e.from_state, e.to_state, e.reason) for e in ev] == [
        ("run.state", None, "queued", "submitted")]
    assert s.get_run("run_nope") is None


def test_submit_idempotency(s):
    s.put_pool(Pool("default"), T0)
    spec = RunSpec("ehr.create", {"a": 1}, idempotency_key="k1")
    first, created = s.submit(spec, request_hash="h1", now=T0)
    assert created
    again, created = s.submit(spec, request_hash="h1", now=T0 + 5)
    assert not created and again == first
    runs_before, events_before = s.count_runs(), s.events()
    with pytest.raises(Conflict) as exc:
        s.submit(RunSpec("ehr.create", {"a": 2}, idempotency_key="k1"), request_hash="h2", now=T0 + 6)
    assert first.id in str(exc.value) and exc.value.field == "idempotency_key"
    assert s.count_runs() == runs_before and s.events() == events_before  # nothing written
    # Keys are per tenant; runs without a key never collide.
    other, created = s.submit(RunSpec("ehr.create", idempotency_key="k1", tenant="t2"),
                              request_hash="h2", now=T0)
    assert created and other.id != first.id
    x, c1 = s.submit(RunSpec("ehr.create"), request_hash="h1", now=T0)
    y, c2 = s.submit(RunSpec("ehr.create"), request_hash="h1", now=T0)
    assert c1 and c2 and x.id != y.id
    assert s.count_runs() == {"queued": 4}


def test_submit_many_answers_each_run_and_writes_the_rest(s):
    s.put_pool(Pool("default"), T0)
    first, _ = s.submit(RunSpec("ehr.create", {"a": 1}, idempotency_key="k1"), request_hash="h1", now=T0)
    answers = s.submit_many([
        (RunSpec("ehr.create", {"a": 2}, idempotency_key="k2"), "h2"),
        (RunSpec("ehr.create", {"a": 1}, idempotency_key="k1"), "h1"),  # as before: that run
        (RunSpec("ehr.create", {"a": 9}, idempotency_key="k1"), "h9"),  # the key, another request
        (RunSpec("ehr.create", pool="nowhere"), "h3"),
        (RunSpec("ehr.create", {"a": 2}, idempotency_key="k2"), "h2"),  # twice in one batch
        (RunSpec("ehr.create"), "h4"),
    ], now=T0 + 1)
    created, existing, conflict, unknown, twice, plain = answers
    assert isinstance(created, tuple) and created[1] and created[0].input == {"a": 2}
    assert existing == (first, False)
    assert isinstance(conflict, Conflict) and first.id in conflict.message
    assert isinstance(unknown, NotFound) and unknown.field == "pool"
    assert twice == (created[0], False)
    assert isinstance(plain, tuple) and plain[1]
    assert s.count_runs() == {"queued": 3}
    submitted = [e for e in s.events() if e.reason == "submitted"]
    assert len(submitted) == 3  # one event per run written, none for the refused
    assert s.submit_many([], now=T0) == []


def test_a_batch_looks_its_pools_up_once_and_stores_its_runs_in_order(s, monkeypatch):
    s.put_pool(Pool("default"), T0)
    s.put_pool(Pool("other"), T0)
    sent: list[str] = []
    compiled = s._drv.compiled  # every statement the driver runs is compiled (or found) first
    monkeypatch.setattr(s._drv, "compiled", lambda stmt: sent.append(stmt.text) or compiled(stmt))
    answers = s.submit_many(
        [(RunSpec("ehr.create", {"i": i}, pool="other" if i % 3 == 0 else "default"), None) for i in range(6)]
        + [(RunSpec("ehr.create", {"i": 6}, idempotency_key="k6"), "h6")]
        + [(RunSpec("ehr.create", {"i": i}), None) for i in range(7, 10)], now=T0 + 1)
    monkeypatch.undo()
    assert all(isinstance(a, tuple) and a[1] for a in answers)
    assert sum("FROM pools" in q for q in sent) == 2  # once for each pool, not once for each run
    # Rows in the order the batch gave them (the queue's order among runs submitted at once),
    # the keyed run in its place.
    ids = [a[0].id for a in answers if isinstance(a, tuple)]
    with s.engine.connect() as conn:
        order = {"sqlite": "rowid", "postgresql": "ctid"}[s.engine.dialect.name]
        stored = [r[0] for r in conn.execute(text(f"SELECT id FROM runs ORDER BY {order}"))]
    assert stored == ids
    assert s.count_runs() == {"queued": 10}


def test_submit_to_an_unknown_pool_is_our_error(s):
    """STYLE 7: driver errors are converted at the boundary; the store is one."""
    with pytest.raises(DeskfleetError):
        s.submit(RunSpec("ehr.create", pool="nope"), request_hash="h", now=T0)
    with pytest.raises(DeskfleetError):
        s.submit(RunSpec("ehr.create", pool="nope", idempotency_key="k"), request_hash="h", now=T0)
    assert s.count_runs() == {}


# -- schedule ----------------------------------------------------------------------------------------

def test_schedule_claims_a_machine(s):
    add_machine(s, "m1")
    run = submit(s, automation="ehr.pay")
    out = s.schedule(POLICY, T0 + 1, LEASE)
    assert len(out) == 1
    a = out[0]
    assert a.spec == RECONCILING
    assert a.run.id == run.id and a.run.state is RunState.ASSIGNED
    assert (a.run.dispatches, a.run.current_attempt_id, a.run.current_machine_id) == (1, a.attempt.id, "m1")
    att = a.attempt
    assert (att.state, att.phase, att.mode, att.machine_id, att.number) == (
        AttemptState.ACTIVE, AttemptPhase.ASSIGNED, AttemptMode.RUN, "m1", 1)
    assert (att.assigned_at, att.lease_expires_at) == (T0 + 1, T0 + 1 + LEASE)
    m = s.get_machine("m1")
    assert m.active_attempt_id == att.id and m.active_run_id == run.id
    assert m.idle_since is None and not m.schedulable
    ev = s.events(run_id=run.id)[-1]
    assert (ev.kind, ev.from_state, ev.to_state, ev.reason, ev.attempt_id, ev.machine_id) == (
        "run.state", "queued", "assigned", "scheduled", att.id, "m1")
    # Nothing more to do: the machine is busy, and a second pass never double-books.
    submit(s, now=T0 + 2)
    assert s.schedule(POLICY, T0 + 3, LEASE) == []
    assert s.list_attempts(run.id) == [att]


def test_schedule_nothing_to_do(s):
    assert s.schedule(POLICY, T0, LEASE) == []  # no runs
    s.put_pool(Pool("default"), T0)
    submit(s)
    assert s.schedule(POLICY, T0, LEASE) == []  # no machines
    s.enrol_machine("m1", pool="default", labels={}, key_hash="k", now=T0)
    assert s.schedule(POLICY, T0, LEASE) == []  # enrolled, never connected


def test_schedule_order_priority_then_deadline_then_age(s):
    add_machine(s, "m1")
    low = submit(s, T0, priority=0)
    old_no_deadline = submit(s, T0 + 1, priority=5)
    late_deadline = submit(s, T0 + 2, priority=5, deadline=500.0)
    early_deadline = submit(s, T0 + 3, priority=5, deadline=100.0)
    order = []
    for i in range(4):
        now = T0 + 10 + i
        (a,) = s.schedule(POLICY, now, LEASE)
        order.append(a.run.id)
        s.finish_attempt(a.attempt.id, "m1", Ending.BUSINESS_ERROR, output=None, detail="", now=now)
    assert order == [early_deadline.id, late_deadline.id, old_no_deadline.id, low.id]


def test_schedule_respects_the_limit_and_one_machine_each(s):
    for m in ("m1", "m2", "m3"):
        add_machine(s, m)
    for i in range(5):
        submit(s, T0 + i)
    out = s.schedule(POLICY, T0 + 10, LEASE, limit=2)
    assert len(out) == 2
    out += s.schedule(POLICY, T0 + 10, LEASE)
    assert len(out) == 3 and len({a.attempt.machine_id for a in out}) == 3
    assert s.count_runs() == {"assigned": 3, "queued": 2}


def test_schedule_honours_backoff(s):
    add_machine(s, "m1")
    a = claim(s, automation="ehr.lookup", backoff_initial=4.0)
    advance(s, a, AttemptPhase.RUNNING, T0 + 1)
    f = s.finish_attempt(a.attempt.id, "m1", Ending.SYSTEM_ERROR, output=None, detail="boom", now=T0 + 2)
    assert f.retried and f.run.not_before == T0 + 2 + 4.0
    assert s.schedule(POLICY, T0 + 5.9, LEASE) == []
    (b,) = s.schedule(POLICY, T0 + 6, LEASE)
    assert b.run.id == a.run.id and b.attempt.number == 2 and b.attempt.id > a.attempt.id
    assert b.run.not_before is None


@pytest.mark.parametrize("block", ["cordon", "drain", "quarantine", "disconnect", "busy"])
def test_unavailable_machines_get_no_work(s, block):
    add_machine(s, "m1")
    if block == "cordon":
        s.set_admin("m1", MachineAdmin.CORDONED, T0)
    elif block == "drain":
        s.set_admin("m1", MachineAdmin.DRAINING, T0)
    elif block == "quarantine":
        s.quarantine("m1", "suspicious", T0)
    elif block == "disconnect":
        s.disconnect_machine("m1", T0)
    else:
        claim(s)
    run = submit(s, T0 + 1)
    assert s.schedule(POLICY, T0 + 2, LEASE) == []
    assert run_state(s, run.id) is RunState.QUEUED


def test_schedule_matches_pool_labels_and_version(s):
    add_machine(s, "m1", pool="p1", labels={"os": "win"})
    add_machine(s, "m2", pool="p2", labels={"os": "linux"}, specs=(AutomationSpec("ehr.create", "2"),))
    r_win = submit(s, pool="p1", labels={"os": "win"})
    r_v2 = submit(s, pool="p2", version="2")
    r_v1_p2 = submit(s, pool="p2", version="1")
    r_mac = submit(s, pool="p1", labels={"os": "mac"})
    got = {a.run.id: a.attempt.machine_id for a in s.schedule(POLICY, T0 + 1, LEASE)}
    assert got == {r_win.id: "m1", r_v2.id: "m2"}
    assert run_state(s, r_v1_p2.id) is RunState.QUEUED and run_state(s, r_mac.id) is RunState.QUEUED


def test_machines_are_counted_by_status_as_each_machine_tells_it(s):
    for m in ("busy", "offline", "quarantined", "cordoned", "drained", "ready1", "ready2"):
        add_machine(s, m)
    claim(s, machine="busy")
    s.disconnect_machine("offline", T0)
    s.quarantine("quarantined", "suspicious", T0)
    s.set_admin("cordoned", MachineAdmin.CORDONED, T0)
    s.set_admin("drained", MachineAdmin.DRAINING, T0)
    listed = Counter(m.status for m in s.list_machines())
    assert s.count_machines() == dict(listed) == {
        "busy": 1, "offline": 1, "quarantined": 1, "cordoned": 1, "drained": 1, "ready": 2}


@pytest.fixture
def small_pages(monkeypatch):
    """Scheduling passes read 2 free machines and 2 queued runs a page (the real pages are
    hundreds): what a pass does beyond its first page shows with a handful of rows."""
    import deskfleet.store.sql as sql

    monkeypatch.setattr(sql, "MACHINE_PAGE", 2)
    monkeypatch.setattr(sql, "RUN_PAGE_MIN", 2)
    monkeypatch.setattr(sql, "RUNS_PER_FREE", 1)


def test_a_pass_reads_past_its_first_page_of_machines_for_a_run_only_a_later_one_serves(s, small_pages):
    for m in ("m1", "m2", "m3", "m4"):
        add_machine(s, m, labels={"os": "win"})
    add_machine(s, "m5", labels={"os": "mac"})
    win = submit(s, T0 + 1, labels={"os": "win"})
    mac = submit(s, T0 + 2, labels={"os": "mac"})
    got = {a.run.id: a.attempt.machine_id for a in s.schedule(POLICY, T0 + 3, LEASE)}
    # The longest idle first (all equal here: then by id), and the one mac wherever it is.
    assert got == {win.id: "m1", mac.id: "m5"}


def test_a_free_machine_holding_the_wanted_session_is_chosen_even_beyond_the_first_page(s, small_pages):
    for m in ("m1", "m2", "m3", "m4", "m5"):
        add_machine(s, m)
    s.heartbeat([Heartbeat("m5", T0 + 1, session_key="robot2")], LEASE)
    run = submit(s, T0 + 2, session_key="robot2")
    (a,) = s.schedule(POLICY, T0 + 3, LEASE)
    assert (a.run.id, a.attempt.machine_id) == (run.id, "m5")


def test_a_pass_reads_past_its_first_page_of_runs_for_a_free_machine_only_a_later_run_fits(s, small_pages):
    add_machine(s, "m1", labels={"os": "win"})
    for i in range(4):
        submit(s, T0 + i, labels={"os": "mac"})  # at the head of the queue, nobody serves them
    win = submit(s, T0 + 5, labels={"os": "win"})
    (a,) = s.schedule(POLICY, T0 + 6, LEASE)
    assert (a.run.id, a.attempt.machine_id) == (win.id, "m1")
    assert s.count_runs() == {"queued": 4, "assigned": 1}


def learnt(**seconds: float) -> Policy:
    """A policy that starts long runs first, knowing how long each automation takes."""
    book = DurationBook()
    for name, s_ in seconds.items():
        book.observe(name.replace("_", "."), s_)
    return Policy(durations=book)


def test_a_pass_starts_the_longest_runs_first_wherever_they_wait_in_the_queue(s, small_pages):
    add_machine(s, "m1")
    for i in range(6):
        submit(s, T0 + i, automation="ehr.lookup")  # short, at the head of the queue
    long_ = [submit(s, T0 + 10 + i, automation="ehr.pay") for i in range(2)]  # long, beyond the first page
    policy = learnt(ehr_lookup=0.5, ehr_pay=30.0)
    # (a pass that may claim 4: the backlog is longer than a pass reads, even in full)
    (a,) = s.schedule(policy, T0 + 20, LEASE, limit=4)
    assert a.run.id == long_[0].id  # the oldest of the longest
    # As queued, without durations:
    s.finish_attempt(a.attempt.id, "m1", Ending.BUSINESS_ERROR, output=None, detail="", now=T0 + 21)
    (b,) = s.schedule(POLICY, T0 + 22, LEASE, limit=4)
    assert b.run.automation == "ehr.lookup"


def test_longest_first_keeps_priority_and_runs_not_learnt_go_first(s, small_pages):
    add_machine(s, "m1")
    for i in range(4):
        submit(s, T0 + i, automation="ehr.lookup")
    submit(s, T0 + 5, automation="ehr.pay")
    unknown = submit(s, T0 + 6, automation="ehr.create")  # never seen: runs early, and is learnt
    urgent = submit(s, T0 + 7, automation="ehr.lookup", priority=5)
    policy = learnt(ehr_lookup=0.5, ehr_pay=30.0)
    order = []
    for i in range(2):
        (a,) = s.schedule(policy, T0 + 10 + i, LEASE, limit=4)
        order.append(a.run.id)
        s.finish_attempt(a.attempt.id, "m1", Ending.BUSINESS_ERROR, output=None, detail="", now=T0 + 10 + i)
    assert order == [urgent.id, unknown.id]


def test_queued_runs_are_read_in_the_pass_order_from_an_index_not_sorted(s):
    """The pass reads a page of its queue walking an index in its own order; a plan that
    sorts every queued run (a temporary B-tree) would cost a pass its whole backlog."""
    from deskfleet.store.statements import for_dialect

    sql = for_dialect(s.engine.dialect.name)
    queries = ((sql.QUEUED, {"now": T0, "limit": 10}), (sql.QUEUED_OF, {"now": T0, "limit": 10, "offset": 0, "automation": "a"}),
               (sql.QUEUED_AUTOMATIONS, {}))
    with s.engine.connect() as conn:
        for stmt, params in queries:
            prefix = "EXPLAIN QUERY PLAN " if s.engine.dialect.name == "sqlite" else "EXPLAIN (FORMAT TEXT) "
            if s.engine.dialect.name == "postgresql":
                conn.execute(text("SET enable_seqscan = off"))  # an empty table: the index must be usable
            plan = " ".join(str(r[-1]) for r in conn.execute(text(prefix + stmt.text), params))
            assert "ix_runs_due" in plan, plan
            assert "TEMP B-TREE" not in plan and "Sort" not in plan, plan


def test_an_idle_fleet_with_nothing_queued_reads_no_machine(s, monkeypatch):
    """SQLite asks first whether anything is queued; PostgreSQL asks it within the read of free
    machines (a round trip saved), as a condition its plan answers once, before any machine."""
    from deskfleet.store.statements import for_dialect

    add_machine(s, "m1")
    import deskfleet.store.sql as sql

    pg = s.engine.dialect.name == "postgresql"
    read = []
    real = sql.SQLStore._free_machines
    monkeypatch.setattr(sql.SQLStore, "_free_machines", lambda *a, **k: read.append(a) or real(*a, **k))
    assert s.schedule(POLICY, T0, LEASE) == []
    assert len(read) == (1 if pg else 0)
    if pg:
        stmt = for_dialect("postgresql").free_machines(replica=False, order=None, paged=False, if_queued=True)
        with s.engine.connect() as conn:
            plan = [r[0] for r in conn.execute(text("EXPLAIN " + stmt.text), {"now": T0})]
        assert "One-Time Filter" in plan[1], plan  # nothing queued: no machine is read
    submit(s, T0 + 1)
    assert len(s.schedule(POLICY, T0 + 2, LEASE)) == 1
    assert len(read) == (2 if pg else 1)


# -- fenced writes -------------------------------------------------------------------------------

def test_attempt_lifecycle(s):
    add_machine(s, "m1")
    a = claim(s)
    aid = a.attempt.id
    att = s.attempt_preparing(aid, "m1", T0 + 1)
    assert att.phase is AttemptPhase.PREPARING
    assert run_state(s, a.run.id) is RunState.PREPARING
    assert s.attempt_preparing(aid, "m1", T0 + 1.5).phase is AttemptPhase.PREPARING  # repeat: no-op
    s.attempt_event(aid, "m1", "playbook.step", {"playbook": "login"}, T0 + 2)
    assert s.get_attempt(aid).last_progress_at == T0 + 2
    att = s.attempt_start(aid, "m1", T0 + 3)
    assert (att.phase, att.started_at) == (AttemptPhase.RUNNING, T0 + 3)
    run = s.get_run(a.run.id)
    assert run.state is RunState.RUNNING and run.attempts_started == 1
    assert s.attempt_start(aid, "m1", T0 + 3.5).started_at == T0 + 3  # repeat: no second start
    assert s.get_run(a.run.id).attempts_started == 1
    s.attempt_progress(aid, "m1", "typing", {"percent": 50}, T0 + 4)
    att = s.get_attempt(aid)
    assert (att.last_progress_at, att.progress_step) == (T0 + 4, "typing")
    art = s.add_artifact(attempt_id=aid, machine_id="m1", name="shot.png", content_type="image/png",
                         data=b"\x89PNG", now=T0 + 5)
    assert (art.run_id, art.attempt_id, art.size) == (a.run.id, aid, 4)
    assert s.get_artifact(art.id) == (art, b"\x89PNG")
    assert s.list_artifacts(a.run.id) == [art]
    assert s.get_machine("m1").last_screenshot_id == art.id
    f = s.finish_attempt(aid, "m1", Ending.SUCCEEDED, output={"mrn": "1"}, detail="", now=T0 + 6)
    assert not f.retried and not f.machine_quarantined
    assert f.run.state is RunState.SUCCEEDED and f.run.output == {"mrn": "1"}
    assert f.run.finished_at == T0 + 6 and f.run.error_code is None
    assert (f.attempt.state, f.attempt.ending) == (AttemptState.SUCCEEDED, Ending.SUCCEEDED)
    m = s.get_machine("m1")
    assert m.runs_completed == 1 and m.idle_since == T0 + 6 and m.schedulable
    assert [(e.kind, e.to_state) for e in s.events(run_id=a.run.id)] == [
        ("run.state", "queued"), ("run.state", "assigned"), ("run.state", "preparing"),
        ("playbook.step", None), ("run.state", "running"), ("attempt.progress", None),
        ("attempt.ended", "succeeded"), ("run.state", "succeeded"),
    ]


def test_start_without_preparing_passes_through_preparing(s):
    add_machine(s, "m1")
    a = claim(s)
    s.attempt_start(a.attempt.id, "m1", T0 + 1)
    states = [e.to_state for e in s.events(run_id=a.run.id) if e.kind == "run.state"]
    assert states == ["queued", "assigned", "preparing", "running"]


FENCED_WRITES: dict[str, Callable[[SQLStore, int, str, float], Any]] = {
    "preparing": lambda st_, aid, mid, now: st_.attempt_preparing(aid, mid, now),
    "start": lambda st_, aid, mid, now: st_.attempt_start(aid, mid, now),
    "progress": lambda st_, aid, mid, now: st_.attempt_progress(aid, mid, "step", {}, now),
    "ui.dialog": lambda st_, aid, mid, now: st_.attempt_event(aid, mid, "ui.dialog", {}, now),
    "finish:system_error": lambda st_, aid, mid, now: st_.finish_attempt(
        aid, mid, Ending.SYSTEM_ERROR, output=None, detail="late", now=now),
    "artifact": lambda st_, aid, mid, now: st_.add_artifact(
        attempt_id=aid, machine_id=mid, name="x.png", content_type="image/png", data=b"x", now=now),
}


@pytest.mark.parametrize("op", list(FENCED_WRITES))
@pytest.mark.parametrize("how", ["finished", "lease_expired", "wrong_machine", "unknown"])
def test_fenced_write_after_the_lease_is_gone_is_rejected(s, op, how):
    add_machine(s, "m1")
    add_machine(s, "m2")
    a = claim(s, machine="m1")
    aid, mid = a.attempt.id, "m1"
    advance(s, a, AttemptPhase.PREPARING, T0 + 1)
    if how == "finished":
        s.finish_attempt(aid, "m1", Ending.SUCCEEDED, output={"ok": 1}, detail="", now=T0 + 2)
    elif how == "lease_expired":
        assert len(s.expire_leases(T0 + LEASE + 1)) == 1
        # Another attempt now holds the run (and could hold the machine): the old token is dead.
        s.release_quarantine("m1", {}, T0 + LEASE + 2)
        s.schedule(POLICY, T0 + LEASE + 2, LEASE)
    elif how == "wrong_machine":
        mid = "m2"
    else:
        aid = aid + 1000
    before, arts = table_digest(s), s.list_artifacts(a.run.id)
    with pytest.raises(StaleLease) as exc:
        FENCED_WRITES[op](s, aid, mid, T0 + LEASE + 3)
    assert exc.value.attempt_id == aid
    assert table_digest(s) == before and s.list_artifacts(a.run.id) == arts
    ev = s.events()[-1]
    assert (ev.kind, ev.attempt_id, ev.machine_id, ev.data) == (
        "lease.stale_write_rejected", aid, mid, {"op": op})
    assert ev.reason == exc.value.reason


def batched(st_: SQLStore, op: str, aid: int, mid: str, now: float) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """FENCED_WRITES[op] as a call ``SQLStore.batch`` takes."""
    return {
        "preparing": (st_.attempt_preparing, (aid, mid, now), {}),
        "start": (st_.attempt_start, (aid, mid, now), {}),
        "progress": (st_.attempt_progress, (aid, mid, "step", {}, now), {}),
        "ui.dialog": (st_.attempt_event, (aid, mid, "ui.dialog", {}, now), {}),
        "finish:system_error": (st_.finish_attempt, (aid, mid, Ending.SYSTEM_ERROR),
                                {"output": None, "detail": "late", "now": now}),
    }[op]


@pytest.mark.parametrize("op", [op for op in FENCED_WRITES if op != "artifact"])
def test_a_stale_write_in_a_batch_fails_alone_and_the_others_commit(s, op):
    for m in ("m1", "m2", "m3"):
        add_machine(s, m)
    one, late, two = (claim(s, T0, machine=m) for m in ("m1", "m2", "m3"))
    s.finish_attempt(late.attempt.id, "m2", Ending.SUCCEEDED, output={}, detail="", now=T0 + 1)
    _, stop = s.request_cancel(two.run.id, T0 + 1)
    assert stop is not None
    out = s.batch([
        (s.attempt_preparing, (one.attempt.id, "m1", T0 + 2), {}),
        batched(s, op, late.attempt.id, "m2", T0 + 2),  # its lease is gone
        (s.attempt_start, (two.attempt.id, "m3", T0 + 2), {}),  # its run was cancelled
        (s.attempt_start, (one.attempt.id, "m1", T0 + 3), {}),
    ])
    assert [type(r).__name__ for r in out] == ["Attempt", "StaleLease", "Stopped", "Attempt"]
    assert run_state(s, one.run.id) is RunState.RUNNING  # both of its writes committed
    assert run_state(s, late.run.id) is RunState.SUCCEEDED
    stale = [e for e in s.events() if e.kind == "lease.stale_write_rejected"]
    assert [(e.attempt_id, e.data) for e in stale] == [(late.attempt.id, {"op": op})]


def test_a_batch_takes_only_the_writes_that_can_share_a_transaction(s):
    with pytest.raises(ValueError, match="only these writes"):
        s.batch([(s.set_admin, ("m1", MachineAdmin.CORDONED, T0), {})])
    other = s.__class__(s.engine, migrate=lambda e: None)
    with pytest.raises(ValueError):
        s.batch([(other.attempt_start, (1, "m1", T0), {})])  # another store's method


def test_submits_in_a_batch_answer_each_for_itself(s):
    s.put_pool(Pool("default"), T0)
    first = submit(s, T0, idempotency_key="k1")

    def sub(key: str | None, body: str, pool: str = "default") -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
        return (s.submit, (RunSpec("ehr.create", pool=pool, idempotency_key=key),), {"request_hash": body, "now": T0 + 1})

    out = s.batch([sub("k2", "h"), sub("k1", "other body"), sub("k2", "h"), sub(None, "h", pool="nope"), sub(None, "h")])
    assert [type(r).__name__ for r in out] == ["tuple", "Conflict", "tuple", "NotFound", "tuple"]
    (a, created_a), (b, created_b), (c, created_c) = out[0], out[2], out[4]
    assert created_a and not created_b and a.id == b.id, "the same key twice in one batch: one run"
    assert created_c and c.id not in (a.id, first.id)
    assert s.count_runs() == {"queued": 3}


def test_an_unexpected_error_rolls_the_whole_batch_back(s, monkeypatch):
    for m in ("m1", "m2"):
        add_machine(s, m)
    one, two = claim(s, T0, machine="m1"), claim(s, T0, machine="m2")
    before = table_digest(s)
    real = SQLStore._set_run_state

    def broken(self, conn, run, to, now, **kw):
        if run.id == two.run.id:
            raise RuntimeError("a bug")
        return real(self, conn, run, to, now, **kw)

    monkeypatch.setattr(SQLStore, "_set_run_state", broken)
    with pytest.raises(RuntimeError):
        s.batch([(s.attempt_preparing, (one.attempt.id, "m1", T0 + 1), {}),
                 (s.attempt_preparing, (two.attempt.id, "m2", T0 + 1), {})])
    assert table_digest(s) == before  # the first write, applied before the error, went too


def test_start_after_a_stop_order_is_refused(s):
    add_machine(s, "m1")
    a = claim(s)
    advance(s, a, AttemptPhase.PREPARING, T0 + 1)
    _, order = s.request_cancel(a.run.id, T0 + 2)
    assert order is not None
    with pytest.raises(Stopped) as exc:
        s.attempt_start(a.attempt.id, "m1", T0 + 3)
    assert exc.value.reason == "cancelled"
    assert s.get_run(a.run.id).attempts_started == 0  # the automation never started


def test_duplicate_finish_report_returns_the_same_result(s):
    add_machine(s, "m1")
    a = claim(s)
    advance(s, a, AttemptPhase.RUNNING, T0 + 1)
    first = s.finish_attempt(a.attempt.id, "m1", Ending.SUCCEEDED, output={"v": 1}, detail="", now=T0 + 2)
    before, n_events = table_digest(s), len(s.events())
    again = s.finish_attempt(a.attempt.id, "m1", Ending.SUCCEEDED, output={"v": 2}, detail="", now=T0 + 9)
    assert again.run == first.run and again.run.output == {"v": 1}
    assert (again.attempt.id, again.attempt.state, again.attempt.ending, again.attempt.ended_at) == (
        first.attempt.id, first.attempt.state, first.attempt.ending, first.attempt.ended_at)
    assert table_digest(s) == before and len(s.events()) == n_events
    # A different report for the same attempt is a stale write, not a duplicate.
    with pytest.raises(StaleLease):
        s.finish_attempt(a.attempt.id, "m1", Ending.SYSTEM_ERROR, output=None, detail="", now=T0 + 9)
    assert table_digest(s) == before


def test_duplicate_finish_report_repeats_the_flags(s):
    """The repeat's answer is the first one's: "retried" and "quarantined" included."""
    add_machine(s, "m1")
    a = claim(s)
    advance(s, a, AttemptPhase.PREPARING, T0 + 1)
    first = s.finish_attempt(a.attempt.id, "m1", Ending.PREFLIGHT_FAILED, output=None, detail="x", now=T0 + 2)
    assert first.retried and first.machine_quarantined
    again = s.finish_attempt(a.attempt.id, "m1", Ending.PREFLIGHT_FAILED, output=None, detail="x", now=T0 + 3)
    assert (again.retried, again.machine_quarantined) == (first.retried, first.machine_quarantined)


def test_reconciled_report_when_preparing_was_lost(s):
    """The agent reconciles during pre-flight and sends ``preparing`` without waiting for an
    answer; if that message is lost (a reconnect), RECONCILED arrives while the attempt is
    still ``assigned``. The run's result is known: it must succeed, not crash the store."""
    add_machine(s, "m1")
    a = claim(s, automation="ehr.pay")
    f = s.finish_attempt(a.attempt.id, "m1", Ending.RECONCILED, output={"paid": True}, detail="",
                         now=T0 + 1)
    assert f.run.state is RunState.SUCCEEDED and f.run.output == {"paid": True}


# -- failure handling: leases, silence, sweeps -----------------------------------------------------

@pytest.mark.parametrize(
    ("automation", "phase", "max_attempts", "state", "code", "reconcile"),
    [
        ("ehr.create", AttemptPhase.ASSIGNED, 1, RunState.QUEUED, "requeued_not_started", False),
        ("ehr.create", AttemptPhase.PREPARING, 1, RunState.QUEUED, "requeued_not_started", False),
        ("ehr.create", AttemptPhase.RUNNING, 3, RunState.FAILED, "not_retried_unsafe", False),
        ("ehr.lookup", AttemptPhase.RUNNING, 3, RunState.QUEUED, "retry_idempotent", False),
        ("ehr.pay", AttemptPhase.RUNNING, 3, RunState.QUEUED, "retry_after_reconcile", True),
        ("ehr.pay", AttemptPhase.RUNNING, 1, RunState.FAILED, "retries_exhausted", False),
    ],
)
def test_expire_leases(s, automation, phase, max_attempts, state, code, reconcile):
    add_machine(s, "m1")
    add_machine(s, "m2")
    a = claim(s, automation=automation, machine="m1", max_attempts=max_attempts)
    advance(s, a, phase, T0 + 1)
    expires = T0 + LEASE
    assert s.expire_leases(expires) == []  # the lease runs until its last instant
    (f,) = s.expire_leases(expires + 0.5)
    now = expires + 0.5
    assert f.attempt.id == a.attempt.id and f.machine_quarantined and f.retried == (state is RunState.QUEUED)
    att = s.get_attempt(a.attempt.id)
    assert (att.state, att.ending, att.ended_at) == (AttemptState.LOST, Ending.LOST, now)
    assert "lease expired" in att.reason
    run = s.get_run(a.run.id)
    assert run.state is state and f.run == run
    assert [e for e in s.events(run_id=run.id) if e.kind == "run.state"][-1].reason == code
    m1 = s.get_machine("m1")
    assert m1.health is MachineHealth.QUARANTINED and "lost" in m1.quarantine_reason
    if state is RunState.FAILED:
        assert run.error_code == code and run.finished_at == now
        assert ("not idempotent" in run.error_message) or ("no retries left" in run.error_message)
        return
    assert run.needs_reconcile is reconcile and run.current_attempt_id is None
    assert run.attempts_started == (1 if phase is AttemptPhase.RUNNING else 0)
    # The retry goes elsewhere (m1 is quarantined), after the backoff, in the right mode.
    s.schedule(POLICY, now, LEASE)  # pinned to m1: nothing
    assert run_state(s, run.id) is RunState.QUEUED
    s.release_quarantine("m1", {"state": "ready"}, now)
    later = now + (run.not_before - now if run.not_before else 0)
    (b,) = s.schedule(POLICY, later, LEASE)
    assert b.run.id == run.id
    assert b.attempt.mode is (AttemptMode.RECONCILE if reconcile else AttemptMode.RUN)
    assert b.attempt.id > a.attempt.id


def test_expire_silent_machines(s):
    for m in ("m1", "m2", "m3"):
        add_machine(s, m)
    s.heartbeat([Heartbeat("m2", T0 + 50)], LEASE)
    s.disconnect_machine("m3", T0 + 1)
    assert s.expire_silent_machines(T0 + 60, 60.0) == []
    assert s.expire_silent_machines(T0 + 60.5, 60.0) == ["m1"]
    m1 = s.get_machine("m1")
    assert m1.health is MachineHealth.QUARANTINED and "no heartbeat" in m1.quarantine_reason
    assert s.expire_silent_machines(T0 + 61, 60.0) == []  # already quarantined
    assert s.get_machine("m3").health is MachineHealth.ONLINE


def test_sweep_queue_timeout_and_queued_deadline(s):
    s.put_pool(Pool("default"), T0)
    waits = submit(s, T0, queue_timeout=5.0)
    hurries = submit(s, T0, deadline=3.0)
    patient = submit(s, T0)
    assert s.sweep(T0 + 2.9, GRACE).expired_runs == []
    res = s.sweep(T0 + 3.0, GRACE)
    assert [r.id for r in res.expired_runs] == [hurries.id]
    assert res.expired_runs[0].state is RunState.TIMED_OUT and res.expired_runs[0].error_code == "deadline"
    res = s.sweep(T0 + 5.0, GRACE)
    assert [(r.id, r.error_code) for r in res.expired_runs] == [(waits.id, "queue_timeout")]
    assert "queue wait of 5s" in res.expired_runs[0].error_message
    assert res.expired_runs[0].finished_at == T0 + 5
    assert run_state(s, patient.id) is RunState.QUEUED
    assert s.sweep(T0 + 6, GRACE).expired_runs == []
    with pytest.raises(Conflict):  # timed out is final: nothing to cancel
        s.request_cancel(waits.id, T0 + 7)


@pytest.mark.parametrize(
    ("kw", "at", "reason", "run_after", "attempt_after"),
    [
        ({"attempt_timeout": 50.0}, 50.0, StopReason.ATTEMPT_TIMEOUT, RunState.QUEUED, AttemptState.TIMED_OUT),
        ({"deadline": 40.0}, 40.0, StopReason.DEADLINE, RunState.TIMED_OUT, AttemptState.TIMED_OUT),
        ({"progress_timeout": 10.0}, 14.0, StopReason.PROGRESS_STALLED, RunState.QUEUED, AttemptState.ABORTED),
    ],
)
def test_sweep_orders_stops_and_the_agent_confirms(s, kw, at, reason, run_after, attempt_after):
    add_machine(s, "m1")
    a = claim(s, automation="ehr.lookup", **kw)  # idempotent: retried where the policy allows
    aid = a.attempt.id
    advance(s, a, AttemptPhase.RUNNING, T0 + 1)
    s.attempt_progress(aid, "m1", "step", {}, T0 + 4)  # the watchdog counts from here
    assert s.sweep(T0 + at - 0.1, GRACE).stop_orders == []
    res = s.sweep(T0 + at, GRACE)
    assert res.stop_orders == [StopOrder("m1", aid, a.run.id, reason)]
    att = s.get_attempt(aid)
    assert (att.stop_requested_at, att.stop_reason, att.state) == (T0 + at, reason, AttemptState.ACTIVE)
    assert s.pending_stops("m1") == res.stop_orders
    assert s.sweep(T0 + at + 1, GRACE).stop_orders == []  # ordered once
    f = s.finish_attempt(aid, "m1", Ending.STOPPED, output=None, detail="stopped", now=T0 + at + 2)
    assert f.run.state is run_after and f.attempt.state is attempt_after
    assert f.machine_quarantined == (reason is StopReason.PROGRESS_STALLED)  # green but stuck
    assert s.pending_stops("m1") == []


def test_sweep_progress_watchdog_covers_preflight(s):
    add_machine(s, "m1")
    a = claim(s, progress_timeout=10.0)
    advance(s, a, AttemptPhase.PREPARING, T0 + 1)
    s.attempt_event(a.attempt.id, "m1", "playbook.step", {"playbook": "login"}, T0 + 8)
    assert s.sweep(T0 + 17.9, GRACE).stop_orders == []
    assert [o.reason for o in s.sweep(T0 + 18, GRACE).stop_orders] == [StopReason.PROGRESS_STALLED]


def test_sweep_forces_an_unconfirmed_stop(s):
    add_machine(s, "m1")
    a = claim(s, attempt_timeout=10.0)
    advance(s, a, AttemptPhase.RUNNING, T0 + 1)
    assert len(s.sweep(T0 + 10, GRACE).stop_orders) == 1
    assert s.sweep(T0 + 10 + GRACE - 0.1, GRACE).finished == []
    res = s.sweep(T0 + 10 + GRACE, GRACE)
    (f,) = res.finished
    assert f.attempt.ending is Ending.STOP_FORCED and f.attempt.state is AttemptState.TIMED_OUT
    assert f.machine_quarantined and s.get_machine("m1").health is MachineHealth.QUARANTINED
    assert f.run.state is RunState.FAILED  # the automation started and is unsafe to retry
    assert "not idempotent" in f.run.error_message
    with pytest.raises(StaleLease):  # the agent's late confirmation
        s.finish_attempt(a.attempt.id, "m1", Ending.STOPPED, output=None, detail="", now=T0 + 20)


# -- cancel --------------------------------------------------------------------------------------

def test_cancel_queued_run(s):
    s.put_pool(Pool("default"), T0)
    run = submit(s, webhook_url="http://hook")
    got, order = s.request_cancel(run.id, T0 + 1)
    assert order is None
    assert got.state is RunState.CANCELLED and got.cancel_requested_at == T0 + 1
    assert (got.finished_at, got.error_code) == (T0 + 1, "cancelled")
    assert s.due_webhooks(T0 + 1) == [(1, run.id, "http://hook")]
    with pytest.raises(Conflict):
        s.request_cancel(run.id, T0 + 2)
    with pytest.raises(NotFound):
        s.request_cancel("run_nope", T0)


@pytest.mark.parametrize("phase", list(AttemptPhase))
def test_cancel_active_run_stops_its_attempt(s, phase):
    add_machine(s, "m1")
    a = claim(s)
    advance(s, a, phase, T0 + 1)
    state = run_state(s, a.run.id)
    got, order = s.request_cancel(a.run.id, T0 + 2)
    assert order == StopOrder("m1", a.attempt.id, a.run.id, StopReason.CANCELLED)
    assert got.state is state and got.cancel_requested_at == T0 + 2  # still active until confirmed
    n = len(s.events())
    assert s.request_cancel(a.run.id, T0 + 3) == (got, order)  # asking twice changes nothing
    assert len(s.events()) == n
    assert kinds(s, run_id=a.run.id)[-2:] == ["run.cancel_requested", "attempt.stop_requested"]
    f = s.finish_attempt(a.attempt.id, "m1", Ending.STOPPED, output=None, detail="", now=T0 + 4)
    assert f.run.state is RunState.CANCELLED and f.attempt.state is AttemptState.CANCELLED
    assert not f.retried and not f.machine_quarantined
    assert s.get_machine("m1").schedulable


def test_cancel_loses_to_success(s):
    add_machine(s, "m1")
    a = claim(s)
    advance(s, a, AttemptPhase.RUNNING, T0 + 1)
    s.request_cancel(a.run.id, T0 + 2)
    f = s.finish_attempt(a.attempt.id, "m1", Ending.SUCCEEDED, output={"x": 1}, detail="", now=T0 + 3)
    assert f.run.state is RunState.SUCCEEDED and f.run.output == {"x": 1}


def test_cancel_not_confirmed_is_forced(s):
    add_machine(s, "m1")
    a = claim(s)
    advance(s, a, AttemptPhase.RUNNING, T0 + 1)
    s.request_cancel(a.run.id, T0 + 2)
    (f,) = s.sweep(T0 + 2 + GRACE, GRACE).finished
    assert f.run.state is RunState.CANCELLED and f.machine_quarantined


@pytest.mark.parametrize("ending", [Ending.SUCCEEDED, Ending.BUSINESS_ERROR, None])
def test_cancel_final_run_conflicts(s, ending):
    add_machine(s, "m1")
    a = claim(s)
    advance(s, a, AttemptPhase.RUNNING, T0 + 1)
    if ending is None:
        s.request_cancel(a.run.id, T0 + 2)
        s.finish_attempt(a.attempt.id, "m1", Ending.STOPPED, output=None, detail="", now=T0 + 3)
    else:
        s.finish_attempt(a.attempt.id, "m1", ending, output=None, detail="", now=T0 + 3)
    before = table_digest(s)
    with pytest.raises(Conflict):
        s.request_cancel(a.run.id, T0 + 4)
    assert table_digest(s) == before


# -- operators: admin, quarantine, restart -------------------------------------------------------

def test_cordon_and_drain_let_current_work_finish(s):
    add_machine(s, "m1")
    a = claim(s)
    m = s.set_admin("m1", MachineAdmin.DRAINING, T0 + 1, reason="patch tuesday")
    assert m.admin is MachineAdmin.DRAINING and m.active_attempt_id == a.attempt.id
    ev = s.events(machine_id="m1")[-1]
    assert (ev.kind, ev.from_state, ev.to_state, ev.reason) == (
        "machine.draining", "active", "draining", "patch tuesday")
    advance(s, a, AttemptPhase.RUNNING, T0 + 2)  # current work continues
    s.finish_attempt(a.attempt.id, "m1", Ending.SUCCEEDED, output={}, detail="", now=T0 + 3)
    submit(s, T0 + 4)
    assert s.schedule(POLICY, T0 + 5, LEASE) == []
    s.set_admin("m1", MachineAdmin.CORDONED, T0 + 6)
    assert s.schedule(POLICY, T0 + 7, LEASE) == []
    assert s.set_admin("m1", MachineAdmin.ACTIVE, T0 + 8).schedulable
    assert len(s.schedule(POLICY, T0 + 9, LEASE)) == 1
    with pytest.raises(NotFound):
        s.set_admin("ghost", MachineAdmin.CORDONED, T0)


def test_quarantine_and_release(s):
    add_machine(s, "m1")
    m = s.quarantine("m1", "screen unknown", T0 + 1)
    assert m.health is MachineHealth.QUARANTINED and m.quarantine_reason == "screen unknown"
    assert m.idle_since == T0
    m = s.release_quarantine("m1", {"state": "home", "screenshot": "art_1"}, T0 + 2)
    assert m.health is MachineHealth.ONLINE and m.quarantine_reason is None and m.schedulable
    assert m.idle_since == T0  # still idle since before
    ev = s.events(machine_id="m1")
    assert [e.kind for e in ev[-2:]] == ["machine.quarantined", "machine.verified"]
    assert ev[-1].data == {"state": "home", "screenshot": "art_1"}
    assert (ev[-1].from_state, ev[-1].to_state) == ("quarantined", "online")


def test_recover_extends_leases_and_disconnects(s):
    add_machine(s, "m1")
    add_machine(s, "m2")
    a1 = claim(s, machine="m1")
    a2 = claim(s, machine="m2")
    s.heartbeat([Heartbeat("m2", T0, attempt_id=a2.attempt.id)], 500.0)
    assert s.recover(T0 + 20, grace=60.0) == 2
    assert s.get_attempt(a1.attempt.id).lease_expires_at == T0 + 80  # at least the grace
    assert s.get_attempt(a2.attempt.id).lease_expires_at == T0 + 500  # never shortened
    assert not any(m.connected for m in s.list_machines())
    ev = s.events()[-1]
    assert ev.kind == "orchestrator.started" and ev.data == {"active_leases": 2, "grace": 60.0}
    assert s.expire_leases(T0 + 79) == []
    # The agent that reconnects within the grace resumes; the other's lease then runs out.
    assert connect(s, "m1", T0 + 30, attempt_id=a1.attempt.id).resume is not None
    assert s.get_attempt(a1.attempt.id).lease_expires_at == T0 + 30 + LEASE
    submit(s, T0 + 31)
    assert s.schedule(POLICY, T0 + 31, LEASE) == []  # m1 busy, m2 not connected
    assert [f.attempt.id for f in s.expire_leases(T0 + 500.5)] == [a1.attempt.id, a2.attempt.id]
    assert s.recover(T0 + 501, grace=1.0) == 0


# -- webhooks (outbox) ----------------------------------------------------------------------------

def test_webhook_outbox(s):
    add_machine(s, "m1")
    a = claim(s, automation="ehr.lookup", webhook_url="http://hook/1")
    advance(s, a, AttemptPhase.RUNNING, T0 + 1)
    f = s.finish_attempt(a.attempt.id, "m1", Ending.SYSTEM_ERROR, output=None, detail="", now=T0 + 2)
    assert f.retried and s.due_webhooks(T0 + 1000) == []  # not final yet: nothing to send
    (b,) = s.schedule(POLICY, T0 + 10, LEASE)
    advance(s, b, AttemptPhase.RUNNING, T0 + 11)
    s.finish_attempt(b.attempt.id, "m1", Ending.SUCCEEDED, output={}, detail="", now=T0 + 12)
    assert s.due_webhooks(T0 + 11.9) == []
    ((wid, run_id, url),) = s.due_webhooks(T0 + 12)
    assert (run_id, url) == (a.run.id, "http://hook/1")
    # Failures back off exponentially...
    s.webhook_done(wid, ok=False, error="503", now=T0 + 13)
    assert s.due_webhooks(T0 + 14.9) == []
    assert [w[0] for w in s.due_webhooks(T0 + 15)] == [wid]
    s.webhook_done(wid, ok=False, error="503", now=T0 + 15)
    assert s.due_webhooks(T0 + 18.9) == [] and len(s.due_webhooks(T0 + 19)) == 1
    # ...and delivery ends it.
    s.webhook_done(wid, ok=True, error=None, now=T0 + 19)
    assert s.due_webhooks(T0 + 10**6) == []
    ev = s.events(run_id=a.run.id)[-1]
    assert ev.kind == "webhook.delivered" and ev.data == {"tries": 3}


def test_webhook_gives_up(s):
    s.put_pool(Pool("default"), T0)
    run = submit(s, webhook_url="http://hook", queue_timeout=1.0)
    submit(s, T0, queue_timeout=1.0)  # no webhook: nothing queued for it
    assert len(s.sweep(T0 + 1, GRACE).expired_runs) == 2
    ((wid, _, _),) = s.due_webhooks(T0 + 1)
    now = T0 + 1
    for _ in range(12):
        due = s.due_webhooks(now + 10**4)
        assert [w[0] for w in due] == [wid]
        s.webhook_done(wid, ok=False, error="refused", now=now)
        now += 10**4
    assert s.due_webhooks(now + 10**6) == []
    ev = s.events(run_id=run.id)[-1]
    assert (ev.kind, ev.reason, ev.data) == ("webhook.gave_up", "refused", {"tries": 12})


# -- reading: runs, counts, events, attempts, artifacts ---------------------------------------------

def test_list_runs_filters_and_paging(s):
    add_machine(s, "m1")
    s.put_pool(Pool("p2"), T0)
    made = [submit(s, T0 + i, automation="ehr.lookup" if i % 2 else "ehr.create",
                   pool="p2" if i % 3 == 0 else "default") for i in range(9)]
    (a,) = s.schedule(POLICY, T0 + 20, LEASE)
    all_runs = s.list_runs()
    assert len(all_runs) == 9
    ids = [r.id for r in all_runs]
    assert [r.created_at for r in all_runs] == sorted((r.created_at for r in all_runs), reverse=True)
    # Pages of 4, by the last id seen: every run once.
    pages, before = [], None
    while True:
        page = s.list_runs(limit=4, before=before)
        if not page:
            break
        pages.append(page)
        before = page[-1].id
    assert [len(p) for p in pages] == [4, 4, 1]
    assert [r.id for p in pages for r in p] == ids
    assert {r.id for r in s.list_runs(pool="p2")} == {r.id for r in made if r.pool == "p2"}
    assert {r.id for r in s.list_runs(automation="ehr.lookup")} == {r.id for r in made[1::2]}
    assert [r.id for r in s.list_runs(states=[RunState.ASSIGNED])] == [a.run.id]
    assert len(s.list_runs(states=[RunState.QUEUED, RunState.ASSIGNED])) == 9
    assert [r.id for r in s.list_runs(machine="m1")] == [a.run.id]
    assert s.list_runs(pool="p2", automation="ehr.lookup", states=[RunState.FAILED]) == []
    assert s.count_runs() == {"queued": 8, "assigned": 1}


def test_list_runs_newest_first_within_one_millisecond(s, monkeypatch):
    """Newest first (by the store's clock) even when runs arrive within one millisecond
    of wall time — a burst from a client or several API workers."""
    import deskfleet.ids

    class FrozenTime:
        @staticmethod
        def time() -> float:
            return T0

    s.put_pool(Pool("default"), T0)
    monkeypatch.setattr(deskfleet.ids, "time", FrozenTime)
    made = [submit(s, T0 + i) for i in range(20)]
    assert [r.id for r in s.list_runs()] == [r.id for r in reversed(made)]


def test_events_ordering_and_filters(s):
    add_machine(s, "m1")
    add_machine(s, "m2")
    a = claim(s, machine="m1")
    s.record_event("operator.note", T0 + 5, run_id=a.run.id, machine_id="m2", reason="hi", data={"k": 1})
    ev = s.events()
    assert [e.id for e in ev] == sorted(e.id for e in ev) and len({e.id for e in ev}) == len(ev)
    note = ev[-1]
    assert (note.kind, note.at, note.run_id, note.machine_id, note.reason, note.data) == (
        "operator.note", T0 + 5, a.run.id, "m2", "hi", {"k": 1})
    assert all(e.run_id == a.run.id for e in s.events(run_id=a.run.id))
    assert all(e.machine_id == "m2" for e in s.events(machine_id="m2"))
    assert s.events(after_id=ev[2].id) == ev[3:]
    assert s.events(limit=2) == ev[:2]
    assert s.events(run_id=a.run.id, machine_id="m2") == [note]


def test_attempts_and_artifacts_reads(s):
    add_machine(s, "m1")
    a = claim(s, automation="ehr.lookup")
    advance(s, a, AttemptPhase.RUNNING, T0 + 1)
    s.finish_attempt(a.attempt.id, "m1", Ending.SYSTEM_ERROR, output=None, detail="x", now=T0 + 2)
    (b,) = s.schedule(POLICY, T0 + 10, LEASE)
    assert [x.id for x in s.list_attempts(a.run.id)] == [a.attempt.id, b.attempt.id]
    assert [x.number for x in s.list_attempts(a.run.id)] == [1, 2]
    assert s.get_attempt(10**6) is None
    free = s.add_artifact(attempt_id=None, machine_id="m1", name="boot.png", content_type="image/png",
                          data=b"img", now=T0 + 3)
    assert free.run_id is None and s.get_machine("m1").last_screenshot_id == free.id
    s.add_artifact(attempt_id=b.attempt.id, machine_id="m1", name="log.txt", content_type="text/plain",
                   data=b"log", now=T0 + 11)
    assert [x.name for x in s.list_artifacts(a.run.id)] == ["log.txt"]
    assert s.get_machine("m1").last_screenshot_id == free.id  # only screenshots count
    s.set_machine_screenshot("m1", "art_x")
    assert s.get_machine("m1").last_screenshot_id == "art_x"
    assert s.get_artifact("art_nope") is None


# -- invariant 1, in the schema itself -------------------------------------------------------------

INSERT_ATTEMPT = text(
    "INSERT INTO attempts (run_id, machine_id, number, state, phase, mode, assigned_at, lease_expires_at) "
    "VALUES (:run_id, :machine_id, 9, :state, 'assigned', 'run', :now, :now)"
)


def raw_insert(store: SQLStore, run_id: str, machine_id: str, state: str = "active") -> None:
    with store.engine.begin() as conn:
        conn.execute(INSERT_ATTEMPT, {"run_id": run_id, "machine_id": machine_id, "state": state, "now": T0})


def test_database_refuses_a_second_active_attempt_on_a_machine(s):
    add_machine(s, "m1")
    claim(s, machine="m1")
    other = submit(s, T0 + 1)
    with pytest.raises(IntegrityError):
        raw_insert(s, other.id, "m1")
    raw_insert(s, other.id, "m1", state="failed")  # ended attempts are not constrained
    with s.engine.connect() as c:
        active = c.execute(text("SELECT count(*) FROM attempts WHERE machine_id='m1' AND state='active'"))
        assert active.scalar() == 1


def test_database_refuses_a_second_active_attempt_of_a_run(s):
    add_machine(s, "m1")
    add_machine(s, "m2")
    a = claim(s, machine="m1")
    with pytest.raises(IntegrityError):
        raw_insert(s, a.run.id, "m2")
    raw_insert(s, a.run.id, "m2", state="lost")
    # Once the first attempt ends, a new active one is accepted.
    s.finish_attempt(a.attempt.id, "m1", Ending.BUSINESS_ERROR, output=None, detail="", now=T0 + 1)
    raw_insert(s, a.run.id, "m2")


def conn_rows(store: SQLStore, sql: str) -> list[Any]:
    with store.engine.connect() as conn:
        return list(conn.execute(text(sql)))


def test_migrations_build_the_declared_schema(s):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with s.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, metadata)
    assert diff == []
    # Autogenerate skips indexes on expressions: the pass-order ones are checked by name.
    if s.engine.dialect.name == "sqlite":
        names = {r[0] for r in conn_rows(s, "SELECT name FROM sqlite_master WHERE type = 'index'")}
    else:
        names = {r[0] for r in conn_rows(s, "SELECT indexname FROM pg_indexes WHERE tablename = 'runs'")}
    assert {"ix_runs_due", "ix_runs_due_automation"} <= names and "ix_runs_queue" not in names
    # Autogenerate compares index names, columns and uniqueness but not a partial index's
    # WHERE clause: check that invariant 1's indexes are unique over active rows only.
    found = {ix["name"]: ix for ix in inspect(s.engine).get_indexes("attempts")}
    dialect = s.engine.dialect.name
    for name, column in (("uq_attempts_active_machine", "machine_id"), ("uq_attempts_active_run", "run_id")):
        ix = found[name]
        assert ix["unique"] and ix["column_names"] == [column]
        where = str(ix["dialect_options"][f"{dialect}_where"])
        assert "state" in where and "active" in where, where


# -- concurrency -----------------------------------------------------------------------------------

def test_concurrent_schedulers_never_double_book(backend, backend_store):
    """8 threads x 100 operations, each with its own store (own engine) on the same database, submit runs
    pinned to one machine, schedule and end attempts as fast as they can."""
    s = backend_store
    add_machine(s, "m1")
    add_machine(s, "m2")  # free, but no run may go there
    clock = itertools.count(1)
    clock_lock = threading.Lock()

    def now() -> float:
        with clock_lock:
            return T0 + next(clock) * 0.001

    errors: list[BaseException] = []
    stale = Counter[str]()

    def worker(n: int) -> None:
        store = backend.open()
        try:
            for i in range(100):
                op = (n + i) % 3
                if op == 0:
                    store.submit(RunSpec("ehr.create", machine="m1"), request_hash="h", now=now())
                elif op == 1:
                    for a in store.schedule(POLICY, now(), LEASE):
                        assert a.attempt.machine_id == "m1"
                else:
                    m = store.get_machine("m1")
                    if m.active_attempt_id is None:
                        continue
                    ending = Ending.SYSTEM_ERROR if i % 2 else Ending.BUSINESS_ERROR
                    try:
                        store.finish_attempt(m.active_attempt_id, "m1", ending, output=None, detail="", now=now())
                    except StaleLease:
                        stale["finish"] += 1  # another thread ended it first: the fence held
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors

    with s.engine.connect() as c:
        rows = c.execute(select(attempts).order_by(attempts.c.id)).mappings().all()
        evs = c.execute(select(events).where(events.c.attempt_id.is_not(None)).order_by(events.c.id)).mappings().all()
    assert rows, "no attempt was ever made"
    assert all(r["machine_id"] == "m1" for r in rows)
    assert sum(r["state"] == "active" for r in rows) <= 1
    # Each attempt's life in commit order: from its "assigned" event to its "attempt.ended"
    # event. (The fake clock is read before each transaction waits for the write lock, so
    # commit order, not the timestamps, is the true timeline.)
    start = {e["attempt_id"]: e["id"] for e in evs if e["kind"] == "run.state" and e["to_state"] == "assigned"}
    end = {e["attempt_id"]: e["id"] for e in evs if e["kind"] == "attempt.ended"}
    lives = sorted((start[r["id"]], end.get(r["id"], float("inf")), r["id"]) for r in rows)
    for (_, e1, id1), (s2, _, id2) in itertools.pairwise(lives):
        assert e1 < s2, f"attempts {id1} and {id2} held m1 at the same time"
        assert id1 < id2, "fencing tokens must grow in the order leases are granted"
    # The same, by the recorded times: ended no later than the next one was assigned.
    by_id = sorted(rows, key=lambda r: r["id"])
    assert all(r["ended_at"] is not None for r in by_id[:-1])
    assert len(rows) > 20, f"too little contention to mean anything ({len(rows)} attempts)"


# -- stateful: all the invariants at once ----------------------------------------------------------

MACHINES = ("m1", "m2", "m3")
SM_LEASE = 10.0
SM_GRACE = 3.0
HB_TIMEOUT = 12.0
#: What a well-behaved agent may report in each phase (it says "preparing" before anything).
AGENT_ENDINGS = {
    AttemptPhase.PREPARING: [Ending.PREFLIGHT_FAILED, Ending.SYSTEM_ERROR, Ending.BUSINESS_ERROR,
                             Ending.RECONCILED, Ending.STOPPED],
    AttemptPhase.RUNNING: [Ending.SUCCEEDED, Ending.SUCCEEDED, Ending.SYSTEM_ERROR,
                           Ending.BUSINESS_ERROR, Ending.STOPPED],
}
run_specs = st.builds(
    lambda automation, pin, prefer, priority, deadline, queue_timeout, attempt_timeout,
    progress_timeout, max_attempts, key, webhook: RunSpec(
        automation, machine=pin, prefer_machine=prefer, priority=priority, deadline=deadline,
        queue_timeout=queue_timeout, attempt_timeout=attempt_timeout, progress_timeout=progress_timeout,
        max_attempts=max_attempts, idempotency_key=key, backoff_initial=0.5, backoff_max=2.0,
        webhook_url="http://hook" if webhook else None,
    ),
    automation=st.sampled_from([x.name for x in SPECS]),
    pin=st.sampled_from([None, None, None, *MACHINES]),
    prefer=st.sampled_from([None, None, *MACHINES]),
    priority=st.integers(0, 2),
    deadline=st.sampled_from([None, None, 15.0, 60.0]),
    queue_timeout=st.sampled_from([8.0, 3600.0, 3600.0]),
    attempt_timeout=st.sampled_from([12.0, 900.0]),
    progress_timeout=st.sampled_from([6.0, 300.0]),
    max_attempts=st.integers(1, 3),
    key=st.sampled_from([None, None, None, "k1", "k2"]),
    webhook=st.booleans(),
)


class StoreStateMachine(RuleBasedStateMachine):
    """Random clients, agents and fleet loops against one real store, on a fake clock.

    The rules act as the engine does: after any change that may free a machine or queue a
    run, the scheduler runs. Agents are picked among the machines that hold an attempt, so
    most steps move some attempt along.
    """

    open_store: Callable[[], SQLStore]

    def __init__(self) -> None:
        super().__init__()
        self.store = type(self).open_store()
        self.now = T0
        for m in MACHINES:
            add_machine(self.store, m, self.now)
        self.run_ids: list[str] = []
        self.keys: dict[str, tuple[str, str]] = {}  # idempotency key → (run id, request hash)
        self.final: dict[str, tuple[Any, ...]] = {}  # run id → its row when it became final
        self.ended: dict[int, tuple[Any, ...]] = {}  # attempt id → its row when it ended
        self.ended_on: dict[int, str] = {}  # attempt id → machine
        self.reported: dict[int, Ending] = {}  # attempt id → what its agent reported
        self.max_token: dict[str, int] = {}

    def teardown(self) -> None:
        self.store.close()

    def tick(self, dt: float = 0.25) -> float:
        self.now += dt
        return self.now

    def busy(self, i: int):
        """The i-th (modulo) active attempt, or None when every machine is idle."""
        with self.store.engine.connect() as c:
            ids = [r[0] for r in c.execution_options(deskfleet_write=False).execute(
                text("SELECT id FROM attempts WHERE state = 'active' ORDER BY machine_id"))]
        return self.store.get_attempt(ids[i % len(ids)]) if ids else None

    def stale_events(self) -> int:
        with self.store.engine.connect() as c:
            return int(c.execution_options(deskfleet_write=False).execute(
                text("SELECT count(*) FROM events WHERE kind = 'lease.stale_write_rejected'")).scalar())

    def do_schedule(self) -> None:
        for a in self.store.schedule(POLICY, self.tick(), SM_LEASE):
            mid = a.attempt.machine_id
            assert a.attempt.id > self.max_token.get(mid, 0), "fencing token did not grow"
            self.max_token[mid] = a.attempt.id
            assert a.run.state is RunState.ASSIGNED and a.run.current_attempt_id == a.attempt.id

    # -- clients ---------------------------------------------------------------------------------
    @initialize(specs=st.lists(run_specs, min_size=1, max_size=4))
    def first_runs(self, specs):
        for spec in specs:
            self.submit(spec)

    @rule(spec=run_specs)
    def submit(self, spec):
        request_hash = f"{spec.automation}/{spec.machine}"
        key = spec.idempotency_key
        if key is not None and key in self.keys and self.keys[key][1] != request_hash:
            before = table_digest(self.store)
            with pytest.raises(Conflict):
                self.store.submit(spec, request_hash=request_hash, now=self.tick())
            assert table_digest(self.store) == before  # nothing written
            return
        run, created = self.store.submit(spec, request_hash=request_hash, now=self.tick())
        if key is not None and key in self.keys:
            assert not created and run.id == self.keys[key][0]
            return
        assert created and run.state is RunState.QUEUED
        self.run_ids.append(run.id)
        if key is not None:
            self.keys[key] = (run.id, request_hash)
        self.do_schedule()

    @rule(i=st.integers(0, 50))
    def cancel(self, i):
        if not self.run_ids:
            return
        run_id = self.run_ids[i % len(self.run_ids)]
        before = self.store.get_run(run_id)
        if before.state.final:
            with pytest.raises(Conflict):
                self.store.request_cancel(run_id, self.tick())
            return
        run, order = self.store.request_cancel(run_id, self.tick())
        if before.state is RunState.QUEUED:
            assert run.state is RunState.CANCELLED and order is None
        else:
            assert run.state is before.state and run.cancel_requested_at is not None
            assert order is not None and order.attempt_id == before.current_attempt_id

    # -- the scheduler and the fleet loops -----------------------------------------------------------
    @rule()
    def schedule(self):
        self.do_schedule()

    @rule(dt=st.sampled_from([1.0, 4.0, 2 * SM_LEASE]), dead=st.sets(st.sampled_from(MACHINES), max_size=2))
    def time_passes_and_leases_expire(self, dt, dead):
        """Time passes; live agents keep heartbeating, the ``dead`` ones fall silent."""
        end = self.now + dt
        while self.now < end:
            now = self.tick(min(SM_LEASE / 2, end - self.now))
            beats = [Heartbeat(m.id, now, attempt_id=m.active_attempt_id)
                     for m in self.store.list_machines() if m.id not in dead]
            held = self.store.heartbeat(beats, SM_LEASE)
            assert all(held.values()), held
            for f in self.store.expire_leases(now):
                assert f.attempt.machine_id in dead
                assert f.attempt.state is AttemptState.LOST and f.machine_quarantined
                assert self.store.get_machine(f.attempt.machine_id).health is MachineHealth.QUARANTINED
        self.do_schedule()

    @rule()
    def sweep(self):
        res = self.store.sweep(self.tick(), SM_GRACE)
        for order in res.stop_orders:
            att = self.store.get_attempt(order.attempt_id)
            assert att.state is AttemptState.ACTIVE and att.stop_reason is order.reason
        for f in res.finished:
            assert f.attempt.ending is Ending.STOP_FORCED and f.machine_quarantined
        for run in res.expired_runs:
            assert run.state is RunState.TIMED_OUT
        self.do_schedule()

    @rule()
    def silent_machines(self):
        for mid in self.store.expire_silent_machines(self.tick(), HB_TIMEOUT):
            assert self.store.get_machine(mid).health is MachineHealth.QUARANTINED

    @rule(grace=st.sampled_from([1.0, 20.0]), forgetful=st.sets(st.sampled_from(MACHINES)),
          dice=st.integers(0, 3))
    def orchestrator_restarts(self, grace, forgetful, dice):
        """Recover, then every agent reconnects; the ``forgetful`` ones lost their attempt.
        (One time in four: hypothesis otherwise picks this rule far more than the others.)"""
        if dice:
            return
        now = self.tick()
        n = self.store.recover(now, grace)
        with self.store.engine.connect() as c:
            leases = [r[0] for r in c.execute(text("SELECT lease_expires_at FROM attempts WHERE state='active'"))]
        assert n == len(leases) and all(x >= now + grace for x in leases)
        assert not any(m.connected for m in self.store.list_machines())
        for mid in MACHINES:
            self.agent_reconnects(mid, "none" if mid in forgetful else "own")

    # -- agents ----------------------------------------------------------------------------------------
    @rule(i=st.integers(0, 5))
    def agent_heartbeat(self, i):
        a = self.busy(i)
        if a is None:
            return
        now = self.tick()
        got = self.store.heartbeat([Heartbeat(a.machine_id, now, attempt_id=a.id)], SM_LEASE)
        assert got == {a.machine_id: True}
        assert self.store.get_attempt(a.id).lease_expires_at == now + SM_LEASE

    @rule(i=st.integers(0, 100))
    def agent_heartbeats_with_an_old_token(self, i):
        """An agent that still believes it holds an attempt that ended: not renewed."""
        if not self.ended:
            return
        aid = sorted(self.ended)[i % len(self.ended)]
        mid = self.ended_on[aid]
        assert self.store.heartbeat([Heartbeat(mid, self.tick(), attempt_id=aid)], SM_LEASE) == {mid: False}

    @rule(i=st.integers(0, 5), step=st.sampled_from(["next", "next", "progress", "event"]))
    def agent_works(self, i, step):
        """The agent moves its attempt along: preparing → running, reporting progress."""
        a = self.busy(i)
        if a is None:
            return
        if step == "progress":
            self.store.attempt_progress(a.id, a.machine_id, "typing", {}, self.tick())
        elif step == "event":
            self.store.attempt_event(a.id, a.machine_id, "playbook.step", {"playbook": "login"}, self.tick())
        elif a.phase is AttemptPhase.ASSIGNED:
            assert self.store.attempt_preparing(a.id, a.machine_id, self.tick()).phase is AttemptPhase.PREPARING
        elif a.phase is AttemptPhase.PREPARING:
            try:
                got = self.store.attempt_start(a.id, a.machine_id, self.tick())
            except Stopped:
                assert a.stop_requested_at is not None
            else:
                assert got.phase is AttemptPhase.RUNNING and a.stop_requested_at is None

    @rule(i=st.integers(0, 5), pick=st.integers(0, 10), start=st.booleans())
    def agent_finishes(self, i, pick, start):
        """The agent ends its attempt, possibly after quickly going through its phases."""
        a = self.busy(i)
        if a is None:
            return
        mid = a.machine_id
        if a.phase is AttemptPhase.ASSIGNED:  # a real agent says "preparing" first
            self.store.attempt_preparing(a.id, mid, self.tick())
        if start and a.stop_requested_at is None and a.phase is not AttemptPhase.RUNNING:
            self.store.attempt_start(a.id, mid, self.tick())
        a = self.store.get_attempt(a.id)
        options = [e for e in AGENT_ENDINGS[a.phase]
                   if (e is not Ending.STOPPED or a.stop_requested_at is not None)
                   and (e is not Ending.RECONCILED or a.mode is AttemptMode.RECONCILE)]
        ending = options[pick % len(options)]
        output = {"by": a.id} if ending in (Ending.SUCCEEDED, Ending.RECONCILED) else None
        f = self.store.finish_attempt(a.id, mid, ending, output=output, detail="", now=self.tick())
        assert f.attempt.id == a.id and f.attempt.state is not AttemptState.ACTIVE
        if ending in (Ending.SUCCEEDED, Ending.RECONCILED):
            assert f.run.state is RunState.SUCCEEDED and f.run.output == output
        self.reported[a.id] = ending
        self.do_schedule()

    @rule(i=st.integers(0, 100), op=st.sampled_from(sorted(FENCED_WRITES)))
    def agent_writes_with_an_old_token(self, i, op):
        if not self.ended:
            return
        aid = sorted(self.ended)[i % len(self.ended)]
        if op == "finish:system_error" and self.reported.get(aid) is Ending.SYSTEM_ERROR:
            return  # that is a repeat, not a stale write (see agent_repeats_its_report)
        before, n = table_digest(self.store), self.stale_events()
        with pytest.raises(StaleLease):
            FENCED_WRITES[op](self.store, aid, self.ended_on[aid], self.tick())
        assert table_digest(self.store) == before
        assert self.stale_events() == n + 1

    @rule(i=st.integers(0, 5), shift=st.integers(1, 2), op=st.sampled_from(sorted(FENCED_WRITES)))
    def agent_writes_with_another_machines_token(self, i, shift, op):
        a = self.busy(i)
        if a is None:
            return
        other = MACHINES[(MACHINES.index(a.machine_id) + shift) % len(MACHINES)]
        before, n = table_digest(self.store), self.stale_events()
        with pytest.raises(StaleLease):
            FENCED_WRITES[op](self.store, a.id, other, self.tick())
        assert table_digest(self.store) == before
        assert self.stale_events() == n + 1

    @rule(i=st.integers(0, 100))
    def agent_repeats_its_report(self, i):
        if not self.reported:
            return
        aid = sorted(self.reported)[i % len(self.reported)]
        before = table_digest(self.store)
        f = self.store.finish_attempt(aid, self.ended_on[aid], self.reported[aid], output=None,
                                      detail="", now=self.tick())
        assert f.attempt.id == aid and f.attempt.ending is self.reported[aid]
        assert table_digest(self.store) == before

    @rule(mid=st.sampled_from(MACHINES), report=st.sampled_from(["own", "none", "old"]))
    def agent_reconnects(self, mid, report):
        m = self.store.get_machine(mid)
        a = None if m.active_attempt_id is None else self.store.get_attempt(m.active_attempt_id)
        old = [x for x, on in self.ended_on.items() if on == mid]
        reported = {"own": a.id if a else None, "none": None, "old": max(old, default=None)}[report]
        res = connect(self.store, mid, self.tick(), attempt_id=reported, lease=SM_LEASE)
        if a is None:
            assert res.resume is None and res.resend is None and res.ended_run is None
            assert res.stale_attempt_id == reported
        elif reported == a.id:
            assert res.resume is not None and res.resume.id == a.id
        elif reported is None and a.phase is AttemptPhase.ASSIGNED:
            assert res.resend is not None and res.resend.attempt.id == a.id
        else:
            assert res.ended_run is not None and res.ended_run.id == a.run_id
            assert self.store.get_attempt(a.id).state is AttemptState.LOST
            assert res.stale_attempt_id == reported
            assert res.machine.health is MachineHealth.QUARANTINED
        self.do_schedule()

    @rule(mid=st.sampled_from(MACHINES))
    def machine_re_proves_its_state(self, mid):
        if self.store.get_machine(mid).health is MachineHealth.QUARANTINED:
            self.store.release_quarantine(mid, {"state": "home"}, self.tick())
            self.do_schedule()

    # -- invariants, after every step --------------------------------------------------------------
    @invariant()
    def store_invariants(self):
        with self.store.engine.connect() as c:
            c = c.execution_options(deskfleet_write=False)
            run_rows = {r["id"]: r for r in c.execute(select(runs)).mappings()}
            att_rows = c.execute(select(attempts).order_by(attempts.c.id)).mappings().all()
            final_events = Counter(r[0] for r in c.execute(
                select(events.c.run_id).where(events.c.kind == "run.state", events.c.to_state.in_(FINAL))
            ))
            hooks = Counter(r[0] for r in c.execute(text("SELECT run_id FROM webhooks")))
        active = {r["run_id"]: r for r in att_rows if r["state"] == "active"}
        # Invariant 1: at most one active attempt per machine, and per run.
        by_machine = Counter(r["machine_id"] for r in att_rows if r["state"] == "active")
        by_run = Counter(r["run_id"] for r in att_rows if r["state"] == "active")
        assert max(by_machine.values(), default=0) <= 1, by_machine
        assert max(by_run.values(), default=0) <= 1, by_run
        for rid, r in run_rows.items():
            state = RunState(r["state"])
            # An active run has exactly its one active attempt; queued and final runs none.
            if state.active:
                assert rid in active, f"{state} run {rid} without an active attempt"
                att = active[rid]
                assert (r["current_attempt_id"], r["current_machine_id"]) == (att["id"], att["machine_id"])
                assert att["phase"] == state.value  # run state and attempt phase in step
            else:
                assert rid not in active, f"{state} run {rid} holds a machine"
            # Invariant 2: a final run never changes again, and became final exactly once
            # (with exactly one webhook in the outbox if it asked for one).
            if state.final:
                row = tuple(r.values())
                assert self.final.setdefault(rid, row) == row, f"final run {rid} changed"
                assert final_events[rid] == 1, f"run {rid} has {final_events[rid]} final events"
                assert hooks[rid] == (1 if r["webhook_url"] else 0)
            else:
                assert rid not in self.final, f"run {rid} left its final state"
                assert final_events[rid] == 0 and hooks[rid] == 0
        # Fencing tokens grow per machine, and one machine's leases never overlap in time.
        for mid in MACHINES:
            mine = [r for r in att_rows if r["machine_id"] == mid]
            for prev, nxt in itertools.pairwise(mine):
                assert prev["ended_at"] is not None and prev["ended_at"] <= nxt["assigned_at"]
        # An ended attempt stays ended, exactly as it ended (stale writes change nothing).
        for r in att_rows:
            if r["state"] != "active":
                row = tuple(r.values())
                assert self.ended.setdefault(r["id"], row) == row, f"ended attempt {r['id']} changed"
                self.ended_on[r["id"]] = r["machine_id"]
        assert set(self.ended) == {r["id"] for r in att_rows if r["state"] != "active"}


# Hypothesis stops shrinking a failure after 5 minutes; let it report what it has by then.
@pytest.mark.timeout(480)
def test_store_state_machine(backend):
    class Machine(StoreStateMachine):
        open_store = staticmethod(backend.fresh)

    run_state_machine_as_test(Machine, settings=settings(
        max_examples=40, stateful_step_count=50, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    ))


# -- replicas (several orchestrators on one database) ------------------------------------------

def test_a_replica_schedules_only_onto_machines_connected_to_it(s):
    add_machine(s, "m1")
    add_machine(s, "m2")
    s.connect_machine("m1", boot_id="b", agent_version="1", automations=SPECS, labels=None,
                      heartbeat=Heartbeat("m1", T0), lease_timeout=LEASE, now=T0, replica="A")
    s.connect_machine("m2", boot_id="b", agent_version="1", automations=SPECS, labels=None,
                      heartbeat=Heartbeat("m2", T0), lease_timeout=LEASE, now=T0, replica="B")
    for _ in range(3):
        submit(s, T0)
    got_a = s.schedule(POLICY, T0 + 1, LEASE, replica="A")
    got_b = s.schedule(POLICY, T0 + 1, LEASE, replica="B")
    assert [a.attempt.machine_id for a in got_a] == ["m1"]
    assert [a.attempt.machine_id for a in got_b] == ["m2"]
    assert s.schedule(POLICY, T0 + 1, LEASE, replica="C") == []


def test_a_late_disconnect_from_the_old_replica_leaves_the_new_connection_alone(s):
    add_machine(s, "m1")
    for replica in ("A", "B"):  # the agent moved from A to B
        s.connect_machine("m1", boot_id="b", agent_version="1", automations=SPECS, labels=None,
                          heartbeat=Heartbeat("m1", T0), lease_timeout=LEASE, now=T0, replica=replica)
    s.disconnect_machine("m1", T0 + 1, replica="A")
    m = s.get_machine("m1")
    assert (m.connected, m.replica) == (True, "B")
    s.disconnect_machine("m1", T0 + 2, replica="B")
    m = s.get_machine("m1")
    assert (m.connected, m.replica) == (False, None)


def test_the_leader_reaps_a_dead_replica_and_its_connections(s):
    add_machine(s, "m1")
    s.replica_alive("A", "host:1", T0)
    s.replica_alive("B", "host:2", T0)
    s.connect_machine("m1", boot_id="b", agent_version="1", automations=SPECS, labels=None,
                      heartbeat=Heartbeat("m1", T0), lease_timeout=LEASE, now=T0, replica="A")
    s.replica_alive("B", "host:2", T0 + 20)
    assert s.reap_replicas(T0 + 20, 10.0) == ["A"]
    assert s.get_machine("m1").connected is False
    assert s.reap_replicas(T0 + 21, 10.0) == []
    assert any(e.kind == "replica.lost" for e in s.events())


def test_forgiving_an_outage_extends_leases_and_progress_but_keeps_connections(s):
    add_machine(s, "m1")
    submit(s, T0)
    (a,) = s.schedule(POLICY, T0, LEASE)
    s.attempt_preparing(a.attempt.id, "m1", T0)
    s.recover(T0 + 100, 15.0, disconnect=False)
    att = s.get_attempt(a.attempt.id)
    assert att.lease_expires_at == T0 + 115
    assert att.last_progress_at == T0 + 100
    assert s.get_machine("m1").connected is True
    assert s.expire_leases(T0 + 114) == []


# -- PostgreSQL connections after a server restart -------------------------------------------------

def _drop_connections(backend) -> None:
    """What a server restart does to the pool: every connection of the test's database ends."""
    from sqlalchemy.engine import make_url

    with backend.server._admin() as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> "
                      "pg_backend_pid()", (make_url(backend.url).database,))


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_an_idle_pooled_connection_is_pinged_and_replaced_a_busy_one_fails_once(backend, monkeypatch):
    from deskfleet.errors import StoreUnavailable
    from deskfleet.store import postgres

    store = backend.open(migrate=True)
    store.put_pool(Pool("a"), T0)
    # Idle (longer than PING_IDLE): pinged at checkout, found dead, replaced; nothing fails.
    monkeypatch.setattr(postgres, "PING_IDLE", 0.0)
    _drop_connections(backend)
    store.put_pool(Pool("b"), T0)
    # In steady use: not pinged, so the first statement finds the connection dead and fails
    # as an outage (the operation in flight would have); the pool is discarded, and the
    # next operation runs on a new connection.
    monkeypatch.setattr(postgres, "PING_IDLE", 3600.0)
    _drop_connections(backend)
    with pytest.raises(StoreUnavailable):
        store.put_pool(Pool("c"), T0)
    store.put_pool(Pool("c"), T0)
    assert {p.name for p in store.list_pools()} >= {"a", "b", "c"}


# -- writes that wait for the transaction's next round trip (store.driver) -------------------------

def _waiting(conn) -> int:
    from deskfleet.store.driver import WAITING

    return len(conn.info.get(WAITING) or [])


def test_a_write_that_waits_is_seen_by_every_read_after_it(s):
    """On PostgreSQL an update waits to go with the transaction's next round trip; any read
    after it — the driver's own, or a statement SQLAlchemy runs — sends it first and sees it."""
    from deskfleet.store.driver import Raw

    add_machine(s, "m1")
    pg = s.engine.dialect.name == "postgresql"
    with s._tx() as conn:
        s._drv.update(conn, machines, {"runs_completed": Raw("runs_completed + 5")}, {"id": "m1"})
        assert _waiting(conn) == (1 if pg else 0)
        assert conn.execute(text("SELECT runs_completed FROM machines WHERE id = 'm1'")).scalar() == 5
        assert _waiting(conn) == 0
        s._drv.update(conn, machines, {"runs_completed": Raw("runs_completed + 1")}, {"id": "m1"})
        s._drv.update(conn, machines, {"runs_completed": Raw("runs_completed * 2")}, {"id": "m1"})
        assert _waiting(conn) == (2 if pg else 0)
        row = s._drv.one(conn, text("SELECT id, runs_completed FROM machines WHERE id = :id"), {"id": "m1"},
                         machines)
        assert row is not None and row["runs_completed"] == 12  # in the order they were written
    assert s.get_machine("m1").runs_completed == 12


def test_a_write_that_changed_other_rows_than_expected_fails_its_whole_transaction(s):
    from deskfleet.store.driver import Raw, RowCountMismatch

    add_machine(s, "m1")
    with pytest.raises(RowCountMismatch, match="0 rows changed, expected 1"), s._tx() as conn:
        s._drv.update(conn, machines, {"runs_completed": Raw("runs_completed + 1")}, {"id": "m1"},
                      expect=1)
        s._drv.update(conn, machines, {"runs_completed": 7}, {"id": "nobody"}, expect=1)
    assert s.get_machine("m1").runs_completed == 0  # the first write rolled back with it
    # A run moved from a state it is no longer in: the transition's write is refused.
    run = submit(s)
    before = s.events(run_id=run.id)
    with pytest.raises(RowCountMismatch), s._tx() as conn:
        s._set_run_state(conn, replace(run, state=RunState.ASSIGNED), RunState.PREPARING, T0, reason="test")
    assert s.get_run(run.id).state is RunState.QUEUED
    assert s.events(run_id=run.id) == before  # nor its event


def test_writes_of_a_rolled_back_transaction_are_never_sent_later(s):
    from deskfleet.store.driver import Raw

    add_machine(s, "m1")
    with pytest.raises(RuntimeError), s._tx() as conn:
        s._drv.update(conn, machines, {"runs_completed": Raw("runs_completed + 100")}, {"id": "m1"})
        raise RuntimeError("the operation failed after its write")
    for _ in range(3):  # the pooled connection is used again, by the driver and by SQLAlchemy
        with s._tx() as conn:
            s._drv.update(conn, machines, {"runs_completed": Raw("runs_completed + 1")}, {"id": "m1"})
        assert s.get_machine("m1").runs_completed in (1, 2, 3)
    assert s.get_machine("m1").runs_completed == 3


def test_a_write_refused_when_it_is_sent_fails_as_the_store_fails_it(s):
    """A constraint that refuses a waiting write raises when the write is sent (at the latest,
    before COMMIT), as SQLAlchemy's own error: nothing of the transaction is kept."""
    add_machine(s, "m1")
    with pytest.raises(IntegrityError), s._tx() as conn:
        s._drv.update(conn, machines, {"idle_since": T0 + 9}, {"id": "m1"})
        s._drv.insert_many(conn, machines, [{"id": "m1", "pool": "default"}])  # a duplicate key
    assert s.get_machine("m1").idle_since != T0 + 9


def test_a_pass_inserts_its_claims_together_and_the_store_refuses_one_that_would_double_book(s):
    """The pass's claims without an account insert their attempts in one go; a claim the
    one-active-attempt constraint refuses is left out (None) and the others stand."""
    add_machine(s, "m1")
    add_machine(s, "m2")
    first = claim(s)  # m1 now holds an attempt
    assert first.attempt.machine_id == "m1"
    r2, r3 = submit(s, T0 + 1), submit(s, T0 + 2)
    m1, m2 = s.get_machine("m1"), s.get_machine("m2")
    with s._tx() as conn:
        out = s._claim_all(conn, [(r2, m1, None), (r3, m2, None)], T0 + 3, LEASE)
    assert out[0] is None
    assert out[1] is not None and (out[1][0].id, out[1][1].machine_id) == (r3.id, "m2")
    assert s.get_run(r2.id).state is RunState.QUEUED
    run3 = s.get_run(r3.id)
    assert (run3.state, run3.current_attempt_id, run3.dispatches) == (RunState.ASSIGNED, out[1][1].id, 1)
    assert [a.id for a in s.list_attempts(r3.id)] == [out[1][1].id]


def test_the_planner_statistics_follow_a_backlog_submitted_at_once(s):
    """PostgreSQL: a backlog submitted in seconds leaves the statistics describing an empty
    queue, and the scheduler's read of it sorts every queued run; the leader's refresh
    analyses the tables that changed, after which the read walks ix_runs_due in order.
    SQLite names its indexes and has nothing to refresh."""
    from deskfleet.store.statements import for_dialect

    if s.engine.dialect.name != "postgresql":
        assert s.refresh_statistics() == []
        return
    s.refresh_statistics()
    s.put_pool(Pool("default"), T0)
    submitted = s.submit_many([(RunSpec("ehr.create"), None) for _ in range(3000)], now=T0)
    assert all(isinstance(r, tuple) for r in submitted), submitted[:1]
    sql = for_dialect("postgresql")

    def plan() -> str:
        with s.engine.connect() as conn:
            return " ".join(r[0] for r in conn.execute(text("EXPLAIN " + sql.QUEUED.text), {"now": T0, "limit": 16}))

    # A backend reports its writes to the statistics collector within a second or so.
    deadline = time.monotonic() + 15
    while (analysed := s.refresh_statistics()) == [] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert analysed == ["runs"], f"not analysed in {time.monotonic() - deadline + 15:.1f} s"
    assert "ix_runs_due" in plan() and "Sort" not in plan()
    assert s.refresh_statistics() == []  # nothing changed since


def test_a_transactions_events_are_written_together_in_the_order_recorded(s):
    """On PostgreSQL a transaction's events go in one statement from arrays: every field,
    None and JSON alike, arrives as recorded, and ids follow the order of recording."""
    add_machine(s, "m1")
    before = len(s.events())
    recorded = [
        dict(kind="test.first", run_id=None, attempt_id=7, machine_id="m1", from_state=None, to_state="x",
             reason=None, data={"quote": "it's \"q\"", "n": [1, 2]}),
        dict(kind="test.second", run_id="run-x", attempt_id=None, machine_id=None, from_state="a", to_state=None,
             reason="why", data=None),
        dict(kind="test.third", run_id=None, attempt_id=None, machine_id=None, from_state=None, to_state=None,
             reason=None, data={}),
    ]
    with s._tx() as conn:
        for i, e in enumerate(recorded):
            s._event(conn, e["kind"], T0 + i, run_id=e["run_id"], attempt_id=e["attempt_id"],
                     machine_id=e["machine_id"], from_state=e["from_state"], to_state=e["to_state"],
                     reason=e["reason"], data=e["data"])
    got = s.events()[before:]
    assert [(e.kind, e.at, e.run_id, e.attempt_id, e.machine_id, e.from_state, e.to_state, e.reason, e.data)
            for e in got] == [(e["kind"], T0 + i, e["run_id"], e["attempt_id"], e["machine_id"], e["from_state"],
                               e["to_state"], e["reason"], e["data"] or {}) for i, e in enumerate(recorded)]
    assert [e.id for e in got] == sorted(e.id for e in got)
