"""Redaction: parts of the screen blacked out before a screenshot leaves the machine.

Screenshots of patient records and bank screens are evidence the orchestrator needs (what
pre-flight saw, where a run failed, what a person is asked about) and data it must not
hold. An app model names the parts to hide in ``model.json`` — for every screen, or for one
screen state — and the agent fills them solid black in every screenshot it uploads::

    {"format": 1, "name": "simehr", "screen": [1024, 768],
     "redact": [{"name": "account_bar", "box": [0, 740, 1024, 28]}],
     "states": [{"name": "search", …, "checks": […],
                 "redact": [{"name": "results", "box": [252, 190, 520, 144]},
                            {"name": "mrn", "near": "part1", "box": [-263, 1, 240, 32]}]}]}

A ``box`` is ``[left, top, width, height]`` in the model's coordinates — those of the
screenshots the desktop gives, the app's window where it was recorded — or, with
``near``, relative to where that check of the state is found on the frame (a ``match``
check's template wherever it was located within its margin; a ``pixels`` or ``text``
check's region).

Which regions apply: the model-wide ones always; a state's whenever all of that state's
checks pass on the frame — the screen beneath a dialog included, when its checks still
show. **Fail-safe**: a state's regions can be placed only on a frame that shows it; when
the model declares any per-state region and no base (non-overlay) state shows — an
unknown screen, or a dialog hiding the screen beneath — nobody can say whether a field to
hide is on it, and the whole frame is blanked. A frame of another size than the model's
screen is blanked likewise. The upload still happens (the run's timeline keeps its
evidence link, a person asked about a task sees the prompt), marked ``whole_frame``.

What was done goes with the upload as metadata (:attr:`Redacted.info`: the regions' and
states' names, never a pixel of what they hid).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..desktop.base import Frame, Region


@dataclass(frozen=True, slots=True)
class RedactRegion:
    """One part of the screen to black out: ``box`` in the model's coordinates, or relative
    to the top-left of where check ``near`` of its state is found."""

    name: str
    box: Region
    near: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **({"near": self.near} if self.near else {}), "box": list(self.box)}


@dataclass(frozen=True, slots=True)
class Redacted:
    """A frame with its regions blacked out (a copy: the caller's frame is left as it was),
    and what was done, for the artifact's metadata."""

    frame: Frame
    info: dict[str, Any]

    @property
    def whole_frame(self) -> bool:
        return bool(self.info.get("whole_frame"))


@dataclass(frozen=True, slots=True)
class Redaction:
    """The regions a model declares: on every screen, and per screen state."""

    everywhere: tuple[RedactRegion, ...] = ()
    states: dict[str, tuple[RedactRegion, ...]] = field(default_factory=dict)

    @property
    def declared(self) -> bool:
        return bool(self.everywhere or any(self.states.values()))

    def apply(self, frame: Frame, states: Sequence[Any], screen: tuple[int, int] | None = None) -> Redacted:
        """Black out what applies to ``frame``. ``states``: the model's screen states (their
        ``name``, ``overlay`` and ``checks``); ``screen``: the size the model was recorded at."""
        out = np.array(frame, dtype=np.uint8, copy=True)
        height, width = out.shape[:2]
        everywhere = [r.name for r in self.everywhere]
        if screen is not None and (width, height) != tuple(screen):
            out[:] = 0
            return Redacted(out, {"whole_frame": f"the frame is {width}x{height}, the model's screen "
                                                 f"{screen[0]}x{screen[1]}: no region can be placed",
                                  "regions": everywhere, "states": []})
        shown = [s for s in states if s.checks and all(c.score(frame) >= c.threshold for c in s.checks)]
        names = [s.name for s in shown]
        if any(self.states.values()) and not any(not s.overlay for s in shown):
            out[:] = 0
            why = (f"only {', '.join(names)} shows, hiding the screen beneath" if names
                   else "no state of the model shows")
            return Redacted(out, {"whole_frame": f"{why}: its regions cannot be placed",
                                  "regions": everywhere, "states": names})
        done: list[str] = []
        for region in self.everywhere:
            _fill(out, region.box)
            done.append(region.name)
        for state in shown:
            for region in self.states.get(state.name, ()):
                box = region.box if region.near is None else _near(state, region, frame)
                _fill(out, box)
                done.append(region.name)
        return Redacted(out, {"regions": done, "states": names})


def _near(state: Any, region: RedactRegion, frame: Frame) -> Region:
    check = next(c for c in state.checks if getattr(c, "name", "") == region.near)
    locate = getattr(check, "locate", None)
    if locate is not None:  # a match check: where its template was found, within its margin
        _, (x, y) = locate(frame)
    else:  # a fixed check: its region
        at: Region = check.region
        x, y = at.left, at.top
    b = region.box
    return Region(x + b.left, y + b.top, b.width, b.height)


def _fill(frame: Frame, box: Region) -> None:
    height, width = frame.shape[:2]
    left, top = max(0, box.left), max(0, box.top)
    right, bottom = min(width, box.left + box.width), min(height, box.top + box.height)
    if right > left and bottom > top:
        frame[top:bottom, left:right] = 0
