"""The Windows path of ``deskfleet agent --desktop local``, on fakes of the Win32 surface.

Nothing here runs on Windows. The fakes stand in for what ``deskfleet.desktop.windows``
calls: the Win32 functions (kernel32, user32, wtsapi32, dwmapi), each with the prototype its
documentation gives — the module must declare the same one, and every argument it passes
must convert to it — and the ``uiautomation`` package (a root control whose children are
the top-level windows, ``SetActive``, ``Control(...).Exists``), which, like the real one,
ignores search keywords it does not know and must be used inside
``UIAutomationInitializerInThread`` off the main thread. The fake session's top-level
windows are listed by EnumWindows' callback in z-order, topmost first, as Windows lists them.
What the fakes cannot prove —
that Windows answers as its documentation says — is listed in docs/real-desktops.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from test_packs import MANIFEST, write_pack

from deskfleet import load_pack
from deskfleet.agent.host import AgentHost, AgentHostConfig, _machine_host
from deskfleet.agent.preflight import preflight
from deskfleet.cli.agent import command_words
from deskfleet.desktop import WindowFacts, driver, windows
from deskfleet.desktop.driver import Host, RealDesktop
from deskfleet.desktop.windows import ConsoleHost, console_problems, find_control
from deskfleet.errors import ConfigError, DesktopError

# -- the Win32 surface, as documented ----------------------------------------------------------

# Sizes as on Windows (LLP64), whatever this machine's C long is.
DWORD, BOOL, LONG, UINT, INT, HANDLE = ctypes.c_uint32, ctypes.c_int32, ctypes.c_int32, ctypes.c_uint32, ctypes.c_int, ctypes.c_void_p
PVOID = ctypes.c_void_p
P = ctypes.POINTER
HWND, LPWSTR = ctypes.c_void_p, ctypes.c_wchar_p
WPARAM, DWORD_PTR = ctypes.c_size_t, ctypes.c_size_t  # UINT_PTR, ULONG_PTR
LPARAM, LRESULT = ctypes.c_ssize_t, ctypes.c_ssize_t  # LONG_PTR
HRESULT = LONG
WNDENUMPROC = getattr(ctypes, "WINFUNCTYPE", ctypes.CFUNCTYPE)(BOOL, HWND, LPARAM)  # stdcall on Windows


class RECT(ctypes.Structure):  # windef.h
    _fields_ = [("left", LONG), ("top", LONG), ("right", LONG), ("bottom", LONG)]


#: name → (dll, argtypes, restype), from each function's page on learn.microsoft.com
PROTOTYPES: dict[str, tuple[str, list[Any], Any]] = {
    "GetCurrentProcessId": ("kernel32", [], DWORD),
    "GetCurrentThreadId": ("kernel32", [], DWORD),
    "ProcessIdToSessionId": ("kernel32", [DWORD, P(DWORD)], BOOL),
    "WTSGetActiveConsoleSessionId": ("kernel32", [], DWORD),
    # BOOL WTSQuerySessionInformationW(HANDLE hServer, DWORD SessionId, WTS_INFO_CLASS, LPWSTR *ppBuffer, DWORD *pBytesReturned)
    "WTSQuerySessionInformationW": ("wtsapi32", [HANDLE, DWORD, INT, P(PVOID), P(DWORD)], BOOL),
    "WTSFreeMemory": ("wtsapi32", [PVOID], None),
    # HDESK OpenInputDesktop(DWORD dwFlags, BOOL fInherit, ACCESS_MASK dwDesiredAccess)
    "OpenInputDesktop": ("user32", [DWORD, BOOL, DWORD], HANDLE),
    "GetThreadDesktop": ("user32", [DWORD], HANDLE),
    # BOOL GetUserObjectInformationW(HANDLE hObj, int nIndex, PVOID pvInfo, DWORD nLength, LPDWORD lpnLengthNeeded)
    "GetUserObjectInformationW": ("user32", [HANDLE, INT, PVOID, DWORD, P(DWORD)], BOOL),
    "CloseDesktop": ("user32", [HANDLE], BOOL),
    # BOOL SystemParametersInfoW(UINT uiAction, UINT uiParam, PVOID pvParam, UINT fWinIni)
    "SystemParametersInfoW": ("user32", [UINT, UINT, PVOID, UINT], BOOL),
    # BOOL EnumWindows(WNDENUMPROC lpEnumFunc, LPARAM lParam)
    "EnumWindows": ("user32", [WNDENUMPROC, LPARAM], BOOL),
    "IsWindow": ("user32", [HWND], BOOL),
    "IsWindowVisible": ("user32", [HWND], BOOL),
    "IsIconic": ("user32", [HWND], BOOL),
    "GetWindowRect": ("user32", [HWND, P(RECT)], BOOL),
    # HRESULT DwmGetWindowAttribute(HWND hwnd, DWORD dwAttribute, PVOID pvAttribute, DWORD cbAttribute)
    "DwmGetWindowAttribute": ("dwmapi", [HWND, DWORD, PVOID, DWORD], HRESULT),
    "GetWindowThreadProcessId": ("user32", [HWND, P(DWORD)], DWORD),
    "GetWindowTextW": ("user32", [HWND, LPWSTR, INT], INT),
    "GetClassNameW": ("user32", [HWND, LPWSTR, INT], INT),
    "GetWindow": ("user32", [HWND, UINT], HWND),
    "GetWindowLongW": ("user32", [HWND, INT], LONG),
    "IsHungAppWindow": ("user32", [HWND], BOOL),
    # LRESULT SendMessageTimeoutW(HWND, UINT Msg, WPARAM, LPARAM, UINT fuFlags, UINT uTimeout, PDWORD_PTR lpdwResult)
    "SendMessageTimeoutW": ("user32", [HWND, UINT, WPARAM, LPARAM, UINT, UINT, P(DWORD_PTR)], LRESULT),
    "PostMessageW": ("user32", [HWND, UINT, WPARAM, LPARAM], BOOL),
    # BOOL SetWindowPos(HWND hWnd, HWND hWndInsertAfter, int X, int Y, int cx, int cy, UINT uFlags)
    "SetWindowPos": ("user32", [HWND, HWND, INT, INT, INT, INT, UINT], BOOL),
}

# winuser.h, dwmapi.h, winerror.h
WS_OVERLAPPEDWINDOW, WS_POPUP, WS_CAPTION, WS_SYSMENU, WS_BORDER = 0x00CF0000, 0x80000000, 0x00C00000, 0x00080000, 0x00800000
WS_EX_TOPMOST, WS_EX_TOOLWINDOW, WS_EX_APPWINDOW = 0x00000008, 0x00000080, 0x00040000
DIALOG = WS_POPUP | WS_CAPTION | WS_SYSMENU  # what DialogBox and MessageBox make
WM_NULL, WM_CLOSE = 0x0000, 0x0010
SMTO_BLOCK, SMTO_ABORTIFHUNG = 0x0001, 0x0002
SWP_NOSIZE, SWP_NOMOVE, SWP_NOACTIVATE, SWP_ASYNCWINDOWPOS = 0x0001, 0x0002, 0x0010, 0x4000
S_OK, E_HANDLE, DWM_E_COMPOSITIONDISABLED = 0, -0x7FF8FFFA, -0x7FF0DFFF  # HRESULTs as the LONG they are
INVISIBLE_BORDER = 7  # GetWindowRect's resize borders on Windows 10 and 11, left, right and below


def same_type(declared: Any, documented: Any) -> bool:
    """The same C type: identical, or a pointer to a structure of the same layout (the module
    writes its own RECT)."""
    if declared is documented:
        return True
    if isinstance(declared, type) and isinstance(documented, type):
        if issubclass(declared, ctypes._Pointer) and issubclass(documented, ctypes._Pointer):
            return same_type(declared._type_, documented._type_)
        if issubclass(declared, ctypes.Structure) and issubclass(documented, ctypes.Structure):
            mine, theirs = declared._fields_, documented._fields_
            return (ctypes.sizeof(declared) == ctypes.sizeof(documented) and len(mine) == len(theirs)
                    and all(same_type(a[1], b[1]) for a, b in zip(mine, theirs, strict=True)))
    return False


class WTSINFOEX_LEVEL1_W(ctypes.Structure):  # wtsapi32.h, written out here independently of the module
    _fields_ = [("SessionId", DWORD), ("SessionState", INT), ("SessionFlags", LONG),
                ("WinStationName", ctypes.c_uint16 * 33), ("UserName", ctypes.c_uint16 * 21),
                ("DomainName", ctypes.c_uint16 * 18), *[(t, ctypes.c_int64) for t in (
                    "LogonTime", "ConnectTime", "DisconnectTime", "LastInputTime", "CurrentTime")],
                *[(n, DWORD) for n in ("IncomingBytes", "OutgoingBytes", "IncomingFrames", "OutgoingFrames",
                                       "IncomingCompressedBytes", "OutgoingCompressedBytes")]]


class WTSINFOEXW(ctypes.Structure):
    _fields_ = [("Level", DWORD), ("Data", WTSINFOEX_LEVEL1_W)]


WTSActive, WTSDisconnected = 0, 4
WTS_SESSIONSTATE_LOCK, WTS_SESSIONSTATE_UNLOCK, WTS_SESSIONSTATE_UNKNOWN = 0, 1, -1
INPUT_DESKTOP, THREAD_DESKTOP = 0x7FF6_0000_1230, 0x7FF6_0000_4560  # handles wider than 32 bits


def out(pointer: Any) -> Any:
    """The ctypes object behind a ``byref()`` out-parameter, for a fake to write into."""
    return pointer._obj


@dataclass
class Win:
    """A top-level window of the fake session."""

    hwnd: int
    pid: int
    title: str = ""
    rect: tuple[int, int, int, int] = (100, 100, 900, 700)  # left, top, right, bottom, as drawn
    style: int = WS_OVERLAPPEDWINDOW
    ex_style: int = 0
    class_name: str = "AcmeMainWindow"
    owner: int | None = None
    visible: bool = True
    iconic: bool = False
    cloaked: bool = False  # DWM does not draw it (a suspended UWP app, another virtual desktop)
    framed: bool = True  # DWM answers its extended frame bounds
    hung: bool = False  # IsHungAppWindow: no message taken for 5 s
    answers: bool = True  # its thread takes messages
    delay: float = 0.0  # seconds its thread takes to get to a message


@dataclass
class Console:
    """A fake Windows session: what the fake Win32 functions report."""

    session: int = 1
    console: int = 1  # WTSGetActiveConsoleSessionId
    state: int = WTSActive
    flags: int = WTS_SESSIONSTATE_UNLOCK
    input_desktop: str | None = "Default"  # None: OpenInputDesktop is refused
    own_desktop: str = "Default"
    screensaver: bool = False
    failing: set[str] = field(default_factory=set)  # functions that return failure
    allocated: dict[int, Any] = field(default_factory=dict)  # WTS buffers not yet freed
    opened: set[int] = field(default_factory=set)  # desktop handles not yet closed
    queried: list[int] = field(default_factory=list)  # sessions asked about
    windows: list[Win] = field(default_factory=list)  # top-level windows, in z-order from the top
    vanishing: set[int] = field(default_factory=set)  # windows that close once they were listed
    sent: list[tuple[int, int, int, int]] = field(default_factory=list)  # SendMessageTimeout: hwnd, msg, flags, ms
    posted: list[tuple[int, int]] = field(default_factory=list)  # PostMessage: hwnd, msg
    positioned: list[tuple[int, int]] = field(default_factory=list)  # SetWindowPos: hwnd, flags

    def load(self, name: str, use_last_error: bool = False) -> FakeDLL:
        return FakeDLL(name.lower(), self)

    # the functions, by name
    def GetCurrentProcessId(self) -> int:
        return 4100

    def GetCurrentThreadId(self) -> int:
        return 4200

    def ProcessIdToSessionId(self, pid: int, session: Any) -> int:
        assert pid == 4100
        out(session).value = self.session
        return 1

    def WTSGetActiveConsoleSessionId(self) -> int:
        return self.console

    def WTSQuerySessionInformationW(self, server: Any, session: int, info_class: int, buffer: Any, size: Any) -> int:
        assert server is None and info_class == 25  # WTS_CURRENT_SERVER_HANDLE, WTSSessionInfoEx
        self.queried.append(session)
        info = WTSINFOEXW(Level=1)
        info.Data.SessionId = self.session
        info.Data.SessionState = self.state
        info.Data.SessionFlags = self.flags
        self.allocated[ctypes.addressof(info)] = info
        out(buffer).value = ctypes.addressof(info)
        out(size).value = ctypes.sizeof(info)
        return 1

    def WTSFreeMemory(self, pointer: Any) -> None:
        address = pointer.value if isinstance(pointer, ctypes.c_void_p) else pointer
        del self.allocated[address]

    def OpenInputDesktop(self, flags: int, inherit: bool, access: int) -> int | None:
        assert access & 0x0100  # DESKTOP_SWITCHDESKTOP: what the lock screen refuses
        if self.input_desktop is None:
            return None
        self.opened.add(INPUT_DESKTOP)
        return INPUT_DESKTOP

    def GetThreadDesktop(self, thread: int) -> int:
        assert thread == 4200
        return THREAD_DESKTOP

    def GetUserObjectInformationW(self, handle: int, index: int, info: Any, length: int, needed: Any) -> int:
        assert index == 2  # UOI_NAME
        assert handle == THREAD_DESKTOP or handle in self.opened
        info.value = self.input_desktop if handle == INPUT_DESKTOP else self.own_desktop
        return 1

    def CloseDesktop(self, handle: int) -> int:
        assert handle != THREAD_DESKTOP, "GetThreadDesktop's handle must not be closed"
        self.opened.remove(handle)
        return 1

    def SystemParametersInfoW(self, action: int, param: int, value: Any, ini: int) -> int:
        assert action == 0x0072  # SPI_GETSCREENSAVERRUNNING
        out(value).value = int(self.screensaver)
        return 1

    # -- windows
    def window(self, hwnd: int | None) -> Win | None:
        return next((w for w in self.windows if w.hwnd == hwnd), None)

    def EnumWindows(self, callback: Any, param: int) -> int:
        listed = list(self.windows)
        for w in listed:
            if not callback(w.hwnd, param):
                break
        self.windows = [w for w in self.windows if w.hwnd not in self.vanishing]  # closed meanwhile
        return 1

    def IsWindow(self, hwnd: int) -> int:
        return int(self.window(hwnd) is not None)

    def IsWindowVisible(self, hwnd: int) -> int:
        w = self.window(hwnd)
        return int(w is not None and w.visible)

    def IsIconic(self, hwnd: int) -> int:
        w = self.window(hwnd)
        return int(w is not None and w.iconic)

    def GetWindowRect(self, hwnd: int, rect: Any) -> int:
        w = self.window(hwnd)
        if w is None:
            return 0
        r, (left, top, right, bottom) = out(rect), w.rect
        r.left, r.top, r.right, r.bottom = left - INVISIBLE_BORDER, top, right + INVISIBLE_BORDER, bottom + INVISIBLE_BORDER
        return 1

    def DwmGetWindowAttribute(self, hwnd: int, attribute: int, value: Any, size: int) -> int:
        w = self.window(hwnd)
        if w is None:
            return E_HANDLE
        if attribute == 14:  # DWMWA_CLOAKED
            assert size == 4
            out(value).value = 2 if w.cloaked else 0  # DWM_CLOAKED_SHELL
            return S_OK
        assert attribute == 9 and size == ctypes.sizeof(RECT)  # DWMWA_EXTENDED_FRAME_BOUNDS
        if not w.framed:
            return DWM_E_COMPOSITIONDISABLED
        r = out(value)
        r.left, r.top, r.right, r.bottom = w.rect
        return S_OK

    def GetWindowThreadProcessId(self, hwnd: int, pid: Any) -> int:
        w = self.window(hwnd)
        if w is None:
            return 0
        out(pid).value = w.pid
        return w.pid + 1  # its thread

    def GetWindowTextW(self, hwnd: int, text: Any, size: int) -> int:
        w = self.window(hwnd)
        text.value = w.title[: size - 1] if w else ""
        return len(text.value)

    def GetClassNameW(self, hwnd: int, text: Any, size: int) -> int:
        w = self.window(hwnd)
        text.value = w.class_name[: size - 1] if w else ""
        return len(text.value)

    def GetWindow(self, hwnd: int, command: int) -> int | None:
        assert command == 4  # GW_OWNER
        w = self.window(hwnd)
        return w.owner if w else None

    def GetWindowLongW(self, hwnd: int, index: int) -> int:
        w = self.window(hwnd)
        value = 0 if w is None else {-16: w.style, -20: w.ex_style}[index]  # GWL_STYLE, GWL_EXSTYLE
        return ctypes.c_int32(value).value  # a LONG: WS_POPUP is its sign bit

    def IsHungAppWindow(self, hwnd: int) -> int:
        w = self.window(hwnd)
        return int(w is not None and w.hung)

    def SendMessageTimeoutW(self, hwnd: int, message: int, wparam: int, lparam: int, flags: int, timeout: int,
                            result: Any) -> int:
        self.sent.append((hwnd, message, flags, timeout))
        w = self.window(hwnd)
        if w is None or (w.hung and flags & SMTO_ABORTIFHUNG):
            return 0
        if not w.answers or w.delay * 1000 > timeout:
            time.sleep(timeout / 1000)
            return 0  # timed out
        time.sleep(w.delay)
        out(result).value = 0
        return 1

    def PostMessageW(self, hwnd: int | None, message: int, wparam: int, lparam: int) -> int:
        if not hwnd or hwnd == 0xFFFF:  # to the caller's thread; HWND_BROADCAST: to every top-level window
            self.posted.append((hwnd or 0, message))
            return 1
        if self.window(hwnd) is None:
            return 0
        self.posted.append((hwnd, message))
        return 1

    def SetWindowPos(self, hwnd: int, after: int | None, x: int, y: int, cx: int, cy: int, flags: int) -> int:
        w = self.window(hwnd)
        if w is None:
            return 0
        assert not after  # HWND_TOP
        self.positioned.append((hwnd, flags))
        self.windows.remove(w)  # to the top of its band: topmost windows stay above the others
        band = 0 if w.ex_style & WS_EX_TOPMOST else sum(1 for v in self.windows if v.ex_style & WS_EX_TOPMOST)
        self.windows.insert(band, w)
        return 1


class FakeDLL:
    def __init__(self, name: str, console: Console) -> None:
        self._name, self._console = name, console

    def __getattr__(self, function: str) -> FakeFunction:
        dll, argtypes, restype = PROTOTYPES.get(function, (None, None, None))
        if dll != self._name:
            raise AttributeError(f"function '{function}' not found in {self._name}")
        made = FakeFunction(function, self._console, argtypes, restype)
        setattr(self, function, made)  # like ctypes: one function object per library handle
        return made


class FakeFunction:
    """Checks the prototype the module declared against the documented one, converts every
    argument through it as ctypes would, then answers from the fake console."""

    def __init__(self, name: str, console: Console, argtypes: list[Any], restype: Any) -> None:
        self.name, self.console, self.documented = name, console, (argtypes, restype)
        self.argtypes: list[Any] | None = None
        self.restype: Any = ctypes.c_int  # ctypes' default: a HANDLE cut to 32 bits

    def __call__(self, *args: Any) -> Any:
        argtypes, restype = self.documented
        declared = self.argtypes
        assert declared is not None and len(declared) == len(argtypes) and all(
            same_type(d, a) for d, a in zip(declared, argtypes, strict=True)), \
            f"{self.name}: argtypes {declared}, documented {argtypes}"
        assert self.restype is restype, f"{self.name}: restype {self.restype}, documented {restype}"
        assert len(args) == len(argtypes), f"{self.name}: {len(args)} arguments"
        for kind, arg in zip(declared, args, strict=True):
            kind.from_param(arg)  # raises as ctypes would on the wrong kind of argument
        if self.name in self.console.failing:
            return 0
        return getattr(self.console, self.name)(*args)


class SharedWindll:
    def __getattr__(self, name: str) -> Any:
        raise AssertionError("prototypes belong on private WinDLL handles, not on the shared ctypes.windll")


# -- uiautomation, as the package behaves -------------------------------------------------------

VALID_KEYS = {"ControlType", "ClassName", "AutomationId", "Name", "SubName", "RegexName", "Depth", "Compare"}


class Rect:
    def __init__(self, left: int, top: int, right: int, bottom: int) -> None:
        self.left, self.top, self.right, self.bottom = left, top, right, bottom

    def width(self) -> int:
        return self.right - self.left

    def height(self) -> int:
        return self.bottom - self.top


@dataclass
class FakeControl:
    ControlType: int
    Name: str = ""
    AutomationId: str = ""
    BoundingRectangle: Rect = field(default_factory=lambda: Rect(0, 0, 0, 0))


class Missing:
    def Exists(self, maxSearchSeconds: float = 5, searchIntervalSeconds: float = 0.5) -> bool:
        return False


class FakeWindow:
    def __init__(self, ui: FakeUIA, title: str, pid: int, *, offscreen: bool = False, iconic: bool = False,
                 activates: bool | Exception = True, gone: bool = False,
                 controls: list[FakeControl] | None = None) -> None:
        self.ui, self.Name, self._pid, self.IsOffscreen, self.gone = ui, title, pid, offscreen, gone
        self.NativeWindowHandle = 0x10000 + len(ui.windows)
        if iconic:
            ui.iconic.add(self.NativeWindowHandle)
        self.activates, self.activated = activates, 0
        self.controls = controls or []

    @property
    def ProcessId(self) -> int:
        self.ui.check_thread()
        if self.gone:
            raise OSError("COMError: element not available")  # it closed while we asked
        return self._pid

    def SetActive(self, waitTime: float = 0.5) -> bool:
        self.ui.check_thread()
        self.activated += 1
        if isinstance(self.activates, Exception):
            raise self.activates
        return self.activates

    def Control(self, searchDepth: int = 0xFFFFFFFF, **search: Any) -> Any:
        wanted = {k: v for k, v in search.items() if k in VALID_KEYS}  # the others only reach its debug log
        for control in self.controls:
            if all(getattr(control, k) == v for k, v in wanted.items()):
                return types.SimpleNamespace(Exists=lambda *a, **k: True, BoundingRectangle=control.BoundingRectangle)
        return Missing()


class FakeUIA:
    """The ``uiautomation`` module: a desktop of top-level windows."""

    def __init__(self) -> None:
        self.windows: list[FakeWindow] = []
        self.iconic: set[int] = set()
        self.joined = threading.local()  # threads inside UIAutomationInitializerInThread
        ui = self

        class Initializer:
            def __init__(self, debug: bool = False) -> None:
                pass

            def __enter__(self) -> Initializer:
                ui.joined.depth = getattr(ui.joined, "depth", 0) + 1
                return self

            def __exit__(self, *exc: object) -> None:
                ui.joined.depth -= 1

        root = types.SimpleNamespace(GetChildren=lambda: (self.check_thread(), list(self.windows))[1])
        self.module = types.ModuleType("uiautomation")
        self.module.__dict__.update(
            GetRootControl=lambda: root,
            IsIconic=lambda handle: handle in self.iconic,
            UIAutomationInitializerInThread=Initializer,
            ControlType=types.SimpleNamespace(ButtonControl=50000, EditControl=50004, ListItemControl=50007,
                                              WindowControl=50032),
        )

    def check_thread(self) -> None:
        """UI Automation is COM: a thread that has not joined it gets errors from every call."""
        if threading.current_thread() is not threading.main_thread() and not getattr(self.joined, "depth", 0):
            raise OSError("CoInitialize has not been called (use UIAutomationInitializerInThread)")

    def window(self, title: str, pid: int, **kwargs: Any) -> FakeWindow:
        made = FakeWindow(self, title, pid, **kwargs)
        self.windows.append(made)
        return made


@dataclass
class Fakes:
    console: Console
    ui: FakeUIA


@pytest.fixture
def win(monkeypatch: pytest.MonkeyPatch) -> Iterator[Fakes]:
    """A fake Windows: sys.platform, the Win32 libraries, the uiautomation package."""
    fakes = Fakes(Console(), FakeUIA())
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(ctypes, "WinDLL", fakes.console.load, raising=False)
    monkeypatch.setattr(ctypes, "windll", SharedWindll(), raising=False)
    monkeypatch.setitem(sys.modules, "uiautomation", fakes.ui.module)
    yield fakes
    assert not fakes.console.allocated, "WTSQuerySessionInformation's buffer was not freed"
    assert not fakes.console.opened, "OpenInputDesktop's handle was not closed"


def in_thread(call: Callable[[], Any]) -> Any:
    """Run ``call`` in a worker thread, where the driver calls hosts (asyncio.to_thread)."""
    result: list[Any] = []
    worker = threading.Thread(target=lambda: result.append(call()))
    worker.start()
    worker.join()
    assert result, "the call raised in its thread"
    return result[0]


# -- off Windows ---------------------------------------------------------------------------------


def test_the_module_imports_anywhere_and_refuses_politely_off_windows() -> None:
    assert sys.platform != "win32"
    with pytest.raises(ConfigError, match="needs Windows"):
        ConsoleHost()
    with pytest.raises(ConfigError, match="needs Windows"):
        console_problems()


def test_without_the_windows_extras_the_host_says_how_to_install_them(
        win: Fakes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uiautomation", None)  # import fails
    with pytest.raises(ConfigError, match=r"pip install 'deskfleet\[windows\]'"):
        ConsoleHost()


def test_the_console_host_has_every_member_of_the_host_protocol(win: Fakes) -> None:
    members = {name for name in vars(Host) if not name.startswith("_")}
    assert {"display", "env", "boot_id", "booted_at", "show_window", "find_window", "attachable", "problems",
            "restart", "close"} <= members
    host = ConsoleHost()
    for name in members:
        assert hasattr(host, name), name
    assert host.display is None and host.env() == {} and host.attachable


# -- console problems ----------------------------------------------------------------------------


def test_a_clean_console_has_no_problems(win: Fakes) -> None:
    assert console_problems() == []
    assert win.console.queried == [1]  # about its own session


@pytest.mark.parametrize(("setup", "says"), [
    ({"session": 0}, ["session 0", "service", "start the agent at logon"]),
    ({"session": 3, "console": 1, "state": WTSDisconnected}, ["disconnected", "tscon 3 /dest:console"]),
    ({"flags": WTS_SESSIONSTATE_LOCK, "input_desktop": None},
     ["the screen is locked", "input would go to the logon screen", "disable the lock screen for robot accounts"]),
    ({"screensaver": True}, ["screensaver is running", "disable the screensaver"]),
    ({"input_desktop": None}, ["secure desktop", "UAC prompt", "run the app without elevation"]),
    ({"input_desktop": "Winlogon"}, ["secure desktop", "UAC prompt"]),
    ({"input_desktop": "Sysinternals Desktop 1"}, ["'Sysinternals Desktop 1' desktop", "switch the session back to 'Default'"]),
], ids=["service", "disconnected", "locked", "screensaver", "uac-refused", "uac-winlogon", "other-desktop"])
def test_each_console_problem_is_one_line_that_says_what_to_do(win: Fakes, setup: dict[str, Any],
                                                               says: list[str]) -> None:
    for key, value in setup.items():
        setattr(win.console, key, value)
    problems = in_thread(console_problems)
    assert len(problems) == 1, problems  # one cause, one line: a locked screen is not also "another desktop"
    for words in says:
        assert words in problems[0]


def test_a_connected_remote_session_is_drivable_and_the_host_says_what_will_break_it(
        win: Fakes, caplog: pytest.LogCaptureFixture) -> None:
    win.console.session, win.console.console = 2, 1  # an RDP session, not the console's
    assert console_problems() == []
    with caplog.at_level(logging.WARNING, logger="deskfleet.desktop.windows"):
        ConsoleHost()
    assert "remote desktop session 2" in caplog.text and "tscon 2 /dest:console" in caplog.text


def test_questions_windows_will_not_answer_count_against_nothing(win: Fakes) -> None:
    win.console.failing = {"ProcessIdToSessionId", "WTSQuerySessionInformationW", "SystemParametersInfoW"}
    assert console_problems() == []
    assert win.console.queried == []  # refused: nothing allocated, nothing to free
    win.console.failing = {"ProcessIdToSessionId"}
    win.console.flags = WTS_SESSIONSTATE_UNKNOWN
    assert console_problems() == []
    assert win.console.queried == [0xFFFFFFFF]  # WTS_CURRENT_SESSION when its id is unknown


# -- windows of the session ------------------------------------------------------------------------


def test_find_window_matches_titles_by_regex_and_skips_hidden_windows(win: Fakes) -> None:
    ui = win.ui
    ui.window("Acme ERP — hidden helper", 10, offscreen=True)
    ui.window("Acme ERP — closing", 11, gone=True)
    ui.window("Notepad", 12)
    ui.window("Acme ERP — Orders", 13)
    host = ConsoleHost()
    assert in_thread(lambda: host.find_window(r"^Acme ERP")) == 13
    assert in_thread(lambda: host.find_window("Excel")) is None
    ui.window("Acme ERP — minimised", 14, offscreen=True, iconic=True)
    ui.windows.remove(ui.windows[3])
    assert in_thread(lambda: host.find_window(r"^Acme ERP")) == 14  # minimised is running, and restorable


def test_show_window_activates_a_window_of_that_process_only(win: Fakes) -> None:
    ui = win.ui
    other = ui.window("Notepad", 12)
    hidden = ui.window("Acme ERP — tray", 13, offscreen=True)
    app = ui.window("Acme ERP", 13)
    host = ConsoleHost()
    assert in_thread(lambda: host.show_window(13)) is True
    assert (app.activated, other.activated, hidden.activated) == (1, 0, 0)
    assert in_thread(lambda: host.show_window(99)) is False


def test_show_window_when_windows_refuses_the_foreground_or_the_window_goes(
        win: Fakes, caplog: pytest.LogCaptureFixture) -> None:
    host = ConsoleHost()
    refused = win.ui.window("Acme ERP", 13, activates=False)  # SetForegroundWindow's rules said no
    with caplog.at_level(logging.INFO, logger="deskfleet.desktop.windows"):
        assert in_thread(lambda: host.show_window(13)) is True  # the window is up; a click will activate it
    assert refused.activated == 1 and "did not bring" in caplog.text
    win.ui.window("Acme ERP", 14, activates=OSError("COMError: element not available"))
    assert in_thread(lambda: host.show_window(14)) is False


def test_the_boot_id_holds_while_the_clock_moves(win: Fakes, monkeypatch: pytest.MonkeyPatch) -> None:
    times = iter([1_700_000_000.4, 1_700_000_001.2, 1_700_003_600.0])  # psutil's Windows boot time drifts
    monkeypatch.setattr(psutil, "boot_time", lambda: next(times))
    host = ConsoleHost()
    first = host.boot_id()
    assert [host.boot_id(), host.boot_id()] == [first, first]
    assert host.booted_at() == host.booted_at() == 1_700_000_000.4
    assert ConsoleHost().boot_id() != first  # a later boot (another process, another time) is another id


# -- window facts through Win32 ---------------------------------------------------------------------

APP, OTHER, SHELL = 4242, 5150, 3030  # the app's pid, another program's, explorer's
MAIN, DIALOG_, MENU, NOTEPAD, TASKBAR = 0x0003_04A2, 0x0002_0B14, 0x0001_0C36, 0x0004_0D58, 0x0001_0010


def main_window(**kwargs: Any) -> Win:
    return Win(MAIN, APP, "Acme ERP — Orders", **kwargs)


def ids(found: list[Any]) -> list[int]:
    return [w.id for w in found]


def test_windows_are_listed_bottom_to_top_with_owner_pid_title_and_frame(win: Fakes) -> None:
    console = win.console
    console.windows = [  # z-order, from the top
        Win(MENU, APP, "", (150, 130, 350, 330), WS_POPUP | WS_BORDER, WS_EX_TOOLWINDOW | WS_EX_TOPMOST, "#32768",
            owner=MAIN),
        Win(DIALOG_, APP, "Save changes?", (300, 250, 700, 450), DIALOG, 0, "#32770", owner=MAIN),
        Win(NOTEPAD, OTHER, "notes.txt - Notepad", (600, 50, 1200, 600), class_name="Notepad"),
        main_window(),
    ]
    found = in_thread(ConsoleHost().windows)  # the driver lists from a worker thread
    assert ids(found) == [MAIN, NOTEPAD, DIALOG_, MENU]
    main, notepad, dialog, menu = found
    assert (main.title, main.pid, main.dialog_of, main.popup) == ("Acme ERP — Orders", APP, None, False)
    assert main.rect == (100, 100, 800, 600)  # as drawn: not GetWindowRect's invisible borders
    assert (notepad.pid, notepad.title, notepad.dialog_of) == (OTHER, "notes.txt - Notepad", None)
    assert (dialog.dialog_of, dialog.popup, dialog.rect) == (MAIN, False, (300, 250, 400, 200))
    assert (menu.dialog_of, menu.popup) == (MAIN, True)
    assert main.protocols == dialog.protocols == {"WM_DELETE_WINDOW", "_NET_WM_PING"}  # what the driver asks
    assert menu.protocols == {"_NET_WM_PING"}  # a menu is closed by Escape, not by WM_CLOSE
    assert "a dialog 400x200 at 300,250" in dialog.describe() and "a menu" in menu.describe()


def test_hidden_minimised_cloaked_empty_and_vanished_windows_are_not_listed(win: Fakes) -> None:
    console = win.console
    console.windows = [
        Win(0x10, APP, "hidden helper", visible=False),
        Win(0x20, APP, "Acme ERP — Reports", iconic=True),
        Win(0x30, SHELL, "Microsoft Text Input Application", (0, 0, 1920, 1080), cloaked=True),
        Win(0x40, OTHER, "empty", (500, 500, 500, 700)),
        Win(0x50, OTHER, "closing", (0, 0, 300, 300)),
        Win(0x60, OTHER, "no DWM frame", (10, 20, 110, 220), framed=False),
        main_window(),
    ]
    console.vanishing = {0x50}  # closed between EnumWindows and the questions about it
    found = ConsoleHost().windows()
    assert ids(found) == [MAIN, 0x60]
    assert found[1].rect == (10 - INVISIBLE_BORDER, 20, 100 + 2 * INVISIBLE_BORDER, 200 + INVISIBLE_BORDER)  # GetWindowRect


def test_a_refused_listing_is_an_error_the_driver_takes_as_no_listing(win: Fakes) -> None:
    win.console.failing = {"EnumWindows"}
    with pytest.raises(DesktopError, match="EnumWindows"):
        ConsoleHost().windows()


@pytest.mark.parametrize(("class_name", "style", "ex_style", "popup"), [
    ("#32768", WS_POPUP | WS_BORDER, WS_EX_TOOLWINDOW | WS_EX_TOPMOST, True),  # a menu
    ("tooltips_class32", WS_POPUP, WS_EX_TOOLWINDOW | WS_EX_TOPMOST, True),
    ("ComboLBox", WS_POPUP | WS_BORDER, WS_EX_TOOLWINDOW | WS_EX_TOPMOST, True),  # a combo box's list
    ("#32768", WS_POPUP, 0, True),  # the menu class, whatever its styles
    ("Qt5QWindowPopupDropShadowSaveBits", WS_POPUP, WS_EX_TOOLWINDOW, True),  # a Qt menu
    ("#32770", DIALOG, 0, False),  # a dialog box
    ("#32770", DIALOG, WS_EX_TOPMOST, False),  # an always-on-top message box is still a dialog
    ("Chrome_WidgetWin_1", WS_POPUP, 0, False),  # a custom-drawn dialog, no title bar of its own
    ("KioskMain", WS_POPUP, WS_EX_TOPMOST | WS_EX_APPWINDOW, False),  # has a taskbar button: an app
    ("AcmeMainWindow", WS_OVERLAPPEDWINDOW, WS_EX_TOOLWINDOW, False),  # a tool palette with a title bar
], ids=["menu", "tooltip", "combo-list", "menu-class", "qt-menu", "dialog", "topmost-dialog", "captionless-dialog",
        "kiosk", "palette"])
def test_menus_tooltips_and_drop_downs_are_popups_dialogs_are_not(
        win: Fakes, class_name: str, style: int, ex_style: int, popup: bool) -> None:
    win.console.windows = [Win(DIALOG_, APP, "", (200, 200, 400, 400), style, ex_style, class_name, owner=MAIN),
                           main_window()]
    found = ConsoleHost().windows()
    assert ids(found) == [MAIN, DIALOG_] and found[1].popup is popup
    assert found[1].dialog_of == MAIN


def test_a_hidden_owner_makes_no_dialog(win: Fakes) -> None:
    """Delphi and VB6 apps own their main window by a hidden application window."""
    parking = Win(0x0005_0002, APP, "Acme", (0, 0, 0, 0), WS_POPUP, 0, "TApplication", visible=False)
    win.console.windows = [Win(DIALOG_, APP, "Error", (300, 300, 600, 450), DIALOG, 0, "#32770", owner=MAIN),
                           main_window(owner=parking.hwnd), parking]
    found = ConsoleHost().windows()
    assert [(w.id, w.dialog_of) for w in found] == [(MAIN, None), (DIALOG_, MAIN)]
    facts = WindowFacts.of(found, APP)
    assert facts.main is not None and facts.main.id == MAIN and ids(list(facts.above)) == [DIALOG_]


def test_window_facts_find_the_main_window_and_a_foreign_window_over_it(win: Fakes) -> None:
    win.console.windows = [
        Win(TASKBAR, SHELL, "", (0, 1040, 1920, 1080), WS_POPUP, WS_EX_TOOLWINDOW | WS_EX_TOPMOST, "Shell_TrayWnd"),
        Win(NOTEPAD, OTHER, "notes.txt - Notepad", (600, 50, 1200, 600), class_name="Notepad"),  # the foreground
        Win(0x0006_0001, OTHER, "Calculator", (1500, 40, 1800, 400)),  # over the app's place, not over the app
        Win(DIALOG_, APP, "Save changes?", (700, 400, 1100, 600), DIALOG, 0, "#32770", owner=MAIN),
        main_window(rect=(0, 0, 1400, 1040)),  # maximised to the work area
        Win(0x0007_0001, SHELL, "Program Manager", (0, 0, 1920, 1080), class_name="Progman"),
    ]
    found = ConsoleHost().windows()
    facts = WindowFacts.of(found, APP, title="^Acme ERP")
    assert facts.main is not None and facts.main.id == MAIN
    # bottom to top; the taskbar borders the window as drawn (GetWindowRect's would overlap it)
    assert ids(list(facts.above)) == [DIALOG_, NOTEPAD]
    assert [w.pid for w in facts.above] == [APP, OTHER]


def test_ping_times_a_window_that_answers(win: Fakes) -> None:
    win.console.windows = [main_window(delay=0.02)]
    took = in_thread(lambda: ConsoleHost().ping(MAIN, 0.5))
    assert took is not None and 0.02 <= took < 0.5
    assert win.console.sent == [(MAIN, WM_NULL, SMTO_BLOCK | SMTO_ABORTIFHUNG, 500)]


def test_ping_of_a_hung_window_is_none_without_waiting(win: Fakes) -> None:
    win.console.windows = [main_window(hung=True, answers=False)]
    started = time.monotonic()
    assert ConsoleHost().ping(MAIN, 2.0) is None
    assert time.monotonic() - started < 0.5 and win.console.sent == []  # IsHungAppWindow said so at once


def test_ping_of_a_busy_or_gone_window_is_none_after_its_timeout(win: Fakes) -> None:
    win.console.windows = [main_window(answers=False)]  # busy: not yet hung by Windows' 5-second rule
    host = ConsoleHost()
    started = time.monotonic()
    assert host.ping(MAIN, 0.1) is None
    assert time.monotonic() - started >= 0.1 and win.console.sent[-1][3] == 100
    assert host.ping(0x0BAD, 0.1) is None  # no such window


def test_close_window_posts_wm_close_to_a_live_window_only(win: Fakes) -> None:
    win.console.windows = [Win(DIALOG_, APP, "Save changes?", (300, 250, 700, 450), DIALOG, 0, "#32770", owner=MAIN),
                           main_window()]
    host = ConsoleHost()
    assert host.close_window(DIALOG_) is True
    assert win.console.posted == [(DIALOG_, WM_CLOSE)]
    win.console.windows.pop(0)  # it went
    assert host.close_window(DIALOG_) is False
    assert host.close_window(0) is host.close_window(0xFFFF) is False  # PostMessage would take both: no window
    win.console.failing = {"PostMessageW"}  # UIPI: an elevated window takes no message from us
    assert host.close_window(MAIN) is False
    assert win.console.posted == [(DIALOG_, WM_CLOSE)]


def test_raise_app_brings_its_windows_over_the_others_keeping_their_order(win: Fakes) -> None:
    tooltip = Win(0x0008_0001, APP, "", (120, 120, 220, 140), WS_POPUP, WS_EX_TOOLWINDOW | WS_EX_TOPMOST,
                  "tooltips_class32")
    taskbar = Win(TASKBAR, SHELL, "", (0, 1040, 1920, 1080), WS_POPUP, WS_EX_TOOLWINDOW | WS_EX_TOPMOST, "Shell_TrayWnd")
    win.console.windows = [
        taskbar, tooltip,
        Win(NOTEPAD, OTHER, "notes.txt - Notepad", (0, 0, 1200, 900), class_name="Notepad"),
        Win(DIALOG_, APP, "Save changes?", (300, 250, 700, 450), DIALOG, 0, "#32770", owner=MAIN),
        main_window(),
        Win(0x0009_0001, APP, "Acme ERP — minimised", iconic=True),
    ]
    host = ConsoleHost()
    assert ids(list(WindowFacts.of(host.windows(), APP).above)) == [DIALOG_, NOTEPAD, tooltip.hwnd]
    assert in_thread(lambda: host.raise_app(APP)) == 2
    assert [h for h, _ in win.console.positioned] == [MAIN, DIALOG_]  # bottom to top
    assert all(f == SWP_NOMOVE | SWP_NOSIZE | SWP_NOACTIVATE | SWP_ASYNCWINDOWPOS for _, f in win.console.positioned)
    assert ids(host.windows()) == [NOTEPAD, MAIN, DIALOG_, tooltip.hwnd, TASKBAR]
    facts = WindowFacts.of(host.windows(), APP)
    assert ids(list(facts.above)) == [DIALOG_, tooltip.hwnd]  # Notepad is no longer over the app
    assert host.raise_app(OTHER + 1) == 0


# -- reboot --------------------------------------------------------------------------------------


def test_without_a_reboot_command_the_agent_does_not_reboot_windows(win: Fakes,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(windows.subprocess, "run", lambda *a, **k: pytest.fail("ran a command"))
    with pytest.raises(DesktopError, match=r'--reboot-command "shutdown /r /f /t 0"'):
        ConsoleHost().restart()


def test_restart_runs_the_reboot_command_and_fails_if_windows_stays_up(win: Fakes,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[list[str]] = []
    waited: list[float] = []
    monkeypatch.setattr(windows.subprocess, "run", lambda argv, **k: ran.append(argv))
    monkeypatch.setattr(windows.time, "sleep", waited.append)
    host = ConsoleHost(reboot_command=["shutdown", "/r", "/f", "/t", "0"])
    with pytest.raises(DesktopError, match="did not restart within 600s"):
        host.restart()
    assert ran == [["shutdown", "/r", "/f", "/t", "0"]] and waited == [windows.REBOOT_WAIT]


def test_a_refused_reboot_says_what_windows_said(win: Fakes, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(argv: list[str], **kwargs: Any) -> None:
        raise subprocess.CalledProcessError(5, argv, b"", b"Access is denied.(5)\r\n")

    monkeypatch.setattr(windows.subprocess, "run", refuse)
    monkeypatch.setattr(windows.time, "sleep", lambda s: pytest.fail("waited for a reboot that was refused"))
    with pytest.raises(DesktopError, match=r"\(shutdown /r\) failed with status 5: Access is denied"):
        ConsoleHost(reboot_command=["shutdown", "/r"]).restart()


class FakeRegistry:
    """``winreg`` over HKEY_LOCAL_MACHINE as a dict: key path → {value name: value}. A missing
    key or value raises FileNotFoundError, as winreg does; every opened key must be closed."""

    HKEY_LOCAL_MACHINE = 0x80000002

    def __init__(self, keys: dict[str, dict[str, Any]]) -> None:
        self.keys = keys
        self.open: list[str] = []

    def OpenKey(self, hive: int, path: str) -> str:
        assert hive == self.HKEY_LOCAL_MACHINE
        if path not in self.keys:
            raise FileNotFoundError(2, "The system cannot find the file specified")
        self.open.append(path)
        return path

    def CloseKey(self, key: str) -> None:
        self.open.remove(key)

    def QueryValueEx(self, key: str, name: str) -> tuple[Any, int]:
        if name not in self.keys[key]:
            raise FileNotFoundError(2, "The system cannot find the file specified")
        return self.keys[key][name], 7  # REG_MULTI_SZ


CBS = r"SOFTWARE\Microsoft\Windows\CurrentVersion\Component Based Servicing\RebootPending"
WU = r"SOFTWARE\Microsoft\Windows\CurrentVersion\WindowsUpdate\Auto Update\RebootRequired"
SESSION_MANAGER = r"SYSTEM\CurrentControlSet\Control\Session Manager"


@pytest.mark.parametrize(("keys", "pending"), [
    ({SESSION_MANAGER: {}}, False),
    ({SESSION_MANAGER: {"PendingFileRenameOperations": []}}, False),  # present, nothing queued
    ({}, False),
    ({CBS: {}, SESSION_MANAGER: {}}, True),  # Component Based Servicing
    ({WU: {}, SESSION_MANAGER: {}}, True),  # Windows Update
    ({SESSION_MANAGER: {"PendingFileRenameOperations": [r"\??\C:\app\old.dll", ""]}}, True),
])
def test_each_of_windows_reboot_required_signals_is_a_pending_reboot(
        win: Fakes, monkeypatch: pytest.MonkeyPatch, keys: dict[str, dict[str, Any]], pending: bool) -> None:
    registry = FakeRegistry(keys)
    monkeypatch.setitem(sys.modules, "winreg", registry)
    assert ConsoleHost().reboot_pending() is pending
    assert not registry.open, "a registry key was left open"


def test_debians_reboot_required_flag_is_a_pending_reboot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flags = (tmp_path / "run" / "reboot-required", tmp_path / "var" / "run" / "reboot-required")
    monkeypatch.setattr(driver, "REBOOT_REQUIRED", flags)
    assert driver.posix_reboot_pending() is False
    flags[1].parent.mkdir(parents=True)
    flags[1].write_text("*** System restart required ***\n")  # what update-notifier writes
    assert driver.posix_reboot_pending() is True


def test_the_reboot_command_line_keeps_windows_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    line = r'"C:\Program Files\Robot\reboot.cmd" /now C:\logs'
    assert command_words("sudo systemctl reboot") == ["sudo", "systemctl", "reboot"]
    monkeypatch.setattr(sys, "platform", "win32")
    assert command_words(line) == [r"C:\Program Files\Robot\reboot.cmd", "/now", r"C:\logs"]
    assert command_words('shutdown /r /f /t 0 /c "deskfleet restart"')[-1] == "deskfleet restart"


# -- UI Automation controls ----------------------------------------------------------------------


def test_find_control_matches_the_control_type_it_is_given(win: Fakes) -> None:
    edit = FakeControl(50004, "Patient", "mrn", Rect(10, 20, 110, 40))
    save = FakeControl(50000, "Save", "save", Rect(200, 300, 260, 330))
    win.ui.window("Acme ERP", 13, controls=[edit, save])
    win.ui.window("Other app", 14, controls=[FakeControl(50000, "Save", "", Rect(1, 1, 2, 2))])
    assert in_thread(lambda: find_control(13, control_type="Button")) == (200, 300, 60, 30)
    assert in_thread(lambda: find_control(13, name="Save", control_type="ButtonControl")) == (200, 300, 60, 30)
    assert in_thread(lambda: find_control(13, automation_id="mrn")) == (10, 20, 100, 20)
    assert in_thread(lambda: find_control(13, name="Print", timeout=0)) is None
    with pytest.raises(ValueError, match="unknown control type 'Knob'"):
        find_control(13, control_type="Knob")
    with pytest.raises(ValueError, match="needs a name"):
        find_control(13)


# -- the agent's composition root picks the console host on Windows ------------------------------------


@pytest.fixture
def tiny(tmp_path: Path) -> Any:
    """A pack whose application is found running by the title of its window."""
    return load_pack(write_pack(tmp_path / "tiny", MANIFEST.replace("screen = [320, 240]",
                                                                   'screen = [320, 240]\nwindow = "^Tiny — "')))


def agent_host(pack: Any, tmp_path: Path, **overrides: Any) -> AgentHost:
    return AgentHost(AgentHostConfig(servers=["http://127.0.0.1:9"], packs=[pack], desktop="local",
                                     machine="robot-07", state_dir=tmp_path / "agent", **overrides))


def test_the_agent_host_drives_the_console_session_on_windows(tiny: Any, win: Fakes, tmp_path: Path) -> None:
    command = ["shutdown", "/r", "/f", "/t", "0"]
    host = _machine_host(agent_host(tiny, tmp_path, reboot_command=command).config, "robot-07")
    assert isinstance(host, ConsoleHost) and host.reboot_command == command
    assert _machine_host(agent_host(tiny, tmp_path).config, "robot-07").reboot_command == []


# -- the local desktop on a Windows console: attach, health, pre-flight -----------------------------


class Devices:
    """Screen and input devices of a fake console (what mss and pynput would open)."""

    opened: list[Devices] = []

    size = (320, 240)

    def __init__(self, display: str | None) -> None:
        assert display is None  # the session's own screen
        self.width, self.height = Devices.size
        self.lock = threading.Lock()
        self.grabs = 0
        self.mouse = self.keyboard = types.SimpleNamespace()  # any input raises AttributeError
        Devices.opened.append(self)

    def grab(self, region: Any) -> np.ndarray:
        self.grabs += 1
        return np.zeros((self.height, self.width, 3), np.uint8)

    def close(self) -> None:
        pass


@dataclass
class RunningApp:
    """The application some user started before the agent (a psutil.Process stand-in)."""

    pid: int = 4242
    stopped: list[str] = field(default_factory=list)

    def is_running(self) -> bool:
        return not self.stopped

    def status(self) -> str:
        return psutil.STATUS_RUNNING

    def oneshot(self) -> Any:
        return contextlib.nullcontext()

    def cpu_percent(self, interval: float | None = None) -> float:
        return 1.0

    def memory_info(self) -> Any:
        return types.SimpleNamespace(rss=50 * 2**20)

    def terminate(self) -> None:
        self.stopped.append("terminate")

    def wait(self, timeout: float | None = None) -> None:
        pass

    def kill(self) -> None:
        self.stopped.append("kill")


@pytest.fixture
def console_machine(tiny: Any, win: Fakes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``deskfleet agent --pack tiny --desktop local`` on the fake Windows, the app already up."""
    app = RunningApp()
    window = win.ui.window("Tiny — Orders", app.pid)
    real_process = psutil.Process
    monkeypatch.setattr(psutil, "Process", lambda pid=None: app if pid == app.pid else real_process(pid))
    monkeypatch.setattr(driver, "_Devices", Devices)
    monkeypatch.setattr(Devices, "opened", [])
    monkeypatch.setattr(Devices, "size", (320, 240))
    monkeypatch.setattr(RealDesktop, "_spawn", lambda self: pytest.fail(f"started {self.app.argv}"))
    yield types.SimpleNamespace(app=app, window=window, pack=tiny, host=agent_host(tiny, tmp_path), win=win)


async def test_local_on_windows_takes_over_the_running_app_by_its_window_title(console_machine: Any) -> None:
    m = console_machine
    await m.host.start()
    try:
        desktop = m.host.desktops[0]
        assert isinstance(desktop, RealDesktop) and isinstance(desktop.host, ConsoleHost)
        assert desktop.attached and desktop.app_pid == m.app.pid  # found by title, nothing spawned
        assert m.window.activated == 1  # brought to the foreground
        assert m.host.agents[0].boot_id == desktop.host.boot_id()
        info = await desktop.info()
        assert info.app_running and info.memory_mb == 50
    finally:
        await m.host.close()


async def test_console_problems_are_the_desktops_machine_health_said_once(console_machine: Any) -> None:
    m = console_machine
    await m.host.start()
    try:
        desktop = m.host.desktops[0]
        assert await desktop.problems() == []
        m.win.console.flags = WTS_SESSIONSTATE_LOCK
        assert await desktop.problems() == console_problems()
        Devices.opened[0].width, Devices.opened[0].height = 800, 600  # the console fell back to 800x600
        problems = await desktop.problems()
        sizes = [p for p in problems if "800x600" in p]
        assert len(problems) == 2 and len(sizes) == 1  # the frame size, said once, and the lock
        assert "the application expects 320x240: set the display to 320x240" in sizes[0]
    finally:
        await m.host.close()


async def test_preflight_on_a_locked_console_fails_without_touching_the_app(console_machine: Any) -> None:
    m = console_machine
    await m.host.start()
    try:
        desktop = m.host.desktops[0]
        m.win.console.flags = WTS_SESSIONSTATE_LOCK
        events: list[str] = []

        async def record(kind: str, data: dict[str, Any], frame: Any) -> None:
            events.append(kind)

        activated = m.window.activated
        result = await preflight(desktop, m.pack.model, "ready", session_key=None, record=record)
        assert not result.ok and result.state == "unhealthy"
        assert result.detail.startswith("this machine cannot be driven: the screen is locked")
        assert result.steps == [] and events == []  # no playbook, no evidence
        assert Devices.opened[0].grabs == 0  # not even a screenshot
        assert m.window.activated == activated and m.app.stopped == [] and desktop.app_pid == m.app.pid
    finally:
        await m.host.close()
    assert m.app.stopped == []  # the app was taken over, not started: the agent leaves it running


async def test_the_host_is_called_from_worker_threads_inside_ui_automation(console_machine: Any) -> None:
    """The driver calls hosts through asyncio.to_thread: UI Automation must be joined there."""
    m = console_machine
    host = await asyncio.to_thread(ConsoleHost)
    assert await asyncio.to_thread(host.find_window, "^Tiny") == m.app.pid
    assert await asyncio.to_thread(host.show_window, m.app.pid)


async def test_on_windows_the_desktop_sees_what_covers_the_app_and_whether_it_answers(
        console_machine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver finds the Win32 window facts as it finds X11's: by the host's methods."""
    m = console_machine
    monkeypatch.setattr(driver, "LISTING_REUSE", 0.0)
    console = m.win.console
    console.windows = [Win(NOTEPAD, OTHER, "notes.txt - Notepad", (100, 100, 400, 300), class_name="Notepad"),
                       Win(MAIN, m.app.pid, "Tiny — Orders", (0, 0, 320, 240))]
    await m.host.start()
    try:
        desktop = m.host.desktops[0]
        facts = await desktop.app_windows()
        assert facts is not None and facts.main is not None and facts.main.id == MAIN
        assert [(w.id, w.pid) for w in facts.above] == [(NOTEPAD, OTHER)]
        assert await desktop.app_answers() is True
        console.windows[1].hung = True
        assert await desktop.app_answers() is False
        console.windows[1].hung = False
        await desktop.bring_to_front()
        assert console.positioned == [(MAIN, SWP_NOMOVE | SWP_NOSIZE | SWP_NOACTIVATE | SWP_ASYNCWINDOWPOS)]
        facts = await desktop.app_windows()
        assert facts is not None and facts.above == ()
        console.windows.insert(0, Win(DIALOG_, m.app.pid, "Error", (50, 50, 250, 150), DIALOG, 0, "#32770",
                                      owner=MAIN))
        facts = await desktop.app_windows()
        assert facts is not None and [w.id for w in facts.above] == [DIALOG_]
        assert await desktop.close_window(facts.above[0]) is True
        assert console.posted == [(DIALOG_, WM_CLOSE)]
    finally:
        await m.host.close()
