"""``deskfleet api-keys`` (make, list, revoke), ``deskfleet whoami`` and ``deskfleet audit``.

A new key's secret is printed once, on stdout alone (``--quiet``: nothing else), so that it
can go straight into a secret store: ``deskfleet api-keys create ci --role submitter -q |
vault kv put …``.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import click

from ..config import parse_retention
from ._common import _client, _Group, _print, _print_table, main, opt

ROLES = ("submitter", "operator", "admin")
def _expiry(value: str | None) -> str | None:
    """``90d``, ``12h``, … from now (as ``--artifact-retention`` reads them), or an ISO 8601 time."""
    if value is None:
        return None
    try:
        seconds = parse_retention(value)
    except ValueError:
        seconds = None
    if seconds:  # (0 and "forever" keep artifacts; for a key, leave --expires out)
        return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter("a duration (30d, 12h, 2w) or a time (2027-01-31T00:00:00Z)",
                                 param_hint="--expires") from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).isoformat()


@main.group("api-keys", cls=_Group)
def api_keys() -> None:
    """API keys: who may call the API, in which role and tenant (docs/access.md)."""


@api_keys.command("create")
@click.argument("name")
@opt("--role", required=True, type=click.Choice(ROLES),
     help="submitter: runs; operator: also the fleet; admin: also changes it, keys and the audit log")
@opt("--tenant", default="*", show_default=True, help="the tenant the key sees, or '*' for every tenant")
@opt("--screenshots", is_flag=True, default=False, help="the key may view screenshots")
@opt("--expires", default=None, help="when it stops working: 30d, 12h, 2w or an ISO 8601 time (default: never)")
@opt("--quiet", "-q", is_flag=True, default=False, help="print the key alone")
@click.pass_context
def keys_create(ctx: click.Context, name: str, role: str, tenant: str, screenshots: bool, expires: str | None,
                quiet: bool) -> None:
    """Make a key named NAME; its secret is printed this once."""
    with _client(ctx) as c:
        made = c.create_api_key(name, role, tenant=tenant, screenshots=screenshots, expires_at=_expiry(expires))
    click.echo(made["key"])
    if not quiet:
        scope = "every tenant" if made["tenant"] == "*" else f"tenant {made['tenant']}"
        extra = ", may view screenshots" if made["screenshots"] else ""
        until = f", expires {made['expires_at']}" if made.get("expires_at") else ""
        click.echo(f"{made['prefix']}: {made['role']} of {scope}{extra}{until}. The key above is shown this "
                   "once: keep it in your secret store.", err=True)


@api_keys.command("list")
@opt("--json", "as_json", is_flag=True, default=False)
@click.pass_context
def keys_list(ctx: click.Context, as_json: bool) -> None:
    """The keys (never their secrets)."""
    with _client(ctx) as c:
        found = c.api_keys()
    if as_json:
        _print(found)
        return
    from rich.table import Table

    table = Table("prefix", "name", "role", "tenant", "screens", "state", "expires", "last used")
    for k in found:
        table.add_row(k["prefix"], k["name"], k["role"], k["tenant"], "yes" if k["screenshots"] else "",
                      k["state"], (k.get("expires_at") or "")[:19], (k.get("last_used_at") or "")[:19])
    _print_table(table)


@api_keys.command("revoke")
@click.argument("prefix")
@click.pass_context
def keys_revoke(ctx: click.Context, prefix: str) -> None:
    """Revoke the key PREFIX (dfk_…): at once on this server, within seconds on the others."""
    with _client(ctx) as c:
        key = c.revoke_api_key(prefix)
    click.echo(f"{key['prefix']} ({key['name']}) revoked at {key['revoked_at']}")


@main.command("whoami")
@click.pass_context
def whoami(ctx: click.Context) -> None:
    """The key the CLI uses (DESKFLEET_API_KEY): its role, tenant and permissions."""
    with _client(ctx) as c:
        _print(c.whoami())


def _audit_line(e: dict[str, Any]) -> str:
    why = e["detail"].get("reason")
    return (f"{e['id']:>7} {e['at'][:19]} {e['actor']:<16} {e['outcome']:<6} {e['action']} {e['target']}"
            + (f" — {why}" if why else ""))


@main.command("audit")
@opt("--actor", default=None, help="only this actor (a key's prefix, bootstrap, machine:<id>)")
@opt("--action", default=None, help="only actions starting so (e.g. 'POST /v1/machines', 'screenshot.')")
@opt("--target", default=None)
@opt("--outcome", default=None, type=click.Choice(("ok", "denied", "failed")))
@opt("--since", default=None, help="an ISO 8601 time")
@opt("--limit", default=50, type=click.IntRange(1, 1000))
@opt("--follow", "-f", is_flag=True, default=False, help="keep printing new entries as they come")
@opt("--json", "as_json", is_flag=True, default=False)
@click.pass_context
def audit(ctx: click.Context, actor: str | None, action: str | None, target: str | None, outcome: str | None,
          since: str | None, limit: int, follow: bool, as_json: bool) -> None:
    """The audit log, newest last: who did what, each credential handed to a machine, each
    screenshot viewed, each refusal."""
    filters: dict[str, Any] = {"actor": actor, "action": action, "target": target, "outcome": outcome, "since": since}
    with _client(ctx) as c:
        entries = list(reversed(c.audit(limit=limit, **filters)["entries"]))
        for e in entries:
            click.echo(_print_json(e) if as_json else _audit_line(e))
        last = entries[-1]["id"] if entries else 0
        while follow:
            time.sleep(1.0)
            for e in c.audit(after=last, limit=1000, **filters)["entries"]:
                click.echo(_print_json(e) if as_json else _audit_line(e))
                last = e["id"]


def _print_json(e: dict[str, Any]) -> str:
    return json.dumps(e, default=str)
