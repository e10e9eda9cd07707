"""The X11 session an agent runs in: ``deskfleet agent --desktop local`` on Linux.

Where :class:`~deskfleet.desktop.xvfb.XvfbDisplay` starts a display of its own, this is a
display somebody else set up — a robot's desktop session, a VNC server, a workstation —
named by ``$DISPLAY``. The application may already be running on it (the agent takes it
over, see ``RealDesktop.start``); nothing here stops the display when the agent exits.
Rebooting is the machine's own business: with ``reboot_command`` (e.g. ``["sudo",
"systemctl", "reboot"]``) the agent can ask for one; without it, a reboot playbook fails
and says so, and the machine stays quarantined until a person looks.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Any

import psutil

from ..errors import ConfigError, DesktopError
from .xvfb import XWindowHost, kernel_boot_id

log = logging.getLogger(__name__)

#: seconds to wait for the machine to go down after the reboot command
REBOOT_WAIT = 600.0


class X11Session(XWindowHost):
    """A running X display that is not ours: ``display`` is e.g. ``":0"``."""

    def __init__(self, display: str | None, *, reboot_command: Sequence[str] | None = None) -> None:
        if not display:
            raise ConfigError("--desktop local needs an X display: set DISPLAY (or run the agent in the "
                              "desktop session); to start displays of its own, use --desktop xvfb")
        self._display = display
        self.reboot_command = list(reboot_command or [])
        self._x_lock = threading.Lock()
        try:
            import Xlib.display

            self._x: Any = Xlib.display.Display(display)
        except Exception as exc:
            raise ConfigError(f"cannot connect to the X display {display}: {exc}") from None
        self._boot_id = hashlib.sha256(f"{kernel_boot_id()}:{display}".encode()).hexdigest()[:16]

    @property
    def display(self) -> str | None:
        return self._display

    @property
    def attachable(self) -> bool:
        return True

    def env(self) -> dict[str, str]:
        return {"DISPLAY": self._display}

    def boot_id(self) -> str:
        return self._boot_id

    def booted_at(self) -> float:
        return float(psutil.boot_time())

    def problems(self) -> list[str]:
        return []  # a screen of the wrong size is checked by the desktop; X has no lock screen of its own

    def restart(self) -> None:
        """Reboot the machine with ``reboot_command``; this process ends with it."""
        if not self.reboot_command:
            raise DesktopError("this machine cannot be rebooted by the agent (no --reboot-command): "
                               "reboot it by hand, or give the agent a command that does")
        try:
            subprocess.run(self.reboot_command, check=True, capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            raise DesktopError(f"the reboot command failed: {exc}") from exc
        time.sleep(REBOOT_WAIT)
        raise DesktopError(f"the machine did not go down within {REBOOT_WAIT:g}s of the reboot command")

    def close(self) -> None:
        """Let go of the display (it is not ours to stop)."""
        with self._x_lock:
            self._close_windows()
