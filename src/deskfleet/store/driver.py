"""The store's hot path in SQL text, handed to the database driver as it is.

A run's lifecycle takes some twenty small statements (read the attempt and its run, move
the run, record an event, update the machine…). Through SQLAlchemy Core each costs tens of
microseconds before the database sees it — building the statement, generating its cache
key, wrapping the cursor — which at a thousand runs a second is most of a core. These few
statements are SQL text with named parameters (``store.statements``, and the equality
updates and inserts made here), turned into the driver's parameter style by SQLAlchemy's
own compiler once per text, and executed on the connection of the store's current
transaction (so they commit, roll back and lock with everything else in it). Driver errors
are raised as SQLAlchemy's exceptions, which the store already maps to its own
(``StoreRetry``, ``StoreUnavailable``); results come back as plain dicts with JSON columns
decoded, ready for ``store.rows``.

Everything else — migrations, reads for the API, rare writes — stays in SQLAlchemy Core.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson
from sqlalchemy import JSON, Connection, Dialect, Table, TextClause, text
from sqlalchemy.exc import DBAPIError

#: a statement as its driver takes it: the SQL, and how to turn named values into parameters
Compiled = tuple[str, Callable[[Mapping[str, Any]], Any]]


class Driver:
    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.returning = dialect.name == "postgresql"  # the new row's id from RETURNING, not lastrowid
        self._compiled: dict[str, Compiled] = {}
        self._updates: dict[tuple[str, tuple[str, ...], tuple[str, ...]], TextClause] = {}
        self._inserts: dict[tuple[str, tuple[str, ...], bool, bool], TextClause] = {}

    # -- statements ------------------------------------------------------------------------
    def compiled(self, stmt: TextClause) -> Compiled:
        """``stmt`` in the driver's parameter style (``?`` in order for sqlite3, ``%(name)s``
        for psycopg), as SQLAlchemy's compiler writes it for this dialect."""
        out = self._compiled.get(stmt.text)
        if out is None:
            c = stmt.compile(dialect=self.dialect)
            order = c.positiontup
            if order:
                names = tuple(order)
                out = (c.string, lambda values: tuple(values[n] for n in names))
            else:
                out = (c.string, dict)
            self._compiled[stmt.text] = out
        return out

    def execute(self, conn: Connection, stmt: TextClause, values: Mapping[str, Any] | None = None) -> Any:
        """Run ``stmt`` with its named ``values`` in ``conn``'s transaction; the driver's cursor."""
        sql, params = self.compiled(stmt)
        return self._run(conn, sql, params(values or {}), many=False)

    def execute_many(self, conn: Connection, stmt: TextClause, values: Sequence[Mapping[str, Any]]) -> None:
        """``stmt`` once per set of values, in one call of the driver's ``executemany``."""
        sql, params = self.compiled(stmt)
        self._run(conn, sql, [params(v) for v in values], many=True)

    @staticmethod
    def _run(conn: Connection, sql: str, params: Any, *, many: bool) -> Any:
        raw = conn.connection.dbapi_connection
        assert raw is not None
        cur = raw.cursor()
        try:
            if many:
                cur.executemany(sql, params)
            else:
                cur.execute(sql, params)
        except Exception as exc:
            dbapi = conn.dialect.loaded_dbapi
            if isinstance(exc, dbapi.Error):
                # As SQLAlchemy would raise it (IntegrityError, OperationalError…), so that
                # one error mapping serves both paths.
                raise DBAPIError.instance(sql, params, exc, dbapi.Error) from exc
            raise
        return cur

    def rows(self, conn: Connection, stmt: TextClause, values: Mapping[str, Any], table: Table) -> list[dict[str, Any]]:
        """Rows of ``SELECT <every column of table> …`` as dicts, JSON decoded."""
        cur = self.execute(conn, stmt, values)
        names = [d[0] for d in cur.description]
        json_cols = _json_columns(table)
        out = []
        for found in cur.fetchall():
            row = dict(zip(names, found, strict=True))
            for name in json_cols:
                value = row.get(name)
                if isinstance(value, (str, bytes)):
                    row[name] = orjson.loads(value)
            out.append(row)
        return out

    def one(self, conn: Connection, stmt: TextClause, values: Mapping[str, Any], table: Table) -> dict[str, Any] | None:
        found = self.rows(conn, stmt, values, table)
        return found[0] if found else None

    def update(self, conn: Connection, table: Table, values: Mapping[str, Any], where: Mapping[str, Any]) -> int:
        """``UPDATE table SET values WHERE where`` (equalities); rows changed. A value that is
        a :class:`Raw` is SQL of its own (``runs_completed + 1``)."""
        key = (table.name, tuple(values), tuple(where))
        stmt = self._updates.get(key)
        if stmt is None:
            sets = ", ".join(f"{k} = {v.sql}" if isinstance(v, Raw) else f"{k} = :{k}" for k, v in values.items())
            cond = " AND ".join(f"{k} = :where_{k}" for k in where)
            stmt = self._updates[key] = text(f"UPDATE {table.name} SET {sets} WHERE {cond}")
        named = {k: self.param(table, k, v) for k, v in values.items() if not isinstance(v, Raw)}
        named.update({f"where_{k}": v for k, v in where.items()})
        return int(self.execute(conn, stmt, named).rowcount)

    def insert(
        self, conn: Connection, table: Table, values: Mapping[str, Any], *,
        returning_id: bool = False, skip_conflict: bool = False,
    ) -> int | None:
        """``INSERT INTO table``: the new row's id if ``returning_id``, else the rows inserted.
        With ``skip_conflict``, a row a unique key refuses is not inserted (``ON CONFLICT DO
        NOTHING``: no error, which on PostgreSQL would abort the whole transaction): then 0
        rows, or None for the id."""
        stmt = self._insert(table, tuple(values), returning_id, skip_conflict)
        cur = self.execute(conn, stmt, {k: self.param(table, k, v) for k, v in values.items()})
        if not returning_id:
            return int(cur.rowcount)
        if self.returning:
            row = cur.fetchone()
            return None if row is None else int(row[0])
        return int(cur.lastrowid) if cur.rowcount == 1 else None

    def insert_many(self, conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]]) -> None:
        """Rows that all name the same columns, in one ``executemany`` (psycopg pipelines it:
        one round trip for all of them)."""
        if not rows:
            return
        stmt = self._insert(table, tuple(rows[0]), False, False)
        self.execute_many(conn, stmt, [{k: self.param(table, k, v) for k, v in row.items()} for row in rows])

    def _insert(self, table: Table, names: tuple[str, ...], returning_id: bool, skip_conflict: bool) -> TextClause:
        """``INSERT INTO table (names) VALUES (:names)``, made once per shape."""
        key = (table.name, names, returning_id, skip_conflict)
        stmt = self._inserts.get(key)
        if stmt is None:
            sql = f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({', '.join(f':{k}' for k in names)})"
            if skip_conflict:
                sql += " ON CONFLICT DO NOTHING"
            if returning_id and self.returning:
                sql += " RETURNING id"
            stmt = self._inserts[key] = text(sql)
        return stmt

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


__all__ = ["Driver", "Raw"]
