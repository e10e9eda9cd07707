"""The leader's rollout pass (``fleet.rollout``) on a real store (SQLite and PostgreSQL),
its clock and its agents played by the test: what it takes out of service and when, what
it tells agents, how it reads their reports, when it stalls; and the service that sends
``install`` only to agents that speak protocol 6."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from deskfleet.fleet.rollout import Rollouts
from deskfleet.models import AutomationSpec, Ending, Pool, RunSpec
from deskfleet.scheduler import Policy
from deskfleet.services.packs import Packs
from deskfleet.store import Heartbeat, SQLStore
from deskfleet.store.packs import PackRecord
from deskfleet.store.runner import StoreRunner

T0 = 1_800_000_000.0
SPEC = AutomationSpec("acme.add", "1", pack="acme")


class Fleet:
    def __init__(self, s: SQLStore, count: int, *, old_agents: int = 0) -> None:
        self.s, self.now = s, T0
        self.sent: list[tuple[str, str]] = []
        s.put_pool(Pool("p"), T0)
        self.names = [f"m{i}" for i in range(count)]
        for i, name in enumerate(self.names):
            s.enrol_machine(name, pool="p", labels={}, key_hash="x", now=T0)
            self.connect(name, None if i >= count - old_agents else "1.0")
        for v in ("1.0", "2.0"):
            s.publish_pack("acme", v, sha256=v.replace(".", "") * 32, manifest={}, automations=[SPEC],
                           archive=b"z", now=T0)
        self.rollouts = Rollouts(s, StoreRunner(s), leads=lambda: True, install=self.install,
                                 clock=lambda: self.now, timeout=100.0)

    def install(self, machine: str, record: PackRecord, reason: str) -> None:
        self.sent.append((machine, record.version))

    def connect(self, name: str, version: str | None) -> None:
        labels = {"site": "x", **({"deskfleet.pack/acme": version} if version else {})}
        self.s.connect_machine(name, boot_id="b", agent_version="t", automations=[SPEC], labels=labels,
                               heartbeat=Heartbeat(name, self.now), lease_timeout=10, now=self.now)

    def report(self, name: str, kind: str, **data: Any) -> None:
        self.s.record_event(kind, self.now, machine_id=name, data={"pack": "acme", **data})

    async def step(self, rollout_id: int, dt: float = 1.0) -> Any:
        self.now += dt
        r = self.s.pack_rollout(rollout_id)
        assert r is not None
        return await self.rollouts.step(r)

    def admin(self) -> dict[str, str]:
        return {m.id: m.admin.value for m in self.s.list_machines("p")}


async def test_machines_move_a_few_at_a_time_and_come_back_on_the_new_version(s: SQLStore) -> None:
    f = Fleet(s, 5, old_agents=1)
    r = s.assign_pack("p", "acme", "2.0", max_unavailable="2", now=T0)
    r = await f.step(r.id)
    assert r.machines["m4"].step == "skipped" and "protocol < 6" in r.machines["m4"].detail
    away = [m for m, st in r.machines.items() if st.step == "installing"]
    assert away == ["m0", "m1"] and f.sent == [("m0", "2.0"), ("m1", "2.0")], "idle ones, told at once"
    assert [m for m, a in f.admin().items() if a == "draining"] == ["m0", "m1"]
    r = await f.step(r.id)
    assert f.sent == [("m0", "2.0"), ("m1", "2.0")], "no third while two are out"
    f.connect("m0", "2.0")  # its agent switched and said hello again
    r = await f.step(r.id)
    assert r.machines["m0"].step == "done" and f.admin()["m0"] == "active"
    assert r.machines["m2"].step == "installing" and ("m2", "2.0") in f.sent
    f.report("m1", "pack.install_failed", version="2.0", stage="check", why="problem: ghost")
    r = await f.step(r.id)
    assert r.machines["m1"].step == "failed" and "check: problem: ghost" in r.machines["m1"].detail
    assert f.admin()["m1"] == "active", "back in service on its old version"
    for name in ("m2", "m3"):
        f.connect(name, "2.0")
    r = await f.step(r.id)
    r = await f.step(r.id)
    assert r.state == "done" and r.counts() == {"done": 3, "failed": 1, "skipped": 1}, r
    kinds = [e.kind for e in s.events() if e.kind.startswith("rollout.")]
    assert "rollout.machine_failed" in kinds and kinds[-1] == "rollout.done"


async def test_as_many_failures_as_max_unavailable_stall_it(s: SQLStore) -> None:
    f = Fleet(s, 4)
    r = s.assign_pack("p", "acme", "2.0", max_unavailable="2", now=T0)
    r = await f.step(r.id)
    f.report("m0", "pack.install_failed", version="2.0", stage="download", why="sha256 differs")
    f.now += 101  # m1 says nothing: the timeout
    r = await f.step(r.id)
    assert r.state == "stalled" and r.counts() == {"failed": 2, "pending": 2}, r.counts()
    assert "timeout" in r.machines["m1"].detail
    r = await f.step(r.id)
    assert len(f.sent) == 2, "no machine more is tried with a version that fails"


async def test_never_below_the_work_in_hand_and_busy_machines_finish_first(s: SQLStore) -> None:
    f = Fleet(s, 3)
    for _ in range(2):
        s.submit(RunSpec("acme.add", pool="p"), request_hash=None, now=T0)
    claimed = s.schedule(Policy(), T0, 30.0)
    assert len(claimed) == 2
    r = s.assign_pack("p", "acme", "2.0", max_unavailable="3", now=T0)
    r = await f.step(r.id)
    # busy 2, queued 0: of 3 serving, one may go (the idle one)
    assert [m for m, st in r.machines.items() if st.step in ("draining", "installing")] == ["m2"], r.machines
    assert "work in hand" in r.detail
    busy = claimed[0].attempt.machine_id
    f.connect("m2", "2.0")
    r = await f.step(r.id)
    assert r.machines[busy].step == "draining" and (busy, "2.0") not in f.sent, "a busy machine is drained first"
    s.finish_attempt(claimed[0].attempt.id, busy, Ending.SUCCEEDED, output={}, detail="", now=f.now)
    r = await f.step(r.id)
    assert r.machines[busy].step == "installing" and (busy, "2.0") in f.sent


async def test_install_orders_go_only_to_agents_that_speak_6(s: SQLStore) -> None:
    class Conn:
        def __init__(self, protocol: int) -> None:
            self.protocol, self.got = protocol, []

        async def send(self, msg: Any) -> bool:
            self.got.append(msg)
            return True

    class Hub:
        connections = {"new": Conn(6), "old": Conn(5)}

    hints: list[tuple[str, str]] = []

    class Hints:
        def hint(self, kind: str, payload: str = "") -> None:
            hints.append((kind, payload))

    class Catalogue:
        def changed(self) -> None:
            pass

    packs = Packs(s, StoreRunner(s), agents=Hub(), replicas=Hints(), catalogue=Catalogue())
    record, _ = s.publish_pack("acme", "2.0", sha256="c" * 64, manifest={}, automations=[SPEC], archive=b"z", now=T0)
    for machine in ("new", "old", "elsewhere"):
        packs.install(machine, record, "test")
    await asyncio.sleep(0.05)
    got = Hub.connections["new"].got
    assert len(got) == 1 and (got[0].pack, got[0].version, got[0].url) == ("acme", "2.0", "/agent/v1/packs/acme/2.0/archive")
    assert Hub.connections["old"].got == []
    assert [k for k, _ in hints] == ["install"] and orjson.loads(hints[0][1])["machine"] == "elsewhere"
