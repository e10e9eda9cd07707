"""Pool policies, versioned, and a pool's demand (a part of :class:`~deskfleet.store.sql.SQLStore`).

Every change to a pool's policy is a new version; the latest is in force, the older ones
are its history. A change names the version it was made against (what its author read):
if another change came first, it is refused with 409 rather than silently undoing it.

A pool's demand is read from the tables at the moment it is asked for — the runs waiting,
the machines by status, the runs that arrived lately — so that every replica answers the
same, and an external autoscaler (KEDA's metrics API scaler) can read it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, and_, func, or_, select

from ..errors import Conflict, NotFound
from .schema import events, pool_policies, pools, runs


@dataclass(frozen=True, slots=True)
class PolicyVersion:
    pool: str
    version: int
    policy: dict[str, Any]  # as validated by deskfleet.pools.PoolPolicy
    created_at: float
    comment: str = ""


@dataclass(frozen=True, slots=True)
class PoolDemand:
    """What a pool's work asks of its machines at ``at``."""

    pool: str
    at: float
    queued: int  # runs waiting for a machine now
    delayed: int  # queued runs waiting for their retry backoff (``not_before``) to pass
    oldest_wait: float | None  # seconds the longest-waiting of ``queued`` has waited
    arrivals: int  # runs submitted in the last ``window`` seconds
    window: float
    machines: dict[str, int] = field(default_factory=dict)  # by status: busy, ready, offline, …

    @property
    def arrival_rate(self) -> float:
        """Runs a second, over the window."""
        return self.arrivals / self.window if self.window > 0 else 0.0

    @property
    def busy(self) -> int:
        return self.machines.get("busy", 0)

    @property
    def idle(self) -> int:
        return self.machines.get("ready", 0)


class PoolOps:
    _event: Any

    if TYPE_CHECKING:
        def _tx(self, write: bool = True) -> AbstractContextManager[Connection]: ...
        def _count_machines(self, conn: Connection, pool: str | None) -> dict[str, int]: ...

    def pool_policy(self, pool: str) -> PolicyVersion | None:
        """The policy in force for ``pool``: its latest version (None if it never had one)."""
        with self._tx(write=False) as conn:
            return self._latest_policy(conn, pool)

    def pool_policy_history(self, pool: str, limit: int = 50) -> list[PolicyVersion]:
        """The pool's policy versions, newest first."""
        q = (select(pool_policies).where(pool_policies.c.pool == pool)
             .order_by(pool_policies.c.version.desc()).limit(limit))
        with self._tx(write=False) as conn:
            return [_version(r) for r in conn.execute(q).mappings()]

    def put_pool_policy(self, pool: str, policy: dict[str, Any], *, expected_version: int | None,
                        comment: str = "", now: float) -> PolicyVersion:
        """A new version of ``pool``'s policy. ``expected_version``: the version the change was
        made against (0: the pool had none); None takes whatever is current (a blind write)."""
        with self._tx() as conn:
            if conn.execute(select(pools.c.name).where(pools.c.name == pool).with_for_update()).first() is None:
                raise NotFound(f"no pool {pool!r}: create it first (PUT /v1/pools/{pool})", field="pool")
            latest = self._latest_policy(conn, pool)
            current = latest.version if latest is not None else 0
            if expected_version is not None and expected_version != current:
                raise Conflict(
                    f"the policy of pool {pool!r} is at version {current}, not {expected_version}: someone "
                    "changed it since you read it; read it again and make your change to that version", field="version")
            made = PolicyVersion(pool, current + 1, policy, now, comment)
            conn.execute(pool_policies.insert().values(pool=pool, version=made.version, policy=policy,
                                                       created_at=now, comment=comment))
            self._event(conn, "pool.policy", now, reason=comment or None,
                        data={"pool": pool, "version": made.version, "from_version": current, "policy": policy})
            return made

    def pool_demand(self, pool: str, now: float, window: float = 300.0) -> PoolDemand:
        due = or_(runs.c.not_before.is_(None), runs.c.not_before <= now)
        queued = and_(runs.c.pool == pool, runs.c.state == "queued")
        arrived = select(func.count()).where(runs.c.pool == pool, runs.c.created_at >= now - window).scalar_subquery()
        with self._tx(write=False) as conn:  # one snapshot: the queue, the arrivals and the machines together
            row = conn.execute(select(
                func.count().filter(due),
                func.count().filter(~due),
                func.min(runs.c.queued_at).filter(due),
                arrived,
            ).where(queued)).one()
            counted = self._count_machines(conn, pool)
        oldest = row[2]
        return PoolDemand(pool=pool, at=now, queued=int(row[0]), delayed=int(row[1]),
                          oldest_wait=max(0.0, now - oldest) if oldest is not None else None,
                          arrivals=int(row[3]), window=window, machines=counted)

    def last_event_id(self) -> int:
        """The newest event's id (0 with none): where a reader waiting for what comes next starts."""
        with self._tx(write=False) as conn:
            return int(conn.execute(select(func.max(events.c.id))).scalar_one() or 0)

    def _latest_policy(self, conn: Connection, pool: str) -> PolicyVersion | None:
        row = conn.execute(select(pool_policies).where(pool_policies.c.pool == pool)
                           .order_by(pool_policies.c.version.desc()).limit(1)).mappings().first()
        return _version(row) if row is not None else None


def _version(r: Any) -> PolicyVersion:
    return PolicyVersion(r["pool"], int(r["version"]), dict(r["policy"]), r["created_at"], r["comment"])
