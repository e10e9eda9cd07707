"""The app model of SimEHR: how to recognise its screens and how to bring it to "home".

Templates are cut from frames the renderer draws, on parts that never change with the
user's data: each screen's colour badge and a button only that screen has; the plain
part of each dialog's coloured title strip and its OK button; the desktop's icons; the
reboot logo. Text is left out on purpose: the classifier compares at fixed positions, and
a 1-px rendering shift moves text edges enough to sink a match, where the inside of a
solid block does not move at all. Playbooks
speak only the :class:`~deskfleet.desktop.Desktop` protocol and click at the centres the
:class:`~deskfleet.sim.app.Layout` gives, so they would drive a real SimEHR the same way.

Every playbook that types or clicks checks that the screen changed; a screen that did not
react at all belongs to a hung app, which no amount of clicking will fix, so the playbook
restarts it. The probe catches the one case the playbooks cannot: a hung app that shows a
perfect "home".
"""

from __future__ import annotations

import asyncio
import functools
import re

import numpy as np

from ..appmodel import AppModel, Playbook, PlaybookContext, Probe, SessionReader
from ..desktop import Desktop, Frame, Region
from ..vision import Classifier, ScreenState, TemplateCheck
from .layout import APP_NAME, Layout, View, inset, layout_for
from .render import Renderer

READY = "home"
REBOOT_WAIT = 600.0  # seconds the "wait" playbook watches a rebooting machine
TOTP_MARGIN = 3.0  # seconds: a code about to roll over is not worth typing

#: state → the playbook that moves the app from it toward "home"
RECOVERIES = {
    "login": "login",
    "mfa": "mfa",
    "patient_form": "go_home",
    "search": "go_home",
    "saved": "dismiss",
    "exported": "dismiss",
    "error_dialog": "dismiss",
    "session_expired": "dismiss",
    "validation": "dismiss",
    "desktop": "restart_app",
    "rebooting": "wait",
}

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


def build_classifier(width: int = 1024, height: int = 768) -> Classifier:
    """Capture every state's templates from the renderer (no drift)."""
    renderer = Renderer(width, height)
    views = _sample_views()
    states = []
    for state, regions in _regions(renderer.layout).items():
        frame = renderer.frame(views[state])
        states.append(
            ScreenState(
                state,
                [TemplateCheck.from_frame(frame, r) for r in regions],
                overlay=state in _DIALOG_BASE,
                ready=state == READY,
            )
        )
    return Classifier(states)


def _unfreezing(playbook: Playbook) -> Playbook:
    """Restart the app if the playbook's input changed nothing on screen (the app hangs)."""

    @functools.wraps(playbook)
    async def run(ctx: PlaybookContext) -> None:
        before = await ctx.desktop.screenshot()
        await playbook(ctx)
        after = await ctx.desktop.screenshot()
        if np.array_equal(before, after):
            await ctx.desktop.restart_app()

    return run


def _playbooks(layout: Layout, classifier: Classifier) -> dict[str, Playbook]:
    def at(screen: str, name: str) -> tuple[int, int]:
        return layout.widget(screen, name).center

    async def fill(desktop: Desktop, screen: str, field: str, text: str) -> None:
        await desktop.click(*at(screen, field))  # no window manager: focus by clicking
        await desktop.press("ctrl", "a")  # replace whatever is there
        await desktop.type_text(text)

    @_unfreezing
    async def login(ctx: PlaybookContext) -> None:
        account = ctx.account
        await fill(ctx.desktop, "login", "username", account.username)
        await fill(ctx.desktop, "login", "password", account.password)
        await ctx.desktop.click(*at("login", "sign_in"))

    @_unfreezing
    async def mfa(ctx: PlaybookContext) -> None:
        code = await ctx.account.totp()  # from the orchestrator: the seed never leaves it
        await fill(ctx.desktop, "mfa", "code", code)
        await ctx.desktop.click(*at("mfa", "verify"))

    @_unfreezing
    async def dismiss(ctx: PlaybookContext) -> None:
        await ctx.desktop.click(*layout.dialog_ok.center)

    @_unfreezing
    async def go_home(ctx: PlaybookContext) -> None:
        button = {"patient_form": "cancel", "search": "back"}.get(ctx.state.state)
        if button is not None:
            await ctx.desktop.click(*at(ctx.state.state, button))

    @_unfreezing
    async def logout(ctx: PlaybookContext) -> None:
        await ctx.desktop.click(*at("home", "sign_out"))

    async def restart_app(ctx: PlaybookContext) -> None:
        await ctx.desktop.restart_app()

    async def wait(ctx: PlaybookContext) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REBOOT_WAIT
        while loop.time() < deadline:
            if classifier.classify(await ctx.desktop.screenshot()).state != "rebooting":
                return
            await asyncio.sleep(0.1)

    return {
        "login": login,
        "mfa": mfa,
        "dismiss": dismiss,
        "go_home": go_home,
        "logout": logout,
        "restart_app": restart_app,
        "wait": wait,
    }


def _probe(layout: Layout) -> Probe:
    button = layout.widget("home", "search")
    away = (layout.width - 16, layout.height - 16)  # empty background on "home"

    async def probe(desktop: Desktop) -> bool:
        """Hover a button and move away: a live app repaints its highlight, a hung one cannot."""
        await desktop.move(*button.center)
        hovered = await desktop.screenshot(button.rect)
        await desktop.move(*away)
        plain = await desktop.screenshot(button.rect)
        return not np.array_equal(hovered, plain)

    return probe


_SIGNED_IN = re.compile(r"Signed in as (\S+)")


def _session_reader(layout: Layout) -> SessionReader:
    label = layout.widget("home", "user").rect

    async def session_reader(desktop: Desktop, frame: Frame) -> str | None:
        match = _SIGNED_IN.search(await desktop.read_text(label))
        return match.group(1) if match else None

    return session_reader


@functools.lru_cache(maxsize=8)
def ehr_model(width: int = 1024, height: int = 768) -> AppModel:
    """SimEHR's app model for a screen size. Built once per size and shared: do not mutate."""
    layout = layout_for(width, height)
    classifier = build_classifier(width, height)
    return AppModel(
        name=APP_NAME,
        classifier=classifier,
        ready_states=frozenset({READY}),
        playbooks=_playbooks(layout, classifier),
        recoveries=dict(RECOVERIES),
        on_unknown="restart_app",
        logout="logout",
        default_account="robot1",
        probe=_probe(layout),
        session_reader=_session_reader(layout),
        meta={"layout": layout, "width": width, "height": height},
    )
