"""Reading text from small screen regions with tesseract (through tesserocr).

OCR serves two purposes: ``Desktop.read_text`` for automations and playbooks (a record
number in a confirmation dialog, the account a session belongs to, search results), and
:class:`TextCheck`, a recognition check for states that differ only in their words.

It is costly next to template matching — ≈ 9 ms for a title bar, ≈ 14 ms for a dialog,
≈ 470 ms for a whole 1080p frame (DESKTOP-NOTES) — so it is only ever pointed at small
regions, and the classifier reads a :class:`TextCheck` only after every cheaper check of
its state has passed. One tesseract API object is created per engine and reused (creating
one costs ≈ 100 ms); calls into it are serialised by a lock, since a tesseract API is not
re-entrant. ``OMP_THREAD_LIMIT=1`` is set before tesseract loads: with OpenMP threads a
whole-frame read took 4-6 s on two shared cores instead of half a second.

The PyPI wheel of tesserocr bundles tesseract itself but no language data; the English
data comes from the system (Debian/Ubuntu: ``apt-get install tesseract-ocr-eng``, which
puts ``eng.traineddata`` under ``/usr/share/tesseract-ocr/5/tessdata``), or from the
directory named by ``TESSDATA_PREFIX``.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np

from ..desktop.base import Frame, Region
from ..errors import ConfigError
from .match import gray

#: where distributions put tesseract's language data, newest first
TESSDATA_DIRS = (
    "/usr/share/tesseract-ocr/5/tessdata",
    "/usr/share/tesseract-ocr/4.00/tessdata",
    "/usr/share/tessdata",
    "/usr/local/share/tessdata",
    "/opt/homebrew/share/tessdata",
    "C:/Program Files/Tesseract-OCR/tessdata",
)
INSTALL_HINT = (
    "install tesseract's English data (Debian/Ubuntu: apt-get install tesseract-ocr-eng) "
    "or point TESSDATA_PREFIX at a directory holding eng.traineddata"
)
#: text smaller than this (region height in px, one line) is enlarged before reading
SMALL_LINE = 40


def find_tessdata(lang: str = "eng") -> Path:
    """The directory holding ``<lang>.traineddata``; ConfigError saying what to install."""
    candidates = [os.environ["TESSDATA_PREFIX"]] if os.environ.get("TESSDATA_PREFIX") else []
    candidates += TESSDATA_DIRS
    for directory in candidates:
        for path in (Path(directory), Path(directory) / "tessdata"):
            if (path / f"{lang}.traineddata").is_file():
                return path
    raise ConfigError(f"no tesseract language data for {lang!r}: {INSTALL_HINT}")


class OcrEngine:
    """One reusable tesseract instance. Thread-safe; cheap to call, costly to create."""

    def __init__(self, lang: str = "eng", tessdata: Path | None = None) -> None:
        os.environ.setdefault("OMP_THREAD_LIMIT", "1")  # before tesseract is loaded
        try:
            import tesserocr
        except ImportError as exc:
            raise ConfigError(f"tesserocr is not installed (pip install tesserocr): {exc}") from exc
        self._tesserocr: Any = tesserocr
        self.tessdata = tessdata or find_tessdata(lang)
        self.lang = lang
        self._lock = threading.Lock()
        try:
            self._api = tesserocr.PyTessBaseAPI(path=str(self.tessdata), lang=lang)
        except RuntimeError as exc:
            raise ConfigError(f"tesseract could not load {lang!r} from {self.tessdata}: {exc}; {INSTALL_HINT}") from exc

    def read(self, image: Frame, *, single_line: bool | None = None) -> str:
        """The text in ``image`` (an RGB crop or grayscale), lines joined by newlines."""
        g = gray(image)
        h, w = g.shape
        if h == 0 or w == 0:
            return ""
        if single_line is None:
            single_line = h < SMALL_LINE * 1.5
        if h < SMALL_LINE * 2:
            # Tesseract reads best at ~30 px capitals; UI text is half that.
            g = np.asarray(cv2.resize(g, (w * 2, h * 2), interpolation=cv2.INTER_CUBIC), np.uint8)
            h, w = g.shape
        g = np.ascontiguousarray(g)
        psm = self._tesserocr.PSM.SINGLE_LINE if single_line else self._tesserocr.PSM.SINGLE_BLOCK
        with self._lock:
            self._api.SetPageSegMode(psm)
            self._api.SetImageBytes(g.tobytes(), w, h, 1, w)
            text: str = self._api.GetUTF8Text()
        lines = (" ".join(line.split()) for line in text.splitlines())
        return "\n".join(line for line in lines if line)

    def close(self) -> None:
        with self._lock:
            self._api.End()


_shared: OcrEngine | None = None
_shared_lock = threading.Lock()


def shared_engine() -> OcrEngine:
    """The process's English OCR engine, created on first use."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = OcrEngine()
        return _shared


@dataclass(slots=True)
class TextCheck:
    """Text read in ``region`` matches ``pattern`` (a regular expression, case-insensitive)."""

    kind: ClassVar[str] = "text"

    region: Region
    pattern: str
    threshold: float = 0.5
    name: str = ""
    engine: OcrEngine | None = field(default=None, repr=False)
    cost: int = field(default=10, init=False)  # OCR: the classifier reads it last, if at all
    _compiled: re.Pattern[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._compiled = re.compile(self.pattern, re.IGNORECASE)

    def read(self, frame: Frame) -> str:
        crop = self.region.crop(frame)
        if crop.shape[0] < self.region.height or crop.shape[1] < self.region.width:
            return ""
        return (self.engine or shared_engine()).read(crop)

    def score(self, frame: Frame) -> float:
        return 1.0 if self._compiled.search(self.read(frame)) else 0.0
