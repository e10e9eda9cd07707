"""Who may do what: API keys, roles, tenants (docs/access.md).

An API key is ``dfk_<prefix>_<secret>``. The prefix is public — it names the key in lists,
the audit log and error messages — and the secret is shown once, when the key is made; the
store keeps only its SHA-256 (a random 256-bit secret needs no slow hash: nothing can be
guessed from the digest). A key has

- a **role**: ``submitter`` submits runs and reads and cancels them; ``operator`` also runs
  the fleet (machines, human tasks, maintenance, retries); ``admin`` also changes it (pools,
  policies, packs, the vault's accounts, API keys) and reads the audit log;
- a **tenant**: it sees only that tenant's runs, their events, artifacts and human tasks,
  and submits only into it; ``*`` means every tenant (a platform operator);
- a separate permission to **view screenshots** (any role), since a screen shows whatever
  the application shows — a patient's record, an account's balance;
- an optional **expiry**, and a **revocation** that takes effect at once on the replica that
  revokes and within :data:`~deskfleet.services.access.CACHE_TTL` on the others.

The server's own ``--api-key`` (the bootstrap key) is an admin of every tenant with
screenshots; a server on loopback with neither a bootstrap key nor any API key in its
database lets everyone in as that (the quick start). Once a key exists, every request needs one.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from .errors import InvalidInput

KEY_PREFIX = "dfk_"
#: every tenant; a key of ``*`` is not scoped
ALL_TENANTS = "*"
_KEY = re.compile(r"^dfk_([a-z2-7]{10})_([A-Za-z0-9_-]{43})$")
_B32 = "abcdefghijklmnopqrstuvwxyz234567"


class Role(StrEnum):
    SUBMITTER = "submitter"
    OPERATOR = "operator"
    ADMIN = "admin"


class Permission(StrEnum):
    RUNS_SUBMIT = "runs.submit"
    RUNS_READ = "runs.read"
    RUNS_CANCEL = "runs.cancel"
    RUNS_RETRY = "runs.retry"
    FLEET_READ = "fleet.read"          # machines, pools, policies, demand, maintenance, packs
    FLEET_OPERATE = "fleet.operate"    # cordon, drain, uncordon; maintenance campaigns
    FLEET_ADMIN = "fleet.admin"        # pools and their policies, packs published and assigned
    HUMAN_READ = "human.read"
    HUMAN_ACT = "human.act"            # claim, release, complete
    ACCOUNTS_READ = "accounts.read"
    ACCOUNTS_WRITE = "accounts.write"
    KEYS_ADMIN = "keys.admin"
    AUDIT_READ = "audit.read"
    METRICS_READ = "metrics.read"
    SCREENSHOTS = "screenshots.view"   # never from a role: a key's own flag


_SUBMITTER = frozenset({Permission.RUNS_SUBMIT, Permission.RUNS_READ, Permission.RUNS_CANCEL})
_OPERATOR = _SUBMITTER | {Permission.RUNS_RETRY, Permission.FLEET_READ, Permission.FLEET_OPERATE,
                          Permission.HUMAN_READ, Permission.HUMAN_ACT, Permission.METRICS_READ}
_ADMIN = _OPERATOR | {Permission.FLEET_ADMIN, Permission.ACCOUNTS_READ, Permission.ACCOUNTS_WRITE,
                      Permission.KEYS_ADMIN, Permission.AUDIT_READ}
ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.SUBMITTER: _SUBMITTER, Role.OPERATOR: frozenset(_OPERATOR), Role.ADMIN: frozenset(_ADMIN),
}


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts as: a key (by its prefix), the bootstrap key, or the open loopback."""

    name: str                 # the key's prefix ("dfk_abcdefghij"), "bootstrap" or "anonymous"
    role: Role
    tenant: str               # ALL_TENANTS or one tenant
    screenshots: bool
    label: str = ""           # the key's name, for people reading the audit log

    def can(self, permission: Permission) -> bool:
        if permission is Permission.SCREENSHOTS:
            return self.screenshots
        return permission in ROLE_PERMISSIONS[self.role]

    def sees(self, tenant: str) -> bool:
        return self.tenant == ALL_TENANTS or self.tenant == tenant

    @property
    def scope(self) -> str | None:
        """The tenant a query is limited to, or None for every tenant."""
        return None if self.tenant == ALL_TENANTS else self.tenant


BOOTSTRAP = Principal("bootstrap", Role.ADMIN, ALL_TENANTS, True, "the server's --api-key")
ANONYMOUS = Principal("anonymous", Role.ADMIN, ALL_TENANTS, True, "no API key (loopback, no keys made)")


@dataclass(frozen=True, slots=True)
class NewKey:
    prefix: str   # "dfk_" + 10 base32 characters: the key's public name
    secret: str   # the whole key, shown once
    digest: str   # what the store keeps


def new_key() -> NewKey:
    prefix = KEY_PREFIX + "".join(secrets.choice(_B32) for _ in range(10))
    whole = f"{prefix}_{secrets.token_urlsafe(32)}"
    return NewKey(prefix, whole, digest(whole))


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_key(given: str) -> str | None:
    """The prefix of a well-formed key, or None."""
    m = _KEY.match(given)
    return f"{KEY_PREFIX}{m.group(1)}" if m else None


def role(value: str) -> Role:
    try:
        return Role(value)
    except ValueError:
        raise InvalidInput(f"no role {value!r}; one of: {', '.join(r.value for r in Role)}", field="role") from None


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A key as stored (never its secret)."""

    prefix: str
    name: str
    role: Role
    tenant: str
    screenshots: bool
    created_at: float
    created_by: str
    expires_at: float | None = None
    revoked_at: float | None = None
    revoked_by: str | None = None
    last_used_at: float | None = None

    def principal(self) -> Principal:
        return Principal(self.prefix, self.role, self.tenant, self.screenshots, self.name)

    def state(self, now: float) -> Literal["active", "expired", "revoked"]:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One line of the audit log. ``outcome``: ok, denied (401, 403, another tenant's
    resource) or failed (any other refusal)."""

    action: str
    actor: str
    target: str = ""
    outcome: str = "ok"
    status: int | None = None
    role: str | None = None
    tenant: str | None = None
    detail: dict[str, object] | None = None
    remote: str = ""
    at: float = 0.0
    id: int = 0

    @classmethod
    def by(cls, who: Principal, action: str, **kw: object) -> AuditEntry:
        return cls(action=action, actor=who.name, role=who.role.value, tenant=who.tenant, **kw)  # type: ignore[arg-type]
