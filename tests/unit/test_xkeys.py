"""The X keyboard's mapping from characters and key names to keysyms, keycodes and levels."""

from __future__ import annotations

import pytest

from deskfleet.desktop.xkeys import (
    ISO_LEVEL3_SHIFT,
    RETURN,
    SHIFT_L,
    TAB,
    Keymap,
    Stroke,
    _parts,
    char_keysym,
    key_keysym,
    keysym_char,
    plan,
)
from deskfleet.errors import DesktopError

EURO_LEGACY = 0x20AC  # EuroSign: a keysym below the Unicode range


def keymap(*, level3: bool = True, spare: int = 3) -> Keymap:
    """A small keymap shaped like the core view of an XKB one (columns 0-1 group 1, 2-3 group 2,
    4-5 group 1 levels 3-4), first keycode 8."""
    rows: dict[int, tuple[int, ...]] = {
        10: (ord("1"), ord("!"), ord("1"), ord("!")),
        24: (ord("q"), ord("Q"), ord("q"), ord("Q")),
        26: (ord("e"), ord("E"), ord("e"), ord("E"), EURO_LEGACY, ord("E")),
        38: (ord("a"), ord("A"), ord("a"), ord("A")),
        50: (SHIFT_L,),
        59: (ord(","), ord("<"), ord(","), ord("<")),
        65: (ord(" "),),
        66: (0xFFE5,),  # Caps_Lock
        94: (ord("<"), ord(">"), ord("<"), ord(">"), ord("|"), 0xA6),  # | on AltGr, ¦ on Shift+AltGr
        95: (0, 0, 0xF1),  # ñ only in the second group (Mode_switch): not used
    }
    if level3:
        rows[92] = (ISO_LEVEL3_SHIFT,)
    free = list(range(200, 200 + spare))
    last = max([*rows, *free])
    table = [rows.get(k, ()) for k in range(8, last + 1)]
    table = [r + (0,) * (6 - len(r)) for r in table]
    # every unused keycode below 200 gets a symbol, so that only 200.. are spare
    table = [r if any(r) or k + 8 >= 200 else (0xFFFF00 + k,) + (0,) * 5 for k, r in enumerate(table)]
    mods = [(50, 0), (66, 0), (37, 0), (64, 0), (0, 0), (0, 0), (0, 0), (92, 0)]
    return Keymap(8, table, modifiers=mods)


def test_characters_map_to_latin1_or_unicode_keysyms() -> None:
    assert char_keysym("a") == 0x61 and char_keysym("~") == 0x7E
    assert char_keysym("é") == 0xE9 and char_keysym("ß") == 0xDF  # Latin-1: the code point
    assert char_keysym("€") == 0x010020AC and char_keysym("ł") == 0x01000142  # beyond it: Unicode keysyms
    assert char_keysym("\n") == RETURN and char_keysym("\t") == TAB
    with pytest.raises(ValueError, match="control character U\\+0007"):
        char_keysym("\a")
    with pytest.raises(ValueError):
        char_keysym("ab")


def test_keysyms_map_back_to_characters_including_legacy_ones() -> None:
    for ch in "aZ é€łЖ":
        assert keysym_char(char_keysym(ch)) == ch
    assert keysym_char(EURO_LEGACY) == "€"
    assert keysym_char(0x06C1) == "\u0430"  # Cyrillic_a
    assert keysym_char(SHIFT_L) is None


def test_key_names_are_the_same_on_every_platform() -> None:
    assert key_keysym("ctrl") == key_keysym("Control") == 0xFFE3
    assert key_keysym("enter") == key_keysym("Return") == RETURN
    assert key_keysym("f5") == 0xFFC2 and key_keysym("F12") == 0xFFC9
    assert key_keysym("page_down") == key_keysym("pagedown") == 0xFF56
    assert key_keysym("a") == 0x61 and key_keysym("A") == 0x41
    with pytest.raises(ValueError, match="unknown key 'hyperspace'"):
        key_keysym("hyperspace")


def test_each_character_gets_its_keycode_and_level() -> None:
    km = keymap()
    assert km.shift == 50 and km.level3 == 92 and km.caps_lock == 66
    assert km.stroke(ord("a")) == Stroke(38, 0)
    assert km.stroke(ord("A")) == Stroke(38, 1)  # Shift
    assert km.stroke(ord("!")) == Stroke(10, 1)
    assert km.stroke(ord("|")) == Stroke(94, 2)  # AltGr
    assert km.stroke(0xA6) == Stroke(94, 3)  # Shift+AltGr
    assert km.stroke(char_keysym("€")) == Stroke(26, 2)  # found through the legacy EuroSign keysym
    assert km.stroke(ord("<")) == Stroke(94, 0)  # the bare key wins over Shift+comma
    assert km.stroke(0xF1) is None  # only in the second group: typed through a spare keycode instead
    assert km.level_keys(0) == [] and km.level_keys(1) == [50]
    assert km.level_keys(2) == [92] and km.level_keys(3) == [50, 92]


def test_without_an_altgr_key_the_third_and_fourth_levels_are_not_used() -> None:
    km = keymap(level3=False)
    assert km.level3 is None
    assert km.stroke(ord("|")) is None and km.stroke(char_keysym("€")) is None
    assert km.stroke(ord("E")) == Stroke(26, 1)


def test_missing_characters_borrow_spare_keycodes_highest_first() -> None:
    km = keymap(spare=3)
    assert km.spare == [202, 201, 200]
    strokes, borrowed = plan(km, [char_keysym(c) for c in "aßłßA"])
    assert borrowed == {0xDF: 202, 0x01000142: 201}
    assert strokes == [Stroke(38, 0), Stroke(202, 0, True), Stroke(201, 0, True), Stroke(202, 0, True), Stroke(38, 1)]
    with pytest.raises(DesktopError, match="no free keycode left to type 'ó'"):
        plan(km, [char_keysym(c) for c in "ßłñó"])


def test_text_with_more_missing_characters_than_spare_keycodes_is_typed_in_parts() -> None:
    km = keymap(spare=2)
    keysyms = [char_keysym(c) for c in "aßłañóa"]
    parts = _parts(km, keysyms)
    assert [[keysym_char(k) for k in p] for p in parts] == [list("aßła"), list("ñóa")]
    for part in parts:
        plan(km, part)  # each part fits
    with pytest.raises(DesktopError, match="no free keycode to type 'ß'"):
        _parts(keymap(spare=0), keysyms)
