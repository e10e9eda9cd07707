"""The provider layer in memory: the fake provider and the retrying wrapper over it.

The fake is what the autoscaler's, recycler's and fencer's tests will stand on, so its
world must be right: states walk with the injected clock (nothing moves unless the clock
does), a token never acts twice, and each fault does what it says and is counted.
``Retrying`` must retry only what is retryable, always with the caller's token — the
fake's action counters show that a retried create created one machine — and wait
within its bounds.
"""

from __future__ import annotations

import asyncio
import logging
import random

import pytest

import deskfleet.providers
from deskfleet.providers import (
    Capabilities,
    FakeProvider,
    MachineNotFound,
    MachineSpec,
    ProviderError,
    ProviderMachine,
    ProviderState,
    Retrying,
)
from deskfleet.providers.base import OPS

S = ProviderState


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Sleeps:
    """An injected sleep: records each wait and moves the clock instead of waiting."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.waits: list[float] = []
        self.clock = clock

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        if self.clock:
            self.clock.advance(seconds)


def spec(name: str = "m1", pool: str = "ehr", **kw: object) -> MachineSpec:
    return MachineSpec(name=name, pool=pool, **kw)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def state(p: FakeProvider, machine_id: str) -> tuple[ProviderState, float]:
    m = await p.get(machine_id)
    return m.state, m.state_since


def test_the_public_surface_is_deliberate() -> None:
    assert sorted(deskfleet.providers.__all__) == [
        "Capabilities", "CommandProvider", "EC2Provider", "FakeProvider", "LibvirtProvider", "LocalProvider", "MachineNotFound", "MachineProvider",
        "MachineSpec", "OpStats", "ProviderError", "ProviderMachine", "ProviderState", "Retrying"]
    assert issubclass(MachineNotFound, ProviderError)
    assert issubclass(ProviderError, deskfleet.errors.DeskfleetError)


# -- the fake: states walk with the clock -------------------------------------------------------


async def test_a_machine_is_provisioned_boots_and_runs_as_the_clock_moves(clock: Clock) -> None:
    p = FakeProvider(clock=clock, provisioning_latency=5, boot_latency=30)
    t0 = clock.now
    m = await p.create(spec(tags={"team": "ops"}), token="t1")
    assert (m.state, m.state_since, m.created_at) == (S.PROVISIONING, t0, t0)
    assert (m.name, m.pool, m.tags) == ("m1", "ehr", {"team": "ops"})
    assert await state(p, m.id) == (S.PROVISIONING, t0)  # nothing moves without the clock
    clock.advance(5)
    assert await state(p, m.id) == (S.BOOTING, t0 + 5)
    clock.advance(29.9)
    assert await state(p, m.id) == (S.BOOTING, t0 + 5)
    clock.advance(0.1)
    assert await state(p, m.id) == (S.RUNNING, t0 + 35)
    clock.advance(1000)
    assert (await p.list())[0].state == S.RUNNING


async def test_stop_start_reboot_and_destroy_pass_through_their_states(clock: Clock) -> None:
    p = FakeProvider(clock=clock, boot_latency=20, stop_latency=10, terminate_latency=3)
    m = await p.create(spec(), token="c")
    clock.advance(20)
    await p.stop(m.id, token="s")
    assert await state(p, m.id) == (S.STOPPING, clock.now)
    clock.advance(10)
    assert await state(p, m.id) == (S.STOPPED, clock.now)
    await p.start(m.id, token="st")
    assert (await state(p, m.id))[0] == S.BOOTING
    clock.advance(20)
    assert (await state(p, m.id))[0] == S.RUNNING
    await p.reboot(m.id, token="r")
    assert (await state(p, m.id))[0] == S.REBOOTING
    clock.advance(20)
    assert (await state(p, m.id))[0] == S.RUNNING
    await p.destroy(m.id, token="d")
    assert (await state(p, m.id))[0] == S.TERMINATING
    clock.advance(3)
    assert await state(p, m.id) == (S.TERMINATED, clock.now)
    assert [x.state for x in await p.list()] == [S.TERMINATED]  # still reported, as clouds do
    assert p.actions == {"create": 1, "stop": 1, "start": 1, "reboot": 1, "destroy": 1}


async def test_boot_latency_can_depend_on_the_spec(clock: Clock) -> None:
    p = FakeProvider(clock=clock, boot_latency=lambda s: 300 if s.pool == "big" else 10)
    small = await p.create(spec("a"), token="a")
    big = await p.create(spec("b", pool="big"), token="b")
    clock.advance(10)
    assert [(await p.get(x.id)).state for x in (small, big)] == [S.RUNNING, S.BOOTING]
    assert [x.id for x in await p.list(pool="big")] == [big.id]


async def test_calls_that_make_no_sense_in_a_state_fail_for_good(clock: Clock) -> None:
    p = FakeProvider(clock=clock)
    m = await p.create(spec(), token="c")
    await p.stop(m.id, token="s")
    with pytest.raises(ProviderError, match="cannot reboot") as err:
        await p.reboot(m.id, token="r")
    assert not err.value.retryable
    await p.destroy(m.id, token="d")
    with pytest.raises(ProviderError, match="terminated"):
        await p.start(m.id, token="st")
    await p.destroy(m.id, token="d2")  # destroying the destroyed is done, not an action
    assert p.actions["destroy"] == 1 and p.actions["start"] == 0


# -- the fake: tokens --------------------------------------------------------------------------------


async def test_a_create_repeated_with_its_token_returns_the_same_machine(clock: Clock) -> None:
    p = FakeProvider(clock=clock, boot_latency=10)
    first = await p.create(spec(), token="t1")
    clock.advance(10)
    again = await p.create(spec(), token="t1")
    assert again.id == first.id and again.state == S.RUNNING
    other = await p.create(spec("m2"), token="t2")
    assert other.id != first.id
    assert (p.calls["create"], p.actions["create"]) == (3, 2)
    assert len(await p.list()) == 2


async def test_a_replayed_token_never_acts_again(clock: Clock) -> None:
    p = FakeProvider(clock=clock)
    m = await p.create(spec(), token="c")
    await p.stop(m.id, token="stop-1")
    await p.start(m.id, token="start-1")
    await p.stop(m.id, token="stop-1")  # the late retry of the first stop
    assert (await p.get(m.id)).state == S.RUNNING
    assert (p.calls["stop"], p.actions["stop"]) == (2, 1)
    await p.tag(m.id, {"a": "1"}, token="tag-1")
    await p.tag(m.id, {"a": "2"}, token="tag-2")
    await p.tag(m.id, {"a": "1"}, token="tag-1")
    assert (await p.get(m.id)).tags == {"a": "2"}


async def test_a_token_reused_for_another_order_is_refused(clock: Clock) -> None:
    p = FakeProvider(clock=clock)
    a = await p.create(spec("a"), token="c1")
    b = await p.create(spec("b"), token="c2")
    await p.stop(a.id, token="x")
    for call in (p.stop(b.id, token="x"), p.start(a.id, token="x"), p.create(spec(), token="x")):
        with pytest.raises(ProviderError, match="token 'x' was used for stop") as err:
            await call
        assert not err.value.retryable
    assert (await p.get(b.id)).state == S.RUNNING


# -- the fake: capabilities ----------------------------------------------------------------------


async def test_power_off_fences_at_once_when_the_provider_can(clock: Clock) -> None:
    p = FakeProvider(clock=clock, stop_latency=60)
    assert p.capabilities == Capabilities(fence=True, update=True)
    m = await p.create(spec(), token="c")
    await p.power_off(m.id, token="f")
    got = await p.get(m.id)
    assert (got.state, got.state_since, got.detail) == (S.STOPPED, clock.now, "powered off")


async def test_a_provider_without_fence_or_hibernate_says_so(clock: Clock) -> None:
    p = FakeProvider(clock=clock, capabilities=Capabilities(fence=False))
    m = await p.create(spec(), token="c")
    for call in (p.power_off(m.id, token="f"), p.stop(m.id, token="s", hibernate=True), p.update(m.id, token="u")):
        with pytest.raises(ProviderError, match="cannot") as err:
            await call
        assert not err.value.retryable
    assert (await p.get(m.id)).state == S.RUNNING
    assert p.actions["power_off"] == p.actions["stop"] == p.actions["update"] == 0

    h = FakeProvider(clock=clock, capabilities=Capabilities(hibernate=True))
    m = await h.create(spec(), token="c")
    await h.stop(m.id, token="s", hibernate=True)
    assert ((await h.get(m.id)).state, (await h.get(m.id)).detail) == (S.STOPPED, "hibernated")


async def test_an_update_runs_for_its_latency_and_leaves_the_machine_running_not_rebooted(clock: Clock) -> None:
    p = FakeProvider(clock=clock, update_latency=90)
    m = await p.create(spec(), token="c")
    await p.update(m.id, token="u")
    await p.update(m.id, token="u")  # a retry: one update
    assert await state(p, m.id) == (S.UPDATING, clock.now)
    clock.advance(90)
    assert await state(p, m.id) == (S.RUNNING, clock.now) and p.actions["update"] == 1
    p.fail_updates(m.name)
    await p.update(m.id, token="u2")
    clock.advance(90)
    got = await p.get(m.id)
    assert (got.state, got.detail) == (S.FAILED, "the update failed (injected)")
    with pytest.raises(ProviderError, match=r"cannot update .* it is failed"):
        await p.update(m.id, token="u3")


# -- the fake: faults --------------------------------------------------------------------------------


@pytest.mark.parametrize("retryable", [True, False])
async def test_refused_creates_create_nothing(clock: Clock, retryable: bool) -> None:
    p = FakeProvider(clock=clock)
    p.refuse_creates(2, retryable=retryable)
    for _ in range(2):
        with pytest.raises(ProviderError, match="capacity") as err:
            await p.create(spec(), token="t")
        assert err.value.retryable is retryable
    assert await p.list() == []
    m = await p.create(spec(), token="t")
    assert [x.id for x in await p.list()] == [m.id]
    assert (p.calls["create"], p.actions["create"], p.injected["fail:create"]) == (3, 1, 2)


async def test_never_boot_keeps_chosen_machines_booting(clock: Clock) -> None:
    p = FakeProvider(clock=clock, boot_latency=10)
    p.never_boot("stuck")
    p.never_boot(lambda s: s.labels.get("gpu") == "broken")
    stuck = await p.create(spec("stuck"), token="1")
    gpu = await p.create(spec("g", labels={"gpu": "broken"}), token="2")
    fine = await p.create(spec("fine"), token="3")
    clock.advance(10_000)
    assert [(await p.get(m.id)).state for m in (stuck, gpu, fine)] == [S.BOOTING, S.BOOTING, S.RUNNING]
    assert (await p.get(stuck.id)).state_since == stuck.created_at
    assert p.injected["never_boot"] == 2


async def test_never_boot_catches_a_reboot_that_begins_after_it(clock: Clock) -> None:
    p = FakeProvider(clock=clock, boot_latency=10)
    m = await p.create(spec("m"), token="c")
    clock.advance(10)
    p.never_boot("m")
    assert (await p.get(m.id)).state == S.RUNNING  # an earlier boot is not undone
    await p.reboot(m.id, token="r")
    clock.advance(10_000)
    assert (await p.get(m.id)).state == S.REBOOTING


async def test_a_vanished_machine_is_gone_everywhere(clock: Clock) -> None:
    p = FakeProvider(clock=clock)
    gone = await p.create(spec("a"), token="a")
    kept = await p.create(spec("b"), token="b")
    p.vanish(gone.id)
    with pytest.raises(MachineNotFound) as err:
        await p.get(gone.id)
    assert err.value.machine_id == gone.id and not err.value.retryable
    assert [m.id for m in await p.list()] == [kept.id]
    for call in (p.stop(gone.id, token="s"), p.destroy(gone.id, token="d"), p.create(spec("a"), token="a")):
        with pytest.raises(MachineNotFound):
            await call
    with pytest.raises(MachineNotFound):
        p.vanish("fake-9999")
    assert p.injected["vanish"] == 1


async def _call(p: FakeProvider, op: str, machine_id: str, token: str) -> None:
    if op == "create":
        await p.create(spec("other"), token=token)
    elif op == "get":
        await p.get(machine_id)
    elif op == "list":
        await p.list()
    elif op == "tag":
        await p.tag(machine_id, {"k": "v"}, token=token)
    else:
        await getattr(p, op)(machine_id, token=token)


@pytest.mark.parametrize("op", OPS)
async def test_fail_calls_fails_exactly_the_next_n_calls_of_an_op(clock: Clock, op: str) -> None:
    p = FakeProvider(clock=clock)
    m = await p.create(spec(), token="setup")
    p.fail_calls(op, 2, retryable=False)
    for i in range(2):
        with pytest.raises(ProviderError, match=f"{op} failed") as err:
            await _call(p, op, m.id, f"t{i}")
        assert not err.value.retryable
    assert p.actions[op] == (1 if op == "create" else 0)  # failed before acting
    await _call(p, op, m.id, "t-ok")
    assert p.injected[f"fail:{op}"] == 2
    with pytest.raises(ValueError, match="unknown provider operation"):
        p.fail_calls("explode")


async def test_a_failure_after_acting_is_a_lost_answer_that_the_token_recovers(clock: Clock) -> None:
    p = FakeProvider(clock=clock)
    p.fail_calls("create", after=True)
    with pytest.raises(ProviderError) as err:
        await p.create(spec(), token="t")
    assert err.value.retryable
    [made] = await p.list()  # it did create
    assert (await p.create(spec(), token="t")).id == made.id
    assert p.actions["create"] == 1


# -- Retrying -----------------------------------------------------------------------------------------


async def test_a_refused_create_is_retried_with_its_token_and_created_once(clock: Clock) -> None:
    fake = FakeProvider(clock=clock)
    fake.refuse_creates(2)
    sleeps = Sleeps()
    p = Retrying(fake, base=0.5, cap=10, sleep=sleeps, rng=lambda: 1.0)
    m = await p.create(spec(), token="t")
    assert [x.id for x in await fake.list()] == [m.id]
    assert (fake.calls["create"], fake.actions["create"]) == (3, 1)
    assert sleeps.waits == [0.5, 1.0]
    s = p.stats["create"]
    assert (s.attempts, s.retries, s.failures) == (3, 2, 0)


async def test_a_lost_answer_is_retried_without_creating_twice(clock: Clock) -> None:
    fake = FakeProvider(clock=clock)
    fake.fail_calls("create", 2, after=True)  # it creates, then the answer is lost, twice
    p = Retrying(fake, sleep=Sleeps())
    m = await p.create(spec(), token="t")
    assert [x.id for x in await fake.list()] == [m.id]
    assert fake.actions["create"] == 1 and p.stats["create"].retries == 2


async def test_permanent_errors_are_not_retried(clock: Clock) -> None:
    fake = FakeProvider(clock=clock)
    fake.refuse_creates(1, retryable=False)
    sleeps = Sleeps()
    p = Retrying(fake, sleep=sleeps)
    with pytest.raises(ProviderError, match="capacity"):
        await p.create(spec(), token="t")
    with pytest.raises(MachineNotFound):
        await p.get("fake-0404")
    assert sleeps.waits == [] and fake.calls["create"] == fake.calls["get"] == 1
    assert [(p.stats[op].attempts, p.stats[op].failures) for op in ("create", "get")] == [(1, 1), (1, 1)]


async def test_retries_stop_after_the_attempts_with_the_last_error(clock: Clock) -> None:
    fake = FakeProvider(clock=clock)
    m = await fake.create(spec(), token="c")
    fake.fail_calls("start", 10, message="throttled")
    sleeps = Sleeps()
    p = Retrying(fake, attempts=4, sleep=sleeps)
    with pytest.raises(ProviderError, match="throttled") as err:
        await p.start(m.id, token="s")
    assert err.value.retryable
    assert fake.calls["start"] == 4 and len(sleeps.waits) == 3
    s = p.stats["start"]
    assert (s.attempts, s.retries, s.failures) == (4, 3, 1)


async def test_retries_stop_at_the_deadline(clock: Clock) -> None:
    fake = FakeProvider(clock=clock)
    fake.fail_calls("list", 10)
    sleeps = Sleeps(clock)
    p = Retrying(fake, base=4, cap=100, attempts=100, deadline=10, sleep=sleeps, clock=clock, rng=lambda: 1.0)
    with pytest.raises(ProviderError):
        await p.list()
    assert sleeps.waits == [4.0]  # the next wait (8 s) would end 12 s after the start
    assert fake.calls["list"] == 2


def test_backoff_is_full_jitter_under_an_exponential_cap() -> None:
    top = Retrying(FakeProvider(), base=1, cap=8, rng=lambda: 1.0)
    assert [top.backoff(n) for n in range(1, 7)] == [1, 2, 4, 8, 8, 8]
    assert Retrying(FakeProvider(), base=1, cap=8, rng=lambda: 0.0).backoff(5) == 0
    rng = random.Random(7)
    p = Retrying(FakeProvider(), base=0.5, cap=30, rng=rng.random)
    waits = [p.backoff(n) for n in range(1, 40) for _ in range(20)]
    assert all(0 <= w <= 30 for w in waits) and max(waits) > 25  # bounded, and jittered up to the cap


class Hangs(FakeProvider):
    """Acts, then hangs ``hangs`` times: a provider whose answers never arrive."""

    hangs = 1

    async def create(self, spec: MachineSpec, *, token: str) -> ProviderMachine:
        made = await super().create(spec, token=token)
        if self.hangs > 0:
            self.hangs -= 1
            await asyncio.Event().wait()
        return made


async def test_a_hung_attempt_times_out_and_is_retried_with_the_same_token() -> None:
    fake = Hangs()
    p = Retrying(fake, attempt_timeout=0.05, sleep=Sleeps())
    m = await p.create(spec(), token="t")
    assert [x.id for x in await fake.list()] == [m.id] and fake.actions["create"] == 1
    assert p.stats["create"].retries == 1

    fake.hangs = 5
    gives_up = Retrying(fake, attempt_timeout=0.02, attempts=2, sleep=Sleeps())
    with pytest.raises(ProviderError, match=r"create timed out after 0.02s") as err:
        await gives_up.create(spec("m2"), token="t2")
    assert err.value.retryable and isinstance(err.value.__cause__, TimeoutError)
    assert gives_up.stats["create"].failures == 1 and fake.actions["create"] == 2


async def test_each_retry_is_logged_with_op_machine_and_error_but_no_token(
        clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeProvider(clock=clock)
    fake.refuse_creates(1)
    p = Retrying(fake, sleep=Sleeps())
    with caplog.at_level(logging.INFO, logger="deskfleet.providers.retry"):
        await p.create(spec("desk-7", labels={"secret": "hunter2"}), token="tok-123")
    [record] = caplog.records
    assert record.levelno == logging.INFO and getattr(record, "machine", None) == "desk-7"
    text = record.getMessage()
    assert "create of desk-7" in text and "insufficient capacity" in text and "retry 1 of 4" in text
    assert "tok-123" not in text and "hunter2" not in text


def test_retrying_exposes_the_wrapped_providers_name_and_capabilities() -> None:
    inner = FakeProvider(name="lab", capabilities=Capabilities(fence=False, warm_pool=True))
    p = Retrying(inner)
    assert (p.name, p.capabilities) == ("lab", Capabilities(warm_pool=True))
    with pytest.raises(ValueError):
        Retrying(inner, attempts=0)
