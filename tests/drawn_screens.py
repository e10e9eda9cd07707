"""Screens drawn with numpy for the model-authoring tests: a header logo every screen
shows, and icons that tell the screens apart (login: a panel icon; home: a card icon;
form: a body icon; "+dialog": a dialog with its own icon over the screen)."""

from __future__ import annotations

import numpy as np

from deskfleet.desktop import Region

W, H = 640, 480
LOGO = Region(10, 10, 32, 32)
PANEL = Region(300, 100, 32, 32)
CARD = Region(300, 200, 32, 32)
BODY = Region(200, 300, 32, 32)
OK = Region(400, 250, 32, 32)


def icon(frame: np.ndarray, at: Region, kind: int = 0, dy: int = 0) -> None:
    """A 32x32 icon with a mark that depends on ``kind``."""
    ic = np.full((32, 32, 3), 40, np.uint8)
    ic[2:6, 2:30] = 160
    ic[8:24, 14:18] = 250
    if kind == 0:
        ic[14:18, 8:24] = 250
    elif kind == 1:
        ic[26:30, 4:28] = 200
    else:
        ic[8:24, 4:8] = 120
    frame[at.top + dy : at.top + dy + 32, at.left : at.left + 32] = ic


def draw(name: str, *, dy: int = 0) -> np.ndarray:
    frame = np.full((H, W, 3), 230, np.uint8)
    icon(frame, LOGO)
    if name in ("login", "login+dialog"):
        icon(frame, PANEL, 0)
    if name in ("home", "home+dialog"):
        icon(frame, CARD, 1)
    if name == "form":
        icon(frame, BODY, 1, dy)
    if name.endswith("+dialog"):
        frame[230:300, 380:460] = 250
        icon(frame, OK, 2)
    return frame
