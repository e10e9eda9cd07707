"""Run durations known to the scheduler (``scheduler.durations``): a robust running estimate
per automation, and a backlog ordered longest first within a priority — never across
priorities, never holding back a run with a deadline or one that has waited half its queue
timeout. Property-tested over generated backlogs."""

from __future__ import annotations

import math
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from deskfleet.models import Machine, MachineHealth, Pool, Run
from deskfleet.scheduler import DurationBook, Policy
from deskfleet.scheduler.durations import longest_first, urgent
from support import queued_run

T0 = 1_700_000_000.0
AUTOMATIONS = ("sim.short", "sim.medium", "sim.long", "sim.new")
SECONDS = {"sim.short": 0.5, "sim.medium": 2.0, "sim.long": 8.0}


def run_(rid: str, **kw: Any) -> Run:
    return queued_run(rid, **{"automation": "sim.short", **kw})


def machine(mid: str) -> Machine:
    return Machine(id=mid, pool="default", automations=[f"{a}@1" for a in AUTOMATIONS], health=MachineHealth.ONLINE,
                   connected=True, idle_since=T0)


def learnt() -> DurationBook:
    book = DurationBook()
    for name, seconds in SECONDS.items():
        for _ in range(3):
            book.observe(name, seconds)
    return book


def test_the_estimate_is_each_automations_typical_duration_and_one_stuck_run_barely_moves_it() -> None:
    book = DurationBook()
    assert book.estimate("sim.work") is None
    for seconds in (1.0, 1.2, 0.8, 1.1, 0.9, 1.0):
        book.observe("sim.work", seconds)
    typical = book.estimate("sim.work")
    assert typical is not None and 0.9 < typical < 1.1
    book.observe("sim.work", 900.0)  # a run stuck until its attempt timeout
    stuck = book.estimate("sim.work")
    assert stuck is not None and stuck < 1.4 * typical  # clipped to 4x, weighted 0.2: at most x1.32
    for bad in (-1.0, math.inf, math.nan):
        book.observe("sim.work", bad)
    assert book.estimate("sim.work") == stuck
    book.observe("sim.zero", 0.0)  # a no-op: known, and shorter than anything
    assert book.snapshot()["sim.zero"] < 0.01
    # a change of the automation's speed is followed within a few runs
    for _ in range(15):
        book.observe("sim.work", 4.0)
    moved = book.estimate("sim.work")
    assert moved is not None and 3.0 < moved < 4.1


def test_a_backlog_goes_longest_first_unknown_first_of_all_and_first_come_among_equals() -> None:
    runs = [run_(f"r{i}", automation=a) for i, a in enumerate(
        ["sim.short", "sim.long", "sim.medium", "sim.short", "sim.new", "sim.long"])]
    assert [r.id for r in longest_first(runs, learnt(), T0)] == ["r4", "r1", "r5", "r2", "r0", "r3"]
    assert [r.id for r in longest_first(runs, DurationBook(), T0)] == [r.id for r in runs]  # nothing learnt


def test_runs_that_must_not_wait_keep_their_place_ahead_of_longer_ones() -> None:
    runs = [run_("short-old", queued_at=T0 - 1900), run_("long", automation="sim.long"),
            run_("short-deadline", deadline_at=T0 + 60), run_("short")]
    assert [urgent(r, T0) for r in runs] == [True, False, True, False]
    assert [r.id for r in longest_first(runs, learnt(), T0)] == ["short-old", "short-deadline", "long", "short"]


backlogs = st.lists(
    st.tuples(st.sampled_from(AUTOMATIONS), st.integers(-2, 2), st.floats(0, 4000), st.booleans()),
    min_size=0, max_size=40)


@given(backlogs)
def test_the_order_is_a_permutation_that_never_crosses_priorities(spec: list[tuple[str, int, float, bool]]) -> None:
    runs = [run_(f"r{i}", automation=a, priority=p, queued_at=T0 - waited, deadline_at=T0 + 60 if d else None)
            for i, (a, p, waited, d) in enumerate(spec)]
    runs.sort(key=lambda r: -r.priority)  # as the store gives them
    book = learnt()
    ordered = longest_first(runs, book, T0)
    assert sorted(r.id for r in ordered) == sorted(r.id for r in runs)
    assert [r.priority for r in ordered] == [r.priority for r in runs]
    for priority in {r.priority for r in runs}:
        group = [r for r in ordered if r.priority == priority]
        given_order = [r for r in runs if r.priority == priority]
        flags = [urgent(r, T0) for r in group]
        assert flags == sorted(flags, reverse=True)  # the urgent ones first
        assert [r for r in group if urgent(r, T0)] == [r for r in given_order if urgent(r, T0)]  # in their order
        rest = [r for r in group if not urgent(r, T0)]
        longs = [book.estimate(r.automation) or math.inf for r in rest]
        assert longs == sorted(longs, reverse=True)


def test_the_policy_orders_only_a_backlog_larger_than_the_free_machines() -> None:
    pools = {"default": Pool("default")}
    runs = [run_("s1"), run_("l1", automation="sim.long"), run_("s2"), run_("l2", automation="sim.long")]
    free = [machine("m1"), machine("m2")]
    policy = Policy(durations=learnt())
    placed = policy.place(runs, free, online=free, pools=pools, now=T0)
    assert sorted(p.run.id for p in placed) == ["l1", "l2"]
    four = [*free, machine("m3"), machine("m4")]
    assert [p.run.id for p in policy.place(runs, four, online=four, pools=pools, now=T0)] == ["s1", "l1", "s2", "l2"]
    plain = Policy().place(runs, free, online=free, pools=pools, now=T0)
    assert [p.run.id for p in plain] == ["s1", "l1"]  # without a book: as queued
