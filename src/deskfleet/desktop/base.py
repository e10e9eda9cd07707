"""The desktop API itself: the :class:`Desktop` protocol and the values it speaks in —
frames, regions, windows, where a model sits on the screen — with no driver behind them.

Everything that works on desktops imports these from here: recognition (``deskfleet.vision``)
below the drivers, the drivers (:mod:`.driver`, :mod:`.xvfb`, :mod:`.windows`) that read text
with recognition's OCR, and everything above. ``deskfleet.desktop`` re-exports them, with
the drivers on first use.

Frames are RGB ``numpy.ndarray`` of shape (height, width, 3), dtype uint8 — what mss
produces without a copy through PIL.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

Frame = npt.NDArray[np.uint8]


class Region(NamedTuple):
    left: int
    top: int
    width: int
    height: int

    def crop(self, frame: Frame) -> Frame:
        return frame[self.top : self.top + self.height, self.left : self.left + self.width]

    @property
    def center(self) -> tuple[int, int]:
        return self.left + self.width // 2, self.top + self.height // 2


@dataclass(frozen=True, slots=True)
class Window:
    """One viewable top-level window, as the window system describes it."""

    id: int
    title: str
    rect: Region  # on the screen, without a window manager's frame
    pid: int | None  # of the process that owns it
    dialog_of: int | None = None  # the window it is a dialog of (X11: WM_TRANSIENT_FOR; Windows: owner)
    popup: bool = False  # a menu, a tooltip, a drop-down list (X11: override-redirect)
    protocols: frozenset[str] = frozenset()  # WM_DELETE_WINDOW, _NET_WM_PING: X11 WM_PROTOCOLS; on Windows, the capability they name

    def overlaps(self, other: Region) -> bool:
        r = self.rect
        return (r.left < other.left + other.width and other.left < r.left + r.width
                and r.top < other.top + other.height and other.top < r.top + r.height)

    def contains(self, other: Region) -> bool:
        r = self.rect
        return (r.left <= other.left and other.left + other.width <= r.left + r.width
                and r.top <= other.top and other.top + other.height <= r.top + r.height)

    def describe(self) -> str:
        r = self.rect
        kind = "a menu or popup" if self.popup else "a dialog" if self.dialog_of is not None else "a window"
        title = repr(self.title) if self.title else "(untitled)"
        return f"{title}, {kind} {r.width}x{r.height} at {r.left},{r.top}"


@dataclass(frozen=True, slots=True)
class WindowFacts:
    """What the window system says about the application beside its pixels: its main window
    and every window stacked above it that overlaps it (its own dialogs and menus, another
    program's windows), bottom to top."""

    main: Window | None
    above: tuple[Window, ...] = ()

    @classmethod
    def of(cls, windows: list[Window], pid: int, *, title: str | None = None) -> WindowFacts:
        """The facts about process ``pid``'s app among a display's ``windows`` (bottom to top).

        Its main window is the largest of its windows that is neither a dialog nor a popup
        (whose title matches the regex ``title``, when given); failing that, the largest of
        its windows that is not a popup (an app showing only its login dialog)."""
        import re

        own = [w for w in windows if w.pid == pid and not w.popup]
        mains = [w for w in own if w.dialog_of is None]
        if title is not None:
            pattern = re.compile(title)
            mains = [w for w in mains if pattern.search(w.title)] or mains
        pool = mains or own
        if not pool:
            return cls(None)
        main = max(pool, key=lambda w: w.rect.width * w.rect.height)
        after = windows[next(i for i, w in enumerate(windows) if w.id == main.id) + 1:]
        return cls(main, tuple(w for w in after if w.overlaps(main.rect)))

    def moved(self, placement: Placement) -> WindowFacts:
        """The same windows in the coordinates of a model placed on the screen by ``placement``."""
        if placement.identity:
            return self

        def one(w: Window) -> Window:
            return Window(w.id, w.title, placement.to_model(w.rect), w.pid, w.dialog_of, w.popup, w.protocols)

        return WindowFacts(one(self.main) if self.main else None, tuple(one(w) for w in self.above))

    def to_dict(self) -> dict[str, object]:
        def one(w: Window) -> dict[str, object]:
            return {"id": w.id, "title": w.title, "rect": list(w.rect), "pid": w.pid, "dialog_of": w.dialog_of,
                    "popup": w.popup}

        return {"main": one(self.main) if self.main else None, "above": [one(w) for w in self.above]}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> WindowFacts:
        def one(d: object) -> Window:
            if not isinstance(d, dict):
                raise ValueError(f"a window must be an object, not {d!r}")
            left, top, width, height = (int(v) for v in d["rect"])
            return Window(int(d.get("id", 0)), str(d.get("title", "")), Region(left, top, width, height),
                          d.get("pid"), d.get("dialog_of"), bool(d.get("popup", False)))

        above = data.get("above") or []
        if not isinstance(above, list):
            raise ValueError("'above' must be a list of windows")
        main = data.get("main")
        return cls(one(main) if main is not None else None, tuple(one(w) for w in above))


#: window sizes whose width and height ratios to the recorded size differ by less than this
#: are the same window scaled (a display's DPI, an RDP client's scaling, Qt's scale factor)
SCALE_TOLERANCE = 0.02


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a model anchored to the app's window sits on the screen now: a model point
    (x, y) is the screen point (x * scale + dx, y * scale + dy). ``of`` finds it from where
    the window is now and where it was recorded: moved, and — when both sides grew or shrank
    by the same factor — scaled (a window merely resized keeps scale 1)."""

    dx: int = 0
    dy: int = 0
    scale: float = 1.0

    @classmethod
    def of(cls, now: Region, recorded: Region) -> Placement:
        sx, sy = now.width / recorded.width, now.height / recorded.height
        scale = (sx + sy) / 2 if abs(sx - sy) < SCALE_TOLERANCE and abs(sx - 1) >= SCALE_TOLERANCE / 2 else 1.0
        return cls(round(now.left - recorded.left * scale), round(now.top - recorded.top * scale), scale)

    @property
    def identity(self) -> bool:
        return (self.dx, self.dy, self.scale) == (0, 0, 1.0)

    def point(self, x: int, y: int) -> tuple[int, int]:
        """A model point on the screen."""
        return round(x * self.scale) + self.dx, round(y * self.scale) + self.dy

    def to_screen(self, region: Region) -> Region:
        left, top = self.point(region.left, region.top)
        return Region(left, top, max(1, round(region.width * self.scale)), max(1, round(region.height * self.scale)))

    def to_model(self, region: Region) -> Region:
        s = self.scale
        return Region(round((region.left - self.dx) / s), round((region.top - self.dy) / s),
                      max(1, round(region.width / s)), max(1, round(region.height / s)))

    def frame(self, frame: Frame, screen: tuple[int, int]) -> Frame:
        """The screen's ``frame`` as the model sees it: of the model's ``screen`` size, the
        window's content where it was recorded, at the size it was recorded."""
        if self.scale == 1.0:
            return as_recorded(frame, (self.dx, self.dy), screen)
        import cv2

        # Resample only the part of the screen that the model's screen covers.
        height, width = frame.shape[:2]
        seen = self.to_screen(Region(0, 0, screen[0], screen[1]))
        left, top = max(0, seen.left), max(0, seen.top)
        right, bottom = min(width, seen.left + seen.width), min(height, seen.top + seen.height)
        if right <= left or bottom <= top:
            return np.zeros((screen[1], screen[0], 3), np.uint8)
        size = (max(1, round((right - left) / self.scale)), max(1, round((bottom - top) / self.scale)))
        small = np.asarray(cv2.resize(frame[top:bottom, left:right], size, interpolation=cv2.INTER_AREA), np.uint8)
        at = (round((left - self.dx) / self.scale), round((top - self.dy) / self.scale))  # its place in the model
        return as_recorded(small, (-at[0], -at[1]), screen)


def as_recorded(frame: Frame, offset: tuple[int, int], screen: tuple[int, int]) -> Frame:
    """``frame`` as a model anchored to the app's window sees it: what the screen shows at
    (x + dx, y + dy) placed at (x, y) — the window's content where it was recorded — on a
    ``screen``-sized frame, black where the screen has nothing to show (as an empty X screen)."""
    dx, dy = offset
    height, width = frame.shape[:2]
    if (dx, dy) == (0, 0) and (width, height) == tuple(screen):
        return frame
    out = np.zeros((screen[1], screen[0], 3), np.uint8)
    left, top = max(0, -dx), max(0, -dy)
    right, bottom = min(screen[0], width - dx), min(screen[1], height - dy)
    if right > left and bottom > top:
        out[top:bottom, left:right] = frame[top + dy : bottom + dy, left + dx : right + dx]
    return out


@runtime_checkable
class SeesWindows(Protocol):
    """A desktop that can ask the window system about its application (a real one)."""

    async def app_windows(self) -> WindowFacts | None:
        """The app's main window and what covers it; None when the app shows no window."""

    async def app_answers(self, timeout: float = 0.5) -> bool | None:
        """Whether the app's event loop answers the window system (X11 ``_NET_WM_PING``)
        within ``timeout`` seconds; None when it cannot be asked (the toolkit does not speak
        the protocol, no window)."""

    async def close_window(self, window: Window) -> bool:
        """Ask ``window`` to close as its close button would; False if it takes no such request."""

    async def bring_to_front(self) -> None:
        """Raise the app's windows over every other program's."""


@dataclass(slots=True)
class DesktopInfo:
    """What the agent reports in its heartbeats about the machine and its application."""

    width: int
    height: int
    boot_id: str
    uptime: float  # seconds since the machine booted
    memory_mb: float  # resident memory of the target application (0 when not running)
    cpu_percent: float
    app_running: bool = True
    session_key: str | None = None  # the account the application is logged in as, if known
    session_expires_at: float | None = None
    #: the OS waits for a reboot to finish an update (Windows' "reboot required" signals,
    #: Debian's /run/reboot-required): the pool drains the machine and reboots it between
    #: runs before the OS forces it
    reboot_pending: bool = False
    extra: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Desktop(Protocol):
    """One machine's screen, keyboard and mouse, plus the controls an operator would use."""

    name: str
    #: Called synchronously immediately before any input reaches the machine — after any
    #: pause, with nothing awaited in between. The agent sets it to refuse input once its
    #: lease may be gone (it raises ``Stopped``), so that a process that was paused (GC,
    #: a frozen VM, SIGSTOP) cannot land a click its lease no longer allows.
    input_gate: Callable[[], None] | None

    async def screenshot(self, region: Region | None = None) -> Frame: ...

    async def click(self, x: int, y: int, *, button: str = "left", count: int = 1) -> None: ...

    async def move(self, x: int, y: int) -> None: ...

    async def drag(self, x1: int, y1: int, x2: int, y2: int) -> None: ...

    async def type_text(self, text: str) -> None: ...

    async def press(self, *keys: str) -> None:
        """A key or a combination pressed together, e.g. ``press("ctrl", "a")``."""

    async def scroll(self, dy: int, dx: int = 0) -> None: ...

    async def read_text(self, region: Region) -> str:
        """Text shown in a small region (OCR on a real desktop)."""

    async def info(self) -> DesktopInfo: ...

    async def restart_app(self) -> None:
        """Stop the target application (forcefully if needed) and start it again."""

    async def reboot(self) -> None:
        """Restart the whole machine; the agent comes back by itself afterwards."""


@runtime_checkable
class NotesSession(Protocol):
    """A desktop that cannot see the application's login for itself (a real one) and keeps
    a note of it, for its heartbeats: see :mod:`deskfleet.desktop.session`."""

    def note_session(self, account: str | None) -> None: ...


def note_session(desktop: Desktop, account: str | None) -> None:
    """Tell ``desktop`` which account its application is now logged in as (None: logged out).

    Playbooks and session readers call it when they learn it; a desktop that knows the
    session by itself (the simulated one) ignores it.
    """
    if isinstance(desktop, NotesSession):
        desktop.note_session(account)
