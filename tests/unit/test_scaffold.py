"""The pack author's tools without a display: ``pack new`` (what it writes and what it
refuses, nothing written on a refusal), the scaffold it writes (loads, checks, its shipped
model recognises every saved screen with no false ready), and what ``pack try`` decides
before any display starts (accounts, the automation, the input)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from deskfleet import BusinessError, ConfigError, PackError, load_pack, load_packs
from deskfleet.packs import local_accounts, new_pack, try_automation
from deskfleet.packs.check import check_pack
from deskfleet.packs.scaffold import PLACEHOLDER, template
from deskfleet.packs.trial import find_automation
from deskfleet.vision import TemplateLibrary
from deskfleet.vision.screens import evaluate, saved_screens


@pytest.fixture(scope="module")
def scaffold(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return new_pack("acme", tmp_path_factory.mktemp("packs")).path


def test_new_writes_the_whole_scaffold_with_the_name_filled_in(tmp_path: Path) -> None:
    made = new_pack("acme-erp", tmp_path)
    assert made.path == tmp_path / "acme-erp" and made.automation == "acme-erp.add_item"
    files = set(made.files)
    assert {"pack.toml", "pack.py", "app.py", "README.md", "tests/test_pack.py", "model/model.json"} <= files
    assert any(f.startswith("model/screens/unknown/") for f in files)
    on_disk = {str(p.relative_to(made.path)) for p in made.path.rglob("*") if p.is_file()}
    assert on_disk == files
    for name in files:
        assert not name.endswith(".tmpl")
        if name.endswith((".py", ".toml", ".md", ".json")):
            assert PLACEHOLDER not in (made.path / name).read_text(), name
    manifest = tomllib.loads((made.path / "pack.toml").read_text())
    assert manifest["pack"]["name"] == "acme-erp"
    assert [p.name for p in tmp_path.iterdir()] == ["acme-erp"]  # no staging directory left behind


def test_the_scaffold_loads_and_passes_pack_check_without_a_warning(scaffold: Path) -> None:
    report = check_pack(scaffold)
    assert report.ok, report.problems
    assert report.warnings == []
    pack = load_pack(scaffold)
    assert [a.name for a in pack.registry] == ["acme.add_item"]
    [add] = pack.registry
    assert add.reconcile_func is not None and not add.idempotent
    assert pack.model.probe is not None and pack.model.ready_states == {"items"}
    assert set(pack.playbooks) == {"login", "dismiss", "cancel_form", "logout"}


def test_two_scaffolded_packs_load_side_by_side(tmp_path: Path) -> None:
    packs = load_packs([new_pack("one", tmp_path).path, new_pack("two", tmp_path).path])
    assert [a.name for p in packs for a in p.registry] == ["one.add_item", "two.add_item"]


def test_the_shipped_model_recognises_every_saved_screen_and_takes_nothing_for_ready() -> None:
    model = template() / "model"
    library = TemplateLibrary.load(model)
    screens = saved_screens(model)
    labels = {s.label for s in screens}
    assert labels == {*library.state_names, "unknown"}  # every state has a screenshot, and unknowns exist
    assert sum(s.label == "unknown" for s in screens) >= 2
    report = evaluate(library.classifier(), [(s, s.frame()) for s in screens])
    assert report.false_ready == [] and report.accuracy == 1.0, [o.describe() for o in report.wrong]


def test_the_shipped_model_is_recognised_by_icons_only() -> None:
    library = TemplateLibrary.load(template() / "model")
    kinds = {c["kind"] for s in library.states for c in s["checks"]}
    assert kinds == {"match"}  # no OCR, no pixel areas: the same on any machine, whatever its fonts


@pytest.mark.parametrize("name", ["Acme", "", "-acme", ".acme", "../acme", "a/b", "a b", "acmé", "x" * 65])
def test_new_refuses_a_name_that_is_not_a_pack_name_and_writes_nothing(tmp_path: Path, name: str) -> None:
    with pytest.raises(PackError) as refused:
        new_pack(name, tmp_path)
    assert "is not a pack name" in str(refused.value) and "\n" not in str(refused.value)
    assert list(tmp_path.iterdir()) == []


def test_new_refuses_a_directory_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "acme").mkdir()
    (tmp_path / "acme" / "notes.txt").write_text("mine")
    with pytest.raises(PackError, match="exists and is not empty"):
        new_pack("acme", tmp_path)
    assert [p.name for p in (tmp_path / "acme").iterdir()] == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["acme"]


def test_new_refuses_a_file_in_the_way_and_fills_an_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "acme").write_text("a file")
    with pytest.raises(PackError, match="is not a directory"):
        new_pack("acme", tmp_path)
    (tmp_path / "empty").mkdir()
    assert (new_pack("empty", tmp_path).path / "pack.toml").is_file()
    assert (new_pack("deeper", tmp_path / "a" / "b").path / "pack.toml").is_file()  # parents are made


def test_accounts_come_from_the_pack_or_the_caller(scaffold: Path) -> None:
    pack = load_pack(scaffold)
    name, creds = local_accounts(pack)
    assert name == "demo" and creds["demo"].username == "demo"  # [accounts] default, from [hooks] accounts
    name, creds = local_accounts(pack, username="robot", password="s3cret-pass")
    assert name == "robot" and creds["robot"].password == "s3cret-pass"
    assert local_accounts(pack, account="ops", username="robot", password="x")[0] == "ops"
    with pytest.raises(ConfigError, match="no account 'bob': the pack's demo accounts are demo"):
        local_accounts(pack, account="bob")
    with pytest.raises(ConfigError, match="--username needs the password"):
        local_accounts(pack, username="robot")
    with pytest.raises(ConfigError, match="without --username"):
        local_accounts(pack, password="x")


def test_a_pack_that_logs_in_without_demo_accounts_needs_one_given(tmp_path: Path) -> None:
    path = new_pack("bare", tmp_path).path
    manifest = path / "pack.toml"
    manifest.write_text(manifest.read_text().replace('accounts = "pack:demo_accounts"', "")
                        .replace('default = "demo"', ""))
    pack = load_pack(path)
    with pytest.raises(ConfigError, match=r"logs in \(\[accounts\] login = true\): give --username"):
        local_accounts(pack)
    manifest.write_text(manifest.read_text().replace("login = true", "login = false"))
    assert local_accounts(load_pack(path)) == (None, {})


def test_the_automation_is_found_with_or_without_the_packs_name(scaffold: Path) -> None:
    pack = load_pack(scaffold)
    assert find_automation(pack, "acme.add_item") is find_automation(pack, "add_item")
    with pytest.raises(PackError, match=r"pack acme has no automation 'remove_item' \(it offers: acme.add_item\)"):
        find_automation(pack, "remove_item")


async def test_try_refuses_bad_requests_before_any_display_starts(scaffold: Path, monkeypatch) -> None:
    def no_display(*args: object, **kwargs: object) -> None:
        raise AssertionError("a display was started")

    monkeypatch.setattr("deskfleet.agent.host.open_machine", no_display)
    pack = load_pack(scaffold)
    with pytest.raises(BusinessError, match=r"input rejected by acme\.add_item@1: .*quantity"):
        await try_automation(pack, "add_item", {"name": "Widget", "quantity": 0})
    with pytest.raises(PackError, match="no automation"):
        await try_automation(pack, "nope", {})
    with pytest.raises(ConfigError, match="no credentials for account 'bob'"):
        await try_automation(pack, "add_item", {"name": "Widget", "quantity": 1}, account="bob")
    demoehr = load_pack("demoehr")
    with pytest.raises(PackError, match=r"demoehr\.search_patient has no reconcile check"):
        await try_automation(demoehr, "search_patient", {"mrn": "A-1"}, reconcile=True)
