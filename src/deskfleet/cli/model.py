"""``deskfleet model``: record and check an application's screen states."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..errors import DeskfleetError
from ._common import _Group, main, opt


# -- model --------------------------------------------------------------------------------------------
@main.group(cls=_Group)
def model() -> None:
    """App models: record templates of an application's screens."""


def _areas(values: tuple[str, ...], hint: str, *, text: bool = False) -> list[tuple[str, Any, str]]:
    from ..desktop import Region

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

    from ..desktop.driver import capture_screen
    from ..vision.templates import Anchor, TemplateLibrary, TextSpec

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
