"""The simulated machine: input, login and MFA, and every fault as a user would see it."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pyotp
import pytest

from deskfleet.desktop import Desktop
from deskfleet.sim import FaultPlan, SimBackend, SimDesktop, ehr_model

MODEL = ehr_model()
CREDS = SimBackend.credentials(0)


class FakeClock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def make(faults: FaultPlan | None = None, *, seed: int = 1, clock: FakeClock | None = None,
         backend: SimBackend | None = None) -> SimDesktop:
    return SimDesktop("m1", backend or SimBackend(), seed=seed, faults=faults,
                      clock=clock or FakeClock())


async def state(desktop: SimDesktop) -> str:
    return MODEL.classify(await desktop.screenshot()).state


async def sign_in(desktop: SimDesktop, user: str = "robot1", password: str | None = None) -> None:
    layout = desktop.layout
    for field, text in (("username", user), ("password", password or CREDS[user].password)):
        await desktop.click(*layout.widget("login", field).center)
        await desktop.press("ctrl", "a")
        await desktop.type_text(text)
    await desktop.click(*layout.widget("login", "sign_in").center)


def kinds(desktop: SimDesktop) -> list[str]:
    return [kind for _, kind in desktop.faults_fired]


async def test_implements_the_desktop_protocol() -> None:
    desktop = make()
    assert isinstance(desktop, Desktop)
    info = await desktop.info()
    assert (info.width, info.height, info.app_running, info.session_key) == (1024, 768, True, None)
    assert info.memory_mb > 0


async def test_login_with_password_then_signed_in_as() -> None:
    desktop = make(FaultPlan(session_ttl=600))
    await sign_in(desktop, "robot2")
    assert await state(desktop) == "home"
    frame = await desktop.screenshot()
    assert MODEL.session_reader is not None
    assert await MODEL.session_reader(desktop, frame) == "robot2"
    info = await desktop.info()
    assert info.session_key == "robot2"
    assert info.session_expires_at == desktop.clock() + 600


async def test_wrong_password_shows_an_error_line() -> None:
    desktop = make()
    await sign_in(desktop, "robot1", password="guess")
    assert await state(desktop) == "login"
    error = desktop.layout.widget("login", "error")
    assert await desktop.read_text(error.rect) == "Invalid username or password."
    assert await desktop.read_text(desktop.layout.widget("login", "password").rect) == ""
    assert (await desktop.info()).session_key is None


async def test_mfa_with_a_real_totp_code() -> None:
    desktop = make()
    await sign_in(desktop, "clinic-a")  # an account that always asks
    assert await state(desktop) == "mfa"
    code = desktop.layout.widget("mfa", "code")
    await desktop.click(*code.center)
    await desktop.type_text("000000" if pyotp.TOTP(CREDS["clinic-a"].totp_seed or "").now()
                            != "000000" else "111111")
    await desktop.press("enter")
    assert await state(desktop) == "mfa"
    assert "Invalid code" in await desktop.read_text(desktop.layout.widget("mfa", "error").rect)
    await desktop.click(*code.center)
    await desktop.type_text(pyotp.TOTP(CREDS["clinic-a"].totp_seed or "").now())
    await desktop.press("enter")
    assert await state(desktop) == "home"
    assert (await desktop.info()).session_key == "clinic-a"
    assert kinds(desktop) == []  # asked by policy, not by a fault


async def test_mfa_rate_prompts_any_account() -> None:
    desktop = make(FaultPlan(mfa_rate=1.0))
    await sign_in(desktop, "robot1")
    assert await state(desktop) == "mfa"
    assert kinds(desktop) == ["mfa"]


async def test_focus_goes_where_you_click_and_keys_edit() -> None:
    desktop = make()
    layout = desktop.layout
    username = layout.widget("login", "username").rect
    await desktop.type_text("rob")  # the first field has focus when the screen opens
    await desktop.press("tab")
    await desktop.type_text("pw")
    assert await desktop.read_text(username) == "rob"
    await desktop.click(*username.center)
    await desktop.type_text("ot1")
    await desktop.press("backspace")
    assert await desktop.read_text(username) == "robot"
    await desktop.press("ctrl", "a")
    await desktop.type_text("robot2")
    assert await desktop.read_text(username) == "robot2"
    await desktop.click(*layout.widget("login", "password").center)
    await desktop.press("ctrl", "a")
    await desktop.type_text(CREDS["robot2"].password + "\n")  # Enter signs in
    assert (await desktop.info()).session_key == "robot2"


async def test_a_modal_dialog_swallows_clicks_under_it() -> None:
    desktop = make()
    await sign_in(desktop)
    desktop.inject("error_dialog")
    await desktop.click(*desktop.layout.widget("home", "sign_out").center)
    assert await state(desktop) == "error_dialog"
    assert (await desktop.info()).session_key == "robot1"
    await desktop.click(*desktop.layout.dialog_ok.center)
    assert await state(desktop) == "home"


async def test_hover_highlights_a_button() -> None:
    desktop = make()
    button = desktop.layout.widget("login", "sign_in")
    await desktop.move(*button.center)
    hovered = await desktop.screenshot(button.rect)
    await desktop.move(5, 700)
    assert not np.array_equal(hovered, await desktop.screenshot(button.rect))


# -- faults ------------------------------------------------------------------------------

CHAOS = FaultPlan(crash_rate=0.05, freeze_rate=0.03, error_dialog_rate=0.08, reboot_rate=0.02,
                  reboot_duration=3, mfa_rate=0.5, slow_rate=0.1, slow_ms=0.1, session_ttl=20)


async def scripted_session(seed: int) -> list[tuple[float, str]]:
    """The same 150 actions on a fresh desktop, recovering as a dumb robot would."""
    clock = FakeClock()
    desktop = make(CHAOS, seed=seed, clock=clock)
    layout = desktop.layout
    for i in range(50):
        clock.advance(1.0)
        await desktop.click(*layout.widget("login", "username").center)
        await desktop.type_text("robot1" if i % 3 else "robot2")
        await desktop.click(*layout.dialog_ok.center)
        if i % 7 == 0:
            await desktop.restart_app()
    return desktop.faults_fired


async def test_same_seed_same_faults() -> None:
    first = await scripted_session(7)
    assert len(first) >= 10
    assert {k for _, k in first} >= {"crash", "freeze", "error_dialog", "reboot", "slow"}
    assert await scripted_session(7) == first
    assert await scripted_session(8) != first


async def test_crash_shows_the_bare_desktop() -> None:
    desktop = make(FaultPlan(crash_rate=1.0))
    await desktop.click(10, 300)
    assert await state(desktop) == "desktop"
    assert kinds(desktop) == ["crash"]
    info = await desktop.info()
    assert not info.app_running and info.memory_mb == 0
    await desktop.restart_app()
    assert await state(desktop) == "login"


async def test_freeze_rate_freezes_on_an_action() -> None:
    desktop = make(FaultPlan(freeze_rate=1.0))
    await desktop.click(*desktop.layout.widget("login", "username").center)
    assert kinds(desktop) == ["freeze"] and desktop.app.frozen


async def test_freeze_keeps_the_last_frame_and_ignores_input() -> None:
    desktop = make()
    username = desktop.layout.widget("login", "username").rect
    await desktop.type_text("rob")
    desktop.inject("freeze")
    frozen = await desktop.screenshot()
    await desktop.type_text("ot1")
    await desktop.move(*desktop.layout.widget("login", "sign_in").center)
    await desktop.press("enter")
    assert np.array_equal(await desktop.screenshot(), frozen)
    assert await desktop.read_text(username) == "rob"
    info = await desktop.info()
    assert info.app_running and info.cpu_percent >= 50
    await desktop.restart_app()
    await desktop.type_text("robot1")
    assert await desktop.read_text(username) == "robot1"


async def test_frozen_home_looks_healthy_but_fails_the_probe() -> None:
    desktop = make()
    await sign_in(desktop)
    assert MODEL.probe is not None
    assert await MODEL.probe(desktop)
    healthy = await desktop.screenshot()
    desktop.inject("freeze")
    assert await state(desktop) == "home"
    assert np.array_equal(await desktop.screenshot(), healthy)
    assert not await MODEL.probe(desktop)


async def test_error_dialog_fault() -> None:
    desktop = make(FaultPlan(error_dialog_rate=1.0))
    await desktop.click(5, 700)
    assert await state(desktop) == "error_dialog"
    assert kinds(desktop) == ["error_dialog"]
    assert "Unexpected error" in await desktop.read_text(desktop.layout.dialog)


async def test_session_expiry_shows_login_with_a_dialog() -> None:
    clock = FakeClock()
    desktop = make(FaultPlan(session_ttl=30), clock=clock)
    await sign_in(desktop)
    clock.advance(29)
    assert await state(desktop) == "home"
    clock.advance(2)
    assert await state(desktop) == "session_expired"
    assert kinds(desktop) == ["session_expired"]
    assert (await desktop.info()).session_key is None
    await desktop.press("enter")
    assert await state(desktop) == "login"


async def test_reboot_blacks_out_then_comes_back_at_login() -> None:
    clock = FakeClock()
    desktop = make(FaultPlan(reboot_rate=1.0, reboot_duration=10), clock=clock)
    calls: list[str] = []
    done = asyncio.Event()

    async def async_listener() -> None:
        done.set()

    desktop.add_reboot_listener(lambda: calls.append(desktop.boot_id))
    desktop.add_reboot_listener(async_listener)
    before = (await desktop.info()).boot_id
    clock.advance(100)
    assert (await desktop.info()).uptime == 100
    await desktop.click(5, 700)
    assert kinds(desktop) == ["reboot"]
    await asyncio.wait_for(done.wait(), 1)
    info = await desktop.info()
    assert calls == [info.boot_id] and info.boot_id != before
    assert not info.app_running and await state(desktop) == "rebooting"
    await desktop.click(5, 700)  # ignored: the machine is down
    assert kinds(desktop) == ["reboot"]
    clock.advance(10)
    assert await state(desktop) == "login"
    info = await desktop.info()
    assert info.app_running and info.uptime == 0 and info.boot_id == calls[0]


async def test_leak_grows_memory_per_saved_record() -> None:
    desktop = make(FaultPlan(leak_mb_per_txn=40))
    await sign_in(desktop)
    base = (await desktop.info()).memory_mb
    layout = desktop.layout
    for mrn in ("A-1", "A-2"):
        await desktop.click(*layout.widget("home", "new_patient").center)
        await desktop.type_text(f"{mrn}\tJane Doe\t1980-02-03\n")
        assert await state(desktop) == "saved"
        await desktop.press("enter")
    assert desktop.backend.count() == 2
    assert (await desktop.info()).memory_mb == base + 80
    await desktop.restart_app()
    assert (await desktop.info()).memory_mb == base


async def test_slow_actions_take_longer() -> None:
    desktop = make(FaultPlan(slow_rate=1.0, slow_ms=50))
    t0 = time.perf_counter()
    await desktop.click(5, 700)
    assert time.perf_counter() - t0 >= 0.05
    assert kinds(desktop) == ["slow"]


def test_fault_plan_presets_and_validation() -> None:
    assert FaultPlan.preset("none") == FaultPlan()
    demo, chaos = FaultPlan.preset("demo"), FaultPlan.preset("chaos")
    for name in ("crash_rate", "freeze_rate", "error_dialog_rate", "reboot_rate", "mfa_rate",
                 "slow_rate", "leak_mb_per_txn"):
        assert 0 < getattr(demo, name) < getattr(chaos, name)
    assert demo.session_ttl is not None
    with pytest.raises(ValueError):
        FaultPlan.preset("mayhem")
    with pytest.raises(ValueError):
        FaultPlan(crash_rate=1.5)
