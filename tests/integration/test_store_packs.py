"""Published packs and rollouts in the store, on every backend (SQLite and PostgreSQL)."""

from __future__ import annotations

import pytest

from deskfleet.errors import Conflict, InvalidInput, NotFound
from deskfleet.models import AutomationSpec, Pool
from deskfleet.store import SQLStore
from deskfleet.store.packs import RolloutStep

T0 = 1_800_000_000.0


def _publish(s: SQLStore, version: str, sha: str = "", archive: bytes = b"zip", at: float = T0) -> tuple[object, bool]:
    specs = [AutomationSpec("acme.add", "1", pack="acme"), AutomationSpec("acme.which", "1", pack="acme")]
    return s.publish_pack("acme", version, sha256=sha or version.replace(".", "") * 8, manifest={"pack": {
        "name": "acme", "version": version}}, automations=specs, archive=archive, now=at)


def test_publishing_stores_the_archive_and_registers_its_automations(s: SQLStore) -> None:
    record, created = _publish(s, "1.0.0", archive=b"\x00\x01archive bytes")
    assert created
    assert s.get_automation("acme.add") is not None and s.get_automation("acme.which", "1").pack == "acme"
    found = s.pack_archive("acme", "1.0.0")
    assert found is not None and found[1] == b"\x00\x01archive bytes" and found[0] == record
    assert [e.kind for e in s.events()][-1] == "pack.published"


def test_the_same_archive_again_is_a_no_op_and_another_under_the_same_version_a_conflict(s: SQLStore) -> None:
    first, _ = _publish(s, "1.0.0", sha="a" * 64)
    again, created = _publish(s, "1.0.0", sha="a" * 64, at=T0 + 5)
    assert not created and again == first
    with pytest.raises(Conflict, match=r"published already, with another archive.*raise \[pack\] version"):
        _publish(s, "1.0.0", sha="b" * 64)
    assert [p.version for p in s.list_packs("acme")] == ["1.0.0"]
    _publish(s, "1.1.0", at=T0 + 10)
    assert [p.version for p in s.list_packs()] == ["1.1.0", "1.0.0"]


def test_a_pool_is_assigned_a_published_version_and_rolls_back_like_an_undo(s: SQLStore) -> None:
    s.put_pool(Pool("ehr"), T0)
    for i, v in enumerate(("1.0.0", "2.0.0", "3.0.0")):
        _publish(s, v, at=T0 + i)
    with pytest.raises(NotFound, match="no pool"):
        s.assign_pack("nope", "acme", "1.0.0", now=T0)
    with pytest.raises(NotFound, match=r"acme 9\.9 is not published.*1\.0\.0, 2\.0\.0, 3\.0\.0"):
        s.assign_pack("ehr", "acme", "9.9", now=T0)
    with pytest.raises(Conflict, match="no earlier version"):
        s.assign_pack("ehr", "acme", None, rollback=True, now=T0)
    with pytest.raises(InvalidInput, match="max_unavailable"):
        s.assign_pack("ehr", "acme", "1.0.0", max_unavailable="lots", now=T0)

    one = s.assign_pack("ehr", "acme", "1.0.0", now=T0 + 1)
    assert (one.version, one.from_version, one.max_unavailable, one.state) == ("1.0.0", None, "1", "running")
    assert s.assign_pack("ehr", "acme", "1.0.0", now=T0 + 2).id == one.id  # running already: the same rollout
    one.state = "done"
    s.save_rollout(one, T0 + 3)
    two = s.assign_pack("ehr", "acme", "2.0.0", max_unavailable="25%", now=T0 + 4)
    assert two.from_version == "1.0.0"
    two.state = "done"
    s.save_rollout(two, T0 + 5)
    three = s.assign_pack("ehr", "acme", "3.0.0", now=T0 + 6)
    assert (three.from_version, three.max_unavailable) == ("2.0.0", "25%")
    assert s.pool_packs("ehr")["acme"].id == three.id

    back = s.assign_pack("ehr", "acme", None, rollback=True, now=T0 + 7)
    assert (back.version, back.from_version) == ("2.0.0", "1.0.0")
    assert s.pack_rollout(three.id).state == "superseded"  # type: ignore[union-attr]
    back.state = "done"
    s.save_rollout(back, T0 + 8)
    again = s.assign_pack("ehr", "acme", None, rollback=True, now=T0 + 9)
    assert (again.version, again.from_version) == ("1.0.0", None)
    kinds = [e.kind for e in s.events() if e.kind.startswith(("pool.pack", "rollout."))]
    assert kinds.count("pool.pack_assigned") == 5 and "rollout.superseded" in kinds


def test_a_superseded_rollout_hands_its_machines_on_and_keeps_its_own_record(s: SQLStore) -> None:
    s.put_pool(Pool("ehr"), T0)
    _publish(s, "1.0.0")
    _publish(s, "2.0.0", at=T0 + 1)
    first = s.assign_pack("ehr", "acme", "1.0.0", max_unavailable="2", now=T0)
    first.machines = {"m1": RolloutStep("installing", T0, T0), "m2": RolloutStep("done", T0, T0),
                      "m3": RolloutStep("pending", T0)}
    s.save_rollout(first, T0 + 1)
    second = s.assign_pack("ehr", "acme", "2.0.0", now=T0 + 2)
    assert {m: st.step for m, st in second.machines.items()} == {"m1": "draining"}
    assert second.machines["m1"].started == T0
    first.state = "done"  # a leader that had not seen the change yet writes it over: it stands
    assert s.save_rollout(first, T0 + 3).state == "superseded"
    assert [r.id for r in s.pack_rollouts("ehr", active=True)] == [second.id]
    assert s.pack_rollouts("ehr", "acme", limit=1)[0].id == second.id
