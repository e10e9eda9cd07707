"""A pool's policy: how many machines it has, when, and how they come and go.

One object per pool, validated here, versioned by the store (each change is a new version;
a change made against an older version than the current one is refused with 409), read
and changed through ``/v1/pools/{name}/policy`` and ``deskfleet pools policy``::

    {
      "min": 2, "max": 40,
      "provider": "local",                       # who creates machines (None: managed elsewhere)
      "machine": {"image": "ehr-golden-2026-11", "labels": {"site": "fra"}},
      "schedule": [                              # known peak hours: a floor while each holds
        {"cron": "0 8 * * mon-fri", "hours": 10, "floor": 20, "timezone": "Europe/Berlin"}
      ],
      "warm": {"min": 1, "max": 10, "headroom": 1.5},
      "scale_in": {"stabilization": 300, "drain_timeout": 600},
      "maintenance": {"windows": [{"cron": "0 1 * * sun", "hours": 5}], "max_unavailable": "10%"},
      "ready_time": 180,
      "artifacts": {"retention": "30d"}          # screenshots and files kept this long
    }

What the numbers mean, for the controller (``fleet.controller``) and for an external
autoscaler reading ``/v1/pools/{name}/demand``:

- **floor** at a time: ``min``, raised by every schedule entry that holds then. A schedule
  floor is wanted by the time its cron fires, so the controller looks ``ready_time`` ahead.
- **warm buffer**: idle machines kept ready beyond the work in hand, so that a burst does
  not wait for machines to boot: as many as runs are expected to arrive while a new
  machine becomes ready (arrival rate times ``ready_time`` times ``headroom``), within ``warm.min``
  and ``warm.max``.
- **target**: queued + busy + warm buffer, at least the floor, at most ``max``.
- **scale in**: down to the highest target of the last ``stabilization`` seconds, the
  oldest idle machines first; drained first, destroyed once idle (one still busy after
  ``drain_timeout`` is put back in service). A machine holding a lease is never destroyed.
- **maintenance**: how a rolling update (``POST /v1/pools/{name}/maintenance``) takes the
  machines through their OS updates: only in its windows, at most ``max_unavailable`` out
  of service at once, and never so many that the machines left in service are fewer than
  the work in hand (busy + queued).
- **fence**: a run whose machine went silent mid-run, and which is neither idempotent nor
  found done by its reconcile check, is held back until the machine is fenced: powered
  off through the provider (the STONITH of cluster managers), or — without one that can —
  until the lost attempt's own timeout has passed.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .config import RETENTION_HINT, parse_retention

#: seconds a new machine is taken to need to become ready until one has been measured
DEFAULT_READY_TIME = 180.0
NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Window(_Strict):
    """A recurring span of time: from each time ``cron`` fires (in ``timezone``), for ``hours``."""

    cron: str = Field(description="when it begins: five fields, e.g. '0 8 * * mon-fri'")
    hours: float = Field(gt=0, le=24 * 7, description="how long it holds from each start")
    timezone: str = Field(default="UTC", description="an IANA zone, e.g. 'Europe/Berlin'")

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        if len(value.split()) != 5:
            raise ValueError(f"{value!r} is not a cron expression of five fields (minute hour day month weekday)")
        try:
            CronSim(value, dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
        except CronSimError as exc:
            raise ValueError(f"{value!r} is not a cron expression: {exc}") from None
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not a time zone (IANA names, e.g. 'Europe/Berlin' or 'UTC')") from None
        return value

    def holds_at(self, t: float) -> bool:
        """Whether a start lies within ``hours`` before ``t`` (epoch seconds)."""
        zone = ZoneInfo(self.timezone)
        at = dt.datetime.fromtimestamp(t, zone)
        # The latest start at or before ``t``: CronSim yields strictly earlier times in
        # reverse, so ask from just after ``t``.
        last = next(CronSim(self.cron, at + dt.timedelta(seconds=1), reverse=True), None)
        return last is not None and t - last.timestamp() < self.hours * 3600


class ScheduleFloor(Window):
    """A floor for known peak hours: from each time ``cron`` fires (in ``timezone``), for
    ``hours``, the pool keeps at least ``floor`` machines."""

    floor: int = Field(ge=0, le=100_000)


class WarmBuffer(_Strict):
    """Idle, logged-in machines kept beyond the work in hand, sized from the arrival rate."""

    min: int = Field(default=0, ge=0, le=10_000)
    max: int = Field(default=10, ge=0, le=10_000)
    headroom: float = Field(default=1.0, ge=0, le=100, description="times (arrival rate times ready time)")

    @model_validator(mode="after")
    def _bounds(self) -> WarmBuffer:
        if self.max < self.min:
            raise ValueError(f"warm.max ({self.max}) is below warm.min ({self.min})")
        return self


class ScaleIn(_Strict):
    stabilization: float = Field(default=300.0, ge=0, le=86_400,
                                 description="seconds of targets scale-in looks back over: it goes down to their highest")
    drain_timeout: float = Field(default=600.0, gt=0, le=86_400,
                                 description="seconds a machine being retired may finish its run before it is destroyed anyway")


class Recycle(_Strict):
    """When a machine is refreshed, always between runs: its app restarted after so many runs,
    above so much memory or when its memory grows run after run (a leak); the machine
    rebooted — or, with a provider, rebuilt — after a maximum age."""

    after_runs: int | None = Field(default=None, ge=1, le=1_000_000,
                                   description="restart the app after this many runs since it (re)started")
    above_mb: float | None = Field(default=None, gt=0, le=1_000_000,
                                   description="restart the app when its memory is above this many MB")
    leak_mb_per_run: float | None = Field(default=None, gt=0, le=100_000, description=(
        "restart the app when its memory grows by more than this many MB a run (least squares over leak_window runs)"))
    leak_window: int = Field(default=10, ge=3, le=1000, description="runs the memory trend is measured over")
    max_age_hours: float | None = Field(default=None, gt=0, le=24 * 365,
                                        description="reboot (or rebuild) a machine up for longer than this")
    age_action: Literal["reboot", "rebuild"] = Field(default="reboot", description=(
        "after max_age_hours: reboot the machine, or destroy it for a new one (with a provider)"))

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.after_runs, self.above_mb, self.leak_mb_per_run, self.max_age_hours))


class Maintenance(_Strict):
    """How a rolling update takes the pool's machines through their OS updates: a few at a
    time, in the pool's windows, never below the work in hand.

    Each machine is cordoned and drained (its run ends first: nothing is interrupted),
    updated (through the pool's provider, or by its agent running its pack's update hook),
    rebooted, and re-verified — back with a new boot
    id, its pre-flight passed — before it is put back in service."""

    windows: list[Window] = Field(default_factory=list, max_length=50, description=(
        "when maintenance may take machines out of service; none: at any time. A machine "
        "already on its way finishes outside the window"))
    max_unavailable: int | str = Field(default=1, description=(
        "machines out of service at once, for maintenance or anything else: a count, or a "
        "percentage of the pool ('10%', rounded down, at least 1)"))
    update: Literal["provider", "reboot", "pack"] = Field(default="provider", description=(
        "'provider': apply OS updates through the provider's update, then reboot; 'reboot': only reboot "
        "(updates already staged, a golden image refreshed on boot); 'pack': the machine's agent runs its "
        "packs' update hook ([hooks] update), then the provider reboots it"))
    timeout: float = Field(default=3600.0, gt=0, le=7 * 86_400, description=(
        "seconds a machine may take from its update's start until it is verified back; "
        "longer, and it is left out of service and counted as failed"))

    @field_validator("max_unavailable")
    @classmethod
    def _max_unavailable(cls, value: int | str) -> int | str:
        if isinstance(value, int):
            if value < 1:
                raise ValueError("max_unavailable must be at least 1 machine (or a percentage such as '10%')")
            return value
        text = value.strip()
        number = text[:-1] if text.endswith("%") else ""
        try:
            percent = float(number)
        except ValueError:
            raise ValueError(f"max_unavailable {value!r} is neither a count nor a percentage such as '10%'") from None
        if not 0 < percent <= 100:
            raise ValueError(f"max_unavailable {value!r}: a percentage above 0 and at most 100")
        return text

    def unavailable_allowed(self, machines: int) -> int:
        """Machines that may be out of service at once in a pool of ``machines``."""
        if isinstance(self.max_unavailable, int):
            return self.max_unavailable
        return max(1, math.floor(machines * float(self.max_unavailable[:-1]) / 100 + 1e-9))

    def open_at(self, t: float) -> bool:
        """Whether maintenance may take a machine out of service at ``t``."""
        return not self.windows or any(w.holds_at(t) for w in self.windows)


class MachineTemplate(_Strict):
    """What a new machine of the pool is made from, for its provider."""

    image: str | None = Field(default=None, max_length=500, description="template, launch template or image id")
    labels: dict[str, str] = Field(default_factory=dict)
    name_prefix: str | None = Field(default=None, max_length=64, pattern=NAME,
                                    description="new machines are named <prefix>-<n> (default: the pool's name)")


class Artifacts(_Strict):
    """How long the screenshots and files of the pool's runs and machines are kept."""

    retention: str | float | None = Field(default=None, description=(
        "how long artifacts are kept: a duration (30d, 12h, 90m, 2w) or seconds; 0 or 'forever' keeps them; "
        "none: the server's --artifact-retention. An automation's own artifact_retention comes first"))

    @field_validator("retention")
    @classmethod
    def _retention(cls, value: str | float | None) -> str | float | None:
        try:
            parse_retention(value)
        except ValueError:
            raise ValueError(f"artifacts.retention {value!r}: {RETENTION_HINT}") from None
        return value.strip() if isinstance(value, str) else value

    @property
    def retention_seconds(self) -> float | None:
        """Seconds; 0.0: for good; None: the server's default."""
        return parse_retention(self.retention)


class PoolPolicy(_Strict):
    min: int = Field(default=0, ge=0, le=100_000, description="machines the pool always has")
    max: int | None = Field(default=None, ge=1, le=100_000,
                            description="machines the pool may have at most (needed with a provider; none: no cap)")
    provider: str | None = Field(default=None, max_length=64, pattern=NAME,
                                 description="the provider that creates the pool's machines; none: managed elsewhere")
    machine: MachineTemplate = Field(default_factory=MachineTemplate)
    schedule: list[ScheduleFloor] = Field(default_factory=list, max_length=50)
    warm: WarmBuffer = Field(default_factory=WarmBuffer)
    scale_in: ScaleIn = Field(default_factory=ScaleIn)
    recycle: Recycle = Field(default_factory=Recycle)
    maintenance: Maintenance = Field(default_factory=Maintenance)
    ready_time: float | None = Field(default=None, gt=0, le=86_400,
                                     description="seconds a new machine takes to become ready; default: as measured")
    fence: Literal["auto", "provider", "attempt_timeout", "agent"] = Field(default="auto", description=(
        "before a run whose machine went silent mid-run is retried (neither idempotent nor done, by its "
        "reconcile): 'provider' powers the machine off through the pool's provider first (STONITH); "
        "'attempt_timeout' waits until the lost attempt's own timeout has passed; 'agent' retries at once, "
        "trusting the agent's self-fencing (input gate, fenced effects); 'auto': 'provider' if the pool has one, "
        "else 'agent'"))
    artifacts: Artifacts = Field(default_factory=Artifacts)

    @model_validator(mode="after")
    def _consistent(self) -> PoolPolicy:
        if self.recycle.max_age_hours is not None and self.recycle.age_action == "rebuild" and self.provider is None:
            raise ValueError("recycle.age_action 'rebuild' needs a provider to make the new machine")
        if self.fence == "provider" and self.provider is None:
            raise ValueError("fence 'provider' needs a provider that can power the pool's machines off")
        if self.provider is not None and self.max is None:
            raise ValueError("a pool with a provider needs max: the most machines it may create")
        if self.max is not None:
            if self.max < self.min:
                raise ValueError(f"max ({self.max}) is below min ({self.min})")
            for i, s in enumerate(self.schedule):
                if s.floor > self.max:
                    raise ValueError(f"schedule[{i}].floor ({s.floor}) is above max ({self.max})")
        return self

    @property
    def fencing(self) -> str:
        """How a silent machine's run is fenced before it is retried: provider, attempt_timeout or agent."""
        if self.fence == "auto":
            return "provider" if self.provider is not None else "agent"
        return self.fence

    @property
    def managed(self) -> bool:
        """Whether deskfleet creates and destroys this pool's machines (it has a provider)."""
        return self.provider is not None

    def floor_at(self, t: float) -> int:
        """The fewest machines wanted at ``t``: ``min``, raised by the schedule floors holding then."""
        return max([self.min, *(s.floor for s in self.schedule if s.holds_at(t))])

    def warm_target(self, arrival_rate: float, ready_time: float) -> int:
        """Idle machines to keep: the runs expected while a new machine becomes ready."""
        wanted = math.ceil(arrival_rate * ready_time * self.warm.headroom - 1e-9)
        return min(max(wanted, self.warm.min), self.warm.max)

    def target(self, *, queued: int, busy: int, arrival_rate: float, now: float,
               ready_time: float | None = None) -> int:
        """Machines wanted now: the work in hand and a warm buffer, at least the floor
        (looking ``ready_time`` ahead), at most ``max``."""
        ready = self.ready_time or ready_time or DEFAULT_READY_TIME
        wanted = queued + busy + self.warm_target(arrival_rate, ready)
        floor = max(self.floor_at(now), self.floor_at(now + ready))
        wanted = max(wanted, floor)
        return wanted if self.max is None else min(wanted, self.max)
