"""Clicking into a text field so that what is typed next arrives.

There is no window manager on the robots' displays: the keyboard focus is wherever the last
click put it, and after a dialog closes it is nowhere (the root window). A click on the field
gives it back — once KeePassXC has handled the click. deskfleet's X11 typing (pynput) sends
characters to whatever has the X focus at that moment, so a character typed before the click
was handled is lost (seen here: 11 of 12 password characters arrived, right after the About
box was closed). So this waits for the visible sign that the click was handled — the field's
frame turns KeePassXC's focus green — before anything is typed. What is typed is checked
afterwards anyway (OCR read-back, or the dots of a masked field).
"""

from __future__ import annotations

import asyncio

from deskfleet import Desktop, Region

#: seconds to wait for the focus frame (typing proceeds without it: the read-back decides)
FOCUS_WAIT = 1.0


def _green(pixel: tuple[int, int, int]) -> bool:
    r, g, b = (int(v) for v in pixel)
    return g > r + 25 and g > b + 40  # KeePassXC's light theme: (75, 119, 28)


async def click_into(desktop: Desktop, field: Region, frame_at: tuple[int, int] | None = None) -> bool:
    """Click ``field`` and wait until its frame (the pixel ``frame_at``, by default its left
    border halfway down) shows the focus. Whether it did."""
    x, y = frame_at or (field.left, field.top + field.height // 2)
    await desktop.click(*field.center)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + FOCUS_WAIT
    while True:
        shot = await desktop.screenshot(Region(x, y, 1, 1))
        r, g, b = (int(v) for v in shot[0, 0])
        if _green((r, g, b)):
            return True
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.02)
