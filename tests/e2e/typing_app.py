"""A tiny Tk app for the typing tests: its first window closes and a second one takes the text.

    python typing_app.py OUT_DIR

The first top-level window ("first") has a button "Next" at (60, 40) of the screen; clicking
it (or pressing Return there) destroys that window and opens "second" at (200, 200): three
entries, one above the other, 380 px wide —

- ``plain`` (focused when the window opens), left edge at x=220, y=220..250;
- ``secret`` (shows dots), y=280..310;
- ``stubborn`` (takes no input at all: a field that swallows what is typed), y=340..370.

F2 in the second window opens a dialog ("dialog", transient for it) with one entry, focused;
F3 hides the second window (the app then shows no window at all).
Whatever each entry holds is written to OUT_DIR/<name>.txt (UTF-8) on every change, so a
test knows exactly what arrived. Control-a selects all in an entry (Tk's own binding moves
to the line start), as in DemoEHR.
"""

from __future__ import annotations

import sys
import tkinter as tk
from pathlib import Path

FIRST = (40, 20, 240, 120)  # left, top, width, height of the first window
SECOND = (200, 200, 420, 190)
NEXT = (60 + 40, 20 + 20)  # centre of the Next button, in screen coordinates
DIALOG = (300, 450, 300, 60)  # F2 in the second window opens a dialog (transient for it) with an entry
FIELDS = {"plain": (220, 220, 380, 30), "secret": (220, 280, 380, 30), "stubborn": (220, 340, 380, 30)}
FONT = ("DejaVu Sans", 16)


def main(out: Path) -> None:
    root = tk.Tk()
    root.withdraw()  # the app's windows are top-levels that come and go
    for seq in ("<Control-a>", "<Control-A>"):
        root.bind_class("Entry", seq, lambda e: (e.widget.select_range(0, "end"), e.widget.icursor("end"), "break")[-1])

    first = tk.Toplevel(root, bg="#d0d0d0")
    first.title("first")
    first.geometry("{2}x{3}+{0}+{1}".format(*FIRST))
    button = tk.Button(first, text="Next", font=FONT)
    button.place(x=NEXT[0] - FIRST[0] - 40, y=NEXT[1] - FIRST[1] - 20, width=80, height=40)

    def second() -> None:
        first.destroy()
        win = tk.Toplevel(root, bg="#e8e8e8")
        win.title("second")
        win.geometry("{2}x{3}+{0}+{1}".format(*SECOND))
        entries = {}
        for name, (left, top, width, height) in FIELDS.items():
            var = tk.StringVar(win)
            path = out / f"{name}.txt"
            path.write_text("", encoding="utf-8")
            var.trace_add("write", lambda *_, var=var, path=path: path.write_text(var.get(), encoding="utf-8"))
            entry = tk.Entry(win, textvariable=var, font=FONT, relief="solid", bd=1, highlightthickness=0,
                             bg="#ffffff", fg="#000000", show="•" if name == "secret" else "")
            if name == "stubborn":
                entry.configure(validate="key", validatecommand=lambda: False)
            entry.place(x=left - SECOND[0], y=top - SECOND[1], width=width, height=height)
            entries[name] = entry
        entries["plain"].focus_set()

        def dialog(_: object = None) -> None:  # F2: a dialog of the second window, with an entry
            box = tk.Toplevel(win, bg="#f0f0d0")
            box.title("dialog")
            box.transient(win)
            box.geometry("{2}x{3}+{0}+{1}".format(*DIALOG))
            var = tk.StringVar(box)
            path = out / "dialog.txt"
            path.write_text("", encoding="utf-8")
            var.trace_add("write", lambda *_: path.write_text(var.get(), encoding="utf-8"))
            entry = tk.Entry(box, textvariable=var, font=FONT)
            entry.place(x=10, y=10, width=DIALOG[2] - 20, height=30)
            entry.focus_set()
            (out / "dialog").write_text("open")

        win.bind("<F2>", dialog)
        win.bind("<F3>", lambda e: (win.withdraw(), (out / "hidden").write_text("yes")))
        (out / "second").write_text("open")

    button.configure(command=second)
    button.bind("<Return>", lambda e: second())
    button.focus_set()
    root.mainloop()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
