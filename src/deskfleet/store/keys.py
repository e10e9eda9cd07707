"""Which secret keys the database's secrets are encrypted with, and re-encrypting them (a
part of :class:`~deskfleet.store.sql.SQLStore`).

The database records the fingerprints of the keys *in use* — every key that may have
encrypted something stored. A server may serve only if its keyring holds all of them
(:meth:`KeyOps.claim_key`); the key it encrypts with joins the set as it starts using it.
``deskfleet keys rotate`` re-encrypts every secret with the newest key (in batches, while
the servers run) and then shrinks the set to that key alone, after which older keys may
leave the key files.

Each replica also reports the key it encrypts with (``replicas.key``), so the rotation
can wait until every running replica has picked up the new key before re-encrypting.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import Connection, Text, cast, select, update

from ..crypto import is_encrypted
from .schema import accounts, meta, replicas, runs

_IN_USE = "secret_keys"  # JSON list of key fingerprints
_LEGACY = "secret_key"  # one fingerprint, written by releases before keyrings
_FINGERPRINT_KEY = "fingerprint_key"  # the key of request fingerprints, encrypted

Rewrap = Callable[[str], "str | None"]


class KeyOps:
    _pg: bool

    if TYPE_CHECKING:
        def _tx(self, write: bool = True) -> AbstractContextManager[Connection]: ...

    def claim_key(self, ring: Sequence[str] | str) -> bool:
        """``ring``: the fingerprints of a server's keys, the one it encrypts with first.
        Whether it holds every key in use; if so, its first key is now in use too."""
        fingerprints = [ring] if isinstance(ring, str) else list(ring)
        with self._tx() as conn:
            in_use = self._in_use(conn)
            if in_use is None:
                self._put_meta(conn, _IN_USE, orjson.dumps(fingerprints[:1]).decode())
                return True
            if not set(in_use) <= set(fingerprints):
                return False
            if fingerprints[0] not in in_use:
                self._put_meta(conn, _IN_USE, orjson.dumps([*in_use, fingerprints[0]]).decode())
            return True

    def keys_in_use(self) -> list[str]:
        with self._tx(write=False) as conn:
            return self._in_use(conn) or []

    def settle_keys(self, expected: Sequence[str], newest: str) -> bool:
        """After a re-encryption: only ``newest`` is in use — if the set is still
        ``expected`` (no replica started encrypting with yet another key meanwhile)."""
        with self._tx() as conn:
            q = select(meta.c.value).where(meta.c.key == _IN_USE)
            conn.execute(q.with_for_update() if self._pg else q)  # against a replica adding its key now
            current = self._in_use(conn)
            if sorted(current or []) != sorted(expected):
                return False
            self._put_meta(conn, _IN_USE, orjson.dumps([newest]).decode())
            return True

    def fingerprint_key(self, make: Callable[[], str]) -> str:
        """The (encrypted) key of request fingerprints; ``make()`` creates it the first time."""
        with self._tx() as conn:
            value = conn.execute(select(meta.c.value).where(meta.c.key == _FINGERPRINT_KEY)).scalar()
            if value is None:
                value = make()
                self._put_meta(conn, _FINGERPRINT_KEY, value, only_new=True)
                value = conn.execute(select(meta.c.value).where(meta.c.key == _FINGERPRINT_KEY)).scalar()
            return str(value)

    def replica_keys(self) -> list[tuple[str, str, str | None, float]]:
        """(replica id, name, fingerprint of the key it encrypts with, last seen)."""
        with self._tx(write=False) as conn:
            q = select(replicas.c.id, replicas.c.name, replicas.c.key, replicas.c.last_seen).order_by(replicas.c.name)
            return [(r[0], r[1], r[2], r[3]) for r in conn.execute(q)]

    # -- re-encryption, a batch per transaction --------------------------------------------------
    def rewrap_runs(self, after: str | None, limit: int, rewrap: Rewrap) -> tuple[str | None, int]:
        """Re-encrypt the secret inputs of up to ``limit`` runs after run id ``after`` (those
        that hold any); (the last run id looked at — None when done —, runs rewritten)."""
        q = select(runs.c.id, runs.c.input).where(cast(runs.c.input, Text).like("%enc:v1:%"))
        if after is not None:
            q = q.where(runs.c.id > after)
        q = q.order_by(runs.c.id).limit(limit)
        changed = 0
        with self._tx() as conn:
            found = list(conn.execute(q.with_for_update() if self._pg else q))
            for run_id, data in found:
                data = orjson.loads(data) if isinstance(data, (str, bytes)) else dict(data)
                new = {k: (rewrap(v) or v) if is_encrypted(v) else v for k, v in data.items()}
                if new != data:
                    conn.execute(update(runs).where(runs.c.id == run_id).values(input=new))
                    changed += 1
        return (found[-1][0] if len(found) == limit else None), changed

    def rewrap_accounts(self, rewrap: Rewrap) -> int:
        """Re-encrypt every account's password and TOTP seed; how many accounts changed."""
        changed = 0
        with self._tx() as conn:
            q = select(accounts.c.name, accounts.c.password, accounts.c.totp_seed).order_by(accounts.c.name)
            for name, password, seed in list(conn.execute(q.with_for_update() if self._pg else q)):
                values: dict[str, Any] = {}
                if is_encrypted(password) and (p := rewrap(password)) is not None:
                    values["password"] = p
                if seed is not None and is_encrypted(seed) and (t := rewrap(seed)) is not None:
                    values["totp_seed"] = t
                if values:
                    conn.execute(update(accounts).where(accounts.c.name == name).values(**values))
                    changed += 1
        return changed

    def rewrap_meta(self, rewrap: Rewrap) -> int:
        with self._tx() as conn:
            value = conn.execute(select(meta.c.value).where(meta.c.key == _FINGERPRINT_KEY)).scalar()
            if value is None or (new := rewrap(str(value))) is None:
                return 0
            self._put_meta(conn, _FINGERPRINT_KEY, new)
            return 1

    # -- plumbing ----------------------------------------------------------------------------------
    def _in_use(self, conn: Connection) -> list[str] | None:
        found = dict(conn.execute(select(meta.c.key, meta.c.value).where(meta.c.key.in_([_IN_USE, _LEGACY]))).all())
        if _IN_USE in found:
            return list(orjson.loads(found[_IN_USE]))
        if _LEGACY in found:
            return [str(found[_LEGACY])]
        return None

    def _put_meta(self, conn: Connection, key: str, value: str, *, only_new: bool = False) -> None:
        if self._pg:
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
        stmt = insert(meta).values(key=key, value=value)
        if only_new:
            conn.execute(stmt.on_conflict_do_nothing(index_elements=[meta.c.key]))
        else:
            conn.execute(stmt.on_conflict_do_update(index_elements=[meta.c.key], set_={"value": value}))
