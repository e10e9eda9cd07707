"""A labelled set of KeePassXC screens in renderings its model was not recorded in, built
from the screenshots saved with the pack's model (examples/keepassxc/model/screens), for
``deskfleet model test`` (issue 10: recognition that survives what differs between machines).

    python tests/labelled/keepassxc.py OUT_DIR      # writes OUT_DIR/labels.csv and the images

Every screenshot saved with the model, in each rendering:

- ``recorded`` — as recorded (the window at 0,0 of a 1024x768 screen);
- ``shift1``, ``shift2`` — the app's content 1 and 2 px off where it was recorded;
- ``noise`` — Gaussian noise (sd 5 grey levels); ``jpeg`` — JPEG at quality 70;
- ``moved`` — the window at 300,200 of a 1920x1080 screen;
- ``1280x1024``, ``1600x900`` — other screens, the window elsewhere on each;

and, for every ready screen: ``dialog`` — a dialog of the app that no model knows, over the
list (a window of its own: the window system lists it); ``overlay`` — another program's
window over part of the app; ``frozen`` — the list of an app that does not answer the ping.

Each image has its window facts beside it (``N.json``: the app's main window, the windows
over it, whether it answered), as pre-flight reads them on a real display. Renderings that
need the live app — a dark theme, fonts and DPI scaled 1.15 and 1.25 — are not in it yet.
Deterministic for a seed.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "examples" / "keepassxc" / "model"
WINDOW = (0, 0, 1024, 768)  # where the model recorded KeePassXC's main window
APP, OTHER = 4242, 5151  # the app's pid, another program's
PING = ["_NET_WM_PING", "WM_DELETE_WINDOW"]


def _window(id: int, title: str, rect: tuple[int, int, int, int], pid: int, dialog_of: int | None = None) -> dict:
    return {"id": id, "title": title, "rect": list(rect), "pid": pid, "dialog_of": dialog_of, "popup": False}


def _facts(at: tuple[int, int] | None, above: list[dict] | None = None, responsive: bool = True) -> dict:
    main = None if at is None else _window(1, "demo.kdbx - KeePassXC", (at[0], at[1], WINDOW[2], WINDOW[3]), APP)
    return {"windows": {"main": main, "above": above or []}, "responsive": responsive}


def _placed(frame: np.ndarray, screen: tuple[int, int], at: tuple[int, int]) -> np.ndarray:
    out = np.zeros((screen[1], screen[0], 3), np.uint8)
    h, w = frame.shape[:2]
    out[at[1] : at[1] + h, at[0] : at[0] + w] = frame
    return out


def _shifted(frame: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """The content moved by (dx, dy); the edge it leaves repeats the border."""
    out = np.roll(frame, (dy, dx), axis=(0, 1))
    if dy > 0:
        out[:dy] = out[dy]
    elif dy < 0:
        out[dy:] = out[dy - 1]
    if dx > 0:
        out[:, :dx] = out[:, dx : dx + 1]
    elif dx < 0:
        out[:, dx:] = out[:, dx - 1 : dx]
    return out


def _jpeg(frame: np.ndarray, quality: int = 70) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def _dialog(frame: np.ndarray, rng: np.random.Generator, *, title: str) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A plain dialog drawn over ``frame`` somewhere over the window: (new frame, its rect)."""
    w, h = int(rng.integers(300, 461)), int(rng.integers(120, 321))
    x, y = int(rng.integers(20, WINDOW[2] - w - 20)), int(rng.integers(40, WINDOW[3] - h - 20))
    image = Image.fromarray(frame.copy())
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.rectangle([x, y, x + w - 1, y + h - 1], fill=(239, 239, 239), outline=(120, 120, 120))
    draw.rectangle([x, y, x + w - 1, y + 26], fill=(60, 90, 150))
    draw.text((x + 10, y + 6), title, fill=(255, 255, 255), font=font)
    draw.text((x + 16, y + 50), "Something needs your attention before you go on.", fill=(20, 20, 20), font=font)
    draw.rectangle([x + w - 96, y + h - 40, x + w - 16, y + h - 14], fill=(225, 225, 225), outline=(90, 90, 90))
    draw.text((x + w - 70, y + h - 34), "OK", fill=(0, 0, 0), font=font)
    return np.asarray(image), (x, y, w, h)


def build(out: Path, *, seed: int = 0, model: Path = MODEL) -> Path:
    """Write the labelled set under ``out``; returns its ``labels.csv``."""
    from deskfleet.vision import TemplateLibrary
    from deskfleet.vision.screens import saved_screens

    library = TemplateLibrary.load(model)
    ready = {s["name"] for s in library.states if s.get("ready")}
    rng = np.random.default_rng(seed)
    rows: list[tuple[str, str, str]] = []

    written: Counter[tuple[str, str]] = Counter()
    saving = ThreadPoolExecutor(4)  # PNG encoding lets go of the GIL: the set is written on both cores
    saved: list[Future[None]] = []

    def write(group: str, label: str, frame: np.ndarray, facts: dict) -> None:
        folder = out / group / label
        folder.mkdir(parents=True, exist_ok=True)
        written[group, label] += 1
        n = written[group, label]
        saved.append(saving.submit(Image.fromarray(frame).save, folder / f"{n}.png", compress_level=1))
        (folder / f"{n}.json").write_text(json.dumps(facts))
        rows.append((f"{group}/{label}/{n}.png", label, group))

    for item in saved_screens(model):
        label, frame = item.label, item.frame()
        on_screen = None if label == "desktop" else (0, 0)  # the bare screen: no window of the app
        write("recorded", label, frame, _facts(on_screen))
        write("shift1", label, _shifted(frame, 1, 1), _facts(on_screen))
        write("shift2", label, _shifted(frame, -2, 2), _facts(on_screen))
        noisy = np.clip(frame.astype(np.int16) + rng.normal(0, 5, frame.shape).round().astype(np.int16), 0, 255)
        write("noise", label, noisy.astype(np.uint8), _facts(on_screen))
        write("jpeg", label, _jpeg(frame), _facts(on_screen))
        for group, screen, at in (("moved", (1920, 1080), (300, 200)), ("1280x1024", (1280, 1024), (128, 128)),
                                  ("1600x900", (1600, 900), (288, 66))):
            write(group, label, _placed(frame, screen, at), _facts(None if on_screen is None else at))
        if label in ready:
            shown, rect = _dialog(frame, rng, title="Database changed on disk")
            write("dialog", "covered", shown, _facts((0, 0), [_window(2, "KeePassXC - Notice", rect, APP, 1)]))
            big = _placed(frame, (1920, 1080), (300, 200))
            toast, rect = _dialog(big[200:968, 300:1324], rng, title="Mail: 3 new messages")
            big[200:968, 300:1324] = toast
            write("overlay", "covered", big, _facts((300, 200), [_window(3, "Notifications",
                                                                          (rect[0] + 300, rect[1] + 200, *rect[2:]),
                                                                          OTHER)]))
            write("frozen", "unresponsive", frame, _facts((0, 0), responsive=False))
    for f in saved:
        f.result()  # a screenshot that could not be written fails the build
    saving.shutdown()
    return write_labels(out, rows)


def write_labels(out: Path, rows: list[tuple[str, str, str]]) -> Path:
    """``out/labels.csv``: image, state, rendering — what ``deskfleet model test`` reads."""
    labels = out / "labels.csv"
    with labels.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "state", "rendering"])
        writer.writerows(rows)
    return labels


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/labelled/keepassxc.py OUT_DIR")
    print(build(Path(sys.argv[1])))
