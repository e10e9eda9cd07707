"""Helpers for tests, importable as ``support`` (pytest puts tests/ on the path).

Fixtures live in conftest.py files; everything a test module imports lives here, so that
no test ever imports a conftest (several share that module name).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn

from deskfleet.api import create_app
from deskfleet.client import Client
from deskfleet.config import ServerSettings
from deskfleet.logs import JsonFormatter, TextFormatter
from deskfleet.models import Run, RunState
from deskfleet.orchestrator import Orchestrator
from deskfleet.store import SQLStore, Store, open_store


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


@contextlib.asynccontextmanager
async def running_agent(server: Any, agent: Any, machine: str) -> AsyncIterator[Any]:
    """``agent`` (a ``deskfleet.Agent``) running in this event loop until the block ends, its
    machine ready on ``server`` when the block begins."""
    task = asyncio.create_task(agent.run())
    await wait_ready(server, {machine})
    try:
        yield agent
    finally:
        await agent.shutdown()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)


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




async def register_accounts(server: Any, credentials: Mapping[str, Any], *, app: str | None,
                            max_sessions: int = 1) -> None:
    """Put an app's demo accounts in the server's vault, each allowed at least
    ``max_sessions`` sessions (a second fleet on the same server keeps the larger limit)."""
    from deskfleet.client import AsyncClient

    async with AsyncClient(server.url, api_key=server.settings.api_key) as c:
        existing = {a["name"]: a["max_sessions"] for a in await c.accounts()}
        for name, cred in credentials.items():
            await c.put_account(name, app=app, username=cred.username, password=cred.password,
                                totp_seed=cred.totp_seed, max_sessions=max(max_sessions, existing.get(name, 0)))


async def register_sim_accounts(server: Any, *, seed: int = 1, max_sessions: int = 1) -> None:
    """SimEHR's demo accounts for ``seed`` (pack ``simehr``)."""
    from deskfleet.sim import SimBackend

    await register_accounts(server, SimBackend.credentials(seed), app="simehr", max_sessions=max_sessions)


def fast_settings(data_dir: Path, **overrides: Any) -> ServerSettings:
    """Short heartbeats and sweeps so that failover happens in test time.

    Leases last 3 s: long enough that a host busy with the suite's workers (a browser
    starting, another worker's desktops) does not stall a test's own process past one — CI
    lost a lease that way with 1 s — and short enough for failover tests. A test about a
    stall or a pause sets the timeout it needs."""
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "heartbeat_interval": 0.2,
        "heartbeat_timeout": 3.0,
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


def start_server(settings: ServerSettings, providers: dict[str, Any] | None = None) -> LiveServer:
    """``providers``: machine providers by name, instead of those ``settings`` configures."""
    orch = Orchestrator(settings, providers=providers)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it: without it a response written in two parts waits for
    # the client's delayed ACK (~40 ms a request on Linux).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((settings.host, settings.port if settings.port != 8470 else 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(orch), log_config=None, lifespan="on", ws_max_size=16 << 20,
                            ws_per_message_deflate=False, ws_ping_interval=None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    return LiveServer(settings, orch, f"http://127.0.0.1:{port}", server, thread)


# -- PostgreSQL for tests --------------------------------------------------------------------------
PG_ENV = "DESKFLEET_TEST_PG"
PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432/postgres"


class PgServer:
    """Hands out fresh databases on the test PostgreSQL server (``$DESKFLEET_TEST_PG``):
    each a copy of a migrated template, as Procrastinate's tests do — fast and isolated.
    A server that cannot be reached is a failure, not a skip."""

    _template: str | None = None

    def __init__(self) -> None:
        import os

        self.admin_url = os.environ.get(PG_ENV, PG_DEFAULT)
        self.created: list[str] = []

    def _admin(self) -> Any:
        import psycopg

        from deskfleet.store.postgres import libpq_url

        try:
            return psycopg.connect(libpq_url(self.admin_url), autocommit=True, connect_timeout=5)
        except psycopg.OperationalError as exc:
            raise RuntimeError(
                f"cannot reach the test PostgreSQL server at {self.admin_url} ({exc}); start one "
                f"(./dev test does) or point {PG_ENV} at one"
            ) from exc

    def url_for(self, db: str) -> str:
        from sqlalchemy.engine import make_url

        return make_url(self.admin_url).set(database=db).render_as_string(hide_password=False)

    def template(self) -> str:
        import os
        import uuid

        if PgServer._template is None:
            name = f"deskfleet_tpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
            with self._admin() as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
            store = open_store(self.url_for(name))  # migrates
            store.close()
            PgServer._template = name
            import atexit

            atexit.register(PgServer._drop_template, self.admin_url)
        return PgServer._template

    @staticmethod
    def _drop_template(admin_url: str) -> None:
        import contextlib

        import psycopg

        from deskfleet.store.postgres import libpq_url

        with contextlib.suppress(psycopg.Error), psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{PgServer._template}" WITH (FORCE)')

    def new_database(self) -> str:
        import uuid

        template = self.template()
        name = f"deskfleet_t_{uuid.uuid4().hex[:12]}"
        with self._admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        self.created.append(name)
        return self.url_for(name)

    def drop_all(self) -> None:
        with self._admin() as conn:
            for name in self.created:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.created.clear()


# -- store backends (the store suite runs on each) -------------------------------------------------

@dataclass
class Backend:
    """A database server for the suite: hands out fresh, empty databases."""

    name: str
    new_url: Callable[[], str]
    url: str = ""
    opened: list[SQLStore] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.url = self.new_url()

    def open(self, url: str | None = None, *, migrate: bool = False) -> SQLStore:
        """Another store (its own engine and connections) on the test's database."""
        store = open_store(url or self.url, migrate=migrate, sqlite_synchronous="NORMAL")
        assert isinstance(store, SQLStore)
        self.opened.append(store)
        return store

    def fresh(self) -> SQLStore:
        """A migrated store on a new database (for property tests: one per example)."""
        return self.open(self.new_url(), migrate=True)

    def close(self) -> None:
        for s in self.opened:
            s.close()


def _sqlite_backend(tmp_path: Path) -> Backend:
    n = itertools.count()
    return Backend("sqlite", lambda: f"sqlite:///{tmp_path / f'store{next(n)}.db'}")


class _PgBackend(Backend):
    server: PgServer | None = None
    scratch: str = ""

    def fresh(self) -> SQLStore:
        """One database for every example, emptied before each: TRUNCATE takes milliseconds
        where CREATE and DROP DATABASE take most of a second each. The previous example's
        store must be closed (a state machine's teardown does it); a connection it left open
        would hold TRUNCATE up, and is cut off."""
        import psycopg

        from deskfleet.store.postgres import libpq_url

        if not self.scratch:
            self.scratch = self.new_url()
            return self.open(self.scratch, migrate=True)
        with psycopg.connect(libpq_url(self.scratch), autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = current_database() AND pid <> pg_backend_pid()")
            tables = [r[0] for r in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'alembic_version'")]
            conn.execute("TRUNCATE " + ", ".join(f'"{t}"' for t in tables) + " RESTART IDENTITY CASCADE")
        return self.open(self.scratch)

    def close(self) -> None:
        super().close()
        if self.server is not None:
            self.server.drop_all()


def _postgres_backend(tmp_path: Path) -> Backend:
    """A fresh database per call (CREATE DATABASE … TEMPLATE, as Procrastinate does) on the
    server named by $DESKFLEET_TEST_PG; an unreachable server fails the test."""
    server = PgServer()
    b = _PgBackend("postgresql", server.new_database)
    b.server = server
    return b


BACKENDS: dict[str, Callable[[Path], Backend]] = {"sqlite": _sqlite_backend, "postgresql": _postgres_backend}


# -- logs, as the product formats them (invariant 6: secrets never in them) ---------------------------

class Capture(logging.Handler):
    """Every log record, formatted every way the product formats logs."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[str, str]] = []
        self._text, self._json = TextFormatter(), JsonFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        for name in ("run", "attempt", "machine"):
            if not hasattr(record, name):
                setattr(record, name, None)
        try:
            # What a log file would hold: both product formats, and the record's own fields
            # (extras included) — not the raw ``args`` objects, which a formatter renders.
            rendered = [self._text.format(record), self._json.format(record),
                        repr({k: v for k, v in record.__dict__.items() if k not in ("args", "msg")})]
        except Exception as exc:  # a record we cannot format is still looked at raw
            rendered = [repr(record.__dict__), repr(exc)]
        self.lines.extend((record.name, line) for line in rendered)

    def leaks(self, secret: str) -> list[tuple[str, str]]:
        return [(name, line[:300]) for name, line in self.lines if secret in line]


# -- runs for the scheduler's pure tests ----------------------------------------------------------
RUN_T0 = 1_700_000_000.0


def queued_run(rid: str, **kw: Any) -> Run:
    """A queued run of ``ehr.create`` in the default pool, as the store hands the scheduler;
    ``kw`` overrides any field."""
    values: dict[str, Any] = {
        "id": rid, "automation": "ehr.create", "version": None, "input": {}, "pool": "default", "labels": {},
        "machine": None, "prefer_machine": None, "session_key": None, "priority": 0, "tenant": "default",
        "queue_timeout": 3600.0, "attempt_timeout": 900.0, "progress_timeout": 120.0, "deadline_at": None,
        "max_attempts": 3, "backoff_initial": 1.0, "backoff_max": 60.0, "idempotency_key": None,
        "request_hash": None, "webhook_url": None, "state": RunState.QUEUED, "created_at": RUN_T0,
        "updated_at": RUN_T0, "queued_at": RUN_T0,
    }
    values.update(kw)
    return Run(**values)
