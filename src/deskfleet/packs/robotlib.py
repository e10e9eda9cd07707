"""What runs inside a robot's own process: the keywords a robot may use, and the listener
that reports its progress to the agent.

A robot imports the keywords as a library::

    *** Settings ***
    Library    deskfleet.packs.robotlib

    *** Tasks ***
    Create Order
        ${id}=    Submit The Order    ${customer}
        Set Output    order_id    ${id}                # the run's output: outputs.order_id
        Report Progress    order submitted             # a step on the run's timeline
        IF    not ${id}    Business Error    customer ${customer} has no account

Both write JSON lines to the file ``$DESKFLEET_ROBOT_EVENTS`` names, which the agent
tails while the robot runs (:mod:`.robotrun`); without that variable (the robot run by
hand, with ``robot``) they only log what they would have reported. This module imports
nothing of deskfleet: it must load quickly in every robot process.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import timedelta
from typing import Any

#: the environment variable naming the events file
EVENTS_ENV = "DESKFLEET_ROBOT_EVENTS"
#: a failure message that starts with this is a business error: the run fails, no retry
BUSINESS_PREFIX = "BUSINESS:"
#: a task carrying this tag (``[Tags]`` or ``Set Tags`` before failing) failed for business reasons
BUSINESS_TAG = "business-error"

ROBOT_LIBRARY_SCOPE = "GLOBAL"
ROBOT_AUTO_KEYWORDS = False

_lock = threading.Lock()


def _emit(event: dict[str, Any]) -> bool:
    """Append one event; False when no agent listens (the robot was started by hand)."""
    path = os.environ.get(EVENTS_ENV)
    if not path:
        return False
    line = json.dumps(event, default=str, ensure_ascii=False) + "\n"
    with _lock, open(path, "a", encoding="utf-8") as out:
        out.write(line)
    return True


def _keyword(func: Any) -> Any:
    func.robot_name = func.__name__.replace("_", " ").title()
    return func


@_keyword
def set_output(name: str, value: Any) -> None:
    """Make ``value`` part of the run's output, under ``outputs.<name>``. JSON values
    (strings, numbers, lists, dictionaries) are kept as they are; anything else as its text.
    Setting a name again replaces its value."""
    if not name:
        raise ValueError("Set Output needs a name")
    if not _emit({"event": "output", "name": str(name), "value": value}):
        _log(f"output {name} = {value!r} (not sent: no deskfleet agent runs this robot)")


@_keyword
def report_progress(step: str, message: str = "") -> None:
    """Put ``step`` on the run's timeline now — in a long loop, for instance, so that the
    progress watchdog sees the robot working."""
    if not _emit({"event": "progress", "step": str(step), "message": str(message)}):
        _log(f"progress: {step} {message}".rstrip())


@_keyword
def business_error(message: str) -> None:
    """Fail the task as a business error: the work cannot be done (bad data, a record locked
    by a person); the run fails and is not retried. Same as ``Fail    BUSINESS: <message>``."""
    raise AssertionError(f"{BUSINESS_PREFIX} {message}")


def _log(text: str) -> None:
    try:
        from robot.api import logger

        logger.info(text)
    except ImportError:  # pragma: no cover - always inside Robot Framework
        pass


class Listener:
    """Listener version 3: each task's start and end, and each top-level step (a keyword,
    setup, teardown or control structure directly in a task, or a suite's setup or
    teardown) with its status and elapsed time."""

    ROBOT_LISTENER_API_VERSION = 3
    #: body items reported as steps; the rest (VAR, RETURN, BREAK…) are not worth a step
    STEPS = frozenset({"KEYWORD", "SETUP", "TEARDOWN", "FOR", "WHILE", "IF/ELSE ROOT", "TRY/EXCEPT ROOT", "GROUP"})

    def __init__(self) -> None:
        self._depth = 0
        self._task: str | None = None
        self._suites = 0

    def start_suite(self, data: Any, result: Any) -> None:
        if self._suites == 0:
            _emit({"event": "start", "tasks": int(data.test_count)})
        self._suites += 1

    def end_suite(self, data: Any, result: Any) -> None:
        self._suites -= 1
        if self._suites == 0:
            _emit({"event": "end", "status": result.status, "message": result.message})

    def start_test(self, data: Any, result: Any) -> None:
        self._task = result.name
        self._depth = 0
        _emit({"event": "task_start", "task": result.name})

    def end_test(self, data: Any, result: Any) -> None:
        _emit({"event": "task_end", "task": result.name, "status": result.status, "message": result.message,
               "elapsed": _seconds(result.elapsed_time), "tags": list(result.tags)})
        self._task = None

    def start_body_item(self, data: Any, result: Any) -> None:
        self._depth += 1

    def end_body_item(self, data: Any, result: Any) -> None:
        self._depth -= 1
        if self._depth != 0 or result.type not in self.STEPS or result.status == "NOT RUN":
            return
        name = result.name if result.type in ("KEYWORD", "SETUP", "TEARDOWN", "GROUP") else result.type
        _emit({"event": "step", "task": self._task, "type": result.type, "name": name or result.type,
               "status": result.status, "message": getattr(result, "message", ""),
               "elapsed": _seconds(result.elapsed_time)})


def _seconds(elapsed: timedelta | float) -> float:
    value = elapsed.total_seconds() if isinstance(elapsed, timedelta) else float(elapsed)
    return round(value, 3)
