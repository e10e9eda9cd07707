"""``deskfleet accounts``: the orchestrator's credential vault.

Secrets are read from stdin or a file, never from the command line (where ``ps`` and the
shell's history would show them to anyone), and never echoed back: the server answers
with ``has_password`` and ``has_totp`` only.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ..client import ApiError
from ._common import _client, _fail, _Group, _labels, _print, _print_table, main, opt


def _refuse_argv(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """A secret given as an argument: refuse it (one line, the value never repeated)."""
    if value is not None:
        name = "password" if param.name == "password" else "totp-seed"
        _fail(f"--{name} on the command line would show the secret to anyone who can list processes "
              f"or read your shell history; pipe it with --{name}-stdin, or give --{name}-file FILE", 2)


def _read_secret(what: str, from_stdin: bool, path: Path | None) -> str | None:
    if from_stdin and path is not None:
        raise click.UsageError(f"give the {what} with --{what}-stdin or --{what}-file, not both")
    if from_stdin:
        if sys.stdin.isatty():
            click.echo(f"{what} (not shown), then Enter: ", err=True, nl=False)
            import getpass

            text = getpass.getpass(prompt="")
        else:
            text = sys.stdin.read()
    elif path is not None:
        try:
            text = path.read_text()
        except OSError as exc:
            raise click.UsageError(f"cannot read the {what} file {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise click.UsageError(f"the {what} file {path} is not UTF-8 text") from None
    else:
        return None
    # One trailing newline is how files and pipes end; anything else is the secret itself.
    text = text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text
    if not text:
        source = "stdin" if from_stdin else str(path)
        raise click.UsageError(f"the {what} read from {source} is empty")
    return text


@main.group(cls=_Group)
def accounts() -> None:
    """The credential vault: accounts the apps log in as (secrets never shown)."""


@accounts.command("set")
@click.argument("name")
@opt("--app", default=None, help="the pack (application) the account logs in to, e.g. demoehr")
@opt("--username", default=None, help="the name the app knows the account by (default for a new account: NAME)")
@opt("--password-stdin", is_flag=True, default=False, help="read the password from stdin")
@opt("--password-file", default=None, type=click.Path(dir_okay=False, path_type=Path),
     help="read the password from this file")
@opt("--totp-seed-stdin", is_flag=True, default=False, help="read the TOTP seed (base32) from stdin")
@opt("--totp-seed-file", default=None, type=click.Path(dir_okay=False, path_type=Path),
     help="read the TOTP seed (base32) from this file")
@opt("--no-totp", is_flag=True, default=False, help="remove the account's TOTP seed")
@opt("--label", "labels", multiple=True, help="key=value (replaces the account's labels); repeatable")
@opt("--max-sessions", default=None, type=int,
     help="machines that may be logged in as the account at once (default for a new account: 1)")
@click.option("--password", "password", default=None, hidden=True, expose_value=False, is_eager=True,
              allow_from_autoenv=False, callback=_refuse_argv)
@click.option("--totp-seed", "totp_seed", default=None, hidden=True, expose_value=False, is_eager=True,
              allow_from_autoenv=False, callback=_refuse_argv)
@click.pass_context
def accounts_set(ctx: click.Context, name: str, app: str | None, username: str | None, password_stdin: bool,
                 password_file: Path | None, totp_seed_stdin: bool, totp_seed_file: Path | None, no_totp: bool,
                 labels: tuple[str, ...], max_sessions: int | None) -> None:
    """Create the account NAME, or change the fields given of an existing one.

    \b
    printf '%s' "$PASSWORD" | deskfleet accounts set robot1 --app demoehr --username robot1 --password-stdin
    deskfleet accounts set robot1 --totp-seed-file seed.txt --max-sessions 2
    """
    if password_stdin and totp_seed_stdin:
        raise click.UsageError("only one secret can come from stdin; give the other with --password-file "
                               "or --totp-seed-file")
    if no_totp and (totp_seed_stdin or totp_seed_file is not None):
        raise click.UsageError("--no-totp removes the TOTP seed; do not give one with it")
    if max_sessions is not None and max_sessions < 1:
        raise click.BadParameter("must be at least 1: how many machines may be logged in as the account at once",
                                 param_hint="--max-sessions")
    password = _read_secret("password", password_stdin, password_file)
    seed = _read_secret("totp-seed", totp_seed_stdin, totp_seed_file)
    with _client(ctx) as c:
        try:
            c.account(name)
            exists = True
        except ApiError as exc:
            if exc.status != 404:
                raise
            exists = False
        if exists:
            changes: dict[str, Any] = {}
            for key, value in (("app", app), ("username", username), ("password", password),
                               ("max_sessions", max_sessions)):
                if value is not None:
                    changes[key] = value
            if seed is not None or no_totp:
                changes["totp_seed"] = seed
            if labels:
                changes["labels"] = _labels(labels)
            if not changes:
                raise click.UsageError(f"account {name} exists; say what to change (see --help)")
            shown = c.patch_account(name, **changes)
        else:
            if password is None:
                raise click.UsageError(f"account {name} is new and needs a password: --password-stdin "
                                       "or --password-file FILE")
            shown = c.put_account(name, app=app, username=username or name, password=password,
                                  totp_seed=seed, labels=_labels(labels), max_sessions=max_sessions or 1)
    click.echo(f"account {name} {'updated' if exists else 'created'}: app {shown['app'] or '-'}, "
               f"username {shown['username']}, max {shown['max_sessions']} session(s), "
               f"password {'set' if shown['has_password'] else 'missing'}, "
               f"TOTP {'set' if shown['has_totp'] else 'none'}", err=True)


@accounts.command("list")
@opt("--app", default=None, help="only the accounts of this app")
@click.pass_context
def accounts_list(ctx: click.Context, app: str | None) -> None:
    """The vault's accounts and which machines hold them (never a secret)."""
    from rich.table import Table

    with _client(ctx) as c:
        found = c.accounts(app)
    table = Table("name", "app", "username", "sessions", "leased by", "TOTP", "labels")
    for a in found:
        leased = ", ".join(f"{x['machine']}{'' if x['state'] == 'held' else ' (reserved)'}" for x in a["leases"])
        table.add_row(a["name"], a["app"] or "", a["username"], f"{a['sessions_in_use']}/{a['max_sessions']}",
                      leased, "yes" if a["has_totp"] else "", ", ".join(f"{k}={v}" for k, v in a["labels"].items()))
    _print_table(table)


@accounts.command("show")
@click.argument("name")
@click.pass_context
def accounts_show(ctx: click.Context, name: str) -> None:
    """An account as JSON: its fields, has_password/has_totp, and its leases."""
    with _client(ctx) as c:
        _print(c.account(name))


@accounts.command("remove")
@click.argument("name")
@opt("--force", is_flag=True, default=False, help="remove it even while machines hold leases on it")
@click.pass_context
def accounts_remove(ctx: click.Context, name: str, force: bool) -> None:
    """Remove the account NAME (refused while a machine holds a lease on it, unless --force)."""
    with _client(ctx) as c:
        done = c.remove_account(name, force=force)
    released = ", ".join(x["machine"] for x in done["leases_released"])
    click.echo(f"account {name} removed" + (f" (leases released: {released})" if released else ""), err=True)


@accounts.command("add-demo")
@click.argument("pack")
@opt("--seed", default=1, type=int, help="the seed the pack's demo accounts are made from (the demo's --seed)")
@opt("--max-sessions", default=1, type=click.IntRange(1), help="machines that may share each account")
@click.pass_context
def accounts_add_demo(ctx: click.Context, pack: str, seed: int, max_sessions: int) -> None:
    """Put PACK's demo accounts in the vault: the ones its ``[hooks] accounts`` makes for a seed
    (the example packs' test and demo accounts; your own accounts go in with ``accounts set``)."""
    from ..errors import ConfigError
    from ..packs.loader import load_pack

    loaded = load_pack(pack)
    make = loaded.hook("accounts")
    if make is None:
        raise ConfigError(f"pack {loaded.name} has no demo accounts ([hooks] accounts); add its accounts with "
                          "deskfleet accounts set NAME --app " + loaded.name + " …")
    creds = make(seed)
    with _client(ctx) as c:
        c.put_accounts(creds, app=loaded.name, max_sessions=max_sessions)
    click.echo(f"{len(creds)} {loaded.name} accounts in the vault: {', '.join(creds)}", err=True)
