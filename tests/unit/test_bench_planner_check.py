"""bench/planner_check.py's pure parts: the seeded demand and its CSV (read back by the planner
itself), and the figures of a predicted and a real pool from made-up samples, events and runs
(no server, no replay)."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

# bench/ is not an installed package: its modules import as top-level names from there
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import pytest
from planner_check import (
    AUTOMATION,
    LONGEST_S,
    ROWS,
    SHORTEST_S,
    Row,
    compare,
    in_window,
    make_demand,
    none_waiting,
    phase_of,
    predicted_pool,
    rate_at,
    ratio,
    real_pool,
    wait_stats,
    write_demand,
)

from deskfleet.planner import read_demand

T0 = 1_800_000_000.0


# -- the demand ---------------------------------------------------------------------------------------


def test_the_rate_has_a_quiet_start_a_ramp_a_peak_and_a_tail() -> None:
    assert rate_at(0.0, 0.04, 0.5) == rate_at(0.14, 0.04, 0.5) == 0.04
    assert rate_at(0.275, 0.04, 0.5) == pytest.approx(0.27)  # halfway up the ramp
    assert rate_at(0.4, 0.04, 0.5) == rate_at(0.64, 0.04, 0.5) == 0.5
    assert 0.04 < rate_at(0.8, 0.04, 0.5) < 0.5
    assert rate_at(1.0, 0.04, 0.5) == pytest.approx(0.04)
    assert [phase_of(f) for f in (0.0, 0.2, 0.5, 0.9, 1.0)] == ["quiet", "ramp", "peak", "tail", "tail"]


def test_the_demand_is_the_same_for_a_seed_and_has_its_peak_in_the_middle() -> None:
    rows = make_demand(15, 7)
    assert rows == make_demand(15, 7)
    assert rows != make_demand(15, 8)
    assert [r.at for r in rows] == sorted(r.at for r in rows)
    assert all(0 <= r.at < 15 * 60 and SHORTEST_S <= r.seconds <= LONGEST_S for r in rows)
    assert {r.automation for r in rows} == {AUTOMATION}
    by_phase = {name: sum(phase_of(r.at / 900) == name for r in rows) for name in ("quiet", "peak")}
    # the peak (a quarter of the time, ~0.55 a second) brings far more than the quiet start (0.04)
    assert by_phase["peak"] > 5 * by_phase["quiet"]
    # several machines at the peak, if none waited
    assert max(n for _, n in none_waiting(rows)) >= 6
    # a longer demand has proportionally more runs; a quick one still a peak
    assert len(make_demand(3, 7)) < len(rows) / 3
    assert max(n for _, n in none_waiting(make_demand(3, 7))) >= 4


def test_the_csv_is_what_the_planner_reads(tmp_path: Path) -> None:
    rows = make_demand(3, 1)
    path = tmp_path / "day.csv"
    write_demand(rows, path)
    assert path.read_text().splitlines()[0] == "at,automation,seconds"
    demand = read_demand(path)
    assert len(demand.arrivals) == len(rows)
    assert [(a.at, a.automation, a.seconds) for a in demand.arrivals] == [(r.at, r.automation, r.seconds)
                                                                          for r in rows]
    assert demand.hours == 1


def test_none_waiting_counts_the_runs_in_progress() -> None:
    rows = [Row(0, AUTOMATION, 10), Row(5, AUTOMATION, 10), Row(10, AUTOMATION, 1)]
    # at 10 one run ends as another starts: an end first, the machine free for the next run
    assert none_waiting(rows) == [(0, 1), (5, 2), (10, 1), (10, 2), (11, 1), (15, 0)]


# -- figures --------------------------------------------------------------------------------------------


def test_wait_stats_are_nearest_rank_as_the_planners() -> None:
    waits = [0.0] * 90 + [2.0] * 5 + [10.0] * 4 + [30.0]
    s = wait_stats(waits)
    assert (s["p50"], s["p95"], s["p99"], s["max"], s["waited"], s["n"]) == (0.0, 2.0, 10.0, 30.0, 10, 100)
    assert wait_stats([])["p95"] is None


def test_ratio_is_real_over_predicted_and_nothing_for_a_zero_prediction() -> None:
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(0.01, 0.0) is None
    assert ratio(None, 2.0) is None and ratio(2.0, None) is None


def test_the_predicted_pool_from_the_replays_samples() -> None:
    rows = [Row(0, AUTOMATION, 10), Row(2, AUTOMATION, 10), Row(3, AUTOMATION, 5)]
    waits = [0.0, 0.0, 4.0]  # the third waited for a machine to boot
    # (at, up, busy) each pass of a 1 s tick: 1 machine, 3 from 1 s (booting counts), back to 1 at 30 s
    samples = [(float(t), 1 if t < 1 or t >= 30 else 3, 2 if 2 <= t < 12 else 0) for t in range(3600)]
    fig, held, busy = predicted_pool(samples, waits, rows, floor=1, created=3)
    assert busy[:3] == [(0.0, 0), (1.0, 0), (2.0, 2)] and fig["busy_max"] == 2
    assert fig["last_end_s"] == 12.0  # 3 + 4 + 5
    assert fig["back_at_floor_s"] == 30.0
    assert fig["wait_s"]["p95"] == 4.0 and fig["machines_created"] == 3
    fig = in_window(fig, held, 40.0, floor=1, observed=3600.0)
    assert fig["machine_hours"] == pytest.approx((1 + 29 * 3 + 10) / 3600)
    assert fig["peak_machines"] == 3
    assert fig["machine_hours_hour"] == pytest.approx((1 + 29 * 3 + 3570) / 3600)
    assert fig["hour_extrapolated_from_s"] is None


def test_a_run_that_never_started_has_no_wait_in_the_figures() -> None:
    rows = [Row(0, AUTOMATION, 10), Row(1, AUTOMATION, 10)]
    fig, _, _ = predicted_pool([(0.0, 1, 1)], [0.0, math.inf], rows, floor=1, created=1)
    assert fig["wait_s"]["n"] == 1 and fig["last_end_s"] == 10.0


def lifecycle(machine: str, step: str, at: float, **data: Any) -> dict[str, Any]:
    return {"at": T0 + at, "kind": "machine.lifecycle", "machine": machine, "run": None, "reason": step,
            "data": data}


def event(kind: str, machine: str, at: float) -> dict[str, Any]:
    return {"at": T0 + at, "kind": kind, "machine": machine, "run": None, "reason": None, "data": {}}


def run(i: int, created: float, assigned: float | None, ended: float | None, machine: str) -> dict[str, Any]:
    return {"id": f"r{i}", "state": "succeeded" if ended is not None else "queued", "created": T0 + created,
            "assigned": None if assigned is None else T0 + assigned, "machine": machine, "attempts": 1,
            "ended": None if ended is None else T0 + ended}


def test_the_real_pool_from_lifecycle_events_and_runs() -> None:
    # m1: the floor, up before the start; m2: made for the peak at 2 s, connected 2.5 s later,
    # retired and destroyed at 40 s; m3: made at 50 s, never connected, destroyed at 60 s
    events = [
        lifecycle("m1", "provisioning", -6), event("machine.connected", "m1", -4),
        lifecycle("m1", "ready", -3, since_created=3.0),
        lifecycle("m2", "provisioning", 2), event("machine.connected", "m2", 4.5),
        lifecycle("m2", "ready", 5, since_created=3.0), event("machine.draining", "m2", 35),
        lifecycle("m2", "destroyed", 40),
        lifecycle("m3", "provisioning", 50), lifecycle("m3", "destroyed", 60),
    ]
    runs = [run(0, 0, 0.01, 10, "m1"), run(1, 1, 4.52, 14.6, "m2"), run(2, 3, 10.02, 20.1, "m1")]
    fig, held, busy, ms = real_pool(events, runs, t0=T0, floor=1)
    assert held == [(-6, 1), (2, 2), (40, 1), (50, 2), (60, 1)]
    assert [n for _, n in busy] == [1, 2, 1, 2, 1, 0]
    assert [t for t, _ in busy] == pytest.approx([0.01, 4.52, 10, 10.02, 14.6, 20.1])
    assert fig["wait_s"]["p50"] == pytest.approx(3.52) and fig["wait_s"]["max"] == pytest.approx(7.02)
    assert fig["wait_s"]["waited"] == 2
    assert fig["machines_created"] == 3 and fig["busy_max"] == 2
    assert fig["last_end_s"] == pytest.approx(20.1)
    assert fig["back_at_floor_s"] == 40  # the first time after the last run with the floor alone held
    assert ms["m2"]["connected"] - ms["m2"]["created"] == 2.5
    fig = in_window(fig, held, 70.0, floor=1, observed=75.0)
    # [0, 2) 1, [2, 40) 2, [40, 50) 1, [50, 60) 2, [60, 70) 1
    assert fig["machine_hours"] == pytest.approx((2 + 76 + 10 + 20 + 10) / 3600)
    assert fig["peak_machines"] == 2
    # the hour: as observed to 75 s, then the floor's one machine
    assert fig["machine_hours_hour"] == pytest.approx((2 + 76 + 10 + 20 + 15 + 3525) / 3600)
    assert fig["hour_extrapolated_from_s"] == 75.0


def test_compare_has_a_row_per_figure_with_its_ratio() -> None:
    def fig(scale: float) -> dict[str, Any]:
        return {"wait_s": {"p50": 0.0, "p95": 2.0 * scale, "p99": 4.0 * scale, "max": 5.0 * scale,
                           "waited": 10}, "machine_hours": 0.5 * scale, "machine_hours_hour": 1.0,
                "peak_machines": 8, "machines_created": 9, "busy_max": 8, "last_end_s": 900.0,
                "back_at_floor_s": None}

    rows = compare(fig(1.0), fig(1.5))
    assert [r["figure"] for r in rows] == [name for name, _, _ in ROWS]
    by = {r["figure"]: r for r in rows}
    assert by["queue wait p95, s"]["ratio"] == pytest.approx(1.5)
    assert by["machine-hours, start → both back at min"]["ratio"] == pytest.approx(1.5)
    assert by["queue wait p50, s"]["ratio"] is None  # predicted 0
    assert by["peak machines held"]["ratio"] == 1.0
    assert by["pool back at min, s from the start"]["ratio"] is None
