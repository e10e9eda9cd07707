"""Durable state: runs, attempts and their leases, machines, events, artifacts.

``open_store(url)`` returns a :class:`Store` for a database URL. SQLite
(``sqlite:///path.db``) is the embedded default.
"""

from __future__ import annotations

from ..errors import ConfigError
from .base import ConnectResult, Finished, Heartbeat, Store, SweepResult
from .migrate import upgrade
from .sql import SQLStore

__all__ = ["ConnectResult", "Finished", "Heartbeat", "SQLStore", "Store", "SweepResult", "open_store"]


def open_store(url: str, *, migrate: bool = True, sqlite_synchronous: str = "FULL") -> Store:
    if url.startswith("sqlite:///"):
        from .sqlite import make_engine

        engine = make_engine(url, synchronous=sqlite_synchronous)
    elif url.startswith(("postgresql://", "postgres://", "postgresql+")):
        raise ConfigError(
            "PostgreSQL support is not in this release yet; use the embedded SQLite store "
            "(--db sqlite:///path/to/deskfleet.db)"
        )
    else:
        raise ConfigError(f"unsupported database URL {url!r}; expected sqlite:///path/to/file.db")
    store = SQLStore(engine, migrate=upgrade)
    if migrate:
        store.migrate()
    return store
