"""``deskfleet desktop``: look at an X display and drive it by hand, with the agent's own
capture and input — for recording a model and writing playbooks without installing xwd,
xdotool or a VNC viewer. Keys go through XTest, as the agent's do."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click

from ..errors import ConfigError, DeskfleetError
from ._common import _Group, _print_table, main, opt

T = TypeVar("T")

_DISPLAY = opt("--display", default=None,
               help="the X display, e.g. :2 (default: $DISPLAY; `deskfleet pack open` prints its own)")


@main.group(cls=_Group)
def desktop() -> None:
    """Look at an X display and drive it by hand: screenshot, windows, click, type, key."""


def _display(display: str | None) -> str:
    chosen = display or os.environ.get("DISPLAY")
    if not chosen:
        raise ConfigError("no X display: give --display :N (deskfleet pack open prints it) or set DISPLAY")
    return chosen


def _on_station(display: str | None, work: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
    """Open the display's screen and input devices, run ``work(station)``, close them."""
    from ..desktop.driver import Station
    from ..desktop.local import X11Session

    async def run() -> T:
        station = Station("desktop", X11Session(_display(display)))
        await station.open()
        try:
            return await work(station)
        finally:
            await station.close()

    try:
        return asyncio.run(run())
    except ValueError as exc:  # a region off the screen, a key or character that cannot be typed
        raise DeskfleetError(str(exc)) from None


def _focus(station: Any, window: str | None) -> None:
    """Make sure keys reach an application: with no window manager, nobody moves the keyboard
    focus when a window closes or opens (it is then PointerRoot, and keys go nowhere). Unless
    a window of the chosen app has it, give it to that app's topmost window (its dialog
    first) — the app whose title matches ``window``, else the one with the topmost window."""
    host = station.host
    found = [w for w in host.windows() if not w.popup and w.pid is not None]
    if window is not None:
        pattern = re.compile(window)
        found = [w for w in found if pattern.search(w.title)]
        if not found:
            raise DeskfleetError(f"no window whose title matches {window!r} is up on {host.display}")
    if not found:
        raise DeskfleetError(f"no application window is up on {host.display}: keys would reach nobody")
    moved = host.focus_app(found[-1].pid)
    if moved is not None:
        click.echo(moved, err=True)


def _region(text: str | None) -> Any:
    from ..desktop import Region

    if text is None:
        return None
    parts = text.split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
        raise click.BadParameter(f"{text!r} is not LEFT,TOP,WIDTH,HEIGHT (e.g. 10,20,300,40)", param_hint="--region")
    left, top, width, height = (int(p) for p in parts)
    if width <= 0 or height <= 0:
        raise click.BadParameter(f"{text!r}: width and height must be positive", param_hint="--region")
    return Region(left, top, width, height)


@desktop.command("screenshot")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@_DISPLAY
@opt("--region", default=None, help="LEFT,TOP,WIDTH,HEIGHT: only this part of the screen")
@opt("--model", "model_dir", default=None, type=click.Path(file_okay=False, path_type=Path),
     help="also say which state this app model recognises (the whole screen only)")
def screenshot(file: Path, display: str | None, region: str | None, model_dir: Path | None) -> None:
    """Write a PNG of the display (or of --region) to FILE."""
    from ..sdk import encode_png

    area = _region(region)
    if model_dir is not None and area is not None:
        raise click.UsageError("--model classifies the whole screen: leave out --region")

    async def grab(station: Any) -> Any:
        return await station.screenshot(area)

    frame = _on_station(display, grab)
    try:
        file.write_bytes(encode_png(frame))
    except OSError as exc:
        raise DeskfleetError(f"cannot write {file}: {exc.strerror or exc}") from None
    height, width = frame.shape[:2]
    said = f"wrote {file} ({width}x{height})"
    if model_dir is not None:
        from ..vision import load_model

        seen = load_model(model_dir).classify(frame)
        said += f": the model sees {seen.state!r}" + (f" ({seen.detail})" if seen.detail else "")
    click.echo(said)


@desktop.command("windows")
@_DISPLAY
@opt("--ping/--no-ping", default=True, help="ask each window that speaks _NET_WM_PING whether its app answers")
def windows_cmd(display: str | None, ping: bool) -> None:
    """The display's top-level windows, bottom to top: which app (pid), title, where, dialogs
    and popups, and whether the app answers a ping (a hung one does not)."""
    import Xlib.display
    from rich.table import Table

    from ..desktop import xwindows

    try:
        x = Xlib.display.Display(_display(display))
    except Exception as exc:
        raise ConfigError(f"cannot connect to the X display {_display(display)}: {exc}") from None
    try:
        found = xwindows.windows(x)
        table = Table("window", "pid", "title", "left,top", "size", "dialog of", "kind", "ping")
        for w in found:
            answer = ""
            if ping and not w.popup:
                if "_NET_WM_PING" not in w.protocols:
                    answer = "not spoken"
                else:
                    took = xwindows.ping(x, w.id, timeout=0.5)
                    answer = "no answer in 0.5s" if took is None else f"{took * 1000:.1f} ms"
            table.add_row(f"0x{w.id:x}", str(w.pid or "?"), w.title, f"{w.rect.left},{w.rect.top}",
                          f"{w.rect.width}x{w.rect.height}", f"0x{w.dialog_of:x}" if w.dialog_of else "",
                          "popup" if w.popup else "dialog" if w.dialog_of else "window", answer)
    finally:
        x.close()
    if not found:
        click.echo(f"no window is up on {_display(display)}")
        return
    _print_table(table)


@desktop.command("click")
@click.argument("x", type=int)
@click.argument("y", type=int)
@_DISPLAY
@opt("--button", default="left", type=click.Choice(["left", "right", "middle"]))
@opt("--double", is_flag=True, default=False, help="a double click")
def click_cmd(x: int, y: int, display: str | None, button: str, double: bool) -> None:
    """Click at X,Y (screen pixels)."""

    async def send(station: Any) -> None:
        def press(d: Any) -> None:
            d.mouse.position = (x, y)
            d.mouse.click(getattr(d.Button, button), 2 if double else 1)

        await station.send(press)

    _on_station(display, send)


_WINDOW = opt("--window", default=None,
              help="regex on the title of the window whose app gets the keys (default: the topmost window's)")


@desktop.command("type")
@click.argument("text")
@_DISPLAY
@_WINDOW
def type_cmd(text: str, display: str | None, window: str | None) -> None:
    """Type TEXT, as if on the keyboard, into the focused field of the app — the one with
    the topmost window, or --window's (click into the field first). TEXT '-' reads it from
    stdin: for anything secret, which must not be on a command line."""
    if text == "-":
        text = sys.stdin.read().rstrip("\n")

    async def send(station: Any) -> None:
        station.dev().check_text(text)
        _focus(station, window)
        await station.send(lambda d: d.type(text))

    _on_station(display, send)


@desktop.command("key")
@click.argument("keys", nargs=-1, required=True)
@_DISPLAY
@_WINDOW
def key_cmd(keys: tuple[str, ...], display: str | None, window: str | None) -> None:
    """Press KEYS together, e.g. `key ctrl a`, `key Return`, `key Escape` — to the app with
    the topmost window, or --window's."""

    async def send(station: Any) -> None:
        dev = station.dev()
        for k in keys:
            dev.key(k)  # an unknown key fails before any is pressed
        _focus(station, window)
        await station.send(lambda d: d.press(keys))

    _on_station(display, send)
