"""The provider interface: what creates, starts, stops, fences and destroys machines.

A *provider* is the fleet's hands on the infrastructure beneath the agents: a cloud API, a
hypervisor, or scripts that drive one. The fleet manager decides (policy); a provider only
acts, and speaks of machines, not of API calls, so that the autoscaler and the fencing
logic are written once for every backend (STYLE 2).

Every call that changes something takes a client *token* chosen by the caller. The same
token repeated — typically a retry after a timeout whose first try did act — never acts
twice: ``create`` with a token already used returns the machine that token created. That
is what lets :class:`~deskfleet.providers.retry.Retrying` retry blindly and the fleet
manager re-issue an order after a crash without creating a second machine (DESIGN
invariant 4: no silent double effects).

Errors::

    DeskfleetError
    └── ProviderError            the provider did not do what was asked; ``retryable`` says
        │                        whether the same call (same token) may succeed later
        └── MachineNotFound             the provider has no such machine (never retryable)
"""

from __future__ import annotations

import builtins
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import StrEnum

from ..errors import DeskfleetError

#: the operations of :class:`MachineProvider`, by the names hooks, counters and stats use
OPS = ("create", "start", "stop", "reboot", "power_off", "destroy", "get", "list", "tag", "update")


@dataclass(frozen=True)
class MachineSpec:
    """What to create: the agent on the new machine enrols as ``name`` into ``pool``."""

    name: str
    pool: str
    #: the provider's template, launch template or golden image; None: the provider's default
    image: str | None = None
    #: deskfleet labels the agent will offer (the scheduler matches runs against them)
    labels: dict[str, str] = field(default_factory=dict)
    #: the provider's own tags on the instance (cost centre, owner…)
    tags: dict[str, str] = field(default_factory=dict)


class ProviderState(StrEnum):
    """A machine's life as the provider sees it (not whether its agent is connected)."""

    PROVISIONING = "provisioning"
    BOOTING = "booting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    REBOOTING = "rebooting"
    UPDATING = "updating"  # applying OS updates (``update``); back to running when done
    TERMINATING = "terminating"
    TERMINATED = "terminated"
    FAILED = "failed"


@dataclass
class ProviderMachine:
    """A machine as the provider last reported it."""

    id: str  # the provider's own id (instance id, VM id); not deskfleet's machine id
    name: str  # the deskfleet machine name its agent enrols as
    pool: str
    state: ProviderState
    tags: dict[str, str]
    created_at: float  # epoch seconds
    #: when the machine entered ``state`` (epoch seconds): how a policy sees "booting for
    #: ten minutes" without keeping its own history
    state_since: float
    detail: str = ""  # why it failed, or what the state means here ("hibernated")
    address: str | None = None


@dataclass(frozen=True)
class Capabilities:
    """What a provider can do beyond create/start/stop/reboot/destroy."""

    #: ``power_off`` works: the machine can be cut off at once, without a graceful
    #: shutdown (STONITH), so a silent machine's effects are fenced before its run moves
    fence: bool = False
    #: ``stop(hibernate=True)`` keeps the memory, so the desktop resumes logged in
    hibernate: bool = False
    #: stopped machines can be kept ready and started faster than created
    warm_pool: bool = False
    #: ``update`` applies the OS updates a machine has waiting (rolling maintenance)
    update: bool = False


class ProviderError(DeskfleetError):
    """The provider did not do what was asked.

    ``retryable``: the same call with the same token may succeed later (throttling, no
    capacity right now, a timeout); a retry never acts twice because of the token.
    """

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable


class MachineNotFound(ProviderError):
    """The provider has no machine with this id (never created, or gone)."""

    def __init__(self, machine_id: str, message: str | None = None) -> None:
        super().__init__(message or f"no machine {machine_id!r} at the provider", retryable=False)
        self.machine_id = machine_id


class MachineProvider(ABC):
    """Creates and controls machines on one infrastructure.

    Mutating calls take a keyword-only ``token`` and are idempotent by it (see the module
    docstring). Calls on a machine the provider does not know raise :class:`MachineNotFound`;
    other failures raise :class:`ProviderError`.
    """

    name: str
    capabilities: Capabilities

    @abstractmethod
    async def create(self, spec: MachineSpec, *, token: str) -> ProviderMachine:
        """Start creating a machine; returns at once, usually in ``provisioning``."""

    @abstractmethod
    async def start(self, machine_id: str, *, token: str) -> None:
        """Boot a stopped machine; a machine already running or booting is left alone."""

    @abstractmethod
    async def stop(self, machine_id: str, *, token: str, hibernate: bool = False) -> None:
        """Shut down gracefully (hibernate: keep the memory; needs the capability)."""

    @abstractmethod
    async def reboot(self, machine_id: str, *, token: str) -> None: ...

    @abstractmethod
    async def power_off(self, machine_id: str, *, token: str) -> None:
        """The fence: cut the power now, no graceful shutdown.

        A provider without ``capabilities.fence`` raises ``ProviderError(retryable=False)``.
        """

    @abstractmethod
    async def destroy(self, machine_id: str, *, token: str) -> None:
        """Delete the machine; it passes through ``terminating`` to ``terminated``."""

    @abstractmethod
    async def get(self, machine_id: str) -> ProviderMachine:
        """The machine now; :class:`MachineNotFound` if the provider no longer has it."""

    @abstractmethod
    async def list(self, *, pool: str | None = None) -> builtins.list[ProviderMachine]:
        """Every machine the provider has (in ``pool``), terminated ones it still reports too."""

    @abstractmethod
    async def tag(self, machine_id: str, tags: dict[str, str], *, token: str) -> None:
        """Set these tags (others stay as they are)."""

    async def update(self, machine_id: str, *, token: str) -> None:
        """Apply the OS updates the machine has waiting (Windows Update, a patch baseline,
        ``apt-get upgrade``): returns once they have begun. The machine reports
        ``updating`` until they are applied, then ``running`` — not yet rebooted: rolling
        maintenance reboots it next, through :meth:`reboot` — or ``failed``, with the
        reason in ``detail``.

        A provider without ``capabilities.update`` raises ``ProviderError(retryable=False)``
        (this default).
        """
        del machine_id, token
        raise ProviderError(f"{self.name}: this provider cannot update machines", retryable=False)
