"""``deskfleet demo``: a whole fleet on one machine, faults switched on, every run accounted for.

It starts a real orchestrator process on SQLite and agent processes driving desktops —
real ones by default (an Xvfb display with the pack's app on it per machine, ``--desktop
xvfb``) or simulated ones for scale (``--desktop sim``) — for a pack that brings a demo
(its workload, faults and effect checks: the pack's demo hook, found by :func:`.plan.demo_for`),
submits a mixed workload over HTTP, shows the fleet live in the terminal, SIGKILLs one
agent process midway (and brings it back), and finally audits the event log and writes a
report (``report.md``, ``report.json``, ``timeline.png``, screenshots).
"""

from __future__ import annotations

from .config import DEFAULTS, DemoConfig

# What a pack's demo hook is written against (docs/your-app.md, "A demo of your pack").
from .plan import NAMES, BadRequest, DemoExtras, FaultTaken, PackDemo, Wave, Work


def run_demo(config: DemoConfig) -> bool:
    """Run the demo; True if every run was accounted for and no invariant was violated."""
    import asyncio

    from .runner import Demo

    return asyncio.run(Demo(config).run())


__all__ = ["DEFAULTS", "NAMES", "BadRequest", "DemoConfig", "DemoExtras", "FaultTaken", "PackDemo", "Wave",
           "Work", "run_demo"]
