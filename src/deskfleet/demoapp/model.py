"""DemoEHR's app model: how its screens are recognised and how to bring it to "home".

Recognition data is package data (``model/``: ``model.json`` plus template PNGs),
recorded from the real app on a real X display by :mod:`.capture` with the anchors
:func:`anchors` names. Every anchor is an icon — the inner part of it, where its mark
is — because icons do not change with the font: a ±1 px font is a realistic difference
between two machines, and text-bearing templates would sink on it. Screens are told apart
by their icons (header, panel, body); dialogs by their icon and the glyph on their
title strip. "home", the one ready state, is held to 43 anchors spread over the whole
window (no gap between them is wider than 180 px), so that a window of any other app or an unknown dialog lying anywhere over it
hides at least one and the screen is not taken for ready; every other screen has an icon
where dialogs appear, so a dialog the model does not know leaves it unknown. The bare desktop (no app
window) is plain black, which cannot be located, so it is compared in place.

Playbooks speak only the :class:`~deskfleet.desktop.Desktop` protocol and click the
centres :mod:`.layout` gives. Each waits for the screen to move on, never sleeps: a
screen that did not change at all after input belongs to a hung app, which they restart.
The probe catches what pixels cannot: a hung app showing a perfect "home". Playbooks
tell the desktop whom the app is logged in as when they see it change (a login reaching
"home", a screen that means nobody is), so that heartbeats carry the session without an
OCR read each (:func:`~deskfleet.desktop.note_session`).
"""

from __future__ import annotations

import asyncio
import functools
import importlib.resources
import re

import numpy as np

from ..agent.preflight import NO_SCREEN
from ..appmodel import AppModel, Playbook, PlaybookContext
from ..desktop import Desktop, Frame, Region, note_session
from ..errors import DesktopError
from ..vision import UNKNOWN, Classifier
from ..vision.templates import Anchor, TemplateLibrary
from . import layout as L

READY = "home"
DIALOG_STATES = ("error_dialog", "session_expired", "validation", "saved", "updated")
TOTP_MARGIN = 3.0  # seconds: a code about to roll over is not worth typing
SCREEN_WAIT = 8.0  # seconds for the app to show the next screen after an input
PROBE_BOUND = 1.5  # seconds a live app takes at most to repaint a hovered button
PARK = (1014, 730)  # an empty spot of every screen, where the pointer rests

#: state → the playbook that moves the app from it toward "home"
RECOVERIES = {
    "login": "login", "mfa": "mfa",
    "search": "go_home", "patient_form": "go_home", "edit_form": "go_home",
    **{kind: "dismiss" for kind in DIALOG_STATES},
    "desktop": "restart_app",
    NO_SCREEN: "restart_desktop",  # the screen cannot even be captured: the display server is gone
}
#: screens that mean nobody is logged in
SIGNED_OUT = frozenset({"login", "mfa", "session_expired", "desktop"})


def inner(r: Region, frac: float = 0.15) -> Region:
    """The middle of an icon, where its mark is: edges and background stay out."""
    dx, dy = round(r.width * frac), round(r.height * frac)
    return Region(r.left + dx, r.top + dy, r.width - 2 * dx, r.height - 2 * dy)


def anchors() -> dict[str, list[Anchor]]:
    """What :mod:`.capture` records for each state (state → anchors)."""
    chrome = [Anchor("logo", inner(L.LOGO))]
    chrome += [Anchor(f"header{i}", inner(r)) for i, r in enumerate(L.HEADER_ICONS)]
    chrome += [Anchor(f"footer{i}", r) for i, r in enumerate(L.FOOTER_ICONS)]
    screen = [Anchor("screen_icon", inner(L.SCREEN_ICON))]
    out = {
        "login": [*chrome, *screen, Anchor("panel_icon", inner(L.PANEL_ICON)),
                  Anchor("user_icon", L.USERNAME_ICON), Anchor("lock_icon", L.PASSWORD_ICON)],
        "mfa": [*chrome, *screen, Anchor("panel_icon", inner(L.PANEL_ICON)), Anchor("code_icon", L.CODE_ICON)],
        "home": [*chrome, *screen,
                 *(Anchor(f"sidebar{i}", inner(r)) for i, r in enumerate(L.SIDEBAR_ITEMS)),
                 *(Anchor(f"card{i}", inner(L.card_icon(c))) for i, c in enumerate(L.CARDS)),
                 *(Anchor(f"status{i}", L.card_status(c)) for i, c in enumerate(L.CARDS))],
        "search": [*chrome, *screen, Anchor("body_icon", inner(L.BODY_ICON)), Anchor("results_mark", L.RESULTS_MARK)],
        "patient_form": [*chrome, *screen, Anchor("body_icon", inner(L.BODY_ICON)), Anchor("hint_icon", L.FORM_HINT_ICON)],
        "edit_form": [*chrome, *screen, Anchor("body_icon", inner(L.BODY_ICON)), Anchor("hint_icon", L.FORM_HINT_ICON)],
        "desktop": [Anchor("top", Region(0, 0, 200, 56), kind="pixels"),
                    Anchor("middle", Region(412, 334, 200, 100), kind="pixels"),
                    Anchor("bottom", Region(824, 712, 200, 56), kind="pixels")],
    }
    for kind in DIALOG_STATES:
        out[kind] = [Anchor("icon", inner(L.DIALOG_ICON, 0.12)), Anchor("glyph", L.DIALOG_GLYPH)]
    return out


def load_library() -> TemplateLibrary:
    """The recorded templates shipped with the package."""
    return TemplateLibrary.load(importlib.resources.files(__package__) / "model")


# -- playbooks --------------------------------------------------------------------------------


async def _moved_on(desktop: Desktop, classifier: Classifier, before: Frame, from_state: str,
                    timeout: float = SCREEN_WAIT) -> str:
    """Wait until the screen shows a known state other than ``from_state``; return it.

    If nothing on the screen changed since ``before`` (taken before the input), the app
    is hung: restart it. If it changed but stayed in ``from_state``, the input was refused.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        frame = await desktop.screenshot()
        state = classifier.classify(frame).state
        if state not in (from_state, UNKNOWN):
            return state
        if loop.time() >= deadline:
            break
        await asyncio.sleep(0.05)
    if np.array_equal(frame, before):
        await desktop.restart_app()
        return "restarted"
    if state == from_state:
        raise DesktopError(f"the app stayed at {from_state!r} after the input")
    return state


async def _fill(desktop: Desktop, field: Region, text: str) -> None:
    await desktop.click(*field.center)  # no window manager: focus goes where you click
    await desktop.press("ctrl", "a")  # replace whatever is there
    await desktop.type_text(text)


def _playbooks(classifier: Classifier) -> dict[str, Playbook]:
    def waits(playbook: Playbook, *, signs_in: bool = False) -> Playbook:
        @functools.wraps(playbook)
        async def run(ctx: PlaybookContext) -> None:
            before = await ctx.desktop.screenshot()
            await playbook(ctx)
            now = await _moved_on(ctx.desktop, classifier, before, ctx.state.state)
            if now in SIGNED_OUT:
                note_session(ctx.desktop, None)
            elif signs_in and now == READY:
                note_session(ctx.desktop, ctx.account.username)

        return run

    def signs_in(playbook: Playbook) -> Playbook:
        return waits(playbook, signs_in=True)

    @signs_in
    async def login(ctx: PlaybookContext) -> None:
        account = ctx.account
        await _fill(ctx.desktop, L.USERNAME, account.username)
        await _fill(ctx.desktop, L.PASSWORD, account.password)
        await ctx.desktop.click(*L.SIGN_IN.center)

    @signs_in
    async def mfa(ctx: PlaybookContext) -> None:
        code = await ctx.account.totp()  # from the orchestrator: the seed never leaves it
        await _fill(ctx.desktop, L.CODE, code)
        await ctx.desktop.click(*L.VERIFY.center)

    @waits
    async def dismiss(ctx: PlaybookContext) -> None:
        await ctx.desktop.click(*L.DIALOG_OK.center)

    @waits
    async def go_home(ctx: PlaybookContext) -> None:
        button = L.SEARCH_BACK if ctx.state.state == "search" else L.FORM_CANCEL
        await ctx.desktop.click(*button.center)

    @waits
    async def logout(ctx: PlaybookContext) -> None:
        await ctx.desktop.click(*L.SIGN_OUT.center)

    async def restart_app(ctx: PlaybookContext) -> None:
        try:
            await ctx.desktop.restart_app()
        except DesktopError:
            await ctx.desktop.reboot()  # the app does not come up: the machine is sick

    async def restart_desktop(ctx: PlaybookContext) -> None:
        await ctx.desktop.reboot()

    async def recover_unknown(ctx: PlaybookContext) -> None:
        """A screen caught mid-repaint settles by itself; one that stays unknown needs a restart."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.5
        while loop.time() < deadline:
            await asyncio.sleep(0.1)
            if classifier.classify(await ctx.desktop.screenshot()).state != UNKNOWN:
                return
        await restart_app(ctx)

    return {"login": login, "mfa": mfa, "dismiss": dismiss, "go_home": go_home, "logout": logout,
            "restart_app": restart_app, "restart_desktop": restart_desktop, "recover_unknown": recover_unknown}


async def probe(desktop: Desktop) -> bool:
    """Hover a button: a live app repaints its highlight within the bound, a hung one never."""
    button = inner(L.SEARCH_NAV, 0.1)
    await desktop.move(*PARK)
    plain = await desktop.screenshot(button)
    for _ in range(5):  # let a highlight from an earlier hover fade first
        await asyncio.sleep(0.03)
        again = await desktop.screenshot(button)
        if np.array_equal(again, plain):
            break
        plain = again
    await desktop.move(*L.SEARCH_NAV.center)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PROBE_BOUND
    try:
        while loop.time() < deadline:
            if not np.array_equal(await desktop.screenshot(button), plain):
                return True
            await asyncio.sleep(0.02)
        return False
    finally:
        await desktop.move(*PARK)


_SIGNED_IN = re.compile(r"Signed in as (\S+)", re.IGNORECASE)


async def session_reader(desktop: Desktop, frame: Frame) -> str | None:
    """The account "home" says it is signed in as (OCR of one label); noted on the desktop."""
    match = _SIGNED_IN.search(await desktop.read_text(L.USER_LABEL))
    if match is None:
        return None
    note_session(desktop, match.group(1))
    return match.group(1)


@functools.lru_cache(maxsize=1)
def demoapp_model() -> AppModel:
    """DemoEHR's app model, from the shipped templates. Built once and shared: do not mutate."""
    classifier = load_library().classifier()
    return AppModel(
        name=L.APP_NAME,
        classifier=classifier,
        ready_states=frozenset({READY}),
        playbooks=_playbooks(classifier),
        recoveries=dict(RECOVERIES),
        on_unknown="recover_unknown",
        on_unresponsive="restart_app",
        logout="logout",
        default_account="robot1",
        probe=probe,
        session_reader=session_reader,
        meta={"width": L.WIDTH, "height": L.HEIGHT},
    )
