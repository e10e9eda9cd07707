"""The ``keepassxc`` pack's module: what the pack offers, found by what it is — automations,
playbooks, the probe — plus the hooks ``pack.toml`` names (``:accounts``, ``:demo``), which
import what they need only when called (an agent never loads the demo's code)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deskfleet import Credential

from .automations import add_entry, entry_already_added, find_entry
from .playbooks import (
    cancel_form,
    clear_search,
    discard_and_lock,
    discard_changes,
    dismiss_unlock_failed,
    escape_then_wait,
    keepalive,
    lock,
    responsive,
    unlock,
)

#: the vault account of the demo and the tests (the manifest's [accounts] default)
ACCOUNT = "keepassxc"


def accounts(seed: int) -> dict[str, Credential]:
    """``[hooks] accounts``: the master password of the demo's database, derived from the seed."""
    return {ACCOUNT: Credential(username="robot", password=f"kx-{seed}-Demo.pw")}


def demo(config: Any, out: Path, data: Path) -> Any:
    """``[hooks] demo``: ``deskfleet demo --pack examples/keepassxc``."""
    from .fleetdemo import KeePassXCDemo

    return KeePassXCDemo(config, out, data)


__all__ = [
    "ACCOUNT",
    "accounts",
    "add_entry",
    "cancel_form",
    "clear_search",
    "demo",
    "discard_and_lock",
    "discard_changes",
    "dismiss_unlock_failed",
    "entry_already_added",
    "escape_then_wait",
    "find_entry",
    "keepalive",
    "lock",
    "responsive",
    "unlock",
]
