"""Where everything is on DemoEHR's window: one geometry shared by the app and its model.

The app places every widget at these pixel positions (Tk ``place``; fonts sized in
pixels), in a 1024x768 window at the screen's top-left corner, so what it draws does not
depend on the display's DPI or on font metrics: a larger font changes the glyphs, never
the layout. The app model cuts its templates at these regions, and the playbooks and
automations click their centres — as a user's model would be measured off a screenshot.

Icons are drawn from :data:`ICONS` (an outline shape, a mark inside it, a colour) rather
than from text, so that the parts the model recognises survive a change of font.
"""

from __future__ import annotations

from dataclasses import dataclass

from deskfleet import Region

WIDTH, HEIGHT = 1024, 768
APP_NAME = "DemoEHR"

HEADER = Region(0, 0, WIDTH, 56)
FOOTER = Region(0, 744, WIDTH, 24)
LOGO = Region(12, 8, 40, 40)
SCREEN_ICON = Region(972, 8, 40, 40)
HEADER_ICONS = tuple(Region(x, 14, 28, 28) for x in (640, 780, 900))
FOOTER_ICONS = tuple(Region(x, 748, 16, 16) for x in (8, 158, 308, 458, 608, 758, 908, 1000))
FOOTER_TEXT = Region(28, 746, 120, 20)
BODY_ICON = Region(40, 100, 64, 64)  # the big icon at the left of forms and search

# -- login and MFA: a centred panel -------------------------------------------------------
PANEL = Region(312, 140, 400, 420)
PANEL_ICON = Region(488, 160, 48, 48)
PANEL_TITLE = Region(332, 218, 360, 30)
USERNAME = Region(352, 284, 320, 32)
PASSWORD = Region(352, 352, 320, 32)
LOGIN_ERROR = Region(352, 392, 320, 28)
SIGN_IN = Region(352, 430, 320, 40)
CODE = Region(352, 284, 320, 32)
MFA_ERROR = Region(352, 324, 320, 28)
VERIFY = Region(352, 370, 320, 40)
USERNAME_ICON = Region(324, 288, 24, 24)
PASSWORD_ICON = Region(324, 356, 24, 24)
CODE_ICON = Region(324, 288, 24, 24)

# -- home: a sidebar and a dashboard of cards ----------------------------------------------
SIDEBAR = Region(0, 56, 200, 688)
NEW_PATIENT = Region(16, 80, 168, 44)
SEARCH_NAV = Region(16, 136, 168, 44)
SIGN_OUT = Region(16, 688, 168, 40)
SIDEBAR_ITEMS = tuple(Region(24, 216 + 60 * i, 32, 32) for i in range(6))
SIDEBAR_LABELS = ("Reports", "Schedule", "Messages", "Billing", "Settings", "Help")
USER_LABEL = Region(220, 64, 520, 30)
CARD_SIZE = (180, 190)
CARDS = tuple(Region(220 + 196 * col, 104 + 210 * row, *CARD_SIZE) for row in range(3) for col in range(4))
CARD_TITLES = ("Admissions", "Lab results", "Wards", "Pharmacy", "Clinics", "Imaging",
               "Referrals", "Vaccines", "Discharges", "Theatre", "Outpatients", "Audit")


def card_icon(card: Region) -> Region:
    return Region(card.left + 16, card.top + 16, 40, 40)


def card_status(card: Region) -> Region:
    """A small status mark in each card's lower right corner."""
    return Region(card.left + card.width - 36, card.top + card.height - 36, 20, 20)


# -- search ----------------------------------------------------------------------------------
SEARCH_MRN = Region(240, 114, 300, 32)
SEARCH_GO = Region(560, 112, 120, 36)
SEARCH_BACK = Region(700, 112, 120, 36)
SEARCH_EDIT = Region(840, 112, 120, 36)
RESULTS = Region(240, 170, 760, 300)
RESULT_LINES = 8
RESULTS_MARK = Region(672, 436, 24, 24)  # an icon in the results panel's lower part

# -- the patient forms (new and edit) --------------------------------------------------------
FORM_MRN = Region(400, 114, 360, 32)
FORM_NAME = Region(400, 170, 360, 32)
FORM_DOB = Region(400, 226, 360, 32)
FORM_SAVE = Region(400, 290, 170, 40)
FORM_CANCEL = Region(590, 290, 170, 40)
EDIT_RECORD = Region(240, 74, 700, 30)  # "Record #12 · MRN A-1" on the edit form
FORM_HINT_ICON = Region(400, 356, 24, 24)
FORM_HINT = Region(432, 356, 400, 24)

# -- dialogs: modal, centred on the window ---------------------------------------------------
DIALOG = Region(312, 284, 400, 200)
DIALOG_STRIP = Region(312, 284, 400, 32)
DIALOG_GLYPH = Region(680, 288, 24, 24)
DIALOG_ICON = Region(332, 332, 48, 48)
DIALOG_MESSAGE = Region(396, 328, 300, 100)
DIALOG_OK = Region(612, 436, 84, 32)


@dataclass(frozen=True, slots=True)
class Icon:
    shape: str  # circle | square | diamond | triangle | hexagon
    mark: str  # plus | cross | check | dot | bars | ring | chevron | lines | exclaim | info | clock | key
    color: str


ICONS: dict[str, Icon] = {
    "logo": Icon("circle", "plus", "#e53935"),
    "login": Icon("square", "key", "#3949ab"),
    "mfa": Icon("hexagon", "dot", "#00897b"),
    "home": Icon("triangle", "bars", "#43a047"),
    "search": Icon("circle", "ring", "#1e88e5"),
    "patient_form": Icon("square", "plus", "#8e24aa"),
    "edit_form": Icon("diamond", "lines", "#6d4c41"),
    "card_status": Icon("circle", "check", "#66bb6a"),
    "error_dialog": Icon("circle", "cross", "#c62828"),
    "session_expired": Icon("circle", "clock", "#ef6c00"),
    "validation": Icon("triangle", "exclaim", "#f9a825"),
    "saved": Icon("circle", "check", "#2e7d32"),
    "updated": Icon("square", "check", "#00838f"),
    "notice": Icon("circle", "info", "#1565c0"),
    "dialog_glyph": Icon("square", "lines", "#ffffff"),
    "field_user": Icon("circle", "dot", "#607d8b"),
    "field_lock": Icon("square", "key", "#607d8b"),
    "field_code": Icon("hexagon", "bars", "#607d8b"),
    "form_hint": Icon("circle", "info", "#0277bd"),
    "results_mark": Icon("diamond", "dot", "#90a4ae"),
}
HEADER_MARKS = (Icon("circle", "info", "#90caf9"), Icon("square", "lines", "#90caf9"), Icon("hexagon", "dot", "#ffcc80"))
FOOTER_MARKS = tuple(
    Icon(shape, mark, color)
    for shape, mark, color in (
        ("circle", "dot", "#2e7d32"), ("square", "bars", "#546e7a"), ("diamond", "dot", "#546e7a"),
        ("triangle", "dot", "#f9a825"), ("hexagon", "ring", "#546e7a"), ("square", "plus", "#546e7a"),
        ("circle", "ring", "#546e7a"), ("triangle", "bars", "#f9a825"),
    )
)
SIDEBAR_ICONS = tuple(
    Icon(shape, mark, "#455a64")
    for shape, mark in (("square", "bars"), ("circle", "clock"), ("square", "lines"),
                        ("diamond", "dot"), ("hexagon", "ring"), ("circle", "info"))
)
CARD_ICONS = tuple(
    Icon(shape, mark, color)
    for shape, mark, color in (
        ("square", "plus", "#d81b60"), ("circle", "bars", "#5e35b1"), ("diamond", "chevron", "#1e88e5"),
        ("hexagon", "cross", "#00897b"), ("triangle", "ring", "#7cb342"), ("circle", "lines", "#fb8c00"),
        ("square", "chevron", "#6d4c41"), ("diamond", "plus", "#3949ab"), ("hexagon", "check", "#c0ca33"),
        ("triangle", "plus", "#8e24aa"), ("square", "ring", "#00acc1"), ("circle", "key", "#757575"),
    )
)

#: dialog kind → (title, strip colour)
DIALOGS = {
    "error_dialog": ("Error", "#b3261e"),
    "session_expired": ("Session expired", "#b26a00"),
    "validation": ("Check the form", "#8a6d00"),
    "saved": ("Saved", "#1e7b34"),
    "updated": ("Updated", "#106b6b"),
    "notice": ("Notice", "#1f5fa8"),  # a dialog the app model does not know
}
