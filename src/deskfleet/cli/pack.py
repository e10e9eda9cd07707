"""``deskfleet pack``: list, check and scaffold packs (an application's model, playbooks and
automations, loaded by any agent), and the pack author's tools: ``new`` writes a pack that
passes its own tests, ``open`` puts a pack's app on a display of its own to record its
screens, ``try`` runs one automation once with no orchestrator (:mod:`deskfleet.packs.trial`).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ..errors import DeskfleetError
from ._common import _fail, _Group, main, opt

if TYPE_CHECKING:
    from ..desktop.driver import RealDesktop
    from ..packs.loader import Pack
    from ..packs.trial import TrialResult, TrialStep

T = TypeVar("T")


@main.group(cls=_Group)
def pack() -> None:
    """Packs: an application's model, playbooks and automations (docs/your-app.md)."""


@pack.command("list")
def pack_list() -> None:
    """The packs installed in this Python environment (found by name)."""
    from ..packs.loader import installed_packs, load_pack

    found = installed_packs()
    if not found:
        click.echo("no packs installed (a pack directory is loaded by path: --pack ./my-pack)")
        return
    for name in sorted(found):
        try:
            p = load_pack(name)
            click.echo(f"{name:16} {p.version:10} {p.description}")
        except DeskfleetError as exc:
            click.echo(f"{name:16} {'?':10} does not load: {str(exc).splitlines()[0]}")


@pack.command("check")
@click.argument("ref")
def pack_check(ref: str) -> None:
    """Check the pack REF (a directory, or an installed pack's name): manifest, module, model,
    recoveries, automations. One line per problem; exits 1 if there is any."""
    from ..packs.check import check_pack

    report = check_pack(ref)
    for line in report.problems:
        click.echo(f"problem: {line}", err=True)
    for line in report.warnings:
        click.echo(f"warning: {line}", err=True)
    if not report.ok:
        raise DeskfleetError(f"{len(report.problems)} problem(s) in pack {ref}")
    click.echo(f"ok: {report.summary()}")


# -- the pack author's tools ----------------------------------------------------------------------


def _shown(path: Path) -> str:
    """A path as the user would type it: relative to here when it is below here."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return str(path)


@pack.command("new")
@click.argument("name")
@opt("--dir", "parent", default=".", type=click.Path(file_okay=False, path_type=Path),
     help="the directory to create the pack in (as PARENT/NAME)")
def pack_new(name: str, parent: Path) -> None:
    """Create the pack NAME: a small, complete example — a Tk app shipped inside it, its
    recorded model, playbooks, a probe, the automation NAME.add_item with a reconcile check,
    tests and a README saying what to change to drive your own application. It passes its
    own tests as it is. A NAME that is not a pack name, or a directory that exists and is
    not empty, is refused and nothing is written."""
    from ..packs.scaffold import EXAMPLE_INPUT, new_pack
    from ..vision.screens import saved_screens
    from ..vision.templates import TemplateLibrary

    created = new_pack(name, parent)
    where = _shown(created.path)
    model = created.path / "model"
    states, screens = len(TemplateLibrary.load(model).states), len(saved_screens(model))
    click.echo(f"created pack {name} in {where}/")
    rows = [("pack.toml", "the app's command and screen size; which playbook answers which screen"),
            ("pack.py", f"playbooks (login, dismiss, cancel_form), a probe, the automation {created.automation}"),
            ("app.py", "the example application (Inventory, Tk): replace it with yours"),
            ("model/", f"its recorded model: {states} screen states, {screens} labelled screenshots"),
            ("tests/test_pack.py", f"pack check, model test and a pack try of {created.automation} on Xvfb"),
            ("README.md", "how to make it drive your own application")]
    width = max(len(f) for f, _ in rows) + len(where) + 1
    for file, what in rows:
        click.echo(f"  {where + '/' + file:<{width}}  {what}")
    click.echo("next:")
    click.echo(f"  deskfleet pack try {where} {created.automation} --input '{EXAMPLE_INPUT}'")
    click.echo(f"  deskfleet pack open {where}        # the app on a display of its own, to record screens")
    click.echo(f"  python -m pytest {where}/tests")


def _interruptible(make: Callable[[], Awaitable[T]]) -> T:
    """Run ``make()`` on an event loop; SIGINT or SIGTERM cancels it (its cleanup runs: the
    app and the display stop) and ends the command with "interrupted". The desktop's
    routine log lines (display up, app started) are left out unless --log-level asks."""
    _quiet_unless_asked()
    interrupted = False

    async def run() -> T:
        nonlocal interrupted
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def stop() -> None:
            nonlocal interrupted
            interrupted = True
            task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop)
        return await make()

    try:
        return asyncio.run(run())
    except asyncio.CancelledError:
        if interrupted:
            raise KeyboardInterrupt from None
        raise


def _quiet_unless_asked() -> None:
    import logging

    root = click.get_current_context().find_root()
    if root.get_parameter_source("log_level") in (click.core.ParameterSource.DEFAULT, None):
        logging.getLogger("deskfleet").setLevel(logging.WARNING)


async def _until_signalled() -> None:
    """Wait for Ctrl-C (or SIGTERM); a second one while everything stops is ignored."""
    loop = asyncio.get_running_loop()
    got = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, got.set)
    await got.wait()


def _screen_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    width, sep, height = text.lower().partition("x")
    if not (sep and width.isdigit() and height.isdigit() and 64 <= int(width) <= 16384 and 64 <= int(height) <= 16384):
        raise click.BadParameter(f"{text!r} is not WIDTHxHEIGHT (e.g. 1024x768)", param_hint="--screen")
    return int(width), int(height)


def _what_it_shows(pack: Pack, frame: Any) -> str:
    seen = pack.model.classify(frame)
    return f"the model sees {seen.state!r}" + (f" ({seen.detail})" if seen.detail else "")


def _save_png(desktop_frame: Any, path: Path) -> None:
    from ..sdk import encode_png

    try:
        path.write_bytes(encode_png(desktop_frame))
    except OSError as exc:
        raise DeskfleetError(f"cannot write {path}: {exc.strerror or exc}") from None


def _open_help(pack: Pack, display: str | None, width: int, height: int) -> list[str]:
    model = pack.directory / pack.manifest.pack.model if pack.directory else Path(pack.manifest.pack.model)
    d, m = display or "$DISPLAY", _shown(model)
    return [
        "record its screens into the pack's model (docs/real-desktops.md, \"Authoring and testing a model\"):",
        f"  deskfleet model capture --display {d} --dir {m} --state STATE --anchor NAME=LEFT,TOP,WIDTH,HEIGHT …",
        f"  deskfleet model add-screen --dir {m} STATE --display {d}",
        f"  deskfleet model classify {m} screen-1.png",
        "look at it, drive it by hand:",
        f"  deskfleet desktop screenshot screen.png --display {d} --model {m}",
        f"  deskfleet desktop windows --display {d}          (its windows, dialogs, and whether it answers)",
        f"  deskfleet desktop click {width // 2} {height // 2} --display {d}",
        f"  deskfleet desktop type 'text' --display {d};  deskfleet desktop key ctrl a --display {d}",
        f"  x11vnc -display {d} -localhost -nopw -forever     (to watch it live: a VNC viewer on localhost:5900)",
    ]


@pack.command("open")
@click.argument("ref", metavar="PACK")
@opt("--screen", default=None, help="the display's size WIDTHxHEIGHT (default: the pack's)")
@opt("--app-option", "app_options", multiple=True,
     help="one more argument for the app's command, e.g. --app-option=--mfa; repeatable")
@opt("--screenshot", default=None, type=click.Path(dir_okay=False, path_type=Path),
     help="write one screenshot of the app's first screen (PNG) to this file and exit")
@opt("--state-dir", default="deskfleet-try", type=click.Path(file_okay=False, path_type=Path),
     help="the app's {data} (STATE_DIR/data/<pack>) and output (STATE_DIR/logs)")
def pack_open(ref: str, screen: str | None, app_options: tuple[str, ...], screenshot: Path | None,
              state_dir: Path) -> None:
    """Start the pack PACK's app on a new Xvfb display and keep it until Ctrl-C: how you
    record a model of your own app. The display is the first free number (Xvfb picks it;
    nothing else running is disturbed). Prints it (DISPLAY=:N) and the commands that
    capture its screens; Enter saves a screenshot (screen-N.png). --screenshot FILE writes
    one screenshot and exits.

    \b
      deskfleet pack open ./my-pack
      deskfleet pack open ./my-pack --screenshot first.png
    """
    from ..packs.loader import load_pack
    from ..packs.trial import pack_machine

    loaded = load_pack(ref)
    size = _screen_size(screen)

    async def run() -> None:
        async with pack_machine(loaded, app_args=app_options, state_dir=state_dir, screen=size) as desktop:
            frame = await desktop.screenshot()
            height, width = frame.shape[:2]
            if screenshot is not None:
                _save_png(frame, screenshot)
                click.echo(f"wrote {screenshot} ({width}x{height}): {_what_it_shows(loaded, frame)}")
                return
            display = desktop.host.display
            click.echo(f"{loaded.name}: the app is up on DISPLAY={display} ({width}x{height}, pid {desktop.app_pid}); "
                       f"{_what_it_shows(loaded, frame)}")
            click.echo("\n".join(_open_help(loaded, display, width, height)))
            if sys.stdin.isatty():
                click.echo("Enter saves a screenshot (screen-N.png here) and says what the model sees; Ctrl-C stops")
                asyncio.get_running_loop().add_reader(sys.stdin.fileno(), _on_enter(loaded, desktop))
            else:
                click.echo("Ctrl-C stops the app and the display")
            try:
                await _until_signalled()
            finally:
                if sys.stdin.isatty():
                    asyncio.get_running_loop().remove_reader(sys.stdin.fileno())
            click.echo("stopping the app and the display")

    _interruptible(run)


def _on_enter(pack: Pack, desktop: RealDesktop) -> Callable[[], None]:
    """Enter in the terminal: save the screen as the next free screen-N.png and classify it."""

    def saved() -> None:
        if not sys.stdin.readline():
            asyncio.get_running_loop().remove_reader(sys.stdin.fileno())
            return
        number = 1
        while Path(f"screen-{number}.png").exists():
            number += 1
        path = Path(f"screen-{number}.png")

        async def shoot() -> None:
            try:
                frame = await desktop.screenshot()
                _save_png(frame, path)
                click.echo(f"wrote {path}: {_what_it_shows(pack, frame)}")
            except DeskfleetError as exc:
                click.echo(f"deskfleet: {exc}", err=True)

        asyncio.get_running_loop().create_task(shoot())

    return saved


def _refuse_argv(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """A password given as an argument: refuse it (one line, the value never repeated)."""
    if value is not None:
        _fail("--password on the command line would show it to anyone who can list processes or read "
              "your shell history: pipe it with --password-stdin, or give --password-file FILE", 2)


def _read_text(source: str, what: str) -> str:
    """A secret or an input from stdin (``-``) or a file; one trailing newline dropped."""
    if source == "-":
        if sys.stdin.isatty() and what == "password":
            import getpass

            text = getpass.getpass(prompt="password (not shown): ")
        else:
            text = sys.stdin.read()
    else:
        try:
            text = Path(source).read_text(encoding="utf-8")
        except OSError as exc:
            raise click.UsageError(f"cannot read the {what} file {source}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise click.UsageError(f"the {what} file {source} is not UTF-8 text") from None
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def _input(text: str, password_stdin: bool) -> dict[str, Any]:
    if text.startswith("@"):
        if text == "@-" and password_stdin:
            raise click.UsageError("--input @- and --password-stdin both read stdin: give the input as @FILE")
        text = _read_text(text[1:] or "-", "input")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}",
                                 param_hint="--input") from None
    if not isinstance(data, dict):
        raise click.BadParameter("the input must be a JSON object ({...})", param_hint="--input")
    return data


def _print_step(step: TrialStep) -> None:
    if step.kind == "error":
        return  # said once, at the end, as the command's error
    shot = f"   [{_shown(step.screenshot)}]" if step.screenshot else ""
    click.echo(f"{step.at:6.1f}s  {step.kind:<10}{step.text}{shot}")


@pack.command("try")
@click.argument("ref", metavar="PACK")
@click.argument("automation_name", metavar="AUTOMATION")
@opt("--input", "input_text", default="{}", envvar="DESKFLEET_PACK_TRY_INPUT", help="the automation's input: JSON, or @FILE (@- reads stdin)")
@opt("--desktop", "desktop_kind", default="xvfb", type=click.Choice(["xvfb", "local"]),
     envvar="DESKFLEET_PACK_TRY_DESKTOP", help="xvfb: the app on a new Xvfb display (the first free display number, printed as DISPLAY=:N); local: this session ($DISPLAY), taking over the app if it runs")
@opt("--account", default=None, help="the account to log in as: a name for --username's account, or one of "
     "the pack's demo accounts (default: the pack's default account)")
@opt("--username", default=None, help="log in as this user (the password from --password-stdin or --password-file)")
@opt("--password-stdin", is_flag=True, default=False, help="read --username's password from stdin")
@opt("--password-file", default=None, type=click.Path(dir_okay=False, path_type=Path),
     help="read --username's password from this file")
@click.option("--password", "password", default=None, hidden=True, expose_value=False, is_eager=True,
              allow_from_autoenv=False, callback=_refuse_argv)
@opt("--app-option", "app_options", multiple=True,
     help="one more argument for the app's command, e.g. --app-option=--mfa; repeatable")
@opt("--reconcile", is_flag=True, default=False,
     help="run the automation's reconcile check first, as a retry after a lost attempt does")
@opt("--screenshots", default=None, type=click.Path(file_okay=False, path_type=Path),
     help="save the screenshot of each step into this directory")
@opt("--keep-open", is_flag=True, default=False, help="keep the app and its display up afterwards, until Ctrl-C")
@opt("--state-dir", default="deskfleet-try", type=click.Path(file_okay=False, path_type=Path),
     help="the app's {data} (STATE_DIR/data/<pack>, kept between tries) and output (STATE_DIR/logs)")
@opt("--timeout", default=120.0, type=click.FloatRange(min=0, min_open=True),
     help="seconds for pre-flight and the automation together")
def pack_try(ref: str, automation_name: str, input_text: str, desktop_kind: str, account: str | None,
             username: str | None, password_stdin: bool, password_file: Path | None,
             app_options: tuple[str, ...], reconcile: bool, screenshots: Path | None, keep_open: bool,
             state_dir: Path, timeout: float) -> None:
    """Run AUTOMATION of PACK once, here, with no orchestrator: start the app on a new Xvfb
    display (or drive this session with --desktop local), run the real pre-flight (settle,
    playbooks, probe) and the automation, printing each step as it happens, then its output.
    Exits 0 if it succeeded, 1 with the error in one line otherwise.

    \b
      deskfleet pack try ./my-pack my-pack.add_item --input '{"name": "Widget", "quantity": 3}'
      printf '%s' "$PASSWORD" | deskfleet pack try ./my-pack my-pack.add_item --input @item.json \\
          --username robot1 --password-stdin --screenshots shots/
    """
    from ..packs.loader import load_pack
    from ..packs.trial import find_automation, local_accounts, try_automation

    if password_stdin and password_file is not None:
        raise click.UsageError("give the password with --password-stdin or --password-file, not both")
    data = _input(input_text, password_stdin)
    loaded = load_pack(ref)
    automation = find_automation(loaded, automation_name)
    secret = sorted(set(automation.spec.secret_fields) & set(data))
    if secret and not input_text.startswith("@"):
        raise click.UsageError(f"input field(s) {', '.join(secret)} of {automation.name} are secrets: give the "
                               "input in a file (--input @FILE), not on the command line")
    password = None
    if password_stdin or password_file is not None:
        password = _read_text("-" if password_stdin else str(password_file), "password")
        if not password:
            raise click.UsageError("the password read is empty")
    name, credentials = local_accounts(loaded, account=account, username=username, password=password)

    async def hold(desktop: RealDesktop, result: TrialResult) -> None:
        if not result.ok:  # said now, not only after Ctrl-C: it is what the person looks at the app for
            click.echo(f"{automation.name} failed: {result.error}")
        display = desktop.host.display
        ours = desktop_kind == "xvfb"
        click.echo(f"the app stays up on DISPLAY={display} (--keep-open); Ctrl-C stops it"
                   + ("" if ours else " (this session's display stays)"))
        w, h = loaded.screen
        click.echo("\n".join(_open_help(loaded, display, w, h)))
        await _until_signalled()
        if not ours and desktop.attached:
            click.echo("leaving the app running, as it was found")
        else:
            click.echo("stopping the app" + (" and the display" if ours else ""))

    result = _interruptible(lambda: try_automation(
        loaded, automation.name, data, desktop=desktop_kind, account=name, credentials=credentials,
        app_args=app_options, reconcile=reconcile, screenshots=screenshots, state_dir=state_dir,
        timeout=timeout, on_step=_print_step, hold=hold if keep_open else None))
    if not result.ok:
        shot = next((s.screenshot for s in reversed(result.steps) if s.kind == "error" and s.screenshot), None)
        raise DeskfleetError(f"{automation.name} failed: {result.error}"
                             + (f" (the screen then: {_shown(shot)})" if shot else ""))


# -- packs on the fleet: build, publish, assign (docs/packs-rollout.md) ----------------------------


@pack.command("build")
@click.argument("ref")
@opt("-o", "--out", "out", default="dist", type=click.Path(file_okay=False, path_type=Path),
     help="the directory the archive is written to")
def pack_build(ref: str, out: Path) -> None:
    """Build the pack REF (its directory, or an installed pack's name) into OUT/NAME-VERSION.zip:
    its files in a reproducible archive (the same files make the same bytes), with what it
    offers, read by loading the pack from the archive's own files. Prints its sha256."""
    from ..packs.archive import build

    built = build(ref, out)
    click.echo(f"built {_shown(built.path)}: pack {built.name} {built.version}, {built.files} files, "
               f"{built.size} bytes, {len(built.automations)} automations")
    click.echo(f"sha256 {built.sha256}")


@pack.command("publish")
@click.argument("ref")
@opt("--pool", default=None, help="also assign the version to this pool (a rolling rollout)")
@opt("--max-unavailable", default=None, help="with --pool: machines out of service at once (a count, or '10%')")
@opt("--reason", default="", help="with --pool: why, kept with the rollout and its events")
@click.pass_context
def pack_publish(ctx: click.Context, ref: str, pool: str | None, max_unavailable: str | None, reason: str) -> None:
    """Upload the pack REF — an archive (.zip from `pack build`), or a pack's directory or
    installed name, built first — to the orchestrator, which registers its automations
    (runs of them are accepted even by a pool with no machine yet). Publishing the same
    version again is a no-op; a different archive under a published version is refused.
    With --pool, the pool is assigned the version: its machines move to it a few at a time."""
    import tempfile

    from .. import packfile
    from ._common import _client

    path = Path(ref)
    with tempfile.TemporaryDirectory(prefix="deskfleet-publish-") as scratch:
        if path.is_file():
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise DeskfleetError(f"cannot read {ref}: {exc.strerror or exc}") from None
        else:
            from ..packs.archive import build

            data = build(ref, Path(scratch)).path.read_bytes()
    digest = packfile.sha256(data)
    with _client(ctx) as c:
        published = c.publish_pack(data, sha256=digest)
        said = "published" if published.get("created") else "already published (the same archive)"
        click.echo(f"{said}: pack {published['name']} {published['version']} (sha256 {digest[:12]}…), "
                   f"automations {', '.join(published['automations']) or 'none'}", err=True)
        if pool is None:
            _print_json(published)
            return
        rollout = c.assign_pack(pool, published["name"], published["version"], max_unavailable=_limit(max_unavailable),
                                reason=reason)
        click.echo(f"pool {pool} assigned {rollout['pack']} {rollout['version']} (rollout {rollout['id']}, "
                   f"from {rollout['from_version'] or 'nothing assigned'})", err=True)
        _print_json(rollout)


@pack.command("published")
@click.argument("name", required=False)
@click.pass_context
def pack_published(ctx: click.Context, name: str | None) -> None:
    """The pack versions published to the orchestrator (of NAME), newest first."""
    from ._common import _client

    with _client(ctx) as c:
        _print_json(c.packs(name))


def _limit(text: str | None) -> int | str | None:
    return int(text) if text is not None and text.isdigit() else text


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _follow_rollout(c: Any, pool: str, rollout: dict[str, Any], interval: float = 2.0) -> dict[str, Any]:
    """Progress on stderr, a line at each change, until it is done, stalled or superseded."""
    import time

    said = ""
    while True:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(rollout["counts"].items())) or "no machine to move yet"
        line = f"rollout {rollout['id']} of {rollout['pack']} {rollout['version']} to {pool}: {rollout['state']} — {counts}"
        if rollout.get("detail"):
            line += f" ({rollout['detail']})"
        if line != said:
            click.echo(line, err=True)
            said = line
        if rollout["state"] in ("done", "stalled", "superseded"):
            return rollout
        time.sleep(interval)
        rollout = c.rollout(pool, rollout["id"])


def _register_pools_pack() -> None:
    from ._common import _client
    from .runs import pools

    @pools.command("pack")
    @click.argument("name")
    @opt("--set", "set_", default=None, metavar="PACK@VERSION", envvar="DESKFLEET_POOLS_PACK_SET",
         help="assign this published version to the pool")
    @opt("--rollback", default=None, metavar="PACK", help="go back to the version the pool ran before")
    @opt("--max-unavailable", default=None, help="machines out of service at once: a count, or '10%' "
         "(default: the previous rollout's, else 1)")
    @opt("--reason", default="", help="why: kept with the rollout and its events")
    @opt("--wait", is_flag=True, default=False, help="follow the rollout until it is done or stalls (exit 1 if "
         "it stalls or a machine failed)")
    @click.pass_context
    def pools_pack(ctx: click.Context, name: str, set_: str | None, rollback: str | None,
                   max_unavailable: str | None, reason: str, wait: bool) -> None:
        """The pack versions pool NAME runs: with --set PACK@VERSION, assign one (its machines
        move to it a few at a time, each between runs); with --rollback PACK, go back to the
        version before; with neither, show the versions assigned and their rollouts."""
        if set_ is not None and rollback is not None:
            raise click.UsageError("give --set PACK@VERSION or --rollback PACK, not both")
        with _client(ctx) as c:
            if set_ is None and rollback is None:
                _print_json(c.pool_packs(name))
                return
            if set_ is not None:
                pack_name, sep, version = set_.rpartition("@")
                if not sep or not pack_name or not version:
                    raise click.BadParameter(f"{set_!r} is not PACK@VERSION (e.g. acme-erp@2.0.0)", param_hint="--set")
                rollout = c.assign_pack(name, pack_name, version, max_unavailable=_limit(max_unavailable),
                                        reason=reason)
            else:
                assert rollback is not None
                rollout = c.assign_pack(name, rollback, rollback=True, max_unavailable=_limit(max_unavailable),
                                        reason=reason)
            if wait:
                rollout = _follow_rollout(c, name, rollout)
            _print_json(rollout)
            if wait and (rollout["state"] == "stalled" or rollout["counts"].get("failed")):
                raise SystemExit(1)


_register_pools_pack()
