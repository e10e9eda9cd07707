"""deskfleet: orchestration for unattended desktop automation at scale.

The public surface for automation authors is here; the rest is reached through the CLI
(``deskfleet --help``) and the HTTP API.
"""

from .errors import (
    AutomationError,
    BusinessError,
    DeskfleetError,
    DesktopError,
    StateTimeout,
    Stopped,
)
from .sdk import Automation, Context, Registry, automation

__version__ = "0.1.0"

__all__ = [
    "Automation",
    "AutomationError",
    "BusinessError",
    "Context",
    "DeskfleetError",
    "DesktopError",
    "Registry",
    "StateTimeout",
    "Stopped",
    "__version__",
    "automation",
]
