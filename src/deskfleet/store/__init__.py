"""Durable state: runs, attempts and their leases, machines, events, artifacts.

``open_store(url)`` returns a :class:`Store` for a database URL: SQLite
(``sqlite:///path.db``, the embedded default, one orchestrator) or PostgreSQL
(``postgresql://user@host/db``, several orchestrator replicas). ``open_leadership(url)``
returns how replicas on that database agree on one leader.
"""

from __future__ import annotations

from typing import Protocol

from sqlalchemy.exc import DBAPIError

from ..errors import ConfigError, StoreUnavailable
from .base import ConnectResult, Finished, Heartbeat, Store, SweepResult
from .migrate import upgrade
from .sql import SQLStore

__all__ = [
    "ConnectResult",
    "Finished",
    "Heartbeat",
    "Leadership",
    "SQLStore",
    "Store",
    "SweepResult",
    "is_postgres",
    "open_leadership",
    "open_store",
]


class Leadership(Protocol):
    """Which replica runs the fleet manager's sweeps: at most one at a time."""

    held: bool

    def try_acquire(self) -> bool:
        """Take leadership if free (or confirm it is still ours); never blocks for long."""

    def release(self) -> None: ...


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://", "postgresql+"))


def open_store(url: str, *, migrate: bool = True, sqlite_synchronous: str = "FULL") -> Store:
    if url.startswith("sqlite:///"):
        from .sqlite import make_engine

        engine = make_engine(url, synchronous=sqlite_synchronous)
    elif is_postgres(url):
        from .postgres import make_engine as make_pg_engine

        engine = make_pg_engine(url)
    else:
        raise ConfigError(
            f"unsupported database URL {url!r}; expected sqlite:///path/to/file.db or "
            "postgresql://user@host/database"
        )
    store = SQLStore(engine, migrate=upgrade)
    if migrate:
        try:
            store.migrate()
        except DBAPIError as exc:
            store.close()
            detail = (str(exc.orig).strip().splitlines() or ["?"])[0]
            raise StoreUnavailable(f"cannot use the database at {safe_url(url)}: {detail}") from exc
    return store


def safe_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparseable URL has nothing worth hiding that we could find
        return url.split("@")[-1]


def open_leadership(url: str) -> Leadership:
    if is_postgres(url):
        from .postgres import AdvisoryLeadership

        return AdvisoryLeadership(url)
    from .sqlite import FileLeadership

    return FileLeadership(url)
