"""The scheduler with account leases (``scheduler.accounts``): pure placement, no I/O.

An account is never given to more machines than its ``max_sessions``; a run naming an
account at its limit waits for a machine that holds it (never a second login elsewhere);
a run of a pack gets the account its machine already holds, else the free one with the
fewest sessions. Property-tested over generated fleets and vaults.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from deskfleet.models import Machine, MachineHealth, Pool, Run
from deskfleet.scheduler import AccountBook, Need, Policy, Slot, eligible
from support import queued_run

T0 = 1_700_000_000.0
POOLS = {"default": Pool("default", affinity_wait=10.0)}


def run_(rid: str, **kw: Any) -> Run:
    return queued_run(rid, **kw)


def machine(mid: str, **kw: Any) -> Machine:
    values: dict[str, Any] = {"id": mid, "pool": "default", "automations": ["ehr.create@1"],
                              "health": MachineHealth.ONLINE, "connected": True, "idle_since": T0}
    values.update(kw)
    return Machine(**values)


def place(runs: list[Run], free: list[Machine], book: AccountBook, online: list[Machine] | None = None,
          now: float = T0) -> list[tuple[str, str, str | None]]:
    got = Policy().place(runs, free, online=free if online is None else online, pools=POOLS, now=now, accounts=book)
    return [(p.run.id, p.machine.id, p.account) for p in got]


def test_a_named_account_at_its_limit_waits_for_its_holder_and_never_logs_in_twice():
    holder, other = machine("m1"), machine("m2")
    book = AccountBook([Slot("alice", "ehr", 1, {"m1"})], {"r": Need(account="alice")})
    # The holder is busy (not free): the run waits, however long — no affinity_wait fallback.
    assert place([run_("r", session_key="alice")], [other], book, online=[holder, other], now=T0 + 3600) == []
    # The holder is free: the run goes there, with the account it holds.
    book = AccountBook([Slot("alice", "ehr", 1, {"m1"})], {"r": Need(account="alice")})
    assert place([run_("r", session_key="alice")], [other, holder], book) == [("r", "m1", "alice")]


def test_a_named_account_with_a_free_slot_falls_back_after_the_affinity_wait():
    holder, other = machine("m1"), machine("m2")
    needs = {"r": Need(account="alice")}
    r = run_("r", session_key="alice", queued_at=T0)
    book = AccountBook([Slot("alice", "ehr", 2, {"m1"})], needs)
    assert place([r], [other], book, online=[holder, other], now=T0 + 5) == []  # waits for m1 a while
    book = AccountBook([Slot("alice", "ehr", 2, {"m1"})], needs)
    assert place([r], [other], book, online=[holder, other], now=T0 + 10) == [("r", "m2", "alice")]


def test_a_pack_run_takes_the_account_its_machine_holds_else_the_free_one_with_fewest_sessions():
    slots = [Slot("a", "ehr", 2, {"m9"}, rank=1), Slot("b", "ehr", 1, set(), rank=2),
             Slot("c", "ehr", 1, {"m2"}, rank=0), Slot("x", "other", 5, set())]
    book = AccountBook(slots, {"r1": Need(pack="ehr"), "r2": Need(pack="ehr")})
    got = place([run_("r1"), run_("r2")], [machine("m1", idle_since=T0 - 5), machine("m2")], book)
    # The machines in the selector's order (m1 idle longest). m1 holds none: b (0 sessions)
    # before a (1 session), though a was added first.
    assert got[0] == ("r1", "m1", "b")
    # m2 already holds c: it keeps it (no second login).
    assert got[1] == ("r2", "m2", "c")


def test_equal_sessions_take_the_account_added_first():
    book = AccountBook([Slot("zed", "ehr", 1, rank=1.0), Slot("amy", "ehr", 1, rank=2.0)], {"r": Need(pack="ehr")})
    assert place([run_("r")], [machine("m1")], book) == [("r", "m1", "zed")]


def test_a_pack_without_a_free_account_leaves_its_runs_queued_and_others_go_on():
    book = AccountBook([Slot("a", "ehr", 1, {"m9"})], {"r1": Need(pack="ehr")})
    got = place([run_("r1"), run_("r2")], [machine("m1")], book)
    assert got == [("r2", "m1", None)]  # r2 needs no account


def test_one_pass_never_hands_an_account_beyond_its_limit():
    book = AccountBook([Slot("a", "ehr", 2)], {f"r{i}": Need(account="a") for i in range(5)})
    runs = [run_(f"r{i}", session_key="a") for i in range(5)]
    # Past the affinity wait (else r1 would wait a while for m0, now logged in as "a").
    got = place(runs, [machine(f"m{i}") for i in range(5)], book, now=T0 + 60)
    assert len(got) == 2 and {m for _, m, _ in got} == book.holders("a")


# -- properties --------------------------------------------------------------------------------------

NAMES = ["a", "b", "c"]


@st.composite
def scenes(draw: st.DrawFn) -> tuple[list[Run], list[Machine], list[Machine], list[Slot], dict[str, Need]]:
    machines = [machine(f"m{i}", idle_since=draw(st.floats(T0 - 100, T0)),
                        session_key=draw(st.none() | st.sampled_from(NAMES))) for i in range(draw(st.integers(0, 6)))]
    ids = [m.id for m in machines] + ["m-gone"]
    free = [m for m in machines if draw(st.booleans())]
    slots = []
    for name in NAMES:
        if draw(st.booleans()):
            cap = draw(st.integers(1, 3))
            holders = set(draw(st.lists(st.sampled_from(ids), max_size=cap, unique=True)))
            slots.append(Slot(name, draw(st.sampled_from(["ehr", "erp"])), cap, holders, rank=draw(st.floats(0, 9))))
    runs, needs = [], {}
    for i in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["none", "named", "pack"]))
        key = draw(st.sampled_from(NAMES)) if kind == "named" else None
        runs.append(run_(f"r{i}", session_key=key, queued_at=draw(st.floats(T0 - 20, T0)),
                         prefer_machine=draw(st.none() | st.sampled_from(ids))))
        if kind == "named":
            needs[f"r{i}"] = Need(account=key)
        elif kind == "pack":
            needs[f"r{i}"] = Need(pack=draw(st.sampled_from(["ehr", "erp"])))
    return runs, free, machines, slots, needs


@settings(max_examples=400)
@given(scenes())
def test_placement_properties(scene):
    runs, free, online, slots, needs = scene
    before = {s.name: set(s.holders) for s in slots}
    caps = {s.name: s.max_sessions for s in slots}
    apps = {s.name: s.app for s in slots}
    book = AccountBook([Slot(s.name, s.app, s.max_sessions, set(s.holders), s.rank) for s in slots], needs)
    placed = Policy().place(runs, free, online=online, pools=POOLS, now=T0, accounts=book)
    # Machines used once, free ones only, eligible.
    used = [p.machine.id for p in placed]
    assert len(used) == len(set(used)) and set(used) <= {m.id for m in free}
    assert all(eligible(p.run, p.machine) for p in placed)
    # Every run that needs an account got a fitting one; others got none.
    for p in placed:
        need = needs.get(p.run.id)
        if need is None:
            assert p.account is None
        elif need.account is not None:
            assert p.account == need.account
        else:
            assert p.account is not None and apps[p.account] == need.pack
            mine = sorted(n for n, h in before.items() if apps[n] == need.pack and p.machine.id in h)
            if mine:
                assert p.account in mine, "a machine already logged in to the pack keeps its account"
    # No account gains a machine beyond its max_sessions (those over it already gain none).
    gained = Counter(p.account for p in placed if p.account is not None and p.machine.id not in before[p.account])
    for name, n in gained.items():
        assert len(before[name]) + n <= caps[name], f"{name}: {before[name]} + {n} new > {caps[name]}"
    # A run left unplaced that needs an account had no free machine that could be given one
    # (or it waits, within the pool's affinity wait, for a machine holding its account).
    placed_ids = {p.run.id for p in placed}
    left = [m for m in free if m.id not in used]
    for r in runs:
        need = needs.get(r.id)
        if r.id in placed_ids or need is None:
            continue
        for m in left:
            if eligible(r, m) and book.account_for(need, m.id) is not None:
                assert r.session_key is not None or r.prefer_machine is not None, f"{r.id} starved on {m.id}"


class _AskedEachTime:
    """LongestIdle as a selector without ``rank``: asked machine by machine."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def choose(self, run: Run, candidates: Any) -> Machine:
        return self.inner.choose(run, candidates)


@settings(max_examples=200, deadline=None)
@given(
    idle=st.lists(st.one_of(st.none(), st.floats(T0 - 100, T0)), min_size=1, max_size=12),
    shapes=st.lists(st.tuples(st.sampled_from(["ehr.create", "ehr.lookup"]), st.booleans(),
                              st.one_of(st.none(), st.integers(0, 11))), min_size=1, max_size=20),
    recent=st.booleans(),
)
def test_a_selectors_rank_places_as_its_choose_would(idle, shapes, recent):
    """A pass that takes each run's machine from the selector's ``rank`` order (sorted once)
    places every run where asking ``choose`` for each would."""
    from deskfleet.scheduler import LongestIdle, MostRecentlyUsed

    free = [machine(f"m{i:02d}", idle_since=t, automations=["ehr.create@1"] if i % 3 else
                    ["ehr.create@1", "ehr.lookup@1"]) for i, t in enumerate(idle)]
    runs = [run_(f"r{j:02d}", automation=name, version="1",
                 prefer_machine=f"m{pref:02d}" if pref is not None and pinned else None)
            for j, (name, pinned, pref) in enumerate(shapes)]
    selector = MostRecentlyUsed() if recent else LongestIdle()
    fast = Policy(selector=selector).place(runs, free, online=free, pools=POOLS, now=T0)
    slow = Policy(selector=_AskedEachTime(selector)).place(runs, free, online=free, pools=POOLS, now=T0)
    assert [(p.run.id, p.machine.id) for p in fast] == [(p.run.id, p.machine.id) for p in slow]


def test_a_subclass_that_chooses_otherwise_is_asked_machine_by_machine():
    from deskfleet.scheduler import LongestIdle

    class Newest(LongestIdle):
        def choose(self, run: Run, candidates: Any) -> Machine:
            return max(candidates, key=lambda m: m.id)

    free = [machine("m1"), machine("m2"), machine("m3")]
    got = Policy(selector=Newest()).place([run_("r1", automation="ehr.create", version="1")], free,
                                          online=free, pools=POOLS, now=T0)
    assert [p.machine.id for p in got] == ["m3"]  # its choose, not the inherited rank
