"""``deskfleet pack build``: a pack's directory as a reproducible archive (:mod:`deskfleet.packfile`).

The archive holds the pack's files — not caches (``__pycache__``, ``*.pyc``), version
control or virtual environments, nor hidden files — and what the pack offers, read by
loading the pack *from the archive's own files* (in a scratch directory): a pack that only
loads where it was written (an import of a file outside it, a package-relative import of an
installed package) is refused here, not on the fleet's machines.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import packfile
from ..errors import ConfigError
from .loader import MANIFEST, PackError, load_pack

#: directories never packed
SKIP_DIRS = frozenset({"__pycache__", "node_modules", "venv", "build", "dist"})
SKIP_SUFFIXES = (".pyc", ".pyo")


@dataclass(frozen=True, slots=True)
class Built:
    path: Path
    name: str
    version: str
    sha256: str
    size: int
    files: int
    automations: list[str]


def pack_files(root: Path) -> list[tuple[str, bytes, bool]]:
    """The files of the pack in ``root`` as they go into its archive: (name, data, executable)."""
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        for f in sorted(files):
            if f.startswith(".") or f.endswith(SKIP_SUFFIXES) or f == packfile.META:
                continue
            path = Path(folder, f)
            if not path.is_file():
                continue
            name = path.relative_to(root).as_posix()
            out.append((name, path.read_bytes(), os.access(path, os.X_OK)))
    if len(out) > packfile.MAX_FILES:
        raise ConfigError(f"{root} holds {len(out)} files; a pack archive holds at most {packfile.MAX_FILES}")
    return out


def build(ref: str | os.PathLike[str], out_dir: Path) -> Built:
    """Build the pack ``ref`` (its directory, or an installed pack's name) into
    ``out_dir/<name>-<version>.zip``."""
    pack = load_pack(ref)
    root = pack.directory
    if root is None or not (root / MANIFEST).is_file():
        raise PackError(f"pack {pack.where} has no directory on disk to build from")
    files = pack_files(root)
    with tempfile.TemporaryDirectory(prefix="deskfleet-build-") as scratch:
        copy = Path(scratch) / pack.name
        packfile.extract(packfile.write([*files, (packfile.META, packfile.meta(
            pack.name, pack.version, [], list(pack.manifest.pack.requires)), False)]), copy)
        try:
            alone = load_pack(copy)
        except PackError as exc:
            raise PackError(f"pack {pack.where} does not load from its own files, as an agent would load it: "
                            f"{exc} (a pack must not import files outside its directory; an installed "
                            "package's pack whose module uses relative imports: publish a directory that "
                            "holds the package)") from None
        automations = [asdict(s) for s in alone.registry.specs()]
    data = packfile.write([*files, (packfile.META, packfile.meta(
        pack.name, pack.version, automations, list(pack.manifest.pack.requires)), False)])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{pack.name}-{pack.version}.zip"
    path.write_bytes(data)
    return Built(path, pack.name, pack.version, packfile.sha256(data), len(data), len(files),
                 sorted(f"{a['name']}@{a['version']}" for a in automations))
