"""The store runner's group commit, on every backend: agents' writes that arrive together
share a transaction, each still answers on its own, and a batch that fails unexpectedly is
applied write by write so that only the write at fault fails.

On PostgreSQL a batch holds row locks for many attempts at once, so it must take them in
the one order every other writer takes them — or it deadlocks with the heartbeats'
transaction (which renews attempts in machine order), a sweep, or another replica's batch.
"""

from __future__ import annotations

import asyncio
import threading
import time
import types

import pytest

from deskfleet.errors import StaleLease
from deskfleet.models import AutomationSpec, Ending, RunSpec, RunState
from deskfleet.scheduler import Policy
from deskfleet.store import Heartbeat, SQLStore
from deskfleet.store.runner import StoreRunner
from support import Backend

T0 = 1_700_000_000.0
SPEC = AutomationSpec("ehr.lookup", "1", idempotent=True)


@pytest.fixture
def store(s: SQLStore) -> SQLStore:
    assert s.batches_writes
    return s


def assign(store: SQLStore, n: int) -> list[tuple[int, str, str]]:
    """n machines, each holding one attempt: (attempt id, machine, run)."""
    for i in range(n):
        mid = f"m{i:02d}"
        store.enrol_machine(mid, pool="default", labels={}, key_hash="k", now=T0)
        store.connect_machine(mid, boot_id="b", agent_version="1", automations=[SPEC], labels=None,
                              heartbeat=Heartbeat(mid, T0), lease_timeout=30, now=T0)
        store.submit(RunSpec("ehr.lookup", machine=mid), request_hash="h", now=T0)
    got = store.schedule(Policy(), T0, 30)
    assert len(got) == n
    return sorted((a.attempt.id, a.attempt.machine_id, a.run.id) for a in got)


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
    kinds = [e.kind for e in store.events(run_id=held[0][2])]
    assert kinds.count("attempt.ended") == 1 and kinds[-1] == "lease.stale_write_rejected", kinds


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


def test_a_batch_and_the_heartbeats_never_deadlock(store):
    """Heartbeats renew attempts in machine order while a batch writes for the same attempts
    in the opposite order, each write lingering a little with its locks held (a loaded
    machine): if each write locked its rows as it came, PostgreSQL would find a deadlock and
    roll one back (a StoreRetry here; in production a second's wait and a retry — enough for
    agents on a short heartbeat timeout to presume their leases lost)."""
    held = assign(store, 8)
    backwards = sorted(held, key=lambda h: h[1], reverse=True)  # by machine, the other way round
    real = store.attempt_progress

    def attempt_progress(self: SQLStore, *args: object) -> None:
        real(*args)  # type: ignore[arg-type]
        time.sleep(0.02)  # still in the batch's transaction, its locks held

    lingering = types.MethodType(attempt_progress, store)
    stop, failures = threading.Event(), []

    def beat() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                store.heartbeat([Heartbeat(mid, T0 + n, attempt_id=aid) for aid, mid, _ in held], 30)
            except Exception as exc:  # any failure is the finding
                failures.append(f"heartbeat: {exc!r}")

    beater = threading.Thread(target=beat)
    beater.start()
    try:
        for i in range(8):
            calls = [(lingering, (aid, mid, f"step {i}", {}, T0 + 1), {}) for aid, mid, _ in backwards]
            try:
                store.batch(calls)
            except Exception as exc:  # any failure is the finding
                failures.append(f"batch {i}: {exc!r}")
        finishing = [(store.finish_attempt, (aid, mid, Ending.SUCCEEDED),
                      {"output": {}, "detail": "", "now": T0 + 2}) for aid, mid, _ in backwards]
        done = store.batch(finishing)
    finally:
        stop.set()
        beater.join(30)
    assert failures == []
    assert all(f.run.state is RunState.SUCCEEDED for f in done)


def test_a_submit_whose_key_was_taken_meanwhile_answers_with_that_run_and_the_batch_commits(
        store: SQLStore, backend: Backend, monkeypatch):
    """Another replica submitted the same key between this submit's look and its insert:
    the insert yields (ON CONFLICT DO NOTHING) instead of failing — which on PostgreSQL
    would abort the transaction, and with it every other write of the batch."""
    held = assign(store, 2)
    other = backend.open()  # another replica: its own engine and connections
    spec = RunSpec("ehr.lookup", idempotency_key="k-1")
    theirs, created = other.submit(spec, request_hash="same", now=T0 + 1)
    assert created
    real = store._by_key
    looks: list[str] = []

    def blind_first(conn, spec, request_hash):  # the first look predates the other replica's commit
        looks.append(spec.idempotency_key)
        return None if len(looks) == 1 else real(conn, spec, request_hash)

    monkeypatch.setattr(store, "_by_key", blind_first)
    (aid, mid, _), (aid2, mid2, _) = held
    answers = store.batch([
        (store.attempt_start, (aid, mid, T0 + 2), {}),
        (store.submit, (spec,), {"request_hash": "same", "now": T0 + 2}),
        (store.attempt_start, (aid2, mid2, T0 + 2), {}),
    ])
    assert looks == ["k-1", "k-1"]
    assert answers[1] == (theirs, False)
    assert [store.get_attempt(a).phase.value for a in (aid, aid2)] == ["running", "running"]
    assert store.count_runs() == {"queued": 1, "running": 2}
