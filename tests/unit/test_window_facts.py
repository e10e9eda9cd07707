"""Window-system facts beside the pixels: which window is the app's main one, what lies over
it, and how the classifier uses that — a dialog nobody modelled over a ready screen is
``covered`` (never ready), a dialog the model knows in its own window is recognised, the
app's own tooltips and menus are no reason to stop. Pre-flight: ``covered`` is uncovered by
the built-in playbook, and a ready screen counts only if the app answers the window system's
ping — the probe is asked only when the ping cannot be."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_packs import SCREENS, write_pack
from test_preflight import Scripted, run

from deskfleet import COVERED, UNKNOWN, ProbeResult, Region, Window, WindowFacts, load_pack
from deskfleet.vision import Classifier, ScreenState, TemplateCheck

APP, OTHER = 100, 200
MAIN = Window(1, "Acme", Region(0, 0, 800, 600), APP, protocols=frozenset({"_NET_WM_PING", "WM_DELETE_WINDOW"}))


def win(id: int, rect: tuple[int, int, int, int], pid: int = APP, *, dialog_of: int | None = None,
        popup: bool = False, title: str | None = None) -> Window:
    return Window(id, f"w{id}" if title is None else title, Region(*rect), pid, dialog_of, popup,
                  frozenset({"WM_DELETE_WINDOW"}))


# -- which window is the app's, and what covers it ------------------------------------------------


def test_the_main_window_is_the_apps_largest_that_is_no_dialog() -> None:
    tip = win(5, (10, 10, 50, 20), popup=True)
    dialog = win(3, (100, 100, 900, 700), dialog_of=1)  # larger, but a dialog
    other = win(4, (700, 500, 300, 200), OTHER)
    far = win(6, (900, 650, 50, 50), OTHER)  # above, but not over the main window
    below = win(7, (0, 0, 1024, 768), OTHER)  # another program's, under the app
    facts = WindowFacts.of([below, MAIN, tip, dialog, other, far], APP)
    assert facts.main == MAIN
    assert facts.above == (tip, dialog, other)


def test_a_title_picks_the_main_window_and_a_dialog_only_app_has_one() -> None:
    toolbox = win(2, (0, 0, 1000, 700), title="Toolbox")
    assert WindowFacts.of([MAIN, toolbox], APP, title="^Acme$").main == MAIN
    login = win(3, (300, 200, 400, 300), dialog_of=99, title="Sign in")
    assert WindowFacts.of([login], APP).main == login
    assert WindowFacts.of([win(8, (0, 0, 10, 10), popup=True)], APP).main is None
    assert WindowFacts.of([], APP) == WindowFacts(None)


def test_facts_round_trip_through_json() -> None:
    facts = WindowFacts.of([MAIN, win(3, (100, 100, 300, 200), dialog_of=1, title="About")], APP)
    again = WindowFacts.from_dict(facts.to_dict())
    assert (again.main.rect, again.main.pid) == (MAIN.rect, APP)
    assert [(w.title, w.rect, w.dialog_of) for w in again.above] == [("About", Region(100, 100, 300, 200), 1)]


# -- the classifier ---------------------------------------------------------------------------


LIST_MARK = Region(10, 10, 40, 40)  # the ready list's checks: a corner the rows never reach
DIALOG_MARK = Region(330, 260, 40, 40)  # a known dialog's check, inside its own window
DIALOG = (300, 230, 200, 140)


def frame(*, dialog: bool = False) -> np.ndarray:
    f = np.full((600, 800, 3), 230, np.uint8)
    f[10:50, 10:50] = 30
    if dialog:
        f[260:300, 330:370] = 90
    return f


def classifier() -> Classifier:
    ready = ScreenState("list", [TemplateCheck.from_frame(frame(), LIST_MARK, 0.95, "corner")], ready=True)
    known = ScreenState("confirm", [TemplateCheck.from_frame(frame(dialog=True), DIALOG_MARK, 0.95, "icon")],
                        overlay=True)
    return Classifier([ready, known], screen=(800, 600))


def test_a_dialog_nobody_modelled_over_the_ready_list_is_covered_never_ready() -> None:
    c = classifier()
    shown = frame()  # the unknown dialog sits over the rows: every check of "list" still passes
    assert c.classify(shown).state == "list"  # pixels alone: the false ready of the old way
    about = win(9, (250, 200, 300, 200), dialog_of=1, title="About Acme")
    seen = c.classify(shown, WindowFacts(MAIN, (about,)))
    assert seen.state == COVERED
    assert seen.detail == "covered by 'About Acme', a dialog 300x200 at 250,200 (the pixels alone say 'list')"
    verdict = c.explain(shown, WindowFacts(MAIN, (about,))).verdict("list")
    assert verdict is not None and verdict.reason.startswith("its checks pass, but it is covered by 'About Acme'")


def test_nothing_over_the_app_changes_nothing() -> None:
    assert classifier().classify(frame(), WindowFacts(MAIN)).state == "list"
    assert classifier().classify(frame(), WindowFacts(None)).state == "list"


def test_a_dialog_the_model_knows_is_recognised_in_its_own_window() -> None:
    c = classifier()
    confirm = win(9, DIALOG, dialog_of=1, title="Confirm")
    assert c.classify(frame(dialog=True), WindowFacts(MAIN, (confirm,))).state == "confirm"
    # … but not under another window (over the dialog, beside its check: the pixels still match)
    on_top = win(10, (420, 300, 100, 60), OTHER, title="Update available")
    seen = c.classify(frame(dialog=True), WindowFacts(MAIN, (confirm, on_top)))
    assert seen.state == COVERED and "'Update available'" in seen.detail and "'Confirm'" not in seen.detail


def test_the_apps_own_tooltip_is_no_cover_another_programs_popup_is() -> None:
    c = classifier()
    tip = win(11, (60, 60, 120, 24), popup=True)
    assert c.classify(frame(), WindowFacts(MAIN, (tip,))).state == "list"
    toast = win(12, (560, 480, 230, 100), OTHER, popup=True, title="")
    seen = c.classify(frame(), WindowFacts(MAIN, (toast,)))
    assert seen.state == COVERED and seen.detail.startswith("covered by (untitled), a menu or popup 230x100")


def test_an_unknown_screen_under_a_window_is_covered_and_a_wrong_size_stays_wrong() -> None:
    c = classifier()
    blank = np.full((600, 800, 3), 230, np.uint8)
    seen = c.classify(blank, WindowFacts(MAIN, (win(9, DIALOG, dialog_of=1),)))
    assert seen.state == COVERED and seen.detail.endswith("(no state matched)")
    assert c.classify(np.zeros((768, 1024, 3), np.uint8), WindowFacts(MAIN, (win(9, DIALOG),))).state == "wrong_screen"


# -- pre-flight ---------------------------------------------------------------------------


class Windowed(Scripted):
    """A scripted desktop that can also answer for the window system."""

    def __init__(self, show: Any, above: list[Window], answers: bool | None = True) -> None:
        super().__init__(show)
        self.above = above
        self.answers = answers
        self.closed: list[str] = []
        self.raised = 0
        self.pings = 0
        self.keys: list[tuple[str, ...]] = []

    async def app_windows(self) -> WindowFacts:
        return WindowFacts(Window(1, "tiny", Region(0, 0, 320, 240), APP, protocols=frozenset({"_NET_WM_PING"})),
                           tuple(self.above))

    async def app_answers(self, timeout: float = 0.5) -> bool | None:
        self.pings += 1
        return self.answers

    async def close_window(self, window: Window) -> bool:
        self.closed.append(window.title)
        self.above = [w for w in self.above if w.id != window.id]
        return True

    async def bring_to_front(self) -> None:
        self.raised += 1
        self.above = [w for w in self.above if w.pid == APP]

    async def press(self, *keys: str) -> None:
        self.keys.append(keys)


@pytest.fixture
def pack(tmp_path: Path) -> Any:
    return load_pack(write_pack(tmp_path / "tiny"))


async def test_preflight_closes_a_dialog_nobody_modelled_and_goes_on(pack: Any) -> None:
    # beside the checked area (a window over it would change the pixels the state is checked by)
    desktop = Windowed(lambda: SCREENS["home"], [win(9, (150, 120, 150, 100), dialog_of=1, title="Tip of the day")])
    out = await run(desktop, pack.model)
    assert out.ok and out.steps == ["uncover"], out.detail
    assert desktop.closed == ["Tip of the day"]
    [step] = [data for kind, data in out.events if kind == "playbook.step"]
    assert step["from_state"] == COVERED and step["to_state"] == "home"
    assert "covered by 'Tip of the day', a dialog 150x100 at 150,120 (the pixels alone say 'home')" in step["why"]


async def test_preflight_sends_another_programs_window_behind_the_app(pack: Any) -> None:
    desktop = Windowed(lambda: SCREENS["home"], [win(9, (150, 120, 100, 100), OTHER, title="Notes")])
    out = await run(desktop, pack.model)
    assert out.ok and out.steps == ["uncover"]
    assert desktop.raised == 1 and desktop.closed == []


async def test_a_window_that_will_not_go_fails_the_step_and_names_it(pack: Any, monkeypatch: Any) -> None:
    import deskfleet.packs.playbooks as playbooks

    monkeypatch.setattr(playbooks, "UNCOVER_WAIT", 0.2)
    desktop = Windowed(lambda: SCREENS["home"], [win(9, (150, 120, 150, 100), dialog_of=1, title="Sticky")])

    async def refuse(window: Window) -> bool:
        desktop.closed.append(window.title)
        return True  # asked, but it stays

    desktop.close_window = refuse  # type: ignore[method-assign]
    out = await run(desktop, pack.model)
    assert not out.ok
    errors = [data["error"] for kind, data in out.events if kind == "playbook.step"]
    assert errors[0] == "DesktopError: 'Sticky', a dialog 150x100 at 150,120 is still over the application after it " \
                        "was asked to go"


@pytest.fixture
def probed(pack: Any) -> list[bool]:
    """The tiny pack's model with a probe that counts its calls (and passes)."""
    calls: list[bool] = []

    async def probe(desktop: Any) -> ProbeResult:
        calls.append(True)
        return ProbeResult(True)

    pack.model.probe = probe
    return calls


async def test_a_ready_screen_of_an_app_that_does_not_answer_the_ping_is_hung(pack: Any, probed: list[bool]) -> None:
    desktop = Windowed(lambda: SCREENS["home"], [], answers=False)
    out = await run(desktop, pack.model)
    step = next(data for kind, data in out.events if kind == "playbook.step")
    assert step["playbook"] == "restart_app" and step["from_state"] == "home"
    assert step["why"] == ("the application did not answer the window system's ping within 1s: "
                           "its event loop is stuck (hung)")
    assert len(probed) < desktop.pings, "the ping decides before the probe is asked"


@pytest.mark.parametrize("answers", [True, None])
async def test_the_probe_runs_when_the_ping_answers_or_cannot_be_asked(pack: Any, probed: list[bool],
                                                                       answers: bool | None) -> None:
    desktop = Windowed(lambda: SCREENS["home"], [], answers=answers)
    out = await run(desktop, pack.model)
    assert out.ok and out.steps == [] and probed == [True] and desktop.pings == 1


def test_every_pack_answers_covered_with_the_built_in_uncover_unless_it_says_otherwise(pack: Any,
                                                                                      tmp_path: Path) -> None:
    assert pack.model.recovery_for(COVERED) == "uncover" and "uncover" in pack.model.playbooks
    from test_packs import MANIFEST

    own = MANIFEST.replace("[states.recover]", "[states.recover]\ncovered = \"dismiss\"")
    assert load_pack(write_pack(tmp_path / "own", own)).model.recovery_for(COVERED) == "dismiss"
    assert classifier().classify(np.full((600, 800, 3), 230, np.uint8)).state == UNKNOWN


# -- anchored to the window -----------------------------------------------------------------------


def test_as_recorded_places_the_windows_content_where_it_was_recorded() -> None:
    from deskfleet.desktop import as_recorded

    screen = np.zeros((1080, 1920, 3), np.uint8)
    screen[200:968, 300:1324] = 77  # the window, 1024x768 at 300,200
    screen[210, 310] = 255  # a pixel 10,10 into the window
    placed = as_recorded(screen, (300, 200), (1024, 768))
    assert placed.shape == (768, 1024, 3) and placed[10, 10, 0] == 255 and (placed[11:, 11:] == 77).all()
    same = np.full((768, 1024, 3), 5, np.uint8)
    assert as_recorded(same, (0, 0), (1024, 768)) is same  # nothing to move: no copy
    # a window half off the screen: what the screen cannot show is black
    part = as_recorded(np.full((768, 1024, 3), 9, np.uint8), (-100, 0), (1024, 768))
    assert (part[:, :100] == 0).all() and (part[:, 100:] == 9).all()


def test_a_models_window_round_trips_and_is_checked(tmp_path: Path) -> None:
    import json

    from deskfleet.errors import ConfigError
    from deskfleet.vision import TemplateLibrary
    from deskfleet.vision.authoring import capture
    from deskfleet.vision.templates import Anchor
    from drawn_screens import LOGO, H, W, draw

    d = tmp_path / "model"
    capture(d, draw("login"), "login", [Anchor("logo", LOGO)], window=Region(0, 0, W, H - 40))
    assert json.loads((d / "model.json").read_text())["window"] == [0, 0, W, H - 40]
    assert TemplateLibrary.load(d).window == Region(0, 0, W, H - 40)
    data = json.loads((d / "model.json").read_text())
    data["window"] = [0, 0, W + 1, H]
    (d / "model.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"'window' \(the app's main window when recorded\): region .* lies outside"):
        TemplateLibrary.load(d)


def test_capture_from_a_moved_window_records_as_if_it_had_not_moved(tmp_path: Path) -> None:
    from deskfleet.vision import TemplateLibrary
    from deskfleet.vision.authoring import capture
    from deskfleet.vision.templates import Anchor
    from drawn_screens import CARD, LOGO, PANEL, H, W, draw

    d = tmp_path / "model"
    capture(d, draw("login"), "login", [Anchor("logo", LOGO), Anchor("panel", PANEL)], window=Region(0, 0, W, H))
    moved = np.zeros_like(draw("home"))
    moved[30:, 50:] = draw("home")[: H - 30, : W - 50]  # the window now at 50,30
    capture(d, moved, "home", [Anchor("logo", LOGO), Anchor("card", CARD)], ready=True,
            window=Region(50, 30, W, H))
    library = TemplateLibrary.load(d)
    assert library.window == Region(0, 0, W, H)
    assert library.classifier().classify(draw("home")).state == "home"


def test_a_placement_moves_and_scales_between_the_model_and_the_screen() -> None:
    from deskfleet.desktop import Placement

    recorded = Region(0, 0, 1024, 768)
    moved = Placement.of(Region(300, 200, 1024, 768), recorded)
    assert (moved.dx, moved.dy, moved.scale) == (300, 200, 1.0) and moved.point(10, 20) == (310, 220)
    scaled = Placement.of(Region(125, 63, 1280, 960), recorded)
    assert scaled.scale == pytest.approx(1.25) and scaled.point(100, 100) == (250, 188)
    assert scaled.to_screen(Region(100, 100, 40, 20)) == Region(250, 188, 50, 25)
    assert scaled.to_model(Region(250, 188, 50, 25)) == Region(100, 100, 40, 20)
    # a window merely resized (not both sides by one factor) is not scaled: anchored at its corner
    resized = Placement.of(Region(0, 0, 1200, 768), recorded)
    assert resized.scale == 1.0 and resized.identity
    assert Placement.of(recorded, recorded).identity


def test_a_scaled_window_is_shown_to_the_model_at_its_recorded_size() -> None:
    from deskfleet.desktop import Placement

    model = np.zeros((768, 1024, 3), np.uint8)
    model[100:140, 200:280] = 250  # a bright block in the recorded window
    screen = np.zeros((1080, 1920, 3), np.uint8)
    screen[63 + 125 : 63 + 175, 125 + 250 : 125 + 350] = 250  # the same, at 1.25 where the window is now
    shown = Placement.of(Region(125, 63, 1280, 960), Region(0, 0, 1024, 768)).frame(screen, (1024, 768))
    assert shown.shape == (768, 1024, 3)
    assert (shown[102:138, 202:278] == 250).all() and shown[90, 190].max() == 0
    assert np.abs(shown.astype(int) - model).mean() < 1.0
