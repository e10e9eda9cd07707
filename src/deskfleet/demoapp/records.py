"""DemoEHR's data: patient records and spent faults in one SQLite file, shared by processes.

Every DemoEHR process of a demo (one per desktop) opens the same file, as clinics share
one hospital database; this is where automations leave their side effects and where
tests look for double effects — ``mrn`` deliberately has no unique constraint, and
:meth:`Records.duplicates` lists MRNs saved more than once.

Scripted faults (``--crash-at save``…) are claimed here: the first *N* processes to reach
the step take the fault, whichever desktop they run on, so a retry elsewhere or after a
restart goes through. Seeded faults (``--crash-rate``…) and session expiries are logged
beside them (:meth:`Records.fault_log`), so that a report can say which faults struck
where and when. The demo accounts are derived from a seed, so every process — the app and
the agents that log into it — agrees on them without sharing a secret file.
"""

from __future__ import annotations

import base64
import hashlib
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from deskfleet import Credential

_SCHEMA = """
CREATE TABLE IF NOT EXISTS patients (
    record_id INTEGER PRIMARY KEY AUTOINCREMENT,
    mrn TEXT NOT NULL,
    name TEXT NOT NULL,
    dob TEXT NOT NULL,
    created_at REAL NOT NULL,
    created_by TEXT NOT NULL,
    updated_at REAL
);
CREATE INDEX IF NOT EXISTS patients_mrn ON patients (mrn);
CREATE TABLE IF NOT EXISTS faults (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    step TEXT NOT NULL,
    machine TEXT NOT NULL,
    at REAL NOT NULL,
    origin TEXT NOT NULL DEFAULT 'scripted'
);
CREATE TABLE IF NOT EXISTS launches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    machine TEXT NOT NULL,
    at REAL NOT NULL
);
"""

#: robot4 and robot5 log in on the machines the demo's burst pool makes (one session each)
ACCOUNTS = ("robot1", "robot2", "robot3", "clinic-a", "clinic-b", "robot4", "robot5")
MFA_ALWAYS = frozenset({"clinic-a", "clinic-b"})


class FaultTaken(NamedTuple):
    kind: str  # crash, freeze, error_dialog, session_expired
    step: str  # where it struck (a step of app.STEPS; "idle" for a session expiry)
    machine: str
    at: float
    origin: str  # scripted (--crash-at…), seeded (--crash-rate…) or timeout (--session-timeout)


@dataclass(frozen=True, slots=True)
class Patient:
    record_id: int
    mrn: str
    name: str
    dob: str
    created_by: str
    updated_at: float | None


def credentials(seed: int = 0) -> dict[str, Credential]:
    """The demo accounts for ``seed``: same seed, same passwords and TOTP seeds."""
    out = {}
    for username in ACCOUNTS:
        digest = hashlib.sha256(f"demoehr:{seed}:{username}".encode()).digest()
        out[username] = Credential(username, f"{username}-{digest[:4].hex()}",
                                   base64.b32encode(digest[12:32]).decode())
    return out


class Records:
    """The records file. Autocommit with a busy timeout: several processes write it."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        self._db.execute("PRAGMA busy_timeout = 30000")
        for attempt in range(100):
            # Switching a new file to WAL fails at once while another process does the same.
            try:
                self._db.execute("PRAGMA journal_mode = WAL")
                self._db.executescript(_SCHEMA)
                self._upgrade()
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 99:
                    raise
                time.sleep(0.05)

    def _upgrade(self) -> None:
        """Files written before seeded faults were logged lack faults.origin."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(faults)")}
        if "origin" not in columns:
            try:
                self._db.execute("ALTER TABLE faults ADD COLUMN origin TEXT NOT NULL DEFAULT 'scripted'")
            except sqlite3.OperationalError as exc:
                if "duplicate column" not in str(exc):  # another process upgraded it first
                    raise

    def close(self) -> None:
        self._db.close()

    def insert(self, mrn: str, name: str, dob: str, *, machine: str) -> int:
        cur = self._db.execute(
            "INSERT INTO patients (mrn, name, dob, created_at, created_by) VALUES (?, ?, ?, ?, ?)",
            (mrn, name, dob, time.time(), machine),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def update(self, record_id: int, *, name: str, dob: str) -> bool:
        cur = self._db.execute("UPDATE patients SET name = ?, dob = ?, updated_at = ? WHERE record_id = ?",
                               (name, dob, time.time(), record_id))
        return cur.rowcount > 0

    def find(self, mrn: str) -> list[Patient]:
        rows = self._db.execute(
            "SELECT record_id, mrn, name, dob, created_by, updated_at FROM patients WHERE mrn = ?"
            " ORDER BY record_id", (mrn,)).fetchall()
        return [Patient(*row) for row in rows]

    def get(self, record_id: int) -> Patient | None:
        row = self._db.execute("SELECT record_id, mrn, name, dob, created_by, updated_at FROM patients"
                               " WHERE record_id = ?", (record_id,)).fetchone()
        return None if row is None else Patient(*row)

    def count(self) -> int:
        (n,) = self._db.execute("SELECT count(*) FROM patients").fetchone()
        return int(n)

    def duplicates(self) -> dict[str, int]:
        """MRNs with more than one record: double effects."""
        rows = self._db.execute("SELECT mrn, count(*) FROM patients GROUP BY mrn HAVING count(*) > 1"
                                " ORDER BY mrn").fetchall()
        return {mrn: int(n) for mrn, n in rows}

    def claim_fault(self, kind: str, step: str, limit: int, *, machine: str) -> bool:
        """Take one of the ``limit`` scripted faults ``kind`` at ``step``; False once all are spent."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            (n,) = self._db.execute("SELECT count(*) FROM faults WHERE kind = ? AND step = ?"
                                    " AND origin = 'scripted'", (kind, step)).fetchone()
            if n >= limit:
                return False
            self._db.execute("INSERT INTO faults (kind, step, machine, at) VALUES (?, ?, ?, ?)",
                             (kind, step, machine, time.time()))
            return True
        finally:
            self._db.execute("COMMIT")

    def faults(self) -> list[tuple[str, str, str, float]]:
        """Every scripted fault taken: (kind, step, machine, time)."""
        rows = self._db.execute("SELECT kind, step, machine, at FROM faults WHERE origin = 'scripted'"
                                " ORDER BY id").fetchall()
        return [(str(k), str(s), str(m), float(a)) for k, s, m, a in rows]

    def log_fault(self, kind: str, step: str, *, machine: str, origin: str) -> None:
        """Log a fault that was not claimed (a seeded one, a session expiry)."""
        self._db.execute("INSERT INTO faults (kind, step, machine, at, origin) VALUES (?, ?, ?, ?, ?)",
                         (kind, step, machine, time.time(), origin))

    def fault_log(self) -> list[FaultTaken]:
        """Every fault DemoEHR produced, scripted, seeded or timed, in order."""
        rows = self._db.execute("SELECT kind, step, machine, at, origin FROM faults ORDER BY id").fetchall()
        return [FaultTaken(str(k), str(s), str(m), float(a), str(o)) for k, s, m, a, o in rows]

    def launch(self, machine: str) -> int:
        """Count a start of DemoEHR on ``machine``; returns how many starts came before it.

        Seeded faults are drawn from a stream per start, so an app restarted after a
        seeded crash does not replay the same faults at the same steps.
        """
        self._db.execute("BEGIN IMMEDIATE")
        try:
            (n,) = self._db.execute("SELECT count(*) FROM launches WHERE machine = ?", (machine,)).fetchone()
            self._db.execute("INSERT INTO launches (machine, at) VALUES (?, ?)", (machine, time.time()))
            return int(n)
        finally:
            self._db.execute("COMMIT")
