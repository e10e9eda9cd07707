"""What the demo records as it runs — the runs it submitted and the ones refused, the moments
it struck the fleet from outside, its live feed — for the runner to fill and the report to tell."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Submitted:
    run_id: str
    automation: str
    mrn: str
    cancel: bool = False


@dataclass
class Moment:
    at: float
    what: str
    kind: str = ""  # agent_killed, display_killed: faults the demo causes from outside
    machines: list[str] = field(default_factory=list)  # the machines it struck


@dataclass
class DemoState:
    accepted: list[Submitted] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (what was asked, the API's answer)
    moments: list[Moment] = field(default_factory=list)
    feed: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    finished_in: float | None = None
