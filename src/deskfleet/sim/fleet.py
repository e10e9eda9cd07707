"""Many simulated machines in one process, each with its own real agent and connection.

:func:`make_desktops` is the ``simehr`` pack's ``sim`` hook: what ``deskfleet agent --pack
simehr --desktop sim --count N`` runs, through :class:`~deskfleet.agent.host.AgentHost`
like any pack. :class:`SimFleet` is the same for tests and benchmarks, started in their own
event loop. The agents speak the real protocol over real sockets; only the desktop behind
each is simulated. A simulated reboot does to its agent what a real one does: in-flight
work is forgotten and the agent reconnects with a new boot id.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from deskfleet import AgentHost, AgentHostConfig, Credential, SimSettings, load_pack

from .backend import SimBackend
from .desktop import SimDesktop
from .faults import FaultPlan

log = logging.getLogger(__name__)


class SimEHRDesktops:
    """Simulated machines sharing one SimEHR backend (a SQLite file of records)."""

    def __init__(self, names: Sequence[str], settings: SimSettings) -> None:
        backend_path = settings.backend or Path("deskfleet-agent/sim-ehr.db")
        backend_path.parent.mkdir(parents=True, exist_ok=True)
        self.backend = SimBackend(backend_path, seed=settings.seed)
        faults = FaultPlan.preset(settings.faults)
        first = _number(names[0]) if names else 1
        self.desktops: list[SimDesktop] = [
            SimDesktop(name, self.backend, seed=settings.seed * 100_003 + (_number(name) or first + i),
                       faults=faults, action_delay=settings.action_delay)
            for i, name in enumerate(names)
        ]

    def close(self) -> None:
        self.backend.close()


def make_desktops(names: Sequence[str], settings: SimSettings) -> SimEHRDesktops:
    """The ``sim`` hook of the simehr pack."""
    return SimEHRDesktops(names, settings)


def _number(name: str) -> int:
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0


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
    #: accounts kept in the agents' process, for tests without an orchestrator's vault
    #: (agents of a fleet get theirs from the vault: register SimEHR's accounts there)
    credentials: Mapping[str, Credential] | None = None
    fault_plan: FaultPlan | None = None  # instead of the ``faults`` preset
    upkeep: bool = True  # idle machines keep their sessions alive (see AgentHostConfig)


class SimFleet:
    """SimEHR machines with their agents, in the caller's event loop: ``await run()``."""

    def __init__(self, config: SimFleetConfig) -> None:
        self.config = config
        pack = load_pack("simehr")
        self.host = AgentHost(AgentHostConfig(
            servers=config.servers, packs=[pack], desktop="sim", machine=config.prefix, count=config.count,
            first=config.first, pool=config.pool, labels=config.labels, enrolment_token=config.enrolment_token,
            state_dir=config.state_dir, screenshots=config.screenshots,
            sim=SimSettings(config.seed, config.faults, config.backend, config.action_delay),
            credentials=config.credentials,
            upkeep=config.upkeep,
        ))
        self.host.start_simulated()
        sim = self.host._sim
        assert isinstance(sim, SimEHRDesktops)
        self.backend: SimBackend = sim.backend
        self.desktops: list[SimDesktop] = sim.desktops
        if config.fault_plan is not None:
            for d in self.desktops:
                d.fault_plan = d.app.faults = config.fault_plan
        self.agents = self.host.agents

    async def run(self) -> None:
        await self.host.run()

    async def shutdown(self) -> None:
        await self.host.shutdown()

    async def run_until_signalled(self) -> None:
        await self.host.run_until_signalled()

    def close(self) -> None:
        self.backend.close()
