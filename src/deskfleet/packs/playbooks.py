"""How a pack's module declares its playbooks, probe and session reader — and the playbooks
every pack has without writing them.

    from deskfleet import PlaybookContext, ProbeResult, playbook, probe

    @playbook(signs_in=True)
    async def login(ctx: PlaybookContext) -> None:
        account = ctx.account
        await ctx.desktop.click(400, 300)
        await ctx.desktop.type_text(account.username)
        ...

    @probe
    async def responsive(desktop: Desktop) -> ProbeResult:
        ...

A playbook decorated with ``@playbook`` waits, after its own input, until the screen shows
a known state other than the one it started from (``PlaybookContext.moved_on``): a screen
that did not change at all belongs to a hung app, which it restarts. ``wait=False`` opts
out (for playbooks that wait in their own way). ``signs_in=True`` marks the playbooks that
log in: when pre-flight sees one reach a ready screen, it notes the account on the machine.

Built in (a pack may define its own under the same name): ``restart_app`` (a reboot when
the app will not come up), ``restart_desktop`` (reboot), ``wait`` (a screen caught
mid-repaint settles by itself; one that stays unrecognised gets ``restart_app``).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, overload

import numpy as np

from ..appmodel import Playbook, PlaybookContext, ProbeResult
from ..desktop import Desktop, Region, SeesWindows
from ..errors import DesktopError
from ..vision import UNKNOWN

F = TypeVar("F", bound=Callable[..., Any])

#: seconds the built-in ``wait`` gives an unrecognised screen to settle
SETTLE_WAIT = 1.5


@dataclass(frozen=True, slots=True)
class PlaybookInfo:
    name: str
    signs_in: bool = False
    waits: bool = True


ATTR = "__deskfleet_playbook__"
PROBE_ATTR = "__deskfleet_probe__"
READER_ATTR = "__deskfleet_session_reader__"


@overload
def playbook(func: Playbook, /) -> Playbook: ...


@overload
def playbook(
    *, name: str | None = None, signs_in: bool = False, wait: bool = True
) -> Callable[[Playbook], Playbook]: ...


def playbook(
    func: Playbook | None = None, /, *, name: str | None = None, signs_in: bool = False, wait: bool = True
) -> Playbook | Callable[[Playbook], Playbook]:
    """Declare a playbook of the pack (its name: ``name``, or the function's)."""

    def wrap(fn: Playbook) -> Playbook:
        info = PlaybookInfo(name or fn.__name__, signs_in, wait)
        if not asyncio.iscoroutinefunction(fn):
            raise TypeError(f"playbook {info.name}: write it as 'async def {fn.__name__}(ctx)'")
        if not wait:
            setattr(fn, ATTR, info)
            return fn

        @functools.wraps(fn)
        async def run(ctx: PlaybookContext) -> None:
            before = await ctx.desktop.screenshot()
            await fn(ctx)
            await ctx.moved_on(before)

        setattr(run, ATTR, info)
        return run

    return wrap(func) if func is not None else wrap


def probe(func: F) -> F:
    """Declare the pack's responsiveness probe: ``async def (desktop) -> ProbeResult | bool``."""
    if not asyncio.iscoroutinefunction(func):
        raise TypeError(f"probe {func.__name__}: write it as 'async def {func.__name__}(desktop)'")
    setattr(func, PROBE_ATTR, True)
    return func


async def hover_responds(desktop: Desktop, target: Region, *, park: tuple[int, int], within: float = 1.5,
                         what: str = "the hovered control") -> ProbeResult:
    """The usual body of a probe: hover ``target`` (a button that highlights under the pointer)
    and watch its pixels. A live app repaints it within ``within`` seconds; a hung one (stopped,
    busy, deadlocked) shows a perfect frame and never repaints. The pointer waits at ``park`` —
    a point that highlights nothing — before and after.

        @probe
        async def responsive(desktop: Desktop) -> ProbeResult:
            return await hover_responds(desktop, NEW_BUTTON, park=(5, 5), what="the New button")
    """
    await desktop.move(*park)
    plain = await desktop.screenshot(target)
    for _ in range(5):  # a highlight left by an earlier hover fades first
        await asyncio.sleep(0.03)
        again = await desktop.screenshot(target)
        if np.array_equal(again, plain):
            break
        plain = again
    await desktop.move(*target.center)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    try:
        while loop.time() < deadline:
            if not np.array_equal(await desktop.screenshot(target), plain):
                return ProbeResult(True)
            await asyncio.sleep(0.02)
        return ProbeResult(False, f"{what} did not highlight within {within:g}s of a hover: "
                                  "the application does not repaint (hung)")
    finally:
        await desktop.move(*park)


def session_reader(func: F) -> F:
    """Declare how to read the logged-in account off the screen:
    ``async def (desktop, frame) -> str | None``."""
    if not asyncio.iscoroutinefunction(func):
        raise TypeError(f"session reader {func.__name__}: write it as 'async def {func.__name__}(desktop, frame)'")
    setattr(func, READER_ATTR, True)
    return func


def info(func: Any) -> PlaybookInfo | None:
    found = getattr(func, ATTR, None)
    return found if isinstance(found, PlaybookInfo) else None


# -- built in -----------------------------------------------------------------------------------


@playbook(wait=False)
async def restart_app(ctx: PlaybookContext) -> None:
    """Restart the application; if it will not come up, the machine is sick: reboot it."""
    try:
        await ctx.desktop.restart_app()
    except DesktopError:
        await ctx.desktop.reboot()


@playbook(wait=False)
async def restart_desktop(ctx: PlaybookContext) -> None:
    """Reboot the machine (for an Xvfb machine: its X server and the app)."""
    await ctx.desktop.reboot()


@playbook(wait=False)
async def wait(ctx: PlaybookContext) -> None:
    """A screen caught mid-repaint settles by itself; one that stays unknown needs a restart."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_WAIT
    while loop.time() < deadline:
        await asyncio.sleep(0.1)
        if (await ctx.look()).state != UNKNOWN:
            return
    await restart_app(ctx)


#: seconds a covering window gets to close after it was asked to
UNCOVER_WAIT = 3.0


@playbook(wait=False)
async def uncover(ctx: PlaybookContext) -> None:
    """A window the model does not account for lies over the app (``covered``): another
    program's window is sent behind the app (the app is raised); a window of the app's own —
    a dialog nobody modelled — is asked to close as its close button would, or gets Escape.
    One that stays is a DesktopError naming it (pre-flight then tries again, then restarts)."""
    desktop = ctx.desktop
    if not isinstance(desktop, SeesWindows):
        raise DesktopError("this desktop cannot see windows: nothing to uncover")
    facts = await desktop.app_windows()
    if facts is None or facts.main is None or not facts.above:
        return  # gone by itself
    top = facts.above[-1]
    if top.pid != facts.main.pid:
        await desktop.bring_to_front()
    elif not await desktop.close_window(top):
        await ctx.desktop.press("escape")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + UNCOVER_WAIT
    while loop.time() < deadline:
        await asyncio.sleep(0.1)
        now = await desktop.app_windows()
        if now is None or all(w.id != top.id for w in now.above):
            return
    raise DesktopError(f"{top.describe()} is still over the application after it was asked to go")


BUILTIN: dict[str, Playbook] = {"restart_app": restart_app, "restart_desktop": restart_desktop, "wait": wait,
                                "uncover": uncover}
