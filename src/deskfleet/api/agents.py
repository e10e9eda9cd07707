"""Agents in the HTTP API: enrolment and artifact uploads under ``/agent/v1``, and the
agent's WebSocket (``/agent/v1/connect``), served beneath the framework (see
``fleet.hub.AgentSocket`` and ``api.app.AgentSockets``)."""

from __future__ import annotations

import asyncio
import secrets
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from ..config import ServerSettings
from ..crypto import hash_key, same
from ..errors import InvalidInput, StoreUnavailable, Unauthorized
from ..fleet.hub import AgentSocket, Disconnected, Hub
from ..protocol import EnrolRequest, EnrolResponse
from ..services.machines import Machines

CONNECT = "/agent/v1/connect"
MAX_REDACTION_HEADER = 4096


async def agent_auth(machines: Machines, machine_id: str, authorization: str | None) -> None:
    key = (authorization or "").removeprefix("Bearer ").strip()
    if not await machines.agent_key_matches(machine_id, key):
        raise Unauthorized("unknown machine or wrong agent key; enrol the agent again")


def _redaction(header: str | None) -> dict[str, Any] | None:
    """The agent's account of what it redacted: a small JSON object, or refused (422)."""
    if header is None:
        return None
    try:
        found = orjson.loads(header) if len(header) <= MAX_REDACTION_HEADER else None
    except orjson.JSONDecodeError:
        found = None
    if not isinstance(found, dict):
        raise InvalidInput(f"X-Deskfleet-Redaction must be a JSON object of at most {MAX_REDACTION_HEADER} bytes",
                           field="x-deskfleet-redaction")
    return found


def router(machines: Machines, settings: ServerSettings, enrolment_token: str) -> APIRouter:
    api = APIRouter()

    @api.post("/agent/v1/enrol", response_model=EnrolResponse)
    async def enrol(req: EnrolRequest, authorization: Annotated[str | None, Header()] = None) -> EnrolResponse:
        token = (authorization or "").removeprefix("Bearer ").strip()
        if not token or not same(token, enrolment_token):
            raise Unauthorized("missing or wrong enrolment token: send it as 'Authorization: Bearer <token>'")
        agent_key = secrets.token_urlsafe(32)
        await machines.enrol(req.machine, pool=req.pool, labels=req.labels, key_hash=hash_key(agent_key))
        return EnrolResponse(machine_id=req.machine, agent_key=agent_key,
                             heartbeat_interval=settings.heartbeat_interval,
                             heartbeat_timeout=settings.heartbeat_timeout)

    @api.post("/agent/v1/artifacts", status_code=201)
    async def upload(request: Request, name: str, attempt_id: int | None = None,
                     x_deskfleet_machine: Annotated[str, Header()] = "",
                     x_deskfleet_redaction: Annotated[str | None, Header()] = None,
                     x_deskfleet_retention: Annotated[float | None, Header(ge=0)] = None,
                     authorization: Annotated[str | None, Header()] = None) -> dict[str, str]:
        """An artifact's bytes (encrypted before they are stored). ``X-Deskfleet-Redaction``:
        what the agent blacked out, as JSON (region names, never content);
        ``X-Deskfleet-Retention``: the automation's retention in seconds (0: for good)."""
        await agent_auth(machines, x_deskfleet_machine, authorization)
        data = await request.body()
        ctype = request.headers.get("content-type", "application/octet-stream")
        art = await machines.add_artifact(attempt_id=attempt_id, machine_id=x_deskfleet_machine,
                                          name=name[:200], content_type=ctype[:100], data=data,
                                          redaction=_redaction(x_deskfleet_redaction),
                                          retention=x_deskfleet_retention)
        return {"id": art.id}

    return api


def connect_endpoint(machines: Machines, hub: Hub) -> ASGIApp:
    """The agent's WebSocket: accepted, authenticated, then the hub's until it closes."""

    async def connect(scope: Scope, receive: Receive, send: Send) -> None:
        ws = AgentSocket(scope, receive, send)
        machine_id = ws.headers.get("x-deskfleet-machine", "")
        try:
            await ws.accept()  # accept first: a close before accepting reaches the agent as a bare 403
        except Disconnected:
            return
        try:
            await agent_auth(machines, machine_id, ws.headers.get("authorization"))
        except Unauthorized as exc:
            await ws.close(4401, exc.message[:120])
            return
        except StoreUnavailable:
            await ws.close(1013)  # try again later
            return
        except asyncio.CancelledError:
            return  # the server stops before the key was checked: the agent tries again elsewhere
        await hub.serve(ws, machine_id)

    return connect

