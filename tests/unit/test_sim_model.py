"""SimEHR's app model: the agent's pre-flight loop reaches "home" from every state."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import numpy as np
import pytest

from deskfleet.appmodel import Account, AppModel, PlaybookContext, local_accounts
from deskfleet.sim import FaultPlan, SimBackend, SimDesktop, ehr_model

MODEL = ehr_model()
CREDS = SimBackend.credentials(0)
ACCOUNTS = local_accounts(CREDS, app="simehr")  # as an embedder gives them: codes computed here


class TickingClock:
    """Simulated time that moves 50 ms each time it is read: reboots end, without sleeping."""

    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        self.t += 0.05
        return self.t


async def preflight(desktop: SimDesktop, model: AppModel, want: str, steps: int = 8) -> list[str]:
    """The agent's loop: screenshot, classify, done if ready and right; else a playbook."""
    seen: list[str] = []
    for _ in range(steps):
        frame = await desktop.screenshot()
        c = model.classify(frame)
        seen.append(c.state)
        if c.state in model.ready_states:
            assert model.probe is not None and model.session_reader is not None
            if not await model.probe(desktop):
                seen.append("(unresponsive)")
                playbook = model.on_unknown
            elif await model.session_reader(desktop, frame) != want:
                seen.append("(wrong account)")
                assert model.logout is not None
                playbook = model.logout
            else:
                return seen
        else:
            playbook = model.recovery_for(c.state)
        await model.playbooks[playbook](PlaybookContext(desktop, model, ACCOUNTS[want], want, c))
    raise AssertionError(f"never reached home as {want}: {seen}")


async def sign_in(d: SimDesktop, user: str = "robot1") -> None:
    await d.type_text(f"{user}\t{CREDS[user].password}\n")


def click(name: str, screen: str = "home") -> Callable[[SimDesktop], Awaitable[None]]:
    async def go(d: SimDesktop) -> None:
        await d.click(*d.layout.widget(screen, name).center)

    return go


async def nothing(d: SimDesktop) -> None:
    pass


async def on_form(d: SimDesktop) -> None:
    await sign_in(d)
    await click("new_patient")(d)


async def on_search(d: SimDesktop) -> None:
    await sign_in(d)
    await click("search")(d)


async def mfa(d: SimDesktop) -> None:
    await sign_in(d, "clinic-a")


async def wrong_account(d: SimDesktop) -> None:
    await sign_in(d, "robot2")


async def error_over_form(d: SimDesktop) -> None:
    await on_form(d)
    await d.type_text("MRN-9")
    d.inject("error_dialog")


async def validation_over_form(d: SimDesktop) -> None:
    await on_form(d)
    await d.type_text("MRN-9\n")  # no name, no date of birth


async def saved_over_form(d: SimDesktop) -> None:
    await on_form(d)
    await d.type_text("MRN-9\tJo Doe\t1990-01-01\n")


async def exported_over_search(d: SimDesktop) -> None:
    await saved_over_form(d)
    await d.press("enter")
    await click("search")(d)
    await d.type_text("MRN-9\n")
    await click("export", "search")(d)


async def session_expired(d: SimDesktop) -> None:
    await sign_in(d)
    d.inject("session_expired")


async def crashed(d: SimDesktop) -> None:
    await sign_in(d)
    d.inject("crash")


async def rebooting(d: SimDesktop) -> None:
    await sign_in(d)
    d.inject("reboot")


async def frozen_home(d: SimDesktop) -> None:
    await sign_in(d)
    d.inject("freeze")


async def frozen_form(d: SimDesktop) -> None:
    await on_form(d)
    d.inject("freeze")


async def frozen_dialog(d: SimDesktop) -> None:
    await error_over_form(d)
    d.inject("freeze")


async def frozen_login(d: SimDesktop) -> None:
    d.inject("freeze")


# start → (the state the loop first sees, the account wanted)
STARTS = {
    "login": (nothing, "login", "robot1"),
    "mfa": (mfa, "mfa", "clinic-a"),
    "wrong account": (wrong_account, "home", "robot1"),
    "form": (on_form, "patient_form", "robot1"),
    "search": (on_search, "search", "robot1"),
    "error over form": (error_over_form, "error_dialog", "robot1"),
    "validation over form": (validation_over_form, "validation", "robot1"),
    "saved over form": (saved_over_form, "saved", "robot1"),
    "exported over search": (exported_over_search, "exported", "robot1"),
    "session expired": (session_expired, "session_expired", "robot1"),
    "crashed": (crashed, "desktop", "robot1"),
    "rebooting": (rebooting, "rebooting", "robot1"),
    "frozen home": (frozen_home, "home", "robot1"),
    "frozen form": (frozen_form, "patient_form", "robot1"),
    "frozen dialog": (frozen_dialog, "error_dialog", "robot1"),
    "frozen login": (frozen_login, "login", "robot1"),
}


@pytest.mark.parametrize("start", list(STARTS))
async def test_preflight_reaches_home_from(start: str) -> None:
    setup, first, want = STARTS[start]
    faults = FaultPlan(reboot_duration=0.2, session_ttl=3600)
    desktop = SimDesktop("m1", SimBackend(), seed=3, faults=faults, clock=TickingClock())
    await setup(desktop)
    seen = await preflight(desktop, MODEL, want)
    assert seen[0] == first
    assert seen[-1] == "home"
    info = await desktop.info()
    assert info.session_key == want
    assert MODEL.probe is not None and await MODEL.probe(desktop)
    if start.startswith("frozen"):
        assert not desktop.app.frozen


async def test_playbooks_restart_an_app_that_does_not_react() -> None:
    desktop = SimDesktop("m1", SimBackend(), seed=3)
    desktop.inject("freeze")
    before = await desktop.screenshot()
    c = MODEL.classify(before)
    await MODEL.playbooks["login"](PlaybookContext(desktop, MODEL, ACCOUNTS["robot1"], "robot1", c))
    assert not desktop.app.frozen  # restarted: the next round can log in
    assert desktop.view().screen == "login"


async def test_mfa_playbook_without_a_totp_seed_asks_for_a_person() -> None:
    desktop = SimDesktop("m1", SimBackend(), seed=3)
    await sign_in(desktop, "clinic-a")
    c = MODEL.classify(await desktop.screenshot())
    no_seed = Account.local("clinic-a", "clinic-a", CREDS["clinic-a"].password)
    with pytest.raises(LookupError, match="no TOTP seed"):
        await MODEL.playbooks["mfa"](PlaybookContext(desktop, MODEL, no_seed, "clinic-a", c))


async def test_login_playbook_without_an_account_says_why() -> None:
    desktop = SimDesktop("m1", SimBackend(), seed=3)
    c = MODEL.classify(await desktop.screenshot())
    with pytest.raises(LookupError, match="no account to log in with"):
        await MODEL.playbooks["login"](PlaybookContext(desktop, MODEL, None, None, c))


def test_model_is_built_once_per_size_and_fits_other_sizes() -> None:
    assert ehr_model() is MODEL
    small = ehr_model(800, 600)
    assert small is not MODEL and small.meta["screen"] == [800, 600]
    check = small.classifier.states[0].checks[0]
    assert check.template.shape == (check.region.height, check.region.width)
    assert np.all(check.template >= 0)
