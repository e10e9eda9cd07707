"""App models: what a target application looks like and how to move it between states.

An app model names the application's screen states (recognised by ``vision``), says which
of them are *ready* (an automation may start there), and maps every other state to the
playbook that moves the application toward ready: log in, answer MFA, dismiss a dialog,
restart the app. The agent's pre-flight drives this loop before every attempt (invariant 5:
no work without a fresh screenshot proving the state), and an automation can drive it
mid-run (``ctx.ensure``).

A pack builds its model from its manifest (``pack.toml``), its recorded model directory
and the playbooks its module declares (:mod:`deskfleet.packs`); playbooks get a
:class:`PlaybookContext` with the helpers every playbook needs — wait for the screen to
move on, wait for a state, fill a field — so that none of them times anything by hand.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .desktop import Desktop, Frame, Region, SeesWindows, WindowFacts
from .desktop.fill import fill as fill_field
from .errors import DesktopError
from .vision import UNKNOWN, Classification, Classifier
from .vision.redact import Redacted, Redaction

#: seconds a playbook waits by default for the application to show its next screen
SCREEN_WAIT = 8.0
#: seconds between two looks while waiting for a screen
POLL = 0.05
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


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What a responsiveness probe found: ``ok``, or why not (the event says it)."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


Playbook = Callable[["PlaybookContext"], Awaitable[None]]
#: a probe returns a ProbeResult (or a plain bool, for an unexplained answer)
Probe = Callable[[Desktop], Awaitable["ProbeResult | bool"]]
SessionReader = Callable[[Desktop, Frame], Awaitable[str | None]]


@dataclass(slots=True)
class AppModel:
    name: str
    classifier: Classifier
    ready_states: frozenset[str]
    playbooks: dict[str, Playbook]
    #: state name → playbook name that moves the app away from it toward a ready state
    recoveries: dict[str, str]
    #: playbook for screens no state matches
    on_unknown: str = "wait"
    #: playbook for an app that shows a ready screen but fails the responsiveness probe
    on_unresponsive: str = "restart_app"
    #: playbook that ends the current session (for switching accounts)
    logout: str | None = None
    default_account: str | None = None
    #: responsiveness probe: a frozen app shows a perfect "ready" frame, pixels cannot tell
    probe: Probe | None = None
    #: which account the app is logged in as, read from the screen
    session_reader: SessionReader | None = None
    #: screens that mean nobody is logged in: seeing one clears the machine's session note
    signed_out: frozenset[str] = frozenset()
    #: a state must hold this long (and for ``settle_frames`` looks) before pre-flight acts on it
    settle: float = 0.0
    settle_frames: int = 1
    meta: dict[str, Any] = field(default_factory=dict)

    def classify(self, frame: Frame, windows: WindowFacts | None = None) -> Classification:
        return self.classifier.classify(frame, windows)

    async def look(self, desktop: Desktop) -> tuple[Frame, Classification]:
        """Capture ``desktop``'s screen and classify it — with what the window system says
        about the app when the desktop can ask (a real one): a window over the app that the
        recognised state does not account for makes it ``covered``."""
        windows = await desktop.app_windows() if isinstance(desktop, SeesWindows) else None
        frame = await desktop.screenshot()
        return frame, self.classify(frame, windows)

    @property
    def redaction(self) -> Redaction:
        """What the model says to black out in uploaded screenshots (``model.json``'s
        ``redact``, per state and for every screen)."""
        found = getattr(self.classifier, "redaction", None)
        return found if isinstance(found, Redaction) else Redaction()

    def redact(self, frame: Frame) -> Redacted | None:
        """``frame`` (a copy) with the model's regions blacked out, and what was done; None
        when the model declares none. Fail-safe: a frame on which per-state regions cannot be
        placed is blanked whole (see :mod:`deskfleet.vision.redact`)."""
        redaction = self.redaction
        if not redaction.declared:
            return None
        return redaction.apply(frame, self.classifier.states, self.classifier.screen)

    def recovery_for(self, state: str) -> str:
        if state == UNKNOWN:
            return self.on_unknown
        return self.recoveries.get(state, self.on_unknown)

    def is_ready(self, state: str, wanted: str = "ready") -> bool:
        return state == wanted or (wanted == "ready" and state in self.ready_states)


@dataclass(frozen=True, slots=True)
class HumanAnswer:
    """What a person answered to :meth:`deskfleet.Context.ask_human` (or a playbook's
    :meth:`PlaybookContext.ask_human`)."""

    #: their answer (an SMS code, a captcha's text), None if the task asked for none (an
    #: approval); a secret one is never logged, put on the timeline or shown by the API
    response: str | None = field(repr=False)
    by: str  # who answered (as they named themselves to the API or CLI)
    at: float  # when (seconds since the epoch)
    task: str = ""  # the human task's id


#: the kinds of human task the docs and the CLI know; any name of letters, digits, ``_``,
#: ``.`` and ``-`` will do
HUMAN_KINDS = ("push_approval", "sms_code", "captcha", "confirm")


#: asks a person (``ctx.ask_human``): (kind, prompt, due=, escalate_after=, screenshot=, secret=) → the answer
AskHuman = Callable[..., Awaitable[HumanAnswer]]


@dataclass(slots=True)
class PlaybookContext:
    """What a playbook gets: the desktop, the model, the account it logs in as
    (:attr:`account`), waiting helpers, and :meth:`fill` (type into a field and confirm the
    text arrived)."""

    desktop: Desktop
    model: AppModel
    granted: Account | None  # the account this pre-flight logs in as, if the run was given one
    session_key: str | None  # the account the run wants the app logged in as
    state: Classification  # what the screen showed when this playbook was chosen
    #: how this pre-flight asks a person (an attempt's; None in a verification or a trial)
    human: AskHuman | None = None

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

    async def ask_human(self, kind: str, prompt: str, *, due: float = 300.0, escalate_after: float | None = None,
                        screenshot: bool = True, secret: bool = False) -> HumanAnswer:
        """Ask a person, as :meth:`deskfleet.Context.ask_human` does — for an MFA prompt no
        TOTP seed can answer (a push approval, an SMS code)::

            @playbook(wait=False)
            async def push_mfa(ctx: PlaybookContext) -> None:
                await ctx.ask_human("push_approval", f"Approve the sign-in of {ctx.account.username}")
                await ctx.wait_for("home", timeout=30)

        Only a run's pre-flight can ask (its attempt holds the machine meanwhile); a
        verification or a trial has nobody to ask: LookupError, which ends pre-flight with
        the reason."""
        if self.human is None:
            raise LookupError(f"{kind}: this pre-flight has no person to ask (a verification, or a trial run); "
                              "an MFA prompt that needs a person is answered in a run's pre-flight")
        return await self.human(kind, prompt, due=due, escalate_after=escalate_after, screenshot=screenshot,
                                secret=secret)

    async def look(self) -> Classification:
        """Capture the screen now and classify it."""
        return (await self.model.look(self.desktop))[1]

    async def wait_for(self, *states: str, timeout: float = SCREEN_WAIT) -> str:
        """Wait until the screen shows one of ``states``; return which. StateTimeout otherwise."""
        from .errors import StateTimeout

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            seen = (await self.look()).state
            if seen in states:
                return seen
            if loop.time() >= deadline:
                raise StateTimeout("|".join(states), seen, timeout)
            await asyncio.sleep(POLL)

    async def moved_on(self, before: Frame, *, timeout: float | None = None) -> str:
        """Wait until the screen shows a known state other than the one this playbook
        started from, and return it.

        If nothing on the screen changed at all since ``before`` (a screenshot taken
        before the playbook's input) in any look, the application is hung: it is restarted
        and ``"restarted"`` returned. If the screen changed but stayed in (or came back to)
        the same state — a refused login redraws the login screen — the application did not
        take the input: DesktopError says so.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (SCREEN_WAIT if timeout is None else timeout)
        start = self.state.state
        state = start
        changed = False  # anything drawn since `before`, even if it looks the same again now
        while True:
            frame, seen = await self.model.look(self.desktop)
            changed = changed or not np.array_equal(frame, before)
            state = seen.state
            if state not in (start, UNKNOWN):
                return state
            if loop.time() >= deadline:
                break
            await asyncio.sleep(POLL)
        if not changed:
            await self.desktop.restart_app()
            return "restarted"
        if state == start:
            raise DesktopError(f"the application stayed at {start!r} after the input")
        return state

    async def click(self, where: Region | tuple[int, int]) -> None:
        """Click a region's centre (or a point)."""
        x, y = where.center if isinstance(where, Region) else where
        await self.desktop.click(x, y)

    async def fill(self, field: Region, text: str, *, label: str, read: Region | None = None,
                   secret: bool = False, clear: bool = True) -> None:
        """Click ``field``, replace what it holds with ``text`` and confirm the text arrived:
        read back by OCR (of ``read`` if given), or for ``secret=True`` (a password field
        showing dots) by the field's pixels changing from the empty field's. One retry, then
        DesktopError naming the field by ``label`` — never quoting a secret. See
        :func:`deskfleet.desktop.fill.fill`."""
        await fill_field(self.desktop, field, text, label=label, read=read, secret=secret, clear=clear)
