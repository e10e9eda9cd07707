"""``deskfleet pack check``: everything that can be known about a pack without running it.

One line per problem, each saying where and what to fix; warnings for what works but is
likely a mistake. A pack whose check passes loads in any agent: its manifest is valid, its
module imports, its model parses, every screen that is not ready has a recovery and every
recovery a playbook, every automation declares its input and output schemas, its update
hook (if any) takes an ``UpdateContext``, and every Robot Framework robot parses, has the
task it names and passes Robot's dry run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from inspect import signature
from pathlib import Path

from ..errors import ConfigError
from .loader import MANIFEST, Pack, PackError, load_pack
from .manifest import parse_manifest
from .robotrun import dry_run
from .robots import declared, inspect

#: states pre-flight itself produces (not recorded in any model)
SYNTHETIC = frozenset({"unknown", "no_screen", "wrong_screen", "covered"})


@dataclass(slots=True)
class CheckReport:
    pack: Pack | None = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    screens: tuple[int, int, int] | None = None  # saved screens: (total, recognised, false ready)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.pack is None:
            return "the pack does not load"
        p = self.pack
        states = len(p.library.states)
        screens = ""
        if self.screens is not None:
            total, correct, false_ready = self.screens
            screens = f", {correct}/{total} saved screens recognised ({false_ready} false ready)"
        return (f"pack {p.name} {p.version}: {states} screen states, {len(p.registry)} automations, "
                f"{len(p.playbooks)} playbooks of its own, probe {'yes' if p.model.probe else 'no'}{screens}")


def check_pack(ref: str | os.PathLike[str]) -> CheckReport:
    report = CheckReport()
    path = Path(os.fspath(ref))
    if path.is_dir() and (path / MANIFEST).is_file():
        try:  # the manifest's own problems first, all of them
            parse_manifest((path / MANIFEST).read_text(encoding="utf-8"), f"{ref}/{MANIFEST}")
        except ConfigError as exc:
            report.problems += str(exc).splitlines()
            return report
    try:
        pack = load_pack(ref)
    except PackError as exc:
        report.problems += str(exc).splitlines()
        return report
    report.pack = pack
    m = pack.manifest
    where = f"{pack.where}/{MANIFEST}"
    states = {s["name"]: s for s in pack.library.states}
    ready = set(m.states.ready)
    for name, state in states.items():
        if name not in ready and name not in m.states.recover:
            kind = "dialog" if state.get("overlay") else "screen"
            report.problems.append(f"{where}: [states] recover: the {kind} {name!r} has no recovery "
                                   f"(add {name} = \"<playbook>\"; pre-flight would otherwise use "
                                   f"{m.states.unknown!r} on it)")
    for name in m.states.recover:
        if name not in states and name not in SYNTHETIC:
            report.problems.append(f"{where}: [states] recover: {name!r} is not a state of the model "
                                   f"(states: {', '.join(sorted(states))})")
    for name in m.states.signed_out:
        if name not in states:
            report.problems.append(f"{where}: [states] signed_out: {name!r} is not a state of the model")
    if not pack.registry:
        robots = " and [robot] finds no robot" if m.robot.declared else ""
        report.problems.append(f"{pack.where}: module {m.pack.module or '(none)'} declares no automation "
                               f"(@automation){robots}")
    for a in pack.registry:
        try:
            a.spec  # noqa: B018 - builds the JSON schemas of its input and output
        except Exception as exc:
            report.problems.append(f"{pack.where}: automation {a.name}: its input or output has no JSON "
                                   f"schema: {exc}")
    model_screen = pack.library.screen
    if m.app.screen is not None and tuple(m.app.screen) != tuple(model_screen):
        report.problems.append(f"{where}: [app] screen is {m.app.screen[0]}x{m.app.screen[1]} but the model was "
                               f"recorded at {model_screen[0]}x{model_screen[1]}")
    if m.accounts.login and not pack.model.meta.get("signs_in"):
        report.warnings.append(f"{pack.where}: [accounts] login = true, but no playbook is declared "
                               "@playbook(signs_in=True): the machine's session is never noted")
    if pack.model.probe is None:
        report.warnings.append(f"{pack.where}: no @probe: a hung application that still shows a ready "
                               "screen cannot be told from a healthy one")
    if not m.app.command and not (m.app.process or m.app.window) and not m.hooks.sim:
        report.warnings.append(f"{where}: [app] has no command, process or window: an agent can neither "
                               "start the application nor find it running")
    _check_update_hook(pack, report)
    _check_robots(pack, report)
    _check_saved_screens(pack, report)
    if m.session.keepalive and m.session.idle_timeout is None and not m.hooks.sim:
        report.warnings.append(f"{where}: [session] keepalive without idle_timeout: upkeep runs only when an "
                               "agent is told the idle timeout (--app-idle-timeout)")
    return report


def _check_update_hook(pack: Pack, report: CheckReport) -> None:
    """``[hooks] update`` imports, and takes the one argument an agent gives it (an
    ``UpdateContext``): found here, not by the first rolling maintenance that runs it."""
    try:
        hook = pack.hook("update")
    except PackError as exc:
        report.problems += str(exc).splitlines()
        return
    if hook is None:
        return
    try:
        signature(hook).bind(None)
    except TypeError:
        report.problems.append(f"{pack.where}/{MANIFEST}: [hooks] update = {pack.manifest.hooks.update!r}: "
                               "it must take one argument, the UpdateContext (def update(ctx): ...)")
    except ValueError:
        pass  # no signature to read (a builtin): the agent will find out


def _check_robots(pack: Pack, report: CheckReport) -> None:
    """Each robot parses with Robot Framework's parser and has the task it names; then
    Robot's dry run (libraries imported, keywords looked up, nothing run) finds what only
    running would otherwise tell."""
    m = pack.manifest
    if not m.robot.declared or pack.directory is None:
        return
    specs = declared(m, pack.directory, pack.where)  # it loaded: no problem left here
    if m.robot.suites and not any(s.rel.startswith(m.robot.suites.rstrip("/") + "/") for s in specs):
        report.warnings.append(f"{pack.where}/{MANIFEST}: [robot] suites = {m.robot.suites!r}: no .robot file "
                               "with tasks there")
    for spec in specs:
        problems = inspect(spec)
        if not problems:
            problems = [f"robot {spec.name}: {p}" for p in dry_run(spec.job(pack.directory))]
        report.problems += [f"{pack.where}: {p}" for p in problems]


def _check_saved_screens(pack: Pack, report: CheckReport) -> None:
    """The model's saved screenshots (``deskfleet model capture`` keeps them): each must still
    be recognised as its label, and none may be taken for ready when it is not."""
    from ..vision.screens import evaluate, saved_screens

    model_dir = pack.root / pack.manifest.pack.model
    try:
        items = saved_screens(model_dir)
        result = evaluate(pack.model.classifier, ((item, item.frame()) for item in items),
                          window=pack.library.window)
    except ConfigError as exc:
        report.problems.append(f"{pack.where}: model screens: {exc}")
        return
    if not items:
        report.warnings.append(f"{pack.where}: the model keeps no labelled screenshots: `deskfleet model test` "
                               "has nothing to guard it with (model capture and add-screen save them)")
        return
    for outcome in result.false_ready:
        report.problems.append(f"{pack.where}: model: {outcome.describe()} — taken for ready (false ready)")
    for outcome in result.wrong:
        if not outcome.false_ready:
            report.warnings.append(f"{pack.where}: model: {outcome.describe()}")
    report.screens = (result.total, result.correct, len(result.false_ready))
