"""The pack archive: the file ``deskfleet pack build`` makes, the orchestrator stores and agents install.

A zip whose entries are the pack's files as they lie in its directory (``pack.toml`` at the
top), in name order, each with the same fixed timestamp and mode and stored uncompressed,
plus ``deskfleet-pack.json``: what the pack offers, written by the build (its name and
version, its requirements, and its automations' specs — what submit checks input against).
The same files always make the same bytes, so the archive's sha256 names its content: the
orchestrator refuses a second archive under a name and version already published, and an
agent refuses a download whose hash is not the one it was told.

Both sides read archives, so this module sits in the base layer: the orchestrator reads the
manifest with ``tomllib`` and the build's metadata, never the pack's code (it runs none of
it); agents extract it (:func:`extract`) and load it as a directory pack.
"""

from __future__ import annotations

import hashlib
import io
import re
import tomllib
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import orjson

from .errors import InvalidInput

#: the build's metadata, beside pack.toml
META = "deskfleet-pack.json"
MANIFEST = "pack.toml"
FORMAT = 1
#: every entry's timestamp: the earliest a zip can say (reproducible builds)
FIXED_TIME = (1980, 1, 1, 0, 0, 0)
MAX_FILES = 20_000
NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
#: a version as it may appear in a URL path and a directory name
VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class ArchiveInfo:
    """What an archive says about itself, checked."""

    name: str
    version: str
    sha256: str
    size: int
    files: int
    manifest: dict[str, Any]  # pack.toml, as TOML
    automations: list[dict[str, Any]] = field(default_factory=list)  # AutomationAd's fields
    requires: list[str] = field(default_factory=list)


def write(files: Iterable[tuple[str, bytes, bool]]) -> bytes:
    """A reproducible zip of ``(name, data, executable)``: sorted, fixed times and modes, stored."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for name, data, executable in sorted(files, key=lambda f: f[0]):
            info = zipfile.ZipInfo(name, date_time=FIXED_TIME)
            info.create_system = 3  # unix, whatever system built it
            info.external_attr = (0o100755 if executable else 0o100644) << 16
            info.compress_type = zipfile.ZIP_STORED
            z.writestr(info, data)
    return out.getvalue()


def meta(name: str, version: str, automations: list[dict[str, Any]], requires: list[str]) -> bytes:
    return orjson.dumps({"format": FORMAT, "name": name, "version": version, "requires": requires,
                         "automations": automations}, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2)


def _unsafe(name: str) -> bool:
    p = PurePosixPath(name)
    return name.startswith("/") or "\\" in name or ".." in p.parts or (len(name) > 1 and name[1] == ":")


def read(data: bytes, *, expected_sha256: str | None = None) -> ArchiveInfo:
    """The archive's name, version and offer, or InvalidInput saying what is wrong with it
    (not a zip, truncated or corrupt, a path that escapes, no manifest, a manifest and
    metadata that disagree, a hash that is not the one expected)."""
    digest = sha256(data)
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise InvalidInput(f"the archive's sha256 is {digest}, not {expected_sha256}: it changed on the way "
                           "(truncated or corrupted); upload it again", field="sha256")
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise InvalidInput(f"not a pack archive ({exc}): make one with `deskfleet pack build`", field="archive") from None
    with z:
        names = z.namelist()
        if len(names) > MAX_FILES:
            raise InvalidInput(f"the archive holds {len(names)} files; at most {MAX_FILES}", field="archive")
        if bad := [n for n in names if _unsafe(n)]:
            raise InvalidInput(f"the archive has a path that leaves its directory: {bad[0]!r}", field="archive")
        try:
            broken = z.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise InvalidInput(f"the archive is corrupt ({exc}): build it again", field="archive") from None
        if broken is not None:
            raise InvalidInput(f"the archive is corrupt: {broken} fails its checksum; build it again", field="archive")
        if MANIFEST not in names:
            raise InvalidInput(f"the archive has no {MANIFEST} at its top: is it a pack? (deskfleet pack build DIR)",
                               field="archive")
        if META not in names:
            raise InvalidInput(f"the archive has no {META}: make it with `deskfleet pack build`, which writes what "
                               "the pack offers", field="archive")
        try:
            manifest = tomllib.loads(z.read(MANIFEST).decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise InvalidInput(f"the archive's {MANIFEST} is not valid TOML: {exc}", field="archive") from None
        try:
            info = orjson.loads(z.read(META))
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"the archive's {META} is not JSON: {exc}", field="archive") from None
    section: dict[str, Any] = manifest["pack"] if isinstance(manifest.get("pack"), dict) else {}
    name, version = section.get("name"), section.get("version")
    if not isinstance(name, str) or not NAME.match(name) or len(name) > 64:
        raise InvalidInput(f"the archive's {MANIFEST} has no valid [pack] name ({name!r})", field="archive")
    if not isinstance(version, str) or not VERSION.match(version) or len(version) > 64:
        raise InvalidInput(f"the archive's {MANIFEST} has no usable [pack] version ({version!r}): letters, digits, "
                           "'.', '_', '+' and '-'", field="archive")
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise InvalidInput(f"the archive's {META} is not format {FORMAT}: build it with this deskfleet", field="archive")
    if (info.get("name"), info.get("version")) != (name, version):
        raise InvalidInput(f"the archive's {META} says {info.get('name')} {info.get('version')} but its {MANIFEST} "
                           f"says {name} {version}: build it again", field="archive")
    automations = info.get("automations")
    if not isinstance(automations, list) or not all(isinstance(a, dict) and isinstance(a.get("name"), str)
                                                    for a in automations):
        raise InvalidInput(f"the archive's {META} lists no automations as deskfleet pack build writes them",
                           field="archive")
    requires = [str(r) for r in info.get("requires") or []]
    return ArchiveInfo(name=name, version=version, sha256=digest, size=len(data), files=len(names),
                       manifest=manifest, automations=automations, requires=requires)


def extract(data: bytes, dest: Path) -> ArchiveInfo:
    """Check the archive (:func:`read`) and write its files under ``dest`` (created)."""
    info = read(data)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for entry in z.infolist():
            target = (root / entry.filename).resolve()
            if root not in target.parents and target != root:
                raise InvalidInput(f"the archive has a path that leaves its directory: {entry.filename!r}")
            if entry.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(entry))
            if (entry.external_attr >> 16) & 0o111:
                target.chmod(0o755)
    return info


#: the well-known label under which a machine says which version of a pack it runs
#: (``deskfleet.pack/simehr: 2.0.0``): set from its agent's report (protocol 6), matched by
#: runs that pin a pack's version, as any label is
LABEL_PREFIX = "deskfleet.pack/"


def label(pack: str) -> str:
    return f"{LABEL_PREFIX}{pack}"


def pack_labels(labels: dict[str, str] | None, packs: dict[str, str]) -> dict[str, str]:
    """``labels`` with the well-known pack labels replaced by those of ``packs``."""
    kept = {k: v for k, v in (labels or {}).items() if not k.startswith(LABEL_PREFIX)}
    return {**kept, **{label(name): version for name, version in packs.items()}}
