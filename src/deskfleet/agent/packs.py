"""Pack versions an agent installs when the orchestrator rolls one out (protocol 6).

Each version gets an environment of its own, under the agent's state directory::

    <state_dir>/packs/<name>/<version>/pack/           the archive's files (a directory pack)
    <state_dir>/packs/<name>/<version>/site/           its requirements ([pack] requires), pip --target
    <state_dir>/packs/<name>/<version>/installed.json  written last: the version is whole
    <state_dir>/packs/<name>/current                   the version this agent runs (read at start)

An install order is carried out in steps, each reported as a machine event: the archive
downloaded with the agent's key and its sha256 checked (``pack.installing``); unpacked and
its requirements installed in a scratch directory beside the final one; ``deskfleet pack
check`` run on it in a subprocess — a broken pack cannot take the agent down — with the
version's own ``site`` first on its path; only then the scratch directory renamed into
place (``pack.installed``). A version that fails any step leaves nothing behind and the
machine on its old version (``pack.install_failed`` with the stage and why). The agent
then loads the new version and switches its app to it only while no attempt holds the
machine, under the lock pre-flight and recycling take (``pack.switched``), and says hello
again so the orchestrator sees the version it runs.

The machines of one agent process share the environments: the first that is told to
install a version does the work, the others wait for it and switch on their own. Requirements
go to ``site`` with ``pip install --target`` (the agent's own packages stay as they are;
the pack's come first on ``sys.path``): they must not conflict with what the agent runs on,
and an agent process loads one version of a requirement at a time — a new version of a
requirement is picked up by restarting the agent, which loads the ``current`` version.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import packfile
from ..errors import DeskfleetError
from ..packs.loader import MANIFEST, Pack, PackError, load_pack
from ..protocol import Install

if TYPE_CHECKING:
    from .runtime import Agent, App

log = logging.getLogger(__name__)

MARKER = "installed.json"
#: seconds ``pack check`` may take on a new version
CHECK_TIMEOUT = 300.0
#: seconds installing a version's requirements may take
PIP_TIMEOUT = 900.0
#: seconds between looks for an idle moment to switch in
SWITCH_POLL = 0.2


class InstallFailed(DeskfleetError):
    def __init__(self, stage: str, why: str) -> None:
        super().__init__(f"{stage}: {why}")
        self.stage = stage
        self.why = why


@dataclass(frozen=True, slots=True)
class Installed:
    directory: Path  # the pack's files
    site: Path | None  # its requirements, if it has any


def environment(root: Path, name: str, version: str) -> Path:
    return root / name / version


def installed(root: Path, name: str, version: str, sha256: str | None = None) -> Installed | None:
    """The version's environment, if it was installed whole (with ``sha256``, if given)."""
    env = environment(root, name, version)
    try:
        marker = json.loads((env / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if sha256 is not None and marker.get("sha256") != sha256:
        return None
    site = env / "site"
    return Installed(env / "pack", site if site.is_dir() else None)


def current_ref(ref: str, state_dir: Path) -> str:
    """The pack an agent started with ``--pack ref`` loads: for a pack named by name (not a
    path), the version rolled out to it last (``<state_dir>/packs/<name>/current``) if one
    was installed; else ``ref`` itself."""
    path = Path(ref).expanduser()
    if os.sep in ref or ref.startswith(".") or (path / MANIFEST).is_file():
        return ref
    root = state_dir / "packs"
    try:
        version = (root / ref / "current").read_text().strip()
    except OSError:
        return ref
    found = installed(root, ref, version) if packfile.VERSION.match(version) else None
    if found is None:
        return ref
    _on_path(found.site)
    return str(found.directory)


def _on_path(site: Path | None) -> None:
    if site is not None and str(site) not in sys.path:
        sys.path.insert(0, str(site))


class PackInstaller:
    """Carries out ``install`` orders for the agents of one process. ``make_app(pack, old)``:
    the app a machine runs the new version as, on the old one's desktop."""

    def __init__(self, root: Path, make_app: Callable[[Pack, App], App], *, python: str = sys.executable,
                 check_timeout: float = CHECK_TIMEOUT) -> None:
        self.root = root
        self.make_app = make_app
        self.python = python
        self.check_timeout = check_timeout
        self._preparing: dict[tuple[str, str, str], asyncio.Task[Installed]] = {}
        self._loading: dict[str, asyncio.Future[Pack]] = {}  # an installed version's directory → the pack
        self._orders: dict[tuple[int, str], tuple[str, asyncio.Task[None]]] = {}  # (agent, pack) → version, task

    def order(self, agent: Agent, order: Install) -> None:
        """An order from the orchestrator: carried out in the background. A repeat of the order
        in hand is ignored; a newer version replaces one not yet switched to."""
        key = (id(agent), order.pack)
        running = self._orders.get(key)
        if running is not None and not running[1].done():
            if running[0] == order.version:
                return
            running[1].cancel()
        task = asyncio.get_running_loop().create_task(self._carry_out(agent, order))
        self._orders[key] = (order.version, task)

    async def _carry_out(self, agent: Agent, order: Install) -> None:
        base = {"pack": order.pack, "version": order.version, "sha256": order.sha256}
        app = next((a for a in agent.apps if a.name == order.pack), None)
        if app is None:
            await agent.report("pack.install_failed", {**base, "stage": "install", "why": (
                f"this machine does not run pack {order.pack} (it runs: "
                f"{', '.join(a.name or '?' for a in agent.apps)})")})
            return
        if app.version == order.version:
            await agent.report("pack.switched", {**base, "from": app.version, "already": True})
            agent.say_hello_again()
            return
        t0 = time.monotonic()
        await agent.report("pack.installing", {**base, "from": app.version, "size": order.size})
        try:
            done = await self.prepare(agent, order)
        except InstallFailed as exc:
            log.warning("pack %s %s not installed (%s): %s", order.pack, order.version, exc.stage, exc.why,
                        extra={"machine": agent.machine_id})
            await agent.report("pack.install_failed", {**base, "stage": exc.stage, "why": exc.why[:1000],
                                                       "from": app.version})
            return
        await agent.report("pack.installed", {**base, "path": str(done.directory),
                                              "seconds": round(time.monotonic() - t0, 3)})
        try:
            _on_path(done.site)
            pack = await self._load(done)
            new_app = self.make_app(pack, app)
        except (PackError, DeskfleetError, OSError) as exc:
            await agent.report("pack.install_failed", {**base, "stage": "load", "why": str(exc)[:1000],
                                                       "from": app.version})
            return
        waited = time.monotonic()
        while not await agent.switch_app(order.pack, new_app):
            await asyncio.sleep(SWITCH_POLL)  # an attempt holds the machine: switch once it ends
        with contextlib.suppress(OSError):
            (self.root / order.pack / "current").write_text(order.version)
        log.info("switched to pack %s %s (from %s)", order.pack, order.version, app.version,
                 extra={"machine": agent.machine_id})
        await agent.report("pack.switched", {**base, "from": app.version,
                                             "waited_for_idle": round(time.monotonic() - waited, 3)})
        agent.say_hello_again()

    async def _load(self, done: Installed) -> Pack:
        """The installed version, loaded once per process (its machines share it, as they share
        the packs the agent started with) and off the event loop: importing a pack's modules and
        reading its model takes long enough to hold up the heartbeats of the process's other
        machines, whose runs go on meanwhile."""
        key = str(done.directory)
        task = self._loading.get(key)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = self._loading[key] = asyncio.ensure_future(asyncio.to_thread(load_pack, done.directory))
        return await asyncio.shield(task)

    async def prepare(self, agent: Agent, order: Install) -> Installed:
        """The version installed and checked, once per process (shared by its machines)."""
        found = installed(self.root, order.pack, order.version, order.sha256)
        if found is not None:
            return found
        key = (order.pack, order.version, order.sha256)
        task = self._preparing.get(key)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = self._preparing[key] = asyncio.get_running_loop().create_task(self._prepare(agent, order))
        return await asyncio.shield(task)

    async def _prepare(self, agent: Agent, order: Install) -> Installed:
        if not (packfile.NAME.match(order.pack) and packfile.VERSION.match(order.version)):
            raise InstallFailed("install", f"{order.pack!r} {order.version!r} is not a pack name and version")
        try:
            data = await agent.fetch(order.url)
        except Exception as exc:
            raise InstallFailed("download", f"{type(exc).__name__}: {exc}") from None
        digest = packfile.sha256(data)
        if digest != order.sha256:
            raise InstallFailed("download", f"the archive's sha256 is {digest}, not {order.sha256} "
                                            f"({len(data)} bytes of {order.size}): cut short or corrupted on the way")
        final = environment(self.root, order.pack, order.version)
        scratch = final.parent / f".{order.version}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        try:
            try:
                info = await asyncio.to_thread(packfile.extract, data, scratch / "pack")
            except (DeskfleetError, OSError) as exc:
                raise InstallFailed("unpack", str(exc)) from None
            if (info.name, info.version) != (order.pack, order.version):
                raise InstallFailed("unpack", f"the archive holds {info.name} {info.version}, not "
                                              f"{order.pack} {order.version}")
            site = None
            if info.requires:
                site = scratch / "site"
                await self._run("requires", [self.python, "-m", "pip", "install", "--no-input",
                                             "--disable-pip-version-check", "--target", str(site), *info.requires],
                                PIP_TIMEOUT, site=None)
            await self._run("check", [self.python, "-m", "deskfleet", "--log-level", "warning", "pack", "check",
                                      str(scratch / "pack")], self.check_timeout, site=site)
            (scratch / MARKER).write_text(json.dumps({"sha256": order.sha256, "installed_at": time.time(),
                                                      "requires": info.requires}))
            if final.exists() and installed(self.root, order.pack, order.version, order.sha256) is None:
                shutil.rmtree(final)  # a version left without its marker: never whole
            try:
                scratch.rename(final)
            except OSError as exc:  # another agent process on this state directory was first
                if installed(self.root, order.pack, order.version, order.sha256) is None:
                    raise InstallFailed("install", f"cannot move it into {final}: {exc}") from None
        finally:
            if scratch.exists():
                shutil.rmtree(scratch, ignore_errors=True)
        found = installed(self.root, order.pack, order.version, order.sha256)
        assert found is not None
        return found

    async def _run(self, stage: str, argv: list[str], timeout: float, *, site: Path | None) -> None:
        """A step in a subprocess; InstallFailed with the last lines it wrote if it fails."""
        env = dict(os.environ)
        if site is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT, env=env)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise InstallFailed(stage, f"did not finish within {timeout:g}s") from None
        except asyncio.CancelledError:
            proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            lines = [line for line in out.decode(errors="replace").splitlines() if line.strip()]
            problems = [line for line in lines if line.startswith(("problem:", "deskfleet:", "ERROR"))] or lines
            raise InstallFailed(stage, "; ".join(problems[-5:])[:1000] or f"exit status {proc.returncode}")
