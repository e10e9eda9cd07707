"""Machines, pools and automations in the HTTP API: ``/v1/machines`` (list, get, events;
cordon, drain, uncordon), ``/v1/pools``, ``/v1/automations``."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query

from ..access import Permission, Principal
from ..errors import InvalidRequest, NotFound
from ..models import MachineAdmin, Pool
from ..pools import PoolPolicy
from ..services.catalog import Catalogue
from ..services.machines import Machines
from .access import Auth
from .schemas import (
    AutomationOut,
    CordonIn,
    DemandOut,
    EventOut,
    MachineOut,
    MaintenanceIn,
    MaintenanceOut,
    PolicyIn,
    PolicyOut,
    PoolIn,
    PoolOut,
    SampleOut,
    ts,
)


def router(machines: Machines, catalogue: Catalogue, auth: Auth) -> APIRouter:
    api = APIRouter()
    read, operate = auth.need(Permission.FLEET_READ), auth.need(Permission.FLEET_OPERATE)
    admin = auth.need(Permission.FLEET_ADMIN)

    @api.get("/v1/machines", response_model=list[MachineOut], dependencies=[read])
    async def list_machines(pool: str | None = None) -> list[MachineOut]:
        return [MachineOut.of(m) for m in await machines.machines(pool)]

    @api.get("/v1/machines/{machine_id}", response_model=MachineOut, dependencies=[read])
    async def get_machine(machine_id: str) -> MachineOut:
        m = await machines.machine(machine_id)
        if m is None:
            raise NotFound(f"no machine {machine_id!r}")
        return MachineOut.of(m)

    @api.get("/v1/machines/{machine_id}/events", response_model=list[EventOut])
    async def machine_events(machine_id: str, after: int = 0,
                             limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
                             who: Principal = read) -> list[EventOut]:
        """The machine's events, oldest first; a tenant's key sees those of its own runs only."""
        return [EventOut.of(e) for e in await machines.events(machine_id, after_id=after, limit=limit,
                                                              tenant=who.scope)]

    @api.get("/v1/machines/{machine_id}/samples", response_model=list[SampleOut], dependencies=[read],
             summary="The machine's app memory and CPU over time (a sample a minute, a day of them)")
    async def machine_samples(machine_id: str, hours: Annotated[float, Query(gt=0, le=24)] = 2.0) -> list[SampleOut]:
        if await machines.machine(machine_id) is None:
            raise NotFound(f"no machine {machine_id!r}")
        found = await machines.samples(time.time() - hours * 3600, [machine_id])
        return [SampleOut(at=datetime.fromtimestamp(at, UTC), memory_mb=mb, cpu_percent=cpu)
                for at, mb, cpu in found.get(machine_id, [])]

    def _admin_route(action: str, admin: MachineAdmin) -> None:
        async def handler(machine_id: str, body: CordonIn | None = None) -> MachineOut:
            return MachineOut.of(await machines.set_admin(machine_id, admin, body.reason if body else ""))

        handler.__name__ = f"{action}_machine"
        api.post(f"/v1/machines/{{machine_id}}/{action}", response_model=MachineOut, dependencies=[operate],
                 summary=f"{action.capitalize()} a machine")(handler)

    _admin_route("cordon", MachineAdmin.CORDONED)
    _admin_route("drain", MachineAdmin.DRAINING)
    _admin_route("uncordon", MachineAdmin.ACTIVE)

    @api.get("/v1/pools", response_model=list[PoolOut], dependencies=[read])
    async def list_pools() -> list[PoolOut]:
        return [PoolOut.of(p) for p in await machines.pools()]

    @api.get("/v1/pools/{name}", response_model=PoolOut, dependencies=[read])
    async def get_pool(name: str) -> PoolOut:
        p = await machines.pool(name)
        if p is None:
            raise NotFound(f"no pool {name!r}")
        return PoolOut.of(p)

    @api.put("/v1/pools/{name}", response_model=PoolOut, dependencies=[admin])
    async def put_pool(name: str, body: PoolIn) -> PoolOut:
        if not name or len(name) > 128 or not (name[0].isalnum() and all(c.isalnum() or c in "._-" for c in name)):
            raise InvalidRequest("pool names are letters, digits, '.', '_' and '-', starting with a letter or digit", field="name")
        return PoolOut.of(await machines.put_pool(Pool(name=name, **body.model_dump())))

    @api.get("/v1/pools/{name}/policy", response_model=PolicyOut, dependencies=[read],
             summary="The pool's policy in force (version 0: the defaults, never set)")
    async def get_policy(name: str) -> PolicyOut:
        version, policy, stored = await machines.pool_policy(name)
        return PolicyOut(pool=name, version=version, policy=policy,
                         created_at=ts(stored.created_at) if stored else None, comment=stored.comment if stored else "")

    @api.put("/v1/pools/{name}/policy", response_model=PolicyOut, dependencies=[admin],
             summary="A new version of the pool's policy (409 if `version` is no longer the latest)")
    async def put_policy(name: str, body: PolicyIn) -> PolicyOut:
        made = await machines.put_pool_policy(name, body.policy, expected_version=body.version, comment=body.comment)
        return PolicyOut(pool=name, version=made.version, policy=body.policy, created_at=ts(made.created_at),
                         comment=made.comment)

    @api.get("/v1/pools/{name}/policy/history", response_model=list[PolicyOut], dependencies=[read],
             summary="The pool's policy versions, newest first")
    async def policy_history(name: str, limit: Annotated[int, Query(ge=1, le=500)] = 50) -> list[PolicyOut]:
        return [PolicyOut(pool=name, version=v.version, policy=PoolPolicy.model_validate(v.policy),
                          created_at=ts(v.created_at), comment=v.comment)
                for v in await machines.pool_policy_history(name, limit)]

    @api.get("/v1/pools/{name}/demand", response_model=DemandOut, dependencies=[read],
             summary="What the pool's work asks for now (for an external autoscaler, e.g. KEDA)")
    async def demand(name: str) -> DemandOut:
        d, version, _, target = await machines.demand(name)
        return DemandOut(pool=name, at=datetime.fromtimestamp(d.at, UTC), target=target, queued=d.queued, delayed=d.delayed, busy=d.busy,
                         idle=d.idle, machines=d.machines, oldest_wait_seconds=d.oldest_wait,
                         arrival_rate=round(d.arrival_rate, 6), window_seconds=d.window, policy_version=version)

    @api.post("/v1/pools/{name}/maintenance", response_model=MaintenanceOut, status_code=201, dependencies=[operate],
              summary="Start a rolling update of the pool's machines (409 while another is under way)")
    async def start_maintenance(name: str, body: MaintenanceIn) -> MaintenanceOut:
        return MaintenanceOut.of(await machines.start_maintenance(name, body.machines, body.reason))

    @api.get("/v1/pools/{name}/maintenance", response_model=list[MaintenanceOut], dependencies=[read],
             summary="The pool's maintenance campaigns, newest first")
    async def list_maintenance(name: str, limit: Annotated[int, Query(ge=1, le=500)] = 20) -> list[MaintenanceOut]:
        return [MaintenanceOut.of(c) for c in await machines.maintenance(name, limit)]

    @api.get("/v1/pools/{name}/maintenance/{campaign_id}", response_model=MaintenanceOut, dependencies=[read])
    async def get_maintenance(name: str, campaign_id: int) -> MaintenanceOut:
        return MaintenanceOut.of(await machines.maintenance_campaign(name, campaign_id))

    @api.post("/v1/pools/{name}/maintenance/{campaign_id}/cancel", response_model=MaintenanceOut, dependencies=[operate],
              summary="Take no more machines out; those on their way finish")
    async def cancel_maintenance(name: str, campaign_id: int, body: CordonIn | None = None) -> MaintenanceOut:
        return MaintenanceOut.of(await machines.cancel_maintenance(name, campaign_id, body.reason if body else ""))

    @api.get("/v1/automations", response_model=list[AutomationOut], dependencies=[auth.need(Permission.RUNS_READ)])
    async def automations() -> list[AutomationOut]:
        return [AutomationOut.of(s) for s in await catalogue.automations()]

    return api
