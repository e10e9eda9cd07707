"""Recording DemoEHR's templates from the real app: ``python -m deskfleet.demoapp.capture [DIR]``.

:func:`tour` starts DemoEHR on a fresh Xvfb display and walks it through every screen
and dialog with mouse and keyboard, yielding each settled screenshot with the name of the
state it shows — without any model, since it is what a model is made from. :func:`main`
records the anchors of :func:`~deskfleet.demoapp.model.anchors` from those screenshots
into a model directory (by default the one shipped in the package). The recognition tests
take the same tour, with fonts a pixel larger or smaller, to measure the shipped model on
fresh screenshots.

Run it again whenever DemoEHR's look changes, and review the PNGs it writes.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import numpy as np
import pyotp

from deskfleet import DesktopError, Frame, Region
from deskfleet.desktop import AppCommand, RealDesktop, xvfb_desktop
from deskfleet.vision import TemplateLibrary
from deskfleet.vision.screens import save_screen

from . import layout as L
from .model import DIALOG_STATES, PARK, anchors
from .records import credentials

SETTLE_TIMEOUT = 8.0
STEADY = 0.3  # seconds a screen must stay unchanged to count as settled


def app_command(data: Path, *args: str, log: Path | None = None) -> AppCommand:
    return AppCommand([sys.executable, "-m", "deskfleet.demoapp", "--data", str(data), *args], log=log)


async def settle(desktop: RealDesktop, before: Frame | None = None) -> Frame:
    """The next steady screen: changed from ``before`` (if given), then unchanged for
    :data:`STEADY` seconds — long enough that a repaint the app was descheduled in the
    middle of (a loaded machine) is not taken for a finished screen."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    last = await desktop.screenshot()
    since = time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        frame = await desktop.screenshot()
        if not np.array_equal(frame, last) or (before is not None and np.array_equal(frame, before)):
            last, since = frame, time.monotonic()
        elif time.monotonic() - since >= STEADY:
            return frame
    raise DesktopError("the screen did not settle (or did not change) in time")


async def _act(desktop: RealDesktop, *, click: Region | None = None, fill: Sequence[tuple[Region, str]] = (),
               then: Region | None = None) -> Frame:
    before = await desktop.screenshot()
    for field, text in fill:
        await desktop.click(*field.center)
        await desktop.press("ctrl", "a")
        await desktop.type_text(text)
    for target in (click, then):
        if target is not None:
            await desktop.click(*target.center)
    await desktop.move(*PARK)
    return await settle(desktop, before)


async def tour(workdir: Path, *, font_delta: int = 0, width: int = L.WIDTH,
               height: int = L.HEIGHT) -> AsyncIterator[tuple[str, Frame]]:
    """Every screen of DemoEHR once, as (state, screenshot); ``unknown`` for a dialog the model lacks."""
    data = workdir / f"tour{font_delta}.db"
    cred = credentials(0)["robot1"]
    common = ["--seed", "0", "--font-delta", str(font_delta)]
    desktop = await xvfb_desktop(
        "tour", app_command(data, *common, "--mfa", "--error-at", "open_form"), width=width, height=height)
    try:
        yield "login", await settle(desktop)
        yield "mfa", await _act(desktop, fill=[(L.USERNAME, cred.username), (L.PASSWORD, cred.password)],
                                click=L.SIGN_IN)
        totp = pyotp.TOTP(cred.totp_seed or "")
        if totp.interval - time.time() % totp.interval < 3:
            await asyncio.sleep(3.1)
        yield "home", await _act(desktop, fill=[(L.CODE, totp.now())], click=L.VERIFY)
        yield "error_dialog", await _act(desktop, click=L.NEW_PATIENT)  # --error-at open_form
        await _act(desktop, click=L.DIALOG_OK)
        yield "patient_form", await _act(desktop, click=L.NEW_PATIENT)
        yield "validation", await _act(desktop, click=L.FORM_SAVE)
        await _act(desktop, click=L.DIALOG_OK)
        yield "saved", await _act(desktop, fill=[(L.FORM_MRN, "TOUR-1"), (L.FORM_NAME, "Ada Lovelace"),
                                                 (L.FORM_DOB, "1815-12-10")], click=L.FORM_SAVE)
        yield "home", await _act(desktop, click=L.DIALOG_OK)
        await _act(desktop, click=L.SEARCH_NAV)
        yield "search", await _act(desktop, fill=[(L.SEARCH_MRN, "TOUR-1")], click=L.SEARCH_GO)
        yield "edit_form", await _act(desktop, click=L.SEARCH_EDIT)
        yield "updated", await _act(desktop, fill=[(L.FORM_NAME, "Augusta Ada King")], click=L.FORM_SAVE)
        yield "home", await _act(desktop, click=L.DIALOG_OK)
        for kind, state in (("session_expired", "session_expired"), ("notice", "unknown")):
            desktop.app = app_command(data, *common, "--show-dialog", kind)
            await desktop.restart_app()
            await desktop.move(*PARK)
            yield state, await settle(desktop)
        before = await desktop.screenshot()
        desktop.app = app_command(data, *common)
        await desktop.stop_app()  # the bare desktop: no app window at all
        yield "desktop", await settle(desktop, before)
    finally:
        await desktop.close()


async def record(out: Path) -> Path:
    """Take the tour and record every state's anchors into ``out``, keeping every screen of
    the tour as a labelled screenshot of the model (``deskfleet model test`` runs on them)."""
    library = TemplateLibrary(L.APP_NAME, (L.WIDTH, L.HEIGHT))
    wanted = anchors()
    seen: set[str] = set()
    screens: list[tuple[str, Frame]] = []
    with tempfile.TemporaryDirectory() as tmp:
        async for state, frame in tour(Path(tmp)):
            screens.append((state, frame))
            if state in wanted and state not in seen:
                library.record(frame, state, wanted[state], overlay=state in DIALOG_STATES, ready=state == "home")
                seen.add(state)
    missing = set(wanted) - seen
    if missing:
        raise DesktopError(f"the tour never showed {', '.join(sorted(missing))}")
    if (out / "screens").exists():
        shutil.rmtree(out / "screens")
    path = library.save(out)
    for state, frame in screens:
        save_screen(out, state, frame)
    return path


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0]) if args else Path(__file__).with_name("model")
    print(f"recorded {asyncio.run(record(out))}")


if __name__ == "__main__":
    main()
