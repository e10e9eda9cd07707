"""LocalProvider against real processes: a small script as the machine, then a real agent.

The script (written to the test's directory) says ``up PID LABELS`` when it starts, so the
tests read from a machine's log which processes it ran; its name decides what else it
does — crash at once, ignore SIGTERM, or start a child in its group and one in a session
of its own (as the agent starts Xvfb). Whether a process lives is read from /proc, as the
provider reads it. The last test runs ``deskfleet agent`` as the machine against a live
orchestrator and fences it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from deskfleet.errors import ConfigError
from deskfleet.providers import (
    Capabilities,
    LocalProvider,
    MachineNotFound,
    MachineSpec,
    ProviderError,
    ProviderMachine,
    ProviderState,
)
from deskfleet.providers.local import running
from support import LiveServer, eventually

S = ProviderState

MACHINE = """\
import os, signal, subprocess, sys, time
name = sys.argv[1]
print("up", os.getpid(), os.environ.get("DESKFLEET_MACHINE_LABELS"), os.environ.get("DESKFLEET_BOOT_ID"), flush=True)
if name.startswith("crash"):
    print("last words")
    sys.exit(3)
if name.startswith("stubborn"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if name.startswith("family"):
    sleep = [sys.executable, "-c", "import time; time.sleep(600)"]
    child = subprocess.Popen(sleep)
    escaped = subprocess.Popen(sleep, start_new_session=True)
    print("family", child.pid, escaped.pid, flush=True)
time.sleep(600)
"""


def spec(name: str = "desk-1", pool: str = "ehr", **kw: Any) -> MachineSpec:
    return MachineSpec(name=name, pool=pool, **kw)


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Callable[..., LocalProvider]]:
    """Providers over ``tmp_path/local`` running the script; every machine left is fenced."""
    script = tmp_path / "machine.py"
    script.write_text(MACHINE)
    made: list[LocalProvider] = []

    def make_provider(**kw: Any) -> LocalProvider:
        command = kw.pop("command", [sys.executable, str(script), "{name}"])
        kw.setdefault("state_dir", tmp_path / "local")
        kw.setdefault("boot_grace", 0.3)
        kw.setdefault("stop_timeout", 5.0)
        p = LocalProvider(command, **kw)
        made.append(p)
        return p

    yield make_provider
    for p in made:
        for m in await p.list():
            await p.power_off(m.id, token=f"cleanup-{m.id}-{time.monotonic()}")


def log_of(p: LocalProvider, name: str) -> list[str]:
    path = p.state_dir / "machines" / name / "machine.log"
    return path.read_text().splitlines() if path.exists() else []


async def pids(p: LocalProvider, name: str, count: int = 1) -> list[int]:
    """The pids of the machine's processes so far, once it has said ``up`` ``count`` times."""
    def ups() -> list[int]:
        return [int(line.split()[1]) for line in log_of(p, name) if line.startswith("up ")]

    await eventually(lambda: len(ups()) >= count, timeout=10)
    return ups()


async def family(p: LocalProvider, name: str) -> tuple[int, int]:
    """The pids of a ``family`` machine's child in its group and child in a session of its own."""
    lines = await eventually(lambda: [x for x in log_of(p, name) if x.startswith("family ")], timeout=10)
    child, escaped = map(int, lines[-1].split()[1:])
    return child, escaped


async def reaches(p: LocalProvider, machine_id: str, state: ProviderState) -> ProviderMachine:
    deadline = time.monotonic() + 10
    while (m := await p.get(machine_id)).state != state:
        assert time.monotonic() < deadline, f"{machine_id} never {state}: {m}"
        await asyncio.sleep(0.05)
    return m


# -- a machine's life ---------------------------------------------------------------------------


async def test_a_machine_boots_runs_and_a_second_provider_finds_and_destroys_it(
        make: Callable[..., LocalProvider]) -> None:
    p = make()
    assert p.capabilities == Capabilities(fence=True, hibernate=False, warm_pool=False)
    before = time.time()
    m = await p.create(spec(labels={"gpu": "no"}, tags={"owner": "ops"}), token="c1")
    assert (m.id, m.name, m.pool, m.state, m.tags, m.detail) == (
        "desk-1", "desk-1", "ehr", S.BOOTING, {"owner": "ops"}, "")
    assert before <= m.created_at == m.state_since <= time.time()
    assert (await p.create(spec(), token="c1")).id == "desk-1"  # the token: no second machine

    await asyncio.sleep(0.6)
    now_up = await p.get("desk-1")  # running since its boot grace ended, not since it was read
    assert now_up.state == S.RUNNING
    assert now_up.state_since == pytest.approx(m.created_at + 0.3, abs=0.05)
    [pid] = await pids(p, "desk-1")  # one process: the repeated create started none
    assert log_of(p, "desk-1")[0].startswith(f'up {pid} {json.dumps({"gpu": "no"})} ')
    assert running(pid)

    other = make()  # as after a restart of the server: the same state directory
    assert [(x.id, x.state, x.created_at) for x in await other.list()] == [
        ("desk-1", S.RUNNING, m.created_at)]
    await other.destroy("desk-1", token="d1")
    assert not running(pid)
    assert (await other.get("desk-1")).state == S.TERMINATED
    assert (await p.get("desk-1")).state == S.TERMINATED
    assert await other.list() == []
    assert not (p.state_dir / "machines" / "desk-1").exists()

    # the name is free again; the destroy token, repeated, does not destroy the new machine
    await other.create(spec(), token="c2")
    [new] = await pids(other, "desk-1")
    await other.destroy("desk-1", token="d1")
    assert running(new) and (await other.get("desk-1")).state in (S.BOOTING, S.RUNNING)


async def test_stop_start_reboot_tag_and_pools(make: Callable[..., LocalProvider]) -> None:
    p = make()
    await p.create(spec(), token="c1")
    await p.create(spec("desk-2", pool="billing"), token="c2")
    assert [m.id for m in await p.list()] == ["desk-1", "desk-2"]
    assert [m.id for m in await p.list(pool="billing")] == ["desk-2"]
    await p.tag("desk-1", {"drain": "yes"}, token="t1")
    await p.tag("desk-1", {"drain": "no"}, token="t1")  # repeated: not again
    assert (await p.get("desk-1")).tags == {"drain": "yes"}

    [first] = await pids(p, "desk-1")
    await p.stop("desk-1", token="s1")
    stopped = await p.get("desk-1")
    assert (stopped.state, stopped.detail) == (S.STOPPED, "")
    assert not running(first)
    with pytest.raises(ProviderError, match="cannot reboot desk-1, it is stopped") as refused:
        await p.reboot("desk-1", token="r0")
    assert not refused.value.retryable

    await p.start("desk-1", token="st1")
    assert (await p.get("desk-1")).state == S.BOOTING
    second = (await pids(p, "desk-1", 2))[-1]
    assert second != first and running(second)

    await p.reboot("desk-1", token="r1")
    assert (await p.get("desk-1")).state == S.REBOOTING
    third = (await pids(p, "desk-1", 3))[-1]
    assert not running(second) and running(third)
    await reaches(p, "desk-1", S.RUNNING)
    await p.reboot("desk-1", token="r1")  # repeated: no fourth process
    assert len(await pids(p, "desk-1")) == 3

    with pytest.raises(ProviderError, match="token 'r1' was used for reboot of desk-1") as reused:
        await p.stop("desk-2", token="r1")
    assert not reused.value.retryable
    with pytest.raises(ProviderError, match="cannot hibernate"):
        await p.stop("desk-2", token="h1", hibernate=True)


async def test_an_update_runs_its_command_while_the_machine_is_updating_and_each_boot_has_its_own_id(
        make: Callable[..., LocalProvider], tmp_path: Path) -> None:
    assert not make().capabilities.update  # no update command, no updates
    gate = tmp_path / "gate"
    update = [sys.executable, "-c", "import pathlib, sys, time\n"
              "while not pathlib.Path(sys.argv[2]).exists(): time.sleep(0.02)\n"
              "pathlib.Path(sys.argv[1], 'updated').write_text('yes')\n"
              "sys.exit(1 if 'broken' in sys.argv[1] else 0)", "{state_dir}", str(gate)]
    p = make(update_command=update)
    assert p.capabilities.update
    await p.create(spec(), token="c1")
    await reaches(p, "desk-1", S.RUNNING)
    [first] = await pids(p, "desk-1")
    updating = asyncio.ensure_future(p.update("desk-1", token="u1"))
    await reaches(p, "desk-1", S.UPDATING)
    assert running(first)  # the machine stays up while it updates
    gate.touch()
    await updating
    assert (await p.get("desk-1")).state == S.RUNNING
    assert (p.state_dir / "machines" / "desk-1" / "updated").read_text() == "yes"
    (p.state_dir / "machines" / "desk-1" / "updated").unlink()
    await p.update("desk-1", token="u1")  # repeated: not run again
    assert not (p.state_dir / "machines" / "desk-1" / "updated").exists()
    await p.reboot("desk-1", token="r1")
    await pids(p, "desk-1", 2)
    boots = [line.split()[-1] for line in log_of(p, "desk-1") if line.startswith("up ")]
    assert len(boots) == 2 and len(set(boots)) == 2 and all(len(b) == 16 for b in boots)

    await p.create(spec("broken-1"), token="c2")
    await reaches(p, "broken-1", S.RUNNING)
    await p.update("broken-1", token="u2")
    failed = await p.get("broken-1")
    assert (failed.state, failed.detail) == (S.FAILED, "the update exited with code 1")
    with pytest.raises(ProviderError, match="cannot update broken-1, it is failed"):
        await p.update("broken-1", token="u3")


async def test_a_machine_that_ignores_sigterm_is_killed_after_stop_timeout(
        make: Callable[..., LocalProvider]) -> None:
    p = make(stop_timeout=0.5)
    await p.create(spec("stubborn-1"), token="c1")
    [pid] = await pids(p, "stubborn-1")
    began = time.monotonic()
    await p.stop("stubborn-1", token="s1")
    assert time.monotonic() - began >= 0.5
    assert (await p.get("stubborn-1")).state == S.STOPPED and not running(pid)


async def test_a_machine_whose_process_ends_on_its_own_has_failed(
        make: Callable[..., LocalProvider]) -> None:
    p = make()
    await p.create(spec("crash-1"), token="c1")
    failed = await reaches(p, "crash-1", S.FAILED)
    assert failed.detail == "exited with code 3: last words"

    await p.create(spec("family-1"), token="c2")
    [pid] = await pids(p, "family-1")
    child, escaped = await family(p, "family-1")
    os.kill(pid, signal.SIGTERM)
    failed = await reaches(p, "family-1", S.FAILED)
    assert failed.detail.startswith("killed by signal 15 (SIGTERM): family ")
    assert not running(child)  # what a crashed machine left in its group goes with it
    # what left the group is out of reach once its parent is dead (docs/providers.md says so)
    with contextlib.suppress(ProcessLookupError):
        os.kill(escaped, signal.SIGKILL)

    await p.start("family-1", token="st1")  # a failed machine starts again
    assert (await p.get("family-1")).state == S.BOOTING
    assert running((await pids(p, "family-1", 2))[-1])


async def test_a_machine_started_by_another_process_is_watched_without_its_exit_status(
        make: Callable[..., LocalProvider], tmp_path: Path) -> None:
    """The server restarted: its machines are no longer its children."""
    state_dir = tmp_path / "local"
    code = textwrap.dedent(f"""
        import asyncio, sys
        from deskfleet.providers import LocalProvider, MachineSpec
        p = LocalProvider([sys.executable, {str(tmp_path / "machine.py")!r}, "{{name}}"],
                          state_dir={str(state_dir)!r})
        asyncio.run(p.create(MachineSpec("desk-9", "ehr"), token="c9"))
    """)
    make()  # writes the script
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    p = make()
    assert (await p.get("desk-9")).state in (S.BOOTING, S.RUNNING)
    [pid] = await pids(p, "desk-9")
    os.kill(pid, signal.SIGKILL)
    failed = await reaches(p, "desk-9", S.FAILED)
    assert failed.detail.startswith("exited (its exit status went to the process that started it)")



async def test_a_recycled_pid_is_neither_taken_for_the_machine_nor_killed(
        make: Callable[..., LocalProvider]) -> None:
    p = make()
    await p.create(spec(), token="c1")
    [pid] = await pids(p, "desk-1")
    # the state file now names a process with the machine's pid but another start time: the
    # kernel gave the pid of the machine, long dead, to someone else's process
    state_file = p.state_dir / "local-provider.json"
    state = json.loads(state_file.read_text())
    state["machines"]["desk-1"]["pid_start"] -= 1
    state_file.write_text(json.dumps(state))
    failed = await p.get("desk-1")
    assert failed.state == S.FAILED and failed.detail.startswith("exited")
    await p.power_off("desk-1", token="f1")
    assert running(pid)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)  # ours, as the test started it

async def test_names_templates_and_unknown_machines(make: Callable[..., LocalProvider],
                                                    tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\{nmae\}"):
        make(command=[sys.executable, "{nmae}"])
    with pytest.raises(ConfigError, match="empty"):
        make(command=[])
    make(command=["echo", "{{literal}}", "{name}", "{pool}", "{image}", "{state_dir}"])

    p = make()
    await p.create(spec(), token="c1")
    with pytest.raises(ProviderError, match="a machine named desk-1 already exists") as clash:
        await p.create(spec(pool="billing"), token="c2")
    assert not clash.value.retryable
    for bad in ("../x", "-x", "a b", ""):
        with pytest.raises(ProviderError, match="is not a machine name"):
            await p.create(spec(bad), token=f"bad-{bad}")
    with pytest.raises(MachineNotFound):
        await p.get("nope")
    with pytest.raises(MachineNotFound):
        await p.stop("nope", token="s1")
    with pytest.raises(MachineNotFound):
        await p.power_off("nope", token="f1")

    broken = make(command=[str(tmp_path / "no-such-command")], state_dir=tmp_path / "other")
    with pytest.raises(ProviderError, match=r"cannot start desk-1: .*no-such-command") as failed:
        await broken.create(spec(), token="c1")
    assert not failed.value.retryable
    assert await broken.list() == []


# -- the fence ----------------------------------------------------------------------------------


async def test_power_off_kills_the_whole_machine_at_once_even_when_paused(
        make: Callable[..., LocalProvider]) -> None:
    p = make(stop_timeout=5)
    await p.create(spec("family-1"), token="c1")
    [pid] = await pids(p, "family-1")
    child, escaped = await family(p, "family-1")
    assert running(pid) and running(child) and running(escaped)
    os.killpg(pid, signal.SIGSTOP)  # the machine is paused: it could not act on a SIGTERM
    os.kill(escaped, signal.SIGSTOP)

    began = time.monotonic()
    await p.power_off("family-1", token="f1")
    assert time.monotonic() - began < 1.0  # not a graceful stop: no waiting for stop_timeout
    assert not running(pid) and not running(child) and not running(escaped)
    fenced = await p.get("family-1")
    assert (fenced.state, fenced.detail) == (S.STOPPED, "powered off (fenced)")
    await p.power_off("family-1", token="f1")

    await p.start("family-1", token="st1")  # a fenced machine can be started again
    assert running((await pids(p, "family-1", 2))[-1])


async def test_a_paused_machine_still_stops_gracefully(make: Callable[..., LocalProvider]) -> None:
    p = make(stop_timeout=5)
    await p.create(spec(), token="c1")
    [pid] = await pids(p, "desk-1")
    os.killpg(pid, signal.SIGSTOP)
    began = time.monotonic()
    await p.stop("desk-1", token="s1")
    assert time.monotonic() - began < 2.0  # SIGCONT let it act on the SIGTERM: no SIGKILL wait
    assert not running(pid)


# -- a real agent -------------------------------------------------------------------------------


async def test_a_real_agent_enrols_as_name_01_and_the_fence_disconnects_it(
        live_server: LiveServer, tmp_path: Path) -> None:
    token_file = tmp_path / "enrolment.token"
    token_file.write_text(live_server.token)
    p = LocalProvider(
        [sys.executable, "-m", "deskfleet", "agent", "--orchestrator", live_server.url,
         "--pack", "simehr", "--desktop", "sim", "--machine", "{name}", "--count", "1",
         "--pool", "{pool}", "--enrolment-token-file", str(token_file),
         "--state-dir", "{state_dir}", "--sim-backend", str(tmp_path / "ehr.db"),
         "--screenshots", "none"],
        state_dir=tmp_path / "local", stop_timeout=5)
    view = live_server.view()

    def enrolled() -> dict[str, Any]:
        return {m.id: m for m in view.list_machines()}

    await p.create(spec("sim-a", pool="ehr"), token="c1")
    try:
        agent = await eventually(lambda: (m := enrolled().get("sim-a-01")) and m.connected and m,
                                 timeout=20)
        assert agent.pool == "ehr" and list(enrolled()) == ["sim-a-01"]
        await p.power_off("sim-a", token="f1")
        await eventually(lambda: not enrolled()["sim-a-01"].connected, timeout=10)
    finally:
        await p.power_off("sim-a", token="cleanup")
