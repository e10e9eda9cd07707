"""A provider whose machines are process groups on this host.

The demo and the end-to-end tests must scale a pool for real — machines that boot, crash,
are fenced and come back — without a hypervisor. :class:`LocalProvider` makes each machine
one process started from a command template, typically ``deskfleet agent … --count 1``, in
a session (process group) of its own, so that the whole machine can be signalled at once.

What the OS says is the truth: a machine's state is refreshed from ``/proc`` whenever it
is read (is its first process still alive, and still the process we started — its start
time tells a recycled pid apart). What the OS cannot say — specs, tags, tokens, the stop
under way — is in a JSON state file written atomically under a lock, so a new provider
(after the server restarted) finds its machines again and a repeated token never acts
twice. Every call is one short transaction on that file, with no ``await`` inside; a
call that waits (a stop, a reboot, the fence) waits between transactions, and any read
carries on a transition a cancelled call began (the SIGKILL after ``stop_timeout``, the
start after a reboot's stop). Linux only: it reads ``/proc``.

The fence (``power_off``) is SIGKILL to the machine's whole process group at once —
paused (SIGSTOPped) processes die too — and returns once every process is gone. A group
is not always the whole machine: a process that made a session of its own (Xvfb does)
leaves it. A stop or fence finds such descendants while the machine's first process still
lives, and every SIGKILL reaches them too; once that process has died on its own they are
out of reach (a crashed machine's group is killed, what left it is not).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .base import (
    Capabilities,
    MachineNotFound,
    MachineProvider,
    MachineSpec,
    ProviderError,
    ProviderMachine,
    ProviderState,
)

log = logging.getLogger(__name__)

S = ProviderState
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
TEMPLATE_KEYS = ("name", "pool", "image", "state_dir")
STATE_FILE = "local-provider.json"
#: how long tokens and destroyed machines are remembered: a retry comes within minutes, and
#: the state file is rewritten by every change, so it must not grow forever
KEEP = 7 * 86400.0
#: after SIGKILL, how long a machine may take to die before a call gives up (a process
#: stuck in the kernel — uninterruptible I/O — dies only when the I/O ends)
KILL_WAIT = 5.0
POLL = 0.05
#: a failed machine's detail ends with the last line of its log, clipped to this
LINE_LIMIT = 300
#: the stop under way → the state it shows, and what follows once every process is gone
STOPS = {"stop": S.STOPPING, "fence": S.STOPPING, "start": S.REBOOTING, "destroy": S.TERMINATING}


@dataclass
class _Machine:
    """One machine as the state file keeps it."""

    spec: dict[str, Any]  # the MachineSpec, as created
    state: str
    tags: dict[str, str]
    created_at: float
    state_since: float
    pid: int = 0  # the machine's first process, the leader of its session and group
    #: its start time in clock ticks since boot (/proc/PID/stat): a recycled pid is not ours
    pid_start: int = 0
    spawned_at: float = 0.0
    #: the size of the log when this process started: its last line is after it
    log_offset: int = 0
    detail: str = ""
    after: str | None = None  # a stop under way (a key of STOPS); None: none
    #: [pid, start] of the machine's processes that left its group, found when a stop began
    strays: list[list[int]] = field(default_factory=list)


@dataclass
class _Token:
    op: str
    machine_id: str
    at: float


@dataclass
class _State:
    machines: dict[str, _Machine]
    tokens: dict[str, _Token]

    def dump(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class _Proc:
    pid: int
    ppid: int
    pgrp: int
    state: str  # R, S, D, T, Z…
    start: int


class LocalProvider(MachineProvider):
    """Machines that are process groups started from ``command`` on this host.

    ``command`` is an argv template: ``{name}``, ``{pool}``, ``{image}`` (empty when the
    spec has none) and ``{state_dir}`` (the machine's own directory,
    ``state_dir/machines/NAME``) are replaced in each word; write other braces doubled.
    The machine's labels are in its environment as ``DESKFLEET_MACHINE_LABELS`` (JSON),
    never in its command line; ``DESKFLEET_BOOT_ID`` there is new at each start (create,
    start, reboot): the boot id of a machine with no kernel of its own to read one from (a
    simulated desktop). A machine is ``booting`` for its first ``boot_grace``
    seconds, then ``running``; a stop waits ``stop_timeout`` seconds after SIGTERM before
    SIGKILL. ``update_command`` (the same template) is what ``update`` runs — the
    machine's "OS update" — within ``update_timeout`` seconds: the machine is ``updating``
    meanwhile, then ``running`` if it exited 0, else ``failed``. Without it the provider
    cannot update.
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        state_dir: Path,
        name: str = "local",
        env: Mapping[str, str] | None = None,
        stop_timeout: float = 10.0,
        boot_grace: float = 1.0,
        update_command: Sequence[str] | None = None,
        update_timeout: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.capabilities = Capabilities(fence=True, update=bool(update_command))
        self.command = list(command)
        self.update_command = list(update_command or [])
        self.update_timeout = update_timeout
        self.state_dir = Path(state_dir)
        self.stop_timeout = stop_timeout
        self.boot_grace = boot_grace
        self._env = dict(env or {})
        self._clock = clock
        if not self.command:
            raise ConfigError(f"provider {name!r}: the command is empty")
        for word in [*self.command, *self.update_command]:
            try:
                word.format(**dict.fromkeys(TEMPLATE_KEYS, "x"))
            except (KeyError, IndexError, ValueError, AttributeError) as exc:
                raise ConfigError(
                    f"provider {name!r}: cannot fill in {word!r} ({type(exc).__name__}: {exc}); "
                    f"the command may use {', '.join('{' + k + '}' for k in TEMPLATE_KEYS)}, "
                    "and other braces doubled ({{ }})") from None
        if not Path("/proc/self/stat").is_file():
            raise ConfigError(f"provider {name!r}: the local provider needs Linux's /proc")
        self.state_dir.mkdir(parents=True, exist_ok=True)

    # -- the provider ----------------------------------------------------------------------

    async def create(self, spec: MachineSpec, *, token: str) -> ProviderMachine:
        if not NAME.match(spec.name):
            raise ProviderError(f"{self.name}: {spec.name!r} is not a machine name (letters, "
                                "digits, '.', '_' and '-', not starting with a punctuation mark)",
                                retryable=False)
        with self._state() as st:
            used = st.tokens.get(token)
            if used is not None:
                self._check_reuse(token, used, "create", used.machine_id)
                return self._view(used.machine_id, self._refreshed(st, used.machine_id))
            old = st.machines.get(spec.name)
            if old is not None and old.state != S.TERMINATED:
                raise ProviderError(f"{self.name}: a machine named {spec.name} already exists",
                                    retryable=False)
            now = self._clock()
            m = _Machine(spec=dataclasses.asdict(spec), state=S.BOOTING, tags=dict(spec.tags),
                         created_at=now, state_since=now)
            self._spawn(spec.name, m)
            st.machines[spec.name] = m
            st.tokens[token] = _Token("create", spec.name, now)
            log.info("provider %s: started %s (pid %d)", self.name, spec.name, m.pid,
                     extra={"machine": spec.name})
            return self._view(spec.name, m)

    async def start(self, machine_id: str, *, token: str) -> None:
        def begin(mid: str, m: _Machine) -> None:
            if m.after is not None:  # a stop began between _settle and this order
                raise ProviderError(f"{self.name}: {mid} is still {m.state}", retryable=True)
            if m.state in (S.STOPPED, S.FAILED):
                self._spawn(mid, m)
                self._set(m, S.BOOTING)

        await self._settle(machine_id)  # a machine that is stopping starts once it has stopped
        self._order("start", machine_id, token, begin)

    async def stop(self, machine_id: str, *, token: str, hibernate: bool = False) -> None:
        if hibernate:
            raise ProviderError(f"{self.name}: this provider cannot hibernate", retryable=False)

        def begin(mid: str, m: _Machine) -> None:
            if m.after == "start":  # a reboot's stop: it stays a stop
                self._then(m, "stop")
            elif m.after is None and m.state != S.STOPPED:
                self._begin_stop(m, "stop")

        self._order("stop", machine_id, token, begin)
        await self._settle(machine_id)

    async def reboot(self, machine_id: str, *, token: str) -> None:
        def begin(mid: str, m: _Machine) -> None:
            if m.after == "start":
                return
            if m.after is not None or m.state == S.STOPPED:
                raise ProviderError(f"{self.name}: cannot reboot {mid}, it is {m.state}",
                                    retryable=False)
            self._begin_stop(m, "start")

        self._order("reboot", machine_id, token, begin)
        await self._settle(machine_id)

    async def power_off(self, machine_id: str, *, token: str) -> None:
        def begin(mid: str, m: _Machine) -> None:
            if m.after is None and m.state == S.STOPPED:
                return
            log.warning("provider %s: fencing %s (SIGKILL to its process group)", self.name,
                        mid, extra={"machine": mid})
            if m.after is None:
                self._begin_stop(m, "fence")
                return
            self._kill(m)
            if m.after != "destroy":  # a destroy under way still ends terminated, only sooner
                self._then(m, "fence")

        self._order("power_off", machine_id, token, begin)
        await self._settle(machine_id)

    async def destroy(self, machine_id: str, *, token: str) -> None:
        def begin(mid: str, m: _Machine) -> None:
            if m.state == S.TERMINATED:
                return
            if m.after is None:
                self._begin_stop(m, "destroy")
            else:
                self._then(m, "destroy")

        self._order("destroy", machine_id, token, begin, dead_ok=True)
        await self._settle(machine_id)

    async def tag(self, machine_id: str, tags: dict[str, str], *, token: str) -> None:
        self._order("tag", machine_id, token, lambda mid, m: m.tags.update(tags), dead_ok=True)

    async def update(self, machine_id: str, *, token: str) -> None:
        """Run ``update_command`` for the machine; returns when it has ended."""
        if not self.update_command:
            raise ProviderError(f"{self.name}: this provider cannot update machines (no update command)",
                                retryable=False)
        began: list[_Machine] = []

        def begin(mid: str, m: _Machine) -> None:
            if m.after is not None or m.state != S.RUNNING:
                raise ProviderError(f"{self.name}: cannot update {mid}, it is {m.state}", retryable=False)
            self._set(m, S.UPDATING)
            began.append(m)

        self._order("update", machine_id, token, begin)
        if not began:
            return  # a repeated token: the first call ran it
        ok, detail = await self._run_update(machine_id, began[0])
        with self._state() as st:
            m = st.machines.get(machine_id)
            if m is not None and m.state == S.UPDATING:
                self._set(m, S.RUNNING if ok else S.FAILED, detail)
        if not ok:
            log.warning("provider %s: the update of %s failed: %s", self.name, machine_id, detail,
                        extra={"machine": machine_id})

    async def _run_update(self, mid: str, m: _Machine) -> tuple[bool, str]:
        directory = self._machine_dir(mid)
        keys = {"name": mid, "pool": m.spec["pool"], "image": m.spec["image"] or "", "state_dir": str(directory)}
        argv = [word.format(**keys) for word in self.update_command]
        try:
            with open(directory / "machine.log", "ab") as logfile:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT, cwd=directory,
                    env={**os.environ, **self._env}, start_new_session=True)
                try:
                    async with asyncio.timeout(self.update_timeout):
                        code = await proc.wait()
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    await proc.wait()
                    return False, f"the update did not finish within {self.update_timeout:g}s and was killed"
        except OSError as exc:
            return False, f"cannot run the update: {exc.strerror or exc}"
        return (True, "") if code == 0 else (False, f"the update exited with code {code}")

    async def get(self, machine_id: str) -> ProviderMachine:
        with self._state() as st:
            return self._view(machine_id, self._refreshed(st, machine_id))

    async def list(self, *, pool: str | None = None) -> builtins.list[ProviderMachine]:
        with self._state() as st:
            found = [self._view(mid, self._refreshed(st, mid)) for mid, m in st.machines.items()
                     if m.state != S.TERMINATED and (pool is None or m.spec["pool"] == pool)]
        return [m for m in found if m.state != S.TERMINATED]

    # -- orders and their transitions ------------------------------------------------------

    def _order(self, op: str, machine_id: str, token: str,
               begin: Callable[[str, _Machine], None], *, dead_ok: bool = False) -> None:
        """One idempotent change: a token already used does not act again.

        The calls that stop something then wait in :meth:`_settle` whether the token was
        new or not, so the retry of a stop that timed out returns once the machine has
        stopped, as the first call would have.
        """
        with self._state() as st:
            used = st.tokens.get(token)
            if used is not None:
                self._check_reuse(token, used, op, machine_id)
                return
            m = self._refreshed(st, machine_id)
            if m.state == S.TERMINATED and not dead_ok:
                raise ProviderError(f"{self.name}: cannot {op} {machine_id}, it is terminated",
                                    retryable=False)
            begin(machine_id, m)
            st.tokens[token] = _Token(op, machine_id, self._clock())

    async def _settle(self, machine_id: str) -> None:
        """Wait, reading the OS, until no stop is under way on the machine."""
        limit = self.stop_timeout + KILL_WAIT
        deadline = time.monotonic() + limit
        while True:
            with self._state() as st:
                m = self._refreshed(st, machine_id)
            if m.after is None:
                return
            if time.monotonic() > deadline:
                raise ProviderError(f"{self.name}: {machine_id} is still {m.state} after "
                                    f"{limit:g}s: a process of it does not die (stuck in the "
                                    "kernel?); try again later", retryable=True)
            await asyncio.sleep(POLL)

    def _begin_stop(self, m: _Machine, after: str) -> None:
        """SIGTERM (SIGKILL for the fence) to the machine's processes; ``after`` follows."""
        m.after = after
        self._set(m, STOPS[after])
        if after == "fence":
            self._kill(m)
            return
        procs = _processes()
        # found now, while their parent lives: once it is dead, nothing ties them to the machine
        m.strays = [[p.pid, p.start] for p in self._escaped(m, procs)]
        if self._ours(m, procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(m.pid, signal.SIGTERM)
                # a paused (SIGSTOPped) machine would never see the SIGTERM
                os.killpg(m.pid, signal.SIGCONT)

    def _then(self, m: _Machine, after: str) -> None:
        """Change what follows a stop under way. ``state_since`` stays: the machine has
        been going down since the stop began, and SIGKILL comes ``stop_timeout`` after it."""
        m.after, m.state = after, STOPS[after]

    def _refresh(self, mid: str, m: _Machine) -> None:
        """Bring the record up to date with the OS, carrying on a stop under way."""
        now = self._clock()
        if m.after is not None:
            procs = _processes()
            if self._alive(m, procs):
                if m.after == "fence" or now - m.state_since >= self.stop_timeout:
                    self._kill(m)
                return
            after, m.after, m.strays = m.after, None, []
            if after == "start":
                try:
                    self._spawn(mid, m)
                except ProviderError as exc:
                    self._set(m, S.FAILED, exc.message)
                else:
                    self._set(m, S.REBOOTING)
            elif after == "destroy":
                self._set(m, S.TERMINATED)
                try:
                    shutil.rmtree(self._machine_dir(mid))
                except OSError as exc:
                    log.warning("provider %s: cannot remove the directory of %s: %s", self.name,
                                mid, exc, extra={"machine": mid})
            else:
                self._set(m, S.STOPPED, "powered off (fenced)" if after == "fence" else "")
        elif m.state in (S.BOOTING, S.REBOOTING, S.RUNNING):
            ended = self._ended(m)
            if ended is not None:
                # a crashed machine has nothing left running: kill what its process left behind
                self._kill(m)
                line = self._last_line(mid, m)
                self._set(m, S.FAILED, f"{ended}: {line}" if line else ended)
                log.warning("provider %s: %s %s", self.name, mid, m.detail, extra={"machine": mid})
            elif m.state != S.RUNNING and now >= m.spawned_at + self.boot_grace:
                m.state, m.state_since = S.RUNNING, m.spawned_at + self.boot_grace

    def _refreshed(self, st: _State, machine_id: str) -> _Machine:
        m = st.machines.get(machine_id)
        if m is None:
            raise MachineNotFound(machine_id, f"{self.name}: no machine {machine_id!r}")
        self._refresh(machine_id, m)
        return m

    def _set(self, m: _Machine, state: ProviderState, detail: str = "") -> None:
        m.state, m.state_since, m.detail = state, self._clock(), detail

    # -- processes -------------------------------------------------------------------------

    def _spawn(self, mid: str, m: _Machine) -> None:
        """Start the machine's process in a new session, its output appended to its log."""
        spec = m.spec
        directory = self._machine_dir(mid)
        keys = {"name": mid, "pool": spec["pool"], "image": spec["image"] or "",
                "state_dir": str(directory)}
        argv = [word.format(**keys) for word in self.command]
        env = {**os.environ, **self._env,
               "DESKFLEET_MACHINE_LABELS": json.dumps(spec["labels"], sort_keys=True),
               "DESKFLEET_BOOT_ID": uuid.uuid4().hex[:16]}
        logfile = directory / "machine.log"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            offset = logfile.stat().st_size if logfile.exists() else 0
            pid = os.posix_spawnp(argv[0], argv, env, setsid=True, file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, str(logfile), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
                (os.POSIX_SPAWN_DUP2, 1, 2)])
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else f"{argv[0]}: "
            raise ProviderError(f"{self.name}: cannot start {mid}: {where}{exc.strerror or exc}",
                                retryable=False) from exc
        stat = _stat(pid)  # our child, not yet collected: its /proc entry is there
        m.pid, m.pid_start = pid, stat.start if stat else 0
        m.spawned_at, m.log_offset = self._clock(), offset

    def _ended(self, m: _Machine) -> str | None:
        """None while the machine's process lives; else how it ended."""
        stat = _stat(m.pid)
        if stat is None or stat.start != m.pid_start:
            return "exited (its exit status went to the process that started it)"
        try:
            pid, status = os.waitpid(m.pid, os.WNOHANG)
        except ChildProcessError:  # started by a provider in another process (before a restart)
            return "exited (its exit status went to the process that started it)" \
                if stat.state == "Z" else None
        if pid == 0:
            return None
        code = os.waitstatus_to_exitcode(status)
        if code < 0:
            return f"killed by signal {-code} ({signal.Signals(-code).name})"
        return f"exited with code {code}"

    def _ours(self, m: _Machine, procs: builtins.list[_Proc]) -> bool:
        """Whether the group numbered after the machine's first process is still its own.

        While any member lives the kernel does not give the number to a new process; a
        process with that pid and another start time means the group ended long ago.
        """
        leader = next((p for p in procs if p.pid == m.pid), None)
        return m.pid > 0 and (leader is None or leader.start == m.pid_start)

    def _escaped(self, m: _Machine, procs: builtins.list[_Proc]) -> builtins.list[_Proc]:
        """Descendants of the machine's first process that left its group (setsid)."""
        if not self._ours(m, procs):
            return []
        children: dict[int, builtins.list[_Proc]] = {}
        for p in procs:
            children.setdefault(p.ppid, []).append(p)
        found, todo = [], [m.pid]
        while todo:
            for child in children.get(todo.pop(), []):
                todo.append(child.pid)
                if child.pgrp != m.pid:
                    found.append(child)
        return found

    def _alive(self, m: _Machine, procs: builtins.list[_Proc]) -> bool:
        """Whether any process of the machine still runs (zombies are dead: their parent
        has not collected them yet, and ours is collected here)."""
        if self._ours(m, procs):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(m.pid, os.WNOHANG)
            stray = {(pid, start) for pid, start in m.strays}
            return any(p.state != "Z" and (p.pgrp == m.pid or (p.pid, p.start) in stray)
                       for p in procs)
        return False

    def _kill(self, m: _Machine) -> None:
        """SIGKILL to the machine's group at once, and to its processes outside it.

        The group is frozen (SIGSTOP) before its descendants are looked for, so that none
        it starts meanwhile — in a session of its own, as Xvfb — escapes the kill.
        """
        if not self._ours(m, _processes()):
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(m.pid, signal.SIGSTOP)
        procs = _processes()
        strays = {(pid, start) for pid, start in m.strays}
        strays |= {(p.pid, p.start) for p in self._escaped(m, procs)}
        m.strays = sorted([pid, start] for pid, start in strays)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(m.pid, signal.SIGKILL)
        running = {p.pid: p.start for p in procs}
        for pid, start in strays:
            if running.get(pid) == start:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    # -- the state file --------------------------------------------------------------------

    @contextlib.contextmanager
    def _state(self) -> Iterator[_State]:
        """One transaction on the state file: locked, read, and written back if changed
        (also when the body raises: what it learnt from the OS, like a reaped process's
        exit status, must not be lost)."""
        path = self.state_dir / STATE_FILE
        with open(self.state_dir / "local-provider.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # held for microseconds: no await inside
            st = self._load(path)
            before = st.dump()
            try:
                yield st
            finally:
                self._prune(st)
                if (after := st.dump()) != before:
                    tmp = path.with_name(path.name + ".tmp")
                    with open(tmp, "w") as f:
                        json.dump(after, f, indent=1, sort_keys=True)
                        f.flush()
                        os.fsync(f.fileno())  # tokens must outlive a crash
                    os.replace(tmp, path)

    def _load(self, path: Path) -> _State:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return _State({}, {})
        except (OSError, ValueError) as exc:
            raise ProviderError(f"{self.name}: cannot read the state file {path}: {exc}",
                                retryable=False) from exc
        try:
            return _State({k: _Machine(**v) for k, v in raw["machines"].items()},
                          {k: _Token(**v) for k, v in raw["tokens"].items()})
        except (KeyError, TypeError, AttributeError) as exc:
            raise ProviderError(f"{self.name}: the state file {path} is not one this provider "
                                f"wrote ({exc})", retryable=False) from exc

    def _prune(self, st: _State) -> None:
        old = self._clock() - KEEP
        st.tokens = {k: t for k, t in st.tokens.items() if t.at >= old}
        st.machines = {k: m for k, m in st.machines.items()
                       if m.state != S.TERMINATED or m.state_since >= old}

    # -- helpers ---------------------------------------------------------------------------

    def _check_reuse(self, token: str, used: _Token, op: str, machine_id: str) -> None:
        """A token names one order; the same token on another order is a caller's bug."""
        if (used.op, used.machine_id) != (op, machine_id):
            raise ProviderError(f"{self.name}: token {token!r} was used for {used.op} of "
                                f"{used.machine_id}, not {op} of {machine_id}", retryable=False)

    def _machine_dir(self, mid: str) -> Path:
        return self.state_dir / "machines" / mid

    def _last_line(self, mid: str, m: _Machine) -> str:
        """The last line the machine's process wrote (not an earlier run's)."""
        try:
            with open(self._machine_dir(mid) / "machine.log", "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(m.log_offset, size - 4096))
                lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines()]
        except OSError:
            return ""
        line = next((ln for ln in reversed(lines) if ln), "")
        return line if len(line) <= LINE_LIMIT else line[:LINE_LIMIT - 1] + "…"

    def _view(self, mid: str, m: _Machine) -> ProviderMachine:
        return ProviderMachine(id=mid, name=mid, pool=m.spec["pool"], state=S(m.state),
                               tags=dict(m.tags), created_at=m.created_at,
                               state_since=m.state_since, detail=m.detail)


def _stat(pid: int) -> _Proc | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:  # gone (ENOENT, or ESRCH while it was being read)
        return None
    # the command name (field 2) is in parentheses and may hold spaces and parentheses
    fields = raw[raw.rindex(b")") + 2:].split()
    return _Proc(pid, int(fields[1]), int(fields[2]), fields[0].decode(), int(fields[19]))


def running(pid: int) -> bool:
    """Whether a process of that pid runs (or is stopped): a zombie is dead, waiting only to
    be collected by its parent."""
    stat = _stat(pid)
    return stat is not None and stat.state != "Z"


def _processes() -> builtins.list[_Proc]:
    return [p for entry in os.listdir("/proc") if entry.isdigit() and (p := _stat(int(entry)))]

