"""Authoring an app model: model directories that refuse to load in one clear line, and
capture / add-screen / remove checked against every screenshot saved with the model.

Screens are drawn here with numpy: a header logo every screen shows, plus icons that tell
the screens apart.
"""

from __future__ import annotations

import importlib.resources
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deskfleet.desktop import Region
from deskfleet.errors import ConfigError
from deskfleet.vision import UNKNOWN, WRONG_SCREEN, Classifier, TemplateLibrary, load_model
from deskfleet.vision.authoring import add_screen, capture, capture_variant, remove
from deskfleet.vision.screens import Labelled, evaluate, read_labels, saved_screens
from deskfleet.vision.templates import Anchor, TextSpec
from drawn_screens import BODY, CARD, LOGO, OK, PANEL, H, W, draw, icon


def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A model with login, home (ready) and a dialog, each captured from its screen."""
    d = tmp_path / "model"
    capture(d, draw("login"), "login", [Anchor("logo", LOGO), Anchor("panel", PANEL)])
    capture(d, draw("home"), "home", [Anchor("logo", LOGO), Anchor("card", CARD)], ready=True)
    capture(d, draw("home+dialog"), "dialog", [Anchor("ok", OK)], overlay=True)
    return d


# -- loading ------------------------------------------------------------------------------------------


def test_a_model_loads_from_str_path_its_model_json_and_package_data(model: Path) -> None:
    for where in (str(model), model, model / "model.json", str(model / "model.json")):
        classifier = load_model(where)
        assert isinstance(classifier, Classifier) and classifier.screen == (W, H)
        assert classifier.classify(draw("home")).state == "home"
    assert TemplateLibrary.load(str(model)).state_names == ["login", "home", "dialog"]
    shipped = importlib.resources.files("deskfleet.demoapp") / "model"
    assert load_model(shipped).screen == (1024, 768)


def _broken(model: Path, edit) -> str:
    edit(model)
    with pytest.raises(ConfigError) as caught:
        TemplateLibrary.load(model)
    message = str(caught.value)
    assert "\n" not in message
    return message


def _json_edit(change):
    def edit(model: Path) -> None:
        path = model / "model.json"
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))

    return edit


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda m: (m / "model.json").write_text((m / "model.json").read_text().replace('"ready": true,', '"ready": true', 1)),
     r"model\.json: not valid JSON: Expecting ',' delimiter at line \d+, column \d+$"),
    (lambda m: (m / "home.card.png").unlink(), r"state 'home', check 'card': template home.card.png is missing$"),
    (lambda m: Image.new("RGB", (10, 12)).save(m / "home.card.png"),
     r"template home.card.png is 10x12, its region \[300, 200, 32, 32\] is 32x32$"),
    (lambda m: (m / "home.card.png").write_bytes(b"not a png"), r"home.card.png is not an image \(PNG expected\)$"),
    (_json_edit(lambda d: d["states"][1]["checks"][0].update(kind="blob")), r"unknown check kind 'blob'"),
    (_json_edit(lambda d: d["states"][1]["checks"][0].update(threshold=1.2)), r"threshold 1.2 is outside 0\.\.1"),
    (_json_edit(lambda d: d["states"][1]["checks"][0].update(threshold=-0.1)), r"threshold -0.1 is outside 0\.\.1"),
    (_json_edit(lambda d: d["states"][2].update(name="home")), r"state 'home' is described twice"),
    (_json_edit(lambda d: d["states"][2].update(name="wrong_screen")), r"state name 'wrong_screen' is reserved"),
    (_json_edit(lambda d: d["states"][0]["checks"][0].update(treshold=0.8)), r"unknown field 'treshold'"),
    (_json_edit(lambda d: d["states"][0]["checks"][0].update(at=[630, 10, 32, 32])), r"lies outside the 640x480 screen"),
    (_json_edit(lambda d: d["states"][0]["checks"][0].update(margin=-1)), r"margin -1 must be a whole number"),
    (_json_edit(lambda d: d["states"][0].update(checks=[])), r"state 'login' has no checks"),
    (_json_edit(lambda d: d["states"][0]["checks"].append({"kind": "text", "name": "t", "region": [0, 0, 9, 9],
                                                            "pattern": "(unclosed"})), r"is not a regular expression"),
    (_json_edit(lambda d: d.update(format=2)), r"format 2 is not 1"),
    (_json_edit(lambda d: d.update(screen=[640])), r"'screen' must be \[width, height\]"),
    (_json_edit(lambda d: d["states"][0]["checks"][0].update(template="../x.png")), r"must name a PNG file"),
])
def test_a_model_that_does_not_parse_says_which_file_and_what_in_one_line(model: Path, edit, expected: str) -> None:
    message = _broken(model, edit)
    assert message.startswith(str(model / "model.json") + ": ")
    assert __import__("re").search(expected, message), message


def test_a_missing_model_and_a_missing_directory_say_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no model\.json in .*: not a model directory"):
        TemplateLibrary.load(tmp_path)
    with pytest.raises(ConfigError, match=r"no model\.json in .*nowhere"):
        load_model(str(tmp_path / "nowhere"))


def test_recording_refuses_names_that_cannot_work() -> None:
    lib = TemplateLibrary("toy", (W, H))
    frame = draw("login")
    with pytest.raises(ConfigError, match="reserved"):
        lib.record(frame, "unknown", [Anchor("logo", LOGO)])
    with pytest.raises(ConfigError, match="not usable"):
        lib.record(frame, "log in", [Anchor("logo", LOGO)])
    with pytest.raises(ConfigError, match="names 'logo' twice"):
        lib.record(frame, "login", [Anchor("logo", LOGO), Anchor("logo", PANEL)])
    with pytest.raises(ConfigError, match="needs at least one check"):
        lib.record(frame, "login", [])
    with pytest.raises(ConfigError, match=r"threshold 1\.5 is outside"):
        lib.record(frame, "login", [Anchor("logo", LOGO, threshold=1.5)])
    with pytest.raises(ConfigError, match="margin 99"):
        lib.record(frame, "login", [Anchor("logo", LOGO, margin=99)])
    with pytest.raises(ConfigError, match="not a regular expression"):
        lib.record(frame, "login", [], [TextSpec("t", Region(0, 0, 50, 20), "(")])
    assert lib.states == [] and lib.images == {}


def test_thresholds_and_margins_of_every_kind_are_stored(tmp_path: Path) -> None:
    d = tmp_path / "m"
    capture(d, draw("login"), "login", [Anchor("logo", LOGO, threshold=0.97, margin=9),
                                        Anchor("plain", Region(500, 400, 40, 40), "pixels", threshold=0.99)],
            [TextSpec("title", Region(0, 50, 200, 30), "^x$", threshold=0.7)], force=True)
    [login] = json.loads((d / "model.json").read_text())["states"]
    assert [(c["kind"], c["threshold"], c.get("margin")) for c in login["checks"]] == [
        ("match", 0.97, 9), ("pixels", 0.99, None), ("text", 0.7, None)]
    [state] = TemplateLibrary.load(d).screen_states()
    assert [c.threshold for c in state.checks] == [0.97, 0.99, 0.7]
    assert state.checks[0].region == Region(1, 1, 50, 50)  # type: ignore[attr-defined]


# -- capture ------------------------------------------------------------------------------------------


def test_capture_saves_its_screenshot_with_the_model(model: Path) -> None:
    assert [(s.label, s.name) for s in saved_screens(model)] == [
        ("dialog", "screens/dialog/1.png"), ("home", "screens/home/1.png"), ("login", "screens/login/1.png")]
    assert np.array_equal(saved_screens(model)[1].frame(), draw("home"))
    assert sorted(p.name for p in model.glob("*.png")) == [
        "dialog.ok.png", "home.card.png", "home.logo.png", "login.logo.png", "login.panel.png"]


def test_capture_that_does_not_recognise_its_own_screen_writes_nothing(tmp_path: Path, model: Path) -> None:
    new = tmp_path / "new"
    with pytest.raises(ConfigError) as caught:
        # Its templates are cut from the screen itself; what fails here is the text check.
        capture(new, draw("login"), "login", [Anchor("logo", LOGO)], [TextSpec("title", Region(300, 20, 200, 30), "^Sign in$")])
    assert str(caught.value).startswith("'login' not recorded: this screenshot is recognised as 'unknown', not 'login' "
                                        "(login: text check 'title' scored 0.000 < 0.50)")
    assert not new.exists(), "a refused capture must not even create the directory"

    before = tree(model)
    with pytest.raises(ConfigError) as caught:
        capture(model, draw("login+dialog"), "login2", [Anchor("logo", LOGO), Anchor("panel", PANEL)])
    message = str(caught.value)
    assert message.startswith("'login2' not recorded: this screenshot is recognised as 'dialog', not 'login2' "
                              "(login2: overlay 'dialog' won)")
    assert message.endswith("nothing was written (--force records it anyway)")
    assert tree(model) == before


def test_capture_that_breaks_an_earlier_screen_is_refused_naming_it(model: Path) -> None:
    before = tree(model)
    with pytest.raises(ConfigError) as caught:
        # Only the logo, which every screen shows: the new state passes on its own screen
        # (login's panel is not there), but the saved login screen now matches two states.
        capture(model, draw("form"), "header", [Anchor("logo", LOGO)])
    message = str(caught.value)
    assert "it breaks screens/login/1.png is 'unknown', not 'login' " \
           "(login: two base states matched: login, header)" in message
    assert "screens/home/1.png is 'unknown', not 'home'" in message
    assert tree(model) == before


def test_force_records_it_anyway_and_says_what_fails(model: Path) -> None:
    change = capture(model, draw("form"), "header", [Anchor("logo", LOGO)], force=True)
    assert change.written and change.screen == "screens/header/1.png"
    assert [o.item.name for o in change.broken] == ["screens/home/1.png", "screens/login/1.png"]
    assert change.problems()[0].startswith("it breaks screens/home/1.png is 'unknown', not 'home'")
    assert "header" in TemplateLibrary.load(model).state_names
    # The model is broken now; fixing 'header' fixes the earlier screens, and a later
    # change is judged only on what it breaks itself.
    fixed = capture(model, draw("form"), "header", [Anchor("logo", LOGO), Anchor("body", BODY)])
    assert [o.item.name for o in fixed.fixed] == ["screens/home/1.png", "screens/login/1.png"]
    assert not fixed.broken and not fixed.still_wrong
    assert [s.name for s in saved_screens(model) if s.label == "header"] == [
        "screens/header/1.png", "screens/header/2.png"]


def test_a_form_that_sits_lower_once_saved_is_caught_by_a_second_screenshot(model: Path) -> None:
    capture(model, draw("form"), "form", [Anchor("logo", LOGO), Anchor("body", BODY)])
    lower = draw("form", dy=15)
    with pytest.raises(ConfigError) as caught:
        add_screen(model, lower, "form")
    assert str(caught.value).startswith("screenshot not added: this screenshot is recognised as 'unknown', "
                                        "not 'form' (form: match check 'body' scored 0.")
    assert len([s for s in saved_screens(model) if s.label == "form"]) == 1
    # Saved anyway, the model fails its own test until the form is recorded so that both match.
    add_screen(model, lower, "form", force=True)
    # Recorded again from the lower form alone, it no longer recognises the first one.
    lowered = Region(200, 315, 32, 32)
    with pytest.raises(ConfigError, match=r"'form' not recorded: it breaks screens/form/1.png is 'unknown', not 'form' "
                                          r"\(form: match check 'body' scored 0.\d+ < 0.90\)"):
        capture(model, lower, "form", [Anchor("logo", LOGO), Anchor("body", lowered)])
    change = capture(model, lower, "form", [Anchor("logo", LOGO), Anchor("body", lowered, margin=16)])
    assert [o.item.name for o in change.fixed] == ["screens/form/2.png"]
    assert not change.broken and not change.still_wrong
    report = evaluate(load_model(model), [(s, s.frame()) for s in saved_screens(model)])
    assert report.accuracy == 1.0


def test_replace_screens_drops_a_state_s_older_screenshots(model: Path) -> None:
    add_screen(model, draw("home"), "home")
    change = capture(model, draw("home"), "home", [Anchor("logo", LOGO), Anchor("card", CARD)], ready=True,
                     replace_screens=True)
    assert change.removed_screens == 2
    assert [s.name for s in saved_screens(model) if s.label == "home"] == ["screens/home/1.png"]


# -- add-screen ---------------------------------------------------------------------------------------


def test_add_screen_checks_the_label_and_the_size(model: Path) -> None:
    change = add_screen(model, draw("home"), "home")
    assert change.screen == "screens/home/2.png" and change.seen is not None and change.seen.state == "home"
    foreign = draw("form")
    foreign[200:300, 100:300] = 90
    assert add_screen(model, foreign, UNKNOWN).screen == "screens/unknown/1.png"
    with pytest.raises(ConfigError, match=r"screenshot not added: this screenshot is recognised as 'home', not 'unknown'"):
        add_screen(model, draw("home"), UNKNOWN)
    with pytest.raises(ConfigError, match=r"the model has no state 'hom' \(its states: login, home, dialog; or unknown"):
        add_screen(model, draw("home"), "hom")
    with pytest.raises(ConfigError, match="the screen is 1024x768; the model was recorded at 640x480"):
        add_screen(model, np.zeros((768, 1024, 3), np.uint8), "home")
    assert len(saved_screens(model)) == 5


def test_saved_screens_of_a_state_the_model_lacks_are_refused(model: Path) -> None:
    stray = model / "screens" / "gone"
    stray.mkdir()
    Image.fromarray(draw("home")).save(stray / "1.png")
    with pytest.raises(ConfigError, match=r"screens/gone/1.png is labelled 'gone', which is not a state"):
        capture(model, draw("home"), "home", [Anchor("logo", LOGO), Anchor("card", CARD)])


# -- remove -------------------------------------------------------------------------------------------


def test_remove_drops_the_state_its_templates_and_screens(model: Path) -> None:
    add_screen(model, draw("home+dialog"), "dialog")
    change = remove(model, "dialog")
    assert change.removed_screens == 2 and change.checked == 2 and not change.broken
    assert TemplateLibrary.load(model).state_names == ["login", "home"]
    assert not (model / "dialog.ok.png").exists() and not (model / "screens" / "dialog").exists()


def test_remove_refusals(model: Path) -> None:
    with pytest.raises(ConfigError, match=r"the model has no state 'nope' \(its states: login, home, dialog\)"):
        remove(model, "nope")
    # A screen saved as 'unknown' is unknown because two base states match it; without one
    # of them, it would be taken for the other.
    both = draw("login")
    icon(both, CARD, 1)
    add_screen(model, both, UNKNOWN)
    before = tree(model)
    with pytest.raises(ConfigError) as caught:
        remove(model, "home")
    assert str(caught.value) == (
        "'home' not removed: it breaks screens/unknown/1.png is 'login', not 'unknown' "
        "(every check of 'login' passed); nothing was written (--force removes it anyway)")
    assert tree(model) == before
    assert remove(model, "home", force=True).broken
    remove(model, "dialog")
    with pytest.raises(ConfigError, match="'login' is the model's only state"):
        remove(model, "login")


# -- labelled screenshots and reports -----------------------------------------------------------------


def test_evaluate_counts_accuracy_confusion_and_false_ready(model: Path) -> None:
    classifier = load_model(model)
    frames = {"login": draw("login"), "home": draw("home"), "both": draw("login"), "big": np.zeros((10, 10, 3), np.uint8)}
    icon(frames["both"], CARD, 1)
    items = [
        (Labelled("login", model, "a.png"), frames["login"]),
        (Labelled("home", model, "b.png"), frames["home"]),
        (Labelled("login", model, "c.png"), frames["home"]),  # false ready: a login screen taken for home
        (Labelled(UNKNOWN, model, "d.png"), frames["home"]),  # false ready too
        (Labelled(UNKNOWN, model, "e.png"), frames["both"]),
        (Labelled("home", model, "f.png"), frames["big"]),
    ]
    report = evaluate(classifier, items)
    assert (report.total, report.correct) == (6, 3)
    assert [o.item.name for o in report.false_ready] == ["c.png", "d.png"]
    assert report.per_state() == {"login": (1, 2), "home": (1, 2), UNKNOWN: (1, 2)}
    assert report.columns() == ["login", "home", "dialog", UNKNOWN, WRONG_SCREEN]
    assert dict(report.confusion()["login"]) == {"login": 1, "home": 1}
    assert dict(report.confusion()["home"]) == {"home": 1, WRONG_SCREEN: 1}
    assert report.wrong[-1].describe() == ("f.png is 'wrong_screen', not 'home' "
                                           "(the screen is 10x10; the model was recorded at 640x480)")
    data = report.to_dict()
    assert data["false_ready"] == 2 and data["accuracy"] == 0.5


def test_labels_csv(tmp_path: Path) -> None:
    (tmp_path / "shots").mkdir()
    for name in ("a", "b"):
        Image.fromarray(draw("home")).save(tmp_path / "shots" / f"{name}.png")
    csv = tmp_path / "labels.csv"
    csv.write_text("image,state\n# a comment\n\nshots/a.png, home\nshots/b.png,unknown\n")
    items = read_labels(csv)
    assert [(i.label, i.name, i.line) for i in items] == [("home", "shots/a.png", 4), ("unknown", "shots/b.png", 5)]
    assert items[0].frame().shape == (H, W, 3)
    for text, expected in [("shots/a.png\n", r"line 1: expected 'image,state\[,group\]'"),
                           ("shots/x.png,home\n", r"line 1: no image shots/x.png \(paths are relative"),
                           ("image,state\n", r"lists no images")]:
        csv.write_text(text)
        with pytest.raises(ConfigError, match=expected):
            read_labels(csv)


# -- another look of a state (a dark theme) ------------------------------------------------------------


def dark(frame: np.ndarray) -> np.ndarray:
    """The same screen in a dark theme: every grey inverted."""
    return 255 - frame


def test_a_variant_teaches_a_state_another_look_and_only_where_it_is_needed(model: Path) -> None:
    night = dark(draw("home"))
    night[LOGO.top : LOGO.top + 32, LOGO.left : LOGO.left + 32] = draw("home")[10:42, 10:42]  # the logo as it was
    assert load_model(model).classify(night).state == UNKNOWN
    change = capture_variant(model, night, "home", "dark")
    assert change.written and change.variants == ["card"]  # the logo passes as it is
    assert change.seen is not None and change.seen.state == "home"
    assert change.screen == "screens/home/2.png" and change.checked == 3 and not change.broken
    home = next(s for s in json.loads((model / "model.json").read_text())["states"] if s["name"] == "home")
    assert [c.get("variants") for c in home["checks"]] == [None, {"dark": "home.card.dark.png"}]
    assert (model / "home.card.dark.png").is_file()
    classifier = load_model(model)
    for frame, state in ((night, "home"), (draw("home"), "home"), (draw("login"), "login"),
                         (dark(draw("login")), UNKNOWN)):
        assert classifier.classify(frame).state == state
    # the whole screen dark: the logo needs its look too, the card has it already
    assert capture_variant(model, dark(draw("home")), "home", "dark").variants == ["logo"]
    assert sorted(p.name for p in model.glob("home.*.png")) == [
        "home.card.dark.png", "home.card.png", "home.logo.dark.png", "home.logo.png"]
    assert load_model(model).classify(dark(draw("home"))).state == "home"
    remove(model, "home", force=True)  # the state removed: its variants go too
    assert not list(model.glob("home.*"))


def test_a_variant_that_breaks_the_model_or_cannot_be_located_is_refused(model: Path) -> None:
    before = tree(model)
    # "login" taught from home with another icon where login has its panel: home matches too
    both = draw("home")
    icon(both, PANEL, 2)
    with pytest.raises(ConfigError, match=r"^the 'dark' look of 'login' not recorded: this screenshot is "
                                          r"recognised as 'unknown', not 'login' \(login: two base states "
                                          r"matched: login, home\); nothing was written"):
        capture_variant(model, both, "login", "dark")
    with pytest.raises(ConfigError, match=r"'dark' look of check 'ok' of 'dialog': template "
                                          r"dialog.ok.dark.png is too plain to locate"):
        capture_variant(model, draw("home"), "dialog", "dark")
    with pytest.raises(ConfigError, match=r"no state 'nope' to record a 'dark' look of \(its states: login, home"):
        capture_variant(model, draw("home"), "nope", "dark")
    with pytest.raises(ConfigError, match=r"look name 'dark theme' is not usable"):
        capture_variant(model, dark(draw("home")), "home", "dark theme")
    assert tree(model) == before


@pytest.mark.parametrize(("variants", "expected"), [
    ("dark", r"'variants' must map a look's name to its template"),
    ({"dark": "missing.png"}, r"check 'card': template missing.png is missing$"),
    ({"dark": "home.logo.png", "dark theme": "home.logo.png"}, r"look name 'dark theme' is not usable"),
    ({"dark": "../x.png"}, r"the 'dark' variant must name a PNG file in the model directory"),
])
def test_variants_in_model_json_are_validated(model: Path, variants: object, expected: str) -> None:
    message = _broken(model, _json_edit(lambda d: d["states"][1]["checks"][1].update(variants=variants)))
    assert re.search(expected, message), message


def test_a_variant_of_another_size_is_refused(model: Path) -> None:
    def edit(m: Path) -> None:
        Image.new("RGB", (8, 8), "white").save(m / "home.card.dark.png")
        _json_edit(lambda d: d["states"][1]["checks"][1].update(variants={"dark": "home.card.dark.png"}))(m)

    assert re.search(r"template home.card.dark.png is 8x8, its region \[300, 200, 32, 32\] is 32x32$",
                     _broken(model, edit))
