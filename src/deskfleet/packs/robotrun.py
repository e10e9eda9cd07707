"""Running one Robot Framework robot for an attempt: in a process of its own, never in the
agent's.

``python -m robot`` starts with the agent's own interpreter and ``sys.path`` (so the pack's
requirements, installed beside it, import there too), in a process group of its own, with
the machine's display in its environment. The run's input reaches it as a JSON variable
file in a private directory — never on its command line, where any process of the machine
could read a secret. While it runs, the listener of :mod:`.robotlib` writes JSON lines
that are tailed here into progress steps; when it ends, its ``output.xml`` (read with
Robot's own ``ExecutionResult``) gives each task's status, and its exit code what kind of
failure it was:

=========  ===================================================================
exit code  what the attempt ends with
=========  ===================================================================
0          succeeded: the output is each task's status and the robot's outputs
1-250      failed tasks: a business error if every failure says so (a message
           starting ``BUSINESS:`` or the tag ``business-error``), else a system
           error (``DesktopError``: retried per the run's policy)
251, 252   help or invalid data or options: a business error — every machine
           would refuse the robot the same way, so it is not retried
253, 255   stopped from outside, internal error: a system error
< 0        killed by a signal: a system error
=========  ===================================================================

A robot that runs past its ``timeout``, and one whose attempt is stopped (cancelled, lease
lost, the attempt's timeout), is asked to stop (SIGTERM: the keyword in progress fails,
teardowns run) and its whole process group killed after ``stop_grace`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from ..errors import AutomationError, BusinessError, DesktopError
from ..procs import descendants, kill_all
from ..sdk import Context
from . import robotlib

log = logging.getLogger(__name__)

#: seconds between looks at the events file and the process
POLL = 0.05
#: what a secret is replaced with wherever it would be shown
REDACTED = "***"
#: environment variables of the agent a robot does not inherit (its keys and tokens)
PRIVATE_ENV = "DESKFLEET_"
#: longest failure text kept (the run's error detail)
MAX_DETAIL = 1800
#: seconds a stop waits at most for the killed processes of a robot to be gone
KILL_WAIT = 5.0


class RobotTask(BaseModel):
    """One task (or test) of a robot, as it ended."""

    name: str
    status: str = Field(description="PASS, FAIL, SKIP or NOT RUN")
    message: str = ""
    elapsed: float = Field(description="seconds")
    tags: list[str] = Field(default_factory=list)


class RobotResult(BaseModel):
    """A robot's output: how each task ended, and the values it set with ``Set Output``."""

    status: str = Field(description="the whole robot's status: PASS, or SKIP when every task was skipped")
    tasks: list[RobotTask]
    outputs: dict[str, Any] = Field(default_factory=dict, description="name → value, from Set Output")
    elapsed: float = Field(description="seconds")


@dataclass(frozen=True, slots=True)
class RobotJob:
    """What running one robot takes."""

    automation: str  # its automation's name, for messages
    suite: Path  # the .robot file, or a directory of them
    pack_dir: Path
    task: str = ""  # one task of it; "" for all
    timeout: float | None = None
    stop_grace: float = 3.0


@dataclass(slots=True)
class _Seen:
    """What the events told so far."""

    outputs: dict[str, Any] = field(default_factory=dict)
    tasks: int = 0
    done: int = 0


def python_path(pack_dir: Path) -> str:
    """The robot's ``PYTHONPATH``: the pack's directory, then the agent's own ``sys.path``."""
    entries = [str(pack_dir)]
    entries += [p for p in sys.path if p and os.path.isdir(p) and p not in entries]
    return os.pathsep.join(entries)


def robot_env(ctx: Context | None, pack_dir: Path, events: Path | None) -> dict[str, str]:
    """The environment a robot starts with: the agent's, less its private settings, plus the
    machine's display (what the application was started with) and the run's coordinates."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(PRIVATE_ENV)}
    env["PYTHONPATH"] = python_path(pack_dir)
    env["PYTHONIOENCODING"] = "utf-8"
    if events is not None:
        env[robotlib.EVENTS_ENV] = str(events)
    if ctx is None:
        return env
    host = getattr(ctx.desktop, "host", None)  # a real desktop's machine: its display
    if host is not None and callable(getattr(host, "env", None)):
        env.update(host.env())
    pid = getattr(ctx.desktop, "app_pid", None)
    env.update({"DESKFLEET_RUN_ID": ctx.run_id, "DESKFLEET_ATTEMPT_ID": str(ctx.attempt_id),
                "DESKFLEET_MACHINE": ctx.machine_id})
    if isinstance(pid, int):
        env["DESKFLEET_APP_PID"] = str(pid)
    if ctx.data_dir is not None:
        env["DESKFLEET_DATA_DIR"] = str(ctx.data_dir)
    return env


def robot_argv(job: RobotJob, work: Path, *, variables: Path | None, listener: bool = True,
               dry_run: bool = False) -> list[str]:
    argv = [sys.executable, "-m", "robot", "--outputdir", str(work), "--output", "output.xml",
            "--log", "NONE", "--report", "NONE", "--console", "quiet", "--consolecolors", "off",
            "--pythonpath", str(job.pack_dir)]
    if variables is not None:
        argv += ["--variablefile", str(variables)]
    if listener:
        argv += ["--listener", f"{robotlib.__name__}.Listener"]
    if dry_run:
        argv.append("--dryrun")
    if job.task:
        argv += ["--test", exact(job.task)]
    return [*argv, str(job.suite)]


def exact(name: str) -> str:
    """A ``--test`` pattern that matches ``name`` only (Robot's patterns are globs)."""
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


class Scrubber:
    """Replaces the run's secret values wherever a robot could echo them."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets = sorted({s for s in secrets if len(s) >= 3}, key=len, reverse=True)

    def text(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text

    def value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self.value(v) for v in value]
        if isinstance(value, dict):
            return {self.text(str(k)): self.value(v) for k, v in value.items()}
        return value


async def run_robot(job: RobotJob, ctx: Context, variables: Mapping[str, Any],
                    secrets: Iterable[str] = ()) -> RobotResult:
    """Run the robot for this attempt; its result, or the error its ending maps to."""
    scrub = Scrubber(secrets)
    work = Path(tempfile.mkdtemp(prefix="deskfleet-robot-"))  # private: 0700
    try:
        varfile = work / "variables.json"
        fd = os.open(varfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(dict(variables), out)
        events = work / "events.jsonl"
        events.touch(0o600)
        argv = robot_argv(job, work, variables=varfile)
        with open(work / "console.txt", "wb") as console:
            proc = await _spawn(argv, robot_env(ctx, job.pack_dir, events), job.pack_dir, console)
            ctx.log.info("robot %s started (pid %d)", job.automation, proc.pid)
            seen = _Seen()
            rc = await _supervise(job, ctx, proc, _Tail(events), seen, scrub)
        tasks, errors = await asyncio.to_thread(read_output, work / "output.xml")
        console_text = (work / "console.txt").read_text(encoding="utf-8", errors="replace")
        ctx.log.info("robot %s ended with exit code %d", job.automation, rc)
        return outcome(job.automation, rc, tasks, errors or _errors(console_text), seen.outputs, scrub)
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def _spawn(argv: list[str], env: dict[str, str], cwd: Path, console: Any) -> asyncio.subprocess.Process:
    options: dict[str, Any] = {}
    if os.name == "posix":
        options["start_new_session"] = True  # a process group of its own: stopped as one
    else:
        options["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
    return await asyncio.create_subprocess_exec(*argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                                stdout=console, stderr=subprocess.STDOUT, **options)


async def _supervise(job: RobotJob, ctx: Context, proc: asyncio.subprocess.Process, tail: _Tail,
                     seen: _Seen, scrub: Scrubber) -> int:
    """Wait for the robot, reporting its steps; stop it on a timeout or a stop order."""
    loop = asyncio.get_running_loop()
    deadline = None if job.timeout is None else loop.time() + job.timeout
    exited = asyncio.ensure_future(proc.wait())
    try:
        while True:
            await asyncio.wait({exited}, timeout=POLL)
            for event in tail.read():
                await _report(ctx, event, seen, scrub)
            if exited.done():
                return exited.result()
            ctx.check()  # the attempt was stopped: Stopped, and the robot with it (below)
            if deadline is not None and loop.time() >= deadline:
                break
    except BaseException:
        exited.cancel()
        await stop(proc, job.stop_grace)
        raise
    await stop(proc, job.stop_grace)
    for event in tail.read():  # what its teardowns did meanwhile
        with contextlib.suppress(Exception):
            await _report(ctx, event, seen, scrub)
    raise AutomationError(f"robot {job.automation} ran past its timeout of {job.timeout:g}s and was stopped "
                          "(its process group killed)")


async def stop(proc: asyncio.subprocess.Process, grace: float) -> None:
    """Ask the robot to stop (its keyword fails, teardowns run), then kill its process
    group and every process it started — also those in sessions of their own, as Robot's
    Process library starts them — after ``grace`` seconds at most."""
    tree = descendants(proc.pid)  # before anything exits: an orphan's parent is no longer the robot
    try:
        if proc.returncode is None:
            _signal_group(proc, graceful=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), grace)
    finally:  # also when this task is cancelled meanwhile
        _signal_group(proc, graceful=False)
        # gone, not only signalled, when the attempt ends: nothing the robot started acts after it
        await asyncio.to_thread(kill_all, [*tree, *descendants(proc.pid)], wait=KILL_WAIT)
    if proc.returncode is None:
        await asyncio.shield(proc.wait())


def _signal_group(proc: asyncio.subprocess.Process, *, graceful: bool) -> None:
    if os.name == "posix":
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM if graceful else signal.SIGKILL)
    elif graceful:  # pragma: no cover - Windows: the group created with CREATE_NEW_PROCESS_GROUP
        with contextlib.suppress(ProcessLookupError, OSError):
            proc.send_signal(signal.CTRL_BREAK_EVENT)  # type: ignore[attr-defined]
    else:  # pragma: no cover - Windows
        with contextlib.suppress(ProcessLookupError, OSError):
            proc.kill()


class _Tail:
    """The complete lines appended to the events file since the last read."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = 0
        self._partial = b""

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self._path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        out = []
        for line in lines:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    out.append(event)
        return out


async def _report(ctx: Context, event: dict[str, Any], seen: _Seen, scrub: Scrubber) -> None:
    """One event of the robot's listener or library, on the run's timeline."""
    kind = event.get("event")
    if kind == "output":
        seen.outputs[scrub.text(str(event.get("name")))] = scrub.value(event.get("value"))
        return
    if kind == "start":
        seen.tasks = int(event.get("tasks") or 0)
        return
    if kind == "task_start":
        await ctx.progress(_clip(scrub.text(f"task: {event.get('task')}")), message="started")
    elif kind == "step":
        where = event.get("task") or "suite"
        step = f"{where} > {event.get('name')}"
        await ctx.progress(_clip(scrub.text(step)), message=_clip(scrub.text(_status(event))))
    elif kind == "task_end":
        seen.done += 1
        percent = 100.0 * seen.done / seen.tasks if seen.tasks else None
        await ctx.progress(_clip(scrub.text(f"task: {event.get('task')}")), percent=percent,
                           message=_clip(scrub.text(_status(event))))
    elif kind == "progress":
        await ctx.progress(_clip(scrub.text(str(event.get("step") or "progress"))),
                           message=_clip(scrub.text(str(event.get("message") or ""))) or None)


def _status(event: Mapping[str, Any]) -> str:
    text = f"{event.get('status')} in {float(event.get('elapsed') or 0):.2f}s"
    message = str(event.get("message") or "")
    return f"{text}: {message}" if message and event.get("status") != "PASS" else text


def _clip(text: str, limit: int = 500) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def read_output(path: Path) -> tuple[list[RobotTask], list[str]]:
    """Each task of ``output.xml`` as it ended, and the execution errors Robot noted (a
    library that did not import…); nothing when the robot wrote no output."""
    if not path.is_file() or path.stat().st_size == 0:
        return [], []
    from robot.api import ExecutionResult

    try:
        result = ExecutionResult(str(path))
    except Exception as exc:  # a robot killed while writing it
        return [], [f"its output.xml cannot be read: {exc}"]
    tasks = [RobotTask(name=t.name, status=t.status, message=t.message, elapsed=_secs(t.elapsed_time),
                       tags=[str(tag) for tag in t.tags]) for t in result.suite.all_tests]
    errors = [m.message for m in result.errors.messages if m.level in ("ERROR", "FAIL")]
    return tasks, errors


def _secs(elapsed: timedelta) -> float:
    return round(elapsed.total_seconds(), 3)


def _errors(console: str) -> list[str]:
    """Robot's own error lines (``[ ERROR ] …``) from its console, when it wrote no output."""
    lines = [ln.removeprefix("[ ERROR ]").strip() for ln in console.splitlines() if ln.startswith("[ ERROR ]")]
    if lines:
        return lines
    tail = [ln for ln in console.strip().splitlines() if ln.strip()][-5:]
    return ["\n".join(tail)] if tail else []


def is_business(task: RobotTask) -> bool:
    """Whether the robot said this task failed for a business reason."""
    def norm(tag: str) -> str:  # as Robot compares tags, and hyphens too: business_error, Business Error
        return re.sub(r"[\s_-]", "", tag).lower()

    tags = {norm(t) for t in task.tags}
    return _business_text(task.message) is not None or norm(robotlib.BUSINESS_TAG) in tags


def outcome(automation: str, rc: int, tasks: list[RobotTask], errors: list[str],
            outputs: dict[str, Any], scrub: Scrubber | None = None) -> RobotResult:
    """The robot's result for exit code ``rc``, or the error it maps to (module docstring)."""
    scrub = scrub or Scrubber(())
    tasks = [t.model_copy(update={"message": scrub.text(t.message)}) for t in tasks]
    said = "; ".join(one_line(scrub.text(e)) for e in errors)[:MAX_DETAIL]
    if rc == 0:
        status = "SKIP" if tasks and all(t.status == "SKIP" for t in tasks) else "PASS"
        return RobotResult(status=status, tasks=tasks, outputs=outputs, elapsed=round(sum(t.elapsed for t in tasks), 3))
    failed = [t for t in tasks if t.status == "FAIL"]
    if 1 <= rc <= 250 and failed:
        business = all(is_business(t) for t in failed)
        parts = [f"{t.name!r}: {one_line((_business_text(t.message) if business else None) or t.message)}"
                 for t in failed]
        head = (f"robot {automation}: task {parts[0]}" if len(failed) == 1 else
                f"robot {automation}: {len(failed)} of {len(tasks)} tasks failed: " + "; ".join(parts))
        detail = head[:MAX_DETAIL]
        if business:
            raise BusinessError(detail)
        raise DesktopError(detail)
    if rc in (251, 252):
        raise BusinessError(f"robot {automation}: Robot Framework refused its data or options (exit code {rc}; "
                            f"not retried, every machine would refuse it): {said or 'no message'}")
    if rc == 253:
        raise AutomationError(f"robot {automation} was stopped from outside (exit code 253)"
                              + (f": {said}" if said else ""))
    if rc < 0:
        name = _signal_name(-rc)
        raise AutomationError(f"robot {automation} was killed by signal {name}" + (f": {said}" if said else ""))
    raise AutomationError(f"robot {automation} failed with exit code {rc}"
                          + (" (an unexpected error inside Robot Framework)" if rc == 255 else "")
                          + (f": {said}" if said else ""))


def one_line(text: str) -> str:
    """Robot's multi-line messages ("Did you mean: …") on one line."""
    return re.sub(r"\s*\n\s*", " ", text.strip())


def _business_text(message: str) -> str | None:
    """The message after ``BUSINESS:`` (also as the reason a suite setup failed), or None."""
    text = message.strip()
    for inherited in ("Parent suite setup failed:", "Setup failed:"):
        if text.startswith(inherited):
            text = text[len(inherited):].strip()
    if text.upper().startswith(robotlib.BUSINESS_PREFIX):
        return text[len(robotlib.BUSINESS_PREFIX):].strip()
    return None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def dry_run(job: RobotJob, timeout: float = 60.0) -> list[str]:
    """Robot's dry run of the robot (``--dryrun``: its libraries imported, its keywords
    looked up, none run): what it found wrong, one line each."""
    work = Path(tempfile.mkdtemp(prefix="deskfleet-robot-check-"))
    try:
        argv = robot_argv(job, work, variables=None, listener=False, dry_run=True)
        options: dict[str, Any] = {"start_new_session": True} if os.name == "posix" else {}
        with open(work / "console.txt", "wb") as console, subprocess.Popen(
                argv, cwd=job.pack_dir, env=robot_env(None, job.pack_dir, None), stdin=subprocess.DEVNULL,
                stdout=console, stderr=subprocess.STDOUT, **options) as proc:
            try:
                rc = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                if os.name == "posix":
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                proc.kill()
                return [f"dry run: it did not end within {timeout:g}s"]
        tasks, errors = read_output(work / "output.xml")
        if not tasks and rc != 0:
            errors = errors or _errors((work / "console.txt").read_text(encoding="utf-8", errors="replace"))
        problems = [f"dry run: {one_line(e)}" for e in errors]
        problems += [f"dry run: task {t.name!r}: {one_line(t.message)}" for t in tasks if t.status == "FAIL"]
        if rc != 0 and not problems:
            problems.append(f"dry run: Robot Framework ended with exit code {rc}")
        return problems
    finally:
        shutil.rmtree(work, ignore_errors=True)
