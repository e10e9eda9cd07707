"""Record this pack's model from the live application: ``python capture.py [--model DIR] [--shots DIR]``.

It starts KeePassXC (through ``launch.py``, as an agent would) on a fresh Xvfb display with a
throw-away database, walks it through every screen with mouse and keyboard — the unlock
screen, a wrong password, an empty one, the entry list empty and full, search results, the
new-entry form empty and filled, the unsaved-changes question, the idle lock with the form
open, the welcome screen, the bare desktop — and, at each settled screen, runs the same
commands a person would::

    deskfleet model capture --display :N --dir DIR --state STATE --anchor … [--ready|--overlay]
    deskfleet model add-screen --display :N --dir DIR STATE      # another look of a known state
    deskfleet model add-screen --display :N --dir DIR unknown    # a screen the model must not know

The first look of each state records its anchors (``kpx/anchors.py``); every later look is
saved with the model, and every command checks the whole model against every screenshot
saved so far — so an anchor that would take the About box over the list for the list is
refused on the spot. Screens the model must not know (the About box over each screen, an
open menu, the password generator) are saved as ``unknown``.

``--variant dark`` walks the same tour with KeePassXC in its dark theme and records, for
each state, the dark look of the templates that do not already pass (``deskfleet model
capture --variant dark``): the model then knows both themes by their pixels, and the dark
screenshots are saved with it.

The commands run once the tour is over, in the order of the screens: recording takes
longer as the saved screenshots grow, and the tour must not wait for it — KeePassXC's idle
lock, part of the tour, would strike in the meantime. The model is written to a temporary
directory and moves into place (``model/`` by default) only when every command went through. ``--shots DIR`` only saves the tour's screenshots
(named by their labels) and records nothing. Run it again whenever KeePassXC's look changes
(a new version, another theme) and review the PNGs it writes.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from deskfleet import DesktopError, Frame, Region
from deskfleet.desktop import AppCommand, RealDesktop, xvfb_desktop

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from kpx import anchors, kxcli  # noqa: E402 - the pack's own package, found through HERE
from kpx import layout as L  # noqa: E402

PASSWORD = "capture-Pw-1"
STEADY = 0.4  # seconds a screen must stay unchanged to count as settled
SETTLE_TIMEOUT = 10.0


def banner(frame: Frame) -> bool:
    """Whether the red "Invalid credentials" banner is up (a red strip under the toolbar)."""
    r, g, b = (int(v) for v in frame[100, 500])
    return r > 150 and g < 120 and b < 80


def drawn(frame: Frame) -> bool:
    """Whether KeePassXC has painted its window (it is black for a moment after it maps)."""
    return float(frame.std()) > 10


async def settle(desktop: RealDesktop, before: Frame | None = None) -> Frame:
    """The next steady screen: changed from ``before`` (if given), then unchanged for STEADY s.
    A blinking caret changes the screen every half second: STEADY is shorter than that."""
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


class Recorder:
    """Where each settled screen goes: ``deskfleet model`` commands, or only PNG files.

    The tour settles the screen, takes the screenshot and labels it; the commands record from
    that PNG (``--screenshot``), so a screen that changes by itself a moment later (the red
    banner hides itself after a few seconds) is recorded as it was labelled. They run in
    :meth:`finish`, after the tour."""

    def __init__(self, model: Path | None, shots: Path, look: str | None = None) -> None:
        self.model, self.shots, self.look = model, shots, look
        self.recorded: set[str] = set()
        self.count = 0
        self.commands: list[tuple[str, list[str]]] = []  # (what, argv), in the order of the screens

    def __call__(self, label: str, frame: Frame) -> None:
        from PIL import Image

        self.count += 1
        png = self.shots / f"{self.count:02d}-{label}.png"
        Image.fromarray(frame).save(png)
        if self.model is None:
            print(f"saved {png.name}")
            return
        base = [sys.executable, "-m", "deskfleet", "model"]
        if self.look is not None and label != "unknown":  # each look of a state may need more variants
            args = [*base, "capture", "--dir", str(self.model), "--screenshot", str(png), "--state", label,
                    "--variant", self.look]
        elif label == "unknown" or label in self.recorded:
            args = [*base, "add-screen", "--dir", str(self.model), "--screenshot", str(png), label]
        else:
            args = [*base, "capture", "--dir", str(self.model), "--screenshot", str(png), "--state", label,
                    "--name", "keepassxc"]
            for spot in anchors.STATES[label]:
                args += spot.option()
            if label in anchors.READY:
                args.append("--ready")
            if label in anchors.OVERLAYS:
                args.append("--overlay")
        self.commands.append((f"[{self.count:02d}] {label}", args))
        self.recorded.add(label)

    def finish(self) -> None:
        """Run the commands, in order; stop at the first that refuses (the model is not moved
        into place then)."""
        for what, args in self.commands:
            done = subprocess.run(args, capture_output=True, text=True, check=False)
            print(f"{what}: {(done.stdout + done.stderr).strip()}")
            if done.returncode != 0:
                raise SystemExit(f"capture.py: stopped at screen {what}; the model was not changed")


class Tour:
    def __init__(self, workdir: Path, look: Sequence[str] = ()) -> None:
        self.workdir = workdir
        self.look_args = list(look)  # launch.py's options of a look (e.g. --theme dark)
        self.database = workdir / "keepassxc.kdbx"
        self.desktop: RealDesktop | None = None
        self.record: Recorder | None = None

    def command(self, lock_after: float) -> AppCommand:
        launch = [sys.executable, str(HERE / "launch.py")]
        where = ["--data", str(self.workdir), "--machine", "capture"]
        return AppCommand([*launch, *where, "--lock-after", f"{lock_after:g}", *self.look_args],
                          stop_command=[*launch, "stop", *where], stop_grace=3.0, start_timeout=30.0,
                          log=self.workdir / "keepassxc.log")

    @property
    def d(self) -> RealDesktop:
        assert self.desktop is not None
        return self.desktop

    async def act(self, *steps: tuple[str, object], settle_after: bool = True) -> None:
        """Input, then the pointer back to rest, then wait for the screen to settle."""
        before = await self.d.screenshot()
        for kind, arg in steps:
            if kind == "click":
                assert isinstance(arg, Region)
                await self.d.click(*arg.center)
            elif kind == "point":
                assert isinstance(arg, tuple)
                await self.d.click(*arg)
            elif kind == "type":
                await self.d.type_text(str(arg))
            elif kind == "press":
                assert isinstance(arg, tuple)
                await self.d.press(*arg)
            await asyncio.sleep(0.05)
        await self.d.move(*L.PARK)
        if settle_after:
            await settle(self.d, before)

    async def see(self, label: str) -> None:
        await self.d.move(*L.PARK)
        frame = await settle(self.d)
        assert self.record is not None
        await asyncio.to_thread(self.record, label, frame)

    async def restart(self, lock_after: float) -> None:
        self.d.app = self.command(lock_after)
        await self.d.restart_app()
        await settle(self.d)
        await self.see("locked")

    async def fill(self, field: Region, text: str) -> None:
        await self.act(("click", field), ("press", ("ctrl", "a")), ("type", text))

    async def unlock(self, password: str) -> None:
        field = L.shifted(L.PASSWORD, L.BANNER_SHIFT) if banner(await self.d.screenshot()) else L.PASSWORD
        await self.fill(field, password)
        await self.act(("press", ("enter",)))

    async def locked(self) -> None:
        """The unlock screen, with or without the red banner of a failed attempt."""
        await self.d.move(*L.PARK)
        frame = await settle(self.d)
        assert self.record is not None
        await asyncio.to_thread(self.record, "locked_error" if banner(frame) else "locked", frame)

    async def idle(self, seconds: float) -> None:
        """No input for ``seconds``: KeePassXC's idle lock is a timer, so this waits for it."""
        await self.d.move(*L.PARK)
        await asyncio.sleep(seconds)

    async def about(self) -> None:
        """Help → About (a dialog the model must not know), then Escape."""
        await self.act(("click", L.MENU_HELP))
        await self.see("unknown")  # the open menu hides toolbar icons
        await self.act(("click", L.HELP_ABOUT))
        await self.see("unknown")
        await self.act(("press", ("esc",)))

    async def unlock_screens(self) -> None:
        """The unlock screen: as it starts, after a wrong password, after an empty one, under
        the About box; then unlocked, the empty list."""
        await self.see("locked")
        # A wrong password: the red banner pushes the panel down.
        await self.unlock("not-the-password")
        await self.see("locked_error")
        await self.act(("click", L.BANNER_CLOSE))
        await self.see("locked")
        # An empty password: KeePassXC asks whether to retry without one.
        await self.act(("click", L.PASSWORD), ("press", ("ctrl", "a")), ("press", ("backspace",)),
                       ("press", ("enter",)))
        await self.see("unlock_failed")
        await self.act(("click", L.UNLOCK_FAILED_CANCEL))
        await self.locked()
        await self.about()
        await self.locked()
        await self.unlock(PASSWORD)
        await self.see("entries")  # empty: the preview shows the group

    async def run(self, record: Recorder) -> None:
        self.record = record
        await self.unlock_screens()
        # In an empty database, a search cleared leaves nothing selected, and KeePassXC hides
        # the preview panel: without its "General" tab the model cannot tell that no dialog is
        # over the list, so this look is not ready (the Escape playbook clicks the root group).
        await self.act(("click", L.SEARCH_BOX), ("type", "zzz"))
        await self.see("search")
        await self.act(("press", ("esc",)))
        await self.see("unknown")
        await self.act(("click", L.GROUP_ROOT))
        await self.see("entries")
        await self.about()
        await self.see("entries")
        # The new-entry form, empty and filled; Cancel on a changed form asks.
        await self.act(("click", L.NEW_BUTTON))
        await self.see("entry_form")
        await self.fill(L.TITLE, "Alpha Mail")
        await self.fill(L.USERNAME, "alice")
        await self.fill(L.ENTRY_PASSWORD, "S3cret-pw!")
        await self.fill(L.URL, "https://alpha.example")
        await self.act(("click", L.NOTES), ("type", "first note"))
        await self.see("entry_form")
        await self.act(("point", (973, 219)))  # the password generator opens at (0, 0)
        await self.see("unknown")
        await self.act(("press", ("esc",)))
        await self.see("entry_form")
        await self.about()
        await self.see("entry_form")
        await self.act(("click", L.FORM_CANCEL))
        await self.see("unsaved_changes")
        await self.act(("click", L.UNSAVED_DISCARD))
        await self.see("entries")
        # Entries: one added through the form, more by another writer (the list reloads).
        await self.act(("click", L.NEW_BUTTON))
        await self.fill(L.TITLE, "Alpha Mail")
        await self.fill(L.USERNAME, "alice")
        await self.act(("click", L.FORM_OK))
        await self.see("entries")
        before = await self.d.screenshot()
        for i, name in enumerate(("Bravo Bank", "Charlie Shop", "Delta One", "Echo Two", "Foxtrot Three",
                                  "Golf Four")):
            kxcli.add(self.database, PASSWORD, name, username=f"user{i}", url=f"https://{i}.example")
        await settle(self.d, before)
        await self.see("entries")
        # Search results: one, none, many; Escape clears the search.
        await self.act(("click", L.SEARCH_BOX), ("type", "Bravo"))
        await self.see("search")
        await self.act(("press", ("ctrl", "a")), ("type", "zzz"))
        await self.see("search")
        await self.act(("press", ("ctrl", "a")), ("type", "o"))
        await self.see("search")
        await self.about()
        await self.see("search")
        await self.act(("click", L.SEARCH_BOX), ("press", ("esc",)))
        await self.see("entries")
        await self.about()
        await self.see("entries")
        await self.act(("point", (460, 199)))  # another row selected
        await self.see("entries")
        # The idle lock: with the list, then with a changed form open (KeePassXC asks first).
        await self.restart(lock_after=3)
        await self.unlock(PASSWORD)
        await self.see("entries")
        await self.idle(4.5)
        await self.see("locked")
        await self.unlock(PASSWORD)
        await self.see("entries")
        await self.act(("click", L.NEW_BUTTON))
        await self.fill(L.TITLE, "Hotel Five")
        await self.idle(4.5)
        await self.see("lock_confirm")
        await self.act(("click", L.LOCK_CONFIRM_DISCARD))
        await self.see("locked")
        # Escape on the unlock screen closes the database: the welcome screen.
        await self.act(("click", L.PASSWORD), ("press", ("esc",)))
        await self.see("welcome")
        await self.about()
        await self.see("welcome")
        before = await self.d.screenshot()
        await self.d.stop_app()
        await settle(self.d, before)
        await self.see("desktop")

    async def start(self) -> None:
        kxcli.create(self.database, PASSWORD)
        self.desktop = await xvfb_desktop("capture", self.command(lock_after=30), width=L.WIDTH, height=L.HEIGHT,
                                          started=drawn)

    async def close(self) -> None:
        if self.desktop is not None:
            await self.desktop.close()


async def main_async(model: Path, shots: Path | None, variant: str | None = None) -> None:
    with tempfile.TemporaryDirectory(prefix="kpx-capture-") as tmp:
        tour = Tour(Path(tmp), ["--theme", variant] if variant else [])
        staging = Path(tmp) / "model"
        if variant is not None and shots is None:
            shutil.copytree(model, staging)  # another look of the states it has
        pngs = shots or Path(tmp) / "shots"
        pngs.mkdir(parents=True, exist_ok=True)
        recorder = Recorder(None if shots else staging, pngs, variant)
        try:
            await tour.start()
            await tour.run(recorder)
        finally:
            await tour.close()
        recorder.finish()
        if shots is None:
            if model.exists():
                shutil.rmtree(model)
            shutil.copytree(staging, model)
            print(f"recorded {model}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="capture.py", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--model", type=Path, default=HERE / "model", help="the model directory to (re)write")
    parser.add_argument("--shots", type=Path, default=None, help="only save the tour's screenshots here")
    parser.add_argument("--variant", choices=["dark"], default=None,
                        help="add this theme's look of each state to the existing model")
    args = parser.parse_args(argv)
    if args.shots is not None:
        args.shots.mkdir(parents=True, exist_ok=True)
    asyncio.run(main_async(args.model.resolve(), args.shots, args.variant))


if __name__ == "__main__":
    main()
