"""Labelled screenshots, and how well a model recognises them.

A model keeps the screenshots its states were recorded from, and any more that were added,
in ``screens/<state>/<n>.png`` inside its directory: the folder is the label, ``n`` counts
from 1. The label ``unknown`` holds screens the model must *not* recognise (a dialog it
does not know, another program's window). Every change to a model is checked against all
of them (:mod:`.authoring`), and ``deskfleet model test`` measures a model on them, or on
a CSV of ``image,state`` rows.

:func:`evaluate` classifies each labelled screen and counts what matters: accuracy per
state, the confusion matrix, and **false ready** — a screen recognised as a ready state
while its label is another state, the one error that lets an automation start on the
wrong screen.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from PIL import Image

from ..desktop.base import Frame, Placement, Region, WindowFacts
from ..errors import ConfigError
from .classifier import COVERED, UNKNOWN, WRONG_SCREEN, Classifier, Explanation
from .templates import (
    NAME,
    ModelSource,
    TemplateLibrary,
    decode_image,
    model_root,
    write_atomically,
)

SCREENS = "screens"
#: a ready screen of an application that does not answer the window system's ping: what
#: pre-flight makes of it (its ``unresponsive`` playbook), never ready
UNRESPONSIVE = "unresponsive"
#: labels a screen may carry besides the model's states
EXTRA_LABELS = (UNKNOWN, WRONG_SCREEN, COVERED, UNRESPONSIVE)


@dataclass(frozen=True, slots=True)
class Labelled:
    """A screenshot and the state it shows. ``name`` is how reports call it.

    A screenshot may come with what the window system said when it was taken, in a file
    beside it (``N.json`` next to ``N.png``): ``{"windows": {"main": …, "above": […]},
    "responsive": false}`` — the app's main window and what lay over it, and whether the app
    answered the ping. ``group`` sorts a labelled set's report (e.g. by rendering)."""

    label: str
    source: Traversable
    name: str
    line: int | None = None  # in the CSV it was listed in
    group: str = ""

    def frame(self) -> Frame:
        return read_image(self.source, self.name)

    def facts(self) -> tuple[WindowFacts | None, bool | None]:
        """The window system's facts saved beside the screenshot, if any."""
        side = self.source.parent / (self.source.name[: -len(".png")] + ".json") \
            if isinstance(self.source, Path) else None
        if side is None or not side.is_file():
            return None, None
        try:
            data = json.loads(side.read_text(encoding="utf-8"))
            windows = WindowFacts.from_dict(data["windows"]) if data.get("windows") else None
            responsive = data.get("responsive")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{side}: not the window facts of {self.name}: {exc}") from None
        return windows, None if responsive is None else bool(responsive)


def read_image(source: Traversable | str | os.PathLike[str], name: str | None = None) -> Frame:
    """An image file as an RGB frame (any mode, any size); ConfigError if it is not one."""
    source = Path(source) if isinstance(source, str | os.PathLike) else source
    shown = name or str(source)
    try:
        raw = source.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {shown}: {exc.strerror or exc}") from None
    try:
        return decode_image(raw)
    except ValueError as exc:
        raise ConfigError(f"{shown} {exc}") from None


def _number(entry: Traversable) -> int:
    stem = entry.name[: -len(".png")]
    return int(stem) if stem.isdigit() else 1 << 30


def saved_screens(model: ModelSource) -> list[Labelled]:
    """The screenshots saved with a model, state by state, in the order they were added."""
    root = model_root(model) / SCREENS
    if not root.is_dir():
        return []
    out = []
    for folder in sorted(root.iterdir(), key=lambda e: e.name):
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        shots = [e for e in folder.iterdir() if e.name.endswith(".png") and not e.name.startswith(".")]
        for shot in sorted(shots, key=lambda e: (_number(e), e.name)):
            out.append(Labelled(folder.name, shot, f"{SCREENS}/{folder.name}/{shot.name}"))
    return out


def save_screen(model: Path, state: str, frame: Frame) -> str:
    """Save ``frame`` as the next screenshot of ``state``; returns its name in the model."""
    if not NAME.fullmatch(state):
        raise ConfigError(f"state name {state!r} is not usable for a screens folder")
    folder = Path(model) / SCREENS / state
    folder.mkdir(parents=True, exist_ok=True)
    taken = [_number(e) for e in folder.glob("*.png") if _number(e) < 1 << 30]
    path = folder / f"{max(taken, default=0) + 1}.png"
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG", optimize=True)
    write_atomically(path, buffer.getvalue())
    return f"{SCREENS}/{state}/{path.name}"


def read_labels(path: Path) -> list[Labelled]:
    """Rows ``image,state[,group]`` of a CSV file (a header line is allowed; ``#`` starts a
    comment). Image paths are relative to the CSV's directory; ``group`` (a rendering, a
    source) gets a line of its own in the report."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not a text (CSV) file: {exc}") from None
    base = Path(path).parent
    out = []
    for number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        cells = [c.strip() for c in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        if number == 1 and [c.lower() for c in cells[:2]] == ["image", "state"]:
            continue
        if len(cells) not in (2, 3) or not all(cells[:2]):
            raise ConfigError(f"{path}, line {number}: expected 'image,state[,group]', got {','.join(row)!r}")
        image, label = cells[:2]
        file = base / image
        if not file.is_file():
            raise ConfigError(f"{path}, line {number}: no image {image} (paths are relative to the CSV's directory)")
        out.append(Labelled(label, file, image, number, cells[2] if len(cells) == 3 else ""))
    if not out:
        raise ConfigError(f"{path} lists no images (rows of image,state)")
    return out


def check_labels(items: Iterable[Labelled], states: Sequence[str], where: str) -> None:
    """ConfigError for the first label that is neither a state of the model nor unknown/wrong_screen."""
    allowed = set(states) | set(EXTRA_LABELS)
    for item in items:
        if item.label not in allowed:
            at = f", line {item.line}" if item.line is not None else ""
            raise ConfigError(f"{where}{at}: {item.name} is labelled {item.label!r}, which is not a state of the model "
                              f"(its states: {', '.join(states)}; or {UNKNOWN})")


# -- measuring ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    item: Labelled
    seen: Explanation
    false_ready: bool
    #: what pre-flight would decide: the classification, or UNRESPONSIVE for a ready screen
    #: of an app that did not answer the ping
    state: str = ""

    def __post_init__(self) -> None:
        self.state = self.state or self.seen.state

    @property
    def correct(self) -> bool:
        return self.state == self.item.label

    def why(self) -> str:
        """Why a wrong outcome happened, from the labelled state's point of view."""
        label, state = self.item.label, self.state
        if self.correct:
            return ""
        if state == UNRESPONSIVE:
            return "the app did not answer the ping"
        if label == UNRESPONSIVE:
            return f"a hung app showing {state!r}: its ping was not asked"
        if state == WRONG_SCREEN:
            return self.seen.classification.detail
        verdict = self.seen.verdict(label)
        if verdict is not None:
            return f"{label}: {verdict.reason}"
        if label == UNKNOWN:
            return f"every check of {state!r} passed"
        return self.seen.classification.detail

    def describe(self) -> str:
        return f"{self.item.name} is {self.state!r}, not {self.item.label!r} ({self.why()})"


@dataclass(slots=True)
class Report:
    """How a classifier did on a set of labelled screens."""

    states: list[str]  # the model's states, in order
    ready: frozenset[str]
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.outcomes)

    @property
    def correct(self) -> int:
        return sum(o.correct for o in self.outcomes)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.outcomes else 1.0

    @property
    def false_ready(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.false_ready]

    @property
    def wrong(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.correct]

    def labels(self) -> list[str]:
        """Rows of the confusion matrix: labels seen, in model order, then unknown, wrong_screen."""
        present = {o.item.label for o in self.outcomes}
        return [s for s in (*self.states, *EXTRA_LABELS) if s in present]

    def columns(self) -> list[str]:
        """Columns: every state of the model, unknown, and the other verdicts if they happened."""
        seen = {o.state for o in self.outcomes}
        return [*self.states, UNKNOWN, *(s for s in (WRONG_SCREEN, COVERED, UNRESPONSIVE) if s in seen)]

    def confusion(self) -> dict[str, Counter[str]]:
        out: dict[str, Counter[str]] = {label: Counter() for label in self.labels()}
        for o in self.outcomes:
            out[o.item.label][o.state] += 1
        return out

    def per_group(self) -> dict[str, tuple[int, int, int]]:
        """group → (correct, screens, false ready), for labelled sets whose rows name a group."""
        out: dict[str, tuple[int, int, int]] = {}
        for o in self.outcomes:
            if o.item.group:
                c, n, f = out.get(o.item.group, (0, 0, 0))
                out[o.item.group] = (c + o.correct, n + 1, f + o.false_ready)
        return out

    def per_state(self) -> dict[str, tuple[int, int]]:
        """label → (correct, screens)."""
        out = {}
        for label in self.labels():
            mine = [o for o in self.outcomes if o.item.label == label]
            out[label] = (sum(o.correct for o in mine), len(mine))
        return out

    def times_ms(self) -> list[float]:
        return [o.seen.classification.elapsed_ms for o in self.outcomes]

    def to_dict(self) -> dict[str, Any]:
        times = sorted(self.times_ms())
        return {
            "screens": self.total, "correct": self.correct, "accuracy": self.accuracy,
            "false_ready": len(self.false_ready),
            "per_state": {k: {"correct": c, "screens": n, "accuracy": c / n} for k, (c, n) in self.per_state().items()},
            "confusion": {k: dict(v) for k, v in self.confusion().items()},
            "per_group": {k: {"correct": c, "screens": n, "accuracy": c / n, "false_ready": f}
                          for k, (c, n, f) in self.per_group().items()},
            "classify_ms": {"median": times[len(times) // 2], "max": times[-1]} if times else None,
            "wrong": [{"image": o.item.name, "label": o.item.label, "state": o.state, "why": o.why(),
                       "false_ready": o.false_ready} for o in self.wrong],
        }


def evaluate(classifier: Classifier, items: Iterable[tuple[Labelled, Frame]], *,
             window: Region | None = None) -> Report:
    """Classify every labelled frame as pre-flight would and count the outcomes.

    A screenshot saved with window facts is classified with them: anchored to the app's
    window — moved, and scaled back when the window is the recorded one scaled — when the
    model is (``window``: where the model recorded it), ``covered`` when a
    window lies over what the state accounts for, and ``unresponsive`` when it shows a ready
    state but the app did not answer the ping."""
    ready = frozenset(s.name for s in classifier.states if s.ready)
    report = Report([s.name for s in classifier.states], ready)
    for item, frame in items:
        windows, responsive = item.facts()
        if windows is not None and window is not None:
            # As a real desktop shows it: the window's content where the model recorded it, on
            # a screen of the model's size (with no window of the app: the screen as it is).
            placed = Placement.of(windows.main.rect, window) if windows.main is not None else Placement()
            frame = placed.frame(frame, classifier.screen or (frame.shape[1], frame.shape[0]))
            windows = windows.moved(placed)
        seen = classifier.explain(frame, windows)
        state = UNRESPONSIVE if seen.state in ready and responsive is False else seen.state
        report.outcomes.append(Outcome(item, seen, state in ready and state != item.label, state))
    return report


def measure(model: ModelSource, items: Sequence[Labelled], *, jobs: int = 1,
            library: TemplateLibrary | None = None) -> Report:
    """Load ``model`` and :func:`evaluate` it on ``items``, reading each screenshot only when
    it is classified (a set of a thousand 1080p screens would not fit in memory at once).

    ``jobs`` > 1 spreads the screens over that many worker processes, each with its own copy
    of the model (recognition is CPU work, and one process uses one core); the report is the
    same, in the same order, as with one. Workers are started afresh (``spawn``), never forked
    from a process that may already hold OCR threads. ``library``: ``model`` already loaded,
    used as is in this process."""
    if jobs <= 1 or len(items) < 2 * jobs:
        return _measure_part(model, items, library)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    parts = [list(items[i::jobs]) for i in range(jobs)]  # interleaved: each worker gets every look
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        reports = list(pool.map(_measure_part, [model] * jobs, parts))
    merged = Report(reports[0].states, reports[0].ready)
    for i in range(len(items)):
        merged.outcomes.append(reports[i % jobs].outcomes[i // jobs])
    return merged


def _measure_part(model: ModelSource, items: Sequence[Labelled], library: TemplateLibrary | None = None) -> Report:
    library = library or TemplateLibrary.load(model)
    classifier = library.classifier()
    warm_ocr(classifier)
    return evaluate(classifier, ((item, item.frame()) for item in items), window=library.window)


def warm_ocr(classifier: Classifier) -> None:
    """Make tesseract's engine before anything is timed, once per process (≈ 0.1 s), as an
    agent does — where the model reads text at all."""
    if any(getattr(c, "kind", "") == "text" for s in classifier.states for c in s.checks):
        from .ocr import shared_engine

        shared_engine()
