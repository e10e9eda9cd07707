"""Start (and stop) KeePassXC the way this pack's model expects it: the pack's ``[app] command``.

    python launch.py --data DIR --machine NAME [--lock-after SECONDS]
    python launch.py stop --data DIR --machine NAME

Each machine gets a private home, ``DIR/home/NAME`` (HOME, XDG_* and TMPDIR point into it,
so nothing is read from or written to the agent's own home), and a fresh copy of the
configuration in ``config/`` before every start: KeePassXC rewrites its configuration file
at start and at exit, so a copy kept from an earlier run may have drifted. ``keepassxc.ini``
holds the settings (no single-instance socket, autosave after every change, reload on
external change, idle lock after ``--lock-after`` seconds, English, light theme, no expired-
entries view on unlock); ``local.ini`` holds the window layout the model was recorded with
(splitters, list columns). The window is pinned to 1024x768 at (0, 0) with ``-geometry``.

The database is ``DIR/keepassxc.kdbx`` (the automations find it there too, as
``ctx.data_dir / "keepassxc.kdbx"``): one file for every machine of the host (see README.md, "One database, several desktops"). It must exist:
this launcher never creates a password database (create it with ``keepassxc-cli db-create``).

The launcher replaces itself with KeePassXC (``exec``), so the process the agent started is
KeePassXC itself; its pid is written to the private home for ``stop``, which SIGKILLs it
(see README.md: why not SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "config"
#: seconds of no input after which KeePassXC locks the database (the pack's [session] idle_timeout)
LOCK_AFTER = 300
WINDOW = "1024x768"  # the size the model was recorded at (model.json's "window"), placed at --at
#: environment variables that would change how Qt draws the window (and so break the model)
QT_LOOKS = ("QT_SCALE_FACTOR", "QT_SCREEN_SCALE_FACTORS", "QT_FONT_DPI", "QT_STYLE_OVERRIDE",
            "QT_QPA_PLATFORMTHEME", "QT_AUTO_SCREEN_SCALE_FACTOR", "QT_ENABLE_HIGHDPI_SCALING")


def home_of(data: Path, machine: str) -> Path:
    return data / "home" / machine


def prepare(home: Path, lock_after: float, *, theme: str = "light", scale: float = 1.0,
            font_dpi: int | None = None) -> dict[str, str]:
    """A private home with a fresh configuration; the environment KeePassXC runs in. ``theme``,
    ``scale`` and ``font_dpi`` give the machine another look than the model was recorded with
    (a dark theme; Qt's scale factor, as a high-DPI display or an RDP client's scaling gives
    it; larger fonts in a window of the same size, which lays the window out anew)."""
    dirs = {name: home / sub for name, sub in (("config", ".config"), ("cache", ".cache"),
                                               ("share", ".local/share"), ("runtime", "run"), ("tmp", "tmp"))}
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    dirs["runtime"].chmod(0o700)
    text = (CONFIG / "keepassxc.ini").read_text().replace("{lock_after}", str(round(lock_after)))
    text = text.replace("ApplicationTheme=light", f"ApplicationTheme={theme}")
    (home / "keepassxc.ini").write_text(text)
    shutil.copyfile(CONFIG / "local.ini", home / "local.ini")
    env = {k: v for k, v in os.environ.items() if k not in QT_LOOKS}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(dirs["config"]), XDG_CACHE_HOME=str(dirs["cache"]),
               XDG_DATA_HOME=str(dirs["share"]), XDG_RUNTIME_DIR=str(dirs["runtime"]), TMPDIR=str(dirs["tmp"]),
               QT_QPA_PLATFORM="xcb", LANGUAGE="en")
    if scale != 1.0:
        env["QT_SCALE_FACTOR"] = f"{scale:g}"
    if font_dpi is not None:
        env["QT_FONT_DPI"] = str(font_dpi)
    return env


def start(args: argparse.Namespace) -> int:
    data = Path(args.data).resolve()
    database = data / "keepassxc.kdbx"
    if not database.is_file():
        print(f"launch.py: no database at {database}: create it first "
              f"(keepassxc-cli db-create -p {database}); this launcher never creates one", file=sys.stderr)
        return 2
    binary = shutil.which("keepassxc")
    if binary is None:
        print("launch.py: keepassxc is not installed (Debian/Ubuntu: apt-get install keepassxc)", file=sys.stderr)
        return 2
    home = home_of(data, args.machine)
    env = prepare(home, args.lock_after, theme=args.theme, scale=args.scale, font_dpi=args.font_dpi)
    (home / "keepassxc.pid").write_text(f"{os.getpid()}\n")  # exec keeps the pid
    argv = [binary, "--config", str(home / "keepassxc.ini"), "--localconfig", str(home / "local.ini"),
            "-geometry", f"{WINDOW}+{args.at[0]}+{args.at[1]}", str(database)]
    os.execve(binary, argv, env)
    return 1  # not reached


def stop(args: argparse.Namespace) -> int:
    """SIGKILL this machine's KeePassXC (found by the pid its launcher wrote)."""
    home = home_of(Path(args.data).resolve(), args.machine)
    try:
        pid = int((home / "keepassxc.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return 0  # not running
    if str(home / "keepassxc.ini").encode() not in cmdline:
        return 0  # the pid was reused by another process: ours is gone
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return 0


def _point(text: str) -> tuple[int, int]:
    x, sep, y = text.partition(",")
    if not (sep and x.strip().isdigit() and y.strip().isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not X,Y (e.g. 300,200)")
    return int(x), int(y)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    stopping = bool(argv) and argv[0] == "stop"
    parser = argparse.ArgumentParser(prog="launch.py", description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--data", required=True, help="the pack's data directory ({data})")
    parser.add_argument("--machine", required=True, help="the machine's name ({machine})")
    if not stopping:
        parser.add_argument("--lock-after", type=float, default=LOCK_AFTER,
                            help=f"seconds of no input before the database locks itself (default {LOCK_AFTER})")
        parser.add_argument("--at", type=_point, default=(0, 0), metavar="X,Y",
                            help="where the window's top-left corner goes on the screen (default 0,0)")
        parser.add_argument("--theme", choices=("light", "dark", "classic"), default="light",
                            help="KeePassXC's theme (the model was recorded in light)")
        parser.add_argument("--scale", type=float, default=1.0,
                            help="Qt's scale factor, e.g. 1.25 (the model was recorded at 1)")
        parser.add_argument("--font-dpi", type=int, default=None,
                            help="the DPI Qt draws fonts at, e.g. 110 for fonts 1.15 times as large in a window "
                                 "of the same size (the model was recorded at 96)")
    args = parser.parse_args(argv[1:] if stopping else argv)
    return stop(args) if stopping else start(args)


if __name__ == "__main__":
    sys.exit(main())
