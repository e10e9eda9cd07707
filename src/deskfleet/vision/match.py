"""Template search within a region: the check that survives real rendering.

A real display does not draw a UI part at exactly the same pixel every time — a font
hints differently, a toolkit rounds a layout, a VM's resolution changes by a pixel — so
a template compared at one fixed position (``TemplateCheck``) sinks on a 1-px shift. A
:class:`MatchCheck` looks for its template anywhere inside a small search region around
where it was recorded, with OpenCV's ``matchTemplate`` (normalised correlation,
``TM_CCOEFF_NORMED``, on grayscale). Measured here: ≈ 1 ms for a 400x300 region, and
the score stays ≥ 0.98 under noise, blur and a 1-2 px shift (DESKTOP-NOTES).

Normalised correlation is blind to brightness and contrast: the same shape in another
shade scores 1.0. Colour-coded parts (a red error icon and a grey disabled one) must not
pass for each other, so at the best position the mean grey-level difference is checked
too. A template with no texture would correlate with anything flat; it is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, cast

import cv2
import numpy as np
import numpy.typing as npt

from ..desktop.base import Frame, Region

Gray = npt.NDArray[np.uint8]

#: grey-level standard deviation below which a template is too plain to locate anything
MIN_TEXTURE = 6.0


def gray(image: Frame) -> Gray:
    """Grayscale of an RGB frame or crop (a view is fine; OpenCV copies what it needs)."""
    if image.ndim == 2:
        return image
    return cast(Gray, cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY))


def soften(image: Gray) -> Gray:
    """A light blur (3x3 Gaussian), applied to templates and searched areas alike: what one
    machine's renderer and another's differ by — font hinting at another scale, a window
    resampled to the size it was recorded at, JPEG — lives in the finest detail, which the
    blur takes out of the comparison; the shapes that tell screens apart stay."""
    return np.asarray(cv2.GaussianBlur(image, (3, 3), 0), np.uint8)


def edges(image: Gray) -> np.ndarray:
    """Gradient magnitude (3x3 Sobel): where the image changes and how much, whichever way."""
    f = image.astype(np.float32)
    return np.asarray(cv2.magnitude(cv2.Sobel(f, cv2.CV_32F, 1, 0, ksize=3),
                                    cv2.Sobel(f, cv2.CV_32F, 0, 1, ksize=3)))


def expand(region: Region, margin: int, width: int, height: int) -> Region:
    """``region`` grown by ``margin`` on every side, clipped to a ``width``x``height`` screen."""
    left, top = max(0, region.left - margin), max(0, region.top - margin)
    right = min(width, region.left + region.width + margin)
    bottom = min(height, region.top + region.height + margin)
    return Region(left, top, right - left, bottom - top)


@dataclass(slots=True)
class MatchCheck:
    """``template`` found somewhere within ``region`` with correlation ≥ ``threshold``.

    ``max_shade`` bounds the mean grey-level difference (0-255) at the best position.
    ``any_theme``: where the pixels do not match, the shapes may — the template's edges
    (gradient magnitude, whichever way the contrast runs) correlated with the screen's: the
    same icon and text in a dark theme. A model opts in (model.json ``"any_theme": true``):
    an app that tells two states apart by colour alone (a red icon and a grey one of the
    same shape) must not.

    ``variants``: the same part as another look draws it (another theme's icon, recorded by
    ``deskfleet model capture --variant``), each of the template's size. Tried, by pixels,
    only when the template itself does not pass: a look the model knows costs nothing more.
    """

    kind: ClassVar[str] = "match"

    region: Region  # where to search (the template's recorded place plus a margin)
    template: Gray
    threshold: float = 0.9
    max_shade: float = 40.0
    name: str = ""
    #: also pass on the same shapes in other colours (another theme): see ``_structure``
    any_theme: bool = False
    variants: tuple[Gray, ...] = ()
    cost: int = field(default=1, init=False)  # cheap: the classifier runs these first
    _soft: Gray = field(init=False, repr=False)  # the template as it is compared: lightly blurred
    _softs: tuple[Gray, ...] = field(init=False, repr=False)  # the variants, likewise
    _edges: np.ndarray | None = field(init=False, repr=False)  # its structure: gradient magnitude

    def __post_init__(self) -> None:
        th, tw = self.template.shape[:2]
        if self.template.ndim != 2 or self.template.dtype != np.uint8:
            raise ValueError("a match template is a 2-D uint8 grayscale image")
        for variant in self.variants:
            if variant.shape != self.template.shape or variant.dtype != np.uint8:
                raise ValueError(f"a variant of {self.name or 'a template'} must be a uint8 grayscale image "
                                 f"of the template's size ({tw}x{th})")
        if th > self.region.height or tw > self.region.width:
            raise ValueError(f"template {tw}x{th} is larger than its search region {tuple(self.region)}")
        if float(self.template.std()) < MIN_TEXTURE:
            raise ValueError(
                f"template {self.name or tuple(self.region)} is too plain to locate (grey std "
                f"{self.template.std():.1f} < {MIN_TEXTURE}); choose a part with edges or an icon"
            )
        # Blurred, then without its outermost pixels: the blur of a template's edge sees only
        # the template, the blur of the screen there sees the neighbours too.
        self._soft = self._softened(self.template)
        self._softs = tuple(self._softened(v) for v in self.variants)
        # Its edges, without the outermost 2 px (the blur's and the gradient's own borders).
        self._edges = edges(soften(self.template))[2:-2, 2:-2] if min(th, tw) > 8 else None

    @staticmethod
    def _softened(template: Gray) -> Gray:
        return soften(template)[1:-1, 1:-1] if min(template.shape) > 4 else template

    @classmethod
    def from_frame(
        cls, frame: Frame, at: Region, *, margin: int = 4, threshold: float = 0.9, name: str = ""
    ) -> MatchCheck:
        """Cut the template at ``at`` from ``frame``; search ``margin`` px around it."""
        h, w = frame.shape[:2]
        return cls(expand(at, margin, w, h), gray(at.crop(frame)).copy(), threshold, name=name)

    def locate(self, frame: Frame) -> tuple[float, tuple[int, int]]:
        """(score, top-left of the best match in screen coordinates)."""
        crop = self.region.crop(frame)
        th, tw = self.template.shape
        if crop.shape[0] < th or crop.shape[1] < tw:
            return 0.0, (self.region.left, self.region.top)  # the frame is smaller than the model's screen
        inset = (th - self._soft.shape[0]) // 2  # 1: the soft template starts 1 px into the template
        area = soften(gray(crop)) if inset else gray(crop)
        score, (x, y) = self._pixels(area, self._soft)
        for soft in self._softs:  # a look the model also knows (another theme)
            if score >= self.threshold:
                break
            other, where = self._pixels(area, soft)
            if other > score:
                score, (x, y) = other, where
        if score < self.threshold and self.any_theme and self._edges is not None and inset:
            # Another theme: the same shapes in other colours (dark on light turned light on
            # dark). Their edges are where they were: compare the gradient magnitudes.
            shape = self._structure(area)
            if shape[0] > score:
                return shape[0], (self.region.left + shape[1][0] - 2, self.region.top + shape[1][1] - 2)
        return score, (self.region.left + x - inset, self.region.top + y - inset)

    def _pixels(self, area: Gray, soft: Gray) -> tuple[float, tuple[int, int]]:
        """(correlation of ``soft`` at its best place in ``area``, that place); 0 where the
        shade there is off by more than ``max_shade``."""
        result = cv2.matchTemplate(area, soft, cv2.TM_CCOEFF_NORMED)
        _, best, _, (x, y) = cv2.minMaxLoc(result)
        if not np.isfinite(best):
            return 0.0, (x, y)
        patch = area[y : y + soft.shape[0], x : x + soft.shape[1]]
        shade = abs(float(patch.mean()) - float(soft.mean()))
        return (float(best) if shade <= self.max_shade else 0.0), (x, y)

    def _structure(self, area: Gray) -> tuple[float, tuple[int, int]]:
        """(correlation of edge magnitudes at the best place, that place in the area)."""
        assert self._edges is not None
        mine = self._edges
        there = edges(area)
        if there.shape[0] < mine.shape[0] or there.shape[1] < mine.shape[1]:
            return 0.0, (0, 0)
        result = cv2.matchTemplate(there, mine, cv2.TM_CCOEFF_NORMED)
        _, best, _, (x, y) = cv2.minMaxLoc(result)
        patch = there[y : y + mine.shape[0], x : x + mine.shape[1]]
        # A near-flat patch has no shape to agree with: OpenCV scores such windows ±1.
        if not np.isfinite(best) or float(patch.std()) < 0.25 * float(mine.std()):
            return 0.0, (x, y)
        return float(best), (x, y)

    def score(self, frame: Frame) -> float:
        return self.locate(frame)[0]
