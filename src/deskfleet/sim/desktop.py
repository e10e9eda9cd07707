"""A simulated machine: the :class:`~deskfleet.desktop.Desktop` protocol over SimEHR.

:class:`SimDesktop` owns what the operating system would: the screen (frames rendered
from the app's view, cached), the input devices, the process (crash, freeze, restart),
the machine itself (reboot, boot id, uptime) and the fault dice. Each user action — click,
type, key press, drag, scroll — rolls the :class:`~deskfleet.sim.faults.FaultPlan` once;
the input is handled, then whatever fault came up strikes. Every fault is recorded in
``faults_fired`` with the simulated time.

Time has two sources: ``clock`` (default ``time.time``) decides session expiry, reboot
length and uptime, so tests can move it forward; ``action_delay`` and slow actions are
real ``asyncio.sleep`` pauses, so the demo runs at a visible pace and tests at full speed.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import os
import random
import time
from collections.abc import Callable
from typing import Any

from deskfleet import DesktopInfo, Frame, Region

from .app import SimApp
from .backend import SimBackend
from .faults import FaultPlan
from .layout import REBOOTING_VIEW, View
from .render import Renderer

log = logging.getLogger(__name__)

RebootListener = Callable[[], Any]
INJECTABLE = ("crash", "freeze", "error_dialog", "session_expired", "reboot")


class SimDesktop:
    """One simulated machine running SimEHR, which starts at its login screen."""

    def __init__(
        self,
        name: str,
        backend: SimBackend,
        *,
        seed: int = 0,
        faults: FaultPlan | None = None,
        action_delay: float = 0.0,
        width: int = 1024,
        height: int = 768,
        clock: Callable[[], float] = time.time,
        drift: int | None = None,
    ) -> None:
        self.name = name
        self.input_gate: Callable[[], None] | None = None
        self.backend = backend
        self.seed = seed
        self.fault_plan = faults or FaultPlan()
        self.action_delay = action_delay
        #: the simulated OS waits for a reboot (an update installed); a reboot clears it
        self.reboot_pending = False
        self.width, self.height = width, height
        self.clock = clock
        self.rng = random.Random(seed)
        self.faults_fired: list[tuple[float, str]] = []
        self.actions = 0
        self.renderer = Renderer(width, height, drift)
        self.layout = self.renderer.layout
        self.app = SimApp(
            backend,
            self.layout,
            machine=name,
            faults=self.fault_plan,
            rng=self.rng,
            clock=clock,
            on_fault=self._record,
        )
        self.boots = 0
        self.boot_id = self._boot_id()
        self.booted_at = clock()
        self.rebooting_until: float | None = None
        self._reboot_listeners: list[RebootListener] = []
        self._listener_tasks: set[asyncio.Future[Any]] = set()

    def __repr__(self) -> str:
        return f"SimDesktop({self.name!r}, seed={self.seed})"

    @property
    def reboot_downtime(self) -> float:
        """Seconds this machine stays dark after a reboot (its agent is away that long)."""
        return self.fault_plan.reboot_duration

    # -- observation ------------------------------------------------------------------

    def view(self) -> View:
        """What the screen shows now (after letting time pass)."""
        self._advance()
        return REBOOTING_VIEW if self.rebooting_until is not None else self.app.view()

    @property
    def rebooting(self) -> bool:
        self._advance()
        return self.rebooting_until is not None

    async def screenshot(self, region: Region | None = None) -> Frame:
        frame = self.renderer.frame(self.view())
        if region is None:
            return frame
        self._check_region(region)
        return region.crop(frame)

    async def read_text(self, region: Region) -> str:
        self._check_region(region)
        return self.renderer.read_text(self.view(), region)

    async def info(self) -> DesktopInfo:
        self._advance()  # (every heartbeat asks: no view is built for it)
        down = self.rebooting_until is not None
        app = self.app
        if down or not app.running:
            dialogs = 0  # the rebooting screen, the bare desktop
        else:
            dialogs = len(app.frozen_view.dialogs if app.frozen_view is not None else app.dialogs)
        if down:
            cpu = 0.0
        elif app.frozen:
            cpu = 50.0  # a hung UI thread spinning: one of two cores
        elif app.running:
            cpu = 4.0
        else:
            cpu = 1.0
        return DesktopInfo(
            width=self.width,
            height=self.height,
            boot_id=self.boot_id,
            uptime=0.0 if down else max(0.0, self.clock() - self.booted_at),
            memory_mb=0.0 if down else app.memory_mb,
            cpu_percent=cpu,
            app_running=not down and app.running,
            reboot_pending=self.reboot_pending and not down,
            session_key=None if down else app.session_user,
            session_expires_at=None if down else app.session_expires_at,
            extra={"actions": float(self.actions), "boots": float(self.boots),
                   "dialogs": float(dialogs)},
        )

    # -- input ------------------------------------------------------------------------

    async def move(self, x: int, y: int) -> None:
        if not self.rebooting:
            self.app.move(x, y)

    async def click(self, x: int, y: int, *, button: str = "left", count: int = 1) -> None:
        await self._action(lambda: self.app.click(x, y, button=button, count=count))

    async def drag(self, x1: int, y1: int, x2: int, y2: int) -> None:
        await self._action(lambda: self.app.drag(x1, y1, x2, y2))

    async def type_text(self, text: str) -> None:
        await self._action(lambda: self.app.type_text(text))

    async def press(self, *keys: str) -> None:
        if not keys:
            raise ValueError("press() needs at least one key")
        await self._action(lambda: self.app.press(*keys))

    async def scroll(self, dy: int, dx: int = 0) -> None:
        await self._action(lambda: None)  # SimEHR has nothing to scroll

    async def _action(self, apply: Callable[[], None]) -> None:
        self.actions += 1
        # Roll before anything else, whatever the screen shows: the fault stream must
        # depend only on the seed and the number of actions.
        roll = self.fault_plan.roll(self.rng)
        if self.rebooting:
            return  # input to a machine that is down goes nowhere
        delay = self.action_delay
        if roll.slow:
            self._record("slow")
            delay += self.fault_plan.slow_ms / 1000.0
        if delay > 0:
            await asyncio.sleep(delay)
        if self.rebooting:  # (this also lets the app's timers run before the input lands)
            return
        if self.input_gate is not None:
            self.input_gate()  # the agent's last word: may raise to refuse the input
        apply()
        self.app.touched()
        if roll.reboot:
            self._record("reboot")
            self._start_reboot()
        elif self.app.responsive:
            if roll.crash:
                self._record("crash")
                self.app.crash()
            elif roll.freeze:
                self._record("freeze")
                self.app.freeze()
            elif roll.error_dialog:
                self._record("error_dialog")
                self.app.show_error()

    # -- operator controls ------------------------------------------------------------

    async def restart_app(self) -> None:
        """Kill the app (hung or not) and start it again; it comes up at its login screen."""
        if self.rebooting:
            return
        if self.action_delay > 0:
            await asyncio.sleep(self.action_delay)
        if not self.rebooting:
            self.app.start()

    async def reboot(self) -> None:
        """Start a reboot and return, as ``shutdown /r`` does; the screen goes black."""
        if not self.rebooting:
            self._start_reboot()

    def add_reboot_listener(self, callback: RebootListener) -> None:
        """Call ``callback()`` when a reboot starts (a coroutine result is scheduled)."""
        self._reboot_listeners.append(callback)

    def remove_reboot_listener(self, callback: RebootListener) -> None:
        self._reboot_listeners.remove(callback)

    def inject(self, kind: str) -> None:
        """Make a fault happen now, for tests and scripted demos; recorded like a rolled one."""
        if kind not in INJECTABLE:
            raise ValueError(f"cannot inject {kind!r}; choose one of {', '.join(INJECTABLE)}")
        if self.rebooting:
            return
        if kind == "reboot":
            self._record(kind)
            self._start_reboot()
        elif kind == "session_expired":
            self.app.expire_session()  # recorded by the app when it notices
            self.app.tick()
        elif self.app.responsive:
            self._record(kind)
            {"crash": self.app.crash, "freeze": self.app.freeze, "error_dialog": self.app.show_error}[
                kind
            ]()

    # -- machine ----------------------------------------------------------------------

    def _record(self, kind: str) -> None:
        self.faults_fired.append((self.clock(), kind))
        log.debug("fault on %s: %s", self.name, kind, extra={"machine": self.name, "fault": kind})

    def _boot_id(self) -> str:
        # A machine made by a provider that starts it as a process (providers.local) has a
        # boot of its own: a new process there is a rebooted machine, not a restarted agent.
        booted = os.environ.get("DESKFLEET_BOOT_ID", "")
        return hashlib.sha256(f"{self.name}:{self.seed}:{self.boots}:{booted}".encode()).hexdigest()[:16]

    def _start_reboot(self) -> None:
        self.rebooting_until = self.clock() + self.fault_plan.reboot_duration
        # The new boot id is known from the start, so that listeners (the sim agent) can
        # announce the machine that will come back.
        self.boots += 1
        self.boot_id = self._boot_id()
        self.reboot_pending = False  # the update it waited for is done
        self.app.crash()
        for callback in list(self._reboot_listeners):
            try:
                result = callback()
            except Exception:
                log.exception("reboot listener failed on %s", self.name)
                continue
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._listener_tasks.add(task)
                task.add_done_callback(self._listener_tasks.discard)

    def _advance(self) -> None:
        """Let simulated time act: finish a reboot, expire a session."""
        if self.rebooting_until is not None:
            if self.clock() < self.rebooting_until:
                return
            self.rebooting_until = None
            self.booted_at = self.clock()
            self.app.start()
        self.app.tick()

    def _check_region(self, region: Region) -> None:
        if (
            region.width <= 0
            or region.height <= 0
            or region.left < 0
            or region.top < 0
            or region.left + region.width > self.width
            or region.top + region.height > self.height
        ):
            raise ValueError(f"region {tuple(region)} is not within the {self.width}x{self.height} screen")
