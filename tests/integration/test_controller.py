"""The pool controller against a real SQLite store and the fake provider, on a fake clock.

A machine the fake provider reports running enrols a little later, as an agent on a new
machine would (``World.enrol``); runs are claimed and finished through the store, so the
controller sees busy and idle machines as the scheduler makes them.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from deskfleet.fleet.controller import Controller
from deskfleet.models import AutomationSpec, Ending, MachineAdmin, Pool, RunSpec
from deskfleet.pools import PoolPolicy
from deskfleet.providers import Capabilities, FakeProvider, ProviderState, Retrying
from deskfleet.scheduler import Policy
from deskfleet.store import Heartbeat, open_store
from deskfleet.store.runner import StoreRunner

T0 = 1_800_000_000.0
SPEC = AutomationSpec("job", "1", idempotent=True)
#: neither idempotent nor done twice safely: a lost attempt is reconciled, then retried
UNSAFE = AutomationSpec("pay", "1", has_reconcile=True)
BOOT = 60.0  # seconds from create to running
ENROL = 10.0  # and from running to an agent enrolled
LEASE = 30.0


class World:
    def __init__(self, tmp_path: Path, policy: dict, **fake: object) -> None:
        self.now = T0
        self.store = open_store(f"sqlite:///{tmp_path / 'store.db'}", sqlite_synchronous="NORMAL")
        self.store.put_pool(Pool("ehr", allow_wait_for_capacity=True), T0)
        self.store.put_automations([SPEC, UNSAFE], T0)
        self.store.put_pool_policy("ehr", PoolPolicy.model_validate(policy).model_dump(mode="json"),
                                   expected_version=0, now=T0)
        self.fake = FakeProvider(clock=lambda: self.now, boot_latency=BOOT - 10, provisioning_latency=10, **fake)
        self.provider = Retrying(self.fake, sleep=self._no_sleep, attempts=3)
        self.controller = Controller(self.store, StoreRunner(self.store), {"fake": self.provider},
                                     leads=lambda: True, clock=lambda: self.now, ready_time=BOOT + ENROL)
        self.destroyed_while_busy: list[str] = []
        self.running: list = []

    @staticmethod
    async def _no_sleep(_seconds: float) -> None:
        return None

    async def tick(self, seconds: float = 5.0) -> None:
        """Time passes; agents on new machines enrol; the controller makes its pass; the
        scheduler hands queued runs to free machines."""
        self.now += seconds
        await self.enrol()
        busy = {m.id for m in self.store.list_machines("ehr") if m.active_attempt_id is not None}
        await self.controller.tick()
        self.destroyed_while_busy += sorted(busy & await self.gone())
        self.schedule()

    async def gone(self) -> set[str]:
        return {m.name for m in await self.fake.list(pool="ehr")
                if m.state in (ProviderState.TERMINATING, ProviderState.TERMINATED)}

    async def enrol(self) -> None:
        """A machine running for ENROL seconds has its agent connected; a destroyed one goes offline."""
        at_provider = await self.fake.list(pool="ehr")
        known = {m.id: m for m in self.store.list_machines("ehr")}
        for m in at_provider:
            if m.state is ProviderState.RUNNING and m.name not in known and self.now - m.state_since >= ENROL:
                self.store.enrol_machine(m.name, pool="ehr", labels={}, key_hash="h", now=self.now)
                self.store.connect_machine(m.name, boot_id="b", agent_version="t", automations=[SPEC, UNSAFE],
                                           labels=None, heartbeat=Heartbeat(m.name, self.now), lease_timeout=LEASE,
                                           now=self.now)
        up = {m.name for m in at_provider if m.state is ProviderState.RUNNING}
        for m in known.values():
            if m.connected and m.id not in up:
                self.store.disconnect_machine(m.id, self.now)

    def submit(self, n: int, automation: str = "job", **options: object) -> list[str]:
        return [self.store.submit(RunSpec(automation, pool="ehr", **options), request_hash=None, now=self.now)[0].id
                for _ in range(n)]

    def schedule(self) -> None:
        self.running = self.store.schedule(Policy(), self.now, LEASE)
        for a in self.running:
            self.store.attempt_start(a.attempt.id, a.attempt.machine_id, self.now)

    def finish_all(self) -> None:
        for m in self.store.list_machines("ehr"):
            if m.active_attempt_id is not None:
                self.store.finish_attempt(m.active_attempt_id, m.id, Ending.SUCCEEDED, output={}, detail="",
                                          now=self.now)

    def kinds(self, kind: str) -> list:
        return [e for e in self.store.events(limit=10_000) if e.kind == kind]

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def world(tmp_path):
    made: list[World] = []

    def make(policy: dict, **fake: object) -> World:
        (tmp_path / str(len(made))).mkdir()
        w = World(tmp_path / str(len(made)), policy, **fake)
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()


MANAGED = {"min": 1, "max": 12, "provider": "fake", "warm": {"min": 0, "max": 0},
           "scale_in": {"stabilization": 60, "drain_timeout": 120}}


async def test_a_burst_is_met_once_machines_boot_and_they_go_after_it_once_idle(world):
    w = world(MANAGED)
    await w.tick()
    assert [m.name for m in await w.fake.list()] != [] and w.fake.actions["create"] == 1  # min 1
    for _ in range(16):  # the first machine boots and enrols
        await w.tick()
    assert [m.status for m in w.store.list_machines("ehr")] == ["ready"]
    steps = [e.reason for e in w.kinds("machine.lifecycle")]
    assert steps == ["provisioning", "booting", "enrolling", "ready"], steps
    ready = w.kinds("machine.lifecycle")[-1]
    assert ready.data["since_created"] == pytest.approx(BOOT + ENROL, abs=5.0)
    # measured: what the floor's look-ahead and the boot timeout use when the policy says nothing
    assert list(w.controller.pools["ehr"].ready_times) == [pytest.approx(BOOT + ENROL, abs=5.0)]

    # A burst: 6 runs. One machine takes one at once; 5 more machines are created, once.
    w.submit(6)
    await w.tick()
    assert w.fake.actions["create"] == 1 + 5
    scaled = w.kinds("pool.scaled")[-1]
    assert scaled.data["create"] == 5 and "queued 6" in scaled.reason and "create 5" in scaled.reason
    for _ in range(5):  # still booting: counted as supply, nothing more is created
        await w.tick()
    assert w.fake.actions["create"] == 6
    for _ in range(12):
        await w.tick()
    machines = w.store.list_machines("ehr")
    assert len(machines) == 6 and sum(m.status == "busy" for m in machines) == 6

    # Done: after the stabilisation window the idle ones go, oldest first, down to min 1.
    w.finish_all()
    await w.tick()
    assert w.fake.actions["destroy"] == 0  # not before the window
    for _ in range(14):
        await w.tick()
    assert w.fake.actions["destroy"] == 5
    up = [m for m in await w.fake.list(pool="ehr") if m.state is ProviderState.RUNNING]
    assert len(up) == 1 and w.destroyed_while_busy == []
    drained = [e for e in w.store.events(limit=10_000) if e.kind == "machine.draining"]
    assert len(drained) == 5 and all("scale-in" in (e.reason or "") for e in drained)


async def test_a_busy_machine_is_never_destroyed_and_a_drain_that_outlasts_its_timeout_is_abandoned(world):
    w = world({**MANAGED, "min": 0})
    w.submit(2)
    for _ in range(20):
        await w.tick()
    assert sum(m.status == "busy" for m in w.store.list_machines("ehr")) == 2
    # The queue empties but both stay busy (long runs): the target (busy 2) keeps them.
    for _ in range(30):
        await w.tick()
    assert w.fake.actions["destroy"] == 0 and w.destroyed_while_busy == []
    # Retire one by hand-picked decision while it is busy: it is drained, not destroyed, and
    # after the drain timeout it is put back in service.
    busy = w.store.list_machines("ehr")[0]
    state = w.controller.pools["ehr"]
    state.retiring[busy.id] = w.now
    w.store.set_admin(busy.id, MachineAdmin.DRAINING, w.now)
    for _ in range(30):
        await w.tick()
    assert w.fake.actions["destroy"] == 0 and w.destroyed_while_busy == []
    assert [e.machine_id for e in w.kinds("pool.retire_abandoned")] == [busy.id]
    assert w.store.get_machine(busy.id).admin is MachineAdmin.ACTIVE


async def test_no_flapping_at_a_bursts_edge(world):
    """A queue that empties and fills again within the stabilisation window retires nothing."""
    w = world({**MANAGED, "min": 0, "scale_in": {"stabilization": 120, "drain_timeout": 60}})
    w.submit(3)
    for _ in range(20):
        await w.tick()
    for _ in range(4):
        w.finish_all()
        for _ in range(6):  # 30 s idle
            await w.tick()
        w.submit(3)
        for _ in range(2):
            await w.tick()
    assert w.fake.actions["create"] == 3 and w.fake.actions["destroy"] == 0


async def test_max_bounds_the_pool(world):
    w = world({**MANAGED, "min": 0, "max": 3})
    w.submit(10)
    await w.tick()
    assert w.fake.actions["create"] == 3  # 10 queued, max 3
    assert w.kinds("pool.scaled")[-1].data["target"] == 3
    for _ in range(20):
        await w.tick()
    assert w.fake.actions["create"] == 3


async def test_a_schedule_floor_is_ready_when_it_starts(world):
    """T0 is 08:00 UTC; the floor of 4 holds from 09:00 for an hour. Machines take 70 s to be
    ready, so they are created 70 s before 09:00 — and go after 10:00."""
    assert time.strftime("%H:%M", time.gmtime(T0)) == "08:00"
    floor = {"cron": "0 9 * * *", "hours": 1, "floor": 4, "timezone": "UTC"}
    w = world({**MANAGED, "min": 0, "schedule": [floor]})
    while w.now < T0 + 3600 - BOOT - ENROL - 5:
        await w.tick()
    assert w.fake.actions["create"] == 0
    await w.tick()
    await w.tick()
    assert w.fake.actions["create"] == 4
    while w.now < T0 + 3600:
        await w.tick()
    assert sum(m.status == "ready" for m in w.store.list_machines("ehr")) == 4  # ready as the floor starts
    while w.now < T0 + 2 * 3600 + 120:
        await w.tick()
    assert w.fake.actions["destroy"] == 4


async def test_provider_faults_are_retried_with_the_same_token_counted_and_said(world):
    w = world(MANAGED)
    w.fake.refuse_creates(2)  # transient: Retrying tries again, with the same token
    await w.tick()
    assert w.fake.actions["create"] == 1 and w.fake.calls["create"] == 3
    w.fake.refuse_creates(5, retryable=False)  # a provider that says no
    w.submit(2)
    await w.tick()
    errors = w.kinds("pool.provider_error")
    assert errors and errors[-1].data["op"] == "create" and errors[-1].data["retryable"] is False
    assert w.controller.pools["ehr"].errors["create"] >= 1
    assert w.fake.actions["create"] == 1


async def test_a_machine_that_never_boots_is_destroyed_and_replaced(world):
    w = world({**MANAGED, "min": 1})
    w.fake.never_boot(lambda spec: spec.name.endswith("001"))  # the first one only
    for _ in range(3 * 14 + 20):
        await w.tick()
    failed = w.kinds("pool.machine_failed")
    assert len(failed) == 1 and "not ready" in failed[0].reason
    assert w.fake.actions["destroy"] == 1 and w.fake.actions["create"] == 2
    assert [m.status for m in w.store.list_machines("ehr")] == ["ready"]


async def test_a_pool_whose_provider_this_server_lacks_is_said_once(world):
    w = world({**MANAGED, "provider": "vsphere"})
    for _ in range(3):
        await w.tick()
    said = w.kinds("pool.provider_missing")
    assert len(said) == 1 and said[0].data["provider"] == "vsphere" and said[0].data["configured"] == ["fake"]
    assert w.fake.calls["create"] == 0


# -- fencing a silent machine before its run moves (item 8c) ------------------------------------------

async def lost_mid_run(w: World, automation: str = "pay"):
    """A run of ``automation`` started on the pool's machine, whose agent then falls silent:
    its lease expires. The lost attempt, as the leader's sweep reports it."""
    for _ in range(16):
        await w.tick()
    [run_id] = w.submit(1, automation, attempt_timeout=600.0)
    await w.tick()
    [a] = [x for x in w.running if x.run.id == run_id]
    w.now += LEASE + 1
    [lost] = w.store.expire_leases(w.now)
    assert lost.attempt.id == a.attempt.id and lost.retried and lost.run.state.value == "queued"
    return lost


async def test_a_silent_machine_is_powered_off_through_its_provider_before_its_run_moves(world):
    w = world(MANAGED)  # fence: auto, with a provider that can: "provider"
    lost = await lost_mid_run(w)
    a = lost.attempt
    assert lost.fence == "provider"
    assert lost.run.not_before == a.started_at + 600.0, "held until the attempt's own timeout unless fenced sooner"
    assert [e.reason for e in w.kinds("run.fence_hold")] == ["provider"]
    assert await w.controller.fence(lost) is True
    assert w.fake.actions["power_off"] == 1
    [(machine,)] = [(m,) for m in await w.fake.list(pool="ehr") if m.name == a.machine_id]
    assert machine.state is ProviderState.STOPPED
    fenced = w.kinds("machine.fenced")
    assert [(e.machine_id, e.data["attempt"]) for e in fenced] == [(a.machine_id, a.id)]
    run = w.store.get_run(lost.run.id)
    assert run.not_before == w.now and [e.attempt_id for e in w.kinds("run.fence_released")] == [a.id]
    # Fencing again (a retry, another replica) acts once: the token is the attempt's.
    await w.controller.fence(lost)
    assert w.fake.actions["power_off"] == 1


async def test_without_a_provider_that_can_fence_the_run_waits_for_the_attempts_own_timeout(world):
    w = world(MANAGED, capabilities=Capabilities(fence=False))
    lost = await lost_mid_run(w)
    assert await w.controller.fence(lost) is False
    [said] = w.kinds("machine.fence_unavailable")
    assert "cannot power machines off" in said.reason and "own timeout" in said.reason
    assert w.store.get_run(lost.run.id).not_before == lost.attempt.started_at + 600.0
    assert w.fake.actions["power_off"] == 0


async def test_a_failed_fence_leaves_the_hold_in_place(world):
    w = world(MANAGED)
    lost = await lost_mid_run(w)
    w.fake.fail_calls("power_off", 10, retryable=False)
    assert await w.controller.fence(lost) is False
    assert w.kinds("machine.fence_failed") and w.kinds("pool.provider_error")[-1].data["op"] == "power_off"
    assert w.store.get_run(lost.run.id).not_before == lost.attempt.started_at + 600.0


@pytest.mark.parametrize(("fence", "automation", "held"), [
    ("attempt_timeout", "pay", True),   # no fencing: the hold runs out at the attempt's own timeout
    ("agent", "pay", False),            # the agent's own self-fencing is trusted: retried at once
    ("provider", "job", False),         # idempotent: a second effect is harmless, nothing to fence
])
async def test_what_each_fence_mode_holds_back(world, fence, automation, held):
    w = world({**MANAGED, "fence": fence})
    lost = await lost_mid_run(w, automation)
    hold = w.kinds("run.fence_hold")
    if held:
        assert lost.fence == fence and len(hold) == 1
        assert lost.run.not_before == lost.attempt.started_at + 600.0
    else:
        assert lost.fence is None and hold == []
        assert (lost.run.not_before or 0) < w.now + 60


# -- recycling: a machine past its maximum age (item 4) --------------------------------------------

async def test_a_machine_past_its_max_age_is_drained_rebooted_between_runs_and_back_in_service(world):
    w = world({**MANAGED, "recycle": {"max_age_hours": 1}})
    for _ in range(16):
        await w.tick()
    [m] = w.store.list_machines("ehr")
    [run_id] = w.submit(1)
    await w.tick()
    assert w.store.get_machine(m.id).active_attempt_id is not None
    # Up for two hours — but busy: nothing happens to it mid-run.
    w.store.heartbeat([Heartbeat(m.id, w.now, resources={"uptime": 7200.0}, attempt_id=w.running[0].attempt.id)],
                      LEASE)
    for _ in range(3):
        await w.tick()
    assert w.kinds("machine.recycle") == [] and w.fake.actions["reboot"] == 0
    w.finish_all()
    await w.tick()  # idle now: drained first
    [order] = w.kinds("machine.recycle")
    assert order.data["action"] == "reboot" and "up 2.0 h (limit 1 h)" in order.reason
    await w.tick()  # holds no lease: rebooted through the provider
    assert w.fake.actions["reboot"] == 1
    assert w.store.get_machine(m.id).admin is MachineAdmin.DRAINING
    # It comes back with a new boot id: back in service.
    w.store.connect_machine(m.id, boot_id="b2", agent_version="t", automations=[SPEC, UNSAFE], labels=None,
                            heartbeat=Heartbeat(m.id, w.now), lease_timeout=LEASE, now=w.now)
    await w.tick()
    assert w.store.get_machine(m.id).admin is MachineAdmin.ACTIVE
    assert [e.reason for e in w.kinds("machine.recycled")] == ["rebooted"]
    assert w.fake.actions["reboot"] == 1 and w.store.get_run(run_id).state.value == "succeeded"


async def test_a_machine_whose_os_waits_for_a_reboot_is_drained_and_rebooted_before_the_os_forces_it(world):
    """Item 5: the agent reports a pending reboot (Windows' "reboot required" signals); the
    pool reboots the machine between runs through its provider, without a recycle policy."""
    w = world(MANAGED)
    for _ in range(16):
        await w.tick()
    [m] = w.store.list_machines("ehr")
    w.store.heartbeat([Heartbeat(m.id, w.now, resources={"reboot_pending": True, "uptime": 60.0})], LEASE)
    await w.tick()
    [order] = w.kinds("machine.recycle")
    assert order.data["action"] == "reboot" and "waits for a reboot" in order.reason
    await w.tick()
    assert w.fake.actions["reboot"] == 1


async def test_scale_in_goes_down_to_the_highest_target_of_the_window_not_at_once(world):
    """A burst's tail: half its runs end, the other half 40 s later. Machines go only as a
    whole window (60 s) has asked for fewer — first those the tail no longer needed, then
    the rest — not all at once a window after the first dip (which would leave a second
    burst close behind with none)."""
    w = world({**MANAGED, "min": 0})
    w.submit(6)
    for _ in range(20):
        await w.tick()
    assert sum(m.status == "busy" for m in w.store.list_machines("ehr")) == 6
    busy = [m for m in w.store.list_machines("ehr") if m.active_attempt_id is not None]
    for m in busy[:3]:  # half the burst ends
        w.store.finish_attempt(m.active_attempt_id, m.id, Ending.SUCCEEDED, output={}, detail="", now=w.now)
    for _ in range(8):  # 40 s: the window has seen 3 busy all along
        await w.tick()
    w.finish_all()
    destroyed = []
    for _ in range(16):
        await w.tick()
        destroyed.append(w.fake.actions["destroy"])
    assert destroyed[-1] == 6
    assert 3 in destroyed, f"the first three went alone, a window after the tail began: {destroyed}"
    assert destroyed.index(6) - destroyed.index(3) >= 6, destroyed  # the rest a window (60 s) after the last run
