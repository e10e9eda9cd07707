"""``deskfleet desktop`` on a real Xvfb display: the windows of a third-party Qt application
(KeePassXC, from Debian's packages) with its dialogs and its answer to the window manager's
ping — none once it is stopped —, screenshots, and clicks and keys that reach a real Tk app."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_pack_tools import deskfleet

from deskfleet.desktop import XvfbDisplay

HERE = Path(__file__).parent


@pytest.fixture
def display() -> Iterator[XvfbDisplay]:
    shown = XvfbDisplay(1024, 768).start()
    try:
        yield shown
    finally:
        shown.close()


@pytest.fixture
def keepassxc(display: XvfbDisplay, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    if shutil.which("keepassxc") is None:
        pytest.fail("keepassxc is not installed (./dev test installs it)")
    home = tmp_path / "home"
    dirs = {name: home / name for name in ("config", "cache", "tmp", "runtime")}
    for d in dirs.values():
        d.mkdir(parents=True, mode=0o700)
    env = {**os.environ, **display.env(), "HOME": str(home), "XDG_CONFIG_HOME": str(dirs["config"]),
           "XDG_CACHE_HOME": str(dirs["cache"]), "TMPDIR": str(dirs["tmp"]), "XDG_RUNTIME_DIR": str(dirs["runtime"]),
           "QT_QPA_PLATFORM": "xcb"}
    app = subprocess.Popen(["keepassxc"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: display.find_window("^KeePassXC$") == app.pid, "KeePassXC's window")
        yield app
    finally:
        app.kill()
        app.wait(10)


def wait_until(condition: object, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what} never showed"
        time.sleep(0.05)


def windows(display: XvfbDisplay, *args: str) -> list[list[str]]:
    done = deskfleet("desktop", "windows", "--display", str(display.display), *args)
    assert done.returncode == 0, done.stderr
    return [[cell.strip() for cell in line.strip("│ ").split("│")] for line in done.stdout.splitlines()
            if line.startswith("│")]


def test_windows_lists_the_app_its_dialog_and_whether_it_answers_a_ping(display: XvfbDisplay,
                                                                         keepassxc: subprocess.Popen[bytes]) -> None:
    [main] = windows(display)
    window, pid, title, where, size, dialog_of, kind, ping = main
    assert (pid, title, where, size, dialog_of, kind) == (str(keepassxc.pid), "KeePassXC", "0,0", "800x600", "",
                                                          "window")
    assert ping.endswith(" ms"), ping

    done = deskfleet("desktop", "key", "ctrl", "o", "--display", str(display.display))  # File, Open: a modal dialog
    assert done.returncode == 0, done.stderr
    wait_until(lambda: len(windows(display, "--no-ping")) == 2, "the Open dialog")
    rows = windows(display)
    assert rows[0][0] == window, "the main window stays at the bottom"
    dialog = rows[1]
    assert (dialog[1], dialog[2], dialog[5], dialog[6]) == (str(keepassxc.pid), "Open database", window, "dialog")

    keepassxc.send_signal(signal.SIGSTOP)  # hung: the same frame, no answer
    try:
        assert {r[7] for r in windows(display)} == {"no answer in 0.5s"}
    finally:
        keepassxc.send_signal(signal.SIGCONT)
    assert all(r[7].endswith(" ms") for r in windows(display))


def test_screenshot_writes_the_display_or_a_region(display: XvfbDisplay, tmp_path: Path) -> None:
    done = deskfleet("desktop", "screenshot", str(tmp_path / "all.png"), "--display", str(display.display))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote {tmp_path / 'all.png'} (1024x768)"
    assert Image.open(tmp_path / "all.png").size == (1024, 768)
    done = deskfleet("desktop", "screenshot", str(tmp_path / "part.png"), "--display", str(display.display),
                     "--region", "10,20,300,40")
    assert done.returncode == 0, done.stderr
    assert Image.open(tmp_path / "part.png").size == (300, 40)


@pytest.mark.parametrize(("args", "message"), [
    (["screenshot", "x.png", "--region", "1,2,3"], "'1,2,3' is not LEFT,TOP,WIDTH,HEIGHT"),
    (["screenshot", "x.png", "--region", "0,0,0,10"], "width and height must be positive"),
    (["screenshot", "x.png", "--region", "1000,700,100,100"], "is not within the 1024x768 screen"),
    (["key", "nokey"], "unknown key 'nokey'"),
])
def test_bad_input_is_one_line(display: XvfbDisplay, tmp_path: Path, args: list[str], message: str) -> None:
    done = deskfleet("desktop", *args, "--display", str(display.display), cwd=tmp_path)
    assert done.returncode != 0
    assert done.stderr.startswith("deskfleet: ") and message in done.stderr and "Traceback" not in done.stderr, \
        done.stderr
    assert not (tmp_path / "x.png").exists()


def test_no_display_is_one_line() -> None:
    done = deskfleet("desktop", "windows", env={"DISPLAY": ""})
    assert done.returncode != 0 and done.stderr.strip() == (
        "deskfleet: no X display: give --display :N (deskfleet pack open prints it) or set DISPLAY")


def test_click_type_and_key_reach_a_real_app(display: XvfbDisplay, tmp_path: Path) -> None:
    """The Tk typing app: a click on Next opens its second window, whose field takes the text
    (from stdin: '-'), and ctrl+a then a key replace it — what the app wrote down says so."""
    out = tmp_path / "out"
    out.mkdir()
    app = subprocess.Popen([sys.executable, str(HERE / "typing_app.py"), str(out)], env={**os.environ, **display.env()})
    try:
        wait_until(lambda: display.find_window("^first$") == app.pid, "the first window")
        d = str(display.display)
        assert deskfleet("desktop", "click", "100", "40", "--display", d).returncode == 0  # Next
        wait_until(lambda: display.find_window("^second$") == app.pid, "the second window")
        done = deskfleet("desktop", "type", "-", "--display", d, stdin="Zürich 42\n")
        assert done.returncode == 0, done.stderr
        wait_until(lambda: (out / "plain.txt").exists() and (out / "plain.txt").read_text() == "Zürich 42",
                   "the typed text")
        assert deskfleet("desktop", "key", "ctrl", "a", "--display", d).returncode == 0
        assert deskfleet("desktop", "key", "x", "--display", d).returncode == 0
        wait_until(lambda: (out / "plain.txt").read_text() == "x", "the replaced text")
        frame = np.asarray(Image.open(tmp_path / "s.png")) if deskfleet(
            "desktop", "screenshot", str(tmp_path / "s.png"), "--display", d).returncode == 0 else None
        assert frame is not None and frame.shape == (768, 1024, 3)
    finally:
        app.kill()
        app.wait(10)
