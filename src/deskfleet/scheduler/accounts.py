"""Account leases as a scheduling pass sees them — pure data, no I/O.

An account may be logged in on at most ``max_sessions`` machines at once (many enterprise
applications end the older session when the same user logs in elsewhere). A machine
*holds* a lease on every account it is logged in as, or was handed for a login still in
progress. For a run that needs an account, a machine is eligible only if it could be given
one now:

- the run names an account (its ``session_key``): the machine holds it, or the account
  has a free slot;
- otherwise (the automation logs in to its pack): the account of that pack the machine
  already holds, else a free one of the pack — the one with the fewest sessions (then the
  one added to the vault first: an operator's first account is the usual one).

The store enforces the limit again when it claims (the account row locked, its leases
counted); this book only keeps a pass from proposing what the store would refuse, and
records what the pass itself has handed out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Need:
    """What a run needs from the vault: a named account, or any account of a pack."""

    account: str | None = None  # the run's session_key, when it names a vault account
    pack: str | None = None  # otherwise: an account whose app is this pack


@dataclass(slots=True)
class Slot:
    """One account: how many machines may hold it, and which do."""

    name: str
    app: str | None
    max_sessions: int
    holders: set[str] = field(default_factory=set)
    rank: float = 0.0  # among equals, the lower first (when the account was added)

    @property
    def free(self) -> bool:
        return len(self.holders) < self.max_sessions


class AccountBook:
    """The accounts relevant to one scheduling pass, and which run needs what."""

    def __init__(self, slots: Iterable[Slot], needs: Mapping[str, Need]) -> None:
        self.slots = {s.name: s for s in slots}
        self.needs = needs
        self._by_app: dict[str | None, list[Slot]] = {}
        for s in sorted(self.slots.values(), key=lambda s: s.name):
            self._by_app.setdefault(s.app, []).append(s)

    def need(self, run_id: str) -> Need | None:
        return self.needs.get(run_id)

    def account_for(self, need: Need, machine_id: str) -> str | None:
        """The account this machine would be given for ``need`` now; None if none can be."""
        if need.account is not None:
            slot = self.slots.get(need.account)
            if slot is None:
                return None
            return slot.name if machine_id in slot.holders or slot.free else None
        of_pack = self._by_app.get(need.pack, ())
        for s in of_pack:
            if machine_id in s.holders:
                return s.name  # already logged in (or logging in) as it: no second login
        free = [s for s in of_pack if s.free]
        if not free:
            return None
        return min(free, key=lambda s: (len(s.holders), s.rank, s.name)).name

    def holders(self, account: str) -> set[str]:
        slot = self.slots.get(account)
        return set(slot.holders) if slot is not None else set()

    def holds_account(self, account: str, machine_id: str) -> bool:
        slot = self.slots.get(account)
        return slot is not None and machine_id in slot.holders

    def take(self, account: str, machine_id: str) -> None:
        """The pass handed ``account`` to ``machine_id``: it counts from now on."""
        self.slots[account].holders.add(machine_id)
