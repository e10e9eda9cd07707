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

On PostgreSQL, writes whose result the store does not read at once (updates, inserts
without an id to return, the events) are not sent one round trip each: they wait on the
connection and go together, in one pipeline (psycopg's pipeline mode), just before the
transaction's next read or its commit. A row count the store relies on (a run moved from
the state it was read in) is checked when the pipeline returns; a write refused there fails
the whole transaction, as it would have one statement earlier. Every read sees every write
before it: the driver's own reads send what waits first, and so does any statement
SQLAlchemy runs on the connection (:func:`send_before_statements`).

Everything else — migrations, reads for the API, rare writes — stays in SQLAlchemy Core.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson
from sqlalchemy import JSON, Connection, Dialect, Engine, Table, TextClause, event, text
from sqlalchemy.exc import DBAPIError

#: a statement as its driver takes it: the SQL, and how to turn named values into parameters
Compiled = tuple[str, Callable[[Mapping[str, Any]], Any]]
#: where a connection keeps its writes not yet sent (``Connection.info``, which lives as long
#: as the pooled connection: the store empties it when a transaction begins)
WAITING = "deskfleet_waiting"


class Waiting:
    """A write not yet sent: its SQL and parameters, what its row count must be, and the one
    row it changes (table, id) if it is known to change no other."""

    __slots__ = ("expect", "many", "params", "row", "sql", "what")

    def __init__(self, sql: str, params: Any, many: bool, expect: int | None, what: str,
                 row: tuple[str, Any] | None = None) -> None:
        self.sql, self.params, self.many, self.expect, self.what = sql, params, many, expect, what
        self.row = row


def together(waiting: Sequence[Waiting]) -> list[Waiting]:
    """``waiting`` with the writes of one statement merged into one ``executemany`` (half the
    client's work per statement, measured: 20 to 25 µs against 40 to 45 µs), in an order that
    changes nothing: a write joins an earlier one of the same statement only over writes that
    touch other rows (each changes one known row), never over a write whose rows are unknown
    (a lock, an insert, an executemany). Row counts add up: each merged write changes one row
    by its primary key, so the total is the number of writes exactly when each changed one."""
    out: list[Waiting] = []
    touched: list[set[tuple[str, Any]] | None] = []  # per entry of out; None: unknown rows
    for w in waiting:
        target: int | None = None
        if w.row is not None and not w.many:
            for i in range(len(out) - 1, -1, -1):
                rows = touched[i]
                if rows is None:
                    break
                g = out[i]
                if g.sql == w.sql and (g.expect is None) == (w.expect is None):
                    target = i
                    break
                if w.row in rows:
                    break
        if target is None:
            out.append(w)
            touched.append({w.row} if w.row is not None and not w.many else None)
            continue
        g = out[target]
        if not g.many:  # a new entry: the waiting write itself stays as it was
            g = out[target] = Waiting(g.sql, [g.params], True, g.expect, g.what, g.row)
        g.params.append(w.params)
        if g.expect is not None and w.expect is not None:
            g.expect += w.expect
        rows = touched[target]
        assert rows is not None and w.row is not None  # (a write without a known row never joins)
        rows.add(w.row)
    return out


class RowCountMismatch(AssertionError):
    """A write changed other rows than the store knew it would: what it read has changed
    under its transaction (a defect, or a writer that skipped the lock order)."""


class Driver:
    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.returning = dialect.name == "postgresql"  # the new row's id from RETURNING, not lastrowid
        # Writes wait and go in one pipeline on PostgreSQL (a round trip saved per write);
        # SQLite is in-process, where a statement costs no round trip to save.
        self.pipelines = dialect.name == "postgresql"
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
        """Run ``stmt`` with its named ``values`` in ``conn``'s transaction; the driver's cursor
        (after every write still waiting — in the same round trip — so that what it reads
        includes them)."""
        if conn.info.get(WAITING):
            return self._through(conn, [(stmt, values or {}, None)])[0]
        sql, params = self.compiled(stmt)
        return self._run(conn, sql, params(values or {}), many=False)

    def execute_many(self, conn: Connection, stmt: TextClause, values: Sequence[Mapping[str, Any]]) -> None:
        """``stmt`` once per set of values, in one call of the driver's ``executemany``."""
        sql, params = self.compiled(stmt)
        self._write(conn, sql, [params(v) for v in values], many=True)

    def later(self, conn: Connection, stmt: TextClause, values: Mapping[str, Any] | None = None, *,
              expect: int | None = None, what: str = "", row: tuple[str, Any] | None = None) -> None:
        """Run ``stmt``, a write whose result is not read (a lock taken, an update), now or
        with the transaction's next round trip; ``expect``: the rows it must change; ``row``:
        the one row it changes, if known (table, id: see :func:`together`)."""
        sql, params = self.compiled(stmt)
        self._write(conn, sql, params(values or {}), many=False, expect=expect, what=what, row=row)

    def _write(self, conn: Connection, sql: str, params: Any, *, many: bool,
               expect: int | None = None, what: str = "", row: tuple[str, Any] | None = None) -> None:
        if self.pipelines:
            conn.info.setdefault(WAITING, []).append(Waiting(sql, params, many, expect, what, row))
            return
        cur = self._run(conn, sql, params, many=many)
        if expect is not None and cur.rowcount != expect:
            raise RowCountMismatch(f"{what or sql}: {cur.rowcount} rows changed, expected {expect}")

    def send(self, conn: Connection) -> None:
        """Send the writes waiting on ``conn``, in one pipeline, and check their row counts."""
        if conn.info.get(WAITING):
            self._through(conn, [])

    @staticmethod
    def forget(conn: Connection) -> None:
        """Drop what waits on ``conn`` (a transaction begins, or was rolled back)."""
        conn.info[WAITING] = []

    def _run(self, conn: Connection, sql: str, params: Any, *, many: bool) -> Any:
        raw = conn.connection.dbapi_connection
        assert raw is not None
        cur = raw.cursor()
        try:
            if many:
                cur.executemany(sql, params)
            else:
                cur.execute(sql, params)
        except Exception as exc:
            raise self._error(conn, exc, sql, params) from exc
        return cur

    @staticmethod
    def _error(conn: Connection, exc: Exception, sql: str, params: Any) -> Exception:
        dbapi = conn.dialect.loaded_dbapi
        if isinstance(exc, dbapi.Error):
            # As SQLAlchemy would raise it (IntegrityError, OperationalError…), so that one
            # error mapping serves both paths.
            return DBAPIError.instance(sql, params, exc, dbapi.Error)
        return exc

    def rows(self, conn: Connection, stmt: TextClause, values: Mapping[str, Any], table: Table) -> list[dict[str, Any]]:
        """Rows of ``SELECT <every column of table> …`` as dicts, JSON decoded."""
        if conn.info.get(WAITING):
            return self._through(conn, [(stmt, values, table)])[0]  # type: ignore[no-any-return]
        return self._decoded(self.execute(conn, stmt, values), table)

    @staticmethod
    def _decoded(cur: Any, table: Table) -> list[dict[str, Any]]:
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

    def rows_together(
        self, conn: Connection, reads: Sequence[tuple[TextClause, Mapping[str, Any], Table]],
    ) -> list[list[dict[str, Any]]]:
        """Several reads' rows (as :meth:`rows`), sent in one pipeline on PostgreSQL — one
        round trip for all — with every write still waiting ahead of them; each read runs
        after the one before it (a lock it takes is held by the next)."""
        if not self.pipelines or len(reads) < 2:
            return [self.rows(conn, stmt, values, table) for stmt, values, table in reads]
        return self._through(conn, reads)

    def _through(
        self, conn: Connection, reads: Sequence[tuple[TextClause, Mapping[str, Any], Table | None]],
    ) -> list[Any]:
        """The writes waiting on ``conn``, then ``reads``, in one round trip (one pipeline;
        a lone statement needs none, whose sync would be a message more); row counts
        checked; each read's rows decoded (a read without a table: its cursor)."""
        waiting = together(conn.info.get(WAITING) or [])
        conn.info[WAITING] = []
        raw = conn.connection.dbapi_connection
        assert raw is not None
        sent: list[tuple[Any, Waiting | None, Table | None]] = []
        sql, params = "", None

        def run() -> None:
            nonlocal sql, params
            for w in waiting:
                sql, params = w.sql, w.params
                cur = raw.cursor()
                (cur.executemany if w.many else cur.execute)(w.sql, w.params)
                sent.append((cur, w, None))
            for stmt, values, table in reads:
                sql, make = self.compiled(stmt)
                params = make(values)
                cur = raw.cursor()
                cur.execute(sql, params)
                sent.append((cur, None, table))

        try:
            if len(waiting) + len(reads) == 1:
                run()
            else:
                with raw.pipeline():
                    run()
        except Exception as exc:
            raise self._error(conn, exc, sql, params) from exc
        out: list[Any] = []
        for cur, w, table in sent:
            if w is None:
                out.append(cur if table is None else self._decoded(cur, table))
            elif w.expect is not None and cur.rowcount != w.expect:
                more = f" (with {len(w.params) - 1} more like it)" if w.many else ""
                raise RowCountMismatch(f"{w.what or w.sql}{more}: {cur.rowcount} rows changed, expected {w.expect}")
        return out

    def one(self, conn: Connection, stmt: TextClause, values: Mapping[str, Any], table: Table) -> dict[str, Any] | None:
        found = self.rows(conn, stmt, values, table)
        return found[0] if found else None

    def update(self, conn: Connection, table: Table, values: Mapping[str, Any], where: Mapping[str, Any], *,
               expect: int | None = None) -> None:
        """``UPDATE table SET values WHERE where`` (equalities), now or with the transaction's
        next round trip (see the module); ``expect``: the rows it must change, or it fails
        the transaction. A value that is a :class:`Raw` is SQL of its own
        (``runs_completed + 1``)."""
        # A Raw value is part of the statement's text, so part of its key.
        key = (table.name, tuple(f"{k} = {v.sql}" if isinstance(v, Raw) else k for k, v in values.items()), tuple(where))
        stmt = self._updates.get(key)
        if stmt is None:
            sets = ", ".join(f"{k} = {v.sql}" if isinstance(v, Raw) else f"{k} = :{k}" for k, v in values.items())
            cond = " AND ".join(f"{k} = :where_{k}" for k in where)
            stmt = self._updates[key] = text(f"UPDATE {table.name} SET {sets} WHERE {cond}")
        named = {k: self.param(table, k, v) for k, v in values.items() if not isinstance(v, Raw)}
        named.update({f"where_{k}": v for k, v in where.items()})
        self.later(conn, stmt, named, expect=expect, what=f"update {table.name} {dict(where)}",
                   row=(table.name, where["id"]) if "id" in where else None)  # ids are primary keys

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
        one round trip for all of them), now or with the transaction's next round trip."""
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


def send_before_statements(engine: Engine, driver: Driver) -> None:
    """Make every statement SQLAlchemy runs on ``engine`` send the driver's waiting writes
    first, so that it sees them (and runs after them) as it would have without waiting."""

    @event.listens_for(engine, "before_cursor_execute")
    def _send(conn: Connection, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if conn.info.get(WAITING):
            driver.send(conn)


__all__ = ["Driver", "Raw", "RowCountMismatch", "Waiting", "send_before_statements", "together"]
