"""Client commands: ``submit``, ``runs``, ``machines``, ``pools``."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import click

from ..errors import DeskfleetError
from ._common import _client, _Group, _labels, _print, _print_table, main, opt


# -- client commands ----------------------------------------------------------------------------------------
@main.command()
@click.argument("automation", required=False)
@opt("--from", "from_", default=None, type=click.File("r"), metavar="FILE", envvar="DESKFLEET_SUBMIT_FROM",
     help="submit the runs of a JSON Lines file ('-': stdin), one run request per line, 1,000 per request; "
          "no AUTOMATION or run options then")
@opt("--input", "input_", default="{}", envvar="DESKFLEET_SUBMIT_INPUT", help="JSON object, or @file.json")
@opt("--pool", default="default")
@opt("--version", "version_", default=None, envvar="DESKFLEET_SUBMIT_VERSION", help="automation version (default: newest)")
@opt("--pack-version", default=None, help="run only on a machine that runs this version of the automation's pack")
@opt("--label", "labels", multiple=True, help="required machine label key=value; repeatable")
@opt("--machine", default=None, help="run only on this machine")
@opt("--prefer-machine", default=None)
@opt("--session-key", default=None, help="prefer the machine logged in as this account")
@opt("--priority", default=0, type=int)
@opt("--deadline", default=None, type=float, help="seconds for the whole run")
@opt("--queue-timeout", default=None, type=float)
@opt("--attempt-timeout", default=None, type=float)
@opt("--max-attempts", default=None, type=int)
@opt("--idempotency-key", default=None)
@opt("--webhook-url", default=None)
@opt("--wait", default=0.0, type=float, help="seconds to wait for the result")
@click.pass_context
def submit(ctx: click.Context, automation: str | None, from_: TextIO | None, input_: str, pool: str,
           version_: str | None, pack_version: str | None, labels: tuple[str, ...], machine: str | None,
           prefer_machine: str | None,
           session_key: str | None, priority: int, deadline: float | None, queue_timeout: float | None,
           attempt_timeout: float | None, max_attempts: int | None, idempotency_key: str | None,
           webhook_url: str | None, wait: float) -> None:
    """Submit a run of AUTOMATION and print it; or, with --from, every run of a file.

    Each line of a --from file is one run request, as POST /v1/runs takes it:
    {"automation": "ehr.lookup_patient", "input": {...}, "pool": "ehr", "priority": 5,
    "idempotency_key": "order-1234", ...}. Each run is answered on its own — created,
    existing (its idempotency key was used before, for the same request), conflict or
    invalid — so a file can be sent again after a failure: with idempotency keys, what went
    through is not submitted twice. Exits 1 if any run was refused."""
    if from_ is not None:
        given = [p.name for p in ctx.command.params
                 if p.name not in ("from_", "automation") and ctx.get_parameter_source(p.name or "") not in
                 (click.core.ParameterSource.DEFAULT, None)]
        if automation is not None or given:
            raise click.UsageError("--from takes every run's fields from its line: give no AUTOMATION and no run "
                                   "options with it")
        _submit_file(ctx, from_)
        return
    if automation is None:
        raise click.UsageError("give the AUTOMATION to run, or --from FILE")
    try:
        text = Path(input_[1:]).read_text() if input_.startswith("@") else input_
        data = json.loads(text)
    except OSError as exc:
        raise click.BadParameter(f"cannot read {input_[1:]}: {exc.strerror}", param_hint="--input") from exc
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                                 param_hint="--input") from exc
    if not isinstance(data, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--input")
    with _client(ctx) as c:
        _print(c.submit(automation, data, wait=wait, pool=pool, version=version_, pack_version=pack_version,
                        labels=_labels(labels) or None,
                        machine=machine, prefer_machine=prefer_machine, session_key=session_key,
                        priority=priority, deadline=deadline, queue_timeout=queue_timeout,
                        attempt_timeout=attempt_timeout, max_attempts=max_attempts,
                        idempotency_key=idempotency_key, webhook_url=webhook_url))


def _submit_file(ctx: click.Context, lines: TextIO) -> None:
    """Submit a JSON Lines file's runs in batches; summarise, and name every refused line."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..client import BATCH_MAX

    where = getattr(lines, "name", "-")
    bodies: list[tuple[int, dict[str, Any]]] = []
    refused: list[tuple[int, str, str]] = []  # line, status, message
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            body = json.loads(line)
        except json.JSONDecodeError as exc:
            refused.append((number, "invalid", f"not JSON: {exc.msg} at column {exc.colno}"))
            continue
        if not isinstance(body, dict):
            refused.append((number, "invalid", "a run request is a JSON object"))
            continue
        bodies.append((number, body))
    unsent = len(refused)  # lines that are no run request: never sent
    counts = {"created": 0, "existing": 0, "conflict": 0, "invalid": unsent}
    with _client(ctx) as c, Progress(TextColumn("submitting"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), transient=True,
                                     disable=not sys.stderr.isatty()) as progress:
        task = progress.add_task("runs", total=len(bodies))
        for start in range(0, len(bodies), BATCH_MAX):
            chunk = bodies[start : start + BATCH_MAX]
            answer = c.submit_batch([body for _, body in chunk])
            for result in answer["results"]:
                number = chunk[result["index"]][0]
                counts[result["status"]] = counts.get(result["status"], 0) + 1
                if result["status"] in ("conflict", "invalid"):
                    refused.append((number, result["status"], (result.get("error") or {}).get("message", "")))
            progress.advance(task, len(chunk))
    click.echo(f"{where}: {len(bodies) + unsent} run(s): " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    for number, status, message in sorted(refused):
        click.echo(f"{where}:{number}: {status}: {message}", err=True)
    if refused:
        ctx.exit(1)


@main.group(cls=_Group)
def runs() -> None:
    """List, show and cancel runs."""


@runs.command("list")
@opt("--state", "states", multiple=True, help="filter by state; repeatable")
@opt("--limit", default=50, type=click.IntRange(1, 1000))
@click.pass_context
def runs_list(ctx: click.Context, states: tuple[str, ...], limit: int) -> None:
    from rich.table import Table

    with _client(ctx) as c:
        page = c.runs(state=states, limit=limit)
    table = Table("id", "automation", "state", "machine", "attempts", "created", "error")
    for r in page["runs"]:
        err = (r.get("error") or {}).get("message", "")
        table.add_row(r["id"], r["automation"], r["state"], r.get("current_machine") or "",
                      str(r["dispatches"]), r["created_at"][:19], err[:60])
    _print_table(table)


@runs.command("show")
@click.argument("run_id")
@opt("--events/--no-events", default=False, help="include the run's timeline")
@opt("--wait", default=0.0, type=float)
@click.pass_context
def runs_show(ctx: click.Context, run_id: str, events: bool, wait: float) -> None:
    with _client(ctx) as c:
        run = c.run(run_id, wait=wait)
        if events:
            run["attempts"] = c.attempts(run_id)
            run["events"] = c.events(run_id)
    _print(run)


@runs.command("cancel")
@click.argument("run_id")
@click.pass_context
def runs_cancel(ctx: click.Context, run_id: str) -> None:
    with _client(ctx) as c:
        _print(c.cancel(run_id))


@runs.command("retry")
@click.argument("run_id")
@click.pass_context
def runs_retry(ctx: click.Context, run_id: str) -> None:
    """Submit an ended run's request again as a new run (failed, timed out or cancelled
    runs); asking again prints the same new run."""
    with _client(ctx) as c:
        _print(c.retry(run_id))


@main.group(cls=_Group)
def machines() -> None:
    """List machines; cordon, drain or uncordon one."""


@machines.command("list")
@opt("--pool", default=None)
@click.pass_context
def machines_list(ctx: click.Context, pool: str | None) -> None:
    from rich.table import Table

    with _client(ctx) as c:
        found = c.machines(pool)
    table = Table("id", "pool", "status", "run", "runs done", "memory MB", "session", "note")
    for m in found:
        table.add_row(m["id"], m["pool"], m["status"], m.get("current_run") or "", str(m["runs_completed"]),
                      f"{m['resources'].get('memory_mb', 0):.0f}", m.get("session_key") or "",
                      (m.get("quarantine_reason") or "")[:50])
    _print_table(table)


@machines.command("wait")
@opt("--count", default=1, type=click.IntRange(1, 100_000), help="how many machines")
@opt("--pool", default=None, help="only machines of this pool")
@opt("--timeout", default=120.0, type=click.FloatRange(min=0, min_open=True), help="seconds to wait at most")
@click.pass_context
def machines_wait(ctx: click.Context, count: int, pool: str | None, timeout: float) -> None:
    """Wait until COUNT machines are up and can take work (ready or busy): after starting
    agents, before the first submit (a run for a pool no machine has joined yet is refused).
    Exits 1, saying what the machines are doing, if they are not up in time."""
    import time

    deadline = time.monotonic() + timeout
    with _client(ctx) as c:
        while True:
            found = c.machines(pool)
            up = [m for m in found if m["status"] in ("ready", "busy")]
            if len(up) >= count:
                click.echo(f"{len(up)} machine{'s' if len(up) != 1 else ''} up: {', '.join(m['id'] for m in up)}")
                return
            if time.monotonic() >= deadline:
                seen = ", ".join(f"{m['id']} {m['status']}" for m in found) or "none has enrolled"
                raise DeskfleetError(f"{len(up)} of {count} machines up after {timeout:g}s ({seen})")
            time.sleep(0.5)


def _machine_action(action: str, help_text: str) -> None:
    @machines.command(action, help=help_text)
    @click.argument("machine_id")
    @opt("--reason", default="")
    @click.pass_context
    def cmd(ctx: click.Context, machine_id: str, reason: str) -> None:
        with _client(ctx) as c:
            m = c.machine_action(machine_id, action, reason)
        click.echo(f"{m['id']}: {m['status']} (admin {m['admin']})")


_machine_action("cordon", "Stop giving the machine new work; current work continues.")
_machine_action("drain", "Cordon, and show the machine as drained once its current run ends.")
_machine_action("uncordon", "Give the machine work again.")


@main.group(cls=_Group)
def pools() -> None:
    """List pools or change a pool's settings."""


@pools.command("list")
@click.pass_context
def pools_list(ctx: click.Context) -> None:
    with _client(ctx) as c:
        _print(c.pools())


@pools.command("set")
@click.argument("name")
@opt("--allow-wait-for-capacity/--no-allow-wait-for-capacity", default=False)
@opt("--affinity-wait", default=10.0, type=float)
@opt("--description", default="")
@click.pass_context
def pools_set(ctx: click.Context, name: str, allow_wait_for_capacity: bool, affinity_wait: float, description: str) -> None:
    with _client(ctx) as c:
        _print(c.put_pool(name, allow_wait_for_capacity=allow_wait_for_capacity,
                          affinity_wait=affinity_wait, description=description))


@pools.command("policy")
@click.argument("name")
@opt("--set", "set_", default=None, type=click.File("r"), metavar="FILE",
     help="replace the policy with the JSON object in FILE ('-': standard input)")
@opt("--min", "min_", default=None, type=click.IntRange(0), help="change only min")
@opt("--max", "max_", default=None, type=click.IntRange(0), help="change only max")
@opt("--provider", default=None, help="change only the provider ('none': managed elsewhere)")
@opt("--version", "version_", default=None, type=click.IntRange(0),
     help="the version your change is made to (default: the one just read); refused if no longer the latest")
@opt("--comment", default="", help="why: kept with the new version")
@click.pass_context
def pools_policy(ctx: click.Context, name: str, set_: TextIO | None, min_: int | None, max_: int | None,
                 provider: str | None, version_: int | None, comment: str) -> None:
    """Show a pool's policy, or make a new version of it.

    Without options it prints the policy in force (version 0: never set, the defaults).
    --min, --max and --provider change those fields of the policy just read; --set FILE
    replaces it. Either way the change is made to the version read (or --version), and
    refused if somebody changed the policy meanwhile."""
    with _client(ctx) as c:
        current = c.pool_policy(name)
        if set_ is None and min_ is None and max_ is None and provider is None:
            _print(current)
            return
        if set_ is not None:
            try:
                policy = json.loads(set_.read())
            except json.JSONDecodeError as exc:
                raise click.UsageError(f"--set: {set_.name} is not JSON: {exc}") from None
            if not isinstance(policy, dict):
                raise click.UsageError(f"--set: {set_.name} must hold a JSON object (the policy)")
        else:
            policy = dict(current["policy"])
        for key, value in (("min", min_), ("max", max_), ("provider", provider)):
            if value is not None:
                policy[key] = None if value == "none" else value
        _print(c.put_pool_policy(name, policy, version=current["version"] if version_ is None else version_,
                                 comment=comment))


@pools.command("history")
@click.argument("name")
@opt("--limit", default=20, type=click.IntRange(1, 500))
@click.pass_context
def pools_history(ctx: click.Context, name: str, limit: int) -> None:
    """A pool's policy versions, newest first."""
    with _client(ctx) as c:
        _print(c.pool_policy_history(name, limit))


@pools.command("demand")
@click.argument("name")
@click.pass_context
def pools_demand(ctx: click.Context, name: str) -> None:
    """What the pool's work asks for now: queued, busy, idle, and the machines wanted (target)."""
    with _client(ctx) as c:
        _print(c.pool_demand(name))


@pools.group("maintenance", cls=_Group)
def pools_maintenance() -> None:
    """Rolling OS updates of a pool's machines, as its policy's maintenance says."""


@pools_maintenance.command("start")
@click.argument("name")
@opt("--reason", default="", help="why: kept with the campaign and its events")
@opt("--machine", "machines", multiple=True, help="only this machine (repeat it); default: every machine up")
@opt("--wait/--no-wait", default=False, help="follow it until it ends, a line at each change")
@click.pass_context
def maintenance_start(ctx: click.Context, name: str, reason: str, machines: tuple[str, ...], wait: bool) -> None:
    """Update the pool's machines a few at a time: drain, update, reboot, re-verify, back."""
    with _client(ctx) as c:
        campaign = c.start_maintenance(name, reason=reason, machines=list(machines) or None)
        if not wait:
            _print(campaign)
            return
        _follow_maintenance(c, name, campaign)


@pools_maintenance.command("show")
@click.argument("name")
@click.argument("campaign_id", required=False, type=int)
@opt("--wait/--no-wait", default=False, help="follow the campaign until it ends")
@click.pass_context
def maintenance_show(ctx: click.Context, name: str, campaign_id: int | None, wait: bool) -> None:
    """A campaign (by its id), or the pool's latest ones."""
    with _client(ctx) as c:
        if wait:
            found = c.maintenance(name, campaign_id) if campaign_id is not None else (c.maintenance(name, limit=1) or [None])[0]
            if found is None:
                raise click.ClickException(f"pool {name!r} has had no maintenance")
            _follow_maintenance(c, name, found)
        else:
            _print(c.maintenance(name, campaign_id))


@pools_maintenance.command("cancel")
@click.argument("name")
@click.argument("campaign_id", type=int)
@opt("--reason", default="")
@click.pass_context
def maintenance_cancel(ctx: click.Context, name: str, campaign_id: int, reason: str) -> None:
    """Take no more machines out; those already on their way finish."""
    with _client(ctx) as c:
        _print(c.cancel_maintenance(name, campaign_id, reason=reason))


def _follow_maintenance(c: Any, name: str, campaign: dict[str, Any], interval: float = 2.0) -> None:
    """Progress on stderr, a line at each change; the campaign as it ended on stdout."""
    said = ""
    while True:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(campaign["counts"].items()))
        line = f"maintenance {campaign['id']} of {name}: {campaign['state']} — {counts}"
        if campaign.get("detail"):
            line += f" ({campaign['detail']})"
        if line != said:
            click.echo(line, err=True)
            said = line
        if campaign["state"] in ("done", "cancelled", "stalled"):
            break
        time.sleep(interval)
        campaign = c.maintenance(name, campaign["id"])
    _print(campaign)
    if campaign["counts"].get("failed") or campaign["state"] == "stalled":
        raise SystemExit(1)
