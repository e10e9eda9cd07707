"""SimEHR's demo: ``deskfleet demo --desktop sim`` (the ``simehr`` pack's demo hook) — the
workload and faults of the simulator's presets on many simulated desktops, for scale."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deskfleet import Credential
from deskfleet.demo import NAMES, BadRequest, DemoConfig, Wave, Work

from .backend import SimBackend


@dataclass
class SimEHRDemo:
    """SimEHR's demo on simulated desktops: ``deskfleet demo --desktop sim``."""

    config: DemoConfig
    out: Path
    data: Path  # SimEHR's {data} on the demo's machines: the shared backend file is there
    noun: str = "simulated desktops"
    desktops: tuple[str, ...] = ("sim",)
    cancel_running: tuple[str, ...] = ()

    @property
    def max_sessions(self) -> int:
        return self.config.machines  # SimEHR does not end an older session: every machine may share one

    def queued_cancels(self, work: list[Work]) -> set[int]:
        rng = random.Random(self.config.seed + 1)
        return set(rng.sample(range(len(work) // 2, len(work)), min(2, len(work) // 2))) if len(work) >= 8 else set()

    @property
    def backend_path(self) -> Path:
        return self.data / "ehr.db"

    def agent_args(self) -> list[str]:
        c = self.config
        return ["--sim-seed", str(c.seed), "--sim-faults", c.faults, "--sim-backend", str(self.backend_path),
                "--action-delay", str(c.action_delay)]

    def accounts(self) -> dict[str, Credential]:
        return SimBackend.credentials(self.config.seed)

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

    def burst(self) -> list[Work]:
        """The autoscaling phase's runs: units of work (``sim.work``) whose effect the backend
        counts by key, so a double effect would show."""
        return [("sim.work", {"key": f"burst-{self.config.seed}-{i}", "seconds": 4.0},
                 {"attempt_timeout": 120, "idempotency_key": f"demo-{self.config.seed}-burst-{i}"})
                for i in range(6)]

    def bad_requests(self) -> list[BadRequest]:
        return [
            ("an automation nobody offers", "ehr.discharge_patient", {"mrn": "X"}, {}),
            ("input that fails the schema", "ehr.create_patient", {"mrn": "bad mrn!", "name": "X"}, {}),
            ("labels no machine has", "ehr.lookup_patient", {"mrn": "X"}, {"labels": {"site": "mars"}}),
        ]

    def double_effects(self, runs: list[dict[str, Any]]) -> list[str]:
        effects = []
        backend = SimBackend(self.backend_path, seed=self.config.seed)
        try:
            for mrn, n in backend.duplicates().items():
                effects.append(f"MRN {mrn} was created {n} times")
            for r in runs:
                if r["automation"] == "ehr.create_patient" and r["state"] == "succeeded":
                    n = backend.count_by_mrn(r["input"]["mrn"])
                    if n != 1:
                        effects.append(f"run {r['id']} succeeded but MRN {r['input']['mrn']} has {n} records")
            for key, n in backend.work_counts().items():
                if n > 1:
                    effects.append(f"the work {key!r} was done {n} times")
            exports = Counter(r["input"]["mrn"] for r in runs if r["automation"] == "ehr.export_summary")
            for mrn, asked in exports.items():
                done = backend.count_exports(mrn)
                if done > asked:
                    effects.append(f"MRN {mrn}: {done} summaries exported for {asked} requests")
        finally:
            backend.close()
        return effects

    def fault_log(self) -> None:
        return None  # the simulator's faults are told by the orchestrator's events


def demo(config: DemoConfig, out: Path, data: Path) -> SimEHRDemo:
    """The ``demo`` hook of the simehr pack."""
    return SimEHRDemo(config, out, data)
