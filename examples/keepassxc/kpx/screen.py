"""Reading KeePassXC's screen: OCR of cells and fields, masked passwords, the entry count.

Everything here reads pixels through the ``Desktop`` protocol (``screenshot``, ``read_text``)
and knows KeePassXC's layout (:mod:`.layout`); nothing types or clicks.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from deskfleet import Desktop, DesktopError, Frame, Region

from . import layout as L

READ_TIMEOUT = 5.0  # seconds for text the app is drawing to appear
#: a cell whose grey levels vary less than this holds no text (OCR reads noise in empty cells)
INK = 12.0

_CONFUSABLE = str.maketrans({"O": "0", "o": "0", "Q": "0", "l": "1", "I": "1", "i": "1", "|": "1",
                             "!": "1", "S": "5", "s": "5", "B": "8", "Z": "2", "z": "2"})


def same_text(read: str, expected: str) -> bool:
    """Whether OCR text says ``expected``, forgiving spaces, case and the glyphs OCR confuses
    (O/0, l/1/I, S/5…) — with DejaVu Sans at KeePassXC's size these are the only misreads seen."""
    def norm(t: str) -> str:
        return "".join(t.split()).translate(_CONFUSABLE).upper()

    return norm(read) == norm(expected)


def has_ink(frame: Frame) -> bool:
    return float(frame.std()) > INK


async def read_until(desktop: Desktop, region: Region, accept: Callable[[str], bool], what: str,
                     timeout: float = READ_TIMEOUT) -> str:
    """Read ``region`` until ``accept`` says yes: the app may not have drawn the text yet."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        text = await desktop.read_text(region)
        if accept(text):
            return text
        if loop.time() >= deadline:
            raise DesktopError(f"{what}: the screen reads {text!r}")
        await asyncio.sleep(0.1)


def count_dots(crop: Frame) -> int:
    """How many characters a masked password field shows: its dots, counted as round dark
    blobs (the caret, a thin bar, is not one)."""
    gray = cv2.cvtColor(np.ascontiguousarray(crop), cv2.COLOR_RGB2GRAY)
    dark = (gray < 110).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(dark, connectivity=8)
    dots = 0
    for i in range(1, n):
        w, h, area = stats[i, cv2.CC_STAT_WIDTH], stats[i, cv2.CC_STAT_HEIGHT], stats[i, cv2.CC_STAT_AREA]
        if 4 <= w <= 10 and 4 <= h <= 10 and abs(int(w) - int(h)) <= 2 and area >= 12:
            dots += 1
    return dots


async def masked_length(desktop: Desktop, field: Region, expected: int, timeout: float = 2.0) -> int:
    """How many characters the masked ``field`` shows, once it shows ``expected`` (the app
    draws what was typed a moment later) or ``timeout`` has passed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        shown = count_dots(await desktop.screenshot(L.inside(field)))
        if shown == expected or loop.time() >= deadline:
            return shown
        await asyncio.sleep(0.05)


_COUNT = re.compile(r"(\d+)\s*Entr", re.IGNORECASE)


async def entry_count(desktop: Desktop) -> int | None:
    """The status bar's "N Entries" (the entries of the list shown); None if unreadable."""
    match = _COUNT.search(await desktop.read_text(L.ENTRY_COUNT))
    return int(match.group(1)) if match else None


@dataclass(frozen=True, slots=True)
class Row:
    title: str
    username: str
    url: str


_RESULTS = re.compile(r"Search\s+Results\s*\((\d+)\)", re.IGNORECASE)
_NONE = re.compile(r"No\s+Results", re.IGNORECASE)


async def search_count(desktop: Desktop) -> int | None:
    """What the "Search Results (N)" / "No Results" banner says; None if it is not there yet."""
    text = await desktop.read_text(L.SEARCH_BANNER)
    if _NONE.search(text):
        return 0
    match = _RESULTS.search(text)
    return int(match.group(1)) if match else None


async def rows(desktop: Desktop, first: int, count: int) -> list[Row]:
    """The rows a list shows (at most ``count``), read cell by cell; empty rows end it."""
    frame = await desktop.screenshot()
    out = []
    for k in range(count):
        y = L.row(first, k)
        title = L.cell(L.TITLE_COL, y)
        if not has_ink(title.crop(frame)):
            break
        texts = []
        for column in (L.TITLE_COL, L.USER_COL, L.URL_COL):
            region = L.cell(column, y)
            texts.append(await desktop.read_text(region) if has_ink(region.crop(frame)) else "")
        out.append(Row(*texts))
    return out
