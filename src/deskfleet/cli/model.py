"""``deskfleet model``: record an application's screen states, and check and measure a model.

Authoring: ``capture`` records a state from the screen, ``add-screen`` saves one more
labelled screenshot of a state, ``remove`` drops a state; each is checked against every
screenshot saved with the model and refused (nothing written) when it would break one.
Checking: ``classify`` says what a model sees in screenshots and why every other state
lost; ``test`` measures a model on labelled screenshots and fails on any false ready.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..errors import ConfigError, DeskfleetError
from ._common import _Group, main, opt

if TYPE_CHECKING:
    from ..desktop import Frame, Region
    from ..vision import Explanation
    from ..vision.authoring import Change
    from ..vision.screens import Report


@main.group(cls=_Group)
def model() -> None:
    """App models: record an application's screens, check and measure a model."""


# -- parsing ------------------------------------------------------------------------------------------

_AREA = re.compile(r"(?P<name>[^=]+)=(?P<box>\s*\d+\s*(?:,\s*\d+\s*){3})(?P<opts>(?:[+@][^+@]*)*)")


def _areas(values: tuple[str, ...], hint: str, *, text: bool = False,
           margins: bool = False) -> list[tuple[str, Region, float | None, int | None, str]]:
    """NAME=LEFT,TOP,WIDTH,HEIGHT[+MARGIN][@THRESHOLD][:REGEX] → (name, region, threshold, margin, regex)."""
    from ..desktop import Region

    form = "NAME=LEFT,TOP,WIDTH,HEIGHT" + ("[+MARGIN]" if margins else "") + "[@THRESHOLD]" + (":REGEX" if text else "")
    out = []
    for v in values:
        head, _, pattern = v.partition(":") if text else (v, "", "")
        m = _AREA.fullmatch(head.strip())
        if m is None or (text and not pattern):
            raise click.BadParameter(f"{v!r} is not {form}", param_hint=hint)
        threshold: float | None = None
        margin: int | None = None
        for sign, value in re.findall(r"([+@])([^+@]*)", m["opts"]):
            if sign == "@":
                try:
                    threshold = float(value)
                except ValueError:
                    threshold = -1.0
                if not 0 <= threshold <= 1:
                    raise click.BadParameter(f"{v!r}: the threshold after '@' must be a number in 0..1",
                                             param_hint=hint)
            elif not margins:
                raise click.BadParameter(f"{v!r}: only anchors take a margin ('+PIXELS'); this is {form}",
                                         param_hint=hint)
            elif not value.strip().isdigit() or not 0 <= int(value) <= 64:
                raise click.BadParameter(f"{v!r}: the margin after '+' must be 0..64 pixels", param_hint=hint)
            else:
                margin = int(value)
        region = Region(*(int(n) for n in m["box"].split(",")))
        out.append((m["name"].strip(), region, threshold, margin, pattern))
    return out


def _frame(screenshot: Path | None, display: str | None) -> Frame:
    from ..desktop.driver import capture_screen
    from ..vision.screens import read_image

    if screenshot is not None:
        return read_image(screenshot)
    return capture_screen(display)


def _main_window(display: str | None, title: str | None) -> Region | None:
    """Where the app's main window is on ``display``: the largest window that is neither a
    dialog nor a popup (whose title matches ``title``, if given). None: no window listed."""
    chosen = display or os.environ.get("DISPLAY")
    if not chosen:
        return None  # no X display (Windows: the session's screen)
    import Xlib.display

    from ..desktop import WindowFacts, xwindows

    try:
        x = Xlib.display.Display(chosen)
    except Exception as exc:
        raise DeskfleetError(f"cannot connect to the X display {chosen}: {exc}") from None
    try:
        found = [w for w in xwindows.windows(x) if not w.popup]
    finally:
        x.close()
    if title is not None:
        pattern = re.compile(title)
        found = [w for w in found if pattern.search(w.title)]
        if not found:
            raise DeskfleetError(f"no window whose title matches {title!r} is up on {chosen}")
    pids = {w.pid for w in found if w.pid is not None and w.dialog_of is None}
    facts = [WindowFacts.of(found, pid) for pid in pids]
    mains = [f.main for f in facts if f.main is not None]
    return max(mains, key=lambda w: w.rect.width * w.rect.height).rect if mains else None


# -- authoring ----------------------------------------------------------------------------------------

_DIR = opt("--dir", "directory", required=True, type=click.Path(file_okay=False, path_type=Path),
           help="the model directory (model.json, template PNGs, screens/)")
_DISPLAY = opt("--display", default=None,
               help="X display to capture (default: $DISPLAY; on Windows the session's screen)")
_FORCE = opt("--force", is_flag=True, default=False, help="write it even if the check fails (and say what fails)")


def _report_change(change: Change, what: str) -> None:
    if change.seen is not None:
        c = change.seen.classification
        click.echo(f"this screenshot is recognised as {c.state!r} ({c.elapsed_ms:.1f} ms)"
                   + (f"; saved as {change.screen}" if change.screen else ""))
    if change.removed_screens:
        click.echo(f"removed {change.removed_screens} saved screenshot(s) of {change.state!r}")
    if not change.checked:
        click.echo(f"no{' other' if what else ''} saved screenshots to check")
    elif not (change.broken or change.still_wrong):
        click.echo(f"checked {change.checked} saved screenshot(s){what}: all recognised as labelled")
    else:
        bad = len(change.broken) + len(change.still_wrong)
        click.echo(f"checked {change.checked} saved screenshot(s){what}: {change.checked - bad} recognised as labelled")
    for o in change.fixed:
        click.echo(f"  now recognised: {o.item.name} as {o.item.label!r}")
    for o in change.still_wrong:
        click.echo(f"  still not recognised: {o.describe()}")
    for problem in change.problems():
        click.echo(f"deskfleet: warning: written although {problem} (--force)", err=True)


@model.command("capture")
@_DIR
@opt("--state", required=True, help="the state the screen shows now")
@opt("--anchor", "anchors", multiple=True, help="NAME=LEFT,TOP,WIDTH,HEIGHT[+MARGIN][@THRESHOLD]: a stable part "
     "(an icon, an edge) searched for within MARGIN px; repeatable")
@opt("--fixed", "fixed", multiple=True, help="NAME=LEFT,TOP,WIDTH,HEIGHT[@THRESHOLD]: a plain area compared in "
     "place; repeatable")
@opt("--text", "texts", multiple=True, help="NAME=LEFT,TOP,WIDTH,HEIGHT[@THRESHOLD]:REGEX read by OCR; repeatable")
@opt("--overlay/--no-overlay", default=False, help="a dialog that covers other states and wins over them")
@opt("--ready/--no-ready", default=False, help="automations may start in this state")
@opt("--margin", default=4, type=click.IntRange(0, 64), help="pixels around each anchor to search (default of +MARGIN)")
@opt("--anchor-threshold", "--threshold", "anchor_threshold", default=0.9, type=click.FloatRange(0, 1),
     help="pass mark of the anchors (template search score)")
@opt("--fixed-threshold", default=0.95, type=click.FloatRange(0, 1),
     help="pass mark of the fixed areas (1 - mean grey difference)")
@opt("--text-threshold", default=0.5, type=click.FloatRange(0, 1), help="pass mark of the text checks (1 or 0)")
@_DISPLAY
@opt("--screenshot", default=None, type=click.Path(dir_okay=False, exists=True, path_type=Path),
     help="record from this PNG instead of a live display")
@opt("--name", default=None, help="the model's name, for a new directory (default: the directory's name)")
@_FORCE
@opt("--replace-screens", is_flag=True, default=False,
     help="drop the screenshots saved for this state before (they show an older look of it)")
@opt("--window", "window_title", default=None,
     help="regex on the title of the app's main window (default: the largest window on the display)")
@opt("--screen-anchored", is_flag=True, default=False,
     help="tie a new model to the screen, not to the app's window")
@opt("--variant", "look", default=None, metavar="LOOK",
     help="the screen shows STATE in another look of the app (e.g. 'dark', its dark theme): cut the state's "
          "templates again from it, as LOOK's variants, where they do not already pass (no --anchor)")
def model_capture(directory: Path, state: str, anchors: tuple[str, ...], fixed: tuple[str, ...],
                  texts: tuple[str, ...], overlay: bool, ready: bool, margin: int, anchor_threshold: float,
                  fixed_threshold: float, text_threshold: float, display: str | None, screenshot: Path | None,
                  name: str | None, force: bool, replace_screens: bool, window_title: str | None,
                  screen_anchored: bool, look: str | None) -> None:
    """Record STATE's templates from what the screen shows now.

    The new state must recognise this screen, and every screenshot saved with the model
    must still be recognised as its label; otherwise nothing is written. The screenshot is
    saved with the model (screens/STATE/N.png) for the checks of later changes.

    Captured from a live display, a new model is anchored to the app's main window: it
    records where the window is (model.json's "window"), and agents then find the app
    wherever its window is, on a screen of any size. Coordinates are measured on the screen
    as it is at the first capture.

    With --variant LOOK, STATE is already in the model and the screen shows it in another
    look (another theme): each of its templates that this screen does not pass gets a
    variant cut from it, which the state then also accepts."""
    from ..vision import authoring
    from ..vision.templates import Anchor, TextSpec

    parts = [Anchor(n, r, "match", anchor_threshold if t is None else t, margin if m is None else m)
             for n, r, t, m, _ in _areas(anchors, "--anchor", margins=True)]
    parts += [Anchor(n, r, "pixels", fixed_threshold if t is None else t)
              for n, r, t, _, _ in _areas(fixed, "--fixed")]
    words = [TextSpec(n, r, p, text_threshold if t is None else t)
             for n, r, t, _, p in _areas(texts, "--text", text=True)]
    if look is not None:
        if parts or words or overlay or ready or replace_screens:
            raise click.UsageError("--variant records another look of a state as it is: no --anchor, --fixed, "
                                   "--text, --overlay, --ready or --replace-screens with it")
        frame = _frame(screenshot, display)
        window = None if screenshot is not None or screen_anchored else _main_window(display, window_title)
        change = authoring.capture_variant(directory, frame, state, look, force=force, window=window)
        given = f": {', '.join(change.variants)}" if change.variants else " (its templates all pass as they are)"
        click.echo(f"recorded the {look!r} look of {state!r} in {directory / 'model.json'}: "
                   f"{len(change.variants)} variant(s){given}")
        _report_change(change, "")
        return
    if not parts and not words:
        raise click.UsageError("give at least one --anchor, --fixed or --text")
    frame = _frame(screenshot, display)
    window = None if screenshot is not None or screen_anchored else _main_window(display, window_title)
    if words:
        _warm_ocr_engine()
    change = authoring.capture(directory, frame, state, parts, words, overlay=overlay, ready=ready, name=name,
                               force=force, replace_screens=replace_screens, window=window)
    click.echo(f"recorded {state!r} in {directory / 'model.json'}: {len(parts)} template(s), "
               f"{len(words)} text check(s)")
    _report_change(change, "")


@model.command("add-screen")
@_DIR
@click.argument("state")
@_DISPLAY
@opt("--screenshot", default=None, type=click.Path(dir_okay=False, exists=True, path_type=Path),
     help="add this PNG instead of a capture of a live display")
@_FORCE
def model_add_screen(directory: Path, state: str, display: str | None, screenshot: Path | None, force: bool) -> None:
    """Save one more screenshot of STATE with the model, once the model recognises it.

    STATE 'unknown' saves a screen the model must not recognise (a dialog it does not
    know, another program's window). Every later change is checked against it."""
    from ..vision import authoring

    change = authoring.add_screen(directory, _frame(screenshot, display), state, force=force)
    c = change.seen.classification if change.seen else None
    click.echo(f"saved {change.screen} in {directory}"
               + (f": recognised as {c.state!r} ({c.elapsed_ms:.1f} ms)" if c else ""))
    for problem in change.problems():
        click.echo(f"deskfleet: warning: saved although {problem} (--force)", err=True)


@model.command("remove")
@_DIR
@click.argument("state")
@_FORCE
def model_remove(directory: Path, state: str, force: bool) -> None:
    """Remove STATE, its templates and its saved screenshots.

    The remaining screenshots are checked again; if one of them is no longer recognised
    as its label, nothing is removed. The model's last state cannot be removed."""
    from ..vision import authoring

    change = authoring.remove(directory, state, force=force)
    click.echo(f"removed {state!r} from {directory / 'model.json'}")
    _report_change(change, " that remain")


# -- classify -----------------------------------------------------------------------------------------


def _warm_ocr_engine() -> None:
    from ..vision.ocr import shared_engine

    shared_engine()


def _images(paths: Sequence[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(q for q in p.rglob("*.png") if not q.name.startswith("."))
            if not found:
                raise ConfigError(f"no PNG images in {p}")
            out += found
        else:
            out.append(p)
    return out


def _check_lines(e: Explanation, state: str) -> list[str]:
    verdict = e.verdict(state)
    if verdict is None:
        return []
    width = max(len(c.name) for c in verdict.checks)
    lines = []
    for c in verdict.checks:
        score = "not read" if c.score is None else f"{c.score:.3f}"
        mark = "" if c.passed is None else (">=" if c.passed else "< ")
        lines.append(f"    {c.kind:6} {c.name:<{width}}  {score:>8} {mark} {c.threshold:.2f}")
    return lines


def _explanation_text(name: str, e: Explanation) -> list[str]:
    c = e.classification
    lines = [f"{name}: {c.state}  ({e.size[0]}x{e.size[1]}, {c.elapsed_ms:.1f} ms)"]
    if c.detail:
        lines.append(f"  {c.detail}")
    verdict = e.verdict(c.state)
    if verdict is not None:
        flags = ", ".join(f for f, on in (("overlay", verdict.overlay), ("ready", verdict.ready)) if on)
        lines.append(f"  {c.state}{f' ({flags})' if flags else ''}: all {len(verdict.checks)} checks pass")
        lines += _check_lines(e, c.state)
    losers = [v for v in e.states if not v.recognised]
    if losers and c.state != "wrong_screen":
        lines.append("  lost:")
        width = max(len(v.name) for v in losers)
        lines += [f"    {v.name:<{width}}  {v.reason}" for v in losers]
    return lines


@model.command("classify")
@click.argument("model_dir", metavar="MODEL", type=click.Path(exists=True, path_type=Path))
@click.argument("images", metavar="IMAGE…|DIR", nargs=-1, required=True,
                type=click.Path(exists=True, path_type=Path))
@opt("--json", "as_json", is_flag=True, default=False, help="one JSON document for machines")
def model_classify(model_dir: Path, images: tuple[Path, ...], as_json: bool) -> None:
    """Say which state MODEL recognises in each image, with every check's score of the
    winner and why each other state lost. A directory stands for every PNG under it."""
    from ..vision import load_model
    from ..vision.screens import read_image, warm_ocr

    classifier = load_model(model_dir)
    warm_ocr(classifier)
    files = _images(images)
    frames = [(str(f), read_image(f)) for f in files]  # all readable before anything is printed
    results = [(name, classifier.explain(frame)) for name, frame in frames]
    if as_json:
        click.echo(json.dumps([{"image": name, **e.to_dict()} for name, e in results], indent=2))
        return
    for i, (name, e) in enumerate(results):
        if i:
            click.echo("")
        click.echo("\n".join(_explanation_text(name, e)))


# -- test ---------------------------------------------------------------------------------------------


def _percent(x: float) -> str:
    return f"{x:.1%}"


def _tables(report: Report) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """(header, rows) of the per-state table and of the confusion matrix."""
    per = [["state", "screens", "correct", "accuracy"]]
    for label, (ok, n) in report.per_state().items():
        shown = f"{label} (ready)" if label in report.ready else label
        per.append([shown, str(n), str(ok), _percent(ok / n)])
    groups = report.per_group()
    if groups:
        per.append(["", "", "", ""])
        per.append(["rendering", "screens", "correct", "accuracy"])
        for group, (ok, n, false_ready) in groups.items():
            per.append([group + (f" ({false_ready} FALSE READY)" if false_ready else ""), str(n), str(ok),
                        _percent(ok / n)])
    columns = report.columns()
    confusion = report.confusion()
    matrix = [["labelled \\ recognised", *columns]]
    for label in report.labels():
        matrix.append([label, *(str(confusion[label][c]) if confusion[label][c] else "." for c in columns)])
    return per[0], per[1:], matrix[0], matrix[1:]


def _plain(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = [f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths)]
    return ["  ".join(f.format(c) for f, c in zip(fmt, row, strict=True)).rstrip() for row in [header, *rows]]


def _report_text(report: Report, source: str) -> None:
    per_head, per_rows, conf_head, conf_rows = _tables(report)
    times = sorted(report.times_ms())
    summary = [f"false ready: {len(report.false_ready)}",
               f"accuracy: {_percent(report.accuracy)} ({report.correct} of {report.total}); classify median "
               f"{times[len(times) // 2]:.1f} ms, max {times[-1]:.1f} ms per screenshot"]
    wrong = [("FALSE READY " if o.false_ready else "") + o.describe() for o in report.wrong]
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        console = Console()
        for title, head, rows in ((f"{report.total} screenshots from {source}", per_head, per_rows),
                                  ("confusion (rows: labelled, columns: recognised)", conf_head, conf_rows)):
            table = Table(title=title)
            for i, name in enumerate(head):
                table.add_column(name, justify="left" if i == 0 else "right")
            for row in rows:
                table.add_row(*row)
            console.print(table)
        for line in summary:
            console.print(line, highlight=False)
        for line in wrong:
            console.print(f"  {line}", highlight=False, markup=False, soft_wrap=True)
        return
    click.echo(f"{report.total} screenshots from {source}")
    click.echo("\n".join(_plain(per_head, per_rows)))
    click.echo("")
    click.echo("confusion (rows: labelled, columns: recognised)")
    click.echo("\n".join(_plain(conf_head, conf_rows)))
    click.echo("")
    click.echo("\n".join(summary))
    if wrong:
        click.echo("not recognised as labelled:")
        click.echo("\n".join(f"  {line}" for line in wrong))


@model.command("test")
@click.argument("model_dir", metavar="MODEL", type=click.Path(exists=True, path_type=Path))
@click.argument("labels", metavar="[LABELS.csv]", required=False,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@opt("--min-accuracy", default=None, type=click.FloatRange(0, 1),
     help="fail below this overall accuracy (a fraction: 0.95)")
@opt("--json", "as_json", is_flag=True, default=False, help="one JSON document for machines")
@opt("--jobs", "-j", default=1, type=click.IntRange(0), show_default=True,
     help="worker processes to classify in (0: one per core); the report is the same")
def model_test(model_dir: Path, labels: Path | None, min_accuracy: float | None, as_json: bool, jobs: int) -> None:
    """Measure MODEL on labelled screenshots: per-state accuracy, the confusion matrix and
    the false ready count (a screen taken for a ready state it is not).

    LABELS.csv has rows image,state (paths relative to the CSV's directory; a header line
    is allowed; 'unknown' labels a screen the model must not recognise). Without it, the
    screenshots saved with the model (MODEL/screens/STATE/N.png) are used. Exits 1 on any
    false ready, and below --min-accuracy."""
    from ..vision import TemplateLibrary
    from ..vision.screens import check_labels, measure, read_labels, saved_screens

    library = TemplateLibrary.load(model_dir)
    if labels is not None:
        items, source = read_labels(labels), str(labels)
    else:
        items, source = saved_screens(model_dir), f"{model_dir}/screens"
        if not items:
            raise ConfigError(f"no screenshots saved with {model_dir} (screens/STATE/N.png): give LABELS.csv, "
                              "or save some with 'deskfleet model add-screen'")
    check_labels(items, library.state_names, source)
    report = measure(model_dir, items, jobs=jobs or os.cpu_count() or 1, library=library)
    if as_json:
        click.echo(json.dumps({"model": str(model_dir), "labels": source, **report.to_dict()}, indent=2))
    else:
        _report_text(report, source)
    failures = []
    if report.false_ready:
        first = report.false_ready[0]
        failures.append(f"{len(report.false_ready)} false ready (screens taken for a ready state they are not), "
                        f"e.g. {first.item.name} labelled {first.item.label!r} recognised as {first.state!r}")
    if min_accuracy is not None and report.accuracy < min_accuracy:
        failures.append(f"accuracy {_percent(report.accuracy)} is below --min-accuracy {_percent(min_accuracy)}")
    if failures:
        raise DeskfleetError("; ".join(failures))
