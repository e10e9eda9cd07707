"""Windows-only extras of the desktop driver: the console host, session checks, UI Automation.

The driver itself (:mod:`.driver`: mss, pynput, tesseract) is the same on Windows as on
X11. What only Windows has lives here, behind the optional extra
``pip install deskfleet[windows]`` (uiautomation, pywinauto), imported lazily:

- :class:`ConsoleHost` — the :class:`~deskfleet.desktop.driver.Host` of the interactive
  console session an agent runs in: boot id and time from the OS, the app's window found
  by process id and brought to the foreground, reboot through ``shutdown /r``;
- :func:`console_problems` — why this session cannot be driven unattended, if it cannot:
  not the console session (an agent running as a service has no desktop to drive), a
  locked screen or the secure desktop (input would go to the logon screen), a running
  screensaver, or a resolution other than the one the app model was recorded at (a
  console with no RDP client attached takes the virtual adapter's resolution, sometimes
  800x600);
- :func:`find_control` — a control of the app's window located through UI Automation, for
  applications that expose an accessibility tree (Tk does not; DemoEHR is recognised by
  its pixels alone).

**Not tested here.** Our CI and development machines run Linux; nothing in this module
runs in the test suite, and no test pretends otherwise. It is written against the Win32
and UI Automation documentation; verify it on your VMs before relying on it, and see
docs/real-desktops.md for the unattended set-up (auto-logon, no lock screen, tscon).
"""

from __future__ import annotations

import ctypes
import hashlib
import re
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import psutil

from ..errors import ConfigError, DesktopError
from . import Region

EXTRA_HINT = "install the Windows extras: pip install 'deskfleet[windows]'"
REBOOT_WAIT = 600.0  # seconds to wait for Windows to end this process after shutdown /r


def _require_windows() -> None:
    if sys.platform != "win32":
        raise ConfigError("this needs Windows (deskfleet.desktop.windows is the Windows-only part of the driver)")


def _uiautomation() -> Any:
    _require_windows()
    try:
        import uiautomation
    except ImportError as exc:
        raise ConfigError(f"uiautomation is missing: {EXTRA_HINT}") from exc
    return uiautomation


class ConsoleHost:
    """The interactive session this process runs in, on a Windows machine."""

    def __init__(self, *, reboot_command: Sequence[str] | None = None,
                 expected: tuple[int, int] | None = None) -> None:
        _require_windows()
        self.reboot_command = list(reboot_command or ["shutdown", "/r", "/t", "0", "/c", "deskfleet: machine restart"])
        self.expected = expected

    @property
    def attachable(self) -> bool:
        return True  # the session is the user's: the app may well be running already

    @property
    def display(self) -> str | None:
        return None  # mss and pynput use the session's own screen

    def env(self) -> dict[str, str]:
        return {}

    def boot_id(self) -> str:
        return hashlib.sha256(f"{socket.gethostname()}:{psutil.boot_time():.0f}".encode()).hexdigest()[:16]

    def booted_at(self) -> float:
        return float(psutil.boot_time())

    def show_window(self, pid: int) -> bool:
        auto = _uiautomation()
        for window in auto.GetRootControl().GetChildren():
            if window.ProcessId == pid and not window.IsOffscreen:
                try:
                    window.SetActive()  # the foreground window receives the keyboard
                except Exception:
                    return False
                return True
        return False

    def find_window(self, title: str) -> int | None:
        """The process id of a visible top-level window whose title matches the regex ``title``."""
        pattern = re.compile(title)
        auto = _uiautomation()
        for window in auto.GetRootControl().GetChildren():
            if not window.IsOffscreen and pattern.search(window.Name or ""):
                return int(window.ProcessId)
        return None

    def problems(self) -> list[str]:
        """Console problems are machine health: pre-flight refuses work while there are any."""
        return console_problems(self.expected)

    def restart(self) -> None:
        """Reboot Windows. The agent process ends with it; returning means it did not happen."""
        try:
            subprocess.run(self.reboot_command, check=True, capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            raise DesktopError(f"shutdown /r failed: {exc}") from exc
        time.sleep(REBOOT_WAIT)
        raise DesktopError(f"Windows did not restart within {REBOOT_WAIT:g}s of shutdown /r")

    def close(self) -> None:
        """Nothing to stop: the session is not ours."""


def console_problems(expected: tuple[int, int] | None = None) -> list[str]:
    """What keeps this session from being driven unattended (an empty list: nothing)."""
    _require_windows()
    problems = []
    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    user32 = ctypes.windll.user32  # type: ignore[attr-defined]
    session = ctypes.c_ulong()
    if not kernel32.ProcessIdToSessionId(kernel32.GetCurrentProcessId(), ctypes.byref(session)):
        problems.append("cannot tell which session this process runs in")
    elif session.value == 0:
        problems.append("running in session 0 (a service): there is no desktop to drive; start the agent at logon")
    elif session.value != kernel32.WTSGetActiveConsoleSessionId():
        problems.append("not the console session (an RDP session?): input stops when the client disconnects; "
                        "hand the session to the console with tscon before disconnecting")
    desktop = user32.OpenInputDesktop(0, False, 0x0100)  # DESKTOP_SWITCHDESKTOP
    if not desktop:
        problems.append("the input desktop is not ours: the screen is locked or a UAC/logon screen is up")
    else:
        user32.CloseDesktop(desktop)
    running = ctypes.c_int()
    if user32.SystemParametersInfoW(0x0072, 0, ctypes.byref(running), 0) and running.value:  # SPI_GETSCREENSAVERRUNNING
        problems.append("the screensaver is running: disable it for robot accounts")
    if expected is not None:
        size = (user32.GetSystemMetrics(0), user32.GetSystemMetrics(1))
        if size != expected:
            problems.append(f"the screen is {size[0]}x{size[1]}, the app model expects {expected[0]}x{expected[1]}")
    return problems


def find_control(pid: int, *, name: str | None = None, automation_id: str | None = None,
                 control_type: str | None = None, timeout: float = 5.0) -> Region | None:
    """The screen rectangle of a control in ``pid``'s window, found through UI Automation."""
    auto = _uiautomation()
    criteria: dict[str, Any] = {}
    if name is not None:
        criteria["Name"] = name
    if automation_id is not None:
        criteria["AutomationId"] = automation_id
    if control_type is not None:
        criteria["ControlTypeName"] = control_type
    for window in auto.GetRootControl().GetChildren():
        if window.ProcessId != pid:
            continue
        control = window.Control(searchDepth=32, **criteria)
        if control.Exists(timeout, 0.1):
            r = control.BoundingRectangle
            return Region(r.left, r.top, r.width(), r.height())
    return None
