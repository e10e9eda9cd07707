"""The driver's merging of waiting writes (``store.driver.together``): one executemany per
statement where that changes nothing — checked against every order it could break."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from deskfleet.store.driver import Waiting, together

KEYS = [("runs", "r1"), ("runs", "r2"), ("machines", "m1")]

writes = st.lists(
    st.tuples(st.sampled_from(["UPDATE a", "UPDATE b", "UPDATE c"]), st.sampled_from([*KEYS, None]),
              st.booleans(), st.sampled_from([None, 1])),
    max_size=25,
)


def _waiting(spec: list[tuple[str, tuple[str, str] | None, bool, int | None]]) -> list[Waiting]:
    # Each write's parameters are its position, so that the merged list says what runs when.
    return [Waiting(sql, [n] if many else n, many, expect, f"w{n}", row) for n, (sql, row, many, expect) in
            enumerate(spec)]


def _executed(merged: list[Waiting]) -> list[int]:
    order: list[int] = []
    for w in merged:
        if w.many:
            for p in w.params:
                order += p if isinstance(p, list) else [p]
        else:
            order.append(w.params)
    return order


def _histories(spec: list[tuple[str, tuple[str, str] | None, bool, int | None]], order: list[int]) -> dict:
    """What each row sees, in order: its own writes, and every write whose rows are unknown."""
    seen: dict = {k: [] for k in KEYS}
    for n in order:
        sql, row, many, _ = spec[n]
        for k in KEYS:
            if row is None or many or row == k:
                seen[k].append((sql, n))
    return seen


@given(writes)
def test_merging_keeps_what_every_row_sees_and_the_expected_counts(spec) -> None:
    original = _waiting(spec)
    merged = together(original)
    order = _executed(merged)
    assert sorted(order) == list(range(len(spec)))  # each write once
    assert _histories(spec, order) == _histories(spec, list(range(len(spec))))
    for w in merged:
        if w.many and all(not isinstance(p, list) for p in w.params):  # writes merged here
            members = [spec[p] for p in w.params]
            assert len({m[0] for m in members}) == 1
            expects = [m[3] for m in members]
            assert w.expect == (None if expects[0] is None else sum(expects))
            assert all((e is None) == (expects[0] is None) for e in expects)
    assert [(w.sql, w.params, w.many, w.expect) for w in original] == [
        (sql, [n] if many else n, many, expect) for n, (sql, _, many, expect) in enumerate(spec)]  # untouched


def test_a_pass_of_claims_becomes_two_statements() -> None:
    spec = []
    for i in range(5):
        spec += [("UPDATE runs", ("runs", f"r{i}"), False, 1), ("UPDATE machines", ("machines", f"m{i}"), False, None)]
    merged = together(_waiting(spec))
    assert [(w.sql, w.params, w.expect) for w in merged] == [
        ("UPDATE runs", [0, 2, 4, 6, 8], 5), ("UPDATE machines", [1, 3, 5, 7, 9], None)]


def test_a_row_written_twice_keeps_its_writes_in_order() -> None:
    spec = [("UPDATE a", ("t", 1), False, 1), ("UPDATE b", ("t", 1), False, 1), ("UPDATE a", ("t", 1), False, 1)]
    assert _executed(together(_waiting(spec))) == [0, 1, 2]
