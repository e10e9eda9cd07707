"""KeePassXC's playbooks, probe and keep-alive: how pre-flight brings it to the entry list.

Which playbook answers which screen is in ``pack.toml`` ([states.recover]). Each acts, and
``@playbook`` then waits for the screen to move on (and restarts an app that did not react
at all). There is no window manager on the robots' displays, and after any dialog closes the
X input focus is the root window: typed characters would vanish (and a Return alone, on the
unlock screen, opens "Unlock failed"). So every playbook clicks before it types, and the
unlock playbook counts the dots the password field shows before it presses Enter.

The master password comes from ``ctx.account`` only: the account the orchestrator's vault
grants the attempt (or an embedder's ``AgentHostConfig(credentials=…)``).
"""

from __future__ import annotations

import asyncio

from deskfleet import UNKNOWN as UNKNOWN_STATE
from deskfleet import (
    Desktop,
    DesktopError,
    PlaybookContext,
    ProbeResult,
    Region,
    hover_responds,
    playbook,
    probe,
)

from . import layout as L
from . import screen
from .fields import click_into

#: seconds a live KeePassXC takes at most to highlight a hovered toolbar button
PROBE_BOUND = 1.5
#: seconds the Escape playbook gives an unknown screen to become a known one
ESCAPE_WAIT = 2.0
#: the longest password whose dots fit in the field (longer ones are not counted)
MAX_COUNTED = 60


async def _click(desktop: Desktop, where: Region) -> None:
    await desktop.click(*where.center)
    await desktop.move(*L.PARK)  # a pointer left over a button highlights it: the model would not know it


@playbook(signs_in=True)
async def unlock(ctx: PlaybookContext) -> None:
    """Unlock the database with the account's password (the master password)."""
    if ctx.state.state == "locked_error":
        # The red banner of a failed attempt moves the panel down, and hides itself a few
        # seconds later, moving it back up: close it first, so that the field stays put.
        await _click(ctx.desktop, L.BANNER_CLOSE)
        await ctx.wait_for("locked")
    password = ctx.account.password
    field = L.PASSWORD
    await click_into(ctx.desktop, field)  # focus: after a dialog it is nowhere
    await ctx.desktop.press("ctrl", "a")
    await ctx.desktop.press("backspace")
    await ctx.desktop.type_text(password)
    await ctx.desktop.move(*L.PARK)
    if len(password) <= MAX_COUNTED:
        shown = await screen.masked_length(ctx.desktop, field, len(password))
        if shown != len(password):
            await ctx.desktop.press("ctrl", "a")  # nothing of it stays behind
            await ctx.desktop.press("backspace")
            raise DesktopError(f"the password field shows {shown} characters after typing {len(password)}: "
                               "keystrokes were lost")
    await ctx.desktop.press("enter")
    seen = await ctx.wait_for("entries", "locked_error", "unlock_failed", timeout=15.0)
    if seen == "locked_error":
        raise DesktopError("KeePassXC refused the account's password (invalid credentials)")


@playbook
async def lock(ctx: PlaybookContext) -> None:
    """Lock the database (the toolbar's lock): the pack's logout."""
    await _click(ctx.desktop, L.LOCK_BUTTON)


@playbook
async def dismiss_unlock_failed(ctx: PlaybookContext) -> None:
    """"Unlocking the database failed and you did not enter a password": Cancel."""
    await _click(ctx.desktop, L.UNLOCK_FAILED_CANCEL)


@playbook
async def discard_changes(ctx: PlaybookContext) -> None:
    """"Would you like to save changes to this entry?": Discard. An entry form left open by a
    lost attempt is never saved by a pre-flight: the run's reconcile check decides."""
    await _click(ctx.desktop, L.UNSAVED_DISCARD)


@playbook
async def discard_and_lock(ctx: PlaybookContext) -> None:
    """"You are editing an entry. Discard changes and lock anyway?" (the idle lock struck
    with a form open): Discard; the unlock follows."""
    await _click(ctx.desktop, L.LOCK_CONFIRM_DISCARD)


@playbook
async def cancel_form(ctx: PlaybookContext) -> None:
    """The new-entry form (a lost attempt's): Cancel. A changed form asks first (discard_changes)."""
    await _click(ctx.desktop, L.FORM_CANCEL)


@playbook
async def clear_search(ctx: PlaybookContext) -> None:
    """Search results: Escape in the search box clears the search."""
    await click_into(ctx.desktop, L.SEARCH_BOX, L.SEARCH_FRAME_AT)
    await ctx.desktop.press("esc")
    await ctx.desktop.move(*L.PARK)


async def _known_within(ctx: PlaybookContext, seconds: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        await asyncio.sleep(0.1)
        if (await ctx.look()).state != UNKNOWN_STATE:
            return True
    return False


@playbook(wait=False)
async def escape_then_wait(ctx: PlaybookContext) -> None:
    """A screen the model does not know. Most often a dialog, which has the keyboard focus:
    Escape closes it. Else perhaps the list without its preview panel (KeePassXC hides it when
    nothing is selected; without the panel the model cannot see that no dialog is up): a click
    on the root group brings the panel back — behind a modal dialog the click does nothing.
    A screen that stays unknown gets the app restarted (a reboot if that fails)."""
    await ctx.desktop.press("esc")
    await ctx.desktop.move(*L.PARK)
    if await _known_within(ctx, ESCAPE_WAIT):
        return
    await _click(ctx.desktop, L.GROUP_ROOT)
    if await _known_within(ctx, ESCAPE_WAIT / 2):
        return
    try:
        await ctx.desktop.restart_app()
    except DesktopError:
        await ctx.desktop.reboot()


@playbook(wait=False)
async def keepalive(ctx: PlaybookContext) -> None:
    """Session upkeep on an idle machine: KeePassXC counts pointer motion as activity (its idle
    lock restarts), so a move over an empty spot of the list screen is enough, and changes
    nothing (``[session] pointer_counts`` tells deskfleet's session note the same)."""
    x, y = L.PARK
    await ctx.desktop.move(x + 12, y)
    await ctx.desktop.move(x, y)


@probe
async def responsive(desktop: Desktop) -> ProbeResult:
    """Hover the New-entry toolbar button: a live KeePassXC raises its frame at once, a hung one
    (SIGSTOPped, busy) never repaints. Pixels alone cannot tell: a hung app shows a perfect list."""
    return await hover_responds(desktop, L.NEW_BUTTON, park=L.PARK, within=PROBE_BOUND, what="the New-entry button")
