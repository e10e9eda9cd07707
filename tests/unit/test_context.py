"""``ctx.act`` and ``ctx.expect``: a step of an automation that does something and waits for
the screen it leads to — failing at once on trouble, recovering once from a session that
ended mid-run — on a scripted desktop and the tiny test pack's model."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from test_packs import SCREENS, write_pack
from test_preflight import Scripted

from deskfleet import Context, DesktopError, StateTimeout, load_pack


class Screen:
    """What the scripted desktop shows, the actions taken and the recoveries run."""

    def __init__(self, pack: Any, shown: str) -> None:
        self.shown = shown
        self.actions = 0
        self.recoveries: list[str] = []
        self.steps: list[tuple[str, str | None]] = []

        async def progress(step: str, percent: float | None, message: str | None) -> None:
            self.steps.append((step, message))

        async def upload(name: str, data: bytes, content_type: str) -> str:
            return name

        async def ensure(state: str) -> Any:
            self.recoveries.append(state)
            self.shown = "home"
            return SimpleNamespace(ok=True, state="home", detail="")

        self.ctx = Context(run_id="r", attempt_id=1, attempt_number=1, machine_id="m",
                           desktop=Scripted(lambda: SCREENS[self.shown]), model=pack.model,
                           report_progress=progress, upload=upload, stop_event=asyncio.Event(),
                           ensure=ensure)

    def action(self, *leads_to: str) -> Any:
        """An action whose n-th call leads to ``leads_to[n]``."""
        async def act() -> None:
            self.shown = leads_to[min(self.actions, len(leads_to) - 1)]
            self.actions += 1
        return act


@pytest.fixture
def pack(tmp_path: Path) -> Any:
    return load_pack(write_pack(tmp_path / "tiny"))


async def test_act_returns_the_state_the_action_led_to(pack: Any) -> None:
    screen = Screen(pack, "home")
    assert await screen.ctx.act(screen.action("dialog"), "dialog", recover_on=["login"], timeout=1) == "dialog"
    assert screen.actions == 1 and screen.recoveries == []


async def test_act_recovers_from_a_session_that_ended_and_acts_once_more(pack: Any) -> None:
    screen = Screen(pack, "home")
    seen = await screen.ctx.act(screen.action("login", "dialog"), "dialog", recover_on=["login"], timeout=1)
    assert seen == "dialog"
    assert screen.actions == 2 and screen.recoveries == ["ready"]
    assert screen.steps == [("recover from 'login'", "the application showed 'login' mid-run")]


async def test_act_gives_up_when_the_session_ends_again(pack: Any) -> None:
    screen = Screen(pack, "home")
    with pytest.raises(DesktopError, match=r"^tiny shows 'login' where 'dialog' was expected$"):
        await screen.ctx.act(screen.action("login"), "dialog", recover_on=["login"], timeout=1)
    assert screen.actions == 2 and screen.recoveries == ["ready"]


async def test_act_fails_at_once_on_trouble_without_recovering(pack: Any) -> None:
    screen = Screen(pack, "home")
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(DesktopError, match=r"shows 'login' where 'dialog' or 'home' was expected"):
        await screen.ctx.act(screen.action("login"), "dialog", "home", trouble=["login"], timeout=30)
    assert loop.time() - started < 10, "trouble ends the step at once, not at the timeout"
    assert screen.actions == 1 and screen.recoveries == []


async def test_a_wanted_state_is_never_trouble(pack: Any) -> None:
    screen = Screen(pack, "login")
    assert await screen.ctx.expect("login", trouble=["login", "dialog"], timeout=1) == "login"


async def test_expect_times_out_naming_what_it_saw(pack: Any) -> None:
    screen = Screen(pack, "home")
    with pytest.raises(StateTimeout) as caught:
        await screen.ctx.expect("dialog", trouble=["login"], timeout=0.2)
    assert "home" in str(caught.value)


async def test_ask_human_checks_what_it_is_asked_and_a_playbook_asks_only_in_a_runs_preflight():
    """``ctx.ask_human`` (automations) and ``PlaybookContext.ask_human`` (an MFA prompt no
    TOTP seed answers) hand the agent what it sends; without an agent's asker, they refuse."""
    from datetime import timedelta

    from deskfleet import HumanAnswer
    from deskfleet.appmodel import PlaybookContext
    from deskfleet.sdk import Context

    got: list[tuple[str, str, dict[str, object]]] = []

    async def human(kind: str, prompt: str, **kw: object) -> HumanAnswer:
        got.append((kind, prompt, kw))
        return HumanAnswer("1234", "ada", 1.0, "hum_1")

    async def nothing(*_a: object) -> None:
        return None

    ctx = Context(run_id="r", attempt_id=1, attempt_number=1, machine_id="m", desktop=None, model=None,  # type: ignore[arg-type]
                  report_progress=nothing, upload=nothing, stop_event=asyncio.Event(), ask_human=human)  # type: ignore[arg-type]
    answer = await ctx.ask_human("sms_code", "The code", due=timedelta(minutes=2), escalate_after=30, secret=True)
    assert (answer.response, answer.by) == ("1234", "ada") and "1234" not in repr(answer)
    assert got == [("sms_code", "The code", {"due": 120.0, "escalate_after": 30.0, "screenshot": True,
                                             "secret": True})]
    for kind, prompt, due in (("no spaces", "p", 1.0), ("sms_code", " ", 1.0), ("sms_code", "p", 0.0)):
        with pytest.raises(ValueError):
            await ctx.ask_human(kind, prompt, due=due)
    assert len(got) == 1

    playbook = PlaybookContext(None, None, None, None, None)  # type: ignore[arg-type]
    with pytest.raises(LookupError, match="no person to ask"):
        await playbook.ask_human("push_approval", "Approve the sign-in")
    playbook.human = human
    assert (await playbook.ask_human("push_approval", "Approve the sign-in", due=60)).by == "ada"
    assert got[-1] == ("push_approval", "Approve the sign-in", {"due": 60, "escalate_after": None, "screenshot": True,
                                                               "secret": False})
