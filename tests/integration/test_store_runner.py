"""The store runner's group commit: agents' writes that arrive together share a transaction,
each still answers on its own, and a batch that fails unexpectedly is applied write by
write so that only the write at fault fails. A real SQLite file."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from deskfleet.errors import StaleLease
from deskfleet.models import AutomationSpec, Ending, RunSpec, RunState
from deskfleet.scheduler import Policy
from deskfleet.store import Heartbeat, SQLStore, open_store
from deskfleet.store.runner import StoreRunner

T0 = 1_700_000_000.0
SPEC = AutomationSpec("ehr.lookup", "1", idempotent=True)


@pytest.fixture
def store(tmp_path: Path) -> SQLStore:
    s = open_store(f"sqlite:///{tmp_path / 'runner.db'}", sqlite_synchronous="NORMAL")
    assert isinstance(s, SQLStore) and s.batches_writes
    yield s
    s.close()


def assign(store: SQLStore, n: int) -> list[tuple[int, str, str]]:
    """n machines, each holding one attempt: (attempt id, machine, run)."""
    for i in range(n):
        mid = f"m{i}"
        store.enrol_machine(mid, pool="default", labels={}, key_hash="k", now=T0)
        store.connect_machine(mid, boot_id="b", agent_version="1", automations=[SPEC], labels=None,
                              heartbeat=Heartbeat(mid, T0), lease_timeout=30, now=T0)
        store.submit(RunSpec("ehr.lookup", machine=mid), request_hash="h", now=T0)
    got = store.schedule(Policy(), T0, 30)
    assert len(got) == n
    return [(a.attempt.id, a.attempt.machine_id, a.run.id) for a in got]


async def test_writes_that_arrive_together_share_one_transaction(store, monkeypatch):
    held = assign(store, 20)
    sizes: list[int] = []
    real = store.batch
    monkeypatch.setattr(store, "batch", lambda calls: sizes.append(len(calls)) or real(calls))
    runner = StoreRunner(store)
    try:
        started = await asyncio.gather(*(runner.write(store.attempt_start, aid, mid, T0 + 1) for aid, mid, _ in held))
        assert [a.id for a in started] == [aid for aid, _, _ in held]
        # The first write found the runner idle and went alone; the others queued behind it.
        assert sum(sizes) == 20 and len(sizes) < 20, sizes
        done = await asyncio.gather(*(
            runner.write(store.finish_attempt, aid, mid, Ending.SUCCEEDED, output={}, detail="", now=T0 + 2)
            for aid, mid, _ in held))
        assert all(f.run.state is RunState.SUCCEEDED for f in done)
        # A stale write answers for itself only.
        aid, mid, _ = held[0]
        with pytest.raises(StaleLease):
            await runner.write(store.attempt_progress, aid, mid, "late", {}, T0 + 3)
    finally:
        runner.close()
    assert store.count_runs() == {"succeeded": 20}


async def test_a_batch_that_fails_unexpectedly_is_applied_write_by_write(store, monkeypatch):
    held = assign(store, 4)
    bad_attempt = held[2][0]
    real_start = store.attempt_start

    def start(attempt_id: int, machine_id: str, now: float):  # a bug that strikes one write
        if attempt_id == bad_attempt:
            raise RuntimeError("a bug")
        return real_start(attempt_id, machine_id, now)

    start.__name__ = "attempt_start"
    monkeypatch.setattr(store, "attempt_start", start)
    monkeypatch.setattr(store, "batch", lambda calls: (_ for _ in ()).throw(RuntimeError("a bug")))
    runner = StoreRunner(store)
    try:
        results = await asyncio.gather(*(runner.write(store.attempt_start, aid, mid, T0 + 1)
                                         for aid, mid, _ in held), return_exceptions=True)
    finally:
        runner.close()
    assert [type(r).__name__ for r in results] == ["Attempt", "Attempt", "RuntimeError", "Attempt"]
    states = {run: store.get_run(run).state for _, _, run in held}
    assert sorted(s.value for s in states.values()) == ["assigned", "running", "running", "running"]
