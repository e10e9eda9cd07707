"""Each fault the demo met, told from both sides: what struck (DemoEHR's own log of the
faults it produced, and what the demo did to the fleet from outside) and how the
orchestrator recovered (its event log: the attempt it hit, what was decided, the
playbooks that ran afterwards, how the run ended).

A fault is *recovered* when the work it hit was finished anyway — the run it struck
succeeded (or was cancelled on request); one that struck between runs, when its machine
was brought back to work (it served a run again, or the next playbook moved it on); a
machine the demo struck from outside, when it re-proved its state after its quarantine.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from ..audit import Interval

#: fault kind → how the report names it
KINDS = {
    "session_expired": "session expired between runs (idle timeout)",
    "mfa": "MFA prompt answered with a TOTP code",
    "error_dialog": "modal error dialog",
    "crash": "app crashed (process exited)",
    "freeze": "app froze (hung, last frame still shown)",
    "agent_killed": "agent process SIGKILLed (with its desktops)",
    "display_killed": "X server killed",
    "app_killed": "app SIGKILLed by the demo mid-run",
    "unknown_dialog": "a modal dialog the model does not know",
}
#: what the orchestrator decided for a run (a ``run.state`` event's reason) → how the report says it
RECOVERY_LABELS = {
    "retry_after_reconcile": "attempt died after starting → retried after the reconcile check",
    "retry_idempotent": "attempt died after starting → retried (idempotent automation)",
    "requeued_not_started": "attempt died before the automation started → requeued, no retry spent",
    "reconciled": "reconcile found the earlier attempt's effect → run succeeded without repeating it",
    "not_retried_unsafe": "attempt died mid-run, automation neither idempotent nor reconcilable → failed loudly",
    "retries_exhausted": "retries exhausted → failed with the last reason",
    "retry_reconcile_failed": "the reconcile check itself failed → tried again after a backoff",
    "reconcile_failed": "the reconcile check kept failing → failed loudly (effect unknown)",
    "business_error": "business error → failed, not retried",
    "cancelled": "cancelled on request",
    "deadline": "deadline passed → timed out",
}
#: seconds around an attempt within which a fault counts as hitting it (clocks of two processes)
SLACK = 0.3
#: seconds after a fault within which the playbooks on its machine count as its recovery
HORIZON = 60.0
#: screens a playbook step can end at without having moved the app on
STUCK = ("unknown", "no_screen", "desktop")


@dataclass(slots=True)
class FaultStory:
    kind: str
    machine: str
    at: float
    origin: str  # scripted | seeded | timeout | demo
    step: str = ""
    run: str | None = None  # the run whose attempt it struck, if any
    attempt: int | None = None
    attempt_ending: str | None = None
    decision: str | None = None  # what the orchestrator decided about the run then
    run_final: str | None = None
    finished_on: str | None = None
    playbooks: list[str] = field(default_factory=list)  # "from_state → playbook", in order
    recovered: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def stories(faults: list[Any], moments: list[Any], runs: list[dict[str, Any]],
            events: list[dict[str, Any]], intervals: list[Interval]) -> list[FaultStory]:
    """``faults``: the app's log of the faults it produced (``PackDemo.fault_log()``); ``moments``: what the demo did
    (``state.Moment``: its ``kind`` and the ``machines`` it struck)."""
    by_machine: dict[str, list[Interval]] = defaultdict(list)
    for iv in intervals:
        by_machine[iv.machine].append(iv)
    decided: dict[int, dict[str, Any]] = {}
    ended: dict[int, int] = {}
    steps: dict[str, list[tuple[float, str, dict[str, Any]]]] = defaultdict(list)
    for e in sorted(events, key=lambda e: e["id"]):
        a = e.get("attempt")
        if e["kind"] == "attempt.ended" and a is not None:
            ended[a] = e["id"]
        elif e["kind"] == "run.state" and a in ended and a not in decided:
            decided[a] = e
        elif e["kind"].endswith("playbook.step") and e.get("machine"):
            steps[e["machine"]].append((_at(e), e["kind"], e["data"]))
    final = {r["id"]: r for r in runs}
    last_machine = {iv.run: iv.machine for iv in sorted(intervals, key=lambda iv: iv.start)}
    served = {m: sorted(iv.end for iv in ivs if iv.ending in ("succeeded", "reconciled") and iv.end)
              for m, ivs in by_machine.items()}

    out = []
    for f in faults:
        s = FaultStory(f.kind, f.machine, f.at, f.origin, f.step)
        # The latest attempt assigned before the fault that had not ended before it (the app
        # logs a fault before anyone can notice it; SLACK covers the log's own write).
        hit = max((iv for iv in by_machine[f.machine]
                   if iv.start <= f.at <= (iv.end if iv.end is not None else math.inf) + SLACK),
                  key=lambda iv: iv.start, default=None)
        if hit is None and not any(iv.start >= f.at for iv in by_machine[f.machine]):
            continue  # after the machine's last run (an idle session expiring): nobody met it
        _explain(s, hit, decided, final, last_machine, steps, served)
        out.append(s)
    out += _mfa(steps)
    out += _outside(moments, events, served)
    return sorted(out, key=lambda s: s.at)


def _explain(s: FaultStory, hit: Interval | None, decided: dict[int, dict[str, Any]], final: dict[str, Any],
             last_machine: dict[str, str], steps: dict[str, list[tuple[float, str, dict[str, Any]]]],
             served: dict[str, list[float]]) -> None:
    # The playbooks that count: up to the machine's next successful attempt.
    until = min([t for t in served.get(s.machine, []) if t >= s.at] + [s.at + HORIZON])
    if hit is not None:
        s.run, s.attempt, s.attempt_ending = hit.run, hit.attempt, hit.ending
        s.decision = (decided.get(hit.attempt) or {}).get("reason")
        run = final.get(hit.run) or {}
        s.run_final = run.get("state")
        s.finished_on = last_machine.get(hit.run)
        if hit.ending in ("succeeded", "reconciled") and hit.end is not None:
            until = hit.end  # handled within the attempt (in its pre-flight)
    after = [d for at, _, d in steps.get(s.machine, []) if s.at <= at <= until]
    s.playbooks = [f"{d.get('playbook')} ({d.get('from_state')} → {d.get('to_state')})" for d in after][:5]
    if s.run is not None:
        s.recovered = s.run_final in ("succeeded", "cancelled")
    else:  # between runs: the machine went back to work, or the next playbook moved it on
        moved = bool(after) and after[0].get("to_state") not in (after[0].get("from_state"), *STUCK)
        s.recovered = until < s.at + HORIZON or moved


def _mfa(steps: dict[str, list[tuple[float, str, dict[str, Any]]]]) -> list[FaultStory]:
    """Every MFA prompt a playbook answered; recovered once the app reached "home" (a
    fault striking the prompt itself is told on its own, and a later login takes over)."""
    out = []
    for machine, seen in steps.items():
        for at, kind, d in seen:
            if d.get("playbook") == "mfa":
                s = FaultStory("mfa", machine, at, "app", "verify" if kind.startswith("verify.") else "pre-flight")
                later = [x for t, _, x in seen if at <= t <= at + HORIZON]
                home = next((i for i, x in enumerate(later) if x.get("to_state") == "home"), None)
                s.playbooks = [f"{x.get('playbook')} ({x.get('from_state')} → {x.get('to_state')})"
                               for x in later[: (home + 1) if home is not None else 3]]
                s.recovered = home is not None
                out.append(s)
    return out


def _outside(moments: list[Any], events: list[dict[str, Any]], served: dict[str, list[float]]) -> list[FaultStory]:
    """The agent kill and the X server kill: recovered when each machine struck is back in
    service — its desktop restarted, its agent connected again, and verified if it was
    quarantined meanwhile."""
    out = []
    for m in moments:
        if m.kind not in ("agent_killed", "display_killed"):
            continue
        for machine in m.machines:
            s = FaultStory(m.kind, machine, m.at, "demo")
            seen = [e for e in events if e.get("machine") == machine and _at(e) >= m.at and e["kind"] in
                    ("machine.quarantined", "machine.verified", "machine.connected")]
            s.playbooks = [e["kind"].split(".")[1] + (" (rebooted)" if e["data"].get("rebooted") else "")
                           for e in seen][:3]
            if any(t >= m.at for t in served.get(machine, [])):
                s.playbooks.append("served runs again")
            # Back in service: its agent (on a restarted desktop) connected again, and then
            # the machine re-proved its state or served a run. A quarantine that comes later
            # is another fault's, not this one's.
            back = next((_at(e) for e in seen if e["kind"] == "machine.connected" and e["data"].get("rebooted")), None)
            s.recovered = back is not None and (
                any(e["kind"] == "machine.verified" and _at(e) >= back for e in seen)
                or any(t >= back for t in served.get(machine, [])))
            out.append(s)
    return out


def summary(found: list[FaultStory]) -> dict[str, dict[str, int]]:
    """kind → {"met": n, "recovered": m}."""
    out: dict[str, dict[str, int]] = {}
    for s in found:
        row = out.setdefault(s.kind, {"met": 0, "recovered": 0})
        row["met"] += 1
        row["recovered"] += int(s.recovered)
    return out


def describe(s: FaultStory) -> str:
    """How the fault was recovered, in a line."""
    if s.kind in ("agent_killed", "display_killed"):
        how = ("its agent went silent: lease expired, quarantined; the agent came back"
               if s.kind == "agent_killed" else
               "the next pre-flight found no screen and restarted the desktop (the attempt went with it)")
        return f"{how}; machine {', '.join(s.playbooks) or 'never heard of again'}"
    parts = []
    if s.run is not None:
        if s.attempt_ending in ("succeeded", "reconciled"):
            parts.append(f"handled inside attempt {s.attempt}'s pre-flight")
        else:
            parts.append(f"attempt {s.attempt} ended {s.attempt_ending}")
            if s.decision:
                parts.append(RECOVERY_LABELS.get(s.decision, s.decision))
        if s.run_final:
            parts.append(f"run {s.run_final}" + (f" on {s.finished_on}" if s.finished_on else ""))
    elif s.kind != "mfa":
        parts.append("between runs")
    if s.playbooks:
        parts.append("playbooks: " + ", ".join(s.playbooks))
    return "; ".join(parts)


def _at(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["at"]).replace("Z", "+00:00")).timestamp()
