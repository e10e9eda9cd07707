"""The desktop API that automations, playbooks and the agent drive.

One protocol, several implementations: simulated desktops (a pack's ``[hooks] sim``) for
unit tests, the demo and scale tests; the real desktop (:mod:`.driver`: mss, pynput,
tesseract) on X11 displays — started by :mod:`.xvfb`, or the session's own (:mod:`.local`)
— and on Windows (:mod:`.windows` holds the Windows-only extras). Code written against
:class:`Desktop` runs on any of them; ``deskfleet.agent.host`` puts them under agents.

Public here, for pack authors' tools and tests: :class:`Desktop`, :class:`Region`,
:class:`DesktopInfo`, :func:`note_session`, and (imported on first use) ``RealDesktop``,
``Station``, ``AppCommand``, ``XvfbDisplay`` and ``xvfb_desktop`` — a real desktop with an
application on a fresh Xvfb display. A real desktop
keeps a note of the account its application is logged in as (:mod:`.session`), which
playbooks update through :func:`note_session`.

The API is asynchronous because an agent process may host many simulated desktops; a
real driver offloads its blocking calls to a thread. Synchronous automations get a
blocking facade (see ``deskfleet.sdk``).

Frames are RGB ``numpy.ndarray`` of shape (height, width, 3), dtype uint8 — what mss
produces without a copy through PIL.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

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


_LAZY = {"RealDesktop": "driver", "Station": "driver", "AppCommand": "driver", "capture_screen": "driver",
         "XvfbDisplay": "xvfb", "xvfb_desktop": "xvfb"}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'deskfleet.desktop' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from .driver import AppCommand as AppCommand
    from .driver import RealDesktop as RealDesktop
    from .driver import Station as Station
    from .driver import capture_screen as capture_screen
    from .xvfb import XvfbDisplay as XvfbDisplay
    from .xvfb import xvfb_desktop as xvfb_desktop
