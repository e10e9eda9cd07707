"""Shared fixtures: a live orchestrator over real HTTP, simulated fleets, stores.

Layers (STYLE 6): ``unit/`` touches nothing outside the process; ``integration/`` uses a
real SQLite file and a real server on a loopback port; ``acceptance/`` runs the real CLI
as separate processes and kills them.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from deskfleet.api import create_app
from deskfleet.client import Client
from deskfleet.config import ServerSettings
from deskfleet.orchestrator import Orchestrator
from deskfleet.store import Store, open_store
from support import eventually, free_port, wait_ready  # noqa: F401 - re-exported for tests


def fast_settings(data_dir: Path, **overrides: Any) -> ServerSettings:
    """Short heartbeats and sweeps so that failover happens in test time."""
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "heartbeat_interval": 0.2,
        "heartbeat_timeout": 1.0,
        "stop_grace": 1.5,
        "sweep_interval": 0.05,
        "schedule_tick": 0.1,
        "verify_interval": 0.3,
        "sqlite_synchronous": "NORMAL",
    }
    values.update(overrides)
    return ServerSettings(**values)


@dataclass
class LiveServer:
    """An orchestrator serving real HTTP on a loopback port, in a background thread."""

    settings: ServerSettings
    orch: Orchestrator
    url: str
    _server: uvicorn.Server
    _thread: threading.Thread
    _views: list[Store] = field(default_factory=list)

    @property
    def token(self) -> str:
        return self.orch.enrolment_token

    def client(self, api_key: str | None = None) -> Client:
        return Client(self.url, api_key=api_key or self.settings.api_key)

    def view(self) -> Store:
        """A second store on the same database file, for reading what the server wrote."""
        store = open_store(self.settings.db_url, migrate=False)
        self._views.append(store)
        return store

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(15)
        for v in self._views:
            v.close()


def start_server(settings: ServerSettings) -> LiveServer:
    orch = Orchestrator(settings)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port if settings.port != 8470 else 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(orch), log_config=None, lifespan="on", ws_max_size=16 << 20)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    return LiveServer(settings, orch, f"http://127.0.0.1:{port}", server, thread)


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., LiveServer]]:
    started: list[LiveServer] = []

    def make(**overrides: Any) -> LiveServer:
        s = start_server(fast_settings(overrides.pop("data_dir", tmp_path / "server"), **overrides))
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


@pytest.fixture
def live_server(server_factory: Callable[..., LiveServer]) -> LiveServer:
    return server_factory()


@pytest.fixture
async def fleet_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Start simulated machines (real agents, real connections) in the test's event loop."""
    from deskfleet.sim.fleet import SimFleet, SimFleetConfig

    fleets: list[tuple[SimFleet, asyncio.Task[None]]] = []

    async def make(server: LiveServer, count: int = 3, *, ready: bool = True, **overrides: Any) -> SimFleet:
        values: dict[str, Any] = {
            "servers": [server.url], "count": count, "enrolment_token": server.token,
            "state_dir": tmp_path / f"agents{len(fleets)}", "backend": tmp_path / "ehr.db",
            "action_delay": 0.0, "screenshots": "none",
        }
        values.update(overrides)
        fleet = SimFleet(SimFleetConfig(**values))
        task = asyncio.create_task(fleet.run())
        fleets.append((fleet, task))
        if ready:
            await wait_ready(server, {a.machine_id for a in fleet.agents})
        return fleet

    yield make
    for fleet, task in fleets:
        await fleet.shutdown()
        try:
            await asyncio.wait_for(task, 10)
        except (TimeoutError, asyncio.CancelledError):
            task.cancel()
        fleet.backend.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A migrated store on a real SQLite file."""
    s = open_store(f"sqlite:///{tmp_path / 'store.db'}", sqlite_synchronous="NORMAL")
    yield s
    s.close()
