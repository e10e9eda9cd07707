"""bench/peers.py's pure parts: the seeded plan and the measures, on made-up observations."""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ is not an installed package: its modules import as top-level names from there
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from peers.workload import (
    AFTER_EFFECT,
    BEFORE_EFFECT,
    FAILED,
    PENDING,
    SUCCEEDED,
    KillRecord,
    Observations,
    Start,
    make_plan,
    measure,
    pct,
)


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
