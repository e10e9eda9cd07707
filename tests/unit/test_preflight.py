"""Pre-flight on a scripted desktop: states settle before anything acts on them, probes say
why they failed, the session note follows what the screen shows, ``ctx.ensure`` drives the
same loop mid-run, and ``@playbook`` waits for the screen to move on."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_packs import SCREENS, write_pack

from deskfleet import (
    DesktopError,
    DesktopInfo,
    PlaybookContext,
    ProbeResult,
    Region,
    load_pack,
)
from deskfleet.agent.preflight import preflight
from deskfleet.appmodel import Account

BLACK = np.zeros((240, 320, 3), np.uint8)


class Scripted:
    """A desktop whose screen is whatever ``show`` says now; input is recorded."""

    name = "scripted"
    input_gate = None

    def __init__(self, show: Callable[[], np.ndarray]) -> None:
        self.show = show
        self.clicks: list[tuple[int, int]] = []
        self.notes: list[str | None] = []
        self.looks = 0
        self.size: tuple[int, int] = (320, 240)

    async def screenshot(self, region: Region | None = None) -> np.ndarray:
        self.looks += 1
        frame = self.show()
        return frame if region is None else region.crop(frame)

    async def click(self, x: int, y: int, *, button: str = "left", count: int = 1) -> None:
        self.clicks.append((x, y))

    async def move(self, x: int, y: int) -> None: ...

    async def info(self) -> DesktopInfo:
        return DesktopInfo(*self.size, boot_id="b", uptime=1.0, memory_mb=1.0, cpu_percent=0.0)

    async def restart_app(self) -> None:
        self.clicks.append((-1, -1))

    async def reboot(self) -> None: ...

    def note_session(self, account: str | None) -> None:
        self.notes.append(account)


@pytest.fixture
def pack(tmp_path: Path) -> Any:
    return load_pack(write_pack(tmp_path / "tiny"))


class Outcome:
    def __init__(self, result: Any, events: list[tuple[str, dict[str, Any]]]) -> None:
        self.ok, self.steps, self.detail, self.events = result.ok, result.steps, result.detail, events


async def run(desktop: Scripted, model: Any, wanted: str = "ready", session_key: str | None = None) -> Outcome:
    events: list[tuple[str, dict[str, Any]]] = []

    async def record(kind: str, data: dict[str, Any], frame: Any) -> None:
        events.append((kind, data))

    result = await preflight(desktop, model, wanted, session_key=session_key,
                             account=Account.local("robot", "robot", "pw"), record=record, max_steps=4)
    return Outcome(result, events)


async def test_a_transitional_frame_triggers_no_recovery(pack: Any) -> None:
    """A dialog shown for one frame (a repaint) is not acted on: it must hold for the settle time."""
    frames = iter([SCREENS["dialog"]] + [SCREENS["home"]] * 200)
    desktop = Scripted(lambda: next(frames))
    result = await run(desktop, pack.model)
    assert result.ok and result.steps == [] and desktop.clicks == []


async def test_a_state_that_holds_is_acted_on_after_the_settle_time(pack: Any) -> None:
    screen = {"now": SCREENS["dialog"]}

    def show() -> np.ndarray:
        return screen["now"]

    desktop = Scripted(show)
    loop = asyncio.get_running_loop()
    t0 = loop.time()

    async def dismissed() -> None:
        while not desktop.clicks:
            await asyncio.sleep(0.01)
        screen["now"] = SCREENS["home"]

    task = asyncio.create_task(dismissed())
    result = await run(desktop, pack.model)
    await task
    assert result.ok and result.steps == ["dismiss"] and desktop.clicks == [(20, 20)]
    assert loop.time() - t0 >= pack.model.settle  # it waited for the dialog to settle


async def test_a_ready_screen_is_taken_at_once(pack: Any) -> None:
    desktop = Scripted(lambda: SCREENS["home"])
    result = await run(desktop, pack.model)
    assert result.ok and desktop.looks == 1


async def test_a_failing_probe_says_why_in_the_step(pack: Any) -> None:
    async def hung(desktop: Any) -> ProbeResult:
        return ProbeResult(False, "the clock in the corner stopped")

    pack.model.probe = hung
    desktop = Scripted(lambda: SCREENS["home"])
    result = await run(desktop, pack.model)
    assert not result.ok
    whys = [d["why"] for kind, d in result.events if kind == "playbook.step"]
    assert whys and whys[0] == "the clock in the corner stopped"


async def test_the_session_note_follows_the_screen(pack: Any) -> None:
    """A signed-out screen clears the note; a signs_in playbook that reaches ready writes it."""
    screen = {"now": SCREENS["login"]}
    desktop = Scripted(lambda: screen["now"])

    async def logged_in() -> None:
        while not desktop.clicks:
            await asyncio.sleep(0.01)
        screen["now"] = SCREENS["home"]

    task = asyncio.create_task(logged_in())
    result = await run(desktop, pack.model, session_key="robot")
    await task
    assert result.ok and result.steps == ["login"]
    assert desktop.notes[0] is None and desktop.notes[-1] == "robot"


async def test_a_machine_health_problem_fails_preflight_without_touching_the_app(pack: Any) -> None:
    desktop = Scripted(lambda: SCREENS["home"])

    async def problems() -> list[str]:
        return ["the screen is locked"]

    desktop.problems = problems  # type: ignore[attr-defined]
    result = await run(desktop, pack.model)
    assert not result.ok and "cannot be driven: the screen is locked" in result.detail
    assert desktop.looks == 0 and desktop.clicks == []


async def test_playbook_waits_for_the_screen_to_move_on_and_restarts_a_hung_app(pack: Any) -> None:
    model = pack.model
    login = model.playbooks["login"]
    # The screen never changes at all after the click: the app is hung → restarted.
    desktop = Scripted(lambda: SCREENS["login"])
    ctx = PlaybookContext(desktop, model, Account.local("robot", "robot", "pw"), None,
                          model.classify(SCREENS["login"]))
    import deskfleet.appmodel as appmodel

    old = appmodel.SCREEN_WAIT
    appmodel.SCREEN_WAIT = 0.2
    try:
        await login(ctx)
    finally:
        appmodel.SCREEN_WAIT = old
    assert desktop.clicks == [(10, 10), (-1, -1)]


async def test_moved_on_refuses_input_the_app_did_not_take(pack: Any) -> None:
    model = pack.model
    frames = [SCREENS["login"].copy() for _ in range(2)]
    frames[1][0, 0] = (1, 2, 3)  # something repainted, but still the login screen
    shown = iter([frames[0]] + [frames[1]] * 1000)
    desktop = Scripted(lambda: next(shown))
    ctx = PlaybookContext(desktop, model, None, None, model.classify(SCREENS["login"]))
    before = await desktop.screenshot()
    with pytest.raises(DesktopError, match="stayed at 'login'"):
        await ctx.moved_on(before, timeout=0.2)


async def test_a_playbook_that_cannot_succeed_stops_preflight_at_once(pack: Any) -> None:
    """A refused account (BusinessError) is not retried step after step: that could lock it."""
    from deskfleet import BusinessError

    async def refused(ctx: PlaybookContext) -> None:
        raise BusinessError("the app refused the password of 'robot'")

    pack.model.playbooks["login"] = refused
    desktop = Scripted(lambda: SCREENS["login"])
    result = await run(desktop, pack.model)
    assert not result.ok and result.steps == ["login"]
    assert result.detail == "login failed: BusinessError: the app refused the password of 'robot'"


async def test_a_playbook_failing_twice_the_same_way_stops_preflight(pack: Any) -> None:
    async def flaky(ctx: PlaybookContext) -> None:
        raise DesktopError("the sign-in button is greyed out")

    pack.model.playbooks["login"] = flaky
    desktop = Scripted(lambda: SCREENS["login"])
    result = await run(desktop, pack.model)
    assert not result.ok and result.steps == ["login", "login"]
    assert result.detail == "login failed twice the same way: DesktopError: the sign-in button is greyed out"


async def test_moved_on_does_not_take_a_redrawn_screen_for_a_hung_app(pack: Any) -> None:
    """A refused login redraws exactly the screen it started from: the app changed (it is
    alive), so it is not restarted; the playbook says the input was not taken."""
    model = pack.model
    redraw = SCREENS["login"].copy()
    redraw[0, 0] = (9, 9, 9)
    shown = iter([redraw, redraw] + [SCREENS["login"]] * 1000)  # a flash, then the same login again
    desktop = Scripted(lambda: next(shown))
    ctx = PlaybookContext(desktop, model, None, None, model.classify(SCREENS["login"]))
    with pytest.raises(DesktopError, match="stayed at 'login'"):
        await ctx.moved_on(SCREENS["login"], timeout=0.2)
    assert desktop.clicks == []  # never restarted
