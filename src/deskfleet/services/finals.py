"""Runs that reached a final state: whoever long-polls them (``GET /v1/runs/{id}?wait=…``)
woken — here at once, on the other replicas by a hint (which may be lost: a long-poll there
looks again now and then). (The store counts them, in the transaction that ends each: see
``store.metrics``.)"""

from __future__ import annotations

import asyncio

from ..models import Run
from .replicas import Hints


class Finals:
    def __init__(self, replicas: Hints, *, multi: bool) -> None:
        self.replicas = replicas
        self.multi = multi
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}

    def run_changed(self, run: Run) -> None:
        if run.state.final:
            self.resolve(run.id)
            if self.multi:
                self.replicas.hint("final", run.id)

    def resolve(self, run_id: str) -> None:
        """The run is final (here, or another replica said so): wake its waiters."""
        for fut in self._waiters.pop(run_id, []):
            if not fut.done():
                fut.set_result(None)

    def watch(self, run_id: str) -> asyncio.Future[None]:
        """A future done when the run is known final; hand it back to :meth:`unwatch`."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(run_id, []).append(fut)
        return fut

    def unwatch(self, run_id: str, fut: asyncio.Future[None]) -> None:
        waiters = self._waiters.get(run_id)
        if waiters and fut in waiters:
            waiters.remove(fut)
            if not waiters:
                del self._waiters[run_id]
