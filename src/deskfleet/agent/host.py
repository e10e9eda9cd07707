"""Agents for one process: the machines a ``deskfleet agent`` serves, built from packs.

Three kinds of desktop, one shape:

- ``local`` — the session this process runs in (X11 ``$DISPLAY``; on Windows the
  interactive console session): one machine; each pack's application is taken over if it
  is already running (found by its manifest's ``process`` / ``window``), else started;
- ``xvfb`` — N machines, each a fresh Xvfb display with every pack's application on it;
- ``sim`` — N simulated machines of a pack that offers them (its ``[hooks] sim``), many
  per process, for tests and scale.

Each machine gets its own unchanged :class:`~deskfleet.agent.runtime.Agent` with its own
connection to the orchestrator, serving every pack's automations; each pack's application
on it is one :class:`~deskfleet.agent.runtime.App`. A reboot of a machine does to its agent
what a real reboot does: in-flight work is forgotten and the agent reconnects with the new
boot id. Shutting down stops the agents first, then each application, then each display.

    host = AgentHost(AgentHostConfig(servers=["http://orch:8470"], packs=[load_pack("./my-pack")],
                                     desktop="xvfb", count=2, enrolment_token=token))
    await host.run_until_signalled()
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from ..appmodel import Credential
from ..desktop import Desktop, Frame, Placement
from ..errors import ConfigError
from ..packs.loader import Pack
from ..vision import UNKNOWN
from .packs import PackInstaller
from .runtime import Agent, AgentConfig, App

if TYPE_CHECKING:
    from ..desktop.driver import RealDesktop, Station

log = logging.getLogger(__name__)

DESKTOPS = ("local", "xvfb", "sim")


@dataclass(slots=True)
class SimSettings:
    """Settings for simulated desktops (``--desktop sim``), as a pack's sim hook reads them."""

    seed: int = 1
    faults: str = "none"  # a fault preset of the simulated app
    backend: Path | None = None  # state the simulated apps share (records), if they keep any
    action_delay: float = 0.05  # seconds each simulated input takes


class SimDesktops(Protocol):
    """What a pack's ``sim`` hook returns: the desktops, and how to let go of what they share."""

    desktops: Sequence[Desktop]

    def close(self) -> None: ...


@dataclass(slots=True)
class AgentHostConfig:
    servers: list[str]
    packs: list[Pack]
    desktop: str = "xvfb"  # local | xvfb | sim
    #: local: this machine's name (default: the host's name); xvfb, sim: a prefix (NAME-01, NAME-02…)
    machine: str = ""
    count: int = 1
    first: int = 1  # number of the first machine
    #: xvfb, sim: one machine named ``machine`` exactly (a provider named it), not NAME-01
    exact_name: bool = False
    pool: str = "default"
    labels: dict[str, str] = field(default_factory=dict)
    enrolment_token: str | None = None
    state_dir: Path = Path("deskfleet-agent")
    #: each pack's ``{data}`` is <data_dir>/<pack name> (default <state_dir>/data)
    data_dir: Path | None = None
    app_args: dict[str, list[str]] = field(default_factory=dict)  # pack → more arguments for its app
    machine_args: dict[str, list[str]] = field(default_factory=dict)  # machine → more for the first pack
    idle_timeouts: dict[str, float] = field(default_factory=dict)  # pack → the app's idle logout (s)
    screen: tuple[int, int] | None = None  # xvfb: the screen size (default: the first pack's)
    screenshots: str = "evidence"
    log_dir: Path | None = None  # apps' and displays' output (default: discarded)
    reboot_command: list[str] | None = None  # local: how to reboot this machine
    #: session upkeep: idle machines run their packs' keep-alive before the app's idle logout
    upkeep: bool = True
    sim: SimSettings = field(default_factory=SimSettings)
    #: accounts kept in this process, for embedders and tests (agents started by the CLI get theirs
    #: from the orchestrator's vault)
    credentials: Mapping[str, Credential] | None = None

    def __post_init__(self) -> None:
        if self.desktop not in DESKTOPS:
            raise ConfigError(f"desktop must be one of {', '.join(DESKTOPS)}, not {self.desktop!r}")
        if not self.packs:
            raise ConfigError("give at least one pack (--pack PATH or --pack NAME)")
        if self.count < 1:
            raise ConfigError("count must be at least 1")
        if self.desktop == "local" and self.count != 1:
            raise ConfigError("--desktop local drives this session: one machine (drop --count)")
        if self.exact_name and (self.count != 1 or not self.machine):
            raise ConfigError("--exact-name is one machine named by --machine: give --machine, and no --count above 1")
        if self.desktop == "sim":
            if len(self.packs) != 1:
                raise ConfigError("a simulated desktop runs one pack's application: give one --pack with --desktop sim")
            if not self.packs[0].manifest.hooks.sim:
                raise ConfigError(f"pack {self.packs[0].name} offers no simulated desktops ([hooks] sim); "
                                  "use --desktop xvfb or local")
        known = {p.name for p in self.packs}
        for name in [*self.app_args, *self.idle_timeouts]:
            if name not in known:
                raise ConfigError(f"options given for pack {name!r}, which is not loaded (loaded: {', '.join(sorted(known))})")

    def names(self) -> list[str]:
        if self.desktop == "local":
            return [self.machine or socket.gethostname()]
        if self.exact_name:
            return [self.machine or socket.gethostname()]
        width = max(2, len(str(self.first + self.count - 1)))
        prefix = self.machine or socket.gethostname()
        return [f"{prefix}-{i:0{width}d}" for i in range(self.first, self.first + self.count)]

    def data_for(self, pack: Pack) -> Path:
        return (self.data_dir or self.state_dir / "data") / pack.name


class AgentHost:
    """``await start()``, then ``await run()``; ``await shutdown()`` and ``await close()``
    tear everything down. Or ``await run_until_signalled()``."""

    def __init__(self, config: AgentHostConfig) -> None:
        self.config = config
        self.names = config.names()
        self.packs = config.packs
        #: per machine, its apps' desktops in the order of ``packs``
        self.machines: list[list[Desktop]] = []
        self.agents: list[Agent] = []
        self._stations: list[Any] = []
        self._sim: SimDesktops | None = None
        self.http: httpx.AsyncClient | None = None

    @property
    def desktops(self) -> list[Desktop]:
        """Each machine's first application's desktop."""
        return [m[0] for m in self.machines]

    @property
    def model(self) -> Any:
        """The first pack's app model."""
        return self.packs[0].model

    # -- start ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bring up the machines (displays, apps) and make their agents."""
        if self.agents:
            return
        if self.config.desktop == "sim":
            self.start_simulated()
            return
        results = await asyncio.gather(*(self._real_machine(name) for name in self.names), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        self.machines = [r for r in results if not isinstance(r, BaseException)]
        if failed:
            await self.close()
            raise failed[0]
        self._make_agents()

    def start_simulated(self) -> None:
        """Simulated machines need no awaiting: make them and their agents now."""
        if self.agents:
            return
        c = self.config
        pack = self.packs[0]
        make = pack.hook("sim")
        if make is None:
            raise ConfigError(f"pack {pack.name} offers no simulated desktops ([hooks] sim)")
        settings = c.sim
        if settings.backend is None:
            data = c.data_for(pack)
            data.mkdir(parents=True, exist_ok=True)
            settings = SimSettings(settings.seed, settings.faults, data / "sim.db", settings.action_delay)
        self._sim = make(self.names, settings)
        self.machines = [[d] for d in self._sim.desktops]
        if len(self.machines) != len(self.names):
            raise ConfigError(f"pack {pack.name}'s sim hook made {len(self.machines)} desktops for "
                              f"{len(self.names)} machines")
        # Many agents in one process share one HTTP client (see Agent).
        self.http = _SharedClient(timeout=10.0, limits=httpx.Limits(max_connections=32))
        self._make_agents()

    def app(self, desktop: Desktop, pack: Pack) -> App:
        """``pack``'s app on a machine's ``desktop``: at start, and when a new version of the
        pack is rolled out to the machine (``agent.packs``: the same desktop, the new version's
        model and automations)."""
        c = self.config
        return App(desktop, pack.registry, pack.model, pack.name,
                   keepalive=(pack.manifest.session.keepalive or None) if c.upkeep else None,
                   keepalive_margin=pack.manifest.session.keepalive_margin,
                   idle_timeout=c.idle_timeouts.get(pack.name, pack.manifest.session.idle_timeout),
                   data_dir=c.data_for(pack).resolve(), version=pack.version, update=pack.hook("update"))

    def _make_agents(self) -> None:
        c = self.config
        installer = PackInstaller(c.state_dir / "packs", lambda pack, old: self.app(old.desktop, pack))
        for name, desktops in zip(self.names, self.machines, strict=True):
            apps = [self.app(d, p) for d, p in zip(desktops, self.packs, strict=True)]
            agent = Agent(
                AgentConfig(servers=c.servers, machine=name, pool=c.pool, labels=c.labels,
                            enrolment_token=c.enrolment_token, key_file=c.state_dir / f"{name}.key",
                            screenshots=c.screenshots),
                apps, credentials=c.credentials, boot_id=_boot_id(desktops[0]), http=self.http, installer=installer,
            )
            _on_reboot(desktops[0], agent)
            add = getattr(desktops[0], "add_reboot_listener", None)
            if add is not None:
                add(lambda name=name, desktops=desktops: self._describe(name, desktops))
            self._describe(name, desktops)
            self.agents.append(agent)
        log.info("%d machine(s) up (%s desktops): %s", len(self.agents), c.desktop, ", ".join(self.names))

    async def _real_machine(self, name: str) -> list[Desktop]:
        station, desktops = await open_machine(self.config, name)
        self._stations.append(station)
        return list(desktops)

    def _describe(self, name: str, desktops: list[Desktop]) -> None:
        """Write <state_dir>/machines/<name>.json: the machine's display and processes, for
        people (``x11vnc -display :N``) and tools (the demo kills an X server by it)."""
        host = getattr(desktops[0], "host", None)
        record = {
            "machine": name, "desktop": self.config.desktop, "agent_pid": os.getpid(),
            "display": getattr(host, "display", None), "display_pid": getattr(host, "pid", None),
            "apps": {p.name: getattr(d, "app_pid", None) for p, d in zip(self.packs, desktops, strict=True)},
        }
        folder = self.config.state_dir / "machines"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{name}.json"
            tmp.write_text(json.dumps(record, indent=2))
            tmp.replace(folder / f"{name}.json")
        except OSError as exc:
            log.info("cannot write %s: %s", folder / f"{name}.json", exc)

    # -- run and stop --------------------------------------------------------------------------------

    async def run(self) -> None:
        await asyncio.gather(*(a.run() for a in self.agents))

    async def shutdown(self) -> None:
        """Stop the agents (their machines stay up until :meth:`close`)."""
        await asyncio.gather(*(a.shutdown() for a in self.agents), return_exceptions=True)
        if self.http is not None:
            await self.http.aclose()

    async def close(self) -> None:
        """Stop every application, then every display (or let go of the simulation)."""
        await asyncio.gather(*(s.close() for s in self._stations), return_exceptions=True)
        self._stations = []
        if self._sim is not None:
            self._sim.close()
            self._sim = None

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


async def open_machine(config: AgentHostConfig, name: str) -> tuple[Station, list[RealDesktop]]:
    """One real machine of ``config`` (``xvfb`` or ``local``): its host — a new Xvfb display,
    or this session — and each pack's application on it, started or taken over, up once its
    screen shows a state the pack's model knows. ``Station.close()`` stops them all (apps
    first, the display last). ``deskfleet pack try`` and ``pack open`` use it too."""
    from ..desktop.driver import RealDesktop, Station

    host = await asyncio.to_thread(_machine_host, config, name)
    station = Station(name, host)
    desktops = []
    try:
        for i, pack in enumerate(config.packs):
            args = [*config.app_args.get(pack.name, []), *(config.machine_args.get(name, []) if i == 0 else [])]
            command = pack.app_command(machine=name, data=config.data_for(pack), display=host.display,
                                       extra_args=args,
                                       log=config.log_dir / f"{name}.{pack.name}.log" if config.log_dir else None)
            desktops.append(RealDesktop(name, host, command, started=_recognised(pack), station=station,
                                        session_idle_timeout=config.idle_timeouts.get(
                                            pack.name, pack.manifest.session.idle_timeout),
                                        expected_screen=pack.screen, model_window=pack.library.window,
                                        locate_window=_locator(pack),
                                        pointer_counts=pack.manifest.session.pointer_counts))
        await station.open()
        for d in desktops:
            await d.start()
    except BaseException:
        await station.close()
        raise
    return station, desktops


def _locator(pack: Pack) -> Callable[[Frame, Placement | None], Placement | None] | None:
    """The pack's model's primary anchor, finding the app's window by its pixels where the
    window system cannot; None when the model names none."""
    locator = pack.library.locator()
    return locator.place if locator is not None else None


def _machine_host(config: AgentHostConfig, name: str) -> Any:
    if config.desktop == "xvfb":
        from ..desktop.xvfb import XvfbDisplay

        width, height = config.screen or config.packs[0].screen
        return XvfbDisplay(width, height,
                           log_file=config.log_dir / f"{name}.xvfb.log" if config.log_dir else None).start()
    if sys.platform == "win32":
        from ..desktop.windows import ConsoleHost

        return ConsoleHost(reboot_command=config.reboot_command)
    from ..desktop.local import X11Session

    return X11Session(os.environ.get("DISPLAY"), reboot_command=config.reboot_command)


def _recognised(pack: Pack) -> Callable[[Frame], bool]:
    """A started app is up once its screen shows a state its model knows — other than one
    that means the app is not there (a state the model answers with a restart)."""
    model = pack.model
    absent = {s for s, pb in model.recoveries.items() if pb in ("restart_app", "restart_desktop")}

    def up(frame: Frame) -> bool:
        return model.classify(frame).state not in (UNKNOWN, *absent)

    return up


def _boot_id(desktop: Desktop) -> str | None:
    value = getattr(desktop, "boot_id", None)
    return value if isinstance(value, str) else None


def _on_reboot(desktop: Desktop, agent: Agent) -> None:
    """After a reboot the agent forgets its attempt and comes back with the new boot id (a
    simulated machine stays dark for its reboot's length first)."""
    add = getattr(desktop, "add_reboot_listener", None)
    if add is None:
        return

    def on_reboot() -> None:
        agent.forget_everything(offline_for=float(getattr(desktop, "reboot_downtime", 0.0)),
                                boot_id=_boot_id(desktop))

    add(on_reboot)


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
