"""Packs in the HTTP API: ``/v1/packs`` (publish, list, show, download), a pool's assigned
version and its rollouts (``/v1/pools/{name}/pack``, ``/v1/pools/{name}/rollouts``), and
the archive agents download with their agent key (``/agent/v1/packs/…/archive``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..access import Permission
from ..errors import InvalidRequest
from ..packfile import NAME, VERSION
from ..services.machines import Machines
from ..services.packs import Packs
from ..store.packs import PackRecord, Rollout
from .access import Auth
from .agents import agent_auth
from .schemas import ts

ZIP = "application/zip"


class PackOut(BaseModel):
    name: str
    version: str
    sha256: str
    size: int
    automations: list[str] = Field(description="name@version of each automation it offers")
    requires: list[str] = Field(default_factory=list, description="Python requirements agents install beside it")
    description: str = ""
    created_at: datetime
    archive: str = Field(description="where its archive is downloaded")
    created: bool | None = Field(default=None, description="publish only: whether this version is new")

    @classmethod
    def of(cls, p: PackRecord, created: bool | None = None) -> PackOut:
        section: dict[str, Any] = p.manifest["pack"] if isinstance(p.manifest.get("pack"), dict) else {}
        return cls(name=p.name, version=p.version, sha256=p.sha256, size=p.size, automations=p.offers,
                   requires=[str(r) for r in section.get("requires") or []],
                   description=str(section.get("description") or ""),
                   created_at=datetime.fromtimestamp(p.created_at, UTC),
                   archive=f"/v1/packs/{p.name}/{p.version}/archive", created=created)


class AssignIn(BaseModel):
    """A pool assigned a pack's version (a rollout), or rolled back to the version before."""

    model_config = ConfigDict(extra="forbid")
    pack: str = Field(min_length=1, max_length=64, pattern=NAME.pattern)
    version: str | None = Field(default=None, min_length=1, max_length=64, pattern=VERSION.pattern,
                                description="a published version; leave it out with rollback")
    rollback: bool = Field(default=False, description="go back to the version the pool ran before the one assigned")
    max_unavailable: int | str | None = Field(default=None, description=(
        "machines out of service at once: a count, or a percentage of the pool ('10%'); default: the "
        "previous rollout's, else 1"))
    reason: str = Field(default="", max_length=500)

    @field_validator("max_unavailable")
    @classmethod
    def _limit(cls, value: int | str | None) -> int | str | None:
        from ..pools import Maintenance

        if value is not None:
            Maintenance(max_unavailable=value)  # the same rule as maintenance's (its message on failure)
        return value


class RolloutStepOut(BaseModel):
    step: str = Field(description="pending, draining, installing, done, failed or skipped")
    since: datetime | None
    started: datetime | None = Field(description="when it left service for the rollout")
    detail: str = ""


class RolloutOut(BaseModel):
    id: int
    pool: str
    pack: str
    version: str
    from_version: str | None = Field(description="what the pool ran before: what a rollback goes back to")
    max_unavailable: str
    state: str = Field(description="running, stalled, done or superseded")
    reason: str
    detail: str = Field(description="why it waits (max_unavailable, the work in hand), or why it stalled")
    created_at: datetime
    updated_at: datetime
    counts: dict[str, int] = Field(description="machines by step")
    machines: dict[str, RolloutStepOut]

    @classmethod
    def of(cls, r: Rollout) -> RolloutOut:
        return cls(id=r.id, pool=r.pool, pack=r.pack, version=r.version, from_version=r.from_version,
                   max_unavailable=r.max_unavailable, state=r.state, reason=r.reason, detail=r.detail,
                   created_at=datetime.fromtimestamp(r.created_at, UTC),
                   updated_at=datetime.fromtimestamp(r.updated_at, UTC), counts=r.counts(),
                   machines={m: RolloutStepOut(step=s.step, since=ts(s.since), started=ts(s.started), detail=s.detail)
                             for m, s in r.machines.items()})


def _archive(record: PackRecord, data: bytes) -> Response:
    return Response(data, media_type=ZIP, headers={
        "content-disposition": f'attachment; filename="{record.name}-{record.version}.zip"',
        "x-deskfleet-sha256": record.sha256})


def router(packs: Packs, machines: Machines, auth: Auth) -> APIRouter:
    read, admin = auth.need(Permission.FLEET_READ), auth.need(Permission.FLEET_ADMIN)
    api = APIRouter()

    @api.post("/v1/packs", response_model=PackOut, status_code=201, dependencies=[admin],
              summary="Publish a pack archive (deskfleet pack build makes it); 409 if that version has another",
              openapi_extra={"requestBody": {"content": {ZIP: {"schema": {"type": "string", "format": "binary"}}}}})
    async def publish(request: Request, response: Response,
                      x_deskfleet_sha256: Annotated[str | None, Header()] = None,
                      sha256: Annotated[str | None, Query(description="the archive's sha256, as its builder computed it")] = None,
                      ) -> PackOut:
        expected = sha256 or x_deskfleet_sha256
        if expected is not None and (len(expected) != 64 or any(c not in "0123456789abcdefABCDEF" for c in expected)):
            raise InvalidRequest(f"sha256 {expected[:80]!r} is not 64 hexadecimal digits", field="sha256")
        record, created = await packs.publish(await request.body(), sha256=expected)
        if not created:
            response.status_code = 200
        return PackOut.of(record, created)

    @api.get("/v1/packs", response_model=list[PackOut], dependencies=[read])
    async def list_packs(name: str | None = None) -> list[PackOut]:
        return [PackOut.of(p) for p in await packs.published(name)]

    @api.get("/v1/packs/{name}/{version}", response_model=PackOut, dependencies=[read])
    async def get_pack(name: str, version: str) -> PackOut:
        return PackOut.of(await packs.get(name, version))

    @api.get("/v1/packs/{name}/{version}/archive", dependencies=[read], response_class=Response,
             summary="The pack version's archive (a zip)")
    async def download(name: str, version: str) -> Response:
        return _archive(*await packs.archive(name, version))

    @api.get("/agent/v1/packs/{name}/{version}/archive", response_class=Response, include_in_schema=False)
    async def agent_download(name: str, version: str, x_deskfleet_machine: Annotated[str, Header()] = "",
                             authorization: Annotated[str | None, Header()] = None) -> Response:
        await agent_auth(machines, x_deskfleet_machine, authorization)
        return _archive(*await packs.archive(name, version))

    @api.put("/v1/pools/{name}/pack", response_model=RolloutOut, status_code=201, dependencies=[admin],
             summary="Assign a pack's version to the pool (a rolling rollout), or roll back to the one before")
    async def assign(name: str, body: AssignIn) -> RolloutOut:
        if body.rollback == (body.version is not None):
            raise InvalidRequest("give either version (to assign it) or rollback: true (to go back to the "
                                 "version before), not both or neither", field="version")
        limit = None if body.max_unavailable is None else str(body.max_unavailable).strip()
        return RolloutOut.of(await packs.assign(name, body.pack, body.version, max_unavailable=limit,
                                                reason=body.reason, rollback=body.rollback))

    @api.get("/v1/pools/{name}/packs", response_model=dict[str, RolloutOut], dependencies=[read],
             summary="The pack versions assigned to the pool, each with its newest rollout")
    async def assignments(name: str) -> dict[str, RolloutOut]:
        return {pack: RolloutOut.of(r) for pack, r in (await packs.assignments(name)).items()}

    @api.get("/v1/pools/{name}/rollouts", response_model=list[RolloutOut], dependencies=[read],
             summary="The pool's pack rollouts, newest first")
    async def rollouts(name: str, pack: str | None = None,
                       limit: Annotated[int, Query(ge=1, le=500)] = 20) -> list[RolloutOut]:
        return [RolloutOut.of(r) for r in await packs.rollouts(name, pack, limit)]

    @api.get("/v1/pools/{name}/rollouts/{rollout_id}", response_model=RolloutOut, dependencies=[read])
    async def rollout(name: str, rollout_id: int) -> RolloutOut:
        return RolloutOut.of(await packs.rollout(name, rollout_id))

    return api
