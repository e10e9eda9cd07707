"""Recording the scaffold's model: ``python -m deskfleet.packs.template_model [DIR]``.

``deskfleet pack new`` ships a recorded model of the scaffold's example app, with the
labelled screenshots ``deskfleet model test`` measures it on. This script makes it the way
an author would, through the same code as ``deskfleet model capture`` and ``model
add-screen`` (each change checked against every screenshot saved before it): it renders the
scaffold, starts its app on a fresh Xvfb display, walks it through every screen with mouse
and keyboard — without any model, since it is what the model is made from — and records
each state's icons, then saves more looks of the states (a list with other rows, a filled
form) and screens the model must not recognise (a dialog it does not know, over the ready
screen and the login; the bare display).

Every anchor is an icon (its inner part, where its mark is), so the model matches on any
machine whatever its fonts. Positions come from the app itself (``app.py``'s constants).
Run it again whenever ``template/app.py.tmpl`` changes, and review the PNGs it writes.
"""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import numpy as np

from ..desktop import Frame, Region
from ..desktop.driver import AppCommand, RealDesktop
from ..desktop.xvfb import xvfb_desktop
from ..errors import DesktopError
from ..vision import authoring
from ..vision.templates import Anchor
from .scaffold import render, template

SETTLE_TIMEOUT = 8.0
STEADY = 0.3  # seconds a screen must stay unchanged to count as settled
OVERLAYS = ("saved", "invalid")


def inner(box: tuple[int, int, int, int], frac: float = 0.15) -> Region:
    """The middle of an icon, where its mark is: its edges and background stay out."""
    left, top, width, height = box
    dx, dy = round(width * frac), round(height * frac)
    return Region(left + dx, top + dy, width - 2 * dx, height - 2 * dy)


def anchors(app: ModuleType) -> dict[str, list[Anchor]]:
    """State → the icons that recognise it, at the positions ``app`` draws them."""
    chrome = [Anchor("logo", inner(app.LOGO)), Anchor("screen_icon", inner(app.SCREEN_ICON))]
    chrome += [Anchor(f"header{i}", inner(box)) for i, box in enumerate(app.HEADER_MARKS)]
    chrome += [Anchor(f"footer{i}", Region(*box)) for i, box in enumerate(app.FOOTER_ICONS)]
    dialog = [Anchor("icon", inner(app.DIALOG_ICON, 0.12)), Anchor("glyph", Region(*app.DIALOG_GLYPH))]
    return {
        "login": [*chrome, Anchor("panel_icon", inner(app.PANEL_ICON)), Anchor("user_icon", Region(*app.USER_ICON)),
                  Anchor("lock_icon", Region(*app.LOCK_ICON))],
        "items": [*chrome, Anchor("list_icon", Region(*app.LIST_ICON)),
                  *(Anchor(f"summary{i}", inner(box)) for i, box in enumerate(app.SUMMARY_ICONS))],
        "new_item": [*chrome, Anchor("body_icon", inner(app.BODY_ICON)), Anchor("hint_icon", Region(*app.HINT_ICON))],
        "saved": dialog,
        "invalid": dialog,
    }


def _center(box: tuple[int, int, int, int]) -> tuple[int, int]:
    return box[0] + box[2] // 2, box[1] + box[3] // 2


class Tour:
    """The example app on an Xvfb display, driven screen by screen."""

    def __init__(self, desktop: RealDesktop, app: ModuleType) -> None:
        self.desktop, self.app = desktop, app
        self.park = (790, 50)

    async def settle(self, before: Frame | None = None) -> Frame:
        """The next steady screen: changed from ``before`` (if given), then unchanged for STEADY s."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        last = await self.desktop.screenshot()
        since = time.monotonic()
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            frame = await self.desktop.screenshot()
            if not np.array_equal(frame, last) or (before is not None and np.array_equal(frame, before)):
                last, since = frame, time.monotonic()
            elif time.monotonic() - since >= STEADY:
                return frame
        raise DesktopError("the screen did not settle (or did not change) in time")

    async def act(self, *, fill: tuple[tuple[tuple[int, int, int, int], str], ...] = (),
                  click: tuple[int, int, int, int] | None = None, key: str | None = None) -> Frame:
        before = await self.desktop.screenshot()
        for box, text in fill:
            await self.desktop.click(*_center(box))
            await self.desktop.press("ctrl", "a")
            await self.desktop.type_text(text)
        if click is not None:
            await self.desktop.click(*_center(click))
        if key is not None:
            await self.desktop.press(key)
        await self.desktop.move(*self.park)
        return await self.settle(before)

    async def add_item(self, name: str, quantity: int) -> None:
        a = self.app
        await self.act(click=a.NEW_ITEM)
        await self.act(fill=((a.NAME_FIELD, name), (a.QUANTITY_FIELD, str(quantity))), click=a.SAVE)
        await self.act(click=a.DIALOG_OK)


async def record(out: Path) -> Path:
    """Take the tour, recording the model into ``out`` (which must not hold a model yet)."""
    with tempfile.TemporaryDirectory() as tmp:
        pack = Path(tmp) / "pack"
        render("example", pack)
        app = _import(pack / "app.py")
        wanted = anchors(app)
        command = AppCommand([sys.executable, str(pack / "app.py"), "--data", str(Path(tmp) / "items.db")])
        desktop = await xvfb_desktop("template", command, width=app.WIDTH, height=app.HEIGHT)
        try:
            await _tour(Tour(desktop, app), out, wanted)
        finally:
            await desktop.close()
    return out


async def _tour(t: Tour, out: Path, wanted: dict[str, list[Anchor]]) -> None:
    a = t.app

    def capture(state: str, frame: Frame) -> None:
        authoring.capture(out, frame, state, wanted[state], overlay=state in OVERLAYS, ready=state == "items",
                          name="inventory")

    def look(state: str, frame: Frame) -> None:
        authoring.add_screen(out, frame, state)

    await t.desktop.move(*t.park)
    capture("login", await t.settle())
    look("login", await t.act(fill=((a.USERNAME, "demo"), (a.PASSWORD, "wrong")), click=a.SIGN_IN))
    capture("items", await t.act(fill=((a.USERNAME, "demo"), (a.PASSWORD, a.ACCOUNTS["demo"])), click=a.SIGN_IN))
    capture("new_item", await t.act(click=a.NEW_ITEM))
    capture("invalid", await t.act(click=a.SAVE))
    await t.act(click=a.DIALOG_OK)
    look("new_item", await t.act(fill=((a.NAME_FIELD, "Widget"), (a.QUANTITY_FIELD, "3")), key="tab"))
    capture("saved", await t.act(click=a.SAVE))
    look("items", await t.act(click=a.DIALOG_OK))
    for name, quantity in (("Bolt", 12), ("Nut", 40), ("Widget", 2), ("Hinge", 7)):
        await t.add_item(name, quantity)
    look("items", await t.desktop.screenshot())
    look("items", await t.act(fill=((a.FILTER, "Widget"),), key="enter"))
    look("unknown", await t.act(key="f1"))  # a dialog the model does not know, over the ready screen
    await t.act(click=a.DIALOG_OK)
    look("login", await t.act(click=a.SIGN_OUT))
    look("unknown", await t.act(key="f1"))
    await t.act(click=a.DIALOG_OK)
    before = await t.desktop.screenshot()
    await t.desktop.stop_app()  # the bare display: no app window at all
    look("unknown", await t.settle(before))


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("_deskfleet_template_app", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    target = Path(args[0]) if args else Path(str(template() / "model"))
    with tempfile.TemporaryDirectory() as tmp:
        fresh = asyncio.run(record(Path(tmp) / "model"))
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(fresh, target)
    print(f"recorded {target}")


if __name__ == "__main__":
    main()
