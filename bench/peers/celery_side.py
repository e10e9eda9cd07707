"""Celery with Redis in the side-by-side, set up the way a Python team would to survive worker death.

Settings (see :func:`make_app`), each the documented answer to "a worker died mid-task":

- ``task_acks_late=True`` — the message is acknowledged after the task, not on receipt, so
  a worker that dies mid-task leaves it unacknowledged, to be delivered again;
- ``task_reject_on_worker_lost=True`` — with the prefork pool, a child that dies makes its
  parent requeue the message at once. Here each machine is one ``--pool=solo`` process (the
  task runs in the worker process itself), so when the machine dies there is no parent left
  to do that: the setting is on, as a team would have it, but it is the Redis visibility
  timeout that brings the message back;
- ``worker_prefetch_multiplier=1`` and concurrency 1 — a worker holds one message (the one
  it executes), so a kill strands one run, not a prefetched batch;
- ``broker_transport_options.visibility_timeout`` — an unacknowledged message goes back to
  the queue once it has been out this long. Celery's docs: it must exceed the longest
  task's run time (and ETA/countdown), or a message still being worked on is handed to a
  second worker. The longest run here is 3 s, so **10 s** (``--celery-visibility-timeout``):
  over three times the longest run, and the same 10 s after which deskfleet gives up on a
  silent machine. Celery's default is 1 hour; for real RPA runs lasting minutes it would
  have to be minutes, and so would every recovery;
- ``unacked_restore_interval=2``, ``unacked_restore_throttle=1`` — how often a worker looks
  for such messages. Kombu's defaults (a sweep every 10 s, a real scan every 10th sweep:
  about 100 s) would dwarf a 10 s visibility timeout; kombu's docs say to lower them when
  the visibility timeout is low, so we do — generous to Celery;
- ``--without-gossip --without-mingle`` — common for many workers, and only about workers
  chatting with each other; delivery and acknowledgement are unchanged.

Each machine is one ``celery worker --pool=solo --concurrency=1`` process with a
:class:`peers.workload.PeerMachine`: ``sim.work`` from deskfleet's registry on a simulated
desktop, on one asyncio loop per process. Results go to the Redis result backend; a task
still PENDING there at the end was lost. All keys of one benchmark run carry their own
prefix (``global_keyprefix``) on the shared Redis server and are deleted afterwards.

What Celery cannot express here: a reconcile check that runs before a task is retried after
a lost worker (a team can put a check at the top of the task body, but it then runs on every
execution — on a real desktop, a whole search through the application's screens — and
nothing ties it to "the last attempt died"; we run the task as written, as deskfleet runs
``sim.work`` as written); fencing a late worker's result (a worker slower than the
visibility timeout is not stopped: both executions run and both results are written); and
routing a run to the machine already logged in as an account (only static queues per
worker).

**Throughput section** (empty runs: the task ``peers.noop`` runs deskfleet's ``sim.noop``
through the same :class:`~peers.workload.PeerMachine`): one run at a time by ``send_task``
then ``AsyncResult.get()`` (the Redis result backend's pub/sub); the backlog by ``send_task``
in a loop on one producer (one connection for all) — about 3x as fast here as
``group(...).apply_async()``, Celery's documented way to send many tasks at once, which
also makes a group result (2,500 against 800 tasks/s, with no worker running). Started = the task body's first line (kept in memory, logged by a
thread), finished = the result's ``date_done`` in the result backend (Celery's own stamp).

This module is also the Celery app the worker processes load: ``celery -A peers.celery_side
worker`` with its settings from the environment.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from celery import Celery, signals

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
)

ENV_REDIS = "PEERS_REDIS_URL"
ENV_PREFIX = "PEERS_CELERY_PREFIX"
ENV_VISIBILITY = "PEERS_CELERY_VISIBILITY_TIMEOUT"
QUEUE = "work"
TASK = "peers.work"
NOOP = "peers.noop"


def make_app(redis_url: str, prefix: str, visibility_timeout: float) -> Celery:
    app = Celery("peers", broker=redis_url, backend=redis_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            "visibility_timeout": visibility_timeout,
            "unacked_restore_interval": 2,
            "unacked_restore_throttle": 1,
            "global_keyprefix": prefix,
        },
        result_backend_transport_options={"global_keyprefix": prefix},
        task_default_queue=QUEUE,
        task_serializer="json", result_serializer="json", accept_content=["json"],
        result_expires=3600,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    return app


app = make_app(os.environ.get(ENV_REDIS, "redis://127.0.0.1:6379/0"), os.environ.get(ENV_PREFIX, "peers:"),
               float(os.environ.get(ENV_VISIBILITY, "10")))

_machine: PeerMachine | None = None
_loop: asyncio.AbstractEventLoop | None = None


def _here() -> tuple[PeerMachine, asyncio.AbstractEventLoop]:
    global _machine, _loop
    if _machine is None or _loop is None:
        _machine = PeerMachine.from_env()
        _loop = asyncio.new_event_loop()
    return _machine, _loop


@app.task(name=TASK)
def work(key: str, seconds: float) -> dict[str, Any]:
    machine, loop = _here()
    return loop.run_until_complete(machine.work(key, seconds))


@app.task(name=NOOP)
def noop(key: str) -> dict[str, Any]:
    machine, loop = _here()
    return loop.run_until_complete(machine.noop(key))


@signals.worker_ready.connect
def _ready(**_: Any) -> None:
    if os.environ.get(ENV_MACHINE):
        machine = _here()[0]
        machine.log.ready(machine.name)


# -- the harness's side ---------------------------------------------------------------------


class CelerySide(Side):
    name = "celery"

    def __init__(self, workdir: Path, *, redis_url: str, visibility_timeout: float) -> None:
        super().__init__(workdir)
        self.redis_url = redis_url
        self.visibility_timeout = visibility_timeout
        self.prefix = f"peers-{uuid.uuid4().hex[:8]}:"
        self.log_path = workdir / "attempts.db"
        self.app: Celery | None = None
        self.log: AttemptLog | None = None
        self._ids: dict[str, str] = {}  # key → task id
        self._noop_ids: dict[str, str] = {}  # key → task id, the throughput section's
        self._final: dict[str, str] = {}

    async def setup(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log = AttemptLog(self.log_path, create=True)
        # the SimBackend file exists (and is in WAL mode) before the workers open it
        from deskfleet.sim import SimBackend

        SimBackend(self.backend_path).close()
        self.app = make_app(self.redis_url, self.prefix, self.visibility_timeout)
        self.app.connection_for_write().ensure_connection(max_retries=3)

    def machine_command(self, name: str) -> tuple[list[str], dict[str, str]]:
        env = {
            ENV_MACHINE: name, ENV_BACKEND: str(self.backend_path), ENV_LOG: str(self.log_path),
            ENV_REDIS: self.redis_url, ENV_PREFIX: self.prefix, ENV_VISIBILITY: str(self.visibility_timeout),
            "PYTHONPATH": pythonpath(),
        }
        return [sys.executable, "-m", "celery", "-A", "peers.celery_side", "worker", "--pool=solo",
                "--concurrency=1", "-n", f"{name}@peers", "-Q", QUEUE, "--without-gossip",
                "--without-mingle", "--loglevel=WARNING"], env

    async def wait_ready(self, names: list[str], timeout: float) -> None:
        assert self.log is not None
        deadline = asyncio.get_running_loop().time() + timeout
        while not set(names) <= self.log.ready_machines():
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"celery workers not ready: {sorted(set(names) - self.log.ready_machines())}")
            await asyncio.sleep(0.2)

    async def submit(self, job: Job) -> None:
        assert self.app is not None
        result = self.app.send_task(TASK, args=[job.key, job.seconds], queue=QUEUE)
        self._ids[job.key] = result.id

    single_path = "send_task, then AsyncResult.get() (result backend pub/sub)"
    batch_path = "send_task in a loop on one producer (3x group().apply_async() here)"

    async def run_noop(self, key: str) -> None:
        assert self.app is not None
        app = self.app

        def one() -> None:
            result = app.send_task(NOOP, args=[key], queue=QUEUE)
            self._noop_ids[key] = result.id
            result.get(timeout=30, interval=0.005)

        await asyncio.to_thread(one)

    async def submit_noops(self, keys: list[str]) -> None:
        assert self.app is not None
        app = self.app

        def backlog() -> None:
            with app.producer_or_acquire() as producer:
                for key in keys:
                    self._noop_ids[key] = app.send_task(NOOP, args=[key], queue=QUEUE, producer=producer).id

        await asyncio.to_thread(backlog)

    async def noops_done(self) -> int:
        assert self.log is not None
        return self.log.noops_done()

    async def noop_starts(self) -> dict[str, float]:
        assert self.log is not None
        return self.log.noop_starts()

    async def noop_finishes(self, keys: list[str]) -> dict[str, float]:
        assert self.app is not None
        backend = self.app.backend
        ids = [(k, self._noop_ids[k]) for k in keys if k in self._noop_ids]

        def stamps() -> dict[str, float]:
            out = {}
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                for (key, _), raw in zip(chunk, backend.mget([backend.get_key_for_task(t) for _, t in chunk]),
                                         strict=True):
                    if raw is None:
                        continue
                    meta = backend.decode_result(raw)
                    if meta.get("status") == "SUCCESS" and meta.get("date_done"):
                        out[key] = datetime.fromisoformat(meta["date_done"]).timestamp()
            return out

        return await asyncio.to_thread(stamps)

    async def busy(self) -> list[Busy]:
        assert self.log is not None
        return self.log.busy()

    async def outcomes(self) -> dict[str, str]:
        assert self.app is not None
        app = self.app
        todo = [k for k in self._ids if k not in self._final]

        def states() -> dict[str, str]:
            return {k: app.AsyncResult(self._ids[k]).state for k in todo}

        for key, state in (await asyncio.to_thread(states)).items():
            if state == "SUCCESS":
                self._final[key] = SUCCEEDED
            elif state in ("FAILURE", "REVOKED"):
                self._final[key] = FAILED
        return {k: self._final.get(k, PENDING) for k in self._ids}

    async def starts(self) -> list[Start]:
        assert self.log is not None
        return self.log.starts()

    async def teardown(self) -> None:
        try:
            if self.log is not None:
                self.log.close()
            if self.app is not None:
                self.app.close()
        finally:
            # this run's keys only: the Redis server is shared
            import redis

            client = redis.Redis.from_url(self.redis_url)
            try:
                keys = list(client.scan_iter(match=f"{self.prefix}*", count=1000))
                for i in range(0, len(keys), 500):
                    client.delete(*keys[i:i + 500])
            finally:
                client.close()

    def versions(self) -> dict[str, str]:
        import redis

        client = redis.Redis.from_url(self.redis_url)
        try:
            server = str(client.info("server").get("redis_version", "?"))
        finally:
            client.close()
        return {"celery": version("celery"), "kombu": version("kombu"), "redis-py": version("redis"),
                "redis server": server}

    def settings(self) -> dict[str, Any]:
        return {"task_acks_late": True, "task_reject_on_worker_lost": True, "worker_prefetch_multiplier": 1,
                "visibility_timeout_s": self.visibility_timeout, "unacked_restore_interval_s": 2,
                "unacked_restore_throttle": 1, "pool": "solo", "concurrency": 1,
                "worker flags": "--without-gossip --without-mingle", "result_backend": "redis"}
