"""Pre-flight: prove by a fresh screenshot that the machine is in the state an automation
needs — or bring it there with the app model's playbooks (invariant 5).

    screenshot → classify → wanted and responsive and right account? → done
                          ↘ otherwise: run the playbook for what the screen shows, repeat
                            (bounded; every step recorded with before and after screenshots)

A screen that cannot be captured at all (the display server died, the session is gone)
is not a reason to give up the attempt: it is one more state, :data:`NO_SCREEN`, for which
the app model names a playbook (typically a restart of the desktop) like for any other.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..appmodel import Account, AppModel, PlaybookContext
from ..crypto import REDACTED
from ..desktop import Desktop, Frame
from ..errors import DesktopError, Stopped
from ..vision import Classification

log = logging.getLogger(__name__)

#: the state of a screen that cannot be captured; ``AppModel.recoveries`` maps it to a playbook
NO_SCREEN = "no_screen"

#: Called for every step: (kind, data, screenshot or None) → the screenshot's artifact id or None.
StepRecorder = Callable[[str, dict[str, Any], Frame | None], Awaitable[str | None]]


@dataclass(slots=True)
class PreflightResult:
    ok: bool
    state: str
    detail: str = ""
    steps: list[str] = field(default_factory=list)
    frame: Frame | None = None
    evidence_id: str | None = None  # the artifact of the screenshot that proved the state
    elapsed: float = 0.0


async def preflight(
    desktop: Desktop,
    model: AppModel,
    wanted: str,
    *,
    session_key: str | None,
    account: Account | None = None,
    record: StepRecorder,
    stop: asyncio.Event | None = None,
    max_steps: int = 8,
) -> PreflightResult:
    t0 = time.monotonic()
    steps: list[str] = []
    last_state = "unknown"
    for _ in range(max_steps + 1):
        if stop is not None and stop.is_set():
            raise Stopped("stopped during pre-flight")
        frame, seen, capture_error = await _look(desktop, model)
        last_state = seen.state
        playbook_name: str | None = None
        why = ""
        if frame is not None and (seen.state == wanted or (wanted == "ready" and seen.state in model.ready_states)):
            if model.probe is not None and not await model.probe(desktop):
                playbook_name, why = model.on_unresponsive, "the application does not respond to input"
            elif (wanted_user := account.username if account is not None else session_key) is not None \
                    and model.session_reader is not None:
                # Logged in as the account this attempt was given (and holds the lease of),
                # not merely as anyone.
                seen_user = await model.session_reader(desktop, frame)
                if seen_user != wanted_user:
                    playbook_name = model.logout or "restart_app"
                    why = f"logged in as {seen_user!r}, the run needs {wanted_user!r}"
            if playbook_name is None:
                evidence = await record("preflight.ok", {"state": seen.state, "steps": len(steps)}, frame)
                return PreflightResult(True, seen.state, steps=steps, frame=frame,
                                       evidence_id=evidence, elapsed=time.monotonic() - t0)
        else:
            playbook_name = model.recovery_for(seen.state)
            why = capture_error or f"screen shows {seen.state!r}"
        if len(steps) >= max_steps:
            break
        playbook = model.playbooks.get(playbook_name)
        if playbook is None:
            return PreflightResult(False, seen.state, f"no playbook {playbook_name!r} in the app model",
                                   steps, frame, elapsed=time.monotonic() - t0)
        steps.append(playbook_name)
        before_id = await record("playbook.before", {"playbook": playbook_name, "state": seen.state, "why": why}, frame)
        ctx = PlaybookContext(desktop, model, account, session_key, seen)
        error = ""
        try:
            await playbook(ctx)
        except Stopped:
            raise
        except Exception as exc:  # a playbook that fails is one failed step, not a crash
            error = f"{type(exc).__name__}: {exc}"
            if account is not None and len(account.password) >= 3:
                error = error.replace(account.password, REDACTED)  # it may quote what it typed
            log.info("playbook %s failed: %s", playbook_name, error)
        after, after_seen, _ = await _look(desktop, model)
        await record("playbook.step", {
            "playbook": playbook_name, "from_state": seen.state, "to_state": after_seen.state,
            "why": why, "error": error or None, "before_screenshot": before_id,
        }, after)
    return PreflightResult(
        False, last_state,
        f"could not reach {wanted!r} in {max_steps} playbook steps (last screen: {last_state!r}; "
        f"tried {', '.join(steps) or 'nothing'})",
        steps, elapsed=time.monotonic() - t0,
    )


async def _look(desktop: Desktop, model: AppModel) -> tuple[Frame | None, Classification, str]:
    """Capture and classify; a capture that fails is the state NO_SCREEN, with its error."""
    try:
        frame = await desktop.screenshot()
    except DesktopError as exc:
        return None, Classification(NO_SCREEN), f"the screen cannot be captured: {exc}"
    return frame, model.classify(frame), ""
