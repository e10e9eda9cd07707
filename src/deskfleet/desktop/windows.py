"""Windows-only extras of the desktop driver: the console host, session checks, UI Automation.

The driver itself (:mod:`.driver`: mss, pynput, tesseract) is the same on Windows as on
X11. What only Windows has lives here, behind the optional extra
``pip install deskfleet[windows]`` (uiautomation, pywinauto), imported lazily so this
module imports anywhere:

- :class:`ConsoleHost` — the :class:`~deskfleet.desktop.driver.Host` of the interactive
  session an agent runs in (``deskfleet agent --desktop local`` on Windows): boot id and
  time from the OS, the app's top-level windows through UI Automation (found by title to
  take over a running app, brought to the foreground by process id), the window facts
  beside the pixels through Win32 (the session's windows in z-order with their owners and
  popups, a ping — ``IsHungAppWindow``, ``SendMessageTimeout`` — closing a window, raising
  the app), a reboot through the operator's ``--reboot-command``;
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
from .base import Region, Window

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

# window facts (winuser.h, dwmapi.h)
HWND = ctypes.c_void_p
WPARAM, LPARAM = ctypes.c_size_t, ctypes.c_ssize_t  # pointer-sized, as LRESULT and DWORD_PTR
GW_OWNER = 4
GWL_STYLE, GWL_EXSTYLE = -16, -20
WS_POPUP, WS_CAPTION = 0x80000000, 0x00C00000  # WS_CAPTION: WS_BORDER | WS_DLGFRAME
WS_EX_TOPMOST, WS_EX_TOOLWINDOW, WS_EX_APPWINDOW, WS_EX_NOACTIVATE = 0x00000008, 0x00000080, 0x00040000, 0x08000000
DWMWA_EXTENDED_FRAME_BOUNDS, DWMWA_CLOAKED = 9, 14
WM_NULL, WM_CLOSE = 0x0000, 0x0010
SMTO_BLOCK, SMTO_ABORTIFHUNG = 0x0001, 0x0002
HWND_TOP = 0
SWP_NOSIZE, SWP_NOMOVE, SWP_NOACTIVATE, SWP_ASYNCWINDOWPOS = 0x0001, 0x0002, 0x0010, 0x4000
#: window classes that are popups whatever their styles: menus, tooltips, combo boxes'
#: drop-down lists, menus' drop shadows
POPUP_CLASSES = frozenset({"#32768", "tooltips_class32", "combolbox", "sysshadow"})
#: what every top-level window takes, named as the driver asks for it (X11's WM_PROTOCOLS
#: names): WM_CLOSE, the close request of its title bar's button, and a ping, since
#: SendMessageTimeout reaches any window whose thread runs its message loop
WINDOW_PROTOCOLS = frozenset({"WM_DELETE_WINDOW", "_NET_WM_PING"})
#: a popup takes no close request: it has no close button, and destroying a menu inside
#: TrackPopupMenu's loop is not what Escape (the way to close one) does
POPUP_PROTOCOLS = frozenset({"_NET_WM_PING"})

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


class _RECT(ctypes.Structure):
    _fields_ = [("left", LONG), ("top", LONG), ("right", LONG), ("bottom", LONG)]


# EnumWindows' callback: BOOL CALLBACK EnumWindowsProc(HWND, LPARAM), stdcall on Windows
_WNDENUMPROC = getattr(ctypes, "WINFUNCTYPE", ctypes.CFUNCTYPE)(BOOL, HWND, LPARAM)


class _Win32Windows:
    """The Win32 functions the window facts call (user32, dwmapi), declared as :class:`_Win32`
    declares its own. None of them waits on another process's window thread, so listing never
    blocks on a hung application; the one that would (SetWindowPos) is asked asynchronously,
    and the ping has its timeout."""

    def __init__(self) -> None:
        load = ctypes.WinDLL  # type: ignore[attr-defined]
        user32 = load("user32", use_last_error=True)
        dwmapi = load("dwmapi", use_last_error=True)
        self.EnumWindows = _declare(user32, "EnumWindows", [_WNDENUMPROC, LPARAM], BOOL)
        self.IsWindow = _declare(user32, "IsWindow", [HWND], BOOL)
        self.IsWindowVisible = _declare(user32, "IsWindowVisible", [HWND], BOOL)
        self.IsIconic = _declare(user32, "IsIconic", [HWND], BOOL)
        self.GetWindowRect = _declare(user32, "GetWindowRect", [HWND, ctypes.POINTER(_RECT)], BOOL)
        self.DwmGetWindowAttribute = _declare(dwmapi, "DwmGetWindowAttribute",
                                              [HWND, DWORD, ctypes.c_void_p, DWORD], LONG)  # HRESULT
        self.GetWindowThreadProcessId = _declare(user32, "GetWindowThreadProcessId",
                                                 [HWND, ctypes.POINTER(DWORD)], DWORD)
        self.GetWindowTextW = _declare(user32, "GetWindowTextW", [HWND, ctypes.c_wchar_p, ctypes.c_int],
                                       ctypes.c_int)
        self.GetClassNameW = _declare(user32, "GetClassNameW", [HWND, ctypes.c_wchar_p, ctypes.c_int], ctypes.c_int)
        self.GetWindow = _declare(user32, "GetWindow", [HWND, UINT], HWND)
        self.GetWindowLongW = _declare(user32, "GetWindowLongW", [HWND, ctypes.c_int], LONG)
        self.IsHungAppWindow = _declare(user32, "IsHungAppWindow", [HWND], BOOL)
        self.SendMessageTimeoutW = _declare(
            user32, "SendMessageTimeoutW",
            [HWND, UINT, WPARAM, LPARAM, UINT, UINT, ctypes.POINTER(ctypes.c_size_t)], LPARAM)  # LRESULT
        self.PostMessageW = _declare(user32, "PostMessageW", [HWND, UINT, WPARAM, LPARAM], BOOL)
        self.SetWindowPos = _declare(user32, "SetWindowPos",
                                     [HWND, HWND, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, UINT], BOOL)

    def top_to_bottom(self) -> list[int]:
        """Every top-level window of this desktop, in z-order from the top."""
        found: list[int] = []

        def collect(hwnd: int | None, _: int) -> bool:
            if hwnd:
                found.append(hwnd)
            return True

        if not self.EnumWindows(_WNDENUMPROC(collect), 0):
            raise DesktopError(f"Windows did not list the desktop's windows (EnumWindows: error {_last_error()})")
        return found

    def describe(self, hwnd: int) -> Window | None:
        """``hwnd`` as a :class:`Window`; None when nobody sees it (hidden, minimised, cloaked,
        empty) or it went away meanwhile."""
        if not self.IsWindowVisible(hwnd) or self.IsIconic(hwnd) or self._cloaked(hwnd):
            return None
        rect = self._rect(hwnd)
        pid = DWORD()
        if rect is None or rect.width <= 0 or rect.height <= 0 or not self.GetWindowThreadProcessId(
                hwnd, ctypes.byref(pid)):
            return None
        style = self.GetWindowLongW(hwnd, GWL_STYLE) & 0xFFFFFFFF
        ex_style = self.GetWindowLongW(hwnd, GWL_EXSTYLE) & 0xFFFFFFFF
        popup = _is_popup(style, ex_style, self._text(self.GetClassNameW, hwnd))
        # A hidden owner is no window the user sees: Delphi, VB6 and WinForms apps park their
        # main window under one. Their main window is then no dialog of anything.
        owner = self.GetWindow(hwnd, GW_OWNER)
        return Window(int(hwnd), self._text(self.GetWindowTextW, hwnd), rect, pid.value or None,
                      dialog_of=int(owner) if owner and self.IsWindowVisible(owner) else None, popup=popup,
                      protocols=POPUP_PROTOCOLS if popup else WINDOW_PROTOCOLS)

    def _cloaked(self, hwnd: int) -> bool:
        """Visible to USER but not drawn by DWM: a UWP app suspended or another virtual desktop's
        window (the input panel lies, cloaked, over the whole screen)."""
        cloaked = DWORD()
        return (self.DwmGetWindowAttribute(hwnd, DWMWA_CLOAKED, ctypes.byref(cloaked), ctypes.sizeof(cloaked)) == 0
                and cloaked.value != 0)

    def _rect(self, hwnd: int) -> Region | None:
        # DWM's extended frame bounds are what is drawn, in physical pixels like mss's frames.
        # GetWindowRect adds the invisible resize borders of Windows 10 and 11 (≈ 7 px left,
        # right and below: a maximised window would overlap the taskbar, side-by-side windows
        # each other) and is scaled down for a process not DPI aware. It stays the fallback
        # for a window DWM does not frame.
        r = _RECT()
        if self.DwmGetWindowAttribute(hwnd, DWMWA_EXTENDED_FRAME_BOUNDS, ctypes.byref(r), ctypes.sizeof(r)) != 0 \
                and not self.GetWindowRect(hwnd, ctypes.byref(r)):
            return None
        return Region(r.left, r.top, r.right - r.left, r.bottom - r.top)

    @staticmethod
    def _text(function: Any, hwnd: int) -> str:
        # Another process's window title is read without a message to it (GetWindowText's
        # documentation): a hung app cannot hold the listing up.
        buffer = ctypes.create_unicode_buffer(512)
        return str(buffer.value) if function(hwnd, buffer, len(buffer)) > 0 else ""


def _is_popup(style: int, ex_style: int, class_name: str) -> bool:
    """A menu, a tooltip or a drop-down list, as opposed to a dialog or a main window.

    Windows has no override-redirect flag; the rule: one of the system's popup classes
    (:data:`POPUP_CLASSES`), or a WS_POPUP window without a title bar (WS_CAPTION) that is
    a tool window, topmost or never activated — what toolkits give their menus and tooltips
    (Qt, WPF, Chromium) — unless it asks for a taskbar button (WS_EX_APPWINDOW). A dialog
    (WS_POPUP | WS_CAPTION, owned) is no popup, nor is a captionless window that is none of
    those (a custom-drawn dialog, a full-screen app's main window)."""
    if class_name.lower() in POPUP_CLASSES:
        return True
    if not style & WS_POPUP or style & WS_CAPTION == WS_CAPTION or ex_style & WS_EX_APPWINDOW:
        return False
    return bool(ex_style & (WS_EX_TOOLWINDOW | WS_EX_TOPMOST | WS_EX_NOACTIVATE))


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
        self._user = _Win32Windows()
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

    def reboot_pending(self) -> bool:
        """Windows' "reboot required" signals: Component Based Servicing's RebootPending,
        Windows Update's RebootRequired, and file renames queued for the next boot."""
        try:
            import winreg
        except ImportError:  # not Windows (the tests' fake console): nothing to read
            return False
        keys = (r"SOFTWARE\Microsoft\Windows\CurrentVersion\Component Based Servicing\RebootPending",
                r"SOFTWARE\Microsoft\Windows\CurrentVersion\WindowsUpdate\Auto Update\RebootRequired")
        for key in keys:
            try:
                winreg.CloseKey(winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, key))  # type: ignore[attr-defined]
                return True
            except OSError:
                continue
        try:
            k = winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE,  # type: ignore[attr-defined]
                               r"SYSTEM\CurrentControlSet\Control\Session Manager")
            try:
                value, _ = winreg.QueryValueEx(k, "PendingFileRenameOperations")  # type: ignore[attr-defined]
                return bool(value)
            finally:
                winreg.CloseKey(k)  # type: ignore[attr-defined]
        except OSError:
            return False

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

    # -- window facts: what Windows says beside the pixels (see RealDesktop.app_windows) ------------

    def windows(self) -> list[Window]:
        """The session's top-level windows a user sees, bottom to top: visible, not minimised,
        not cloaked, not empty. ``rect`` is the frame as drawn, title bar included (X11's is
        the client window); ``dialog_of`` the visible owner; ``popup`` see :func:`_is_popup`.

        EnumWindows gives the z-order, topmost windows first, so nothing else is needed to
        put a window over the app: the foreground window — another program's, say, that took
        the foreground — is normally the top non-topmost window, so it comes after the app's
        in this list, as any window stacked over it does."""
        user = self._user
        found = (user.describe(hwnd) for hwnd in reversed(user.top_to_bottom()))
        return [window for window in found if window is not None]

    def ping(self, window: int, timeout: float = 0.5) -> float | None:
        """Seconds ``window``'s thread took to take a message (WM_NULL: it does nothing);
        None: it did not within ``timeout``, it is hung, or it is gone."""
        user = self._user
        if user.IsHungAppWindow(window):
            return None  # no message handled for 5 s (Windows' rule): no need to wait again
        result = ctypes.c_size_t()
        started = time.monotonic()
        # SMTO_ABORTIFHUNG: give up at once on a window that turned hung meanwhile
        if not user.SendMessageTimeoutW(window, WM_NULL, 0, 0, SMTO_BLOCK | SMTO_ABORTIFHUNG,
                                        max(1, round(timeout * 1000)), ctypes.byref(result)):
            return None
        return time.monotonic() - started

    def close_window(self, window: int) -> bool:
        """Post ``window`` WM_CLOSE, what its title bar's close button sends (a dialog takes
        it as Cancel); False when the window is gone or may not be posted to (UIPI: an
        elevated window refuses messages from an agent that is not)."""
        user = self._user
        if not user.IsWindow(window):  # PostMessage would take 0 (this thread) and 0xFFFF (every window)
            return False
        if not user.PostMessageW(window, WM_CLOSE, 0, 0):
            log.debug("PostMessage(WM_CLOSE) to window 0x%x failed (error %d)", window, _last_error())
            return False
        return True

    def raise_app(self, pid: int) -> int:
        """Bring ``pid``'s windows (popups left out) above every other program's, keeping their
        own order (a dialog stays above its main window); returns how many were raised.

        Only the stacking changes, not the foreground: SetForegroundWindow is refused to a
        process that is not in the foreground and did not get the last input (among its
        documented conditions), so the keyboard stays with the foreground window until a
        click on the app moves it (show_window tries, and says when Windows refuses).
        Asynchronous (SWP_ASYNCWINDOWPOS): SetWindowPos otherwise waits for the window's
        thread, and a hung app's never answers; a thread handles its posted requests in
        order, so bottom to top leaves each window above the one before."""
        user = self._user
        raised = 0
        for window in self.windows():
            if window.pid != pid or window.popup:
                continue
            if user.SetWindowPos(window.id, HWND_TOP, 0, 0, 0, 0,
                                 SWP_NOMOVE | SWP_NOSIZE | SWP_NOACTIVATE | SWP_ASYNCWINDOWPOS):
                raised += 1
            else:
                log.debug("SetWindowPos on window 0x%x failed (error %d)", window.id, _last_error())
        return raised

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
