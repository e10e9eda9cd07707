"""The fleet manager writes a tick's heartbeats a chunk at a time: each chunk acknowledged
only once written, and what a failed write did not record kept for the next tick."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from deskfleet.fleet import manager as manager_mod
from deskfleet.fleet.manager import FleetManager
from deskfleet.store import Heartbeat


class FakeHub:
    def __init__(self, n: int) -> None:
        self.beats = [Heartbeat(f"m{i:03d}", 1.0) for i in range(n)]
        self.seqs = {b.machine_id: i for i, b in enumerate(self.beats)}
        self.acked: list[dict[str, int]] = []
        self.requeued: list[str] = []

    def drain_heartbeats(self) -> tuple[list[Heartbeat], dict[str, int]]:
        return list(reversed(self.beats)), dict(self.seqs)

    def requeue_heartbeats(self, beats: list[Heartbeat], seqs: dict[str, int]) -> None:
        assert set(seqs) == {b.machine_id for b in beats}
        self.requeued += [b.machine_id for b in beats]

    async def acknowledge(self, seqs: dict[str, int]) -> None:
        self.acked.append(dict(seqs))


def test_heartbeats_written_by_chunks_and_the_unwritten_requeued(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manager_mod, "HEARTBEAT_CHUNK", 4)
    hub = FakeHub(10)
    written: list[list[str]] = []

    def heartbeat(beats: list[Heartbeat], lease_timeout: float) -> dict[str, bool]:
        return {}

    async def db(fn: Any, beats: list[Heartbeat], lease_timeout: float) -> dict[str, bool]:
        if len(written) == 2:
            raise RuntimeError("database gone")
        written.append([b.machine_id for b in beats])
        return {}

    fm = FleetManager(SimpleNamespace(heartbeat=heartbeat), db, SimpleNamespace(lease_timeout=10.0),  # type: ignore[arg-type]
                      hub, SimpleNamespace(), leadership=SimpleNamespace(), secrets=SimpleNamespace(),  # type: ignore[arg-type]
                      replica_id="r", replica_name="r", multi=False)
    with pytest.raises(RuntimeError):
        asyncio.run(fm.tick())
    ids = [f"m{i:03d}" for i in range(10)]
    assert written == [ids[:4], ids[4:8]]  # in machine order, at most 4 to a transaction
    assert hub.acked == [{m: int(m[1:]) for m in ids[:4]}, {m: int(m[1:]) for m in ids[4:8]}]
    assert hub.requeued == ids[8:]  # the chunk not written, acknowledged by no one
