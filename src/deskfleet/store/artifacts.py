"""Artifacts — screenshots and the files automations attach — at rest (a part of
:class:`~deskfleet.store.sql.SQLStore`).

The store keeps an artifact's bytes as it is given them: the services encrypt them with the
server's keyring before they arrive (``encrypted_with`` names the key's fingerprint; NULL
marks a row stored in the clear before migration 0011) and decrypt them only to serve
them. The store never sees a key: re-encryption under a new key (``deskfleet keys
rotate``) hands it a function that does it, a batch per transaction.

Retention: each artifact records its machine's pool and, when its automation declares one,
its own retention; :meth:`ArtifactOps.expire_artifacts` deletes a bounded batch of those
past theirs — the automation's first, then the pool's, then the server's default — in one
short transaction. The runs they belong to stay.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Connection, delete, or_, select, update

from .. import ids
from ..models import Artifact, Attempt, Run
from .schema import artifacts, machines

T = TypeVar("T")

#: (the bytes as stored, whether they are encrypted) → the bytes encrypted with the newest key
Reseal = Callable[[bytes, bool], bytes]

_META = [c for c in artifacts.c if c.name != "data"]


@dataclass(frozen=True, slots=True)
class Expired:
    """What one batch of the retention sweep deleted."""

    deleted: int = 0
    bytes: int = 0


def artifact_row(r: Any) -> Artifact:
    return Artifact(
        id=r["id"], run_id=r["run_id"], attempt_id=r["attempt_id"], machine_id=r["machine_id"], name=r["name"],
        content_type=r["content_type"], size=r["size"], created_at=r["created_at"],
        encrypted=r["encrypted_with"] is not None, redaction=r["redaction"], retention=r["retention"],
        pool=r["pool"],
    )


class ArtifactOps:
    _pg: bool

    if TYPE_CHECKING:
        def _tx(self, write: bool = True) -> AbstractContextManager[Connection]: ...

        def _fenced(self, op: str, attempt_id: int, machine_id: str, now: float,
                    fn: Callable[[Connection, Attempt, Run | None], T], *,
                    repeat: Callable[[Connection, Any], T | None] | None = None, needs_run: bool = True) -> T: ...

    def add_artifact(
        self,
        *,
        attempt_id: int | None,
        machine_id: str,
        name: str,
        content_type: str,
        data: bytes,
        now: float,
        size: int | None = None,
        encrypted_with: str | None = None,
        redaction: dict[str, Any] | None = None,
        retention: float | None = None,
    ) -> Artifact:
        def insert(conn: Connection, run_id: str | None) -> Artifact:
            art_id = ids.new_id("art")
            pool = conn.execute(select(machines.c.pool).where(machines.c.id == machine_id)).scalar()
            conn.execute(artifacts.insert().values(
                id=art_id, run_id=run_id, attempt_id=attempt_id, machine_id=machine_id, name=name,
                content_type=content_type, size=len(data) if size is None else size, data=data, created_at=now,
                encrypted_with=encrypted_with, redaction=redaction, pool=pool, retention=retention,
            ))
            if content_type == "image/png":
                conn.execute(update(machines).where(machines.c.id == machine_id)
                             .values(last_screenshot_id=art_id))
            row = conn.execute(select(*_META).where(artifacts.c.id == art_id)).mappings().one()
            return artifact_row(row)

        if attempt_id is None:
            with self._tx() as conn:
                return insert(conn, None)
        return self._fenced("artifact", attempt_id, machine_id, now, lambda conn, a, _run: insert(conn, a.run_id),
                            needs_run=False)

    def get_artifact(self, artifact_id: str) -> tuple[Artifact, bytes] | None:
        """The artifact and its bytes as stored (encrypted if ``Artifact.encrypted``)."""
        with self._tx(write=False) as conn:
            row = conn.execute(select(artifacts).where(artifacts.c.id == artifact_id)).mappings().first()
            return (artifact_row(row), bytes(row["data"])) if row else None

    def list_artifacts(self, run_id: str) -> list[Artifact]:
        with self._tx(write=False) as conn:
            q = select(*_META).where(artifacts.c.run_id == run_id).order_by(artifacts.c.created_at)
            return [artifact_row(r) for r in conn.execute(q).mappings()]

    # -- re-encryption -------------------------------------------------------------------------------
    def rewrap_artifacts(self, after: str | None, limit: int, key: str, reseal: Reseal) -> tuple[str | None, int]:
        """Encrypt with the key whose fingerprint is ``key`` up to ``limit`` artifacts after id
        ``after`` that are not yet (those of older keys, and those stored in the clear);
        (the last id looked at — None when done —, artifacts rewritten)."""
        q = select(artifacts.c.id, artifacts.c.data, artifacts.c.encrypted_with).where(
            or_(artifacts.c.encrypted_with.is_(None), artifacts.c.encrypted_with != key))
        if after is not None:
            q = q.where(artifacts.c.id > after)
        q = q.order_by(artifacts.c.id).limit(limit)
        with self._tx() as conn:
            found = list(conn.execute(q.with_for_update() if self._pg else q))
            for art_id, data, encrypted_with in found:
                conn.execute(update(artifacts).where(artifacts.c.id == art_id).values(
                    data=reseal(bytes(data), encrypted_with is not None), encrypted_with=key))
        return (found[-1][0] if len(found) == limit else None), len(found)

    # -- retention --------------------------------------------------------------------------------------
    def expire_artifacts(self, now: float, *, default: float | None, pools: Mapping[str, float | None],
                         limit: int) -> Expired:
        """Delete up to ``limit`` artifacts past their retention, oldest first, in one
        transaction. Retention, in seconds (0 or None: kept for good): the artifact's own
        (its automation's), else ``pools[its pool]`` for a pool named there, else ``default``."""
        c = artifacts.c
        base = select(c.id, c.size).order_by(c.created_at)
        chosen: list[tuple[str, int]] = []

        def take(conn: Connection, q: Any) -> None:
            if len(chosen) < limit:
                chosen.extend((r[0], r[1]) for r in conn.execute(q.limit(limit - len(chosen))))

        with self._tx() as conn:
            own = conn.execute(select(c.retention).where(c.retention > 0).distinct()).scalars().all()
            for seconds in own:
                take(conn, base.where(c.retention == seconds, c.created_at < now - seconds))
            for pool, seconds in pools.items():
                if seconds:
                    take(conn, base.where(c.retention.is_(None), c.pool == pool, c.created_at < now - seconds))
            if default:
                q = base.where(c.retention.is_(None), c.created_at < now - default)
                if pools:
                    q = q.where(or_(c.pool.is_(None), c.pool.not_in(list(pools))))
                take(conn, q)
            if not chosen:
                return Expired()
            gone = [art_id for art_id, _ in chosen]
            conn.execute(delete(artifacts).where(c.id.in_(gone)))
            # A machine's last screenshot that went: the fleet view shows none rather than a 404.
            conn.execute(update(machines).where(machines.c.last_screenshot_id.in_(gone))
                         .values(last_screenshot_id=None))
        return Expired(len(chosen), sum(size for _, size in chosen))
