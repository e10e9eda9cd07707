"""What a rolling change may take out of service now: shared by rolling maintenance
(``fleet.controller``) and pack rollouts (``fleet.rollout``).

Both take a pool's machines out a few at a time. The limits are the same: at most
``allowed`` machines of the pool out of service at once — for the change *or anything
else* (offline, quarantined, cordoned by hand), so a change never adds to an outage — and
never so many that the machines left serving are fewer than the work in hand (busy +
queued runs). Idle machines go first (nothing to wait for), busy ones after them (drained:
their run ends first).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ..models import Machine, MachineAdmin, MachineHealth


def live(m: Machine) -> bool:
    """Up, or holding a lease: one of the pool's machines now (not a row left by one destroyed)."""
    return m.connected or m.active_attempt_id is not None


def serving(m: Machine) -> bool:
    """Connected, healthy and active: it takes work (busy machines too)."""
    return m.connected and m.health is MachineHealth.ONLINE and m.admin is MachineAdmin.ACTIVE


def choose(pending: Iterable[str], members: Mapping[str, Machine], away: set[str], *, allowed: int, busy: int,
           queued: int) -> tuple[list[str], str | None]:
    """The pending machines to take out of service now, in order, and why it stopped there
    (None: it took every one it could). ``members``: the pool's live machines; ``away``:
    those already out for the change (failed ones included: they hold their slot)."""
    down = {mid for mid in set(members) | away if mid in away or not serving(members[mid])}
    in_service = len(set(members) - down)
    ready = sorted((mid for mid in pending if mid in members and serving(members[mid])),
                   key=lambda mid: (members[mid].active_attempt_id is not None, mid))
    if not ready:
        return [], "its remaining machines are not in service (offline, quarantined, cordoned or draining)"
    chosen: list[str] = []
    for mid in ready:
        if len(down) >= allowed:
            return chosen, f"{len(down)} machine(s) out of service, max_unavailable {allowed}"
        if in_service - 1 < busy + queued:
            return chosen, (f"the work in hand (busy {busy} + queued {queued}) needs the {in_service} "
                            "machine(s) in service")
        chosen.append(mid)
        down.add(mid)
        in_service -= 1
    return chosen, None
