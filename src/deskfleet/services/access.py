"""API keys and the audit log, for the API (``deskfleet.access`` has the rules).

:meth:`Access.authenticate` turns what a request sent into a :class:`Principal`, or an
Unauthorized that says what is wrong with the key. It keeps what it read of each key for
:data:`CACHE_TTL` seconds: a request does not wait on the database for its key, and a key
revoked on another replica stops working within that time (at once on this one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from ..access import (
    ALL_TENANTS,
    ANONYMOUS,
    BOOTSTRAP,
    ApiKey,
    AuditEntry,
    Principal,
    Role,
    digest,
    new_key,
    parse_key,
)
from ..crypto import same
from ..errors import InvalidInput, NotFound, StoreUnavailable, Unauthorized

if TYPE_CHECKING:
    from ..store import Store
    from ..store.runner import StoreRunner

log = logging.getLogger(__name__)

#: seconds a key read from the database is trusted (revocation reaches other replicas within it)
CACHE_TTL = 5.0
NAME_MAX = 128
HOW = "send it as 'Authorization: Bearer <key>' (or 'X-API-Key: <key>')"


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


class Access:
    def __init__(self, store: Store, db: StoreRunner, *, bootstrap: str | None, open_when_keyless: bool) -> None:
        self.store = store
        self.db = db
        self.bootstrap = bootstrap
        #: a loopback server without a bootstrap key lets everyone in until a key exists
        self.open_when_keyless = open_when_keyless and not bootstrap
        self._keys: dict[str, tuple[float, ApiKey, str] | tuple[float, None, None]] = {}
        self._any: tuple[float, bool] | None = None
        self._touched: dict[str, float] = {}
        self._background: set[asyncio.Task[None]] = set()

    # -- requests ---------------------------------------------------------------------------------
    async def authenticate(self, given: str | None) -> Principal:
        if not given:
            if self.open_when_keyless and not await self._keys_exist():
                return ANONYMOUS
            raise Unauthorized(f"this request needs an API key: {HOW}")
        if self.bootstrap and same(given, self.bootstrap):
            return BOOTSTRAP
        prefix = parse_key(given)
        if prefix is None:
            raise Unauthorized("wrong API key: it is not the server's --api-key, and not a deskfleet API key "
                               "(those look like dfk_xxxxxxxxxx_…; 'deskfleet api-keys create' makes one)")
        key, stored = await self._key(prefix)
        if key is None or stored is None:
            raise Unauthorized(f"unknown API key {prefix}: no key has that prefix (was it made on another "
                               "deskfleet, or mistyped?)")
        if not same(digest(given), stored):
            raise Unauthorized(f"wrong secret for API key {prefix}: the key's prefix exists, the rest does not "
                               "match (keys are shown once, when made; make a new one if it was lost)")
        now = time.time()
        if key.revoked_at is not None:
            raise Unauthorized(f"API key {prefix} was revoked at {_when(key.revoked_at)} by {key.revoked_by}")
        if key.expires_at is not None and key.expires_at <= now:
            raise Unauthorized(f"API key {prefix} expired at {_when(key.expires_at)}; an admin can make a new one")
        self._touch(prefix, now)
        return key.principal()

    async def _keys_exist(self) -> bool:
        now = time.monotonic()
        if self._any is None or (not self._any[1] and now - self._any[0] > CACHE_TTL):
            self._any = (now, await self.db(self.store.has_api_keys))
        return self._any[1]

    async def _key(self, prefix: str) -> tuple[ApiKey | None, str | None]:
        now = time.monotonic()
        hit = self._keys.get(prefix)
        if hit is not None and now - hit[0] < CACHE_TTL:
            return hit[1], hit[2]
        found = await self.db(self.store.api_key, prefix)
        if len(self._keys) > 10_000:
            self._keys.clear()  # a flood of made-up prefixes must not grow this without end
        self._keys[prefix] = (now, found[0], found[1]) if found else (now, None, None)
        return (found[0], found[1]) if found else (None, None)

    def _touch(self, prefix: str, now: float) -> None:
        """Note the key's use, at most once a minute per key, off the request's path."""
        if now - self._touched.get(prefix, 0.0) < 60.0:
            return
        self._touched[prefix] = now

        async def touch() -> None:
            with contextlib.suppress(StoreUnavailable):
                await self.db(self.store.touch_api_key, prefix, now)

        task = asyncio.get_running_loop().create_task(touch())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- keys ---------------------------------------------------------------------------------------
    async def create(self, by: Principal, *, name: str, role: Role, tenant: str, screenshots: bool,
                     expires_at: float | None, remote: str = "") -> tuple[ApiKey, str]:
        """A new key and its secret (shown once). A key may not reach beyond its maker: a
        tenant's admin makes keys of its own tenant only."""
        if not name.strip() or len(name) > NAME_MAX:
            raise InvalidInput(f"a key's name is 1 to {NAME_MAX} characters", field="name")
        if by.tenant != ALL_TENANTS and tenant != by.tenant:
            raise InvalidInput(f"your key belongs to tenant {by.tenant!r}: it can make keys of that tenant only",
                               field="tenant")
        if screenshots and not by.screenshots:
            raise InvalidInput("your key may not view screenshots, so it cannot make a key that may",
                               field="screenshots")
        now = time.time()
        if expires_at is not None and expires_at <= now:
            raise InvalidInput("the expiry is in the past", field="expires_at")
        made = new_key()
        key = ApiKey(prefix=made.prefix, name=name.strip(), role=role, tenant=tenant, screenshots=screenshots,
                     created_at=now, created_by=by.name, expires_at=expires_at)
        audit = AuditEntry.by(by, "api_key.created", target=made.prefix, at=now, remote=remote, status=201,
                              detail={"name": key.name, "role": role.value, "tenant": tenant,
                                      "screenshots": screenshots, "expires_at": expires_at})
        await self.db(self.store.create_api_key, key, made.digest, audit)
        self._any = (time.monotonic(), True)
        log.info("API key %s made (%s, tenant %s) by %s", key.prefix, role.value, tenant, by.name)
        return key, made.secret

    async def keys(self, by: Principal) -> list[ApiKey]:
        return await self.db(self.store.api_keys, tenant=by.scope)

    async def revoke(self, by: Principal, prefix: str, *, remote: str = "") -> ApiKey:
        found = await self.db(self.store.api_key, prefix)
        if found is None or not by.sees(found[0].tenant):
            raise NotFound(f"no API key {prefix!r}" + (f" in tenant {by.tenant!r}" if by.scope else ""))
        audit = AuditEntry.by(by, "api_key.revoked", target=prefix, at=time.time(), remote=remote, status=200)
        key = await self.db(self.store.revoke_api_key, prefix, now=time.time(), audit=audit)
        self._keys.pop(prefix, None)
        log.info("API key %s revoked by %s", prefix, by.name)
        return key

    # -- the audit log --------------------------------------------------------------------------------
    async def record(self, entries: Sequence[AuditEntry]) -> None:
        await self.db(self.store.append_audit, entries)

    async def entries(self, by: Principal, *, actor: str | None = None, action: str | None = None,
                      target: str | None = None, outcome: str | None = None, since: float | None = None,
                      after: int | None = None, before: int | None = None, limit: int = 100) -> list[AuditEntry]:
        return await self.db(self.store.audit_entries, actor=actor, action=action, target=target,
                             outcome=outcome, since=since, tenant=by.scope, after=after, before=before,
                             limit=limit)
