"""Pre-flight: prove by a fresh screenshot that the machine is in the state an automation
needs — or bring it there with the app model's playbooks (invariant 5).

    screenshot (+ the window system's facts) → classify → settled? → wanted and responsive
    and right account? → done
                                     ↘ otherwise: run the playbook for what the screen shows, repeat
                                       (bounded; every step recorded with before and after screenshots)

On a real desktop the window system has its say beside the pixels: a window over the app
that the recognised state does not account for makes it ``covered`` (never ready), and a
ready screen counts only if the app answers the window system's ping (X11 ``_NET_WM_PING``,
for toolkits that speak it: Qt, GTK; on Windows ``IsHungAppWindow`` and a ``WM_NULL`` sent
with ``SendMessageTimeout``) before the pack's probe runs.

A state must *settle* before pre-flight acts on it: a screen that a recovery would act on
must hold for the model's settle time (and frames) — a black frame between two windows, a
dialog caught while it draws, is not a crash or an error. A ready screen is taken at once
(the probe and the session check follow). A screen that cannot be captured at all (the display server died, the
session is gone) is not a reason to give up the attempt: it is one more state,
:data:`NO_SCREEN`, for which the app model names a playbook (typically a restart of the
desktop) like for any other. A screen of another size than the model's is not something
a playbook can fix: pre-flight fails at once and says so.

Pre-flight also keeps the machine's session note (``deskfleet.desktop.note_session``)
true as it goes: a screen the model calls signed out clears it; a playbook that logs in
(``@playbook(signs_in=True)``) and reaches a ready screen writes the account.

The same loop serves an automation mid-run (``ctx.ensure(state)``), with the run's account.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .. import tracing
from ..appmodel import Account, AppModel, AskHuman, PlaybookContext, ProbeResult
from ..crypto import REDACTED
from ..desktop import Desktop, Frame, SeesWindows, note_session
from ..errors import BusinessError, DesktopError, Stopped
from ..vision import WRONG_SCREEN, Classification

log = logging.getLogger(__name__)

#: the state of a screen that cannot be captured; ``AppModel.recoveries`` maps it to a playbook
NO_SCREEN = "no_screen"
#: seconds between looks while a state settles
SETTLE_POLL = 0.05
#: a screen that keeps changing for this long (beyond the settle time) is acted on as it is
SETTLE_GIVE_UP = 3.0
#: seconds a live app takes at most to answer the window system's ping (a few ms, busy or not)
PING_TIMEOUT = 1.0

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
    human: AskHuman | None = None,
) -> PreflightResult:
    t0 = time.monotonic()
    steps: list[str] = []
    last_state = "unknown"
    problems = await _problems(desktop)
    if problems:
        return PreflightResult(False, "unhealthy", "this machine cannot be driven: " + "; ".join(problems),
                               elapsed=time.monotonic() - t0)
    looked: tuple[Frame | None, Classification, str] | None = None  # the last step's settled look
    last_failure: tuple[str, str] | None = None
    for _ in range(max_steps + 1):
        if stop is not None and stop.is_set():
            raise Stopped("stopped during pre-flight")
        frame, seen, capture_error = looked or await _settled(desktop, model, wanted, stop)
        looked = None
        last_state = seen.state
        if seen.state in model.signed_out:
            note_session(desktop, None)
        playbook_name: str | None = None
        why = ""
        if frame is not None and model.is_ready(seen.state, wanted):
            if isinstance(desktop, SeesWindows) and await desktop.app_answers(PING_TIMEOUT) is False:
                playbook_name = model.on_unresponsive
                why = (f"the application did not answer the window system's ping within "
                       f"{PING_TIMEOUT:g}s: its event loop is stuck (hung)")
            elif model.probe is not None:
                ok, reason = _probe_answer(await model.probe(desktop))
                if not ok:
                    playbook_name = model.on_unresponsive
                    why = reason or "the application does not respond to input (probe failed)"
            wanted_user = account.username if account is not None else session_key
            if playbook_name is None and wanted_user is not None and model.session_reader is not None:
                # Logged in as the account this attempt was given (and holds the lease of),
                # not merely as anyone.
                seen_user = await model.session_reader(desktop, frame)
                if seen_user is not None:
                    note_session(desktop, seen_user)
                if seen_user != wanted_user:
                    playbook_name = model.logout or "restart_app"
                    why = f"logged in as {seen_user!r}, the run needs {wanted_user!r}"
            if playbook_name is None:
                evidence = await record("preflight.ok", {"state": seen.state, "steps": len(steps)}, frame)
                return PreflightResult(True, seen.state, steps=steps, frame=frame,
                                       evidence_id=evidence, elapsed=time.monotonic() - t0)
        elif seen.state == WRONG_SCREEN and WRONG_SCREEN not in model.recoveries:
            detail = seen.detail or "the screen is not the size the app model was recorded at"
            return PreflightResult(False, seen.state, detail, steps, frame, elapsed=time.monotonic() - t0)
        else:
            playbook_name = model.recovery_for(seen.state)
            why = capture_error or f"screen shows {seen.state!r}" + (f": {seen.detail}" if seen.detail else "")
        if len(steps) >= max_steps:
            break
        playbook = model.playbooks.get(playbook_name)
        if playbook is None:
            return PreflightResult(False, seen.state, f"no playbook {playbook_name!r} in the app model",
                                   steps, frame, elapsed=time.monotonic() - t0)
        steps.append(playbook_name)
        before_id = await record("playbook.before", {"playbook": playbook_name, "state": seen.state, "why": why}, frame)
        ctx = PlaybookContext(desktop, model, account, session_key, seen, human)
        error = ""
        final = ""  # a failure no further step can fix
        with tracing.span("deskfleet.playbook", {"deskfleet.playbook": playbook_name,
                                                 "deskfleet.screen": seen.state}) as span:
            try:
                await playbook(ctx)
            except Stopped:
                raise
            except (BusinessError, LookupError) as exc:
                # A refused password, an account without a TOTP seed: trying again would only
                # repeat it (and may lock the account). A person must fix it.
                error = _scrubbed(f"{type(exc).__name__}: {exc}", account)
                final = f"{playbook_name} failed: {error}"
            except Exception as exc:  # a playbook that fails is one failed step, not a crash
                error = _scrubbed(f"{type(exc).__name__}: {exc}", account)  # it may quote what it typed
                log.info("playbook %s failed: %s", playbook_name, error)
            if error:
                tracing.failed(span, error.partition(":")[0])  # the exception's type: its text may quote the app
        looked = await _settled(desktop, model, wanted, stop)
        after, after_seen, _ = looked
        if error and (playbook_name, error) == last_failure:
            final = f"{playbook_name} failed twice the same way: {error}"
        last_failure = (playbook_name, error) if error else None
        if after_seen.state in model.signed_out:
            note_session(desktop, None)
        elif not error and model.is_ready(after_seen.state) and playbook_name in model.meta.get("signs_in", ()):
            # The note names the user the app shows (the agent maps it to the vault's account).
            user = account.username if account is not None else session_key or model.default_account
            if user is not None:
                note_session(desktop, user)
        await record("playbook.step", {
            "playbook": playbook_name, "from_state": seen.state, "to_state": after_seen.state,
            "why": why, "error": error or None, "before_screenshot": before_id,
        }, after)
        if final:
            return PreflightResult(False, after_seen.state, final, steps, after,
                                   elapsed=time.monotonic() - t0)
    return PreflightResult(
        False, last_state,
        f"could not reach {wanted!r} in {max_steps} playbook steps (last screen: {last_state!r}; "
        f"tried {', '.join(steps) or 'nothing'})",
        steps, elapsed=time.monotonic() - t0,
    )


def _scrubbed(text: str, account: Account | None) -> str:
    if account is not None and len(account.password) >= 3:
        return text.replace(account.password, REDACTED)
    return text


def _probe_answer(answer: ProbeResult | bool) -> tuple[bool, str]:
    if isinstance(answer, ProbeResult):
        return answer.ok, answer.reason
    return bool(answer), ""


async def _problems(desktop: Desktop) -> list[str]:
    """What keeps this machine from being driven at all (a locked console, a wrong resolution)."""
    check = getattr(desktop, "problems", None)
    if check is None:
        return []
    try:
        found = await check()
    except Exception as exc:  # a health check that cannot run says nothing against the machine
        log.info("health check failed: %s", exc)
        return []
    return list(found)


async def _settled(desktop: Desktop, model: AppModel, wanted: str,
                   stop: asyncio.Event | None) -> tuple[Frame | None, Classification, str]:
    """Look until a state a playbook would act on holds: ``settle_frames`` looks in a row over
    ``settle`` seconds, so that a transitional frame triggers nothing. A ready screen returns at once."""
    frame, seen, error = await _look(desktop, model)
    if model.settle <= 0 and model.settle_frames <= 1:
        return frame, seen, error
    loop = asyncio.get_running_loop()
    since = loop.time()
    give_up = since + model.settle + SETTLE_GIVE_UP
    looks = 1
    while True:
        if frame is not None and model.is_ready(seen.state, wanted):
            return frame, seen, error  # nothing acts on a ready screen but the probe and the session check
        if looks >= model.settle_frames and loop.time() - since >= model.settle:
            return frame, seen, error
        if loop.time() >= give_up:
            return frame, seen, error  # a screen that keeps changing: act on what it shows now
        if stop is not None and stop.is_set():
            raise Stopped("stopped during pre-flight")
        await asyncio.sleep(SETTLE_POLL)
        frame2, seen2, error2 = await _look(desktop, model)
        if seen2.state != seen.state:
            since, looks = loop.time(), 1
        else:
            looks += 1
        frame, seen, error = frame2, seen2, error2


async def _look(desktop: Desktop, model: AppModel) -> tuple[Frame | None, Classification, str]:
    """Capture and classify; a capture that fails is the state NO_SCREEN, with its error."""
    try:
        frame, seen = await model.look(desktop)
    except DesktopError as exc:
        return None, Classification(NO_SCREEN), f"the screen cannot be captured: {exc}"
    return frame, seen, ""
