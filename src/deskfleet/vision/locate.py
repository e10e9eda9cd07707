"""Finding the application's window by its pixels, where the window system cannot say.

A model anchored to the app's window (``model.json``'s ``window``) is placed on the screen by
where the window system says the window is (:class:`~deskfleet.desktop.Placement`). Some
hosts cannot be asked — a desktop reached only through its pixels (a VNC or RDP stream, a
kiosk shell), an app whose window the listing does not find — and there the model's
*primary anchor* places it: one part of the window that its working screens all show (a
menu bar, a logo), named in ``model.json`` (``"anchor": "menu_left"``, the name of a match
check). :class:`WindowLocator` looks for it where it was last, then over the whole screen at
each scale the model declares (``"scales": [1.0, 1.25, 1.5]``: a display's DPI, an RDP
client's scaling), and answers the placement it implies.

Cost: ≈ 1 ms where it was last; a search of a 1920x1080 screen takes a coarse pass at half
resolution per scale, then a fine one around the best place (bench/desktop.py measures it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from ..desktop.base import Frame, Placement, Region
from .match import MIN_TEXTURE, Gray, gray, soften

#: how far from where it was last the anchor is first looked for, in screen pixels
NEAR = 8


@dataclass(slots=True)
class WindowLocator:
    """Where the app's window is, from ``template`` (cut at ``at`` in the model's coordinates)
    found on the screen at one of ``scales``; ``place`` answers a :class:`Placement`."""

    template: Gray
    at: Region
    scales: tuple[float, ...] = (1.0,)
    threshold: float = 0.9
    name: str = ""
    #: the anchor as other looks of the app draw it (its check's variants: another theme)
    variants: tuple[Gray, ...] = ()
    _scaled: dict[float, list[Gray]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.template.ndim != 2 or self.template.shape != (self.at.height, self.at.width):
            raise ValueError(f"the primary anchor must be a grayscale image of its region's size ({self.at.width}x"
                             f"{self.at.height})")
        if any(v.shape != self.template.shape for v in self.variants):
            raise ValueError("a variant of the primary anchor must be of the anchor's size")
        if float(self.template.std()) < MIN_TEXTURE:
            raise ValueError(f"the primary anchor {self.name!r} is too plain to locate")
        if not self.scales or any(not 0.25 <= s <= 4 for s in self.scales):
            raise ValueError(f"scales must be factors between 0.25 and 4, not {self.scales!r}")
        for s in self.scales:
            size = (max(1, round(self.at.width * s)), max(1, round(self.at.height * s)))
            self._scaled[s] = [soften(np.asarray(image if s == 1.0 else cv2.resize(
                image, size, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC), np.uint8))
                for image in (self.template, *self.variants)]

    def place(self, frame: Frame, last: Placement | None = None) -> Placement | None:
        """The placement of the model on ``frame``: where the anchor is found (first near where
        ``last`` puts it); None when it is nowhere (another screen shows, a dialog hides it)."""
        if last is not None and last.scale in self._scaled:
            near = self._near(frame, last)
            if near is not None:
                return near
        screen = soften(gray(frame))
        best: tuple[float, float, int, int] | None = None  # score, scale, x, y
        for s in self.scales:
            for template in self._scaled[s]:
                found = self._search(screen, template)
                if found is not None and (best is None or found[0] > best[0]):
                    best = (found[0], s, found[1], found[2])
            if best is not None and best[0] >= self.threshold:
                break  # the scales are tried in the model's order: the first it names, first
        if best is None or best[0] < self.threshold:
            return None
        _, s, x, y = best
        return Placement(x - round(self.at.left * s), y - round(self.at.top * s), s)

    def _near(self, frame: Frame, last: Placement) -> Placement | None:
        want = last.to_screen(self.at)
        th, tw = self._scaled[last.scale][0].shape
        left, top = max(0, want.left - NEAR), max(0, want.top - NEAR)
        if want.left + tw + NEAR <= 0 or want.top + th + NEAR <= 0:
            return None
        area = soften(gray(frame[top : want.top + th + NEAR, left : want.left + tw + NEAR]))
        if area.shape[0] < th or area.shape[1] < tw:
            return None
        for template in self._scaled[last.scale]:
            score, (x, y) = _best(area, template)
            if score >= self.threshold:
                s = last.scale
                return Placement(left + x - round(self.at.left * s), top + y - round(self.at.top * s), s)
        return None

    def _search(self, screen: Gray, template: Gray) -> tuple[float, int, int] | None:
        """(score, x, y) of ``template`` over the whole screen: a coarse pass at half
        resolution, then the full one within 4 px of the coarse answer."""
        th, tw = template.shape
        if screen.shape[0] < th or screen.shape[1] < tw:
            return None
        if min(th, tw) >= 16:
            half = np.asarray(cv2.pyrDown(screen), np.uint8)
            small = np.asarray(cv2.pyrDown(template), np.uint8)
            _, (cx, cy) = _best(half, small)
            left, top = max(0, 2 * cx - 4), max(0, 2 * cy - 4)
            area = screen[top : 2 * cy + th + 4, left : 2 * cx + tw + 4]
            if area.shape[0] >= th and area.shape[1] >= tw:
                score, (x, y) = _best(area, template)
                return score, left + x, top + y
        score, (x, y) = _best(screen, template)
        return score, x, y


def _best(area: Gray, template: Gray) -> tuple[float, tuple[int, int]]:
    result = cv2.matchTemplate(area, template, cv2.TM_CCOEFF_NORMED)
    _, best, _, at = cv2.minMaxLoc(result)
    return (float(best) if np.isfinite(best) else 0.0), (int(at[0]), int(at[1]))
