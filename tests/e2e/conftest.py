"""Fixtures for end-to-end tests on real X displays: Xvfb, DemoEHR, real agents.

Every machine here is a real Xvfb server with the real DemoEHR process on it, driven
through mss and pynput by real agents connected to a real orchestrator over loopback.
Nothing is skipped: without Xvfb or tesseract's English data the tests fail, saying
what to install (CI installs both).
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from deskfleet.demoapp import credentials
from deskfleet.desktop.launch import XvfbFleet, XvfbFleetConfig
from deskfleet.errors import ConfigError
from support import LiveServer, register_accounts, wait_ready


@pytest.fixture(autouse=True)
def _real_desktop_prerequisites() -> None:
    missing = []
    if shutil.which("Xvfb") is None:
        missing.append("Xvfb (apt-get install xvfb)")
    try:
        from deskfleet.vision.ocr import find_tessdata

        find_tessdata()
    except ConfigError:
        missing.append("tesseract's English data (apt-get install tesseract-ocr-eng)")
    try:
        import tkinter  # noqa: F401
    except ImportError:
        missing.append("Tk for Python (apt-get install python3-tk, or a Python built with Tk)")
    if missing:
        pytest.fail("end-to-end tests need " + " and ".join(missing), pytrace=False)


@pytest.fixture
def e2e_server(server_factory: Callable[..., LiveServer]) -> LiveServer:
    """An orchestrator with heartbeats a loaded 2-core machine keeps up with while it
    renders, captures and reads real screens."""
    return server_factory(heartbeat_interval=0.3, heartbeat_timeout=3.0, stop_grace=3.0)


@pytest.fixture
async def real_fleet(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Start Xvfb machines with DemoEHR and real agents in the test's event loop."""
    fleets: list[tuple[XvfbFleet, asyncio.Task[None]]] = []

    async def make(server: LiveServer, count: int = 1, **overrides: Any) -> XvfbFleet:
        values: dict[str, Any] = {
            "servers": [server.url], "count": count, "enrolment_token": server.token,
            "prefix": f"x{len(fleets)}", "state_dir": tmp_path / f"agents{len(fleets)}",
            "data": tmp_path / "demoehr.db", "log_dir": tmp_path / "logs", "screenshots": "evidence",
        }
        values.update(overrides)
        # Agents get DemoEHR's accounts from the vault; a robot logs in on one machine at a time.
        await register_accounts(server, credentials(values.get("seed", 0)), app="demoehr", max_sessions=1)
        fleet = XvfbFleet(XvfbFleetConfig(**values))
        await fleet.start()
        task = asyncio.create_task(fleet.run())
        fleets.append((fleet, task))
        await wait_ready(server, {a.machine_id for a in fleet.agents}, timeout=60)
        return fleet

    yield make
    for fleet, task in fleets:
        await fleet.shutdown()
        try:
            await asyncio.wait_for(task, 10)
        except (TimeoutError, asyncio.CancelledError):
            task.cancel()
        await fleet.close()
