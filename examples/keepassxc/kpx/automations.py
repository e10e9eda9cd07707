"""KeePassXC automations, written with deskfleet's SDK as any user's would be.

- ``keepassxc.add_entry`` adds an entry through the new-entry form. It is not idempotent (two
  saves make two entries), so it has a *reconcile* check: a search for the title, which
  finds the entry of an attempt that died after its save (the run is then done, not saved
  twice). Both run under the shared database's write lock, after this desktop has reloaded
  the file (see :mod:`.shared`).
- ``keepassxc.find_entry`` searches by title and returns what the list shows. It only reads:
  idempotent, simply retried.

Each reports a step before each stage (the progress watchdog's heartbeat), waits for screen
states instead of sleeping, clicks a field before typing into it (there is no window manager:
the keyboard focus is wherever the last click put it), reads back what it typed, and raises
:class:`~deskfleet.DesktopError` the moment KeePassXC shows a screen it did not expect. A
database that locked itself mid-run (the idle lock) is unlocked again with ``ctx.recover()``
and the step done once more. Both end at the entry list.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable

from pydantic import BaseModel, Field, SecretStr, field_validator

from deskfleet import BusinessError, Context, DesktopError, Region, automation

from . import layout as L
from . import screen
from .fields import click_into
from .screen import same_text
from .shared import SharedDatabase

STEP_TIMEOUT = 10.0  # seconds for KeePassXC to show the next screen
#: what the form takes and OCR reads back reliably (no quotes: a title is searched as title:"…")
SAFE = r"^[A-Za-z0-9][A-Za-z0-9 ._@:/+,-]*$"
#: the quote marks OCR may read a straight double quote as
QUOTES = frozenset("\"'`\u2018\u2019\u201c\u201d")
OPTIONAL = r"^([A-Za-z0-9][A-Za-z0-9 ._@:/+,-]*)?$"
#: screens that end any step at once: waiting longer would not make them go away
TROUBLE = ("locked", "locked_error", "unlock_failed", "lock_confirm", "unsaved_changes", "welcome", "desktop")
#: screens that mean the database locked itself mid-run: unlock again and carry on
SESSION_LOST = ("locked", "locked_error", "lock_confirm")


class NewEntry(BaseModel):
    title: str = Field(min_length=1, max_length=48, pattern=SAFE)
    username: str = Field(default="", max_length=48, pattern=OPTIONAL)
    password: SecretStr
    url: str = Field(default="", max_length=64, pattern=OPTIONAL)
    notes: str = Field(default="", max_length=64, pattern=OPTIONAL)

    @field_validator("password")
    @classmethod
    def _typeable(cls, value: SecretStr) -> SecretStr:
        secret = value.get_secret_value()
        if not 1 <= len(secret) <= 48 or not all("!" <= c <= "~" for c in secret):
            raise ValueError("1 to 48 printable ASCII characters without spaces")  # never quote the secret
        return value


class Entry(BaseModel):
    title: str
    username: str
    url: str


class EntryAdded(Entry):
    pass


class EntryQuery(BaseModel):
    title: str = Field(min_length=1, max_length=48, pattern=SAFE)


class Found(BaseModel):
    title: str  # what was searched for (titles containing it)
    count: int  # KeePassXC's "Search Results (N)"
    exact: int  # of the rows shown, how many have exactly this title
    entries: list[Entry]  # the rows the list shows (at most four)


# -- steps shared by the automations ----------------------------------------------------------


async def _click(ctx: Context, where: Region) -> None:
    await ctx.desktop.click(*where.center)
    await ctx.desktop.move(*L.PARK)  # no hover highlight left behind for the model to puzzle over


async def _expect(ctx: Context, *wanted: str, timeout: float = STEP_TIMEOUT) -> str:
    """Wait for one of ``wanted``; fail at once if KeePassXC shows trouble instead."""
    return await ctx.expect(*wanted, trouble=TROUBLE, timeout=timeout)


async def _act(ctx: Context, act: Callable[[], Awaitable[None]], *wanted: str) -> str:
    """Do ``act`` and wait for one of ``wanted``. If the database locked itself meanwhile, unlock
    it again mid-run (the pack's playbooks, with this run's account) and do it once more."""
    return await ctx.act(act, *wanted, trouble=TROUBLE, recover_on=SESSION_LOST, timeout=STEP_TIMEOUT)


async def _at_list(ctx: Context) -> None:
    """The entry list — unlocking again first if the database locked itself (a long wait for
    the write lock is time without input: KeePassXC's idle lock may strike meanwhile)."""
    await _act(ctx, _nothing, "entries")


async def _nothing() -> None:
    pass


async def _reloaded(ctx: Context, db: SharedDatabase) -> None:
    """Make sure this desktop shows the file as it is now, not as it read it before: the last
    save's ledger says how many entries the file holds, and the status bar must agree. A
    desktop that missed the reload is locked and unlocked (which reads the file again)."""
    await ctx.progress("check this desktop has reloaded the shared file")
    await db.quiet()  # a save in flight lands first (and KeePassXC reloads ~0.1 s after it)
    saved = db.last_save()
    if saved is None or saved.entries is None or saved.mtime_ns != db.mtime_ns():
        return  # written by someone outside the lock (or never by a robot): the quiet time is all we have
    expected = saved.entries
    for again in (False, True):
        try:
            await screen.read_until(ctx.desktop, L.ENTRY_COUNT, functools.partial(_count_is, expected=expected),
                                    "the entry count")
            return
        except DesktopError:
            if again:
                shown = await screen.entry_count(ctx.desktop)
                raise DesktopError(f"this desktop shows {shown} entries, the file holds {saved.entries} "
                                   f"(saved by {saved.by}): it does not reload the shared database") from None
        await ctx.progress("this desktop missed the last save: lock and unlock to read the file again")
        await _act(ctx, lambda: _click(ctx, L.LOCK_BUTTON), "locked")
        await ctx.recover()


def _count_is(text: str, expected: int) -> bool:
    match = re.search(r"(\d+)\s*Entr", text)
    return match is not None and int(match.group(1)) == expected


async def _fill(ctx: Context, field: Region, text: str) -> None:
    if field is L.NOTES:  # a text area draws no focus frame: its read-back decides
        await ctx.desktop.click(*field.center)
    else:
        await click_into(ctx.desktop, field)  # no window manager: the focus goes where we click
    await ctx.desktop.press("ctrl", "a")
    await ctx.desktop.type_text(text)


async def _fill_form(ctx: Context, data: NewEntry) -> None:
    """Notes first and the password last: the caret ends in the masked field, where no OCR looks."""
    if data.notes:
        await _fill(ctx, L.NOTES, data.notes)
    fields = [("title", L.TITLE, data.title), ("username", L.USERNAME, data.username), ("URL", L.URL, data.url)]
    for _, region, text in fields:
        if text:
            await _fill(ctx, region, text)
            if region is L.USERNAME:
                await ctx.desktop.press("delete")  # the combo may complete a known name inline: drop the rest
    secret = data.password.get_secret_value()
    await _fill(ctx, L.ENTRY_PASSWORD, secret)
    await ctx.desktop.move(*L.PARK)
    for label, region, text in fields:
        await screen.read_until(ctx.desktop, L.inside(region), functools.partial(same_text, expected=text),
                                f"the {label} field does not show {text!r} after typing it")
    if data.notes:
        await screen.read_until(ctx.desktop, L.NOTES_FIRST_LINE, lambda t: same_text(t, data.notes),
                                f"the notes do not show {data.notes!r} after typing them")
    # The password cannot be read back (masked; revealing it would put it into screenshots):
    # count its dots instead.
    shown = await screen.masked_length(ctx.desktop, L.ENTRY_PASSWORD, len(secret))
    if shown != len(secret):
        raise DesktopError(f"the password field shows {shown} characters after typing {len(secret)}")


async def _search(ctx: Context, title: str) -> Found:
    """From the list, search titles for ``title``; the search results as the list shows them."""
    query = f'title:"{title}"'

    async def type_query() -> None:
        await click_into(ctx.desktop, L.SEARCH_BOX, L.SEARCH_FRAME_AT)
        await ctx.desktop.press("ctrl", "a")
        await ctx.desktop.type_text(query)
        await ctx.desktop.move(*L.PARK)

    await _act(ctx, type_query, "search")
    unquoted = query.replace('"', "")
    await screen.read_until(ctx.desktop, L.SEARCH_BOX, lambda t: same_text(_unquote(t), unquoted),
                            f"the search box does not show {query!r} after typing it")
    count = -1
    for _ in range(20):  # the results follow the typing; read until two readings agree
        first = await screen.search_count(ctx.desktop)
        rows = await screen.rows(ctx.desktop, L.SEARCH_FIRST_ROW, L.SEARCH_ROWS)
        again = await screen.search_count(ctx.desktop)
        if first is not None and first == again and len(rows) == min(first, L.SEARCH_ROWS):
            count = first
            break
        await _expect(ctx, "search")
    if count < 0:
        raise DesktopError(f"the search results for {title!r} cannot be read")
    entries = [Entry(title=r.title, username=r.username, url=r.url) for r in rows]
    exact = sum(1 for e in entries if same_text(e.title, title))
    return Found(title=title, count=count, exact=exact, entries=entries)


def _unquote(text: str) -> str:
    """Quotes as OCR may read them (straight, curly, a grave accent) taken out."""
    return "".join(c for c in text if c not in QUOTES)


async def _clear_search(ctx: Context) -> None:
    """Escape clears the search; a click on the root group then selects it, so that the
    preview panel shows (KeePassXC hides it when the search selected nothing)."""
    async def escape() -> None:
        await click_into(ctx.desktop, L.SEARCH_BOX, L.SEARCH_FRAME_AT)
        await ctx.desktop.press("esc")
        await ctx.desktop.click(*L.GROUP_ROOT.center)
        await ctx.desktop.move(*L.PARK)

    await _act(ctx, escape, "entries")


# -- the automations --------------------------------------------------------------------------


@automation(name="keepassxc.add_entry", version="1")
async def add_entry(ctx: Context, data: NewEntry) -> EntryAdded:
    """Add an entry. Not idempotent: saving twice makes two entries."""
    db = SharedDatabase.of(ctx)
    await ctx.progress("take the shared database's write lock", percent=5)
    async with db.write_lock(ctx):
        await _at_list(ctx)
        await _reloaded(ctx, db)
        await ctx.progress("open the new-entry form", percent=20)
        await _act(ctx, lambda: _click(ctx, L.NEW_BUTTON), "entry_form")
        await ctx.progress("fill in the form", percent=35)
        await _fill_form(ctx, data)
        await ctx.progress("save", percent=60)
        before = db.mtime_ns()
        await _click(ctx, L.FORM_OK)
        await _expect(ctx, "entries")
        await ctx.progress("wait for the save to reach the file", percent=70)
        mtime = await db.saved_after(before)
        db.record_save(mtime, await screen.entry_count(ctx.desktop), ctx.machine_id)
    await ctx.progress("find it in the list", percent=85)
    found = await _search(ctx, data.title)
    await _clear_search(ctx)
    if found.exact != 1:
        raise DesktopError(f"after the save, the list shows {found.exact} entries titled {data.title!r}")
    return EntryAdded(title=data.title, username=data.username, url=data.url)


@add_entry.reconcile
async def entry_already_added(ctx: Context, data: NewEntry) -> EntryAdded | None:
    """Did a lost attempt already save this entry? Searched under the write lock, on a desktop that
    reloaded the file: one entry with the title, yes; none, no; more, a person must look."""
    db = SharedDatabase.of(ctx)
    await ctx.progress("take the shared database's write lock", percent=5)
    async with db.write_lock(ctx):
        await _at_list(ctx)
        await _reloaded(ctx, db)
        await ctx.progress("search for the title", percent=50)
        found = await _search(ctx, data.title)
    await _clear_search(ctx)
    if found.count > len(found.entries):
        raise BusinessError(f"{found.count} entries have {data.title!r} in their title, more than the list shows: "
                            "a person must check whether this one was added")
    if found.exact == 0:
        return None
    if found.exact > 1:
        raise BusinessError(f"{found.exact} entries are titled {data.title!r}: a person must remove the duplicate")
    [entry] = [e for e in found.entries if same_text(e.title, data.title)]
    return EntryAdded(title=data.title, username=entry.username, url=entry.url)


@automation(name="keepassxc.find_entry", version="1", idempotent=True)
async def find_entry(ctx: Context, data: EntryQuery) -> Found:
    """The entries whose title contains ``title``, as the list shows them. Read-only."""
    db = SharedDatabase.of(ctx)
    await _at_list(ctx)
    await _reloaded(ctx, db)
    await ctx.progress("search", percent=40)
    found = await _search(ctx, data.title)
    await ctx.progress("clear the search", percent=80)
    await _clear_search(ctx)
    return found
