"""Keyboard input on X11 through XTest: keys pressed as if on the keyboard.

Why not pynput's keyboard: on X11 it sends character keys with ``XSendEvent`` to whatever
``XGetInputFocus`` names. Without a window manager that is PointerRoot (or the root window)
as soon as the focused window closes, and the characters go nowhere — while Return and
BackSpace, which it sends through XTest, still arrive. Some toolkits also ignore synthetic
(``send_event``) key events. It types characters outside the keymap with the wrong
modifiers (``ß`` came out as ``ñ``) and leaves the keycode it borrowed remapped.

Here every key goes through XTest (``Xlib.ext.xtest.fake_input``), so the server delivers it
exactly as a key on the keyboard: to the focus window (see ``xvfb.focus_app``, which keeps
the focus on the application). For each character the keymap is searched for its keysym:

- column 0 of a keycode is typed bare, column 1 with Shift, column 4 with AltGr
  (ISO_Level3_Shift) and column 5 with Shift+AltGr — XKB's levels as the core keymap shows
  them; columns 2 and 3 (the second group, reached through Mode_switch) are not used;
- a character the keymap lacks is typed through a spare keycode (one with no keysym at all),
  bound to the character's keysym for the moment and restored afterwards, as xdotool does
  (all of a batch's borrowed keycodes in one request, so clients get one MappingNotify).
  The server tells every client of the binding before the keys that use it; but clients
  read a changed keymap lazily — when they next look a key up, after reading whatever
  their socket holds by then — so a binding restored before the app has handled its keys
  makes them type nothing. It is kept :data:`BORROW_SETTLE` seconds after them: at 50 ms
  a Tk app lost 1 such character in 40 batches with both cores busy; at 100 ms, none in
  80 (a still slower app may drop one, which ``fill`` catches).

Before each batch, modifier keys left pressed (a process killed mid-chord) are released
and Caps Lock is turned off, so that ``A`` is typed as ``A``. The keymap is read again when
the server says it changed (MappingNotify).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DesktopError

log = logging.getLogger(__name__)

#: seconds a borrowed keycode stays bound after its keys (clients fetch a changed keymap
#: lazily: restored before the app handled the key, the key types nothing)
BORROW_SETTLE = 0.1

SHIFT_L = 0xFFE1
CAPS_LOCK = 0xFFE5
ISO_LEVEL3_SHIFT = 0xFE03
RETURN = 0xFF0D
TAB = 0xFF09
NO_SYMBOL = 0

#: key names accepted by ``press`` (the same names as on every platform) → X keysyms
NAMED_KEYSYMS: dict[str, int] = {
    "ctrl": 0xFFE3, "control": 0xFFE3, "alt": 0xFFE9, "shift": SHIFT_L,
    "cmd": 0xFFEB, "win": 0xFFEB, "super": 0xFFEB, "meta": 0xFFEB,
    "enter": RETURN, "return": RETURN, "tab": TAB, "esc": 0xFF1B, "escape": 0xFF1B,
    "backspace": 0xFF08, "delete": 0xFFFF, "del": 0xFFFF, "insert": 0xFF63,
    "home": 0xFF50, "end": 0xFF57, "pageup": 0xFF55, "page_up": 0xFF55,
    "pagedown": 0xFF56, "page_down": 0xFF56, "up": 0xFF52, "down": 0xFF54,
    "left": 0xFF51, "right": 0xFF53, "space": 0x20,
    **{f"f{i}": 0xFFBE + i - 1 for i in range(1, 13)},
}

#: keymap column → level (0 bare, 1 Shift, 2 AltGr, 3 Shift+AltGr)
_COLUMN_LEVEL = {0: 0, 1: 1, 4: 2, 5: 3}


@functools.cache
def _legacy_keysyms() -> dict[int, str]:
    """Keysyms below the Unicode range that stand for a character (EuroSign, Cyrillic_a…).

    The table is pynput's (``pynput/_util/xorg_keysyms.py``, plain data), read from its file:
    importing the ``pynput`` package would bind it to whatever ``$DISPLAY`` names now. Without
    it such keys are not found in a keymap, and their characters are typed through a
    borrowed keycode instead — slower, not wrong.
    """
    import ast
    import importlib.util

    try:
        spec = importlib.util.find_spec("pynput")  # a top-level package: found, not imported
        if spec is None or not spec.submodule_search_locations:
            return {}
        source = Path(next(iter(spec.submodule_search_locations)), "_util", "xorg_keysyms.py").read_text()
        tree = ast.parse(source)
        node = next(n.value for n in tree.body if isinstance(n, ast.Assign)
                    and any(isinstance(t, ast.Name) and t.id == "SYMBOLS" for t in n.targets))
        symbols = ast.literal_eval(node)
    except (OSError, SyntaxError, ValueError, StopIteration):  # pragma: no cover - pynput moved it
        log.debug("pynput's keysym table is not where it was; keymaps are searched by Unicode keysyms only")
        return {}
    out: dict[int, str] = {}
    for keysym, char in symbols.values():
        if isinstance(char, str) and len(char) == 1 and 0xFF < keysym < 0xFD00:
            out.setdefault(int(keysym), char)
    return out


def char_keysym(ch: str) -> int:
    """The keysym that types ``ch``: Latin-1 keysyms equal the code point, others are
    Unicode keysyms (0x01000000 + code point); newline is Return, tab is Tab."""
    if len(ch) != 1:
        raise ValueError(f"not one character: {ch!r}")
    if ch in "\n\r":
        return RETURN
    if ch == "\t":
        return TAB
    o = ord(ch)
    if 0x20 <= o <= 0x7E or 0xA0 <= o <= 0xFF:
        return o
    if o < 0x20 or 0x7F <= o < 0xA0:
        raise ValueError(f"cannot type the control character U+{o:04X}")
    return 0x01000000 | o


def keysym_char(keysym: int) -> str | None:
    """The character a keysym types, if it types one."""
    if 0x20 <= keysym <= 0x7E or 0xA0 <= keysym <= 0xFF:
        return chr(keysym)
    if 0x01000100 <= keysym <= 0x0110FFFF:
        return chr(keysym - 0x01000000)
    return _legacy_keysyms().get(keysym)


def key_keysym(name: str) -> int:
    """The keysym of a key name for ``press``: a named key (``"ctrl"``, ``"enter"``, ``"f5"``)
    or one character (``"a"``). ValueError for anything else."""
    named = NAMED_KEYSYMS.get(name.lower())
    if named is not None:
        return named
    if len(name) == 1:
        return char_keysym(name)
    raise ValueError(f"unknown key {name!r}")


@dataclass(frozen=True, slots=True)
class Stroke:
    """How to produce one keysym: press ``keycode`` with the modifiers of ``level``."""

    keycode: int
    level: int = 0
    borrowed: bool = False  # the keycode is a spare one, bound to the keysym for the moment


@dataclass(slots=True)
class Keymap:
    """A core keyboard mapping (``GetKeyboardMapping``), searched by keysym and character."""

    first_keycode: int
    rows: Sequence[Sequence[int]]
    #: the modifier mapping (``GetModifierMapping``): eight rows of keycodes, Shift first
    modifiers: Sequence[Sequence[int]] = ()
    _by_keysym: dict[int, Stroke] = field(default_factory=dict, init=False)
    _by_char: dict[str, Stroke] = field(default_factory=dict, init=False)
    shift: int | None = field(default=None, init=False)
    level3: int | None = field(default=None, init=False)
    caps_lock: int | None = field(default=None, init=False)
    #: keycodes with no keysym at all, highest first: what characters outside the keymap borrow
    spare: list[int] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        for offset, row in enumerate(self.rows):
            keycode = self.first_keycode + offset
            if not any(row):
                self.spare.append(keycode)
                continue
            for column, keysym in enumerate(row):
                if keysym == NO_SYMBOL:
                    continue
                if column == 0:
                    if keysym == ISO_LEVEL3_SHIFT and self.level3 is None:
                        self.level3 = keycode
                    elif keysym == CAPS_LOCK and self.caps_lock is None:
                        self.caps_lock = keycode
                    elif keysym == SHIFT_L and self.shift is None:
                        self.shift = keycode
        self.spare.reverse()
        if self.modifiers:
            self.shift = next((k for k in self.modifiers[0] if k), self.shift)
        levels = [0, 1, 2, 3] if self.level3 is not None else [0, 1]
        if self.shift is None:
            levels = [lv for lv in levels if lv in (0, 2)]
        for level in levels:  # lower levels first, then lower keycodes: the simplest stroke wins
            for offset, row in enumerate(self.rows):
                for column, col_level in _COLUMN_LEVEL.items():
                    if col_level != level or column >= len(row) or row[column] == NO_SYMBOL:
                        continue
                    stroke = Stroke(self.first_keycode + offset, level)
                    keysym = row[column]
                    self._by_keysym.setdefault(keysym, stroke)
                    char = keysym_char(keysym)
                    if char is not None:
                        self._by_char.setdefault(char, stroke)

    def stroke(self, keysym: int) -> Stroke | None:
        """How to type ``keysym`` with this keymap as it is; None if it holds no such key."""
        found = self._by_keysym.get(keysym)
        if found is None:
            char = keysym_char(keysym)
            if char is not None:
                found = self._by_char.get(char)
        return found

    @property
    def modifier_keycodes(self) -> set[int]:
        return {k for row in self.modifiers for k in row if k}

    def level_keys(self, level: int) -> list[int]:
        """The modifier keycodes to hold down for ``level``."""
        mods = []
        if level in (1, 3) and self.shift is not None:
            mods.append(self.shift)
        if level in (2, 3) and self.level3 is not None:
            mods.append(self.level3)
        return mods


def plan(keymap: Keymap, keysyms: Iterable[int]) -> tuple[list[Stroke], dict[int, int]]:
    """Strokes for ``keysyms`` in order, and the spare keycodes they borrow (keysym → keycode).

    DesktopError if more distinct keysyms are missing than the keymap has spare keycodes
    (callers type in batches small enough for that).
    """
    strokes: list[Stroke] = []
    borrowed: dict[int, int] = {}
    for keysym in keysyms:
        found = keymap.stroke(keysym)
        if found is None:
            if keysym not in borrowed:
                if len(borrowed) >= len(keymap.spare):
                    raise DesktopError(f"the keymap has no free keycode left to type {_name(keysym)}")
                borrowed[keysym] = keymap.spare[len(borrowed)]
            found = Stroke(borrowed[keysym], 0, borrowed=True)
        strokes.append(found)
    return strokes, borrowed


def _name(keysym: int) -> str:
    char = keysym_char(keysym)
    return repr(char) if char is not None else f"keysym 0x{keysym:x}"


class XKeyboard:
    """XTest keyboard on one X display (its own connection). Not thread-safe: the caller
    serialises input (the desktop's device lock)."""

    def __init__(self, display: str | None) -> None:
        import Xlib.display
        from Xlib.ext import xtest

        self._xtest = xtest
        try:
            self.x: Any = Xlib.display.Display(display)
        except Exception as exc:
            raise DesktopError(f"cannot open the display {display or '(session)'}: {exc}") from exc
        if not self.x.has_extension("XTEST"):
            self.x.close()
            raise DesktopError(f"the X display {display or '(session)'} has no XTEST extension: "
                               "keys cannot be typed as if on the keyboard")
        self._keymap: Keymap | None = None

    def close(self) -> None:
        with contextlib.suppress(Exception):  # the server may be gone already
            self.x.close()

    # -- the keymap ---------------------------------------------------------------------------

    def keymap(self) -> Keymap:
        """The current keymap: read again whenever the server announced a change."""
        x = self.x
        changed = False
        while x.pending_events():  # only MappingNotify reaches this connection (no event is selected)
            if x.next_event().type == _mapping_notify():
                changed = True
        if self._keymap is None or changed:
            info = x.display.info
            first = info.min_keycode
            rows = [tuple(r) for r in x.get_keyboard_mapping(first, info.max_keycode - first + 1)]
            modifiers = [tuple(row) for row in x.get_modifier_mapping()]
            self._keymap = Keymap(first, rows, modifiers=modifiers)
        return self._keymap

    # -- input ------------------------------------------------------------------------------

    def type(self, text: str) -> None:
        """Type ``text`` (DesktopError before any key if a character cannot be typed)."""
        keysyms = [char_keysym(ch) for ch in text]
        keymap = self.keymap()
        for part in _parts(keymap, keysyms):
            self._send(keymap, [[s] for s in part])

    def press(self, keys: Sequence[str]) -> None:
        """Press ``keys`` together (in order) and release them in reverse order."""
        keysyms = [key_keysym(k) for k in keys]
        self._send(self.keymap(), [keysyms])

    def _send(self, keymap: Keymap, chords: list[list[int]]) -> None:
        strokes, borrowed = plan(keymap, [k for chord in chords for k in chord])
        x, fake = self.x, self._xtest.fake_input
        self._release_stuck(keymap)
        if borrowed:
            self._remap({keycode: (keysym, keysym) for keysym, keycode in borrowed.items()})
        try:
            it = iter(strokes)
            for chord in chords:
                held: list[int] = []
                try:
                    for _ in chord:
                        stroke = next(it)
                        for keycode in [*keymap.level_keys(stroke.level), stroke.keycode]:
                            if keycode not in held:
                                fake(x, _KEY_PRESS, keycode)
                                held.append(keycode)
                finally:
                    for keycode in reversed(held):
                        fake(x, _KEY_RELEASE, keycode)
            x.sync()
        finally:
            if borrowed:
                time.sleep(BORROW_SETTLE)
                self._remap({keycode: () for keycode in borrowed.values()})
                # our own MappingNotify events say the keymap changed; it is back as it was
                while x.pending_events():
                    x.next_event()

    def _remap(self, rows: dict[int, tuple[int, ...]]) -> None:
        """Bind keycodes to keysyms (an empty row: no keysym) in one request, so that clients
        get one MappingNotify and see every binding at once; the keycodes between them are
        written back as the server has them now."""
        first, last = min(rows), max(rows)
        current = [tuple(r) for r in self.x.get_keyboard_mapping(first, last - first + 1)]
        width = max(2, *(len(r) for r in current))
        table = []
        for keycode, now in enumerate(current, first):
            row = rows.get(keycode, now)
            table.append(tuple(row) + (NO_SYMBOL,) * (width - len(row)))
        self.x.change_keyboard_mapping(first, table)
        self.x.sync()  # the server sends MappingNotify ahead of the keys that follow

    def _release_stuck(self, keymap: Keymap) -> None:
        """Release modifier keys still held down and turn Caps Lock off: both would change
        what every following key types."""
        x, fake = self.x, self._xtest.fake_input
        down = x.query_keymap()
        stuck = sorted(k for k in keymap.modifier_keycodes if down[k // 8] & (1 << (k % 8)))
        for keycode in stuck:
            fake(x, _KEY_RELEASE, keycode)
        if stuck:
            log.info("released modifier keys left pressed on the display: keycodes %s", stuck)
        if keymap.caps_lock is not None and x.screen().root.query_pointer().mask & _LOCK_MASK:
            fake(x, _KEY_PRESS, keymap.caps_lock)
            fake(x, _KEY_RELEASE, keymap.caps_lock)
            log.info("turned Caps Lock off before typing")


def _parts(keymap: Keymap, keysyms: list[int]) -> list[list[int]]:
    """``keysyms`` split so that no part borrows more keycodes than the keymap has spare."""
    parts: list[list[int]] = [[]]
    missing: set[int] = set()
    for keysym in keysyms:
        if keymap.stroke(keysym) is None and keysym not in missing:
            if len(missing) >= len(keymap.spare):
                if not keymap.spare:
                    raise DesktopError(f"the keymap has no free keycode to type {_name(keysym)}")
                parts.append([])
                missing = set()
            missing.add(keysym)
        parts[-1].append(keysym)
    return [p for p in parts if p]


_KEY_PRESS = 2  # Xlib.X.KeyPress
_KEY_RELEASE = 3  # Xlib.X.KeyRelease
_LOCK_MASK = 1 << 1  # Xlib.X.LockMask


def _mapping_notify() -> int:
    import Xlib.X

    return int(Xlib.X.MappingNotify)
