"""Screen-state recognition: classify a screenshot into one of an app model's named states.

Biased so that an unknown screen is never taken for a working state: a state is recognised
only when *all* of its checks pass, overlay states (dialogs) are checked first and win, and
a screen that matches no state — or two non-overlay states at once — is ``unknown``.

The checks compare stable parts of the UI *within a region* (whole-frame hashes or SSIM
cannot tell a modal dialog from rendering drift; see DESKTOP-NOTES). This first version
compares a template at its recorded position, tolerant to noise; template search within a
region (OpenCV) and OCR checks come with real desktops.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..desktop import Frame, Region

UNKNOWN = "unknown"


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
    checks: list[TemplateCheck]
    overlay: bool = False  # a dialog or prompt that covers other states and wins over them
    ready: bool = False  # a state in which automations may start


@dataclass(slots=True)
class Classification:
    state: str
    scores: dict[str, float] = field(default_factory=dict)  # per state: its weakest check's score
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
        overlays: list[str] = []
        matches: list[str] = []
        for state in self.states:
            check_scores = [(c.score(frame), c.threshold) for c in state.checks]
            scores[state.name] = min((s for s, _ in check_scores), default=0.0)
            if check_scores and all(s >= t for s, t in check_scores):
                (overlays if state.overlay else matches).append(state.name)
        if overlays:
            # Two dialogs at once: take the best-scoring one; never a base state under a dialog.
            name = max(overlays, key=lambda n: scores[n])
        elif len(matches) == 1:
            name = matches[0]
        else:
            name = UNKNOWN
        return Classification(name, scores, (time.perf_counter() - t0) * 1000)
