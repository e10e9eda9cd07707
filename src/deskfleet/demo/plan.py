"""What the demo needs from a pack, and how it finds the pack to run.

The demo's machinery — processes, waves of work, the live view, the agent kill, the audited
report — knows no application. A pack brings its demo through its ``[hooks] demo`` entry:
a callable ``demo(config, out, data) -> PackDemo`` (``data``: the directory the pack's app
keeps its records in on the demo's machines, its ``{data}``). DemoEHR's demo (real
desktops) and SimEHR's (simulated ones) are written exactly that way.

A :class:`PackDemo` gives the workload in waves (a quiet spell before a wave lets sessions
expire), the requests that must be refused, the agent options its fault preset needs, the
accounts the app logs in with, the double-effect check (counted in the app's own records)
and, if the app keeps one, its log of the faults it produced.

Optional methods (:class:`DemoExtras`): ``burst()``, the work of the demo's autoscaling
phase; and three for an application that cannot produce faults by itself, as DemoEHR's
switches do — a third-party app the demo must strike from outside: ``prepare()`` runs before the agents start (create the app's data: a database),
``strike(done, total, machines)`` at every tick of the workload (about twice a second, with
the number of runs final, the runs planned and the orchestrator's view of the machines) and
returns what it did, for the live view and the report's moments; ``close()`` at the end. The
faults it strikes go into ``fault_log()`` like an app's own, and the report tells each one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..appmodel import Credential
from ..errors import ConfigError
from .config import DemoConfig

NAMES = ("Ada Lovelace", "Alan Turing", "Grace Hopper", "Edsger Dijkstra", "Barbara Liskov",
         "Donald Knuth", "Frances Allen", "John Backus", "Leslie Lamport", "Radia Perlman")

#: (automation, input, submit options)
Work = tuple[str, dict[str, Any], dict[str, Any]]
#: the demo's autoscaling pool (a pack demo with ``burst()``): no machines until its burst
BURST_POOL = "burst"
#: (what is asked, automation, input, submit options)
BadRequest = tuple[str, str, dict[str, Any], dict[str, Any]]


@dataclass(slots=True)
class Wave:
    work: list[Work]
    quiet_before: float = 0.0  # seconds of no work before this wave (sessions expire)
    why: str = ""


@dataclass(frozen=True, slots=True)
class FaultTaken:
    """One fault the application produced and logged (for the report's fault stories)."""

    kind: str
    step: str
    machine: str
    at: float
    origin: str  # scripted | seeded | timeout


class PackDemo(Protocol):
    noun: str  # "real desktops (Xvfb + DemoEHR)"
    #: the desktop kinds this demo runs on (xvfb, sim)
    desktops: tuple[str, ...]
    #: the automations of which a run is cancelled while running (empty: any)
    cancel_running: tuple[str, ...]
    #: machines that may be logged in as one of its accounts at once (the app's rule: many
    #: enterprise apps end the older session when the same user logs in elsewhere)
    max_sessions: int

    def agent_args(self) -> list[str]:
        """More options for ``deskfleet agent`` (the app's switches for the fault preset…)."""

    def accounts(self) -> dict[str, Credential]:
        """The accounts the app logs in with on the demo's machines: the demo puts them in the
        orchestrator's vault before the agents start."""

    def queued_cancels(self, work: list[Work]) -> set[int]:
        """Which runs of the first wave are cancelled while still queued."""

    def waves(self) -> list[Wave]: ...

    def bad_requests(self) -> list[BadRequest]: ...

    def double_effects(self, runs: list[dict[str, Any]]) -> list[str]: ...

    def fault_log(self) -> list[FaultTaken] | None:
        """The faults the application logged, or None if it keeps no such log."""


class DemoExtras(Protocol):
    """Optional methods of a :class:`PackDemo` (the runner calls them when they exist)."""

    def prepare(self) -> None:
        """Before the agents start: the app's data on the demo's machines."""

    async def strike(self, done: int, total: int, machines: list[dict[str, Any]]) -> list[str]:
        """At every tick: faults struck from outside; what was done, one line each."""

    def close(self) -> None:
        """After the workload: stop what ``prepare`` started."""

    def burst(self) -> list[Work]:
        """A burst of runs for the demo's second pool, which starts with no machines: the
        pool controller makes them through the local provider, and retires them after it.
        Runs that leave the app's records as they are (the double-effect check counts them)."""


DemoHook = Callable[[DemoConfig, Path, Path], PackDemo]


def demo_for(config: DemoConfig, out: Path) -> tuple[str, str, PackDemo]:
    """The pack to demo (``config.pack``, or the one installed pack whose demo runs on
    ``config.desktop``) and its demo: (the pack reference for ``deskfleet agent``, the pack's
    name, its demo)."""
    from ..packs.loader import installed_packs, load_pack

    if config.pack:
        pack = load_pack(config.pack)
        ref = config.pack if not Path(config.pack).exists() else str(Path(config.pack).resolve())
        demo = _demo(pack, config, out)
        if config.desktop not in demo.desktops:
            raise ConfigError(f"pack {pack.name}'s demo runs on {' or '.join(demo.desktops)} desktops, "
                              f"not {config.desktop}: choose --desktop {demo.desktops[0]}")
        return ref, pack.name, demo
    found = []
    for name in sorted(installed_packs()):
        pack = load_pack(name)
        if pack.manifest.hooks.demo:
            demo = _demo(pack, config, out)
            if config.desktop in demo.desktops:
                found.append((name, pack.name, demo))
    if len(found) != 1:
        which = ", ".join(n for n, _, _ in found) or "none"
        raise ConfigError(f"choose the pack to demo with --pack (installed packs with a demo on "
                          f"{config.desktop} desktops: {which})")
    return found[0]


def _demo(pack: Any, config: DemoConfig, out: Path) -> PackDemo:
    hook = pack.hook("demo")
    if hook is None:
        raise ConfigError(f"pack {pack.name} has no demo ([hooks] demo in its pack.toml)")
    return hook(config, out, data_dir(out) / pack.name)  # type: ignore[no-any-return]


def data_dir(out: Path) -> Path:
    """Where the demo's agents keep their apps' data (``deskfleet agent --data-dir``)."""
    return out / "agents" / "data"
