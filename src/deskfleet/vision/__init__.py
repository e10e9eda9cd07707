"""Screen-state recognition: classify a screenshot into one of an app model's named states.

Biased so that an unknown screen is never taken for a working state: a state is recognised
only when *all* of its checks pass, overlay states (dialogs) are checked first and win, and
a screen that matches no state — or two non-overlay states at once — is ``unknown``. A
frame of another size than the model was recorded at is ``wrong_screen``, with a message
that gives both sizes.

The checks compare stable parts of the UI *within a region* (whole-frame hashes or SSIM
cannot tell a modal dialog from rendering drift; see DESKTOP-NOTES). Three kinds, one
:class:`Check` protocol:

- :class:`TemplateCheck` (``pixels``): a template at its recorded position, tolerant to
  noise — exact renderers such as the simulated desktop, and plain areas (a bare desktop);
- :class:`~deskfleet.vision.match.MatchCheck` (``match``): a template searched for within a
  region with OpenCV, tolerant to the 1-2 px shifts of real rendering;
- :class:`~deskfleet.vision.ocr.TextCheck` (``text``): words read by OCR in a small region.

Checks carry a ``cost``; the classifier reads the expensive ones (OCR) only when every
cheap check of their state has passed and the state could still win, so a model with
OCR checks costs one or two OCR reads per frame, not one per state.

Modules: :mod:`.classifier` (the decision, and its explanation), :mod:`.templates` (a model
directory on disk: ``model.json``, template PNGs; :func:`load_model`), :mod:`.screens`
(labelled screenshots — the ones saved with a model, or a CSV — and accuracy reports),
:mod:`.authoring` (capture, add-screen and remove, each checked against the saved screens),
:mod:`.locate` (the primary anchor: the app's window found by its pixels), :mod:`.redact`
(the parts of the screen blacked out before a screenshot leaves the machine).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .classifier import (
    COVERED,
    EXPENSIVE,
    UNKNOWN,
    WRONG_SCREEN,
    Check,
    CheckScore,
    Classification,
    Classifier,
    Explanation,
    ScreenState,
    StateVerdict,
    TemplateCheck,
)

if TYPE_CHECKING:
    from .templates import Anchor, TemplateLibrary, TextSpec, load_model


def __getattr__(name: str) -> Any:
    # Loading a model directory needs OpenCV and Pillow; classifying simulated frames
    # (every simulated agent imports this package) does not.
    if name in ("Anchor", "TemplateLibrary", "TextSpec", "load_model"):
        from . import templates

        return getattr(templates, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "COVERED",
    "EXPENSIVE",
    "UNKNOWN",
    "WRONG_SCREEN",
    "Anchor",
    "Check",
    "CheckScore",
    "Classification",
    "Classifier",
    "Explanation",
    "ScreenState",
    "StateVerdict",
    "TemplateCheck",
    "TemplateLibrary",
    "TextSpec",
    "load_model",
]
