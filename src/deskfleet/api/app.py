"""The HTTP API (FastAPI): clients and operators under ``/v1``, agents under ``/agent/v1``.

Errors are ours, never a driver's: every error response is ``{"error", "message",
"field"}`` with a message that says what to fix, and a request that fails validation
writes nothing.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any

import orjson
from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..crypto import hash_key, same
from ..errors import (
    Conflict,
    InvalidInput,
    InvalidRequest,
    NotFound,
    StaleLease,
    StoreUnavailable,
    Unauthorized,
)
from ..fleet.hub import AgentSocket, Disconnected
from ..models import MachineAdmin, Pool, Run, RunSpec, RunState
from ..orchestrator import Orchestrator
from ..protocol import EnrolRequest, EnrolResponse
from ..version import __version__
from .accounts import add_routes as add_account_routes
from .schemas import (
    ArtifactOut,
    AttemptOut,
    AutomationOut,
    BatchOut,
    BatchRequest,
    BatchResult,
    CordonIn,
    ErrorOut,
    EventOut,
    MachineOut,
    PoolIn,
    PoolOut,
    RunList,
    RunOut,
    RunRequest,
    Summary,
    run_out,
)

MAX_WAIT = 120.0
log = logging.getLogger(__name__)


def validation_message(errs: Sequence[Any]) -> tuple[str, str | None]:
    """pydantic's errors as one message (the first five, each "where: what") and the field
    of the first."""
    parts = []
    for e in errs[:5]:
        loc = ".".join(str(p) for p in e["loc"] if p != "body")
        msg = e["msg"].removeprefix("Value error, ")  # our validators' own messages
        if e.get("type") == "extra_forbidden":
            msg = "unknown field (check the spelling; see /docs for the schema)"
        parts.append(f"{loc or 'body'}: {msg}")
    field = ".".join(str(p) for p in errs[0]["loc"] if p != "body") if errs else None
    return "; ".join(parts), field or None


def _error(status: int, error: str, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse(ErrorOut(error=error, message=message, field=field).model_dump(), status_code=status)


class BodyLimit:
    """Refuse request bodies over a limit with 413, before anything reads them whole."""

    def __init__(self, app: ASGIApp, limits: Callable[[str], int]) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits(scope["path"])
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _error(413, "payload_too_large", f"request body is {int(declared)} bytes; the limit is {limit}")(scope, receive, send)
            return
        # Read the body here, within the limit, and replay it: the framework's own body
        # parsing would swallow an error raised from inside it.
        body = bytearray()
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return  # the client went away
            body += msg.get("body", b"")
            if len(body) > limit:
                await _error(413, "payload_too_large", f"request body exceeds the limit of {limit} bytes")(scope, receive, send)
                return
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(orch: Orchestrator, *, manage: bool = True) -> FastAPI:
    """The ASGI app. With ``manage``, the app starts and stops the orchestrator."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if manage:
            await orch.start()
        try:
            yield
        finally:
            if manage:
                await orch.stop()

    app = FastAPI(
        title="deskfleet",
        version=__version__,
        description="Orchestrator for unattended desktop automation: submit runs, watch the fleet.",
        lifespan=lifespan,
    )
    settings = orch.settings
    app.add_middleware(
        BodyLimit,
        limits=lambda path: (settings.max_artifact_bytes if path.startswith("/agent/") else
                             settings.max_batch_bytes if path == "/v1/runs:batch" else settings.max_body_bytes),
    )
    app.state.orch = orch

    async def webhook_body(run: Run) -> bytes:
        # A webhook posts the run as GET /v1/runs/{id} shows it.
        return orjson.dumps(run_out(run, await orch.redacted_input(run)).model_dump(mode="json"))

    orch.fleet.webhook_body = webhook_body

    # -- errors -------------------------------------------------------------------------------
    @app.exception_handler(InvalidRequest)
    async def _invalid(_r: Request, exc: InvalidRequest) -> JSONResponse:
        return _error(exc.status_code, exc.error, exc.message, exc.field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_r: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and "parsing the body" in str(exc.detail):
            return _error(400, "malformed_json", "the request body is not valid JSON (or not UTF-8)")
        names = {404: "not_found", 405: "method_not_allowed", 400: "invalid_request"}
        message = {404: "no such endpoint; see /docs for the API", 405: "method not allowed on this endpoint"}.get(
            exc.status_code, str(exc.detail))
        return _error(exc.status_code, names.get(exc.status_code, "error"), message)

    @app.exception_handler(Exception)
    async def _internal(_r: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error(500, "internal", "internal error; the server log has the details")

    @app.exception_handler(RequestValidationError)
    async def _validation(_r: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        for e in errs:
            if e.get("type") == "json_invalid":
                ctx = e.get("ctx", {}).get("error", "")
                return _error(400, "malformed_json", f"the request body is not valid JSON: {ctx}".rstrip(": "))
        message, field = validation_message(errs)
        return _error(422, "invalid_request", message, field)

    @app.exception_handler(StoreUnavailable)
    async def _unavailable(_r: Request, exc: StoreUnavailable) -> JSONResponse:
        return _error(503, "unavailable", "the database is unavailable; retry shortly")

    @app.exception_handler(StaleLease)
    async def _stale(_r: Request, exc: StaleLease) -> JSONResponse:
        return _error(409, "stale_lease", str(exc))

    # -- auth ----------------------------------------------------------------------------------
    # async: FastAPI runs a plain function dependency in a worker thread, a hop per request.
    async def client_auth(authorization: Annotated[str | None, Header()] = None,
                          x_api_key: Annotated[str | None, Header()] = None) -> None:
        if not settings.api_key:
            return
        given = x_api_key or (authorization or "").removeprefix("Bearer ").strip()
        if not given or not same(given, settings.api_key):
            raise Unauthorized("missing or wrong API key: send it as 'Authorization: Bearer <key>'")

    Client = Depends(client_auth)

    async def agent_auth(machine_id: str, authorization: str | None) -> None:
        key = (authorization or "").removeprefix("Bearer ").strip()
        stored = await orch.db(orch.store.machine_key_hash, machine_id) if machine_id else None
        if not key or stored is None or not same(hash_key(key), stored):
            raise Unauthorized("unknown machine or wrong agent key; enrol the agent again")

    # -- runs ----------------------------------------------------------------------------------
    async def out(run: Any) -> RunOut:
        return run_out(run, await orch.redacted_input(run))

    @app.post("/v1/runs", response_model=RunOut, status_code=201, dependencies=[Client],
              responses={200: {"model": RunOut, "description": "the run this idempotency key already made"},
                         404: {"model": ErrorOut}, 409: {"model": ErrorOut}, 422: {"model": ErrorOut}})
    async def submit(req: RunRequest, response: Response,
                     wait: Annotated[float, Query(ge=0, le=MAX_WAIT, description="seconds to wait for the result")] = 0) -> RunOut:
        run, created = await orch.submit(req.to_spec(), req.model_dump(mode="json"))
        if not created:
            response.status_code = 200
        if wait > 0:
            run = await orch.wait(run.id, wait)
        return await out(run)

    @app.post("/v1/runs:batch", response_model=BatchOut, dependencies=[Client],
              responses={413: {"model": ErrorOut}, 422: {"model": ErrorOut}})
    async def submit_batch(req: BatchRequest) -> BatchOut:
        """Submit up to 1,000 runs at once, each with its own idempotency key and its own answer
        (``results``, in order): created, existing, conflict or invalid. One refused run does
        not refuse the others; the admitted ones are stored in one transaction."""
        requests: list[tuple[RunSpec, dict[str, Any]] | InvalidRequest] = []
        for body in req.runs:
            try:
                parsed = RunRequest.model_validate(body)
            except ValidationError as exc:
                message, field = validation_message(exc.errors())
                requests.append(InvalidInput(message, field=field))
                continue
            requests.append((parsed.to_spec(), parsed.model_dump(mode="json")))
        results = []
        for i, answer in enumerate(await orch.submit_batch(requests)):
            if isinstance(answer, InvalidRequest):
                error = ErrorOut(error=answer.error, message=answer.message, field=answer.field)
                results.append(BatchResult(index=i, status="conflict" if isinstance(answer, Conflict) else "invalid",
                                           error=error))
            else:
                run, created = answer
                results.append(BatchResult(index=i, status="created" if created else "existing", run=await out(run)))
        counts = {k: sum(r.status == k for r in results) for k in ("created", "existing", "conflict", "invalid")}
        return BatchOut(results=results, **counts)

    @app.get("/v1/runs", response_model=RunList, dependencies=[Client])
    async def list_runs(
        state: Annotated[list[RunState] | None, Query()] = None,
        pool: str | None = None, automation: str | None = None, machine: str | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100, before: str | None = None,
    ) -> RunList:
        found = await orch.db(orch.store.list_runs, states=state or (), pool=pool, automation=automation,
                              machine=machine, limit=limit, before=before)
        return RunList(runs=[await out(r) for r in found],
                       next_before=found[-1].id if len(found) == limit else None)

    @app.get("/v1/runs/{run_id}", response_model=RunOut, dependencies=[Client])
    async def get_run(run_id: str, wait: Annotated[float, Query(ge=0, le=MAX_WAIT)] = 0) -> RunOut:
        run = await orch.wait(run_id, wait)
        return await out(run)

    @app.post("/v1/runs/{run_id}/cancel", response_model=RunOut, status_code=202, dependencies=[Client])
    async def cancel(run_id: str) -> RunOut:
        return await out(await orch.cancel(run_id))

    @app.get("/v1/runs/{run_id}/attempts", response_model=list[AttemptOut], dependencies=[Client])
    async def attempts(run_id: str) -> list[AttemptOut]:
        await _must_run(run_id)
        return [AttemptOut.of(a) for a in await orch.db(orch.store.list_attempts, run_id)]

    @app.get("/v1/runs/{run_id}/events", response_model=list[EventOut], dependencies=[Client])
    async def run_events(run_id: str) -> list[EventOut]:
        await _must_run(run_id)
        return [EventOut.of(e) for e in await orch.db(orch.store.events, run_id=run_id, limit=10000)]

    @app.get("/v1/runs/{run_id}/artifacts", response_model=list[ArtifactOut], dependencies=[Client])
    async def run_artifacts(run_id: str) -> list[ArtifactOut]:
        await _must_run(run_id)
        return [ArtifactOut.of(a) for a in await orch.db(orch.store.list_artifacts, run_id)]

    async def _must_run(run_id: str) -> None:
        if await orch.db(orch.store.get_run, run_id) is None:
            raise NotFound(f"no run {run_id!r}")

    @app.get("/v1/artifacts/{artifact_id}", dependencies=[Client], response_class=Response)
    async def artifact(artifact_id: str) -> Response:
        found = await orch.db(orch.store.get_artifact, artifact_id)
        if found is None:
            raise NotFound(f"no artifact {artifact_id!r}")
        meta, data = found
        return Response(content=data, media_type=meta.content_type)

    @app.get("/v1/events", response_model=list[EventOut], dependencies=[Client])
    async def all_events(after: int = 0, limit: Annotated[int, Query(ge=1, le=10000)] = 1000) -> list[EventOut]:
        return [EventOut.of(e) for e in await orch.db(orch.store.events, after_id=after, limit=limit)]

    @app.get("/v1/summary", response_model=Summary, dependencies=[Client])
    async def summary() -> Summary:
        counts = await orch.db(orch.store.count_runs)
        return Summary(runs=counts, machines=await orch.db(orch.store.count_machines))

    # -- machines and pools ------------------------------------------------------------------
    @app.get("/v1/machines", response_model=list[MachineOut], dependencies=[Client])
    async def list_machines(pool: str | None = None) -> list[MachineOut]:
        return [MachineOut.of(m) for m in await orch.db(orch.store.list_machines, pool)]

    @app.get("/v1/machines/{machine_id}", response_model=MachineOut, dependencies=[Client])
    async def get_machine(machine_id: str) -> MachineOut:
        m = await orch.db(orch.store.get_machine, machine_id)
        if m is None:
            raise NotFound(f"no machine {machine_id!r}")
        return MachineOut.of(m)

    @app.get("/v1/machines/{machine_id}/events", response_model=list[EventOut], dependencies=[Client])
    async def machine_events(machine_id: str, after: int = 0,
                             limit: Annotated[int, Query(ge=1, le=10000)] = 1000) -> list[EventOut]:
        return [EventOut.of(e) for e in await orch.db(orch.store.events, machine_id=machine_id, after_id=after, limit=limit)]

    def _admin_route(action: str, admin: MachineAdmin) -> None:
        async def handler(machine_id: str, body: CordonIn | None = None) -> MachineOut:
            return MachineOut.of(await orch.set_admin(machine_id, admin, body.reason if body else ""))

        handler.__name__ = f"{action}_machine"
        app.post(f"/v1/machines/{{machine_id}}/{action}", response_model=MachineOut, dependencies=[Client],
                 summary=f"{action.capitalize()} a machine")(handler)

    _admin_route("cordon", MachineAdmin.CORDONED)
    _admin_route("drain", MachineAdmin.DRAINING)
    _admin_route("uncordon", MachineAdmin.ACTIVE)

    @app.get("/v1/pools", response_model=list[PoolOut], dependencies=[Client])
    async def list_pools() -> list[PoolOut]:
        return [PoolOut.of(p) for p in await orch.db(orch.store.list_pools)]

    @app.get("/v1/pools/{name}", response_model=PoolOut, dependencies=[Client])
    async def get_pool(name: str) -> PoolOut:
        p = await orch.db(orch.store.get_pool, name)
        if p is None:
            raise NotFound(f"no pool {name!r}")
        return PoolOut.of(p)

    @app.put("/v1/pools/{name}", response_model=PoolOut, dependencies=[Client])
    async def put_pool(name: str, body: PoolIn) -> PoolOut:
        if not name or len(name) > 128 or not (name[0].isalnum() and all(c.isalnum() or c in "._-" for c in name)):
            raise InvalidRequest("pool names are letters, digits, '.', '_' and '-', starting with a letter or digit", field="name")
        return PoolOut.of(await orch.put_pool(Pool(name=name, **body.model_dump())))

    @app.get("/v1/automations", response_model=list[AutomationOut], dependencies=[Client])
    async def automations() -> list[AutomationOut]:
        return [AutomationOut.of(s) for s in await orch.db(orch.store.list_automations)]

    add_account_routes(app, orch, Client)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        await orch.db(orch.store.count_runs)
        return {"ok": True, "version": __version__, "agents": len(orch.hub.connections)}

    @app.get("/metrics", dependencies=[Client], response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(orch.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- agents ----------------------------------------------------------------------------------
    @app.post("/agent/v1/enrol", response_model=EnrolResponse)
    async def enrol(req: EnrolRequest, authorization: Annotated[str | None, Header()] = None) -> EnrolResponse:
        token = (authorization or "").removeprefix("Bearer ").strip()
        if not token or not same(token, orch.enrolment_token):
            raise Unauthorized("missing or wrong enrolment token: send it as 'Authorization: Bearer <token>'")
        agent_key = secrets.token_urlsafe(32)
        await orch.enrol(req.machine, pool=req.pool, labels=req.labels, key_hash=hash_key(agent_key))
        return EnrolResponse(machine_id=req.machine, agent_key=agent_key,
                             heartbeat_interval=settings.heartbeat_interval,
                             heartbeat_timeout=settings.heartbeat_timeout)

    @app.post("/agent/v1/artifacts", status_code=201)
    async def upload(request: Request, name: str, attempt_id: int | None = None,
                     x_deskfleet_machine: Annotated[str, Header()] = "",
                     authorization: Annotated[str | None, Header()] = None) -> dict[str, str]:
        await agent_auth(x_deskfleet_machine, authorization)
        data = await request.body()
        ctype = request.headers.get("content-type", "application/octet-stream")
        art = await orch.db(orch.store.add_artifact, attempt_id=attempt_id, machine_id=x_deskfleet_machine,
                            name=name[:200], content_type=ctype[:100], data=data, now=time.time())
        return {"id": art.id}

    async def connect(scope: Scope, receive: Receive, send: Send) -> None:
        ws = AgentSocket(scope, receive, send)
        machine_id = ws.headers.get("x-deskfleet-machine", "")
        try:
            await ws.accept()  # accept first: a close before accepting reaches the agent as a bare 403
        except Disconnected:
            return
        try:
            await agent_auth(machine_id, ws.headers.get("authorization"))
        except Unauthorized as exc:
            await ws.close(4401, exc.message[:120])
            return
        except StoreUnavailable:
            await ws.close(1013)  # try again later
            return
        await orch.hub.serve(ws, machine_id)

    app.add_middleware(AgentSockets, path="/agent/v1/connect", endpoint=connect)
    return app


class AgentSockets:
    """Agents' WebSockets served beneath the framework (see ``fleet.hub.AgentSocket``);
    everything else goes on to the app."""

    def __init__(self, app: ASGIApp, path: str, endpoint: ASGIApp) -> None:
        self.app, self.path, self.endpoint = app, path, endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] == self.path:
            await self.endpoint(scope, receive, send)
        else:
            await self.app(scope, receive, send)

