"""The KeePassXC pack's recorded model (examples/keepassxc/model), without a display: every
saved screenshot is recognised as labelled, and no dialog — a real one cut from a saved
screen, shrunk to the smallest KeePassXC draws, or a plain box — pasted where KeePassXC puts
its dialogs (centred at (502, 344)) over any saved list screen is taken for the list."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deskfleet.vision import load_model

MODEL = Path(__file__).resolve().parents[2] / "examples" / "keepassxc" / "model"
CENTRE = (502, 344)  # where KeePassXC centres its dialogs over a 1024x768 window at (0, 0)
#: dialogs as they appear in the saved screens: (screenshot, [left, top, width, height])
DIALOGS = {
    "unsaved_changes": ("unsaved_changes/1.png", (318, 299, 369, 91)),
    "lock_confirm": ("lock_confirm/1.png", (271, 299, 463, 91)),
    "unlock_failed": ("unlock_failed/1.png", (252, 263, 500, 163)),
}


def frame(name: str) -> np.ndarray:
    return np.asarray(Image.open(MODEL / "screens" / name).convert("RGB"))


@pytest.fixture(scope="module")
def classifier():  # type: ignore[no-untyped-def]
    return load_model(MODEL)


def test_every_saved_screen_is_recognised_as_labelled(classifier) -> None:  # type: ignore[no-untyped-def]
    wrong = []
    for png in sorted((MODEL / "screens").rglob("*.png")):
        label = png.parent.name
        seen = classifier.classify(np.asarray(Image.open(png).convert("RGB"))).state
        if seen != label:
            wrong.append(f"{png.parent.name}/{png.name}: {seen}")
    assert wrong == []
    assert len(list((MODEL / "screens" / "unknown").glob("*.png"))) >= 10


def _over(base: np.ndarray, box: np.ndarray) -> np.ndarray:
    h, w = box.shape[:2]
    x, y = CENTRE[0] - w // 2, CENTRE[1] - h // 2
    out = base.copy()
    out[y:y + h, x:x + w] = box
    return out


def test_no_dialog_over_the_list_is_taken_for_the_list(classifier) -> None:  # type: ignore[no-untyped-def]
    lists = sorted((MODEL / "screens" / "entries").glob("*.png"))
    assert len(lists) >= 8, "the list's looks: empty, one entry, many, after a search, another row selected…"
    boxes = []
    for source, (left, top, width, height) in DIALOGS.values():
        cut = frame(source)[top:top + height, left:left + width]
        boxes += [cut, cut[:91, :300]]  # as drawn, and shrunk to the smallest dialog KeePassXC draws
    plain = np.full((91, 300, 3), 239, np.uint8)
    plain[0, :] = plain[-1, :] = plain[:, 0] = plain[:, -1] = 160
    boxes.append(plain)
    false_ready = []
    for png in lists:
        base = np.asarray(Image.open(png).convert("RGB"))
        assert classifier.classify(base).state == "entries"
        for i, box in enumerate(boxes):
            if classifier.classify(_over(base, box)).state == "entries":
                false_ready.append(f"{png.name} + box {i}")
    assert false_ready == []
