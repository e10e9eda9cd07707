"""An in-memory provider for tests of the policies and loops that drive providers.

Autoscaling, recycling and fencing logic must be tested against boots that take minutes,
creates the cloud refuses, machines that never come up and instances that disappear —
in milliseconds and deterministically. :class:`FakeProvider` plays that infrastructure
(STYLE 4: a fake that ships with the package): time is an injected clock, and a machine's
state is computed from it when read, so a test moves the world by moving the clock, with
no background task to wait for.

Every call is counted in ``calls[op]`` and every action actually taken in ``actions[op]``
(a create answered from its token is a call, not an action), so a test can assert that a
retried order acted once; every fault that fired is counted in ``injected``.
"""

from __future__ import annotations

import builtins
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from .base import (
    OPS,
    Capabilities,
    MachineNotFound,
    MachineProvider,
    MachineSpec,
    ProviderError,
    ProviderMachine,
    ProviderState,
)

S = ProviderState


@dataclass
class _Machine:
    id: str
    spec: MachineSpec
    created_at: float
    tags: dict[str, str]
    #: (from when, state) in time order; the state now is the last entry not in the future
    timeline: list[tuple[float, ProviderState]]
    detail: str = ""

    def at(self, now: float) -> tuple[float, ProviderState]:
        since, state = self.timeline[0]
        for t, s in self.timeline:
            if t > now:
                break
            since, state = t, s
        return since, state

    def plan(self, now: float, steps: builtins.list[tuple[float, ProviderState]]) -> None:
        """Replace whatever was still to come with ``steps`` (delays from ``now``)."""
        self.timeline = [(t, s) for t, s in self.timeline if t <= now]
        t = now
        for delay, state in steps:
            t += delay
            self.timeline.append((t, state))


@dataclass
class _Failures:
    left: int
    retryable: bool
    after: bool  # act, then fail: the answer was lost, the effect was not
    message: str


@dataclass
class _Used:
    op: str
    machine_id: str


@dataclass(kw_only=True, eq=False)
class FakeProvider(MachineProvider):
    """Machines that live in memory and move with ``clock``.

    ``boot_latency`` is seconds from booting to running, or a function of the spec (a
    pool of slow machines); ``provisioning_latency`` comes before it on create. Stops and
    terminations take ``stop_latency`` / ``terminate_latency`` (0: done at once).
    """

    clock: Callable[[], float] = time.time
    boot_latency: float | Callable[[MachineSpec], float] = 0.0
    provisioning_latency: float = 0.0
    stop_latency: float = 0.0
    terminate_latency: float = 0.0
    update_latency: float = 0.0
    capabilities: Capabilities = field(default_factory=lambda: Capabilities(fence=True, update=True))
    name: str = "fake"
    calls: Counter[str] = field(default_factory=Counter, init=False)
    actions: Counter[str] = field(default_factory=Counter, init=False)
    injected: Counter[str] = field(default_factory=Counter, init=False)
    _machines: dict[str, _Machine] = field(default_factory=dict, init=False)
    _tokens: dict[str, _Used] = field(default_factory=dict, init=False)
    _failures: dict[str, builtins.list[_Failures]] = field(default_factory=dict, init=False)
    _never_boot: builtins.list[Callable[[MachineSpec], bool]] = field(default_factory=builtins.list, init=False)
    _failing_updates: builtins.list[Callable[[MachineSpec], bool]] = field(default_factory=builtins.list, init=False)
    _vanished: set[str] = field(default_factory=set, init=False)
    _next_id: int = field(default=1, init=False)

    # -- fault injection -------------------------------------------------------------------

    def fail_calls(self, op: str, n: int = 1, *, retryable: bool = True, after: bool = False,
                   message: str | None = None) -> None:
        """The next ``n`` calls of ``op`` raise :class:`ProviderError`.

        ``after``: the call acts first and then fails, as when the provider did the work
        but the answer was lost — the case a token exists for.
        """
        if op not in OPS:
            raise ValueError(f"unknown provider operation {op!r}; one of {', '.join(OPS)}")
        self._failures.setdefault(op, []).append(_Failures(
            n, retryable, after, message or f"{op} failed (injected)"))

    def refuse_creates(self, n: int = 1, *, retryable: bool = True) -> None:
        """The next ``n`` creates fail without creating, like a cloud out of capacity or quota."""
        self.fail_calls("create", n, retryable=retryable,
                        message="insufficient capacity for a new machine (injected)")

    def never_boot(self, which: str | Callable[[MachineSpec], bool]) -> None:
        """Machines named ``which`` (or whose spec it accepts) stay booting (or rebooting)
        forever: applies to every boot that begins after this call."""
        self._never_boot.append(which if callable(which) else (lambda spec: spec.name == which))

    def fail_updates(self, which: str | Callable[[MachineSpec], bool]) -> None:
        """Updates of machines named ``which`` (or whose spec it accepts) end in ``failed``."""
        self._failing_updates.append(which if callable(which) else (lambda spec: spec.name == which))

    def vanish(self, machine_id: str) -> None:
        """The instance disappears behind our back: ``get`` raises MachineNotFound, ``list`` omits it."""
        self._machine(machine_id)
        self._vanished.add(machine_id)
        self.injected["vanish"] += 1

    # -- the provider ----------------------------------------------------------------------

    async def create(self, spec: MachineSpec, *, token: str) -> ProviderMachine:
        self._enter("create")
        used = self._tokens.get(token)
        if used is None:
            now = self.clock()
            machine = _Machine(f"fake-{self._next_id:04d}", spec, now, dict(spec.tags),
                               [(now, S.PROVISIONING)])
            self._next_id += 1
            machine.plan(now, [(self.provisioning_latency, S.BOOTING), *self._boot(spec)])
            self._machines[machine.id] = machine
            self._tokens[token] = _Used("create", machine.id)
            self.actions["create"] += 1
        else:
            self._check_reuse(token, used, "create", used.machine_id)
            machine = self._machine(used.machine_id)
        self._exit("create")
        return self._view(machine)

    async def start(self, machine_id: str, *, token: str) -> None:
        def act(m: _Machine, state: ProviderState, now: float) -> bool:
            if state in (S.STOPPED, S.STOPPING):
                m.detail = ""
                m.plan(now, [(0.0, S.BOOTING), *self._boot(m.spec)])
                return True
            return False

        self._mutate("start", machine_id, token, act)

    async def stop(self, machine_id: str, *, token: str, hibernate: bool = False) -> None:
        if hibernate and not self.capabilities.hibernate:
            self._enter("stop")
            raise ProviderError(f"{self.name}: this provider cannot hibernate", retryable=False)

        def act(m: _Machine, state: ProviderState, now: float) -> bool:
            if state in (S.STOPPED, S.STOPPING):
                return False
            m.detail = "hibernated" if hibernate else ""
            m.plan(now, [(0.0, S.STOPPING), (self.stop_latency, S.STOPPED)])
            return True

        self._mutate("stop", machine_id, token, act)

    async def reboot(self, machine_id: str, *, token: str) -> None:
        def act(m: _Machine, state: ProviderState, now: float) -> bool:
            if state not in (S.RUNNING, S.BOOTING, S.REBOOTING):
                raise ProviderError(f"{self.name}: cannot reboot {m.id}, it is {state}", retryable=False)
            m.plan(now, [(0.0, S.REBOOTING), *self._boot(m.spec)])
            return True

        self._mutate("reboot", machine_id, token, act)

    async def power_off(self, machine_id: str, *, token: str) -> None:
        if not self.capabilities.fence:
            self._enter("power_off")
            raise ProviderError(f"{self.name}: this provider cannot power machines off (no fence)",
                                retryable=False)

        def act(m: _Machine, state: ProviderState, now: float) -> bool:
            if state == S.STOPPED:
                return False
            m.detail = "powered off"
            m.plan(now, [(0.0, S.STOPPED)])
            return True

        self._mutate("power_off", machine_id, token, act)

    async def destroy(self, machine_id: str, *, token: str) -> None:
        def act(m: _Machine, state: ProviderState, now: float) -> bool:
            if state in (S.TERMINATING, S.TERMINATED):
                return False
            m.plan(now, [(0.0, S.TERMINATING), (self.terminate_latency, S.TERMINATED)])
            return True

        self._mutate("destroy", machine_id, token, act, dead_ok=True)

    async def tag(self, machine_id: str, tags: dict[str, str], *, token: str) -> None:
        def act(m: _Machine, state: ProviderState, now: float) -> bool:
            m.tags.update(tags)
            return True

        self._mutate("tag", machine_id, token, act, dead_ok=True)

    async def update(self, machine_id: str, *, token: str) -> None:
        if not self.capabilities.update:
            self._enter("update")
            raise ProviderError(f"{self.name}: this provider cannot update machines", retryable=False)

        def act(m: _Machine, state: ProviderState, now: float) -> bool:
            if state is S.UPDATING:
                return False
            if state is not S.RUNNING:
                raise ProviderError(f"{self.name}: cannot update {m.id}, it is {state}", retryable=False)
            if any(broken(m.spec) for broken in self._failing_updates):
                self.injected["update_fails"] += 1
                m.detail = "the update failed (injected)"  # read once it is failed
                m.plan(now, [(0.0, S.UPDATING), (self.update_latency, S.FAILED)])
            else:
                m.plan(now, [(0.0, S.UPDATING), (self.update_latency, S.RUNNING)])
            return True

        self._mutate("update", machine_id, token, act)

    async def get(self, machine_id: str) -> ProviderMachine:
        self._enter("get")
        machine = self._view(self._machine(machine_id))
        self._exit("get")
        return machine

    async def list(self, *, pool: str | None = None) -> builtins.list[ProviderMachine]:
        self._enter("list")
        found = [self._view(m) for m in self._machines.values()
                 if m.id not in self._vanished and (pool is None or m.spec.pool == pool)]
        self._exit("list")
        return found

    # -- the machinery ---------------------------------------------------------------------

    def _boot(self, spec: MachineSpec) -> builtins.list[tuple[float, ProviderState]]:
        """The rest of a boot: running after the boot latency, unless it never boots."""
        if any(stuck(spec) for stuck in self._never_boot):
            self.injected["never_boot"] += 1
            return []
        latency = self.boot_latency(spec) if callable(self.boot_latency) else self.boot_latency
        return [(latency, S.RUNNING)]

    def _mutate(self, op: str, machine_id: str, token: str,
                act: Callable[[_Machine, ProviderState, float], bool], *, dead_ok: bool = False) -> None:
        """One idempotent change: a token already used does nothing; ``act`` says whether
        it changed anything (a stop of a stopped machine is done, not an action)."""
        self._enter(op)
        used = self._tokens.get(token)
        if used is None:
            machine = self._machine(machine_id)
            now = self.clock()
            state = machine.at(now)[1]
            if state in (S.TERMINATING, S.TERMINATED) and not dead_ok:
                raise ProviderError(f"{self.name}: cannot {op} {machine_id}, it is {state}",
                                    retryable=False)
            if act(machine, state, now):
                self.actions[op] += 1
            self._tokens[token] = _Used(op, machine_id)
        else:
            self._check_reuse(token, used, op, machine_id)
        self._exit(op)

    def _check_reuse(self, token: str, used: _Used, op: str, machine_id: str) -> None:
        """A token names one order; the same token on another order is a caller's bug that
        would otherwise be answered "done" without acting."""
        if (used.op, used.machine_id) != (op, machine_id):
            raise ProviderError(f"{self.name}: token {token!r} was used for {used.op} of "
                                f"{used.machine_id}, not {op} of {machine_id}", retryable=False)

    def _enter(self, op: str) -> None:
        self.calls[op] += 1
        self._fail(op, after=False)

    def _exit(self, op: str) -> None:
        self._fail(op, after=True)

    def _fail(self, op: str, *, after: bool) -> None:
        for failure in self._failures.get(op, []):
            if failure.left > 0 and failure.after == after:
                failure.left -= 1
                self.injected[f"fail:{op}"] += 1
                raise ProviderError(f"{self.name}: {failure.message}", retryable=failure.retryable)

    def _machine(self, machine_id: str) -> _Machine:
        machine = self._machines.get(machine_id)
        if machine is None or machine_id in self._vanished:
            raise MachineNotFound(machine_id, f"{self.name}: no machine {machine_id!r}")
        return machine

    def _view(self, m: _Machine) -> ProviderMachine:
        since, state = m.at(self.clock())
        return ProviderMachine(id=m.id, name=m.spec.name, pool=m.spec.pool, state=state,
                               tags=dict(m.tags), created_at=m.created_at, state_since=since,
                               detail=m.detail)
