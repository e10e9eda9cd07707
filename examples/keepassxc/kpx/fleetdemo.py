"""KeePassXC's demo: ``deskfleet demo --pack examples/keepassxc [--machines 3 --runs 30]``.

Each machine is an Xvfb display with KeePassXC on it; all of them share one database (the
demo creates it, with the master password of its account). The workload comes in two waves
of adds and finds; between them, a quiet spell longer than KeePassXC's idle lock (6 s here)
locks every database, so the second wave's pre-flights unlock again.

KeePassXC has no fault switches, so the demo strikes from outside (``strike``, at every tick
of the workload, and a thread that watches the shared file), besides the demo's own agent
SIGKILL and X server kill:

- **app killed after its save** (scripted, once; twice with ``--faults chaos``): when an
  add's save reaches the file, that machine's KeePassXC is SIGKILLed before the automation
  has finished. The run is reconciled elsewhere — the search finds the entry — and not
  saved twice;
- **a modal dialog the model does not know** (scripted, once): Help → About on an idle
  machine during the quiet spell, once its database has locked itself. The next pre-flight
  finds the screen ``covered`` (the window system: a dialog over the app), never ready, and
  the built-in ``uncover`` closes it.

The double-effect check counts entries by title with ``keepassxc-cli``.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import random
import string
import threading
import time
from argparse import Namespace
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from deskfleet import Credential
from deskfleet.demo import NAMES, BadRequest, DemoConfig, FaultTaken, Wave, Work

from . import accounts as demo_accounts
from . import kxcli
from . import layout as L

PACK = Path(__file__).resolve().parents[1]
#: KeePassXC's idle lock on the demo's machines (seconds)
LOCK_AFTER = 6.0
#: fault preset → how many adds get their KeePassXC killed after the save, and whether a dialog is opened
PRESETS = {"none": (0, False), "demo": (1, True), "chaos": (2, True)}


def _launcher() -> ModuleType:
    """The pack's launch.py (a script, not part of the package): its ``stop`` kills a machine's KeePassXC."""
    spec = importlib.util.spec_from_file_location("_kpx_launch", PACK / "launch.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=1)
def _model() -> Any:
    from deskfleet import load_pack

    return load_pack(PACK).model


def _click(display: str, points: list[tuple[int, int]]) -> None:
    """Clicks on an X display through XTest, as a person at the machine would."""
    from Xlib import X
    from Xlib import display as xdisplay
    from Xlib.ext import xtest

    d = xdisplay.Display(display)
    try:
        for x, y in points:
            xtest.fake_input(d, X.MotionNotify, x=x, y=y)
            xtest.fake_input(d, X.ButtonPress, 1)
            xtest.fake_input(d, X.ButtonRelease, 1)
            d.sync()
            time.sleep(0.5)  # the menu opens
        xtest.fake_input(d, X.MotionNotify, x=L.PARK[0], y=L.PARK[1])
        d.sync()
    finally:
        d.close()


@dataclass
class KeePassXCDemo:
    config: DemoConfig
    out: Path
    data: Path  # the pack's {data} on the demo's machines: the shared database lives there
    noun: str = "real desktops (Xvfb + KeePassXC, one shared database)"
    desktops: tuple[str, ...] = ("xvfb",)
    cancel_running: tuple[str, ...] = ("keepassxc.find_entry",)
    #: every desktop unlocks the same database with the same password
    max_sessions: int = 16
    taken: list[FaultTaken] = field(default_factory=list)
    _wave1: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _killer: threading.Thread | None = None
    _armed: threading.Event = field(default_factory=threading.Event)
    _dialog_done: bool = False
    _expired: set[str] = field(default_factory=set)  # machines seen locked by the idle lock in the quiet spell

    @property
    def database(self) -> Path:
        return self.data / "keepassxc.kdbx"

    @property
    def password(self) -> str:
        return self.accounts()["keepassxc"].password

    @property
    def kills(self) -> int:
        return PRESETS.get(self.config.faults, (0, False))[0]

    @property
    def lock_after(self) -> float:
        return LOCK_AFTER if self.config.faults != "none" else 300.0

    # -- before, after -------------------------------------------------------------------------

    def prepare(self) -> None:
        """Create the shared database, and start watching it for the app-kill fault."""
        if not self.database.exists():
            kxcli.create(self.database, self.password)
        if self.kills:
            self._killer = threading.Thread(target=self._kill_after_saves, name="kpx-demo-killer", daemon=True)
            self._killer.start()

    def close(self) -> None:
        self._stop.set()
        if self._killer is not None:
            self._killer.join(5)

    def agent_args(self) -> list[str]:
        return [f"--app-option=--lock-after={self.lock_after:g}", "--app-idle-timeout", f"{self.lock_after:g}",
                # The quiet spell is there to let every database lock itself: no upkeep here.
                "--no-upkeep"]

    def accounts(self) -> dict[str, Credential]:
        return demo_accounts(self.config.seed)

    # -- the workload ------------------------------------------------------------------------------

    def queued_cancels(self, work: list[Work]) -> set[int]:
        finds = [i for i, (automation, _, _) in enumerate(work) if automation == "keepassxc.find_entry"]
        return {finds[-1]} if finds else set()

    def waves(self) -> list[Wave]:
        """Wave 1 adds entries (and finds some); after a quiet spell longer than the idle lock,
        wave 2 finds them (and adds a few more)."""
        c = self.config
        rng = random.Random(c.seed)
        first_wave = max(1, round(c.runs * 0.6))
        created: list[str] = []
        waves: list[list[Work]] = [[], []]
        for i in range(c.runs):
            options: dict[str, Any] = {"deadline": 400, "progress_timeout": 15, "attempt_timeout": 150,
                                       "max_attempts": 4, "idempotency_key": f"kpx-demo-{c.seed}-{i}"}
            wave = 0 if i < first_wave else 1
            roll = rng.random()
            first, last = rng.choice(NAMES).split(" ", 1)
            if not created or (wave == 0 and (i < 3 or roll < 0.7)) or (wave == 1 and roll < 0.2):
                title = f"D{c.seed}-{i:04d} {last}"
                if wave == 0:
                    created.append(title)
                secret = "".join(rng.choice(string.ascii_letters + string.digits + "!-_.") for _ in range(14))
                waves[wave].append(("keepassxc.add_entry", {
                    "title": title, "username": first.lower(), "password": secret,
                    "url": f"https://{last.lower().replace(' ', '')}.example", "notes": f"demo run {i}"}, options))
            else:
                waves[wave].append(("keepassxc.find_entry", {"title": rng.choice(created)}, options))
        self._wave1 = len(waves[0])
        if self.config.faults == "none" or not waves[1]:
            return [Wave(waves[0] + waves[1])]
        quiet = self.lock_after + 5.0
        why = f"a quiet spell of {quiet:g}s: KeePassXC's {self.lock_after:g}s idle lock locks every database"
        return [Wave(waves[0]), Wave(waves[1], quiet, why)]

    def bad_requests(self) -> list[BadRequest]:
        return [
            ("an automation nobody offers", "keepassxc.delete_entry", {"title": "X"}, {}),
            ("input that fails the schema", "keepassxc.add_entry", {"title": 'has "quotes"', "password": "x y"}, {}),
            ("labels no machine has", "keepassxc.find_entry", {"title": "X"}, {"labels": {"site": "mars"}}),
        ]

    # -- effects and faults ------------------------------------------------------------------------

    def double_effects(self, runs: list[dict[str, Any]]) -> list[str]:
        titles = Counter(kxcli.titles(self.database, self.password))
        effects = [f"{title!r} was added {n} times" for title, n in sorted(titles.items()) if n > 1]
        for r in runs:
            if r["automation"] == "keepassxc.add_entry" and r["state"] == "succeeded":
                n = titles.get(r["input"]["title"], 0)
                if n != 1:
                    effects.append(f"run {r['id']} succeeded but {r['input']['title']!r} is in the database {n} times")
        return effects

    def fault_log(self) -> list[FaultTaken]:
        return list(self.taken)

    async def strike(self, done: int, total: int, machines: list[dict[str, Any]]) -> list[str]:
        """Arm the app kill once a tenth of the runs are done. In the quiet spell, note each idle
        machine whose database the idle lock locked (the session expiry the next pre-flight
        meets), and open the About box on one of them."""
        out = []
        if self.kills and not self._armed.is_set() and done >= total * 0.1:
            self._armed.set()
            out.append("armed: the next save that reaches the shared file gets its KeePassXC SIGKILLed")
        if self.config.faults == "none" or not self._wave1 or done != self._wave1:
            return out  # the quiet spell: every run of wave 1 final, none of wave 2 yet
        if any(m.get("current_run") for m in machines):
            return out
        if self._dialog_done and all(m["id"] in self._expired for m in machines if m["status"] == "ready"):
            return out
        screens = {m["id"]: await asyncio.to_thread(self._screen, m["id"]) for m in machines if m["status"] == "ready"}
        for machine, state in screens.items():
            if state == "locked" and machine not in self._expired:
                self._expired.add(machine)
                self.taken.append(FaultTaken("session_expired", "idle", machine, time.time(), "timeout"))
        # The About box goes up once every machine it can reach is locked: well inside the quiet
        # spell (idle lock 6 s, spell 11 s), so no pre-flight races the two clicks. Not on the
        # first machine: the demo kills that one's X server in the same quiet spell.
        wanted = PRESETS.get(self.config.faults, (0, False))[1]
        locked = sorted((m for m, state in screens.items() if state == "locked"), reverse=True)
        if wanted and not self._dialog_done and locked and all(
                state in ("locked", "no_screen", "?") for state in screens.values()):
            machine, display = locked[0], self._display(locked[0])
            if display:
                await asyncio.to_thread(_click, display, [L.MENU_HELP.center, L.HELP_ABOUT.center])
                if await self._shows(machine, "unknown"):  # the pixels alone: not the list
                    self._dialog_done = True
                    self.taken.append(FaultTaken("unknown_dialog", "between runs", machine, time.time(), "scripted"))
                    out.append(f"opened Help → About on {machine}: a dialog its model does not know")
        return out

    # -- from outside ------------------------------------------------------------------------------

    async def _shows(self, machine: str, state: str, timeout: float = 2.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await asyncio.to_thread(self._screen, machine) == state:
                return True
            await asyncio.sleep(0.1)
        return False

    def _described(self, machine: str) -> dict[str, Any]:
        import json

        try:
            data = json.loads((self.out / "agents" / "machines" / f"{machine}.json").read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _display(self, machine: str) -> str | None:
        display = self._described(machine).get("display")
        return str(display) if display else None

    def _screen(self, machine: str) -> str:
        """What the pack's model sees on a machine's screen now."""
        from deskfleet import DesktopError
        from deskfleet.desktop import capture_screen

        display = self._display(machine)
        if display is None:
            return "?"
        try:
            frame = capture_screen(display)
        except DesktopError:
            return "no_screen"
        return str(_model().classify(frame).state)

    def _kill_after_saves(self) -> None:
        """A thread: at each save that reaches the file while armed, SIGKILL the KeePassXC of
        the machine holding the write lock (the ledger names it) — after the save, before the
        automation that made it has finished."""
        from .shared import SharedDatabase

        db = SharedDatabase(self.database)
        launcher = _launcher()
        killed = 0
        while killed < self.kills and not self._stop.is_set():
            if not self._armed.wait(0.2):
                continue
            holder = (db.ledger().get("holder") or {}).get("machine")
            if not holder:
                time.sleep(0.01)
                continue
            before = self.database.stat().st_mtime_ns
            while not self._stop.is_set() and (db.ledger().get("holder") or {}).get("machine") == holder:
                if self.database.stat().st_mtime_ns != before:
                    launcher.stop(Namespace(data=str(self.data), machine=holder))
                    self.taken.append(FaultTaken("app_killed", "saved", holder, time.time(), "scripted"))
                    killed += 1
                    time.sleep(2.0)  # the next kill strikes another save
                    break
                time.sleep(0.005)
