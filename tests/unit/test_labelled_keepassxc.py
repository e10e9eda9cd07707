"""Issue 10's labelled set, on the third-party pack: every saved KeePassXC screen in the
renderings its model was not recorded in (shifted, noisy, JPEG, the window moved, other
screens) and, over the ready list, a dialog nobody modelled, another program's window and a
frozen app — built by ``tests/labelled/keepassxc.py`` and measured by ``deskfleet model
test`` exactly as an author would. Goal: 0 false ready and ≥ 99 % right in every rendering.

The same set read by pixels alone (no window facts) must show why the facts are there: the
moved window and other screens are not recognised, and dialogs and a frozen app pass for
ready — so this test can fail."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "labelled"))
import keepassxc as labelled

from deskfleet.vision import TemplateLibrary
from deskfleet.vision.screens import Labelled, evaluate, read_labels, saved_screens


@pytest.fixture(scope="module")
def labels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return labelled.build(tmp_path_factory.mktemp("labelled"))


@pytest.mark.slow  # ≈ 35 s: the set is rendered, then classified by a separate process
def test_model_test_on_the_labelled_set_has_no_false_ready_and_every_rendering_right(labels: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "deskfleet", "model", "test", str(labelled.MODEL), str(labels),
                           "--json", "--min-accuracy", "0.99", "--jobs", "0"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["false_ready"] == 0
    groups = report["per_group"]
    assert set(groups) == {"recorded", "shift1", "shift2", "noise", "jpeg", "moved", "1280x1024", "1600x900",
                           "dialog", "overlay", "frozen"}
    assert {g: v["accuracy"] for g, v in groups.items() if v["accuracy"] < 0.99} == {}
    saved = saved_screens(labelled.MODEL)
    ready = [s for s in saved if s.label == "entries"]
    assert len(ready) == 22 and len({s.name for s in saved}) == len(saved) == 96  # both themes, light and dark
    assert groups["dialog"]["screens"] == groups["frozen"]["screens"] == len(ready)  # every ready screen saved
    assert report["screens"] == len(saved) * 8 + 3 * len(ready)


@pytest.mark.slow  # with the set above
def test_pixels_alone_miss_what_the_window_facts_catch(labels: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Labelled, "facts", lambda self: (None, None))
    library = TemplateLibrary.load(labelled.MODEL)
    items = [i for i in read_labels(labels) if i.group in ("moved", "1280x1024", "frozen", "dialog")]
    report = evaluate(library.classifier(), [(i, i.frame()) for i in items], window=library.window)
    groups = report.per_group()
    assert groups["moved"][0] == groups["1280x1024"][0] == 0  # another screen size: wrong_screen
    assert groups["frozen"][2] == 22  # a hung app's list is a perfect list
    assert groups["dialog"][2] >= 1  # a dialog off the guarded centre passes for the list


def test_a_broken_facts_file_and_a_bad_row_are_one_line(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (1024, 768)).save(tmp_path / "a.png")
    (tmp_path / "a.json").write_text('{"windows": {"main": {"rect": [0, 0]}}}')
    (tmp_path / "labels.csv").write_text("image,state,rendering\na.png,desktop,recorded\n")
    done = subprocess.run([sys.executable, "-m", "deskfleet", "model", "test", str(labelled.MODEL),
                           str(tmp_path / "labels.csv")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.startswith("deskfleet: ") and "Traceback" not in done.stderr
    assert f"{tmp_path / 'a.json'}: not the window facts of a.png" in done.stderr, done.stderr
    (tmp_path / "labels.csv").write_text("a.png,desktop,recorded,extra\n")
    done = subprocess.run([sys.executable, "-m", "deskfleet", "model", "test", str(labelled.MODEL),
                           str(tmp_path / "labels.csv")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "line 1: expected 'image,state[,group]'" in done.stderr, done.stderr
