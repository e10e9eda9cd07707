"""The vault's part of the HTTP API: ``/v1/accounts``.

Secrets go in (a PUT or PATCH body), never out: an answer says ``has_password`` and
``has_totp``, and which machines hold the account's leases, since when.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..access import Permission
from ..errors import InvalidInput
from ..models import AccountLease
from ..vault import AccountView, Vault, check_name, normalize_seed
from .access import Auth
from .schemas import NAME, ErrorOut, ts

MAX_SESSIONS = 10_000


def _seed(v: str | None) -> str | None:
    return None if v is None else normalize_seed(v)  # ValueError says what is wrong, never the value


def _sessions(v: int) -> int:
    if v < 1:
        raise ValueError("must be at least 1: how many machines may be logged in as the account at once")
    if v > MAX_SESSIONS:
        raise ValueError(f"must be at most {MAX_SESSIONS}")
    return v


def _labels(v: dict[str, str]) -> dict[str, str]:
    if len(v) > 64:
        raise ValueError("at most 64 labels")
    if any(not 0 < len(k) <= 128 for k in v):
        raise ValueError("label names are 1 to 128 characters")
    return v


class AccountIn(BaseModel):
    """An account, whole (create or replace)."""

    model_config = ConfigDict(extra="forbid")

    app: str | None = Field(default=None, max_length=128, pattern=NAME,
                            description="the pack (application) the account logs in to")
    username: str = Field(min_length=1, max_length=200)
    password: str = Field(min_length=1, max_length=1024, description="secret: stored encrypted, never shown")
    totp_seed: str | None = Field(default=None, max_length=256,
                                  description="base32 TOTP seed; it never leaves the orchestrator")
    labels: dict[str, str] = Field(default_factory=dict)
    max_sessions: int = Field(default=1, strict=True,
                              description="machines that may be logged in as the account at once")

    @field_validator("totp_seed")
    @classmethod
    def _check_seed(cls, v: str | None) -> str | None:
        return _seed(v)

    @field_validator("max_sessions")
    @classmethod
    def _check_sessions(cls, v: int) -> int:
        return _sessions(v)

    @field_validator("labels")
    @classmethod
    def _check_labels(cls, v: dict[str, str]) -> dict[str, str]:
        return _labels(v)


class AccountPatch(BaseModel):
    """Some fields of an account; ``totp_seed: null`` removes the seed."""

    model_config = ConfigDict(extra="forbid")

    app: str | None = Field(default=None, max_length=128, pattern=NAME)
    username: str | None = Field(default=None, min_length=1, max_length=200)
    password: str | None = Field(default=None, min_length=1, max_length=1024)
    totp_seed: str | None = Field(default=None, max_length=256)
    labels: dict[str, str] | None = None
    max_sessions: int | None = Field(default=None, strict=True)

    @field_validator("totp_seed")
    @classmethod
    def _check_seed(cls, v: str | None) -> str | None:
        return _seed(v)

    @field_validator("max_sessions")
    @classmethod
    def _check_sessions(cls, v: int | None) -> int | None:
        return None if v is None else _sessions(v)

    @field_validator("labels")
    @classmethod
    def _check_labels(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return None if v is None else _labels(v)

    def changes(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.model_fields_set}
        for name in ("username", "password", "labels", "max_sessions"):
            if name in out and out[name] is None:
                raise ValueError(f"{name} cannot be null" + ("; send a new one instead" if name == "password" else ""))
        return out


class LeaseOut(BaseModel):
    machine: str
    state: str = Field(description="reserved (a login in progress) or held (the machine's session note says so)")
    since: datetime
    attempt: int | None

    @classmethod
    def of(cls, lease: AccountLease) -> LeaseOut:
        return cls(machine=lease.machine_id, state=lease.state.value, since=ts(lease.since),  # type: ignore[arg-type]
                   attempt=lease.attempt_id)


class AccountOut(BaseModel):
    name: str
    app: str | None
    username: str
    labels: dict[str, str]
    max_sessions: int
    has_password: bool
    has_totp: bool
    sessions_in_use: int = Field(description="leases held or reserved now")
    leases: list[LeaseOut]
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, v: AccountView) -> AccountOut:
        a = v.account
        return cls(name=a.name, app=a.app, username=a.username, labels=a.labels, max_sessions=a.max_sessions,
                   has_password=bool(a.password), has_totp=a.totp_seed is not None, sessions_in_use=len(v.leases),
                   leases=[LeaseOut.of(x) for x in v.leases],
                   created_at=ts(a.created_at), updated_at=ts(a.updated_at))  # type: ignore[arg-type]


class AccountRemoved(BaseModel):
    removed: str
    leases_released: list[LeaseOut]


def router(vault: Vault, auth: Auth) -> APIRouter:
    read, write = auth.need(Permission.ACCOUNTS_READ), auth.need(Permission.ACCOUNTS_WRITE)
    api = APIRouter()
    errors: dict[int | str, dict[str, Any]] = {404: {"model": ErrorOut}, 409: {"model": ErrorOut},
                                               422: {"model": ErrorOut}}

    @api.put("/v1/accounts/{name}", response_model=AccountOut, status_code=201, dependencies=[write],
             responses={200: {"model": AccountOut, "description": "the account replaced"}, **errors},
             summary="Create or replace an account")
    async def put_account(name: str, body: AccountIn, response: Response) -> AccountOut:
        check_name(name)
        view, created = await vault.put(
            name, app=body.app, username=body.username, password=body.password, totp_seed=body.totp_seed,
            labels=body.labels, max_sessions=body.max_sessions)
        if not created:
            response.status_code = 200
        return AccountOut.of(view)

    @api.patch("/v1/accounts/{name}", response_model=AccountOut, dependencies=[write], responses=errors,
               summary="Change some fields of an account")
    async def patch_account(name: str, body: AccountPatch) -> AccountOut:
        try:
            changes = body.changes()
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        return AccountOut.of(await vault.patch(name, changes))

    @api.get("/v1/accounts", response_model=list[AccountOut], dependencies=[read], summary="The vault's accounts")
    async def list_accounts(app_: Annotated[str | None, Query(alias="app")] = None) -> list[AccountOut]:
        return [AccountOut.of(v) for v in await vault.all() if app_ is None or v.account.app == app_]

    @api.get("/v1/accounts/{name}", response_model=AccountOut, dependencies=[read], responses=errors)
    async def get_account(name: str) -> AccountOut:
        return AccountOut.of(await vault.get(name))

    @api.delete("/v1/accounts/{name}", response_model=AccountRemoved, dependencies=[write], responses=errors,
                summary="Remove an account (409 while a machine holds a lease on it, unless force)")
    async def remove_account(name: str, force: bool = False) -> AccountRemoved:
        released = await vault.remove(name, force=force)
        return AccountRemoved(removed=name, leases_released=[LeaseOut.of(x) for x in released])

    return api
