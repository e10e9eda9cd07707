"""Keys, roles and tenants in the HTTP API, and the audit trail of every request that acts.

- :class:`Auth` makes the dependency each route declares: ``who: Principal =
  auth.need(Permission.RUNS_READ)`` authenticates the request (401 says what is wrong
  with the key) and checks the permission (403 says which the key lacks and which role has
  it). :meth:`Auth.tenant` refuses another tenant's resource as if it did not exist (404),
  and marks the request so that the refusal is audited.
- :class:`AuditTrail` (middleware) writes the audit entry of every request that changes
  something — before its answer goes out, so a client never sees an action succeed that
  the log does not hold — and of every refusal (401, 403, another tenant's 404). Run
  submissions are not in it: each run's own timeline records its creation. Reads are
  not in it, except screenshots (:meth:`Auth.viewed`).
- ``/v1/api-keys``, ``/v1/whoami`` and ``/v1/audit``.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import replace
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..access import ALL_TENANTS, ROLE_PERMISSIONS, ApiKey, AuditEntry, Permission, Principal, Role
from ..errors import Forbidden, NotFound, StoreUnavailable, Unauthorized
from ..services.access import Access
from .schemas import NAME, ErrorOut, ts

log = logging.getLogger(__name__)

_PRINCIPAL = "deskfleet.principal"
_DENIED = "deskfleet.denied"
_EXTRA = "deskfleet.audit"
_AUTH_ERROR = "deskfleet.auth_error"
#: the route wrote its own audit entry, in the transaction of its change
_WRITTEN = "deskfleet.audit_written"
#: submissions: each run's timeline records its creation; the audit log keeps their refusals only
_SUBMITS = ("/v1/runs", "/v1/runs:batch")
_bearer = HTTPBearer(auto_error=False, description="an API key: 'Authorization: Bearer dfk_…'")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="an API key, in a header of its own")


def _state(request: Request) -> dict[str, Any]:
    return request.scope.setdefault("state", {})  # type: ignore[no-any-return]


def _least_role(permission: Permission) -> str:
    if permission is Permission.SCREENSHOTS:
        return "a key made with --screenshots"
    for role in Role:
        if permission in ROLE_PERMISSIONS[role]:
            return f"the {role.value} role"
    return "no role"


class Auth:
    def __init__(self, access: Access) -> None:
        self.access = access

    async def principal(self, request: Request, given: str | None) -> Principal:
        """Who ``given`` (a key, or nothing) is, noted on the request for its audit entry."""
        try:
            who = await self.access.authenticate(given)
        except Unauthorized as exc:
            _state(request)[_AUTH_ERROR] = exc.message
            raise
        _state(request)[_PRINCIPAL] = who
        return who

    def need(self, *permissions: Permission) -> Any:
        """The dependency of a route that needs ``permissions`` (all of them)."""

        async def principal(request: Request,
                            bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)] = None,
                            header: Annotated[str | None, Depends(_header)] = None) -> Principal:
            who = await self.principal(request, header or (bearer.credentials if bearer is not None else None))
            for p in permissions:
                if not who.can(p):
                    message = (f"your API key {who.name} ({who.role.value}) may not do this: it needs "
                               f"'{p.value}', which {_least_role(p)} has")
                    _state(request)[_AUTH_ERROR] = message
                    raise Forbidden(message)
            return who

        return Depends(principal)

    @staticmethod
    def tenant(request: Request, who: Principal, tenant: str, what: str) -> None:
        """Refuse ``what`` (e.g. "run run_01…") of another tenant as not found, and audit it."""
        if not who.sees(tenant):
            _state(request)[_DENIED] = f"{what} belongs to another tenant"
            raise NotFound(f"no {what} in tenant {who.tenant!r}")

    @staticmethod
    def viewed(request: Request, who: Principal, action: str, target: str, **detail: object) -> None:
        """Audit a read that the log must hold (a screenshot seen)."""
        _state(request).setdefault(_EXTRA, []).append(
            AuditEntry.by(who, action, target=target, status=200, detail=dict(detail)))


class AuditTrail:
    """The audit entry of each request that acts or is refused (see the module's doc)."""

    def __init__(self, app: ASGIApp, access: Access) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path.startswith(("/v1/", "/ui/")) or path == "/metrics") \
                or path.startswith("/ui/static/") or path == "/ui/stream":
            await self.app(scope, receive, send)
            return

        async def audited(message: Message) -> None:
            if message["type"] == "http.response.start":
                entries = self._entries(scope, int(message["status"]))
                if entries:
                    try:
                        await self.access.record(entries)
                    except StoreUnavailable:
                        log.error("could not write %d audit entries (%s): the database is unavailable",
                                  len(entries), ", ".join(e.action for e in entries))
            await send(message)

        await self.app(scope, receive, audited)

    def _entries(self, scope: Scope, status: int) -> list[AuditEntry]:
        state = scope.get("state") or {}
        who: Principal | None = state.get(_PRINCIPAL)
        method = scope["method"]
        route = scope.get("route")
        action = f"{method} {getattr(route, 'path', scope['path'])}"
        remote = (scope.get("client") or ("",))[0] or ""
        now = time.time()
        extra = [replace(e, at=now, remote=remote) for e in state.get(_EXTRA, ())
                 if status < 400]
        denied = status in (401, 403) or _DENIED in state
        acts = (method not in ("GET", "HEAD", "OPTIONS") and not (scope["path"] in _SUBMITS and status < 400)
                and not state.get(_WRITTEN))
        if not denied and not acts:
            return extra
        detail: dict[str, object] = {}
        if scope.get("query_string"):
            detail["query"] = scope["query_string"].decode("latin-1")[:500]
        reason = state.get(_DENIED) or state.get(_AUTH_ERROR)
        if reason:
            detail["reason"] = reason
        outcome = "denied" if denied else "ok" if status < 400 else "failed"
        entry = AuditEntry(action=action, actor=who.name if who else "unauthenticated",
                           role=who.role.value if who else None, tenant=who.tenant if who else None,
                           target=scope["path"], outcome=outcome, status=status, detail=detail, remote=remote, at=now)
        return [entry, *extra]


# -- the API's models -------------------------------------------------------------------------------
class KeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, description="what the key is for (a person, a system)")
    role: Role = Field(description="submitter: runs; operator: also the fleet; admin: also changes it")
    tenant: str = Field(default=ALL_TENANTS, max_length=128, description="the tenant it sees, or '*' for every tenant")
    screenshots: bool = Field(default=False, description="may view screenshots")
    expires_at: datetime | None = Field(default=None, description="when it stops working (none: never)")

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, v: str) -> str:
        if v != ALL_TENANTS and not re.match(NAME, v):
            raise ValueError("a tenant's name: letters, digits, '.', '_' and '-' (or '*' for every tenant)")
        return v


class KeyOut(BaseModel):
    prefix: str = Field(description="the key's public name: it starts every use of the key")
    name: str
    role: Role
    tenant: str
    screenshots: bool
    state: Literal["active", "expired", "revoked"]
    created_at: datetime
    created_by: str
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    revoked_by: str | None = None
    last_used_at: datetime | None = None

    @classmethod
    def of(cls, k: ApiKey) -> KeyOut:
        return cls(prefix=k.prefix, name=k.name, role=k.role, tenant=k.tenant, screenshots=k.screenshots,
                   state=k.state(time.time()), created_at=datetime.fromtimestamp(k.created_at, UTC), created_by=k.created_by,
                   expires_at=ts(k.expires_at), revoked_at=ts(k.revoked_at), revoked_by=k.revoked_by,
                   last_used_at=ts(k.last_used_at))


class NewKeyOut(KeyOut):
    key: str = Field(description="the whole key: shown this once, never again")


class WhoAmI(BaseModel):
    name: str
    label: str
    role: Role
    tenant: str
    screenshots: bool
    permissions: list[str]


class AuditOut(BaseModel):
    id: int
    at: datetime
    actor: str
    role: str | None
    tenant: str | None
    action: str
    target: str
    outcome: str
    status: int | None
    detail: dict[str, Any]
    remote: str

    @classmethod
    def of(cls, e: AuditEntry) -> AuditOut:
        at = ts(e.at)
        assert at is not None
        return cls(id=e.id, at=at, actor=e.actor, role=e.role, tenant=e.tenant, action=e.action, target=e.target,
                   outcome=e.outcome, status=e.status, detail=dict(e.detail or {}), remote=e.remote)


class AuditList(BaseModel):
    entries: list[AuditOut]
    next_before: int | None = Field(default=None, description="pass as ?before= for the next (older) page")


def router(access: Access, auth: Auth) -> APIRouter:
    api = APIRouter()
    errors: dict[int | str, dict[str, Any]] = {404: {"model": ErrorOut}, 422: {"model": ErrorOut}}

    anyone, keys_admin, auditor = auth.need(), auth.need(Permission.KEYS_ADMIN), auth.need(Permission.AUDIT_READ)

    def remote(request: Request) -> str:
        return request.client.host if request.client else ""

    @api.get("/v1/whoami", response_model=WhoAmI, summary="The key this request was made with")
    async def whoami(who: Principal = anyone) -> WhoAmI:
        perms = sorted(p.value for p in Permission if who.can(p))
        return WhoAmI(name=who.name, label=who.label, role=who.role, tenant=who.tenant,
                      screenshots=who.screenshots, permissions=perms)

    @api.post("/v1/api-keys", response_model=NewKeyOut, status_code=201, responses=errors,
              summary="Make an API key (its secret is in this answer only)")
    async def create_key(body: KeyIn, request: Request, who: Principal = keys_admin) -> NewKeyOut:
        key, secret = await access.create(
            who, name=body.name, role=body.role, tenant=body.tenant, screenshots=body.screenshots,
            expires_at=body.expires_at.timestamp() if body.expires_at else None, remote=remote(request))
        _state(request)[_WRITTEN] = True
        return NewKeyOut(**KeyOut.of(key).model_dump(), key=secret)

    @api.get("/v1/api-keys", response_model=list[KeyOut], summary="API keys (never their secrets)")
    async def list_keys(who: Principal = keys_admin) -> list[KeyOut]:
        return [KeyOut.of(k) for k in await access.keys(who)]

    @api.post("/v1/api-keys/{prefix}/revoke", response_model=KeyOut, responses=errors,
              summary="Revoke an API key (at once here, within seconds on other replicas)")
    async def revoke_key(prefix: str, request: Request, who: Principal = keys_admin) -> KeyOut:
        key = KeyOut.of(await access.revoke(who, prefix, remote=remote(request)))
        _state(request)[_WRITTEN] = True
        return key

    @api.get("/v1/audit", response_model=AuditList, summary="The audit log, newest first")
    async def audit(
        who: Principal = auditor,
        actor: Annotated[str | None, Query(max_length=64)] = None,
        action: Annotated[str | None, Query(max_length=200, description="entries whose action starts so")] = None,
        target: Annotated[str | None, Query(max_length=200)] = None,
        outcome: Literal["ok", "denied", "failed"] | None = None,
        since: datetime | None = None,
        after: Annotated[int | None, Query(ge=0, description="oldest first, after this id (to follow the log)")] = None,
        before: Annotated[int | None, Query(ge=1)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> AuditList:
        found = await access.entries(who, actor=actor, action=action, target=target, outcome=outcome,
                                     since=since.timestamp() if since else None, after=after, before=before,
                                     limit=limit)
        more = len(found) == limit and after is None
        return AuditList(entries=[AuditOut.of(e) for e in found], next_before=found[-1].id if more else None)

    return api
