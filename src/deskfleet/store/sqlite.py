"""The embedded default: one SQLite file in WAL mode, zero set-up.

Why these settings: WAL lets readers (the CLI, the dashboard, tests) read while the
orchestrator writes; ``BEGIN IMMEDIATE`` takes the write lock at the start of a write
transaction, so two writers queue on ``busy_timeout`` instead of failing half-way with
"database is locked" when a read lock would have to be upgraded. ``synchronous=FULL``
(the default here) makes every acknowledged submit survive a power cut, not only a crash
of the process; ``NORMAL`` survives process crashes and is faster.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.pool import QueuePool

from ..errors import ConfigError

SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def sqlite_path(url: str) -> Path:
    if not url.startswith("sqlite:///"):
        raise ConfigError(f"not a SQLite URL: {url!r} (expected sqlite:///path/to/file.db)")
    return Path(url.removeprefix("sqlite:///"))


def make_engine(url: str, *, synchronous: str = "FULL") -> Engine:
    path = sqlite_path(url)
    if str(path) == ":memory:" or not str(path):
        raise ConfigError("deskfleet needs a SQLite file, not an in-memory database")
    synchronous = synchronous.upper()
    if synchronous not in SYNCHRONOUS:
        raise ConfigError(f"sqlite synchronous must be one of {', '.join(SYNCHRONOUS)}")
    if not path.parent.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the database directory {path.parent}: {exc.strerror}") from exc
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"the database file {path} is not writable")
    engine = create_engine(
        f"sqlite:///{path}",
        connect_args={"check_same_thread": False, "timeout": 30},
        json_serializer=_dumps,
        json_deserializer=orjson.loads,
        poolclass=QueuePool,
        pool_size=4,
        max_overflow=8,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control from the driver so that BEGIN IMMEDIATE is ours to issue.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        write = conn.get_execution_options().get("deskfleet_write", True)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


class FileLeadership:
    """The embedded store serves one orchestrator: an exclusive lock on a file beside the
    database makes a second server on the same file refuse to start, instead of both
    expiring each other's leases."""

    def __init__(self, url: str) -> None:
        self.path = sqlite_path(url).with_suffix(".lock")
        self._fd: int | None = None
        self.held = False

    def try_acquire(self) -> bool:
        import fcntl

        if self.held:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd, self.held = fd, True
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the lock
            self._fd, self.held = None, False
