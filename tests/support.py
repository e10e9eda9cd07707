"""Helpers for tests (importable as ``support``: pytest puts tests/ on the path)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_ready(server: Any, machines: set[str], timeout: float = 20.0) -> None:
    store = server.view()
    deadline = time.monotonic() + timeout
    while True:
        ready = {m.id for m in store.list_machines() if m.schedulable}
        if machines <= ready:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"machines not ready: {sorted(machines - ready)}")
        await asyncio.sleep(0.05)


async def eventually(check: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    """Poll until ``check()`` returns something truthy; fail with its last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last: {last!r})")


