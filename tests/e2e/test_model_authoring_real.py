"""Authoring and testing an app model against the real DemoEHR on Xvfb, with the real CLI.

A model is recorded from a live display, screen by screen, the way a user records theirs:
a state whose anchors also match an earlier screen is refused, naming that screen; the
model's own saved screenshots then pass ``deskfleet model test``. And the model shipped
for DemoEHR, measured on a fresh tour of every DemoEHR screen, takes no screen for ready
that is not.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import deskfleet.demoapp
from deskfleet.demoapp import credentials
from deskfleet.demoapp import layout as L
from deskfleet.demoapp.capture import app_command, settle, tour
from deskfleet.demoapp.model import PARK, inner
from deskfleet.desktop import Region
from deskfleet.desktop.xvfb import xvfb_desktop

pytestmark = pytest.mark.e2e

SHIPPED = Path(deskfleet.demoapp.__file__).with_name("model")


def area(name: str, r: Region) -> str:
    return f"{name}={r.left},{r.top},{r.width},{r.height}"


async def deskfleet(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DESKFLEET_")}
    env.update({"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
    return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "deskfleet", *map(str, args)], cwd=cwd,
                                   env=env, capture_output=True, text=True, timeout=120)


async def test_capture_on_a_live_display_refuses_a_state_that_breaks_an_earlier_screen(tmp_path: Path) -> None:
    desktop = await xvfb_desktop("author", app_command(tmp_path / "ehr.db"))
    try:
        display = desktop.host.display
        await desktop.move(*PARK)
        login_screen = await settle(desktop)
        capture = ("model", "capture", "--display", display, "--dir", "m")
        done = await deskfleet(*capture, "--state", "login", "--anchor", area("logo", inner(L.LOGO)),
                               "--anchor", area("panel", inner(L.PANEL_ICON)),
                               "--anchor", area("user", L.USERNAME_ICON), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert "this screenshot is recognised as 'login'" in done.stdout
        assert "saved as screens/login/1.png" in done.stdout

        account = credentials(0)["robot1"]
        for field, text in ((L.USERNAME, account.username), (L.PASSWORD, account.password)):
            await desktop.click(*field.center)
            await desktop.press("ctrl", "a")
            await desktop.type_text(text)
        await desktop.click(*L.SIGN_IN.center)
        await desktop.move(*PARK)
        await settle(desktop, login_screen)

        # The header logo alone: the home screen passes, but so does the saved login screen.
        refused = await deskfleet(*capture, "--state", "home", "--ready", "--anchor", area("logo", inner(L.LOGO)),
                                  cwd=tmp_path)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        assert refused.stderr.strip() == (
            "deskfleet: 'home' not recorded: it breaks screens/login/1.png is 'unknown', not 'login' "
            "(login: two base states matched: login, home); nothing was written (--force records it anyway)")
        assert [s["name"] for s in json.loads((tmp_path / "m" / "model.json").read_text())["states"]] == ["login"]
        assert not (tmp_path / "m" / "screens" / "home").exists()

        done = await deskfleet(*capture, "--state", "home", "--ready", "--anchor", area("logo", inner(L.LOGO)),
                               "--anchor", area("sidebar", inner(L.SIDEBAR_ITEMS[0])),
                               "--anchor", area("card", inner(L.card_icon(L.CARDS[0]))), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert "checked 1 saved screenshot(s): all recognised as labelled" in done.stdout
        done = await deskfleet("model", "add-screen", "--dir", "m", "home", "--display", display, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("saved screens/home/2.png in m: recognised as 'home'")

        done = await deskfleet("model", "test", "m", "--json", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert (report["screens"], report["accuracy"], report["false_ready"]) == (3, 1.0, 0)
    finally:
        await desktop.close()


async def test_model_test_on_a_tour_of_demoehr_reports_no_false_ready(tmp_path: Path) -> None:
    rows = ["image,state"]
    async for state, frame in tour(tmp_path):
        name = f"{len(rows):02d}-{state}.png"
        Image.fromarray(frame).save(tmp_path / name)
        rows.append(f"{name},{state}")
    # The same screens on a bigger display: the model must say so, never guess.
    big = np.zeros((1080, 1920, 3), np.uint8)
    big[:768, :1024] = np.asarray(Image.open(tmp_path / "01-login.png"))
    Image.fromarray(big).save(tmp_path / "big-login.png")
    rows.append("big-login.png,wrong_screen")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")

    done = await deskfleet("model", "test", SHIPPED, "labels.csv", "--min-accuracy", "1", cwd=tmp_path)
    print(done.stdout)
    assert done.returncode == 0, done.stderr
    assert "false ready: 0" in done.stdout.splitlines()
    states = {row.split(",")[1] for row in rows[1:]}
    assert states >= {"login", "mfa", "home", "error_dialog", "patient_form", "validation", "saved", "search",
                      "edit_form", "updated", "session_expired", "unknown", "desktop", "wrong_screen"}
    done = await deskfleet("model", "classify", SHIPPED, "big-login.png", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1] == "  the screen is 1920x1080; the model was recorded at 1024x768"
