"""The automation SDK: how users write the work deskfleet runs.

    from pydantic import BaseModel
    from deskfleet import automation, Context, BusinessError

    class In(BaseModel):
        mrn: str
        name: str

    class Out(BaseModel):
        record_id: int

    @automation(name="ehr.create_patient", version="2", required_state="ready")
    async def create_patient(ctx: Context, data: In) -> Out:
        await ctx.progress("open form")
        ...
        return Out(record_id=...)

    @create_patient.reconcile
    async def find_patient(ctx: Context, data: In) -> Out | None:
        ...  # return the output if the effect already happened, None if not

An automation is either ``async def`` (it awaits ``ctx.desktop``) or a plain ``def``; a
plain function runs in a worker thread and sees a blocking facade of the same context
(``ctx.desktop.click(…)`` without ``await``), so one implementation serves both styles.

Input and output are pydantic models; their JSON schemas are advertised to the
orchestrator, which validates client input at submit. Fields typed ``SecretStr`` are
secrets: encrypted at rest, redacted in every response and log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import inspect
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, SecretStr, ValidationError

from .appmodel import HUMAN_KINDS, AppModel, HumanAnswer
from .config import RETENTION_HINT, parse_retention
from .desktop import Desktop, Frame, Region
from .desktop.fill import fill as fill_field
from .errors import BusinessError, DesktopError, StateTimeout, Stopped
from .models import AutomationSpec, version_key

In = TypeVar("In", bound=BaseModel)
Out = TypeVar("Out", bound=BaseModel)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Lease:
    """The attempt's lease, as :meth:`Context.fenced` hands it to the effect it guards:
    checked (and renewed with the orchestrator) a moment ago."""

    #: the attempt's id: a fencing token — every newer lease on the run has a larger one, so
    #: a system that remembers the largest it has seen can refuse a late writer itself
    token: int
    #: the ``time.monotonic()`` by which the effect must be done: a little before the lease
    #: could expire (``inf`` outside an agent, as in ``deskfleet pack try``)
    deadline: float
    _stop: asyncio.Event | None = None

    @property
    def remaining(self) -> float:
        """Seconds left before :attr:`deadline` (a timeout for the effect's own call)."""
        return self.deadline - time.monotonic()

    def check(self) -> None:
        """Raise :class:`Stopped` if the lease may be gone by now: call it right before an
        effect that comes a while after entering the block."""
        if self._stop is not None and self._stop.is_set():
            raise Stopped("the orchestrator asked this attempt to stop")
        if time.monotonic() >= self.deadline:
            raise Stopped("lease_presumed_lost")



@dataclass(frozen=True, slots=True)
class UpdateContext:
    """What a pack's update hook (``[hooks] update`` in pack.toml) is given when its agent is
    asked to update the machine — a pool's rolling maintenance with ``update: pack``.

    The hook, ``def update(ctx: UpdateContext) -> None`` or ``async def``, applies the OS
    updates (on Windows e.g. the PSWindowsUpdate module's ``Install-WindowsUpdate``) and
    returns when they are applied, without rebooting: the maintenance reboots the machine
    next, through its provider. It raises to say the update failed (its message, shortened,
    is what the campaign shows: no secrets in it). It runs only while the machine is
    drained and idle; a plain ``def`` runs in a worker thread, so the agent keeps beating."""

    machine: str  # the machine's name
    pack: str  # the pack whose hook this is
    data_dir: Path | None  # the pack's {data} directory on this machine
    log: logging.Logger  # where to say what the update does (the agent's log)
    reason: str = ""  # why it was asked ("maintenance 3: 2026-12 patches")

class Context:
    """What an automation gets besides its input: the desktop, progress, screenshots,
    screen states (``state``, ``wait_for``, ``ensure``), :meth:`fill` — type into a field
    and confirm the text arrived —, :meth:`fenced` effects and :meth:`ask_human`.

    The agent creates one per attempt. Every call checks whether the attempt must stop
    (cancel, timeout, lease lost) and raises :class:`~deskfleet.errors.Stopped` if so.
    """

    def __init__(
        self,
        *,
        run_id: str,
        attempt_id: int,
        attempt_number: int,
        machine_id: str,
        desktop: Desktop,
        model: AppModel | None,
        report_progress: Callable[[str, float | None, str | None], Awaitable[None]],
        upload: Callable[[str, bytes, str], Awaitable[str]],
        stop_event: asyncio.Event,
        ensure: Callable[[str], Awaitable[Any]] | None = None,
        required_state: str = "ready",
        data_dir: Path | None = None,
        renew: Callable[[], Awaitable[float]] | None = None,
        ask_human: Callable[..., Awaitable[HumanAnswer]] | None = None,
    ) -> None:
        self.run_id = run_id
        self.attempt_id = attempt_id
        self.attempt_number = attempt_number
        self.machine_id = machine_id
        self.desktop = desktop
        self.model = model
        self._report_progress = report_progress
        self._upload = upload
        self._stop_event = stop_event
        self._ensure = ensure
        self._renew = renew
        self._ask_human = ask_human
        self.required_state = required_state
        #: the pack's ``{data}`` directory on this machine (where its app keeps what it keeps),
        #: None when the agent was given none (a simulated desktop without one)
        self.data_dir = data_dir
        self.log = logging.LoggerAdapter(
            logging.getLogger("deskfleet.automation"),
            {"run": run_id, "attempt": attempt_id, "machine": machine_id},
        )

    @property
    def stopping(self) -> bool:
        return self._stop_event.is_set()

    def check(self) -> None:
        """Raise :class:`Stopped` if the orchestrator asked this attempt to stop."""
        if self._stop_event.is_set():
            raise Stopped("the orchestrator asked this attempt to stop")

    @contextlib.asynccontextmanager
    async def fenced(self) -> AsyncIterator[Lease]:
        """Guard an effect outside the desktop — an API call, a file, a message — with the
        attempt's lease, as the desktop's input gate guards every click and key::

            async with ctx.fenced() as lease:
                backend.save(record, fencing_token=lease.token)

        On entry the lease is checked at the moment of the effect: with the agent's own
        reckoning (the attempt was not stopped, its heartbeats were acknowledged recently
        enough), then renewed with the orchestrator. If it is gone — the machine was
        silent or paused past it and the run may be running elsewhere, or the run was
        cancelled — :class:`Stopped` is raised and the block does not run.

        Do the effect at once inside the block: the guarantee holds until
        :attr:`Lease.deadline` (use :attr:`Lease.remaining` as the effect's own timeout,
        :meth:`Lease.check` before an effect that comes later). An effect made neither
        through the desktop nor inside ``fenced()`` is unfenced: a machine that was paused
        past its lease may still make it after another machine has — make such an effect
        idempotent, or give it a reconcile check."""
        self.check()
        deadline = await self._renew() if self._renew is not None else math.inf
        lease = Lease(self.attempt_id, deadline, self._stop_event)
        lease.check()
        yield lease
        if time.monotonic() > deadline:
            self.log.warning("a fenced effect ended %.3fs after its lease's deadline: make it quicker, "
                             "or bound it by lease.remaining", time.monotonic() - deadline)

    async def ask_human(self, kind: str, prompt: str, *, due: float | timedelta = 300.0,
                        escalate_after: float | timedelta | None = None, screenshot: bool = True,
                        secret: bool = False) -> HumanAnswer:
        """Ask a person for what only a person can do — approve a push notification, read out
        an SMS code, solve a captcha — and wait for their answer::

            answer = await ctx.ask_human("sms_code", "Type the code the bank texted to +44 …1234",
                                         due=timedelta(minutes=5), secret=True)
            await ctx.fill(CODE_FIELD, answer.response or "", label="SMS code", secret=True)

        ``kind`` names what is asked (``push_approval``, ``sms_code``, ``captcha``,
        ``confirm``, or a name of the pack's own); ``prompt`` says what to do. The task is
        listed by the API and ``deskfleet tasks``, and posted to the server's human webhook;
        ``escalate_after`` posts it to the escalation webhook if nobody answered by then;
        ``screenshot`` attaches the screen as it is now; ``secret`` marks the answer as a
        secret (never shown, logged or kept once this attempt has it).

        The machine stays leased while the person takes their time (heartbeats go on; the
        progress watchdog waits with them). ``due`` (seconds or a timedelta) is clamped to a
        little before the attempt's own timeout. If nobody answers by then the attempt is
        stopped — :class:`Stopped` with ``human_timeout`` — and the run retried per its
        policy (after its reconcile check, or as idempotent), on this machine or another."""
        self.check()
        due_s = due.total_seconds() if isinstance(due, timedelta) else float(due)
        esc_s = escalate_after.total_seconds() if isinstance(escalate_after, timedelta) else escalate_after
        if not kind or len(kind) > 64 or not all(c.isalnum() or c in "_.-" for c in kind):
            raise ValueError(f"ask_human: kind is a name of letters, digits, '_', '.' or '-' (such as "
                             f"{', '.join(HUMAN_KINDS)}), not {kind!r}")
        if not prompt.strip() or len(prompt) > 2000:
            raise ValueError("ask_human: the prompt says what the person must do, in 1 to 2000 characters")
        if not due_s > 0 or (esc_s is not None and not esc_s > 0):
            raise ValueError("ask_human: due and escalate_after are durations of more than 0 seconds")
        if self._ask_human is None:
            raise RuntimeError("ask_human needs an orchestrator to ask people through; this context has none "
                               "(as in 'deskfleet pack try')")
        return await self._ask_human(kind, prompt, due=due_s, escalate_after=None if esc_s is None else float(esc_s),
                                     screenshot=screenshot, secret=secret)

    async def progress(
        self, step: str, *, percent: float | None = None, message: str | None = None
    ) -> None:
        """Report a step: it feeds the run's timeline and the progress watchdog."""
        self.check()
        await self._report_progress(step, percent, message)

    async def screenshot(self, name: str = "screenshot") -> str:
        """Capture the screen and attach it to the run; returns the artifact id."""
        self.check()
        frame = await self.desktop.screenshot()
        return await self._upload(name, encode_png(frame), "image/png")

    async def artifact(self, name: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        self.check()
        return await self._upload(name, data, content_type)

    async def state(self) -> str:
        """The screen state the app model recognises now (``unknown`` if none)."""
        if self.model is None:
            raise RuntimeError("this agent has no app model; state recognition is unavailable")
        return (await self.model.look(self.desktop))[1].state

    async def wait_for(self, *states: str, timeout: float = 10.0, interval: float = 0.05) -> str:
        """Wait until the screen shows one of ``states``; return which. Never sleeps blindly."""
        if self.model is None:
            raise RuntimeError("this agent has no app model; state recognition is unavailable")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        seen = "unknown"
        while True:
            self.check()
            seen = (await self.model.look(self.desktop))[1].state
            if seen in states:
                return seen
            if loop.time() >= deadline:
                raise StateTimeout("|".join(states), seen, timeout)
            await asyncio.sleep(interval)

    async def expect(self, *wanted: str, trouble: Iterable[str] = (), timeout: float = 10.0) -> str:
        """Wait for one of ``wanted`` and return which; raise :class:`DesktopError` at once if
        the screen shows one of ``trouble`` instead (an error dialog, the login screen), and
        :class:`StateTimeout` if neither comes within ``timeout`` seconds."""
        others = [s for s in trouble if s not in wanted]
        seen = await self.wait_for(*wanted, *others, timeout=timeout)
        if seen not in wanted:
            raise DesktopError(self._unexpected(seen, wanted))
        return seen

    async def act(self, action: Callable[[], Awaitable[Any]], *wanted: str, trouble: Iterable[str] = (),
                  recover_on: Iterable[str] = (), timeout: float = 10.0) -> str:
        """Do ``action`` (a click, a key, typing) and wait for one of ``wanted``, as
        :meth:`expect` does. If the screen shows one of ``recover_on`` instead — typically the
        screens of a session that ended mid-run (the login screen, a lock screen) — bring the
        app back with :meth:`recover` (the model's playbooks, with this run's account), say so
        on the timeline, and do ``action`` once more. A second miss raises DesktopError.

        ``action`` must make sense again from the state this automation starts in: recover()
        returns there, not to the screen the action was taken on."""
        trouble = tuple(trouble)
        recover_on = tuple(recover_on)
        for again in (False, True):
            await action()
            others = [s for s in (*trouble, *recover_on) if s not in wanted]
            seen = await self.wait_for(*wanted, *others, timeout=timeout)
            if seen in wanted:
                return seen
            if seen in recover_on and not again:
                await self.progress(f"recover from {seen!r}", message=f"the application showed {seen!r} mid-run")
                await self.recover()
                continue
            raise DesktopError(self._unexpected(seen, wanted))
        raise AssertionError("unreachable")

    def _unexpected(self, seen: str, wanted: tuple[str, ...]) -> str:
        app = self.model.name if self.model is not None else "the application"
        return f"{app} shows {seen!r} where {' or '.join(repr(w) for w in wanted)} was expected"

    async def fill(self, field: Region, text: str, *, label: str, read: Region | None = None,
                   secret: bool = False, clear: bool = True) -> None:
        """Click ``field``, replace what it holds with ``text`` and confirm the text arrived:
        read back by OCR (of ``read`` if given; OCR's usual confusions such as O/0 and l/1
        are forgiven), or for ``secret=True`` (a password field showing dots) by the field's
        pixels changing from the empty field's. One retry, then DesktopError naming the
        field by ``label`` ("the password field did not take the text …") — never quoting a
        secret. See :func:`deskfleet.desktop.fill.fill`."""
        self.check()
        await fill_field(self.desktop, field, text, label=label, read=read, secret=secret, clear=clear)

    async def ensure(self, state: str = "ready") -> str:
        """Bring the application to ``state`` with the app model's playbooks, as pre-flight
        does — with this run's account — and return the state reached. For a screen the
        automation did not expect mid-run: a session that expired, a dialog that came up.
        Every step is on the run's timeline. DesktopError if the state cannot be reached."""
        self.check()
        if self._ensure is None:
            raise RuntimeError("this agent has no app model; ensure() needs one")
        result = await self._ensure(state)
        if not result.ok:
            raise DesktopError(f"could not bring the application back to {state!r}: {result.detail}")
        return str(result.state)

    async def recover(self) -> str:
        """Back to the state this automation starts in (its ``required_state``): see :meth:`ensure`."""
        return await self.ensure("ready" if self.required_state == "any" else self.required_state)


def encode_png(frame: Frame) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class _Blocking:
    """Blocking facade over an object with coroutine methods, for automations run in a thread."""

    def __init__(self, target: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._target = target
        self._loop = loop

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if inspect.iscoroutinefunction(value):

            @functools.wraps(value)
            def call(*args: Any, **kwargs: Any) -> Any:
                return asyncio.run_coroutine_threadsafe(value(*args, **kwargs), self._loop).result()

            return call
        if name == "desktop":
            return _Blocking(value, self._loop)
        if name == "fenced":
            return functools.partial(_blocking_cm, value, self._loop)
        return value


@contextlib.contextmanager
def _blocking_cm(make: Callable[[], Any], loop: asyncio.AbstractEventLoop) -> Iterator[Any]:
    """An async context manager (``ctx.fenced()``) entered and left from a worker thread."""
    cm = make()
    value = asyncio.run_coroutine_threadsafe(cm.__aenter__(), loop).result()
    try:
        yield value
    except BaseException as exc:
        if not asyncio.run_coroutine_threadsafe(cm.__aexit__(type(exc), exc, exc.__traceback__), loop).result():
            raise
    else:
        asyncio.run_coroutine_threadsafe(cm.__aexit__(None, None, None), loop).result()


@dataclass(slots=True)
class Automation(Generic[In, Out]):
    name: str
    version: str
    func: Callable[..., Any]
    input_model: type[In]
    output_model: type[Out]
    idempotent: bool = False
    required_state: str = "ready"
    description: str = ""
    reconcile_func: Callable[..., Any] | None = None
    pack: str | None = None  # the pack (application) it works in
    needs_account: bool = False  # its pre-flight logs in: each attempt is given an account of ``pack``
    #: seconds the orchestrator keeps its attempts' artifacts (0: for good); None: the pool's
    #: policy, else the server's default. The agent sends it with each upload.
    artifact_retention: float | None = None

    def reconcile(self, func: Callable[..., Any]) -> Callable[..., Any]:
        """Decorator: the check that says whether this automation's effect already happened."""
        self.reconcile_func = func
        return func

    @property
    def spec(self) -> AutomationSpec:
        input_schema = self.input_model.model_json_schema()
        return AutomationSpec(
            name=self.name,
            version=self.version,
            description=self.description,
            input_schema=input_schema,
            output_schema=self.output_model.model_json_schema(),
            idempotent=self.idempotent,
            has_reconcile=self.reconcile_func is not None,
            required_state=self.required_state,
            secret_fields=secret_fields(self.input_model),
            pack=self.pack,
            needs_account=self.needs_account,
        )

    def parse_input(self, data: dict[str, Any]) -> In:
        try:
            return self.input_model.model_validate(data)
        except ValidationError as exc:
            # Never quote the input back: it may hold secrets.
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'input'}: {e['msg']}"
                for e in exc.errors(include_input=False, include_url=False)
            )
            # Another machine would reject it the same way: fail the run, do not retry.
            raise BusinessError(f"input rejected by {self.name}@{self.version}: {problems}") from None

    async def execute(self, ctx: Context, data: dict[str, Any]) -> dict[str, Any]:
        result = await _call(self.func, ctx, self.parse_input(data))
        return self._dump(result)

    async def run_reconcile(self, ctx: Context, data: dict[str, Any]) -> dict[str, Any] | None:
        if self.reconcile_func is None:
            raise RuntimeError(f"automation {self.name} has no reconcile check")
        result = await _call(self.reconcile_func, ctx, self.parse_input(data))
        return None if result is None else self._dump(result)

    def _dump(self, result: Any) -> dict[str, Any]:
        if isinstance(result, self.output_model):
            return result.model_dump(mode="json")
        try:
            return self.output_model.model_validate(result).model_dump(mode="json")
        except ValidationError as exc:
            raise TypeError(
                f"automation {self.name} returned {type(result).__name__}, "
                f"not a valid {self.output_model.__name__}: {exc.errors()[0]['msg']}"
            ) from exc


async def _call(func: Callable[..., Any], ctx: Context, data: BaseModel) -> Any:
    if inspect.iscoroutinefunction(func):
        return await func(ctx, data)
    loop = asyncio.get_running_loop()
    facade = _Blocking(ctx, loop)
    return await asyncio.to_thread(func, facade, data)


def automation(
    *,
    name: str,
    version: str = "1",
    idempotent: bool = False,
    required_state: str = "ready",
    description: str = "",
    pack: str | None = None,
    needs_account: bool = False,
    artifact_retention: str | float | None = None,
) -> Callable[[Callable[..., Any]], Automation[Any, Any]]:
    """Declare an automation. Input and output models are read from the type hints.

    ``needs_account``: its pre-flight logs in to the application of ``pack``, so each
    attempt is given an account of that pack from the orchestrator's vault.

    ``artifact_retention``: how long the orchestrator keeps the screenshots and files of its
    attempts — ``"7d"``, ``"12h"``, seconds, or ``"forever"``/0 — before the pool's policy
    (``artifacts.retention``) and the server's default; None: theirs (docs/access.md)."""
    try:
        retention = parse_retention(artifact_retention)
    except ValueError:
        raise ValueError(f"{name}: artifact_retention {artifact_retention!r}: {RETENTION_HINT}") from None

    def wrap(func: Callable[..., Any]) -> Automation[Any, Any]:
        hints = _resolved_hints(func)
        params = list(inspect.signature(func).parameters)
        if len(params) != 2:
            raise TypeError(f"{func.__qualname__}: an automation takes (ctx, input)")
        input_model = hints.get(params[1])
        output_model = hints.get("return")
        for what, model in (("input", input_model), ("output", output_model)):
            if not (isinstance(model, type) and issubclass(model, BaseModel)):
                raise TypeError(
                    f"{func.__qualname__}: annotate the {what} with a pydantic model "
                    f"(got {model!r})"
                )
        secret_fields(input_model)  # type: ignore[arg-type]  # refuse nested secrets now, not at run time
        return Automation(
            name=name,
            version=version,
            func=func,
            input_model=input_model,  # type: ignore[arg-type]
            output_model=output_model,  # type: ignore[arg-type]
            idempotent=idempotent,
            required_state=required_state,
            description=description or (inspect.getdoc(func) or "").split("\n")[0],
            pack=pack,
            needs_account=needs_account,
            artifact_retention=retention,
        )

    return wrap


def _resolved_hints(func: Callable[..., Any]) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(func)


def secret_fields(model: type[BaseModel]) -> list[str]:
    """Top-level input fields typed ``SecretStr``: encrypted at rest and redacted.

    A ``SecretStr`` deeper inside the input (a nested model, a list) is refused: the
    orchestrator encrypts and redacts top-level fields, and a secret it cannot see would
    be stored in plain text.
    """
    out = []
    for fname, info in model.model_fields.items():
        if _mentions_secret(info.annotation, top=True):
            out.append(info.alias or fname)
        elif _mentions_secret(info.annotation, top=False):
            raise TypeError(
                f"{model.__name__}.{fname}: SecretStr is supported only as a top-level input "
                "field (so that it can be encrypted and redacted); move the secret up"
            )
    return out


def _mentions_secret(ann: Any, *, top: bool, depth: int = 0) -> bool:
    if depth > 8:
        return False
    if ann is SecretStr:
        return top
    args = getattr(ann, "__args__", ()) or ()
    origin = getattr(ann, "__origin__", None)
    if top and SecretStr in args and origin is not list and origin is not dict:
        return True  # Optional[SecretStr] / SecretStr | None
    if top:
        return False
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return any(_mentions_secret(f.annotation, top=True, depth=depth + 1)
                   or _mentions_secret(f.annotation, top=False, depth=depth + 1)
                   for f in ann.model_fields.values())
    return any(a is SecretStr or _mentions_secret(a, top=False, depth=depth + 1) for a in args)


class Registry:
    """The automations an agent offers, by name and version."""

    def __init__(self, automations: Iterable[Automation[Any, Any]] = ()) -> None:
        self._by_key: dict[str, Automation[Any, Any]] = {}
        for a in automations:
            self.add(a)

    def add(self, a: Automation[Any, Any]) -> None:
        key = f"{a.name}@{a.version}"
        if key in self._by_key:
            raise ValueError(f"automation {key} is registered twice")
        self._by_key[key] = a

    def get(self, name: str, version: str | None = None) -> Automation[Any, Any] | None:
        if version is not None:
            return self._by_key.get(f"{name}@{version}")
        candidates = [a for a in self._by_key.values() if a.name == name]
        return max(candidates, key=lambda a: version_key(a.version), default=None)

    def specs(self) -> list[AutomationSpec]:
        return [a.spec for a in self._by_key.values()]

    def for_pack(self, pack: str, *, logs_in: bool = True) -> Registry:
        """The same automations as part of ``pack``; with ``logs_in``, every one that needs a
        screen state (``required_state`` other than ``any``) logs in first, so each attempt
        is given an account of the pack from the vault."""
        from dataclasses import replace

        return Registry(replace(a, pack=a.pack or pack,
                                needs_account=a.needs_account or (logs_in and a.required_state != "any"))
                        for a in self)

    def __len__(self) -> int:
        return len(self._by_key)

    def __iter__(self) -> Any:
        return iter(self._by_key.values())

    @classmethod
    def from_modules(cls, names: Iterable[str]) -> Registry:
        """Every :class:`Automation` defined at the top level of the named modules."""
        found: list[Automation[Any, Any]] = []
        for modname in names:
            module = importlib.import_module(modname)
            found.extend(v for v in vars(module).values() if isinstance(v, Automation))
        return cls(found)
