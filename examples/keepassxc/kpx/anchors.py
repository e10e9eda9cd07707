"""What the model recognises each screen by: the anchors ``capture.py`` records.

Every anchor is chrome that does not change with the data — menu text, toolbar icons (dark
when enabled, grey when not: that alone tells the unlock screen from the list), column
headers, labels, tabs — never a row of the entry list, the status bar's count, the form's
expiry date or a field a caret blinks in.

``entries``, the one ready state, is held to anchors spread over the whole window, and one of
them is the preview panel's "General" tab at (404-480, 330-360): KeePassXC centres every
dialog over its main window at (502, 344), so a dialog of any size it draws (at least
300x91) hides that tab, and a dialog nobody modelled leaves the screen ``unknown``, never
ready. A dialog at (0, 0) (the password generator) hides the menu and the toolbar; a menu
hides toolbar icons. The other main-window screens each carry an anchor near the centre too,
so an unknown dialog over them is ``unknown`` as well, and the Escape playbook deals with it.

The known dialogs are overlays: their icon, their message and their buttons.
"""

from __future__ import annotations

from dataclasses import dataclass

from deskfleet import Region


@dataclass(frozen=True, slots=True)
class Spot:
    """One anchor: a template cut at ``at``; ``fixed`` areas are compared in place."""

    name: str
    at: Region
    fixed: bool = False
    threshold: float | None = None
    margin: int | None = None

    def option(self) -> list[str]:
        """As ``deskfleet model capture`` takes it."""
        box = ",".join(str(v) for v in self.at)
        if self.fixed:
            return ["--fixed", f"{self.name}={box}" + (f"@{self.threshold}" if self.threshold else "")]
        return ["--anchor", f"{self.name}={box}" + (f"+{self.margin}" if self.margin is not None else "")
                + (f"@{self.threshold}" if self.threshold else "")]


R = Region
#: the menu bar and the buttons enabled on every screen of the main window
MENU = [Spot("menu_left", R(4, 5, 186, 18)), Spot("menu_right", R(206, 5, 132, 18)),
        Spot("open", R(14, 41, 28, 27)), Spot("generator", R(488, 41, 27, 27)),
        Spot("settings", R(529, 40, 28, 28)), Spot("search_glass", R(585, 46, 15, 15))]
#: toolbar buttons enabled only while the database is unlocked (grey on the unlock screen)
UNLOCKED = [Spot("lock", R(98, 40, 26, 29))]
#: the left panels and the preview panel: the same in the list and in search results (not the
#: group tree's root: its highlight turns dark when the tree has the keyboard focus)
PANELS = [Spot("searches_label", R(9, 530, 138, 16)),
          Spot("all_entries", R(14, 582, 88, 16)), Spot("weak_passwords", R(14, 632, 130, 16)),
          Spot("preview_close", R(986, 289, 26, 26)), Spot("general_tab", R(406, 333, 70, 24))]

STATES: dict[str, list[Spot]] = {
    "locked": [*MENU,
               Spot("unlock_title", R(171, 206, 288, 22)), Spot("password_label", R(192, 289, 106, 14)),
               Spot("more_credentials", R(305, 356, 124, 16)), Spot("key_file_label", R(207, 390, 56, 14)),
               Spot("hardware_key_label", R(207, 427, 95, 16)), Spot("refresh", R(750, 427, 56, 14)),
               Spot("close", R(760, 481, 42, 14))],
    "locked_error": [*MENU,
                     Spot("banner_text", R(27, 112, 215, 16)), Spot("banner_close", R(979, 121, 16, 16)),
                     Spot("unlock_title", R(171, 257, 288, 22)), Spot("more_credentials", R(305, 407, 124, 16)),
                     Spot("key_file_label", R(207, 441, 56, 14)), Spot("close", R(760, 532, 42, 14))],
    "entries": [*MENU, *UNLOCKED, Spot("new", R(162, 41, 27, 27)), *PANELS,
                Spot("title_header", R(406, 101, 190, 16)), Spot("username_header", R(606, 101, 90, 16)),
                Spot("url_header", R(806, 101, 40, 16))],
    "search": [*MENU, *UNLOCKED, Spot("new", R(162, 41, 27, 27)), *PANELS,
               Spot("title_header", R(406, 130, 190, 16)), Spot("username_header", R(606, 130, 90, 16))],
    "entry_form": [*MENU, *UNLOCKED,
                   Spot("entry_icon", R(40, 140, 36, 30)), Spot("advanced_icon", R(40, 237, 36, 30)),
                   Spot("icon_icon", R(42, 334, 34, 30)), Spot("autotype_icon", R(40, 433, 38, 28)),
                   Spot("properties_icon", R(42, 526, 34, 30)),
                   Spot("title_label", R(172, 133, 36, 16)), Spot("password_label", R(140, 213, 68, 16)),
                   Spot("tags_label", R(176, 294, 32, 16)), Spot("expires_label", R(152, 333, 56, 16)),
                   Spot("notes_label", R(152, 365, 46, 16)),
                   # the Tags field's lower edge over the expiry field's upper one, mid-form: a dialog hides them
                   Spot("mid_edges", R(420, 310, 160, 22))],
    "welcome": [*MENU, Spot("logo", R(482, 289, 60, 60)), Spot("create", R(440, 436, 144, 16)),
                Spot("open_existing", R(432, 473, 160, 16))],
    # the bare X screen (no KeePassXC window): plain black, which cannot be located
    "desktop": [Spot("top", R(0, 0, 200, 56), fixed=True), Spot("middle", R(412, 334, 200, 100), fixed=True),
                Spot("bottom", R(824, 712, 200, 56), fixed=True)],
    # dialogs
    "unlock_failed": [Spot("icon", R(267, 278, 42, 42)), Spot("message", R(332, 276, 350, 20)),
                      Spot("retry", R(428, 392, 182, 16)), Spot("cancel", R(665, 392, 48, 16))],
    "unsaved_changes": [Spot("icon", R(328, 309, 32, 32)), Spot("message", R(380, 311, 296, 16)),
                        Spot("save", R(388, 356, 38, 16)), Spot("discard", R(490, 356, 52, 16))],
    "lock_confirm": [Spot("icon", R(281, 309, 32, 32)), Spot("message", R(333, 311, 390, 16)),
                     Spot("discard", R(537, 356, 52, 16)), Spot("cancel", R(646, 356, 50, 16))],
}
OVERLAYS = ("unlock_failed", "unsaved_changes", "lock_confirm")
READY = ("entries",)
