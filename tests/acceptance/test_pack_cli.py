"""``deskfleet pack new`` and the refusals of ``pack try`` and ``pack open`` as a user meets
them: the real CLI as processes, no display needed. Every refusal is one line on stderr
(``deskfleet: …``), never a traceback, with a non-zero exit; nothing is written; a secret
given on the command line is refused without being repeated."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SECRET = "hunter2-Zq81"


def deskfleet(*args: str, cwd: Path | None = None, stdin: str | None = None,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DESKFLEET_")}
    return subprocess.run([sys.executable, "-m", "deskfleet", *args], capture_output=True, text=True, cwd=cwd,
                          input=stdin, env={**clean, **(env or {})}, timeout=60)


def refused(done: subprocess.CompletedProcess[str], code: int, says: str) -> None:
    assert done.returncode == code, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deskfleet: "), done.stderr
    assert says in lines[0], lines[0]
    assert "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    parent = tmp_path_factory.mktemp("packs")
    done = deskfleet("pack", "new", "acme", cwd=parent)
    assert done.returncode == 0, done.stderr
    return parent / "acme"


def test_new_then_check_passes(tmp_path: Path) -> None:
    done = deskfleet("pack", "new", "acme-erp", "--dir", str(tmp_path / "packs"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"created pack acme-erp in {tmp_path / 'packs' / 'acme-erp'}/")
    assert "5 screen states, 14 labelled screenshots" in done.stdout
    assert "deskfleet pack try" in done.stdout and "acme-erp.add_item" in done.stdout
    check = deskfleet("pack", "check", str(tmp_path / "packs" / "acme-erp"))
    assert check.returncode == 0, check.stderr
    assert check.stdout.startswith("ok: pack acme-erp 0.1.0: 5 screen states, 1 automations, 4 playbooks of its "
                                   "own, probe yes")
    assert check.stderr == ""  # no problem, no warning
    model = deskfleet("model", "test", str(tmp_path / "packs" / "acme-erp" / "model"))
    assert model.returncode == 0 and "false ready: 0" in model.stdout, model.stdout + model.stderr


def test_new_refuses_a_bad_name_and_a_directory_that_is_not_empty(tmp_path: Path) -> None:
    refused(deskfleet("pack", "new", "Acme", cwd=tmp_path), 1, "'Acme' is not a pack name")
    refused(deskfleet("pack", "new", "../up", cwd=tmp_path), 1, "'../up' is not a pack name")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "acme").mkdir()
    (tmp_path / "acme" / "keep.txt").write_text("mine")
    refused(deskfleet("pack", "new", "acme", cwd=tmp_path), 1, "acme exists and is not empty")
    assert [p.name for p in (tmp_path / "acme").iterdir()] == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    refused(deskfleet("pack", "new", "acme", "--dir", str(tmp_path / "file")), 2, "--dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acme", "file"]


@pytest.mark.parametrize("args", [
    ["--password", SECRET],
    [f"--password={SECRET}", "--username", "demo"],
    ["--username", "demo", "--password", SECRET, "--password-stdin"],
])
def test_try_refuses_a_password_on_the_command_line_without_repeating_it(pack: Path, args: list[str]) -> None:
    done = deskfleet("pack", "try", str(pack), "add_item", *args)
    refused(done, 2, "--password on the command line would show it")
    assert "--password-stdin" in done.stderr
    assert SECRET not in done.stdout + done.stderr


def test_try_refuses_what_it_cannot_run_before_starting_anything(pack: Path, tmp_path: Path) -> None:
    item = json.dumps({"name": "Widget", "quantity": 3})
    cases = [
        (["nope"], 1, "pack acme has no automation 'nope' (it offers: acme.add_item)"),
        (["add_item", "--input", '{"name": '], 2, "--input: not valid JSON"),
        (["add_item", "--input", "[1, 2]"], 2, "the input must be a JSON object"),
        (["add_item", "--input", '{"name": "Widget", "quantity": 0}'], 1,
         "input rejected by acme.add_item@1: quantity: Input should be greater than or equal to 1"),
        (["add_item", "--input", "@" + str(tmp_path / "missing.json")], 2, "cannot read the input file"),
        (["add_item", "--input", item, "--account", "bob"], 1, "no account 'bob': the pack's demo accounts are demo"),
        (["add_item", "--input", item, "--username", "robot"], 1, "--username needs the password"),
        (["add_item", "--input", item, "--password-stdin", "--password-file", str(tmp_path / "p")], 2,
         "--password-stdin or --password-file, not both"),
        (["add_item", "--input", "@-", "--username", "robot", "--password-stdin"], 2, "both read stdin"),
        (["add_item", "--input", item, "--desktop", "sim"], 2, "'sim' is not one of 'xvfb', 'local'"),
        (["add_item", "--input", item, "--timeout", "0"], 2, "--timeout"),
    ]
    for args, code, says in cases:
        refused(deskfleet("pack", "try", str(pack), *args, "--state-dir", str(tmp_path / "try")), code, says)
    refused(deskfleet("pack", "try", str(pack), "add_item", "--input", item, "--username", "robot",
                      "--password-stdin", stdin="\n"), 2, "the password read is empty")
    refused(deskfleet("pack", "try", "no-such-pack", "add_item"), 1, "no pack 'no-such-pack'")
    refused(deskfleet("pack", "try", "demoehr", "search_patient", "--input", '{"mrn": "A-1"}', "--reconcile"), 1,
            "demoehr.search_patient has no reconcile check")
    assert not (tmp_path / "try").exists()  # no display, no app, no data directory


def test_try_refuses_a_secret_input_field_on_the_command_line(pack: Path, tmp_path: Path) -> None:
    secret_pack = tmp_path / "vaulted"
    done = deskfleet("pack", "new", "vaulted", "--dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    module = secret_pack / "pack.py"
    module.write_text(module.read_text().replace("from pydantic import BaseModel, Field",
                                                 "from pydantic import BaseModel, Field, SecretStr") + '''

class Token(BaseModel):
    token: SecretStr


class Nothing(BaseModel):
    pass


@automation(name="vaulted.use_token", idempotent=True)
async def use_token(ctx: Context, data: Token) -> Nothing:
    return Nothing()
''')
    done = deskfleet("pack", "try", str(secret_pack), "use_token", "--input", json.dumps({"token": SECRET}))
    refused(done, 2, "input field(s) token of vaulted.use_token are secrets: give the input in a file")
    assert SECRET not in done.stderr


def test_try_and_open_say_how_to_install_xvfb_when_it_is_missing(pack: Path, tmp_path: Path) -> None:
    item = json.dumps({"name": "Widget", "quantity": 3})
    no_xvfb = {"PATH": str(tmp_path)}  # an empty directory: no Xvfb on the PATH
    refused(deskfleet("pack", "try", str(pack), "add_item", "--input", item, "--state-dir", str(tmp_path / "t"),
                      env=no_xvfb), 1, "Xvfb is not installed (Debian/Ubuntu: apt-get install xvfb)")
    refused(deskfleet("pack", "open", str(pack), "--screenshot", str(tmp_path / "s.png"), "--state-dir",
                      str(tmp_path / "t"), env=no_xvfb), 1, "Xvfb is not installed")
    assert not (tmp_path / "s.png").exists()


def test_open_refuses_a_bad_screen_size(pack: Path) -> None:
    refused(deskfleet("pack", "open", str(pack), "--screen", "big"), 2, "'big' is not WIDTHxHEIGHT")
    refused(deskfleet("pack", "open", "no-such-pack"), 1, "no pack 'no-such-pack'")
