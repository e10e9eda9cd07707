"""Where things are on KeePassXC 2.7.4's screens, at 1024x768 with the window at (0, 0).

Measured on Xvfb with the configuration in ``config/`` (``launch.py`` copies it before every
start): the group panel is widened to x 9-398 and the list/preview splitter raised to y 278,
so that the preview panel's "General" tab sits at (404-480, 330-360). KeePassXC centres its
dialogs over the main window at (502, 344) — every one measured, from a 369x91 question to
the 444x519 About box — so any dialog at least 300 px wide and 91 px tall covers that tab:
it is the ready screen's anchor that no dialog can leave visible (see ``anchors.py``).
The list shows Title, Username and URL only, sorted by title, in the list and in search
results alike.
"""

from __future__ import annotations

from deskfleet import Region

WIDTH, HEIGHT = 1024, 768
#: where the pointer rests between steps: the status bar's empty left part (no tooltip, no hover)
PARK = (600, 757)

# -- menu bar and toolbar (every screen of the main window) ------------------------------------
MENU_HELP = Region(306, 2, 32, 22)
HELP_ABOUT = Region(320, 190, 100, 22)  # in the Help menu, once open
LOCK_BUTTON = Region(97, 40, 28, 28)
NEW_BUTTON = Region(161, 40, 28, 28)
SEARCH_BOX = Region(605, 42, 320, 24)  # the text part (the icons around it stay out)
SEARCH_FRAME_AT = (578, 54)  # a pixel of the search box's frame (green while it has the focus)

#: the root group ("Passwords") in the group tree: selecting it brings back the preview panel,
#: which KeePassXC hides when nothing is selected (after a search with no results is cleared)
GROUP_ROOT = Region(28, 97, 360, 24)

# -- the unlock screen ----------------------------------------------------------------------------
PASSWORD = Region(192, 311, 600, 32)  # the field without its eye icon
PASSWORD_TEXT = Region(198, 315, 590, 24)  # inside the border: where the dots are drawn
UNLOCK = Region(620, 473, 103, 31)
#: the "Invalid credentials" banner pushes the unlock panel down by this much
BANNER_SHIFT = 51
BANNER_TEXT = Region(22, 104, 940, 40)
BANNER_CLOSE = Region(975, 116, 24, 24)

# -- the entry list ---------------------------------------------------------------------------------
#: columns of the list (x ranges); rows are 30 px apart
TITLE_COL = (430, 602)  # the title's text (the key icon left of it stays out)
USER_COL = (606, 800)
URL_COL = (805, 1000)
LIST_FIRST_ROW = 139  # the first row's centre in the plain list
SEARCH_FIRST_ROW = 168  # … in search results (below the "Search Results (N)" banner)
ROW_PITCH = 30
LIST_ROWS = 5  # rows fully visible
SEARCH_ROWS = 4
SEARCH_BANNER = Region(500, 96, 420, 19)  # "Search Results (N)" or "No Results"
ENTRY_COUNT = Region(820, 747, 195, 19)  # status bar: "N Entries" / "1 Entry"

# -- the new-entry form ---------------------------------------------------------------------------
TITLE = Region(216, 125, 799, 31)
USERNAME = Region(216, 164, 768, 31)  # the editable combo without its arrow
ENTRY_PASSWORD = Region(216, 204, 740, 31)  # without the dice and eye icons
URL = Region(216, 247, 759, 31)
NOTES = Region(216, 364, 799, 329)
NOTES_FIRST_LINE = Region(220, 369, 790, 22)
FORM_OK = Region(803, 704, 103, 31)
FORM_CANCEL = Region(912, 704, 103, 31)

# -- dialogs (separate top-level windows, centred over the main window) -----------------------------
UNSAVED_DISCARD = Region(464, 348, 103, 31)  # "Would you like to save changes to this entry?"
LOCK_CONFIRM_DISCARD = Region(511, 348, 103, 31)  # "You are editing an entry. Discard changes and lock anyway?"
UNLOCK_FAILED_CANCEL = Region(638, 384, 103, 31)  # "Unlocking the database failed and you did not enter a password"


def row(first: int, k: int) -> int:
    """The centre y of row ``k`` (0-based) of a list whose first row is centred at ``first``."""
    return first + k * ROW_PITCH


def cell(column: tuple[int, int], y: int) -> Region:
    """A cell's text, for OCR: the column's x range, 22 px around the row's centre."""
    return Region(column[0], y - 11, column[1] - column[0], 22)


def inside(field: Region, pad: int = 4) -> Region:
    """A text field without its border (a border line next to a glyph spoils OCR)."""
    return Region(field.left + pad, field.top + pad, field.width - 2 * pad, field.height - 2 * pad)


def shifted(r: Region, dy: int) -> Region:
    return Region(r.left, r.top + dy, r.width, r.height)
