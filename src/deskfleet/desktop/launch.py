"""Real desktops with their agents, in one process: how ``deskfleet agent --desktop xvfb`` runs.

Each machine is an Xvfb display with DemoEHR on it, driven by a
:class:`~deskfleet.desktop.driver.RealDesktop`, and served by its own unchanged
:class:`~deskfleet.agent.runtime.Agent` with its own connection to the orchestrator —
the shape of :class:`~deskfleet.sim.fleet.SimFleet`, with real pixels behind it. A
reboot of a machine (a restart of its X server) does to its agent what a real reboot
does: in-flight work is forgotten and the agent reconnects with the new boot id.

Shutting down stops the agents first, then each application, then each display.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..agent.runtime import Agent, AgentConfig
from ..errors import ConfigError
from ..vision import UNKNOWN
from .driver import AppCommand, RealDesktop
from .xvfb import xvfb_desktop

log = logging.getLogger(__name__)


@dataclass(slots=True)
class XvfbFleetConfig:
    servers: list[str]
    prefix: str = "xvfb"
    count: int = 1
    first: int = 1  # number of the first machine: xvfb-01, xvfb-02, …
    pool: str = "default"
    labels: dict[str, str] = field(default_factory=dict)
    enrolment_token: str | None = None
    state_dir: Path = Path("deskfleet-agent")
    data: Path = Path("deskfleet-agent/demoehr.db")  # DemoEHR's shared records
    seed: int = 0  # DemoEHR's accounts (and random faults)
    app_options: list[str] = field(default_factory=list)  # DemoEHR switches for every machine
    machine_options: dict[str, list[str]] = field(default_factory=dict)  # machine name → more switches
    width: int = 1024
    height: int = 768
    screenshots: str = "evidence"
    log_dir: Path | None = None  # Xvfb's and DemoEHR's output (default: discarded)


class XvfbFleet:
    """``await start()``, then ``await run()``; ``await shutdown()`` tears everything down."""

    def __init__(self, config: XvfbFleetConfig) -> None:
        from ..demoapp import demoapp_model, demoapp_registry

        self.config = config
        self.model = demoapp_model()
        self.registry = demoapp_registry()  # accounts come from the orchestrator's vault, per attempt
        width = max(2, len(str(config.first + config.count - 1)))
        self.names = [f"{config.prefix}-{i:0{width}d}" for i in range(config.first, config.first + config.count)]
        self.desktops: list[RealDesktop] = []
        self.agents: list[Agent] = []

    def app_command(self, name: str) -> AppCommand:
        c = self.config
        argv = [sys.executable, "-m", "deskfleet.demoapp", "--data", str(c.data.resolve()), "--name", name,
                "--seed", str(c.seed), *c.app_options, *c.machine_options.get(name, [])]
        return AppCommand(argv, log=c.log_dir / f"{name}.app.log" if c.log_dir else None)

    def session_timeout(self, name: str) -> float | None:
        """DemoEHR's idle logout on ``name``, read from its switches as DemoEHR reads them."""
        from ..demoapp.__main__ import parse

        argv = list(self.app_command(name).argv[3:])  # what follows "python -m deskfleet.demoapp"
        try:
            return parse(argv).session_timeout
        except SystemExit as exc:  # argparse has said what is wrong on stderr
            options = [*self.config.app_options, *self.config.machine_options.get(name, [])]
            raise ConfigError(f"DemoEHR refuses the options given for {name}: {' '.join(options)}") from exc

    def recognised(self, frame: Any) -> bool:
        """DemoEHR is up once its screen shows a state the model knows (other than no app)."""
        return self.model.classify(frame).state not in (UNKNOWN, "desktop")

    async def start(self) -> None:
        c = self.config
        c.data.parent.mkdir(parents=True, exist_ok=True)
        results = await asyncio.gather(
            *(xvfb_desktop(name, self.app_command(name), width=c.width, height=c.height,
                           started=self.recognised, log_dir=c.log_dir,
                           session_idle_timeout=self.session_timeout(name)) for name in self.names),
            return_exceptions=True,
        )
        started = [r for r in results if isinstance(r, RealDesktop)]
        failed = [r for r in results if not isinstance(r, RealDesktop)]
        if failed:
            await asyncio.gather(*(d.close() for d in started), return_exceptions=True)
            raise failed[0]
        self.desktops = started
        for desktop in self.desktops:
            agent = Agent(
                AgentConfig(servers=c.servers, machine=desktop.name, pool=c.pool, labels=c.labels,
                            enrolment_token=c.enrolment_token, key_file=c.state_dir / f"{desktop.name}.key",
                            screenshots=c.screenshots),
                desktop, self.registry, model=self.model, boot_id=desktop.boot_id,
            )
            desktop.add_reboot_listener(_rebooter(agent, desktop))
            self.agents.append(agent)
        log.info("%d Xvfb desktops up: %s", len(self.desktops),
                 ", ".join(f"{d.name} on {d.host.display}" for d in self.desktops))

    async def run(self) -> None:
        await asyncio.gather(*(a.run() for a in self.agents))

    async def shutdown(self) -> None:
        await asyncio.gather(*(a.shutdown() for a in self.agents), return_exceptions=True)

    async def close(self) -> None:
        """Stop every application, then every display."""
        await asyncio.gather(*(d.close() for d in self.desktops), return_exceptions=True)

    async def run_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        try:
            await self.start()
            task = asyncio.create_task(self.run())
            await stop.wait()
            await self.shutdown()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(task, 10)
        finally:
            await self.close()


def _rebooter(agent: Agent, desktop: RealDesktop) -> Callable[[], None]:
    def on_reboot() -> None:
        agent.forget_everything(boot_id=desktop.boot_id)

    return on_reboot
