"""The server's Prometheus metrics (``GET /metrics``): runs submitted, finished and retried,
attempts assigned, stale writes refused, scheduling passes, connected agents. One
:class:`Metrics` per server process, built by the orchestrator and handed to the parts that count."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.submitted = Counter("deskfleet_runs_submitted", "Runs accepted", registry=r)
        self.finished = Counter("deskfleet_runs_finished", "Runs that reached a final state", ["state"], registry=r)
        self.retried = Counter("deskfleet_runs_retried", "Attempts that ended with the run requeued", ["reason"], registry=r)
        self.assigned = Counter("deskfleet_attempts_assigned", "Attempts handed to agents", registry=r)
        self.stale = Counter("deskfleet_stale_writes_rejected", "Agent writes refused for a lost lease", registry=r)
        self.schedule_seconds = Histogram(
            "deskfleet_schedule_seconds", "One scheduling pass (match and claim)", registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )
        self.connected = Gauge("deskfleet_agents_connected", "Agents with an open connection", registry=r)
