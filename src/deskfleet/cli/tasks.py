"""``deskfleet tasks``: human tasks — what only a person can do for a running automation
(approve a push notification, read out an SMS code) — listed, claimed and answered.

A secret task's answer (``secret: true``, e.g. an SMS code) is read without echo from the
terminal or from stdin (``--response-stdin``), never taken from the command line, where
``ps`` and the shell's history would show it.
"""

from __future__ import annotations

import getpass
import sys
from pathlib import Path
from typing import Any

import click

from ._common import _client, _fail, _Group, _print, _print_table, main, opt

STATES = ("open", "claimed", "completed", "expired", "cancelled")


def _me() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name (a container without one): the person must say
        return ""


def _by(value: str) -> str:
    if not value.strip():
        raise click.UsageError("say who you are with --by NAME (or DESKFLEET_TASKS_BY)")
    return value.strip()


by_option = opt("--by", default=_me, envvar="DESKFLEET_TASKS_BY", show_default="your login name",
                help="who you are, as the task's history will name you (an email, a login)")
json_option = opt("--json", "as_json", is_flag=True, default=False, help="print the task(s) as JSON")


def _line(t: dict[str, Any]) -> str:
    who = t.get("completed_by") or t.get("claimed_by")
    return f"{t['id']}: {t['state']}" + (f" ({who})" if who else "") + (f" — {t['reason']}" if t.get("reason") else "")


@main.group(cls=_Group)
def tasks() -> None:
    """Human tasks: what only a person can do for a running automation (push approvals, SMS codes)."""


@tasks.command("list")
@opt("--state", "states", multiple=True, type=click.Choice(STATES),
     help="only tasks in this state; repeatable (default: open and claimed)")
@opt("--all", "every", is_flag=True, default=False, help="tasks in every state")
@opt("--pool", default=None)
@opt("--run", default=None, help="only the tasks of this run")
@opt("--limit", default=50, type=click.IntRange(1, 1000))
@json_option
@click.pass_context
def tasks_list(ctx: click.Context, states: tuple[str, ...], every: bool, pool: str | None, run: str | None,
               limit: int, as_json: bool) -> None:
    """Tasks waiting for a person (newest first); --all for every state."""
    if every and states:
        raise click.UsageError("give --state or --all, not both")
    wanted = () if every else states or ("open", "claimed")
    with _client(ctx) as c:
        found = c.human_tasks(state=wanted, pool=pool, run=run, limit=limit)["tasks"]
    if as_json:
        _print(found)
        return
    if not found:
        click.echo("no human tasks" + ("" if every else " waiting (--all shows the others)"))
        return
    from rich.table import Table

    table = Table("id", "kind", "state", "who", "due", "run", "machine", "prompt")
    for t in found:
        table.add_row(t["id"], t["kind"] + (" (secret)" if t["secret"] else ""), t["state"],
                      t.get("completed_by") or t.get("claimed_by") or "", t["due_at"][11:19], t["run"], t["machine"],
                      t["prompt"][:60])
    _print_table(table)


@tasks.command("show")
@click.argument("task_id")
@opt("--screenshot", default=None, type=click.Path(dir_okay=False, path_type=Path),
     help="also save the screen the agent saw when it asked to this PNG file")
@click.pass_context
def tasks_show(ctx: click.Context, task_id: str, screenshot: Path | None) -> None:
    """The task as JSON (a secret task's answer is never shown)."""
    with _client(ctx) as c:
        task = c.human_task(task_id)
        if screenshot is not None:
            data = c.human_task_screenshot(task_id)
            try:
                screenshot.write_bytes(data)
            except OSError as exc:
                _fail(f"cannot write {screenshot}: {exc.strerror}")
            click.echo(f"screen saved to {screenshot}", err=True)
    _print(task)


@tasks.command("claim")
@click.argument("task_id")
@by_option
@json_option
@click.pass_context
def tasks_claim(ctx: click.Context, task_id: str, by: str, as_json: bool) -> None:
    """Take the task: nobody else may complete it until you complete or release it."""
    with _client(ctx) as c:
        task = c.claim_human_task(task_id, _by(by))
    _print(task) if as_json else click.echo(_line(task))


@tasks.command("release")
@click.argument("task_id")
@by_option
@json_option
@click.pass_context
def tasks_release(ctx: click.Context, task_id: str, by: str, as_json: bool) -> None:
    """Give a task you claimed back to the others."""
    with _client(ctx) as c:
        task = c.release_human_task(task_id, _by(by))
    _print(task) if as_json else click.echo(_line(task))


@tasks.command("complete")
@click.argument("task_id")
@by_option
@opt("--response", default=None, help="the answer, for a task that is not secret (e.g. 'approved')")
@opt("--response-stdin", is_flag=True, default=False,
     help="read the answer from stdin (a secret one: from a pipe, or typed without echo)")
@json_option
@click.pass_context
def tasks_complete(ctx: click.Context, task_id: str, by: str, response: str | None, response_stdin: bool,
                   as_json: bool) -> None:
    """Answer the task; the automation waiting for it carries on.

    A task that asks for nothing (a push approval you accepted on the phone) needs no
    --response. A secret task's answer (an SMS code) is read without echo, or from stdin
    with --response-stdin — never from the command line."""
    if response is not None and response_stdin:
        raise click.UsageError("give the answer with --response or --response-stdin, not both")
    person = _by(by)
    with _client(ctx) as c:
        task = c.human_task(task_id)
        if task["secret"] and response is not None:
            _fail("this task's answer is a secret: --response would show it to anyone who can list processes "
                  "or read your shell history; pipe it with --response-stdin, or leave it out to type it unseen", 2)
        if response_stdin:
            response = _read_answer()
        elif task["secret"] and response is None:
            if not sys.stdin.isatty():
                _fail("this task's answer is a secret: give it on stdin with --response-stdin", 2)
            response = _read_answer()
        done = c.complete_human_task(task_id, person, response)
    _print(done) if as_json else click.echo(_line(done))


def _read_answer() -> str:
    if sys.stdin.isatty():
        click.echo("answer (not shown), then Enter: ", err=True, nl=False)
        text = getpass.getpass(prompt="")
    else:
        text = sys.stdin.read()
    text = text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text
    if not text:
        raise click.UsageError("the answer read from stdin is empty")
    return text
