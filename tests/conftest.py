"""Shared fixtures: a live orchestrator over real HTTP, simulated fleets, stores.

Layers (STYLE 6): ``unit/`` touches nothing outside the process; ``integration/`` uses a
real SQLite file and a real server on a loopback port; ``acceptance/`` runs the real CLI
as separate processes and kills them.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from deskfleet.store import Store, open_store
from support import LiveServer, fast_settings, register_sim_accounts, start_server, wait_ready

# -- the suite's shape: what runs by default, and on how many workers ----------------------------

def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true",
                     help="also run the whole-system measurements marked slow (left out by default)")


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto`` (pyproject's default): a worker per core, at most 4, for the whole suite;
    none when tests are named on the command line, so a focused run starts at once."""
    if config.args_source is pytest.Config.ArgsSource.ARGS:
        return 0
    return min(os.cpu_count() or 1, 4)


def _slow_left_out(config: pytest.Config) -> bool:
    return not config.getoption("--slow") and not config.option.markexpr


def pytest_report_header(config: pytest.Config) -> str | None:
    if _slow_left_out(config):
        return "tests marked slow (whole-system measurements) are left out: --slow adds them, -m slow runs only them"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not _slow_left_out(config):
        return
    slow = [item for item in items if item.get_closest_marker("slow") is not None]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if item.get_closest_marker("slow") is None]


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., LiveServer]]:
    started: list[LiveServer] = []

    def make(*, providers: dict[str, Any] | None = None, **overrides: Any) -> LiveServer:
        s = start_server(fast_settings(overrides.pop("data_dir", tmp_path / "server"), **overrides), providers)
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
