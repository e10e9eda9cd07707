"""Trying a pack's automation once, locally, with no orchestrator: ``deskfleet pack try``.

The pack author's inner loop — write a playbook, try it in seconds. :func:`try_automation`
starts the pack's application on a fresh Xvfb display (or takes over this session's,
``desktop="local"``) exactly as an agent does (:func:`~deskfleet.agent.host.open_machine`),
runs the real pre-flight (:func:`~deskfleet.agent.preflight.preflight`: settle, playbooks,
probe), optionally the automation's reconcile check, then the automation itself with a real
:class:`~deskfleet.sdk.Context` — and reports every step as it happens (the screen state,
each playbook and why, each progress step), with its screenshot when asked for them.

Nothing is sent anywhere: progress goes to ``on_step``, artifacts and screenshots to a
directory. Accounts are the caller's (:func:`local_accounts`); their secrets never appear
in a step or an error (they are scrubbed from the automation's error text too).

    result = await try_automation("./acme", "acme.add_item", {"name": "Widget", "quantity": 3},
                                  on_step=print, screenshots=Path("shots"))
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import shlex
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from ..appmodel import Account, AppModel, Credential, ProbeResult
from ..desktop import Desktop, Frame
from ..desktop.driver import RealDesktop
from ..errors import BusinessError, ConfigError, DeskfleetError, Stopped
from ..sdk import Automation, Context, encode_png
from .loader import Pack, PackError, load_pack

#: the machine's name in a trial (the ``{machine}`` placeholder of the app's command)
MACHINE = "try"
#: what a secret is replaced with wherever it would be shown
REDACTED = "***"


@dataclass(frozen=True, slots=True)
class TrialStep:
    """One thing that happened, as it happened."""

    at: float  # seconds since the trial started
    kind: str  # desktop | playbook | ready | reconcile | progress | artifact | output | error
    text: str
    screenshot: Path | None = None  # where its screenshot was saved, if screenshots are kept


@dataclass(slots=True)
class TrialResult:
    ok: bool
    output: dict[str, Any] | None = None
    error: str = ""  # one line, when not ok
    reconciled: bool = False  # the reconcile check found the effect: the automation did not run
    display: str | None = None
    steps: list[TrialStep] = field(default_factory=list)


def local_accounts(pack: Pack, *, account: str | None = None, username: str | None = None,
                   password: str | None = None) -> tuple[str | None, dict[str, Credential]]:
    """The account a trial logs in as: (its name, the credentials by name).

    ``username`` and ``password`` (read from stdin or a file by the caller, never argv) make
    one account, named ``account`` or the username. Without them, the pack's demo accounts
    (``[hooks] accounts``) are used: ``account``, else the manifest's default, else the first.
    A pack that logs in and has neither is refused with what to give."""
    if username is not None:
        if password is None:
            raise ConfigError("--username needs the password: --password-stdin or --password-file FILE")
        name = account or username
        return name, {name: Credential(username, password)}
    if password is not None:
        raise ConfigError("a password without --username: give --username U too")
    make = pack.hook("accounts")
    demo: dict[str, Credential] = dict(make(0)) if make is not None else {}
    if account is not None:
        if account not in demo:
            known = f"the pack's demo accounts are {', '.join(sorted(demo))}" if demo else \
                "the pack has no demo accounts ([hooks] accounts)"
            raise ConfigError(f"no account {account!r}: {known}; or give --username U with --password-stdin")
        return account, demo
    if demo:
        default = pack.manifest.accounts.default
        return (default if default in demo else next(iter(demo))), demo
    if pack.manifest.accounts.login:
        raise ConfigError(f"pack {pack.name} logs in ([accounts] login = true): give --username U with "
                          "--password-stdin or --password-file FILE")
    return None, {}


def find_automation(pack: Pack, name: str) -> Automation[Any, Any]:
    """The pack's automation ``name`` (the pack's name in front may be left out)."""
    found = pack.registry.get(name) or pack.registry.get(f"{pack.name}.{name}")
    if found is None:
        offered = ", ".join(sorted({a.name for a in pack.registry})) or "none"
        raise PackError(f"pack {pack.name} has no automation {name!r} (it offers: {offered})")
    return found


def machine_config(pack: Pack, *, desktop: str = "xvfb", app_args: Sequence[str] = (),
                   state_dir: Path = Path("deskfleet-try"), screen: tuple[int, int] | None = None) -> Any:
    """An agent host's configuration for one machine of ``pack``, with no orchestrator."""
    from ..agent.host import AgentHostConfig

    if desktop not in ("xvfb", "local"):
        raise ConfigError(f"desktop must be xvfb or local, not {desktop!r}")
    return AgentHostConfig(servers=[], packs=[pack], desktop=desktop, machine=MACHINE, state_dir=state_dir,
                           data_dir=state_dir / "data", log_dir=state_dir / "logs", screen=screen,
                           app_args={pack.name: list(app_args)} if app_args else {}, upkeep=False)


@contextlib.asynccontextmanager
async def pack_machine(pack: Pack, *, desktop: str = "xvfb", app_args: Sequence[str] = (),
                       state_dir: Path = Path("deskfleet-try"),
                       screen: tuple[int, int] | None = None) -> AsyncIterator[RealDesktop]:
    """The pack's application up on a fresh Xvfb display (or this session): its desktop.
    Leaving the block stops the app, then the display — but an app that was already running
    in this session (``local``), and was taken over, is left running. The app's output goes
    to ``<state_dir>/logs``, its ``{data}`` is ``<state_dir>/data/<pack>``."""
    from ..agent.host import open_machine

    config = machine_config(pack, desktop=desktop, app_args=app_args, state_dir=state_dir, screen=screen)
    station, desktops = await open_machine(config, MACHINE)  # a failed start quotes the app's log
    try:
        yield desktops[0]
    finally:
        await station.close()  # an app it took over (--desktop local) is left running


def _with_probe_reported(model: AppModel, recorder: _Recorder) -> AppModel:
    """The pack's model, its probe's every answer reported as a step (pre-flight says only
    when it fails)."""
    probe = model.probe
    if probe is None:
        return model

    async def reported(desktop: Desktop) -> ProbeResult | bool:
        t0 = time.monotonic()
        answer = await probe(desktop)
        ok, reason = (answer.ok, answer.reason) if isinstance(answer, ProbeResult) else (bool(answer), "")
        took = f"{time.monotonic() - t0:.2f}s"
        recorder.step("probe", f"responsive ({took})" if ok else f"failed ({took}): {reason or 'no reason given'}")
        return answer

    return dataclasses.replace(model, probe=reported)


class _Recorder:
    """Turns what happens into steps: timed, reported at once, screenshots saved in order."""

    def __init__(self, on_step: Callable[[TrialStep], None] | None, screenshots: Path | None,
                 secrets: Sequence[str]) -> None:
        self.t0 = time.monotonic()
        self.on_step = on_step
        self.screenshots = screenshots
        self.secrets = [s for s in secrets if s]
        self.steps: list[TrialStep] = []
        self.shots = 0
        self.stop = asyncio.Event()  # set to stop pre-flight and the automation
        if screenshots is not None:
            screenshots.mkdir(parents=True, exist_ok=True)

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text

    def save(self, label: str, data: bytes | None = None, frame: Frame | None = None, suffix: str = ".png") -> Path | None:
        if self.screenshots is None or (data is None and frame is None):
            return None
        self.shots += 1
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-")[:60] or "step"
        path = self.screenshots / f"{self.shots:02d}-{slug}{suffix}"
        path.write_bytes(data if data is not None else encode_png(frame) if frame is not None else b"")
        return path

    def step(self, kind: str, text: str, frame: Frame | None = None, label: str | None = None) -> TrialStep:
        shot = self.save(label or f"{kind}-{text}", frame=frame) if frame is not None else None
        step = TrialStep(round(time.monotonic() - self.t0, 2), kind, self.scrub(text), shot)
        self.steps.append(step)
        if self.on_step is not None:
            self.on_step(step)
        return step

    def preflight_recorder(self, mid_run: bool = False) -> Callable[[str, dict[str, Any], Frame | None],
                                                                    Awaitable[str | None]]:
        """The ``record`` callback of :func:`preflight`: each playbook and the state it proved."""
        prefix = "mid-run: " if mid_run else ""

        async def record(kind: str, data: dict[str, Any], frame: Frame | None) -> str | None:
            if kind == "playbook.before":
                state, name, why = data["state"], data["playbook"], data["why"]
                reason = "" if why == f"screen shows {state!r}" else f": {why}"
                s = self.step("screen", f"{prefix}{state} → playbook {name}{reason}", frame,
                              label=f"{state}-before-{name}")
            elif kind == "playbook.step":
                result = f"failed: {data['error']}" if data.get("error") else f"the screen shows {data['to_state']!r}"
                s = self.step("playbook", f"{prefix}{data['playbook']} done, {result}", frame,
                              label=f"after-{data['playbook']}-{data['to_state']}")
            elif kind == "preflight.ok":
                steps = data.get("steps", 0)
                s = self.step("ready", f"{prefix}{data['state']} (pre-flight: {steps} playbook step"
                              f"{'' if steps == 1 else 's'})", frame, label=f"ready-{data['state']}")
            else:
                s = self.step(kind, json.dumps(data), frame)
            return str(s.screenshot) if s.screenshot else None

        return record


async def try_automation(
    pack: Pack | str | os.PathLike[str],
    automation: str,
    data: Mapping[str, Any] | None = None,
    *,
    desktop: str = "xvfb",
    account: str | None = None,
    credentials: Mapping[str, Credential] | None = None,
    app_args: Sequence[str] = (),
    reconcile: bool = False,
    screenshots: Path | None = None,
    state_dir: Path = Path("deskfleet-try"),
    timeout: float = 120.0,
    on_step: Callable[[TrialStep], None] | None = None,
    hold: Callable[[RealDesktop, TrialResult], Awaitable[None]] | None = None,
) -> TrialResult:
    """Run ``automation`` of ``pack`` once on a desktop of its own and return what happened.

    ``credentials`` by account name and ``account`` (the one to log in as) come from
    :func:`local_accounts`. Bad input, an unknown automation or a missing account raise
    (:class:`~deskfleet.errors.DeskfleetError`, one line) before any display starts; what
    fails on the desktop — pre-flight, the automation, ``timeout`` — is an unsuccessful
    result whose ``error`` is one line. ``hold(desktop)``, if given, runs after the
    automation and before the app and display stop (``--keep-open``)."""
    loaded = pack if isinstance(pack, Pack) else load_pack(pack)
    auto = find_automation(loaded, automation)
    if reconcile and auto.reconcile_func is None:
        raise PackError(f"automation {auto.name} has no reconcile check (@{auto.func.__name__}.reconcile)")
    payload = dict(data or {})
    auto.parse_input(payload)  # BusinessError saying what is wrong, before anything starts
    creds = dict(credentials or {})
    if account is not None and account not in creds:
        raise ConfigError(f"no credentials for account {account!r}")
    recorder = _Recorder(on_step, screenshots, [c.password for c in creds.values()]
                         + [c.totp_seed or "" for c in creds.values()])
    result = TrialResult(ok=False, steps=recorder.steps)
    started = time.monotonic()
    recorder.step("desktop", f"starting {loaded.name}'s app on a new Xvfb display" if desktop == "xvfb" else
                  f"taking over {loaded.name}'s app on this session's display, or starting it")
    async with pack_machine(loaded, desktop=desktop, app_args=app_args, state_dir=state_dir) as machine:
        result.display = machine.host.display
        w, h = loaded.screen
        recorder.step("desktop", f"DISPLAY={result.display}  {w}x{h}, app pid {machine.app_pid}"
                      + (f" (taken over: it was running as {_command_line(machine.app_pid)})" if machine.attached else "")
                      + f", up in {time.monotonic() - started:.1f}s")
        try:
            await asyncio.wait_for(_run(loaded, auto, payload, machine, account, creds, reconcile, recorder,
                                        result), timeout)
        except TimeoutError:
            recorder.stop.set()
            result.ok, result.error = False, f"timed out after {timeout:g}s (--timeout)"
        if not result.ok:
            with contextlib.suppress(DeskfleetError, OSError):
                frame = await machine.screenshot()
                recorder.step("error", result.error, frame, label="failure")
        if hold is not None:
            await hold(machine, result)
    return result


def _command_line(pid: int | None) -> str:
    """What a taken-over app was started with: it may not be the pack's command (another
    configuration, another database), and the person trying the pack should see that."""
    try:
        return shlex.join(psutil.Process(pid).cmdline()) if pid is not None else "?"
    except psutil.Error:
        return "?"


async def _run(pack: Pack, auto: Automation[Any, Any], data: dict[str, Any], desktop: RealDesktop,
               account: str | None, credentials: dict[str, Credential], reconcile: bool, recorder: _Recorder,
               result: TrialResult) -> None:
    from ..agent.preflight import PreflightResult, preflight

    model = _with_probe_reported(pack.model, recorder)
    name = account or model.default_account
    login = Account.from_credential(name, credentials[name], app=pack.name) if name in credentials else None

    async def ensure(state: str, mid_run: bool = False) -> PreflightResult:
        return await preflight(desktop, model, state, session_key=account, account=login,
                               record=recorder.preflight_recorder(mid_run), stop=recorder.stop)

    async def progress(step: str, percent: float | None, message: str | None) -> None:
        extra = "".join([f" ({percent:g}%)" if percent is not None else "", f": {message}" if message else ""])
        frame = await desktop.screenshot() if recorder.screenshots is not None else None
        recorder.step("progress", step + extra, frame, label=f"progress-{step}")

    async def upload(name: str, content: bytes, content_type: str) -> str:
        suffix = ".png" if content_type == "image/png" else ".bin"
        path = recorder.save(f"artifact-{name}", data=content, suffix=suffix)
        recorder.step("artifact", f"{name} ({content_type}, {len(content)} bytes)"
                      + ("" if path else ": not kept (give --screenshots DIR)"))
        return str(path or name)

    ctx = Context(run_id="try", attempt_id=0, attempt_number=1, machine_id=MACHINE, desktop=desktop, model=model,
                  report_progress=progress, upload=upload, stop_event=recorder.stop,
                  ensure=lambda state: ensure(state, mid_run=True), required_state=auto.required_state)
    try:
        if auto.required_state != "any":
            pre = await ensure(auto.required_state)
            if not pre.ok:
                result.error = recorder.scrub(f"pre-flight failed: {pre.detail}")
                return
        if reconcile:
            found = await auto.run_reconcile(ctx, data)
            if found is not None:
                recorder.step("reconcile", f"the effect was found: {json.dumps(found)} (the automation does not run)")
                result.ok, result.output, result.reconciled = True, found, True
                return
            recorder.step("reconcile", "the effect was not found: running the automation")
        output = await auto.execute(ctx, data)
    except BusinessError as exc:
        result.error = recorder.scrub(f"business error: {exc}")
        return
    except Stopped as exc:
        result.error = recorder.scrub(f"stopped: {exc.reason}")
        return
    except Exception as exc:  # the automation's failure is the trial's result, in one line
        text = " ".join(f"{type(exc).__name__}: {exc}".split())
        result.error = recorder.scrub(text)[:1000]
        return
    frame = await desktop.screenshot() if recorder.screenshots is not None else None
    recorder.step("output", json.dumps(output), frame, label="output")
    result.ok, result.output = True, output
