"""A provider that drives any hypervisor through hook scripts.

Hyper-V, vSphere, Proxmox, libvirt and in-house VM farms each have their own API and
tooling; rather than a driver per product, :class:`CommandProvider` runs a user's script
for each operation, in whatever language their platform scripts in (PowerShell for
Hyper-V, ``govc`` for vSphere, ``pvesh`` for Proxmox). The contract (also in
docs/providers.md; ``examples/providers/command-hooks/`` is a reference implementation):

Hooks
    Either a directory holding one executable per operation, named after it (``create``,
    ``destroy``, ``get``, ``list`` — required — and ``start``, ``stop``, ``reboot``,
    ``power_off``, ``tag``, ``update`` — optional), or one command run with the operation
    as its first extra argument (``hooks.py create``). A directory's files say what the
    provider can do: no ``power_off`` file, no fence; no ``update``, no rolling OS updates.
    A single command declares its optional operations with ``ops=`` (by default all but
    ``power_off`` and ``update``: neither a fence nor an updater is assumed).
    ``hibernate`` and ``warm_pool`` are declared by the caller (nothing on disk shows them).

Request
    One JSON object on stdin: ``{"op", "token"?, "machine_id"?, "spec"?, "tags"?,
    "hibernate"?, "pool"?}``. ``token`` comes with every change (create, start, stop,
    reboot, power_off, destroy, tag, update) and is also in the environment as
    ``DESKFLEET_TOKEN``; ``DESKFLEET_OP`` names the operation. ``spec`` (create) is
    ``{"name", "pool", "image", "labels", "tags"}``; ``pool`` (list) may be null.

Idempotency
    A token the hook has already acted on must not act again: ``create`` answers with the
    machine that token created, the others answer ``{}``. A retry after a timeout reuses
    the token, so a hook that forgets this creates machines twice.

Answer
    JSON on stdout: ``{"machine": M}`` for create and get, ``{"machines": [M, …]}`` for
    list, ``{}`` (or nothing) otherwise. ``M`` is ``{"id", "name", "pool", "state",
    "tags"?, "created_at"?, "state_since"?, "detail"?, "address"?}`` with ``state`` one of
    :class:`~deskfleet.providers.base.ProviderState` and times in epoch seconds; when
    ``created_at`` / ``state_since`` are missing, the time this provider first saw the
    machine (in that state) stands in.

Exit status
    0: done. 75 (``EX_TEMPFAIL``): failed, retry with the same token later. 3: no such
    machine (:class:`MachineNotFound`). Anything else, or death by a signal: failed for good.
    The last lines of stderr (at most 500 characters) become the error's message — it is
    logged, so never print a secret there.

Timeout
    Each call has ``timeout`` seconds. Hooks run in their own process group (session), and
    on timeout the whole group is killed — a hook's children too — and the call fails as
    retryable. A hook that leaves a process behind must redirect that process's stdout
    and stderr: the call lasts until both pipes close. The hook is run directly
    (``asyncio.create_subprocess_exec``), never through a shell; it inherits the
    environment, plus ``env=``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import ConfigError
from .base import (
    OPS,
    Capabilities,
    MachineNotFound,
    MachineProvider,
    MachineSpec,
    ProviderError,
    ProviderMachine,
    ProviderState,
)

log = logging.getLogger(__name__)

#: the hooks a provider cannot work without (the others, from OPS, are optional)
REQUIRED = ("create", "destroy", "get", "list")
EX_NOTFOUND = 3
EX_TEMPFAIL = 75  # sysexits.h: "temporary failure; user is invited to retry"
#: how much of a hook's stderr becomes the error message: enough for the cause, never a dump
MESSAGE_LIMIT = 500
#: after killing a hook, how long to wait for its pipes to close before giving up on them
KILL_GRACE = 2.0


class _HookMachine(BaseModel):
    """A machine as a hook reports it: checked here, so a hook's mistake is a clear error."""

    model_config = ConfigDict(extra="ignore")

    id: str
    name: str
    pool: str
    state: ProviderState
    tags: dict[str, str] = {}
    created_at: float | None = None
    state_since: float | None = None
    detail: str = ""
    address: str | None = None


class CommandProvider(MachineProvider):
    """Machines created and controlled by hook scripts; see the module docstring.

    ``hooks``: a directory of per-operation executables, or one command — a path, or an
    argv such as ``["pwsh", "-File", "hyperv.ps1"]`` — that takes the operation as its
    next argument.
    """

    def __init__(
        self,
        hooks: str | os.PathLike[str] | Sequence[str],
        *,
        name: str = "command",
        timeout: float = 60.0,
        ops: Iterable[str] | None = None,
        hibernate: bool = False,
        warm_pool: bool = False,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.timeout = timeout
        self._env = dict(env or {})
        self._clock = clock
        self._dir: Path | None = None
        self._argv: list[str] = []
        if isinstance(hooks, str | os.PathLike) and Path(hooks).is_dir():
            if ops is not None:
                raise ConfigError(f"provider {name!r}: the hooks in {hooks} are its files; "
                                  "ops= is only for a single hook command")
            self._dir = Path(hooks)
            found = {op for op in OPS if _executable(self._dir / op)}
            where = f"in {self._dir}"
        else:
            self._argv = [os.fspath(hooks)] if isinstance(hooks, str | os.PathLike) else list(hooks)
            if not self._argv:
                raise ConfigError(f"provider {name!r}: the hook command is empty")
            found = set(OPS) - {"power_off", "update"} if ops is None else set(ops)
            if unknown := found - set(OPS):
                raise ConfigError(f"provider {name!r}: unknown operations {sorted(unknown)}; "
                                  f"hooks implement {', '.join(OPS)}")
            where = "declared in ops="
        if missing := [op for op in REQUIRED if op not in found]:
            raise ConfigError(f"provider {name!r}: no {', '.join(missing)} hook {where}; "
                              f"every provider needs {', '.join(REQUIRED)}")
        self.ops = frozenset(found)
        self.capabilities = Capabilities(fence="power_off" in found, update="update" in found,
                                         hibernate=hibernate and "stop" in found,
                                         warm_pool=warm_pool and "start" in found)
        #: machine id → (first seen, state, in it since): stands in for times a hook omits
        self._seen: dict[str, tuple[float, ProviderState, float]] = {}

    async def create(self, spec: MachineSpec, *, token: str) -> ProviderMachine:
        answer = await self._run("create", token=token, spec=dataclasses.asdict(spec))
        return self._machine(answer.get("machine"), "create")

    async def start(self, machine_id: str, *, token: str) -> None:
        await self._run("start", machine_id, token=token)

    async def stop(self, machine_id: str, *, token: str, hibernate: bool = False) -> None:
        if hibernate and not self.capabilities.hibernate:
            raise ProviderError(f"{self.name}: this provider cannot hibernate", retryable=False)
        await self._run("stop", machine_id, token=token, hibernate=hibernate)

    async def reboot(self, machine_id: str, *, token: str) -> None:
        await self._run("reboot", machine_id, token=token)

    async def power_off(self, machine_id: str, *, token: str) -> None:
        await self._run("power_off", machine_id, token=token)

    async def destroy(self, machine_id: str, *, token: str) -> None:
        await self._run("destroy", machine_id, token=token)

    async def tag(self, machine_id: str, tags: dict[str, str], *, token: str) -> None:
        await self._run("tag", machine_id, token=token, tags=tags)

    async def update(self, machine_id: str, *, token: str) -> None:
        await self._run("update", machine_id, token=token)

    async def get(self, machine_id: str) -> ProviderMachine:
        answer = await self._run("get", machine_id)
        return self._machine(answer.get("machine"), "get")

    async def list(self, *, pool: str | None = None) -> builtins.list[ProviderMachine]:
        answer = await self._run("list", pool=pool)
        listed = answer.get("machines")
        if not isinstance(listed, builtins.list):
            raise ProviderError(f"{self.name}: the list hook answered without a list of "
                                f"machines: {_clip(json.dumps(answer))}", retryable=False)
        machines = [self._machine(m, "list") for m in listed]
        if pool is None:  # a full listing: forget machines the hypervisor no longer has
            for gone in self._seen.keys() - {m.id for m in machines}:
                del self._seen[gone]
        # a hook may ignore "pool"; the caller still gets only what it asked for
        return [m for m in machines if pool is None or m.pool == pool]

    # -- running hooks ---------------------------------------------------------------------

    async def _run(self, op: str, machine_id: str | None = None, *, token: str | None = None,
                   **fields: Any) -> dict[str, Any]:
        where = f"{self.name}: {op}" + (f" of {machine_id}" if machine_id else "")
        if op not in self.ops:
            raise ProviderError(f"{where}: this provider has no {op} hook", retryable=False)
        request: dict[str, Any] = {"op": op, **fields}
        env = {**os.environ, **self._env, "DESKFLEET_OP": op}
        env.pop("DESKFLEET_TOKEN", None)
        if token is not None:
            request["token"] = env["DESKFLEET_TOKEN"] = token
        if machine_id is not None:
            request["machine_id"] = machine_id
        argv = [os.fspath(self._dir / op)] if self._dir else [*self._argv, op]
        began = time.monotonic()
        try:
            # a session of its own, so that a timeout kills the hook's children as well
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=env, start_new_session=True)
        except OSError as exc:
            raise ProviderError(f"{where}: cannot run {argv[0]}: {exc.strerror or exc}",
                                retryable=False) from exc
        try:
            async with asyncio.timeout(self.timeout):
                out, err = await proc.communicate(json.dumps(request).encode())
        except TimeoutError:
            _kill(proc)
            # bounded: a child that left the group (setsid) may hold our pipes open for good
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(KILL_GRACE):
                    await proc.wait()
            raise ProviderError(f"{where}: the hook did not finish within {self.timeout:g}s "
                                "and was killed", retryable=True) from None
        except BaseException:  # cancelled: the hook must not live on, unwatched
            _kill(proc)
            raise
        code = proc.returncode
        log.debug("provider %s: %s hook exited %s after %.2fs", self.name, op, code,
                  time.monotonic() - began, extra={"machine": machine_id})
        if code == 0:
            return self._answer(out, where)
        said = _tail(err)
        if code == EX_NOTFOUND:
            raise MachineNotFound(machine_id or "", f"{where}: {said or 'no such machine'}")
        status = f"killed by signal {-code}" if code is not None and code < 0 else f"exit {code}"
        raise ProviderError(f"{where} failed ({status})" + (f": {said}" if said else ""),
                            retryable=code == EX_TEMPFAIL)

    def _answer(self, out: bytes, where: str) -> dict[str, Any]:
        text = out.decode(errors="replace").strip()
        if not text:
            return {}
        try:
            answer = json.loads(text)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise ProviderError(f"{where}: the hook's answer is not a JSON object: {_clip(text)}",
                                retryable=False)
        return answer

    def _machine(self, data: object, op: str) -> ProviderMachine:
        try:
            m = _HookMachine.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'machine'}: {e['msg']}"
                                 for e in exc.errors())
            raise ProviderError(f"{self.name}: the {op} hook answered a malformed machine "
                                f"({_clip(problems)})", retryable=False) from None
        now = self._clock()
        first, state, since = self._seen.get(m.id, (now, m.state, now))
        if state != m.state:
            since = now
        self._seen[m.id] = (first, m.state, since)
        return ProviderMachine(
            id=m.id, name=m.name, pool=m.pool, state=m.state, tags=m.tags,
            created_at=m.created_at if m.created_at is not None else first,
            state_since=m.state_since if m.state_since is not None else since,
            detail=m.detail, address=m.address)


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _kill(proc: asyncio.subprocess.Process) -> None:
    try:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, signal.SIGKILL)
        else:  # Windows: no process groups to signal; the hook itself at least
            proc.kill()
    except ProcessLookupError:
        pass


def _clip(text: str) -> str:
    return text if len(text) <= MESSAGE_LIMIT else text[:MESSAGE_LIMIT - 1] + "…"


def _tail(stderr: bytes) -> str:
    """The end of a hook's stderr, where the reason usually is: its last lines, at most
    MESSAGE_LIMIT characters."""
    lines = [line.strip() for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    text = " | ".join(lines[-5:])
    return text if len(text) <= MESSAGE_LIMIT else "…" + text[-(MESSAGE_LIMIT - 1):]
