"""Write ``clinic-day.csv``: a day of a clinic's desktop automation runs, for ``deskfleet plan``.

The shape is a clinic's working day: a quiet night (results arriving from the lab, a few
runs an hour), a morning peak from 8 to 11 as appointments and admissions start, a dip at
lunch, an afternoon peak from 14 to 17, and a tail into the evening. Arrivals are a Poisson
process whose rate follows that profile minute by minute; each run is one of three EHR
automations, with its own spread of durations between 20 and 120 seconds.

A fixed seed makes the file the same on every run, so the example output in
docs/planner.md can be reproduced::

    python examples/demand/make_clinic_day.py            # writes examples/demand/clinic-day.csv
    python examples/demand/make_clinic_day.py -o day.csv
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

SEED = 20261207
#: runs an hour, at the middle of each hour of the day (interpolated between them)
HOURLY = [6, 5, 5, 5, 6, 8, 40, 150, 480, 540, 520, 330, 140, 160, 380, 420, 400, 220, 80, 45, 25, 15, 10, 8]
#: automation → (its share of the runs, shortest and longest duration in seconds, most likely duration)
AUTOMATIONS = {
    "ehr.lookup_patient": (0.5, 20.0, 60.0, 30.0),
    "ehr.book_appointment": (0.35, 40.0, 100.0, 60.0),
    "ehr.discharge_letter": (0.15, 60.0, 120.0, 90.0),
}


def rate_at(minute: float) -> float:
    """Runs a minute at ``minute`` of the day: the hourly rates joined by straight lines, so
    that a peak ramps up and down instead of jumping at the hour."""
    hour = minute / 60.0 - 0.5
    i = int(hour // 1) % 24
    frac = hour - (hour // 1)
    return (HOURLY[i] * (1 - frac) + HOURLY[(i + 1) % 24] * frac) / 60.0


def day(rng: random.Random) -> list[tuple[float, str, float]]:
    """(seconds from midnight, automation, duration) for every run of the day, in time order."""
    names = list(AUTOMATIONS)
    weights = [AUTOMATIONS[n][0] for n in names]
    runs = []
    for minute in range(24 * 60):
        # A minute's arrivals, one inter-arrival gap after another at that minute's rate.
        rate = rate_at(minute + 0.5)
        t = rng.expovariate(rate)
        while t < 1.0:
            name = rng.choices(names, weights)[0]
            _, low, high, mode = AUTOMATIONS[name]
            runs.append((round((minute + t) * 60.0, 1), name, round(rng.triangular(low, high, mode), 1)))
            t += rng.expovariate(rate)
    return runs


def write(path: Path) -> int:
    runs = day(random.Random(SEED))
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["at", "automation", "seconds"])
        for at, name, seconds in runs:
            whole = int(at)
            clock = f"{whole // 3600:02d}:{whole // 60 % 60:02d}:{whole % 60:02d}.{round((at - whole) * 10):d}"
            out.writerow([clock, name, f"{seconds:.1f}"])
    return len(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", type=Path, default=Path(__file__).with_name("clinic-day.csv"))
    args = parser.parse_args()
    print(f"{args.out}: {write(args.out)} runs")


if __name__ == "__main__":
    main()
