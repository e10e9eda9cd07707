"""PostgreSQL: the store for several orchestrator replicas.

The same SQL store as SQLite (``store.sql``) on a different engine: row locks instead of a
single writer (``FOR UPDATE``; ``SKIP LOCKED`` so that replicas scheduling at the same
moment take different runs), LISTEN/NOTIFY to tell replicas about new runs, stop orders
and finished runs, and a session-level advisory lock to choose the one leader that runs
the fleet manager's sweeps.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

import orjson
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DisconnectionError

from ..errors import ConfigError

log = logging.getLogger(__name__)

CHANNEL = "deskfleet"
#: pg_advisory_lock key of the leader: "deskfleet" in ASCII, as a signed 64-bit integer.
LEADER_KEY = int.from_bytes(b"deskflt", "big")


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def driver_url(url: str) -> str:
    """postgresql://… or postgres://… → postgresql+psycopg://… (psycopg 3)."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    raise ConfigError(f"not a PostgreSQL URL: {url!r} (expected postgresql://user@host/db)")


def libpq_url(url: str) -> str:
    """The same URL as psycopg itself takes it."""
    return "postgresql://" + driver_url(url)[len("postgresql+psycopg://"):]


#: a pooled connection idle at least this long is pinged before use (see make_engine)
PING_IDLE = 1.0


def make_engine(url: str, *, pool_size: int = 8) -> Engine:
    engine = create_engine(
        driver_url(url),
        json_serializer=_dumps,
        json_deserializer=orjson.loads,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_recycle=600,
        pool_timeout=10,
        connect_args={
            "connect_timeout": 3,
            "application_name": "deskfleet",
            # A server gone silent (no reset, just nothing) must fail requests, not hang them.
            "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3,
            # A write waiting on a lock this long is stuck, not busy: fail it (and retry).
            "options": "-c lock_timeout=10000",
        },
    )
    # A connection that died with a server restart is replaced, not used: pinged before use
    # (SQLAlchemy's pre-ping, one round trip) when it has been idle a while. A connection in
    # steady use is not (a busy server checks one out a few times per run): if the server
    # went away meanwhile, the first statement fails, SQLAlchemy sees a disconnect and
    # discards the whole pool, and the operation fails as the one in flight would have.
    dialect = engine.dialect

    def checked_in(dbapi_connection: Any, record: Any) -> None:
        record.info["deskfleet_idle_since"] = time.monotonic()

    def ping_if_idle(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        since = record.info.get("deskfleet_idle_since")
        if since is None or time.monotonic() - since < PING_IDLE:
            return
        try:
            dialect.do_ping(dbapi_connection)
        except Exception as exc:  # the pool replaces the connection and checks out another
            raise DisconnectionError(f"stale connection: {exc}") from exc

    event.listen(engine.pool, "checkin", checked_in)
    event.listen(engine.pool, "checkout", ping_if_idle)
    return engine


class AdvisoryLeadership:
    """Leadership as a session-level advisory lock held on a connection of its own.

    PostgreSQL releases the lock the moment that session ends — the leader process died,
    or its connection broke — and another replica's next ``try_acquire`` succeeds.
    """

    def __init__(self, url: str) -> None:
        self._url = libpq_url(url)
        self._conn: Any = None
        self._lock = threading.Lock()
        self.held = False

    def try_acquire(self) -> bool:
        import psycopg

        with self._lock:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = psycopg.connect(self._url, autocommit=True, connect_timeout=5,
                                                 application_name="deskfleet-leader")
                    self.held = False
                if self.held:
                    self._conn.execute("SELECT 1")  # still there? then still ours
                    return True
                row = self._conn.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_KEY,)).fetchone()
                self.held = bool(row and row[0])
                return self.held
            except psycopg.Error as exc:
                log.warning("leader lock unavailable: %s", str(exc).strip().splitlines()[0] if str(exc) else exc)
                self._drop()
                return False

    def release(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        self.held = False
        if self._conn is not None:
            with contextlib.suppress(Exception):  # closing a broken connection may fail; it is gone
                self._conn.close()
            self._conn = None
