"""``deskfleet plan``: the capacity planner (``deskfleet.planner``) — its search on stderr,
its answer as a table or JSON, and a plot of the day."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..errors import ConfigError
from ._common import _print, _print_table, main, opt

if TYPE_CHECKING:  # the planner (the store, the controller) is imported when the command runs:
    # every other command starts without it
    from ..planner import Demand, Evaluation, Plan, Sample
    from ..pools import PoolPolicy

#: seconds in each bar of the plot's demand, and in each point of its lines
BUCKET = 300


@main.command("plan")
@opt("--demand", required=True, type=click.Path(dir_okay=False, path_type=Path), metavar="CSV",
     help="the day's runs: a header line, then at (seconds from the day's start, or an ISO time), "
          "automation (optional), seconds (the run's duration) — see docs/planner.md")
@opt("--wait-p95", default=None, type=click.FloatRange(min=0), metavar="SECONDS",
     help="the 95th percentile of queue wait to meet [default: 60, unless --wait-p99 is given]")
@opt("--wait-p99", default=None, type=click.FloatRange(min=0), metavar="SECONDS",
     help="the 99th percentile of queue wait to meet")
@opt("--boot", default=180.0, type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
     help="a new machine's time from create to ready")
@opt("--tick", default=5.0, type=click.FloatRange(min=0.5), metavar="SECONDS",
     help="seconds between the pool controller's passes")
@opt("--policy", "policy_file", default=None, type=click.Path(dir_okay=False, path_type=Path), metavar="JSON",
     envvar="DESKFLEET_PLAN_POLICY",
     help="a pool policy to evaluate as it is, instead of searching for one (the static pool is still "
          "found, to compare)")
@opt("--timezone", default="UTC", help="the time zone of the demand's clock, and of the schedule floors proposed")
@opt("--out", default=Path("."), type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
     help="where the plot (PNG) and the result (JSON) are written, named with the time")
@opt("--json", "as_json", is_flag=True, envvar="DESKFLEET_PLAN_JSON", help="print the result as JSON instead of a table")
def plan_command(demand: Path, wait_p95: float | None, wait_p99: float | None, boot: float, tick: float,
                 policy_file: Path | None, timezone: str, out: Path, as_json: bool) -> None:
    """Find the smallest pool that meets a queue-wait target for a day's demand.

    The day's runs are replayed through the real scheduler and pool controller, on
    simulated machines that take --boot seconds to come up, with a clock that runs as
    fast as the replay can go (under a minute per candidate for a full day). First the
    smallest static pool that meets the target; then an autoscaled pool — min, max and
    schedule floors from the demand's hourly profile, and the policy's warm buffer — with
    the fewest machine-hours that meets it. Progress goes to stderr, a line per candidate."""
    from ..planner import WaitTarget, plan, read_demand

    # Thousands of simulated scale decisions are not news: the controller's warnings still are.
    logging.getLogger("deskfleet.fleet.controller").setLevel(logging.WARNING)
    target = WaitTarget(p95=60.0 if wait_p95 is None and wait_p99 is None else wait_p95, p99=wait_p99)
    day = read_demand(demand, zone=timezone)
    given = _read_policy(policy_file) if policy_file is not None else None
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out: cannot make the directory {out}: {exc.strerror}") from None

    runs = len(day.arrivals)
    click.echo(f"replaying {runs:,} run{'s' * (runs != 1)} over {day.hours} h for each candidate; target {target}",
               err=True)
    began = time.monotonic()
    result = plan(day, target, boot=boot, tick=tick, policy=given,
                  progress=lambda e: click.echo(f"  {e.summary()}", err=True))
    click.echo(f"searched {len(result.candidates)} candidates in {time.monotonic() - began:.0f} s", err=True)

    name = f"plan-{demand.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    png, report = out / f"{name}.png", out / f"{name}.json"
    _plot(result, png, title=f"{demand.name}: {len(day.arrivals):,} runs, target {target}, boot {boot:g} s")
    data = {**result.to_json(), "plot": str(png), "json": str(report)}
    report.write_text(json.dumps(data, indent=2) + "\n")
    if as_json:
        _print(data)
    else:
        _table(result)
        click.echo(f"plot: {png}\nresult: {report}")


def _read_policy(path: Path) -> PoolPolicy:
    """A pool policy from a file: the policy itself, or the API's answer that holds it."""
    from pydantic import ValidationError

    from ..pools import PoolPolicy

    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"--policy: cannot read {path}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--policy: {path} is not JSON: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("policy"), dict):
        data = data["policy"]  # GET /v1/pools/{name}/policy
    try:
        policy = PoolPolicy.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "policy"
        raise ConfigError(f"--policy: {path}: {where}: {first['msg'].removeprefix('Value error, ')}") from None
    if policy.max is None:
        raise ConfigError(f"--policy: {path}: max is needed, the most machines the pool may have")
    return policy


def _table(result: Plan) -> None:
    from rich.table import Table

    from ..planner import format_wait

    d, chosen = result.demand, [result.static, *([result.autoscaled] if result.autoscaled is not None else [])]
    click.echo(f"demand: {len(d.arrivals):,} runs over {d.hours} h ({d.date}, {d.zone}); "
               f"{d.work_hours():.1f} machine-hours of work; at most {max(d.busy_peaks())} at once if none waited")
    table = Table("", *(_name(result, e) for e in chosen))
    table.add_row("machines", *(_size(e.policy) for e in chosen))
    table.add_row("schedule floors", *(_schedule(e.policy) for e in chosen))
    for name in ("p50", "p95", "p99", "max"):
        table.add_row(f"wait {name}", *(format_wait(e.wait(name)) for e in chosen))
    table.add_row("meets the target", *("yes" if e.meets else "no" for e in chosen))
    table.add_row("machine-hours", *(f"{e.machine_hours:.1f}" for e in chosen))
    table.add_row("machines created", *(str(e.created) for e in chosen))
    _print_table(table)
    kind = "your policy" if result.given else "autoscaled"
    if result.ratio is not None:
        click.echo(f"{kind} / static machine-hours: {result.ratio:.2f}")
    elif result.autoscaled is not None:
        click.echo(f"{kind} does not meet the target")
    else:
        click.echo("no autoscaled pool smaller than the static one meets the target")


def _name(result: Plan, e: Evaluation) -> str:
    kind = "static" if e is result.static else "your policy" if result.given else "autoscaled"
    return f"{kind} (recommended)" if e is result.recommended else kind


def _size(policy: PoolPolicy) -> str:
    return str(policy.min) if policy.min == policy.max else f"{policy.min} to {policy.max}"


def _schedule(policy: PoolPolicy) -> str:
    """Each floor as "08:00 +8 h: 9" (the planner's crons fire daily at a whole hour)."""
    said = []
    for s in policy.schedule:
        minute, hour = s.cron.split()[:2]
        said.append(f"{int(hour):02d}:{int(minute):02d} +{s.hours:g} h: {s.floor}")
    return "\n".join(said) or "—"


# -- the plot ----------------------------------------------------------------------------------------------


def _plot(result: Plan, path: Path, *, title: str) -> None:
    """Demand, supply, busy machines and queue wait over the day, for the policies of the
    table: what its numbers came from."""
    # The Agg canvas directly: no GUI backend, no pyplot state, nothing to close.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    d = result.demand
    buckets = d.hours * 3600 // BUCKET
    x = [(i + 0.5) * BUCKET / 3600 for i in range(buckets)]
    fig = Figure(figsize=(12, 9), layout="constrained")
    FigureCanvasAgg(fig)
    demand_ax, machines_ax, wait_ax = fig.subplots(3, 1, sharex=True)
    fig.suptitle(title)

    arrivals = [0] * buckets
    for a in d.arrivals:
        arrivals[int(a.at // BUCKET)] += 1
    demand_ax.bar(x, arrivals, width=BUCKET / 3600, color="tab:gray")
    demand_ax.set_ylabel(f"runs arriving\nper {BUCKET // 60} min")

    # the autoscaled pool (or the policy given) and the static one: the recommended is one of them
    shown = [*([result.autoscaled] if result.autoscaled is not None else []), result.static]
    for e, color in zip(shown, ("tab:blue", "tab:orange"), strict=False):
        name = _name(result, e)
        machines_ax.plot(x, _per_bucket(e, buckets, lambda s: s.up), color=color, label=f"{name}: machines up")
        machines_ax.plot(x, _per_bucket(e, buckets, lambda s: s.busy), color=color, linestyle=":",
                         label=f"{name}: busy")
        # dots as well as lines: a quiet hour's buckets with a run stand alone between empty ones
        wait_ax.plot(x, _longest_waits(d, e, buckets), color=color, marker=".", markersize=4, label=name)
    machines_ax.set_ylabel(f"machines\n(mean per {BUCKET // 60} min)")
    machines_ax.legend(loc="upper left", fontsize="small")
    wait_ax.set_ylabel("longest queue wait (s)\nof the runs arriving")
    for name, limit in result.target.limits():
        wait_ax.axhline(limit, color="tab:red", linestyle="--", linewidth=0.8, label=f"target {name} {limit:g} s")
    wait_ax.legend(loc="upper left", fontsize="small")
    wait_ax.set_xlabel("hour of the day")
    wait_ax.set_xlim(0, d.hours)
    wait_ax.set_xticks(range(0, d.hours + 1, max(1, d.hours // 12)))
    fig.savefig(path, dpi=100)


def _per_bucket(e: Evaluation, buckets: int, value: Callable[[Sample], int]) -> list[float]:
    """The mean of ``value`` over the samples in each bucket."""
    sums, counts = [0.0] * buckets, [0] * buckets
    for s in e.samples:
        i = min(int(s.at // BUCKET), buckets - 1)
        sums[i] += value(s)
        counts[i] += 1
    return [total / n if n else math.nan for total, n in zip(sums, counts, strict=True)]


def _longest_waits(d: Demand, e: Evaluation, buckets: int) -> list[float]:
    """The longest wait of the runs arriving in each bucket (none arriving, or never started: no point)."""
    longest = [math.nan] * buckets
    for a, wait in zip(d.arrivals, e.waits, strict=True):
        i = int(a.at // BUCKET)
        if not math.isinf(wait) and (math.isnan(longest[i]) or wait > longest[i]):
            longest[i] = wait
    return longest
