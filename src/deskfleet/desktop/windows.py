"""Windows-only extras of the desktop driver: the console host, session checks, UI Automation.

The driver itself (:mod:`.driver`: mss, pynput, tesseract) is the same on Windows as on
X11. What only Windows has lives here, behind the optional extra
``pip install deskfleet[windows]`` (uiautomation, pywinauto), imported lazily so this
module imports anywhere:

- :class:`ConsoleHost` — the :class:`~deskfleet.desktop.driver.Host` of the interactive
  session an agent runs in (``deskfleet agent --desktop local`` on Windows): boot id and
  time from the OS, the app's top-level windows through UI Automation (found by title to
  take over a running app, brought to the foreground by process id), a reboot through
  the operator's ``--reboot-command``;
- :func:`console_problems` — why this session cannot be driven unattended, one line each
  that says what to do: a service session (no desktop at all), a disconnected remote
  session (nothing drawn, input fails), a locked screen or another desktop taking the
  input (the logon screen, a UAC prompt), a running screensaver. A screen of the wrong
  size is not here: :meth:`RealDesktop.problems <deskfleet.desktop.driver.RealDesktop.problems>`
  checks the frames themselves, on every platform;
- :func:`find_control` — a control of the app's window located through UI Automation, for
  applications that expose an accessibility tree (Tk does not; DemoEHR is recognised by
  its pixels alone).

**What was run where.** Our CI and development machines run Linux. The unit tests
(tests/unit/test_windows.py) run this module against fakes of the Win32 functions it
calls (declared with their documented prototypes) and of the ``uiautomation`` package;
nothing here has run on real Windows. See docs/real-desktops.md ("Windows") for what
that leaves unproven and for the unattended set-up (auto-logon, no lock screen, tscon).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import re
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psutil

from ..errors import ConfigError, DesktopError
from . import Region

if TYPE_CHECKING:
    from .driver import Host

log = logging.getLogger(__name__)

EXTRA_HINT = "install the Windows extras: pip install 'deskfleet[windows]'"
#: seconds to wait for Windows to end this process after the reboot command
REBOOT_WAIT = 600.0
#: what to pass as ``--reboot-command`` on Windows: /f closes applications that would
#: otherwise hold the restart up with an "unsaved changes" prompt nobody answers
REBOOT_COMMAND = "shutdown /r /f /t 0"

# Win32 types by size. ctypes.wintypes follows the C long of the machine it runs on (64
# bits on Linux), which would give the structures below another layout in the tests.
DWORD = ctypes.c_uint32
BOOL = ctypes.c_int32
LONG = ctypes.c_int32
UINT = ctypes.c_uint32
HANDLE = ctypes.c_void_p

WTS_CURRENT_SERVER_HANDLE = None
WTS_CURRENT_SESSION = 0xFFFFFFFF
WTS_SESSION_INFO_EX = 25  # WTS_INFO_CLASS.WTSSessionInfoEx
WTS_ACTIVE = 0  # WTS_CONNECTSTATE_CLASS.WTSActive
WTS_DISCONNECTED = 4  # WTS_CONNECTSTATE_CLASS.WTSDisconnected
# WTSINFOEX_LEVEL1.SessionFlags (reversed on Windows 7 / 2008 R2, where Python 3.11 does not run)
WTS_SESSIONSTATE_LOCK = 0
WTS_SESSIONSTATE_UNLOCK = 1
NO_CONSOLE_SESSION = 0xFFFFFFFF  # WTSGetActiveConsoleSessionId while sessions are switching
DESKTOP_READOBJECTS = 0x0001
DESKTOP_SWITCHDESKTOP = 0x0100
UOI_NAME = 2
SPI_GETSCREENSAVERRUNNING = 0x0072

# -- what to tell the operator, one line per problem -------------------------------------------

SERVICE = ("running in session 0 (as a Windows service): a service has no desktop to drive; "
           "start the agent at logon of the robot account (a scheduled task 'At log on') instead")
DISCONNECTED = ("this remote desktop session is disconnected: nothing is drawn and input fails; "
                "reconnect, and hand the session to the console before disconnecting "
                "(tscon {session} /dest:console)")
LOCKED = ("the screen is locked: input would go to the logon screen; disable the lock screen for "
          "robot accounts (and the screensaver's 'On resume, display logon screen')")
SCREENSAVER = "the screensaver is running: frames show it, not the app; disable the screensaver for robot accounts"
SECURE_DESKTOP = ("input goes to a secure desktop (a UAC prompt, Ctrl+Alt+Del or the logon screen is up), not "
                  "to the app: UAC prompts cannot be automated; run the app without elevation (or the agent elevated too)")
OTHER_DESKTOP = "input goes to the {desktop!r} desktop, not to this agent's {own!r}: switch the session back to {own!r}"


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


# -- the Win32 surface --------------------------------------------------------------------------


class _WTSINFOEX_LEVEL1_W(ctypes.Structure):  # the Win32 names
    _fields_ = [
        ("SessionId", DWORD),
        ("SessionState", ctypes.c_int32),  # WTS_CONNECTSTATE_CLASS
        ("SessionFlags", LONG),
        ("WinStationName", ctypes.c_uint16 * 33),  # WCHAR[WINSTATIONNAME_LENGTH + 1]
        ("UserName", ctypes.c_uint16 * 21),
        ("DomainName", ctypes.c_uint16 * 18),
        ("LogonTime", ctypes.c_int64),  # LARGE_INTEGER
        ("ConnectTime", ctypes.c_int64),
        ("DisconnectTime", ctypes.c_int64),
        ("LastInputTime", ctypes.c_int64),
        ("CurrentTime", ctypes.c_int64),
        ("IncomingBytes", DWORD),
        ("OutgoingBytes", DWORD),
        ("IncomingFrames", DWORD),
        ("OutgoingFrames", DWORD),
        ("IncomingCompressedBytes", DWORD),
        ("OutgoingCompressedBytes", DWORD),
    ]


class _WTSINFOEXW(ctypes.Structure):
    _fields_ = [("Level", DWORD), ("Data", _WTSINFOEX_LEVEL1_W)]  # Data: a union of one member


@dataclass(frozen=True, slots=True)
class _Session:
    """This process's session as Windows describes it (None: could not be told)."""

    id: int | None
    state: int | None  # WTS_CONNECTSTATE_CLASS
    locked: bool | None
    console: int | None  # the session attached to the physical console, if any


class _Win32:
    """The Win32 functions the console checks call, with their documented prototypes.

    They are declared on private library handles: a prototype set on the shared
    ``ctypes.windll`` is shared with, and can be overwritten by, uiautomation and pynput.
    A HANDLE result must be declared ``c_void_p``, or a 64-bit handle is cut to 32 bits.
    """

    def __init__(self) -> None:
        load = ctypes.WinDLL  # type: ignore[attr-defined]
        kernel32 = load("kernel32", use_last_error=True)
        user32 = load("user32", use_last_error=True)
        wtsapi32 = load("wtsapi32", use_last_error=True)
        self.GetCurrentProcessId = _declare(kernel32, "GetCurrentProcessId", [], DWORD)
        self.GetCurrentThreadId = _declare(kernel32, "GetCurrentThreadId", [], DWORD)
        self.ProcessIdToSessionId = _declare(kernel32, "ProcessIdToSessionId", [DWORD, ctypes.POINTER(DWORD)], BOOL)
        self.WTSGetActiveConsoleSessionId = _declare(kernel32, "WTSGetActiveConsoleSessionId", [], DWORD)
        self.WTSQuerySessionInformationW = _declare(
            wtsapi32, "WTSQuerySessionInformationW",
            [HANDLE, DWORD, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(DWORD)], BOOL)
        self.WTSFreeMemory = _declare(wtsapi32, "WTSFreeMemory", [ctypes.c_void_p], None)
        self.OpenInputDesktop = _declare(user32, "OpenInputDesktop", [DWORD, BOOL, DWORD], HANDLE)
        self.GetThreadDesktop = _declare(user32, "GetThreadDesktop", [DWORD], HANDLE)
        self.GetUserObjectInformationW = _declare(
            user32, "GetUserObjectInformationW", [HANDLE, ctypes.c_int, ctypes.c_void_p, DWORD, ctypes.POINTER(DWORD)],
            BOOL)
        self.CloseDesktop = _declare(user32, "CloseDesktop", [HANDLE], BOOL)
        self.SystemParametersInfoW = _declare(user32, "SystemParametersInfoW", [UINT, UINT, ctypes.c_void_p, UINT], BOOL)

    def session(self) -> _Session:
        sid: int | None = None
        value = DWORD()
        if self.ProcessIdToSessionId(self.GetCurrentProcessId(), ctypes.byref(value)):
            sid = value.value
        else:
            log.debug("ProcessIdToSessionId failed (error %d)", _last_error())
        state, locked = self._session_info(WTS_CURRENT_SESSION if sid is None else sid)
        console = self.WTSGetActiveConsoleSessionId()
        return _Session(sid, state, locked, None if console == NO_CONSOLE_SESSION else console)

    def _session_info(self, session: int) -> tuple[int | None, bool | None]:
        buffer, size = ctypes.c_void_p(), DWORD()
        if not self.WTSQuerySessionInformationW(WTS_CURRENT_SERVER_HANDLE, session, WTS_SESSION_INFO_EX,
                                                ctypes.byref(buffer), ctypes.byref(size)):
            log.debug("WTSQuerySessionInformationW failed (error %d)", _last_error())
            return None, None
        try:
            if not buffer.value or size.value < ctypes.sizeof(_WTSINFOEXW):
                return None, None
            info = _WTSINFOEXW.from_address(buffer.value)
            if info.Level != 1:
                return None, None
            flags = info.Data.SessionFlags
            locked = {WTS_SESSIONSTATE_LOCK: True, WTS_SESSIONSTATE_UNLOCK: False}.get(flags)
            return int(info.Data.SessionState), locked
        finally:
            self.WTSFreeMemory(buffer)

    def input_desktop(self) -> str | None:
        """The name of the desktop that receives input; None if this process may not open it
        (the Winlogon desktop of the lock screen, a UAC prompt, Ctrl+Alt+Del)."""
        desktop = self.OpenInputDesktop(0, False, DESKTOP_READOBJECTS | DESKTOP_SWITCHDESKTOP)
        if not desktop:
            return None
        try:
            return self._name(desktop)
        finally:
            self.CloseDesktop(desktop)

    def own_desktop(self) -> str | None:
        """The name of the desktop this thread's windows live on (normally "Default")."""
        desktop = self.GetThreadDesktop(self.GetCurrentThreadId())  # not to be closed
        return self._name(desktop) if desktop else None

    def _name(self, desktop: int) -> str | None:
        name = ctypes.create_unicode_buffer(256)
        needed = DWORD()
        if not self.GetUserObjectInformationW(desktop, UOI_NAME, name, ctypes.sizeof(name), ctypes.byref(needed)):
            return None
        return name.value

    def screensaver_running(self) -> bool:
        running = BOOL()
        return bool(self.SystemParametersInfoW(SPI_GETSCREENSAVERRUNNING, 0, ctypes.byref(running), 0)
                    and running.value)


def _last_error() -> int:
    get = getattr(ctypes, "get_last_error", None)  # Windows only
    return int(get()) if get is not None else 0


def _declare(dll: Any, name: str, argtypes: list[Any], restype: Any) -> Any:
    function = getattr(dll, name)
    function.argtypes = argtypes
    function.restype = restype
    return function


def console_problems() -> list[str]:
    """What keeps this session from being driven unattended, one line each that says what to
    do (an empty list: nothing). A question Windows will not answer counts against nothing."""
    _require_windows()
    win = _Win32()
    session = win.session()
    if session.id == 0:
        return [SERVICE]  # nothing else about session 0 matters
    if session.state == WTS_DISCONNECTED:
        # OpenInputDesktop answers for the desktop the session will show once reconnected,
        # so the input-desktop check below cannot see this.
        return [DISCONNECTED.format(session=session.id if session.id is not None else "<session>")]
    problems = []
    if session.locked:
        problems.append(LOCKED)
    elif win.screensaver_running():
        problems.append(SCREENSAVER)
    else:
        desktop, own = win.input_desktop(), win.own_desktop()
        if desktop is None or desktop.lower() == "winlogon":
            problems.append(SECURE_DESKTOP)
        elif own is not None and desktop.lower() != own.lower():
            problems.append(OTHER_DESKTOP.format(desktop=desktop, own=own))
    return problems


def _note_remote(session: _Session) -> None:
    """A connected remote session is drivable — until its client disconnects or is minimised
    (Windows then stops drawing it): say so once, at start."""
    if session.id is not None and session.id != 0 and session.state == WTS_ACTIVE and session.id != session.console:
        log.warning("this agent runs in remote desktop session %d, not at the console: input stops when the "
                    "client disconnects or is minimised; before disconnecting, hand the session to the console "
                    "(tscon %d /dest:console)", session.id, session.id)


# -- the host -------------------------------------------------------------------------------------


class ConsoleHost:
    """The interactive session this process runs in, on a Windows machine.

    ``reboot_command`` (e.g. ``["shutdown", "/r", "/f", "/t", "0"]``): how the agent may
    reboot the machine. Without it, a reboot playbook fails and says so — a rebooted
    Windows brings the agent back only with auto-logon and a logon task, which only the
    operator knows are there.
    """

    def __init__(self, *, reboot_command: Sequence[str] | None = None) -> None:
        _require_windows()
        self._auto = _uiautomation()  # a missing extra fails at start, with the fix
        self.reboot_command = list(reboot_command or [])
        # Cached: psutil derives Windows' boot time from the clock minus the uptime, so it
        # moves with clock adjustments and by a second between processes (psutil #1007).
        self._booted_at = float(psutil.boot_time())
        self._boot_id = hashlib.sha256(f"{socket.gethostname()}:{self._booted_at:.0f}".encode()).hexdigest()[:16]
        try:
            _note_remote(_Win32().session())
        except Exception as exc:  # a note, not a check: nothing depends on it
            log.debug("cannot tell which session this is: %s", exc)

    @property
    def attachable(self) -> bool:
        return True  # the session is the user's: the app may well be running already

    @property
    def display(self) -> str | None:
        return None  # mss and pynput use the session's own screen

    def env(self) -> dict[str, str]:
        return {}

    def boot_id(self) -> str:
        return self._boot_id

    def booted_at(self) -> float:
        return self._booted_at

    def show_window(self, pid: int) -> bool:
        """True once a top-level window of ``pid`` is up (a minimised one is restored); bring
        it to the foreground, which receives the keyboard.

        Windows lets only some processes take the foreground (SetForegroundWindow's rules);
        when it refuses, the window is still there and the playbook's first click activates
        it, so the answer stays True."""
        auto = self._auto
        with auto.UIAutomationInitializerInThread():  # UI Automation is COM: each thread joins it
            for window, owner, title in self._top_level():
                if owner != pid:
                    continue
                try:
                    focused = window.SetActive(waitTime=0)
                except Exception as exc:  # closed meanwhile, or a window kind with no activation
                    log.debug("cannot activate window %r of pid %d: %s", title, pid, exc)
                    continue
                if not focused:
                    log.info("Windows did not bring %r (pid %d) to the foreground; the first click will", title, pid)
                return True
        return False

    def find_window(self, title: str) -> int | None:
        """The process id of a top-level window whose title matches the regex ``title``
        (visible or minimised; hidden and off-screen windows do not count)."""
        pattern = re.compile(title)
        with self._auto.UIAutomationInitializerInThread():
            for _, owner, name in self._top_level():
                if pattern.search(name):
                    return owner
        return None

    def _top_level(self) -> list[tuple[Any, int, str]]:
        """The top-level windows of this session's desktop a user can see or restore:
        (control, pid, title). UI Automation calls a minimised window offscreen."""
        auto = self._auto
        found = []
        for window in auto.GetRootControl().GetChildren():
            try:
                if window.IsOffscreen and not auto.IsIconic(window.NativeWindowHandle):
                    continue
                found.append((window, int(window.ProcessId), window.Name or ""))
            except Exception:  # COMError: it went away between the listing and the question
                continue
        return found

    def problems(self) -> list[str]:
        """Console problems are machine health: pre-flight refuses work while there are any."""
        return console_problems()

    def restart(self) -> None:
        """Reboot Windows with ``reboot_command``. This process ends with it; returning
        means it did not happen."""
        if not self.reboot_command:
            raise DesktopError("this machine cannot be rebooted by the agent (no --reboot-command): reboot it by "
                               f"hand, or give the agent --reboot-command \"{REBOOT_COMMAND}\" once auto-logon and a "
                               "logon task bring it back after a reboot")
        command = " ".join(self.reboot_command)
        try:
            subprocess.run(self.reboot_command, check=True, capture_output=True, timeout=30)
        except subprocess.CalledProcessError as exc:
            said = (exc.stderr or exc.stdout or b"").decode(errors="replace").strip()
            raise DesktopError(f"the reboot command ({command}) failed with status {exc.returncode}"
                               f"{': ' + said if said else ''}") from exc
        except (OSError, subprocess.SubprocessError) as exc:
            raise DesktopError(f"the reboot command ({command}) failed: {exc}") from exc
        time.sleep(REBOOT_WAIT)
        raise DesktopError(f"Windows did not restart within {REBOOT_WAIT:g}s of the reboot command ({command})")

    def close(self) -> None:
        """Nothing to stop: the session is not ours."""


if TYPE_CHECKING:

    def _is_a_host(host: ConsoleHost) -> Host:
        return host  # mypy checks that ConsoleHost satisfies the Host protocol


# -- UI Automation ---------------------------------------------------------------------------


def find_control(pid: int, *, name: str | None = None, automation_id: str | None = None,
                 control_type: str | None = None, timeout: float = 5.0) -> Region | None:
    """The screen rectangle of a control in ``pid``'s windows, found through UI Automation.

    ``control_type`` is a UI Automation control type: ``"Button"``, ``"Edit"``,
    ``"ListItem"``… (or ``"ButtonControl"``). Blocks for up to ``timeout`` seconds per
    window of ``pid``: from async code, call it in a thread (``asyncio.to_thread``).
    """
    auto = _uiautomation()
    criteria: dict[str, Any] = {}
    if name is not None:
        criteria["Name"] = name
    if automation_id is not None:
        criteria["AutomationId"] = automation_id
    if control_type is not None:
        # uiautomation matches on the ControlType id; any other keyword is silently ignored
        key = control_type if control_type.endswith("Control") else f"{control_type}Control"
        kind = getattr(auto.ControlType, key, None)
        if not isinstance(kind, int):
            raise ValueError(f"unknown control type {control_type!r} (e.g. Button, Edit, ListItem, MenuItem)")
        criteria["ControlType"] = kind
    if not criteria:
        raise ValueError("find_control needs a name, an automation_id or a control_type")
    with auto.UIAutomationInitializerInThread():
        for window in auto.GetRootControl().GetChildren():
            try:
                if window.ProcessId != pid:
                    continue
            except Exception:  # COMError: it went away
                continue
            control = window.Control(searchDepth=32, **criteria)
            if control.Exists(timeout, 0.1):
                r = control.BoundingRectangle
                return Region(r.left, r.top, r.width(), r.height())
    return None
