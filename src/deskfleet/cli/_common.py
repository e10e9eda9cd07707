"""The ``deskfleet`` command. Every flag has a ``DESKFLEET_*`` environment variable, shown
in ``--help``. Only the CLI configures logging. Errors are one clear line, never a trace."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from ..client import DEFAULT_SERVER, ApiError, Client
from ..errors import DeskfleetError
from ..version import __version__

F = TypeVar("F", bound=Callable[..., Any])
CONTEXT = {"auto_envvar_prefix": "DESKFLEET", "show_default": True, "help_option_names": ["-h", "--help"]}


def opt(*args: Any, **kwargs: Any) -> Callable[[F], F]:
    kwargs.setdefault("show_envvar", True)
    return click.option(*args, **kwargs)


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"deskfleet: {message}", err=True)
    sys.exit(code)


class _Group(click.Group):
    """Turns our errors into one line on stderr."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ApiError as exc:
            _fail(exc.message + (f" [{exc.field}]" if exc.field else ""))
        except DeskfleetError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            _fail("interrupted", 130)


def _labels(values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for v in values:
        key, sep, value = v.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{v!r} is not key=value", param_hint="--label")
        out[key] = value
    return out


def _client(ctx: click.Context) -> Client:
    obj = ctx.find_root().params
    return Client(obj["server"], api_key=obj["api_key"])


def _print(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _print_table(table: Any) -> None:
    """A rich table on a terminal; piped or redirected, at full width — never an id cut short
    to fit 80 columns (a cut id cannot be copied into the next command)."""
    from rich.console import Console

    Console(width=None if sys.stdout.isatty() else 10_000).print(table)


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="deskfleet")
@opt("--server", default=DEFAULT_SERVER, help="orchestrator URL (client commands)")
@opt("--api-key", default=None, help="API key for client commands, if the server requires one")
@opt("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
@opt("--log-format", default="text", type=click.Choice(["text", "json"]))
def main(server: str, api_key: str | None, log_level: str, log_format: str) -> None:
    """deskfleet: orchestrate unattended desktop automation on a fleet of machines."""
    from .. import logs

    logs.configure(log_level, log_format)


def _tune_gc() -> None:
    """A long-lived server allocates many short-lived objects per message and few cycles:
    collect the youngest generation less often, and keep what start-up made (modules,
    the app) out of every later full collection."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
