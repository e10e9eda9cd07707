"""App models: what a target application looks like and how to move it between states.

An app model names the application's screen states (recognised by ``vision``), says which
of them are *ready* (an automation may start there), and maps every other state to the
playbook that moves the application toward ready: log in, answer MFA, dismiss a dialog,
restart the app. The agent's pre-flight drives this loop before every attempt (invariant 5:
no work without a fresh screenshot proving the state).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .desktop import Desktop, Frame
from .vision import UNKNOWN, Classification, Classifier


@dataclass(frozen=True, slots=True)
class Credential:
    """An account's secrets. ``repr`` never shows them."""

    username: str
    password: str = field(repr=False)
    totp_seed: str | None = field(default=None, repr=False)


@dataclass(slots=True)
class PlaybookContext:
    desktop: Desktop
    model: AppModel
    credentials: Mapping[str, Credential]
    session_key: str | None  # the account the run wants the app logged in as
    state: Classification  # what the screen showed when this playbook was chosen

    def credential(self) -> Credential:
        """The credential for the wanted account, or the model's default account."""
        key = self.session_key or self.model.default_account
        if key is None or key not in self.credentials:
            raise LookupError(f"no stored credential for account {key!r}")
        return self.credentials[key]


Playbook = Callable[[PlaybookContext], Awaitable[None]]
Probe = Callable[[Desktop], Awaitable[bool]]
SessionReader = Callable[[Desktop, Frame], Awaitable[str | None]]


@dataclass(slots=True)
class AppModel:
    name: str
    classifier: Classifier
    ready_states: frozenset[str]
    playbooks: dict[str, Playbook]
    #: state name → playbook name that moves the app away from it toward a ready state
    recoveries: dict[str, str]
    #: playbook for screens no state matches (typically "restart_app")
    on_unknown: str = "restart_app"
    #: playbook for an app that shows a ready screen but fails the responsiveness probe
    on_unresponsive: str = "restart_app"
    #: playbook that ends the current session (for switching accounts)
    logout: str | None = None
    default_account: str | None = None
    #: responsiveness probe: a frozen app shows a perfect "ready" frame, pixels cannot tell
    probe: Probe | None = None
    #: which account the app is logged in as, read from the screen
    session_reader: SessionReader | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def classify(self, frame: Frame) -> Classification:
        return self.classifier.classify(frame)

    def recovery_for(self, state: str) -> str:
        if state == UNKNOWN:
            return self.on_unknown
        return self.recoveries.get(state, self.on_unknown)
