"""Shared fixtures: a live orchestrator over real HTTP, simulated fleets, stores.

Layers (STYLE 6): ``unit/`` touches nothing outside the process; ``integration/`` uses a
real SQLite file and a real server on a loopback port; ``acceptance/`` runs the real CLI
as separate processes and kills them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import tempfile
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


# -- the servers every test process shares -----------------------------------------------------------
#: where the lock between test processes lives: every run on this host shares the test
#: PostgreSQL server, whichever clone or worker it comes from
SHARED_LOCKS = Path(tempfile.gettempdir()) / "deskfleet-tests"


@contextlib.contextmanager
def _shared_servers(*, exclusive: bool) -> Iterator[None]:
    """A readers-writer lock between processes (flock) over the servers tests share: a test
    holds it shared; one marked ``exclusive`` (it stops or restarts the test PostgreSQL)
    holds it alone, so that no other worker's test meets a server it took down. The
    turnstile comes first: once an exclusive test waits, no new test slips in before it,
    and a stream of shared holders cannot starve it."""
    SHARED_LOCKS.mkdir(exist_ok=True)
    with open(SHARED_LOCKS / "turnstile.lock", "a") as turnstile, open(SHARED_LOCKS / "servers.lock", "a") as servers:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(servers, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            if not exclusive:
                fcntl.flock(turnstile, fcntl.LOCK_UN)
        yield  # closing the files releases what is held


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Each test's setup, call and teardown — module fixtures' too — under the shared lock."""
    with _shared_servers(exclusive=item.get_closest_marker("exclusive") is not None):
        yield


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
