"""Runs in the HTTP API: ``/v1/runs`` (submit, one or a batch; list, get with long-poll,
cancel; attempts, events, artifacts), ``/v1/artifacts``, ``/v1/events``, ``/v1/summary``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import ValidationError

from ..access import Permission, Principal
from ..errors import Conflict, Forbidden, InvalidInput, InvalidRequest, NotFound
from ..models import Artifact, Run, RunSpec, RunState
from ..services.machines import Machines
from ..services.runs import Runs
from .access import Auth
from .errors import validation_message
from .schemas import (
    ArtifactOut,
    AttemptOut,
    BatchOut,
    BatchRequest,
    BatchResult,
    ErrorOut,
    EventOut,
    RunList,
    RunOut,
    RunRequest,
    Summary,
    run_out,
)

MAX_WAIT = 120.0


def router(runs: Runs, machines: Machines, auth: Auth) -> APIRouter:
    api = APIRouter()
    reader, submitter = auth.need(Permission.RUNS_READ), auth.need(Permission.RUNS_SUBMIT)
    canceller, retrier = auth.need(Permission.RUNS_CANCEL), auth.need(Permission.RUNS_RETRY)

    def owned(req: RunRequest, who: Principal) -> RunRequest:
        """The run in the key's tenant: a tenant's key submits into its own tenant only."""
        if who.scope is None:
            return req
        if "tenant" in req.model_fields_set and req.tenant != who.tenant:
            raise Forbidden(f"your API key {who.name} belongs to tenant {who.tenant!r}: it cannot submit runs "
                            f"for tenant {req.tenant!r}")
        return req.model_copy(update={"tenant": who.tenant})

    async def visible(request: Request, who: Principal, run_id: str) -> Run:
        run = await runs.get(run_id)
        if run is None:
            raise NotFound(f"no run {run_id!r}")
        auth.tenant(request, who, run.tenant, f"run {run_id!r}")
        return run

    async def out(run: Run) -> RunOut:
        return run_out(run, await runs.redacted_input(run))

    @api.post("/v1/runs", response_model=RunOut, status_code=201,
              responses={200: {"model": RunOut, "description": "the run this idempotency key already made"},
                         404: {"model": ErrorOut}, 409: {"model": ErrorOut}, 422: {"model": ErrorOut}})
    async def submit(req: RunRequest,
                     wait: Annotated[float, Query(ge=0, le=MAX_WAIT, description="seconds to wait for the result")] = 0,
                     who: Principal = submitter) -> Response:
        req = owned(req, who)
        run, created = await runs.submit(req.to_spec(), req.model_dump(mode="json"))
        if wait > 0:
            run = await runs.wait(run.id, wait)
        # The answer as response_model would serialise it, without checking again the RunOut
        # just built (the hot path of single submits).
        return Response((await out(run)).model_dump_json(), status_code=201 if created else 200,
                        media_type="application/json")

    @api.post("/v1/runs:batch", response_model=BatchOut,
              responses={413: {"model": ErrorOut}, 422: {"model": ErrorOut}})
    async def submit_batch(req: BatchRequest, who: Principal = submitter) -> Response:
        """Submit up to 1,000 runs at once, each with its own idempotency key and its own answer
        (``results``, in order): created, existing, conflict or invalid. One refused run does
        not refuse the others; the admitted ones are stored in one transaction."""
        requests: list[tuple[RunSpec, dict[str, Any]] | InvalidRequest] = []
        for body in req.runs:
            try:
                parsed = owned(RunRequest.model_validate(body), who)
            except ValidationError as exc:
                message, field = validation_message(exc.errors())
                requests.append(InvalidInput(message, field=field))
                continue
            except Forbidden as exc:
                requests.append(exc)
                continue
            requests.append((parsed.to_spec(), parsed.model_dump(mode="json")))
        results = []
        for i, answer in enumerate(await runs.submit_batch(requests)):
            if isinstance(answer, InvalidRequest):
                error = ErrorOut(error=answer.error, message=answer.message, field=answer.field)
                results.append(BatchResult(index=i, status="conflict" if isinstance(answer, Conflict) else "invalid",
                                           error=error))
            else:
                run, created = answer
                results.append(BatchResult(index=i, status="created" if created else "existing", run=await out(run)))
        counts = {k: sum(r.status == k for r in results) for k in ("created", "existing", "conflict", "invalid")}
        # As response_model would serialise it, without checking again the thousand RunOuts
        # just built.
        return Response(BatchOut(results=results, **counts).model_dump_json(), media_type="application/json")

    @api.get("/v1/runs", response_model=RunList)
    async def list_runs(
        state: Annotated[list[RunState] | None, Query()] = None,
        pool: str | None = None, automation: str | None = None, machine: str | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100, before: str | None = None,
        who: Principal = reader,
    ) -> RunList:
        found = await runs.find(states=state or (), pool=pool, automation=automation, machine=machine,
                                limit=limit, before=before, tenant=who.scope)
        return RunList(runs=[await out(r) for r in found],
                       next_before=found[-1].id if len(found) == limit else None)

    @api.get("/v1/runs/{run_id}", response_model=RunOut)
    async def get_run(request: Request, run_id: str, wait: Annotated[float, Query(ge=0, le=MAX_WAIT)] = 0,
                      who: Principal = reader) -> RunOut:
        await visible(request, who, run_id)
        run = await runs.wait(run_id, wait)
        return await out(run)

    @api.post("/v1/runs/{run_id}/cancel", response_model=RunOut, status_code=202)
    async def cancel(request: Request, run_id: str, who: Principal = canceller) -> RunOut:
        await visible(request, who, run_id)
        return await out(await runs.cancel(run_id))

    @api.post("/v1/runs/{run_id}/retry", response_model=RunOut, status_code=201,
              responses={200: {"model": RunOut, "description": "the run an earlier retry of this run made"}})
    async def retry(request: Request, run_id: str, who: Principal = retrier) -> Response:
        """Submit the ended run's request again, as a new run (failed, timed out or cancelled
        runs only: 409 otherwise). Asking again returns the same new run."""
        await visible(request, who, run_id)
        run, created = await runs.retry(run_id, by=who.name)
        return Response((await out(run)).model_dump_json(), status_code=201 if created else 200,
                        media_type="application/json")

    @api.get("/v1/runs/{run_id}/attempts", response_model=list[AttemptOut])
    async def attempts(request: Request, run_id: str, who: Principal = reader) -> list[AttemptOut]:
        await visible(request, who, run_id)
        return [AttemptOut.of(a) for a in await runs.attempts(run_id)]

    @api.get("/v1/runs/{run_id}/events", response_model=list[EventOut])
    async def run_events(request: Request, run_id: str, who: Principal = reader) -> list[EventOut]:
        await visible(request, who, run_id)
        return [EventOut.of(e) for e in await runs.events(run_id)]

    @api.get("/v1/runs/{run_id}/artifacts", response_model=list[ArtifactOut])
    async def run_artifacts(request: Request, run_id: str, who: Principal = reader) -> list[ArtifactOut]:
        await visible(request, who, run_id)
        return [ArtifactOut.of(a) for a in await runs.artifacts(run_id)]

    @api.get("/v1/artifacts/{artifact_id}", response_class=Response)
    async def artifact(request: Request, artifact_id: str, who: Principal = reader) -> Response:
        """An artifact's bytes. A screenshot (an image) needs a key that may view screenshots,
        and each view is in the audit log."""
        async def allowed(meta: Artifact) -> None:
            if meta.run_id is not None:
                await visible(request, who, meta.run_id)
            elif not who.can(Permission.FLEET_READ):  # a machine's own screenshot, of no run
                raise Forbidden(f"your API key {who.name} ({who.role.value}) may not see the fleet's machines")
            if meta.content_type.startswith("image/"):
                if not who.can(Permission.SCREENSHOTS):
                    raise Forbidden(f"your API key {who.name} may not view screenshots (an admin can make a key "
                                    "that may: deskfleet api-keys create --screenshots)")
                auth.viewed(request, who, "screenshot.viewed", f"artifact:{artifact_id}", run=meta.run_id,
                            name=meta.name)

        found = await runs.artifact(artifact_id, allowed)
        if found is None:
            raise NotFound(f"no artifact {artifact_id!r}")
        meta, data = found
        return Response(content=data, media_type=meta.content_type)

    @api.get("/v1/events", response_model=list[EventOut])
    async def all_events(after: int = 0, limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
                         who: Principal = reader) -> list[EventOut]:
        """The event log, oldest first from ``after``; a tenant's key sees its runs' events only."""
        return [EventOut.of(e) for e in await runs.log(after_id=after, limit=limit, tenant=who.scope)]

    @api.get("/v1/summary", response_model=Summary)
    async def summary(who: Principal = reader) -> Summary:
        counts = await runs.counts(tenant=who.scope)
        return Summary(runs=counts, machines=await machines.counts())

    return api
