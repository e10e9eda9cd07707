"""Finding and loading packs: by path (a directory with ``pack.toml``) or by name (an
installed package registered under the entry-point group ``deskfleet.packs``).

Loading a pack reads its manifest, imports its module (a directory pack's module under a
private name, so two packs may both call theirs ``automations``), loads its recorded model,
and builds the :class:`~deskfleet.appmodel.AppModel` and the automation
:class:`~deskfleet.sdk.Registry` an agent runs. Everything a pack offers is found in its
module by what it is: automations (``@automation``), playbooks (``@playbook``), the probe
(``@probe``) and the session reader (``@session_reader``). What cannot work — a
playbook the manifest names that nobody wrote, a ready state the model does not have, a
module that does not import — is refused here with one line per problem; ``deskfleet pack
check`` reports the softer problems too. Robot Framework robots the manifest declares
(``[robot]``, :mod:`.robots`) are automations of the registry like the module's own; a pack
of robots alone needs no module.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
import sys
import traceback
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib.abc import Traversable
from pathlib import Path
from types import ModuleType
from typing import Any

from ..appmodel import AppModel, Playbook, Probe, SessionReader
from ..desktop.driver import AppCommand
from ..errors import ConfigError
from ..sdk import Automation, Registry
from ..vision.templates import TemplateLibrary
from .manifest import Manifest, parse_manifest
from .playbooks import BUILTIN, PROBE_ATTR, READER_ATTR, info
from .robots import robot_automations

GROUP = "deskfleet.packs"
MANIFEST = "pack.toml"


class PackError(ConfigError):
    """A pack that cannot be loaded; the message says what to fix, one line per problem."""


@dataclass(eq=False)
class Pack:
    """A loaded pack: its manifest, module, app model and automations."""

    manifest: Manifest
    root: Traversable  # the pack's directory (or its installed package's files)
    where: str  # how to name it in messages: the path, or "name (package)"
    module: ModuleType
    model: AppModel
    registry: Registry
    library: TemplateLibrary
    playbooks: dict[str, Playbook] = field(default_factory=dict)  # the module's own, by name
    package: str | None = None  # the installed package holding pack.toml; None for a directory

    @property
    def name(self) -> str:
        return self.manifest.pack.name

    @property
    def version(self) -> str:
        return self.manifest.pack.version

    @property
    def description(self) -> str:
        return self.manifest.pack.description

    @property
    def screen(self) -> tuple[int, int]:
        """The screen size the app expects: the manifest's, else the model's."""
        return self.manifest.app.screen or self.library.screen

    @property
    def directory(self) -> Path | None:
        """The pack's directory on disk (None for a pack inside a zip)."""
        return self.root if isinstance(self.root, Path) else _as_path(self.root)

    def app_command(self, *, machine: str, data: Path, display: str | None = None,
                    extra_args: Sequence[str] = (), log: Path | None = None) -> AppCommand:
        """How to start this pack's application on ``machine`` (placeholders filled in)."""
        app = self.manifest.app
        if not app.command:
            raise PackError(f"{self.where}: [app] command is empty: the agent cannot start the application "
                            "(give it, or start the app yourself and use --desktop local with [app] process/window)")
        data.mkdir(parents=True, exist_ok=True)
        values = {"python": sys.executable, "pack": str(self.directory or ""), "data": str(data.resolve()),
                  "machine": machine, "display": display or ""}

        def fill(text: str) -> str:
            return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), text)

        cwd = fill(app.cwd) if app.cwd else None
        return AppCommand(
            [fill(a) for a in app.command] + list(extra_args), env={k: fill(v) for k, v in app.env.items()},
            cwd=Path(cwd) if cwd else None, stop_grace=app.stop_grace, start_timeout=app.start_timeout, log=log,
            process=app.process or None, window=app.window or None,
            stop_command=[fill(a) for a in app.stop_command] or None,
        )

    def hook(self, which: str) -> Callable[..., Any] | None:
        """The callable a ``[hooks]`` entry names (``sim``, ``demo``, ``accounts``, ``update``),
        imported; None if none.

        ``module:callable``: ``module`` lies in the pack like ``[pack] module`` does (a file
        or package of a directory pack, a submodule of an installed one); an empty module
        (``:callable``) is the pack's module itself."""
        ref = getattr(self.manifest.hooks, which)
        if not ref:
            return None
        modname, _, attr = ref.partition(":")
        try:
            module = self.module if modname in ("", self.manifest.pack.module) else _import_in_pack(
                self.root, modname, self.name, self.where, self.package)
        except PackError:
            raise
        except Exception as exc:
            raise PackError(f"{self.where}: [hooks] {which} = {ref!r}: {modname} does not import: "
                            f"{type(exc).__name__}: {exc}") from None
        target = getattr(module, attr, None)
        if not callable(target):
            raise PackError(f"{self.where}: [hooks] {which} = {ref!r}: {modname or 'the module'} has no "
                            f"callable {attr!r}")
        return target  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"Pack({self.name!r} {self.version}, {self.where})"


# -- finding -------------------------------------------------------------------------------------


def installed_packs() -> dict[str, str]:
    """Packs installed as Python packages: name → the package holding ``pack.toml``."""
    return {ep.name: ep.value for ep in importlib.metadata.entry_points(group=GROUP)}


def load_pack(ref: str | os.PathLike[str]) -> Pack:
    """Load a pack by path (a directory with ``pack.toml``) or by installed name."""
    text = os.fspath(ref)
    path = Path(text).expanduser()
    if isinstance(ref, os.PathLike) or os.sep in text or text.startswith(".") or (path / MANIFEST).is_file():
        if not path.is_dir():
            raise PackError(f"pack {text}: no such directory")
        if not (path / MANIFEST).is_file():
            raise PackError(f"pack {text}: no {MANIFEST} in {path} (is this the pack's directory?)")
        return _load(path.resolve(), text, package=None)
    installed = installed_packs()
    if text not in installed:
        known = ", ".join(sorted(installed)) or "none"
        raise PackError(f"no pack {text!r}: not a directory with {MANIFEST}, and no installed pack of that "
                        f"name (installed: {known})")
    package = installed[text].partition(":")[0]
    try:
        root = importlib.resources.files(package)
    except (ImportError, TypeError) as exc:
        raise PackError(f"pack {text}: its package {package} does not import: {exc}") from None
    if not (root / MANIFEST).is_file():
        raise PackError(f"pack {text}: its package {package} holds no {MANIFEST}")
    return _load(root, f"{text} ({package})", package=package)


def load_packs(refs: Iterable[str | os.PathLike[str]]) -> list[Pack]:
    """Several packs for one agent: names and automations must not collide."""
    packs = [load_pack(r) for r in refs]
    seen: dict[str, Pack] = {}
    offered: dict[str, Pack] = {}
    for p in packs:
        if p.name in seen:
            raise PackError(f"two packs are named {p.name!r}: {seen[p.name].where} and {p.where}")
        seen[p.name] = p
        for a in p.registry:
            if a.name in offered:
                raise PackError(f"automation {a.name} is offered by two packs: {offered[a.name].where} and {p.where}")
            offered[a.name] = p
    return packs


# -- loading -------------------------------------------------------------------------------------


def _load(root: Traversable, where: str, *, package: str | None) -> Pack:
    manifest = parse_manifest((root / MANIFEST).read_text(encoding="utf-8"), f"{where}/{MANIFEST}")
    module = _import(manifest, root, where, package)
    library = _library(root, manifest, where)
    playbooks, probe, reader = _declared(module)
    model = _model(manifest, library, playbooks, probe, reader, where)
    registry = _registry(module, manifest, model, where, _as_path(root))
    return Pack(manifest, root, where, module, model, registry, library, playbooks, package)


def _import(manifest: Manifest, root: Traversable, where: str, package: str | None) -> ModuleType:
    modname = manifest.pack.module
    if not modname and manifest.robot.declared:  # robots alone: built-in playbooks, no module
        return ModuleType(f"_deskfleet_pack_{re.sub(r'[^0-9a-zA-Z_]', '_', manifest.pack.name)}_robots")
    if not modname:
        raise PackError(f"{where}/{MANIFEST}: [pack] module: missing (the Python module with the pack's "
                        "playbooks and automations)")
    try:
        return _import_in_pack(root, modname, manifest.pack.name, where, package)
    except PackError:
        raise
    except Exception as exc:
        frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        at = f" ({Path(frame.filename).name}, line {frame.lineno})" if frame else ""
        raise PackError(f"{where}: module {modname} does not import: {type(exc).__name__}: {exc}{at}") from None


def _import_in_pack(root: Traversable, modname: str, pack_name: str, where: str, package: str | None) -> ModuleType:
    """A module of the pack: a submodule of its package, or a file or package in its directory
    (imported under a private name, since two packs may both name theirs ``automations``)."""
    if package is not None:
        return importlib.import_module(f"{package}.{modname}")
    head, _, rest = modname.partition(".")
    if rest:  # a submodule of a package in the pack's directory
        parent = _import_in_pack(root, head, pack_name, where, package)
        return importlib.import_module(f"{parent.__name__}.{rest}")
    base = Path(str(root))
    file, package_dir = base / f"{modname}.py", base / modname
    # The directory is part of the name: two versions of one pack (an agent switching to a
    # newly installed one, each in a directory of its own) must not share their submodules.
    where_from = f"{zlib.crc32(str(base.resolve()).encode()):08x}"
    private = (f"_deskfleet_pack_{re.sub(r'[^0-9a-zA-Z_]', '_', pack_name)}_{where_from}_"
               f"{re.sub(r'[^0-9a-zA-Z_]', '_', modname)}")
    if (package_dir / "__init__.py").is_file():
        spec = importlib.util.spec_from_file_location(private, package_dir / "__init__.py",
                                                      submodule_search_locations=[str(package_dir)])
    elif file.is_file():
        spec = importlib.util.spec_from_file_location(private, file)
    else:
        raise PackError(f"{where}: module {modname!r}: neither {modname}.py nor {modname}/__init__.py is in {base}")
    assert spec is not None and spec.loader is not None
    existing = sys.modules.get(private)
    if existing is not None and getattr(existing, "__file__", None) == spec.origin:
        return existing  # loaded before in this process
    module = importlib.util.module_from_spec(spec)
    sys.modules[private] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(private, None)
        raise
    return module


def _library(root: Traversable, manifest: Manifest, where: str) -> TemplateLibrary:
    directory = root / manifest.pack.model
    if not directory.is_dir():
        raise PackError(f"{where}: [pack] model = {manifest.pack.model!r}: no such directory in the pack "
                        "(record one with: deskfleet model capture --dir …)")
    try:
        return TemplateLibrary.load(directory)
    except ConfigError as exc:
        raise PackError(f"{where}: model: {exc}") from None


def _declared(module: ModuleType) -> tuple[dict[str, Playbook], Probe | None, SessionReader | None]:
    playbooks: dict[str, Playbook] = {}
    probe: Probe | None = None
    reader: SessionReader | None = None
    for value in vars(module).values():
        found = info(value)
        if found is not None:
            playbooks[found.name] = value
        if getattr(value, PROBE_ATTR, False):
            probe = value
        if getattr(value, READER_ATTR, False):
            reader = value
    return playbooks, probe, reader


def _model(manifest: Manifest, library: TemplateLibrary, own: dict[str, Playbook], probe: Probe | None,
           reader: SessionReader | None, where: str) -> AppModel:
    s = manifest.states
    names = {st["name"] for st in library.states}
    playbooks = {**BUILTIN, **own}
    problems = [f"[states] ready: {r!r} is not a state of the model (states: {', '.join(sorted(names))})"
                for r in s.ready if r not in names]
    wanted = {f"[states] recover.{state}": pb for state, pb in s.recover.items()}
    wanted |= {"[states] unknown": s.unknown, "[states] unresponsive": s.unresponsive,
               "[states] no_screen": s.no_screen, "[states] covered": s.covered}
    if s.logout:
        wanted["[states] logout"] = s.logout
    if s.wrong_screen:
        wanted["[states] wrong_screen"] = s.wrong_screen
    if manifest.session.keepalive:
        wanted["[session] keepalive"] = manifest.session.keepalive
    for key, pb in wanted.items():
        if pb not in playbooks:
            problems.append(f"{key}: no playbook {pb!r} (the module declares: {', '.join(sorted(own)) or 'none'}; "
                            f"built in: {', '.join(sorted(BUILTIN))})")
    if problems:
        raise PackError("\n".join(f"{where}/{MANIFEST}: {p}" for p in problems))
    recoveries = dict(s.recover)
    recoveries.setdefault("no_screen", s.no_screen)
    recoveries.setdefault("covered", s.covered)
    if s.wrong_screen:
        recoveries.setdefault("wrong_screen", s.wrong_screen)
    return AppModel(
        name=manifest.pack.name, classifier=library.classifier(), ready_states=frozenset(s.ready),
        playbooks=playbooks, recoveries=recoveries, on_unknown=s.unknown, on_unresponsive=s.unresponsive,
        logout=s.logout or None, default_account=manifest.accounts.default or None,
        probe=probe, session_reader=reader, signed_out=frozenset(s.signed_out),
        settle=s.settle, settle_frames=s.settle_frames,
        meta={"screen": list(manifest.app.screen or library.screen), "signs_in": sorted(
            n for n, pb in playbooks.items() if (i := info(pb)) is not None and i.signs_in)},
    )


def _registry(module: ModuleType, manifest: Manifest, model: AppModel, where: str,
              directory: Path | None) -> Registry:
    found = [v for v in vars(module).values() if isinstance(v, Automation)]
    try:
        found += robot_automations(manifest, directory, where)
    except ConfigError as exc:
        raise PackError(str(exc)) from None
    problems = []
    for a in found:
        if a.required_state not in ("ready", "any") and a.required_state not in {
                st.name for st in model.classifier.states}:
            problems.append(f"automation {a.name}: required_state {a.required_state!r} is not a state of the model")
        a.pack = manifest.pack.name
        # It logs in if its pack does and it needs a screen state (no pre-flight, no login).
        a.needs_account = manifest.accounts.login and a.required_state != "any"
    if problems:
        raise PackError("\n".join(f"{where}: {p}" for p in problems))
    try:
        return Registry(found)
    except ValueError as exc:
        raise PackError(f"{where}: {exc}") from None


def _as_path(root: Traversable) -> Path | None:
    try:
        path = Path(str(root))
    except TypeError:
        return None
    return path if path.is_dir() else None
