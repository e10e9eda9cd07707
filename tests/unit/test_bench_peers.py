"""bench/peers.py's pure parts: the seeded plan, the measures, the ratios and the tables, on
made-up observations (no server, no broker)."""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ is not an installed package: its modules import as top-level names from there
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import math
from typing import Any

import pytest
from peers.report import (
    MEASURES,
    ratio,
    ratio_table,
    ratios,
    summary_lines,
    throughput_table,
    value,
)
from peers.workload import (
    AFTER_EFFECT,
    BEFORE_EFFECT,
    FAILED,
    PENDING,
    SUCCEEDED,
    KillRecord,
    Observations,
    Start,
    ThroughputObservations,
    make_plan,
    measure,
    measure_throughput,
    pct,
)
from rich.console import Console


def test_plan_is_the_same_for_a_seed_and_within_its_bounds() -> None:
    a = make_plan(seed=3, machines=8, runs=200, kills=4)
    assert a == make_plan(seed=3, machines=8, runs=200, kills=4)
    assert a != make_plan(seed=4, machines=8, runs=200, kills=4)
    assert all(0.5 <= j.seconds <= 3.0 for j in a.jobs)
    assert [j.at for j in a.jobs] == sorted(j.at for j in a.jobs)
    assert len({j.key for j in a.jobs}) == 200
    assert [k.phase for k in a.kills] == [AFTER_EFFECT, BEFORE_EFFECT, AFTER_EFFECT, BEFORE_EFFECT]
    assert all(0 < k.at < a.window for k in a.kills)
    # offered load: arrivals at about 75 % of what 8 machines can do
    work = sum(j.seconds for j in a.jobs)
    assert 0.6 < work / (8 * a.window) < 0.9


def test_pct_by_nearest_rank() -> None:
    assert pct([3.0, 1.0, 2.0], 50) == 2.0
    assert pct(list(map(float, range(101))), 99) == 99.0


def test_measures_from_observations() -> None:
    plan = make_plan(seed=1, machines=2, runs=4, kills=2)
    k0, k1, k2, k3 = (j.key for j in plan.jobs)
    t0 = 1000.0
    submitted = {k0: t0, k1: t0 + 0.1, k2: t0 + 0.2, k3: t0 + 0.3}
    starts = [
        Start(k0, "m-01", t0 + 0.01),
        Start(k1, "m-02", t0 + 0.2),  # killed after its effect, run again elsewhere: twice
        Start(k1, "m-03", t0 + 11.0),
        Start(k2, "m-01", t0 + 1.2),  # killed before its effect; reconciled, then executed
        Start(k2, "m-03", t0 + 12.0, kind="reconcile"),
        Start(k2, "m-03", t0 + 12.1),
    ]
    effects = {k0: [(t0 + 0.5, "m-01")], k1: [(t0 + 0.6, "m-02"), (t0 + 11.5, "m-03")], k2: [(t0 + 12.5, "m-03")]}
    kills = [
        KillRecord(planned_at=1.0, phase=AFTER_EFFECT, at=t0 + 1.0, machine="m-02", key=k1),
        KillRecord(planned_at=1.5, phase=BEFORE_EFFECT, at=t0 + 1.5, machine="m-01", key=k2),
    ]
    obs = Observations(
        system="x", t0=t0, submitted=submitted, starts=starts, effects=effects, kills=kills,
        outcomes={k0: SUCCEEDED, k1: SUCCEEDED, k2: FAILED, k3: PENDING},
        finished_at=t0 + 30, all_final=False, ready_s=1.0,
    )
    m = measure(obs, plan)
    assert m["queue_wait_ms"]["n"] == 3  # k3 never started
    assert round(m["queue_wait_ms"]["max"]) == 1000  # k2: submitted at +0.2, started at +1.2
    assert (m["lost"], m["failed"], m["executed_twice"]) == (1, 1, 1)
    assert m["executed_twice_keys"] == {k1: 2}
    first, second = m["kills"]
    assert first["effect_before_kill"] and first["recovered_by"] == "executed again"
    assert round(first["recovered_after_s"], 3) == 10.0
    assert not second["effect_before_kill"] and second["recovered_by"] == "reconciled, executed again"
    assert round(second["recovered_after_s"], 3) == 10.5
    assert m["recovery_s"]["never"] == 0 and round(m["recovery_s"]["max"], 3) == 10.5


def test_throughput_measures_from_observations() -> None:
    t0 = 2000.0
    submitted = {f"d{i}": t0 + i for i in range(12)}
    started = {f"d{i}": t0 + i + (0.5 if i < 2 else 0.010 + 0.001 * i) for i in range(12)}  # d0, d1: warm-up
    keys = [f"b{i}" for i in range(100)]
    finished = {k: t0 + 100 + 0.1 * (i + 1) for i, k in enumerate(keys) if i != 99}  # b99 never finished
    obs = ThroughputObservations(
        single_path="one", batch_path="many", warmup=2, dispatch_submitted=submitted, dispatch_started=started,
        backlog_keys=keys, submit_started=t0 + 100, submit_ended=t0 + 100.5,
        backlog_started={}, backlog_finished=finished, drained=False, server_cpu_s=1.5,
        machines_cpu_s=3.0,
    )
    m = measure_throughput(obs)
    d = m["dispatch_ms"]
    assert d["n"] == 10  # the warm-up left out
    assert round(d["p50"], 3) == 16.5 and round(d["max"], 3) == 21.0
    b = m["backlog"]
    assert (b["runs"], b["finished"], b["drained"]) == (100, 99, False)
    assert round(b["submit_per_s"]) == 200
    assert round(b["drain_s"], 3) == 9.9 and round(b["runs_per_s"], 3) == 10.0  # 99 runs in 9.9 s
    assert round(b["steady_runs_per_s"], 1) == 10.0
    assert round(b["server_cpu_ms_per_run"], 3) == 15.0  # 1.5 s over 100 runs
    assert round(b["machines_cpu_ms_per_run"], 3) == 30.0
    assert len(m["finished_after_s"]) == 99


def _system(*, rate: float, p50: float, p99: float, recovery: float | None, lost: int = 0,
            twice: int = 0) -> dict[str, Any]:
    return {
        "throughput": {"dispatch_ms": {"p50": p50, "p90": p99, "p99": p99, "n": 100},
                       "backlog": {"runs": 1000, "finished": 1000, "drained": True, "submit_s": 0.5,
                                   "submit_per_s": 2000.0, "runs_per_s": rate, "steady_runs_per_s": rate}},
        "queue_wait_ms": {"p50": 2 * p50, "p99": math.nan},
        "recovery_s": {"p50": recovery, "max": recovery},
        "lost": lost, "executed_twice": twice, "failed": 0,
    }


SYSTEMS = {
    "deskfleet": _system(rate=200.0, p50=4.0, p99=10.0, recovery=9.0),
    "celery": _system(rate=400.0, p50=2.0, p99=10.0, recovery=18.0, twice=2),
    "procrastinate": _system(rate=100.0, p50=8.0, p99=30.0, recovery=None, twice=2),
}


def test_value_and_ratio_refuse_what_is_not_a_figure() -> None:
    assert value(SYSTEMS["deskfleet"], ("throughput", "backlog", "runs_per_s")) == 200.0
    assert value(SYSTEMS["deskfleet"], ("queue_wait_ms", "p99")) is None  # NaN
    assert value(SYSTEMS["procrastinate"], ("recovery_s", "p50")) is None  # never recovered
    assert value(SYSTEMS["deskfleet"], ("throughput", "nothing")) is None
    assert value({"lost": True}, ("lost",)) is None
    assert ratio(4.0, 2.0) == 2.0
    assert ratio(None, 2.0) is None and ratio(1.0, None) is None and ratio(1.0, 0.0) is None


def test_ratios_both_ways_and_who_is_better() -> None:
    rs = ratios(SYSTEMS)
    assert set(rs) == {"celery", "procrastinate"}
    assert set(rs["celery"]) == {m.name for m in MEASURES}
    drain = rs["celery"]["drain rate"]
    assert (drain["value"], drain["deskfleet"]) == (400.0, 200.0)
    assert (drain["peer_over_deskfleet"], drain["deskfleet_over_peer"]) == (2.0, 0.5)
    assert drain["deskfleet_better"] is False  # higher is better, and Celery's is higher
    p50 = rs["celery"]["dispatch p50"]
    assert p50["peer_over_deskfleet"] == 0.5 and p50["deskfleet_better"] is False  # lower is better
    assert rs["celery"]["dispatch p99"]["deskfleet_better"] is None  # the same: neither
    assert rs["celery"]["recovery p50"]["peer_over_deskfleet"] == 2.0
    assert rs["celery"]["recovery p50"]["deskfleet_better"] is True
    slow = rs["procrastinate"]
    assert slow["drain rate"]["deskfleet_over_peer"] == 2.0 and slow["drain rate"]["deskfleet_better"] is True
    assert slow["recovery p50"]["peer_over_deskfleet"] is None  # "never" makes no ratio
    assert slow["queue wait p99 (failover load)"]["peer_over_deskfleet"] is None
    assert ratios({"celery": SYSTEMS["celery"]}) == {}  # nothing to compare with


def _render(table: Any) -> str:
    console = Console(width=250, record=True)
    console.print(table)
    return console.export_text()


@pytest.mark.parametrize("failover_runs", [40, 0])
def test_tables_show_values_and_ratios(failover_runs: int) -> None:
    result = {"systems": SYSTEMS, "plan": {"runs": failover_runs}}
    text = _render(ratio_table(result))
    assert "celery ÷ deskfleet" in text and "deskfleet ÷ procrastinate" in text
    drain = next(line for line in text.splitlines() if line.lstrip("│ ").startswith("drain rate"))
    for cell in ("200", "400", "100", "2.00x", "0.50x"):
        assert cell in drain
    recovery = next(line for line in text.splitlines() if "recovery p50" in line)
    assert "—" in recovery  # Procrastinate never recovered: no ratio
    assert ("executed twice" in text) == bool(failover_runs)
    lines = summary_lines(result)
    assert lines[0].startswith("deskfleet ÷ celery: drain rate 0.50x, dispatch p50 2.00x")
    assert "recovery p50" not in lines[1]  # deskfleet ÷ procrastinate: no ratio to a "never"


def test_throughput_table_marks_a_backlog_that_did_not_drain() -> None:
    systems = {"deskfleet": SYSTEMS["deskfleet"], "celery": _system(rate=50.0, p50=2.0, p99=3.0, recovery=1.0)}
    systems["celery"]["throughput"]["backlog"].update(finished=700, drained=False)
    text = _render(throughput_table({"systems": systems}))
    assert "(700 of 1000)" in text and "2,000" in text
