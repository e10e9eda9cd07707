"""The store runner: the server's way to the store, on worker threads, so that the event loop
never blocks on I/O. Operations that a deadlock or a conflict rolled back run again; agents'
writes and clients' submits may share a transaction (group commit, :meth:`StoreRunner.write`).

Both ways in are typed with the operation's own parameters (``ParamSpec``):
``db(store.get_run, 42)`` is a type error, as ``store.get_run(42)`` would be
(tests/unit/test_store_runner_types.py holds mypy to it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from ..errors import StoreRetry, StoreUnavailable
from .base import Store

log = logging.getLogger(__name__)
T = TypeVar("T")
P = ParamSpec("P")

RETRIES = 4  # store operations rolled back by a deadlock or conflict are run again this often
BATCH_MAX = 256  # agent writes applied in one transaction at most


class StoreRunner:
    """Runs store operations on worker threads, so the event loop never blocks on I/O.

    One thread for SQLite: it admits one writer at a time anyway, and a single writer never
    meets "database is locked" from itself. A few for PostgreSQL, whose row locks let
    different agents' writes proceed side by side (one agent's messages are still handled
    in order: the hub awaits each before reading the next).
    """

    def __init__(self, store: Store, threads: int = 1) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.store = store
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="deskfleet-store")
        self._batching = bool(getattr(store, "batches_writes", False))
        # Batches applied side by side (PostgreSQL: row locks, taken by every batch in one
        # order), each on a thread of its own; one thread stays for everything else.
        self._lanes = max(1, min(int(getattr(store, "batch_lanes", 1)), threads - 1))
        self._queued: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], asyncio.Future[Any]]] = []
        self._flushers: set[asyncio.Task[None]] = set()

    async def __call__(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        for attempt in range(RETRIES):
            try:
                return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))
            except StoreRetry:
                # The database broke a deadlock or a conflict by rolling this one back:
                # every operation is one transaction, so running it again is safe.
                if attempt == RETRIES - 1:
                    raise
                await asyncio.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    async def write(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """A write that may share a transaction (``store.attempt_*``, ``store.finish_attempt``,
        ``store.submit``: see ``Store.batch``). Where the store gains from it (SQLite, one
        writer at a time; PostgreSQL, a commit and round trips per transaction), writes that
        arrive while a transaction is being applied wait and go together in the next one — a
        group commit: one commit (one fsync) for many agents' reports and clients' submits.
        Each still answers on its own, only once it is committed."""
        if not self._batching:
            return await self(fn, *args, **kwargs)
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queued.append((fn, args, kwargs, fut))
        # (A flusher that found the queue empty is done at once, before its done-callbacks run.)
        self._flushers = {f for f in self._flushers if not f.done()}
        if len(self._flushers) < self._lanes:
            self._flushers.add(asyncio.get_running_loop().create_task(self._flush()))
        return await fut

    async def _flush(self) -> None:
        while self._queued:
            items, self._queued = self._queued[:BATCH_MAX], self._queued[BATCH_MAX:]
            try:
                results = await self(self.store.batch, [(fn, args, kwargs) for fn, args, kwargs, _ in items])
            except asyncio.CancelledError:
                # The server is stopping: no write may be left waiting for an answer for ever.
                for *_, fut in items + self._queued:
                    fut.cancel()
                self._queued = []
                raise
            except StoreUnavailable as exc:
                for *_, fut in items:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            except Exception:
                # Something unexpected rolled the batch back: each on its own, so that only
                # the write at fault fails.
                log.warning("a batch of %d writes failed; applying them one by one", len(items), exc_info=True)
                for fn, args, kwargs, fut in items:
                    try:
                        result = await self(fn, *args, **kwargs)
                    except Exception as exc:
                        if not fut.done():
                            fut.set_exception(exc)
                    else:
                        if not fut.done():
                            fut.set_result(result)
                continue
            for (*_, fut), result in zip(items, results, strict=True):
                if fut.done():
                    continue
                if isinstance(result, Exception):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
