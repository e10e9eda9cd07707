"""SimEHR's shared backend: records, duplicates, accounts, and several processes at once."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pyotp

from deskfleet.sim import SimBackend

PER_PROCESS = 150


def _insert_many(path: str, worker: int) -> None:
    backend = SimBackend(path)
    for i in range(PER_PROCESS):
        backend.insert(f"W{worker}-{i}", "Pat Doe", "1970-01-01", machine=f"m{worker}")
    backend.insert("SHARED", "Pat Doe", "1970-01-01", machine=f"m{worker}")
    backend.close()


def test_two_processes_lose_no_inserts(tmp_path: Path) -> None:
    path = str(tmp_path / "ehr.db")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_insert_many, args=(path, w)) for w in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    backend = SimBackend(path)
    assert backend.count() == 2 * PER_PROCESS + 2
    assert backend.duplicates() == {"SHARED": 2}
    assert {p.created_by_machine for p in backend.find_by_mrn("SHARED")} == {"m1", "m2"}
    assert backend.count_by_mrn("W2-149") == 1


def test_records_update_and_duplicates() -> None:
    backend = SimBackend()
    a = backend.insert("M-1", "Ann", "1990-05-06", machine="m1", created_at=10.0)
    b = backend.insert("M-1", "Ann", "1990-05-06", machine="m2")
    assert b > a
    assert [p.record_id for p in backend.find_by_mrn("M-1")] == [a, b]
    assert backend.duplicates() == {"M-1": 2}
    assert backend.update(a, name="Ann Smith")
    patient = backend.get(a)
    assert patient is not None and (patient.name, patient.dob, patient.created_at) == (
        "Ann Smith", "1990-05-06", 10.0)
    assert not backend.update(999, name="x")
    assert backend.find_by_mrn("nope") == [] and backend.count_by_mrn("nope") == 0


def test_accounts_are_deterministic_per_seed() -> None:
    a, b, c = SimBackend.accounts(1), SimBackend.accounts(1), SimBackend.accounts(2)
    assert a == b
    assert {"robot1", "robot2", "clinic-a"} <= set(a)
    assert a["robot1"].credential.password != c["robot1"].credential.password
    assert a["clinic-a"].mfa_always and not a["robot1"].mfa_always
    seed = a["clinic-a"].credential.totp_seed
    assert seed is not None and len(seed) == 32
    assert pyotp.TOTP(seed).verify(pyotp.TOTP(seed).now())
    assert "password" not in repr(a["robot1"].credential)
    backend = SimBackend(seed=1)
    cred = a["robot2"].credential
    assert backend.authenticate("robot2", cred.password) == a["robot2"]
    assert backend.authenticate("robot2", "wrong") is None
    assert backend.authenticate("nobody", cred.password) is None
