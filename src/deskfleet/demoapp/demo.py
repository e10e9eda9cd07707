"""DemoEHR's demo: ``deskfleet demo`` on real desktops (the ``demoehr`` pack's demo hook).

Each machine is an Xvfb display with DemoEHR on it, driven through its pixels by an agent.
Real Tk apps are slower than the simulator, so the workload is sized for a minute or two.
Its faults are DemoEHR's: MFA at every login, an idle session timeout (made to strike by a
quiet spell between two waves of work), a crash after a patient was saved and a freeze on
the way to the form (scripted: each happens once, whatever the seed), and error dialogs,
crashes and freezes at seeded rates. Effects are counted in DemoEHR's records file.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deskfleet import Credential
from deskfleet.demo import NAMES, BadRequest, DemoConfig, FaultTaken, Wave, Work

from .records import Records, credentials


@dataclass(frozen=True, slots=True)
class RealFaults:
    """DemoEHR's switches for a fault preset (see ``python -m deskfleet.demoapp --help``)."""

    mfa: bool = False
    session_timeout: float | None = None
    error_rate: float = 0.0
    crash_rate: float = 0.0
    freeze_rate: float = 0.0
    scripted: dict[str, str] = field(default_factory=dict)  # "crash" → "saved:1"

    def app_options(self) -> list[str]:
        out = ["--mfa"] if self.mfa else []
        if self.session_timeout:
            out.append(f"--session-timeout={self.session_timeout:g}")
        for name in ("error_rate", "crash_rate", "freeze_rate"):
            if getattr(self, name):
                out.append(f"--{name.replace('_', '-')}={getattr(self, name):g}")
        out += [f"--{kind}-at={steps}" for kind, steps in self.scripted.items()]
        return out


# Per step (a run takes 1-4 steps, a login 2): over the default 120 runs on 4 desktops
# (~400 steps) the demo preset expects ~12 random error dialogs, ~3 random crashes and
# ~2 random freezes, on top of one scripted crash after a save (→ reconcile), one scripted
# freeze on the way to the form (→ watchdog) and one scripted error dialog mid-update.
REAL_PRESETS: dict[str, RealFaults] = {
    "none": RealFaults(),
    "demo": RealFaults(mfa=True, session_timeout=6.0, error_rate=0.03, crash_rate=0.008, freeze_rate=0.006,
                       scripted={"crash": "saved:1", "freeze": "open_form:1", "error": "open_edit:1"}),
    "chaos": RealFaults(mfa=True, session_timeout=6.0, error_rate=0.08, crash_rate=0.03, freeze_rate=0.02,
                        scripted={"crash": "saved:2", "freeze": "open_form:1", "error": "open_edit:2"}),
}


@dataclass
class DemoEHRDemo:
    """DemoEHR's demo on real desktops: what ``deskfleet demo --pack demoehr`` runs."""

    config: DemoConfig
    out: Path
    data: Path  # DemoEHR's {data} on the demo's machines: its records file is there
    noun: str = "real desktops (Xvfb + DemoEHR)"
    desktops: tuple[str, ...] = ("xvfb",)
    #: not a create: wave 2 updates the patients wave 1 created
    cancel_running: tuple[str, ...] = ("demoehr.search_patient", "demoehr.update_patient")
    max_sessions: int = 1  # a robot logs in on one machine at a time

    def queued_cancels(self, work: list[Work]) -> set[int]:
        """The last search of the first wave (still queued right after it was submitted)."""
        searches = [i for i, (automation, _, _) in enumerate(work) if automation == "demoehr.search_patient"]
        return {searches[-1]} if searches else set()

    @property
    def faults(self) -> RealFaults:
        return REAL_PRESETS[self.config.faults]

    @property
    def records_path(self) -> Path:
        return self.data / "demoehr.db"

    def agent_args(self) -> list[str]:
        options = [f"--seed={self.config.seed}", *self.faults.app_options()]
        timeout = self.faults.session_timeout
        return [*(f"--app-option={o}" for o in options),
                # The quiet spell is there to let every session expire: no upkeep here
                # (bench/upkeep.py measures what upkeep saves).
                *(["--app-idle-timeout", f"{timeout:g}", "--no-upkeep"] if timeout else [])]

    def accounts(self) -> dict[str, Credential]:
        return credentials(self.config.seed)

    def waves(self) -> list[Wave]:
        """Wave 1 registers patients (and looks some up); after a quiet spell longer than
        DemoEHR's idle timeout — every session expires — wave 2 looks them up and updates
        them, so that no update races the creation of its patient."""
        c = self.config
        rng = random.Random(c.seed)
        first_wave = max(1, round(c.runs * 0.6))
        created: list[str] = []
        waves: list[list[Work]] = [[], []]
        for i in range(c.runs):
            # Four attempts: at the demo's fault rates a run now and then meets two faults in a row.
            options: dict[str, Any] = {"deadline": 300, "progress_timeout": 6, "attempt_timeout": 60,
                                       "max_attempts": 4, "idempotency_key": f"demo-{c.seed}-{i}"}
            roll = rng.random()
            if rng.random() < 0.15:
                options["session_key"] = rng.choice(["clinic-a", "robot2"])
            if rng.random() < 0.1:
                options["priority"] = 5
            wave = 0 if i < first_wave else 1
            dob = f"{rng.randint(1930, 2020)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
            name = rng.choice(NAMES)
            if not created or (wave == 0 and (i < 3 or roll < 0.8)) or (wave == 1 and roll < 0.15):
                mrn = f"D{c.seed}-{i:04d}"
                if wave == 0:
                    created.append(mrn)
                waves[wave].append(("demoehr.create_patient", {"mrn": mrn, "name": name, "dob": dob}, options))
            elif wave == 0 or roll < 0.55:
                waves[wave].append(("demoehr.search_patient", {"mrn": rng.choice(created)}, options))
            else:
                waves[wave].append(("demoehr.update_patient", {"mrn": rng.choice(created), "name": name,
                                                               "dob": dob}, options))
        timeout = self.faults.session_timeout
        quiet = timeout + 1.5 if timeout else 0.0
        why = f"a quiet spell of {quiet:g}s: DemoEHR's {timeout:g}s idle timeout logs every desktop out" if timeout else ""
        return [Wave(waves[0]), Wave(waves[1], quiet, why)] if waves[1] else [Wave(waves[0])]

    def burst(self) -> list[Work]:
        """The autoscaling phase's runs: searches for patients the first wave registered, for
        a pool whose real desktops the pool controller makes on demand (each an agent with its
        own Xvfb and DemoEHR, sharing the records file)."""
        first = self.waves()[0].work
        mrns = [data["mrn"] for automation, data, _ in first if automation == "demoehr.create_patient"]
        return [("demoehr.search_patient", {"mrn": mrns[i % len(mrns)]},
                 {"attempt_timeout": 120, "max_attempts": 4, "idempotency_key": f"demo-{self.config.seed}-burst-{i}"})
                for i in range(4)]

    def bad_requests(self) -> list[BadRequest]:
        return [
            ("an automation nobody offers", "demoehr.discharge_patient", {"mrn": "X"}, {}),
            ("input that fails the schema", "demoehr.create_patient", {"mrn": "bad mrn!", "name": "X"}, {}),
            ("labels no machine has", "demoehr.search_patient", {"mrn": "X"}, {"labels": {"site": "mars"}}),
        ]

    def double_effects(self, runs: list[dict[str, Any]]) -> list[str]:
        effects = []
        records = Records(self.records_path)
        try:
            for mrn, n in records.duplicates().items():
                effects.append(f"MRN {mrn} was created {n} times")
            for r in runs:
                if r["automation"] == "demoehr.create_patient" and r["state"] == "succeeded":
                    n = len(records.find(r["input"]["mrn"]))
                    if n != 1:
                        effects.append(f"run {r['id']} succeeded but MRN {r['input']['mrn']} has {n} records")
        finally:
            records.close()
        return effects

    def fault_log(self) -> list[FaultTaken]:
        records = Records(self.records_path)
        try:
            return [FaultTaken(f.kind, f.step, f.machine, f.at, f.origin) for f in records.fault_log()]
        finally:
            records.close()


def demo(config: DemoConfig, out: Path, data: Path) -> DemoEHRDemo:
    """The ``demo`` hook of the demoehr pack."""
    return DemoEHRDemo(config, out, data)
