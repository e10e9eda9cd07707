"""The ``demoehr`` pack's module: what the pack offers, found by what it is (automations,
playbooks, the probe, the session reader). See ``pack.toml`` beside it."""

from __future__ import annotations

from .automations import create_patient, search_patient, update_patient
from .model import dismiss, go_home, keepalive, login, logout, mfa, responsive, signed_in_as

__all__ = [
    "create_patient",
    "dismiss",
    "go_home",
    "keepalive",
    "login",
    "logout",
    "mfa",
    "responsive",
    "search_patient",
    "signed_in_as",
    "update_patient",
]
