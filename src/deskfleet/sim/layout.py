"""Where SimEHR's widgets are and what its screen shows, as plain data.

:class:`Layout` places every widget for a screen size: the app hit-tests clicks against
it, the renderer draws it, playbooks and automations click at its centres, and the
classifier's templates are cut from it. :class:`View` is everything visible at one
moment — immutable and hashable, so the renderer caches frames by it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from deskfleet import Region

APP_NAME = "SimEHR"
SCREENS = ("login", "mfa", "home", "patient_form", "search")
SCREEN_TITLES = {
    "login": "Sign in",
    "mfa": "Verification",
    "home": "Home",
    "patient_form": "New patient",
    "search": "Find patient",
}
# Each screen's colour badge, left of its heading. Recognition compares grey templates at
# fixed places, where the inside of a solid block survives a 1-px shift and text does not;
# so badges are plain, and their grey levels (62, 96, 133, 170, 202) lie ≥ 34 apart from
# each other and from the background (238).
SCREEN_BADGES: dict[str, tuple[int, int, int]] = {
    "search": (30, 70, 100),
    "login": (40, 105, 200),
    "mfa": (150, 110, 210),
    "patient_form": (120, 205, 120),
    "home": (240, 200, 110),
}
RESULT_LINES = 4  # patient rows the search screen lists


@dataclass(frozen=True, slots=True)
class Widget:
    name: str
    kind: str  # "field", "button", "label" (dynamic text), "caption", "heading", "badge", "icon"
    rect: Region
    text: str = ""  # a button's caption, a static label's text
    secret: bool = False

    @property
    def center(self) -> tuple[int, int]:
        return self.rect.center


@dataclass(frozen=True, slots=True)
class DialogKind:
    title: str
    # The title strip's colour. Their grey levels lie ≥ 35 apart (34, 72, 121, 157, 196):
    # recognition compares grey templates of the strip's plain part, so hue alone would
    # not tell two dialogs apart.
    color: tuple[int, int, int]
    icon: str


DIALOGS: dict[str, DialogKind] = {
    "exported": DialogKind("Summary exported", (24, 34, 64), "i"),
    "error_dialog": DialogKind("Unexpected error", (176, 28, 28), "X"),
    "saved": DialogKind("Patient saved", (60, 160, 80), "i"),
    "session_expired": DialogKind("Session expired", (224, 150, 20), "!"),
    "validation": DialogKind("Form incomplete", (240, 200, 60), "?"),
}


def inset(rect: Region, n: int) -> Region:
    return Region(rect.left + n, rect.top + n, rect.width - 2 * n, rect.height - 2 * n)


def contains(rect: Region, x: int, y: int) -> bool:
    return rect.left <= x < rect.left + rect.width and rect.top <= y < rect.top + rect.height


def intersects(a: Region, b: Region) -> bool:
    return (
        a.left < b.left + b.width
        and b.left < a.left + a.width
        and a.top < b.top + b.height
        and b.top < a.top + a.height
    )


class Layout:
    """Where every widget sits on a ``width`` x ``height`` screen (the app runs maximised)."""

    def __init__(self, width: int = 1024, height: int = 768) -> None:
        if width < 640 or height < 480:
            raise ValueError(f"SimEHR needs a screen of at least 640x480, not {width}x{height}")
        self.width, self.height = width, height
        cx, cy = width // 2, height // 2
        left = cx - 260
        fx = left + 130  # fields and buttons line up right of the captions

        def field(name: str, caption: str, y: int, w: int = 390, secret: bool = False) -> list[Widget]:
            return [
                Widget(f"{name}_caption", "caption", Region(left, y, 125, 32), caption),
                Widget(name, "field", Region(fx, y, w, 32), secret=secret),
            ]

        def button(name: str, caption: str, x: int, y: int, w: int = 140, h: int = 40) -> Widget:
            return Widget(name, "button", Region(x, y, w, h), caption)

        def heading(text: str) -> tuple[Widget, Widget]:
            return (
                Widget("badge", "badge", Region(left, 62, 44, 44)),
                Widget("heading", "heading", Region(left + 58, 64, 462, 40), text),
            )

        self.title_bar = Region(0, 0, width, 36)
        self.screens: dict[str, tuple[Widget, ...]] = {
            "login": (
                *heading("Sign in to SimEHR"),
                *field("username", "Username", 140),
                *field("password", "Password", 190, secret=True),
                button("sign_in", "Sign in", fx, 250),
                Widget("error", "label", Region(fx, 306, 390, 24)),
            ),
            "mfa": (
                *heading("Two-step verification"),
                Widget(
                    "hint",
                    "caption",
                    Region(left, 116, 520, 24),
                    "Enter the 6-digit code from your authenticator app.",
                ),
                *field("code", "Code", 160, w=180),
                button("verify", "Verify", fx + 200, 156),
                Widget("error", "label", Region(fx, 210, 390, 24)),
            ),
            "home": (
                *heading("Home"),
                Widget("user", "label", Region(left, 116, 520, 24)),
                button("new_patient", "New patient", left, 170, 160, 48),
                button("search", "Search", left + 180, 170, 160, 48),
                button("sign_out", "Sign out", left + 360, 170, 160, 48),
            ),
            "patient_form": (
                *heading("New patient"),
                *field("mrn", "MRN", 130),
                *field("name", "Name", 180),
                *field("dob", "Date of birth", 230, w=180),
                Widget("dob_hint", "caption", Region(fx + 190, 230, 200, 32), "YYYY-MM-DD"),
                button("save", "Save", fx, 300),
                button("cancel", "Cancel", fx + 160, 300),
            ),
            "search": (
                *heading("Find patient"),
                *field("mrn", "MRN", 130, w=240),
                button("search", "Search", fx + 260, 126, 130, 40),
                Widget("results", "label", Region(left, 190, 520, 24 * (RESULT_LINES + 2))),
                button("export", "Export summary", left, 360, 180, 40),
                button("back", "Back", left + 200, 360),
            ),
        }
        self.dialog = Region(cx - 210, cy - 90, 420, 180)
        self.dialog_title = Region(cx - 210, cy - 90, 420, 34)
        self.dialog_message = Region(cx - 190, cy - 44, 380, 64)
        self.dialog_ok = Widget("ok", "button", Region(cx - 50, cy + 36, 100, 36), "OK")
        self.icons: tuple[Widget, ...] = (
            Widget("simehr", "icon", Region(24, 24, 88, 92), APP_NAME),
            Widget("documents", "icon", Region(24, 136, 88, 92), "Documents"),
            Widget("recycle_bin", "icon", Region(24, 248, 88, 92), "Recycle Bin"),
        )
        self.reboot_logo = Region(cx - 36, cy - 72, 72, 72)
        self.reboot_text = Region(cx - 110, cy + 16, 220, 28)
        self._by_name = {
            (screen, w.name): w for screen, widgets in self.screens.items() for w in widgets
        }

    def widget(self, screen: str, name: str) -> Widget:
        if name == "ok":
            return self.dialog_ok
        return self._by_name[(screen, name)]

    def fields(self, screen: str) -> list[Widget]:
        return [w for w in self.screens.get(screen, ()) if w.kind == "field"]

    def buttons(self, screen: str) -> list[Widget]:
        return [w for w in self.screens.get(screen, ()) if w.kind == "button"]


@functools.lru_cache(maxsize=16)
def layout_for(width: int = 1024, height: int = 768) -> Layout:
    return Layout(width, height)


@dataclass(frozen=True, slots=True)
class View:
    """Everything visible on the screen — the renderer's input and its cache key.

    Values are as displayed (passwords already masked), so a view never holds a secret.
    """

    screen: str  # one of SCREENS, or "desktop" (no app running) or "rebooting"
    values: tuple[tuple[str, str], ...] = ()
    texts: tuple[tuple[str, str], ...] = ()  # dynamic labels: login error, user, results
    focus: str | None = None
    selected: bool = False  # the focused field's text is selected (after ctrl+a or tab)
    hover: str | None = None  # the button under the mouse; "ok" for the top dialog's
    dialogs: tuple[tuple[str, str], ...] = ()  # (kind, message), bottom to top

    def value(self, name: str) -> str:
        return dict(self.values).get(name, "")

    def text(self, name: str) -> str:
        return dict(self.texts).get(name, "")


DESKTOP_VIEW = View("desktop")
REBOOTING_VIEW = View("rebooting")
