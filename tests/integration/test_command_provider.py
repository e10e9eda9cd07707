"""CommandProvider against real processes: the reference hooks we ship, and hooks that fail.

The lifecycle runs the scripts in ``examples/providers/command-hooks/`` exactly as a user
would (a directory of hooks, or the one script given the operation), over a JSON state
file in the test's directory. Faults are small shell hooks put in place of one of them:
exit 75, exit 3, any other exit with a long stderr, a hook that hangs with a child of its
own, a missing or malformed answer, a missing hook.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from deskfleet.errors import ConfigError
from deskfleet.providers import (
    Capabilities,
    CommandProvider,
    MachineNotFound,
    MachineSpec,
    ProviderError,
    ProviderState,
    Retrying,
)
from deskfleet.providers.base import OPS
from deskfleet.providers.command import KILL_GRACE

S = ProviderState
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "providers" / "command-hooks"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    # the hooks' "#!/usr/bin/env python3" finds this interpreter first
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {"DESKFLEET_HOOKS_STATE": str(tmp_path / "state.json"), "PATH": path}


@pytest.fixture
def hooks(tmp_path: Path) -> Path:
    """A copy of the reference hooks, for a test to break one of them."""
    return Path(shutil.copytree(EXAMPLE, tmp_path / "hooks", symlinks=True))


def write_hook(directory: Path, op: str, body: str) -> Path:
    path = directory / op
    path.unlink(missing_ok=True)  # a link to hooks.py: replace the link, not the script
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def spec(name: str = "desk-1", pool: str = "ehr", **kw: object) -> MachineSpec:
    return MachineSpec(name=name, pool=pool, **kw)  # type: ignore[arg-type]


async def test_the_reference_hooks_run_a_machines_whole_life(env: dict[str, str]) -> None:
    p = CommandProvider(EXAMPLE, name="lab", env=env)
    assert p.capabilities == Capabilities(fence=True, update=True)
    before = time.time()
    m = await p.create(spec(tags={"owner": "ops"}, labels={"gpu": "no"}), token="c1")
    assert (m.name, m.pool, m.state, m.tags, m.detail) == ("desk-1", "ehr", S.RUNNING, {"owner": "ops"}, "")
    assert before <= m.created_at <= time.time() and m.state_since == m.created_at
    other = await p.create(spec("desk-2", pool="billing"), token="c2")
    assert [x.id for x in await p.list()] == [m.id, other.id]
    assert [x.id for x in await p.list(pool="billing")] == [other.id]

    await p.tag(m.id, {"drain": "yes"}, token="t1")
    assert (await p.get(m.id)).tags == {"owner": "ops", "drain": "yes"}
    await p.stop(m.id, token="s1")
    assert (await p.get(m.id)).state == S.STOPPED
    await p.start(m.id, token="st1")
    running = await p.get(m.id)
    assert running.state == S.RUNNING and running.state_since > m.state_since
    await p.update(m.id, token="u1")  # the reference "hypervisor" applies updates at once
    updated = await p.get(m.id)
    assert updated.state == S.RUNNING and updated.state_since > running.state_since
    await p.reboot(m.id, token="r1")
    assert (await p.get(m.id)).state_since > updated.state_since
    await p.power_off(m.id, token="f1")
    got = await p.get(m.id)
    assert (got.state, got.detail) == (S.STOPPED, "powered off")
    await p.destroy(m.id, token="d1")
    assert (await p.get(m.id)).state == S.TERMINATED
    with pytest.raises(ProviderError, match=r"cannot start .* terminated") as err:
        await p.start(m.id, token="st2")
    assert not err.value.retryable


async def test_one_command_with_the_operation_as_argument(env: dict[str, str]) -> None:
    p = CommandProvider([sys.executable, str(EXAMPLE / "hooks.py")], env=env)
    assert not p.capabilities.fence and not p.capabilities.update  # neither is assumed of one command
    m = await p.create(spec(), token="c")
    assert (await p.get(m.id)).state == S.RUNNING
    with pytest.raises(ProviderError, match="no power_off hook") as err:
        await p.power_off(m.id, token="f")
    assert not err.value.retryable
    fencing = CommandProvider([sys.executable, str(EXAMPLE / "hooks.py")], env=env,
                              ops=[*OPS], hibernate=True)
    assert fencing.capabilities == Capabilities(fence=True, hibernate=True, update=True)
    await fencing.stop(m.id, token="h", hibernate=True)
    assert (await fencing.get(m.id)).detail == "hibernated"
    await fencing.power_off(m.id, token="f")
    assert (await fencing.get(m.id)).detail == "powered off"


async def test_a_token_acts_once_across_calls(env: dict[str, str]) -> None:
    p = CommandProvider(EXAMPLE, env=env)
    first = await p.create(spec(), token="same")
    again = await p.create(spec(), token="same")
    assert again.id == first.id and len(await p.list()) == 1
    await p.stop(first.id, token="stop-1")
    await p.start(first.id, token="start-1")
    await p.stop(first.id, token="stop-1")  # a late retry of the first stop
    assert (await p.get(first.id)).state == S.RUNNING
    with pytest.raises(ProviderError, match="token 'stop-1' was used for stop"):
        await p.reboot(first.id, token="stop-1")


async def test_the_request_arrives_on_stdin_and_the_token_in_the_environment(
        hooks: Path, env: dict[str, str], tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    write_hook(hooks, "tag", f'cat > {seen}.json\nprintf "%s %s" "$DESKFLEET_TOKEN" "$DESKFLEET_OP" > {seen}.env\n')
    p = CommandProvider(hooks, env=env)
    await p.tag("vm-7", {"a": "b"}, token="tok-1")
    assert json.loads(seen.with_suffix(".json").read_text()) == {
        "op": "tag", "token": "tok-1", "machine_id": "vm-7", "tags": {"a": "b"}}
    assert seen.with_suffix(".env").read_text() == "tok-1 tag"


async def test_exit_75_is_a_retryable_failure_with_stderr_as_its_message(
        hooks: Path, env: dict[str, str]) -> None:
    write_hook(hooks, "start", 'echo "connecting to vcenter" >&2\necho "throttled: try later" >&2\nexit 75\n')
    p = CommandProvider(hooks, name="vsphere", env=env)
    with pytest.raises(ProviderError) as err:
        await p.start("vm-1", token="s")
    assert err.value.retryable and not isinstance(err.value, MachineNotFound)
    assert str(err.value) == "vsphere: start of vm-1 failed (exit 75): connecting to vcenter | throttled: try later"


async def test_exit_3_is_not_found(env: dict[str, str]) -> None:
    p = CommandProvider(EXAMPLE, env=env)
    with pytest.raises(MachineNotFound, match="no machine 'vm-0404'") as err:
        await p.get("vm-0404")
    assert err.value.machine_id == "vm-0404" and not err.value.retryable
    with pytest.raises(MachineNotFound):
        await p.destroy("vm-0404", token="d")


async def test_any_other_exit_is_permanent_and_its_message_is_bounded(hooks: Path, env: dict[str, str]) -> None:
    write_hook(hooks, "create", 'i=0; while [ $i -lt 200 ]; do echo "noise $i" >&2; i=$((i+1)); done\n'
                                'echo "quota of 10 VMs reached for pool ehr" >&2\nexit 1\n')
    write_hook(hooks, "reboot", 'head -c 20000 /dev/zero | tr "\\0" x >&2\nexit 2\n')
    p = CommandProvider(hooks, env=env)
    with pytest.raises(ProviderError) as err:
        await p.create(spec(), token="c")
    message = str(err.value)
    assert not err.value.retryable
    assert message.startswith("command: create failed (exit 1): ")
    assert message.endswith("quota of 10 VMs reached for pool ehr") and "noise 0" not in message
    with pytest.raises(ProviderError, match=r"reboot of vm-1 failed \(exit 2\): …x+$") as err:
        await p.reboot("vm-1", token="r")
    assert len(str(err.value)) < 600


async def test_a_hook_that_hangs_is_killed_with_its_children_at_the_timeout(
        hooks: Path, env: dict[str, str], tmp_path: Path) -> None:
    child = tmp_path / "child.pid"
    write_hook(hooks, "stop", f"sleep 60 &\necho $! > {child}\nwait\n")
    p = CommandProvider(hooks, env=env, timeout=0.5)
    began = time.monotonic()
    with pytest.raises(ProviderError, match=r"did not finish within 0\.5s") as err:
        await p.stop("vm-1", token="s")
    assert err.value.retryable
    assert time.monotonic() - began < 3
    pid = int(child.read_text())
    deadline = time.monotonic() + 2
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _alive(pid), "the hook's child outlived the timeout"


async def test_a_child_that_leaves_the_group_cannot_hold_the_call(
        hooks: Path, env: dict[str, str], tmp_path: Path) -> None:
    child = tmp_path / "child.pid"
    # setsid: out of the hook's group, out of reach of the kill, and holding its stdout
    write_hook(hooks, "stop", f"setsid sh -c 'echo $$ > {child}; exec sleep 60' &\nwait\n")
    p = CommandProvider(hooks, env=env, timeout=0.3)
    began = time.monotonic()
    try:
        with pytest.raises(ProviderError, match="did not finish") as err:
            await p.stop("vm-1", token="s")
        assert err.value.retryable
        assert time.monotonic() - began < 0.3 + KILL_GRACE + 1
    finally:
        if child.exists():
            os.kill(int(child.read_text()), signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Running, not a zombie left for a reaper (a container's PID 1 may never reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


async def test_a_missing_hook_turns_its_capability_off(hooks: Path, env: dict[str, str]) -> None:
    (hooks / "power_off").unlink()
    write_hook(hooks, "tag", "exit 0\n").chmod(0o644)  # not executable: as good as missing
    p = CommandProvider(hooks, env=env)
    assert not p.capabilities.fence and "tag" not in p.ops
    m = await p.create(spec(), token="c")
    for call, op in ((p.power_off(m.id, token="f"), "power_off"), (p.tag(m.id, {}, token="t"), "tag")):
        with pytest.raises(ProviderError, match=f"has no {op} hook") as err:
            await call
        assert not err.value.retryable
    assert (await p.get(m.id)).state == S.RUNNING
    (hooks / "get").unlink()
    with pytest.raises(ConfigError, match="no get hook"):
        CommandProvider(hooks, env=env)
    with pytest.raises(ConfigError, match="unknown operations"):
        CommandProvider(["hooks"], ops=[*OPS, "explode"])


@pytest.mark.parametrize(("answer", "complaint"), [
    ("echo 'not json'", "not a JSON object: not json"),
    ("echo '{}'", "malformed machine"),
    ("""echo '{"machine": {"id": "x", "name": "n", "pool": "p", "state": "melting"}}'""", "state: Input should be"),
])
async def test_a_malformed_answer_is_a_permanent_error(hooks: Path, env: dict[str, str],
                                                      answer: str, complaint: str) -> None:
    write_hook(hooks, "get", answer + "\n")
    with pytest.raises(ProviderError, match=complaint) as err:
        await CommandProvider(hooks, env=env).get("x")
    assert not err.value.retryable


async def test_times_a_hook_omits_are_when_the_provider_first_saw_them(hooks: Path, env: dict[str, str]) -> None:
    state = hooks / "now"
    write_hook(hooks, "get", f"""printf '{{"machine": {{"id": "x", "name": "n", "pool": "p", "state": "%s"}}}}' "$(cat {state})"\n""")
    now = [100.0]
    p = CommandProvider(hooks, env=env, clock=lambda: now[0])
    state.write_text("booting")
    assert ((m := await p.get("x")).created_at, m.state_since) == (100.0, 100.0)
    now[0] = 160.0
    assert (await p.get("x")).state_since == 100.0  # still booting since first seen
    state.write_text("running")
    assert ((m := await p.get("x")).created_at, m.state, m.state_since) == (100.0, S.RUNNING, 160.0)


async def test_retrying_a_lost_create_answer_creates_one_machine(hooks: Path, env: dict[str, str],
                                                                 tmp_path: Path) -> None:
    # The first create does create, then fails as retryable: the answer was lost on the way.
    marker = tmp_path / "tried"
    write_hook(hooks, "create", f"""request=$(cat)
if [ ! -e {marker} ]; then
  touch {marker}
  printf '%s' "$request" | "$(dirname "$0")/hooks.py" create > /dev/null
  echo "connection reset" >&2
  exit 75
fi
printf '%s' "$request" | exec "$(dirname "$0")/hooks.py" create
""")
    async def no_wait(_: float) -> None:
        return None

    p = Retrying(CommandProvider(hooks, env=env), sleep=no_wait)
    m = await p.create(spec(), token="once")
    assert [x.id for x in await p.list()] == [m.id]
    assert p.stats["create"].retries == 1
