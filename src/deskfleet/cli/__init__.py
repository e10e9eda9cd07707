"""The ``deskfleet`` command. Every flag has a ``DESKFLEET_*`` environment variable, shown
in ``--help``. Only the CLI configures logging. Errors are one clear line, never a trace.

One module per command group; each registers its commands on :data:`main` when imported.
"""

from __future__ import annotations

import sys

import click

from . import access, accounts, agent, demo, desktop, model, pack, plan, runs, server, tasks  # noqa: F401 - they register their commands
from ._common import _fail, main

__all__ = ["main", "run"]


def run() -> None:
    """Entry point: click's usage errors as one line, like every other error."""
    try:
        rv = main.main(standalone_mode=False)
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        _fail(exc.format_message() + hint, exc.exit_code)
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    except click.Abort:
        _fail("aborted", 130)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    run()
