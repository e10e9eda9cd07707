"""Record SimEHR's model directory (``model/``) from frames the renderer draws.

    python -m deskfleet.sim.capture

SimEHR is a pack like any other: its screens are recognised through a recorded model
directory, as a user's app is. Templates are cut from frames the renderer draws on parts
that never change with the user's data: each screen's colour badge and a button only that
screen has; the plain part of each dialog's coloured title strip and its OK button; the
desktop's icons; the reboot logo. They are compared in place (``pixels``): the renderer
draws every part at its place, give or take a desktop's 1-px drift, which the threshold
absorbs. Run it when SimEHR's look changes, and review the PNGs.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from deskfleet.vision import Anchor, TemplateLibrary
from deskfleet.vision.screens import save_screen

from .model import _DIALOG_BASE, READY, THRESHOLD, _regions, _sample_views
from .render import Renderer

MODEL_DIR = Path(__file__).with_name("model")


def record(directory: Path, width: int = 1024, height: int = 768) -> TemplateLibrary:
    renderer = Renderer(width, height)
    views = _sample_views()
    library = TemplateLibrary("simehr", (width, height))
    for state, regions in _regions(renderer.layout).items():
        frame = renderer.frame(views[state])
        anchors = [Anchor(f"part{i}", r, kind="pixels", threshold=THRESHOLD) for i, r in enumerate(regions)]
        library.record(frame, state, anchors, overlay=state in _DIALOG_BASE, ready=state == READY)
    library.save(directory)
    for described in library.states:  # each state's frame, as the tests of the renderer check the rest
        save_screen(directory, described["name"], renderer.frame(views[described["name"]]))
    return library


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        library = record(Path(tmp) / "model")
        if MODEL_DIR.exists():
            shutil.rmtree(MODEL_DIR)
        shutil.copytree(Path(tmp) / "model", MODEL_DIR)
    print(f"recorded {len(library.states)} states in {MODEL_DIR}", file=sys.stderr)


if __name__ == "__main__":
    main()
