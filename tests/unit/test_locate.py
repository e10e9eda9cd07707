"""The primary anchor: finding an app's window by its pixels where the window system cannot
say where it is — moved, on a larger screen, scaled, or hidden."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from deskfleet.desktop import Placement, Region
from deskfleet.errors import ConfigError
from deskfleet.vision import TemplateLibrary
from deskfleet.vision.locate import WindowLocator
from deskfleet.vision.match import gray
from deskfleet.vision.templates import Anchor
from drawn_screens import CARD, LOGO, H, W, draw

SCREEN = (1920, 1080)


def on_screen(window: np.ndarray, at: tuple[int, int], scale: float = 1.0) -> np.ndarray:
    """A 1920x1080 screen of another colour with ``window`` drawn at ``at``, ``scale`` times its size."""
    if scale != 1.0:
        window = cv2.resize(window, (round(W * scale), round(H * scale)), interpolation=cv2.INTER_LINEAR)
    frame = np.full((SCREEN[1], SCREEN[0], 3), 60, np.uint8)
    h, w = window.shape[:2]
    frame[at[1] : at[1] + h, at[0] : at[0] + w] = window
    return frame


def locator(*scales: float) -> WindowLocator:
    home = draw("home")
    return WindowLocator(gray(LOGO.crop(home)).copy(), LOGO, scales or (1.0,), name="logo")


@pytest.mark.parametrize(("at", "scale"), [((0, 0), 1.0), ((300, 200), 1.0), ((1279, 599), 1.0),
                                           ((100, 50), 1.25), ((700, 300), 1.5)])
def test_the_window_is_found_where_it_is_at_the_scale_it_is(at: tuple[int, int], scale: float) -> None:
    found = locator(1.0, 1.25, 1.5).place(on_screen(draw("home"), at, scale))
    assert found is not None and found.scale == scale
    assert abs(found.dx - at[0]) <= 1 and abs(found.dy - at[1]) <= 1, found
    # the model's card, placed by it, is where the screen shows it
    card = found.to_screen(CARD)
    assert abs(card.left - (at[0] + round(CARD.left * scale))) <= 1
    assert abs(card.top - (at[1] + round(CARD.top * scale))) <= 1


def test_near_where_it_was_last_then_anywhere_else_then_nowhere() -> None:
    where = locator()
    last = Placement(300, 200)
    assert where.place(on_screen(draw("home"), (305, 197)), last) == Placement(305, 197)  # moved a little
    assert where.place(on_screen(draw("home"), (900, 10)), last) == Placement(900, 10)  # moved far
    hidden = on_screen(draw("home"), (300, 200))
    hidden[200:260, 300:360] = 60  # another window over the logo
    assert where.place(hidden, last) is None
    assert locator(1.0).place(on_screen(draw("home"), (10, 10), 1.5)) is None  # a scale it was not told of
    assert where.place(np.zeros((20, 20, 3), np.uint8)) is None  # a screen smaller than the anchor


def test_a_plain_or_misshapen_anchor_is_refused() -> None:
    with pytest.raises(ValueError, match="too plain"):
        WindowLocator(np.full((32, 32), 200, np.uint8), LOGO)
    with pytest.raises(ValueError, match="of its region's size"):
        WindowLocator(np.zeros((8, 8), np.uint8), LOGO)
    with pytest.raises(ValueError, match=r"scales must be factors between 0\.25 and 4"):
        WindowLocator(gray(LOGO.crop(draw("home"))).copy(), LOGO, (1.0, 9.0))


@pytest.fixture
def anchored(tmp_path: Path) -> Path:
    lib = TemplateLibrary("toy", (W, H), window=Region(0, 0, W, H))
    lib.record(draw("home"), "home", [Anchor("logo", LOGO), Anchor("card", CARD)], ready=True)
    lib.anchor, lib.scales = "logo", (1.0, 1.25)
    lib.save(tmp_path)
    return tmp_path


def test_a_model_names_its_primary_anchor_and_scales(anchored: Path) -> None:
    text = (anchored / "model.json").read_text()
    assert '"anchor": "logo", "scales": [1.0, 1.25]' in text
    lib = TemplateLibrary.load(anchored)
    where = lib.locator()
    assert where is not None and where.scales == (1.0, 1.25) and where.at == LOGO
    found = where.place(on_screen(draw("home"), (40, 30), 1.25))
    assert found is not None and found.scale == 1.25 and abs(found.dx - 40) <= 1 and abs(found.dy - 30) <= 1
    lib.anchor = None
    assert lib.locator() is None


@pytest.mark.parametrize(("change", "expected"), [
    ({"anchor": "nope"}, r"'anchor' names 'nope', which is no match check of any state"),
    ({"anchor": 3}, r"'anchor' must name a match check, not 3"),
    ({"window": None}, r"'anchor' finds the app's window by its pixels: the model needs a 'window'"),
    ({"scales": [1.0, 0]}, r"'scales' must be a list of factors between 0.25 and 4"),
    ({"scales": []}, r"'scales' must be a list of factors"),
])
def test_a_wrong_anchor_or_scale_says_what_to_fix(anchored: Path, change: dict[str, object], expected: str) -> None:
    data = json.loads((anchored / "model.json").read_text())
    data.update(change)
    (anchored / "model.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=expected):
        TemplateLibrary.load(anchored)


def test_another_look_of_the_anchor_is_found_by_its_variant() -> None:
    home = draw("home")
    dark = 255 - home
    plain = locator()
    assert plain.place(on_screen(dark, (300, 200))) is None
    both = WindowLocator(plain.template, LOGO, variants=(gray(LOGO.crop(dark)).copy(),), name="logo")
    assert both.place(on_screen(dark, (300, 200))) == Placement(300, 200)
    assert both.place(on_screen(dark, (302, 201)), Placement(300, 200)) == Placement(302, 201)
    assert both.place(on_screen(home, (10, 20))) == Placement(10, 20)
    with pytest.raises(ValueError, match="of the anchor's size"):
        WindowLocator(plain.template, LOGO, variants=(np.zeros((4, 4), np.uint8),))
