"""The demo's report: every run accounted for, every fault met and how it was recovered,
the invariants checked against the event log, a timeline picture, and the screenshots the
agents uploaded — the screens the playbooks recovered from (before and after) and the
screens of attempts that failed.

Double effects are counted in the application's own records, by the pack's demo
(:mod:`.plan`); where the application logs the faults it produced (DemoEHR does), each
is also told one by one (:mod:`.faults`)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ..audit import AuditReport, audit
from ..client import AsyncClient
from .config import DemoConfig
from .faults import KINDS, RECOVERY_LABELS, FaultStory, describe, stories, summary
from .plan import BURST_POOL, PackDemo
from .state import DemoState

#: screenshots kept in the report: playbook steps (before and after), failed attempts
PLAYBOOK_SHOTS = 10
FAILURE_SHOTS = 8

#: moments drawn on the timeline: (how the moment's text starts, its label)
MARKS = (("SIGKILLed agent", "agent process killed"), ("restarted agents", "agent process back"),
         ("a quiet spell", "quiet spell"), ("killed the X server", "X server killed"),
         ("wave ", "next wave"))



@dataclass
class Report:
    config: DemoConfig
    state: DemoState
    runs: list[dict[str, Any]]
    audit: AuditReport
    effects: list[str]  # double effects found in the application's own records
    recoveries: Counter[str] = field(default_factory=Counter)
    playbooks: Counter[tuple[str, str]] = field(default_factory=Counter)
    quarantines: Counter[str] = field(default_factory=Counter)
    stops: Counter[str] = field(default_factory=Counter)
    reboots: int = 0
    reconcile_found: int = 0
    reconcile_missing: int = 0
    #: (before artifact id, after artifact id or None, caption) of playbook steps
    playbook_shots: list[tuple[str, str | None, str]] = field(default_factory=list)
    #: (run id, attempt id, caption) of attempts whose agent uploaded a failure screenshot
    failure_shots: list[tuple[str, int, str]] = field(default_factory=list)
    per_run: list[dict[str, Any]] = field(default_factory=list)
    kill_times: list[tuple[float, str]] = field(default_factory=list)
    faults: list[FaultStory] = field(default_factory=list)  # real desktops: each fault, told
    noun: str = "desktops"
    #: the autoscaling phase (a pack demo with a burst): what the pool controller did
    autoscale: dict[str, Any] | None = None

    @property
    def unaccounted(self) -> list[str]:
        final = {r["id"] for r in self.runs if r["state"] in ("succeeded", "failed", "cancelled", "timed_out")}
        return [s.run_id for s in self.state.accepted if s.run_id not in final]

    @property
    def ok(self) -> bool:
        return self.audit.ok and not self.effects and not self.unaccounted


def _quarantine_kind(reason: str) -> str:
    if "lease expired" in reason:
        return "agent silent past the heartbeat timeout (lease expired)"
    if "came back without" in reason:
        return "machine rebooted mid-attempt (agent came back without it)"
    if "progress_stalled" in reason or "stop_forced" in reason:
        return "no progress (frozen app) → stopped by the watchdog"
    if "preflight_failed" in reason:
        return "pre-flight could not reach the required state"
    if "no heartbeat" in reason:
        return "agent silent (no heartbeat)"
    return reason[:60]


def build_report(config: DemoConfig, out: Path, state: DemoState, runs: list[dict[str, Any]],
                 events: list[dict[str, Any]], desktops: PackDemo) -> Report:
    accepted = {s.run_id for s in state.accepted}
    runs = [r for r in runs if r["id"] in accepted]
    effects = desktops.double_effects(runs)
    rep = Report(config, state, runs, audit(runs, events), effects, noun=desktops.noun)
    by_run: dict[str, list[dict[str, Any]]] = {}
    seen_steps: set[tuple[str, str]] = set()
    for e in events:
        kind, reason = e["kind"], e.get("reason") or ""
        if e.get("run"):
            by_run.setdefault(e["run"], []).append(e)
        if kind == "run.state" and reason in RECOVERY_LABELS and e.get("from_state"):
            rep.recoveries[reason] += 1
        elif kind.endswith("playbook.step"):
            d = e["data"]
            step = (d.get("from_state") or "?", d.get("playbook") or "?")
            rep.playbooks[step] += 1
            if d.get("before_screenshot") and step not in seen_steps and len(rep.playbook_shots) < PLAYBOOK_SHOTS:
                seen_steps.add(step)
                rep.playbook_shots.append((d["before_screenshot"], d.get("screenshot"),
                                           f"{e.get('machine')}: {step[0]} → {step[1]} → {d.get('to_state')}"))
        elif kind == "machine.quarantined":
            rep.quarantines[_quarantine_kind(reason)] += 1
        elif kind == "attempt.stop_requested":
            rep.stops[reason] += 1
        elif kind == "machine.connected" and e["data"].get("rebooted"):
            rep.reboots += 1
        elif kind == "reconcile.done":
            if e["data"].get("effect_found"):
                rep.reconcile_found += 1
            else:
                rep.reconcile_missing += 1
    for r in runs:
        evs = by_run.get(r["id"], [])
        machines = sorted({e["machine"] for e in evs if e.get("machine")})
        started = [e for e in evs if e.get("to_state") == "assigned"]
        created = _ts(r["created_at"])
        rep.per_run.append({
            "id": r["id"], "automation": r["automation"], "pool": r.get("pool"), "state": r["state"],
            "attempts": r["dispatches"], "machines": machines,
            "queue_wait_s": round(_ts(started[0]["at"]) - created, 3) if started else None,
            "duration_s": round(_ts(r["finished_at"]) - created, 3) if r.get("finished_at") else None,
            "error": (r.get("error") or {}).get("message"),
            "output": r.get("output"),
        })
    rep.kill_times = [(m.at, m.what) for m in state.moments]
    for iv in rep.audit.intervals:
        if iv.ending == "system_error" and len(rep.failure_shots) < FAILURE_SHOTS:
            detail = next((e["data"].get("detail") or "" for e in by_run.get(iv.run, [])
                           if e["kind"] == "attempt.ended" and e.get("attempt") == iv.attempt), "")
            rep.failure_shots.append((iv.run, iv.attempt, f"{iv.machine}, attempt {iv.attempt}: {detail[:100]}"))
    taken = desktops.fault_log()
    if taken is not None:
        rep.faults = stories(taken, state.moments, runs, events, rep.audit.intervals)
    rep.autoscale = _autoscale(events, runs, rep.per_run)
    return rep


def _autoscale(events: list[dict[str, Any]], runs: list[dict[str, Any]],
               per_run: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The burst pool's story, from the events: machines made (and how long each took to be
    ready), retired, the controller's decisions, and the burst's queue waits."""
    life = [e for e in events if e["kind"] == "machine.lifecycle" and e["data"].get("pool") == BURST_POOL]
    if not life:
        return None
    ready = [e for e in life if e["reason"] == "ready"]
    burst_runs = {r["id"] for r in runs if r.get("pool") == BURST_POOL}
    waits = sorted(r["queue_wait_s"] for r in per_run if r["id"] in burst_runs and r["queue_wait_s"] is not None)
    return {
        "created": len([e for e in life if e["reason"] == "provisioning"]),
        "ready_s": sorted(round(e["data"].get("since_created", 0.0), 1) for e in ready),
        "destroyed": len([e for e in life if e["reason"] == "destroyed"]),
        "decisions": [(e["at"][11:19], e["reason"]) for e in events
                      if e["kind"] == "pool.scaled" and e["data"].get("pool") == BURST_POOL and
                      (e["data"].get("create") or e["data"].get("retire"))],
        "runs": len(burst_runs), "queue_wait_max_s": waits[-1] if waits else None,
    }


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


async def write_report(rep: Report, out: Path, client: AsyncClient) -> None:
    shots: list[tuple[str | None, str | None, str]] = []  # (before file, after file, caption)
    for before, after, caption in rep.playbook_shots:
        files = [await _download(client, art, out, f"step{len(shots) + 1:02d}-{label}")
                 for art, label in ((before, "before"), (after, "after"))]
        if files[0] or files[1]:
            shots.append((files[0], files[1], caption))
    failures: list[tuple[str, str]] = []
    for run_id, attempt, caption in rep.failure_shots:
        try:
            found = [a for a in await client.artifacts(run_id) if a["attempt"] == attempt and a["name"] == "failure"]
        except Exception:
            found = []
        name = await _download(client, found[0]["id"], out, f"failure{len(failures) + 1:02d}") if found else None
        if name:
            failures.append((name, caption))
    _timeline(rep, out / "timeline.png")
    (out / "report.json").write_text(json.dumps({
        "ok": rep.ok,
        "desktop": rep.config.desktop,
        "config": {k: str(v) for k, v in asdict(rep.config).items()},
        "runs_accepted": len(rep.state.accepted),
        "runs_final": dict(rep.audit.final),
        "unaccounted": rep.unaccounted,
        "rejected_requests": [{"request": w, "answer": a} for w, a in rep.state.rejected],
        "violations": [str(v) for v in rep.audit.violations],
        "double_effects": rep.effects,
        "stale_writes_rejected": rep.audit.stale_rejected,
        "recoveries": dict(rep.recoveries),
        "playbooks": {f"{s} → {p}": n for (s, p), n in rep.playbooks.items()},
        "quarantines": dict(rep.quarantines),
        "stop_orders": dict(rep.stops),
        "reboots": rep.reboots,
        "reconcile": {"effect_found": rep.reconcile_found, "not_found": rep.reconcile_missing},
        "faults_met": summary(rep.faults),
        "faults": [s.as_dict() | {"how": describe(s)} for s in rep.faults],
        "screenshots": [{"file": f, "caption": c} for b, a, c in shots for f in (b, a) if f]
                       + [{"file": f, "caption": c} for f, c in failures],
        "moments": [{"at": at, "what": what} for at, what in rep.kill_times],
        "wall_time_s": rep.state.finished_in,
        "autoscale": rep.autoscale,
        "runs": rep.per_run,
    }, indent=2))
    (out / "report.md").write_text(_markdown(rep, shots, failures))


async def _download(client: AsyncClient, artifact_id: str | None, out: Path, stem: str) -> str | None:
    """Save an uploaded screenshot under screenshots/; None if it is not there."""
    if not artifact_id:
        return None
    try:
        data = await client.artifact(artifact_id)
    except Exception:
        return None
    path = out / "screenshots" / f"{stem}.png"
    path.write_bytes(data)
    return path.name


def _markdown(rep: Report, shots: list[tuple[str | None, str | None, str]], failures: list[tuple[str, str]]) -> str:
    a = rep.audit
    lines = [
        "# deskfleet demo report", "",
        f"{len(rep.state.accepted)} runs accepted on {rep.config.machines} {rep.noun} "
        f"(faults: `{rep.config.faults}`, seed {rep.config.seed})"
        + (f", finished in {rep.state.finished_in:.1f}s." if rep.state.finished_in else "."), "",
        "## Every run accounted for", "",
        "| final state | runs |", "|---|---|",
        *(f"| {s} | {n} |" for s, n in sorted(a.final.items())),
        f"| **not final** | {len(rep.unaccounted)} |", "",
        "## Invariants, checked against the event log", "",
        f"- every accepted run reached exactly one final state: {'yes' if not rep.unaccounted and not [v for v in a.violations if v.kind in ('final_twice', 'not_final', 'final_mismatch')] else 'NO'}",
        f"- no machine ever had two active attempts ({a.attempts} attempts checked): {'yes' if not [v for v in a.violations if v.kind == 'overlapping_attempts'] else 'NO'}",
        f"- no write accepted after an attempt ended; {a.stale_rejected} stale writes were rejected: {'yes' if not [v for v in a.violations if v.kind == 'write_after_end'] else 'NO'}",
        f"- no double effects in the application's own records: {'yes' if not rep.effects else 'NO'}",
        *(f"  - VIOLATION {v}" for v in a.violations),
        *(f"  - DOUBLE EFFECT {e}" for e in rep.effects), "",
        "## Faults met, and how they were recovered", "",
        "| what happened | times |", "|---|---|",
        *(f"| {RECOVERY_LABELS.get(k, k)} | {n} |" for k, n in rep.recoveries.most_common()),
        *(f"| machine quarantined: {k} | {n} |" for k, n in rep.quarantines.most_common()),
        *(f"| stop ordered: {k} | {n} |" for k, n in rep.stops.most_common()),
        f"| machine rebooted (agent reconnected with a new boot id) | {rep.reboots} |",
        f"| reconcile check found the effect / did not | {rep.reconcile_found} / {rep.reconcile_missing} |", "",
        "Pre-flight and recovery playbooks run (screen state → playbook):", "",
        "| screen showed | playbook | times |", "|---|---|---|",
        *(f"| {s} | {p} | {n} |" for (s, p), n in rep.playbooks.most_common()), "",
        *_fault_lines(rep),
        "## Requests refused at submit (nothing written)", "",
        *(f"- {w}: `{ans}`" for w, ans in rep.state.rejected), "",
        *_autoscale_lines(rep),
        "## Moments", "",
        *(f"- {datetime.fromtimestamp(at).strftime('%H:%M:%S')} {what}" for at, what in rep.kill_times), "",
        "## Timeline", "", "![timeline](timeline.png)", "",
    ]
    if shots:
        lines += ["## Screens the playbooks recovered from", "",
                  "One of each kind of step, as the agent uploaded them: the screen before the playbook and after it.",
                  "", "| step | before | after |", "|---|---|---|"]
        lines += [f"| {cap} | {_img(b)} | {_img(af)} |" for b, af, cap in shots]
        lines.append("")
    if failures:
        lines += ["## Failed attempts, as their agents saw them", ""]
        for name, cap in failures:
            lines += [f"**{cap.replace('|', '/')}**", "", f"![failure](screenshots/{name})", ""]
    lines += ["## Runs", "", "| run | automation | state | attempts | machines | queue wait s | total s | error |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rep.per_run:
        lines.append(f"| {r['id']} | {r['automation']} | {r['state']} | {r['attempts']} | {', '.join(r['machines'])} "
                     f"| {r['queue_wait_s']} | {r['duration_s']} | {(r['error'] or '').replace('|', '/')[:120]} |")
    return "\n".join(lines) + "\n"


def _img(name: str | None) -> str:
    return f"![](screenshots/{name})" if name else "—"


def _fault_lines(rep: Report) -> list[str]:
    if not rep.faults:
        return []
    met = summary(rep.faults)
    lines = ["## Each fault met, and how it was recovered", "",
             "The application logs every fault it produces in its records; the demo adds what it did from outside. "
             "Each is matched with the attempt it struck and what the orchestrator did next.", "",
             "| fault | met | recovered |", "|---|---|---|",
             *(f"| {KINDS.get(k, k)} | {v['met']} | {v['recovered']} |" for k, v in met.items()), "",
             "| time | machine | fault | where | run | how it was recovered |", "|---|---|---|---|---|---|"]
    for s in rep.faults:
        where = s.step if s.origin in ("demo", "app") else f"{s.step} ({s.origin})"
        lines.append(f"| {datetime.fromtimestamp(s.at).strftime('%H:%M:%S.%f')[:-4]} | {s.machine} | "
                     f"{KINDS.get(s.kind, s.kind)} | {where} | {s.run or '—'} | "
                     f"{'' if s.recovered else '**not recovered** '}{describe(s).replace('|', '/')} |")
    lines.append("")
    return lines


def _timeline(rep: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    ivs = [iv for iv in rep.audit.intervals if iv.end is not None]
    if not ivs:
        return
    t0 = min(iv.start for iv in ivs)
    machines = sorted({iv.machine for iv in ivs})
    colours = {"succeeded": "#2e7d32", "reconciled": "#00897b", "lost": "#c62828", "system_error": "#ef6c00",
               "stopped": "#6a1b9a", "stop_forced": "#4a148c", "preflight_failed": "#757575",
               "business_error": "#f9a825"}
    fig, ax = plt.subplots(figsize=(13, 0.45 * len(machines) + 1.8), dpi=110)
    for iv in ivs:
        y = machines.index(iv.machine)
        ax.barh(y, iv.end - iv.start, left=iv.start - t0, height=0.7,  # type: ignore[operator]
                color=colours.get(iv.ending or "", "#90a4ae"), edgecolor="white", linewidth=0.3)
    marks: list[tuple[float, str]] = []
    for at, what in sorted(rep.kill_times):
        label = next((label for key, label in MARKS if what.startswith(key)), None)
        if label is None:
            continue
        if marks and at - marks[-1][0] < 0.5:  # one line for moments at the same time
            marks[-1] = (marks[-1][0], f"{marks[-1][1]}, {label}")
        else:
            marks.append((at, label))
    for at, label in marks:
        ax.axvline(at - t0, color="black", linestyle="--", linewidth=1)
        # Along the line, inside the plot (x in data, y in axes units): labels of moments a
        # little apart do not overprint each other.
        ax.text(at - t0, 0.98, label + " ", transform=ax.get_xaxis_transform(), rotation=90, fontsize=7,
                ha="right", va="top", bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7, "pad": 1})
    ax.set_yticks(range(len(machines)), machines)
    ax.set_xlabel("seconds since the first assignment")
    ax.set_title("attempts per machine, coloured by how they ended")
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    ax.legend(handles, list(colours), loc="center left", bbox_to_anchor=(1.01, 0.5), ncol=1 if len(machines) > 3 else 2,
              fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _autoscale_lines(rep: Report) -> list[str]:
    a = rep.autoscale
    if a is None:
        return []
    return [
        f"## Autoscaling: a burst for pool `{BURST_POOL}`, which had no machines", "",
        f"{a['runs']} runs arrived at once; the pool controller made {a['created']} machines through the local "
        f"provider (each a `deskfleet agent` process), ready {', '.join(f'{s:g}' for s in a['ready_s'])} s after "
        f"it decided; the longest queue wait was {a['queue_wait_max_s']} s. Once the burst was over, "
        f"{a['destroyed']} were drained and destroyed.", "",
        "| when | the controller's decision |", "|---|---|",
        *(f"| {at} | {why} |" for at, why in a["decisions"]), "",
    ]


def print_summary(console: Console, rep: Report, out: Path) -> None:
    t = Table(title="every run accounted for", show_header=True)
    t.add_column("final state")
    t.add_column("runs", justify="right")
    for s, n in sorted(rep.audit.final.items()):
        t.add_row(s, str(n))
    t.add_row("[red]not final[/]" if rep.unaccounted else "not final", str(len(rep.unaccounted)))
    console.print(t)
    f = Table(title="faults met and recovered")
    f.add_column("what happened")
    f.add_column("times", justify="right")
    for k, n in rep.recoveries.most_common():
        f.add_row(RECOVERY_LABELS.get(k, k), str(n))
    for k, n in rep.quarantines.most_common():
        f.add_row(f"machine quarantined: {k}", str(n))
    for (s, p), n in rep.playbooks.most_common(6):
        f.add_row(f"playbook {p} (screen showed {s})", str(n))
    f.add_row("stale writes rejected (fencing)", str(rep.audit.stale_rejected))
    console.print(f)
    if rep.faults:
        table = Table(title="each fault met, one by one (report.md tells how)")
        table.add_column("fault")
        table.add_column("met", justify="right")
        table.add_column("recovered", justify="right")
        for kind, row in summary(rep.faults).items():
            table.add_row(KINDS.get(kind, kind), str(row["met"]), str(row["recovered"]))
        console.print(table)
    if rep.autoscale is not None:
        a = rep.autoscale
        console.print(f"autoscaling: {a['runs']} runs for an empty pool → {a['created']} machines made "
                      f"(ready in {', '.join(f'{s:g}' for s in a['ready_s'])} s), {a['destroyed']} retired after it")
    verdict = "[bold green]all invariants held[/]" if rep.ok else "[bold red]INVARIANT VIOLATIONS[/]"
    console.print(f"{verdict}: {len(rep.audit.violations)} violations, {len(rep.effects)} double effects, "
                  f"{len(rep.unaccounted)} runs unaccounted for")
    for v in rep.audit.violations[:10]:
        console.print(f"  [red]{v}[/]")
    for e in rep.effects[:10]:
        console.print(f"  [red]{e}[/]")
    console.print(f"report: {out / 'report.md'}  (also report.json, timeline.png, screenshots/, logs/)")
