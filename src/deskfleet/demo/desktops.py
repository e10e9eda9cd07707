"""The two kinds of desktop the demo can bring up, and what differs between them.

- :class:`RealDesktops` (the default): each machine is an Xvfb display with DemoEHR on
  it, driven through its pixels by an agent (``deskfleet agent --desktop xvfb``). Real Tk
  apps are slower than the simulator, so the workload is sized for a minute or two. Its
  faults are DemoEHR's: MFA at every login, an idle session timeout (made to strike by a
  quiet spell between two waves of work), a crash after a patient was saved and a freeze
  on the way to the form (scripted: each happens once, whatever the seed), and error
  dialogs, crashes and freezes at seeded rates. Effects are counted in DemoEHR's records.
- :class:`SimDesktops` (``--desktop sim``): simulated desktops, many per process, for
  scale; the workload and faults of the simulator's presets, unchanged.

Both give the runner a description, the agent command line, the workload in waves, the
requests that must be refused, and the double-effect check the report runs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import DemoConfig

NAMES = ("Ada Lovelace", "Alan Turing", "Grace Hopper", "Edsger Dijkstra", "Barbara Liskov",
         "Donald Knuth", "Frances Allen", "John Backus", "Leslie Lamport", "Radia Perlman")

#: (automation, input, submit options)
Work = tuple[str, dict[str, Any], dict[str, Any]]
#: (what is asked, automation, input, submit options)
BadRequest = tuple[str, str, dict[str, Any], dict[str, Any]]


@dataclass(slots=True)
class Wave:
    work: list[Work]
    quiet_before: float = 0.0  # seconds of no work before this wave (sessions expire)
    why: str = ""


class DemoDesktops(Protocol):
    kind: str
    noun: str  # "real desktops (Xvfb + DemoEHR)"
    #: the automations of which a run is cancelled while running (empty: any)
    cancel_running: tuple[str, ...]

    def queued_cancels(self, work: list[Work]) -> set[int]:
        """Which runs of the first wave are cancelled while still queued."""

    def agent_args(self, url: str, first: int, count: int) -> list[str]: ...

    def waves(self) -> list[Wave]: ...

    def bad_requests(self) -> list[BadRequest]: ...

    def double_effects(self, runs: list[dict[str, Any]]) -> list[str]: ...

    def accounts(self) -> tuple[str, dict[str, Any], int]:
        """The app's accounts for the vault: (pack, name → credential, max_sessions)."""


def desktops_for(config: DemoConfig, out: Path) -> DemoDesktops:
    return RealDesktops(config, out) if config.desktop == "xvfb" else SimDesktops(config, out)


def _common_args(config: DemoConfig, out: Path, url: str, first: int) -> list[str]:
    return ["agent", "--orchestrator", url, "--machine", "desk", "--sim-first", str(first),
            "--sim-seed", str(config.seed), "--state-dir", str(out / "agents"),
            "--enrolment-token-file", str(out / "data" / "enrolment-token")]


# -- simulated desktops -------------------------------------------------------------------------------


@dataclass
class SimDesktops:
    config: DemoConfig
    out: Path
    kind: str = "sim"
    noun: str = "simulated desktops"
    cancel_running: tuple[str, ...] = ()

    def accounts(self) -> tuple[str, dict[str, Any], int]:
        from ..sim.backend import SimBackend

        # SimEHR does not end an older session: every machine may share an account.
        return "simehr", dict(SimBackend.credentials(self.config.seed)), self.config.machines

    def queued_cancels(self, work: list[Work]) -> set[int]:
        rng = random.Random(self.config.seed + 1)
        return set(rng.sample(range(len(work) // 2, len(work)), min(2, len(work) // 2))) if len(work) >= 8 else set()

    def agent_args(self, url: str, first: int, count: int) -> list[str]:
        c = self.config
        return [*_common_args(c, self.out, url, first), "--sim", str(count), "--sim-faults", c.faults,
                "--sim-backend", str(self.out / "agents" / "ehr.db"), "--action-delay", str(c.action_delay)]

    def waves(self) -> list[Wave]:
        rng = random.Random(self.config.seed)
        created: list[str] = []
        out: list[Work] = []
        for i in range(self.config.runs):
            options: dict[str, Any] = {"deadline": 600, "progress_timeout": 6, "attempt_timeout": 120,
                                       "idempotency_key": f"demo-{self.config.seed}-{i}"}
            roll = rng.random()
            if rng.random() < 0.15:
                options["session_key"] = rng.choice(["clinic-a", "robot2"])
            if rng.random() < 0.1:
                options["priority"] = 5
            if i < 3 or roll < 0.6 or not created:
                mrn = f"D{self.config.seed}-{i:05d}"
                created.append(mrn)
                dob = f"{rng.randint(1930, 2020)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
                out.append(("ehr.create_patient", {"mrn": mrn, "name": rng.choice(NAMES), "dob": dob}, options))
            elif roll < 0.88:
                out.append(("ehr.lookup_patient", {"mrn": rng.choice(created)}, options))
            else:
                out.append(("ehr.export_summary", {"mrn": rng.choice(created)}, options))
        return [Wave(out)]

    def bad_requests(self) -> list[BadRequest]:
        return [
            ("an automation nobody offers", "ehr.discharge_patient", {"mrn": "X"}, {}),
            ("input that fails the schema", "ehr.create_patient", {"mrn": "bad mrn!", "name": "X"}, {}),
            ("labels no machine has", "ehr.lookup_patient", {"mrn": "X"}, {"labels": {"site": "mars"}}),
        ]

    def double_effects(self, runs: list[dict[str, Any]]) -> list[str]:
        from collections import Counter

        from ..sim.backend import SimBackend

        effects = []
        backend = SimBackend(self.out / "agents" / "ehr.db", seed=self.config.seed)
        try:
            for mrn, n in backend.duplicates().items():
                effects.append(f"MRN {mrn} was created {n} times")
            for r in runs:
                if r["automation"] == "ehr.create_patient" and r["state"] == "succeeded":
                    n = backend.count_by_mrn(r["input"]["mrn"])
                    if n != 1:
                        effects.append(f"run {r['id']} succeeded but MRN {r['input']['mrn']} has {n} records")
            exports = Counter(r["input"]["mrn"] for r in runs if r["automation"] == "ehr.export_summary")
            for mrn, asked in exports.items():
                done = backend.count_exports(mrn)
                if done > asked:
                    effects.append(f"MRN {mrn}: {done} summaries exported for {asked} requests")
        finally:
            backend.close()
        return effects


# -- real desktops ------------------------------------------------------------------------------------


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
class RealDesktops:
    config: DemoConfig
    out: Path
    kind: str = "xvfb"
    noun: str = "real desktops (Xvfb + DemoEHR)"
    #: not a create: wave 2 updates the patients wave 1 created
    cancel_running: tuple[str, ...] = ("demoehr.search_patient", "demoehr.update_patient")

    def accounts(self) -> tuple[str, dict[str, Any], int]:
        from ..demoapp import credentials

        return "demoehr", dict(credentials(self.config.seed)), 1  # a robot logs in on one machine at a time

    def queued_cancels(self, work: list[Work]) -> set[int]:
        """The last search of the first wave (still queued right after it was submitted)."""
        searches = [i for i, (automation, _, _) in enumerate(work) if automation == "demoehr.search_patient"]
        return {searches[-1]} if searches else set()

    @property
    def faults(self) -> RealFaults:
        return REAL_PRESETS[self.config.faults]

    @property
    def records_path(self) -> Path:
        return self.out / "agents" / "demoehr.db"

    def agent_args(self, url: str, first: int, count: int) -> list[str]:
        return [*_common_args(self.config, self.out, url, first), "--desktop", "xvfb", "--xvfb", str(count),
                "--app-data", str(self.records_path),
                *(f"--app-option={o}" for o in self.faults.app_options())]

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

    def bad_requests(self) -> list[BadRequest]:
        return [
            ("an automation nobody offers", "demoehr.discharge_patient", {"mrn": "X"}, {}),
            ("input that fails the schema", "demoehr.create_patient", {"mrn": "bad mrn!", "name": "X"}, {}),
            ("labels no machine has", "demoehr.search_patient", {"mrn": "X"}, {"labels": {"site": "mars"}}),
        ]

    def double_effects(self, runs: list[dict[str, Any]]) -> list[str]:
        from ..demoapp import Records

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
