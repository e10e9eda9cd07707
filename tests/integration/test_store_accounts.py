"""The store suite, continued: the credential vault, account leases and secret keys — on
every backend (the ``s`` and ``backend`` fixtures: SQLite and PostgreSQL).

Secrets here are opaque strings (the store never decrypts: the vault does), except in the
rotation test, which uses real keys. Time is a fake clock, as in test_store.py.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from cryptography.fernet import Fernet

from deskfleet.crypto import SecretBox
from deskfleet.errors import Conflict, NotFound
from deskfleet.models import AutomationSpec, Ending, LeaseState, RunSpec, VaultAccount
from deskfleet.scheduler import Policy
from deskfleet.store import Heartbeat, SQLStore
from deskfleet.vault import reencrypt

T0 = 1_700_000_000.0
LEASE = 30.0
POLICY = Policy()
LOGS_IN = AutomationSpec("ehr.create", "1", pack="ehr", needs_account=True)
NO_LOGIN = AutomationSpec("ehr.ping", "1", required_state="any")
SPECS = (LOGS_IN, NO_LOGIN)
TIMEOUT, MARGIN = 10.0, 1.0  # heartbeat timeout and interval, for the lease sweep


def account(name: str, *, app: str | None = "ehr", max_sessions: int = 1, seed: bool = True, **kw: Any) -> VaultAccount:
    return VaultAccount(name=name, app=app, username=kw.pop("username", name), password=f"enc:v1:pw-{name}",
                        totp_seed=f"enc:v1:seed-{name}" if seed else None, max_sessions=max_sessions, **kw)


def machine(s: SQLStore, mid: str, now: float = T0, *, replica: str | None = None, sessions: list[str] | None = None) -> None:
    s.enrol_machine(mid, pool="default", labels={}, key_hash=f"hash-{mid}", now=now)
    s.connect_machine(mid, boot_id="boot", agent_version="1", automations=SPECS, labels=None,
                      heartbeat=Heartbeat(mid, now, sessions=sessions or []), lease_timeout=LEASE, now=now,
                      replica=replica)


def beat(s: SQLStore, mid: str, now: float, sessions: list[str], *, changed: bool = True,
         attempt_id: int | None = None) -> None:
    s.heartbeat([Heartbeat(mid, now, attempt_id=attempt_id, sessions=sessions, sessions_changed=changed)], LEASE)


def submit(s: SQLStore, now: float = T0, automation: str = "ehr.create", **kw: Any) -> str:
    run, _ = s.submit(RunSpec(automation, **kw), request_hash="h", now=now)
    return run.id


def schedule(s: SQLStore, now: float = T0, replica: str | None = None) -> list[Any]:
    return s.schedule(POLICY, now, LEASE, 500, replica)


def holders(s: SQLStore, name: str) -> dict[str, LeaseState]:
    return {x.machine_id: x.state for x in s.account_leases(name)}


def events(s: SQLStore, kind: str) -> list[Any]:
    return [e for e in s.events(limit=100_000) if e.kind == kind]


def finish(s: SQLStore, a: Any, now: float) -> None:
    s.finish_attempt(a.attempt.id, a.attempt.machine_id, Ending.SUCCEEDED, output={}, detail="", now=now)


# -- the vault ---------------------------------------------------------------------------------------

def test_put_get_update_list_and_remove(s):
    created, new = s.put_account(account("alice", labels={"site": "lyon"}), T0)
    assert new and created.created_at == T0 and created.password == "enc:v1:pw-alice"
    replaced, new = s.put_account(account("alice", max_sessions=3, seed=False), T0 + 5)
    assert not new and replaced.created_at == T0 and replaced.updated_at == T0 + 5
    assert replaced.max_sessions == 3 and replaced.totp_seed is None and replaced.labels == {}
    updated = s.update_account("alice", {"username": "alice.w", "totp_seed": "enc:v1:x"}, T0 + 6)
    assert (updated.username, updated.totp_seed, updated.max_sessions) == ("alice.w", "enc:v1:x", 3)
    s.put_account(account("bob", app=None), T0)
    assert [a.name for a in s.list_accounts()] == ["alice", "bob"]
    assert s.get_account("nobody") is None
    with pytest.raises(NotFound, match="nobody"):
        s.update_account("nobody", {"username": "x"}, T0)
    with pytest.raises(NotFound):
        s.remove_account("nobody", T0)
    assert s.remove_account("bob", T0 + 7) == []
    assert [a.name for a in s.list_accounts()] == ["alice"]
    kinds = [e.kind for e in s.events() if e.kind.startswith("account.")]
    assert kinds == ["account.created", "account.updated", "account.updated", "account.created", "account.removed"]
    for e in s.events():
        assert "enc:v1" not in repr(e.data), "an event holds a secret (even an encrypted one)"


def test_a_claim_reserves_the_runs_account_in_the_same_transaction(s):
    s.put_account(account("alice"), T0)
    machine(s, "m1")
    run_id = submit(s)
    [a] = schedule(s)
    assert a.run.id == run_id and a.attempt.account == "alice"
    assert a.account is not None and a.account.name == "alice" and a.account.password == "enc:v1:pw-alice"
    assert s.get_attempt(a.attempt.id).account == "alice"
    [lease] = s.account_leases("alice")
    assert (lease.machine_id, lease.state, lease.attempt_id) == ("m1", LeaseState.RESERVED, a.attempt.id)
    [leased] = events(s, "account.leased")
    [granted] = events(s, "account.granted")
    for e in (leased, granted):
        assert (e.machine_id, e.attempt_id, e.data["account"]) == ("m1", a.attempt.id, "alice")
    assert granted.run_id == run_id


def test_a_run_needing_no_account_gets_none_and_reads_no_lease(s):
    s.put_account(account("alice"), T0)
    machine(s, "m1")
    submit(s, automation="ehr.ping")
    [a] = schedule(s)
    assert a.account is None and a.attempt.account is None
    assert s.account_leases() == [] and events(s, "account.granted") == []


def test_an_account_is_never_leased_beyond_max_sessions(s):
    s.put_account(account("alice", max_sessions=1), T0)
    for m in ("m1", "m2", "m3"):
        machine(s, m)
    for _ in range(3):
        submit(s)
    got = schedule(s)
    assert len(got) == 1, "one slot, one login"
    assert list(holders(s, "alice")) == [got[0].attempt.machine_id]
    s.put_account(account("bob", max_sessions=2), T0 + 1)
    got += schedule(s, T0 + 2)
    assert len(got) == 3
    assert {a.attempt.account for a in got} == {"alice", "bob"}
    assert len(holders(s, "bob")) == 2


def test_a_machine_holding_the_account_takes_the_next_run_and_keeps_it(s):
    s.put_account(account("alice", max_sessions=1), T0)
    machine(s, "m1")
    machine(s, "m2")
    submit(s)
    [a] = schedule(s)
    holder = a.attempt.machine_id
    beat(s, holder, T0 + 1, ["alice"], attempt_id=a.attempt.id)  # the login shows in the session note
    finish(s, a, T0 + 2)
    beat(s, holder, T0 + 3.5, ["alice"], changed=False)
    s.sweep_account_leases(T0 + 3.5, TIMEOUT, MARGIN)
    assert holders(s, "alice") == {holder: LeaseState.HELD}
    submit(s, T0 + 4)
    [b] = schedule(s, T0 + 4)
    assert b.attempt.machine_id == holder and b.attempt.account == "alice"
    assert holders(s, "alice") == {holder: LeaseState.RESERVED}  # re-reserved for this attempt
    assert len(events(s, "account.leased")) == 1  # the same lease, granted again
    assert len(events(s, "account.granted")) == 2


def test_a_named_account_at_its_limit_waits_for_the_machine_that_holds_it(s):
    s.put_account(account("alice", max_sessions=1), T0)
    machine(s, "m1", sessions=["alice"])  # logged in as alice already: a held lease
    machine(s, "m2")
    assert holders(s, "alice") == {"m1": LeaseState.HELD}
    blocker = submit(s, automation="ehr.ping", machine="m1")
    [b] = schedule(s)
    assert b.run.id == blocker
    submit(s, T0 + 1, session_key="alice")
    # m1 is busy, m2 free — but alice may not log in a second time: the run waits (no
    # affinity-wait fallback when no slot is free).
    assert schedule(s, T0 + 3600) == []
    finish(s, b, T0 + 3601)
    [c] = schedule(s, T0 + 3602)
    assert (c.attempt.machine_id, c.attempt.account) == ("m1", "alice")


def test_the_session_notes_move_leases_only_when_they_changed(s):
    s.put_account(account("alice", max_sessions=2), T0)
    s.put_account(account("bob-acct", username="bob", max_sessions=2), T0)
    machine(s, "m1")
    beat(s, "m1", T0 + 1, ["alice", "bob", "stranger"])
    assert holders(s, "alice") == {"m1": LeaseState.HELD}
    assert holders(s, "bob-acct") == {"m1": LeaseState.HELD}  # a note naming the username
    assert s.get_machine("m1").sessions == ["alice", "bob-acct", "stranger"]
    beat(s, "m1", T0 + 2, [], changed=False)  # unchanged (per the hub): not looked at
    assert holders(s, "alice") == {"m1": LeaseState.HELD}
    beat(s, "m1", T0 + 3, ["bob"])  # logged out of alice
    assert holders(s, "alice") == {} and holders(s, "bob-acct") == {"m1": LeaseState.HELD}
    [released] = events(s, "account.released")
    assert (released.machine_id, released.reason, released.data["account"]) == ("m1", "session_ended", "alice")
    assert [e.reason for e in events(s, "account.leased")] == ["session_seen", "session_seen"]


def test_a_reservation_is_kept_while_its_attempt_runs_and_settles_after(s):
    s.put_account(account("alice"), T0)
    machine(s, "m1")
    machine(s, "m2")
    submit(s)
    [a] = schedule(s)
    mid = a.attempt.machine_id
    # During the attempt the note may lapse (an app restarted by a playbook): kept.
    beat(s, mid, T0 + 1, [], attempt_id=a.attempt.id)
    s.sweep_account_leases(T0 + 1, TIMEOUT, MARGIN)
    assert holders(s, "alice") == {mid: LeaseState.RESERVED}
    finish(s, a, T0 + 2)
    # No heartbeat since it ended: the note cannot be trusted yet.
    s.sweep_account_leases(T0 + 2.5, TIMEOUT, MARGIN)
    assert holders(s, "alice") == {mid: LeaseState.RESERVED}
    submit(s, T0 + 2.6)
    assert [x.attempt.machine_id for x in schedule(s, T0 + 2.6)] == [mid], "only the reserving machine may have it"


def test_a_reservation_without_the_login_is_released_and_one_with_it_is_held(s):
    s.put_account(account("alice"), T0)
    s.put_account(account("bob"), T0)
    machine(s, "m1")
    machine(s, "m2")
    submit(s)
    submit(s)
    got = schedule(s)
    by_account = {a.attempt.account: a for a in got}
    assert set(by_account) == {"alice", "bob"}
    a, b = by_account["alice"], by_account["bob"]
    beat(s, b.attempt.machine_id, T0 + 1, ["bob"], attempt_id=b.attempt.id)  # bob's login happened
    finish(s, a, T0 + 2)
    finish(s, b, T0 + 2)
    beat(s, a.attempt.machine_id, T0 + 3.5, [], changed=False)
    beat(s, b.attempt.machine_id, T0 + 3.5, ["bob"], changed=False)
    released = s.sweep_account_leases(T0 + 3.5, TIMEOUT, MARGIN)
    assert [(x.account, x.machine_id) for x in released] == [("alice", a.attempt.machine_id)]
    assert holders(s, "alice") == {} and holders(s, "bob") == {b.attempt.machine_id: LeaseState.HELD}
    assert [e.reason for e in events(s, "account.released")] == ["not_logged_in"]


def test_leases_of_a_silent_machine_are_released(s):
    s.put_account(account("alice", max_sessions=1), T0)
    machine(s, "m1", sessions=["alice"])
    machine(s, "m2")
    beat(s, "m2", T0 + 20, [], changed=False)
    assert s.expire_silent_machines(T0 + 11, TIMEOUT) == ["m1"]  # quarantined for silence
    released = s.sweep_account_leases(T0 + 11, TIMEOUT, MARGIN)
    assert [(x.account, x.machine_id) for x in released] == [("alice", "m1")]
    assert [e.reason for e in events(s, "account.released")] == ["machine_silent"]
    # The slot is free: another machine may log in as alice now.
    submit(s, T0 + 12, session_key="alice")
    [a] = schedule(s, T0 + 12)
    assert (a.attempt.machine_id, a.attempt.account) == ("m2", "alice")


def test_an_account_leased_is_removed_only_by_force(s):
    s.put_account(account("alice"), T0)
    machine(s, "m1", sessions=["alice"])
    with pytest.raises(Conflict, match=r"m1.*force"):
        s.remove_account("alice", T0 + 1)
    assert s.get_account("alice") is not None
    released = s.remove_account("alice", T0 + 2, force=True)
    assert [x.machine_id for x in released] == ["m1"]
    assert s.get_account("alice") is None and s.account_leases() == []
    assert [e.reason for e in events(s, "account.released")] == ["account_removed"]
    # The machine still reports the session: an account the vault no longer knows gets no lease.
    beat(s, "m1", T0 + 3, ["alice", "x"])
    assert s.account_leases() == []


def test_a_run_for_a_removed_account_is_not_placed(s):
    s.put_account(account("alice"), T0)
    machine(s, "m1")
    submit(s, session_key="alice")
    s.remove_account("alice", T0)
    assert schedule(s, T0 + 1000) == []


def test_totp_seeds_go_only_to_a_machine_holding_a_lease(s):
    s.put_account(account("alice"), T0)
    s.put_account(account("bob", seed=False), T0)
    machine(s, "m1")
    machine(s, "m2", sessions=["bob"])
    with pytest.raises(NotFound):
        s.issue_totp("nobody", "m1", T0)
    with pytest.raises(Conflict, match="holds no lease"):
        s.issue_totp("alice", "m1", T0)
    with pytest.raises(Conflict, match="no TOTP seed"):
        s.issue_totp("bob", "m2", T0)
    submit(s, session_key="alice")
    [a] = schedule(s)
    assert s.issue_totp("alice", a.attempt.machine_id, T0 + 1) == "enc:v1:seed-alice"
    other = "m2" if a.attempt.machine_id == "m1" else "m1"
    with pytest.raises(Conflict):
        s.issue_totp("alice", other, T0 + 1)
    [issued] = events(s, "account.totp_issued")
    assert (issued.machine_id, issued.attempt_id, issued.run_id) == (a.attempt.machine_id, a.attempt.id, a.run.id)
    assert "seed" not in repr(issued.data)


def test_a_verification_is_given_an_account_of_each_pack_it_logs_in_to(s):
    s.put_account(account("alice"), T0)
    s.put_account(account("bob"), T0 + 1)
    machine(s, "m1")
    machine(s, "m2", sessions=["alice"])
    [granted] = s.reserve_for_verify("m1", T0 + 2)
    assert granted.name == "bob"  # alice is held elsewhere
    assert holders(s, "bob") == {"m1": LeaseState.RESERVED}
    assert [x.name for x in s.reserve_for_verify("m2", T0 + 2)] == ["alice"]  # the one it holds
    assert s.reserve_for_verify("m3-unknown", T0) == []
    # Until the verification ends the reservation stays, whatever the notes say.
    beat(s, "m1", T0 + 10, [], changed=False)
    s.sweep_account_leases(T0 + 10, TIMEOUT, MARGIN)
    assert "m1" in holders(s, "bob")
    s.verify_ended("m1", T0 + 11)
    beat(s, "m1", T0 + 12.5, [], changed=False)
    s.sweep_account_leases(T0 + 12.5, TIMEOUT, MARGIN)
    assert holders(s, "bob") == {}


def test_a_lease_held_long_is_kept_while_a_verification_logs_in_again(s):
    s.put_account(account("alice"), T0)
    machine(s, "m1", sessions=["alice"])
    later = T0 + 5000  # held for far longer than a verification may take
    [granted] = s.reserve_for_verify("m1", later)
    assert granted.name == "alice" and holders(s, "alice") == {"m1": LeaseState.RESERVED}
    beat(s, "m1", later + 1, [])  # a playbook restarted the app: the note lapses meanwhile
    s.sweep_account_leases(later + 3, TIMEOUT, MARGIN)
    assert holders(s, "alice") == {"m1": LeaseState.RESERVED}, "no other machine may take it yet"
    beat(s, "m1", later + 4, ["alice"])
    s.verify_ended("m1", later + 5)
    beat(s, "m1", later + 6.5, ["alice"], changed=False)
    s.sweep_account_leases(later + 6.5, TIMEOUT, MARGIN)
    assert holders(s, "alice") == {"m1": LeaseState.HELD}


def test_concurrent_claims_never_exceed_max_sessions(backend, backend_store):
    """Replicas (one store each: their own engines and connections) claim runs for their own
    machines at the same moment; every run wants one of two accounts of 2 sessions each."""
    s = backend_store
    s.put_account(account("alice", max_sessions=2), T0)
    s.put_account(account("bob", max_sessions=2), T0)
    replicas = [f"r{i}" for i in range(6)]
    for i, r in enumerate(replicas):
        machine(s, f"m{i}a", replica=r)
        machine(s, f"m{i}b", replica=r)
    stores = [backend.open() for _ in replicas]
    errors: list[BaseException] = []
    for rnd in range(4):
        now = T0 + 100 * rnd
        for _ in range(24):
            submit(s, now)
        barrier = threading.Barrier(len(replicas))

        def claim(store: SQLStore, replica: str, barrier: threading.Barrier = barrier, now: float = now) -> None:
            try:
                barrier.wait(10)
                for _ in range(3):
                    try:
                        store.schedule(POLICY, now + 1, LEASE, 500, replica)
                        break
                    except Exception as exc:  # a deadlock broken by the database: run it again
                        if "conflict" not in str(exc):
                            raise
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=claim, args=(st, r)) for st, r in zip(stores, replicas, strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        for name in ("alice", "bob"):
            assert len(s.account_leases(name)) <= 2, s.account_leases(name)
        active = [a for m in s.list_machines() if (a := s.get_attempt(m.active_attempt_id) if m.active_attempt_id else None)]
        per_account = {name: {a.machine_id for a in active if a.account == name} for name in ("alice", "bob")}
        assert all(len(v) <= 2 for v in per_account.values()), per_account
        assert sum(len(v) for v in per_account.values()) == 4, "every slot was used"
        # End the round: attempts over, nobody logged in, the leases settle and go.
        for a in active:
            s.finish_attempt(a.id, a.machine_id, Ending.SUCCEEDED, output={}, detail="", now=now + 2)
        for m in s.list_machines():
            beat(s, m.id, now + 4, [], changed=False)
        s.sweep_account_leases(now + 4, TIMEOUT, MARGIN)
        assert s.account_leases() == []
    for st in stores:
        st.close()


# -- secret keys ----------------------------------------------------------------------------------------

def test_keys_in_use_and_the_keyrings_that_may_serve(s):
    assert s.keys_in_use() == []
    assert s.claim_key(["k1"])  # the first server's key
    assert s.keys_in_use() == ["k1"]
    assert not s.claim_key(["k2"]), "a keyring without k1 cannot decrypt what k1 encrypted"
    assert s.claim_key(["k2", "k1"])  # a rotation: k2 encrypts from now on
    assert s.keys_in_use() == ["k1", "k2"]
    assert not s.claim_key(["k1"]), "k2 may have encrypted something since"
    assert not s.settle_keys(["k1"], "k2"), "the set changed since it was read"
    assert s.settle_keys(["k1", "k2"], "k2")
    assert s.keys_in_use() == ["k2"] and s.claim_key(["k2"]) and not s.claim_key(["k1"])


def test_a_database_of_the_single_key_releases_is_read_as_such(s):
    from deskfleet.store.schema import meta

    with s.engine.begin() as conn:
        conn.execute(meta.insert().values(key="secret_key", value="old"))
    assert s.keys_in_use() == ["old"]
    assert not s.claim_key(["new"])
    assert s.claim_key(["old"])


def test_the_fingerprint_key_is_made_once(s):
    assert s.fingerprint_key(lambda: "enc:v1:first") == "enc:v1:first"
    assert s.fingerprint_key(lambda: "enc:v1:second") == "enc:v1:first"


def test_rotation_re_encrypts_every_secret_and_both_keys_decrypt_meanwhile(s):
    k1, k2 = Fernet.generate_key(), Fernet.generate_key()
    old = SecretBox(k1)
    s.put_account(VaultAccount(name="alice", username="alice", password=old.encrypt("pw-alice"),
                               totp_seed=old.encrypt("JBSWY3DPEHPK3PXP"), app="ehr"), T0)
    s.fingerprint_key(lambda: old.encrypt_bytes(b"mac"))
    machine(s, "m1")
    ids = [s.submit(RunSpec("ehr.ping", input={"user": "u", "pw": old.encrypt(f"secret-{i}")}),
                    request_hash=f"h{i}", now=T0)[0].id for i in range(7)]
    plain = s.submit(RunSpec("ehr.ping", input={"user": "nothing secret"}), request_hash="p", now=T0)[0].id
    both = SecretBox([k2, k1])
    # During the switch: the new keyring reads what the old key wrote, and writes with k2.
    assert both.decrypt(s.get_account("alice").password) == "pw-alice"
    assert SecretBox(k2).decrypt(both.encrypt("x")) == "x"
    done = reencrypt(s, both, batch=3)
    assert (done.accounts, done.runs, done.other) == (1, 7, 1)
    only_new = SecretBox(k2)
    acct = s.get_account("alice")
    assert only_new.decrypt(acct.password) == "pw-alice" and only_new.decrypt(acct.totp_seed) == "JBSWY3DPEHPK3PXP"
    assert [only_new.decrypt(s.get_run(i).input["pw"]) for i in ids] == [f"secret-{i}" for i in range(7)]
    assert s.get_run(plain).input == {"user": "nothing secret"}
    assert only_new.decrypt_bytes(s.fingerprint_key(lambda: "unused")) == b"mac"
    again = reencrypt(s, both)
    assert (again.accounts, again.runs, again.other) == (0, 0, 0), "a second pass finds nothing to do"
