"""``deskfleet agent``: agents for the machines of this process, built from packs."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

from ..client import DEFAULT_SERVER
from ..errors import DeskfleetError
from ._common import _labels, _tune_gc, main, opt


@main.command()
@opt("--pack", "packs", multiple=True, envvar="DESKFLEET_AGENT_PACK",
     help="a pack: its directory, or an installed pack's name (then the version last rolled out to this agent, if "
          "any: STATE_DIR/packs); repeat for several apps on each machine")
@opt("--desktop", "desktop_kind", default="xvfb", type=click.Choice(["local", "xvfb", "sim"]), envvar="DESKFLEET_AGENT_DESKTOP",
     help="local: drive this session ($DISPLAY, or the Windows console); xvfb: start Xvfb displays (the first free numbers; each machine reports its own), the "
          "packs' apps on each; sim: simulated desktops of a pack that offers them")
@opt("--count", "count", default=None, type=click.IntRange(1, 10000),
     help="machines in this process (xvfb, sim); default 1")
@opt("--orchestrator", "orchestrators", multiple=True, default=[DEFAULT_SERVER],
     help="orchestrator URL; repeat for several (the agent moves on when one dies)")
@opt("--machine", default=None, help="this machine's name (local; default: the host name), or the prefix of "
     "NAME-01, NAME-02… (xvfb, sim)")
@opt("--first", default=1, type=click.IntRange(0), help="number of the first machine (NAME-01…)")
@opt("--exact-name", is_flag=True, default=False,
     help="xvfb, sim: one machine named exactly --machine, not NAME-01 (what a provider that made the machine calls it)")
@opt("--pool", default="default")
@opt("--label", "labels", multiple=True, help="key=value; repeatable")
@opt("--enrolment-token", default=None, help="enrolment token (or --enrolment-token-file)")
@opt("--enrolment-token-file", default=None, type=click.Path(dir_okay=False, path_type=Path))
@opt("--state-dir", default="deskfleet-agent", type=click.Path(file_okay=False, path_type=Path),
     help="where the agent keeps its keys (and, by default, its data and logs)")
@opt("--data-dir", default=None, type=click.Path(file_okay=False, path_type=Path),
     help="each pack's {data} directory is DATA_DIR/<pack> (default: STATE_DIR/data)")
@opt("--log-dir", default=None, type=click.Path(file_okay=False, path_type=Path),
     help="the apps' and displays' output (default: STATE_DIR/logs)")
@opt("--app-option", "app_options", multiple=True,
     help="one more argument for the app's command, e.g. --app-option=--mfa; repeatable (one pack only)")
@opt("--app-idle-timeout", default=None, type=click.FloatRange(min=0, min_open=True),
     help="seconds after which the app logs an idle session out (overrides the pack's [session] idle_timeout)")
@opt("--upkeep/--no-upkeep", default=True, help="session upkeep: an idle machine runs the pack's keep-alive "
     "playbook before the app's idle logout (needs [session] keepalive and the idle timeout)")
@opt("--screen", default=None, help="Xvfb screen size WIDTHxHEIGHT (default: the pack's)")
@opt("--screenshots", default="evidence", type=click.Choice(["evidence", "none"]))
@opt("--reboot-command", default=None, help="local: the command that reboots this machine (e.g. 'sudo systemctl "
     "reboot'; on Windows 'shutdown /r /f /t 0'); without it the agent never reboots the machine")
@opt("--sim-faults", default="none", type=click.Choice(["none", "demo", "chaos"]),
     help="sim: the fault preset of the simulated app")
@opt("--sim-seed", default=1, type=int, help="sim: seed of the simulated machines")
@opt("--sim-backend", default=None, type=click.Path(dir_okay=False, path_type=Path),
     help="sim: the file the simulated apps share (default: in the pack's data directory)")
@opt("--action-delay", default=0.05, type=float, help="sim: seconds each simulated input takes")
@opt("--otel/--no-otel", default=False,
     help="OpenTelemetry spans of each attempt (pre-flight, playbooks, steps), in the run's trace; needs "
          "deskfleet[otel] and the standard OTEL_* variables (docs/observability.md)")
def agent(packs: tuple[str, ...], desktop_kind: str, count: int | None, orchestrators: tuple[str, ...],
          machine: str | None, first: int, exact_name: bool, pool: str, labels: tuple[str, ...], enrolment_token: str | None,
          enrolment_token_file: Path | None, state_dir: Path, data_dir: Path | None, log_dir: Path | None,
          app_options: tuple[str, ...], app_idle_timeout: float | None, upkeep: bool, screen: str | None, screenshots: str,
          reboot_command: str | None, sim_faults: str, sim_seed: int, sim_backend: Path | None,
          action_delay: float, otel: bool) -> None:
    """Run agents for the machines of this process: each drives the packs' applications.

    \b
      deskfleet agent --pack ./my-pack --desktop local                # this session's screen
      deskfleet agent --pack ./my-pack --desktop xvfb --count 2       # two Xvfb displays
      deskfleet agent --pack simehr --desktop sim --count 50          # fifty simulated machines
    """
    from ..agent.host import AgentHost, AgentHostConfig, SimSettings
    from ..agent.packs import current_ref
    from ..packs.loader import installed_packs, load_packs

    if enrolment_token is None and enrolment_token_file is not None:
        try:
            enrolment_token = enrolment_token_file.read_text().strip()
        except OSError as exc:
            raise DeskfleetError(f"cannot read the enrolment token file: {exc.strerror}") from exc
    parsed_labels = _labels(labels)
    if not packs:
        known = ", ".join(sorted(installed_packs())) or "none installed"
        raise click.UsageError(f"which application? give --pack PATH (a pack's directory) or --pack NAME ({known})")
    size = None
    if screen is not None:
        width, sep, height = screen.lower().partition("x")
        if not (sep and width.isdigit() and height.isdigit()):
            raise click.BadParameter(f"{screen!r} is not WIDTHxHEIGHT", param_hint="--screen")
        size = (int(width), int(height))
    # A pack named by name runs the version last rolled out to this agent, if one was.
    loaded = load_packs([current_ref(ref, state_dir) for ref in packs])
    if app_options and len(loaded) > 1:
        raise click.UsageError("--app-option goes to one app: give a single --pack with it")
    first_pack = loaded[0].name
    config = AgentHostConfig(
        servers=list(orchestrators), packs=loaded, desktop=desktop_kind, machine=machine or "",
        count=count or 1, first=first, exact_name=exact_name,
        pool=pool, labels=parsed_labels, enrolment_token=enrolment_token, state_dir=state_dir,
        data_dir=data_dir, app_args={first_pack: list(app_options)} if app_options else {},
        idle_timeouts={first_pack: app_idle_timeout} if app_idle_timeout else {}, screen=size,
        screenshots=screenshots, log_dir=log_dir or state_dir / "logs",
        reboot_command=command_words(reboot_command) if reboot_command else None, upkeep=upkeep,
        sim=SimSettings(sim_seed, sim_faults, sim_backend, action_delay),
    )
    if desktop_kind == "sim":
        _tune_gc()
    if otel:
        from .. import tracing

        tracing.enable("deskfleet-agent")
    asyncio.run(AgentHost(config).run_until_signalled())


def command_words(line: str) -> list[str]:
    """A command line as words: shell rules, except on Windows, where a backslash is a path
    separator, not an escape (``C:\\Tools\\reboot.cmd``), and double quotes group words."""
    import shlex

    if sys.platform != "win32":
        return shlex.split(line)
    return [w[1:-1] if len(w) >= 2 and w[0] == w[-1] == '"' else w for w in shlex.split(line, posix=False)]
