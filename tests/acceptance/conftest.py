"""Process helpers for acceptance tests: the real CLI as separate processes, killed for real.

A :class:`Cluster` starts ``deskfleet server`` and ``deskfleet agent`` subprocesses with
short heartbeat settings (so failover happens in test time), writes each one's JSON log
to a file under the test's tmp directory, and waits by polling the API — never by
sleeping blindly. Every process it started is killed at teardown, whatever the test did
to it (a SIGSTOPped agent is continued first, so it can die). When a test fails, the tail
of every log is shown with the failure.

With PostgreSQL (the ``pg_cluster`` fixture) a cluster runs several replicas — ``deskfleet
server`` processes sharing one database and one ``--data-dir`` (so one secret key and one
enrolment token) — and agents that know several orchestrator URLs. A :class:`TcpProxy` in
the test process can stand between an agent and the replicas and *partition* it: ``cut()``
stops forwarding in both directions without closing a socket (what arrives is buffered, as
TCP keeps retrying through a real partition), ``heal()`` delivers the backlog and resumes.
The :class:`Postgres` controller stops and restarts the database server itself; whatever a
test did to it, teardown starts it again before dropping the test's database.

Test modules reach these helpers through the fixtures (``cluster.wait_until``,
``Cluster.FINAL``); no test imports a conftest (shared helpers are in tests/support.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from deskfleet.audit import AuditReport, audit
from deskfleet.client import Client
from deskfleet.errors import DeskfleetError
from support import PgServer, free_port

#: Failover in test time: a silent agent loses its lease after 1.5s.
HEARTBEAT_INTERVAL = 0.2
HEARTBEAT_TIMEOUT = 1.5
STOP_GRACE = 2.0
FINAL = frozenset({"succeeded", "failed", "cancelled", "timed_out"})
#: How tests stop, start and restart the PostgreSQL server of ``$DESKFLEET_TEST_PG``.
PG_CTL = shlex.split(os.environ.get("DESKFLEET_TEST_PG_CTL", "pg_ctlcluster --skip-systemctl-redirect 15 main"))


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``check()`` until it returns something truthy; fail saying what never happened."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
        except DeskfleetError as exc:  # e.g. the server is restarting: keep polling
            last = exc
        if last and not isinstance(last, Exception):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


def _clean_env() -> dict[str, str]:
    # A DESKFLEET_* variable in the developer's shell would silently change the flags.
    env = {k: v for k, v in os.environ.items() if not k.startswith("DESKFLEET_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Proc:
    """One ``deskfleet`` subprocess: its arguments, its log file, and signals to send it."""

    def __init__(self, name: str, args: list[str], log: Path, cwd: Path) -> None:
        self.name = name
        self.args = args
        self.log = log
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None
        self.stopped = False  # SIGSTOPped and not yet continued

    def start(self) -> Proc:
        assert self.popen is None or self.popen.poll() is not None, f"{self.name} is already running"
        with open(self.log, "ab") as out:
            out.write(f"---- start {' '.join(self.args)}\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "deskfleet", "--log-format", "json", *self.args],
                stdout=out, stderr=subprocess.STDOUT, cwd=self.cwd, env=_clean_env(),
                start_new_session=True,
            )
        self.stopped = False
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def send(self, sig: signal.Signals) -> None:
        os.kill(self.pid, sig)
        if sig is signal.SIGSTOP:
            self.stopped = True
        elif sig is signal.SIGCONT:
            self.stopped = False

    def kill9(self) -> int:
        """SIGKILL and reap; returns the exit status (``-9``)."""
        assert self.popen is not None
        os.kill(self.pid, signal.SIGKILL)
        return self.popen.wait(10)

    def terminate(self, timeout: float = 10.0) -> None:
        if not self.alive:
            return
        assert self.popen is not None
        if self.stopped:
            os.kill(self.pid, signal.SIGCONT)
            self.stopped = False
        os.kill(self.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            self.popen.wait(10)

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])


# -- a network partition in the test process ------------------------------------------------------
class _Pipe:
    """One direction of one proxied connection: a reader that never stops reading (so the
    sender's writes succeed, as through a partition where TCP keeps retrying) and a writer
    that delivers only while the proxy is healed."""

    def __init__(self) -> None:
        self.chunks: deque[bytes] = deque()  # b"" marks the sender's end of stream

    async def read(self, src: asyncio.StreamReader, cond: asyncio.Condition) -> None:
        try:
            while data := await src.read(65536):
                async with cond:
                    self.chunks.append(data)
                    cond.notify_all()
        except OSError:
            pass
        async with cond:
            self.chunks.append(b"")
            cond.notify_all()

    async def write(self, dst: asyncio.StreamWriter, cond: asyncio.Condition, proxy: TcpProxy) -> None:
        try:
            while True:
                async with cond:
                    await cond.wait_for(lambda: bool(self.chunks) and proxy.healed)
                    batch = list(self.chunks)
                    self.chunks.clear()
                for chunk in batch:
                    if not chunk:
                        with contextlib.suppress(OSError):
                            dst.write_eof()
                        return
                    dst.write(chunk)
                await dst.drain()
        except OSError:
            pass


class TcpProxy:
    """Forwards loopback ports to orchestrator ports, and partitions them on demand.

    ``cut()`` stops forwarding in both directions without closing any socket: bytes that
    arrive are held, connections stay open, a new connection is accepted but not carried
    on (its SYN "got through", nothing else does). ``heal()`` delivers what was held, in
    order, and forwards again. One event loop on a thread of its own does the work.
    """

    def __init__(self) -> None:
        self.healed = True
        self.held_bytes = 0  # bytes held back by the latest cut (for the test's report)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._thread.start()
        self._cond: asyncio.Condition = self._call(self._make_cond())
        self._servers: list[asyncio.base_events.Server] = []
        self._pipes: list[_Pipe] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    def _call(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @staticmethod
    async def _make_cond() -> asyncio.Condition:
        return asyncio.Condition()

    def forward(self, upstream_port: int) -> int:
        """Listen on a free loopback port that forwards to ``upstream_port``; returns it."""

        async def listen() -> int:
            server = await asyncio.start_server(
                lambda r, w: self._spawn(self._serve(r, w, upstream_port)), "127.0.0.1", 0)
            self._servers.append(server)
            return int(server.sockets[0].getsockname()[1])

        return int(self._call(listen()))

    def _spawn(self, coro: Any) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter, port: int) -> None:
        self._writers.append(client_w)
        up, down = _Pipe(), _Pipe()
        self._pipes += [up, down]
        reading_up = self._loop.create_task(up.read(client_r, self._cond))
        async with self._cond:  # a partition holds back the connection to the orchestrator too
            await self._cond.wait_for(lambda: self.healed)
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            client_w.close()  # the orchestrator is down: refuse, as it would
            reading_up.cancel()
            return
        self._writers.append(server_w)
        await asyncio.gather(
            reading_up,
            up.write(server_w, self._cond, self),
            down.read(server_r, self._cond),
            down.write(client_w, self._cond, self),
            return_exceptions=True,
        )
        for w in (client_w, server_w):
            w.close()

    def cut(self) -> None:
        async def cut() -> None:
            async with self._cond:
                self.healed = False

        self._call(cut())

    def heal(self) -> int:
        """Resume forwarding; returns how many bytes had been held back."""

        async def heal() -> int:
            async with self._cond:
                held = sum(len(c) for p in self._pipes for c in p.chunks)
                self.healed = True
                self._cond.notify_all()
                return held

        self.held_bytes = int(self._call(heal()))
        return self.held_bytes

    def close(self) -> None:
        async def close() -> None:
            for server in self._servers:
                server.close()
            for w in self._writers:
                w.close()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.sleep(0)

        with contextlib.suppress(Exception):
            self._call(close(), timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


# -- the PostgreSQL server -----------------------------------------------------------------------------
class Postgres:
    """The test PostgreSQL server: fresh databases (``support.PgServer``), and the server
    itself stopped, started and restarted as a fault (``pg_ctlcluster``)."""

    def __init__(self) -> None:
        self.server = PgServer()

    def new_database(self) -> str:
        return str(self.server.new_database())

    def _ctl(self, action: str) -> None:
        proc = subprocess.run([*PG_CTL, action], capture_output=True, text=True, timeout=90)
        assert proc.returncode == 0, f"{' '.join(PG_CTL)} {action} failed: {proc.stderr or proc.stdout}"

    def stop(self) -> None:
        self._ctl("stop")

    def start(self) -> None:
        self._ctl("start")
        self.wait_up()

    def restart(self) -> None:
        self._ctl("restart")
        self.wait_up()

    def up(self) -> bool:
        import psycopg

        from deskfleet.store.postgres import libpq_url

        try:
            with psycopg.connect(libpq_url(self.server.admin_url), connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def wait_up(self, timeout: float = 60.0) -> None:
        wait_until(self.up, timeout, "PostgreSQL to accept connections", interval=0.1)

    def query(self, db_url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        import psycopg

        from deskfleet.store.postgres import libpq_url

        with psycopg.connect(libpq_url(db_url), autocommit=True, connect_timeout=5) as conn:
            return list(conn.execute(sql, params).fetchall())

    def close(self) -> None:
        """Whatever the test did to the server: running again, and its databases dropped."""
        if not self.up():
            with contextlib.suppress(subprocess.SubprocessError):
                subprocess.run([*PG_CTL, "start"], capture_output=True, timeout=90)
            self.wait_up()
        self.server.drop_all()


class Cluster:
    """An orchestrator process and agent processes on loopback, in one tmp directory.

    On SQLite, one orchestrator (``start_server``); on PostgreSQL (``pg``), replicas
    (``start_replicas``) named ``r1``, ``r2``… that share a database and a data directory.
    """

    FINAL = FINAL
    wait_until = staticmethod(wait_until)
    heartbeat_timeout = HEARTBEAT_TIMEOUT  # the server's (start_server)

    def __init__(self, root: Path, pg: Postgres | None = None) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = root / "server"
        self.backend = root / "ehr.db"  # the simulated EHR's records, shared by every agent
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, Proc] = {}
        self._clients: dict[str, Client] = {}
        self.pg = pg
        self.db_url: str | None = None  # the replicas' database, once created
        self.replicas: dict[str, int] = {}  # replica name → port
        self.proxies: list[TcpProxy] = []
        self._accounts_added = False

    # -- processes ------------------------------------------------------------------------------
    def _proc(self, name: str, args: list[str]) -> Proc:
        proc = Proc(name, args, self.logs / f"{name}.log", self.root)
        self.procs[name] = proc
        return proc.start()

    def start_server(self, *extra: str, heartbeat_interval: float = HEARTBEAT_INTERVAL) -> Proc:
        """The orchestrator on this cluster's port and data directory (the same on a restart)."""
        return self._proc("server", [
            "server", "--port", str(self.port), "--data-dir", str(self.data_dir),
            "--heartbeat-interval", str(heartbeat_interval), "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT),
            "--stop-grace", str(STOP_GRACE), *extra,
        ])

    def start_replicas(self, count: int, *, heartbeat_interval: float = 0.3, heartbeat_timeout: float = 2.0,
                       stop_grace: float = STOP_GRACE, extra: tuple[str, ...] = (),
                       db_url: str | None = None) -> list[Proc]:
        """``count`` orchestrator replicas on one fresh PostgreSQL database, healthy when this
        returns. The first one starts alone: it creates the shared secret key and enrolment
        token in the data directory, which the others then read. ``db_url``: the same
        database by another way (e.g. through :meth:`db_proxy`)."""
        assert self.pg is not None, "replicas need the pg_cluster fixture"
        if self.db_url is None:
            self.db_url = self.pg.new_database()
        names = [f"r{len(self.replicas) + i + 1}" for i in range(count)]
        started = []
        for i, name in enumerate(names):
            port = self.port if not self.replicas else free_port()
            self.replicas[name] = port
            started.append(self._proc(name, [
                "server", "--port", str(port), "--data-dir", str(self.data_dir), "--db", db_url or self.db_url,
                "--heartbeat-interval", str(heartbeat_interval), "--heartbeat-timeout", str(heartbeat_timeout),
                "--stop-grace", str(stop_grace), *extra,
            ]))
            if i == 0:
                self.wait_healthy(name)
        for name in names[1:]:
            self.wait_healthy(name)
        return started

    def replica_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.replicas[name]}"

    def replica_at(self, port: int) -> str:
        """The replica listening on ``port`` (replicas name themselves ``host:port``)."""
        return next(name for name, p in self.replicas.items() if p == port)

    @property
    def urls(self) -> list[str]:
        return [self.replica_url(n) for n in self.replicas] if self.replicas else [self.url]

    def start_agent(self, name: str, *, count: int = 1, action_delay: float = 0.1, faults: str = "none",
                    extra: tuple[str, ...] = (), urls: list[str] | None = None) -> Proc:
        """An agent process for ``count`` simulated machines named ``<name>-01``…; its keys
        live in ``<root>/agent-<name>``, so a restart under the same name is the same machine.
        ``urls``: the orchestrators it may connect to (default: this cluster's one server)."""
        servers = [arg for url in (urls or [self.url]) for arg in ("--orchestrator", url)]
        self.add_accounts()
        return self._proc(name, [
            "agent", *servers, "--pack", "simehr", "--desktop", "sim", "--machine", name, "--count", str(count),
            "--sim-faults", faults, "--sim-backend", str(self.backend),
            "--state-dir", str(self.root / f"agent-{name}"),
            "--enrolment-token-file", str(self.data_dir / "enrolment-token"),
            "--action-delay", str(action_delay), *extra,
        ])

    def add_accounts(self) -> None:
        """SimEHR's accounts in the vault (once), through the CLI as an operator would: agents
        get them from there. Many sessions each: SimEHR does not end an older session."""
        if self._accounts_added:
            return
        first = "server" if not self.replicas else next(iter(self.replicas))
        self.wait_healthy(first)
        done = subprocess.run(
            [sys.executable, "-m", "deskfleet", "--server", self.client_for(first).server,
             "accounts", "add-demo", "simehr", "--max-sessions", "1000"],
            capture_output=True, text=True, timeout=60, cwd=self.root)
        assert done.returncode == 0, done.stderr
        self._accounts_added = True

    def proxy(self, urls: list[str]) -> tuple[TcpProxy, list[str]]:
        """A partitionable proxy in front of these orchestrator URLs; the URLs to give an agent."""
        proxy = TcpProxy()
        self.proxies.append(proxy)
        return proxy, [f"http://127.0.0.1:{proxy.forward(int(u.rsplit(':', 1)[1]))}" for u in urls]

    def db_proxy(self) -> tuple[TcpProxy, str]:
        """A partitionable proxy in front of the database server; the database URL through it."""
        from sqlalchemy.engine import make_url

        assert self.db_url is not None, "start a replica first: it creates the database"
        url = make_url(self.db_url)
        proxy = TcpProxy()
        self.proxies.append(proxy)
        port = proxy.forward(url.port or 5432)
        return proxy, url.set(port=port).render_as_string(hide_password=False)

    def restart(self, name: str) -> Proc:
        proc = self.procs[name]
        assert not proc.alive, f"{name} is still running"
        return proc.start()

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()
        for proxy in self.proxies:
            proxy.heal()  # nothing stays held back by a partition while processes stop
        for proc in self.procs.values():
            with contextlib.suppress(OSError):
                proc.terminate()
        for proxy in self.proxies:
            proxy.close()

    # -- the database (PostgreSQL) ------------------------------------------------------------------
    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        """Read the replicas' database directly (e.g. which replica holds which agent)."""
        assert self.pg is not None and self.db_url is not None
        return self.pg.query(self.db_url, query, *params)

    def connected_to(self) -> dict[str, str]:
        """Machine → the replica (by name, ``r1``…) its agent is connected to, per the database."""
        out = {}
        for machine, name in self.sql(
            "SELECT m.id, r.name FROM machines m JOIN replicas r ON r.id = m.replica WHERE m.connected"
        ):
            out[machine] = self.replica_at(int(name.rsplit(":", 1)[1]))
        return out

    # -- the API -----------------------------------------------------------------------------------
    def client_for(self, name: str) -> Client:
        """A client of one replica (or, with ``"server"``, of the single orchestrator)."""
        url = self.url if name == "server" else self.replica_url(name)
        if url not in self._clients:
            self._clients[url] = Client(url, timeout=15.0)
        return self._clients[url]

    @property
    def client(self) -> Client:
        """A client of the orchestrator, or of the first replica still running."""
        if not self.replicas:
            return self.client_for("server")
        name = next((n for n in self.replicas if self.procs[n].alive), next(iter(self.replicas)))
        return self.client_for(name)

    def wait_healthy(self, name: str = "server", timeout: float = 30.0) -> None:
        server = self.procs[name]
        client = self.client_for(name)

        def up() -> bool:
            assert server.alive, f"{name} exited at start:\n{server.tail()}"
            return bool(client.health()["ok"])

        wait_until(up, timeout, f"{name}'s /healthz")

    def wait_ready(self, machines: set[str], timeout: float = 45.0) -> None:
        def ready() -> bool:
            for proc in self.procs.values():
                assert proc.alive or proc.popen is None or proc.popen.returncode == -signal.SIGKILL, (
                    f"{proc.name} exited unexpectedly:\n{proc.tail()}")
            status = {m["id"]: m["status"] for m in self.client.machines()}
            return all(status.get(m) == "ready" for m in machines)

        wait_until(ready, timeout, f"machines ready: {sorted(machines)}", interval=0.1)

    def machine(self, machine_id: str) -> dict[str, Any]:
        return dict(self.client.machine(machine_id))

    def all_runs(self) -> list[dict[str, Any]]:
        return self.client.every_run()

    @contextlib.contextmanager
    def records(self) -> Iterator[Any]:
        """The simulated EHR's records (a SimBackend), which every agent of the cluster writes."""
        from deskfleet.sim.backend import SimBackend

        ehr = SimBackend(self.backend)
        try:
            yield ehr
        finally:
            ehr.close()

    def all_events(self) -> list[dict[str, Any]]:
        return self.client.every_event()

    def audit(self, *, require_final: bool = True) -> tuple[AuditReport, list[dict[str, Any]], list[dict[str, Any]]]:
        """The invariant checker over every run and every event, as the API serves them."""
        runs, events = self.all_runs(), self.all_events()
        return audit(runs, events, require_final=require_final), runs, events

    def wait_final(self, run_ids: set[str], timeout: float) -> dict[str, dict[str, Any]]:
        def done() -> dict[str, dict[str, Any]] | None:
            runs = {r["id"]: r for r in self.all_runs() if r["id"] in run_ids}
            if len(runs) == len(run_ids) and all(r["state"] in FINAL for r in runs.values()):
                return runs
            return None

        runs: dict[str, dict[str, Any]] = wait_until(done, timeout, f"{len(run_ids)} runs to reach a final state",
                                                     interval=0.25)
        return runs

    def tails(self, lines: int = 40) -> str:
        return "\n".join(f"==== {p.name} ({p.log}) ====\n{p.tail(lines)}" for p in self.procs.values())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failing test that used a cluster shows the tail of every process's log."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    for c in getattr(item, "funcargs", {}).values():
        if report.when == "call" and report.failed and isinstance(c, Cluster):
            report.sections.append(("cluster logs", c.tails()))


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def pg_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A cluster for replicas on PostgreSQL. Teardown stops every process, starts the
    database server again if the test left it stopped, and drops the test's database."""
    pg = Postgres()
    c = Cluster(tmp_path, pg=pg)
    try:
        yield c
    finally:
        try:
            c.close()
        finally:
            pg.close()
