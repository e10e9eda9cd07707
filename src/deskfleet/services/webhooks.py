"""Webhooks: a run's final state posted to the URL its submit named.

The store writes a webhook into an outbox in the same transaction as the run's final state
(``Store.due_webhooks``, ``Store.webhook_done``); this loop delivers what is due, signed
with the server's webhook secret (``X-Deskfleet-Signature: sha256=…``), and records each
try, so a failed delivery is tried again later. Only the leader delivers (``leads``), or
receivers would hear twice. The body is the run as the API shows it, rendered by the
function the API hands over (:attr:`Webhooks.body`); until then, due webhooks wait.

Human tasks' transitions (``human_task.created|escalated|expired|completed``, to the URLs
the server was given: ``--human-webhook``, ``--human-escalation-webhook``) go through an
outbox of their own (``Store.due_human_notices``), delivered the same way, signed the same
way, with ``X-Deskfleet-Event`` naming the transition; the body is
``{"event": …, "task": …}``, the task as the API shows it (:attr:`Webhooks.human_body`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import httpx

from ..errors import StoreUnavailable
from ..models import HumanTask, Run

if TYPE_CHECKING:
    from ..config import ServerSettings
    from ..store import Store
    from ..store.runner import StoreRunner

log = logging.getLogger(__name__)


class Webhooks:
    def __init__(self, store: Store, db: StoreRunner, settings: ServerSettings, *,
                 leads: Callable[[], bool]) -> None:
        self.store = store
        self.db = db
        self.settings = settings
        self.leads = leads
        #: a webhook's body for a run: the run as the API shows it (``api.app.create_app``)
        self.body: Callable[[Run], Awaitable[bytes]] | None = None
        #: a human-task webhook's body, for a task and the transition (``api.human``)
        self.human_body: Callable[[HumanTask, str], Awaitable[bytes]] | None = None

    def start(self) -> asyncio.Task[None]:
        return asyncio.create_task(self._loop(), name="deskfleet-webhooks")

    async def _loop(self) -> None:
        async with httpx.AsyncClient(timeout=5.0, follow_redirects=False) as client:
            while True:
                await asyncio.sleep(1.0)
                if not self.leads():
                    continue  # one replica delivers, or receivers would hear twice
                render, human = self.body, self.human_body
                try:
                    if render is not None:  # else no API yet to say how a run looks
                        due = await self.db(self.store.due_webhooks, time.time())
                        for webhook_id, run_id, url in due:
                            await self._deliver(client, render, webhook_id, run_id, url)
                    if human is not None:
                        for notice_id, task_id, event, url in await self.db(self.store.due_human_notices, time.time()):
                            await self._deliver_human(client, human, notice_id, task_id, event, url)
                except asyncio.CancelledError:
                    raise
                except StoreUnavailable:
                    continue  # the fleet manager reports the outage; deliveries wait for the database
                except Exception:
                    log.exception("webhook delivery pass failed")

    async def _deliver(self, client: httpx.AsyncClient, render: Callable[[Run], Awaitable[bytes]], webhook_id: int,
                       run_id: str, url: str) -> None:
        run = await self.db(self.store.get_run, run_id)
        if run is None:
            return
        body = await render(run)
        headers = {"content-type": "application/json", "x-deskfleet-run": run_id}
        if self.settings.webhook_secret:
            sig = hmac.new(self.settings.webhook_secret.encode(), body, hashlib.sha256).hexdigest()
            headers["x-deskfleet-signature"] = f"sha256={sig}"
        error: str | None = None
        try:
            resp = await client.post(url, content=body, headers=headers)
            if resp.status_code >= 300:
                error = f"HTTP {resp.status_code}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:300]
        await self.db(self.store.webhook_done, webhook_id, ok=error is None, error=error, now=time.time())
        if error:
            # The query string may carry the receiver's token: never log it.
            log.warning("webhook to %s failed: %s", url.split("?")[0], error, extra={"run": run_id})

    async def _deliver_human(self, client: httpx.AsyncClient, render: Callable[[HumanTask, str], Awaitable[bytes]],
                             notice_id: int, task_id: str, event: str, url: str) -> None:
        task = await self.db(self.store.get_human_task, task_id)
        if task is None:
            return
        body = await render(task, event)
        headers = {"content-type": "application/json", "x-deskfleet-run": task.run_id,
                   "x-deskfleet-event": event}
        error = await self._post(client, url, body, headers)
        await self.db(self.store.human_notice_done, notice_id, ok=error is None, error=error, now=time.time())
        if error:
            log.warning("webhook %s to %s failed: %s", event, url.split("?")[0], error, extra={"run": task.run_id})

    async def _post(self, client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str]) -> str | None:
        """Post a signed body; the error, or None if the receiver took it."""
        if self.settings.webhook_secret:
            sig = hmac.new(self.settings.webhook_secret.encode(), body, hashlib.sha256).hexdigest()
            headers["x-deskfleet-signature"] = f"sha256={sig}"
        try:
            resp = await client.post(url, content=body, headers=headers)
            if resp.status_code >= 300:
                return f"HTTP {resp.status_code}"
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"[:300]
        return None
