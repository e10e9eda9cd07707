"""The Windows path of ``deskfleet agent --desktop local``, on fakes of the Win32 surface.

Nothing here runs on Windows. The fakes stand in for what ``deskfleet.desktop.windows``
calls: the Win32 functions (kernel32, user32, wtsapi32), each with the prototype its
documentation gives — the module must declare the same one, and every argument it passes
must convert to it — and the ``uiautomation`` package (a root control whose children are
the top-level windows, ``SetActive``, ``Control(...).Exists``), which, like the real one,
ignores search keywords it does not know and must be used inside
``UIAutomationInitializerInThread`` off the main thread. What the fakes cannot prove —
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
from deskfleet.desktop import driver, windows
from deskfleet.desktop.driver import Host, RealDesktop
from deskfleet.desktop.windows import ConsoleHost, console_problems, find_control
from deskfleet.errors import ConfigError, DesktopError

# -- the Win32 surface, as documented ----------------------------------------------------------

# Sizes as on Windows (LLP64), whatever this machine's C long is.
DWORD, BOOL, LONG, UINT, INT, HANDLE = ctypes.c_uint32, ctypes.c_int32, ctypes.c_int32, ctypes.c_uint32, ctypes.c_int, ctypes.c_void_p
PVOID = ctypes.c_void_p
P = ctypes.POINTER

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
}


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
        assert self.argtypes == argtypes, f"{self.name}: argtypes {self.argtypes}, documented {argtypes}"
        assert self.restype is restype, f"{self.name}: restype {self.restype}, documented {restype}"
        assert len(args) == len(argtypes), f"{self.name}: {len(args)} arguments"
        for kind, arg in zip(argtypes, args, strict=True):
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
