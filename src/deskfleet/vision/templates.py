"""An app model's recognition data on disk: template PNGs plus one JSON description.

A model directory holds ``model.json`` — the screen size it was recorded at, and each
state with its checks, regions and thresholds — one PNG per template, cut from a live
screenshot, and ``screens/<state>/<n>.png``, the labelled screenshots the model must keep
recognising (:mod:`.screens`). ``deskfleet model capture`` writes it from a running
display; :func:`load_model` (or :meth:`TemplateLibrary.load` and ``.classifier()``) reads
it. People review and edit the JSON (a threshold, a region); the PNGs show exactly what
each check looks for.

    {"format": 1, "name": "demoehr", "screen": [1024, 768],
     "states": [{"name": "home", "ready": true, "overlay": false, "checks": [
        {"kind": "match", "name": "logo", "template": "home.logo.png",
         "at": [12, 8, 40, 40], "threshold": 0.9, "margin": 4},
        {"kind": "pixels", "name": "corner", "template": "home.corner.png",
         "at": [900, 700, 60, 40], "threshold": 0.95},
        {"kind": "text", "name": "title", "region": [60, 10, 300, 36],
         "pattern": "^Home$", "threshold": 0.5}]}]}

Parts of the screen to black out in the screenshots an agent uploads (a patient's name, an
account number) are named in ``redact`` lists — at the top for every screen, in a state for
that screen: ``{"name": "results", "box": [252, 190, 520, 144]}``, or relative to where a
check of the state is found, ``{"name": "mrn", "near": "part1", "box": [-263, 1, 240, 32]}``
(see :mod:`.redact`, which applies them).

A ``match`` or ``pixels`` check may carry ``"variants": {"dark": "home.logo.dark.png"}``: the
same part as another look of the app draws it (another theme), recorded by ``deskfleet model
capture --variant LOOK`` and tried when the template itself does not pass.

Kinds: ``match`` searches for the template within ``margin`` px of where it was cut
(:class:`~deskfleet.vision.match.MatchCheck`), ``pixels`` compares it at exactly that
place (:class:`~deskfleet.vision.TemplateCheck`, for plain areas that cannot be located),
``text`` reads the region by OCR (:class:`~deskfleet.vision.ocr.TextCheck`).

Loading validates everything before anything is used — JSON syntax (with line and
column), every field's type and range, template files present and of their region's size,
state names unique — and says what is wrong in one :class:`~deskfleet.errors.ConfigError`
line naming the file. Saving writes each file to a temporary name and renames it into
place, ``model.json`` last, so a reader never meets a half-written file.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..desktop.base import Frame, Region
from ..errors import ConfigError
from .classifier import (
    COVERED,
    UNKNOWN,
    WRONG_SCREEN,
    Check,
    Classifier,
    ScreenState,
    TemplateCheck,
    wrong_screen_message,
)
from .match import MIN_TEXTURE, MatchCheck, expand, gray
from .redact import Redaction, RedactRegion

if TYPE_CHECKING:
    from .locate import WindowLocator

FORMAT = 1
DESCRIPTION = "model.json"
KINDS = ("match", "pixels", "text")
DEFAULT_THRESHOLD = {"match": 0.9, "pixels": 0.95, "text": 0.5}
DEFAULT_MARGIN = 4
MAX_MARGIN = 64
#: state names the classifier itself returns: no model state may take them
RESERVED = frozenset({UNKNOWN, WRONG_SCREEN, COVERED})
#: names that become file names (states, templates): letters, digits, '_' and '-'
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")

_TOP = ("format", "name", "screen", "window", "any_theme", "anchor", "scales", "redact", "states")
_STATE = ("name", "overlay", "ready", "redact", "checks")
_REDACT = ("name", "near", "box")
_FIELDS = {
    "match": ("kind", "name", "template", "at", "threshold", "margin", "variants"),
    "pixels": ("kind", "name", "template", "at", "threshold", "variants"),
    "text": ("kind", "name", "region", "pattern", "threshold"),
}

#: where a model is read from: a path (``str`` or ``Path``) or package data
#: (``importlib.resources.files(package) / "model"``)
ModelSource = str | os.PathLike[str] | Traversable


def model_root(where: ModelSource) -> Traversable:
    """The model directory ``where`` names (a path to its ``model.json`` names it too)."""
    if isinstance(where, str | os.PathLike):
        path = Path(where)
        return path.parent if path.name == DESCRIPTION and path.is_file() else path
    return where


def load_model(where: ModelSource) -> Classifier:
    """The classifier of the model directory ``where``; ConfigError saying what is wrong."""
    return TemplateLibrary.load(where).classifier()


@dataclass(slots=True)
class Anchor:
    """A part of the screen to record as a template: where it is and how to check it."""

    name: str
    at: Region
    kind: str = "match"  # match | pixels
    threshold: float | None = None  # None: the kind's default
    margin: int = DEFAULT_MARGIN


@dataclass(slots=True)
class TextSpec:
    """A region whose OCR text must match ``pattern`` (case-insensitive)."""

    name: str
    region: Region
    pattern: str
    threshold: float = DEFAULT_THRESHOLD["text"]


class TemplateLibrary:
    """The states of one model directory, as recorded and as loaded."""

    def __init__(self, name: str, screen: tuple[int, int], window: Region | None = None) -> None:
        self.name = name
        self.screen = screen
        #: where the application's main window was when the model was recorded: every check is
        #: placed relative to it, so a moved window, or another screen size, changes nothing
        #: (None: the model is tied to the screen, as recorded)
        self.window = window
        #: its templates also pass on the same shapes in other colours (another theme)
        self.any_theme = False
        #: the name of a match check whose template finds the window by its pixels where the
        #: window system cannot say where it is (see :mod:`.locate`); None: no such fallback
        self.anchor: str | None = None
        #: the scales the app's window may be drawn at (a display's DPI, an RDP client's
        #: scaling), as factors of the recorded size: where the window system cannot say where
        #: the window is, the primary anchor is searched for at each (the window system's answer
        #: gives the scale by itself: the window's size)
        self.scales: tuple[float, ...] = (1.0,)
        self.states: list[dict[str, Any]] = []
        #: regions blacked out in uploaded screenshots of every screen (each state's own are
        #: its ``"redact"``): ``{"name", "box"}`` as ``model.json`` has them
        self.redact: list[dict[str, Any]] = []
        self.images: dict[str, Frame] = {}  # template file name → RGB pixels
        self._dirty: set[str] = set()  # templates recorded since loading: to be written
        self._origin: Path | None = None  # the directory loaded from, if on disk

    @property
    def state_names(self) -> list[str]:
        return [s["name"] for s in self.states]

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
            raise ConfigError(f"the screenshot is {w}x{h}; the model was recorded at {self.screen[0]}x{self.screen[1]}")
        _check_name(state, "state")
        if not anchors and not texts:
            raise ConfigError(f"state {state!r} needs at least one check (an anchor, a fixed area or a text)")
        names = [a.name for a in anchors] + [t.name for t in texts or []]
        for n in names:
            _check_name(n, f"check of {state!r}")
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ConfigError(f"state {state!r} names {', '.join(map(repr, twice))} twice: give each check its own name")
        images: dict[str, Frame] = {}
        checks: list[dict[str, Any]] = []
        for a in anchors:
            what = f"anchor {a.name!r} of {state!r}"
            if a.kind not in ("match", "pixels"):
                raise ConfigError(f"{what}: kind must be match or pixels, not {a.kind!r}")
            _box(list(a.at), what, self.screen)  # inside the screen before anything is cut
            file = f"{state}.{a.name}.png"
            images[file] = a.at.crop(frame).copy()
            entry: dict[str, Any] = {
                "kind": a.kind, "name": a.name, "template": file, "at": list(a.at),
                "threshold": a.threshold if a.threshold is not None else DEFAULT_THRESHOLD[a.kind],
            }
            if a.kind == "match":
                entry["margin"] = a.margin
            checks.append(_check_spec(entry, f"{what}: ", self.screen, images.__getitem__))
        for t in texts or []:
            entry = {"kind": "text", "name": t.name, "region": list(t.region), "pattern": t.pattern,
                     "threshold": t.threshold}
            checks.append(_check_spec(entry, f"text {t.name!r} of {state!r}: ", self.screen, images.__getitem__))
        described: dict[str, Any] = {"name": state, "overlay": overlay, "ready": ready, "checks": checks}
        for old in self.states:
            if old["name"] == state:
                self._forget(old)
                if old.get("redact"):  # recorded again: what it hides stays hidden
                    described = {**described, "redact": old["redact"]}
                    kept = {c["name"] for c in checks}
                    lost = sorted({r["near"] for r in old["redact"] if r.get("near") and r["near"] not in kept})
                    if lost:
                        raise ConfigError(f"state {state!r} redacts regions near check(s) {', '.join(lost)}, which "
                                          "this recording lacks: keep their names, or edit its 'redact' first")
        at = next((i for i, s in enumerate(self.states) if s["name"] == state), len(self.states))
        self.states = [s for s in self.states if s["name"] != state]
        self.states.insert(at, described)  # recorded again: same place in the model
        self.images.update(images)
        self._dirty.update(images)
        return described

    def remove(self, state: str) -> None:
        """Drop ``state`` and its templates (refused if it is the model's only state)."""
        found = next((s for s in self.states if s["name"] == state), None)
        if found is None:
            raise ConfigError(f"the model has no state {state!r} (its states: {', '.join(self.state_names)})")
        if len(self.states) == 1:
            raise ConfigError(f"{state!r} is the model's only state: a model needs at least one "
                              "(delete the directory to start again)")
        self._forget(found)
        self.states.remove(found)

    def record_variant(self, frame: Frame, state: str, look: str, *, only: Callable[[Check], bool] | None = None,
                       ) -> list[str]:
        """Cut, from ``frame`` (``state`` in another look of the app: another theme), each of
        the state's templates again at its place, as that ``look``'s variant of it (replacing
        an earlier one). ``only(check)`` chooses the checks that need one (default: all).
        Returns the names of the checks given a variant."""
        h, w = frame.shape[:2]
        if (w, h) != self.screen:
            raise ConfigError(f"the screenshot is {w}x{h}; the model was recorded at {self.screen[0]}x{self.screen[1]}")
        _check_name(look, "look")
        found = next((s for s in self.states if s["name"] == state), None)
        if found is None:
            raise ConfigError(f"the model has no state {state!r} to record a {look!r} look of "
                              f"(its states: {', '.join(self.state_names)})")
        done = []
        for spec in found["checks"]:
            if "template" not in spec or (only is not None and not only(self._check(state, spec))):
                continue
            file = f"{state}.{spec['name'] or spec['template'][:-4]}.{look}.png"
            image = Region(*spec["at"]).crop(frame).copy()
            variants = {**spec.get("variants", {}), look: file}
            images = {**self.images, file: image}
            _check_spec({**spec, "variants": variants}, f"{look!r} look of check {spec['name']!r} of {state!r}: ",
                        self.screen, images.__getitem__)
            spec["variants"] = variants
            self.images[file] = image
            self._dirty.add(file)
            done.append(spec["name"])
        return done

    def _forget(self, state: dict[str, Any]) -> None:
        for check in state["checks"]:
            for file in _template_files(check):
                self.images.pop(file, None)
                self._dirty.discard(file)

    def save(self, directory: Path) -> Path:
        """Write the model into ``directory``: changed templates, then ``model.json``, then
        remove templates no state uses any more. Each file goes to a temporary name first."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        here = directory.resolve()
        used = {f for s in self.states for c in s["checks"] for f in _template_files(c)}
        for file in sorted(used):
            target = directory / file
            if file in self._dirty or self._origin != here or not target.exists():
                buffer = io.BytesIO()
                Image.fromarray(self.images[file]).save(buffer, format="PNG", optimize=True)
                write_atomically(target, buffer.getvalue())
        path = directory / DESCRIPTION
        write_atomically(path, self._describe().encode())
        for stale in directory.glob("*.png"):
            if stale.name not in used:
                stale.unlink()
        self._dirty.clear()
        self._origin = here
        return path

    def _describe(self) -> str:
        """The JSON description, one check per line: easy to read and to diff."""
        states = []
        for state in self.states:
            head = {k: v for k, v in state.items() if k != "checks"}
            checks = ",\n".join(f"    {json.dumps(c)}" for c in state["checks"])
            states.append(f"  {json.dumps(head)[:-1]}, \"checks\": [\n{checks}\n  ]}}")
        body = ",\n".join(states)
        window = f', "window": {json.dumps(list(self.window))}' if self.window is not None else ""
        window += ', "any_theme": true' if self.any_theme else ""
        window += f', "anchor": {json.dumps(self.anchor)}' if self.anchor is not None else ""
        window += f', "scales": {json.dumps(list(self.scales))}' if self.scales != (1.0,) else ""
        window += f', "redact": {json.dumps(self.redact)}' if self.redact else ""
        return (f'{{"format": {FORMAT}, "name": {json.dumps(self.name)}, "screen": {json.dumps(list(self.screen))}'
                f'{window},\n "states": [\n{body}\n ]}}\n')

    # -- loading --------------------------------------------------------------------------

    @classmethod
    def open(cls, directory: Path, name: str, screen: tuple[int, int]) -> TemplateLibrary:
        """The library in ``directory`` to add to, or a new one if there is none yet."""
        if not (Path(directory) / DESCRIPTION).exists():
            return cls(name, screen)
        lib = cls.load(directory)
        if lib.screen != screen:
            raise ConfigError(f"{directory}: {wrong_screen_message(screen, lib.screen)}")
        return lib

    @classmethod
    def load(cls, directory: ModelSource) -> TemplateLibrary:
        """Read and validate a model directory (a path, as ``str`` or ``Path``, or package data)."""
        root = model_root(directory)
        where = f"{root}/{DESCRIPTION}"
        if isinstance(root, Path) and root.is_file():
            raise ConfigError(f"{root} is not a model directory (a directory holding {DESCRIPTION})")
        try:
            text = (root / DESCRIPTION).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"no {DESCRIPTION} in {root}: not a model directory "
                              "(record one with 'deskfleet model capture')") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read {where}: {exc}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
        lib = _parse(data, root, where)
        if isinstance(root, Path):
            lib._origin = root.resolve()
        return lib

    def screen_states(self) -> list[ScreenState]:
        out = []
        for state in self.states:
            checks = [self._check(state["name"], c) for c in state["checks"]]
            out.append(ScreenState(state["name"], checks, overlay=bool(state.get("overlay")),
                                   ready=bool(state.get("ready"))))
        return out

    def classifier(self) -> Classifier:
        return Classifier(self.screen_states(), screen=self.screen, redaction=self.redaction())

    def redaction(self) -> Redaction:
        """The regions to black out in uploaded screenshots (``redact``: see :mod:`.redact`)."""
        def regions(specs: list[dict[str, Any]]) -> tuple[RedactRegion, ...]:
            return tuple(RedactRegion(r["name"], Region(*r["box"]), r.get("near")) for r in specs)

        return Redaction(regions(self.redact),
                         {s["name"]: regions(s["redact"]) for s in self.states if s.get("redact")})

    def locator(self) -> WindowLocator | None:
        """What finds the app's window by its primary anchor (``"anchor"``), for a desktop
        whose window system cannot say; None when the model names none or is not anchored
        to a window."""
        if self.anchor is None or self.window is None:
            return None
        from .locate import WindowLocator

        spec = self._anchor_spec(self.anchor)
        return WindowLocator(gray(self.images[spec["template"]]).copy(), Region(*spec["at"]), self.scales,
                             float(spec["threshold"]), name=self.anchor,
                             variants=tuple(gray(self.images[f]).copy() for f in spec.get("variants", {}).values()))

    def _anchor_spec(self, name: str) -> dict[str, Any]:
        """The first match check named ``name``; ConfigError if there is none."""
        for state in self.states:
            for check in state["checks"]:
                if check["kind"] == "match" and check["name"] == name:
                    return dict(check)
        raise ConfigError(f"'anchor' names {name!r}, which is no match check of any state: name an anchor the "
                          "app's working screens all show (its menu bar, its logo)")

    def _check(self, state: str, c: dict[str, Any]) -> Check:
        kind, name, threshold = c["kind"], c.get("name", ""), float(c["threshold"])
        sw, sh = self.screen
        if kind == "text":
            from .ocr import TextCheck  # tesserocr loads only for models that read text

            return TextCheck(Region(*c["region"]), c["pattern"], threshold, name=name)
        at = Region(*c["at"])
        image = self.images[c["template"]]
        looks = [self.images[f] for f in c.get("variants", {}).values()]
        if kind == "pixels":
            return TemplateCheck(at, gray(image).astype(np.float32), threshold, name,
                                 variants=tuple(gray(v).astype(np.float32) for v in looks))
        return MatchCheck(expand(at, int(c["margin"]), sw, sh), gray(image).copy(), threshold, name=name,
                          any_theme=self.any_theme, variants=tuple(gray(v).copy() for v in looks))


# -- validation -------------------------------------------------------------------------------


def _fail(message: str) -> NoReturn:
    raise ConfigError(message)


def _check_name(name: object, what: str) -> None:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        _fail(f"{what} name {name!r} is not usable: letters, digits, '_' and '-' only (it names files)")
    if name in RESERVED:
        _fail(f"{what} name {name!r} is reserved: the classifier itself answers {name!r}")


def _template_files(check: dict[str, Any]) -> list[str]:
    """The PNG files a check's description names: its template and its variants."""
    return [check["template"], *check.get("variants", {}).values()] if "template" in check else []


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _box(value: object, what: str, screen: tuple[int, int]) -> Region:
    """A [left, top, width, height] list inside a ``screen``-sized frame."""
    if not (isinstance(value, list) and len(value) == 4 and all(_is_int(v) for v in value)):
        _fail(f"{what}: a region is [left, top, width, height] in whole pixels, not {value!r}")
    r = Region(*value)
    sw, sh = screen
    if r.width <= 0 or r.height <= 0:
        _fail(f"{what}: region {value} is empty")
    if r.left < 0 or r.top < 0 or r.left + r.width > sw or r.top + r.height > sh:
        _fail(f"{what}: region {value} lies outside the {sw}x{sh} screen")
    return r


def _check_spec(c: dict[str, Any], ctx: str, screen: tuple[int, int],
                image_of: Callable[[str], Frame]) -> dict[str, Any]:
    """One check's description, validated and with defaults filled in (``ctx`` prefixes errors).
    ``image_of`` gives a template's pixels, or raises LookupError saying why it cannot."""
    kind = c.get("kind")
    if kind not in KINDS:
        _fail(f"{ctx}unknown check kind {kind!r} (kinds: {', '.join(KINDS)})")
    extra = [k for k in c if k not in _FIELDS[kind]]
    if extra:
        _fail(f"{ctx}unknown field {extra[0]!r} for a {kind} check (fields: {', '.join(_FIELDS[kind])})")
    name = c.get("name", "")
    if not isinstance(name, str):
        _fail(f"{ctx}name must be a string, not {name!r}")
    threshold = c.get("threshold", DEFAULT_THRESHOLD[kind])
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 <= threshold <= 1:
        _fail(f"{ctx}threshold {threshold!r} is outside 0..1")
    out: dict[str, Any] = {"kind": kind, "name": name}
    if kind == "text":
        out["region"] = list(_box(c.get("region"), f"{ctx[:-2]}", screen))
        pattern = c.get("pattern")
        if not isinstance(pattern, str) or not pattern:
            _fail(f"{ctx}a text check needs a 'pattern' (a regular expression)")
        try:
            re.compile(pattern)
        except re.error as exc:
            _fail(f"{ctx}pattern {pattern!r} is not a regular expression: {exc}")
        out["pattern"] = pattern
        out["threshold"] = threshold
        return out
    at = _box(c.get("at"), ctx[:-2], screen)

    def template(file: object, what: str) -> str:
        if not isinstance(file, str) or not file.endswith(".png") or file != Path(file).name or file.startswith("."):
            _fail(f"{ctx}{what} must name a PNG file in the model directory, not {file!r}")
        try:
            image = image_of(file)
        except LookupError as exc:
            _fail(f"{ctx}{exc.args[0]}")
        ih, iw = image.shape[:2]
        if (iw, ih) != (at.width, at.height):
            _fail(f"{ctx}template {file} is {iw}x{ih}, its region {list(at)} is {at.width}x{at.height}")
        if kind == "match" and float(gray(image).std()) < MIN_TEXTURE:
            _fail(f"{ctx}template {file} is too plain to locate (an area of one colour); "
                  "record an icon or an edge, or make it a 'pixels' check (--fixed)")
        return file

    out.update({"template": template(c.get("template"), "'template'"), "at": list(at), "threshold": threshold})
    if kind == "match":
        margin = c.get("margin", DEFAULT_MARGIN)
        if not _is_int(margin) or not 0 <= margin <= MAX_MARGIN:
            _fail(f"{ctx}margin {margin!r} must be a whole number of pixels, 0..{MAX_MARGIN}")
        out["margin"] = margin
    variants = c.get("variants")
    if variants is not None:
        if not isinstance(variants, dict) or not variants:
            _fail(f"{ctx}'variants' must map a look's name to its template, e.g. {{\"dark\": \"x.dark.png\"}}, "
                  f"not {variants!r}")
        for look, file in variants.items():
            if not NAME.fullmatch(look):
                _fail(f"{ctx}look name {look!r} is not usable: letters, digits, '_' and '-' only")
            template(file, f"the {look!r} variant")
        out["variants"] = dict(variants)
    return out


def _parse(data: Any, root: Traversable, where: str) -> TemplateLibrary:
    def fail(message: str) -> NoReturn:
        _fail(f"{where}: {message}")

    if not isinstance(data, dict):
        fail("the description must be a JSON object")
    extra = [k for k in data if k not in _TOP]
    if extra:
        fail(f"unknown field {extra[0]!r} (fields: {', '.join(_TOP)})")
    if data.get("format") != FORMAT:
        fail(f"format {data.get('format')!r} is not {FORMAT}")
    name, screen, states = data.get("name"), data.get("screen"), data.get("states")
    if not isinstance(name, str):
        fail(f"'name' must be a string, not {name!r}")
    if not (isinstance(screen, list) and len(screen) == 2 and all(_is_int(v) and v > 0 for v in screen)):
        fail(f"'screen' must be [width, height] in pixels, not {screen!r}")
    if not isinstance(states, list) or not states:
        fail("'states' must be a non-empty list of states")
    window, any_theme = data.get("window"), data.get("any_theme", False)
    if not isinstance(any_theme, bool):
        fail(f"'any_theme' must be true or false, not {any_theme!r}")
    lib = TemplateLibrary(name, (screen[0], screen[1]))
    lib.any_theme = any_theme
    anchor, scales = data.get("anchor"), data.get("scales", [1.0])
    if anchor is not None and not isinstance(anchor, str):
        fail(f"'anchor' must name a match check, not {anchor!r}")
    if anchor is not None and window is None:
        fail("'anchor' finds the app's window by its pixels: the model needs a 'window' (where it was recorded)")
    if (not isinstance(scales, list) or not scales
            or not all(isinstance(v, int | float) and not isinstance(v, bool) and 0.25 <= v <= 4 for v in scales)):
        fail(f"'scales' must be a list of factors between 0.25 and 4 (e.g. [1.0, 1.25, 1.5]), not {scales!r}")
    lib.anchor, lib.scales = anchor, tuple(float(v) for v in scales)
    lib.redact = _redact_specs(data.get("redact", []), "'redact'", lib.screen, None, fail)
    if window is not None:
        try:
            lib.window = _box(window, "'window' (the app's main window when recorded)", lib.screen)
        except ConfigError as exc:
            fail(str(exc))

    def image_of(file: str) -> Frame:
        if file not in lib.images:
            try:
                raw = (root / file).read_bytes()
            except OSError:
                raise LookupError(f"template {file} is missing") from None
            try:
                lib.images[file] = decode_image(raw)
            except ValueError as exc:
                raise LookupError(f"template {file} {exc}") from None
        return lib.images[file]

    seen: set[str] = set()
    for i, state in enumerate(states):
        if not isinstance(state, dict):
            fail(f"state #{i + 1} must be a JSON object")
        sname = state.get("name")
        if not isinstance(sname, str) or not sname:
            fail(f"state #{i + 1} has no 'name'")
        if sname in RESERVED:
            fail(f"state name {sname!r} is reserved: the classifier itself answers {sname!r}")
        if sname in seen:
            fail(f"state {sname!r} is described twice")
        seen.add(sname)
        extra = [k for k in state if k not in _STATE]
        if extra:
            fail(f"state {sname!r}: unknown field {extra[0]!r} (fields: {', '.join(_STATE)})")
        for flag in ("overlay", "ready"):
            if not isinstance(state.get(flag, False), bool):
                fail(f"state {sname!r}: {flag!r} must be true or false")
        checks = state.get("checks")
        if not isinstance(checks, list) or not checks:
            fail(f"state {sname!r} has no checks")
        specs = []
        names: set[str] = set()
        for j, check in enumerate(checks):
            label = check.get("name") if isinstance(check, dict) else None
            ctx = f"state {sname!r}, check {label or f'#{j + 1}'!r}: "
            if not isinstance(check, dict):
                fail(f"{ctx}a check must be a JSON object")
            spec = _check_spec(check, f"{where}: {ctx}", lib.screen, image_of)
            if spec["name"] and spec["name"] in names:
                fail(f"state {sname!r} has two checks named {spec['name']!r}")
            names.add(spec["name"])
            specs.append(spec)
        described: dict[str, Any] = {"name": sname, "overlay": bool(state.get("overlay", False)),
                                     "ready": bool(state.get("ready", False))}
        hidden = _redact_specs(state.get("redact", []), f"state {sname!r}: 'redact'", lib.screen,
                               {sp["name"] for sp in specs if sp["name"]}, fail)
        if hidden:
            described["redact"] = hidden
        described["checks"] = specs
        lib.states.append(described)
    if lib.anchor is not None:
        try:
            lib._anchor_spec(lib.anchor)
        except ConfigError as exc:
            fail(str(exc))
    return lib


def _redact_specs(value: object, what: str, screen: tuple[int, int], checks: set[str] | None,
                  fail: Callable[[str], NoReturn]) -> list[dict[str, Any]]:
    """A ``redact`` list, validated: each ``{"name", "box"}`` inside the screen, or — in a
    state (``checks``: the names of its checks) — ``{"name", "near", "box"}`` relative to
    where that check is found."""
    if not isinstance(value, list):
        fail(f"{what} must be a list of regions such as {{\"name\": \"patient_name\", \"box\": [x, y, w, h]}}, "
             f"not {value!r}")
    out: list[dict[str, Any]] = []
    for i, entry in enumerate(value):
        label = entry.get("name") if isinstance(entry, dict) else None
        ctx = f"{what}, region {label or f'#{i + 1}'!r}"
        if not isinstance(entry, dict):
            fail(f"{ctx}: a region is a JSON object with 'name' and 'box'")
        extra = [k for k in entry if k not in _REDACT]
        if extra:
            fail(f"{ctx}: unknown field {extra[0]!r} (fields: {', '.join(_REDACT)})")
        if not isinstance(label, str) or not NAME.fullmatch(label):
            fail(f"{ctx}: 'name' must be letters, digits, '_' and '-' (it is what the artifact records)")
        if any(r["name"] == label for r in out):
            fail(f"{what} names region {label!r} twice")
        near, box = entry.get("near"), entry.get("box")
        if near is None:
            try:
                placed = _box(box, ctx, screen)
            except ConfigError as exc:
                fail(str(exc))
            out.append({"name": label, "box": list(placed)})
            continue
        if checks is None:
            fail(f"{ctx}: 'near' places a region by a check of one state; a region of every screen has a box")
        if not isinstance(near, str) or near not in checks:
            fail(f"{ctx}: 'near' must name a check of the state (its checks: {', '.join(sorted(checks)) or 'none named'})")
        if not (isinstance(box, list) and len(box) == 4 and all(_is_int(v) for v in box) and box[2] > 0 and box[3] > 0):
            fail(f"{ctx}: 'box' is [dx, dy, width, height] from the top-left of check {near!r}, in whole pixels, "
                 f"not {box!r}")
        out.append({"name": label, "near": near, "box": list(box)})
    return out


def decode_image(raw: bytes) -> Frame:
    """RGB pixels of an image file's bytes; ValueError("is not …") if they are not an image."""
    try:
        with Image.open(io.BytesIO(raw)) as image:
            return np.asarray(image.convert("RGB"))
    except UnidentifiedImageError:
        raise ValueError("is not an image (PNG expected)") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"is not a readable image: {exc}") from None


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file renamed over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
