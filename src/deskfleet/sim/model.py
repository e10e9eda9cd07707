"""SimEHR's app model: its playbooks, probe and session reader, and how its model directory
is recorded — SimEHR is a pack (``pack.toml`` beside this module), loaded like any other.

Templates (``model/``, recorded by :mod:`.capture` from frames the renderer draws) cover
parts that never change with the user's data: each screen's colour badge and a button only
that screen has; the plain part of each dialog's coloured title strip and its OK button; the
desktop's icons; the reboot logo. Text is left out on purpose: they are compared at fixed
positions, and a 1-px rendering shift moves text edges enough to sink a match, where the
inside of a solid block does not move at all. Playbooks speak only the public desktop API
and click at the centres the :class:`~deskfleet.sim.layout.Layout` gives, so they would
drive a real SimEHR the same way.

Every playbook that types or clicks checks that the screen changed; a screen that did not
react at all belongs to a hung app, which no amount of clicking will fix, so the playbook
restarts it. The probe catches the one case the playbooks cannot: a hung app that shows a
perfect "home".
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Awaitable, Callable

import numpy as np

from deskfleet import (
    AppModel,
    Desktop,
    Frame,
    PlaybookContext,
    ProbeResult,
    Region,
    playbook,
    probe,
    session_reader,
)
from deskfleet.vision import Classifier, ScreenState, TemplateCheck
from deskfleet.vision.redact import Redaction, RedactRegion

from .layout import Layout, View, inset, layout_for
from .render import Renderer

READY = "home"
REBOOT_WAIT = 600.0  # seconds the "wait_reboot" playbook watches a rebooting machine
THRESHOLD = 0.92  # a template's pass mark: a desktop's 1-px drift and colour quirks stay above it

# state → (its screen, the widgets whose insides become templates)
_BASE = {
    "login": ("login", ("badge", "sign_in")),
    "mfa": ("mfa", ("badge", "verify")),
    "home": ("home", ("badge", "new_patient", "sign_out")),
    "patient_form": ("patient_form", ("badge", "save")),
    "search": ("search", ("badge", "search")),
}
# dialog → the screen it is captured over (its templates lie on the dialog itself)
_DIALOG_BASE = {
    "saved": "patient_form",
    "exported": "search",
    "error_dialog": "home",
    "session_expired": "login",
    "validation": "patient_form",
}


def _sample_views() -> dict[str, View]:
    """One canonical view per state, for capturing templates."""
    views = {state: View(screen) for state, (screen, _) in _BASE.items()}
    views.update({kind: View(base, dialogs=((kind, ""),)) for kind, base in _DIALOG_BASE.items()})
    views["desktop"] = View("desktop")
    views["rebooting"] = View("rebooting")
    return views


def _regions(layout: Layout) -> dict[str, list[Region]]:
    # Insets keep outlines out of the templates: a 1-px shift moves an outline, and hover
    # recolours a button's.
    out = {
        state: [inset(layout.widget(screen, name).rect, 6 if name == "badge" else 3)
                for name in names]
        for state, (screen, names) in _BASE.items()
    }
    strip = layout.dialog_title  # its right part, past the title text: the kind's colour
    plain = Region(strip.left + strip.width - 150, strip.top + 4, 140, strip.height - 8)
    for kind in _DIALOG_BASE:
        out[kind] = [plain, inset(layout.dialog_ok.rect, 3)]
    glyphs = [Region(i.rect.left + i.rect.width // 2 - 18, i.rect.top + 12, 36, 36)
              for i in layout.icons]
    corner = Region(layout.width - 160, layout.height - 160, 100, 100)
    out["desktop"] = [glyphs[1], glyphs[2], corner]
    logo, half = layout.reboot_logo, layout.reboot_logo.width // 2
    squares = [Region(logo.left + i * half + 6, logo.top + 6, half - 12, half - 12) for i in (0, 1)]
    out["rebooting"] = [*squares, corner]
    return out


#: what SimEHR's screenshots must not show (patient data), by screen: blacked out by the
#: agent before an upload (model.json's "redact", which is this at 1024x768)
_PRIVATE = {
    "patient_form": ("mrn", "name", "dob"),
    "search": ("mrn", "results"),
}


def redaction(layout: Layout) -> Redaction:
    """The regions SimEHR's model redacts, placed for ``layout``'s screen size."""
    return Redaction(states={
        state: tuple(RedactRegion("patient_name" if name == "name" else name, layout.widget(state, name).rect)
                     for name in names)
        for state, names in _PRIVATE.items()})


def build_classifier(width: int = 1024, height: int = 768) -> Classifier:
    """Every state's templates cut from the renderer for a screen size (no drift): the
    recorded model directory is this at 1024x768; other sizes are for tests of the renderer."""
    renderer = Renderer(width, height)
    views = _sample_views()
    states = []
    for state, regions in _regions(renderer.layout).items():
        frame = renderer.frame(views[state])
        states.append(ScreenState(state, [TemplateCheck.from_frame(frame, r, THRESHOLD) for r in regions],
                                  overlay=state in _DIALOG_BASE, ready=state == READY))
    return Classifier(states, redaction=redaction(renderer.layout))


# -- playbooks ------------------------------------------------------------------------------


def _layout(desktop: Desktop) -> Layout:
    """The layout of the screen this desktop draws (a SimDesktop knows its own)."""
    found = getattr(desktop, "layout", None)
    return found if isinstance(found, Layout) else layout_for()


def _at(desktop: Desktop, screen: str, name: str) -> tuple[int, int]:
    return _layout(desktop).widget(screen, name).center


def _unfreezing(fn: Callable[[PlaybookContext], Awaitable[None]]) -> Callable[[PlaybookContext], Awaitable[None]]:
    """Restart the app if the playbook's input changed nothing on screen (the app hangs)."""

    @functools.wraps(fn)
    async def run(ctx: PlaybookContext) -> None:
        before = await ctx.desktop.screenshot()
        await fn(ctx)
        after = await ctx.desktop.screenshot()
        if np.array_equal(before, after):
            await ctx.desktop.restart_app()

    return run


async def _fill(desktop: Desktop, screen: str, field: str, text: str) -> None:
    await desktop.click(*_at(desktop, screen, field))  # no window manager: focus by clicking
    await desktop.press("ctrl", "a")  # replace whatever is there
    await desktop.type_text(text)


@playbook(signs_in=True, wait=False)
@_unfreezing
async def login(ctx: PlaybookContext) -> None:
    account = ctx.account
    await _fill(ctx.desktop, "login", "username", account.username)
    await _fill(ctx.desktop, "login", "password", account.password)
    await ctx.desktop.click(*_at(ctx.desktop, "login", "sign_in"))


@playbook(signs_in=True, wait=False)
@_unfreezing
async def mfa(ctx: PlaybookContext) -> None:
    code = await ctx.account.totp()  # from the orchestrator: the seed never leaves it
    await _fill(ctx.desktop, "mfa", "code", code)
    await ctx.desktop.click(*_at(ctx.desktop, "mfa", "verify"))


@playbook(wait=False)
@_unfreezing
async def dismiss(ctx: PlaybookContext) -> None:
    await ctx.desktop.click(*_layout(ctx.desktop).dialog_ok.center)


@playbook(wait=False)
@_unfreezing
async def go_home(ctx: PlaybookContext) -> None:
    button = {"patient_form": "cancel", "search": "back"}.get(ctx.state.state)
    if button is not None:
        await ctx.desktop.click(*_at(ctx.desktop, ctx.state.state, button))


@playbook(wait=False)
@_unfreezing
async def logout(ctx: PlaybookContext) -> None:
    await ctx.desktop.click(*_at(ctx.desktop, "home", "sign_out"))


@playbook(name="restart_app", wait=False)
async def restart(ctx: PlaybookContext) -> None:
    await ctx.desktop.restart_app()


@playbook(wait=False)
async def wait_reboot(ctx: PlaybookContext) -> None:
    """A rebooting machine shows its logo until it is back: watch, do nothing."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + REBOOT_WAIT
    while loop.time() < deadline:
        if (await ctx.look()).state != "rebooting":
            return
        await asyncio.sleep(0.1)


@playbook(wait=False)
async def keepalive(ctx: PlaybookContext) -> None:
    """Session upkeep on an idle machine: a click on empty background of "home"."""
    layout = _layout(ctx.desktop)
    await ctx.desktop.click(layout.width - 16, layout.height - 16)


@probe
async def responsive(desktop: Desktop) -> ProbeResult:
    """Hover a button and move away: a live app repaints its highlight, a hung one cannot."""
    layout = _layout(desktop)
    button = layout.widget("home", "search")
    await desktop.move(*button.center)
    hovered = await desktop.screenshot(button.rect)
    await desktop.move(layout.width - 16, layout.height - 16)  # empty background on "home"
    plain = await desktop.screenshot(button.rect)
    if np.array_equal(hovered, plain):
        return ProbeResult(False, "the Search button did not highlight on hover: the application does not repaint")
    return ProbeResult(True)


_SIGNED_IN = re.compile(r"Signed in as (\S+)")


@session_reader
async def signed_in_as(desktop: Desktop, frame: Frame) -> str | None:
    match = _SIGNED_IN.search(await desktop.read_text(_layout(desktop).widget("home", "user").rect))
    return match.group(1) if match else None


@functools.lru_cache(maxsize=8)
def ehr_model(width: int = 1024, height: int = 768) -> AppModel:
    """SimEHR's app model, as the ``simehr`` pack loads it (other screen sizes: its classifier
    cut from the renderer at that size). Built once per size and shared: do not mutate."""
    from deskfleet import load_pack

    model = load_pack("simehr").model
    if (width, height) == (1024, 768):
        return model
    return AppModel(**{**{f: getattr(model, f) for f in model.__dataclass_fields__},
                       "classifier": build_classifier(width, height),
                       "meta": {**model.meta, "screen": [width, height]}})
