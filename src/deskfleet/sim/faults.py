"""Fault injection for simulated desktops: what can go wrong, how often, reproducibly.

A :class:`FaultPlan` holds the rates; each :class:`~deskfleet.sim.desktop.SimDesktop` rolls
them with its own ``random.Random(seed)``. Every user action draws the same number of
random numbers whatever the screen shows, so the same seed and the same sequence of actions
produce the same faults — a failing scale test can be replayed exactly.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import NamedTuple

#: the kinds recorded in ``SimDesktop.faults_fired``
FAULT_KINDS = (
    "slow",
    "reboot",
    "crash",
    "freeze",
    "error_dialog",
    "session_expired",
    "mfa",
)


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """Rates of the faults a simulated machine suffers. All zero by default: no faults.

    Per-action rates are probabilities for each user action (click, type, key press, drag,
    scroll); mouse moves and screenshots are not actions.
    """

    crash_rate: float = 0.0  # the app process exits; the bare desktop shows
    freeze_rate: float = 0.0  # the app hangs: input ignored, its last frame stays
    error_dialog_rate: float = 0.0  # a modal "Unexpected error" dialog appears
    session_ttl: float | None = None  # seconds a login lasts; None = forever
    #: the session ends ``session_ttl`` seconds after the last input (an idle timeout, as
    #: most enterprise apps have) rather than that long after the login
    session_idle: bool = False
    mfa_rate: float = 0.0  # chance a successful password login asks for a TOTP code
    leak_mb_per_txn: float = 0.0  # app memory growth per saved record
    reboot_rate: float = 0.0  # the machine reboots (an OS update, a hypervisor event)
    reboot_duration: float = 5.0  # seconds of black screen while rebooting
    slow_rate: float = 0.0  # some actions take longer (slow network, busy server)
    slow_ms: float = 0.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_rate") and not 0.0 <= value <= 1.0:
                raise ValueError(f"FaultPlan.{f.name} must be within [0, 1], not {value}")
        if self.session_ttl is not None and self.session_ttl <= 0:
            raise ValueError("FaultPlan.session_ttl must be positive (or None for never)")
        if self.reboot_duration < 0 or self.slow_ms < 0 or self.leak_mb_per_txn < 0:
            raise ValueError("FaultPlan durations and leak sizes cannot be negative")

    @classmethod
    def preset(cls, name: str) -> FaultPlan:
        """``none``; ``demo`` (every fault shows up in ~100 runs on ~6 machines); ``chaos``."""
        try:
            return _PRESETS[name]
        except KeyError:
            raise ValueError(
                f"unknown fault preset {name!r}; choose one of {', '.join(_PRESETS)}"
            ) from None

    def roll(self, rng: random.Random) -> ActionFaults:
        """The faults striking one action. Always draws five numbers (see module doc)."""
        slow, reboot, crash, freeze, error = (rng.random() for _ in range(5))
        return ActionFaults(
            slow=slow < self.slow_rate,
            reboot=reboot < self.reboot_rate,
            crash=crash < self.crash_rate,
            freeze=freeze < self.freeze_rate,
            error_dialog=error < self.error_dialog_rate,
        )


class ActionFaults(NamedTuple):
    slow: bool
    reboot: bool
    crash: bool
    freeze: bool
    error_dialog: bool


# Sized for ~15 actions per run: over ~100 runs on 6 machines (~1,400 actions with
# pre-flight) the demo preset expects about four crashes, reboots and freezes each, six
# error dialogs and a few session expiries; in trials about one attempt in six failed.
_PRESETS: dict[str, FaultPlan] = {
    "none": FaultPlan(),
    "demo": FaultPlan(
        crash_rate=0.004,
        freeze_rate=0.003,
        error_dialog_rate=0.005,
        session_ttl=90.0,
        mfa_rate=0.3,
        leak_mb_per_txn=25.0,
        reboot_rate=0.003,
        reboot_duration=8.0,
        slow_rate=0.05,
        slow_ms=800.0,
    ),
    "chaos": FaultPlan(
        crash_rate=0.02,
        freeze_rate=0.015,
        error_dialog_rate=0.03,
        session_ttl=30.0,
        mfa_rate=0.5,
        leak_mb_per_txn=50.0,
        reboot_rate=0.008,
        reboot_duration=5.0,
        slow_rate=0.2,
        slow_ms=1500.0,
    ),
}
