"""The HTTP API (FastAPI): clients and operators under ``/v1``, agents under ``/agent/v1``.

:func:`create_app` puts the app together: error handling, auth, a body limit, and a
router per area — runs (``runs.py``), machines and pools (``machines.py``), the vault's
accounts (``accounts.py``), human tasks (``human.py``), packs and their rollouts
(``packs.py``), agents (``agents.py``) — each handed
the services it calls.
Routes call services, never the store.

Errors are ours, never a driver's: every error response is ``{"error", "message",
"field"}`` with a message that says what to fix, and a request that fails validation
writes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import tracing, ui
from ..access import Permission
from ..errors import InvalidRequest, StaleLease, StoreUnavailable
from ..models import Run
from ..orchestrator import Orchestrator
from ..version import __version__
from . import access, accounts, agents, contract, human, machines, packs, runs
from .access import AuditTrail, Auth
from .errors import error_response as _error
from .errors import validation_message
from .schemas import run_out

log = logging.getLogger(__name__)


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
                             settings.max_batch_bytes if path == "/v1/runs:batch" else
                             settings.max_pack_bytes if path == "/v1/packs" else settings.max_body_bytes),
    )
    app.state.orch = orch

    async def webhook_body(run: Run) -> bytes:
        # A webhook posts the run as GET /v1/runs/{id} shows it.
        return orjson.dumps(run_out(run, await orch.runs.redacted_input(run)).model_dump(mode="json"))

    orch.webhooks.body = webhook_body
    orch.webhooks.human_body = human.webhook_body
    _add_error_handlers(app)

    auth = Auth(orch.access)
    app.include_router(runs.router(orch.runs, orch.machines, auth))
    app.include_router(machines.router(orch.machines, orch.catalogue, auth))
    app.include_router(accounts.router(orch.vault, auth))
    app.include_router(human.router(orch.human, orch.runs, auth))
    app.include_router(packs.router(orch.packs, orch.machines, auth))
    app.include_router(access.router(orch.access, auth))
    app.include_router(ui.router(orch, auth))
    app.mount("/ui/static", ui.static_files(), name="ui-static")

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        await orch.runs.counts()  # the database answers
        return {"ok": True, "version": __version__, "agents": len(orch.hub.connections)}

    @app.get("/metrics", dependencies=[auth.need(Permission.METRICS_READ)], response_class=Response)
    async def metrics() -> Response:
        # The fleet's figures from the store (the same on every replica), read off the event
        # loop; this replica's own (scheduling passes, its agents) labelled with its name.
        figures = await orch.runs.figures()
        body = orch.metrics.exposition(figures, replica=orch.replica_name)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    app.include_router(agents.router(orch.machines, settings, orch.enrolment_token))
    app.add_middleware(AuditTrail, access=orch.access)
    app.add_middleware(AgentSockets, path=agents.CONNECT, endpoint=agents.connect_endpoint(orch.machines, orch.hub))
    if tracing.enabled():
        # Outermost: a request's span (the client's traceparent its parent) holds all of it.
        app.add_middleware(tracing.TraceRequests)
    contract.install(app, orch)  # last: it reads every route
    return app


def _add_error_handlers(app: FastAPI) -> None:
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
