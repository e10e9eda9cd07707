"""Providers: what creates, starts, stops, fences and destroys the fleet's machines.

:class:`MachineProvider` is the interface (``base``); beside it, :class:`FakeProvider`
plays an infrastructure in memory for tests, :class:`CommandProvider` drives any
hypervisor through hook scripts, :class:`LocalProvider` runs machines as process groups on
this host (the demo, end-to-end tests), :class:`LibvirtProvider` clones libvirt domains
(KVM) from a golden template, :class:`EC2Provider` launches EC2 instances from a launch
template (boto3 is imported only when one is built), and :class:`Retrying` wraps any of
them to retry transient failures with the caller's token. docs/providers.md describes them
and the hook contract.
"""

from __future__ import annotations

from .base import (
    Capabilities,
    MachineNotFound,
    MachineProvider,
    MachineSpec,
    ProviderError,
    ProviderMachine,
    ProviderState,
)
from .command import CommandProvider
from .ec2 import EC2Provider
from .fake import FakeProvider
from .libvirt import LibvirtProvider
from .local import LocalProvider
from .retry import OpStats, Retrying

__all__ = [
    "Capabilities",
    "CommandProvider",
    "EC2Provider",
    "FakeProvider",
    "LibvirtProvider",
    "LocalProvider",
    "MachineNotFound",
    "MachineProvider",
    "MachineSpec",
    "OpStats",
    "ProviderError",
    "ProviderMachine",
    "ProviderState",
    "Retrying",
]
