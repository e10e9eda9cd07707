"""An app model's recognition data on disk: template PNGs plus one JSON description.

A model directory holds ``model.json`` — the screen size it was recorded at, and each
state with its checks, regions and thresholds — and one PNG per template, cut from a
live screenshot. ``deskfleet model capture`` writes it from a running display; an app
model loads it with :meth:`TemplateLibrary.load` and gets a
:class:`~deskfleet.vision.Classifier`. People review and edit the JSON (a threshold, a
region); the PNGs show exactly what each check looks for.

    {"format": 1, "name": "demoehr", "screen": [1024, 768],
     "states": [{"name": "home", "ready": true, "overlay": false, "checks": [
        {"kind": "match", "name": "logo", "template": "home.logo.png",
         "at": [12, 8, 40, 40], "margin": 4, "threshold": 0.9},
        {"kind": "pixels", "name": "corner", "template": "home.corner.png",
         "at": [900, 700, 60, 40], "threshold": 0.95},
        {"kind": "text", "name": "title", "region": [60, 10, 300, 36],
         "pattern": "^Home$", "threshold": 0.5}]}]}

Kinds: ``match`` searches for the template within ``margin`` px of where it was cut
(:class:`~deskfleet.vision.match.MatchCheck`), ``pixels`` compares it at exactly that
place (:class:`~deskfleet.vision.TemplateCheck`, for plain areas that cannot be located),
``text`` reads the region by OCR (:class:`~deskfleet.vision.ocr.TextCheck`).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from ..desktop import Frame, Region
from ..errors import ConfigError
from . import Check, Classifier, ScreenState, TemplateCheck
from .match import MIN_TEXTURE, MatchCheck, expand, gray

FORMAT = 1
DESCRIPTION = "model.json"
KINDS = ("match", "pixels", "text")
DEFAULT_THRESHOLD = {"match": 0.9, "pixels": 0.95, "text": 0.5}


class Readable(Protocol):
    """A directory to read from: a ``Path`` or package data (``importlib.resources``)."""

    def __truediv__(self, name: str) -> Any: ...


@dataclass(slots=True)
class Anchor:
    """A part of the screen to record as a template: where it is and how to check it."""

    name: str
    at: Region
    kind: str = "match"  # match | pixels
    threshold: float | None = None
    margin: int = 4


@dataclass(slots=True)
class TextSpec:
    """A region whose OCR text must match ``pattern`` (case-insensitive)."""

    name: str
    region: Region
    pattern: str
    threshold: float = 0.5


class TemplateLibrary:
    """The states of one model directory, as recorded and as loaded."""

    def __init__(self, name: str, screen: tuple[int, int]) -> None:
        self.name = name
        self.screen = screen
        self.states: list[dict[str, Any]] = []
        self.images: dict[str, Frame] = {}  # template file name → RGB pixels

    # -- recording ------------------------------------------------------------------------

    def record(
        self,
        frame: Frame,
        state: str,
        anchors: list[Anchor],
        texts: list[TextSpec] | None = None,
        *,
        overlay: bool = False,
        ready: bool = False,
    ) -> dict[str, Any]:
        """Cut ``anchors`` from ``frame`` as the templates of ``state`` (replacing any earlier)."""
        h, w = frame.shape[:2]
        if (w, h) != self.screen:
            raise ConfigError(f"the screenshot is {w}x{h}, the model is recorded at {self.screen[0]}x{self.screen[1]}")
        checks: list[dict[str, Any]] = []
        for a in anchors:
            if a.kind not in ("match", "pixels"):
                raise ConfigError(f"anchor {a.name!r}: kind must be match or pixels, not {a.kind!r}")
            if a.at.left < 0 or a.at.top < 0 or a.at.left + a.at.width > w or a.at.top + a.at.height > h:
                raise ConfigError(f"anchor {a.name!r} {tuple(a.at)} lies outside the {w}x{h} screen")
            crop = a.at.crop(frame).copy()
            if a.kind == "match" and float(gray(crop).std()) < MIN_TEXTURE:
                raise ConfigError(
                    f"anchor {a.name!r} of {state!r} is too plain to locate (an area of one colour); "
                    "record an icon or an edge, or use kind 'pixels'"
                )
            file = f"{state}.{a.name}.png"
            self.images[file] = crop
            entry: dict[str, Any] = {
                "kind": a.kind, "name": a.name, "template": file, "at": list(a.at),
                "threshold": a.threshold if a.threshold is not None else DEFAULT_THRESHOLD[a.kind],
            }
            if a.kind == "match":
                entry["margin"] = a.margin
            checks.append(entry)
        for t in texts or []:
            checks.append({"kind": "text", "name": t.name, "region": list(t.region),
                           "pattern": t.pattern, "threshold": t.threshold})
        described = {"name": state, "overlay": overlay, "ready": ready, "checks": checks}
        self.states = [s for s in self.states if s["name"] != state] + [described]
        return described

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        used = {c["template"] for s in self.states for c in s["checks"] if "template" in c}
        for file in used:
            if file in self.images:
                Image.fromarray(self.images[file]).save(directory / file, format="PNG", optimize=True)
        for stale in directory.glob("*.png"):
            if stale.name not in used:
                stale.unlink()
        path = directory / DESCRIPTION
        path.write_text(self._describe())
        return path

    def _describe(self) -> str:
        """The JSON description, one check per line: easy to read and to diff."""
        states = []
        for state in self.states:
            head = {k: v for k, v in state.items() if k != "checks"}
            checks = ",\n".join(f"    {json.dumps(c)}" for c in state["checks"])
            states.append(f"  {json.dumps(head)[:-1]}, \"checks\": [\n{checks}\n  ]}}")
        body = ",\n".join(states)
        return (f'{{"format": {FORMAT}, "name": {json.dumps(self.name)}, "screen": {json.dumps(list(self.screen))},\n'
                f' "states": [\n{body}\n ]}}\n')

    # -- loading --------------------------------------------------------------------------

    @classmethod
    def open(cls, directory: Path, name: str, screen: tuple[int, int]) -> TemplateLibrary:
        """The library in ``directory`` to add to, or a new one if there is none yet."""
        if not (directory / DESCRIPTION).exists():
            return cls(name, screen)
        lib = cls.load(directory)
        if lib.screen != screen:
            raise ConfigError(f"{directory} was recorded at {lib.screen[0]}x{lib.screen[1]}, "
                              f"the screen is {screen[0]}x{screen[1]}")
        return lib

    @classmethod
    def load(cls, directory: Path | Readable) -> TemplateLibrary:
        where = str(directory)
        try:
            data = json.loads((directory / DESCRIPTION).read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"no {DESCRIPTION} in {where}") from exc
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {where}/{DESCRIPTION}: {exc}") from exc
        if data.get("format") != FORMAT:
            raise ConfigError(f"{where}/{DESCRIPTION}: format {data.get('format')!r} is not {FORMAT}")
        lib = cls(str(data["name"]), (int(data["screen"][0]), int(data["screen"][1])))
        lib.states = list(data["states"])
        for state in lib.states:
            for check in state["checks"]:
                if check.get("kind") not in KINDS:
                    raise ConfigError(f"{where}: state {state['name']!r} has a check of unknown kind {check.get('kind')!r}")
                file = check.get("template")
                if file and file not in lib.images:
                    try:
                        raw = (directory / file).read_bytes()
                    except OSError as exc:
                        raise ConfigError(f"{where}: template {file} is missing") from exc
                    lib.images[file] = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
        return lib

    def screen_states(self) -> list[ScreenState]:
        out = []
        for state in self.states:
            checks = [self._check(state["name"], c) for c in state["checks"]]
            out.append(ScreenState(state["name"], checks, overlay=bool(state.get("overlay")),
                                   ready=bool(state.get("ready"))))
        return out

    def classifier(self) -> Classifier:
        return Classifier(self.screen_states())

    def _check(self, state: str, c: dict[str, Any]) -> Check:
        kind, name = c["kind"], c.get("name", "")
        threshold = float(c.get("threshold", DEFAULT_THRESHOLD[kind]))
        if kind == "text":
            from .ocr import TextCheck

            return TextCheck(Region(*c["region"]), c["pattern"], threshold, name=name)
        at = Region(*c["at"])
        image = self.images[c["template"]]
        if image.shape[:2] != (at.height, at.width):
            raise ConfigError(f"template {c['template']} is not the size of its region {tuple(at)}")
        if kind == "pixels":
            return TemplateCheck(at, gray(image).astype(np.float32), threshold)
        sw, sh = self.screen
        try:
            return MatchCheck(expand(at, int(c.get("margin", 4)), sw, sh), gray(image).copy(), threshold,
                              name=f"{state}.{name}")
        except ValueError as exc:
            raise ConfigError(f"state {state!r}, check {name!r}: {exc}") from exc

