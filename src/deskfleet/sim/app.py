"""SimEHR, the simulated application: its state machine and behaviour — no drawing.

:class:`SimApp` is what stands behind the pixels: login against the backend's accounts,
TOTP verification, a patient form whose Save inserts into the shared backend, a search
screen, modal dialogs and session expiry. What it shows is a
:class:`~deskfleet.sim.layout.View`, which the renderer turns into pixels. Input follows
Xvfb without a window manager: focus goes where you click, and a modal dialog swallows
clicks outside it.
"""

from __future__ import annotations

import datetime
import random
import sqlite3
import time
from collections.abc import Callable

import pyotp

from .backend import SimBackend
from .faults import FaultPlan
from .layout import (
    DESKTOP_VIEW,
    RESULT_LINES,
    Layout,
    View,
    Widget,
    contains,
)

DEFAULT_BUTTONS = {"login": "sign_in", "mfa": "verify", "patient_form": "save", "search": "search"}
BASE_MEMORY_MB = 180.0
MAX_FIELD_LENGTH = 64
_MODIFIERS = frozenset({"ctrl", "control", "shift", "alt", "cmd", "super", "win", "meta"})


def format_results(mrn: str, patients: list[tuple[int, str, str]]) -> str:
    """The search screen's result lines; automations parse them back with read_text."""
    if not patients:
        return f"No patient with MRN {mrn}"
    noun = "record" if len(patients) == 1 else "records"
    lines = [f"{len(patients)} {noun} for MRN {mrn}"]
    lines += [f"#{rid}  {name}  {dob}" for rid, name, dob in patients[:RESULT_LINES]]
    if len(patients) > RESULT_LINES:
        lines.append(f"… and {len(patients) - RESULT_LINES} more")
    return "\n".join(lines)


class SimApp:
    """SimEHR's state machine. Input methods do nothing while the app is frozen or stopped.

    ``clock`` drives session expiry; TOTP codes are checked against wall time, because
    the authenticator that produces them (pyotp in the playbooks) reads wall time too.
    """

    def __init__(
        self,
        backend: SimBackend,
        layout: Layout,
        *,
        machine: str = "",
        faults: FaultPlan | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        on_fault: Callable[[str], None] | None = None,
    ) -> None:
        self.backend = backend
        self.layout = layout
        self.machine = machine
        self.faults = faults or FaultPlan()
        self.rng = rng or random.Random(0)
        self.clock = clock
        self._on_fault = on_fault or (lambda kind: None)
        self.mouse = (layout.width // 2, layout.height - 8)
        self.running = False
        self.frozen_view: View | None = None
        self.saved_since_start = 0
        self.session_user: str | None = None
        self.session_expires_at: float | None = None
        self.screen = "login"
        self.values: dict[str, str] = {}
        self.texts: dict[str, str] = {}
        self.focus: str | None = None
        self.selected = False
        self.dialogs: list[tuple[str, str]] = []
        self._pending_user: str | None = None
        self._searched_mrn: str | None = None
        self.start()

    # -- process ----------------------------------------------------------------------

    def start(self) -> None:
        """Start (or restart) the process: a fresh login screen, no session, base memory."""
        self.running = True
        self.frozen_view = None
        self.saved_since_start = 0
        self._end_session()
        self.dialogs = []
        self._goto("login")

    def crash(self) -> None:
        self.running = False
        self.frozen_view = None
        self._end_session()

    def freeze(self) -> None:
        if self.running and self.frozen_view is None:
            self.frozen_view = self.view()

    @property
    def frozen(self) -> bool:
        return self.frozen_view is not None

    @property
    def responsive(self) -> bool:
        return self.running and self.frozen_view is None

    @property
    def memory_mb(self) -> float:
        if not self.running:
            return 0.0
        return BASE_MEMORY_MB + self.faults.leak_mb_per_txn * self.saved_since_start

    # -- what is visible --------------------------------------------------------------

    def view(self) -> View:
        if self.frozen_view is not None:
            return self.frozen_view
        if not self.running:
            return DESKTOP_VIEW
        secret = {w.name for w in self.layout.fields(self.screen) if w.secret}
        values = tuple(
            (k, "•" * len(v) if k in secret else v) for k, v in sorted(self.values.items()) if v
        )
        texts = dict(self.texts)
        if self.screen == "home" and self.session_user:
            texts["user"] = f"Signed in as {self.session_user}"
        return View(
            self.screen,
            values,
            tuple(sorted((k, v) for k, v in texts.items() if v)),
            self.focus,
            self.selected and bool(self.values.get(self.focus or "")),
            self._hovered(),
            tuple(self.dialogs),
        )

    def _hovered(self) -> str | None:
        x, y = self.mouse
        if self.dialogs:
            return "ok" if contains(self.layout.dialog_ok.rect, x, y) else None
        for w in self.layout.buttons(self.screen):
            if contains(w.rect, x, y):
                return w.name
        return None

    def tick(self) -> None:
        """Let the app's timers run: a session past its expiry ends, showing login."""
        if not self.responsive or self.session_expires_at is None:
            return
        if self.clock() >= self.session_expires_at:
            self._end_session()
            self._goto("login")
            self.dialogs = [("session_expired", "Your session has expired. Please sign in again.")]
            self._on_fault("session_expired")

    def touched(self) -> None:
        """User input reached the app: with an idle timeout, the session lasts longer."""
        ttl = self.faults.session_ttl
        if self.faults.session_idle and ttl is not None and self.responsive and self.session_expires_at is not None:
            self.session_expires_at = max(self.session_expires_at, self.clock() + ttl)

    def show_error(self) -> None:
        if self.responsive:
            self.dialogs.append(("error_dialog", "An unexpected error occurred. Click OK to continue."))

    def expire_session(self) -> None:
        if self.session_user is not None:
            self.session_expires_at = self.clock()

    # -- input ------------------------------------------------------------------------

    def move(self, x: int, y: int) -> None:
        # The cursor always moves; a frozen app just does not repaint its hover highlight.
        self.mouse = (x, y)

    def click(self, x: int, y: int, *, button: str = "left", count: int = 1) -> None:
        self.mouse = (x, y)
        if not self.running:
            icon = self.layout.icons[0]
            if button == "left" and count >= 2 and contains(icon.rect, x, y):
                self.start()
            return
        if not self.responsive or button != "left":
            return
        for i in range(count):
            target = self._hit(x, y)
            if target is None:
                continue
            if target.kind == "field":
                if self.focus != target.name:
                    self.focus, self.selected = target.name, False
                elif i > 0:  # a double-click in a field selects its text
                    self.selected = True
            elif target.kind == "button":
                self._activate(target.name)

    def drag(self, x1: int, y1: int, x2: int, y2: int) -> None:
        """Press at (x1, y1), release at (x2, y2): a button fires only if both are on it."""
        self.mouse = (x2, y2)
        if not self.responsive:
            return
        pressed, released = self._hit(x1, y1), self._hit(x2, y2)
        if pressed is not None and pressed.kind == "field":
            self.focus, self.selected = pressed.name, pressed == released
        elif pressed is not None and pressed == released and pressed.kind == "button":
            self._activate(pressed.name)

    def type_text(self, text: str) -> None:
        if not self.responsive:
            return
        chunk = ""
        for ch in text:
            if ch in "\n\t":
                self._insert(chunk)
                chunk = ""
                self.press("enter" if ch == "\n" else "tab")
            else:
                chunk += ch
        self._insert(chunk)

    def press(self, *keys: str) -> None:
        if not self.responsive:
            return
        names = [k.lower() for k in keys]
        mods = {k for k in names if k in _MODIFIERS}
        key = next((k for k in reversed(names) if k not in _MODIFIERS), "")
        if self.dialogs:
            if key in ("enter", "return", "escape", "esc", "space") and not mods:
                self._activate("ok")
            return
        if mods & {"ctrl", "control", "cmd"}:
            if key == "a" and self.focus:
                self.selected = True
            return
        if key == "tab":
            self._tab(-1 if "shift" in mods else 1)
        elif key in ("enter", "return"):
            if self.screen in DEFAULT_BUTTONS:
                self._activate(DEFAULT_BUTTONS[self.screen])
        elif key in ("backspace", "delete") and self.focus:
            value = self.values.get(self.focus, "")
            if self.selected:
                value = ""
            elif key == "backspace":
                value = value[:-1]
            self.values[self.focus], self.selected = value, False
        elif key == "space" and not mods:
            self._insert(" ")
        elif len(key) == 1 and not mods - {"shift"}:
            self._insert(key.upper() if "shift" in mods else key)

    # -- behaviour --------------------------------------------------------------------

    def _hit(self, x: int, y: int) -> Widget | None:
        if self.dialogs:  # modal: only the top dialog's button can be hit
            ok = self.layout.dialog_ok
            return ok if contains(ok.rect, x, y) else None
        for w in self.layout.screens[self.screen]:
            if w.kind in ("field", "button") and contains(w.rect, x, y):
                return w
        return None

    def _insert(self, text: str) -> None:
        if not text or self.dialogs or self.focus is None:
            return
        current = "" if self.selected else self.values.get(self.focus, "")
        self.values[self.focus] = (current + text)[:MAX_FIELD_LENGTH]
        self.selected = False

    def _tab(self, step: int) -> None:
        names = [w.name for w in self.layout.fields(self.screen)]
        if not names:
            return
        i = names.index(self.focus) if self.focus in names else -step
        self.focus = names[(i + step) % len(names)]
        self.selected = True  # like a Windows edit control, tabbing in selects the text

    def _goto(self, screen: str) -> None:
        self.screen = screen
        self.values = {}
        self.texts = {}
        fields = self.layout.fields(screen)
        self.focus = fields[0].name if fields else None
        self.selected = False
        self._searched_mrn = None

    def _activate(self, name: str) -> None:
        if name == "ok":
            kind, _ = self.dialogs.pop()
            if kind == "saved":
                self._goto("home")
            return
        actions: dict[tuple[str, str], Callable[[], None]] = {
            ("login", "sign_in"): self._sign_in,
            ("mfa", "verify"): self._verify,
            ("home", "new_patient"): lambda: self._goto("patient_form"),
            ("home", "search"): lambda: self._goto("search"),
            ("home", "sign_out"): self._sign_out,
            ("patient_form", "save"): self._save,
            ("patient_form", "cancel"): lambda: self._goto("home"),
            ("search", "search"): self._search,
            ("search", "export"): self._export,
            ("search", "back"): lambda: self._goto("home"),
        }
        action = actions.get((self.screen, name))
        if action is None:
            return
        try:
            action()
        except sqlite3.Error:
            # The server failed: a real client shows a generic error, and so do we.
            self.show_error()

    def _sign_in(self) -> None:
        username = self.values.get("username", "").strip()
        password = self.values.get("password", "")
        if not username or not password:
            self._login_error("Enter your username and password.")
            return
        account = self.backend.authenticate(username, password)
        if account is None:
            self._login_error("Invalid username or password.")
            return
        # Always draw, so that the fault stream does not depend on which account logs in.
        roll = self.rng.random()
        prompted = roll < self.faults.mfa_rate
        if account.mfa_always or prompted:
            if prompted and not account.mfa_always:
                self._on_fault("mfa")
            self._pending_user = username
            self._goto("mfa")
        else:
            self._begin_session(username)

    def _login_error(self, message: str) -> None:
        self.values.pop("password", None)
        self.texts["error"] = message
        self.focus, self.selected = "password", False

    def _verify(self) -> None:
        user = self._pending_user
        account = self.backend.account(user or "")
        code = self.values.get("code", "").strip()
        seed = account.credential.totp_seed if account else None
        if user is None or seed is None or not pyotp.TOTP(seed).verify(code, valid_window=1):
            self.values.pop("code", None)
            self.texts["error"] = "Invalid code. Try again."
            return
        self._begin_session(user)

    def _begin_session(self, username: str) -> None:
        self._pending_user = None
        self.session_user = username
        ttl = self.faults.session_ttl
        self.session_expires_at = None if ttl is None else self.clock() + ttl
        self._goto("home")

    def _end_session(self) -> None:
        self.session_user = None
        self.session_expires_at = None
        self._pending_user = None

    def _sign_out(self) -> None:
        self._end_session()
        self._goto("login")

    def _save(self) -> None:
        mrn = self.values.get("mrn", "").strip()
        name = self.values.get("name", "").strip()
        dob = self.values.get("dob", "").strip()
        if not (mrn and name and _valid_date(dob)):
            self.dialogs.append(("validation", "Fill in MRN, name and date of birth (YYYY-MM-DD)."))
            return
        record_id = self.backend.insert(
            mrn, name, dob, machine=self.machine, created_at=self.clock()
        )
        self.saved_since_start += 1
        self.dialogs.append(("saved", f"Patient saved — record #{record_id}"))

    def _search(self) -> None:
        mrn = self.values.get("mrn", "").strip()
        if not mrn:
            self.texts["results"] = "Enter an MRN to search."
            self._searched_mrn = None
            return
        found = [(p.record_id, p.name, p.dob) for p in self.backend.find_by_mrn(mrn)]
        self.texts["results"] = format_results(mrn, found)
        self._searched_mrn = mrn if found else None

    def _export(self) -> None:
        mrn = self._searched_mrn
        if mrn is None:
            self.texts["results"] = "Search for a patient before exporting."
            return
        export_id = self.backend.record_export(mrn, machine=self.machine, created_at=self.clock())
        self.dialogs.append(("exported", f"Summary for MRN {mrn} sent — export #{export_id}"))


def _valid_date(text: str) -> bool:
    try:
        datetime.date.fromisoformat(text)
    except ValueError:
        return False
    return len(text) == 10
