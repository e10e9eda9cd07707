"""Retrying a provider's transient failures, safely.

Cloud and hypervisor APIs throttle, run out of capacity for a minute and time out; the
fleet manager should not have to care. :class:`Retrying` wraps any provider and retries
a call that failed with a retryable :class:`ProviderError` or a timeout, with exponential
backoff and full jitter (each wait uniform in ``[0, min(cap, base·2^n)]``, so a fleet of
callers that failed together does not retry together). Every retry passes the caller's
*same* token: a create whose first try did create (and whose answer was lost) is answered
with that machine, never doubled.

``stats[op]`` counts attempts, retries and final failures of each operation, for tests
and metrics.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import random
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from .base import MachineProvider, MachineSpec, ProviderError, ProviderMachine

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class OpStats:
    attempts: int = 0  # calls made to the wrapped provider
    retries: int = 0  # of which were retries
    failures: int = 0  # calls that failed for good (not retryable, or out of attempts or time)


class Retrying(MachineProvider):
    """``inner`` with its transient failures retried.

    Gives up after ``attempts`` tries or, with a ``deadline``, when the next wait would end
    more than ``deadline`` seconds after the first try began — whichever comes first — and
    raises the last error. ``attempt_timeout`` bounds each try: a provider that hangs is
    treated like one that timed out (retryable), since the token makes the retry safe.
    ``sleep``, ``clock`` and ``rng`` are injectable so tests run without waiting.
    """

    def __init__(
        self,
        inner: MachineProvider,
        *,
        base: float = 0.5,
        cap: float = 30.0,
        attempts: int = 5,
        deadline: float | None = None,
        attempt_timeout: float | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.inner = inner
        self.name = inner.name
        self.capabilities = inner.capabilities
        self.base, self.cap, self.attempts, self.deadline = base, cap, attempts, deadline
        self.attempt_timeout = attempt_timeout
        self._sleep, self._clock, self._rng = sleep, clock, rng
        self.stats: defaultdict[str, OpStats] = defaultdict(OpStats)

    async def create(self, spec: MachineSpec, *, token: str) -> ProviderMachine:
        return await self._call("create", spec.name, lambda: self.inner.create(spec, token=token))

    async def start(self, machine_id: str, *, token: str) -> None:
        await self._call("start", machine_id, lambda: self.inner.start(machine_id, token=token))

    async def stop(self, machine_id: str, *, token: str, hibernate: bool = False) -> None:
        await self._call("stop", machine_id,
                         lambda: self.inner.stop(machine_id, token=token, hibernate=hibernate))

    async def reboot(self, machine_id: str, *, token: str) -> None:
        await self._call("reboot", machine_id, lambda: self.inner.reboot(machine_id, token=token))

    async def power_off(self, machine_id: str, *, token: str) -> None:
        await self._call("power_off", machine_id, lambda: self.inner.power_off(machine_id, token=token))

    async def destroy(self, machine_id: str, *, token: str) -> None:
        await self._call("destroy", machine_id, lambda: self.inner.destroy(machine_id, token=token))

    async def get(self, machine_id: str) -> ProviderMachine:
        return await self._call("get", machine_id, lambda: self.inner.get(machine_id))

    async def list(self, *, pool: str | None = None) -> builtins.list[ProviderMachine]:
        return await self._call("list", None, lambda: self.inner.list(pool=pool))

    async def tag(self, machine_id: str, tags: dict[str, str], *, token: str) -> None:
        await self._call("tag", machine_id, lambda: self.inner.tag(machine_id, tags, token=token))

    async def update(self, machine_id: str, *, token: str) -> None:
        await self._call("update", machine_id, lambda: self.inner.update(machine_id, token=token))

    def backoff(self, retry: int) -> float:
        """The wait before retry number ``retry`` (1, 2…): full jitter under an exponential cap."""
        return self._rng() * min(self.cap, self.base * 2.0 ** (retry - 1))

    async def _call(self, op: str, machine: str | None, call: Callable[[], Awaitable[T]]) -> T:
        stats = self.stats[op]
        began = self._clock()
        tries = 0
        while True:
            tries += 1
            stats.attempts += 1
            if tries > 1:
                stats.retries += 1
            try:
                async with asyncio.timeout(self.attempt_timeout):
                    return await call()
            except ProviderError as exc:
                error = exc
            except TimeoutError as exc:
                after = f" after {self.attempt_timeout:g}s" if self.attempt_timeout else ""
                error = ProviderError(f"{self.name}: {op} timed out{after}", retryable=True)
                error.__cause__ = exc
            delay = self.backoff(tries)
            out_of_time = self.deadline is not None and self._clock() + delay - began > self.deadline
            if not error.retryable or tries >= self.attempts or out_of_time:
                stats.failures += 1
                raise error
            log.info("provider %s: %s of %s failed (%s); retry %d of %d in %.2fs",
                     self.name, op, machine or "-", error.message, tries, self.attempts - 1, delay,
                     extra={"machine": machine})
            await self._sleep(delay)
