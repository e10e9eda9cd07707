"""The server's Prometheus metrics (``GET /metrics``).

Two kinds, told apart by a label:

- the **fleet's** figures, which the store keeps and counts (``store.metrics``): runs
  submitted and finished, attempts started and retried, stale writes refused, the queue-wait
  and run-duration histograms, and gauges of runs, machines and human tasks. Every replica
  shows the same numbers, read from the database at the scrape; a restart resets nothing.
  :class:`FleetCollector` turns a :class:`~deskfleet.store.metrics.FleetFigures` into metric
  families; the route reads the figures (through the store runner, off the event loop) and
  renders them with :meth:`Metrics.exposition`.
- this **process's** own: its scheduling passes and the agents connected to it, labelled
  ``replica`` (summing them over replicas is up to the query). One :class:`Metrics` per
  server process, built by the orchestrator and handed to the parts that count.

Names follow Prometheus' conventions: ``deskfleet_`` first, base units in the name
(``_seconds``), counters end in ``_total``, histograms are ``_bucket``/``_sum``/``_count``.
docs/observability.md lists them all.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .models import MACHINE_STATUSES
from .store.metrics import (
    ATTEMPTS_RETRIED,
    ATTEMPTS_STARTED,
    HISTOGRAMS,
    HUMAN_WAITING,
    QUEUE_WAIT,
    RUN_DURATION,
    RUNS_FINISHED,
    RUNS_SUBMITTED,
    STALE_WRITES,
    SUM,
    UNFINISHED,
    FleetFigures,
)

#: counters: help text and label names (as the store keeps them)
_COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    RUNS_SUBMITTED: ("Runs accepted (a replayed idempotent request makes none)", ("pool",)),
    RUNS_FINISHED: ("Runs that reached a final state, by state and error code ('' for a success)",
                    ("pool", "state", "error_code")),
    ATTEMPTS_STARTED: ("Attempts started: a run assigned to a machine under a lease", ("pool",)),
    ATTEMPTS_RETRIED: ("Attempts that ended with their run queued again, by how the attempt ended and why "
                       "the run was retried", ("pool", "ending", "reason")),
    STALE_WRITES: ("Agent writes refused because their attempt no longer held its lease (fencing)", ("op",)),
}
_HISTOGRAMS: dict[str, str] = {
    QUEUE_WAIT: "Seconds a run waited in the queue before an attempt was assigned (each attempt)",
    RUN_DURATION: "Seconds from a run's submit to its final state",
}
_HIST_LABELS = ("pool", "automation")


class FleetCollector(Collector):
    """The fleet's metric families from the figures read at the scrape."""

    def __init__(self, figures: FleetFigures) -> None:
        self.figures = figures

    def collect(self) -> Iterator[Metric]:
        f = self.figures
        by_family: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
        for name, labels, value in f.counts:
            by_family[name].append((labels, value))
        for name, (help_text, label_names) in _COUNTERS.items():
            counter = CounterMetricFamily(name, help_text, labels=label_names)
            for labels, value in sorted(by_family.get(name, ()), key=lambda lv: sorted(lv[0].items())):
                counter.add_metric([labels.get(n, "") for n in label_names], value)
            yield counter
        for name, help_text in _HISTOGRAMS.items():
            yield _histogram(name, help_text, HISTOGRAMS[name], by_family.get(name, ()), by_family.get(name + SUM, ()))

        pools = sorted(set(f.pools) | {p for p, _ in f.runs} | {p for p, _ in f.machines}
                       | {p for p, _ in f.human_tasks})
        runs = GaugeMetricFamily("deskfleet_runs", "Runs not yet final, by state (queue depth: state=\"queued\")",
                                 labels=("pool", "state"))
        oldest = GaugeMetricFamily("deskfleet_queue_oldest_wait_seconds",
                                   "Seconds the pool's oldest queued run has waited (0: none queued)", labels=("pool",))
        machines = GaugeMetricFamily("deskfleet_machines", "Machines by status (as GET /v1/machines shows it)",
                                     labels=("pool", "status"))
        human = GaugeMetricFamily("deskfleet_human_tasks_waiting", "Human tasks waiting for a person, by state",
                                  labels=("pool", "state"))
        for pool in pools:
            for state in UNFINISHED:
                runs.add_metric([pool, state], f.runs.get((pool, state), 0))
            queued_at = f.oldest_queued.get(pool)
            oldest.add_metric([pool], max(0.0, f.at - queued_at) if queued_at is not None else 0.0)
            for status in MACHINE_STATUSES:
                machines.add_metric([pool, status], f.machines.get((pool, status), 0))
            for state in HUMAN_WAITING:
                human.add_metric([pool, state], f.human_tasks.get((pool, state), 0))
        yield from (runs, oldest, machines, human)


def _histogram(name: str, help_text: str, bounds: Iterable[float], buckets: Iterable[tuple[dict[str, str], float]],
               sums: Iterable[tuple[dict[str, str], float]]) -> HistogramMetricFamily:
    """A histogram from its buckets' own counts (an observation in one bucket, by ``le``):
    each bound counts the observations of every bucket at or below it. A bucket whose bound
    is not among ``bounds`` (kept under bounds since changed) counts from the next bound up."""
    bounds = sorted(bounds)
    series: dict[tuple[str, ...], dict[float, float]] = defaultdict(dict)
    for labels, value in buckets:
        le = float(labels.get("le", "+Inf"))
        key = tuple(labels.get(n, "") for n in _HIST_LABELS)
        series[key][le] = series[key].get(le, 0.0) + value
    total_of = {tuple(labels.get(n, "") for n in _HIST_LABELS): value for labels, value in sums}
    family = HistogramMetricFamily(name, help_text, labels=_HIST_LABELS)
    for key in sorted(series):
        counts = series[key]
        cumulative = [(repr(float(b)), sum(n for le, n in counts.items() if le <= b)) for b in bounds]
        cumulative.append(("+Inf", sum(counts.values())))
        family.add_metric(list(key), cumulative, total_of.get(key, 0.0))
    return family


class _Labelled(Collector):
    """A registry's families with one more label on every sample (and without the
    ``_created`` samples, which say when this process began counting)."""

    def __init__(self, registry: CollectorRegistry, label: str, value: str) -> None:
        self.registry, self.label, self.value = registry, label, value

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            out = Metric(family.name, family.documentation, family.type, family.unit)
            for s in family.samples:
                if not s.name.endswith("_created"):
                    out.add_sample(s.name, {self.label: self.value, **s.labels}, s.value, s.timestamp, s.exemplar)
            yield out


class Metrics:
    """What only this process knows (its scheduling passes, its agents), and the rendering
    of every metric for a scrape."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.schedule_seconds = Histogram(
            "deskfleet_schedule_pass_seconds", "One scheduling pass of this replica (match and claim)", registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )
        self.connected = Gauge("deskfleet_agents_connected", "Agents with an open connection to this replica",
                               registry=r)

    def exposition(self, figures: FleetFigures, *, replica: str) -> bytes:
        """Every metric in Prometheus' text format: the fleet's from ``figures``, this
        process's labelled ``replica``."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(FleetCollector(figures))
        registry.register(_Labelled(self.registry, "replica", replica))
        return generate_latest(registry)
