"""``deskfleet demo``: a whole fleet on one machine, faults switched on, every run accounted for.

It starts a real orchestrator process on SQLite and agent processes driving simulated
desktops, submits a mixed workload over HTTP, shows the fleet live in the terminal,
SIGKILLs one agent process midway (and brings it back), and finally audits the event log
and writes a report (``report.md``, ``report.json``, ``timeline.png``, screenshots).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(slots=True)
class DemoConfig:
    machines: int = 6
    runs: int = 120
    faults: str = "demo"
    seed: int = 7
    out: Path = Path("demo-output")
    port: int = 0
    kill_agent: bool = True
    agent_processes: int = 2
    action_delay: float = 0.04
    timeout: float = 900.0  # give up waiting for the workload after this many seconds
    live: bool | None = None  # live terminal view; default: when stdout is a terminal


def run_demo(config: DemoConfig) -> bool:
    """Run the demo; True if every run was accounted for and no invariant was violated."""
    import asyncio

    from .runner import Demo

    return asyncio.run(Demo(config).run())


__all__ = ["DemoConfig", "run_demo"]
