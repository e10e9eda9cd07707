"""An agent installing a pack version (``agent.packs``): the real installer and the real
``Agent.switch_app``, the archive served by a fake download. A download cut short, a hash
that differs or a version whose ``pack check`` fails leaves nothing installed and the app
on its old version, with the reason reported; a good one is installed whole, and switched to
only once the machine is idle."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from deskfleet import packfile
from deskfleet.agent.packs import PackInstaller, current_ref, installed
from deskfleet.agent.runtime import Agent, AgentConfig, App
from deskfleet.packs.archive import build
from deskfleet.packs.loader import Pack, load_pack
from deskfleet.protocol import Install
from simpacks import sim_pack


class Desk:
    """A desktop the installer never touches (the new version runs on the old one's)."""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, bytes]]:
    root = tmp_path_factory.mktemp("packs")
    out = {}
    for version, broken in (("1.0.0", False), ("2.0.0", False), ("3.0.0", True)):
        src = sim_pack(root / version, version, broken=broken)
        out[version] = (src, build(src, root / "dist").path.read_bytes())
    return out


def _app(pack: Pack, desktop: Any) -> App:
    return App(desktop, pack.registry, pack.model, pack.name, version=pack.version)


class Harness:
    def __init__(self, state: Path, v1: Path, archives: dict[str, bytes], served: dict[str, bytes] | None = None):
        self.installer = PackInstaller(state / "packs", lambda pack, old: _app(pack, old.desktop))
        self.agent = Agent(AgentConfig(servers=["http://127.0.0.1:9"], machine="m1"), [_app(load_pack(v1), Desk())],
                           installer=self.installer)
        self.reports: list[tuple[str, dict[str, Any]]] = []
        self.hellos = 0
        served = served if served is not None else archives

        async def report(kind: str, data: dict[str, Any]) -> None:
            self.reports.append((kind, data))

        async def fetch(url: str) -> bytes:
            version = url.split("/")[-2]
            return served[version]

        def hello() -> None:
            self.hellos += 1

        self.agent.report = report  # type: ignore[method-assign]
        self.agent.fetch = fetch  # type: ignore[method-assign]
        self.agent.say_hello_again = hello  # type: ignore[method-assign]
        self.archives = archives

    def order(self, version: str) -> Install:
        data = self.archives[version]
        return Install(pack="simehr", version=version, sha256=packfile.sha256(data), size=len(data),
                       url=f"/agent/v1/packs/simehr/{version}/archive")

    async def carry_out(self, version: str) -> list[str]:
        self.installer.order(self.agent, self.order(version))
        _, task = self.installer._orders[(id(self.agent), "simehr")]
        await asyncio.wait_for(task, 120)
        return [k for k, _ in self.reports]

    @property
    def version(self) -> str | None:
        return self.agent.apps[0].version


async def test_a_good_version_is_installed_whole_then_switched_to_once_idle(tmp_path: Path, built: Any) -> None:
    archives = {v: data for v, (_, data) in built.items()}
    h = Harness(tmp_path, built["1.0.0"][0], archives)
    busy = object()
    h.agent._current = busy  # type: ignore[assignment]  # an attempt holds the machine
    h.installer.order(h.agent, h.order("2.0.0"))
    _, task = h.installer._orders[(id(h.agent), "simehr")]
    for _ in range(600):
        if ("pack.installed" in [k for k, _ in h.reports]) or task.done():
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    assert [k for k, _ in h.reports] == ["pack.installing", "pack.installed"], h.reports
    assert h.version == "1.0.0" and not task.done(), "no switch while an attempt holds the machine"
    h.installer.order(h.agent, h.order("2.0.0"))  # a repeat of the order in hand: ignored
    assert h.installer._orders[(id(h.agent), "simehr")][1] is task
    h.agent._current = None
    await asyncio.wait_for(task, 10)
    assert [k for k, _ in h.reports][-1] == "pack.switched" and h.hellos == 1
    assert h.version == "2.0.0" and h.agent.registry.get("simehr.which") is not None
    env = installed(tmp_path / "packs", "simehr", "2.0.0", packfile.sha256(archives["2.0.0"]))
    assert env is not None and (env.directory / "pack.toml").is_file()
    # the next start of an agent given --pack simehr runs what was rolled out to it
    assert current_ref("simehr", tmp_path) == str(env.directory)
    assert current_ref(str(built["1.0.0"][0]), tmp_path) == str(built["1.0.0"][0])  # a path stays a path


@pytest.mark.parametrize("served", ["truncated", "another", "broken"])
async def test_a_failed_install_leaves_nothing_and_the_machine_on_its_old_version(
        tmp_path: Path, built: Any, served: str) -> None:
    archives = {v: data for v, (_, data) in built.items()}
    version = "3.0.0" if served == "broken" else "2.0.0"
    wire = dict(archives)
    if served == "truncated":
        wire["2.0.0"] = archives["2.0.0"][: len(archives["2.0.0"]) // 3]
    elif served == "another":
        wire["2.0.0"] = archives["1.0.0"]
    h = Harness(tmp_path, built["1.0.0"][0], archives, served=wire)
    kinds = await h.carry_out(version)
    assert kinds == ["pack.installing", "pack.install_failed"], h.reports
    failed = h.reports[-1][1]
    if served == "broken":
        assert failed["stage"] == "check" and "ghost" in failed["why"], failed
    else:
        assert failed["stage"] == "download" and "sha256" in failed["why"], failed
    assert h.version == "1.0.0" and h.hellos == 0
    assert not (tmp_path / "packs" / "simehr" / version).exists()
    left = tmp_path / "packs" / "simehr"
    assert not left.exists() or list(left.iterdir()) == [], "no scratch directory is left behind"
    assert current_ref("simehr", tmp_path) == "simehr"


async def test_a_newer_order_replaces_one_not_yet_switched_to(tmp_path: Path, built: Any) -> None:
    archives = {v: data for v, (_, data) in built.items()}
    h = Harness(tmp_path, built["1.0.0"][0], archives)
    h.agent._current = object()  # type: ignore[assignment]
    h.installer.order(h.agent, h.order("2.0.0"))
    first = h.installer._orders[(id(h.agent), "simehr")][1]
    for _ in range(600):
        if "pack.installed" in [k for k, _ in h.reports]:
            break
        await asyncio.sleep(0.05)
    h.installer.order(h.agent, h.order("1.0.0"))  # a rollback arrives before the machine was idle
    await asyncio.sleep(0)
    assert first.cancelled() or first.done()
    h.agent._current = None
    await asyncio.wait_for(h.installer._orders[(id(h.agent), "simehr")][1], 120)
    assert h.version == "1.0.0" and h.reports[-1][0] == "pack.switched" and h.reports[-1][1].get("already")


def test_archives_are_reproducible_and_refuse_paths_that_escape(tmp_path: Path, built: Any) -> None:
    src, data = built["2.0.0"]
    again = build(src, tmp_path / "again").path.read_bytes()
    assert again == data and packfile.sha256(again) == packfile.sha256(data)
    info = packfile.read(data)
    assert (info.name, info.version) == ("simehr", "2.0.0")
    assert "simehr.which" in {a["name"] for a in info.automations}
    evil = packfile.write([("pack.toml", b"", False), ("a/../../x", b"", False)])
    with pytest.raises(Exception, match="leaves its directory"):
        packfile.extract(evil, tmp_path / "x")
    assert not (tmp_path / "x" / "x").exists() and not (tmp_path / "x").exists()
