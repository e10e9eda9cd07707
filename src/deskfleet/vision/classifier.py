"""The classifier: a frame in, the name of the screen state it shows out.

A state is recognised only when *all* of its checks pass; overlay states (dialogs) are
checked first and win; a screen that matches no state, or two base states at once, is
:data:`UNKNOWN`; a frame whose size is not the one the model was recorded at is
:data:`WRONG_SCREEN`, with a message saying both sizes — never a silent ``unknown``, since
every check would fail for a reason that has nothing to do with the application.

:meth:`Classifier.classify` is the hot path (every pre-flight runs it): it returns the
state, each state's weakest score and the time. :meth:`Classifier.explain` runs exactly
the same decision and also keeps every check's score and, for every state that lost, the
reason — what ``deskfleet model classify`` prints and what the authoring commands quote
when they refuse a change.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np

from ..desktop.base import Frame, Region, Window, WindowFacts
from .redact import Redaction

UNKNOWN = "unknown"
#: the frame is not the size the model was recorded at; ``Classification.detail`` says both
WRONG_SCREEN = "wrong_screen"
#: a window the recognised state does not account for lies over it (a dialog nobody
#: modelled, another program's window); ``Classification.detail`` names it
COVERED = "covered"
#: checks at or above this cost (OCR) are read only when they can change the outcome
EXPENSIVE = 10


class Check(Protocol):
    """One test a screen state makes of a frame: ``score(frame) >= threshold`` passes.

    Checks may also carry ``name`` and ``kind`` (shown in explanations) and ``cost``
    (``EXPENSIVE`` or more: read last, and only when the outcome depends on it).
    """

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

    kind: ClassVar[str] = "pixels"

    region: Region
    template: np.ndarray  # grayscale float32, the region's size
    threshold: float = 0.92
    name: str = ""
    #: the same area as other looks draw it (another theme), compared when the template fails
    variants: tuple[np.ndarray, ...] = ()
    cost: int = field(default=1, init=False)

    @classmethod
    def from_frame(cls, frame: Frame, region: Region, threshold: float = 0.92, name: str = "") -> TemplateCheck:
        return cls(region, _gray(region.crop(frame)).astype(np.float32), threshold, name)

    def score(self, frame: Frame) -> float:
        # Grey only the region: converting a whole 1080p frame per check would cost more
        # than every comparison together.
        crop = _gray(self.region.crop(frame))
        if crop.shape != self.template.shape:
            return 0.0
        best = 0.0
        for template in (self.template, *self.variants):
            best = max(best, float(1.0 - np.mean(np.abs(crop - template)) / 255.0))
            if best >= self.threshold:
                break
        return best


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
    #: why the state is what it is, when that is not obvious: the sizes for WRONG_SCREEN,
    #: "no state matched" or the base states that matched together for UNKNOWN
    detail: str = ""

    @property
    def unknown(self) -> bool:
        return self.state == UNKNOWN


def wrong_screen_message(size: tuple[int, int], screen: tuple[int, int]) -> str:
    return f"the screen is {size[0]}x{size[1]}; the model was recorded at {screen[0]}x{screen[1]}"


# -- explanations ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CheckScore:
    """One check of one state as the classifier saw it; ``score`` is None when it was not read."""

    name: str
    kind: str
    threshold: float
    score: float | None

    @property
    def passed(self) -> bool | None:
        return None if self.score is None else self.score >= self.threshold

    def describe(self) -> str:
        shown = "not read" if self.score is None else f"{self.score:.3f}"
        return f"{self.kind} check {self.name!r} scored {shown} < {self.threshold:.2f}"


@dataclass(slots=True)
class StateVerdict:
    name: str
    overlay: bool
    ready: bool
    recognised: bool
    reason: str  # why it lost ("" for the state recognised)
    checks: list[CheckScore]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "overlay": self.overlay, "ready": self.ready, "recognised": self.recognised,
                "reason": self.reason or None,
                "checks": [{"name": c.name, "kind": c.kind, "score": c.score, "threshold": c.threshold,
                            "passed": c.passed} for c in self.checks]}


@dataclass(slots=True)
class Explanation:
    """A classification with every check's score and why each other state lost."""

    classification: Classification
    size: tuple[int, int]  # the frame's width and height
    states: list[StateVerdict]

    @property
    def state(self) -> str:
        return self.classification.state

    def verdict(self, state: str) -> StateVerdict | None:
        return next((v for v in self.states if v.name == state), None)

    def to_dict(self) -> dict[str, Any]:
        c = self.classification
        return {"state": c.state, "detail": c.detail or None, "elapsed_ms": round(c.elapsed_ms, 3),
                "size": list(self.size), "states": [v.to_dict() for v in self.states]}


@dataclass(slots=True)
class _Trace:
    """What one classification read, kept only when it is to be explained."""

    reads: dict[str, list[tuple[Check, float]]] = field(default_factory=dict)  # in the order read
    overlays: list[str] = field(default_factory=list)  # overlay states confirmed
    bases: list[str] | None = None  # base states confirmed (None: not looked at, a dialog won)
    pixels: str = ""  # the state the pixels alone showed, when windows over it made it COVERED


# -- the classifier -------------------------------------------------------------------------


class Classifier:
    """Classifies frames against a list of screen states.

    ``screen`` is the (width, height) the states were recorded at; a frame of another
    size is :data:`WRONG_SCREEN`. None accepts any size (models drawn for one renderer).
    """

    def __init__(self, states: list[ScreenState], *, screen: tuple[int, int] | None = None,
                 redaction: Redaction | None = None) -> None:
        if not states:
            raise ValueError("a classifier needs at least one state")
        self.states = states
        self.screen = screen
        #: the parts of the screen the model says to black out in uploaded screenshots
        #: (``model.json``'s ``redact``: see :mod:`.redact`); they are placed by the states
        #: this classifier recognises
        self.redaction = redaction or Redaction()

    def classify(self, frame: Frame, windows: WindowFacts | None = None) -> Classification:
        """The state ``frame`` shows. With ``windows`` (what the window system says about the
        app), a state is taken only if nothing is stacked over the window that draws it: a
        dialog nobody modelled over the ready list is :data:`COVERED`, never ready."""
        return self._run(frame, None, windows)

    def explain(self, frame: Frame, windows: WindowFacts | None = None) -> Explanation:
        """Classify ``frame`` as :meth:`classify` does, keeping every score and reason."""
        trace = _Trace()
        seen = self._run(frame, trace, windows)
        h, w = frame.shape[:2]
        verdicts = [self._verdict(state, seen, trace) for state in self.states]
        return Explanation(seen, (w, h), verdicts)

    def _run(self, frame: Frame, trace: _Trace | None, windows: WindowFacts | None = None) -> Classification:
        seen = self._pixels(frame, trace)
        if windows is None or windows.main is None or seen.state == WRONG_SCREEN:
            return seen
        state = next((s for s in self.states if s.name == seen.state), None)
        over = covering(state, windows)
        if not over:
            return seen
        if trace is not None:
            trace.pixels = seen.state
        said = "; ".join(w.describe() for w in reversed(over))
        pixels = f"the pixels alone say {seen.state!r}" if seen.state != UNKNOWN else "no state matched"
        return Classification(COVERED, seen.scores, seen.elapsed_ms, f"covered by {said} ({pixels})")

    def _pixels(self, frame: Frame, trace: _Trace | None) -> Classification:
        t0 = time.perf_counter()
        if self.screen is not None:
            h, w = frame.shape[:2]
            if (w, h) != self.screen:
                return Classification(WRONG_SCREEN, {}, (time.perf_counter() - t0) * 1000,
                                      wrong_screen_message((w, h), self.screen))
        scores: dict[str, float] = {}
        candidates: list[ScreenState] = []
        for state in self.states:
            # Cheap checks are scored up to a state's first failure (explain() scores them
            # all), expensive ones only below; a state none of whose checks was read scores NaN.
            if trace is None:
                # The hot path stops at a state's first failing check: it cannot be a candidate.
                cheap = []
                for c in state.checks:
                    if _cost(c) < EXPENSIVE:
                        cheap.append((c.score(frame), c.threshold))
                        if cheap[-1][0] < c.threshold:
                            break
            else:
                read = trace.reads[state.name] = [(c, c.score(frame)) for c in state.checks if _cost(c) < EXPENSIVE]
                cheap = [(s, c.threshold) for c, s in read]
            scores[state.name] = min((s for s, _ in cheap), default=math.nan if state.checks else 0.0)
            if state.checks and all(s >= t for s, t in cheap):
                candidates.append(state)
        overlays = [s.name for s in candidates if s.overlay and self._confirm(s, frame, scores, trace)]
        detail = ""
        if overlays:
            # Two dialogs at once: take the best-scoring one; never a base state under a dialog.
            name = max(overlays, key=lambda n: scores[n])
            if trace is not None:
                trace.overlays = overlays
        else:
            matches = [s.name for s in candidates if not s.overlay and self._confirm(s, frame, scores, trace)]
            if trace is not None:
                trace.bases = matches
            name = matches[0] if len(matches) == 1 else UNKNOWN
            if not matches:
                detail = "no state matched"
            elif len(matches) > 1:
                detail = f"{_count(len(matches))} base states matched: {', '.join(matches)}"
        return Classification(name, scores, (time.perf_counter() - t0) * 1000, detail)

    @staticmethod
    def _confirm(state: ScreenState, frame: Frame, scores: dict[str, float], trace: _Trace | None) -> bool:
        """Run a candidate's expensive checks, cheapest first, stopping at the first failure."""
        for check in sorted((c for c in state.checks if _cost(c) >= EXPENSIVE), key=_cost):
            score = check.score(frame)
            if trace is not None:
                trace.reads[state.name].append((check, score))
            before = scores[state.name]
            scores[state.name] = score if math.isnan(before) else min(before, score)
            if score < check.threshold:
                return False
        return True

    def _verdict(self, state: ScreenState, seen: Classification, trace: _Trace) -> StateVerdict:
        read = {id(c): s for c, s in trace.reads.get(state.name, [])}
        checks = [CheckScore(_name(c, i), _kind(c), float(c.threshold), read.get(id(c)))
                  for i, c in enumerate(state.checks)]
        recognised = seen.state == state.name
        reason = "" if recognised else self._reason(state, seen, trace, checks)
        return StateVerdict(state.name, state.overlay, state.ready, recognised, reason, checks)

    @staticmethod
    def _reason(state: ScreenState, seen: Classification, trace: _Trace, checks: list[CheckScore]) -> str:
        if seen.state == WRONG_SCREEN:
            return f"not checked: {seen.detail}"
        if seen.state == COVERED and state.name == trace.pixels:
            return f"its checks pass, but it is {seen.detail}"
        if not state.checks:
            return "it has no checks"
        by_id = {id(c): score for c, score in zip(state.checks, checks, strict=True)}
        for check, _ in trace.reads.get(state.name, []):
            if not by_id[id(check)].passed:
                return by_id[id(check)].describe()
        unread = [c for c in checks if c.score is None]
        note = ""
        if unread:
            names = ", ".join(repr(c.name) for c in unread)
            note = f"; not read: {unread[0].kind} check{'s' if len(unread) > 1 else ''} {names}, skipped because "
        if seen.state in trace.overlays:
            if state.overlay:
                won, mine = seen.scores[seen.state], seen.scores[state.name]
                if round(won, 3) > round(mine, 3):
                    return f"overlay {seen.state!r} won with a higher weakest score ({won:.3f} vs {mine:.3f})"
                return f"overlay {seen.state!r} won: the same weakest score ({won:.3f}), and it comes first"
            return f"overlay {seen.state!r} won" + (note + "a dialog covers every base state" if note else "")
        if trace.bases is not None and len(trace.bases) > 1 and state.name in trace.bases:
            return f"{_count(len(trace.bases))} base states matched: {', '.join(trace.bases)}"
        return "lost" + (note + "the outcome was already decided" if note else "")


def covering(state: ScreenState | None, windows: WindowFacts) -> list[Window]:
    """The windows stacked over the one that draws ``state`` (None: no state matched) and
    overlapping it, bottom to top.

    The window that draws a state is the topmost one — the app's main window or a window
    above it — holding the centre of every check of the state: a dialog the model knows is
    drawn by its own window, the list under it by the main window. Anything stacked over that
    window and overlapping it is something the state does not account for. Menus and
    tooltips of the app itself (override-redirect windows) are left out: a tooltip under the
    parked pointer is no reason to stop."""
    main = windows.main
    if main is None:
        return []
    stack = [main, *(w for w in windows.above if not (w.popup and w.pid == main.pid))]
    centres = [getattr(c, "region", None) for c in (state.checks if state is not None else ())]
    points = [Region(r.left + r.width // 2, r.top + r.height // 2, 1, 1) for r in centres if isinstance(r, Region)]
    home = 0
    if points:
        home = next((i for i in range(len(stack) - 1, -1, -1) if all(stack[i].contains(p) for p in points)), 0)
    return [w for w in stack[home + 1:] if w.overlaps(stack[home].rect)]


def _cost(check: Check) -> int:
    return int(getattr(check, "cost", 1))


def _name(check: Check, index: int) -> str:
    return str(getattr(check, "name", "") or f"#{index + 1}")


def _kind(check: Check) -> str:
    return str(getattr(check, "kind", type(check).__name__))


def _count(n: int) -> str:
    return {2: "two", 3: "three", 4: "four"}.get(n, str(n))
