"""App models: what a target application looks like and how to move it between states.

An app model names the application's screen states (recognised by ``vision``), says which
of them are *ready* (an automation may start there), and maps every other state to the
playbook that moves the application toward ready: log in, answer MFA, dismiss a dialog,
restart the app. The agent's pre-flight drives this loop before every attempt (invariant 5:
no work without a fresh screenshot proving the state).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .desktop import Desktop, Frame
from .vision import UNKNOWN, Classification, Classifier

#: seconds: a TOTP code about to roll over is not worth typing — wait for the next one
TOTP_MARGIN = 3.0

#: where an account's TOTP codes come from: () → (code, seconds it stays valid)
CodeSource = Callable[[], Awaitable[tuple[str, float]]]


@dataclass(frozen=True, slots=True)
class Credential:
    """An application's own record of an account (what a simulated app checks a login
    against). Agents get :class:`Account` instead. ``repr`` never shows the secrets."""

    username: str
    password: str = field(repr=False)
    totp_seed: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Account:
    """The account a playbook logs in as. ``repr`` never shows the password.

    An agent builds it from the grant that came with its assignment (or verification) and
    drops it when that ends; :meth:`totp` then asks the orchestrator for a code — the seed
    never leaves it. :meth:`local` makes one held by this process, for embedders and tests.
    """

    name: str  # the vault's name for it (what runs use as session_key)
    username: str
    password: str = field(repr=False)
    app: str | None = None
    has_totp: bool = False
    codes: CodeSource | None = field(default=None, repr=False, compare=False)

    async def totp(self) -> str:
        """A current TOTP code, with at least :data:`TOTP_MARGIN` seconds left to type it."""
        if not self.has_totp or self.codes is None:
            raise LookupError(f"account {self.name!r} has no TOTP seed; MFA needs a person")
        code, valid_for = await self.codes()
        if valid_for < TOTP_MARGIN:
            await asyncio.sleep(valid_for + 0.05)  # the next code, rather than one about to expire
            code, valid_for = await self.codes()
        return code

    @classmethod
    def local(cls, name: str, username: str, password: str, *, totp_seed: str | None = None,
              app: str | None = None) -> Account:
        """An account held by this process, its TOTP codes computed here (pyotp)."""
        codes: CodeSource | None = None
        if totp_seed is not None:
            import pyotp

            otp = pyotp.TOTP(totp_seed)

            async def local_codes() -> tuple[str, float]:
                now = time.time()
                return otp.at(now), otp.interval - now % otp.interval

            codes = local_codes
        return cls(name, username, password, app=app, has_totp=totp_seed is not None, codes=codes)

    @classmethod
    def from_credential(cls, name: str, cred: Credential, *, app: str | None = None) -> Account:
        return cls.local(name, cred.username, cred.password, totp_seed=cred.totp_seed, app=app)


def local_accounts(credentials: dict[str, Credential], *, app: str | None = None) -> dict[str, Account]:
    """Accounts held by this process, from an application's own records (tests, embedders)."""
    return {name: Account.from_credential(name, cred, app=app) for name, cred in credentials.items()}


@dataclass(slots=True)
class PlaybookContext:
    desktop: Desktop
    model: AppModel
    granted: Account | None  # the account this pre-flight logs in as, if the run was given one
    session_key: str | None  # the account the run wants the app logged in as
    state: Classification  # what the screen showed when this playbook was chosen

    @property
    def account(self) -> Account:
        """The account to log in as; LookupError (saying why) if this pre-flight has none."""
        if self.granted is None:
            raise LookupError(
                "no account to log in with: the run was given none (its automation does not declare "
                "needs_account and its session_key names no account in the vault)"
            )
        return self.granted

    def credential(self) -> Account:
        """Deprecated alias of :attr:`account`, kept for one release."""
        return self.account


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
