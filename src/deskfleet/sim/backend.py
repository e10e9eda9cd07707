"""The simulated EHR's server side: patient records in one SQLite file shared by processes.

Every simulated desktop talks to a :class:`SimBackend`; desktops in several agent processes
that open the same file see the same records, as clinics see one hospital database. This
is where automations leave their side effects, so it is also where tests look for double
effects: ``mrn`` deliberately has no unique constraint, and :meth:`SimBackend.duplicates`
finds MRNs saved more than once.

The demo accounts live here too, derived from a seed so that every process agrees on them
without sharing a file.
"""

from __future__ import annotations

import base64
import hashlib
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from deskfleet import Credential

_SCHEMA = """
CREATE TABLE IF NOT EXISTS patients (
    record_id INTEGER PRIMARY KEY AUTOINCREMENT,
    mrn TEXT NOT NULL,
    name TEXT,
    dob TEXT,
    created_at REAL,
    created_by_machine TEXT
);
CREATE INDEX IF NOT EXISTS patients_mrn ON patients (mrn);
CREATE TABLE IF NOT EXISTS work_done (
    key TEXT NOT NULL,
    created_at REAL,
    created_by_machine TEXT
);
CREATE INDEX IF NOT EXISTS work_done_key ON work_done (key);
CREATE TABLE IF NOT EXISTS exports (
    export_id INTEGER PRIMARY KEY AUTOINCREMENT,
    mrn TEXT NOT NULL,
    created_at REAL,
    created_by_machine TEXT
);
"""

_ACCOUNT_NAMES = ("robot1", "robot2", "robot3", "clinic-a", "clinic-b")
_MFA_ALWAYS = frozenset({"clinic-a", "clinic-b"})


@dataclass(frozen=True, slots=True)
class Patient:
    record_id: int
    mrn: str
    name: str
    dob: str
    created_at: float
    created_by_machine: str


@dataclass(frozen=True, slots=True)
class SimAccount:
    credential: Credential
    mfa_always: bool  # the account always asks for a TOTP code (others only by FaultPlan.mfa_rate)

    @property
    def username(self) -> str:
        return self.credential.username


class SimBackend:
    """Patient records in SQLite (WAL, short transactions), safe for several processes.

    ``path`` is a file shared by processes, or ``":memory:"`` for a private one.
    """

    def __init__(self, path: str | Path = ":memory:", *, seed: int = 0) -> None:
        self.path = str(path)
        self.seed = seed
        self._accounts = self.accounts(seed)
        # autocommit: every statement is its own short transaction, so no process holds
        # the write lock across an await; busy_timeout makes writers queue, not fail.
        self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        self._db.execute("PRAGMA busy_timeout = 30000")
        self._set_up()

    def _set_up(self) -> None:
        # Switching a new file to WAL fails at once, without waiting for the busy timeout,
        # while another process does the same; so processes opening one file together retry.
        for attempt in range(100):
            try:
                if self.path != ":memory:":
                    self._db.execute("PRAGMA journal_mode = WAL")
                    self._db.execute("PRAGMA synchronous = NORMAL")
                self._db.executescript(_SCHEMA)
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 99:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        self._db.close()

    # -- accounts ---------------------------------------------------------------------

    @staticmethod
    def accounts(seed: int = 0) -> dict[str, SimAccount]:
        """The demo accounts for ``seed``: same seed, same passwords and TOTP seeds."""
        out: dict[str, SimAccount] = {}
        for username in _ACCOUNT_NAMES:
            digest = hashlib.sha256(f"simehr:{seed}:{username}".encode()).digest()
            password = f"{username}-{digest[:4].hex()}"
            # 20 bytes → 32 base32 characters, the shape pyotp.random_base32() produces.
            totp_seed = base64.b32encode(digest[12:32]).decode()
            out[username] = SimAccount(
                Credential(username, password, totp_seed), username in _MFA_ALWAYS
            )
        return out

    @classmethod
    def credentials(cls, seed: int = 0) -> dict[str, Credential]:
        """The demo accounts as the credential mapping playbooks expect."""
        return {name: acct.credential for name, acct in cls.accounts(seed).items()}

    def account(self, username: str) -> SimAccount | None:
        return self._accounts.get(username)

    def authenticate(self, username: str, password: str) -> SimAccount | None:
        acct = self._accounts.get(username)
        if acct is None or acct.credential.password != password:
            return None
        return acct

    # -- patients ---------------------------------------------------------------------

    def insert(
        self, mrn: str, name: str, dob: str, *, machine: str = "", created_at: float | None = None
    ) -> int:
        cur = self._db.execute(
            "INSERT INTO patients (mrn, name, dob, created_at, created_by_machine)"
            " VALUES (?, ?, ?, ?, ?)",
            (mrn, name, dob, time.time() if created_at is None else created_at, machine),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def find_by_mrn(self, mrn: str) -> list[Patient]:
        rows = self._db.execute(
            "SELECT record_id, mrn, name, dob, created_at, created_by_machine"
            " FROM patients WHERE mrn = ? ORDER BY record_id",
            (mrn,),
        ).fetchall()
        return [Patient(*row) for row in rows]

    def get(self, record_id: int) -> Patient | None:
        row = self._db.execute(
            "SELECT record_id, mrn, name, dob, created_at, created_by_machine"
            " FROM patients WHERE record_id = ?",
            (record_id,),
        ).fetchone()
        return None if row is None else Patient(*row)

    def count_by_mrn(self, mrn: str) -> int:
        (n,) = self._db.execute("SELECT count(*) FROM patients WHERE mrn = ?", (mrn,)).fetchone()
        return int(n)

    def count(self) -> int:
        (n,) = self._db.execute("SELECT count(*) FROM patients").fetchone()
        return int(n)

    def duplicates(self) -> dict[str, int]:
        """MRNs with more than one record, and how many each has: double effects."""
        rows = self._db.execute(
            "SELECT mrn, count(*) FROM patients GROUP BY mrn HAVING count(*) > 1 ORDER BY mrn"
        ).fetchall()
        return {mrn: int(n) for mrn, n in rows}

    def update(self, record_id: int, *, name: str | None = None, dob: str | None = None) -> bool:
        """Change a record's name and/or date of birth; False if there is no such record."""
        cur = self._db.execute(
            "UPDATE patients SET name = coalesce(?, name), dob = coalesce(?, dob)"
            " WHERE record_id = ?",
            (name, dob, record_id),
        )
        return cur.rowcount > 0

    # -- exports ----------------------------------------------------------------------

    def record_export(self, mrn: str, *, machine: str = "", created_at: float | None = None) -> int:
        """Record that a patient summary left the system (the export's side effect)."""
        cur = self._db.execute(
            "INSERT INTO exports (mrn, created_at, created_by_machine) VALUES (?, ?, ?)",
            (mrn, time.time() if created_at is None else created_at, machine),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def count_exports(self, mrn: str | None = None) -> int:
        if mrn is None:
            (n,) = self._db.execute("SELECT count(*) FROM exports").fetchone()
        else:
            (n,) = self._db.execute("SELECT count(*) FROM exports WHERE mrn = ?", (mrn,)).fetchone()
        return int(n)

    # -- units of work (benchmarks) ---------------------------------------------------

    def record_work(self, key: str, *, machine: str = "") -> None:
        """The side effect of one ``sim.work`` execution (no unique key: doubles show)."""
        self._db.execute("INSERT INTO work_done (key, created_at, created_by_machine) VALUES (?, ?, ?)",
                         (key, time.time(), machine))

    def work_count(self, key: str) -> int:
        (n,) = self._db.execute("SELECT count(*) FROM work_done WHERE key = ?", (key,)).fetchone()
        return int(n)

    def work_done_by(self, key: str) -> list[str]:
        """The machines that did ``key``'s effect, in order."""
        rows = self._db.execute("SELECT created_by_machine FROM work_done WHERE key = ? ORDER BY rowid", (key,))
        return [m for (m,) in rows]

    def work_counts(self) -> dict[str, int]:
        """key → how many times its effect happened."""
        return {k: int(n) for k, n in self._db.execute("SELECT key, count(*) FROM work_done GROUP BY key")}


def demo_accounts(seed: int = 0) -> dict[str, Credential]:
    """SimEHR's demo accounts for ``seed`` (the pack's ``accounts`` hook): the same seed gives
    the same passwords and TOTP seeds, which the simulated app checks logins against."""
    return SimBackend.credentials(seed)
