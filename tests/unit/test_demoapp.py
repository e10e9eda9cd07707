"""DemoEHR without a display: its switches, its records file, its accounts."""

from __future__ import annotations

import pyotp
import pytest

from deskfleet.demoapp import Records, credentials
from deskfleet.demoapp.__main__ import parse
from deskfleet.demoapp.app import format_results


def test_switches_parse_steps_counts_and_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("DESKFLEET_DEMOAPP_SESSION_TIMEOUT", "90")
    options = parse(["--data", str(tmp_path / "r.db"), "--crash-at", "saved:2,open_form", "--error-rate", "0.1"])
    assert options.crash_at == {"saved": 2, "open_form": 1}
    assert options.session_timeout == 90.0 and options.error_rate == 0.1
    with pytest.raises(SystemExit):
        parse(["--data", "x", "--freeze-at", "lunch"])
    with pytest.raises(SystemExit):
        parse([])  # --data is required


def test_scripted_faults_are_shared_by_every_process_of_the_file(tmp_path) -> None:
    a, b = Records(tmp_path / "r.db"), Records(tmp_path / "r.db")
    assert a.claim_fault("crash", "saved", 2, machine="m1")
    assert b.claim_fault("crash", "saved", 2, machine="m2")
    assert not a.claim_fault("crash", "saved", 2, machine="m1")
    assert b.claim_fault("freeze", "saved", 1, machine="m2")
    assert [(k, m) for k, _, m, _ in a.faults()] == [("crash", "m1"), ("crash", "m2"), ("freeze", "m2")]


def test_records_and_duplicates(tmp_path) -> None:
    r = Records(tmp_path / "r.db")
    first = r.insert("A-1", "Ada", "1815-12-10", machine="m1")
    r.insert("A-1", "Ada", "1815-12-10", machine="m2")
    r.insert("B-2", "Bob", "1990-01-02", machine="m1")
    assert r.duplicates() == {"A-1": 2} and r.count() == 3
    assert r.update(first, name="Augusta Ada King", dob="1815-12-10")
    assert r.get(first).name == "Augusta Ada King" and r.get(first).updated_at is not None
    assert format_results("A-1", r.find("A-1")).split("\n")[0] == "2 records for MRN A-1"
    assert format_results("Z-9", []) == "No patient with MRN Z-9"


def test_accounts_are_derived_from_the_seed() -> None:
    one, again, other = credentials(1), credentials(1), credentials(2)
    assert one == again and one["robot1"].password != other["robot1"].password
    assert "clinic-a" in one and one["robot1"].password not in repr(one["robot1"])
    code = pyotp.TOTP(one["clinic-a"].totp_seed).now()
    assert pyotp.TOTP(one["clinic-a"].totp_seed).verify(code)
