"""Robot Framework robots as automations of a pack (``[robot]`` in pack.toml): real robots,
run by the real Robot Framework in processes of their own.

A robot pack is built in ``tmp_path`` and loaded as any pack is; its automations run
through ``Automation.execute`` with a real :class:`~deskfleet.Context` (what the agent
does for each attempt), and end to end: a run submitted over HTTP to a live orchestrator,
served by a real agent whose registry is the pack's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

import deskfleet
from deskfleet import (
    Agent,
    AgentConfig,
    App,
    AutomationError,
    BusinessError,
    Context,
    DesktopError,
    Pack,
    PackError,
    Stopped,
    load_pack,
)
from deskfleet.client import AsyncClient
from deskfleet.packs.check import check_pack
from deskfleet.sim.backend import SimBackend
from deskfleet.sim.desktop import SimDesktop
from deskfleet.vision.templates import Anchor, TemplateLibrary
from support import eventually, running_agent

SECRET = "hunter2-very-secret"

MANIFEST = """
[pack]
name = "orders"
version = "1.0.0"

[states]
ready = ["home"]

[robot]
suites = "robots"
required_state = "any"
stop_grace = 0.5

[[robot.automations]]
file = "robots/orders.robot"
task = "Create Order"
secrets = ["password"]
input = { type = "object", required = ["customer", "items", "address"], properties = { customer = { type = "string" }, items = { type = "array" }, address = { type = "object" } } }

[[robot.automations]]
file = "robots/orders.robot"
task = "Reject Order"
name = "orders.reject"
secrets = ["password"]

[[robot.automations]]
file = "robots/slow.robot"
timeout = 1.5
secrets = ["password"]

[[robot.automations]]
file = "robots/flaky.robot"
idempotent = true

[[robot.automations]]
file = "robots/orders.robot"
task = "Ghost"
"""

ORDERS = """
*** Settings ***
Library    Collections
Library    deskfleet.packs.robotlib

*** Tasks ***
Create Order
    Should Be Equal    ${customer}    Ann
    Length Should Be    ${items}    2
    Should Be Equal    ${items}[1]    bolt
    FOR    ${item}    IN    @{items}
        Log    ${item}
    END
    Should Be Equal    ${address}[city]    Lyon
    Should Be Equal    ${address.city}    Lyon
    Should Be Equal    ${password}    hunter2-very-secret
    Set Output    order_id    ${42}
    Set Output    lines    ${items}
    Set Output    echo    ${password}
    Report Progress    order saved    number 42

Reject Order
    ${how}=    Get Variable Value    ${how}    prefix
    IF    $how == 'prefix'
        Fail    BUSINESS: customer ${customer} is blocked
    ELSE IF    $how == 'keyword'
        Business Error    customer ${customer} is blocked
    ELSE IF    $how == 'tag'
        Set Tags    business-error
        Fail    customer ${customer} is blocked
    ELSE
        Fail    the order screen did not answer (${password})
    END
"""

SLOW = """
*** Settings ***
Library    Process
Library    OperatingSystem

*** Tasks ***
Wait For The App
    ${child}=    Start Process    sleep    60
    Create File    %{DESKFLEET_DATA_DIR}/pids    ${child.pid}
    Log    waiting
    Sleep    ${seconds}
"""

FLAKY = """
*** Settings ***
Library    OperatingSystem

*** Tasks ***
Flaky
    ${first}=    Run Keyword And Return Status    File Should Not Exist    ${marker}
    IF    ${first}
        Create File    ${marker}
        Fail    the application did not respond
    END
    Log    second time lucky
"""

HELLO = """
*** Tasks ***
Say Hello
    Log    hello
"""

RESOURCE = """
*** Keywords ***
Shared Keyword
    Log    not a robot: no tasks
"""


def robot_pack(root: Path, manifest: str = MANIFEST, robots: dict[str, str] | None = None) -> Path:
    """A pack of robots alone (no Python module), with a one-screen model."""
    root.mkdir(parents=True)
    (root / "pack.toml").write_text(textwrap.dedent(manifest))
    files = robots if robots is not None else {
        "orders.robot": ORDERS, "slow.robot": SLOW, "flaky.robot": FLAKY, "hello.robot": HELLO,
        "shared.robot": RESOURCE}
    (root / "robots").mkdir()
    for name, text in files.items():
        (root / "robots" / name).write_text(textwrap.dedent(text))
    frame = np.zeros((240, 320, 3), np.uint8)
    frame[:, :] = (40, 200, 40)
    lib = TemplateLibrary("orders", (320, 240))
    lib.record(frame, "home", [Anchor("body", deskfleet.Region(10, 10, 100, 100), "pixels")], ready=True)
    lib.save(root / "model")
    return root


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Pack:
    return load_pack(robot_pack(tmp_path_factory.mktemp("packs") / "orders"))


class Trial:
    """An attempt's context, as the agent makes one: progress recorded, stop on request."""

    def __init__(self, data_dir: Path) -> None:
        self.steps: list[tuple[str, float | None, str | None]] = []
        self.stop = asyncio.Event()

        async def progress(step: str, percent: float | None, message: str | None) -> None:
            self.steps.append((step, percent, message))

        async def upload(name: str, data: bytes, ctype: str) -> str:
            return "a1"

        self.ctx = Context(run_id="r-1", attempt_id=7, attempt_number=1, machine_id="m-1", desktop=None,  # type: ignore[arg-type]
                           model=None, report_progress=progress, upload=upload, stop_event=self.stop,
                           required_state="any", data_dir=data_dir)

    def shown(self) -> str:
        return repr(self.steps)


ORDER = {"customer": "Ann", "items": ["nut", "bolt"], "address": {"city": "Lyon", "zip": "69001"}, "password": SECRET}


def test_robots_are_automations_of_the_pack(pack: Pack) -> None:
    names = sorted(a.name for a in pack.registry)
    # explicit entries by task (or name), discovered files by their name; a resource file is no robot
    assert names == ["orders.create_order", "orders.flaky", "orders.ghost", "orders.hello", "orders.reject",
                     "orders.slow"]
    spec = pack.registry.get("orders.create_order").spec  # type: ignore[union-attr]
    assert spec.secret_fields == ["password"] and spec.pack == "orders" and spec.required_state == "any"
    assert spec.input_schema["required"] == ["customer", "items", "address"]
    assert spec.input_schema["properties"]["password"] == {"type": "string", "format": "password", "writeOnly": True}
    assert set(spec.output_schema["properties"]) == {"status", "tasks", "outputs", "elapsed"}
    hello = pack.registry.get("orders.hello").spec  # type: ignore[union-attr]
    assert hello.input_schema["type"] == "object" and hello.secret_fields == [] and not hello.idempotent
    assert pack.registry.get("orders.flaky").idempotent  # type: ignore[union-attr]


async def test_variables_reach_the_robot_and_its_outputs_and_steps_come_back(pack: Pack, tmp_path: Path) -> None:
    trial = Trial(tmp_path)
    out = await pack.registry.get("orders.create_order").execute(trial.ctx, ORDER)  # type: ignore[union-attr]
    assert out["status"] == "PASS", out
    [task] = out["tasks"]
    assert (task["name"], task["status"], task["message"]) == ("Create Order", "PASS", "")
    assert task["elapsed"] >= 0
    # numbers and lists keep their type; a secret the robot echoes is not shown
    assert out["outputs"] == {"order_id": 42, "lines": ["nut", "bolt"], "echo": "***"}
    steps = [s for s, _, _ in trial.steps]
    assert steps[0] == "task: Create Order" and trial.steps[0][2] == "started"
    assert "Create Order > Should Be Equal" in steps and "Create Order > FOR" in steps
    assert "Create Order > Log" not in steps, "only top-level steps: the Log inside the loop is not one"
    assert ("order saved", None, "number 42") in trial.steps
    last = trial.steps[-1]
    assert last[0] == "task: Create Order" and last[1] == 100.0 and last[2] and last[2].startswith("PASS in ")
    assert all(m and m.startswith("PASS in ") for s, _, m in trial.steps if " > " in s), trial.shown()
    assert SECRET not in trial.shown()


@pytest.mark.parametrize("how", ["prefix", "keyword", "tag"])
async def test_a_robot_that_says_business_fails_with_a_business_error(pack: Pack, tmp_path: Path, how: str) -> None:
    trial = Trial(tmp_path)
    with pytest.raises(BusinessError) as caught:
        await pack.registry.get("orders.reject").execute(trial.ctx, {"customer": "Bob", "how": how})  # type: ignore[union-attr]
    assert str(caught.value) == "robot orders.reject: task 'Reject Order': customer Bob is blocked"
    assert trial.steps[-1][0] == "task: Reject Order" and (trial.steps[-1][2] or "").startswith("FAIL in ")


async def test_any_other_failure_is_a_system_error_without_the_secret(pack: Pack, tmp_path: Path) -> None:
    trial = Trial(tmp_path)
    with pytest.raises(DesktopError) as caught:
        await pack.registry.get("orders.reject").execute(trial.ctx, {"how": "crash", "password": SECRET})  # type: ignore[union-attr]
    assert not isinstance(caught.value, BusinessError)
    assert str(caught.value) == "robot orders.reject: task 'Reject Order': the order screen did not answer (***)"
    assert SECRET not in trial.shown()


async def test_invalid_robot_data_is_a_business_error_not_retried(pack: Pack, tmp_path: Path) -> None:
    """Exit code 252 — here a task the file does not have: every machine would refuse it."""
    with pytest.raises(BusinessError, match=r"robot orders.ghost: Robot Framework refused its data or options "
                                            r"\(exit code 252.*no tasks matching name 'Ghost'"):
        await pack.registry.get("orders.ghost").execute(Trial(tmp_path).ctx, {})  # type: ignore[union-attr]


def _gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def _robot_processes() -> list[psutil.Process]:
    """This process's live descendants running ``robot``. A zombie (dead, not yet collected by
    its parent — another test's child, say) has no command line to read and runs nothing."""
    found = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):  # a zombie, or gone since the listing
            if p.status() != psutil.STATUS_ZOMBIE and "robot" in " ".join(p.cmdline()[1:3]):
                found.append(p)
    return found


async def test_a_robot_past_its_timeout_is_killed_with_what_it_started(pack: Pack, tmp_path: Path) -> None:
    trial = Trial(tmp_path)
    t0 = time.monotonic()
    with pytest.raises(AutomationError, match=r"robot orders.slow ran past its timeout of 1.5s") as caught:
        await pack.registry.get("orders.slow").execute(trial.ctx, {"seconds": 30})  # type: ignore[union-attr]
    assert not isinstance(caught.value, BusinessError)
    assert time.monotonic() - t0 < 15  # stopped, long before the robot's 30 s
    child = int((tmp_path / "pids").read_text().split()[-1])
    await eventually(lambda: _gone(child), timeout=3)  # Process library's child, in a session of its own
    assert _robot_processes() == []


async def test_a_stopped_attempt_stops_its_robot(pack: Pack, tmp_path: Path) -> None:
    """What the agent does on a stop order (a cancel, a lost lease): set the stop event and
    cancel the automation's task."""
    trial = Trial(tmp_path)
    task = asyncio.ensure_future(
        pack.registry.get("orders.slow").execute(trial.ctx, {"seconds": 30, "password": SECRET}))  # type: ignore[union-attr]
    await eventually(lambda: (tmp_path / "pids").exists() and any(s == "task: Wait For The App" for s, _, _ in
                                                                   trial.steps), timeout=10)
    [robot] = _robot_processes()
    # the secret is in the robot's variable file (private to the agent's user), never on its command line
    assert SECRET not in " ".join(robot.cmdline()) and SECRET not in str(robot.environ())
    varfile = Path(robot.cmdline()[robot.cmdline().index("--variablefile") + 1])
    assert stat.S_IMODE(varfile.stat().st_mode) == 0o600 and stat.S_IMODE(varfile.parent.stat().st_mode) == 0o700
    t0 = time.monotonic()
    trial.stop.set()
    task.cancel()
    with pytest.raises((asyncio.CancelledError, Stopped)):
        await task
    assert time.monotonic() - t0 < 15  # stopped, long before the robot's 30 s
    assert _gone(robot.pid) and _gone(int((tmp_path / "pids").read_text().split()[-1]))
    assert not varfile.exists(), "the variable file goes with the attempt"


def test_pack_check_parses_robots_and_dry_runs_them(tmp_path: Path) -> None:
    bad = robot_pack(tmp_path / "bad", robots={
        "orders.robot": ORDERS, "slow.robot": SLOW + "\n    FOR    ${x}    IN    a\n        Log    ${x}\n",
        "flaky.robot": FLAKY.replace("Create File", "Creat File")})
    report = check_pack(bad)
    problems = "\n".join(report.problems)
    assert "robot orders.slow: robots/slow.robot, line" in problems and "FOR loop must have closing END" in problems
    assert "robot orders.ghost: robots/orders.robot: no task 'Ghost' (its tasks: 'Create Order', 'Reject Order')" \
        in problems
    assert "robot orders.flaky: dry run: task 'Flaky': No keyword with name 'Creat File' found" in problems
    assert not any("orders.create_order" in p or "orders.reject" in p for p in report.problems), problems
    good = robot_pack(tmp_path / "good", MANIFEST.split("[[robot.automations]]\nfile = \"robots/orders.robot\""
                                                        "\ntask = \"Ghost\"")[0])
    report = check_pack(good)
    assert report.ok, report.problems


def test_a_robot_pack_without_robot_framework_says_what_to_install(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    root = robot_pack(tmp_path / "orders")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "robot" else find_spec(name, *a))
    with pytest.raises(PackError, match=r"declares Robot Framework robots \(\[robot\] in pack.toml\), but Robot "
                                        r"Framework is not installed in this Python: pip install 'deskfleet\[robot\]'"):
        load_pack(root)
    assert "pip install 'deskfleet[robot]'" in "\n".join(check_pack(root).problems)


# -- end to end: a run over HTTP, an agent runs the robot -------------------------------------------


@pytest.fixture
async def agent(live_server: Any, pack: Pack, tmp_path: Path) -> AsyncIterator[Agent]:
    backend = SimBackend(tmp_path / "ehr.db")
    app = App(desktop=SimDesktop("rb-01", backend), registry=pack.registry, model=pack.model, name=pack.name,
              data_dir=tmp_path / "data")
    a = Agent(AgentConfig(servers=[live_server.url], machine="rb-01", enrolment_token=live_server.token), app)
    try:
        async with running_agent(live_server, a, "rb-01"):
            yield a
    finally:
        backend.close()


async def test_a_run_over_http_runs_the_robot_on_an_agent(live_server: Any, agent: Agent) -> None:
    async with AsyncClient(live_server.url) as c:
        run = await c.submit("orders.create_order", ORDER)
        done = await c.run(run["id"], wait=30)
        assert done["state"] == "succeeded", done
        assert done["output"]["outputs"] == {"order_id": 42, "lines": ["nut", "bolt"], "echo": "***"}
        assert done["output"]["tasks"][0]["status"] == "PASS"
        events = await c.events(run["id"])
        progress = [(e["reason"], e["data"].get("message")) for e in events if e["kind"] == "attempt.progress"]
        assert ("task: Create Order", "started") in progress and ("order saved", "number 42") in progress
        assert any(step == "Create Order > Should Be Equal" and (m or "").startswith("PASS in ") for step, m in progress)
        assert SECRET not in repr(events) and SECRET not in repr(done)


async def test_over_http_a_business_error_fails_at_once_and_a_system_error_is_retried(
        live_server: Any, agent: Agent, tmp_path: Path) -> None:
    async with AsyncClient(live_server.url) as c:
        run = await c.submit("orders.reject", {"customer": "Bob", "how": "prefix"}, max_attempts=3)
        done = await c.run(run["id"], wait=30)
        assert done["state"] == "failed" and "customer Bob is blocked" in done["error"]["message"], done
        assert [a["ending"] for a in await c.attempts(run["id"])] == ["business_error"]
        # flaky fails its first attempt (the app "did not respond"): a system error, and the
        # robot is declared idempotent, so the run is retried, and the retry succeeds
        flaky = await c.submit("orders.flaky", {"marker": str(tmp_path / "marker")}, max_attempts=3,
                               backoff_initial=0.05)
        done = await c.run(flaky["id"], wait=30)
        assert done["state"] == "succeeded", done
        assert [a["ending"] for a in await c.attempts(flaky["id"])] == ["system_error", "succeeded"]


async def test_cancelling_a_run_over_http_stops_its_robot(live_server: Any, agent: Agent, tmp_path: Path) -> None:
    async with AsyncClient(live_server.url) as c:
        run = await c.submit("orders.slow", {"seconds": 30})

        async def started() -> bool:
            return any(e["kind"] == "attempt.progress" and e["reason"] == "task: Wait For The App"
                       for e in await c.events(run["id"]))

        deadline = time.monotonic() + 15
        while not await started():
            assert time.monotonic() < deadline, "the robot never started"
            await asyncio.sleep(0.05)
        await eventually(lambda: (tmp_path / "data" / "pids").exists(), timeout=5)
        await c.cancel(run["id"])
        done = await c.run(run["id"], wait=15)
        assert done["state"] == "cancelled", done
        child = int((tmp_path / "data" / "pids").read_text().split()[-1])
        await eventually(lambda: _gone(child) and _robot_processes() == [], timeout=5)


def test_the_robot_sees_the_machines_display(pack: Pack, tmp_path: Path) -> None:
    from deskfleet.packs.robotrun import robot_env

    class Host:
        def env(self) -> dict[str, str]:
            return {"DISPLAY": ":42"}

    class Desk:
        host = Host()
        app_pid = 4242

    trial = Trial(tmp_path)
    trial.ctx.desktop = Desk()  # type: ignore[assignment]
    env = robot_env(trial.ctx, pack.directory, tmp_path / "events")  # type: ignore[arg-type]
    assert (env["DISPLAY"], env["DESKFLEET_APP_PID"], env["DESKFLEET_RUN_ID"]) == (":42", "4242", "r-1")
    assert env["DESKFLEET_DATA_DIR"] == str(tmp_path) and str(pack.directory) in env["PYTHONPATH"].split(os.pathsep)
