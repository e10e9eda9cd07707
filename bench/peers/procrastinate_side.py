"""Procrastinate on PostgreSQL in the side-by-side, with its documented handling of worker death.

A worker killed with SIGKILL leaves its job in ``doing`` forever unless something retries
it. Procrastinate 3.x's answer ("Retry stalled jobs" in its production how-to): workers
write a heartbeat (``update_heartbeat_interval``, default 10 s); a periodic task calls
``job_manager.get_stalled_jobs()`` — jobs in ``doing`` whose worker has not beaten for
``seconds_since_heartbeat`` (default 30 s) — and ``job_manager.retry_job()`` on each. We use
exactly that recipe with the library's defaults (heartbeat 10 s, stalled after 30 s,
``stalled_worker_timeout`` 30 s), with one change in Procrastinate's favour: the docs'
example runs the periodic task every 10th *minute*; we run it every 10 s
(``--procrastinate-retry-every``, a 6-field cron, which Procrastinate supports), so that
recovery is bounded by the heartbeat threshold rather than by the schedule. The periodic
task has its own queue (``maintenance``) and its own worker process, which is no machine:
otherwise it would wait behind ``sim.work`` jobs for a free machine, or take one.

Each machine is one worker process (``python -m peers.procrastinate_side worker``) with
``concurrency=1`` on queue ``work``, LISTEN/NOTIFY on (the default), and a
:class:`peers.workload.PeerMachine` executing deskfleet's ``sim.work`` on a simulated
desktop. Each benchmark run creates a database of its own and drops it afterwards; the
connection pools are kept small (``max_size=3``) because the PostgreSQL server is shared.

**Throughput section** (empty runs: the task ``peers.noop`` on queue ``work`` runs deskfleet's
``sim.noop`` through the same :class:`~peers.workload.PeerMachine`): one run at a time by
``defer_async``, then the job's status read every 5 ms until it is final; the backlog by
``batch_defer_async`` — one ``INSERT`` of 1,000 jobs a call. Started = the task body's first
line (kept in memory, logged by a thread), finished = the job's ``succeeded`` event in
``procrastinate_events`` (Procrastinate's own stamp, the database's clock on this host).

What Procrastinate cannot express here: a reconcile check tied to the retry of a stalled
job (the periodic task could run one itself, but it would run it away from any machine —
on a real desktop the check needs the application); fencing (a worker declared stalled but
still alive — a long GC pause, a network cut — is not stopped and finishes its job too;
its late ``finish_job`` is accepted, as the database function checks only that the job is
``todo`` or ``doing``, not which worker holds it); and session affinity (routing to the worker
already logged in as an account: only queues and locks).
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from importlib.metadata import version
from pathlib import Path
from typing import Any

import procrastinate
import psycopg
from procrastinate.types import JSONValue

from peers.workload import (
    ENV_BACKEND,
    ENV_LOG,
    ENV_MACHINE,
    FAILED,
    PENDING,
    SUCCEEDED,
    AttemptLog,
    Busy,
    Job,
    PeerMachine,
    Side,
    Start,
    pythonpath,
    spawn,
    stop,
)

ENV_DSN = "PEERS_PG_DSN"
ENV_RETRY_EVERY = "PEERS_PROCRASTINATE_RETRY_EVERY"
QUEUE = "work"
MAINTENANCE = "maintenance"
TASK = "peers.work"
NOOP = "peers.noop"

_machine: PeerMachine | None = None


def make_app(dsn: str, retry_every: int) -> procrastinate.App:
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn, min_size=1, max_size=3))

    @app.task(name=TASK, queue=QUEUE)
    async def work(key: str, seconds: float) -> dict[str, Any]:
        assert _machine is not None, "only machine workers run sim.work"
        return await _machine.work(key, seconds)

    @app.task(name=NOOP, queue=QUEUE)
    async def noop(key: str) -> dict[str, Any]:
        assert _machine is not None, "only machine workers run sim.noop"
        return await _machine.noop(key)

    # The documented recipe, on a schedule of seconds instead of minutes (see the docstring).
    @app.periodic(cron=f"* * * * * */{retry_every}")
    @app.task(name="peers.retry_stalled_jobs", queue=MAINTENANCE, queueing_lock="retry_stalled_jobs",
              pass_context=True)
    async def retry_stalled_jobs(context: procrastinate.JobContext, timestamp: int) -> None:
        for job in await app.job_manager.get_stalled_jobs():
            await app.job_manager.retry_job(job)

    return app


async def _worker(queue: str) -> None:
    """One worker process: a machine (queue ``work``) or the maintenance worker."""
    global _machine
    app = make_app(os.environ[ENV_DSN], int(os.environ.get(ENV_RETRY_EVERY, "10")))
    name = os.environ.get(ENV_MACHINE, queue)
    if queue == QUEUE:
        _machine = PeerMachine.from_env()
    async with app.open_async():
        if _machine is not None:
            _machine.log.ready(name)
        # the defaults for heartbeats and stalled workers, written out to be seen
        await app.run_worker_async(queues=[queue], name=name, concurrency=1,
                                   update_heartbeat_interval=10.0, stalled_worker_timeout=30.0)


# -- the harness's side ---------------------------------------------------------------------


class ProcrastinateSide(Side):
    name = "procrastinate"

    def __init__(self, workdir: Path, *, admin_dsn: str, retry_every: int) -> None:
        super().__init__(workdir)
        self.admin_dsn = admin_dsn
        self.retry_every = retry_every
        self.database = f"deskfleet_peers_{uuid.uuid4().hex[:10]}"
        self.dsn = psycopg.conninfo.make_conninfo(admin_dsn, dbname=self.database)
        self.log_path = workdir / "attempts.db"
        self.log: AttemptLog | None = None
        self.app: procrastinate.App | None = None
        self._opened = False
        self._created = False
        self._maintenance: Any = None  # the maintenance worker's Popen
        self._maintenance_log: Any = None
        self._keys: set[str] = set()
        self._conn: psycopg.AsyncConnection[Any] | None = None  # the harness's own, for reading
        self.harness_reconnects = 0  # PostgreSQL went away under the harness (restarted by someone else)
        self.last_reconnect_cause = ""

    async def setup(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log = AttemptLog(self.log_path, create=True)
        from deskfleet.sim import SimBackend

        SimBackend(self.backend_path).close()
        async with await psycopg.AsyncConnection.connect(self.admin_dsn, autocommit=True) as conn:
            await conn.execute(f'CREATE DATABASE "{self.database}"')
        self._created = True
        self.app = make_app(self.dsn, self.retry_every)
        await self.app.open_async()
        self._opened = True
        await self.app.schema_manager.apply_schema_async()
        self._conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self._maintenance_log = open(self.workdir / "logs" / "maintenance.log", "ab")  # noqa: SIM115
        argv, env = self._command(MAINTENANCE, {})
        self._maintenance = spawn(argv, env, self._maintenance_log)

    def _command(self, queue: str, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        return [sys.executable, "-m", "peers.procrastinate_side", queue], {
            ENV_DSN: self.dsn, ENV_RETRY_EVERY: str(self.retry_every), "PYTHONPATH": pythonpath(), **env,
        }

    def machine_command(self, name: str) -> tuple[list[str], dict[str, str]]:
        return self._command(QUEUE, {ENV_MACHINE: name, ENV_BACKEND: str(self.backend_path),
                                     ENV_LOG: str(self.log_path)})

    async def wait_ready(self, names: list[str], timeout: float) -> None:
        assert self.log is not None
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            workers = await self._query("SELECT count(*) FROM procrastinate_workers")
            if set(names) <= self.log.ready_machines() and workers[0][0] >= len(names) + 1:
                return
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"procrastinate workers not ready ({workers[0][0]} registered)")
            await asyncio.sleep(0.2)

    async def submit(self, job: Job) -> None:
        assert self.app is not None
        await self.app.configure_task(TASK, queue=QUEUE).defer_async(key=job.key, seconds=job.seconds)
        self._keys.add(job.key)

    single_path = "defer_async, then the job's status read every 5 ms"
    batch_path = "batch_defer_async: one INSERT of 1,000 jobs a call"

    async def run_noop(self, key: str) -> None:
        assert self.app is not None
        job = await self.app.configure_task(NOOP, queue=QUEUE).defer_async(key=key)
        while True:
            rows = await self._query("SELECT status FROM procrastinate_jobs WHERE id = %s", job)
            status = str(rows[0][0]) if rows else ""
            if status == "succeeded":
                return
            if status in ("failed", "cancelled", "aborted"):
                raise RuntimeError(f"procrastinate: empty run {key} ended {status}")
            await asyncio.sleep(0.005)

    async def submit_noops(self, keys: list[str]) -> None:
        assert self.app is not None
        task = self.app.configure_task(NOOP, queue=QUEUE)
        for i in range(0, len(keys), 1000):
            chunk: list[dict[str, JSONValue]] = [{"key": k} for k in keys[i:i + 1000]]
            await task.batch_defer_async(*chunk)

    async def noops_done(self) -> int:
        assert self.log is not None
        return self.log.noops_done()

    async def noop_starts(self) -> dict[str, float]:
        assert self.log is not None
        return self.log.noop_starts()

    async def noop_finishes(self, keys: list[str]) -> dict[str, float]:
        rows = await self._query(
            "SELECT j.args->>'key', min(e.at) FROM procrastinate_events e JOIN procrastinate_jobs j ON j.id = e.job_id "
            "WHERE j.task_name = %s AND e.type = 'succeeded' GROUP BY 1", NOOP)
        wanted = set(keys)
        return {str(k): at.timestamp() for k, at in rows if k in wanted}

    async def busy(self) -> list[Busy]:
        assert self.log is not None
        return self.log.busy()

    async def outcomes(self) -> dict[str, str]:
        rows = await self._query("SELECT args->>'key', status FROM procrastinate_jobs WHERE task_name = %s", TASK)
        status = {k: str(s) for k, s in rows}
        out = {}
        for key in self._keys:
            s = status.get(key)
            out[key] = SUCCEEDED if s == "succeeded" else FAILED if s in ("failed", "cancelled", "aborted") else PENDING
        return out

    async def starts(self) -> list[Start]:
        assert self.log is not None
        return self.log.starts()

    async def teardown(self) -> None:
        try:
            if self._maintenance is not None:
                stop([self._maintenance])
            if self._maintenance_log is not None:
                self._maintenance_log.close()
            if self.log is not None:
                self.log.close()
            if self._conn is not None:
                await self._conn.close()
            if self.app is not None and self._opened:
                await self.app.close_async()
        finally:
            if self._created:  # FORCE: whatever connection is left goes with it
                async with await psycopg.AsyncConnection.connect(self.admin_dsn, autocommit=True) as conn:
                    await conn.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')

    async def _query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        assert self._conn is not None
        try:
            cur = await self._conn.execute(sql, params or None)
        except psycopg.OperationalError as exc:
            # The PostgreSQL server is shared: someone else's test may restart it under us.
            # Read on with a new connection, and say so in the result (settings).
            self.harness_reconnects += 1
            self.last_reconnect_cause = repr(exc)
            await self._conn.close()
            for _ in range(120):
                try:
                    self._conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
                    break
                except psycopg.OperationalError:
                    await asyncio.sleep(0.5)
            cur = await self._conn.execute(sql, params or None)
        return list(await cur.fetchall())

    def versions(self) -> dict[str, str]:
        with psycopg.connect(self.admin_dsn) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        return {"procrastinate": version("procrastinate"), "psycopg": version("psycopg"),
                "postgresql": str(row[0]) if row else "?"}

    def settings(self) -> dict[str, Any]:
        return {"concurrency": 1, "listen_notify": True, "update_heartbeat_interval_s": 10.0,
                "stalled_worker_timeout_s": 30.0, "get_stalled_jobs.seconds_since_heartbeat_s": 30,
                "retry_stalled_jobs every_s": self.retry_every,
                "retry_stalled_jobs worker": "its own process on queue 'maintenance'",
                "harness reconnects to PostgreSQL (server restarted under the run)": self.harness_reconnects,
                "last reconnect cause": self.last_reconnect_cause}


if __name__ == "__main__":
    asyncio.run(_worker(sys.argv[1] if len(sys.argv) > 1 else QUEUE))
