"""``deskfleet demo``: a whole demo fleet on this machine."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ._common import main, opt


# -- demo -----------------------------------------------------------------------------------------------
@main.command()
@opt("--desktop", "desktop_kind", default="xvfb", type=click.Choice(["xvfb", "sim"]), envvar="DESKFLEET_DEMO_DESKTOP",
     help="xvfb: real desktops (an Xvfb display with the pack's app and an agent each); sim: simulated desktops, for scale")
@opt("--pack", default="", envvar="DESKFLEET_DEMO_PACK",
     help="the pack to demo: a directory or an installed name (default: the installed pack with a demo for --desktop)")
@opt("--machines", default=0, type=click.IntRange(0, 500), show_default=False,
     help="desktops (0: 4 real, 6 simulated)")
@opt("--runs", default=0, type=click.IntRange(0, 100000), show_default=False,
     help="runs in the workload (0: 120)")
@opt("--faults", default="demo", type=click.Choice(["none", "demo", "chaos"]), help="fault preset")
@opt("--seed", default=7, type=int)
@opt("--out", default="demo-output", type=click.Path(file_okay=False, path_type=Path), help="report directory")
@opt("--port", default=0, type=int, help="orchestrator port (0: any free port)")
@opt("--kill-agent/--no-kill-agent", default=True, help="SIGKILL one agent process mid-run to show failover")
def demo(desktop_kind: str, pack: str, machines: int, runs: int, faults: str, seed: int, out: Path, port: int,
         kill_agent: bool) -> None:
    """Bring up a demo fleet (orchestrator on SQLite + real or simulated desktops), run a workload
    with faults switched on, show progress live, and write a report that accounts for every run."""
    from ..demo import DemoConfig, run_demo

    ok = run_demo(DemoConfig(desktop=desktop_kind, pack=pack, machines=machines, runs=runs, faults=faults, seed=seed, out=out,
                             port=port, kill_agent=kill_agent))
    sys.exit(0 if ok else 1)
