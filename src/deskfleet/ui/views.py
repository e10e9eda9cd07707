"""The dashboard's routes (see the package's doc).

Each view is a page (``GET /ui/<view>``) whose live part reloads itself as a fragment
(``?partial=1``) when ``/ui/stream`` says the event log moved. A view asks the services
exactly what the API asks them, with the same :class:`~deskfleet.access.Principal`: a
tenant's key sees its own runs, a key without ``fleet.read`` gets a page saying which
permission it lacks, a screenshot needs ``screenshots.view``.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from markupsafe import escape

from ..access import Permission, Principal
from ..errors import Forbidden, InvalidRequest, NotFound, Unauthorized
from ..models import (
    FINAL_RUN_STATES,
    MACHINE_STATUSES,
    Artifact,
    HumanTaskState,
    MachineAdmin,
    Run,
    RunState,
)

if TYPE_CHECKING:
    from ..api.access import Auth
    from ..orchestrator import Orchestrator

HERE = Path(__file__).parent
COOKIE = "deskfleet_key"
#: seconds an event stream stays open before the browser reconnects (a server stopping
#: waits for open streams; this bounds the wait)
STREAM_LIFETIME = 30.0
STREAM_POLL = 1.0
#: the fleet view's memory trend: the last two hours of each machine's samples (a sample a
#: minute, by default: ServerSettings.sample_interval), at most this many points
SERIES_SPAN = 2 * 3600.0
SERIES_POINTS = 120
#: machines a page of the fleet view shows (each with its memory trend); filters and pages
#: reach the rest, so a fleet of thousands stays a quick page to redraw at each change
FLEET_PAGE = 100
P = Permission


@dataclass(frozen=True, slots=True)
class Page:
    """What every template gets besides its own data."""

    who: Principal
    view: str
    title: str
    partial: bool
    live: str = ""  # the URL of the page's live part

    def can(self, permission: str) -> bool:
        return self.who.can(Permission(permission))


def _ago(t: float | None, now: float) -> str:
    if t is None:
        return "—"
    s = max(0.0, now - t)
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.0f} min"
    if s < 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def _clock(t: float | None) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S") if t else "—"


def _time(t: float | None) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%H:%M:%S.%f")[:-3] if t else "—"


_VOLATILE = [
    (re.compile(r"\b(run|art|ht|att)_[0-9A-Za-z]{6,}\b"), r"\1_…"),
    (re.compile(r"'[^']*'|\"[^\"]*\""), "'…'"),
    (re.compile(r"\b[0-9a-f]{8,}\b"), "…"),
    (re.compile(r"\d+(\.\d+)?"), "#"),
]


def signature(error_code: str | None, message: str | None) -> str:
    """A failure's message without what changes from one run to the next (ids, numbers,
    quoted values): failures that differ only there are one kind of failure."""
    text = (message or "").strip().splitlines()[0] if message else ""
    for pattern, repl in _VOLATILE:
        text = pattern.sub(repl, text)
    return f"{error_code or 'error'}: {text[:200]}"


def sparkline(values: list[float], width: int = 90, height: int = 20) -> str:
    """A tiny SVG line of ``values``, its last point marked, the range in its title."""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    step = width / max(1, len(values) - 1)
    points = " ".join(f"{i * step:.1f},{height - 2 - (v - lo) / span * (height - 4):.1f}" for i, v in enumerate(values))
    last = points.rsplit(" ", 1)[-1].split(",")
    return (f'<svg class="spark" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">'
            f"<title>{lo:.0f} to {hi:.0f} MB over {len(values)} samples</title>"
            f'<polyline fill="none" stroke="currentColor" stroke-width="1.5" points="{points}"/>'
            f'<circle cx="{last[0]}" cy="{last[1]}" r="2"/></svg>')


def router(orch: Orchestrator, auth: Auth) -> APIRouter:
    api = APIRouter(prefix="/ui", include_in_schema=False)
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.globals.update(ago=_ago, clock=_clock, time=_time, sparkline=sparkline)

    async def principal(request: Request) -> Principal:
        return await auth.principal(request, request.cookies.get(COOKIE))

    def render(request: Request, template: str, page: Page, status: int = 200, **data: Any) -> HTMLResponse:
        return templates.TemplateResponse(request, template, {"page": page, "now": time.time(), **data},
                                          status_code=status)

    def view(name: str, title: str, *, needs: Permission | None = None, template: str | None = None) -> Callable[
            [Callable[..., Awaitable[dict[str, Any]]]], Callable[..., Awaitable[Response]]]:
        """A page: its data from ``fn``, rendered whole or, with ``?partial=1``, its live part."""

        def wrap(fn: Callable[..., Awaitable[dict[str, Any]]]) -> Callable[..., Awaitable[Response]]:
            async def page(request: Request) -> Response:
                try:
                    who = await principal(request)
                except Unauthorized:
                    return _login_redirect(request)
                partial = request.query_params.get("partial") == "1"
                query = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "partial"]
                                  + [("partial", "1")])
                p = Page(who, name, title, partial, f"{request.url.path}?{query}")
                if needs is not None and not who.can(needs):
                    return render(request, "denied.html", p, 403, needs=needs.value)
                try:
                    data = await fn(request, who, **request.path_params)
                except NotFound as exc:
                    return render(request, "denied.html", p, 404, message=exc.message)
                return render(request, template or f"{name}.html", p, **data)

            page.__name__ = f"ui_{fn.__name__}"
            return page

        return wrap

    # -- logging in ------------------------------------------------------------------------------
    @api.get("/login", response_class=HTMLResponse)
    async def login_form(request: Request, next: str = "/ui/", error: str = "") -> HTMLResponse:
        return templates.TemplateResponse(request, "login.html", {"next": _local(next), "error": error})

    @api.post("/login")
    async def login(request: Request, key: str = Form(""), next: str = Form("/ui/")) -> Response:
        try:
            await auth.principal(request, key.strip())
        except Unauthorized as exc:
            return templates.TemplateResponse(request, "login.html", {"next": _local(next), "error": exc.message},
                                              status_code=401)
        response = RedirectResponse(_local(next), status_code=303)
        response.set_cookie(COOKIE, key.strip(), httponly=True, samesite="strict", path="/ui",
                            secure=request.url.scheme == "https")
        return response

    @api.post("/logout")
    async def logout() -> Response:
        response = RedirectResponse("/ui/login", status_code=303)
        response.delete_cookie(COOKIE, path="/ui")
        return response

    @api.get("/")
    async def home(request: Request) -> Response:
        try:
            who = await principal(request)
        except Unauthorized:
            return _login_redirect(request)
        return RedirectResponse("/ui/fleet" if who.can(P.FLEET_READ) else "/ui/runs", status_code=303)

    # -- the fleet -----------------------------------------------------------------------------------
    @api.get("/fleet")
    @view("fleet", "Fleet", needs=P.FLEET_READ)
    async def fleet(request: Request, who: Principal) -> dict[str, Any]:
        q = request.query_params
        machines = await orch.machines.machines(None)
        pools = []
        for pool in await orch.machines.pools():
            d, _, policy, target = await orch.machines.demand(pool.name)
            pools.append({"name": pool.name, "queued": d.queued, "delayed": d.delayed, "oldest": d.oldest_wait,
                          "machines": d.machines, "target": target, "managed": policy.managed,
                          "rate": d.arrival_rate * 60})
        filters = {"pool": q.get("pool") or "", "status": q.get("status") or "", "q": (q.get("q") or "").strip()}
        needle = filters["q"].lower()
        shown = sorted((m for m in machines
                        if (not filters["pool"] or m.pool == filters["pool"])
                        and (not filters["status"] or m.status == filters["status"])
                        and needle in m.id.lower()), key=lambda m: (m.pool, m.id))
        pages = max(1, -(-len(shown) // FLEET_PAGE))
        number = min(int(q["page"]) if q.get("page", "").isdigit() and int(q["page"]) > 0 else 1, pages)
        first = (number - 1) * FLEET_PAGE
        rows = shown[first:first + FLEET_PAGE]
        kept = {k: v for k, v in filters.items() if v}

        def link(to: int) -> str | None:
            return f"/ui/fleet?{urlencode({**kept, 'page': to})}" if 1 <= to <= pages and to != number else None

        # Trends for the machines on this page only: a view redrawn at each change stays cheap.
        samples = await orch.machines.samples(time.time() - SERIES_SPAN, [m.id for m in rows])
        memory = {mid: [mb for _, mb, _ in points][-SERIES_POINTS:] for mid, points in samples.items()}
        return {"machines": rows, "pools": pools, "memory": memory, "filters": filters,
                "statuses": MACHINE_STATUSES, "total": len(machines), "matched": len(shown),
                "first": first + 1, "last": first + len(rows), "page_no": number, "pages": pages,
                "previous": link(number - 1), "next": link(number + 1)}

    # -- runs ----------------------------------------------------------------------------------------
    @api.get("/runs")
    @view("runs", "Runs", needs=P.RUNS_READ)
    async def runs(request: Request, who: Principal) -> dict[str, Any]:
        q = request.query_params
        states = [RunState(s) for s in q.getlist("state") if s in RunState.__members__.values()]
        filters = {k: q.get(k) or None for k in ("pool", "automation", "machine")}
        before = q.get("before") or None
        try:
            found = await orch.runs.find(states=states, limit=50, before=before, tenant=who.scope, **filters)
        except NotFound:
            found = []
        kept = {k: v for k, v in filters.items() if v} | ({"state": [s.value for s in states]} if states else {})
        more = urlencode({**kept, "before": found[-1].id}, doseq=True) if len(found) == 50 else None
        return {"runs": found, "filters": filters, "states": [s.value for s in states],
                "all_states": [s.value for s in RunState], "more": more}

    @api.get("/runs/{run_id}")
    @view("run", "Run", needs=P.RUNS_READ)
    async def run(request: Request, who: Principal, run_id: str) -> dict[str, Any]:
        found = await _visible(request, who, run_id)
        attempts = await orch.runs.attempts(run_id)
        events = await orch.runs.events(run_id)
        artifacts = await orch.runs.artifacts(run_id)
        # One timeline: the events and the screens, in the order they happened.
        timeline: list[dict[str, Any]] = [{"at": e.at, "event": e} for e in events]
        timeline += [{"at": a.created_at, "artifact": a} for a in artifacts]
        timeline.sort(key=lambda x: x["at"])
        failure = next((a for a in reversed(artifacts) if a.content_type.startswith("image/")
                        and ("fail" in a.name or "error" in a.name)), None)
        retries = [e.data.get("retry") for e in events if e.kind == "run.retried"]
        return {"run": found, "attempts": attempts, "timeline": timeline, "failure": failure,
                "input": await orch.runs.redacted_input(found), "final": found.state in FINAL_RUN_STATES,
                "retries": retries}

    async def _visible(request: Request, who: Principal, run_id: str) -> Run:
        found = await orch.runs.get(run_id)
        if found is None:
            raise NotFound(f"no run {run_id!r}")
        auth.tenant(request, who, found.tenant, f"run {run_id!r}")
        return found

    # -- failures --------------------------------------------------------------------------------------
    @api.get("/failures")
    @view("failures", "Failures", needs=P.RUNS_READ)
    async def failures(request: Request, who: Principal) -> dict[str, Any]:
        failed = await orch.runs.find(states=[RunState.FAILED, RunState.TIMED_OUT], pool=None, automation=None,
                                      machine=None, limit=1000, before=None, tenant=who.scope)
        groups: dict[tuple[str, str], dict[str, Any]] = {}
        for r in failed:  # newest first
            key = (r.automation, signature(r.error_code, r.error_message))
            g = groups.setdefault(key, {"automation": r.automation, "signature": key[1], "count": 0,
                                        "last": r.finished_at or r.updated_at, "first": r.created_at,
                                        "example": r, "runs": [], "pools": Counter()})
            g["count"] += 1
            g["first"] = min(g["first"], r.created_at)
            g["pools"][r.pool] += 1
            if len(g["runs"]) < 5:
                g["runs"].append(r.id)
        ordered = sorted(groups.values(), key=lambda g: (-g["count"], -g["last"]))
        return {"groups": ordered, "total": len(failed)}

    # -- human tasks ------------------------------------------------------------------------------------
    @api.get("/human-tasks")
    @view("human", "Human tasks", needs=P.HUMAN_READ)
    async def human_tasks(request: Request, who: Principal) -> dict[str, Any]:
        waiting = await orch.human.find(states=(HumanTaskState.OPEN, HumanTaskState.CLAIMED), tenant=who.scope)
        recent = [t for t in await orch.human.find(limit=30, tenant=who.scope) if t.state not in (
            HumanTaskState.OPEN, HumanTaskState.CLAIMED)]
        return {"waiting": waiting, "recent": recent, "me": who.label or who.name}

    # -- the audit log ------------------------------------------------------------------------------------
    @api.get("/audit")
    @view("audit", "Audit log", needs=P.AUDIT_READ)
    async def audit(request: Request, who: Principal) -> dict[str, Any]:
        q = request.query_params
        filters = {k: q.get(k) or None for k in ("actor", "action", "outcome")}
        before = int(q["before"]) if q.get("before", "").isdigit() else None
        entries = await orch.access.entries(who, before=before, limit=100, actor=filters["actor"],
                                            action=filters["action"], outcome=filters["outcome"])
        kept = {k: v for k, v in filters.items() if v}
        more = urlencode({**kept, "before": entries[-1].id}) if len(entries) == 100 else None
        return {"entries": entries, "filters": filters, "more": more}

    # -- screenshots ------------------------------------------------------------------------------------
    @api.get("/artifacts/{artifact_id}")
    async def artifact(request: Request, artifact_id: str) -> Response:
        try:
            who = await principal(request)
        except Unauthorized:
            return Response(status_code=401)
        async def allowed(meta: Artifact) -> None:
            if meta.run_id is not None:
                await _visible(request, who, meta.run_id)
            elif not who.can(P.FLEET_READ):
                raise Forbidden("needs fleet.read")
            if meta.content_type.startswith("image/"):
                if not who.can(P.SCREENSHOTS):
                    raise Forbidden(f"your API key {who.name} may not view screenshots")
                auth.viewed(request, who, "screenshot.viewed", f"artifact:{artifact_id}", run=meta.run_id,
                            name=meta.name, via="dashboard")

        try:
            found = await orch.runs.artifact(artifact_id, allowed)
        except NotFound:
            return Response(status_code=404)
        except Forbidden:
            return Response(status_code=403)
        if found is None:
            return Response(status_code=404)
        meta, data = found
        return Response(data, media_type=meta.content_type, headers={"cache-control": "private, no-store"})

    # -- actions --------------------------------------------------------------------------------------------
    async def act(request: Request, needs: Permission, do: Callable[[Principal], Awaitable[str]]) -> Response:
        """An action from a button: htmx only (``HX-Request``), the same permission as the
        API's, and an answer htmx shows in place — then every live part reloads."""
        if request.headers.get("hx-request") != "true":
            return Response("actions come from the dashboard's buttons", status_code=400)
        try:
            who = await principal(request)
        except Unauthorized:
            return Response(status_code=401, headers={"HX-Redirect": "/ui/login"})
        if not who.can(needs):
            return HTMLResponse(f'<span class="flash bad">your key may not do this: it needs {needs.value}</span>',
                                status_code=403)
        try:
            said = await do(who)
        except InvalidRequest as exc:
            return HTMLResponse(f'<span class="flash bad">{escape(exc.message)}</span>',
                                status_code=exc.status_code, headers={"HX-Trigger": "refresh"})
        return HTMLResponse(f'<span class="flash good">{escape(said)}</span>', headers={"HX-Trigger": "refresh"})

    for action, admin in (("cordon", MachineAdmin.CORDONED), ("drain", MachineAdmin.DRAINING),
                          ("uncordon", MachineAdmin.ACTIVE)):
        def machine_action(action: str = action, admin: MachineAdmin = admin) -> Callable[..., Awaitable[Response]]:
            async def handler(request: Request, machine_id: str) -> Response:
                async def do(who: Principal) -> str:
                    m = await orch.machines.set_admin(machine_id, admin, f"{action} from the dashboard by {who.name}")
                    if m.status == "busy" and admin is not MachineAdmin.ACTIVE:
                        return f"{m.id}: {admin.value}; its run goes on, no new work after it"
                    return f"{m.id}: {m.status}"
                return await act(request, P.FLEET_OPERATE, do)

            handler.__name__ = f"ui_{action}"
            return handler

        api.post(f"/machines/{{machine_id}}/{action}")(machine_action())

    @api.post("/runs/{run_id}/cancel")
    async def cancel(request: Request, run_id: str) -> Response:
        async def do(who: Principal) -> str:
            await _visible(request, who, run_id)
            r = await orch.runs.cancel(run_id)
            return f"{r.id}: {'cancelled' if r.state is RunState.CANCELLED else 'cancel requested'}"
        return await act(request, P.RUNS_CANCEL, do)

    @api.post("/runs/{run_id}/retry")
    async def retry(request: Request, run_id: str) -> Response:
        async def do(who: Principal) -> str:
            await _visible(request, who, run_id)
            r, created = await orch.runs.retry(run_id, by=who.name)
            return f"{'retried as' if created else 'already retried as'} {r.id}"
        return await act(request, P.RUNS_RETRY, do)

    @api.post("/human-tasks/{task_id}/{verb}")
    async def human_action(request: Request, task_id: str, verb: str, response: str = Form("")) -> Response:
        async def do(who: Principal) -> str:
            task = await orch.human.get(task_id)
            if who.scope is not None:
                owner = await orch.runs.get(task.run_id)
                auth.tenant(request, who, owner.tenant if owner else "", f"human task {task_id!r}")
            me = who.label or who.name
            if verb == "claim":
                t = await orch.human.claim(task_id, me)
            elif verb == "release":
                t = await orch.human.release(task_id, me)
            elif verb == "complete":
                t = await orch.human.complete(task_id, me, response or None)
            else:
                raise NotFound(f"no action {verb!r} on a human task")
            return f"{t.id}: {t.state.value}"
        return await act(request, P.HUMAN_ACT, do)

    # -- live: the event stream ---------------------------------------------------------------------------
    @api.get("/stream")
    async def stream(request: Request) -> Response:
        try:
            await principal(request)
        except Unauthorized:
            return Response(status_code=401)

        async def changes() -> AsyncIterator[str]:
            last = await orch.runs.last_event_id()
            yield f"retry: 2000\nevent: hello\ndata: {last}\n\n"
            until = time.monotonic() + STREAM_LIFETIME
            while time.monotonic() < until and not await request.is_disconnected():
                await asyncio.sleep(STREAM_POLL)
                now = await orch.runs.last_event_id()
                if now != last:
                    last = now
                    yield f"event: changed\ndata: {now}\n\n"

        return StreamingResponse(changes(), media_type="text/event-stream",
                                 headers={"cache-control": "no-store", "x-accel-buffering": "no"})

    return api


def static_files() -> StaticFiles:
    """The vendored scripts and the style sheet (``/ui/static``)."""
    return StaticFiles(directory=HERE / "static")


def _login_redirect(request: Request) -> Response:
    target = "/ui/login?" + urlencode({"next": str(request.url.path)})
    if request.headers.get("hx-request") == "true":
        return Response(status_code=401, headers={"HX-Redirect": target})
    return RedirectResponse(target, status_code=303)


def _local(path: str) -> str:
    """Only a path of the dashboard's own: never a redirect to another site."""
    return path if path.startswith("/ui/") and not path.startswith("//") else "/ui/"



