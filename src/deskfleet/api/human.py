"""Human tasks in the HTTP API: ``/v1/human-tasks`` — list, show, the screen the agent saw,
claim, release, complete. A secret task's answer goes in (``complete``) and never comes
out: every answer here says ``answered``, and ``response`` only for tasks that are not
secret."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import orjson
from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..access import Permission, Principal
from ..errors import Forbidden
from ..models import HumanTask, HumanTaskState
from ..services.human import HumanDesk
from ..services.runs import Runs
from .access import Auth
from .schemas import NAME, ErrorOut, ts


class HumanTaskOut(BaseModel):
    id: str
    run: str
    attempt: int
    machine: str
    pool: str
    kind: str = Field(description="what is asked: push_approval, sms_code, captcha, confirm, or the pack's own")
    prompt: str = Field(description="what to do, in the automation's words")
    state: str = Field(description="open | claimed | completed | expired | cancelled")
    secret: bool = Field(description="the answer is a secret (an SMS code): it is never shown")
    created_at: datetime
    due_at: datetime = Field(description="when the attempt gives up (human_timeout): clamped to its own timeout")
    requested_due_at: datetime = Field(description="the due time the automation asked for")
    escalate_at: datetime | None
    escalated_at: datetime | None
    claimed_by: str | None
    claimed_at: datetime | None
    completed_by: str | None
    ended_at: datetime | None
    reason: str | None = Field(description="why it expired or was cancelled")
    answered: bool
    response: str | None = Field(description="the answer; never a secret task's")
    screenshot_url: str | None = Field(description="the screen the agent saw when it asked")

    @classmethod
    def of(cls, t: HumanTask) -> HumanTaskOut:
        return cls(
            id=t.id, run=t.run_id, attempt=t.attempt_id, machine=t.machine_id, pool=t.pool, kind=t.kind,
            prompt=t.prompt, state=t.state.value, secret=t.secret, created_at=ts(t.created_at),  # type: ignore[arg-type]
            due_at=ts(t.due_at), requested_due_at=ts(t.requested_due_at),  # type: ignore[arg-type]
            escalate_at=ts(t.escalate_at), escalated_at=ts(t.escalated_at), claimed_by=t.claimed_by,
            claimed_at=ts(t.claimed_at), completed_by=t.completed_by, ended_at=ts(t.ended_at), reason=t.reason,
            answered=t.answered, response=None if t.secret else t.response,
            screenshot_url=f"/v1/human-tasks/{t.id}/screenshot" if t.screenshot_id else None,
        )


class HumanTaskList(BaseModel):
    tasks: list[HumanTaskOut]


class Person(BaseModel):
    """Who acts on the task (a name your people recognise: an email, a login)."""

    model_config = ConfigDict(extra="forbid")

    by: str = Field(min_length=1, max_length=200, examples=["ada@example.com"],
                    description="who claims, releases or completes the task")

    @field_validator("by")
    @classmethod
    def _named(cls, v: str) -> str:
        if not v.strip() or any(c in v for c in "\r\n\t"):
            raise ValueError("say who you are: a name or an email, on one line")
        return v.strip()


class Completion(Person):
    response: str | None = Field(default=None, max_length=10_000,
                                 description="the answer, if the task asks for one (an SMS code, a captcha's text); "
                                             "required for a secret task")


async def webhook_body(task: HumanTask, event: str) -> bytes:
    """A human-task webhook's body: the transition and the task as ``GET`` shows it."""
    return orjson.dumps({"event": event, "task": HumanTaskOut.of(task).model_dump(mode="json")})


def router(desk: HumanDesk, runs: Runs, auth: Auth) -> APIRouter:
    api = APIRouter()
    read, act = auth.need(Permission.HUMAN_READ), auth.need(Permission.HUMAN_ACT)

    async def visible(request: Request, who: Principal, task_id: str) -> HumanTask:
        """The task, if the key's tenant owns its run (404 as if none, otherwise)."""
        task = await desk.get(task_id)
        if who.scope is not None:
            run = await runs.get(task.run_id)
            auth.tenant(request, who, run.tenant if run else "", f"human task {task_id!r}")
        return task
    errors: dict[int | str, dict[str, object]] = {404: {"model": ErrorOut}, 409: {"model": ErrorOut},
                                                  422: {"model": ErrorOut}}

    @api.get("/v1/human-tasks", response_model=HumanTaskList)
    async def list_tasks(
        state: Annotated[list[HumanTaskState] | None, Query(description="repeatable; default: every state")] = None,
        pool: Annotated[str | None, Query(max_length=128, pattern=NAME)] = None,
        run: Annotated[str | None, Query(max_length=40)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        who: Principal = read,
    ) -> HumanTaskList:
        """Human tasks, newest first: ``?state=open&state=claimed`` for those waiting for somebody."""
        found = await desk.find(states=tuple(state or ()), pool=pool, run_id=run, limit=limit, tenant=who.scope)
        return HumanTaskList(tasks=[HumanTaskOut.of(t) for t in found])

    @api.get("/v1/human-tasks/{task_id}", response_model=HumanTaskOut, responses=errors)
    async def get_task(request: Request, task_id: str, who: Principal = read) -> HumanTaskOut:
        return HumanTaskOut.of(await visible(request, who, task_id))

    @api.get("/v1/human-tasks/{task_id}/screenshot", response_class=Response,
             responses={200: {"content": {"image/png": {}}}, 404: {"model": ErrorOut}})
    async def screenshot(request: Request, task_id: str, who: Principal = read) -> Response:
        """The screen the agent saw when it asked (PNG): for a key that may view screenshots;
        each view is in the audit log."""
        task = await visible(request, who, task_id)
        if not who.can(Permission.SCREENSHOTS):
            raise Forbidden(f"your API key {who.name} may not view screenshots (an admin can make a key that "
                            "may: deskfleet api-keys create --screenshots)")
        content_type, data = await desk.screenshot(task_id)
        auth.viewed(request, who, "screenshot.viewed", f"human_task:{task_id}", run=task.run_id)
        return Response(content=data, media_type=content_type)

    @api.post("/v1/human-tasks/{task_id}/claim", response_model=HumanTaskOut,
              responses=errors)
    async def claim(request: Request, task_id: str, body: Person, who: Principal = act) -> HumanTaskOut:
        """Take the task: nobody else may complete it until you complete or release it (409
        names who holds it)."""
        await visible(request, who, task_id)
        return HumanTaskOut.of(await desk.claim(task_id, body.by))

    @api.post("/v1/human-tasks/{task_id}/release", response_model=HumanTaskOut,
              responses=errors)
    async def release(request: Request, task_id: str, body: Person, who: Principal = act) -> HumanTaskOut:
        """Give a claimed task back: open again for anyone."""
        await visible(request, who, task_id)
        return HumanTaskOut.of(await desk.release(task_id, body.by))

    @api.post("/v1/human-tasks/{task_id}/complete", response_model=HumanTaskOut,
              responses=errors)
    async def complete(request: Request, task_id: str, body: Completion, who: Principal = act) -> HumanTaskOut:
        """Answer the task (claimed by you, or open); the waiting automation carries on. A
        secret task's response is never shown again, anywhere."""
        await visible(request, who, task_id)
        return HumanTaskOut.of(await desk.complete(task_id, body.by, body.response))

    return api
