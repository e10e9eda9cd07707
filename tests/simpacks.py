"""Copies of the shipped SimEHR pack at other versions, for tests of pack rollouts.

Each copy is a directory pack — SimEHR's model and manifest with another ``[pack] version``,
a module that re-exports SimEHR's playbooks and automations — plus one automation of its
own, ``simehr.which``, that answers with the copy's version: a run shows which version of
the pack served it. ``broken=True`` makes a copy that loads (and builds) but fails ``pack
check``: its manifest names a recovery for a screen its model does not have. The shipped
pack is left as it is.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import deskfleet.sim

SIM = Path(deskfleet.sim.__file__).parent

MODULE = '''"""SimEHR at version {version}: a copy for tests of pack rollouts."""

from pydantic import BaseModel

from deskfleet import Context, automation
from deskfleet.sim.pack import *  # noqa: F403

VERSION = "{version}"


class Nothing(BaseModel):
    pass


class Which(BaseModel):
    version: str


@automation(name="simehr.which", idempotent=True, required_state="any")
async def which(ctx: Context, data: Nothing) -> Which:
    """Which version of the pack ran this."""
    return Which(version=VERSION)
'''


def sim_pack(dest: Path, version: str, *, broken: bool = False) -> Path:
    """A copy of SimEHR at ``version`` in ``dest`` (created); its directory."""
    dest.mkdir(parents=True)
    shutil.copytree(SIM / "model", dest / "model")
    manifest = []
    for line in (SIM / "pack.toml").read_text().splitlines():
        if line.startswith("version = "):
            line = f'version = "{version}"'
        if line.startswith("demo = "):
            continue  # the demo's hook is the shipped pack's own
        manifest.append(line)
        if broken and line == "[states.recover]":
            manifest.append('ghost = "dismiss"  # no such screen: `pack check` refuses it')
    (dest / "pack.toml").write_text("\n".join(manifest) + "\n")
    (dest / "pack.py").write_text(MODULE.format(version=version))
    (dest / "fleet.py").write_text("from deskfleet.sim.fleet import make_desktops  # noqa: F401\n")
    (dest / "backend.py").write_text("from deskfleet.sim.backend import demo_accounts  # noqa: F401\n")
    (dest / "updates.py").write_text("from deskfleet.sim.updates import update  # noqa: F401\n")
    return dest
