"""``fill``: type into a field and confirm the text arrived — against a desktop that fakes one field.

The real thing (Tk on Xvfb, OCR) is in tests/e2e/test_typing_real.py; here the field's
behaviour is scripted: it takes keys or drops them, reads back as OCR would, draws dots.
"""

from __future__ import annotations

import numpy as np
import pytest

from deskfleet.desktop import Frame, Region
from deskfleet.desktop import fill as fill_module
from deskfleet.desktop.fill import caret_column, changed_columns, fill, same_text
from deskfleet.errors import DesktopError

FIELD = Region(100, 100, 300, 30)


class FakeField:
    """One field of a desktop. ``drops``: how many typed batches vanish before keys arrive;
    ``ocr``: how OCR renders the field's text; ``dots``: draw the text as dots (a password)."""

    name = "fake"
    input_gate = None

    def __init__(self, *, text: str = "", drops: int = 0, ocr: object = None, dots: bool = False,
                 select_all: bool = True) -> None:
        self.text = text
        self.drops = drops
        self.ocr = ocr or (lambda t: t)
        self.dots = dots
        self.select_all = select_all
        self.selected = False
        self.typed: list[str] = []
        self.reads: list[Region] = []

    async def click(self, x: int, y: int, *, button: str = "left", count: int = 1) -> None:
        self.selected = False

    async def press(self, *keys: str) -> None:
        if keys == ("ctrl", "a") and self.select_all:
            self.selected = True
        elif keys == ("backspace",):
            self.text = "" if self.selected else self.text[:-1]
            self.selected = False

    async def type_text(self, text: str) -> None:
        self.typed.append(text)
        if self.drops:
            self.drops -= 1
            return
        self.text = text if self.selected else self.text + text
        self.selected = False

    async def read_text(self, region: Region) -> str:
        self.reads.append(region)
        return str(self.ocr(self.text))  # type: ignore[operator]

    async def screenshot(self, region: Region | None = None) -> Frame:
        assert region is not None
        frame = np.full((region.height, region.width, 3), 255, np.uint8)
        for i in range(len(self.text)):  # a dot per character, 8 px apart
            frame[10:16, 4 + 8 * i : 10 + 8 * i] = 0
        return frame


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fill_module, "SHOW_TIMEOUT", 0.1)
    monkeypatch.setattr(fill_module, "POLL", 0.01)


async def test_text_that_arrives_is_confirmed_by_reading_it_back() -> None:
    field = FakeField(text="old", ocr=lambda t: t.replace("0", "O") + "|")  # OCR confusions, a caret
    await fill(field, FIELD, "MRN-0115", label="mrn")  # type: ignore[arg-type]
    assert field.text == "MRN-0115" and field.typed == ["MRN-0115"]
    assert field.reads[0] == Region(102, 102, 296, 26)  # the field without its border


async def test_lost_text_is_typed_once_more() -> None:
    field = FakeField(drops=1)
    await fill(field, FIELD, "Ada", label="name")  # type: ignore[arg-type]
    assert field.text == "Ada" and field.typed == ["Ada", "Ada"]


async def test_a_field_that_keeps_dropping_text_raises_naming_it() -> None:
    field = FakeField(drops=5)
    with pytest.raises(DesktopError, match=r"^the name field did not take the text \(it reads '' after 2 tries\)$"):
        await fill(field, FIELD, "Ada", label="name")  # type: ignore[arg-type]
    assert field.typed == ["Ada", "Ada"]


async def test_read_region_and_append() -> None:
    elsewhere = Region(10, 10, 50, 20)
    field = FakeField(text="Ada")
    await fill(field, FIELD, " Lovelace", label="name", read=elsewhere, clear=False)  # type: ignore[arg-type]
    assert field.text == "Ada Lovelace" and set(field.reads) == {elsewhere}


async def test_appending_is_not_retried_once_part_of_the_text_arrived() -> None:
    field = FakeField(text="Ada", ocr=lambda t: t[:-1])  # the last character never reads right
    with pytest.raises(DesktopError, match=r"it reads 'Ada Lovelac' after 2 tries"):
        await fill(field, FIELD, " Lovelace", label="name", clear=False)  # type: ignore[arg-type]
    assert field.typed == [" Lovelace"], "typing it again would have doubled it"


async def test_a_secret_is_checked_by_pixels_never_read_and_never_quoted() -> None:
    field = FakeField(text="old-secret", dots=True)
    await fill(field, FIELD, "S3cret", label="password", secret=True)  # type: ignore[arg-type]
    assert field.text == "S3cret" and field.reads == []
    stubborn = FakeField(drops=5, dots=True)
    with pytest.raises(DesktopError) as caught:
        await fill(stubborn, FIELD, "S3cret", label="password", secret=True)  # type: ignore[arg-type]
    assert str(caught.value) == "the password field did not take the text (it still looks empty after 2 tries)"
    assert "S3cret" not in repr(caught.value) and stubborn.reads == []


def test_same_text_forgives_ocr_confusions_only() -> None:
    assert same_text("MRN-O1l5", "MRN-0115")
    assert same_text(" 1906-12-09 ", "1906-12-09")
    assert same_text("it\u2019s \u2014 ok", "it's - ok")  # typographic quotes and dashes
    assert same_text("grace hopper", "Grace Hopper")
    assert not same_text("1906-12-08", "1906-12-09")
    assert not same_text("Ada Lovelacd", "Ada Lovelace")


def blank(width: int = 60) -> Frame:
    return np.full((24, width, 3), 240, np.uint8)


def test_a_caret_after_the_text_is_found_and_a_final_glyph_is_not() -> None:
    frame = blank()
    frame[8:18, 4:10] = 0  # a glyph
    frame[8:18, 12:14] = 0  # a thin glyph ("l") as tall as the text
    assert caret_column(frame) is None
    with_caret = frame.copy()
    with_caret[3:22, 16:18] = 0  # a caret: taller than the text
    assert caret_column(with_caret) == 16
    touching = frame.copy()
    touching[3:22, 14:16] = 0  # …right against the last glyph
    assert caret_column(touching) == 14
    empty = blank()
    empty[3:22, 4:6] = 0  # a caret in an empty field
    assert caret_column(empty) == 4
    assert caret_column(blank()) is None


def test_a_blinking_caret_is_no_change_and_a_dot_is() -> None:
    a, b = blank(), blank()
    b[3:22, 4:6] = 0
    assert changed_columns(a, b) == 2
    b[10:16, 8:14] = 0
    assert changed_columns(a, b) == 8
