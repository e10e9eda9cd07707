"""Hints between orchestrator replicas (over ``fleet.bus``): "schedule now", "this run is
final", "the catalogue changed", "stop this attempt", "verify this machine". A hint only
saves time; each has a slower fallback, so a lost one delays, never breaks.

Services send hints through the :class:`Hints` protocol; the composition root says which
service handles each kind that arrives (:meth:`Replicas.on`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

from ..fleet.bus import LocalBus, PgBus


class Hints(Protocol):
    def hint(self, kind: str, payload: str = "") -> None:
        """Tell the other replicas; never waits, never fails the caller."""


class Replicas:
    """This replica's end of the bus. With SQLite there is one replica and hints go nowhere."""

    def __init__(self, bus: LocalBus | PgBus, *, multi: bool) -> None:
        self.bus = bus
        self.multi = multi
        self._handlers: dict[str, Callable[[str], None]] = {}
        self._sending: set[asyncio.Task[Any]] = set()

    def on(self, kind: str, handler: Callable[[str], None]) -> None:
        """``handler(payload)`` for each hint of ``kind`` from another replica."""
        self._handlers[kind] = handler

    async def start(self) -> None:
        await self.bus.start(self._received)

    async def close(self) -> None:
        await self.bus.close()

    def hint(self, kind: str, payload: str = "") -> None:
        if not self.multi:
            return
        task = asyncio.get_running_loop().create_task(self.bus.publish(kind, payload))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    def _received(self, kind: str, payload: str) -> None:
        handler = self._handlers.get(kind)
        if handler is not None:
            handler(payload)
