"""Two applications on one machine: an agent with two packs drives both on one display.

The second pack is a user's pack directory made here: DemoEHR's app, model and playbooks
under another name ("clinic"), its own records file (its ``{data}``), and automations of its
own. Both apps' windows lie at the same place on the same Xvfb display; before each
pre-flight the agent brings the app it is about to drive to the front, so each run sees its
own app — and each app keeps its own session.
"""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest

import deskfleet.demoapp
from deskfleet import load_pack
from deskfleet.client import AsyncClient
from deskfleet.demoapp import Records, credentials
from support import register_accounts

pytestmark = pytest.mark.e2e

MODULE = '''
from deskfleet import Context, automation
from deskfleet.demoapp.automations import MrnQuery, SearchResult, _back_home, _search
from deskfleet.demoapp.model import dismiss, go_home, keepalive, login, logout, mfa, responsive, signed_in_as


@automation(name="clinic.search_patient", idempotent=True)
async def search_patient(ctx: Context, data: MrnQuery) -> SearchResult:
    """The records with an MRN, in the clinic's system."""
    count, found = await _search(ctx, data.mrn)
    await _back_home(ctx)
    return SearchResult(mrn=data.mrn, count=count, records=found)
'''


def clinic_pack(root: Path) -> Path:
    source = Path(deskfleet.demoapp.__file__).parent
    root.mkdir()
    shutil.copytree(source / "model", root / "model")
    manifest = (source / "pack.toml").read_text()
    manifest = manifest.replace('name = "demoehr"', 'name = "clinic"').replace('module = "pack"', 'module = "clinic_pack"')
    manifest = manifest[:manifest.index("[hooks]")]  # no demo of its own
    (root / "pack.toml").write_text(manifest)
    (root / "clinic_pack.py").write_text(textwrap.dedent(MODULE))
    return root


async def test_one_agent_drives_two_apps_on_one_display(e2e_server, real_fleet, tmp_path):
    clinic = load_pack(clinic_pack(tmp_path / "clinic"))
    # Its own accounts (account names are unique in the vault; the usernames are DemoEHR's).
    await register_accounts(e2e_server, {f"clinic-{n}": c for n, c in credentials(0).items()}, app="clinic",
                            max_sessions=1)
    fleet = await real_fleet(e2e_server, packs=[load_pack("demoehr"), clinic],
                             app_args={"demoehr": ["--seed=0"], "clinic": ["--seed=0"]})
    [machine] = fleet.host.machines
    assert [type(d).__name__ for d in machine] == ["RealDesktop", "RealDesktop"]
    assert machine[0].station is machine[1].station and machine[0].app_pid != machine[1].app_pid
    async with AsyncClient(e2e_server.url) as c:
        made = await c.submit("demoehr.create_patient", {"mrn": "TWO-1", "name": "Ada Lovelace",
                                                          "dob": "1815-12-10"}, wait=90)
        assert made["state"] == "succeeded", made
        # The clinic's app has its own records: the patient is not there...
        other = await c.submit("clinic.search_patient", {"mrn": "TWO-1"}, wait=90)
        assert other["state"] == "succeeded", other
        assert other["output"]["count"] == 0
        # ...and DemoEHR's is, found again after the clinic's app was in front.
        again = await c.submit("demoehr.search_patient", {"mrn": "TWO-1"}, wait=90)
        assert again["state"] == "succeeded", again
        assert again["output"]["count"] == 1
        events = await c.events(again["id"])
    # DemoEHR kept its session while the clinic's app was driven: no second login.
    assert [e["data"]["playbook"] for e in events if e["kind"] == "playbook.step"] == []
    assert len(Records(fleet.data).find("TWO-1")) == 1
    assert Records(tmp_path / "data" / "clinic" / "demoehr.db").find("TWO-1") == []
