"""Screen-state recognition: classify a screenshot into one of an app model's named states.

Biased so that an unknown screen is never taken for a working state: a state is recognised
only when *all* of its checks pass, overlay states (dialogs) are checked first and win, and
a screen that matches no state — or two non-overlay states at once — is ``unknown``.

The checks compare stable parts of the UI *within a region* (whole-frame hashes or SSIM
cannot tell a modal dialog from rendering drift; see DESKTOP-NOTES). Three kinds, one
:class:`Check` protocol:

- :class:`TemplateCheck` (here): a template at its recorded position, tolerant to noise —
  exact renderers such as the simulated desktop, and plain areas (a bare desktop);
- :class:`~deskfleet.vision.match.MatchCheck`: a template searched for within a region
  with OpenCV, tolerant to the 1-2 px shifts of real rendering;
- :class:`~deskfleet.vision.ocr.TextCheck`: words read by OCR in a small region.

Checks carry a ``cost``; the classifier reads the expensive ones (OCR) only when every
cheap check of their state has passed and the state could still win, so a model with
OCR checks costs one or two OCR reads per frame, not one per state.
:mod:`deskfleet.vision.templates` stores a model's states, regions and thresholds on disk.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..desktop import Frame, Region

UNKNOWN = "unknown"
#: checks at or above this cost (OCR) are read only when they can change the outcome
EXPENSIVE = 10


class Check(Protocol):
    """One test a screen state makes of a frame: ``score(frame) >= threshold`` passes."""

    threshold: float

    def score(self, frame: Frame) -> float: ...


def _gray(frame: Frame) -> np.ndarray:
    if frame.ndim == 2:
        return frame.astype(np.float32)
    # ITU-R BT.601 luma, as OpenCV's RGB2GRAY.
    return frame[..., 0] * 0.299 + frame[..., 1] * 0.587 + frame[..., 2] * 0.114  # type: ignore[no-any-return]


@dataclass(slots=True)
class TemplateCheck:
    """A stable piece of UI expected at ``region``: similarity ≥ ``threshold`` passes."""

    region: Region
    template: np.ndarray  # grayscale float32, the region's size
    threshold: float = 0.92
    cost: int = field(default=1, init=False)

    @classmethod
    def from_frame(cls, frame: Frame, region: Region, threshold: float = 0.92) -> TemplateCheck:
        return cls(region, _gray(region.crop(frame)).astype(np.float32), threshold)

    def score(self, frame: Frame) -> float:
        # Grey only the region: converting a whole 1080p frame per check would cost more
        # than every comparison together.
        crop = _gray(self.region.crop(frame))
        if crop.shape != self.template.shape:
            return 0.0
        return float(1.0 - np.mean(np.abs(crop - self.template)) / 255.0)


@dataclass(slots=True)
class ScreenState:
    name: str
    checks: Sequence[Check]
    overlay: bool = False  # a dialog or prompt that covers other states and wins over them
    ready: bool = False  # a state in which automations may start


@dataclass(slots=True)
class Classification:
    state: str
    scores: dict[str, float] = field(default_factory=dict)  # per state: its weakest check read
    elapsed_ms: float = 0.0

    @property
    def unknown(self) -> bool:
        return self.state == UNKNOWN


class Classifier:
    """Classifies frames against a list of screen states."""

    def __init__(self, states: list[ScreenState]) -> None:
        if not states:
            raise ValueError("a classifier needs at least one state")
        self.states = states

    def classify(self, frame: Frame) -> Classification:
        t0 = time.perf_counter()
        scores: dict[str, float] = {}
        candidates: list[ScreenState] = []
        for state in self.states:
            # Every cheap check is scored (scores explain a classification), expensive
            # ones only below; a state none of whose checks was read scores NaN.
            cheap = [(c.score(frame), c.threshold) for c in state.checks if _cost(c) < EXPENSIVE]
            scores[state.name] = min((s for s, _ in cheap), default=math.nan if state.checks else 0.0)
            if state.checks and all(s >= t for s, t in cheap):
                candidates.append(state)
        overlays = [s.name for s in candidates if s.overlay and self._confirm(s, frame, scores)]
        if overlays:
            # Two dialogs at once: take the best-scoring one; never a base state under a dialog.
            name = max(overlays, key=lambda n: scores[n])
        else:
            matches = [s.name for s in candidates if not s.overlay and self._confirm(s, frame, scores)]
            name = matches[0] if len(matches) == 1 else UNKNOWN
        return Classification(name, scores, (time.perf_counter() - t0) * 1000)

    @staticmethod
    def _confirm(state: ScreenState, frame: Frame, scores: dict[str, float]) -> bool:
        """Run a candidate's expensive checks, cheapest first, stopping at the first failure."""
        for check in sorted((c for c in state.checks if _cost(c) >= EXPENSIVE), key=_cost):
            score = check.score(frame)
            before = scores[state.name]
            scores[state.name] = score if math.isnan(before) else min(before, score)
            if score < check.threshold:
                return False
        return True


def _cost(check: Check) -> int:
    return int(getattr(check, "cost", 1))
