"""Providers from a server's configuration: ``deskfleet server --provider NAME=SPEC``.

    --provider hyperv=command:/etc/deskfleet/hyperv-hooks
    --provider here='local:deskfleet agent --pack simehr --desktop sim --machine {name} --count 1 ...'
    --provider aws='ec2:deskfleet-win11?region=eu-west-1&warm=2'
    --provider kvm='libvirt:qemu:///system?template=win11-golden'

``command:PATH`` is a :class:`~deskfleet.providers.CommandProvider` over the hooks at PATH
(a directory of hooks, or one executable); ``local:COMMAND`` a
:class:`~deskfleet.providers.local.LocalProvider` running COMMAND (split as a shell would,
never run by one) once per machine, its state under the server's data directory;
``ec2:TEMPLATE[?region=…&endpoint=…&warm=N&hibernate=yes]`` an
:class:`~deskfleet.providers.ec2.EC2Provider` launching from that launch template (boto3
takes the credentials from the environment, a profile or an instance role);
``libvirt:URI[?template=NAME]`` a :class:`~deskfleet.providers.LibvirtProvider` at that
libvirt URI, cloning the template (a domain, or a .xml file) unless a pool's image names
another. Each is wrapped in :class:`~deskfleet.providers.Retrying`: transient failures are retried with
backoff, with the same token.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..errors import ConfigError
from .base import MachineProvider
from .command import CommandProvider
from .ec2 import EC2Provider
from .libvirt import LibvirtProvider
from .local import LocalProvider
from .retry import Retrying

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
KINDS = ("command", "local", "ec2", "libvirt")


def parse_specs(items: Iterable[str], option: str = "--provider", what: str = "SPEC",
                example: str = "hyperv=command:/etc/deskfleet/hooks") -> dict[str, str]:
    """``NAME=SPEC`` items (the CLI's) as name → spec; ConfigError for one that is not."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep or not _NAME.match(name) or not spec:
            raise ConfigError(f"{option} {item!r}: write NAME={what}, e.g. {example}")
        if name in out:
            raise ConfigError(f"{option} {name!r} is given twice")
        out[name] = spec
    return out


def open_provider(name: str, spec: str, *, data_dir: Path, update: str | None = None) -> MachineProvider:
    """``update``: a local provider's update command (what its ``update`` runs on a machine)."""
    kind, sep, rest = spec.partition(":")
    if update is not None and kind != "local":
        raise ConfigError(f"--provider-update {name}: only a local provider takes an update command; "
                          "a command provider updates through its 'update' hook")
    if not sep or kind not in KINDS or not rest.strip():
        raise ConfigError(f"provider {name!r}: {spec!r} is not a provider; use command:PATH (hook scripts) "
                          "or local:COMMAND (a process per machine on this host) "
                          "or ec2:LAUNCH_TEMPLATE[?region=…&warm=N] (EC2 instances) "
                          "or libvirt:URI[?template=NAME] (libvirt domains cloned from a template)")
    if kind == "command":
        return Retrying(CommandProvider(rest, name=name))
    if kind == "ec2":
        return Retrying(EC2Provider.from_spec(rest, name=name))
    if kind == "libvirt":
        return Retrying(LibvirtProvider.from_spec(rest, name=name))
    try:
        argv = shlex.split(rest)
    except ValueError as exc:
        raise ConfigError(f"provider {name!r}: cannot split its command: {exc}") from None
    try:
        update_argv = shlex.split(update) if update is not None else None
    except ValueError as exc:
        raise ConfigError(f"--provider-update {name}: cannot split its command: {exc}") from None
    return Retrying(LocalProvider(argv, state_dir=data_dir / "providers" / name, name=name,
                                  update_command=update_argv))


def open_providers(specs: Mapping[str, str], *, data_dir: Path,
                   updates: Mapping[str, str] | None = None) -> dict[str, MachineProvider]:
    updates = dict(updates or {})
    if unknown := sorted(set(updates) - set(specs)):
        raise ConfigError(f"--provider-update {unknown[0]}: there is no --provider {unknown[0]}")
    return {name: open_provider(name, spec, data_dir=data_dir, update=updates.get(name))
            for name, spec in specs.items()}
