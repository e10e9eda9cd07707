"""Hints between orchestrator replicas (over ``fleet.bus``): "schedule now", "this run is
final", "the catalogue changed", "stop this attempt", "verify this machine". A hint only
saves time; each has a slower fallback, so a lost one delays, never breaks.

Services send hints through the :class:`Hints` protocol; the composition root says which
service handles each kind that arrives (:meth:`Replicas.on`).

Hints go out one notification per kind at a time: those given while one is being sent wait
and go together in the next, their payloads one per line (a replica ending hundreds of runs
a second sends a few notifications a second, not hundreds, each its own round trip and
transaction on PostgreSQL).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

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
        self._outbox: dict[str, dict[str, None]] = {}  # kind → payloads, in order, each once
        self._sender: asyncio.Task[None] | None = None

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
        # One line each (a quarantine's reason may have several: the hint needs only its gist).
        self._outbox.setdefault(kind, {})[" ".join(payload.splitlines())] = None
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._send(), name="deskfleet-hints")

    async def _send(self) -> None:
        while self._outbox:
            outbox, self._outbox = self._outbox, {}
            for kind, payloads in outbox.items():
                for chunk in _chunks(list(payloads), PAYLOAD_MAX - len(kind) - 64):
                    await self.bus.publish(kind, "\n".join(chunk))

    def _received(self, kind: str, payload: str) -> None:
        handler = self._handlers.get(kind)
        if handler is not None:
            for one in payload.split("\n"):
                handler(one)


#: PostgreSQL refuses a notification whose payload is 8,000 bytes or more
PAYLOAD_MAX = 7900


def _chunks(payloads: list[str], limit: int) -> list[list[str]]:
    """``payloads`` in order, in groups whose lines joined stay under ``limit`` bytes."""
    out: list[list[str]] = [[]]
    size = 0
    for p in payloads:
        n = len(p.encode()) + 1
        if out[-1] and size + n > limit:
            out.append([])
            size = 0
        out[-1].append(p)
        size += n
    return out
