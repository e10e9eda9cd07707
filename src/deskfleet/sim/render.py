"""Pixels for simulated desktops: a :class:`~deskfleet.sim.app.View` drawn with Pillow.

Frames are cached by the full view (LRU, shared by every desktop in the process), so a
fleet of idle desktops showing the same few screens costs a few renders, not one per
screenshot. Cached frames are read-only arrays handed out without a copy.

``drift`` (a seed) gives a desktop its own rendering quirks — a fixed 1-px shift and a few
grey levels of noise — like a machine with a different font rasteriser; recognition must
see through it. :func:`read_text` is the simulated OCR: the exact text of the widgets a
region touches.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from deskfleet import Frame, Region

from .layout import (
    APP_NAME,
    DIALOGS,
    SCREEN_BADGES,
    SCREEN_TITLES,
    Layout,
    View,
    Widget,
    intersects,
    layout_for,
)

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont
RGB = tuple[int, int, int]

BACKGROUND: RGB = (236, 239, 244)
TITLE_BAR: RGB = (28, 52, 94)
TEXT: RGB = (30, 40, 60)
MUTED: RGB = (80, 90, 108)
ERROR_TEXT: RGB = (176, 28, 28)
FIELD: RGB = (255, 255, 255)
FIELD_BORDER: RGB = (150, 160, 175)
FOCUS: RGB = (40, 110, 220)
SELECTION: RGB = (51, 120, 215)
BUTTON: RGB = (222, 228, 238)
BUTTON_BORDER: RGB = (120, 135, 160)
DESKTOP: RGB = (0, 118, 128)
DIM = 0.55  # a modal dialog's backdrop keeps 55 % of the brightness
LINE_HEIGHT = 24
_DIM_LUT = [int(v * DIM) for v in range(256)] * 3


@functools.lru_cache(maxsize=16)
def _font(size: int, bold: bool = False) -> Font:
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    try:
        return ImageFont.truetype(name, size)
    except OSError:
        return ImageFont.load_default(size)


@dataclass(frozen=True, slots=True)
class CacheInfo:
    hits: int
    misses: int
    size: int
    maxsize: int


class FrameCache:
    """LRU of rendered frames keyed by (width, height, drift, view).

    Only touched from the event loop (blocking automations reach the desktop through
    ``run_coroutine_threadsafe``), so it needs no lock.
    """

    def __init__(self, maxsize: int = 32) -> None:
        self.maxsize = maxsize
        self.hits = 0
        self.misses = 0
        self._frames: OrderedDict[tuple[int, int, int | None, View], Frame] = OrderedDict()

    def get(self, key: tuple[int, int, int | None, View]) -> Frame | None:
        frame = self._frames.get(key)
        if frame is None:
            self.misses += 1
            return None
        self.hits += 1
        self._frames.move_to_end(key)
        return frame

    def put(self, key: tuple[int, int, int | None, View], frame: Frame) -> None:
        self._frames[key] = frame
        self._frames.move_to_end(key)
        while len(self._frames) > self.maxsize:
            self._frames.popitem(last=False)

    def info(self) -> CacheInfo:
        return CacheInfo(self.hits, self.misses, len(self._frames), self.maxsize)

    def clear(self) -> None:
        self._frames.clear()
        self.hits = self.misses = 0


_CACHE = FrameCache()


def cache_info() -> CacheInfo:
    return _CACHE.info()


def clear_cache() -> None:
    _CACHE.clear()


def set_cache_size(maxsize: int) -> None:
    """Frames are ~2.4 MB at 1024x768: the default 32 bounds the cache near 75 MB."""
    if maxsize < 1:
        raise ValueError("the frame cache needs room for at least one frame")
    _CACHE.maxsize = maxsize


class Renderer:
    """Draws views for one screen size and drift; frames come from the shared cache."""

    def __init__(self, width: int = 1024, height: int = 768, drift: int | None = None) -> None:
        self.layout = layout_for(width, height)
        self.width, self.height = width, height
        self.drift = drift

    def frame(self, view: View) -> Frame:
        key = (self.width, self.height, self.drift, view)
        frame = _CACHE.get(key)
        if frame is None:
            frame = np.asarray(draw(self.layout, view), dtype=np.uint8)
            if self.drift is not None:
                frame = _apply_drift(frame, self.drift)
            frame.flags.writeable = False
            _CACHE.put(key, frame)
        return frame

    def read_text(self, view: View, region: Region) -> str:
        return read_text(self.layout, view, region)


def _apply_drift(frame: Frame, seed: int) -> Frame:
    dx, dy, noise = _drift_pattern(frame.shape[1], frame.shape[0], seed)
    shifted = np.roll(frame, (dy, dx), axis=(0, 1))
    drifted: Frame = np.clip(shifted.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    return drifted


@functools.lru_cache(maxsize=8)
def _drift_pattern(width: int, height: int, seed: int) -> tuple[int, int, np.ndarray]:
    rng = np.random.default_rng(seed)
    dx, dy = (int(v) for v in rng.integers(-1, 2, size=2))
    noise = rng.integers(-3, 4, size=(height, width, 1), dtype=np.int16)
    return dx, dy, noise


# -- drawing ---------------------------------------------------------------------------


def draw(layout: Layout, view: View) -> Image.Image:
    """The view as an RGB image, uncached."""
    if view.screen == "rebooting":
        return _draw_rebooting(layout)
    if view.screen == "desktop":
        return _draw_desktop(layout)
    img = Image.new("RGB", (layout.width, layout.height), BACKGROUND)
    d = ImageDraw.Draw(img)
    d.rectangle(_box(layout.title_bar), fill=TITLE_BAR)
    d.text(
        (14, layout.title_bar.height // 2),
        f"{APP_NAME} — {SCREEN_TITLES[view.screen]}",
        fill=(255, 255, 255),
        font=_font(16, bold=True),
        anchor="lm",
    )
    for w in layout.screens[view.screen]:
        _draw_widget(d, w, view)
    for i, (kind, message) in enumerate(view.dialogs):
        img = img.point(_DIM_LUT)
        d = ImageDraw.Draw(img)
        top = i == len(view.dialogs) - 1
        _draw_dialog(d, layout, kind, message, hover=top and view.hover == "ok")
    return img


def _box(r: Region) -> tuple[int, int, int, int]:
    return (r.left, r.top, r.left + r.width - 1, r.top + r.height - 1)


def _mid(r: Region) -> int:
    return r.top + r.height // 2


def _draw_widget(d: ImageDraw.ImageDraw, w: Widget, view: View) -> None:
    r = w.rect
    if w.kind == "badge":
        d.rounded_rectangle(_box(r), radius=6, fill=SCREEN_BADGES[view.screen])
    elif w.kind == "heading":
        d.text((r.left, _mid(r)), w.text, fill=TEXT, font=_font(26, bold=True), anchor="lm")
    elif w.kind == "caption":
        d.text((r.left, _mid(r)), w.text, fill=MUTED, font=_font(15), anchor="lm")
    elif w.kind == "label":
        color = ERROR_TEXT if w.name == "error" else TEXT
        for i, line in enumerate(view.text(w.name).split("\n")):
            y = r.top + i * LINE_HEIGHT + LINE_HEIGHT // 2
            d.text((r.left, y), line, fill=color, font=_font(15), anchor="lm")
    elif w.kind == "field":
        focused = view.focus == w.name
        d.rectangle(_box(r), fill=FIELD, outline=FOCUS if focused else FIELD_BORDER,
                    width=2 if focused else 1)
        value = view.value(w.name)
        font = _font(15)
        end = r.left + 8 + int(font.getlength(value))
        if focused and view.selected and value:
            d.rectangle((r.left + 6, r.top + 6, end + 1, r.top + r.height - 7), fill=SELECTION)
            d.text((r.left + 8, _mid(r)), value, fill=(255, 255, 255), font=font, anchor="lm")
        else:
            d.text((r.left + 8, _mid(r)), value, fill=TEXT, font=font, anchor="lm")
            if focused:
                d.line((end + 1, r.top + 7, end + 1, r.top + r.height - 8), fill=TEXT)
    elif w.kind == "button":
        _draw_button(d, w, hover=view.hover == w.name and not view.dialogs)


def _ink(background: RGB) -> RGB:
    r, g, b = background
    return TEXT if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def _draw_button(d: ImageDraw.ImageDraw, w: Widget, *, hover: bool) -> None:
    r = w.rect
    # Hover only recolours the outline: templates of the button still match, while the
    # responsiveness probe sees the change.
    d.rounded_rectangle(_box(r), radius=4, fill=BUTTON, outline=FOCUS if hover else BUTTON_BORDER)
    d.text(r.center, w.text, fill=TEXT, font=_font(15), anchor="mm")


def _draw_dialog(
    d: ImageDraw.ImageDraw, layout: Layout, kind: str, message: str, *, hover: bool
) -> None:
    spec = DIALOGS[kind]
    box, strip = layout.dialog, layout.dialog_title
    d.rectangle(_box(box), fill=(250, 250, 250), outline=(70, 70, 70))
    d.rectangle(_box(strip), fill=spec.color)
    ink = _ink(spec.color)
    cx, cy = strip.left + 20, _mid(strip)
    d.ellipse((cx - 11, cy - 11, cx + 11, cy + 11), fill=ink)
    d.text((cx, cy), spec.icon, fill=spec.color, font=_font(15, bold=True), anchor="mm")
    d.text((strip.left + 40, cy), spec.title, fill=ink, font=_font(16, bold=True), anchor="lm")
    font = _font(15)
    msg = layout.dialog_message
    for i, line in enumerate(_wrap(message, font, msg.width)[: msg.height // 22]):
        d.text((msg.left, msg.top + 11 + 22 * i), line, fill=TEXT, font=font, anchor="lm")
    _draw_button(d, layout.dialog_ok, hover=hover)


def _wrap(text: str, font: Font, width: int) -> list[str]:
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and font.getlength(candidate) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return [*lines, line] if line else lines


def _draw_desktop(layout: Layout) -> Image.Image:
    img = Image.new("RGB", (layout.width, layout.height), DESKTOP)
    d = ImageDraw.Draw(img)
    colors: dict[str, RGB] = {
        "simehr": (255, 255, 255),
        "documents": (240, 200, 80),
        "recycle_bin": (200, 210, 220),
    }
    for icon in layout.icons:
        r = icon.rect
        cx = r.left + r.width // 2
        d.rounded_rectangle((cx - 24, r.top + 6, cx + 24, r.top + 54), radius=6,
                            fill=colors[icon.name], outline=(20, 40, 40))
        if icon.name == "simehr":  # a red cross: the clinic app
            d.rectangle((cx - 5, r.top + 14, cx + 5, r.top + 46), fill=(200, 30, 40))
            d.rectangle((cx - 16, r.top + 25, cx + 16, r.top + 35), fill=(200, 30, 40))
        d.text((cx, r.top + 74), icon.text, fill=(255, 255, 255), font=_font(13), anchor="mm")
    return img


def _draw_rebooting(layout: Layout) -> Image.Image:
    img = Image.new("RGB", (layout.width, layout.height), (0, 0, 0))
    d = ImageDraw.Draw(img)
    r = layout.reboot_logo
    half = r.width // 2
    for i, color in enumerate(((90, 160, 240), (120, 190, 250), (120, 190, 250), (90, 160, 240))):
        x, y = r.left + (i % 2) * half, r.top + (i // 2) * half
        d.rectangle((x + 2, y + 2, x + half - 3, y + half - 3), fill=color)
    t = layout.reboot_text
    d.text(t.center, "Restarting…", fill=(200, 200, 200), font=_font(18), anchor="mm")
    return img


# -- simulated OCR ---------------------------------------------------------------------


def read_text(layout: Layout, view: View, region: Region) -> str:
    """The text of every visible widget or label intersecting ``region``, top to bottom."""
    items: list[tuple[Region, str]] = []
    if view.screen == "rebooting":
        items.append((layout.reboot_text, "Restarting…"))
    elif view.screen == "desktop":
        items.extend((icon.rect, icon.text) for icon in layout.icons)
    else:
        items.append((layout.title_bar, f"{APP_NAME} — {SCREEN_TITLES[view.screen]}"))
        for w in layout.screens[view.screen]:
            if w.kind == "field":
                items.append((w.rect, view.value(w.name)))
            elif w.kind == "label":
                for i, line in enumerate(view.text(w.name).split("\n")):
                    rect = Region(w.rect.left, w.rect.top + i * LINE_HEIGHT, w.rect.width,
                                  LINE_HEIGHT)
                    items.append((rect, line))
            else:
                items.append((w.rect, w.text))
        for kind, message in view.dialogs:
            items = [(r, t) for r, t in items if not _inside(r, layout.dialog)]
            items += [
                (layout.dialog_title, DIALOGS[kind].title),
                (layout.dialog_message, message),
                (layout.dialog_ok.rect, "OK"),
            ]
    hits = [(r.top, r.left, t) for r, t in items if t and intersects(r, region)]
    return "\n".join(t for _, _, t in sorted(hits))


def _inside(inner: Region, outer: Region) -> bool:
    return (
        inner.left >= outer.left
        and inner.top >= outer.top
        and inner.left + inner.width <= outer.left + outer.width
        and inner.top + inner.height <= outer.top + outer.height
    )
