"""One database, several desktops: a write lock beside the file, and a ledger of the last save.

KeePassXC is not a multi-writer application. Every save writes the whole file; a desktop that
saves close after another (measured: within 1 s), or while it had a form open, silently
drops the other's entries (/work/plan/KEEPASSXC-REPORT.md §9: 29 entries lost in 30 rounds).
Robots sharing a file-based store must take turns, as they would on an Excel sheet on a share:

- ``<db>.lock`` is locked with ``flock`` (exclusive) by ``add_entry`` from before it opens the
  form until its save reached the file (the file's mtime changed, then held still); its
  reconcile check takes it too. ``flock`` locks belong to an open file: two desktops in one
  agent process exclude each other as well as two processes do, and the kernel releases the
  lock of a process that dies (a SIGKILLed agent never leaves it held).
- ``<db>.ledger.json`` says who holds the lock (for people, and for the demo's fault
  injector) and what the last save left: the file's mtime and the entry count the saving
  desktop's status bar showed. The next holder compares: same mtime, so its own status bar
  must show that count once KeePassXC reloaded the file — proof that it works on the file as
  it is, not on what it read before. A file changed by anyone else (no ledger entry for its
  mtime) gets a quiet time instead: KeePassXC reloads ~0.1 s after a change.

Limits: it serialises writers on one host (``flock`` over NFS is not to be trusted); a writer
that does not take the lock (a person, a script) is only noticed, not stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deskfleet import Context, DesktopError

#: the database's file name in the pack's {data} directory (launch.py opens the same)
DATABASE = "keepassxc.kdbx"
#: seconds add_entry waits for the lock before giving up (another robot may be mid-save)
LOCK_WAIT = 90.0
#: seconds a file must stay unchanged before a desktop is taken to have reloaded it
QUIET = 1.0
#: seconds KeePassXC takes at most to write the file after OK (measured 0.22-0.25 s)
SAVE_WAIT = 10.0
#: seconds between progress reports while waiting for the lock (feeds the progress watchdog)
REPORT_EVERY = 2.0


@dataclass(frozen=True, slots=True)
class Saved:
    mtime_ns: int
    entries: int | None
    by: str
    at: float


class SharedDatabase:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")
        self.ledger_path = path.with_name(path.name + ".ledger.json")

    @classmethod
    def of(cls, ctx: Context) -> SharedDatabase:
        """The database of the run's machine: ``keepassxc.kdbx`` in the pack's ``{data}``."""
        if ctx.data_dir is None:
            raise DesktopError("this agent gives the pack no data directory: the shared database cannot be found")
        return cls(ctx.data_dir / DATABASE)

    # -- the file ------------------------------------------------------------------------------

    def mtime_ns(self) -> int:
        try:
            return self.path.stat().st_mtime_ns
        except FileNotFoundError:
            raise DesktopError(f"the shared database {self.path} is gone") from None

    async def quiet(self, seconds: float = QUIET) -> None:
        """Wait until the file has not changed for ``seconds`` (a save in flight lands first)."""
        while True:
            age = time.time() - self.mtime_ns() / 1e9
            if age >= seconds:
                return
            await asyncio.sleep(min(0.1, seconds - age) + 0.01)

    async def saved_after(self, before_ns: int, timeout: float = SAVE_WAIT) -> int:
        """Wait until the file's mtime moved on from ``before_ns`` and then held still for a
        moment; return the new mtime. DesktopError if the save never reached the file."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.mtime_ns() == before_ns:
            if loop.time() >= deadline:
                raise DesktopError(f"KeePassXC did not write {self.path.name} within {timeout:g}s of OK")
            await asyncio.sleep(0.02)
        await self.quiet(0.3)
        return self.mtime_ns()

    # -- the ledger -------------------------------------------------------------------------------

    def ledger(self) -> dict[str, Any]:
        try:
            data = json.loads(self.ledger_path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def last_save(self) -> Saved | None:
        saved = self.ledger().get("saved")
        if not isinstance(saved, dict):
            return None
        try:
            return Saved(int(saved["mtime_ns"]), saved.get("entries"), str(saved.get("by", "")),
                         float(saved.get("at", 0)))
        except (TypeError, KeyError, ValueError):
            return None

    def holder(self) -> str:
        """Who holds the write lock, as the ledger says (for messages)."""
        h = self.ledger().get("holder") or {}
        if not h:
            return "nobody known"
        return f"{h.get('machine')} (run {h.get('run')}, for {time.time() - float(h.get('since', 0)):.0f}s)"

    def _write_ledger(self, **changes: Any) -> None:
        data = {**self.ledger(), **changes}
        tmp = self.ledger_path.with_name(f".{self.ledger_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.ledger_path)

    def record_save(self, mtime_ns: int, entries: int | None, machine: str) -> None:
        """Under the lock: what this save left in the file."""
        self._write_ledger(saved={"mtime_ns": mtime_ns, "entries": entries, "by": machine, "at": time.time()})

    # -- the lock ---------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def write_lock(self, ctx: Context, timeout: float = LOCK_WAIT) -> AsyncIterator[None]:
        """Hold the write lock (waiting for it, reporting progress while another desktop has it)."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            reported = 0.0
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if loop.time() >= deadline:
                        raise DesktopError(f"the write lock of {self.path.name} is still held by "
                                           f"{self.holder()} after {timeout:g}s") from None
                    if loop.time() - reported >= REPORT_EVERY:
                        reported = loop.time()
                        await ctx.progress("wait for the write lock", message=f"held by {self.holder()}")
                    await asyncio.sleep(0.1)
            try:
                self._write_ledger(holder={"machine": ctx.machine_id, "run": ctx.run_id, "since": time.time()})
                yield
            finally:
                self._write_ledger(holder=None)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
