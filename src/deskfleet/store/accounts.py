"""The store's credential vault and account leases (a part of :class:`~deskfleet.store.sql.SQLStore`).

An *account lease* is the right of one machine to be logged in as an account; an account
has at most ``max_sessions`` of them. A lease is

- *reserved* when the scheduler (or a verification) hands a machine the account for a
  login — in the same transaction as the claim, with the account row locked and its leases
  counted, so two replicas claiming at once cannot both take the last slot;
- *held* while the machine's session note says that account (heartbeats carry the notes;
  a lease is also recorded for a session the machine reports on its own);
- *released* when the note no longer lists it (logout, app restart, expiry), when a
  reservation ends without the login showing up, when the machine has been silent for
  the heartbeat timeout (quarantined or gone), or when the account is removed.

A reservation is not released while its attempt (or verification) is still going: a
login in progress, or an app restarted by a playbook, may make the note lapse for a
moment, and another machine must not take the slot meanwhile. Once it ended, the first
heartbeat written a heartbeat interval later decides: the note lists the account (held)
or it does not (released).

Lock order (see ``store.sql``): run, attempt, machine, then account, then its leases.
Heartbeats write lease rows without locking accounts: they record what is, and a claim
counting leases meanwhile only errs on the side of fewer sessions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, delete, insert, or_, select, update

from ..access import AuditEntry
from ..errors import Conflict, NotFound
from ..models import AccountLease, Attempt, AutomationSpec, LeaseState, VaultAccount
from ..scheduler import Need, Slot
from . import rows
from .schema import account_leases, accounts, attempts, machines

#: seconds the scheduling pass trusts the list of accounts (names, apps, max_sessions); a
#: store forgets it at once when it changes an account itself
ACCOUNTS_TTL = 1.0
#: a verification whose end was never reported gives its reservations back after this
VERIFY_MAX = 600.0

class AccountOps:
    """Vault and account-lease operations; mixed into SQLStore, whose plumbing they use."""

    _pg: bool
    _accounts_cache: tuple[float, dict[str, VaultAccount]] | None

    if TYPE_CHECKING:
        def _tx(self, write: bool = True) -> AbstractContextManager[Connection]: ...

        def _event(self, conn: Connection, kind: str, now: float, *, run_id: str | None = None,
                   attempt_id: int | None = None, machine_id: str | None = None,
                   from_state: str | None = None, to_state: str | None = None, reason: str | None = None,
                   data: dict[str, Any] | None = None) -> None: ...

        def _spec(self, conn: Connection, name: str, version: str | None) -> AutomationSpec | None: ...

        def _audit(self, conn: Connection, entries: Sequence[AuditEntry]) -> None: ...

    # -- the vault ------------------------------------------------------------------------------
    def put_account(self, account: VaultAccount, now: float) -> tuple[VaultAccount, bool]:
        """Create or replace an account (secrets already encrypted); whether it was created."""
        with self._tx() as conn:
            existing = self._lock_account(conn, account.name)
            values = {
                "app": account.app, "username": account.username, "password": account.password,
                "totp_seed": account.totp_seed, "labels": account.labels,
                "max_sessions": account.max_sessions, "updated_at": now,
            }
            if existing is None:
                conn.execute(insert(accounts).values(name=account.name, created_at=now, **values))
                self._event(conn, "account.created", now, data=_about(account, [k for k in values if k != "updated_at"]))
            else:
                conn.execute(update(accounts).where(accounts.c.name == account.name).values(**values))
                self._event(conn, "account.updated", now, data=_about(account, ["password", *_changed(existing, account)]))
            self._accounts_cache = None
            return self._read_account(conn, account.name), existing is None

    def update_account(self, name: str, values: dict[str, Any], now: float) -> VaultAccount:
        """Change some of an account's fields (secrets already encrypted)."""
        allowed = {"app", "username", "password", "totp_seed", "labels", "max_sessions"}
        if not set(values) <= allowed:
            raise ValueError(f"not account fields: {sorted(set(values) - allowed)}")
        with self._tx() as conn:
            if self._lock_account(conn, name) is None:
                raise NotFound(f"no account {name!r} in the vault", field="name")
            if values:
                conn.execute(update(accounts).where(accounts.c.name == name).values(updated_at=now, **values))
                self._event(conn, "account.updated", now, data={"account": name, "fields": sorted(values)})
            self._accounts_cache = None
            return self._read_account(conn, name)

    def get_account(self, name: str) -> VaultAccount | None:
        with self._tx(write=False) as conn:
            row = conn.execute(select(accounts).where(accounts.c.name == name)).mappings().first()
            return rows.vault_account(row) if row else None

    def list_accounts(self) -> list[VaultAccount]:
        with self._tx(write=False) as conn:
            return [rows.vault_account(r) for r in conn.execute(select(accounts).order_by(accounts.c.name)).mappings()]

    def account_leases(self, account: str | None = None, machine_id: str | None = None) -> list[AccountLease]:
        q = select(account_leases).order_by(account_leases.c.account, account_leases.c.machine_id)
        if account is not None:
            q = q.where(account_leases.c.account == account)
        if machine_id is not None:
            q = q.where(account_leases.c.machine_id == machine_id)
        with self._tx(write=False) as conn:
            return [rows.account_lease(r) for r in conn.execute(q).mappings()]

    def remove_account(self, name: str, now: float, *, force: bool = False) -> list[AccountLease]:
        """Remove an account; refused (Conflict) while a machine holds a lease on it, unless
        ``force``: then its leases go too (returned)."""
        with self._tx() as conn:
            if self._lock_account(conn, name) is None:
                raise NotFound(f"no account {name!r} in the vault", field="name")
            leases = [rows.account_lease(r) for r in conn.execute(
                select(account_leases).where(account_leases.c.account == name)
                .order_by(account_leases.c.machine_id)).mappings()]
            if leases and not force:
                held = ", ".join(f"{lease.machine_id} ({lease.state.value})" for lease in leases)
                raise Conflict(
                    f"account {name!r} is leased by {held}; wait until it is logged out, or remove "
                    "it anyway with force (DELETE …?force=true, or deskfleet accounts remove --force)",
                    field="name",
                )
            for lease in leases:
                self._release(conn, lease, "account_removed", now, exact=False)
            conn.execute(delete(accounts).where(accounts.c.name == name))
            self._event(conn, "account.removed", now, reason="forced" if leases else None,
                        data={"account": name, "leases_released": len(leases)})
            self._accounts_cache = None
            return leases

    def issue_totp(self, account: str, machine_id: str, now: float) -> str:
        """The account's (encrypted) TOTP seed, for a code — only if ``machine_id`` holds a
        lease on it. Records the issue as an event (never the seed nor the code)."""
        with self._tx() as conn:
            acct = conn.execute(select(accounts.c.totp_seed).where(accounts.c.name == account)).first()
            if acct is None:
                raise NotFound(f"no account {account!r} in the vault")
            lease = conn.execute(select(account_leases.c.state).where(
                account_leases.c.account == account, account_leases.c.machine_id == machine_id)).first()
            if lease is None:
                raise Conflict(f"machine {machine_id} holds no lease on account {account!r}: a code is "
                               "issued only to a machine that was given the account")
            if acct[0] is None:
                raise Conflict(f"account {account!r} has no TOTP seed; set one with "
                               f"deskfleet accounts set {account} --totp-seed-stdin")
            active = conn.execute(select(attempts.c.id, attempts.c.run_id).where(
                attempts.c.machine_id == machine_id, attempts.c.state == "active")).first()
            self._event(conn, "account.totp_issued", now, machine_id=machine_id,
                        attempt_id=active[0] if active else None, run_id=active[1] if active else None,
                        data={"account": account})
            self._audit_grant(conn, "credential.totp_issued", account, machine_id, now,
                              run=active[1] if active else None, attempt=active[0] if active else None)
            return str(acct[0])

    # -- verifications --------------------------------------------------------------------------
    def reserve_for_verify(self, machine_id: str, now: float) -> list[VaultAccount]:
        """Accounts for a quarantined machine to log in with while it re-proves its state:
        for each pack its automations log in to, the account it holds, else a free one
        (reserved until :meth:`verify_ended`). A pack without a free account gets none."""
        with self._tx() as conn:
            offered = conn.execute(select(machines.c.automations).where(machines.c.id == machine_id)).scalar()
            packs: set[str | None] = set()
            for key in offered or ():
                name, _, version = str(key).partition("@")
                spec = self._spec(conn, name, version)
                if spec is not None and spec.needs_account:
                    packs.add(spec.pack)
            granted: list[VaultAccount] = []
            for pack in sorted(packs, key=lambda p: p or ""):
                candidates = self._slots_of(conn, pack)
                mine = [s for s in candidates if machine_id in s.holders]
                order = mine or sorted((s for s in candidates if s.free), key=lambda s: (len(s.holders), s.rank, s.name))
                for slot in order:
                    acct = self._claim_slot(conn, slot.name, machine_id)
                    if acct is not None:
                        # Until the verification reports, or VERIFY_MAX at the latest.
                        self._reserve(conn, acct, machine_id, None, None, now, purpose="verify",
                                      settle_at=now + VERIFY_MAX)
                        granted.append(acct)
                        break
            return granted

    def verify_ended(self, machine_id: str, now: float) -> None:
        """The machine reported its verification: its reservations settle from now."""
        with self._tx() as conn:
            conn.execute(update(account_leases).where(
                account_leases.c.machine_id == machine_id, account_leases.c.state == "reserved",
                account_leases.c.attempt_id.is_(None),
                or_(account_leases.c.settle_at.is_(None), account_leases.c.settle_at > now),
            ).values(settle_at=now))

    # -- the fleet manager's sweep --------------------------------------------------------------
    def sweep_account_leases(self, now: float, heartbeat_timeout: float, margin: float) -> list[AccountLease]:
        """Release the leases of machines silent for ``heartbeat_timeout``, and settle
        reservations whose attempt or verification ended: held if the machine's session
        note, in a heartbeat written at least ``margin`` after the end, lists the account;
        released if not. Returns the leases released."""
        silent_before = now - heartbeat_timeout
        a = attempts.alias("a")
        q = (
            select(account_leases, machines.c.last_heartbeat_at, machines.c.sessions,
                   a.c.state.label("attempt_state"), a.c.ended_at)
            .select_from(account_leases.join(machines, machines.c.id == account_leases.c.machine_id)
                         .outerjoin(a, a.c.id == account_leases.c.attempt_id))
            .where(or_(account_leases.c.state == "reserved", machines.c.last_heartbeat_at.is_(None),
                       machines.c.last_heartbeat_at < silent_before))
        )
        # Decided on a read (no write lock taken when there is nothing to do, as on most
        # ticks); applied to each lease only as it was read (see _same_lease).
        todo: list[tuple[AccountLease, float | None, str]] = []  # (lease, its settle_at, what)
        with self._tx(write=False) as conn:
            for r in conn.execute(q).mappings():
                lease = rows.account_lease(r)
                beat = r["last_heartbeat_at"]
                if beat is None or beat < silent_before:
                    todo.append((lease, r["settle_at"], "machine_silent"))
                    continue
                if lease.attempt_id is not None:
                    settle = r["ended_at"] if r["attempt_state"] not in (None, "active") else None
                    if r["attempt_state"] is None:
                        settle = lease.since  # the attempt row is gone (cannot happen; be safe)
                else:  # a verification's: until it reported (or its deadline)
                    settle = r["settle_at"] if r["settle_at"] is not None else lease.since + VERIFY_MAX
                if settle is None or beat < settle + margin:
                    continue  # still logging in, or no heartbeat since it ended
                todo.append((lease, r["settle_at"], "held" if lease.account in (r["sessions"] or ()) else "not_logged_in"))
        released: list[AccountLease] = []
        if not todo:
            return released
        todo.sort(key=lambda t: t[0].machine_id)  # machines locked in the order heartbeats take them
        with self._tx() as conn:
            for lease, settle_at, what in todo:
                if what != "machine_silent":
                    # The notes as they are now, the machine locked first (the order heartbeats
                    # take): a heartbeat's change between the read and here is not lost.
                    q = select(machines.c.sessions).where(machines.c.id == lease.machine_id)
                    notes = conn.execute(q.with_for_update() if self._pg else q).scalar()
                    what = "held" if lease.account in (notes or ()) else "not_logged_in"
                if what == "held":
                    conn.execute(update(account_leases).where(*_same_lease(lease, settle_at))
                                 .values(state="held", attempt_id=None, settle_at=None))
                elif self._release(conn, lease, what, now, settle_at=settle_at):
                    released.append(lease)
        return released

    # -- inside other operations' transactions --------------------------------------------------
    def _lock_account(self, conn: Connection, name: str) -> VaultAccount | None:
        q = select(accounts).where(accounts.c.name == name)
        row = conn.execute(q.with_for_update() if self._pg else q).mappings().first()
        return rows.vault_account(row) if row else None

    def _read_account(self, conn: Connection, name: str) -> VaultAccount:
        row = conn.execute(select(accounts).where(accounts.c.name == name)).mappings().one()
        return rows.vault_account(row)

    def _holders(self, conn: Connection, names: Sequence[str]) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {n: set() for n in names}
        if names:
            for account, machine_id in conn.execute(select(account_leases.c.account, account_leases.c.machine_id)
                                                    .where(account_leases.c.account.in_(list(names)))):
                out.setdefault(account, set()).add(machine_id)
        return out

    def _slots_of(self, conn: Connection, pack: str | None) -> list[Slot]:
        q = select(accounts.c.name, accounts.c.app, accounts.c.max_sessions, accounts.c.created_at)
        q = q.where(accounts.c.app.is_(None) if pack is None else accounts.c.app == pack).order_by(accounts.c.name)
        found = list(conn.execute(q))
        holders = self._holders(conn, [r[0] for r in found])
        return [Slot(name, app, max_sessions, holders[name], created) for name, app, max_sessions, created in found]

    def _catalog(self, conn: Connection) -> dict[str, VaultAccount]:
        """Every account (secrets left out), as read at most ACCOUNTS_TTL seconds ago."""
        import time

        cached = self._accounts_cache
        if cached is not None and time.monotonic() - cached[0] < ACCOUNTS_TTL:
            return cached[1]
        found = {
            name: VaultAccount(name=name, username=username, password="", app=app, max_sessions=max_sessions,
                               created_at=created)
            for name, app, username, max_sessions, created in conn.execute(
                select(accounts.c.name, accounts.c.app, accounts.c.username, accounts.c.max_sessions,
                       accounts.c.created_at))
        }
        self._accounts_cache = (time.monotonic(), found)
        return found

    def _needs(self, conn: Connection, queued: Sequence[Any],
               spec: Callable[[str, str | None], AutomationSpec | None]) -> tuple[dict[str, Need], list[Slot]]:
        """What the queued runs need from the vault, and the accounts that concern them (with
        their current holders). Empty when no run needs an account — then nothing is read."""
        catalog: dict[str, VaultAccount] | None = None
        needs: dict[str, Need] = {}
        for run in queued:
            s = spec(run.automation, run.version)
            logs_in = s is not None and s.needs_account
            if run.session_key is not None:
                if catalog is None:
                    catalog = self._catalog(conn)
                if run.session_key in catalog or logs_in:
                    needs[run.id] = Need(account=run.session_key)
                    continue
            if logs_in:
                assert s is not None
                needs[run.id] = Need(pack=s.pack)
        if not needs:
            return needs, []
        if catalog is None:
            catalog = self._catalog(conn)
        wanted = {n.account for n in needs.values() if n.account is not None}
        packs = {n.pack for n in needs.values() if n.account is None}
        names = sorted(name for name, acct in catalog.items() if name in wanted or acct.app in packs)
        holders = self._holders(conn, names)
        return needs, [Slot(n, catalog[n].app, catalog[n].max_sessions, holders[n], catalog[n].created_at)
                       for n in names]

    def _claim_slot(self, conn: Connection, name: str, machine_id: str) -> VaultAccount | None:
        """Lock the account and count its leases: the account, if ``machine_id`` holds it or
        it has a free slot; None otherwise (or if it is gone). Writes nothing."""
        acct = self._lock_account(conn, name)
        if acct is None:
            return None
        holders = self._holders(conn, [name])[name]
        if machine_id in holders or len(holders) < acct.max_sessions:
            return acct
        return None

    def _reserve(self, conn: Connection, acct: VaultAccount, machine_id: str, attempt_id: int | None,
                 run_id: str | None, now: float, *, purpose: str = "attempt", settle_at: float | None = None) -> None:
        """Reserve ``acct`` for ``machine_id`` (its slot checked by :meth:`_claim_slot`) and
        record the grant. An attempt's reservation settles when the attempt ends; a
        verification's at ``settle_at`` (moved earlier when it reports)."""
        changed = conn.execute(update(account_leases).where(
            account_leases.c.account == acct.name, account_leases.c.machine_id == machine_id,
        ).values(state="reserved", attempt_id=attempt_id, settle_at=settle_at)).rowcount
        if not changed:
            conn.execute(insert(account_leases).values(account=acct.name, machine_id=machine_id, state="reserved",
                                                       since=now, attempt_id=attempt_id, settle_at=settle_at))
            self._event(conn, "account.leased", now, machine_id=machine_id, attempt_id=attempt_id, run_id=run_id,
                        reason=f"granted for {'an attempt' if purpose == 'attempt' else 'a verification'}",
                        data={"account": acct.name, "state": "reserved"})
        self._event(conn, "account.granted", now, machine_id=machine_id, attempt_id=attempt_id, run_id=run_id,
                    reason=purpose, data={"account": acct.name, "app": acct.app})
        self._audit_grant(conn, "credential.issued", acct.name, machine_id, now, purpose=purpose, run=run_id,
                          attempt=attempt_id)

    def _audit_grant(self, conn: Connection, action: str, account: str, machine_id: str, now: float,
                     **detail: object) -> None:
        """A credential handed to an agent, in the audit log — in the transaction that hands it."""
        self._audit(conn, [AuditEntry(action=action, actor=f"machine:{machine_id}", target=f"account:{account}",
                                      at=now, detail={k: v for k, v in detail.items() if v is not None})])

    def _grant_again(self, conn: Connection, a: Attempt, now: float) -> VaultAccount | None:
        """The account of an attempt whose assignment is sent again (the agent was away)."""
        if a.account is None:
            return None
        row = conn.execute(select(accounts).where(accounts.c.name == a.account)).mappings().first()
        if row is None:
            return None
        acct = rows.vault_account(row)
        self._event(conn, "account.granted", now, machine_id=a.machine_id, attempt_id=a.id, run_id=a.run_id,
                    reason="resent", data={"account": acct.name, "app": acct.app})
        self._audit_grant(conn, "credential.issued", acct.name, a.machine_id, now, purpose="resent", run=a.run_id,
                          attempt=a.id)
        return acct

    def _release(self, conn: Connection, lease: AccountLease, reason: str, now: float, *,
                 settle_at: float | None = None, exact: bool = True) -> bool:
        """Delete the lease as it was read (``exact``: not one re-reserved meanwhile); whether
        it was."""
        where = _same_lease(lease, settle_at) if exact else [
            account_leases.c.account == lease.account, account_leases.c.machine_id == lease.machine_id]
        gone = conn.execute(delete(account_leases).where(*where)).rowcount
        if gone:
            self._event(conn, "account.released", now, machine_id=lease.machine_id, reason=reason,
                        data={"account": lease.account, "state": lease.state.value,
                              "held_for": round(now - lease.since, 3)})
        return bool(gone)

    def _sync_sessions(self, conn: Connection, machine_id: str, notes: Sequence[str], now: float,
                       stored: Sequence[str] | None = None) -> list[str]:
        """Bring a machine's leases in line with its session notes (account names or
        usernames); returns the notes as account names, as stored on the machine
        (``stored``: what the machine row holds, if the caller read it)."""
        names = self._resolve(conn, notes)
        current = {r["account"]: rows.account_lease(r) for r in conn.execute(
            select(account_leases).where(account_leases.c.machine_id == machine_id)).mappings()}
        if not names and not current and stored is not None and not stored:
            return names  # nothing logged in, nothing leased: nothing to write (most connects)
        known = set(self._catalog_names(conn, names))
        for name in names:
            if name in known and name not in current:
                conn.execute(insert(account_leases).values(account=name, machine_id=machine_id, state="held",
                                                           since=now, attempt_id=None))
                self._event(conn, "account.leased", now, machine_id=machine_id, reason="session_seen",
                            data={"account": name, "state": "held"})
        for name, lease in current.items():
            if name not in names and lease.state is LeaseState.HELD:
                self._release(conn, lease, "session_ended", now)
        conn.execute(update(machines).where(machines.c.id == machine_id).values(sessions=names))
        return names

    def _resolve(self, conn: Connection, notes: Sequence[str]) -> list[str]:
        """Session notes as account names: an account's name, else the one account with that
        username, else the note as it is (an account the vault does not know)."""
        notes = [n for n in dict.fromkeys(notes) if n]
        if not notes:
            return []
        found = list(conn.execute(select(accounts.c.name, accounts.c.username).where(
            or_(accounts.c.name.in_(notes), accounts.c.username.in_(notes)))))
        by_name = {name for name, _ in found}
        by_user: dict[str, list[str]] = {}
        for name, username in found:
            by_user.setdefault(username, []).append(name)
        out = []
        for n in notes:
            if n in by_name:
                out.append(n)
            elif len(by_user.get(n, ())) == 1:
                out.append(by_user[n][0])
            else:
                out.append(n)
        return list(dict.fromkeys(out))

    def _catalog_names(self, conn: Connection, names: Sequence[str]) -> Iterator[str]:
        if names:
            yield from (r[0] for r in conn.execute(select(accounts.c.name).where(accounts.c.name.in_(list(names)))))


def _same_lease(lease: AccountLease, settle_at: float | None) -> list[Any]:
    """The lease row as it was read: same state, attempt and settle time."""
    t = account_leases.c
    return [
        t.account == lease.account, t.machine_id == lease.machine_id, t.state == lease.state.value,
        t.attempt_id.is_(None) if lease.attempt_id is None else t.attempt_id == lease.attempt_id,
        t.settle_at.is_(None) if settle_at is None else t.settle_at == settle_at,
    ]


def _about(account: VaultAccount, fields: list[str]) -> dict[str, Any]:
    """What an account event says: never a secret, only which fields were set."""
    return {"account": account.name, "app": account.app, "username": account.username,
            "max_sessions": account.max_sessions, "fields": sorted(set(fields))}


def _changed(before: VaultAccount, after: VaultAccount) -> list[str]:
    out = [f for f in ("app", "username", "labels", "max_sessions") if getattr(before, f) != getattr(after, f)]
    if (before.totp_seed is None) != (after.totp_seed is None) or after.totp_seed is not None:
        out.append("totp_seed")
    return out


__all__ = ["ACCOUNTS_TTL", "AccountOps"]
