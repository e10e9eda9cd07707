"""``deskfleet pack``: list, check and scaffold packs (an application's model, playbooks and
automations, loaded by any agent)."""

from __future__ import annotations

import click

from ..errors import DeskfleetError
from ._common import _Group, main


@main.group(cls=_Group)
def pack() -> None:
    """Packs: an application's model, playbooks and automations (docs/your-app.md)."""


@pack.command("list")
def pack_list() -> None:
    """The packs installed in this Python environment (found by name)."""
    from ..packs.loader import installed_packs, load_pack

    found = installed_packs()
    if not found:
        click.echo("no packs installed (a pack directory is loaded by path: --pack ./my-pack)")
        return
    for name in sorted(found):
        try:
            p = load_pack(name)
            click.echo(f"{name:16} {p.version:10} {p.description}")
        except DeskfleetError as exc:
            click.echo(f"{name:16} {'?':10} does not load: {str(exc).splitlines()[0]}")


@pack.command("check")
@click.argument("ref")
def pack_check(ref: str) -> None:
    """Check the pack REF (a directory, or an installed pack's name): manifest, module, model,
    recoveries, automations. One line per problem; exits 1 if there is any."""
    from ..packs.check import check_pack

    report = check_pack(ref)
    for line in report.problems:
        click.echo(f"problem: {line}", err=True)
    for line in report.warnings:
        click.echo(f"warning: {line}", err=True)
    if not report.ok:
        raise DeskfleetError(f"{len(report.problems)} problem(s) in pack {ref}")
    click.echo(f"ok: {report.summary()}")
