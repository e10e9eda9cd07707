"""The ``simehr`` pack's module: what the pack offers, found by what it is (automations,
playbooks, the probe, the session reader). See ``pack.toml`` beside it."""

from __future__ import annotations

from .automations import (
    approval,
    create_patient,
    export_summary,
    lookup_patient,
    noop,
    work,
    work_long,
    work_short,
)
from .model import (
    dismiss,
    go_home,
    keepalive,
    login,
    logout,
    mfa,
    responsive,
    restart,
    signed_in_as,
    wait_reboot,
)

__all__ = [
    "approval",
    "create_patient",
    "dismiss",
    "export_summary",
    "go_home",
    "keepalive",
    "login",
    "logout",
    "lookup_patient",
    "mfa",
    "noop",
    "responsive",
    "restart",
    "signed_in_as",
    "wait_reboot",
    "work",
    "work_long",
    "work_short",
]
