"""Packs: the manifest, loading by path and by name, what the loader refuses (one line per
problem), ``pack check``, and the public surface packs are written against."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import deskfleet
from deskfleet import PackError, load_pack, load_packs
from deskfleet.packs.check import check_pack
from deskfleet.vision.templates import Anchor, TemplateLibrary

SRC = Path(deskfleet.__file__).parent
#: example packs loaded by path, as a user's are (deskfleet agent --pack examples/NAME)
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

MANIFEST = """
[pack]
name = "tiny"
version = "0.1"
module = "tiny_pack"

[app]
command = ["{python}", "-c", "pass", "--data", "{data}/x.db", "--name", "{machine}"]
env = { WHERE = "{pack}" }
screen = [320, 240]

[states]
ready = ["home"]
signed_out = ["login"]
settle = 0.2

[states.recover]
login = "login"
dialog = "dismiss"

[accounts]
login = true
"""

MODULE = '''
from pydantic import BaseModel
from deskfleet import Context, PlaybookContext, ProbeResult, automation, playbook, probe


class Note(BaseModel):
    text: str


class Saved(BaseModel):
    id: int


@playbook(signs_in=True)
async def login(ctx: PlaybookContext) -> None:
    await ctx.desktop.click(10, 10)


@playbook(wait=False)
async def dismiss(ctx: PlaybookContext) -> None:
    await ctx.desktop.click(20, 20)


@probe
async def alive(desktop) -> ProbeResult:
    return ProbeResult(True)


@automation(name="tiny.save")
async def save(ctx: Context, data: Note) -> Saved:
    return Saved(id=1)
'''


def frame(colour: tuple[int, int, int], corner: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    f = np.zeros((240, 320, 3), np.uint8)
    f[:, :] = colour
    f[200:240, 280:320] = corner
    return f


SCREENS = {"login": frame((200, 40, 40)), "home": frame((40, 200, 40)),
           "dialog": frame((40, 200, 40), corner=(250, 250, 0))}


def write_pack(root: Path, manifest: str = MANIFEST, module: str = MODULE) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "pack.toml").write_text(textwrap.dedent(manifest))
    (root / "tiny_pack.py").write_text(textwrap.dedent(module))
    lib = TemplateLibrary("tiny", (320, 240))
    lib.record(SCREENS["login"], "login", [Anchor("body", deskfleet.Region(10, 10, 100, 100), "pixels")])
    lib.record(SCREENS["home"], "home", [Anchor("body", deskfleet.Region(10, 10, 100, 100), "pixels")], ready=True)
    lib.record(SCREENS["dialog"], "dialog", [Anchor("mark", deskfleet.Region(282, 202, 30, 30), "pixels")],
               overlay=True)
    lib.save(root / "model")
    return root


def test_a_directory_pack_loads_with_its_playbooks_probe_automations_and_model(tmp_path: Path) -> None:
    pack = load_pack(write_pack(tmp_path / "tiny"))
    assert (pack.name, pack.version, pack.screen) == ("tiny", "0.1", (320, 240))
    assert [a.name for a in pack.registry] == ["tiny.save"]
    [save] = list(pack.registry)
    assert (save.pack, save.needs_account) == ("tiny", True)
    model = pack.model
    assert model.ready_states == {"home"} and model.signed_out == {"login"}
    assert {"login", "dismiss", "restart_app", "restart_desktop", "wait"} <= set(model.playbooks)
    assert model.recoveries["dialog"] == "dismiss" and model.recoveries["no_screen"] == "restart_desktop"
    assert model.meta["signs_in"] == ["login"] and model.probe is not None and model.settle == 0.2
    assert model.classify(SCREENS["dialog"]).state == "dialog"
    assert model.classify(SCREENS["home"]).state == "home"


def test_the_app_command_fills_its_placeholders(tmp_path: Path) -> None:
    pack = load_pack(write_pack(tmp_path / "tiny"))
    cmd = pack.app_command(machine="m-01", data=tmp_path / "data" / "tiny", display=":9", extra_args=["--x"])
    assert cmd.argv == [sys.executable, "-c", "pass", "--data", f"{(tmp_path / 'data' / 'tiny').resolve()}/x.db",
                        "--name", "m-01", "--x"]
    assert cmd.env == {"WHERE": str(tmp_path / "tiny")} and (tmp_path / "data" / "tiny").is_dir()


def test_installed_packs_load_by_name() -> None:
    assert {"demoehr", "simehr"} <= set(deskfleet.installed_packs())
    demo = load_pack("demoehr")
    assert demo.name == "demoehr" and "demoehr.create_patient" in {a.name for a in demo.registry}
    with pytest.raises(PackError, match=r"no pack 'nope'.*installed: .*demoehr"):
        load_pack("nope")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m.replace('version = "0.1"', 'version = "0.1"\ncolour = "red"'), r"\[pack\] colour: unknown key"),
    (lambda m: m.replace('ready = ["home"]\n', ""), r"\[states\] ready: missing"),
    (lambda m: m.replace("{machine}", "{host}"), r"unknown placeholder \{host\}"),
    (lambda m: m.replace('screen = [320, 240]', 'screen = [320, 240]\nwindow = "(unclosed"'), r"\[app\] window: not a regular"),
    (lambda m: m.replace('dialog = "dismiss"', 'dialog = "close_it"'), r"recover.dialog: no playbook 'close_it'"),
    (lambda m: m.replace('ready = ["home"]', 'ready = ["main"]'), r"ready: 'main' is not a state of the model"),
    (lambda m: m.replace('[pack]', '[pack'), r"not valid TOML"),
], ids=["unknown-key", "missing", "placeholder", "regex", "playbook", "ready-state", "toml"])
def test_a_broken_manifest_is_one_clear_line(tmp_path: Path, edit, message) -> None:  # type: ignore[no-untyped-def]
    root = write_pack(tmp_path / "tiny", edit(MANIFEST))
    with pytest.raises(PackError if "playbook" in message or "state of" in message else deskfleet.ConfigError,
                       match=message):
        load_pack(root)


def test_a_module_that_does_not_import_names_its_file_and_line(tmp_path: Path) -> None:
    root = write_pack(tmp_path / "tiny", module="import nothing_like_this\n")
    with pytest.raises(PackError, match=r"module tiny_pack does not import: ModuleNotFoundError.*tiny_pack.py, line 1"):
        load_pack(root)
    (root / "tiny_pack.py").unlink()
    with pytest.raises(PackError, match=r"neither tiny_pack.py nor tiny_pack/__init__.py"):
        load_pack(root)


def test_a_missing_or_broken_model_is_refused(tmp_path: Path) -> None:
    root = write_pack(tmp_path / "tiny")
    (root / "model" / "home.body.png").unlink()
    with pytest.raises(PackError, match=r"model: .*home.body.png is missing"):
        load_pack(root)
    import shutil

    shutil.rmtree(root / "model")
    with pytest.raises(PackError, match=r"\[pack\] model = 'model': no such directory"):
        load_pack(root)


def test_packs_loaded_together_must_not_collide(tmp_path: Path) -> None:
    a = write_pack(tmp_path / "a")
    b = write_pack(tmp_path / "b", MANIFEST.replace('name = "tiny"', 'name = "other"'))
    with pytest.raises(PackError, match=r"automation tiny\.save is offered by two packs"):
        load_packs([a, b])
    with pytest.raises(PackError, match="two packs are named 'tiny'"):
        load_packs([a, write_pack(tmp_path / "c", module=MODULE.replace("tiny.save", "tiny.other"))])


def test_check_reports_states_without_recovery_and_unknown_names(tmp_path: Path) -> None:
    root = write_pack(tmp_path / "tiny", MANIFEST.replace('dialog = "dismiss"', 'dialgo = "dismiss"'))
    report = check_pack(root)
    assert not report.ok
    assert any("the dialog 'dialog' has no recovery" in p for p in report.problems), report.problems
    assert any("'dialgo' is not a state of the model" in p for p in report.problems), report.problems
    assert check_pack(write_pack(tmp_path / "good")).ok


def test_an_update_hook_is_checked_where_it_is_declared(tmp_path: Path) -> None:
    """``[hooks] update``: a module:callable reference, that imports, taking the one
    UpdateContext an agent gives it — each said by ``pack check`` before an agent runs it."""
    def check(hooks: str, module: str = MODULE) -> list[str]:
        return check_pack(write_pack(tmp_path / str(len(list(tmp_path.iterdir()))), MANIFEST + hooks, module)).problems

    good = MODULE + "\n\nasync def update(ctx):\n    ctx.log.info('patched')\n"
    assert check('\n[hooks]\nupdate = ":update"\n', good) == []
    pack = load_pack(write_pack(tmp_path / "loaded", MANIFEST + '\n[hooks]\nupdate = ":update"\n', good))
    assert pack.hook("update") is vars(pack.module)["update"]
    [bad] = check('\n[hooks]\nupdate = "patch the OS"\n')
    assert "[hooks] update: 'patch the OS' is not module:callable" in bad
    [missing] = check('\n[hooks]\nupdate = ":update"\n')
    assert "[hooks] update = ':update': the module has no callable 'update'" in missing
    [unimported] = check('\n[hooks]\nupdate = "nowhere:update"\n')
    assert "module 'nowhere': neither nowhere.py nor nowhere/__init__.py is in" in unimported
    [no_context] = check('\n[hooks]\nupdate = ":update"\n', MODULE + "\n\ndef update():\n    pass\n")
    assert "it must take one argument, the UpdateContext" in no_context


def test_check_passes_the_packs_we_ship() -> None:
    for name in ("demoehr", "simehr"):
        report = check_pack(name)
        assert report.ok, report.problems
    examples = sorted(p for p in EXAMPLES.iterdir() if (p / "pack.toml").is_file())
    assert [p.name for p in examples] == ["keepassxc"]
    for path in examples:
        report = check_pack(path)
        assert report.ok, report.problems
        assert report.warnings == [], report.warnings


def test_pack_check_as_a_command(tmp_path: Path) -> None:
    root = write_pack(tmp_path / "tiny", MANIFEST.replace('login = "login"\n', ""))
    done = subprocess.run([sys.executable, "-m", "deskfleet", "pack", "check", str(root)],
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert "problem:" in done.stderr and "the screen 'login' has no recovery" in done.stderr
    assert "Traceback" not in done.stderr
    good = subprocess.run([sys.executable, "-m", "deskfleet", "pack", "check", str(write_pack(tmp_path / "ok"))],
                          capture_output=True, text=True)
    assert good.returncode == 0 and good.stdout.startswith("ok: pack tiny 0.1"), good.stdout + good.stderr


def test_the_public_surface_is_pinned_and_every_name_imports() -> None:
    assert sorted(deskfleet.__all__) == sorted([
        "COVERED", "UNKNOWN", "NO_SCREEN", "WRONG_SCREEN", "Window", "WindowFacts", "Agent", "AgentConfig", "AgentHost", "AgentHostConfig", "App",
        "AppModel", "Automation", "AutomationError", "BusinessError", "Classification", "ConfigError", "Context",
        "Credential", "Desktop", "DesktopError", "DesktopInfo", "DeskfleetError", "Frame", "HUMAN_KINDS", "HumanAnswer", "Lease", "Pack", "PackError",
        "PlaybookContext", "ProbeResult", "Region", "Registry", "SimSettings", "StateTimeout", "Stopped", "UpdateContext", "__version__",
        "automation", "hover_responds", "installed_packs", "load_pack", "load_packs", "note_session", "playbook",
        "probe", "same_text", "session_reader",
    ])
    for name in deskfleet.__all__:
        assert getattr(deskfleet, name) is not None, name


def test_the_core_knows_no_example_application() -> None:
    """DemoEHR (deskfleet.demoapp) and SimEHR (deskfleet.sim) are packs: no module outside them
    imports them, and no code outside them names them (docstrings and help texts may mention
    them as examples; tests and benchmarks may use them)."""
    names = re.compile(r"\b(demoehr|simehr|demoapp|DemoEHR|SimEHR)\b")
    offenders = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        if rel.parts[0] in ("demoapp", "sim"):
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = ("." * node.level) + (node.module or "")
                if re.search(r"(^|\.)(demoapp|sim)(\.|$)", module):
                    offenders.append(f"{rel}:{node.lineno}: imports {module}")
            elif isinstance(node, ast.Import):
                offenders += [f"{rel}:{node.lineno}: imports {a.name}" for a in node.names
                              if re.match(r"deskfleet\.(demoapp|sim)\b", a.name)]
            elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                  and names.search(node.value) and not _help_text(tree, node)):
                offenders.append(f"{rel}:{node.lineno}: names an example app in {node.value[:60]!r}")
    assert offenders == []


def _help_text(tree: ast.AST, node: ast.Constant) -> bool:
    """A click ``help=`` text or a command's docstring-like example (documentation, not logic)."""
    for parent in ast.walk(tree):
        if isinstance(parent, ast.keyword) and parent.arg == "help" and node in ast.walk(parent.value):
            return True
    return False


def test_example_packs_use_only_the_public_surface() -> None:
    """An example pack imports what a user's pack can: ``deskfleet`` and its documented
    subpackages (``deskfleet.vision`` to record models, ``deskfleet.desktop`` for real desktops in
    tools, ``deskfleet.demo`` for demo hooks), and its own modules — the packs in the package
    (DemoEHR, SimEHR) and those in examples/, loaded by path (KeePassXC)."""
    allowed = re.compile(r"^(from deskfleet(\.(vision|desktop|demo)(\.\w+)?)? import|from \.)")
    imported = re.compile(r"^import deskfleet(\.(vision|desktop|demo))?(\s|$|,)")
    files = [*(SRC / "demoapp").rglob("*.py"), *(SRC / "sim").rglob("*.py"), *EXAMPLES.rglob("*.py")]
    assert any(EXAMPLES in path.parents for path in files), "the examples/ packs are checked too"
    offenders = []
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            if (stripped.startswith("from ..") or (stripped.startswith("from deskfleet") and not allowed.match(stripped))
                    or (stripped.startswith("import deskfleet") and not imported.match(stripped))):
                offenders.append(f"{path.parent.name}/{path.name}:{number}: {stripped}")
    assert offenders == []


def test_stop_command_may_name_the_pid_and_hooks_may_name_the_packs_module(tmp_path: Path) -> None:
    manifest = MANIFEST.replace('screen = [320, 240]', 'screen = [320, 240]\nstop_command = ["kill", "{pid}"]')
    manifest += '\n[hooks]\ndemo = ":alive"\n'
    pack = load_pack(write_pack(tmp_path / "tiny", manifest))
    assert pack.manifest.app.stop_command == ["kill", "{pid}"]
    assert pack.hook("demo") is vars(pack.module)["alive"]
    with pytest.raises(deskfleet.ConfigError, match=r"unknown placeholder \{pid\}"):
        load_pack(write_pack(tmp_path / "bad", MANIFEST.replace("{machine}", "{pid}")))


def test_a_hook_may_name_a_submodule_of_a_directory_packs_package(tmp_path: Path) -> None:
    root = write_pack(tmp_path / "tiny", MANIFEST + '\n[hooks]\ndemo = "extra.deep:make"\n')
    (root / "extra").mkdir()
    (root / "extra" / "__init__.py").write_text("")
    (root / "extra" / "deep.py").write_text("def make():\n    return 'made'\n")
    assert load_pack(root).hook("demo")() == "made"  # type: ignore[misc]
