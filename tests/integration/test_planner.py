"""The capacity planner on short synthetic days: the real store, scheduler and pool
controller on a fake clock (``deskfleet.planner``), and ``deskfleet plan`` as a subprocess.

The days are an hour or two long, with a controller pass every 10 s and machines that take
a minute to come up, so that a whole search takes seconds.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest

from deskfleet.errors import ConfigError
from deskfleet.planner import (
    Arrival,
    Demand,
    Plan,
    WaitTarget,
    autoscaled_policy,
    evaluate,
    plan,
    read_demand,
    static_policy,
)
from deskfleet.pools import PoolPolicy

BOOT, TICK = 60.0, 10.0
TARGET = WaitTarget(p95=30.0)


def write_day(path: Path, rows: list[tuple[float, float]], automation: str = "job") -> Path:
    path.write_text("at,automation,seconds\n" + "".join(f"{at},{automation},{s}\n" for at, s in rows))
    return path


def peaky(path: Path) -> Demand:
    """Two hours: a run every 2 minutes, and from 01:10 to 01:25 a burst of one every 4 s."""
    quiet = [(float(t), 40.0) for t in range(0, 7200, 120)]
    burst = [(4200.0 + t, 45.0) for t in range(0, 900, 4)]
    return read_demand(write_day(path / "peaky.csv", sorted(quiet + burst)))


def flat(path: Path) -> Demand:
    """An hour of one run every 8 s, each 40 s: five machines busy, all the time."""
    return read_demand(write_day(path / "flat.csv", [(float(t), 40.0) for t in range(0, 3600, 8)]))


@pytest.fixture(scope="module")
def peaky_plan(tmp_path_factory: pytest.TempPathFactory) -> Plan:
    return plan(peaky(tmp_path_factory.mktemp("peaky")), TARGET, boot=BOOT, tick=TICK)


def test_the_static_pool_found_is_the_smallest_that_meets_the_target(peaky_plan: Plan) -> None:
    n = peaky_plan.static.policy.min
    assert peaky_plan.static.policy.max == n and peaky_plan.static.meets
    fewer = evaluate(peaky_plan.demand, static_policy(n - 1), TARGET, boot=BOOT, tick=TICK)
    assert not fewer.meets, f"{n - 1} machines meet the target too: {fewer.summary()}"
    assert fewer.wait("p95") > TARGET.p95 >= peaky_plan.static.wait("p95")
    # the search dropped N - 1 as soon as the burst had made it miss, with the same verdict
    dropped = next(c for c in peaky_plan.candidates if c.label == f"static {n - 1}")
    assert dropped.stopped_at is not None and 4200 < dropped.stopped_at < 5100 and not dropped.meets
    # the static pool has its machines all day, and no more
    assert peaky_plan.static.most_machines == n and peaky_plan.static.machine_hours == pytest.approx(2 * n, rel=0.01)


def test_on_a_peaky_day_the_autoscaled_pool_meets_the_target_with_fewer_machine_hours(peaky_plan: Plan) -> None:
    auto = peaky_plan.autoscaled
    assert auto is not None and auto.meets, [c.summary() for c in peaky_plan.candidates]
    assert peaky_plan.recommended is auto
    assert peaky_plan.ratio is not None and peaky_plan.ratio < 0.75, peaky_plan.ratio
    assert auto.most_machines <= peaky_plan.static.policy.min  # never more than the static pool
    # it grew for the burst and shrank after it
    before = [s.up for s in auto.samples if s.at < 3000]
    during = max(s.up for s in auto.samples if 4200 <= s.at < 5100)
    after = [s.up for s in auto.samples if s.at >= 6600]
    assert during > max(before) and during > max(after), (before, during, after)


def test_on_a_flat_day_autoscaling_saves_little(tmp_path: Path) -> None:
    result = plan(flat(tmp_path), TARGET, boot=BOOT, tick=TICK)
    assert result.static.meets
    ratio = result.ratio if result.ratio is not None else 1.0  # none better: the static pool is the answer
    assert 0.8 <= ratio <= 1.0, [c.summary() for c in result.candidates]


def test_a_policy_given_is_evaluated_as_it_is(tmp_path: Path) -> None:
    given = PoolPolicy(min=1, max=3, provider="hyperv")  # too small for five busy machines
    result = plan(flat(tmp_path), TARGET, boot=BOOT, tick=TICK, policy=given)
    assert result.given and result.autoscaled is not None
    assert result.autoscaled.policy == given
    assert not result.autoscaled.meets and result.recommended is result.static and result.ratio is None
    assert result.autoscaled.stopped_at is None and result.autoscaled.wait("p95") > TARGET.p95  # its whole day
    assert not [c.label for c in result.candidates if c.label.startswith("autoscaled")]  # no search


def test_the_autoscaled_floors_follow_the_hourly_profile_in_a_few_blocks() -> None:
    # hour h has peaks[h] runs starting together: as many at once, if none waited
    peaks = [1, 1, 5, 9, 9, 5, 7, 6, 2, 1]
    day = Demand(tuple(Arrival(h * 3600.0 + 1, "job", 60.0) for h, n in enumerate(peaks) for _ in range(n)),
                 dt.date(2026, 3, 4), "Europe/Berlin")
    assert day.busy_peaks() == peaks
    policy = autoscaled_policy(day, 1.0, cap=20)
    # Five blocks at most, each at its highest hour, with the fewest floor machine-hours:
    # the lunch dip (5) goes under the afternoon's 7, the morning's ramp (5) stays its own.
    assert (policy.min, policy.max) == (1, 20)
    assert [(s.cron, s.hours, s.floor, s.timezone) for s in policy.schedule] == [
        ("0 2 * * *", 1, 5, "Europe/Berlin"), ("0 3 * * *", 2, 9, "Europe/Berlin"),
        ("0 5 * * *", 3, 7, "Europe/Berlin"), ("0 8 * * *", 2, 2, "Europe/Berlin")]
    # never above the cap; no floors at all: min 0, nothing scheduled
    assert max(s.floor for s in autoscaled_policy(day, 1.0, cap=6).schedule) == 6
    assert autoscaled_policy(day, 0.0, cap=6) == PoolPolicy(min=0, max=6)


def test_at_may_be_seconds_a_time_of_day_or_a_date_time(tmp_path: Path) -> None:
    f = tmp_path / "day.csv"
    f.write_text("automation,at,seconds,note\n"
                 "a,3600,30,first\n"
                 "b,01:00:30,20,\n"
                 "c,2026-03-04T00:01:00+00:00,10,x\n"  # 01:01 in Berlin
                 ',"01:01:30",5,\n')  # quoted, and no automation: "job"
    d = read_demand(f, zone="Europe/Berlin")
    assert [(a.at, a.automation, a.seconds) for a in d.arrivals] == [
        (3600.0, "a", 30.0), (3630.0, "b", 20.0), (3660.0, "c", 10.0), (3690.0, "job", 5.0)]
    assert str(d.date) == "2026-03-04" and d.zone == "Europe/Berlin" and d.hours == 2


@pytest.mark.parametrize(("rows", "said"), [
    ("0,job,30\n60,job,abc\n", "line 3, column 'seconds': 'abc' is not a number of seconds"),
    ("0,job,30\n60,job,-5\n", "line 3, column 'seconds': '-5' is not a run's duration"),
    ("0,job,30\nsoon,job,30\n", "line 3, column 'at': 'soon' is neither seconds"),
    ("0,job,30\n\n90000,job,30\n", "line 4, column 'at': '90000' is outside the day"),
    ("0,job,30\n60,job\n", "line 3: 2 fields, but the header names 3"),
    ("2026-03-04T08:00,job,30\n2026-03-05T08:00,job,30\n",
     "line 3, column 'at': '2026-03-05T08:00' is not on 2026-03-04, the day of line 2"),
])
def test_a_bad_row_is_one_line_naming_its_line_and_column(tmp_path: Path, rows: str, said: str) -> None:
    f = tmp_path / "bad.csv"
    f.write_text("at,automation,seconds\n" + rows)
    with pytest.raises(ConfigError) as caught:
        read_demand(f)
    assert said in str(caught.value) and "\n" not in str(caught.value)


def test_a_file_without_the_columns_says_which(tmp_path: Path) -> None:
    f = tmp_path / "bad.csv"
    f.write_text("when,secs\n1,2\n")
    with pytest.raises(ConfigError, match="line 1: no column 'at'"):
        read_demand(f)


def deskfleet(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deskfleet", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120, check=False)


def test_the_cli_plans_a_day_and_writes_its_plot_and_json(tmp_path: Path) -> None:
    # Half an hour: ten minutes quiet, then a short burst.
    rows = [(float(t), 30.0) for t in range(0, 1800, 150)] + [(600.0 + t, 30.0) for t in range(0, 300, 5)]
    write_day(tmp_path / "day.csv", sorted(rows))
    done = deskfleet("plan", "--demand", "day.csv", "--json", "--out", "out", "--boot", "60", "--tick", "10",
                     "--wait-p95", "30", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["target"] == {"p95": 30.0} and result["demand"]["runs"] == len(rows)
    assert result["static"]["meets"] and result["recommended"] in ("static", "autoscaled")
    png, saved = Path(tmp_path / result["plot"]), Path(tmp_path / result["json"])
    assert png.parent == tmp_path / "out" and png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert json.loads(saved.read_text()) == result
    # progress on stderr: a line per candidate
    lines = done.stderr.splitlines()
    assert sum(line.strip().startswith("static ") for line in lines) >= 2, done.stderr


def test_the_cli_says_what_is_wrong_with_a_row_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "day.csv").write_text("at,automation,seconds\n0,job,30\n10,job,forever\n")
    done = deskfleet("plan", "--demand", "day.csv", cwd=tmp_path)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == "deskfleet: day.csv, line 3, column 'seconds': 'forever' is not a number of seconds\n"
