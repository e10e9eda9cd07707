"""deskfleet: orchestration for unattended desktop automation at scale.

The public surface is here — what a pack (automations, playbooks, probe), an embedder of
the agent, or a test of either imports; docs/python-api.md lists it with examples. The
rest is reached through the CLI (``deskfleet --help``) and the HTTP API. A name not listed
in ``__all__`` is internal and may change.

Names that pull in the desktop stack (OpenCV, the X11 and input libraries) are imported
on first use, so that ``import deskfleet`` stays light for clients and the server.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .appmodel import HUMAN_KINDS, HumanAnswer
from .errors import (
    AutomationError,
    BusinessError,
    ConfigError,
    DeskfleetError,
    DesktopError,
    StateTimeout,
    Stopped,
)
from .sdk import Automation, Context, Lease, Registry, UpdateContext, automation
from .version import __version__

#: public name → the module that defines it (imported when the name is first used)
_LAZY = {
    # apps: models, playbooks, packs
    "AppModel": "appmodel",
    "Credential": "appmodel",
    "PlaybookContext": "appmodel",
    "ProbeResult": "appmodel",
    "playbook": "packs.playbooks",
    "probe": "packs.playbooks",
    "hover_responds": "packs.playbooks",
    "session_reader": "packs.playbooks",
    "Pack": "packs.loader",
    "PackError": "packs.loader",
    "load_pack": "packs.loader",
    "load_packs": "packs.loader",
    "installed_packs": "packs.loader",
    # desktops
    "Desktop": "desktop",
    "DesktopInfo": "desktop",
    "Frame": "desktop",
    "Region": "desktop",
    "Window": "desktop",
    "WindowFacts": "desktop",
    "note_session": "desktop",
    "same_text": "desktop.fill",
    # recognition
    "Classification": "vision",
    "UNKNOWN": "vision",
    "COVERED": "vision",
    "NO_SCREEN": "agent.preflight",
    "WRONG_SCREEN": "vision",
    # embedding the agent
    "Agent": "agent.runtime",
    "AgentConfig": "agent.runtime",
    "App": "agent.runtime",
    "AgentHost": "agent.host",
    "AgentHostConfig": "agent.host",
    "SimSettings": "agent.host",
}

__all__ = [
    "COVERED",
    "HUMAN_KINDS",
    "NO_SCREEN",
    "UNKNOWN",
    "WRONG_SCREEN",
    "Agent",
    "AgentConfig",
    "AgentHost",
    "AgentHostConfig",
    "App",
    "AppModel",
    "Automation",
    "AutomationError",
    "BusinessError",
    "Classification",
    "ConfigError",
    "Context",
    "Credential",
    "DeskfleetError",
    "Desktop",
    "DesktopError",
    "DesktopInfo",
    "Frame",
    "HumanAnswer",
    "Lease",
    "Pack",
    "PackError",
    "PlaybookContext",
    "ProbeResult",
    "Region",
    "Registry",
    "SimSettings",
    "StateTimeout",
    "Stopped",
    "UpdateContext",
    "Window",
    "WindowFacts",
    "__version__",
    "automation",
    "hover_responds",
    "installed_packs",
    "load_pack",
    "load_packs",
    "note_session",
    "playbook",
    "probe",
    "same_text",
    "session_reader",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'deskfleet' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:
    from .agent.host import AgentHost, AgentHostConfig, SimSettings
    from .agent.preflight import NO_SCREEN
    from .agent.runtime import Agent, AgentConfig, App
    from .appmodel import AppModel, Credential, PlaybookContext, ProbeResult
    from .desktop import Desktop, DesktopInfo, Frame, Region, Window, WindowFacts, note_session
    from .desktop.fill import same_text
    from .packs.loader import Pack, PackError, installed_packs, load_pack, load_packs
    from .packs.playbooks import hover_responds, playbook, probe, session_reader
    from .vision import COVERED, UNKNOWN, WRONG_SCREEN, Classification
