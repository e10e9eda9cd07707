"""The store's hot path in SQL text, handed to the database driver as it is.

A run's lifecycle takes some twenty small statements (read the attempt and its run, move
the run, record an event, update the machine…). Through SQLAlchemy Core each costs tens of
microseconds before the database sees it — building the statement, generating its cache
key, wrapping the cursor — which at a thousand runs a second is most of a core. These few
statements are written once here as SQL text with ``?`` placeholders, turned into the
driver's parameter style once per text, and executed on the connection of the store's
current transaction (so they commit, roll back and lock with everything else in it).
Driver errors are raised as SQLAlchemy's exceptions, which the store already maps to its
own (``StoreRetry``, ``StoreUnavailable``); results come back as plain dicts with JSON
columns decoded, ready for ``store.rows``.

Everything else — migrations, reads for the API, rare writes — stays in SQLAlchemy Core.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from sqlalchemy import JSON, Connection, Table
from sqlalchemy.exc import DBAPIError


class Driver:
    def __init__(self, dialect: str) -> None:
        self.pg = dialect == "postgresql"
        self._texts: dict[str, str] = {}
        self._updates: dict[tuple[str, tuple[str, ...], tuple[str, ...]], str] = {}
        self._inserts: dict[tuple[str, tuple[str, ...]], str] = {}

    # -- statements ------------------------------------------------------------------------
    def text(self, sql: str) -> str:
        """``sql`` (with ``?`` placeholders) in the driver's parameter style."""
        out = self._texts.get(sql)
        if out is None:
            out = self._texts[sql] = sql.replace("?", "%s") if self.pg else sql
        return out

    def execute(self, conn: Connection, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run ``sql`` in ``conn``'s transaction; the driver's cursor."""
        raw = conn.connection.dbapi_connection
        assert raw is not None
        cur = raw.cursor()
        try:
            cur.execute(self.text(sql), params)
        except Exception as exc:
            dbapi = conn.dialect.loaded_dbapi
            if isinstance(exc, dbapi.Error):
                # As SQLAlchemy would raise it (IntegrityError, OperationalError…), so that
                # one error mapping serves both paths.
                raise DBAPIError.instance(sql, params, exc, dbapi.Error) from exc
            raise
        return cur

    def rows(self, conn: Connection, sql: str, params: Sequence[Any], table: Table) -> list[dict[str, Any]]:
        """Rows of ``SELECT <every column of table> …`` as dicts, JSON decoded."""
        cur = self.execute(conn, sql, params)
        names = [d[0] for d in cur.description]
        json_cols = _json_columns(table)
        out = []
        for values in cur.fetchall():
            row = dict(zip(names, values, strict=True))
            for name in json_cols:
                value = row.get(name)
                if isinstance(value, (str, bytes)):
                    row[name] = orjson.loads(value)
            out.append(row)
        return out

    def one(self, conn: Connection, sql: str, params: Sequence[Any], table: Table) -> dict[str, Any] | None:
        found = self.rows(conn, sql, params, table)
        return found[0] if found else None

    def update(self, conn: Connection, table: Table, values: Mapping[str, Any], where: Mapping[str, Any]) -> int:
        """``UPDATE table SET values WHERE where`` (equalities); rows changed. A value that is
        a :class:`Raw` is SQL of its own (``runs_completed + 1``)."""
        key = (table.name, tuple(values), tuple(where))
        sql = self._updates.get(key)
        if sql is None:
            sets = ", ".join(f"{k} = {v.sql}" if isinstance(v, Raw) else f"{k} = ?" for k, v in values.items())
            cond = " AND ".join(f"{k} = ?" for k in where)
            sql = self._updates[key] = f"UPDATE {table.name} SET {sets} WHERE {cond}"
        params = [self.param(table, k, v) for k, v in values.items() if not isinstance(v, Raw)]
        params += list(where.values())
        return int(self.execute(conn, sql, params).rowcount)

    def insert(self, conn: Connection, table: Table, values: Mapping[str, Any], *, returning_id: bool = False) -> int | None:
        """``INSERT INTO table``; the new row's id if asked."""
        key = (table.name, tuple(values))
        sql = self._inserts.get(key)
        if sql is None:
            cols = ", ".join(values)
            marks = ", ".join("?" for _ in values)
            sql = f"INSERT INTO {table.name} ({cols}) VALUES ({marks})"
            if returning_id and self.pg:
                sql += " RETURNING id"
            self._inserts[key] = sql
        cur = self.execute(conn, sql, [self.param(table, k, v) for k, v in values.items()])
        if not returning_id:
            return None
        return int(cur.fetchone()[0] if self.pg else cur.lastrowid)

    @staticmethod
    def param(table: Table, column: str, value: Any) -> Any:
        if value is not None and column in _json_columns(table):
            return orjson.dumps(value).decode()
        return value


class Raw:
    """A value written as SQL in an update: ``Raw("runs_completed + 1")``."""

    __slots__ = ("sql",)

    def __init__(self, sql: str) -> None:
        self.sql = sql


_JSON: dict[str, frozenset[str]] = {}


def _json_columns(table: Table) -> frozenset[str]:
    cols = _JSON.get(table.name)
    if cols is None:
        cols = _JSON[table.name] = frozenset(c.name for c in table.columns if isinstance(c.type, JSON))
    return cols


def columns(table: Table, prefix: str = "") -> str:
    """Every column of ``table``, for a SELECT list."""
    return ", ".join(f"{prefix}{c.name}" for c in table.columns)


def select_by_id(table: Table, *, lock: bool = False) -> str:
    return f"SELECT {columns(table)} FROM {table.name} WHERE id = ?" + (" FOR UPDATE" if lock else "")


__all__ = ["Driver", "Raw", "columns", "select_by_id"]
