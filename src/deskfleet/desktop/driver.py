"""The real desktop: a :class:`~deskfleet.desktop.Desktop` over a real screen, keyboard and mouse.

One implementation for every platform, over cross-platform libraries: screenshots with
``mss`` (X11 shared memory, GDI on Windows; ≈ 1.5 ms for a 1080p frame here), the mouse
with ``pynput`` (XTest / SendInput), the keyboard with XTest on X11 (:mod:`.xkeys`: every
key as if typed on the keyboard — pynput sends characters there with XSendEvent, which
loses them once the focused window has closed) and with ``pynput`` (SendInput) elsewhere,
text with tesseract (``vision.ocr``), the application's memory and CPU with ``psutil``.
The code our tests run against Xvfb is the code that drives a customer's Windows VM.

What differs between platforms is the *host* around the application — which display
the frames and input go to, when the machine booted, whether the app's window is up
(and giving it the keyboard focus, which on an X server without a window manager nobody
else does), how to reboot. That is the small :class:`Host` protocol: ``xvfb.XvfbDisplay``
for X displays started here, ``local.X11Session`` for an X session somebody else
started, ``windows.ConsoleHost`` for the interactive Windows session an agent runs in. An X
host also has ``focus_app(pid)``: before every keyboard batch the desktop asks it to make
sure the keyboard focus is a window of the app, and to give it the app's topmost window (a
dialog of it first) when it is not — what a click-to-focus window manager would do.

Blocking calls (capture, input, OCR, process control) run in worker threads, so one event
loop can hold many desktops; an X server that hangs stalls a worker, never the loop and
its heartbeats.

The input gate (``Desktop.input_gate``) belongs to the agent and touches its asyncio
state, so it runs on the event loop, immediately before each batch of input is handed
to a worker. The worker re-checks that the handoff took no longer than
:data:`GATE_FRESHNESS`: a process paused between the gate and the input (GC, SIGSTOP, a
frozen VM) must not land input its lease may no longer allow. Long text is sent in
short batches, each gated; the focus check runs inside the batch, after the gate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import psutil

from ..errors import DesktopError, Stopped
from .base import DesktopInfo, Frame, Placement, Region, Window, WindowFacts
from .session import SessionNote
from .xkeys import XKeyboard, char_keysym, key_keysym

log = logging.getLogger(__name__)

#: seconds a gate check stays valid for the input handed to a worker right after it
GATE_FRESHNESS = 0.5
#: characters typed per gated batch
TYPE_BATCH = 16
#: seconds between polls while waiting for the app's window or first recognisable screen
POLL = 0.05
#: seconds one listing of the display's windows serves (the facts and the screenshot of one look)
LISTING_REUSE = 0.05


#: where Debian and Ubuntu say an installed update needs a reboot (update-notifier, unattended-upgrades)
REBOOT_REQUIRED = (Path("/run/reboot-required"), Path("/var/run/reboot-required"))


def posix_reboot_pending() -> bool:
    """Whether this machine's OS waits for a reboot (Debian's and Ubuntu's flag file)."""
    return any(p.exists() for p in REBOOT_REQUIRED)


class Host(Protocol):
    """The machine around the application: its display, its boot, its windows."""

    @property
    def display(self) -> str | None:
        """The X display (``":7"``) frames and input go to; None: this session's own screen."""

    def env(self) -> dict[str, str]:
        """The environment the application is started with (DISPLAY set, on X)."""

    def boot_id(self) -> str:
        """Changes whenever the machine (or display server) restarts."""

    def booted_at(self) -> float:
        """Wall-clock time of the last boot."""

    def show_window(self, pid: int) -> bool:
        """True once a window of process ``pid`` is visible; give it the keyboard focus."""

    def find_window(self, title: str) -> int | None:
        """The process id of a visible top-level window whose title matches the regex ``title``."""

    @property
    def attachable(self) -> bool:
        """Whether an application already running here may be taken over (a session we did
        not start: yes; a display we just started: nothing can be running on it yet)."""

    def problems(self) -> list[str]:
        """What keeps this machine from being driven, one line each that says what to do (a
        locked Windows console, a disconnected session); a screen of the wrong size is the
        desktop's own check."""

    def restart(self) -> None:
        """Reboot: stop and start the machine (or display server); return when it is up."""

    def close(self) -> None:
        """Stop what this host started. The application must be stopped first."""


@dataclass(slots=True)
class AppCommand:
    """How to start the target application, and how long to give it."""

    argv: Sequence[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    stop_grace: float = 3.0  # seconds between asking it to exit and killing it
    start_timeout: float = 30.0  # seconds for its window (and first known screen) to appear
    log: Path | None = None  # where its stdout/stderr go (default: discarded)
    process: str | None = None  # regex on the command line of the app when it is already running
    window: str | None = None  # regex on the title of one of its top-level windows
    stop_command: Sequence[str] | None = None  # asks the app to exit (default: SIGTERM)


_KEYS = {
    "ctrl": "ctrl", "control": "ctrl", "alt": "alt", "shift": "shift",
    "cmd": "cmd", "win": "cmd", "super": "cmd", "meta": "cmd",
    "enter": "enter", "return": "enter", "tab": "tab", "esc": "esc", "escape": "esc",
    "backspace": "backspace", "delete": "delete", "del": "delete", "insert": "insert",
    "home": "home", "end": "end", "pageup": "page_up", "page_up": "page_up",
    "pagedown": "page_down", "page_down": "page_down", "up": "up", "down": "down",
    "left": "left", "right": "right", "space": "space",
    **{f"f{i}": f"f{i}" for i in range(1, 13)},
}
_BUTTONS = ("left", "right", "middle")

# pynput binds to the X display named by $DISPLAY when it is imported and when a
# controller is created; to give each desktop of one process its own display the variable
# is set for that moment only, under this lock.
_display_env_lock = threading.Lock()


@contextlib.contextmanager
def _display_env(display: str | None) -> Any:
    if display is None:
        yield
        return
    with _display_env_lock:
        old = os.environ.get("DISPLAY")
        os.environ["DISPLAY"] = display
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("DISPLAY", None)
            else:
                os.environ["DISPLAY"] = old


#: the keyboard goes through XTest (``xkeys``) on X11; elsewhere through pynput (SendInput)
X11 = sys.platform not in ("win32", "darwin")


class _Devices:
    """Screen capture and input devices bound to one display (re-created after a reboot)."""

    def __init__(self, display: str | None) -> None:
        self.xkeys: XKeyboard | None = None
        self.keyboard: Any = None
        try:
            import mss

            with _display_env(display):
                from pynput import keyboard, mouse

                self.mouse = mouse.Controller()
                if X11:
                    self.xkeys = XKeyboard(display)
                else:
                    self.keyboard = keyboard.Controller()
            self.screen = mss.MSS(display=display) if display else mss.MSS()
        except Exception as exc:  # Xlib, mss and pynput each raise their own kinds
            if self.xkeys is not None:
                self.xkeys.close()
            raise DesktopError(f"cannot open the display {display or '(session)'}: {exc}") from exc
        self.Button = mouse.Button
        self.Key = keyboard.Key
        monitor = self.screen.monitors[0]
        self.width, self.height = int(monitor["width"]), int(monitor["height"])
        self.lock = threading.Lock()  # one input sequence at a time (a chord is not interleaved)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.screen.close()
        if self.xkeys is not None:
            self.xkeys.close()
        # pynput has no close(); its finaliser would close these connections after the X
        # server is gone and print a traceback, so they are closed here, while it is up.
        for controller in (self.mouse, self.keyboard):
            connection = getattr(controller, "_display", None)
            if connection is not None:
                with contextlib.suppress(Exception):
                    connection.close()
                del controller._display

    def grab(self, region: Region | None) -> Frame:
        box = {"left": 0, "top": 0, "width": self.width, "height": self.height}
        if region is not None:
            box = {"left": region.left, "top": region.top, "width": region.width, "height": region.height}
        shot = self.screen.grab(box)
        bgra = np.frombuffer(shot.raw, np.uint8).reshape(shot.height, shot.width, 4)
        return np.asarray(cv2.cvtColor(bgra, cv2.COLOR_BGRA2RGB), np.uint8)

    def key(self, name: str) -> Any:
        """A key name as the keyboard backend takes it; ValueError for an unknown name."""
        if self.xkeys is not None:
            return key_keysym(name)
        mapped = _KEYS.get(name.lower())
        if mapped is not None:
            return getattr(self.Key, mapped)
        if len(name) == 1:
            return name
        raise ValueError(f"unknown key {name!r}")

    def check_text(self, text: str) -> None:
        """ValueError before any key is sent if ``text`` holds a character that cannot be typed."""
        if self.xkeys is not None:
            for ch in text:
                char_keysym(ch)

    def type(self, text: str) -> None:
        if self.xkeys is not None:
            self.xkeys.type(text)
        else:
            self.keyboard.type(text)

    def press(self, names: Sequence[str]) -> None:
        """Press ``names`` together, in order, and release them in reverse order."""
        if self.xkeys is not None:
            self.xkeys.press(names)
            return
        pressed = []
        try:
            for k in [self.key(n) for n in names]:
                self.keyboard.press(k)
                pressed.append(k)
        finally:
            for k in reversed(pressed):
                self.keyboard.release(k)


def _describe(exc: BaseException) -> str:
    """An exception as text; some (mss on a dead X server) carry no message."""
    return str(exc) or type(exc).__name__


def capture_screen(display: str | None = None) -> Frame:
    """One screenshot of a whole display (``None``: ``$DISPLAY``, or this session's screen)."""
    try:
        import mss

        with mss.MSS(display=display) if display else mss.MSS() as screen:
            monitor = screen.monitors[0]
            shot = screen.grab(monitor)
    except Exception as exc:
        raise DesktopError(f"cannot capture the display {display or '(session)'}: {exc}") from exc
    bgra = np.frombuffer(shot.raw, np.uint8).reshape(shot.height, shot.width, 4)
    return np.ascontiguousarray(bgra[..., 2::-1])


class Station:
    """One machine's screen, input devices and host, shared by the applications on it.

    Each application on the machine is driven through its own :class:`RealDesktop` (its
    process, its session note), and all of them share this: the frames, the mouse and
    keyboard, the input gate of the agent, and the reboot that takes every app with it.
    """

    def __init__(self, name: str, host: Host, *, ocr: Any | None = None) -> None:
        self.name = name
        self.host = host
        self.input_gate: Callable[[], None] | None = None
        self.apps: list[RealDesktop] = []
        self._ocr = ocr
        self._devices: _Devices | None = None
        self._reboot_listeners: list[Callable[[], Any]] = []

    @property
    def boot_id(self) -> str:
        return self.host.boot_id()

    async def open(self) -> None:
        if self._devices is None:
            self._devices = await asyncio.to_thread(_Devices, self.host.display)

    async def close(self) -> None:
        """Stop every application, then the devices, then the host: toolkits and input
        libraries complain when their display vanishes under them."""
        for app in self.apps:
            if app.attached:
                app.let_go()  # an app we found running is not ours to stop: leave it as it was
            else:
                await asyncio.to_thread(app._stop_app)
        if self._devices is not None:
            self._devices.close()
            self._devices = None
        await asyncio.to_thread(self.host.close)

    def add_reboot_listener(self, callback: Callable[[], Any]) -> None:
        """Call ``callback()`` after each reboot, once the machine is back (boot id changed)."""
        self._reboot_listeners.append(callback)

    def dev(self) -> _Devices:
        if self._devices is None:
            raise DesktopError(f"{self.name} is not started (or is rebooting)")
        return self._devices

    async def screenshot(self, region: Region | None = None) -> Frame:
        dev = self.dev()
        if region is not None:
            _check_region(dev, region)
        try:
            return await asyncio.to_thread(dev.grab, region)
        except Exception as exc:
            raise DesktopError(f"screenshot of {self.name} failed: {_describe(exc)}") from exc

    async def read_text(self, region: Region) -> str:
        frame = await self.screenshot(region)
        engine = await asyncio.to_thread(self._ocr_engine)  # the first call loads tesseract (~0.1 s)
        return await asyncio.to_thread(engine.read, frame)

    def _ocr_engine(self) -> Any:
        if self._ocr is None:
            from ..vision.ocr import shared_engine

            self._ocr = shared_engine()
        return self._ocr

    async def send(self, send: Callable[[_Devices], None]) -> None:
        """Send input through the agent's gate (see the module's docstring)."""
        dev = self.dev()
        if self.input_gate is not None:
            self.input_gate()  # the agent's last word: raises Stopped to refuse the input
        gate = time.monotonic()

        def run() -> None:
            with dev.lock:
                if time.monotonic() - gate > GATE_FRESHNESS:
                    raise Stopped("input held back: it reached the display too long after its gate check")
                send(dev)

        try:
            await asyncio.to_thread(run)
        except Stopped:
            raise
        except Exception as exc:
            raise DesktopError(f"input to {self.name} failed: {_describe(exc)}") from exc

    async def reboot(self) -> None:
        """Restart the machine — for an Xvfb machine, the X server — and every app on it."""
        log.info("rebooting %s", self.name, extra={"machine": self.name})
        for app in self.apps:
            await asyncio.to_thread(app._stop_app)
        if self._devices is not None:
            self._devices.close()
            self._devices = None
        try:
            await asyncio.to_thread(self.host.restart)
        except Exception as exc:
            raise DesktopError(f"{self.name} did not come back from a reboot: {exc}") from exc
        self._devices = await asyncio.to_thread(_Devices, self.host.display)
        for app in self.apps:
            await app._launch()
        for callback in list(self._reboot_listeners):
            try:
                result = callback()
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("reboot listener failed on %s", self.name)


class RealDesktop:
    """One application on a real screen: the :class:`~deskfleet.desktop.Desktop` its
    playbooks and automations drive. Start with :meth:`start`.

    Several applications on one machine share a :class:`Station` (pass ``station``);
    without one, the desktop makes its own and owns it (closing the desktop closes it).
    """

    def __init__(
        self,
        name: str,
        host: Host,
        app: AppCommand,
        *,
        started: Callable[[Frame], bool] | None = None,
        ocr: Any | None = None,
        session_idle_timeout: float | None = None,
        station: Station | None = None,
        expected_screen: tuple[int, int] | None = None,
        pointer_counts: bool = False,
        model_window: Region | None = None,
        locate_window: Callable[[Frame, Placement | None], Placement | None] | None = None,
    ) -> None:
        self.name = name
        self.app = app
        #: the screen size the app and its model expect (None: any)
        self.expected_screen = expected_screen
        #: the app's idle clock restarts on pointer motion too (see ``[session] pointer_counts``)
        self.pointer_counts = pointer_counts
        #: where the app's main window was when its model was recorded (``model.json``'s
        #: ``window``). Given it, this desktop shows its users — playbooks, automations, the
        #: classifier — the app as recorded: screenshots with the window's content placed where
        #: it was then, on a screen of the model's size, and every coordinate they give moved
        #: to where the window is now. A moved window or another screen size changes nothing.
        self.model_window = model_window
        #: where the window system cannot say where the window is (the host lists no windows,
        #: or not the app's), this finds it by its pixels: the model's primary anchor
        #: (:meth:`deskfleet.vision.TemplateLibrary.locator`)
        self.locate_window = locate_window
        self._placement = Placement()  # where the model's window is on the screen now
        self._placed = False  # by the window system, at the last look
        self._listed: tuple[float, list[Window]] | None = None  # the last window listing, briefly reused
        self._owns_station = station is None
        self.station = station if station is not None else Station(name, host, ocr=ocr)
        self.station.apps.append(self)
        #: recognises a started application's first screen (e.g. "the model knows this state")
        self.started = started
        self._proc: subprocess.Popen[bytes] | None = None  # the app, when we started it
        self._ps: psutil.Process | None = None  # the app, started or attached
        self.attached = False  # the app was already running when the desktop started
        self.restarts = 0
        #: the account the app is logged in as, as far as playbooks told (see .session)
        self.session = SessionNote(idle_timeout=session_idle_timeout)

    def __repr__(self) -> str:
        return f"RealDesktop({self.name!r}, display={self.host.display!r})"

    @property
    def host(self) -> Host:
        return self.station.host

    @property
    def input_gate(self) -> Callable[[], None] | None:
        return self.station.input_gate

    @input_gate.setter
    def input_gate(self, gate: Callable[[], None] | None) -> None:
        self.station.input_gate = gate

    @property
    def boot_id(self) -> str:
        return self.station.boot_id

    @property
    def app_pid(self) -> int | None:
        ps = self._ps
        if ps is None:
            return None
        try:
            return ps.pid if ps.is_running() and ps.status() != psutil.STATUS_ZOMBIE else None
        except psutil.Error:
            return None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the display and take over the application if it is already running here
        (found by ``AppCommand.process`` / ``window``), else start it; return once its
        window shows."""
        await self.station.open()
        if self.host.attachable and (self.app.process or self.app.window):
            pid = await asyncio.to_thread(self._find_running)
            if pid is not None:
                self._attach(pid)
                return
        await self._launch()

    async def close(self) -> None:
        """Stop the application (and, if this desktop owns its station, the display)."""
        if self._owns_station:
            await self.station.close()
        else:
            await asyncio.to_thread(self._stop_app)

    def add_reboot_listener(self, callback: Callable[[], Any]) -> None:
        """Call ``callback()`` after each reboot, once the machine is back (boot id changed)."""
        self.station.add_reboot_listener(callback)

    # -- observation -------------------------------------------------------------------------

    async def screenshot(self, region: Region | None = None) -> Frame:
        if self.model_window is None:
            return await self.station.screenshot(region)
        if region is not None:
            shot = await self.station.screenshot(self._on_screen(region))
            if shot.shape[:2] != (region.height, region.width):  # a scaled window: at the model's size
                shot = np.asarray(cv2.resize(shot, (region.width, region.height), interpolation=cv2.INTER_AREA),
                                  np.uint8)
            return shot
        await self._windows()  # re-anchor: where is the window now?
        frame = await self.station.screenshot()
        if not self._placed and self.locate_window is not None:
            found = await asyncio.to_thread(self.locate_window, frame, self._placement)
            if found is not None:  # else the anchor is hidden (another screen shows): as it was
                self._placement = found
        return self._as_recorded(frame)

    async def read_text(self, region: Region) -> str:
        return await self.station.read_text(self._on_screen(region))

    # -- anchoring to the app's window --------------------------------------------------------

    @property
    def placement(self) -> Placement:
        """Where the model's window is on the screen now, as the last full screenshot found it
        (by the window system, or else by the model's primary anchor)."""
        return self._placement

    def _on_screen(self, region: Region) -> Region:
        return self._placement.to_screen(region)

    def _as_recorded(self, frame: Frame) -> Frame:
        """``frame`` as the model saw the screen (see :class:`~deskfleet.desktop.Placement`)."""
        height, width = frame.shape[:2]
        return self._placement.frame(frame, self.expected_screen or (width, height))

    async def _windows(self) -> list[Window] | None:
        """The display's windows (one listing serves a look: the facts and the screenshot),
        and the anchor moved to where the app's main window is now."""
        listing: Callable[[], list[Window]] | None = getattr(self.host, "windows", None)
        pid = self.app_pid
        self._placed = False
        if listing is None or pid is None:
            return None
        now = time.monotonic()
        if self._listed is not None and now - self._listed[0] < LISTING_REUSE:
            found = self._listed[1]
        else:
            try:
                found = await asyncio.to_thread(listing)
            except DesktopError:
                return None  # the display is down: the screenshot says so
            self._listed = (now, found)
        if self.model_window is not None:
            main = WindowFacts.of(found, pid, title=self.app.window).main
            if main is not None:
                self._placement = Placement.of(main.rect, self.model_window)
                self._placed = True
        return found

    async def info(self) -> DesktopInfo:
        dev = self.station.dev()
        memory, cpu, running = 0.0, 0.0, False
        ps = self._ps
        if ps is not None:
            try:
                with ps.oneshot():
                    running = ps.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
                    if running:
                        memory = ps.memory_info().rss / 2**20
                        cpu = ps.cpu_percent(None)
            except psutil.Error:
                running = False
        if not running:
            self.session.signed_out()  # the app crashed or was killed: its session went with it
        account, expires = self.session.current()
        return DesktopInfo(
            width=dev.width, height=dev.height, boot_id=self.host.boot_id(),
            uptime=max(0.0, time.time() - self.host.booted_at()),
            memory_mb=memory, cpu_percent=cpu, app_running=running,
            session_key=account, session_expires_at=expires,
            reboot_pending=getattr(self.host, "reboot_pending", posix_reboot_pending)(),
            extra={"app_restarts": float(self.restarts)},
        )

    async def app_windows(self) -> WindowFacts | None:
        """The app's main window and every window over it (:class:`WindowFacts`); None when
        the host cannot list windows or the app is not running."""
        found = await self._windows()
        pid = self.app_pid
        if found is None or pid is None:
            return None
        # in the coordinates the model and its users see
        return WindowFacts.of(found, pid, title=self.app.window).moved(self._placement)

    async def app_answers(self, timeout: float = 0.5) -> bool | None:
        """Whether the app's main window answers ``_NET_WM_PING`` within ``timeout`` seconds
        (its event loop runs); None when it cannot be asked."""
        ping: Callable[[int, float], float | None] | None = getattr(self.host, "ping", None)
        facts = await self.app_windows()
        if ping is None or facts is None or facts.main is None or "_NET_WM_PING" not in facts.main.protocols:
            return None
        return await asyncio.to_thread(ping, facts.main.id, timeout) is not None

    async def close_window(self, window: Window) -> bool:
        """Ask ``window`` to close as its title bar's close button would (``WM_DELETE_WINDOW``);
        False when it does not take that request (then Escape is the usual way)."""
        close: Callable[[int], bool] | None = getattr(self.host, "close_window", None)
        if close is None or "WM_DELETE_WINDOW" not in window.protocols:
            return False
        await self.station.send(lambda d: None)  # through the agent's gate, like any input
        return await asyncio.to_thread(close, window.id)

    async def bring_to_front(self) -> None:
        """Raise the app's windows over every other program's (another program's window covers it)."""
        pid = self.app_pid
        bring: Callable[[int], int] | None = getattr(self.host, "raise_app", None)
        if pid is not None and bring is not None:
            await self.station.send(lambda d: None)
            await asyncio.to_thread(bring, pid)

    async def activate(self) -> None:
        """Bring this application to the front of its machine's screen, when it shares the
        screen with others (several packs on one machine): what a click on it would do under
        a window manager. Alone on its screen, an app is left as it is — raising its main
        window could hide a dialog of its own."""
        pid = self.app_pid
        bring: Callable[[int], int] | None = getattr(self.host, "raise_app", None)
        if len(self.station.apps) < 2 or pid is None or bring is None:
            return
        await asyncio.to_thread(bring, pid)

    async def problems(self) -> list[str]:
        """What keeps this machine from being driven (machine health, checked by pre-flight):
        a screen of another size than the app expects; on Windows a locked console, a
        disconnected RDP session, a service session, a screensaver."""
        found = []
        dev = self.station.dev()
        window = self.model_window
        if window is not None and (dev.width < window.width or dev.height < window.height):
            found.append(f"the screen is {dev.width}x{dev.height}, smaller than the application's window as its "
                         f"model was recorded ({window.width}x{window.height}): give the display at least that size")
        elif window is None and self.expected_screen is not None and (dev.width, dev.height) != tuple(self.expected_screen):
            want = self.expected_screen
            found.append(f"the screen is {dev.width}x{dev.height}, the application expects {want[0]}x{want[1]}: "
                         f"set the display to {want[0]}x{want[1]} (on a VM, its virtual display adapter's resolution)")
        found += await asyncio.to_thread(self.host.problems)
        return found

    def note_session(self, account: str | None) -> None:
        """What a playbook or session reader learnt about the app's login (None: logged out)."""
        if account is None:
            self.session.signed_out()
        else:
            self.session.signed_in(account)

    # -- input -------------------------------------------------------------------------------

    async def move(self, x: int, y: int) -> None:
        x, y = self._placement.point(x, y)
        await self._input(lambda d: setattr(d.mouse, "position", (x, y)), touches=self.pointer_counts)

    async def click(self, x: int, y: int, *, button: str = "left", count: int = 1) -> None:
        if button not in _BUTTONS:
            raise ValueError(f"button must be one of {', '.join(_BUTTONS)}")
        x, y = self._placement.point(x, y)

        def send(d: _Devices) -> None:
            d.mouse.position = (x, y)
            d.mouse.click(getattr(d.Button, button), count)

        await self._input(send)

    async def drag(self, x1: int, y1: int, x2: int, y2: int) -> None:
        (x1, y1), (x2, y2) = self._placement.point(x1, y1), self._placement.point(x2, y2)

        def send(d: _Devices) -> None:
            d.mouse.position = (x1, y1)
            d.mouse.press(d.Button.left)
            steps = max(2, int(max(abs(x2 - x1), abs(y2 - y1)) / 20))
            for i in range(1, steps + 1):  # toolkits want motion between press and release
                d.mouse.position = (x1 + (x2 - x1) * i // steps, y1 + (y2 - y1) * i // steps)
            d.mouse.release(d.Button.left)

        await self._input(send)

    async def type_text(self, text: str) -> None:
        """Type ``text`` into the application (see the module's docstring: focus, XTest)."""
        self.station.dev().check_text(text)  # a character that cannot be typed fails before any key
        for start in range(0, len(text), TYPE_BATCH):
            chunk = text[start : start + TYPE_BATCH]
            await self._keys(lambda d, chunk=chunk: d.type(chunk))  # type: ignore[misc]

    async def press(self, *keys: str) -> None:
        if not keys:
            raise ValueError("press() needs at least one key")
        dev = self.station.dev()
        for k in keys:
            dev.key(k)  # an unknown key fails before any is pressed
        await self._keys(lambda d: d.press(keys))

    async def _keys(self, send: Callable[[_Devices], None]) -> None:
        """Keyboard input: first make sure the keyboard focus is the application's (the host
        gives it to the app's window when it is not, as a window manager would), then send —
        both in the same gated batch."""
        pid = self.app_pid
        focus: Callable[[int], str | None] | None = getattr(self.host, "focus_app", None)

        def run(d: _Devices) -> None:
            if focus is not None and pid is not None:
                moved = focus(pid)
                if moved is not None:
                    log.info("%s: %s", self.name, moved, extra={"machine": self.name})
            send(d)

        await self._input(run)

    async def scroll(self, dy: int, dx: int = 0) -> None:
        await self._input(lambda d: d.mouse.scroll(dx, dy))

    async def _input(self, send: Callable[[_Devices], None], *, touches: bool = True) -> None:
        """Send input through the gate. ``touches``: the input resets the app's idle clock."""
        await self.station.send(send)
        if touches:
            self.session.touched()

    # -- operator controls ---------------------------------------------------------------------

    async def stop_app(self) -> None:
        """Stop the application (SIGKILL if it will not exit) and leave it stopped."""
        await asyncio.to_thread(self._stop_app)

    async def restart_app(self) -> None:
        """Stop the app (SIGKILL if it will not exit) and start it; return once it shows."""
        await asyncio.to_thread(self._stop_app)
        self.restarts += 1
        await self._launch()

    async def reboot(self) -> None:
        """Restart the machine — for an Xvfb machine, the X server — and every app on it."""
        await self.station.reboot()

    # -- the application process -----------------------------------------------------------------

    def _find_running(self) -> int | None:
        """The pid of this app already running in this session, if any."""
        if self.app.window:
            pid = self.host.find_window(self.app.window)
            if pid is not None:
                return pid
        if not self.app.process:
            return None
        pattern = re.compile(self.app.process)
        display = self.host.display
        me = os.getpid()
        for p in psutil.process_iter(["pid", "cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["pid"] == me or not cmd or not pattern.search(cmd):
                continue
            if display is not None:
                with contextlib.suppress(psutil.Error, KeyError):
                    if p.environ().get("DISPLAY") not in (display, None):
                        continue  # the same app on another display of this host
            return int(p.info["pid"])
        return None

    def let_go(self) -> None:
        """Stop watching the application without stopping it (one we took over)."""
        self.session.signed_out()
        self._proc, self._ps = None, None

    def _attach(self, pid: int) -> None:
        self._proc = None
        self._ps = psutil.Process(pid)
        self.attached = True
        with contextlib.suppress(psutil.Error):
            self._ps.cpu_percent(None)  # the first reading only starts the measurement
        self.host.show_window(pid)
        log.info("took over the running application on %s (pid %d)", self.name, pid, extra={"machine": self.name})

    async def _launch(self) -> None:
        self.session.signed_out()  # a new app process starts logged out
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.app.start_timeout
        proc = await asyncio.to_thread(self._spawn)
        while not await asyncio.to_thread(self.host.show_window, proc.pid):
            if proc.poll() is not None:
                raise DesktopError(f"the application on {self.name} exited at start (status {proc.returncode})"
                                   f"{self._said()}")
            if loop.time() > deadline:
                raise DesktopError(f"the application's window did not appear on {self.name} "
                                   f"within {self.app.start_timeout:g}s{self._said()}")
            await asyncio.sleep(POLL)
        if self.started is None:
            return
        # Mapped is not drawn: wait until the screen shows something the model recognises.
        while not self.started(await self.screenshot()):
            if proc.poll() is not None:
                raise DesktopError(f"the application on {self.name} exited at start (status {proc.returncode})")
            if loop.time() > deadline:
                raise DesktopError(f"the application on {self.name} showed no screen its model knows "
                                   f"within {self.app.start_timeout:g}s")
            await asyncio.sleep(POLL)

    def _said(self) -> str:
        """The last line the application wrote to its log, to quote in an error about it."""
        if self.app.log is None:
            return ""
        try:
            with open(self.app.log, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 2048))
                lines = [line.strip() for line in f.read().decode("utf-8", "replace").splitlines() if line.strip()]
        except OSError:
            return ""
        return f"; it said: {lines[-1][:300]} (log: {self.app.log})" if lines else f" (log: {self.app.log}, empty)"

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = {**os.environ, **self.host.env(), **self.app.env}
        out: Any = subprocess.DEVNULL
        if self.app.log is not None:
            self.app.log.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.app.log, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            proc = subprocess.Popen(list(self.app.argv), env=env, cwd=self.app.cwd, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT if out is not subprocess.DEVNULL else out)
        except OSError as exc:
            raise DesktopError(f"cannot start the application on {self.name}: {exc}") from exc
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        self._proc = proc
        self._ps = psutil.Process(proc.pid)
        self.attached = False
        with contextlib.suppress(psutil.Error):
            self._ps.cpu_percent(None)  # the first reading only starts the measurement
        log.info("started the application on %s (pid %d)", self.name, proc.pid, extra={"machine": self.name})
        return proc

    def _stop_app(self) -> None:
        self.session.signed_out()
        proc, ps, self._proc, self._ps = self._proc, self._ps, None, None
        if proc is not None:
            if proc.poll() is not None:
                return
            self._ask_to_exit(proc.pid, proc.terminate)
            try:
                proc.wait(self.app.stop_grace)
            except subprocess.TimeoutExpired:
                log.info("the application on %s ignored the request to exit; killing it", self.name,
                         extra={"machine": self.name})
                proc.kill()
                proc.wait(10)
            return
        if ps is None:
            return
        try:  # an application we attached to: not our child, so psutil does the waiting
            self._ask_to_exit(ps.pid, ps.terminate)
            ps.wait(self.app.stop_grace)
        except psutil.TimeoutExpired:
            with contextlib.suppress(psutil.Error):
                ps.kill()
                ps.wait(10)
        except psutil.Error:
            pass

    def _ask_to_exit(self, pid: int, terminate: Callable[[], None]) -> None:
        if self.app.stop_command:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run([a.replace("{pid}", str(pid)) for a in self.app.stop_command],
                               env={**os.environ, **self.host.env()}, timeout=self.app.stop_grace,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                return
        with contextlib.suppress(ProcessLookupError, psutil.Error):
            terminate()


def _check_region(dev: _Devices, region: Region) -> None:
    if (region.width <= 0 or region.height <= 0 or region.left < 0 or region.top < 0
            or region.left + region.width > dev.width or region.top + region.height > dev.height):
        raise ValueError(f"region {tuple(region)} is not within the {dev.width}x{dev.height} screen")
