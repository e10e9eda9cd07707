"""The ``deskfleet`` command. Every flag has a ``DESKFLEET_*`` environment variable, shown
in ``--help``. Only the CLI configures logging. Errors are one clear line, never a trace."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from . import __version__
from .client import DEFAULT_SERVER, ApiError, Client
from .errors import DeskfleetError

F = TypeVar("F", bound=Callable[..., Any])
CONTEXT = {"auto_envvar_prefix": "DESKFLEET", "show_default": True, "help_option_names": ["-h", "--help"]}


def opt(*args: Any, **kwargs: Any) -> Callable[[F], F]:
    kwargs.setdefault("show_envvar", True)
    return click.option(*args, **kwargs)


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"deskfleet: {message}", err=True)
    sys.exit(code)


class _Group(click.Group):
    """Turns our errors into one line on stderr."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ApiError as exc:
            _fail(exc.message + (f" [{exc.field}]" if exc.field else ""))
        except DeskfleetError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            _fail("interrupted", 130)


def _labels(values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for v in values:
        key, sep, value = v.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{v!r} is not key=value", param_hint="--label")
        out[key] = value
    return out


def _client(ctx: click.Context) -> Client:
    obj = ctx.find_root().params
    return Client(obj["server"], api_key=obj["api_key"])


def _print(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="deskfleet")
@opt("--server", default=DEFAULT_SERVER, help="orchestrator URL (client commands)")
@opt("--api-key", default=None, help="API key for client commands, if the server requires one")
@opt("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
@opt("--log-format", default="text", type=click.Choice(["text", "json"]))
def main(server: str, api_key: str | None, log_level: str, log_format: str) -> None:
    """deskfleet: orchestrate unattended desktop automation on a fleet of machines."""
    from . import logs

    logs.configure(log_level, log_format)


# -- server ---------------------------------------------------------------------------------------
@main.command()
@opt("--host", default="127.0.0.1", help="address to listen on; beyond loopback an API key is required")
@opt("--port", default=8470, type=int)
@opt("--data-dir", default="deskfleet-data", type=click.Path(file_okay=False, path_type=Path),
     help="database, secret key and enrolment token live here")
@opt("--db", default=None, help="database URL (default: sqlite:///<data-dir>/deskfleet.db)")
@opt("--enrolment-token", default=None, help="token agents enrol with (default: generated into <data-dir>)")
@opt("--heartbeat-interval", default=2.0, type=float, help="seconds between agent heartbeats")
@opt("--heartbeat-timeout", default=10.0, type=float, help="silence after which an agent's lease is lost")
@opt("--stop-grace", default=15.0, type=float, help="seconds an agent has to confirm a stop")
@opt("--sqlite-synchronous", default="FULL", type=click.Choice(["NORMAL", "FULL"], case_sensitive=False),
     help="FULL survives power loss; NORMAL survives process crashes and is faster")
@opt("--webhook-secret", default=None, help="HMAC key for the X-Deskfleet-Signature webhook header")
@opt("--secret-key-file", default=None, type=click.Path(dir_okay=False, path_type=Path),
     help="key that encrypts secrets at rest (default: <data-dir>/secret.key); replicas share one")
@click.pass_context
def server(ctx: click.Context, host: str, port: int, data_dir: Path, db: str | None, enrolment_token: str | None,
           heartbeat_interval: float, heartbeat_timeout: float, stop_grace: float, sqlite_synchronous: str,
           webhook_secret: str | None, secret_key_file: Path | None) -> None:
    """Run the orchestrator (API, scheduler, fleet manager)."""
    import uvicorn

    from .api import create_app
    from .config import ServerSettings
    from .orchestrator import Orchestrator

    settings = ServerSettings(
        data_dir=data_dir, db=db, host=host, port=port, api_key=ctx.find_root().params["api_key"],
        enrolment_token=enrolment_token, heartbeat_interval=heartbeat_interval,
        heartbeat_timeout=heartbeat_timeout, stop_grace=stop_grace, sqlite_synchronous=sqlite_synchronous,
        webhook_secret=webhook_secret, secret_key_file=secret_key_file,
    )
    settings.check_exposure()
    orch = Orchestrator(settings)
    orch.prepare()
    click.echo(f"deskfleet {__version__} on http://{host}:{port}  (db: {settings.db_url}; "
               f"enrolment token in {data_dir / 'enrolment-token'} unless set)", err=True)
    _tune_gc()
    try:
        # Agent messages are small JSON frames: compressing each costs more CPU than it saves
        # bandwidth (a heartbeat is ~150 bytes), on both ends. No WebSocket pings: heartbeats
        # are the liveness check, and the hub closes the connection of a silent agent.
        uvicorn.run(create_app(orch), host=host, port=port, log_config=None, ws_max_size=16 << 20,
                    ws_per_message_deflate=False, ws_ping_interval=None, timeout_graceful_shutdown=5)
    except OSError as exc:
        raise DeskfleetError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


def _tune_gc() -> None:
    """A long-lived server allocates many short-lived objects per message and few cycles:
    collect the youngest generation less often, and keep what start-up made (modules,
    the app) out of every later full collection."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


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

    from .sim.fleet import SimFleet, SimFleetConfig

    if enrolment_token is None and enrolment_token_file is not None:
        try:
            enrolment_token = enrolment_token_file.read_text().strip()
        except OSError as exc:
            raise DeskfleetError(f"cannot read the enrolment token file: {exc.strerror}") from exc
    if desktop_kind == "xvfb":
        from .desktop.launch import XvfbFleet, XvfbFleetConfig

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


# -- demo -----------------------------------------------------------------------------------------------
@main.command()
@opt("--desktop", "desktop_kind", default="xvfb", type=click.Choice(["xvfb", "sim"]), envvar="DESKFLEET_DEMO_DESKTOP",
     help="xvfb: real desktops (an Xvfb display with DemoEHR and an agent each); sim: simulated desktops, for scale")
@opt("--machines", default=0, type=click.IntRange(0, 500), show_default=False,
     help="desktops (0: 4 real, 6 simulated)")
@opt("--runs", default=0, type=click.IntRange(0, 100000), show_default=False,
     help="runs in the workload (0: 120)")
@opt("--faults", default="demo", type=click.Choice(["none", "demo", "chaos"]), help="fault preset")
@opt("--seed", default=7, type=int)
@opt("--out", default="demo-output", type=click.Path(file_okay=False, path_type=Path), help="report directory")
@opt("--port", default=0, type=int, help="orchestrator port (0: any free port)")
@opt("--kill-agent/--no-kill-agent", default=True, help="SIGKILL one agent process mid-run to show failover")
def demo(desktop_kind: str, machines: int, runs: int, faults: str, seed: int, out: Path, port: int,
         kill_agent: bool) -> None:
    """Bring up a demo fleet (orchestrator on SQLite + real or simulated desktops), run a workload
    with faults switched on, show progress live, and write a report that accounts for every run."""
    from .demo import DemoConfig, run_demo

    ok = run_demo(DemoConfig(desktop=desktop_kind, machines=machines, runs=runs, faults=faults, seed=seed, out=out,
                             port=port, kill_agent=kill_agent))
    sys.exit(0 if ok else 1)


# -- client commands ----------------------------------------------------------------------------------------
@main.command()
@click.argument("automation")
@opt("--input", "input_", default="{}", envvar="DESKFLEET_SUBMIT_INPUT", help="JSON object, or @file.json")
@opt("--pool", default="default")
@opt("--version", "version_", default=None, envvar="DESKFLEET_SUBMIT_VERSION", help="automation version (default: newest)")
@opt("--label", "labels", multiple=True, help="required machine label key=value; repeatable")
@opt("--machine", default=None, help="run only on this machine")
@opt("--prefer-machine", default=None)
@opt("--session-key", default=None, help="prefer the machine logged in as this account")
@opt("--priority", default=0, type=int)
@opt("--deadline", default=None, type=float, help="seconds for the whole run")
@opt("--queue-timeout", default=None, type=float)
@opt("--attempt-timeout", default=None, type=float)
@opt("--max-attempts", default=None, type=int)
@opt("--idempotency-key", default=None)
@opt("--webhook-url", default=None)
@opt("--wait", default=0.0, type=float, help="seconds to wait for the result")
@click.pass_context
def submit(ctx: click.Context, automation: str, input_: str, pool: str, version_: str | None,
           labels: tuple[str, ...], machine: str | None, prefer_machine: str | None, session_key: str | None,
           priority: int, deadline: float | None, queue_timeout: float | None, attempt_timeout: float | None,
           max_attempts: int | None, idempotency_key: str | None, webhook_url: str | None, wait: float) -> None:
    """Submit a run of AUTOMATION and print it."""
    try:
        text = Path(input_[1:]).read_text() if input_.startswith("@") else input_
        data = json.loads(text)
    except OSError as exc:
        raise click.BadParameter(f"cannot read {input_[1:]}: {exc.strerror}", param_hint="--input") from exc
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                                 param_hint="--input") from exc
    if not isinstance(data, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--input")
    with _client(ctx) as c:
        _print(c.submit(automation, data, wait=wait, pool=pool, version=version_, labels=_labels(labels) or None,
                        machine=machine, prefer_machine=prefer_machine, session_key=session_key,
                        priority=priority, deadline=deadline, queue_timeout=queue_timeout,
                        attempt_timeout=attempt_timeout, max_attempts=max_attempts,
                        idempotency_key=idempotency_key, webhook_url=webhook_url))


@main.group(cls=_Group)
def runs() -> None:
    """List, show and cancel runs."""


@runs.command("list")
@opt("--state", "states", multiple=True, help="filter by state; repeatable")
@opt("--limit", default=50, type=click.IntRange(1, 1000))
@click.pass_context
def runs_list(ctx: click.Context, states: tuple[str, ...], limit: int) -> None:
    from rich.console import Console
    from rich.table import Table

    with _client(ctx) as c:
        page = c.runs(state=states, limit=limit)
    table = Table("id", "automation", "state", "machine", "attempts", "created", "error")
    for r in page["runs"]:
        err = (r.get("error") or {}).get("message", "")
        table.add_row(r["id"], r["automation"], r["state"], r.get("current_machine") or "",
                      str(r["dispatches"]), r["created_at"][:19], err[:60])
    Console().print(table)


@runs.command("show")
@click.argument("run_id")
@opt("--events/--no-events", default=False, help="include the run's timeline")
@opt("--wait", default=0.0, type=float)
@click.pass_context
def runs_show(ctx: click.Context, run_id: str, events: bool, wait: float) -> None:
    with _client(ctx) as c:
        run = c.run(run_id, wait=wait)
        if events:
            run["attempts"] = c.attempts(run_id)
            run["events"] = c.events(run_id)
    _print(run)


@runs.command("cancel")
@click.argument("run_id")
@click.pass_context
def runs_cancel(ctx: click.Context, run_id: str) -> None:
    with _client(ctx) as c:
        _print(c.cancel(run_id))


@main.group(cls=_Group)
def machines() -> None:
    """List machines; cordon, drain or uncordon one."""


@machines.command("list")
@opt("--pool", default=None)
@click.pass_context
def machines_list(ctx: click.Context, pool: str | None) -> None:
    from rich.console import Console
    from rich.table import Table

    with _client(ctx) as c:
        found = c.machines(pool)
    table = Table("id", "pool", "status", "run", "runs done", "memory MB", "session", "note")
    for m in found:
        table.add_row(m["id"], m["pool"], m["status"], m.get("current_run") or "", str(m["runs_completed"]),
                      f"{m['resources'].get('memory_mb', 0):.0f}", m.get("session_key") or "",
                      (m.get("quarantine_reason") or "")[:50])
    Console().print(table)


def _machine_action(action: str, help_text: str) -> None:
    @machines.command(action, help=help_text)
    @click.argument("machine_id")
    @opt("--reason", default="")
    @click.pass_context
    def cmd(ctx: click.Context, machine_id: str, reason: str) -> None:
        with _client(ctx) as c:
            m = c.machine_action(machine_id, action, reason)
        click.echo(f"{m['id']}: {m['status']} (admin {m['admin']})")


_machine_action("cordon", "Stop giving the machine new work; current work continues.")
_machine_action("drain", "Cordon, and show the machine as drained once its current run ends.")
_machine_action("uncordon", "Give the machine work again.")


@main.group(cls=_Group)
def pools() -> None:
    """List pools or change a pool's settings."""


@pools.command("list")
@click.pass_context
def pools_list(ctx: click.Context) -> None:
    with _client(ctx) as c:
        _print(c.pools())


@pools.command("set")
@click.argument("name")
@opt("--allow-wait-for-capacity/--no-allow-wait-for-capacity", default=False)
@opt("--affinity-wait", default=10.0, type=float)
@opt("--description", default="")
@click.pass_context
def pools_set(ctx: click.Context, name: str, allow_wait_for_capacity: bool, affinity_wait: float, description: str) -> None:
    with _client(ctx) as c:
        _print(c.put_pool(name, allow_wait_for_capacity=allow_wait_for_capacity,
                          affinity_wait=affinity_wait, description=description))


# -- model --------------------------------------------------------------------------------------------
@main.group(cls=_Group)
def model() -> None:
    """App models: record templates of an application's screens."""


def _areas(values: tuple[str, ...], hint: str, *, text: bool = False) -> list[tuple[str, Any, str]]:
    from .desktop import Region

    out = []
    for v in values:
        name, sep, rest = v.partition("=")
        box, _, pattern = rest.partition(":") if text else (rest, "", "")
        numbers = box.split(",")
        if not (sep and name and len(numbers) == 4 and all(n.strip().isdigit() for n in numbers)) or (text and not pattern):
            form = "NAME=LEFT,TOP,WIDTH,HEIGHT" + (":REGEX" if text else "")
            raise click.BadParameter(f"{v!r} is not {form}", param_hint=hint)
        out.append((name, Region(*(int(n) for n in numbers)), pattern))
    return out


@model.command("capture")
@opt("--dir", "directory", required=True, type=click.Path(file_okay=False, path_type=Path),
     help="the model directory (model.json and template PNGs); created or updated")
@opt("--state", required=True, help="the state the screen shows now")
@opt("--anchor", "anchors", multiple=True, help="NAME=LEFT,TOP,WIDTH,HEIGHT: a stable part (an icon, an edge) "
     "searched for within --margin px; repeatable")
@opt("--fixed", "fixed", multiple=True, help="NAME=LEFT,TOP,WIDTH,HEIGHT: a plain area compared in place; repeatable")
@opt("--text", "texts", multiple=True, help="NAME=LEFT,TOP,WIDTH,HEIGHT:REGEX read by OCR; repeatable")
@opt("--overlay/--no-overlay", default=False, help="a dialog that covers other states and wins over them")
@opt("--ready/--no-ready", default=False, help="automations may start in this state")
@opt("--margin", default=4, type=click.IntRange(0, 64), help="pixels around each anchor to search")
@opt("--threshold", default=None, type=click.FloatRange(0, 1), help="pass mark of the anchors (default 0.9)")
@opt("--display", default=None, help="X display to capture (default: $DISPLAY; on Windows the session's screen)")
@opt("--screenshot", default=None, type=click.Path(dir_okay=False, exists=True, path_type=Path),
     help="record from this PNG instead of a live display")
@opt("--name", default=None, help="the model's name, for a new directory (default: the directory's name)")
def model_capture(directory: Path, state: str, anchors: tuple[str, ...], fixed: tuple[str, ...], texts: tuple[str, ...],
                  overlay: bool, ready: bool, margin: int, threshold: float | None, display: str | None,
                  screenshot: Path | None, name: str | None) -> None:
    """Record STATE's templates from what the screen shows now, and check they recognise it."""
    import numpy as np
    from PIL import Image

    from .desktop.driver import capture_screen
    from .vision.templates import Anchor, TemplateLibrary, TextSpec

    parts = [Anchor(n, r, "match", threshold, margin) for n, r, _ in _areas(anchors, "--anchor")]
    parts += [Anchor(n, r, "pixels") for n, r, _ in _areas(fixed, "--fixed")]
    words = [TextSpec(n, r, p) for n, r, p in _areas(texts, "--text", text=True)]
    if not parts and not words:
        raise click.UsageError("give at least one --anchor, --fixed or --text")
    if screenshot is not None:
        frame = np.asarray(Image.open(screenshot).convert("RGB"))
    else:
        frame = capture_screen(display)
    height, width = frame.shape[:2]
    library = TemplateLibrary.open(directory, name or directory.resolve().name, (width, height))
    library.record(frame, state, parts, words, overlay=overlay, ready=ready)
    path = library.save(directory)
    seen = TemplateLibrary.load(directory).classifier().classify(frame)
    click.echo(f"recorded {state!r} ({len(parts)} templates, {len(words)} text checks) in {path}")
    click.echo(f"the screen is now recognised as {seen.state!r} in {seen.elapsed_ms:.1f} ms")
    if seen.state != state:
        raise DeskfleetError(f"the model recognises this screen as {seen.state!r}, not {state!r}: "
                             "its templates overlap another state's; choose parts only this state shows")


def run() -> None:
    """Entry point: click's usage errors as one line, like every other error."""
    try:
        rv = main.main(standalone_mode=False)
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        _fail(exc.format_message() + hint, exc.exit_code)
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    except click.Abort:
        _fail("aborted", 130)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    run()
