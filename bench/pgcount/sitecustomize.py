"""Loaded by every Python process started with bench/pgcount on PYTHONPATH (see
bench/statements.py): in a ``deskfleet server`` process, counts the statements and commits
it sends through psycopg, and writes the counts to $DESKFLEET_PGCOUNT_DIR every 0.2 s."""

import collections
import json
import os
import re
import sys
import threading
import time

if "server" in sys.argv and os.environ.get("DESKFLEET_PGCOUNT_DIR"):
    import psycopg

    _counts: collections.Counter[str] = collections.Counter()
    _lock = threading.Lock()

    def _shape(query: object) -> str:
        text = query if isinstance(query, str) else str(query)
        return re.sub(r"SELECT .*? FROM", "SELECT … FROM", " ".join(text.split()))[:140]

    def _counting(method: str, kind: str) -> None:
        real = getattr(psycopg.Cursor, method)

        def call(self: object, query: object, *args: object, **kwargs: object) -> object:
            with _lock:
                _counts[f"{kind} {_shape(query)}"] += 1
            return real(self, query, *args, **kwargs)

        setattr(psycopg.Cursor, method, call)

    _counting("execute", "execute")
    _counting("executemany", "executemany")
    _commit = psycopg.Connection.commit

    def _commit_counting(self: psycopg.Connection) -> None:  # type: ignore[type-arg]
        with _lock:
            _counts["commit"] += 1
        _commit(self)

    psycopg.Connection.commit = _commit_counting  # type: ignore[method-assign]

    def _dump() -> None:
        path = os.path.join(os.environ["DESKFLEET_PGCOUNT_DIR"], f"{os.getpid()}.json")
        while True:
            time.sleep(0.2)
            with _lock:
                data = dict(_counts)
            with open(path, "w") as f:
                json.dump(data, f)

    threading.Thread(target=_dump, daemon=True).start()
