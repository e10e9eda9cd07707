"""The real-desktop commands as a user runs them: ``deskfleet model capture`` against a live
Xvfb display, and ``deskfleet agent --desktop xvfb`` as its own process (it starts Xvfb
and DemoEHR, serves runs, and on SIGTERM stops the app before the display)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys

import psutil
import pytest

from deskfleet.client import AsyncClient
from deskfleet.demoapp import Records
from deskfleet.demoapp.capture import app_command
from deskfleet.desktop.xvfb import xvfb_desktop
from support import eventually

pytestmark = pytest.mark.e2e


def deskfleet(*args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DESKFLEET_")}
    return subprocess.run([sys.executable, "-m", "deskfleet", *args], capture_output=True, text=True, env=env,
                          timeout=60, **kwargs)


async def test_model_capture_records_templates_from_a_live_display(tmp_path):
    desktop = await xvfb_desktop("capture", app_command(tmp_path / "ehr.db"))
    try:
        display = desktop.host.display
        out = tmp_path / "model"
        done = deskfleet("model", "capture", "--display", display, "--dir", str(out), "--state", "login",
                         "--anchor", "logo=18,14,28,28", "--anchor", "panel=495,167,34,34",
                         "--text", "title=332,218,360,30:^Sign in$")
        assert done.returncode == 0, done.stderr
        assert "recognised as 'login'" in done.stdout
        described = json.loads((out / "model.json").read_text())
        assert described["screen"] == [1024, 768]
        [login] = described["states"]
        assert [(c["kind"], c["name"]) for c in login["checks"]] == [("match", "logo"), ("match", "panel"),
                                                                    ("text", "title")]
        assert sorted(p.name for p in out.glob("*.png")) == ["login.logo.png", "login.panel.png"]
        plain = deskfleet("model", "capture", "--display", display, "--dir", str(out), "--state", "x",
                          "--anchor", "wall=600,600,20,20")
        assert plain.returncode == 1 and "too plain to locate" in plain.stderr
        assert "Traceback" not in plain.stderr
    finally:
        await desktop.close()


async def test_agent_process_on_xvfb_serves_runs_and_tears_down_in_order(e2e_server, tmp_path):
    token = tmp_path / "token"
    token.write_text(e2e_server.token)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DESKFLEET_")}
    # DemoEHR's accounts for its seed (0 unless --seed is given to it), as an operator adds them.
    added = subprocess.run([sys.executable, "-m", "deskfleet", "--server", e2e_server.url, "accounts", "add-demo",
                            "demoehr", "--seed", "0"], env=env, capture_output=True, text=True, timeout=60)
    assert added.returncode == 0, added.stderr
    with open(tmp_path / "agent.log", "wb") as log:
        agent = subprocess.Popen(
            [sys.executable, "-m", "deskfleet", "agent", "--orchestrator", e2e_server.url, "--pack", "demoehr",
             "--desktop", "xvfb", "--machine", "cli", "--enrolment-token-file", str(token), "--state-dir", str(tmp_path / "agent"),
             "--data-dir", str(tmp_path / "data"), "--app-option=--session-timeout=600"],
            env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        store = e2e_server.view()
        await eventually(lambda: any(m.id == "cli-01" and m.schedulable for m in store.list_machines()), 60)
        parts = psutil.Process(agent.pid).children(recursive=True)
        assert {"Xvfb", "DemoEHR"} <= {"Xvfb" if "Xvfb" in p.name() else "DemoEHR" for p in parts}
        async with AsyncClient(e2e_server.url) as c:
            run = await c.submit("demoehr.create_patient", {"mrn": "CLI-1", "name": "Ada Lovelace",
                                                             "dob": "1815-12-10"}, wait=90)
        assert run["state"] == "succeeded", run
        assert [p.created_by for p in Records(tmp_path / "data" / "demoehr" / "demoehr.db").find("CLI-1")] == ["cli-01"]
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0
        _, alive = psutil.wait_procs(parts, timeout=10)
        assert not alive, f"left running: {alive}"
    finally:
        if agent.poll() is None:  # the test failed: take what the agent started with it
            children = psutil.Process(agent.pid).children(recursive=True)
            agent.kill()
            agent.wait(10)
            for child in children:
                with contextlib.suppress(psutil.Error):
                    child.kill()
