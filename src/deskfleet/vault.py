"""The credential vault, orchestrator side: accounts, the secrets an agent is granted, TOTP
codes, and re-encryption under a new key.

Accounts are stored with their password and TOTP seed encrypted by the server's keyring
(``crypto.SecretBox``); this module is the only place that decrypts them, to build an
:class:`~deskfleet.protocol.AccountGrant` for the one assignment or verification that
needs it, or to compute a TOTP code. The seed itself never leaves the orchestrator: a
leaked seed defeats MFA for good, a leaked code is good for a minute (docs/credentials.md).

Leases — which machine may be logged in as which account — are kept by the store
(``store.accounts``) and honoured by the scheduler (``scheduler.accounts``).
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyotp

from .crypto import SecretBox
from .errors import InvalidInput, NotFound, Unservable
from .models import AccountLease, AutomationSpec, Pool, RunSpec, VaultAccount
from .protocol import AccountGrant

if TYPE_CHECKING:
    from .store import Store
    from .store.runner import StoreRunner

log = logging.getLogger(__name__)

CATALOG_TTL = 2.0  # seconds submit trusts the list of accounts; this replica's own changes drop it
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]*$")
NAME_HINT = "letters, digits, '.', '_', '@', '+' and '-', starting with a letter or digit, at most 200"
MIN_SEED_CHARS = 16  # 80 bits: the shortest seed authenticator apps accept


def normalize_seed(seed: str) -> str:
    """A TOTP seed as authenticator apps show it (spaces, dashes, lower case, padding) made
    canonical; ValueError (saying what is wrong, never quoting it) if it is not base32."""
    s = re.sub(r"[\s-]", "", seed).upper().rstrip("=")
    if not re.fullmatch(r"[A-Z2-7]*", s):
        raise ValueError("not a base32 TOTP seed (letters A-Z and digits 2-7, as an authenticator app "
                         "shows it); check it was copied whole")
    if len(s) < MIN_SEED_CHARS:
        raise ValueError(f"a TOTP seed is at least {MIN_SEED_CHARS} base32 characters; this one has {len(s)}")
    try:
        base64.b32decode(s + "=" * (-len(s) % 8))
    except binascii.Error:
        raise ValueError("not a valid base32 TOTP seed (its length does not decode); check it was copied whole") from None
    return s


def _seed(value: str) -> str:
    try:
        return normalize_seed(value)
    except ValueError as exc:
        raise InvalidInput(f"totp_seed: {exc}", field="totp_seed") from None


def check_name(name: str) -> None:
    if not (0 < len(name) <= 200 and NAME.match(name)):
        raise InvalidInput(f"account names are {NAME_HINT} characters", field="name")


@dataclass(slots=True)
class AccountView:
    """An account as the API shows it: never a secret."""

    account: VaultAccount
    leases: list[AccountLease] = field(default_factory=list)


class Vault:
    """The vault over ``store`` (reached through ``db``), with the server's keyring ``box``;
    ``on_change`` is called after every change to the accounts (submit checks must see it
    at once, on every replica, and runs that waited for an account may fit now)."""

    def __init__(self, store: Store, db: StoreRunner, box: SecretBox, *, on_change: Callable[[], None]) -> None:
        self.store = store
        self.db = db
        self.box = box
        self._on_change = on_change
        self._catalog: tuple[float, dict[str, str | None]] | None = None  # name → app

    def forget(self) -> None:
        self._catalog = None

    def _changed(self) -> None:
        self.forget()
        self._on_change()

    # -- operators ------------------------------------------------------------------------------
    async def put(self, name: str, *, app: str | None, username: str, password: str, totp_seed: str | None,
                  labels: dict[str, str], max_sessions: int) -> tuple[AccountView, bool]:
        check_name(name)
        acct = VaultAccount(
            name=name, app=app, username=username, password=self.box.encrypt(password),
            totp_seed=self.box.encrypt(_seed(totp_seed)) if totp_seed is not None else None,
            labels=labels, max_sessions=max_sessions,
        )
        stored, created = await self.db(self.store.put_account, acct, time.time())
        log.info("account %s %s (app %s)", name, "created" if created else "replaced", app)
        self._changed()
        return AccountView(stored, await self.db(self.store.account_leases, name)), created

    async def patch(self, name: str, changes: dict[str, Any]) -> AccountView:
        values = dict(changes)
        if "password" in values:
            values["password"] = self.box.encrypt(values["password"])
        if "totp_seed" in values and values["totp_seed"] is not None:
            values["totp_seed"] = self.box.encrypt(_seed(values["totp_seed"]))
        stored = await self.db(self.store.update_account, name, values, time.time())
        log.info("account %s updated (%s)", name, ", ".join(sorted(changes)) or "nothing")
        self._changed()
        return AccountView(stored, await self.db(self.store.account_leases, name))

    async def get(self, name: str) -> AccountView:
        acct = await self.db(self.store.get_account, name)
        if acct is None:
            raise NotFound(f"no account {name!r} in the vault; see GET /v1/accounts (deskfleet accounts list)",
                           field="name")
        return AccountView(acct, await self.db(self.store.account_leases, name))

    async def all(self) -> list[AccountView]:
        accounts = await self.db(self.store.list_accounts)
        leases: dict[str, list[AccountLease]] = {}
        for lease in await self.db(self.store.account_leases):
            leases.setdefault(lease.account, []).append(lease)
        return [AccountView(a, leases.get(a.name, [])) for a in accounts]

    async def remove(self, name: str, *, force: bool) -> list[AccountLease]:
        released = await self.db(self.store.remove_account, name, time.time(), force=force)
        log.info("account %s removed%s", name, f" (forced: {len(released)} leases released)" if released else "")
        self._changed()
        return released

    # -- runs -------------------------------------------------------------------------------------
    async def _apps(self) -> dict[str, str | None]:
        now = time.monotonic()
        if self._catalog is None or now - self._catalog[0] > CATALOG_TTL:
            found = {a.name: a.app for a in await self.db(self.store.list_accounts)}
            self._catalog = (now, found)
        return self._catalog[1]

    async def check_run(self, spec: RunSpec, auto: AutomationSpec, pool: Pool) -> None:
        """Refuse at submit a run that needs an account the vault cannot give: a session_key
        naming no account, an account of another app, an automation that logs in to a pack
        without accounts — unless the pool lets runs wait for capacity (accounts may come)."""
        if spec.session_key is None and not auto.needs_account:
            return
        apps = await self._apps()
        pack = auto.pack
        add = (f"add one with: deskfleet accounts set NAME --app {pack or 'APP'} --username USER --password-stdin")
        if spec.session_key is not None:
            if spec.session_key in apps:
                app = apps[spec.session_key]
                if auto.needs_account and pack is not None and app is not None and app != pack:
                    raise InvalidInput(
                        f"account {spec.session_key!r} logs in to {app!r}, but {auto.name} works in pack "
                        f"{pack!r}; name an account of {pack!r} as session_key", field="session_key")
                return
            if auto.needs_account and not pool.allow_wait_for_capacity:
                raise Unservable(
                    f"no account {spec.session_key!r} in the vault, and {auto.name} logs in to "
                    f"{pack or 'its application'}; add it with: deskfleet accounts set {spec.session_key} "
                    f"--app {pack or 'APP'} --username USER --password-stdin (or let the pool wait for capacity: "
                    "allow_wait_for_capacity=true)", field="session_key")
            return
        if not any(app == pack for app in apps.values()) and not pool.allow_wait_for_capacity:
            raise Unservable(
                f"{auto.name} logs in to pack {pack!r}, but the vault holds no account of {pack!r}; {add} "
                "(or let the pool wait for capacity: allow_wait_for_capacity=true)", field="automation")

    # -- agents ------------------------------------------------------------------------------------
    def grant(self, acct: VaultAccount) -> AccountGrant:
        """The account's secrets for one login (decrypted here, for this message only)."""
        return AccountGrant(name=acct.name, app=acct.app, username=acct.username,
                            password=self.box.decrypt(acct.password), totp=acct.totp_seed is not None)

    async def verify_grants(self, machine_id: str) -> list[AccountGrant]:
        accounts = await self.db(self.store.reserve_for_verify, machine_id, time.time())
        return [self.grant(a) for a in accounts]

    async def totp(self, machine_id: str, account: str) -> tuple[str, float]:
        """A current code for ``account``, only for a machine holding a lease on it (Conflict
        or NotFound otherwise); (code, seconds it stays valid)."""
        token = await self.db(self.store.issue_totp, account, machine_id, time.time())
        totp = pyotp.TOTP(self.box.decrypt(token))
        now = time.time()
        log.info("TOTP code issued for account %s", account, extra={"machine": machine_id})
        return totp.at(now), totp.interval - now % totp.interval


# -- key rotation ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Reencrypted:
    runs: int = 0
    accounts: int = 0
    other: int = 0
    artifacts: int = 0  # screenshots and files, those stored in the clear before 0.11 included


def reencrypt(store: Store, box: SecretBox, *, batch: int = 500, artifact_batch: int = 50,
              progress: Callable[[Reencrypted], None] | None = None) -> Reencrypted:
    """Re-encrypt every stored secret with ``box``'s newest key, a batch per transaction
    (safe while servers run: each value is readable by every key of the keyring meanwhile) —
    and every artifact, ``artifact_batch`` at a time (screenshots are big: a transaction
    holds their bytes in memory). Artifacts stored in the clear are encrypted on the way."""
    done = Reencrypted()
    done.accounts = store.rewrap_accounts(box.rewrap)
    done.other = store.rewrap_meta(box.rewrap) + store.rewrap_human_tasks(box.rewrap)
    after: str | None = None
    while True:
        after, changed = store.rewrap_runs(after, batch, box.rewrap)
        done.runs += changed
        if progress is not None:
            progress(done)
        if after is None:
            break
    key = box.key_fingerprint()

    def reseal(data: bytes, encrypted: bool) -> bytes:
        return box.reseal(data) if encrypted else box.seal(data)

    while True:
        after, changed = store.rewrap_artifacts(after, artifact_batch, key, reseal)
        done.artifacts += changed
        if progress is not None:
            progress(done)
        if after is None:
            return done


__all__ = ["AccountView", "Reencrypted", "Vault", "check_name", "normalize_seed", "reencrypt"]
