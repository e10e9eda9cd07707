"""DemoEHR, the demo application: a small Tk desktop app that stands in for an EHR.

A real GUI process on a real X display, driven only through its pixels, mouse and
keyboard: a login screen, an MFA (TOTP) prompt, a home dashboard, patient search, a
create-patient form with validation and a save confirmation, and an edit form. Records
go to a SQLite file shared by every DemoEHR process of a demo (:mod:`.records`).

It misbehaves on request (:class:`Options`, set by ``python -m deskfleet.demoapp``
switches or ``DESKFLEET_DEMOAPP_*`` variables), as the applications our users automate
do on their own:

- an idle session timeout that returns to the login screen with a "session expired" dialog;
- modal error dialogs, at random (seeded) or at a chosen step;
- a crash — the process exits — at random (seeded) or at a chosen step;
- a freeze, at random (seeded) or at a chosen step: the callback never returns, the Tk
  mainloop stops processing events, and the window keeps showing its last frame,
  pixel-perfect;
- memory growth per saved record.

Faults strike at :data:`STEPS`. ``saved`` and ``updated`` come after the database write
and before the confirmation, the moment that makes a retry dangerous. Seeded faults are
drawn at every step from one stream per kind, seeded by the seed, the desktop's name and
how many times DemoEHR started on it before: the same seed and the same sequence of steps
give the same faults, and an app restarted after a crash does not replay it. Every fault
taken (and every session expiry) is logged in the records file.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import random
import time
import tkinter as tk
import tkinter.font as tkfont
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyotp

from deskfleet import Region

from . import layout as L
from .records import MFA_ALWAYS, Patient, Records, credentials

log = logging.getLogger(__name__)

STEPS = ("sign_in", "verify", "open_form", "save", "saved", "search", "open_edit", "update", "updated")
CRASH_STATUS = 70

BG, HEADER_BG, SIDEBAR_BG, FOOTER_BG, PANEL_BG = "#eef1f5", "#1f3b63", "#dde3ea", "#c9d1db", "#ffffff"
BUTTON = ("#2f6fb0", "#5b9be0")  # colour, colour under the pointer
SECONDARY = ("#7d8a9c", "#a9b6c8")
FAMILY, MONO = "DejaVu Sans", "DejaVu Sans Mono"


@dataclass(slots=True)
class Options:
    data: Path
    name: str = "demoehr"  # this desktop's name, recorded with each record and fault
    seed: int = 0  # the accounts, and the random error dialogs
    mfa: bool = False  # every account is asked for a TOTP code (clinic-* always are)
    session_timeout: float | None = None  # seconds of no input before the session ends
    error_rate: float = 0.0  # chance of an error dialog at each step
    crash_rate: float = 0.0  # chance the process exits at each step
    freeze_rate: float = 0.0  # chance the app hangs at each step
    error_at: dict[str, int] = field(default_factory=dict)  # step → how many times, across processes
    crash_at: dict[str, int] = field(default_factory=dict)
    freeze_at: dict[str, int] = field(default_factory=dict)
    expire_at: dict[str, int] = field(default_factory=dict)  # the session ends at the step (logged out)
    leak_mb: float = 0.0  # memory kept per saved or updated record
    font_delta: int = 0  # pixels added to every font size (rendering drift for tests)
    show_dialog: str | None = None  # a dialog kind shown over the login screen at start

    def __post_init__(self) -> None:
        for name in ("error_at", "crash_at", "freeze_at", "expire_at"):
            unknown = set(getattr(self, name)) - set(STEPS)
            if unknown:
                raise ValueError(f"{name}: unknown step(s) {', '.join(sorted(unknown))}; steps: {', '.join(STEPS)}")
        for name in ("error_rate", "crash_rate", "freeze_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")
        if self.show_dialog is not None and self.show_dialog not in L.DIALOGS:
            raise ValueError(f"show_dialog must be one of {', '.join(L.DIALOGS)}")


def draw_icon(canvas: tk.Canvas, icon: L.Icon, size: int) -> None:
    """An icon from its shape, mark and colour — the same pixels at every font size."""
    s, pad = size, max(1, round(size * 0.06))
    c, ink = icon.color, ("#1f3b63" if icon.color == "#ffffff" else "#ffffff")
    w = max(2, round(s * 0.1))
    cx, cy = s / 2, s * (0.6 if icon.shape == "triangle" else 0.5)
    if icon.shape == "circle":
        canvas.create_oval(pad, pad, s - pad, s - pad, fill=c, outline="")
    elif icon.shape == "square":
        canvas.create_rectangle(pad, pad, s - pad, s - pad, fill=c, outline="")
    elif icon.shape == "diamond":
        canvas.create_polygon(s / 2, pad, s - pad, s / 2, s / 2, s - pad, pad, s / 2, fill=c, outline="")
    elif icon.shape == "triangle":
        canvas.create_polygon(s / 2, pad, s - pad, s - pad, pad, s - pad, fill=c, outline="")
    elif icon.shape == "hexagon":
        r = s / 2 - pad
        pts = [v for k in range(6) for v in (s / 2 + r * math.cos(math.pi / 3 * k), s / 2 + r * math.sin(math.pi / 3 * k))]
        canvas.create_polygon(*pts, fill=c, outline="")
    r = s * 0.22
    m = icon.mark
    if m == "plus":
        canvas.create_rectangle(cx - w / 2, cy - r, cx + w / 2, cy + r, fill=ink, outline="")
        canvas.create_rectangle(cx - r, cy - w / 2, cx + r, cy + w / 2, fill=ink, outline="")
    elif m == "cross":
        canvas.create_line(cx - r, cy - r, cx + r, cy + r, fill=ink, width=w)
        canvas.create_line(cx - r, cy + r, cx + r, cy - r, fill=ink, width=w)
    elif m == "check":
        canvas.create_line([cx - r, cy, cx - r / 3, cy + r * 0.7, cx + r, cy - r * 0.6], fill=ink, width=w)
    elif m == "dot":
        canvas.create_oval(cx - r * 0.6, cy - r * 0.6, cx + r * 0.6, cy + r * 0.6, fill=ink, outline="")
    elif m == "bars":
        for k, hgt in enumerate((0.5, 1.0, 1.5)):
            x0 = cx - r + k * r * 0.8
            canvas.create_rectangle(x0, cy + r - hgt * r, x0 + r * 0.5, cy + r, fill=ink, outline="")
    elif m == "ring":
        canvas.create_oval(cx - r, cy - r, cx + r, cy + r, outline=ink, width=w)
    elif m == "chevron":
        canvas.create_line([cx - r / 2, cy - r, cx + r / 2, cy, cx - r / 2, cy + r], fill=ink, width=w)
    elif m == "lines":
        for k in (-1, 0, 1):
            canvas.create_line(cx - r, cy + k * r * 0.7, cx + r, cy + k * r * 0.7, fill=ink, width=max(1, w // 2 + 1))
    elif m == "exclaim":
        canvas.create_rectangle(cx - w / 2, cy - r, cx + w / 2, cy + r * 0.3, fill="#000000", outline="")
        canvas.create_rectangle(cx - w / 2, cy + r * 0.55, cx + w / 2, cy + r * 0.55 + w, fill="#000000", outline="")
    elif m == "info":
        canvas.create_rectangle(cx - w / 2, cy - r * 0.9, cx + w / 2, cy - r * 0.9 + w, fill=ink, outline="")
        canvas.create_rectangle(cx - w / 2, cy - r * 0.3, cx + w / 2, cy + r, fill=ink, outline="")
    elif m == "clock":
        canvas.create_oval(cx - r * 1.2, cy - r * 1.2, cx + r * 1.2, cy + r * 1.2, outline=ink, width=w)
        canvas.create_line([cx, cy, cx, cy - r * 0.9, cx + r * 0.6, cy], fill=ink, width=max(1, w - 1))
    elif m == "key":
        canvas.create_oval(cx - r, cy - r * 0.5, cx, cy + r * 0.5, outline=ink, width=w)
        canvas.create_line([cx, cy, cx + r, cy, cx + r, cy + r * 0.5], fill=ink, width=w)


class DemoApp:
    """The application's screens and behaviour on one Tk root."""

    def __init__(self, root: tk.Tk, options: Options) -> None:
        self.root = root
        self.opt = options
        self.records = Records(options.data)
        self.accounts = credentials(options.seed)
        launch = self.records.launch(options.name)
        self.rolls = {kind: random.Random(f"{options.seed}:{options.name}:{launch}:{kind}")
                      for kind in ("crash", "freeze", "error_dialog")}
        self.user: str | None = None
        self._pending_user: str | None = None
        self._last_input = time.monotonic()
        self._widgets: list[tk.Widget] = []
        self._dialog: tk.Frame | None = None
        self._leak: list[bytes] = []
        self._editing: Patient | None = None
        self._found: list[Patient] = []
        d = options.font_delta
        self.font = tkfont.Font(root, family=FAMILY, size=-(15 + d))
        self.font_bold = tkfont.Font(root, family=FAMILY, size=-(15 + d), weight="bold")
        self.font_title = tkfont.Font(root, family=FAMILY, size=-(20 + d), weight="bold")
        self.font_mono = tkfont.Font(root, family=MONO, size=-(16 + d))
        root.title(L.APP_NAME)
        root.geometry(f"{L.WIDTH}x{L.HEIGHT}+0+0")
        root.resizable(False, False)
        root.configure(bg=BG)
        root.option_add("*Entry.insertOffTime", 0)  # a steady caret: no blinking pixels
        # Windows habits for the robot's key presses: Ctrl+A selects a field's text.
        for seq in ("<Control-a>", "<Control-A>"):
            root.bind_class("Entry", seq, lambda e: (e.widget.select_range(0, "end"), e.widget.icursor("end"), "break")[-1])
        root.bind_all("<KeyPress>", self._touched, add="+")
        root.bind_all("<ButtonPress>", self._touched, add="+")
        self._chrome()
        self.show_login()
        if options.show_dialog:
            self.dialog(options.show_dialog, "This dialog was requested at start.")
        root.after(200, self._tick)

    # -- frame of every screen -------------------------------------------------------------------

    def _chrome(self) -> None:
        header = tk.Frame(self.root, bg=HEADER_BG)
        self._place(header, L.HEADER, keep=True)
        self._icon(L.ICONS["logo"], L.LOGO, HEADER_BG, keep=True)
        title = tk.Label(self.root, text=L.APP_NAME, bg=HEADER_BG, fg="#ffffff", font=self.font_title, anchor="w")
        self._place(title, Region(64, 12, 300, 32), keep=True)
        self.screen_icon = tk.Canvas(self.root, width=L.SCREEN_ICON.width, height=L.SCREEN_ICON.height,
                                     bg=HEADER_BG, highlightthickness=0, bd=0)
        self._place(self.screen_icon, L.SCREEN_ICON, keep=True)
        footer = tk.Frame(self.root, bg=FOOTER_BG)
        self._place(footer, L.FOOTER, keep=True)
        for icon, region in zip(L.HEADER_MARKS, L.HEADER_ICONS, strict=True):
            self._icon(icon, region, HEADER_BG, keep=True)
        for icon, region in zip(L.FOOTER_MARKS, L.FOOTER_ICONS, strict=True):
            self._icon(icon, region, FOOTER_BG, keep=True)
        status = tk.Label(self.root, text="Online", bg=FOOTER_BG, fg="#37474f", font=self.font, anchor="w")
        self._place(status, L.FOOTER_TEXT, keep=True)

    def _screen(self, name: str) -> None:
        """Clear the body for a new screen and show its icon in the header."""
        self._close_dialog()
        for w in self._widgets:
            w.destroy()
        self._widgets = []
        self.screen = name
        self.screen_icon.delete("all")
        draw_icon(self.screen_icon, L.ICONS[name], L.SCREEN_ICON.width)

    def _place(self, widget: tk.Widget, r: Region, *, keep: bool = False) -> tk.Widget:
        widget.place(x=r.left, y=r.top, width=r.width, height=r.height)
        if not keep:
            self._widgets.append(widget)
        return widget

    def _icon(self, icon: L.Icon, r: Region, bg: str, *, keep: bool = False) -> None:
        canvas = tk.Canvas(self.root, width=r.width, height=r.height, bg=bg, highlightthickness=0, bd=0)
        draw_icon(canvas, icon, r.width)
        self._place(canvas, r, keep=keep)

    def _label(self, text: str, r: Region, *, bg: str = BG, font: tkfont.Font | None = None,
               fg: str = "#263238", anchor: Literal["w", "nw", "center"] = "w") -> tk.Label:
        label = tk.Label(self.root, text=text, bg=bg, fg=fg, font=font or self.font, anchor=anchor, justify="left")
        self._place(label, r)
        return label

    def _entry(self, r: Region, *, secret: bool = False) -> tk.Entry:
        entry = tk.Entry(self.root, font=self.font, relief="solid", bd=1, highlightthickness=0,
                         show="•" if secret else "", bg="#ffffff", fg="#000000")
        self._place(entry, r)
        return entry

    def _button(self, text: str, r: Region, command: Callable[[], None], *, secondary: bool = False) -> tk.Button:
        button = _button(self.root, text, command, self.font_bold, SECONDARY if secondary else BUTTON)
        self._place(button, r)
        return button

    # -- screens ---------------------------------------------------------------------------------

    def show_login(self, error: str = "") -> None:
        self._screen("login")
        self._panel("login", "Sign in")
        self._label("Username", Region(352, 260, 320, 22), bg=PANEL_BG)
        self.username = self._entry(L.USERNAME)
        self._label("Password", Region(352, 328, 320, 22), bg=PANEL_BG)
        self.password = self._entry(L.PASSWORD, secret=True)
        self._icon(L.ICONS["field_user"], L.USERNAME_ICON, PANEL_BG)
        self._icon(L.ICONS["field_lock"], L.PASSWORD_ICON, PANEL_BG)
        self._label(error, L.LOGIN_ERROR, bg=PANEL_BG, fg="#c62828")
        self._button("Sign in", L.SIGN_IN, self.sign_in)
        for entry in (self.username, self.password):
            entry.bind("<Return>", lambda e: self.sign_in())
        self.username.focus_set()

    def show_mfa(self, error: str = "") -> None:
        self._screen("mfa")
        self._panel("mfa", "Verification code")
        self._label("Code from your authenticator app", Region(352, 260, 320, 22), bg=PANEL_BG)
        self.code = self._entry(L.CODE)
        self._icon(L.ICONS["field_code"], L.CODE_ICON, PANEL_BG)
        self._label(error, L.MFA_ERROR, bg=PANEL_BG, fg="#c62828")
        self._button("Verify", L.VERIFY, self.verify)
        self.code.bind("<Return>", lambda e: self.verify())
        self.code.focus_set()

    def _panel(self, icon: str, title: str) -> None:
        self._place(tk.Frame(self.root, bg=PANEL_BG, highlightbackground="#b0bec5", highlightthickness=1), L.PANEL)
        self._icon(L.ICONS[icon], L.PANEL_ICON, PANEL_BG)
        self._label(title, L.PANEL_TITLE, bg=PANEL_BG, font=self.font_title, anchor="center")

    def show_home(self) -> None:
        self._screen("home")
        self._place(tk.Frame(self.root, bg=SIDEBAR_BG), L.SIDEBAR)
        self._button("New patient", L.NEW_PATIENT, self.open_form)
        self._button("Search", L.SEARCH_NAV, self.open_search)
        self._button("Sign out", L.SIGN_OUT, self.sign_out, secondary=True)
        for icon, r, text in zip(L.SIDEBAR_ICONS, L.SIDEBAR_ITEMS, L.SIDEBAR_LABELS, strict=True):
            self._icon(icon, r, SIDEBAR_BG)
            self._label(text, Region(r.left + 44, r.top + 4, 120, 24), bg=SIDEBAR_BG, fg="#546e7a")
        self._label(f"Signed in as {self.user}", L.USER_LABEL, font=self.font_bold)
        for card, icon, title in zip(L.CARDS, L.CARD_ICONS, L.CARD_TITLES, strict=True):
            self._place(tk.Frame(self.root, bg=PANEL_BG, highlightbackground="#cfd8dc", highlightthickness=1), card)
            self._icon(icon, L.card_icon(card), PANEL_BG)
            self._icon(L.ICONS["card_status"], L.card_status(card), PANEL_BG)
            self._label(title, Region(card.left + 16, card.top + 72, card.width - 32, 24), bg=PANEL_BG,
                        font=self.font_bold)
            self._label("No alerts", Region(card.left + 16, card.top + 100, card.width - 32, 22), bg=PANEL_BG,
                        fg="#78909c")

    def show_search(self) -> None:
        self._screen("search")
        self._icon(L.ICONS["search"], L.BODY_ICON, BG)
        self._label("MRN", Region(240, 88, 200, 24), font=self.font_bold)
        self.search_mrn = self._entry(L.SEARCH_MRN)
        self._button("Search", L.SEARCH_GO, self.search)
        self._button("Back", L.SEARCH_BACK, self.show_home, secondary=True)
        self.edit_button = self._button("Edit", L.SEARCH_EDIT, self.open_edit)
        self.edit_button.configure(state="disabled", disabledforeground="#cfd8dc")
        self.results = self._label("", L.RESULTS, bg=PANEL_BG, font=self.font_mono, anchor="nw")
        self._icon(L.ICONS["results_mark"], L.RESULTS_MARK, PANEL_BG)
        self.search_mrn.bind("<Return>", lambda e: self.search())
        self.search_mrn.focus_set()
        self._found = []

    def show_form(self) -> None:
        self._screen("patient_form")
        self._icon(L.ICONS["patient_form"], L.BODY_ICON, BG)
        self._label("New patient", Region(240, 64, 400, 34), font=self.font_title)
        self.form_mrn = self._form_field("MRN", L.FORM_MRN)
        self.form_name = self._form_field("Name", L.FORM_NAME)
        self.form_dob = self._form_field("Date of birth", L.FORM_DOB)
        self._label("YYYY-MM-DD", Region(776, 230, 140, 24), fg="#78909c")
        self._button("Save", L.FORM_SAVE, self.save)
        self._button("Cancel", L.FORM_CANCEL, self.show_home, secondary=True)
        self._form_hint()
        self.form_mrn.focus_set()

    def show_edit(self, patient: Patient) -> None:
        self._screen("edit_form")
        self._editing = patient
        self._icon(L.ICONS["edit_form"], L.BODY_ICON, BG)
        self._label(f"Record #{patient.record_id}  MRN {patient.mrn}", L.EDIT_RECORD, font=self.font_title)
        self.form_name = self._form_field("Name", L.FORM_NAME)
        self.form_dob = self._form_field("Date of birth", L.FORM_DOB)
        self.form_name.insert(0, patient.name)
        self.form_dob.insert(0, patient.dob)
        self._label("YYYY-MM-DD", Region(776, 230, 140, 24), fg="#78909c")
        self._button("Save", L.FORM_SAVE, self.update)
        self._button("Cancel", L.FORM_CANCEL, self.show_home, secondary=True)
        self._form_hint()
        self.form_name.focus_set()

    def _form_hint(self) -> None:
        self._icon(L.ICONS["form_hint"], L.FORM_HINT_ICON, BG)
        self._label("All fields are required.", L.FORM_HINT, fg="#546e7a")

    def _form_field(self, label: str, r: Region) -> tk.Entry:
        self._label(label, Region(240, r.top + 4, 150, 24), font=self.font_bold)
        return self._entry(r)

    # -- dialogs -----------------------------------------------------------------------------------

    def dialog(self, kind: str, message: str, on_ok: Callable[[], None] | None = None) -> None:
        """A modal dialog: input outside it is ignored until OK (or Enter/Escape) closes it."""
        self._close_dialog()
        title, colour = L.DIALOGS[kind]
        frame = tk.Frame(self.root, bg=PANEL_BG, highlightbackground="#37474f", highlightthickness=2)
        frame.place(x=L.DIALOG.left, y=L.DIALOG.top, width=L.DIALOG.width, height=L.DIALOG.height)
        strip = tk.Frame(frame, bg=colour)
        strip.place(x=0, y=0, width=L.DIALOG_STRIP.width - 4, height=L.DIALOG_STRIP.height - 2)
        tk.Label(strip, text=title, bg=colour, fg="#ffffff", font=self.font_bold, anchor="w").place(x=12, y=4)
        glyph = tk.Canvas(frame, width=L.DIALOG_GLYPH.width, height=L.DIALOG_GLYPH.height, bg=colour,
                          highlightthickness=0, bd=0)
        draw_icon(glyph, L.ICONS["dialog_glyph"], L.DIALOG_GLYPH.width)
        glyph.place(x=L.DIALOG_GLYPH.left - L.DIALOG.left - 2, y=L.DIALOG_GLYPH.top - L.DIALOG.top - 2)
        icon = tk.Canvas(frame, width=L.DIALOG_ICON.width, height=L.DIALOG_ICON.height, bg=PANEL_BG,
                         highlightthickness=0, bd=0)
        draw_icon(icon, L.ICONS[kind], L.DIALOG_ICON.width)
        icon.place(x=L.DIALOG_ICON.left - L.DIALOG.left - 2, y=L.DIALOG_ICON.top - L.DIALOG.top - 2)
        tk.Label(frame, text=message, bg=PANEL_BG, fg="#263238", font=self.font, justify="left", anchor="nw",
                 wraplength=L.DIALOG_MESSAGE.width - 8).place(
            x=L.DIALOG_MESSAGE.left - L.DIALOG.left - 2, y=L.DIALOG_MESSAGE.top - L.DIALOG.top - 2,
            width=L.DIALOG_MESSAGE.width, height=L.DIALOG_MESSAGE.height)

        def ok() -> None:
            self._close_dialog()
            if on_ok is not None:
                on_ok()

        button = _button(frame, "OK", ok, self.font_bold, BUTTON)
        button.place(x=L.DIALOG_OK.left - L.DIALOG.left - 2, y=L.DIALOG_OK.top - L.DIALOG.top - 2,
                     width=L.DIALOG_OK.width, height=L.DIALOG_OK.height)
        for seq in ("<Return>", "<Escape>", "<space>"):
            button.bind(seq, lambda e: ok())
        frame.lift()
        self._dialog = frame
        self.dialog_kind = kind
        button.focus_set()
        frame.grab_set()

    def _close_dialog(self) -> None:
        if self._dialog is not None:
            self._dialog.grab_release()
            self._dialog.destroy()
            self._dialog = None

    # -- behaviour -------------------------------------------------------------------------------------

    def _step(self, step: str) -> bool:
        """Let the configured faults strike at ``step``; False if an error dialog took its place."""
        records, name, opt = self.records, self.opt.name, self.opt
        # One draw per kind at every step, whatever the rates and the scripted faults.
        roll = {kind: rng.random() for kind, rng in self.rolls.items()}

        def strikes(kind: str, scripted: dict[str, int], rate: float) -> bool:
            if step in scripted and records.claim_fault(kind, step, scripted[step], machine=name):
                return True
            if roll[kind] < rate:
                records.log_fault(kind, step, machine=name, origin="seeded")
                return True
            return False

        if strikes("crash", opt.crash_at, opt.crash_rate):
            log.warning("crashing at %s, as configured", step)
            os._exit(CRASH_STATUS)
        if strikes("freeze", opt.freeze_at, opt.freeze_rate):
            log.warning("freezing at %s, as configured", step)
            self.root.update_idletasks()
            while True:  # the mainloop never runs again: no repaint, no input, until killed
                time.sleep(3600)
        if strikes("error_dialog", opt.error_at, opt.error_rate):
            self.dialog("error_dialog", "An unexpected error occurred. Click OK to continue.")
            return False
        if self.user is not None and step in opt.expire_at and records.claim_fault(
                "session_expired", step, opt.expire_at[step], machine=name):
            log.warning("ending the session at %s, as configured", step)
            self._expire()
            return False
        return True

    def _touched(self, event: tk.Event) -> None:
        self._last_input = time.monotonic()

    def _tick(self) -> None:
        timeout = self.opt.session_timeout
        if self.user is not None and timeout is not None and time.monotonic() - self._last_input > timeout:
            self.records.log_fault("session_expired", "idle", machine=self.opt.name, origin="timeout")
            self._expire()
        self.root.after(200, self._tick)

    def _expire(self) -> None:
        self.user = None
        self.show_login()
        self.dialog("session_expired", "Your session has expired. Please sign in again.")

    def sign_in(self) -> None:
        if not self._step("sign_in"):
            return
        username, password = self.username.get().strip(), self.password.get()
        account = self.accounts.get(username)
        if account is None or account.password != password:
            self.show_login("Invalid username or password.")
            self.username.insert(0, username)
            return
        if self.opt.mfa or username in MFA_ALWAYS:
            self._pending_user = username
            self.show_mfa()
        else:
            self._begin(username)

    def verify(self) -> None:
        if not self._step("verify"):
            return
        user = self._pending_user
        seed = self.accounts[user].totp_seed if user else None
        if user is None or seed is None or not pyotp.TOTP(seed).verify(self.code.get().strip(), valid_window=1):
            self.show_mfa("Invalid code. Try again.")
            return
        self._begin(user)

    def _begin(self, username: str) -> None:
        self._pending_user = None
        self.user = username
        self._last_input = time.monotonic()
        self.show_home()

    def sign_out(self) -> None:
        self.user = None
        self.show_login()

    def open_form(self) -> None:
        if self._step("open_form"):
            self.show_form()

    def open_search(self) -> None:
        self.show_search()

    def save(self) -> None:
        if not self._step("save"):
            return
        mrn, name, dob = self.form_mrn.get().strip(), self.form_name.get().strip(), self.form_dob.get().strip()
        if not (mrn and name and _valid_date(dob)):
            self.dialog("validation", "Fill in MRN, name and date of birth (YYYY-MM-DD).")
            return
        record_id = self.records.insert(mrn, name, dob, machine=self.opt.name)
        self._grow()
        if not self._step("saved"):
            return
        self.dialog("saved", f"Patient {mrn} saved as record #{record_id}.", on_ok=self.show_home)

    def search(self) -> None:
        if not self._step("search"):
            return
        mrn = self.search_mrn.get().strip()
        if not mrn:
            self.results.configure(text="Enter an MRN to search.")
            return
        self._found = self.records.find(mrn)
        self.results.configure(text=format_results(mrn, self._found))
        self.edit_button.configure(state="normal" if len(self._found) == 1 else "disabled")

    def open_edit(self) -> None:
        if len(self._found) == 1 and self._step("open_edit"):
            self.show_edit(self._found[0])

    def update(self) -> None:
        patient = self._editing
        if patient is None or not self._step("update"):
            return
        name, dob = self.form_name.get().strip(), self.form_dob.get().strip()
        if not (name and _valid_date(dob)):
            self.dialog("validation", "Fill in name and date of birth (YYYY-MM-DD).")
            return
        self.records.update(patient.record_id, name=name, dob=dob)
        self._grow()
        if not self._step("updated"):
            return
        self.dialog("updated", f"Record #{patient.record_id} updated.", on_ok=self.show_home)

    def _grow(self) -> None:
        if self.opt.leak_mb > 0:
            self._leak.append(b"\x01" * int(self.opt.leak_mb * 2**20))  # touched pages: resident


def _button(master: tk.Misc, text: str, command: Callable[[], None], font: tkfont.Font,
            colours: tuple[str, str]) -> tk.Button:
    """A flat button that lights up under the pointer (what the responsiveness probe watches)."""
    return tk.Button(master, text=text, command=command, font=font, relief="flat", bd=0, highlightthickness=0,
                     bg=colours[0], activebackground=colours[1], fg="#ffffff", activeforeground="#ffffff")


def format_results(mrn: str, patients: list[Patient]) -> str:
    """The search screen's result text; automations read it back by OCR."""
    if not patients:
        return f"No patient with MRN {mrn}"
    noun = "record" if len(patients) == 1 else "records"
    lines = [f"{len(patients)} {noun} for MRN {mrn}"]
    lines += [f"#{p.record_id}  {p.name}  {p.dob}" for p in patients[: L.RESULT_LINES - 1]]
    return "\n".join(lines)


def _valid_date(text: str) -> bool:
    try:
        datetime.date.fromisoformat(text)
    except ValueError:
        return False
    return len(text) == 10


def run(options: Options) -> None:
    """Start DemoEHR on ``$DISPLAY`` and run until the window is closed or the process killed."""
    root = tk.Tk(className=L.APP_NAME)
    DemoApp(root, options)
    root.mainloop()
