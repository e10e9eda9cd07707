"""An invariant checker that reads the event log and reports every violation.

It works from the API's JSON (``GET /v1/runs``, ``GET /v1/events``), so it can audit a
fleet from outside — the demo's report, the fault tests and the benchmarks all use it:

- every acknowledged run reaches exactly one final state, and nothing happens to it after;
- every run's transitions follow the run state machine, one after another;
- no machine ever had two attempts active at once (from assignment to end);
- every attempt ends at most once, and no write is accepted for an attempt after it ended
  (a late agent's writes show up as ``lease.stale_write_rejected``, never as progress).
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .models import FINAL_RUN_STATES, RunState
from .statemachine import can_transition

FINAL = {s.value for s in FINAL_RUN_STATES}
# Events an agent's write produces: none may follow its attempt's end.
AGENT_WRITES = ("attempt.progress", "preflight.", "playbook.", "reconcile.")


@dataclass(slots=True)
class Violation:
    kind: str
    subject: str  # a run id, machine id or attempt id
    detail: str

    def __str__(self) -> str:
        return f"{self.kind} [{self.subject}]: {self.detail}"


@dataclass(slots=True)
class Interval:
    attempt: int
    run: str
    machine: str
    start: float
    start_event: int
    end: float | None = None
    end_event: int | None = None
    ending: str | None = None


@dataclass(slots=True)
class AuditReport:
    runs: int = 0
    final: Counter[str] = field(default_factory=Counter)
    attempts: int = 0
    stale_rejected: int = 0
    violations: list[Violation] = field(default_factory=list)
    intervals: list[Interval] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


def _at(e: Mapping[str, Any]) -> float:
    at = e["at"]
    if isinstance(at, int | float):
        return float(at)
    from datetime import datetime

    return datetime.fromisoformat(str(at).replace("Z", "+00:00")).timestamp()


def audit(runs: Iterable[Mapping[str, Any]], events: Iterable[Mapping[str, Any]], *, require_final: bool = True) -> AuditReport:
    report = AuditReport()
    by_run: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    intervals: dict[int, Interval] = {}
    ended_at: dict[int, int] = {}  # attempt → event id of its end
    v = report.violations

    ordered = sorted(events, key=lambda e: e["id"])
    for e in ordered:
        kind = e["kind"]
        run_id, attempt = e.get("run"), e.get("attempt")
        if kind == "run.state" and run_id:
            by_run[run_id].append(e)
            if e.get("to_state") == RunState.ASSIGNED.value and attempt is not None:
                if attempt in intervals:
                    v.append(Violation("attempt_assigned_twice", str(attempt), f"run {run_id}"))
                intervals[attempt] = Interval(attempt, run_id, e.get("machine") or "?", _at(e), e["id"])
        elif kind == "attempt.ended" and attempt is not None:
            if attempt in ended_at:
                v.append(Violation("attempt_ended_twice", str(attempt), f"events {ended_at[attempt]} and {e['id']}"))
            ended_at[attempt] = e["id"]
            if attempt in intervals:
                iv = intervals[attempt]
                iv.end, iv.end_event, iv.ending = _at(e), e["id"], e.get("reason")
        elif kind == "lease.stale_write_rejected":
            report.stale_rejected += 1
        elif attempt is not None and kind.startswith(AGENT_WRITES) and attempt in ended_at:
            v.append(Violation("write_after_end", str(attempt),
                               f"{kind} (event {e['id']}) accepted after the attempt ended (event {ended_at[attempt]})"))

    runs_list = list(runs)
    report.runs = len(runs_list)
    for run in runs_list:
        rid, state = run["id"], run["state"]
        seq = by_run.get(rid, [])
        finals = [e for e in seq if e.get("to_state") in FINAL]
        if state in FINAL:
            report.final[state] += 1
        elif require_final:
            v.append(Violation("not_final", rid, f"run is still {state}"))
        if len(finals) > 1:
            v.append(Violation("final_twice", rid, " then ".join(e["to_state"] for e in finals)))
        if state in FINAL and (not finals or finals[-1]["to_state"] != state):
            v.append(Violation("final_mismatch", rid, f"run says {state}, events say {[e['to_state'] for e in finals]}"))
        prev: str | None = None
        for e in seq:
            frm, to = e.get("from_state"), e["to_state"]
            if prev is None:
                if to != RunState.QUEUED.value:
                    v.append(Violation("bad_first_state", rid, f"first state {to}"))
            elif frm != prev:
                v.append(Violation("broken_chain", rid, f"event {e['id']} goes {frm}→{to} but the run was {prev}"))
            elif not can_transition(RunState(frm), RunState(to)):
                v.append(Violation("illegal_transition", rid, f"{frm}→{to} (event {e['id']})"))
            prev = to

    report.attempts = len(intervals)
    report.intervals = sorted(intervals.values(), key=lambda i: (i.machine, i.start_event))
    per_machine: dict[str, list[Interval]] = defaultdict(list)
    for iv in report.intervals:
        per_machine[iv.machine].append(iv)
    for machine, ivs in per_machine.items():
        for a, b in itertools.pairwise(ivs):
            # Event ids, not clocks, order what happened: one store, one sequence.
            if a.end_event is None or b.start_event < a.end_event:
                v.append(Violation("overlapping_attempts", machine,
                                   f"attempt {b.attempt} started while attempt {a.attempt} was active"))
    return report
