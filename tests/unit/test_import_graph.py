"""The package's import graph: no circles, and every import goes down the layers that
docs/architecture.md draws (its section "Layers" shows the table below).

The graph is read from the source with ``ast``: every ``import`` and ``from … import``
anywhere in a module — at the top, inside a function (a lazy import is still a
dependency), under ``if TYPE_CHECKING:``. ``from pkg import name`` is an import of the
submodule ``pkg.name`` when there is one, else of ``pkg``; relative imports are resolved.
Importing ``a.b.c`` also runs the ``__init__`` of ``a`` and ``a.b``: that is not an edge
(or every package that re-exports its submodules would be a circle); instead no module may
import a package that contains it, so a package's ``__init__`` stays a façade on top of its
submodules, which take what they need from the module that defines it.

Imports under ``if TYPE_CHECKING:`` count for the circles as well as for the layers. They
never run, so Python would not mind a circle through one; but a module written against
another's types depends on it as surely as one that calls it — the hub's annotation
``orch: Orchestrator`` was half of the circle issue 11 is about. A circle that only type
checking closes is still a circle in the design.

The checks, each failing with a message that says where:

- no circle among the modules: ``a:line → b:line → a``;
- every module has a layer in :data:`LAYERS`, and imports only from its own layer and the
  layers below it that it may use: ``layer X imports layer Y: module:line → module``;
- no module imports its own package or one containing it: ``module:line imports its own
  package``. The root package ``deskfleet`` is the one exception the layers allow, to the
  example apps only: they import what ``deskfleet`` exports, as a user's pack does (STYLE 14).
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import deskfleet

SRC = Path(deskfleet.__file__).parent.parent

#: layer → (its modules, the layers it may import besides itself); each side bottom to top.
#: Module patterns are relative to the package: "x" is one module (or package ``__init__``),
#: "x.*" every module under the package x; the most specific pattern wins; "" is the root
#: package itself (``deskfleet/__init__.py``, the public surface). A layer may also import
#: whatever the layers it names may import. The agent side (desktop types … pack tools) and
#: the server side (rules … api) share only "base".
LAYERS: dict[str, tuple[list[str], list[str]]] = {
    # shared by every side: errors, the domain's nouns, the agent protocol, settings, keys,
    # traces (OpenTelemetry, optional)
    "base": (["errors", "ids", "logs", "models", "protocol", "config", "crypto", "version", "packfile", "tracing",
              "procs"], []),
    # -- the agent side --------------------------------------------------------------------
    # the desktop API: the protocol and its value types (Frame, Region, Window…)
    "desktop types": (["desktop.base"], ["base"]),
    # recognition: pure image work on frames
    "vision": (["vision", "vision.*"], ["desktop types"]),
    # real and virtual desktops (mss, X11, Xvfb, Windows); they read text with vision's OCR.
    # ``deskfleet.desktop`` re-exports the types and, lazily, the drivers.
    "desktop": (["desktop", "desktop.*"], ["vision"]),
    # what a pack is written against, and loading packs
    "apps": (["appmodel", "sdk", "packs.manifest", "packs.playbooks", "packs.loader", "packs.robots",
              "packs.robotrun", "packs.robotlib"], ["desktop"]),
    "agent": (["agent.*"], ["apps"]),
    # tools for pack authors: check, scaffold, trial runs (under a real agent), model capture
    "pack tools": (["packs", "packs.*"], ["agent"]),
    # the public surface: re-exports from the layers below
    "public": ([""], ["agent"]),
    # -- the server side -------------------------------------------------------------------
    # pure rules: run transitions, matching runs to machines, the audit of the event log,
    # who may do what (keys, roles, tenants)
    "rules": (["statemachine", "scheduler", "scheduler.*", "audit", "pools", "access"], ["base"]),
    # machine providers: what creates, restarts, fences and destroys machines
    "providers": (["providers", "providers.*"], ["base"]),
    "store": (["store", "store.*"], ["rules"]),
    # the server's parts: agent hub, fleet loops, bus between replicas, vault, metrics
    "parts": (["fleet", "fleet.*", "vault", "metrics"], ["store", "providers"]),
    # services, one job each: runs, dispatch, finals, machines and pools, catalogue, keys,
    # hints between replicas (one another only through protocols: see the test below)
    "services": (["services", "services.*"], ["parts"]),
    # the composition root: builds the parts and the services and wires them
    "orchestrator": (["orchestrator"], ["services"]),
    # routers per area, each handed the services it calls
    "api": (["api", "api.*", "ui", "ui.*"], ["orchestrator"]),  # ui: the dashboard
    "planner": (["planner"], ["parts"]),  # the capacity planner: scheduler and pool controller on a fake clock
    # -- clients and the top -------------------------------------------------------------
    "client": (["client"], ["base"]),
    "demo": (["demo", "demo.*"], ["client", "rules", "apps"]),
    "cli": (["cli", "cli.*", "__main__"], ["api", "pack tools", "demo", "client", "planner"]),
    # example packs: through the public door (and the demo, which they bring a part of)
    "examples": (["demoapp", "demoapp.*", "sim", "sim.*"], ["public", "demo"]),
}


# -- reading the graph ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Import:
    source: str
    target: str
    line: int
    typing_only: bool  # under ``if TYPE_CHECKING:``

    def __str__(self) -> str:
        return f"{self.source}:{self.line} → {self.target}" + (" (TYPE_CHECKING)" if self.typing_only else "")


def find_modules(src: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """Every module of ``package`` (under the directory ``src``): name → (file, is a package)."""
    found = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        found[".".join(parts)] = (path, is_package)
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports_in(tree: ast.AST, module: str, is_package: bool, package: str,
                modules: Mapping[str, object]) -> list[Import]:
    found: list[Import] = []

    def target(name: str) -> str | None:
        return name if name.split(".")[0] == package else None

    def visit(node: ast.AST, typing_only: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (t := target(alias.name)) is not None:
                    found.append(Import(module, t, node.lineno, typing_only))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                name = ".".join([*base, *([node.module] if node.module else [])])
            else:
                name = node.module or ""
            if target(name) is None:
                return
            for alias in node.names:
                sub = f"{name}.{alias.name}"
                found.append(Import(module, sub if sub in modules else name, node.lineno, typing_only))
        elif isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, typing_only)
        else:
            for inner in ast.iter_child_nodes(node):
                visit(inner, typing_only)

    visit(tree, False)
    return found


def import_graph(src: Path, package: str) -> dict[str, list[Import]]:
    """module → the imports of modules of ``package`` it makes (other than of itself)."""
    modules = find_modules(src, package)
    graph = {}
    for name, (path, is_package) in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        imports = _imports_in(tree, name, is_package, package, modules)
        graph[name] = [i for i in dict.fromkeys(imports) if i.target != name]  # once per line
    return graph


# -- the checks --------------------------------------------------------------------------------------


def circles(graph: Mapping[str, list[Import]]) -> list[str]:
    """One line per circle (per strongly connected component: its shortest circle)."""
    edges = {m: {i.target: i for i in imports if i.target in graph} for m, imports in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)

    found = []
    for component in components:
        start, members = component[0], set(component)
        # the shortest way from start back to itself, inside the component (breadth first)
        came_from: dict[str, Import] = {}
        frontier = [start]
        while frontier and start not in came_from:
            nxt = []
            for v in frontier:
                for w, imp in sorted(edges[v].items()):
                    if w in members and w not in came_from:
                        came_from[w] = imp
                        nxt.append(w)
            frontier = nxt
        path: list[Import] = []
        v = start
        while True:
            imp = came_from[v]
            path.append(imp)
            v = imp.source
            if v == start:
                break
        path.reverse()
        steps = " → ".join(f"{i.source}:{i.line}" + (" (TYPE_CHECKING)" if i.typing_only else "") for i in path)
        found.append(f"circle: {steps} → {start}   [all of: {', '.join(component)}]")
    return found


def layer_of(module: str, package: str, layers: Mapping[str, tuple[list[str], list[str]]]) -> str | None:
    relative = module[len(package) + 1:] if module != package else ""
    best: tuple[int, str] | None = None
    for layer, (patterns, _) in layers.items():
        for p in patterns:
            if p.endswith(".*"):
                if relative.startswith(p[:-1]):
                    score = 2 * len(p[:-2])
                else:
                    continue
            elif p == relative:
                score = 2 * len(p) + 1
            else:
                continue
            if best is None or score > best[0]:
                best = (score, layer)
    return best[1] if best else None


def may_use(layers: Mapping[str, tuple[list[str], list[str]]]) -> dict[str, set[str]]:
    """layer → every layer it may import (itself, those it names, and theirs)."""
    closure: dict[str, set[str]] = {}

    def of(layer: str, seen: tuple[str, ...] = ()) -> set[str]:
        if layer in seen:
            raise AssertionError(f"the layer table has a circle: {' → '.join([*seen, layer])}")
        if layer not in closure:
            below = {layer}
            for other in layers[layer][1]:
                below |= of(other, (*seen, layer))
            closure[layer] = below
        return closure[layer]

    for layer in layers:
        of(layer)
    return closure


def layer_violations(graph: Mapping[str, list[Import]], package: str,
                     layers: Mapping[str, tuple[list[str], list[str]]]) -> list[str]:
    allowed = may_use(layers)
    problems = []
    for module in sorted(graph):
        if layer_of(module, package, layers) is None:
            problems.append(f"{module} is in no layer: add it to LAYERS (and docs/architecture.md)")
    for module, imports in sorted(graph.items()):
        here = layer_of(module, package, layers)
        for imp in imports:
            there = layer_of(imp.target, package, layers)
            if here is None or there is None or imp.target not in graph:
                continue
            if there not in allowed[here]:
                problems.append(f"layer {here!r} imports layer {there!r}: {imp}")
    return problems


def own_package_imports(graph: Mapping[str, list[Import]], package: str) -> list[str]:
    """Imports of a package by a module inside it (the root excepted: see the layers)."""
    return [f"{imp} imports its own package: import the name from the module that defines it"
            for imports in graph.values() for imp in imports
            if imp.target != package and imp.source.startswith(imp.target + ".")]


# -- the package ------------------------------------------------------------------------------------


def test_the_package_has_no_import_circles() -> None:
    found = circles(import_graph(SRC, "deskfleet"))
    assert not found, "\n".join(found)


def test_imports_follow_the_layers() -> None:
    found = layer_violations(import_graph(SRC, "deskfleet"), "deskfleet", LAYERS)
    assert not found, "\n".join(found)


def test_no_module_imports_its_own_package() -> None:
    found = own_package_imports(import_graph(SRC, "deskfleet"), "deskfleet")
    assert not found, "\n".join(found)


def test_services_know_one_another_through_protocols() -> None:
    """A service calls another through a small protocol it declares, never by importing the
    other's module; only the hints between replicas (``services.replicas``, which imports no
    service) are shared by all. So the root builds them bottom up, and none is a hub."""
    graph = import_graph(SRC, "deskfleet")
    shared = "deskfleet.services.replicas"
    found = [f"{imp} imports another service: declare a protocol for what it calls"
             for module, imports in graph.items() if module.startswith("deskfleet.services.")
             for imp in imports
             if imp.target.startswith("deskfleet.services.") and (imp.target != shared or module == shared)]
    assert not found, "\n".join(found)


def test_every_layer_pattern_names_modules() -> None:
    """A stale entry in the table (a module renamed, a package gone) is an error too."""
    modules = set(find_modules(SRC, "deskfleet"))
    stale = []
    for layer, (patterns, _) in LAYERS.items():
        for p in patterns:
            full = f"deskfleet.{p[:-2]}." if p.endswith(".*") else f"deskfleet.{p}" if p else "deskfleet"
            if not any(m.startswith(full) if p.endswith(".*") else m == full for m in modules):
                stale.append(f"{layer}: {p!r}")
    assert not stale, stale


# -- the checker, on a small package made for it -------------------------------------------------------


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return root


FAKE = {
    "fake/__init__.py": "from .high import top\n",
    "fake/low.py": """\
        from typing import TYPE_CHECKING

        def helper():
            from . import high  # a lazy import is an import
            return high
        """,
    "fake/high.py": """\
        from .low import helper
        from fake import mid
        import fake.sub.x

        def top():
            return helper()
        """,
    "fake/mid.py": """\
        from typing import TYPE_CHECKING

        if TYPE_CHECKING:
            from .sub.x import X
        """,
    "fake/sub/__init__.py": "NAME = 1\n",
    "fake/sub/x.py": """\
        from . import NAME

        class X:
            pass
        """,
}
FAKE_LAYERS: dict[str, tuple[list[str], list[str]]] = {
    "low": (["low"], []),
    "middle": (["mid", "sub", "sub.*"], ["low"]),
    "high": (["high"], ["middle"]),
    "surface": ([""], ["high"]),
}


def test_the_reader_resolves_relative_lazy_and_type_checking_imports(tmp_path: Path) -> None:
    graph = import_graph(_package(tmp_path, FAKE), "fake")
    as_set = {m: {(i.target, i.typing_only) for i in imports} for m, imports in graph.items()}
    assert as_set == {
        "fake": {("fake.high", False)},
        "fake.low": {("fake.high", False)},
        "fake.high": {("fake.low", False), ("fake.mid", False), ("fake.sub.x", False)},
        "fake.mid": {("fake.sub.x", True)},
        "fake.sub": set(),
        "fake.sub.x": {("fake.sub", False)},
    }


def test_the_checker_finds_a_planted_circle(tmp_path: Path) -> None:
    found = circles(import_graph(_package(tmp_path, FAKE), "fake"))
    assert found == ["circle: fake.high:1 → fake.low:4 → fake.high   [all of: fake.high, fake.low]"]
    # a circle closed only under TYPE_CHECKING is a circle too
    _package(tmp_path, {"fake/low.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .high import top\n"})
    found = circles(import_graph(tmp_path, "fake"))
    assert found == ["circle: fake.high:1 → fake.low:3 (TYPE_CHECKING) → fake.high   [all of: fake.high, fake.low]"]
    _package(tmp_path, {"fake/low.py": "X = 1\n"})
    assert circles(import_graph(tmp_path, "fake")) == []


def test_the_checker_finds_a_planted_layer_violation(tmp_path: Path) -> None:
    graph = import_graph(_package(tmp_path, FAKE), "fake")
    assert layer_violations(graph, "fake", FAKE_LAYERS) == [
        "layer 'low' imports layer 'high': fake.low:4 → fake.high",
    ]
    # a module in no layer is reported, and so is a circle in the table itself
    _package(tmp_path, {"fake/extra.py": ""})
    assert layer_violations(import_graph(tmp_path, "fake"), "fake", FAKE_LAYERS)[0] == (
        "fake.extra is in no layer: add it to LAYERS (and docs/architecture.md)")
    try:
        may_use({"a": ([], ["b"]), "b": ([], ["a"])})
    except AssertionError as exc:
        assert "a → b → a" in str(exc)
    else:
        raise AssertionError("a circle in the layer table went unnoticed")


def test_the_checker_finds_a_module_importing_its_own_package(tmp_path: Path) -> None:
    graph = import_graph(_package(tmp_path, FAKE), "fake")
    assert own_package_imports(graph, "fake") == [
        "fake.sub.x:1 → fake.sub imports its own package: import the name from the module that defines it",
    ]
    # the root package is left to the layers: there, only "surface" is above it
    _package(tmp_path, {"fake/high.py": "from fake import top\n"})
    graph = import_graph(tmp_path, "fake")
    assert own_package_imports(graph, "fake") == [
        "fake.sub.x:1 → fake.sub imports its own package: import the name from the module that defines it",
    ]
    assert "layer 'high' imports layer 'surface': fake.high:1 → fake" in layer_violations(graph, "fake", FAKE_LAYERS)
