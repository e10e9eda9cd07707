"""API keys and the audit log (a part of :class:`~deskfleet.store.sql.SQLStore`).

Keys are kept by their public prefix with the SHA-256 of the whole key (``deskfleet.access``).
The audit log only grows: this module inserts and reads, and the database's triggers refuse
an UPDATE or DELETE of an entry whatever code asks (migration 0010).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, func, insert, select, update

from ..access import ApiKey, AuditEntry, Role
from ..errors import Conflict, NotFound
from .schema import api_keys, audit_log

#: how often a key's ``last_used_at`` is written (a key used on every request would
#: otherwise write on every request)
TOUCH_EVERY = 60.0


def _key(r: Any) -> ApiKey:
    return ApiKey(prefix=r["prefix"], name=r["name"], role=Role(r["role"]), tenant=r["tenant"],
                  screenshots=bool(r["screenshots"]), created_at=r["created_at"], created_by=r["created_by"],
                  expires_at=r["expires_at"], revoked_at=r["revoked_at"], revoked_by=r["revoked_by"],
                  last_used_at=r["last_used_at"])


def _entry(r: Any) -> AuditEntry:
    return AuditEntry(id=r["id"], at=r["at"], actor=r["actor"], role=r["role"], tenant=r["tenant"],
                      action=r["action"], target=r["target"], outcome=r["outcome"], status=r["status"],
                      detail=r["detail"] or {}, remote=r["remote"])


class AccessOps:
    if TYPE_CHECKING:
        def _tx(self, write: bool = True) -> AbstractContextManager[Connection]: ...

    def create_api_key(self, key: ApiKey, digest: str, audit: AuditEntry) -> ApiKey:
        with self._tx() as conn:
            if conn.execute(select(api_keys.c.prefix).where(api_keys.c.prefix == key.prefix)).first():
                raise Conflict(f"an API key {key.prefix} exists already")
            conn.execute(insert(api_keys).values(
                prefix=key.prefix, digest=digest, name=key.name, role=key.role.value, tenant=key.tenant,
                screenshots=key.screenshots, created_at=key.created_at, created_by=key.created_by,
                expires_at=key.expires_at))
            self._audit(conn, [audit])
            return key

    def api_key(self, prefix: str) -> tuple[ApiKey, str] | None:
        """The key and its digest."""
        with self._tx(write=False) as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.prefix == prefix)).mappings().first()
            return (_key(row), row["digest"]) if row else None

    def api_keys(self, *, tenant: str | None = None) -> list[ApiKey]:
        q = select(api_keys).order_by(api_keys.c.created_at, api_keys.c.prefix)
        if tenant is not None:
            q = q.where(api_keys.c.tenant == tenant)
        with self._tx(write=False) as conn:
            return [_key(r) for r in conn.execute(q).mappings()]

    def has_api_keys(self) -> bool:
        with self._tx(write=False) as conn:
            return bool(conn.execute(select(func.count()).select_from(api_keys)).scalar())

    def revoke_api_key(self, prefix: str, *, now: float, audit: AuditEntry) -> ApiKey:
        """Revoke a key (again: a no-op that keeps the first revocation)."""
        with self._tx() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.prefix == prefix)).mappings().first()
            if row is None:
                raise NotFound(f"no API key {prefix!r}")
            if row["revoked_at"] is None:
                conn.execute(update(api_keys).where(api_keys.c.prefix == prefix).values(
                    revoked_at=now, revoked_by=audit.actor))
                self._audit(conn, [audit])
            return _key(conn.execute(select(api_keys).where(api_keys.c.prefix == prefix)).mappings().one())

    def touch_api_key(self, prefix: str, now: float) -> None:
        with self._tx() as conn:
            conn.execute(update(api_keys).where(
                api_keys.c.prefix == prefix,
                (api_keys.c.last_used_at.is_(None)) | (api_keys.c.last_used_at < now - TOUCH_EVERY),
            ).values(last_used_at=now))

    # -- the audit log ----------------------------------------------------------------------------
    def append_audit(self, entries: Sequence[AuditEntry]) -> None:
        if entries:
            with self._tx() as conn:
                self._audit(conn, entries)

    def _audit(self, conn: Connection, entries: Sequence[AuditEntry]) -> None:
        conn.execute(insert(audit_log), [
            {"at": e.at, "actor": e.actor[:64], "role": e.role, "tenant": e.tenant, "action": e.action[:200],
             "target": e.target[:200], "outcome": e.outcome, "status": e.status, "detail": e.detail or {},
             "remote": e.remote[:64]}
            for e in entries])

    def audit_entries(self, *, actor: str | None = None, action: str | None = None, target: str | None = None,
                      outcome: str | None = None, since: float | None = None, tenant: str | None = None,
                      after: int | None = None, before: int | None = None, limit: int = 100) -> list[AuditEntry]:
        """Newest first (or, with ``after``, oldest first from that id: to follow the log)."""
        q = select(audit_log).limit(limit)
        q = q.order_by(audit_log.c.id) if after is not None else q.order_by(audit_log.c.id.desc())
        if after is not None:
            q = q.where(audit_log.c.id > after)
        if before is not None:
            q = q.where(audit_log.c.id < before)
        if actor is not None:
            q = q.where(audit_log.c.actor == actor)
        if action is not None:
            q = q.where(audit_log.c.action.startswith(action, autoescape=True))
        if target is not None:
            q = q.where(audit_log.c.target == target)
        if outcome is not None:
            q = q.where(audit_log.c.outcome == outcome)
        if since is not None:
            q = q.where(audit_log.c.at >= since)
        if tenant is not None:
            q = q.where(audit_log.c.tenant == tenant)
        with self._tx(write=False) as conn:
            return [_entry(r) for r in conn.execute(q).mappings()]
