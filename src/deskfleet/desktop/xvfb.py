"""Xvfb machines: a virtual X display per desktop, the application on it, torn down in order.

:class:`XvfbDisplay` is the :class:`~deskfleet.desktop.driver.Host` of a desktop in our
tests, the demo and on Linux robots: it starts ``Xvfb :N -screen 0 WxHx24 -nolisten tcp``
on a free display number (the server picks it and reports it through ``-displayfd`` once
it accepts connections — no polling, no race with a neighbour picking the same number),
and stops it. "Rebooting" the machine restarts the X server on the same number if that is
still free (another Xvfb may have taken it meanwhile), else on any, with a new boot id.
:func:`xvfb_desktop` puts a :class:`~deskfleet.desktop.driver.RealDesktop` on a new display:
closing that desktop stops the application first and the display last (input libraries
and toolkits complain when their display vanishes under them).

There is no window manager: nobody gives a new window the keyboard focus, so
:meth:`XvfbDisplay.show_window` does what a minimal one would at map time — it finds the
application's top-level window and focuses it. Nor does anybody move the focus when that
window closes: it falls back to PointerRoot, and keys go to whatever is under the pointer,
or nowhere. A click does not fix it (Tk and GTK do not take the X focus on a click), so
before each keyboard batch the desktop calls :func:`focus_app`, which gives the focus to
the app's topmost window when no viewable window of the app has it (≈ 0.1-0.2 ms a check).
Measured here: Xvfb starts in 40-100 ms and takes ≈ 70 MiB with a window or two.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import select
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, DesktopError
from . import xwindows
from .base import Frame, Window
from .driver import AppCommand, RealDesktop
from .xwindows import _owner, _title, _transient_for

log = logging.getLogger(__name__)

INSTALL_HINT = "Xvfb is not installed (Debian/Ubuntu: apt-get install xvfb)"
START_TIMEOUT = 10.0


def kernel_boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        import psutil

        return f"boot-{psutil.boot_time():.0f}"


class XWindowHost:
    """The window side of an X host (:class:`XvfbDisplay`, ``local.X11Session``): one Xlib
    connection (``_x``) under a lock for questions and focus, and one more, made on first
    use, for pings (it receives the answers on the root window)."""

    _x: Any
    _x_lock: threading.Lock
    _pinger: Any = None
    if TYPE_CHECKING:  # each host says which display it is (a property of its own)
        @property
        def display(self) -> str | None: ...

    def _conn(self) -> Any:
        if self._x is None:
            raise DesktopError(f"the display {self.display} is not running")
        return self._x

    def show_window(self, pid: int) -> bool:
        with self._x_lock:
            return show_window(self._x, pid)

    def find_window(self, title: str) -> int | None:
        with self._x_lock:
            return find_window(self._x, title)

    def focus_app(self, pid: int) -> str | None:
        """Give the keyboard focus to ``pid``'s window unless one of its windows has it
        (see :func:`focus_app`)."""
        with self._x_lock:
            return focus_app(self._conn(), pid)

    def raise_app(self, pid: int) -> int:
        """Bring ``pid``'s windows to the front (see :func:`raise_app`)."""
        with self._x_lock:
            return raise_app(self._conn(), pid)

    def windows(self) -> list[Window]:
        """The display's viewable top-level windows, bottom to top (:func:`.xwindows.windows`)."""
        with self._x_lock:
            return xwindows.windows(self._conn())

    def ping(self, window: int, timeout: float = 0.5) -> float | None:
        """Seconds ``window``'s client took to answer ``_NET_WM_PING``; None: no answer in time."""
        import Xlib.display
        import Xlib.error

        with self._x_lock:
            if self._pinger is None:
                try:
                    self._pinger = Xlib.display.Display(self.display)
                except Exception as exc:
                    raise DesktopError(f"cannot connect to the display {self.display}: {exc}") from exc
            try:
                return xwindows.ping(self._pinger, window, timeout=timeout)
            except Xlib.error.XError:
                return None  # the window went away

    def close_window(self, window: int) -> bool:
        """Send ``window`` the close request of its title bar's button (``WM_DELETE_WINDOW``)."""
        import Xlib.error

        with self._x_lock:
            try:
                xwindows.ask_to_close(self._conn(), window)
                return True
            except Xlib.error.XError:
                return False  # it went away

    def _close_windows(self) -> None:
        """Close both connections (before the server goes, or when letting go of it)."""
        for conn in (self._x, self._pinger):
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
        self._x = self._pinger = None


class XvfbDisplay(XWindowHost):
    """One Xvfb server. ``start()`` it; ``display`` is then ``":N"``."""

    def __init__(self, width: int = 1024, height: int = 768, *, number: int | None = None,
                 log_file: Path | None = None) -> None:
        self.width, self.height = width, height
        self.number = number
        self.log_file = log_file
        self._proc: subprocess.Popen[bytes] | None = None
        self._x: Any = None  # an Xlib connection, for windows and focus
        self._x_lock = threading.Lock()
        self._booted_at = 0.0
        self._boot_id = ""
        self.boots = 0

    @property
    def display(self) -> str | None:
        return f":{self.number}" if self.number is not None and self._proc is not None else None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def env(self) -> dict[str, str]:
        if self.display is None:
            raise DesktopError("the Xvfb display is not running")
        return {"DISPLAY": self.display}

    def boot_id(self) -> str:
        return self._boot_id

    def booted_at(self) -> float:
        return self._booted_at

    # -- server ------------------------------------------------------------------------------

    def start(self) -> XvfbDisplay:
        binary = shutil.which("Xvfb")
        if binary is None:
            raise ConfigError(INSTALL_HINT)
        read_fd, write_fd = os.pipe()
        args = [binary]
        if self.number is not None:
            args.append(f":{self.number}")  # a restart keeps its number; a first start lets Xvfb choose
        args += ["-displayfd", str(write_fd), "-screen", "0", f"{self.width}x{self.height}x24",
                 "-nolisten", "tcp", "-noreset"]
        out: Any = subprocess.DEVNULL
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_file, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            proc = subprocess.Popen(args, pass_fds=(write_fd,), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=out, start_new_session=True)
        finally:
            os.close(write_fd)
            if out is not subprocess.DEVNULL:
                out.close()
        try:
            number = self._read_number(read_fd, proc)
        finally:
            os.close(read_fd)
        self._proc, self.number = proc, number
        self.boots += 1
        self._booted_at = time.time()
        self._boot_id = hashlib.sha256(
            f"{kernel_boot_id()}:{self.display}:{proc.pid}:{self._booted_at}".encode()).hexdigest()[:16]
        self._connect()
        log.info("Xvfb %s up (%dx%d, pid %d)", self.display, self.width, self.height, proc.pid)
        return self

    @staticmethod
    def _read_number(fd: int, proc: subprocess.Popen[bytes]) -> int:
        """Xvfb writes its display number to ``-displayfd`` once it accepts connections."""
        deadline = time.monotonic() + START_TIMEOUT
        data = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                chunk = os.read(fd, 32)
                data += chunk
                if not chunk or data.endswith(b"\n"):
                    break
                continue
            if data:
                break  # an explicit number is written without a newline
            if proc.poll() is not None:
                break
        if data.strip().isdigit():
            return int(data.strip())
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(5)
        raise DesktopError(f"Xvfb did not start (exit status {proc.returncode}; output {data!r})")

    def _connect(self) -> None:
        import Xlib.display
        import Xlib.threaded

        try:
            self._x = Xlib.display.Display(self.display)
        except Exception as exc:
            raise DesktopError(f"cannot connect to Xvfb {self.display}: {exc}") from exc

    def _stop_server(self) -> None:
        with self._x_lock:
            self._close_windows()
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            # Killed, it could not remove its socket and lock as it does when it exits.
            for leftover in (Path(f"/tmp/.X11-unix/X{self.number}"), Path(f"/tmp/.X{self.number}-lock")):
                leftover.unlink(missing_ok=True)

    def restart(self) -> None:
        self._stop_server()
        try:
            self.start()
        except DesktopError as exc:
            # While this server was down (killed, crashed), another Xvfb starting on this host
            # may have taken its number: the lowest free one is what Xvfb picks. Take any.
            log.info("Xvfb could not start again on :%s (%s); taking another display", self.number, exc)
            self.number = None
            self.start()

    def close(self) -> None:
        self._stop_server()

    # -- windows -------------------------------------------------------------------------------

    @property
    def attachable(self) -> bool:
        return False  # a display started here: no app runs on it before we start one

    def problems(self) -> list[str]:
        return []  # a display of our own, of the size we asked for, with no lock screen


# -- X11 windows, for any X display (ours or a session's) -----------------------------------------


def top_level_windows(x: Any) -> list[tuple[Any, str, int | None]]:
    """The viewable top-level windows of display connection ``x``: (window, title, pid),
    bottom to top.

    The pid comes from the server (X-Resource), not from _NET_WM_PID: toolkits need not set
    it (Tk does not), and a window of an app just killed can still be listed for a moment.
    Under a reparenting window manager (a desktop session, ``--desktop local``) a top-level
    window sits inside the manager's frame, a window of another client: the titled windows
    inside a frame are listed too.
    """
    import Xlib.error
    import Xlib.X

    out: list[tuple[Any, str, int | None]] = []
    if x is None:
        return out
    try:
        for window in x.screen().root.query_tree().children:
            try:
                attrs = window.get_attributes()
                if attrs.map_state != Xlib.X.IsViewable:
                    continue
                owner = _owner(x, window)
                out.append((window, _title(x, window), owner))
                if attrs.override_redirect:
                    continue
                for inner in window.query_tree().children:  # a frame's client (its title is the app's)
                    if _owner(x, inner) != owner and inner.get_attributes().map_state == Xlib.X.IsViewable:
                        out.append((inner, _title(x, inner), _owner(x, inner)))
            except Xlib.error.XError:
                continue  # it went away between the listing and the question
    except Xlib.error.XError:
        return []
    return out


def show_window(x: Any, pid: int) -> bool:
    """Is a top-level window of ``pid`` viewable? If so, give it the keyboard focus (what a
    window manager does at map time; without one, nobody else does)."""
    import Xlib.error
    import Xlib.X

    for window, _, owner in top_level_windows(x):
        if owner == pid:
            try:
                window.set_input_focus(Xlib.X.RevertToPointerRoot, Xlib.X.CurrentTime)
                x.sync()
            except Xlib.error.XError:
                return False  # the window went away between the listing and the focus
            return True
    return False


def focus_app(x: Any, pid: int) -> str | None:
    """Make sure the keyboard input of display ``x`` goes to process ``pid``'s application,
    as a click-to-focus window manager would; return what was done (None: nothing needed).

    The focus is left alone when it is a viewable window of the app. Otherwise — PointerRoot,
    None, the root window, a window of another client, a window of the app that is no longer
    viewable (the one that had the focus closed) — it is given to the app's topmost viewable
    top-level window: a dialog of the app (``WM_TRANSIENT_FOR`` one of its windows) if one is
    up, else the topmost. DesktopError if the app shows no window at all: keys sent now would
    reach another program, or nobody.

    The check costs three round trips to the server when the focus is right (the
    common case, ≈ 0.1 ms here); moving it lists the top-level windows.
    """
    import Xlib.error
    import Xlib.X

    failed: Any = None
    for _ in range(2):  # a window may close between the listing and the focus: list again once
        try:
            focus = x.get_input_focus().focus
            if not isinstance(focus, int) and focus.id != x.screen().root.id:
                try:
                    if _owner(x, focus) == pid and focus.get_attributes().map_state == Xlib.X.IsViewable:
                        return None
                except Xlib.error.XError:
                    pass  # the focus window went away meanwhile
            was = _describe_focus(x, focus, pid)
            windows = _app_windows(x, pid)
            if not windows:
                raise DesktopError(f"the application (pid {pid}) shows no window to type into; the keyboard "
                                   f"focus is {was}, so keys sent now would not reach it")
            ids = {w.id for w in windows}
            dialogs = [w for w in windows if _transient_for(w) in ids]
            target = (dialogs or windows)[-1]
            catch = Xlib.error.CatchError(Xlib.error.BadMatch, Xlib.error.BadWindow)
            target.set_input_focus(Xlib.X.RevertToPointerRoot, Xlib.X.CurrentTime, onerror=catch)
            x.sync()
            failed = catch.get_error()
            if failed is None:
                return f"the keyboard focus was {was}; gave it to window 0x{target.id:x} of the application"
        except Xlib.error.XError as exc:
            failed = exc
    raise DesktopError(f"cannot give the keyboard focus to the application (pid {pid}): {failed}")


def _describe_focus(x: Any, focus: Any, pid: int) -> str:
    import Xlib.X

    if isinstance(focus, int):
        return "PointerRoot" if focus == Xlib.X.PointerRoot else "None"
    if focus.id == x.screen().root.id:
        return "the root window"
    owner = _owner(x, focus)
    if owner == pid:
        return f"window 0x{focus.id:x} of the application, no longer viewable"
    return f"window 0x{focus.id:x} of another client (pid {owner})"


def raise_app(x: Any, pid: int) -> int:
    """Bring ``pid``'s viewable top-level windows above every other client's, keeping their
    own order (a dialog stays above its main window); returns how many were raised. For
    several applications on one display: the one about to be driven comes to the front, as
    a click on it would under a window manager."""
    import Xlib.error
    import Xlib.X

    raised = 0
    root = x.screen().root
    for window in _app_windows(x, pid):  # bottom to top: each raised above the one before
        try:
            parent = window.query_tree().parent
            target = parent if parent is not None and parent.id != root.id else window  # a WM's frame
            target.configure(stack_mode=Xlib.X.Above)
            raised += 1
        except Xlib.error.XError:
            continue  # it went away meanwhile
    x.sync()
    return raised


def _app_windows(x: Any, pid: int) -> list[Any]:
    """The viewable top-level windows of ``pid``, bottom to top, menus and tooltips
    (override-redirect windows) left out. Under a reparenting window manager (a desktop
    session) a top-level window sits inside the manager's frame: it is looked for there."""
    import Xlib.error
    import Xlib.X

    out = []
    for window in x.screen().root.query_tree().children:  # bottom-to-top stacking order
        try:
            attrs = window.get_attributes()
            if attrs.map_state != Xlib.X.IsViewable or attrs.override_redirect:
                continue
            if _owner(x, window) == pid:
                out.append(window)
                continue
            for inner in window.query_tree().children:  # a frame: the app's window inside it
                if _owner(x, inner) == pid and inner.get_attributes().map_state == Xlib.X.IsViewable:
                    out.append(inner)
                    break
        except Xlib.error.XError:
            continue  # it went away between the listing and the question
    return out


def find_window(x: Any, title: str) -> int | None:
    """The pid of the first viewable top-level window whose title matches the regex ``title``."""
    pattern = re.compile(title)
    for _, name, owner in top_level_windows(x):
        if owner is not None and pattern.search(name):
            return owner
    return None


async def xvfb_desktop(name: str, app: AppCommand, *, width: int = 1024, height: int = 768,
                       started: Callable[[Frame], bool] | None = None, log_dir: Path | None = None,
                       session_idle_timeout: float | None = None) -> RealDesktop:
    """Start an Xvfb display and the application on it; the desktop owns both.

    ``session_idle_timeout``: the app's own idle logout, if it has one (see ``.session``).
    """
    display = XvfbDisplay(width, height, log_file=log_dir / f"{name}.xvfb.log" if log_dir else None)
    await asyncio.to_thread(display.start)
    desktop = RealDesktop(name, display, app, started=started, session_idle_timeout=session_idle_timeout)
    try:
        await desktop.start()
    except BaseException:
        await desktop.close()
        raise
    return desktop
