"""What ``bench/peers.py`` prints and draws: the tables, the ratios, the plot.

Absolute figures move about 3x between two machines of our kind and with whatever else runs
on a shared one, so the comparison is given as ratios between systems measured in the same
run: each peer's figure divided by deskfleet's, and deskfleet's by each peer's, with the
absolute values beside them. Pure functions of the result dictionary that ``peers.py``
writes as JSON, so they are tested without any server.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

from rich.table import Table

BASE = "deskfleet"


class Measure(NamedTuple):
    name: str  # as the tables and the JSON name it
    path: tuple[str, ...]  # where it is in one system's result
    unit: str
    higher_is_better: bool


#: the figures compared as ratios (counts such as runs lost are not: 2 against 0 is no ratio)
MEASURES = (
    Measure("drain rate", ("throughput", "backlog", "runs_per_s"), "runs/s", True),
    Measure("dispatch p50", ("throughput", "dispatch_ms", "p50"), "ms", False),
    Measure("dispatch p99", ("throughput", "dispatch_ms", "p99"), "ms", False),
    Measure("queue wait p50 (failover load)", ("queue_wait_ms", "p50"), "ms", False),
    Measure("queue wait p99 (failover load)", ("queue_wait_ms", "p99"), "ms", False),
    Measure("recovery p50", ("recovery_s", "p50"), "s", False),
    Measure("recovery max", ("recovery_s", "max"), "s", False),
)
COUNTS = (("runs lost", "lost"), ("executed twice", "executed_twice"), ("failed loudly", "failed"))


def value(system: dict[str, Any], path: tuple[str, ...]) -> float | None:
    """The figure at ``path``, or None where it is missing, not a number, or "never"."""
    v: Any = system
    for part in path:
        if not isinstance(v, dict) or part not in v:
            return None
        v = v[part]
    if not isinstance(v, int | float) or isinstance(v, bool) or math.isnan(v):
        return None
    return float(v)


def ratio(a: float | None, b: float | None) -> float | None:
    """a ÷ b, or None when either is unknown or b is 0."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def ratios(systems: dict[str, dict[str, Any]], base: str = BASE) -> dict[str, dict[str, dict[str, Any]]]:
    """For every peer and measure: both values and the ratios both ways, e.g.
    ``{"celery": {"drain rate": {"value": 610.0, "deskfleet": 305.0, "peer_over_deskfleet": 2.0,
    "deskfleet_over_peer": 0.5, "unit": "runs/s", "deskfleet_better": False}}}``.
    ``deskfleet_better`` is None where a ratio cannot be made."""
    if base not in systems:
        return {}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, system in systems.items():
        if name == base:
            continue
        out[name] = {}
        for m in MEASURES:
            mine, theirs = value(systems[base], m.path), value(system, m.path)
            over = ratio(theirs, mine)
            better = None if over is None or over == 1 else (over < 1) == m.higher_is_better
            out[name][m.name] = {"value": theirs, BASE: mine, "unit": m.unit, "peer_over_deskfleet": over,
                                 "deskfleet_over_peer": ratio(mine, theirs), "deskfleet_better": better}
    return out


def _x(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}x"


def _num(v: float | None, unit: str = "") -> str:
    if v is None:
        return "—"
    digits = 0 if abs(v) >= 100 else 1 if abs(v) >= 10 else 2
    return f"{v:,.{digits}f}{' ' + unit if unit else ''}"


def ratio_table(result: dict[str, Any]) -> Table:
    """One row per measure: every system's value, then each peer ÷ deskfleet and deskfleet ÷
    each peer. Counts (lost, twice, failed) are shown as they are, without ratios."""
    systems = result["systems"]
    rs = result.get("ratios") or ratios(systems)
    peers = [s for s in systems if s != BASE]
    t = Table(title="ratios, one run (a peer ÷ deskfleet > 1: the peer's figure is larger)")
    t.add_column("measure")
    for s in systems:
        t.add_column(s, justify="right")
    for p in peers:
        t.add_column(f"{p} ÷ {BASE}", justify="right")
    for p in peers:
        t.add_column(f"{BASE} ÷ {p}", justify="right")
    for m in MEASURES:
        if all(value(systems[s], m.path) is None for s in systems):
            continue
        better = "higher" if m.higher_is_better else "lower"
        row = [f"{m.name}, {m.unit} ({better} is better)"]
        row += [_num(value(systems[s], m.path)) for s in systems]
        row += [_x(rs.get(p, {}).get(m.name, {}).get("peer_over_deskfleet")) for p in peers]
        row += [_x(rs.get(p, {}).get(m.name, {}).get("deskfleet_over_peer")) for p in peers]
        t.add_row(*row)
    for label, key in COUNTS:
        if not result["plan"].get("runs"):
            break  # no failover section: nothing could be lost
        t.add_row(label, *[str(systems[s].get(key, "—")) for s in systems], *[""] * (2 * len(peers)))
    return t


def throughput_table(result: dict[str, Any]) -> Table:
    """The throughput section: how each system was fed, and its figures."""
    t = Table(title="throughput: empty runs (sim.noop), same machines")
    for col in ("system", "dispatch p50 ms", "p90 ms", "p99 ms", "samples", "backlog", "submitted in s",
                "submit runs/s", "drain runs/s", "steady runs/s", "machines' CPU ms/run", "server CPU ms/run"):
        t.add_column(col, justify="left" if col == "system" else "right")
    for name, r in result["systems"].items():
        tp = r.get("throughput")
        if not tp:
            continue
        d, b = tp["dispatch_ms"], tp["backlog"]
        drained = "" if b["drained"] else f" ({b['finished']} of {b['runs']})"
        t.add_row(name, _num(value(d, ("p50",))), _num(value(d, ("p90",))), _num(value(d, ("p99",))), str(d["n"]),
                  str(b["runs"]), _num(value(b, ("submit_s",))), _num(value(b, ("submit_per_s",))),
                  _num(value(b, ("runs_per_s",))) + drained, _num(value(b, ("steady_runs_per_s",))),
                  _num(value(b, ("machines_cpu_ms_per_run",))), _num(value(b, ("server_cpu_ms_per_run",))))
    return t


def summary_lines(result: dict[str, Any]) -> list[str]:
    """deskfleet's figures as ratios to each peer's, in words."""
    lines = []
    for peer, ms in (result.get("ratios") or ratios(result["systems"])).items():
        parts = [f"{m} {_x(r['deskfleet_over_peer'])}" for m, r in ms.items() if r["deskfleet_over_peer"] is not None]
        if parts:
            lines.append(f"deskfleet ÷ {peer}: " + ", ".join(parts))
    return lines


def _s(v: float | None, digits: int = 1) -> str:
    return "never" if v is None else "—" if isinstance(v, float) and math.isnan(v) else f"{v:.{digits}f}"


def failover_tables(result: dict[str, Any]) -> list[Table]:
    plan = result["plan"]
    t = Table(title=f"failover: {plan['machines']} machines, {plan['runs']} runs, {len(plan['kills'])} kills "
                    f"(seed {plan['seed']})")
    for col in ("system", "queue wait p50 ms", "p99 ms", "lost", "executed twice", "failed loudly",
                "recovery p50 s", "recovery max s", "all done after s"):
        t.add_column(col, justify="left" if col == "system" else "right")
    for name, r in result["systems"].items():
        rec = r["recovery_s"]
        worst = "never" if rec["never"] else _s(rec["max"])
        p50 = _s(rec["p50"]) if rec["n"] else "—"
        if rec["never"] and rec["p50"] is None:
            p50 = "never"
        done = _s(r["done_after_s"]) + ("" if r["all_final"] else " (not all)")
        t.add_row(name, _s(r["queue_wait_ms"]["p50"]), _s(r["queue_wait_ms"]["p99"]), str(r["lost"]),
                  str(r["executed_twice"]), str(r["failed"]), p50, worst, done)
    k = Table(title="the kills")
    for col in ("system", "at s", "machine", "run", "into its run", "effect before kill", "recovered after s",
                "how", "effects", "outcome"):
        k.add_column(col)
    for name, r in result["systems"].items():
        for d in r["kills"]:
            if not d.get("machine"):
                k.add_row(name, f"{d['planned_at']:.1f}", "—", d.get("note", ""), "", "", "", "", "", "")
                continue
            k.add_row(name, f"{d['offset']:.1f}", d["machine"], d["key"], f"{d['elapsed']:.2f} of {d['seconds']:.2f} s",
                      "yes" if d["effect_before_kill"] else "no", _s(d["recovered_after_s"]), d["recovered_by"],
                      str(d["effects"]), d["outcome"])
    return [t, k]


COLORS = {"deskfleet": "#1f77b4", "celery": "#2ca02c", "procrastinate": "#d62728"}


def plot(result: dict[str, Any], path: Path) -> None:
    """Top row, throughput: dispatch latency, the backlog draining, the ratios; bottom row,
    failover: queue wait, recovery after each kill, runs lost / twice / failed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    systems = list(result["systems"])
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    (t1, t2, t3), (ax1, ax2, ax3) = axes

    def cdf(ax: Any, values_s: list[float], label: str) -> None:
        ms = sorted(1000 * w for w in values_s)
        if ms:
            ax.step([max(w, 0.1) for w in ms], [(i + 1) / len(ms) for i in range(len(ms))], where="post",
                    label=label, color=COLORS.get(label))

    for s in systems:
        tp = result["systems"][s].get("throughput")
        if tp:
            cdf(t1, tp["dispatch_s"], s)
            done = tp["finished_after_s"]
            t2.plot(done, range(1, len(done) + 1), label=f"{s}: {_num(value(tp, ('backlog', 'runs_per_s')))} runs/s",
                    color=COLORS.get(s))
    t1.set_xscale("log")
    t1.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    t1.xaxis.set_minor_formatter(NullFormatter())
    t1.set_xlabel("dispatch, ms (submit → started on a machine, idle pool)")
    t1.set_ylabel("fraction of runs")
    t1.set_title("dispatch latency, empty runs one at a time")
    t1.grid(True, alpha=0.3)
    t1.legend()
    t2.set_xlabel("seconds after the first submit call")
    t2.set_ylabel("runs finished")
    t2.set_title("a backlog of empty runs draining (batch submit)")
    t2.grid(True, alpha=0.3)
    t2.legend()
    rs = result.get("ratios") or ratios(result["systems"])
    peers = list(rs)
    names = [m.name.replace(" (failover load)", "\n(failover)") for m in MEASURES]
    width = 0.8 / max(1, len(peers))
    for i, p in enumerate(peers):
        vals = [rs[p][m.name]["peer_over_deskfleet"] for m in MEASURES]
        ys = [y + (i - (len(peers) - 1) / 2) * width for y in range(len(MEASURES))]
        # bars from 1 (the same as deskfleet) to the ratio, on a log scale: left is smaller
        t3.barh([y for y, v in zip(ys, vals, strict=True) if v is not None],
                [v - 1 for v in vals if v is not None], height=width, left=1, label=f"{p} ÷ deskfleet",
                color=COLORS.get(p))
        for y, v in zip(ys, vals, strict=True):
            if v is not None:
                t3.text(v, y, f" {v:.2f}x", va="center", fontsize=8)
    t3.axvline(1.0, color="black", lw=1)
    t3.set_xscale("log")
    t3.xaxis.set_major_locator(FixedLocator([0.1, 0.25, 0.5, 1, 2, 4, 10]))
    t3.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    t3.xaxis.set_minor_formatter(NullFormatter())
    t3.set_yticks(range(len(MEASURES)), names, fontsize=8)
    t3.invert_yaxis()
    t3.set_title("peer ÷ deskfleet (1 = the same; drain: higher is better,\nthe others: lower is better)")
    t3.grid(True, axis="x", alpha=0.3)
    t3.legend(fontsize=8)

    for s in systems:
        cdf(ax1, result["systems"][s]["queue_waits_s"], s)
    if not result["plan"].get("runs"):
        ax1.text(0.5, 0.5, "no failover section in this run", ha="center", transform=ax1.transAxes)
    ax1.set_xscale("log")
    ax1.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax1.set_xlabel("queue wait, ms (submit → work started)")
    ax1.set_ylabel("fraction of runs")
    ax1.set_title("failover section: queue wait")
    ax1.grid(True, alpha=0.3)
    if result["plan"].get("runs"):
        ax1.legend()
    horizon = max(r["done_after_s"] for r in result["systems"].values())
    for i, s in enumerate(systems):
        for d in result["systems"][s]["kills"]:
            if not d.get("machine"):
                continue
            v = d["recovered_after_s"]
            marker = "s" if d["effect_before_kill"] else "o"
            if v is None:
                ax2.scatter([i], [horizon], marker="x", color=COLORS.get(s), s=60)
            else:
                ax2.scatter([i], [v], marker=marker, color=COLORS.get(s), s=50, alpha=0.8)
    ax2.set_xticks(range(len(systems)), systems)
    ax2.set_ylabel("seconds")
    ax2.set_title("SIGKILL → run taken up elsewhere\n(● before its effect, ■ after, x never)")
    ax2.grid(True, axis="y", alpha=0.3)
    ax2.set_xlim(-0.5, len(systems) - 0.5)
    ax2.set_ylim(bottom=0)
    measures = ("lost", "executed_twice", "failed")
    width = 0.8 / max(1, len(systems))
    for i, s in enumerate(systems):
        vals = [result["systems"][s][m] for m in measures]
        xs = [j + (i - (len(systems) - 1) / 2) * width for j in range(len(measures))]
        ax3.bar(xs, vals, width=width, label=s, color=COLORS.get(s))
        for x, v in zip(xs, vals, strict=True):
            ax3.text(x, v, str(v), ha="center", va="bottom", fontsize=9)
    ax3.set_xticks(range(len(measures)), ["lost", "executed twice", "failed loudly"])
    ax3.set_title("failover section: runs")
    ax3.yaxis.get_major_locator().set_params(integer=True)
    ax3.legend()
    plan = result["plan"]
    tp = result.get("throughput_plan") or {}
    fig.suptitle(f"deskfleet, Celery, Procrastinate, one run ({result['when'][:16]}): {plan['machines']} machines; "
                 f"{tp.get('backlog', 0)} empty runs as a backlog; {plan['runs']} runs with "
                 f"{len(plan['kills'])} machines SIGKILLed mid-run")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
