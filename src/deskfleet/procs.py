"""Process trees: what a process started, and killing all of it — for whoever starts a tool
that may start others (a Robot Framework robot and the apps it opens, the demo's servers and
agents). A tree is listed before its root exits: an orphan's parent is no longer the root."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import psutil

__all__ = ["descendants", "kill_all"]


def descendants(pid: int) -> list[psutil.Process]:
    """Every process below ``pid`` (children, theirs…); none if ``pid`` is gone."""
    try:
        return list(psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return []


def kill_all(processes: Iterable[psutil.Process], *, wait: float = 0.0) -> None:
    """SIGKILL each of ``processes`` that still runs (psutil checks a pid still names the
    process it listed, so a pid reused since is left alone); then, with ``wait``, wait up to
    that many seconds for them to be gone."""
    processes = list(processes)
    for p in processes:
        with contextlib.suppress(psutil.Error):
            p.kill()
    if wait > 0:
        psutil.wait_procs(processes, timeout=wait)
