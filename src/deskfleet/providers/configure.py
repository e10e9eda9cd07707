"""Providers from a server's configuration: ``deskfleet server --provider NAME=SPEC``.

    --provider hyperv=command:/etc/deskfleet/hyperv-hooks
    --provider here='local:deskfleet agent --pack simehr --desktop sim --machine {name} --count 1 ...'

``command:PATH`` is a :class:`~deskfleet.providers.CommandProvider` over the hooks at PATH
(a directory of hooks, or one executable); ``local:COMMAND`` a
:class:`~deskfleet.providers.local.LocalProvider` running COMMAND (split as a shell would,
never run by one) once per machine, its state under the server's data directory. Either
is wrapped in :class:`~deskfleet.providers.Retrying`: transient failures are retried with
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
from .local import LocalProvider
from .retry import Retrying

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
KINDS = ("command", "local")


def parse_specs(items: Iterable[str]) -> dict[str, str]:
    """``NAME=SPEC`` items (the CLI's) as name → spec; ConfigError for one that is not."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep or not _NAME.match(name) or not spec:
            raise ConfigError(f"--provider {item!r}: write NAME=SPEC, e.g. hyperv=command:/etc/deskfleet/hooks")
        if name in out:
            raise ConfigError(f"--provider {name!r} is given twice")
        out[name] = spec
    return out


def open_provider(name: str, spec: str, *, data_dir: Path) -> MachineProvider:
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in KINDS or not rest.strip():
        raise ConfigError(f"provider {name!r}: {spec!r} is not a provider; use command:PATH (hook scripts) "
                          "or local:COMMAND (a process per machine on this host)")
    if kind == "command":
        return Retrying(CommandProvider(rest, name=name))
    try:
        argv = shlex.split(rest)
    except ValueError as exc:
        raise ConfigError(f"provider {name!r}: cannot split its command: {exc}") from None
    return Retrying(LocalProvider(argv, state_dir=data_dir / "providers" / name, name=name))


def open_providers(specs: Mapping[str, str], *, data_dir: Path) -> dict[str, MachineProvider]:
    return {name: open_provider(name, spec, data_dir=data_dir) for name, spec in specs.items()}
