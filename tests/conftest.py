"""Shared fixtures: a live orchestrator over real HTTP, simulated fleets, stores.

Layers (STYLE 6): ``unit/`` touches nothing outside the process; ``integration/`` uses a
real SQLite file and a real server on a loopback port; ``acceptance/`` runs the real CLI
as separate processes and kills them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from deskfleet.store import Store, open_store
from support import LiveServer, fast_settings, register_sim_accounts, start_server, wait_ready


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

    async def make(server: LiveServer, count: int = 3, *, ready: bool = True, accounts: bool = True,
                   **overrides: Any) -> SimFleet:
        values: dict[str, Any] = {
            "servers": [server.url], "count": count, "enrolment_token": server.token,
            "state_dir": tmp_path / f"agents{len(fleets)}", "backend": tmp_path / "ehr.db",
            "action_delay": 0.0, "screenshots": "none",
        }
        values.update(overrides)
        if accounts:
            # Agents get their accounts from the vault: SimEHR's demo accounts, each allowed on
            # every machine at once (SimEHR does not end an older session).
            await register_sim_accounts(server, seed=values.get("seed", 1), max_sessions=count)
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
