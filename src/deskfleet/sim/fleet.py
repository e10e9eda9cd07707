"""Many simulated machines in one process, each with its own real agent and connection.

This is how the demo, the fault tests and the scale benchmarks put tens to thousands of
machines on one host: the agents speak the real protocol over real sockets; only the
desktop behind each is simulated. A simulated reboot does to its agent what a real one
does: in-flight work is forgotten and the agent reconnects with a new boot id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ..agent.runtime import Agent, AgentConfig
from .backend import SimBackend
from .desktop import SimDesktop
from .faults import FaultPlan

log = logging.getLogger(__name__)


@dataclass(slots=True)
class SimFleetConfig:
    servers: list[str]
    prefix: str = "sim"
    count: int = 1
    first: int = 1  # number of the first machine: sim-01, sim-02, …
    pool: str = "default"
    labels: dict[str, str] = field(default_factory=dict)
    enrolment_token: str | None = None
    state_dir: Path = Path("deskfleet-agent")
    faults: str = "none"
    seed: int = 1
    backend: Path = Path("deskfleet-agent/sim-ehr.db")
    action_delay: float = 0.05
    screenshots: str = "evidence"


class SimFleet:
    def __init__(self, config: SimFleetConfig) -> None:
        from . import demo_registry, ehr_model

        self.config = config
        config.backend.parent.mkdir(parents=True, exist_ok=True)
        self.backend = SimBackend(config.backend, seed=config.seed)
        faults = FaultPlan.preset(config.faults)
        model = ehr_model()
        registry = demo_registry()  # accounts come from the orchestrator's vault, per attempt
        width = max(2, len(str(config.first + config.count - 1)))
        self.desktops: list[SimDesktop] = []
        self.agents: list[Agent] = []
        # One HTTP client (enrolment, uploads) for every agent of the process.
        self.http = _SharedClient(timeout=10.0, limits=httpx.Limits(max_connections=32))
        for i in range(config.first, config.first + config.count):
            name = f"{config.prefix}-{i:0{width}d}"
            desktop = SimDesktop(name, self.backend, seed=config.seed * 100_003 + i, faults=faults,
                                 action_delay=config.action_delay)
            agent = Agent(
                AgentConfig(
                    servers=config.servers, machine=name, pool=config.pool, labels=config.labels,
                    enrolment_token=config.enrolment_token, key_file=config.state_dir / f"{name}.key",
                    screenshots=config.screenshots,
                ),
                desktop, registry, model=model, boot_id=desktop.boot_id,
                http=self.http,
            )
            desktop.add_reboot_listener(_rebooter(agent, desktop))
            self.desktops.append(desktop)
            self.agents.append(agent)

    async def run(self) -> None:
        await asyncio.gather(*(a.run() for a in self.agents))

    async def shutdown(self) -> None:
        await asyncio.gather(*(a.shutdown() for a in self.agents), return_exceptions=True)
        await self.http.aclose()

    async def run_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        task = asyncio.create_task(self.run())
        log.info("%d simulated machines running", len(self.agents))
        await stop.wait()
        await self.shutdown()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
        self.backend.close()


def _rebooter(agent: Agent, desktop: SimDesktop):  # type: ignore[no-untyped-def]
    def on_reboot() -> None:
        agent.forget_everything(offline_for=desktop.fault_plan.reboot_duration, boot_id=desktop.boot_id)

    return on_reboot


class _SharedClient(httpx.AsyncClient):
    """An HTTP client for thousands of agents at once: requests wait their turn here, a few
    at a time, rather than all inside the connection pool (whose bookkeeping grows with
    the square of the requests waiting in it)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._turns = asyncio.Semaphore(32)

    async def send(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        async with self._turns:
            return await super().send(request, **kwargs)
