"""``keepassxc-cli``, for what has no screen: creating the shared database, and counting its
entries from outside (the demo's and the tests' double-effect check). Automations never use
it: they drive the application.

Passwords go to the CLI on stdin, never in its arguments. ``keepassxc-cli`` writes
``~/.config/keepassxc/keepassxc.ini`` even for ``--version``, so it runs with a throw-away
configuration directory.
"""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import tempfile
from pathlib import Path

TIMEOUT = 30.0


class CliError(RuntimeError):
    """keepassxc-cli failed; the message says how (never the password)."""


def _run(args: list[str], stdin: str) -> str:
    binary = shutil.which("keepassxc-cli")
    if binary is None:
        raise CliError("keepassxc-cli is not installed (Debian/Ubuntu: apt-get install keepassxc)")
    with tempfile.TemporaryDirectory(prefix="kxcli-") as home:
        env = {"HOME": home, "XDG_CONFIG_HOME": home, "XDG_CACHE_HOME": home, "PATH": "/usr/bin:/bin"}
        done = subprocess.run([binary, *args], input=stdin, capture_output=True, text=True, env=env,
                              timeout=TIMEOUT, check=False)
    if done.returncode != 0:
        raise CliError(f"keepassxc-cli {args[0]} failed (status {done.returncode}): "
                       f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'no message'}")
    return done.stdout


def create(database: Path, password: str) -> None:
    """A new, empty database protected by ``password`` (refused if the file exists)."""
    if database.exists():
        raise CliError(f"{database} exists already")
    database.parent.mkdir(parents=True, exist_ok=True)
    _run(["db-create", "-q", "-p", str(database)], f"{password}\n{password}\n")


def add(database: Path, password: str, title: str, *, username: str = "", url: str = "", notes: str = "",
        entry_password: str | None = None) -> None:
    """One entry, written by the CLI (a writer other than the robots: tests use it)."""
    args = ["add", "-q", "-u", username, "--url", url, "--notes", notes]
    stdin = f"{password}\n"
    if entry_password is not None:
        args.append("-p")
        stdin += f"{entry_password}\n"
    _run([*args, str(database), title], stdin)


def entries(database: Path, password: str) -> list[dict[str, str]]:
    """Every entry outside the recycle bin, as the CSV export gives it (Group, Title, Username,
    Password, URL, Notes, …)."""
    text = _run(["export", "-q", "-f", "csv", str(database)], f"{password}\n")
    rows = list(csv.DictReader(io.StringIO(text)))
    return [r for r in rows if "Recycle Bin" not in (r.get("Group") or "")]


def titles(database: Path, password: str) -> list[str]:
    return [r.get("Title", "") for r in entries(database, password)]
