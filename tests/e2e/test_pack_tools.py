"""The pack author's tools on real Xvfb displays, as processes: ``pack try`` on a new
scaffold and on the demoehr pack (its steps printed as they happen, exit codes, screenshots
written, a refused password stopped early and never echoed), ``pack open``, and a scaffold's
own tests run with pytest as its CI would."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from deskfleet.desktop.xvfb import XvfbDisplay

pytestmark = pytest.mark.e2e

ITEM = json.dumps({"name": "Widget", "quantity": 3})
STEP = re.compile(r"^\s+\d+\.\d+s  (\w+)\s+(.*)$")


def deskfleet(*args: str, stdin: str | None = None, cwd: Path | None = None, timeout: float = 120,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DESKFLEET_")}
    return subprocess.run([sys.executable, "-m", "deskfleet", *args], capture_output=True, text=True, input=stdin,
                          cwd=cwd, env={**clean, **(env or {})}, timeout=timeout)


def steps(stdout: str) -> list[tuple[str, str]]:
    return [(m[1], m[2]) for line in stdout.splitlines() if (m := STEP.match(line))]


@pytest.fixture
def pack(tmp_path: Path) -> Path:
    done = deskfleet("pack", "new", "acme", "--dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    return tmp_path / "acme"


def test_a_new_pack_passes_its_own_tests(pack: Path) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DESKFLEET_")}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=pack,
                          capture_output=True, text=True, timeout=300, env=clean)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout


def test_try_runs_the_scaffolds_automation_step_by_step_and_keeps_its_screenshots(pack: Path, tmp_path: Path) -> None:
    shots, state = tmp_path / "shots", tmp_path / "try"
    done = deskfleet("pack", "try", str(pack), "acme.add_item", "--input", ITEM, "--username", "demo",
                     "--password-stdin", "--screenshots", str(shots), "--state-dir", str(state), stdin="demo-pass\n")
    assert done.returncode == 0, done.stdout + done.stderr
    seen = steps(done.stdout)
    kinds = [k for k, _ in seen]
    assert kinds[:2] == ["desktop", "desktop"] and seen[1][1].startswith("DISPLAY=:")
    assert ("screen", f"login → playbook login   [{shots}/01-login-before-login.png]") in seen
    assert kinds[kinds.index("screen"):] == ["screen", "playbook", "probe", "ready", "progress", "progress",
                                             "progress", "progress", "output"]
    assert next(t for k, t in seen if k == "progress").startswith("open the new-item form (10%)")
    assert seen[-1][1].startswith('{"item_id": 1, "name": "Widget"}')
    assert done.stderr == ""  # no log noise, no error
    assert "demo-pass" not in done.stdout
    files = sorted(p.name for p in shots.iterdir())
    assert len(files) == 8 and files[0] == "01-login-before-login.png" and files[-1] == "08-output.png"
    for f in files:
        assert Image.open(shots / f).size == (800, 600)
    assert (state / "data" / "acme" / "items.db").is_file()  # the app's {data}, kept for the next try

    again = deskfleet("pack", "try", str(pack), "add_item", "--input", ITEM, "--reconcile",
                      "--state-dir", str(state))
    assert again.returncode == 0, again.stdout + again.stderr
    found = [t for k, t in steps(again.stdout) if k == "reconcile"]
    assert found == ['the effect was found: {"item_id": 1, "name": "Widget"} (the automation does not run)']
    assert "output" not in [k for k, _ in steps(again.stdout)]


def test_a_refused_password_fails_fast_in_one_line_and_is_never_shown(pack: Path, tmp_path: Path) -> None:
    wrong = "not-the-Pass-7"
    shots = tmp_path / "shots"
    done = deskfleet("pack", "try", str(pack), "add_item", "--input", ITEM, "--username", "demo",
                     "--password-stdin", "--screenshots", str(shots), "--state-dir", str(tmp_path / "t"),
                     stdin=wrong)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert lines[0].startswith("deskfleet: acme.add_item failed: pre-flight failed: login failed twice the same "
                               "way: DesktopError: the app refused the login of 'demo': Invalid username or password.")
    assert lines[0].endswith(f"(the screen then: {shots}/05-failure.png)")
    assert [k for k, _ in steps(done.stdout)].count("playbook") == 2  # two refusals, not eight playbook steps
    assert wrong not in done.stdout + done.stderr


def test_an_automation_that_fails_exits_1_with_its_error_in_one_line(tmp_path: Path) -> None:
    done = deskfleet("pack", "try", "demoehr", "demoehr.update_patient", "--input",
                     json.dumps({"mrn": "NONE-1", "name": "Ada", "dob": "1815-12-10"}),
                     "--state-dir", str(tmp_path))
    assert done.returncode == 1
    assert done.stderr.strip() == ("deskfleet: demoehr.update_patient failed: business error: MRN NONE-1 has 0 "
                                   "records; an update needs exactly one")
    assert [t for k, t in steps(done.stdout) if k == "progress"][:2] == ["open search", "search by MRN"]


def test_try_on_demoehr_logs_in_through_mfa_and_reconciles(tmp_path: Path) -> None:
    patient = json.dumps({"mrn": "TRY-1", "name": "Ada Lovelace", "dob": "1815-12-10"})
    common = ["demoehr.create_patient", "--input", patient, "--app-option=--mfa", "--account", "clinic-a",
              "--state-dir", str(tmp_path)]
    done = deskfleet("pack", "try", "demoehr", *common)
    assert done.returncode == 0, done.stdout + done.stderr
    seen = steps(done.stdout)
    assert [t for k, t in seen if k == "screen"] == ["login → playbook login", "mfa → playbook mfa"]
    assert ("ready", "home (pre-flight: 2 playbook steps)") in seen
    assert seen[-1] == ("output", '{"record_id": 1, "mrn": "TRY-1"}')
    again = deskfleet("pack", "try", "demoehr", *common, "--reconcile")
    assert again.returncode == 0, again.stdout + again.stderr
    assert ("reconcile", 'the effect was found: {"record_id": 1, "mrn": "TRY-1"} (the automation does not run)') \
        in steps(again.stdout)


def test_an_app_that_does_not_start_is_reported_with_what_it_said(pack: Path, tmp_path: Path) -> None:
    manifest = pack / "pack.toml"
    manifest.write_text(manifest.read_text().replace("{pack}/app.py", "{pack}/missing.py"))
    done = deskfleet("pack", "try", str(pack), "add_item", "--input", ITEM, "--state-dir", str(tmp_path / "t"))
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("deskfleet: the application on try exited at start (status 2); it said: ")
    assert "missing.py" in line and "No such file or directory" in line


def test_try_on_this_sessions_display_takes_over_a_running_app_and_leaves_it_running(pack: Path,
                                                                                     tmp_path: Path) -> None:
    display = XvfbDisplay(800, 600).start()
    env = {**os.environ, "DISPLAY": str(display.display)}
    app = subprocess.Popen([sys.executable, str(pack / "app.py"), "--data", str(tmp_path / "own.db")], env=env)
    try:
        deadline = time.monotonic() + 20
        while display.find_window("^acme$") is None:
            assert time.monotonic() < deadline, "the app's window never showed"
            time.sleep(0.05)
        done = deskfleet("pack", "try", str(pack), "add_item", "--input", ITEM, "--desktop", "local",
                         "--state-dir", str(tmp_path / "t"), env={"DISPLAY": str(display.display)})
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"app pid {app.pid} (taken over: it was running as {sys.executable} {pack / 'app.py'} --data" \
            in done.stdout, done.stdout
        assert app.poll() is None  # the author's app is still up
    finally:
        app.terminate()
        app.wait(10)
        display.close()


def test_open_writes_one_screenshot_and_exits(pack: Path, tmp_path: Path) -> None:
    shot = tmp_path / "first.png"
    done = deskfleet("pack", "open", str(pack), "--screenshot", str(shot), "--state-dir", str(tmp_path / "t"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote {shot} (800x600): the model sees 'login'"
    frame = np.asarray(Image.open(shot).convert("RGB"))
    assert frame.shape == (600, 800, 3) and frame.std() > 10  # the app, not a black screen


def test_open_keeps_the_app_up_until_interrupted_then_stops_it_and_the_display(pack: Path, tmp_path: Path) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DESKFLEET_")}
    proc = subprocess.Popen([sys.executable, "-m", "deskfleet", "pack", "open", str(pack), "--state-dir",
                             str(tmp_path / "t")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, env=clean)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        found = re.match(r"acme: the app is up on DISPLAY=(:\d+) \(800x600, pid (\d+)\); the model sees 'login'", first)
        assert found, first
        display, app_pid = found[1], int(found[2])
        head = [proc.stdout.readline() for _ in range(11)]
        assert f"  deskfleet model capture --display {display} --dir {pack}/model --state STATE" in head[1]
        assert head[-1].strip() == "Ctrl-C stops the app and the display"
        assert psutil.pid_exists(app_pid)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert out.strip() == "stopping the app and the display"
    assert not psutil.pid_exists(app_pid) or psutil.Process(app_pid).status() == psutil.STATUS_ZOMBIE
    assert not Path(f"/tmp/.X11-unix/X{display[1:]}").exists()  # the X server is gone


def test_an_interrupted_try_stops_the_app_and_the_display_and_exits_130(tmp_path: Path) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DESKFLEET_")}
    proc = subprocess.Popen([sys.executable, "-m", "deskfleet", "pack", "try", "demoehr", "create_patient",
                             "--input", json.dumps({"mrn": "F-1", "name": "Ada", "dob": "1815-12-10"}),
                             "--app-option=--freeze-at=open_form", "--state-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean)
    try:
        assert proc.stdout is not None
        seen = ""
        while "progress" not in seen:  # the automation is under way; the app hangs as its form opens
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else ""
            seen += line
        found = re.search(r"DISPLAY=(:\d+)  1024x768, app pid (\d+)", seen)
        assert found, seen
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and err.strip() == "deskfleet: interrupted"
    app = int(found[2])
    assert not psutil.pid_exists(app) or psutil.Process(app).status() == psutil.STATUS_ZOMBIE
    assert not Path(f"/tmp/.X11-unix/X{found[1][1:]}").exists()
