"""Pool policies: what is refused, and what a policy asks of a pool at a given time."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from deskfleet.pools import DEFAULT_READY_TIME, PoolPolicy, ScheduleFloor

BERLIN = ZoneInfo("Europe/Berlin")
PEAK = {"cron": "0 8 * * mon-fri", "hours": 10, "floor": 20, "timezone": "Europe/Berlin"}


def at(*args: int, zone: ZoneInfo = BERLIN) -> float:
    return dt.datetime(*args, tzinfo=zone).timestamp()


def refused(data: dict) -> str:
    with pytest.raises(ValidationError) as exc:
        PoolPolicy.model_validate(data)
    return str(exc.value)


def test_a_policy_that_cannot_hold_is_refused_with_what_to_fix():
    assert "max (2) is below min (5)" in refused({"min": 5, "max": 2})
    assert "needs max" in refused({"provider": "local"})
    assert "schedule[0].floor (20) is above max (10)" in refused({"max": 10, "schedule": [PEAK]})
    assert "greater than or equal to 1" in refused({"max": 0})
    assert "'0 25 * * *' is not a cron expression: Bad hour" in refused(
        {"schedule": [{**PEAK, "cron": "0 25 * * *"}]})
    assert "five fields" in refused({"schedule": [{**PEAK, "cron": "0 8 * *"}]})
    assert "'Mars/Olympus' is not a time zone" in refused({"schedule": [{**PEAK, "timezone": "Mars/Olympus"}]})
    assert "warm.max (1) is below warm.min (3)" in refused({"warm": {"min": 3, "max": 1}})
    assert "Extra inputs are not permitted" in refused({"minimum": 3})  # a typo is not silently ignored
    assert "greater than 0" in refused({"schedule": [{**PEAK, "hours": 0}]})


def test_a_rolling_update_applies_the_os_updates_three_ways_and_a_fourth_is_refused_naming_them():
    for how in ("provider", "reboot", "pack"):
        assert PoolPolicy.model_validate({"maintenance": {"update": how}}).maintenance.update == how
    assert PoolPolicy().maintenance.update == "provider"
    assert "Input should be 'provider', 'reboot' or 'pack'" in refused({"maintenance": {"update": "agent"}})


def test_a_schedule_floor_holds_from_each_start_for_its_hours_in_its_own_time_zone():
    peak = ScheduleFloor.model_validate(PEAK)
    monday = (2026, 12, 7)
    assert not peak.holds_at(at(*monday, 7, 59))
    assert peak.holds_at(at(*monday, 8, 0))
    assert peak.holds_at(at(*monday, 17, 59))
    assert not peak.holds_at(at(*monday, 18, 0))
    assert not peak.holds_at(at(2026, 12, 5, 12, 0))  # Saturday
    # 08:00 in Berlin is 07:00 UTC in winter, 06:00 UTC in summer: the zone decides, not UTC.
    utc = ZoneInfo("UTC")
    assert peak.holds_at(at(*monday, 7, 0, zone=utc)) and not peak.holds_at(at(*monday, 6, 59, zone=utc))
    assert peak.holds_at(at(2026, 7, 6, 6, 0, zone=utc)) and not peak.holds_at(at(2026, 7, 6, 5, 59, zone=utc))
    # A floor spanning midnight holds into the next day.
    night = ScheduleFloor(cron="0 22 * * *", hours=4, floor=3)
    assert night.holds_at(at(2026, 12, 8, 1, 30, zone=utc)) and not night.holds_at(at(2026, 12, 8, 2, 0, zone=utc))


def test_the_target_is_the_work_in_hand_and_a_warm_buffer_within_floor_and_max():
    p = PoolPolicy.model_validate({"min": 2, "max": 40, "provider": "local", "schedule": [PEAK],
                                   "warm": {"min": 1, "max": 10, "headroom": 1.5}, "ready_time": 120})
    night = at(2026, 12, 7, 3, 0)
    # Quiet: the floor (min 2) and the warm minimum.
    assert p.target(queued=0, busy=0, arrival_rate=0.0, now=night) == 2
    assert p.target(queued=0, busy=1, arrival_rate=0.0, now=night) == 2  # 1 busy + 1 warm
    # Arrivals size the warm buffer: 0.05/s * 120 s * 1.5 = 9 runs while a new machine gets ready.
    assert p.warm_target(0.05, 120) == 9
    assert p.target(queued=3, busy=5, arrival_rate=0.05, now=night) == 3 + 5 + 9
    assert p.warm_target(1.0, 120) == 10  # at most warm.max
    # Never above max.
    assert p.target(queued=100, busy=30, arrival_rate=1.0, now=night) == 40
    # The schedule's floor, wanted ready by its start: it counts from ready_time before.
    assert p.target(queued=0, busy=0, arrival_rate=0.0, now=at(2026, 12, 7, 7, 57)) == 2
    assert p.target(queued=0, busy=0, arrival_rate=0.0, now=at(2026, 12, 7, 7, 58)) == 20
    assert p.target(queued=0, busy=0, arrival_rate=0.0, now=at(2026, 12, 7, 12, 0)) == 20
    # No max: the demand is reported as it is (a pool managed elsewhere, say).
    free = PoolPolicy()
    assert free.target(queued=70, busy=30, arrival_rate=0.0, now=night) == 100
    assert free.target(queued=0, busy=0, arrival_rate=0.01, now=night, ready_time=None) == \
        round(0.01 * DEFAULT_READY_TIME)  # measured ready time unknown: the default
