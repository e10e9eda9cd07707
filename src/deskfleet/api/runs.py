"""Runs in the HTTP API: ``/v1/runs`` (submit, one or a batch; list, get with long-poll,
cancel; attempts, events, artifacts), ``/v1/artifacts``, ``/v1/events``, ``/v1/summary``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from fastapi.params import Depends
from pydantic import ValidationError

from ..errors import Conflict, InvalidInput, InvalidRequest, NotFound
from ..models import Run, RunSpec, RunState
from ..services.machines import Machines
from ..services.runs import Runs
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


def router(runs: Runs, machines: Machines, client: Depends) -> APIRouter:
    api = APIRouter()

    async def out(run: Run) -> RunOut:
        return run_out(run, await runs.redacted_input(run))

    @api.post("/v1/runs", response_model=RunOut, status_code=201, dependencies=[client],
              responses={200: {"model": RunOut, "description": "the run this idempotency key already made"},
                         404: {"model": ErrorOut}, 409: {"model": ErrorOut}, 422: {"model": ErrorOut}})
    async def submit(req: RunRequest,
                     wait: Annotated[float, Query(ge=0, le=MAX_WAIT, description="seconds to wait for the result")] = 0,
                     ) -> Response:
        run, created = await runs.submit(req.to_spec(), req.model_dump(mode="json"))
        if wait > 0:
            run = await runs.wait(run.id, wait)
        # The answer as response_model would serialise it, without checking again the RunOut
        # just built (the hot path of single submits).
        return Response((await out(run)).model_dump_json(), status_code=201 if created else 200,
                        media_type="application/json")

    @api.post("/v1/runs:batch", response_model=BatchOut, dependencies=[client],
              responses={413: {"model": ErrorOut}, 422: {"model": ErrorOut}})
    async def submit_batch(req: BatchRequest) -> Response:
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

    @api.get("/v1/runs", response_model=RunList, dependencies=[client])
    async def list_runs(
        state: Annotated[list[RunState] | None, Query()] = None,
        pool: str | None = None, automation: str | None = None, machine: str | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100, before: str | None = None,
    ) -> RunList:
        found = await runs.find(states=state or (), pool=pool, automation=automation, machine=machine,
                                limit=limit, before=before)
        return RunList(runs=[await out(r) for r in found],
                       next_before=found[-1].id if len(found) == limit else None)

    @api.get("/v1/runs/{run_id}", response_model=RunOut, dependencies=[client])
    async def get_run(run_id: str, wait: Annotated[float, Query(ge=0, le=MAX_WAIT)] = 0) -> RunOut:
        run = await runs.wait(run_id, wait)
        return await out(run)

    @api.post("/v1/runs/{run_id}/cancel", response_model=RunOut, status_code=202, dependencies=[client])
    async def cancel(run_id: str) -> RunOut:
        return await out(await runs.cancel(run_id))

    @api.get("/v1/runs/{run_id}/attempts", response_model=list[AttemptOut], dependencies=[client])
    async def attempts(run_id: str) -> list[AttemptOut]:
        await _must_run(run_id)
        return [AttemptOut.of(a) for a in await runs.attempts(run_id)]

    @api.get("/v1/runs/{run_id}/events", response_model=list[EventOut], dependencies=[client])
    async def run_events(run_id: str) -> list[EventOut]:
        await _must_run(run_id)
        return [EventOut.of(e) for e in await runs.events(run_id)]

    @api.get("/v1/runs/{run_id}/artifacts", response_model=list[ArtifactOut], dependencies=[client])
    async def run_artifacts(run_id: str) -> list[ArtifactOut]:
        await _must_run(run_id)
        return [ArtifactOut.of(a) for a in await runs.artifacts(run_id)]

    async def _must_run(run_id: str) -> None:
        if await runs.get(run_id) is None:
            raise NotFound(f"no run {run_id!r}")

    @api.get("/v1/artifacts/{artifact_id}", dependencies=[client], response_class=Response)
    async def artifact(artifact_id: str) -> Response:
        found = await runs.artifact(artifact_id)
        if found is None:
            raise NotFound(f"no artifact {artifact_id!r}")
        meta, data = found
        return Response(content=data, media_type=meta.content_type)

    @api.get("/v1/events", response_model=list[EventOut], dependencies=[client])
    async def all_events(after: int = 0, limit: Annotated[int, Query(ge=1, le=10000)] = 1000) -> list[EventOut]:
        return [EventOut.of(e) for e in await runs.log(after_id=after, limit=limit)]

    @api.get("/v1/summary", response_model=Summary, dependencies=[client])
    async def summary() -> Summary:
        counts = await runs.counts()
        return Summary(runs=counts, machines=await machines.counts())

    return api
