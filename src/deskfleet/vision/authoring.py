"""Changing a model directory without breaking it: capture, add a screenshot, remove a state.

Every change is made in memory first and checked before anything is written:

- the screenshot a state is recorded from (or a screenshot added to a state) must be
  recognised as that state by the changed model;
- every screenshot already saved with the model (``screens/<state>/<n>.png``, see
  :mod:`.screens`) that the model recognised as its label before the change must still be
  recognised as its label after it.

A change that fails either is refused with a :class:`~deskfleet.errors.ConfigError` that
names the screenshots and the check that now fails, and nothing is written — unless
``force`` is given, in which case it is written and the :class:`Change` lists what fails.
A saved screen that was already wrong before the change does not block it (it is reported,
and a change that makes it right says so). Capture saves the screenshot it recorded from
with the model, so the next change is checked against it too.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..desktop.base import Frame, Placement, Region
from ..errors import ConfigError
from .classifier import UNKNOWN, WRONG_SCREEN, Check, Classifier, Explanation, wrong_screen_message
from .match import MatchCheck
from .screens import SCREENS, Labelled, Outcome, check_labels, evaluate, save_screen, saved_screens
from .templates import DESCRIPTION, Anchor, TemplateLibrary, TextSpec

#: refusals list this many problems, then how many more there are
SHOWN = 3


@dataclass(slots=True)
class Change:
    """What a capture, add-screen or remove did — or would have done, had it not been refused."""

    state: str
    seen: Explanation | None = None  # the new screenshot, as the changed model sees it
    checked: int = 0  # saved screenshots checked
    broken: list[Outcome] = field(default_factory=list)  # recognised before the change, not after
    still_wrong: list[Outcome] = field(default_factory=list)  # not recognised before nor after
    fixed: list[Outcome] = field(default_factory=list)  # not recognised before, recognised after
    screen: str | None = None  # the screenshot saved with the model
    removed_screens: int = 0
    written: bool = False
    #: the checks given a variant of another look (``capture_variant``)
    variants: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        """Why the change fails its check ([] when it passes)."""
        out = []
        if self.seen is not None and self.seen.state != self.state:
            why = self.seen.classification.detail if self.seen.state == WRONG_SCREEN else _why(self.seen, self.state)
            out.append(f"this screenshot is recognised as {self.seen.state!r}, not {self.state!r} ({why})")
        out += [f"it breaks {o.describe()}" for o in self.broken]
        return out


def _why(seen: Explanation, label: str) -> str:
    verdict = seen.verdict(label)
    if verdict is not None:
        return f"{label}: {verdict.reason}"
    return f"every check of {seen.state!r} passed"


def _refuse(what: str, problems: Sequence[str], force_hint: str) -> ConfigError:
    shown = "; ".join(problems[:SHOWN])
    more = f"; and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
    return ConfigError(f"{what}: {shown}{more}; nothing was written ({force_hint})")


def _frames(directory: Path, states: list[str], *, skip: str | None = None) -> list[tuple[Labelled, Frame]]:
    items = [s for s in saved_screens(directory) if s.label != skip]
    check_labels(items, states, f"{directory}/{SCREENS}")
    return [(item, item.frame()) for item in items]


def _compare(change: Change, before: Classifier | None, after: Classifier,
             shots: list[tuple[Labelled, Frame]]) -> None:
    """Sort the saved screenshots into broken, still wrong and fixed by the change."""
    change.checked = len(shots)
    now = evaluate(after, shots)
    was = {id(o.item): o.correct for o in evaluate(before, shots).outcomes} if before is not None else {}
    for outcome in now.outcomes:
        # Before the first state there was no model: every screen was "unknown".
        right_before = was.get(id(outcome.item), outcome.item.label == UNKNOWN)
        if right_before and not outcome.correct:
            change.broken.append(outcome)
        elif not outcome.correct:
            change.still_wrong.append(outcome)
        elif not right_before:
            change.fixed.append(outcome)


def capture(directory: Path, frame: Frame, state: str, anchors: list[Anchor], texts: list[TextSpec] | None = None,
            *, overlay: bool = False, ready: bool = False, name: str | None = None, force: bool = False,
            replace_screens: bool = False, window: Region | None = None) -> Change:
    """Record ``state`` from ``frame`` into the model in ``directory`` (created if need be),
    check it, write it and save ``frame`` with the model as a screenshot of ``state``.

    ``replace_screens`` drops the screenshots saved for ``state`` before (they showed an
    older look of it)."""
    directory = Path(directory)
    h, w = frame.shape[:2]
    if (directory / DESCRIPTION).exists():
        library = TemplateLibrary.load(directory)
        frame = _as_model_sees(directory, library, frame, window)
    else:
        library = TemplateLibrary(name or directory.resolve().name, (w, h), window)  # anchored from the start
    before = library.classifier() if library.states else None
    library.record(frame, state, anchors, texts, overlay=overlay, ready=ready)
    after = library.classifier()
    change = Change(state)
    shots = _frames(directory, library.state_names, skip=state if replace_screens else None)
    _compare(change, before, after, shots)
    change.seen = after.explain(frame)
    problems = change.problems()
    if problems and not force:
        raise _refuse(f"{state!r} not recorded", problems, "--force records it anyway")
    library.save(directory)
    if replace_screens:
        old = directory / SCREENS / state
        change.removed_screens = len(list(old.glob("*.png"))) if old.is_dir() else 0
        shutil.rmtree(old, ignore_errors=True)
    change.screen = save_screen(directory, state, frame)
    change.written = True
    return change


def capture_variant(directory: Path, frame: Frame, state: str, look: str, *, force: bool = False,
                    window: Region | None = None) -> Change:
    """Record how ``look`` (another theme of the app, say ``dark``) draws ``state``, from
    ``frame``, which shows it: each of the state's templates that does not pass by its
    pixels on ``frame`` gets a variant cut at its place. Checked and saved as ``capture``."""
    directory = Path(directory)
    library = TemplateLibrary.load(directory)
    frame = _as_model_sees(directory, library, frame, window)
    before = library.classifier()

    def fails_by_pixels(check: Check) -> bool:
        if isinstance(check, MatchCheck) and check.any_theme:
            check = replace(check, any_theme=False)  # the shapes may pass; the pixels are the look's own
        return check.score(frame) < check.threshold

    change = Change(state)
    change.variants = library.record_variant(frame, state, look, only=fails_by_pixels)
    after = library.classifier()
    _compare(change, before, after, _frames(directory, library.state_names))
    change.seen = after.explain(frame)
    problems = change.problems()
    if problems and not force:
        raise _refuse(f"the {look!r} look of {state!r} not recorded", problems, "--force records it anyway")
    library.save(directory)
    change.screen = save_screen(directory, state, frame)
    change.written = True
    return change


def _as_model_sees(directory: Path, library: TemplateLibrary, frame: Frame, window: Region | None) -> Frame:
    """``frame`` as ``library`` sees the screen: where the app's window is now (``window``)
    moved (and scaled) to where it was recorded; else ``frame`` itself, of the model's size."""
    if library.window is not None and window is not None:
        # The window may have moved (or been scaled) since the model was made: record what
        # it shows as if it had not, on a screen of the model's size.
        return Placement.of(window, library.window).frame(frame, library.screen)
    h, w = frame.shape[:2]
    if (w, h) != library.screen:
        raise ConfigError(f"{directory}: {wrong_screen_message((w, h), library.screen)}")
    return frame


def add_screen(directory: Path, frame: Frame, state: str, *, force: bool = False) -> Change:
    """Save ``frame`` with the model as a screenshot of ``state`` (or of ``unknown``: a screen
    the model must not recognise) once the model recognises it as such."""
    directory = Path(directory)
    library = TemplateLibrary.load(directory)
    if state not in library.state_names and state != UNKNOWN:
        raise ConfigError(f"the model has no state {state!r} (its states: {', '.join(library.state_names)}; "
                          f"or {UNKNOWN}, for a screen it must not recognise)")
    h, w = frame.shape[:2]
    if (w, h) != library.screen:
        raise ConfigError(f"screenshot not added: {wrong_screen_message((w, h), library.screen)}")
    change = Change(state, seen=library.classifier().explain(frame))
    problems = change.problems()
    if problems and not force:
        raise _refuse("screenshot not added", problems, "--force adds it anyway")
    change.screen = save_screen(directory, state, frame)
    change.written = True
    return change


def remove(directory: Path, state: str, *, force: bool = False) -> Change:
    """Remove ``state``, its templates and its saved screenshots, once the remaining
    screenshots are still recognised without it."""
    directory = Path(directory)
    library = TemplateLibrary.load(directory)
    before = library.classifier()
    library.remove(state)
    change = Change(state)
    _compare(change, before, library.classifier(), _frames(directory, [*library.state_names, state], skip=state))
    problems = [f"it breaks {o.describe()}" for o in change.broken]
    if problems and not force:
        raise _refuse(f"{state!r} not removed", problems, "--force removes it anyway")
    library.save(directory)
    folder = directory / SCREENS / state
    if folder.is_dir():
        change.removed_screens = len(list(folder.glob("*.png")))
        shutil.rmtree(folder)
    change.written = True
    return change
