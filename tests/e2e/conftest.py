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

from deskfleet import AgentHost, AgentHostConfig, load_pack
from deskfleet.demoapp import credentials
from deskfleet.demoapp.__main__ import parse
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


class RealFleet:
    """DemoEHR machines on Xvfb with their agents (an AgentHost), and DemoEHR's records file."""

    def __init__(self, host: AgentHost, data: Path) -> None:
        self.host = host
        self.data = data  # DemoEHR's records file, shared by the machines
        self.names = host.names
        self.agents = host.agents
        self.desktops = host.desktops
        self.model = host.model


@pytest.fixture
async def real_fleet(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Start Xvfb machines with DemoEHR (the demoehr pack) and real agents in the test's event loop.

    ``app_options``: DemoEHR's switches for every machine; ``machine_options``: more for some."""
    fleets: list[tuple[AgentHost, asyncio.Task[None]]] = []
    pack = load_pack("demoehr")

    async def make(server: LiveServer, count: int = 1, *, app_options: list[str] | None = None,
                   machine_options: dict[str, list[str]] | None = None, seed: int = 0, **overrides: Any) -> RealFleet:
        options = [f"--seed={seed}", *(app_options or [])]
        idle = parse(["--data", "x", *options]).session_timeout  # DemoEHR's idle logout, as it reads it
        values: dict[str, Any] = {
            "servers": [server.url], "packs": [pack], "desktop": "xvfb", "count": count,  # packs= may override
            "enrolment_token": server.token, "machine": f"x{len(fleets)}",
            "state_dir": tmp_path / f"agents{len(fleets)}", "data_dir": tmp_path / "data",
            "log_dir": tmp_path / "logs", "screenshots": "evidence",
            "app_args": {"demoehr": options}, "machine_args": machine_options or {},
            "idle_timeouts": {"demoehr": idle} if idle else {},
            "upkeep": False,  # sessions expire here as the tests expect; tests of upkeep turn it on
        }
        values.update(overrides)
        # Agents get DemoEHR's accounts from the vault; a robot logs in on one machine at a time.
        await register_accounts(server, credentials(seed), app="demoehr", max_sessions=1)
        host = AgentHost(AgentHostConfig(**values))
        await host.start()
        task = asyncio.create_task(host.run())
        fleets.append((host, task))
        await wait_ready(server, {a.machine_id for a in host.agents}, timeout=60)
        return RealFleet(host, tmp_path / "data" / "demoehr" / "demoehr.db")

    yield make
    for host, task in fleets:
        await host.shutdown()
        try:
            await asyncio.wait_for(task, 10)
        except (TimeoutError, asyncio.CancelledError):
            task.cancel()
        await host.close()
