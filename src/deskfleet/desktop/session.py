"""Which account a real desktop's application is logged in as — known without looking.

The agent heartbeats every couple of seconds with the account the application is logged
in as (``DesktopInfo.session_key``), and the scheduler sends a run with a ``session_key``
to the machine that holds that session. Reading the account off the screen costs an OCR
read, too much for every beat, so a real desktop keeps a :class:`SessionNote` instead:

- the playbooks that log in write it once the app shows its ready screen, and the model's
  session reader corrects it whenever pre-flight reads the account anyway
  (:func:`deskfleet.desktop.note_session`);
- a playbook that meets the login screen (or a "session expired" dialog) clears it;
- the desktop clears it when it starts, stops or restarts the app, reboots, or finds the
  app's process gone;
- with the app's idle timeout known, it lapses that long after the last click or key
  press, as the app's own session does. Mouse moves do not count: the note may lapse a
  little early, never late, so a machine never advertises a session it lost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(slots=True)
class SessionNote:
    idle_timeout: float | None = None  # seconds without input after which the app logs out
    account: str | None = None
    since: float = 0.0  # wall-clock time of the login
    last_input: float = 0.0  # wall-clock time of the last click or key press

    def signed_in(self, account: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if account != self.account:
            self.since = now
        self.account = account
        self.last_input = max(self.last_input, now)  # logging in resets the app's idle clock

    def signed_out(self) -> None:
        self.account = None

    def touched(self, now: float | None = None) -> None:
        self.last_input = time.time() if now is None else now

    def current(self, now: float | None = None) -> tuple[str | None, float | None]:
        """(account, when the session lapses if idle) — (None, None) when logged out."""
        if self.account is None:
            return None, None
        if self.idle_timeout is None:
            return self.account, None
        expires = self.last_input + self.idle_timeout
        if (time.time() if now is None else now) >= expires:
            self.account = None
            return None, None
        return self.account, expires
