"""bench/scale.py's pure parts: figures from made-up event logs, the seeded backlog, helpers."""

from __future__ import annotations

import math
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# bench/ is not an installed package: its modules import as top-level names from there
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from scale import (
    Kill,
    cpu_at,
    dist,
    drain_figures,
    drain_rate,
    epoch,
    failover_figures,
    fleet_goals,
    log_problems,
    machine_name,
    split,
    trace_recovery,
    utilisation_figures,
    work_plan,
)

T0 = 1_800_000_000.0
_ids = iter(range(1, 1_000_000))


def ev(kind: str, at: float, run: str | None = None, attempt: int | None = None, machine: str | None = None,
       to_state: str | None = None, reason: str | None = None, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """An event as GET /v1/events returns it, ``at`` seconds after T0."""
    stamp = datetime.fromtimestamp(T0 + at, UTC).isoformat().replace("+00:00", "Z")
    return {"id": next(_ids), "at": stamp, "kind": kind, "run": run, "attempt": attempt, "machine": machine,
            "from_state": None, "to_state": to_state, "reason": reason, "data": data or {}}


def test_epoch_reads_the_api_timestamps() -> None:
    assert epoch("2027-01-15T08:00:00.250000Z") == datetime(2027, 1, 15, 8, 0, 0, 250000, UTC).timestamp()
    assert epoch(ev("x", 1.5)["at"]) == T0 + 1.5


def test_dist_scales_and_survives_an_empty_list() -> None:
    d = dist([0.001, 0.002, 0.003], 1000)
    assert (d["n"], d["p50"], d["max"]) == (3, 2.0, 3.0)
    assert math.isclose(d["mean"], 2.0)
    assert dist([])["p50"] is None


def test_agent_processes_and_names_match_the_cli() -> None:
    assert split(5000, 1250) == [(1, 1250), (1251, 1250), (2501, 1250), (3751, 1250)]
    assert split(1500, 1250) == [(1, 1250), (1251, 250)]
    assert split(3, 1250) == [(1, 3)]
    assert machine_name("fo", 7) == "fo-07" and machine_name("fo", 123) == "fo-123"


def test_work_plan_is_seeded_bounded_and_big_enough() -> None:
    a = work_plan(7, machines=10, per_machine_s=30)
    assert a == work_plan(7, machines=10, per_machine_s=30) != work_plan(8, machines=10, per_machine_s=30)
    seconds = [s for *_, s in a]
    assert all(0.1 <= s <= 8.0 for s in seconds)
    assert sum(seconds) >= 300 and sum(seconds[:-1]) < 300  # just enough work, no more
    assert 0.9 < sum(seconds) / len(seconds) < 1.6
    assert len({k for k, *_ in a}) == len(a)
    # a mix of automations, each typically of its own length
    by = {name: [s for _, n, s in a if n == name] for name in ("sim.work_short", "sim.work", "sim.work_long")}
    medians = [sorted(v)[len(v) // 2] for v in by.values()]
    assert all(by.values()) and medians == sorted(medians) and medians[-1] > 5 * medians[0]


def test_trace_recovery_follows_the_killed_attempt_to_the_next_one() -> None:
    run = "run_a"
    events = [
        ev("run.state", 0.0, run, 1, "m-01", "assigned", "scheduled"),
        ev("run.state", 0.01, run, 1, "m-01", "running", "automation_started"),
        # SIGKILL at 5.0; the lease falls due at 14.6 and the sweep expires it at 14.7
        ev("attempt.ended", 14.7, run, 1, "m-01", "lost", "lost"),
        ev("run.state", 14.7, run, 1, "m-01", "queued", "retry_after_reconcile"),
        ev("run.state", 15.9, run, 2, "m-02", "assigned", "scheduled"),
        ev("run.state", 15.91, run, 2, "m-02", "preparing", "agent_accepted"),
        ev("reconcile.started", 15.92, run, 2, "m-02"),
        ev("reconcile.done", 15.93, run, 2, "m-02", data={"effect_found": False}),
        ev("run.state", 15.95, run, 2, "m-02", "running", "automation_started"),
        ev("attempt.ended", 25.0, run, 2, "m-02", "succeeded", "succeeded"),
        ev("run.state", 25.0, run, 2, "m-02", "succeeded", "succeeded"),
    ]
    tr = trace_recovery(1, "m-01", events)
    assert tr["lost"] == T0 + 14.7 and tr["lost_reason"] == "lost"
    assert tr["requeued_reason"] == "retry_after_reconcile"
    assert (tr["next"], tr["next_machine"]) == (2, "m-02")
    assert tr["started"] == T0 + 15.92 and tr["started_by"] == "reconcile"
    assert tr["effect_found"] is False and tr["final"] == "succeeded"
    kill = Kill(wave=1, machine="m-01", run=run, key="k", attempt=1, at=T0 + 5.0, into_run_s=5.0, seconds=60,
                last_beat=T0 + 4.6, trace=tr)
    f = failover_figures([kill])
    assert math.isclose(f["recovery_s"]["p50"], 10.92, abs_tol=1e-6)
    assert math.isclose(f["lease_lost_s"]["p50"], 9.7, abs_tol=1e-6)
    steps = {k: v["p50"] for k, v in f["steps_s"].items()}
    assert math.isclose(steps["last heartbeat received → SIGKILL"], 0.4, abs_tol=1e-6)
    assert math.isclose(steps["SIGKILL → lease due (last beat + timeout)"], 9.6, abs_tol=1e-6)
    assert math.isclose(steps["lease due → expired by the sweep"], 0.1, abs_tol=1e-6)
    assert math.isclose(steps["expired → next attempt assigned (scheduling)"], 1.2, abs_tol=1e-6)
    assert f["goal_met_at_p99"] and f["never_recovered"] == 0


def test_a_kill_never_recovered_fails_the_goal() -> None:
    run = "run_b"
    events = [ev("run.state", 0.0, run, 5, "m-03", "assigned", "scheduled"),
              ev("attempt.ended", 10.0, run, 5, "m-03", "lost", "lost")]
    # a later assignment to the very machine that was killed is not a recovery elsewhere
    events.append(ev("run.state", 30.0, run, 6, "m-03", "assigned", "scheduled"))
    tr = trace_recovery(5, "m-03", events)
    assert tr["next"] is None and tr["started"] is None
    f = failover_figures([Kill(1, "m-03", run, "k", 5, T0, 1.0, 60, None, tr)])
    assert f["never_recovered"] == 1 and not f["goal_met_at_p99"]


def test_utilisation_from_attempt_intervals() -> None:
    seconds = {"r1": 1.0, "r2": 1.0, "r3": 2.0}
    events = []
    for run, attempt, machine, start, end in (("r1", 1, "a", 0.0, 1.01), ("r2", 2, "b", 0.0, 1.01),
                                              ("r3", 3, "a", 1.02, 3.03)):
        events += [ev("run.state", start, run, attempt, machine, "assigned", "scheduled"),
                   ev("run.state", start + 0.005, run, attempt, machine, "running", "automation_started"),
                   ev("attempt.ended", end, run, attempt, machine, "succeeded", "succeeded"),
                   ev("run.state", end, run, attempt, machine, "succeeded", "succeeded")]
    events.append(ev("run.state", 0.5, "someone-else", 9, "b", "assigned", "scheduled"))  # not ours: ignored
    u = utilisation_figures(events, seconds, ["a", "b"])

    def close(a: float, b: float) -> bool:
        return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-5)  # epochs near 1.8e9 carry µs only

    assert close(u["makespan_s"], 3.03)
    assert u["ideal_makespan_s"] == 2.0  # max(4 s of work / 2 machines, longest 2 s)
    busy = 1.01 + 1.01 + 2.01
    assert close(u["utilisation"], busy / (2 * 3.03))
    assert close(u["idle_fraction"]["gaps between attempts"], 0.01 / (2 * 3.03))
    assert close(u["idle_fraction"]["tail (after a machine's last run)"], (3.03 - 1.01) / (2 * 3.03))
    assert u["gap_ms"]["n"] == 1 and close(u["gap_ms"]["p50"], 10.0)
    assert close(u["work_fraction"], 4.0 / (2 * 3.03))
    # until the last assignment (1.02 s): r1 and r2 busy 1.01 s each of 2 x 1.02 s
    assert close(u["utilisation_while_queued"], 2.02 / 2.04)
    assert [tuple(round(v, 3) for v in span) for span in u["timeline"]["a"]] == [(0.0, 1.01), (1.02, 3.03)]
    assert u["runs_final"] == {"succeeded": 3}


def test_drain_figures_and_cpu_interpolation() -> None:
    events = []
    for i in range(100):
        events.append(ev("run.state", i * 0.01, f"r{i}", i, "m", "assigned", "scheduled"))
        events.append(ev("run.state", 0.5 + i * 0.01, f"r{i}", i, "m", "succeeded", "succeeded"))
    d = drain_figures(events, uncordoned_at=T0 + 0.6)
    assert math.isclose(d["runs_per_s"], 100 / 1.49, rel_tol=1e-6)
    assert math.isclose(d["steady_runs_per_s"], 80 / 0.8, rel_tol=1e-3)
    assert d["succeeded"] == 100 and d["requeued"] == 0 and d["after_uncordon_runs_per_s"] is not None
    trace = [(0.0, 1.0, 10.0), (1.0, 2.0, 10.5), (2.0, 4.0, 11.0)]
    assert cpu_at(trace, 0.5, 1) == 1.5 and cpu_at(trace, 1.5, 2) == 10.75
    assert cpu_at(trace, -1, 1) == 1.0 and cpu_at(trace, 5, 1) == 4.0


def test_log_problems_counts_alike_lines_together(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text(
        "2026-12-01T09:00:18.813Z WARNING deskfleet.fleet.manager: lease expired: attempt lost → run queued "
        "[run=run_01 attempt=74 machine=fl-0001]\n"
        "2026-12-01T09:00:19.813Z WARNING deskfleet.fleet.manager: lease expired: attempt lost → run queued "
        "[run=run_02 attempt=75 machine=fl-0002]\n"
        "2026-12-01T09:00:08.798Z ERROR   deskfleet.agent.runtime: assigned attempt 74 while busy with 61; refusing "
        "[run=run_01 attempt=74 machine=fl-0001]\n"
        "2026-12-01T09:00:08.798Z INFO    deskfleet.agent.runtime: fine\n"
        "Traceback (most recent call last):\n")
    p = log_problems([log, tmp_path / "missing.log"])
    assert p["by_level"] == {"WARNING": 2, "ERROR": 1} and p["tracebacks"] == 1
    assert p["top"][0] == {"count": 2, "message": "WARNING deskfleet.fleet.manager: lease expired: attempt lost → run queued"}
    assert p["top"][1]["message"] == "ERROR deskfleet.agent.runtime: assigned attempt # while busy with #; refusing"


def _size(machines: int, cpu_pct: float, p99: float | None, after: float | None, steady: float) -> dict[str, Any]:
    return {"machines": machines, "idle": {"server": {"cpu_pct": cpu_pct}}, "dispatch_ms": {"p99": p99},
            "saturation": {"after_uncordon_runs_per_s": after, "steady_runs_per_s": steady}}


def test_the_drain_rate_is_the_fleets_own_once_released_else_the_steady_one() -> None:
    assert drain_rate({"after_uncordon_runs_per_s": 900.0, "steady_runs_per_s": 700.0}) == 900.0
    assert drain_rate({"after_uncordon_runs_per_s": None, "steady_runs_per_s": 700.0}) == 700.0
    assert drain_rate({"after_uncordon_runs_per_s": None, "steady_runs_per_s": math.nan}) is None


def test_fleet_goals_judge_the_largest_fleet_against_the_smallest() -> None:
    # listed in any order: the base is the smallest fleet, the goals are the largest's
    met = fleet_goals([_size(10_000, 24.9, 25.0, 800.0, 500.0), _size(500, 3.0, 5.0, 1000.0, 900.0)])
    assert [g["met"] for g in met] == [True, True, True]
    assert all("10,000 machines" in g["goal"] for g in met) and "500 machines" in met[2]["goal"]
    assert math.isclose(met[2]["value"], 0.8) and math.isclose(met[0]["value"], 0.249)
    missed = fleet_goals([_size(500, 3.0, 5.0, None, 1000.0), _size(10_000, 25.0, 25.1, None, 799.0)])
    assert [g["met"] for g in missed] == [False, False, False]
    # no dispatch sample or no drain at all: not met, never an exception
    empty = fleet_goals([_size(500, 3.0, None, None, math.nan), _size(10_000, 10.0, None, None, math.nan)])
    assert [g["met"] for g in empty] == [True, False, False]
    assert fleet_goals([]) == []
