"""Hints between orchestrator replicas: a run was queued, a run ended, an attempt must stop.

With several replicas (PostgreSQL), the replica that learns something is often not the
one that must act on it: a run submitted through replica A should wake replica B, whose
connected agent is idle; a cancel arriving at A must reach the agent connected to B; a
client long-polling on B should hear that the run ended at A. PostgreSQL's LISTEN/NOTIFY
carries these hints. They are hints only: every one of them has a slower fallback (the
scheduler's tick, stop orders re-sent from the database, long-polls that re-read), so a
lost notification delays, it never loses.

With the embedded SQLite store there is one orchestrator, and the bus is a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

Handler = Callable[[str, str], None]  # (kind, payload)


class LocalBus:
    """One orchestrator: nobody else to tell."""

    async def start(self, handler: Handler) -> None:
        del handler

    async def publish(self, kind: str, payload: str = "") -> None:
        del kind, payload

    async def close(self) -> None:
        pass


class PgBus:
    """LISTEN/NOTIFY on one channel; messages are ``kind|origin|payload``; a replica ignores
    its own."""

    def __init__(self, url: str, origin: str) -> None:
        from ..store.postgres import CHANNEL, libpq_url

        self._url = libpq_url(url)
        self._channel = CHANNEL
        self._origin = origin
        self._listener: asyncio.Task[None] | None = None
        self._publisher: Any = None
        self._publish_lock = asyncio.Lock()
        self.connected = asyncio.Event()

    async def start(self, handler: Handler) -> None:
        self._listener = asyncio.create_task(self._listen(handler), name="deskfleet-bus")

    async def _listen(self, handler: Handler) -> None:
        import psycopg

        delay = 0.2
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._url, autocommit=True, connect_timeout=5, application_name="deskfleet-bus"
                ) as conn:
                    await conn.execute(f"LISTEN {self._channel}")
                    self.connected.set()
                    delay = 0.2
                    async for note in conn.notifies():
                        kind, _, rest = note.payload.partition("|")
                        origin, _, payload = rest.partition("|")
                        if origin != self._origin:
                            handler(kind, payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure here: listen again, later
                log.warning("bus connection lost (%s); reconnecting", _first_line(exc))
            self.connected.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def publish(self, kind: str, payload: str = "") -> None:
        import psycopg

        message = f"{kind}|{self._origin}|{payload}"
        async with self._publish_lock:
            try:
                if self._publisher is None or self._publisher.closed:
                    self._publisher = await psycopg.AsyncConnection.connect(
                        self._url, autocommit=True, connect_timeout=5, application_name="deskfleet-bus"
                    )
                await self._publisher.execute("SELECT pg_notify(%s, %s)", (self._channel, message))
            except psycopg.Error as exc:
                # A hint lost: the fallbacks cover it (see the module's docstring).
                log.info("could not publish %s (%s)", kind, _first_line(exc))
                self._publisher = None

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
        if self._publisher is not None:
            with contextlib.suppress(Exception):
                await self._publisher.close()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
