"""How a demo is asked for: the desktop kind, the pack, how many machines and runs, the
faults, where the report goes (``deskfleet demo``'s options)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

#: desktop kind → (machines, runs) by default
DEFAULTS = {"xvfb": (4, 120), "sim": (6, 120)}
#: real desktops on one machine at most: each is an X server, a Tk app and an agent's share
MAX_REAL = 16


@dataclass(slots=True)
class DemoConfig:
    desktop: str = "xvfb"  # xvfb: real desktops (Xvfb + the pack's app); sim: simulated desktops
    pack: str = ""  # the pack to demo (a directory or an installed name); "": the one with a demo for `desktop`
    machines: int = 0  # 0: the desktop kind's default
    runs: int = 0  # 0: the desktop kind's default
    faults: str = "demo"
    seed: int = 7
    out: Path = Path("demo-output")
    port: int = 0
    kill_agent: bool = True
    agent_processes: int = 2
    action_delay: float = 0.04
    timeout: float = 900.0  # give up waiting for the workload after this many seconds
    live: bool | None = None  # live terminal view; default: when stdout is a terminal

    def __post_init__(self) -> None:
        if self.desktop not in DEFAULTS:
            raise ValueError(f"desktop must be one of {', '.join(DEFAULTS)}")
        machines, runs = DEFAULTS[self.desktop]
        self.machines = self.machines or machines
        self.runs = self.runs or runs
        if self.desktop == "xvfb" and self.machines > MAX_REAL:
            raise ConfigError(f"{self.machines} real desktops are too many for one machine (at most {MAX_REAL}, "
                              "each an X server, an app and its agent); for scale use --desktop sim")
