"""``deskfleet agent``: agents for simulated or real desktops."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from ..client import DEFAULT_SERVER
from ..errors import DeskfleetError
from ._common import _labels, _tune_gc, main, opt


# -- agent --------------------------------------------------------------------------------------------
@main.command()
@opt("--orchestrator", "orchestrators", multiple=True, default=[DEFAULT_SERVER],
     help="orchestrator URL; repeat for several (the agent moves on when one dies)")
@opt("--machine", default=None, help="this machine's name (with --sim N: a prefix)")
@opt("--pool", default="default")
@opt("--label", "labels", multiple=True, help="key=value; repeatable")
@opt("--enrolment-token", default=None, help="enrolment token (or --enrolment-token-file)")
@opt("--enrolment-token-file", default=None, type=click.Path(dir_okay=False, path_type=Path))
@opt("--state-dir", default="deskfleet-agent", type=click.Path(file_okay=False, path_type=Path),
     help="where the agent keeps its key")
@opt("--sim", "sim_count", default=1, type=click.IntRange(1, 10000), help="simulated desktops in this process")
@opt("--sim-first", default=1, type=click.IntRange(0), help="number of the first simulated machine (<machine>-01…)")
@opt("--sim-faults", default="none", type=click.Choice(["none", "demo", "chaos"]), help="fault preset for simulated desktops")
@opt("--sim-seed", default=1, type=int)
@opt("--sim-backend", default="deskfleet-agent/sim-ehr.db", type=click.Path(dir_okay=False, path_type=Path),
     help="the simulated EHR's shared records (a SQLite file)")
@opt("--action-delay", default=0.05, type=float, help="seconds each simulated input takes")
@opt("--screenshots", default="evidence", type=click.Choice(["evidence", "none"]))
@opt("--desktop", "desktop_kind", default="sim", type=click.Choice(["sim", "xvfb"]),
     help="sim: simulated desktops; xvfb: real X displays (Xvfb) running DemoEHR")
@opt("--xvfb", "xvfb_count", default=1, type=click.IntRange(1, 64), help="Xvfb desktops in this process (--desktop xvfb)")
@opt("--app-data", default="deskfleet-agent/demoehr.db", type=click.Path(dir_okay=False, path_type=Path),
     help="DemoEHR's records, shared by its desktops (--desktop xvfb)")
@opt("--app-option", "app_options", multiple=True,
     help="a DemoEHR switch for every Xvfb desktop, e.g. --app-option=--session-timeout=300; repeatable")
@opt("--screen", default="1024x768", help="Xvfb screen size, WIDTHxHEIGHT")
def agent(orchestrators: tuple[str, ...], machine: str | None, pool: str, labels: tuple[str, ...],
          enrolment_token: str | None, enrolment_token_file: Path | None, state_dir: Path, sim_count: int,
          sim_first: int, sim_faults: str, sim_seed: int, sim_backend: Path, action_delay: float, screenshots: str,
          desktop_kind: str, xvfb_count: int, app_data: Path, app_options: tuple[str, ...], screen: str) -> None:
    """Run agents for simulated desktops, or for real Xvfb desktops running DemoEHR (--desktop xvfb)."""
    import socket

    from ..sim.fleet import SimFleet, SimFleetConfig

    if enrolment_token is None and enrolment_token_file is not None:
        try:
            enrolment_token = enrolment_token_file.read_text().strip()
        except OSError as exc:
            raise DeskfleetError(f"cannot read the enrolment token file: {exc.strerror}") from exc
    if desktop_kind == "xvfb":
        from ..desktop.launch import XvfbFleet, XvfbFleetConfig

        width, sep, height = screen.lower().partition("x")
        if not (sep and width.isdigit() and height.isdigit()):
            raise click.BadParameter(f"{screen!r} is not WIDTHxHEIGHT", param_hint="--screen")
        asyncio.run(XvfbFleet(XvfbFleetConfig(
            servers=list(orchestrators), prefix=machine or socket.gethostname(), count=xvfb_count, first=sim_first,
            pool=pool, labels=_labels(labels), enrolment_token=enrolment_token, state_dir=state_dir, data=app_data,
            seed=sim_seed, app_options=list(app_options), width=int(width), height=int(height),
            screenshots=screenshots, log_dir=state_dir / "logs",
        )).run_until_signalled())
        return
    _tune_gc()
    config = SimFleetConfig(
        servers=list(orchestrators), prefix=machine or socket.gethostname(), count=sim_count, first=sim_first, pool=pool,
        labels=_labels(labels), enrolment_token=enrolment_token, state_dir=state_dir, faults=sim_faults,
        seed=sim_seed, backend=sim_backend, action_delay=action_delay, screenshots=screenshots,
    )
    asyncio.run(SimFleet(config).run_until_signalled())
