"""Published packs and their rollouts to pools (a part of :class:`~deskfleet.store.sql.SQLStore`).

A pack version is published once: its archive (kept in the database, so that every replica
serves it), its sha256, its manifest and what it offers — whose automations join the
catalogue in the same transaction, so that a pool with no machine yet accepts runs of
them. Publishing the same name and version again is a no-op with the same archive and a
Conflict with another: a published version never changes.

A pool is assigned a pack's version by a **rollout**: the leader (``fleet.rollout``) moves the
pool's machines to it a few at a time and writes each machine's step here — ``pending →
draining → installing → done`` (or ``failed``, ``skipped``) — so that a new leader carries on
where the old one stopped. The newest rollout of a pool and pack is the assignment in force;
a new one supersedes a rollout still under way (its machines already out of service carry
on to the new version). ``from_version`` is what the pool ran before: a rollback assigns it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, func, or_, select, update

from ..errors import Conflict, InvalidInput, NotFound
from ..models import AutomationSpec
from ..packfile import label
from ..pools import Maintenance
from .schema import attempts, machines, pack_rollouts, packs, pools

#: the states of a rollout the leader still works on
ACTIVE = ("running", "stalled")
#: a machine's steps; ``failed`` may follow ``draining`` or ``installing``, ``skipped`` a
#: ``pending`` machine that left the pool or whose agent cannot install (protocol < 6)
STEPS = ("pending", "draining", "installing", "done", "failed", "skipped")
#: the steps of a machine out of service for the rollout
AWAY = frozenset({"draining", "installing"})


@dataclass(frozen=True, slots=True)
class PackRecord:
    name: str
    version: str
    sha256: str
    size: int
    manifest: dict[str, Any]
    automations: list[dict[str, Any]]
    created_at: float

    @property
    def offers(self) -> list[str]:
        return sorted(f"{a['name']}@{a.get('version', '1')}" for a in self.automations)


@dataclass(slots=True)
class RolloutStep:
    step: str = "pending"
    since: float = 0.0
    started: float | None = None  # when it left service for the rollout
    detail: str = ""
    after: int = 0  # installing: the newest event before the order (its agent's report comes later)


@dataclass(slots=True)
class Rollout:
    id: int
    pool: str
    pack: str
    version: str
    from_version: str | None
    max_unavailable: str  # a count ("2") or a percentage ("10%")
    state: str
    reason: str
    machines: dict[str, RolloutStep]
    created_at: float
    updated_at: float
    detail: str = ""

    def counts(self) -> dict[str, int]:
        return dict(Counter(s.step for s in self.machines.values()))

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def allowed(self, machines: int) -> int:
        """Machines that may be out of service at once in a pool of ``machines``."""
        return _limit(self.max_unavailable).unavailable_allowed(machines)


def _limit(max_unavailable: str) -> Maintenance:
    value: int | str = int(max_unavailable) if max_unavailable.isdigit() else max_unavailable
    return Maintenance(max_unavailable=value)


class PackOps:
    _event: Any

    if TYPE_CHECKING:
        def _tx(self, write: bool = True) -> AbstractContextManager[Connection]: ...
        def _put_automations(self, conn: Connection, specs: Sequence[AutomationSpec], now: float) -> None: ...

    # -- published packs ---------------------------------------------------------------------------
    def publish_pack(self, name: str, version: str, *, sha256: str, manifest: dict[str, Any],
                     automations: Sequence[AutomationSpec], archive: bytes, now: float) -> tuple[PackRecord, bool]:
        """Store a pack version and register its automations; (the record, whether it is new).
        Conflict if that version is published with another archive."""
        with self._tx() as conn:
            row = conn.execute(select(packs.c.sha256).where(packs.c.name == name, packs.c.version == version)
                               .with_for_update()).first()
            if row is not None:
                if row[0] != sha256:
                    raise Conflict(
                        f"pack {name} {version} is published already, with another archive (sha256 {row[0][:12]}…, "
                        f"this one {sha256[:12]}…): a published version never changes; raise [pack] version in "
                        "pack.toml, build and publish again", field="version")
                found = self._pack(conn, name, version)
                assert found is not None
                return found, False
            specs = [asdict(s) for s in automations]
            conn.execute(packs.insert().values(name=name, version=version, sha256=sha256, size=len(archive),
                                               manifest=manifest, automations=specs, archive=archive,
                                               created_at=now))
            self._put_automations(conn, automations, now)
            self._event(conn, "pack.published", now, data={
                "pack": name, "version": version, "sha256": sha256, "size": len(archive),
                "automations": sorted(s.key for s in automations)})
            made = self._pack(conn, name, version)
            assert made is not None
            return made, True

    def get_pack(self, name: str, version: str) -> PackRecord | None:
        with self._tx(write=False) as conn:
            return self._pack(conn, name, version)

    def list_packs(self, name: str | None = None) -> list[PackRecord]:
        """Published pack versions, newest first."""
        q = select(*_COLUMNS).order_by(packs.c.created_at.desc(), packs.c.name, packs.c.version)
        if name is not None:
            q = q.where(packs.c.name == name)
        with self._tx(write=False) as conn:
            return [_record(r) for r in conn.execute(q).mappings()]

    def pack_archive(self, name: str, version: str) -> tuple[PackRecord, bytes] | None:
        with self._tx(write=False) as conn:
            row = conn.execute(select(*_COLUMNS, packs.c.archive).where(
                packs.c.name == name, packs.c.version == version)).mappings().first()
            return (_record(row), bytes(row["archive"])) if row is not None else None

    def _pack(self, conn: Connection, name: str, version: str) -> PackRecord | None:
        row = conn.execute(select(*_COLUMNS).where(packs.c.name == name, packs.c.version == version)).mappings().first()
        return _record(row) if row is not None else None

    # -- rollouts ----------------------------------------------------------------------------------
    def assign_pack(self, pool: str, pack: str, version: str | None, *, max_unavailable: str | None = None,
                    reason: str = "", rollback: bool = False, now: float) -> Rollout:
        """Assign ``pack``'s ``version`` to ``pool`` (a new rollout, the assignment in force).
        With ``rollback`` (and no version): the version the pool ran before the assignment in
        force. NotFound for an unknown pool or an unpublished version; Conflict for a rollback
        with nothing to go back to. Assigning the version a running rollout already brings
        returns that rollout."""
        with self._tx() as conn:
            if conn.execute(select(pools.c.name).where(pools.c.name == pool).with_for_update()).first() is None:
                raise NotFound(f"no pool {pool!r}", field="pool")
            latest = self._latest_rollout(conn, pool, pack)
            if rollback:
                if latest is None or latest.from_version is None:
                    raise Conflict(f"pool {pool!r} has no earlier version of {pack} to roll back to: assign one "
                                   f"(deskfleet pools pack {pool} --set {pack}@VERSION)", field="pack")
                version = latest.from_version
            assert version is not None
            if self._pack(conn, pack, version) is None:
                published = [r[0] for r in conn.execute(select(packs.c.version).where(packs.c.name == pack)
                                                         .order_by(packs.c.created_at))]
                raise NotFound(f"pack {pack} {version} is not published (published: "
                               f"{', '.join(published) or 'no version'}); publish it first: deskfleet pack publish",
                               field="version")
            limit = max_unavailable if max_unavailable is not None else (latest.max_unavailable if latest else "1")
            try:
                _limit(limit)  # refused here rather than at the leader's first pass
            except ValueError as exc:
                raise InvalidInput(f"max_unavailable {limit!r}: a count (2) or a percentage of the pool ('10%')",
                                   field="max_unavailable") from exc
            if latest is not None and latest.active and latest.version == version:
                return latest
            # What a rollback of this assignment goes back to: like an undo, a rollback's own
            # "before" is what the version it goes back to was assigned over (so that v1 → v2 →
            # v3, rolled back twice, is v1 again), an assignment's is the version in force.
            before: str | None
            if rollback:
                earlier = conn.execute(select(pack_rollouts.c.from_version).where(
                    pack_rollouts.c.pool == pool, pack_rollouts.c.pack == pack, pack_rollouts.c.version == version,
                    pack_rollouts.c.state != "superseded").order_by(pack_rollouts.c.id.desc()).limit(1)).first()
                before = earlier[0] if earlier is not None else None
            elif latest is not None:
                before = latest.version if latest.version != version else latest.from_version
            else:
                running = self._running(conn, pool, pack)
                before = running.most_common(1)[0][0] if running else None
            if before == version:
                before = None
            inherited: dict[str, RolloutStep] = {}
            if latest is not None and latest.active:
                # Superseded: its machines already out of service go on to the new version.
                inherited = {m: RolloutStep("draining", now, st.started, "") for m, st in latest.machines.items()
                             if st.step in AWAY}
                conn.execute(update(pack_rollouts).where(pack_rollouts.c.id == latest.id).values(
                    state="superseded", updated_at=now, detail=f"superseded by {pack} {version}"))
                self._event(conn, "rollout.superseded", now, data={
                    "pool": pool, "pack": pack, "rollout": latest.id, "version": latest.version, "by_version": version})
            rollout_id = int(conn.execute(pack_rollouts.insert().values(
                pool=pool, pack=pack, version=version, from_version=before,
                max_unavailable=limit, state="running", reason=reason,
                machines=_dump(inherited), created_at=now, updated_at=now, detail="",
            ).returning(pack_rollouts.c.id)).scalar_one())
            made = self._rollout(conn, rollout_id)
            assert made is not None
            self._event(conn, "pool.pack_assigned", now, reason=reason or None, data={
                "pool": pool, "pack": pack, "version": version, "from_version": made.from_version,
                "rollout": rollout_id, "rollback": rollback, "max_unavailable": limit})
            return made

    def pack_rollout(self, rollout_id: int) -> Rollout | None:
        with self._tx(write=False) as conn:
            return self._rollout(conn, rollout_id)

    def pack_rollouts(self, pool: str | None = None, pack: str | None = None, *, active: bool = False,
                      limit: int = 20) -> list[Rollout]:
        """Rollouts, newest first."""
        q = select(pack_rollouts).order_by(pack_rollouts.c.id.desc()).limit(limit)
        if pool is not None:
            q = q.where(pack_rollouts.c.pool == pool)
        if pack is not None:
            q = q.where(pack_rollouts.c.pack == pack)
        if active:
            q = q.where(pack_rollouts.c.state.in_(ACTIVE))
        with self._tx(write=False) as conn:
            return [_rollout(r) for r in conn.execute(q).mappings()]

    def pool_packs(self, pool: str) -> dict[str, Rollout]:
        """The pack versions assigned to ``pool``: each pack's newest rollout."""
        newest = (select(func.max(pack_rollouts.c.id)).where(pack_rollouts.c.pool == pool)
                  .group_by(pack_rollouts.c.pack))
        with self._tx(write=False) as conn:
            return {r["pack"]: _rollout(r) for r in conn.execute(
                select(pack_rollouts).where(pack_rollouts.c.id.in_(newest))).mappings()}

    def save_rollout(self, rollout: Rollout, now: float) -> Rollout:
        """The leader's progress: the machines' steps and the rollout's state. A rollout
        superseded meanwhile stays as it is (the new one carries its machines on)."""
        with self._tx() as conn:
            current = conn.execute(select(pack_rollouts.c.state).where(pack_rollouts.c.id == rollout.id)
                                   .with_for_update()).scalar_one_or_none()
            if current is None:
                raise NotFound(f"no rollout {rollout.id}")
            if current in ACTIVE:
                conn.execute(update(pack_rollouts).where(pack_rollouts.c.id == rollout.id).values(
                    state=rollout.state, machines=_dump(rollout.machines), detail=rollout.detail, updated_at=now))
            found = self._rollout(conn, rollout.id)
            assert found is not None
            return found

    def _running(self, conn: Connection, pool: str, pack: str) -> Counter[str]:
        """The versions of ``pack`` the pool's live machines run (their well-known label)."""
        key = label(pack)
        out: Counter[str] = Counter()
        for (labels,) in conn.execute(select(machines.c.labels).where(machines.c.pool == pool, _live())):
            if isinstance(labels, dict) and isinstance(labels.get(key), str):
                out[labels[key]] += 1
        return out

    def _latest_rollout(self, conn: Connection, pool: str, pack: str) -> Rollout | None:
        row = conn.execute(select(pack_rollouts).where(pack_rollouts.c.pool == pool, pack_rollouts.c.pack == pack)
                           .order_by(pack_rollouts.c.id.desc()).limit(1)).mappings().first()
        return _rollout(row) if row is not None else None

    def _rollout(self, conn: Connection, rollout_id: int) -> Rollout | None:
        row = conn.execute(select(pack_rollouts).where(pack_rollouts.c.id == rollout_id)).mappings().first()
        return _rollout(row) if row is not None else None


_COLUMNS = (packs.c.name, packs.c.version, packs.c.sha256, packs.c.size, packs.c.manifest, packs.c.automations,
            packs.c.created_at)


def _live() -> Any:
    holding = select(attempts.c.id).where(attempts.c.machine_id == machines.c.id, attempts.c.state == "active").exists()
    return or_(machines.c.connected.is_(True), holding)


def _record(r: Any) -> PackRecord:
    return PackRecord(name=r["name"], version=r["version"], sha256=r["sha256"], size=int(r["size"]),
                      manifest=dict(r["manifest"]), automations=list(r["automations"]), created_at=r["created_at"])


def _dump(steps: dict[str, RolloutStep]) -> dict[str, Any]:
    return {m: asdict(s) for m, s in steps.items()}


def _rollout(r: Any) -> Rollout:
    return Rollout(id=int(r["id"]), pool=r["pool"], pack=r["pack"], version=r["version"],
                   from_version=r["from_version"], max_unavailable=r["max_unavailable"], state=r["state"],
                   reason=r["reason"], machines={m: RolloutStep(**s) for m, s in dict(r["machines"]).items()},
                   created_at=r["created_at"], updated_at=r["updated_at"], detail=r["detail"])
