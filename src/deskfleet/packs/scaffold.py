"""``deskfleet pack new NAME``: a new pack that works out of the box and passes its own tests.

The scaffold is a complete, small pack for a tiny application shipped inside it
(``app.py``, a Tk inventory: a login, a list whose rows change, a form and its dialogs,
items kept in one SQLite file under ``{data}`` that every desktop shares), with its recorded
model (``model/``, labelled screenshots included, so ``deskfleet model test`` works),
playbooks, a probe, an automation ``NAME.add_item`` with a reconcile check, tests that run
``pack check``, ``model test`` and ``pack try`` on Xvfb, and a README saying which files to
change to drive your own application.

Its files are package data in ``template/``. A file whose name ends in ``.tmpl`` is
rendered — ``{{name}}`` becomes the pack's name and the suffix is dropped (the suffix also
keeps the template's Python files from being imported, collected or linted as deskfleet's
own); every other file is copied as it is. The model is recorded from the template's app by
:mod:`.template_model`: run it again whenever ``app.py.tmpl`` changes.

The pack is written into a temporary directory beside the target and renamed into place,
so a refusal or a failure leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import re
import shutil
from dataclasses import dataclass
from importlib.abc import Traversable
from pathlib import Path

from .loader import PackError
from .manifest import NAME

SUFFIX = ".tmpl"
PLACEHOLDER = "{{name}}"
#: the scaffold's one automation, without the pack's name in front
AUTOMATION = "add_item"
#: an input the scaffold's automation accepts
EXAMPLE_INPUT = '{"name": "Widget", "quantity": 3}'


def template() -> Traversable:
    """The scaffold's files (package data)."""
    return importlib.resources.files(__package__) / "template"


@dataclass(frozen=True, slots=True)
class NewPack:
    name: str
    path: Path
    files: list[str]  # relative to ``path``, in the order written

    @property
    def automation(self) -> str:
        return f"{self.name}.{AUTOMATION}"


def check_name(name: str) -> None:
    """PackError (one line) unless ``name`` is usable as a pack's name."""
    if not re.fullmatch(NAME, name) or len(name) > 64:
        raise PackError(f"{name!r} is not a pack name: lower-case letters, digits, '.', '_' and '-', starting "
                        "with a letter or digit, at most 64 characters (e.g. acme-erp)")


def new_pack(name: str, parent: Path | str = ".") -> NewPack:
    """Write the scaffold for pack ``name`` into ``parent/name``; PackError (one line, nothing
    written) for a bad name, or a target that exists and is not an empty directory."""
    check_name(name)
    parent = Path(parent)
    target = parent / name
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise PackError(f"{target} exists and is not a directory: choose another name or --dir")
        if any(target.iterdir()):
            raise PackError(f"{target} exists and is not empty: choose another name or --dir "
                            "(nothing was written)")
    if parent.exists() and not parent.is_dir():
        raise PackError(f"{parent} is not a directory")
    parent.mkdir(parents=True, exist_ok=True)
    staging = parent / f".{name}.new-{os.getpid()}"
    try:
        files = render(name, staging)
        _move_into_place(staging, target)
    except OSError as exc:
        raise PackError(f"cannot write the pack into {target}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return NewPack(name, target, files)


def render(name: str, out: Path, source: Traversable | None = None) -> list[str]:
    """Write the scaffold's files for pack ``name`` into ``out`` (created); returns them."""
    written: list[str] = []

    def walk(folder: Traversable, into: Path) -> None:
        into.mkdir(parents=True, exist_ok=True)
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            if entry.name.startswith(".") or entry.name == "__pycache__":
                continue
            if entry.is_dir():
                walk(entry, into / entry.name)
            elif entry.name.endswith(SUFFIX):
                target = into / entry.name[: -len(SUFFIX)]
                target.write_text(entry.read_text(encoding="utf-8").replace(PLACEHOLDER, name), encoding="utf-8")
                written.append(str(target.relative_to(out)))
            else:
                target = into / entry.name
                target.write_bytes(entry.read_bytes())
                written.append(str(target.relative_to(out)))

    walk(source or template(), out)
    return written


def _move_into_place(staging: Path, target: Path) -> None:
    """Rename the finished pack to its name (over an empty directory, if one is there)."""
    if target.is_dir():
        with contextlib.suppress(OSError):
            target.rmdir()  # empty (checked): rename(2) replaces it on POSIX, not on Windows
    staging.rename(target)
