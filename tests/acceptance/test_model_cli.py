"""``deskfleet model`` as a user runs it, as separate processes, on screenshots drawn here
(``--screenshot``: no display needed): capture, add-screen, remove, classify and test —
what each prints, what each refuses (one line on stderr, exit 1, nothing written), and
the exit codes a pack's CI relies on."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from drawn_screens import CARD, draw, icon

_SCRIPT = Path(sys.executable).with_name("deskfleet")
DESKFLEET = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "deskfleet"]

LOGO = "logo=10,10,32,32"
PANEL = "panel=300,100,32,32"
CARD_AT = "card=300,200,32,32"
BODY = "body=200,300,32,32"
OK = "ok=400,250,32,32"


@dataclass
class Result:
    code: int
    out: str
    err: str


def deskfleet(*args: str | Path, cwd: Path) -> Result:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DESKFLEET_")}
    env.update({"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
    done = subprocess.run([*DESKFLEET, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60)
    return Result(done.returncode, done.stdout, done.stderr)


def refused(r: Result, *mentions: str, code: int = 1) -> str:
    """The one line a refusal prints; asserts the exit code (2: a usage error) and no traceback."""
    assert r.code == code, (r.code, r.out, r.err)
    assert "Traceback" not in r.err + r.out
    lines = [line for line in r.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("deskfleet: "), r.err
    for m in mentions:
        assert m in lines[0], lines[0]
    return lines[0]


def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    """PNG screenshots: login, home, form, home under a dialog, a login+home mix, a 1920x1080 frame."""
    for name in ("login", "home", "form", "home+dialog"):
        Image.fromarray(draw(name)).save(tmp_path / f"{name.replace('+', '_')}.png")
    both = draw("login")
    icon(both, CARD, 1)
    Image.fromarray(both).save(tmp_path / "both.png")
    Image.fromarray(np.zeros((1080, 1920, 3), np.uint8)).save(tmp_path / "big.png")
    return tmp_path


@pytest.fixture
def model(shots: Path) -> Path:
    for args in (["--state", "login", "--screenshot", "login.png", "--anchor", LOGO, "--anchor", PANEL],
                 ["--state", "home", "--ready", "--screenshot", "home.png", "--anchor", LOGO, "--anchor",
                  CARD_AT + "+6@0.95", "--fixed", "corner=560,400,60,60@0.99"],
                 ["--state", "dialog", "--overlay", "--screenshot", "home_dialog.png", "--anchor", OK]):
        r = deskfleet("model", "capture", "--dir", "m", *args, cwd=shots)
        assert r.code == 0, r.err
    return shots / "m"


def test_capture_prints_what_it_recorded_and_checked(shots: Path, model: Path) -> None:
    r = deskfleet("model", "capture", "--dir", "m", "--state", "form", "--screenshot", "form.png",
                  "--anchor", LOGO, "--anchor", BODY, "--anchor-threshold", "0.85", cwd=shots)
    assert r.code == 0, r.err
    assert r.out.splitlines() == [
        "recorded 'form' in m/model.json: 2 template(s), 0 text check(s)",
        r.out.splitlines()[1],
        "checked 3 saved screenshot(s): all recognised as labelled",
    ]
    assert r.out.splitlines()[1].startswith("this screenshot is recognised as 'form' (")
    assert r.out.splitlines()[1].endswith("; saved as screens/form/1.png")
    states = {s["name"]: s for s in json.loads((model / "model.json").read_text())["states"]}
    assert [(c["name"], c["threshold"], c.get("margin")) for c in states["home"]["checks"]] == [
        ("logo", 0.9, 4), ("card", 0.95, 6), ("corner", 0.99, None)]
    assert [c["threshold"] for c in states["form"]["checks"]] == [0.85, 0.85]
    assert sorted(p.name for p in (model / "screens").iterdir()) == ["dialog", "form", "home", "login"]


def test_capture_refusals_write_nothing(shots: Path, model: Path) -> None:
    before = tree(model)
    line = refused(deskfleet("model", "capture", "--dir", "m", "--state", "header", "--screenshot", "form.png",
                             "--anchor", LOGO, cwd=shots),
                   "deskfleet: 'header' not recorded: it breaks screens/home/1.png is 'unknown', not 'home' "
                   "(home: two base states matched: home, header)",
                   "screens/login/1.png", "nothing was written (--force records it anyway)")
    assert "\n" not in line
    refused(deskfleet("model", "capture", "--dir", "m", "--state", "login2", "--screenshot", "home_dialog.png",
                      "--anchor", LOGO, cwd=shots),
            "this screenshot is recognised as 'dialog', not 'login2' (login2: overlay 'dialog' won)")
    refused(deskfleet("model", "capture", "--dir", "m", "--state", "big", "--screenshot", "big.png",
                      "--anchor", LOGO, cwd=shots), "recorded at 640x480")
    refused(deskfleet("model", "capture", "--dir", "m", "--state", "x", "--screenshot", "form.png",
                      "--anchor", "wall=500,400,30,30", cwd=shots), "too plain to locate")
    refused(deskfleet("model", "capture", "--dir", "m", "--state", "unknown", "--screenshot", "form.png",
                      "--anchor", LOGO, cwd=shots), "reserved")
    for bad in ("logo=1,2,3", "logo=10,10,32,32@1.5", "logo=10,10,32,32+99", "=1,2,3,4"):
        refused(deskfleet("model", "capture", "--dir", "m", "--state", "x", "--screenshot", "form.png",
                          "--anchor", bad, cwd=shots), "--anchor", code=2)
    refused(deskfleet("model", "capture", "--dir", "m", "--state", "x", "--screenshot", "form.png",
                      "--fixed", "plain=1,2,30,30+4", cwd=shots), "only anchors take a margin", code=2)
    refused(deskfleet("model", "capture", "--dir", "m", "--state", "x", "--screenshot", "form.png", cwd=shots),
            "give at least one --anchor, --fixed or --text", code=2)
    assert tree(model) == before
    forced = deskfleet("model", "capture", "--dir", "m", "--state", "header", "--screenshot", "form.png",
                       "--anchor", LOGO, "--force", cwd=shots)
    assert forced.code == 0
    assert "deskfleet: warning: written although it breaks screens/home/1.png" in forced.err


def test_capture_variant_records_another_look_of_a_state(shots: Path, model: Path) -> None:
    Image.fromarray(255 - draw("home")).save(shots / "home_dark.png")
    r = deskfleet("model", "classify", "m", "home_dark.png", cwd=shots)
    assert "home_dark.png: unknown" in r.out, r.out
    r = deskfleet("model", "capture", "--dir", "m", "--state", "home", "--variant", "dark",
                  "--screenshot", "home_dark.png", cwd=shots)
    assert r.code == 0, r.err
    assert r.out.splitlines()[0] == "recorded the 'dark' look of 'home' in m/model.json: 3 variant(s): logo, card, corner"
    assert r.out.splitlines()[1].startswith("this screenshot is recognised as 'home' (")
    assert r.out.splitlines()[-1] == "checked 3 saved screenshot(s): all recognised as labelled"
    assert "home_dark.png: home" in deskfleet("model", "classify", "m", "home_dark.png", cwd=shots).out
    again = deskfleet("model", "capture", "--dir", "m", "--state", "home", "--variant", "dark",
                      "--screenshot", "home_dark.png", cwd=shots)
    assert again.out.splitlines()[0].endswith("0 variant(s) (its templates all pass as they are)"), again.out
    refused(deskfleet("model", "capture", "--dir", "m", "--state", "home", "--variant", "dark", "--anchor", LOGO,
                      "--screenshot", "home_dark.png", cwd=shots), "no --anchor, --fixed", code=2)


def test_add_screen_and_remove(shots: Path, model: Path) -> None:
    r = deskfleet("model", "add-screen", "--dir", "m", "home", "--screenshot", "home.png", cwd=shots)
    assert r.code == 0, r.err
    assert r.out.startswith("saved screens/home/2.png in m: recognised as 'home' (")
    before = tree(model)
    refused(deskfleet("model", "add-screen", "--dir", "m", "login", "--screenshot", "home.png", cwd=shots),
            "screenshot not added: this screenshot is recognised as 'home', not 'login' "
            "(login: match check 'panel' scored")
    refused(deskfleet("model", "add-screen", "--dir", "m", "home", "--screenshot", "big.png", cwd=shots),
            "the screen is 1920x1080; the model was recorded at 640x480")
    refused(deskfleet("model", "add-screen", "--dir", "m", "nope", "--screenshot", "home.png", cwd=shots),
            "the model has no state 'nope'")
    assert deskfleet("model", "add-screen", "--dir", "m", "unknown", "--screenshot", "both.png", cwd=shots).code == 0
    assert tree(model).keys() - before.keys() == {"screens/unknown/1.png"}

    refused(deskfleet("model", "remove", "--dir", "m", "home", cwd=shots),
            "'home' not removed: it breaks screens/unknown/1.png is 'login', not 'unknown'")
    r = deskfleet("model", "remove", "--dir", "m", "dialog", cwd=shots)
    assert r.code == 0, r.err
    assert r.out.splitlines() == ["removed 'dialog' from m/model.json", "removed 1 saved screenshot(s) of 'dialog'",
                                  "checked 4 saved screenshot(s) that remain: all recognised as labelled"]
    assert not (model / "dialog.ok.png").exists() and not (model / "screens" / "dialog").exists()
    refused(deskfleet("model", "remove", "--dir", "m", "dialog", cwd=shots), "the model has no state 'dialog'")
    assert deskfleet("model", "remove", "--dir", "m", "home", "--force", cwd=shots).code == 0
    refused(deskfleet("model", "remove", "--dir", "m", "login", cwd=shots), "'login' is the model's only state")


def test_classify_explains_and_handles_any_size(shots: Path, model: Path) -> None:
    r = deskfleet("model", "classify", "m", "home.png", "big.png", "both.png", cwd=shots)
    assert r.code == 0, r.err
    home, big, both = r.out.split("\n\n")
    lines = home.splitlines()
    assert lines[0].startswith("home.png: home  (640x480, ") and lines[0].endswith(" ms)")
    assert lines[1] == "  home (ready): all 3 checks pass"
    assert lines[2].split() == ["match", "logo", "1.000", ">=", "0.90"]
    assert lines[3].split() == ["match", "card", "1.000", ">=", "0.95"]
    assert lines[4].split() == ["pixels", "corner", "1.000", ">=", "0.99"]
    assert lines[5] == "  lost:"
    assert lines[6].split()[:4] == ["login", "match", "check", "'panel'"]
    assert lines[7].split()[:4] == ["dialog", "match", "check", "'ok'"]
    assert big.splitlines() == [big.splitlines()[0], "  the screen is 1920x1080; the model was recorded at 640x480"]
    assert big.startswith("big.png: wrong_screen  (1920x1080, ")
    assert "  two base states matched: login, home" in both.splitlines()
    assert "    login   two base states matched: login, home" in both.splitlines()

    r = deskfleet("model", "classify", "m", "m/screens", "--json", cwd=shots)
    assert r.code == 0, r.err
    results = json.loads(r.out)
    assert [(x["image"], x["state"]) for x in results] == [
        ("m/screens/dialog/1.png", "dialog"), ("m/screens/home/1.png", "home"), ("m/screens/login/1.png", "login")]
    home_json = results[1]
    assert home_json["size"] == [640, 480] and home_json["elapsed_ms"] >= 0
    assert [c["name"] for c in home_json["states"][1]["checks"]] == ["logo", "card", "corner"]
    assert home_json["states"][0]["reason"].startswith("match check 'panel' scored ")

    refused(deskfleet("model", "classify", "m", "m/model.json", cwd=shots), "m/model.json is not an image")
    (shots / "empty").mkdir()
    refused(deskfleet("model", "classify", "m", "empty", cwd=shots), "no PNG images in empty")
    refused(deskfleet("model", "classify", "login.png", "home.png", cwd=shots), "login.png is not a model directory")


def test_test_prints_the_table_and_fails_on_false_ready(shots: Path, model: Path) -> None:
    r = deskfleet("model", "test", "m", cwd=shots)
    assert r.code == 0, r.err
    assert r.out.splitlines()[:5] == [
        "3 screenshots from m/screens",
        "state         screens  correct  accuracy",
        "login               1        1    100.0%",
        "home (ready)        1        1    100.0%",
        "dialog              1        1    100.0%",
    ]
    assert "false ready: 0" in r.out and "accuracy: 100.0% (3 of 3)" in r.out

    labels = shots / "labels.csv"
    labels.write_text("image,state\nlogin.png,login\nhome.png,home\nhome_dialog.png,dialog\n"
                      "both.png,unknown\nbig.png,home\nhome.png,login\n")
    r = deskfleet("model", "test", "m", labels, cwd=shots)
    line = refused(r, "deskfleet: 1 false ready (screens taken for a ready state they are not), "
                      "e.g. home.png labelled 'login' recognised as 'home'")
    out = r.out.splitlines()
    assert out[0] == f"6 screenshots from {labels}"
    matrix = out[out.index("confusion (rows: labelled, columns: recognised)") + 1:][:5]
    assert [row.split() for row in matrix] == [
        ["labelled", "\\", "recognised", "login", "home", "dialog", "unknown", "wrong_screen"],
        ["login", "1", "1", ".", ".", "."],
        ["home", ".", "1", ".", ".", "1"],
        ["dialog", ".", ".", "1", ".", "."],
        ["unknown", ".", ".", ".", "1", "."],
    ]
    assert "false ready: 1" in out
    assert "  FALSE READY home.png is 'home', not 'login' (login: match check 'panel' scored 0.000 < 0.90)" in out
    assert "\n" not in line

    labels.write_text("login.png,login\nbig.png,home\n")
    refused(deskfleet("model", "test", "m", labels, "--min-accuracy", "0.9", cwd=shots),
            "accuracy 50.0% is below --min-accuracy 90.0%")
    r = deskfleet("model", "test", "m", labels, "--json", cwd=shots)
    assert r.code == 0, r.err
    data = json.loads(r.out)
    assert (data["screens"], data["correct"], data["false_ready"]) == (2, 1, 0)
    assert data["confusion"] == {"login": {"login": 1}, "home": {"wrong_screen": 1}}
    assert data["wrong"][0]["why"] == "the screen is 1920x1080; the model was recorded at 640x480"

    labels.write_text("login.png,lgin\n")
    refused(deskfleet("model", "test", "m", labels, cwd=shots), "line 1: login.png is labelled 'lgin'")
    labels.write_text("nope.png,login\n")
    refused(deskfleet("model", "test", "m", labels, cwd=shots), "line 1: no image nope.png")
    bare = shots / "bare"
    bare.mkdir()
    for f in model.glob("*.png"):
        (bare / f.name).write_bytes(f.read_bytes())
    (bare / "model.json").write_text((model / "model.json").read_text())
    refused(deskfleet("model", "test", "bare", cwd=shots), "no screenshots saved with bare")


def test_test_in_worker_processes_gives_the_same_report(shots: Path, model: Path) -> None:
    labels = shots / "labels.csv"
    labels.write_text("image,state\n" + "login.png,login\nhome.png,home\nhome_dialog.png,dialog\n"
                      "both.png,unknown\nbig.png,home\nhome.png,login\n" * 3)
    one = deskfleet("model", "test", "m", labels, "--json", cwd=shots)
    three = deskfleet("model", "test", "m", labels, "--json", "--jobs", "3", cwd=shots)
    assert one.code == three.code == 1, (one.err, three.err)  # the three false ready, either way
    a, b = json.loads(one.out), json.loads(three.out)
    for report in (a, b):
        report.pop("classify_ms")
    assert a == b and a["screens"] == 18 and a["false_ready"] == 3
    assert [w["image"] for w in b["wrong"]] == ["big.png", "home.png"] * 3  # in the CSV's order
    refused(deskfleet("model", "test", "m", labels, "--jobs", "-1", cwd=shots), "--jobs", code=2)


def test_a_broken_model_is_one_line_naming_the_file(shots: Path, model: Path) -> None:
    (model / "model.json").write_text((model / "model.json").read_text().replace('"ready": true,', '"ready": true'))
    for command in (["classify", "m", "home.png"], ["test", "m"], ["remove", "--dir", "m", "home"],
                    ["add-screen", "--dir", "m", "home", "--screenshot", "home.png"],
                    ["capture", "--dir", "m", "--state", "x", "--screenshot", "home.png", "--anchor", LOGO]):
        refused(deskfleet("model", *command, cwd=shots), "deskfleet: m/model.json: not valid JSON: Expecting ',' "
                "delimiter at line ")


def test_test_draws_rich_tables_on_a_terminal(shots: Path, model: Path) -> None:
    import pty

    env = {k: v for k, v in os.environ.items() if not k.startswith("DESKFLEET_")}
    env.update({"COLUMNS": "120", "NO_COLOR": "1", "TERM": "xterm"})
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run([*DESKFLEET, "model", "test", "m"], cwd=shots, env=env, stdout=follower,
                              stderr=subprocess.PIPE, timeout=60)
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal is closed once everything was read
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(leader)
    out = re.sub(r"\x1b\[[0-9;]*m", "", b"".join(chunks).decode())
    assert proc.returncode == 0, proc.stderr
    assert "┃ state" in out and "│ home (ready) │" in out and "false ready: 0" in out
