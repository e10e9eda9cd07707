"""DemoEHR's app model: how its screens are recognised and how to bring it to "home".

DemoEHR is a pack like any other (``pack.toml`` beside this module): its recognition data is
the model directory ``model/`` (``model.json`` plus template PNGs), recorded from the real app
on a real X display by :mod:`.capture` with the anchors :func:`anchors` names; this module
holds its playbooks, probe and session reader, written against deskfleet's public API only.

Every anchor is an icon — the inner part of it, where its mark is — because icons do not
change with the font: a ±1 px font is a realistic difference between two machines, and
text-bearing templates would sink on it. Screens are told apart by their icons (header,
panel, body); dialogs by their icon and the glyph on their title strip. "home", the one
ready state, is held to 43 anchors spread over the whole window (no gap between them is
wider than 180 px), so that a window of any other app or an unknown dialog lying anywhere
over it hides at least one and the screen is not taken for ready; every other screen has an
icon where dialogs appear, so a dialog the model does not know leaves it unknown. The bare
desktop (no app window) is plain black, which cannot be located, so it is compared in place.

Playbooks click the centres :mod:`.layout` gives; ``@playbook`` waits for the screen to move
on after their input (and restarts an app that did not react at all). Which screens mean
"signed out" and which playbook answers which screen is in ``pack.toml``. The probe catches
what pixels cannot: a hung app showing a perfect "home".
"""

from __future__ import annotations

import functools
import importlib.resources
import re

from deskfleet import (
    AppModel,
    Desktop,
    Frame,
    Pack,
    PlaybookContext,
    ProbeResult,
    Region,
    hover_responds,
    load_pack,
    playbook,
    probe,
    session_reader,
)
from deskfleet.vision import Anchor, TemplateLibrary

from . import layout as L

READY = "home"
DIALOG_STATES = ("error_dialog", "session_expired", "validation", "saved", "updated")
PROBE_BOUND = 1.5  # seconds a live app takes at most to repaint a hovered button
PARK = (1014, 730)  # an empty spot of every screen, where the pointer rests


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


@playbook(signs_in=True)
async def login(ctx: PlaybookContext) -> None:
    account = ctx.account
    await ctx.fill(L.USERNAME, account.username, label="username")  # typed, then read back
    await ctx.fill(L.PASSWORD, account.password, label="password", secret=True)  # dots: checked by pixels
    await ctx.desktop.click(*L.SIGN_IN.center)


@playbook(signs_in=True)
async def mfa(ctx: PlaybookContext) -> None:
    code = await ctx.account.totp()  # from the orchestrator: the seed never leaves it
    await ctx.fill(L.CODE, code, label="verification code")
    await ctx.desktop.click(*L.VERIFY.center)


@playbook
async def dismiss(ctx: PlaybookContext) -> None:
    await ctx.desktop.click(*L.DIALOG_OK.center)


@playbook
async def go_home(ctx: PlaybookContext) -> None:
    button = L.SEARCH_BACK if ctx.state.state == "search" else L.FORM_CANCEL
    await ctx.desktop.click(*button.center)


@playbook
async def logout(ctx: PlaybookContext) -> None:
    await ctx.desktop.click(*L.SIGN_OUT.center)


@playbook(wait=False)
async def keepalive(ctx: PlaybookContext) -> None:
    """Session upkeep on an idle machine: a click on an empty spot of "home" is input to
    DemoEHR (its idle clock restarts) and changes nothing."""
    await ctx.desktop.click(*PARK)


@probe
async def responsive(desktop: Desktop) -> ProbeResult:
    """Hover a button: a live app repaints its highlight within the bound, a hung one never."""
    return await hover_responds(desktop, inner(L.SEARCH_NAV, 0.1), park=PARK, within=PROBE_BOUND,
                                what="the Search button")


_SIGNED_IN = re.compile(r"Signed in as (\S+)", re.IGNORECASE)


@session_reader
async def signed_in_as(desktop: Desktop, frame: Frame) -> str | None:
    """The account "home" says it is signed in as (OCR of one label)."""
    match = _SIGNED_IN.search(await desktop.read_text(L.USER_LABEL))
    return match.group(1) if match else None


def demoapp_model() -> AppModel:
    """DemoEHR's app model, as the ``demoehr`` pack loads it (once per process; do not mutate)."""
    return _pack().model


@functools.lru_cache(maxsize=1)
def _pack() -> Pack:
    return load_pack("demoehr")
