"""The demo's fault stories: which faults count as recovered, from synthetic event logs."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from deskfleet.audit import Interval
from deskfleet.demo.faults import stories, summary
from deskfleet.demo.state import Moment

T0 = 1_800_000_000.0


def event(n: int, at: float, kind: str, machine: str, **data: Any) -> dict[str, Any]:
    when = datetime.fromtimestamp(T0 + at, UTC).isoformat()
    return {"id": n, "at": when, "kind": kind, "machine": machine, "attempt": None, "data": data}


def killed(machine: str, events: list[dict[str, Any]], intervals: list[Interval] | None = None) -> bool:
    moment = Moment(T0 + 10, "SIGKILLed agent process", "agent_killed", [machine])
    [story] = stories([], [moment], [], events, intervals or [])
    return story.recovered


def test_a_killed_machine_that_reconnects_and_reproves_its_state_is_recovered():
    events = [event(1, 5, "machine.quarantined", "m1"),  # an earlier fault's quarantine
              event(2, 16, "machine.connected", "m1", rebooted=True),
              event(3, 17, "machine.verified", "m1")]
    assert killed("m1", events)


def test_a_later_quarantine_is_another_faults_not_this_ones():
    events = [event(1, 16, "machine.connected", "m1", rebooted=True),
              event(2, 17, "machine.verified", "m1"),
              event(3, 40, "machine.quarantined", "m1")]  # a freeze, much later, still recovering
    assert killed("m1", events)


def test_a_machine_that_serves_runs_again_without_a_quarantine_is_recovered():
    events = [event(1, 16, "machine.connected", "m1", rebooted=True)]
    served = [Interval(7, "run_a", "m1", T0 + 18, 10, T0 + 19, 11, "succeeded")]
    assert killed("m1", events, served)


def test_a_machine_that_never_came_back_or_never_reproved_itself_is_not_recovered():
    assert not killed("m1", [])
    assert not killed("m1", [event(1, 16, "machine.connected", "m1", rebooted=True),
                             event(2, 17, "machine.quarantined", "m1")])
    # a reconnect without a reboot is the old agent, not the restarted desktop
    assert not killed("m1", [event(1, 16, "machine.connected", "m1", rebooted=False),
                             event(2, 17, "machine.verified", "m1")])


def test_mfa_prompts_are_told_where_they_were_answered_and_recovered_once_home():
    events = [event(1, 1, "verify.playbook.step", "m1", playbook="mfa", from_state="mfa", to_state="home"),
              event(2, 5, "playbook.step", "m2", playbook="login", from_state="login", to_state="mfa"),
              event(3, 6, "playbook.step", "m2", playbook="mfa", from_state="mfa", to_state="mfa"),
              event(4, 9, "playbook.step", "m2", playbook="mfa", from_state="mfa", to_state="error_dialog")]
    found = stories([], [], [], events, [])
    assert [(s.machine, s.step, s.recovered) for s in found] == [
        ("m1", "verify", True), ("m2", "pre-flight", False), ("m2", "pre-flight", False)]
    assert summary(found) == {"mfa": {"met": 3, "recovered": 1}}
