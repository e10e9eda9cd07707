"""Filling a field and making sure the text arrived: :func:`fill`.

Typing is not enough: a key can go to another window, a field can refuse characters, an
app can be busy and drop them. :func:`fill` clicks the field, replaces what it holds and
then *looks*: it reads the field back by OCR and compares, forgiving the glyphs OCR
confuses (:func:`same_text`), or — for a secret, which the field shows as dots — checks
that the field's pixels changed from the empty field's. It tries once more, then raises
:class:`~deskfleet.errors.DesktopError` naming the field, never quoting a secret.

It speaks only the :class:`~deskfleet.desktop.Desktop` protocol, so it works on any desktop;
``ctx.fill(...)`` in playbooks and automations is this function.
"""

from __future__ import annotations

import asyncio
import logging
import unicodedata

import numpy as np

from ..errors import DesktopError
from .base import Desktop, Frame, Region

log = logging.getLogger(__name__)

#: attempts before giving up (the first, and one retry)
TRIES = 2
#: seconds the application gets to show what was typed
SHOW_TIMEOUT = 2.0
#: seconds between two looks at the field
POLL = 0.05
#: a text caret is at most this many pixels wide: a change no wider is the caret blinking
CARET_COLUMNS = 3
#: a pixel counts as changed when a channel moves by more than this
PIXEL_DELTA = 48

_CONFUSABLE = str.maketrans({
    "O": "0", "o": "0", "Q": "0", "l": "1", "I": "1", "i": "1", "|": "1",
    "S": "5", "s": "5", "B": "8", "Z": "2", "z": "2",
    "\u2018": "'", "\u2019": "'", "`": "'", "\u201c": '"', "\u201d": '"',
    "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2212": "-",
})
#: what OCR makes of a text caret standing after the last character
_CARET_GLYPHS = "|lI1[]{}()/j"


def same_text(read: str, expected: str) -> bool:
    """Whether OCR text ``read`` says ``expected``: case, spaces and the glyphs OCR
    confuses (O/0/Q, l/1/I/|, S/5, B/8, Z/2, typographic quotes and dashes) are forgiven;
    any other difference is not."""
    def norm(t: str) -> str:
        t = unicodedata.normalize("NFKC", t)
        return "".join(t.split()).translate(_CONFUSABLE).upper()

    return norm(read) == norm(expected)


def _shows(read: str, expected: str) -> bool:
    """``same_text``, also with one trailing glyph dropped: the caret after the last character."""
    return any(same_text(r, expected) for r in _without_caret(read))


def _without_caret(read: str) -> list[str]:
    """What OCR read, and the same without a last glyph that may be the caret."""
    read = read.strip()
    return [read, read[:-1]] if read[-1:] and read[-1] in _CARET_GLYPHS else [read]


def inside(field: Region, border: int = 2) -> Region:
    """A field without its border (a border line against the first glyph confuses OCR)."""
    if field.width <= 2 * border + 4 or field.height <= 2 * border + 4:
        return field
    return Region(field.left + border, field.top + border, field.width - 2 * border, field.height - 2 * border)


def changed_columns(a: Frame, b: Frame) -> int:
    """How many pixel columns differ between two captures of one region."""
    if a.shape != b.shape:
        return int(max(a.shape[1], b.shape[1]))
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=2) > PIXEL_DELTA
    return int(diff.any(axis=0).sum())


def caret_column(frame: Frame) -> int | None:
    """Where a text caret standing after the text starts (its first column), if the
    rightmost mark in a capture of a one-line field looks like one: a vertical line at
    most :data:`CARET_COLUMNS` wide, taller than the text beside it (a caret spans the
    line's ascent and descent). OCR tends to read a caret, and spoils the glyph next to it
    ("robot1|" reads "robot]|"); the text left of it reads cleanly."""
    if frame.ndim != 3 or frame.shape[0] < 4 or frame.shape[1] < 4:
        return None
    background = np.median(frame.reshape(-1, frame.shape[2]), axis=0)
    ink = (np.abs(frame.astype(np.int16) - background.astype(np.int16)) > PIXEL_DELTA).any(axis=2)
    columns = np.flatnonzero(ink.any(axis=0))
    if not len(columns):
        return None
    right = int(columns[-1])
    for left in range(right, max(right - CARET_COLUMNS, 0), -1):  # the caret: columns right..left
        if not ink[:, left].any():
            break
        rows = np.flatnonzero(ink[:, left : right + 1].any(axis=1))
        text = np.flatnonzero(ink[:, :left].any(axis=1))
        if not len(text):
            return left if rows[-1] - rows[0] + 1 >= frame.shape[0] // 2 else None
        top, bottom = rows[0], rows[-1]
        if top <= text[0] and bottom >= text[-1] and (top < text[0] or bottom > text[-1]):
            return left
    return None


async def fill(desktop: Desktop, field: Region, text: str, *, label: str, read: Region | None = None,
               secret: bool = False, clear: bool = True) -> None:
    """Click ``field``, replace what it holds with ``text`` and confirm the text arrived.

    ``label`` names the field in errors ("the password field …"). ``read``: the region to
    read back, when the text shows elsewhere than in ``field`` (default: the field without
    its border). ``clear=False`` appends instead of replacing (End, no select-all): the field
    must then read what it read before plus ``text``, and it is not retried once part of
    the text arrived (typing it again would double it).

    Confirmation: by OCR — the region must read ``text`` within :data:`SHOW_TIMEOUT`,
    forgiving OCR's confusions (:func:`same_text`) and a caret after the text; with
    ``secret=True`` (the field shows dots) by pixels — the field is first emptied (select
    all, BackSpace) and its look taken, then after typing it must look different from
    that empty field (by more than a caret's width), and it returns once the field stops
    changing. One retry; then DesktopError naming the field. A secret is never logged, read by OCR or quoted.
    """
    where = read if read is not None else inside(field)
    seen = [""]
    for attempt in range(1, TRIES + 1):
        await desktop.click(*field.center)
        if secret:
            if clear:
                await desktop.press("ctrl", "a")
                await desktop.press("backspace")
            before = await _settled(desktop, where)
            await desktop.type_text(text)
            if await _until_changed(desktop, where, before):
                # The first dots are drawn: let the app draw the rest before the next action
                # (a busy app takes its queued keys a few at a time).
                await _settled(desktop, where)
                log.debug("filled the %s field (try %d)", label, attempt)
                return
        else:
            prior = None if clear else [p for r in await _readings(desktop, where) for p in _without_caret(r)]
            await desktop.press(*(("ctrl", "a") if clear else ("end",)))
            await desktop.type_text(text)
            ok, seen = await _until_read(desktop, where, [text] if prior is None else [p + text for p in prior])
            if ok:
                log.debug("filled the %s field (try %d)", label, attempt)
                return
            if prior is not None and not _matches(seen, prior):
                break  # appending: part of the text arrived, and typing it again would double it
        log.info("the %s field did not show the typed text (try %d of %d)", label, attempt, TRIES)
    if secret:
        looks = "it still looks empty" if clear else "it looks unchanged"
        raise DesktopError(f"the {label} field did not take the text ({looks} after {TRIES} tries)")
    raise DesktopError(f"the {label} field did not take the text (it reads {seen[-1]!r} after {TRIES} tries)")


async def _settled(desktop: Desktop, where: Region) -> Frame:
    """The region once it stops changing (but for a blinking caret): what the app has drawn."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SHOW_TIMEOUT
    last = await desktop.screenshot(where)
    while loop.time() < deadline:
        await asyncio.sleep(POLL)
        now = await desktop.screenshot(where)
        if changed_columns(last, now) <= CARET_COLUMNS:
            return now
        last = now
    return last


async def _until_changed(desktop: Desktop, where: Region, before: Frame) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SHOW_TIMEOUT
    while True:
        if changed_columns(before, await desktop.screenshot(where)) > CARET_COLUMNS:
            return True
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(POLL)


async def _readings(desktop: Desktop, where: Region, wanted: list[str] | None = None) -> list[str]:
    """What the field reads by OCR — and, when a caret stands after the text, what the part
    left of it reads (only if the whole did not already read as one of ``wanted``)."""
    seen = [(await desktop.read_text(where)).strip()]
    if wanted is not None and _matches(seen, wanted):
        return seen
    caret = caret_column(await desktop.screenshot(where))
    if caret is not None:
        seen.append((await desktop.read_text(Region(where.left, where.top, caret, where.height))).strip())
    return seen


def _matches(readings: list[str], wanted: list[str]) -> bool:
    return any(_shows(r, w) for r in readings for w in wanted)


async def _until_read(desktop: Desktop, where: Region, wanted: list[str]) -> tuple[bool, list[str]]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SHOW_TIMEOUT
    while True:
        seen = await _readings(desktop, where, wanted)
        if _matches(seen, wanted):
            return True, seen
        if loop.time() >= deadline:
            return False, seen
        await asyncio.sleep(POLL)
