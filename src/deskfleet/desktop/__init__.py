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

The protocol and its value types (frames, regions, windows) are defined in :mod:`.base`,
which recognition and the drivers import; this package re-exports them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import (
    SCALE_TOLERANCE,
    Desktop,
    DesktopInfo,
    Frame,
    NotesSession,
    Placement,
    Region,
    SeesWindows,
    Window,
    WindowFacts,
    as_recorded,
    note_session,
)

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


__all__ = [
    "SCALE_TOLERANCE", "AppCommand", "Desktop", "DesktopInfo", "Frame", "NotesSession", "Placement", "RealDesktop",
    "Region", "SeesWindows", "Station", "Window", "WindowFacts", "XvfbDisplay", "as_recorded", "capture_screen",
    "note_session", "xvfb_desktop",
]
