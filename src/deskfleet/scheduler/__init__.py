"""Matching queued runs to ready machines — pure functions of state, no I/O.

The store calls :meth:`Policy.match` inside its claim transaction with the queued runs
(already in priority → deadline → first-come order) and the machines that could take
work. Which machine a run gets is a small pluggable strategy (:class:`MachineSelector`),
in the spirit of Selenium Grid's slot selector.

Rules, in order:

1. *Eligibility*: same pool, the machine has every required label, its agent offers the
   automation (and version, if pinned), and the run's hard pin (``machine``) if any.
2. *Accounts* (``scheduler.accounts``): a run that needs a vault account — its
   ``session_key`` names one, or its automation logs in to its pack — goes only to a
   machine that can be given one now without exceeding any account's ``max_sessions``:
   one that already holds it, or any machine while the account has a free slot. A
   machine that holds an account of the pack is given that one (no second login).
3. *Affinity*: a run with a ``session_key`` or ``prefer_machine`` takes the machine that
   matches (logged in as that account, or holding its lease). If that machine exists but
   is busy, the run waits for it — up to the pool's ``affinity_wait`` counted from when
   the run was queued — and then takes any eligible machine. An account at its
   ``max_sessions`` leaves no machine but its holders eligible: the run waits for one of
   them however long it takes, and never makes a machine log in a second time.
   A waiting run does not block runs behind it.
4. *Choice among equals* is the selector's: by default the machine idle the longest, so
   wear spreads and a freshly recovered machine is not hammered.

When there are more runs than free machines, and the policy has a
:class:`~deskfleet.scheduler.durations.DurationBook` (the orchestrator's does: it learns
from every attempt that succeeds), runs of one priority go longest first, except those that
must not wait (a deadline, half their queue timeout waited): a backlog then ends with short
runs on every machine instead of a few long ones on some (``scheduler.durations``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from ..models import Machine, MachineShape, Pool, Run
from .accounts import AccountBook, Need, Slot
from .durations import DurationBook, longest_first

__all__ = [
    "AccountBook",
    "DurationBook",
    "LongestIdle",
    "MachineSelector",
    "MostRecentlyUsed",
    "Need",
    "Placement",
    "Policy",
    "Slot",
    "eligible",
    "prefers",
    "serviceable",
    "wants_affinity",
]


class MachineSelector(Protocol):
    def choose(self, run: Run, candidates: Sequence[Machine]) -> Machine: ...


# A selector may say in which order it prefers machines apart from affinity, as a
# ``prefetch`` attribute: "idle_first" (idle_since ascending, never-used first) or
# "recent_first". The store then reads a big fleet's free machines a page at a time in that
# order instead of all of them at every pass. Without it, every free machine is read.


# A selector may also give its order as a ``rank(machine)`` sort key: what ``choose`` picks
# for a run without a preference is then the first free machine in that order, and a pass
# sorts each set of eligible machines once instead of looking at all of them for every run
# (a backlog meeting thousands of free machines).


class LongestIdle:
    """Default: affinity match first, then the machine idle the longest, then by id."""

    prefetch = "idle_first"

    @staticmethod
    def rank(m: Machine) -> tuple[float, str]:
        return m.idle_since if m.idle_since is not None else 0.0, m.id

    def choose(self, run: Run, candidates: Sequence[Machine]) -> Machine:
        return min(candidates, key=lambda m: (not prefers(run, m), *self.rank(m)))


class MostRecentlyUsed:
    """Keep work on warm machines (the one idle the shortest): useful before scaling in."""

    prefetch = "recent_first"

    @staticmethod
    def rank(m: Machine) -> tuple[float, str]:
        return -(m.idle_since or 0.0), m.id

    def choose(self, run: Run, candidates: Sequence[Machine]) -> Machine:
        return min(candidates, key=lambda m: (not prefers(run, m), *self.rank(m)))


def _rank_of(selector: MachineSelector) -> Callable[[Machine], Any] | None:
    """The selector's ``rank``, if the class that says how it chooses says it too (a subclass
    that chooses otherwise and inherits a rank is asked machine by machine)."""
    mro = type(selector).__mro__
    chooser = next((c for c in mro if "choose" in vars(c)), None)
    ranker = next((c for c in mro if "rank" in vars(c)), None)
    return getattr(selector, "rank", None) if chooser is not None and chooser is ranker else None


def eligible(run: Run, machine: Machine) -> bool:
    return (
        machine.pool == run.pool
        and (run.machine is None or machine.id == run.machine)
        and machine.has_labels(run.labels)
        and machine.offers(run.automation, run.version)
    )


def prefers(run: Run, machine: Machine) -> bool:
    """The run has a soft preference and this machine satisfies it."""
    if run.prefer_machine is not None and machine.id == run.prefer_machine:
        return True
    return run.session_key is not None and machine.session_key == run.session_key


def _prefers(run: Run, machine: Machine, accounts: AccountBook | None) -> bool:
    """``prefers``, and for a run naming an account: the machine holds that account's lease."""
    if prefers(run, machine):
        return True
    return accounts is not None and run.session_key is not None and accounts.holds_account(run.session_key, machine.id)


def wants_affinity(run: Run) -> bool:
    return run.prefer_machine is not None or run.session_key is not None


class Placement(NamedTuple):
    run: Run
    machine: Machine
    account: str | None  # the vault account the attempt is given, if the run needs one


@dataclass
class Policy:
    selector: MachineSelector = field(default_factory=LongestIdle)
    #: how long each automation's runs take; with it, a backlog goes longest first (None: as queued)
    durations: DurationBook | None = None

    def match(
        self,
        runs: Sequence[Run],
        free: Sequence[Machine],
        *,
        online: Sequence[Machine],
        pools: dict[str, Pool],
        now: float,
        accounts: AccountBook | None = None,
    ) -> list[tuple[Run, Machine]]:
        """Pairs (run, machine) of :meth:`place`, without the accounts."""
        return [(p.run, p.machine) for p in self.place(runs, free, online=online, pools=pools, now=now,
                                                       accounts=accounts)]

    def place(
        self,
        runs: Sequence[Run],
        free: Sequence[Machine],
        *,
        online: Sequence[Machine],
        pools: dict[str, Pool],
        now: float,
        accounts: AccountBook | None = None,
    ) -> list[Placement]:
        """Placements (run, machine, account); each machine at most once, runs in the order
        given, no account beyond its ``max_sessions``.

        ``free`` are machines that can take work now; ``online`` connected machines (busy
        ones too) — at least those some run prefers — used to tell whether a preferred
        machine is worth waiting for. ``accounts``: the vault as this pass sees it (None when
        no run needs an account).
        """
        if self.durations is not None and len(runs) > len(free):
            runs = longest_first(runs, self.durations, now)
        taken: set[str] = set()
        pairs: list[Placement] = []
        # Runs alike (same pool, pin, automation, labels) have the same eligible machines:
        # worked out once per pass, not once per run.
        eligible_for: dict[tuple[object, ...], list[Machine]] = {}
        rank = _rank_of(self.selector)
        ranked: dict[tuple[object, ...], list[Machine]] = {}  # alike, in the selector's order
        cursor: dict[tuple[object, ...], int] = {}  # ranked[key][:cursor] are all taken
        for run in runs:
            if len(taken) == len(free):
                break
            key = (run.pool, run.machine, run.automation, run.version, tuple(sorted(run.labels.items())))
            alike = eligible_for.get(key)
            if alike is None:
                alike = eligible_for[key] = [m for m in free if eligible(run, m)]
            need = accounts.need(run.id) if accounts is not None else None
            if rank is not None and need is None and not wants_affinity(run):
                # The selector's choice for a run without a preference: its first free
                # machine in the selector's order.
                order = ranked.get(key)
                if order is None:
                    order = ranked[key] = sorted(alike, key=rank)
                i = cursor.get(key, 0)
                while i < len(order) and order[i].id in taken:
                    i += 1
                cursor[key] = i
                if i == len(order):
                    continue
                pairs.append(Placement(run, order[i], None))
                taken.add(order[i].id)
                continue
            candidates = [m for m in alike if m.id not in taken]
            if not candidates:
                continue
            if need is not None:
                assert accounts is not None
                # Only machines that can be given an account now without exceeding any
                # account's max_sessions.
                candidates = [m for m in candidates if accounts.account_for(need, m.id) is not None]
                if not candidates:
                    continue
            if wants_affinity(run) and not any(_prefers(run, m, accounts) for m in candidates):
                pool = pools.get(run.pool)
                wait = pool.affinity_wait if pool is not None else 0.0
                worth_waiting = any(_prefers(run, m, accounts) and eligible(run, m) for m in online)
                if worth_waiting and now - run.queued_at < wait:
                    continue
            # The selector's choice, as for any run (a retry after a crash still goes to the
            # machine idle the longest, not back to the one holding its account).
            chosen = self.selector.choose(run, candidates)
            account: str | None = None
            if need is not None:
                assert accounts is not None
                account = accounts.account_for(need, chosen.id)
                assert account is not None
                accounts.take(account, chosen.id)
            pairs.append(Placement(run, chosen, account))
            taken.add(chosen.id)
        return pairs


def serviceable(run_pool: str, labels: dict[str, str], automation: str, version: str | None,
                machine: str | None, machines: Sequence[Machine] | Sequence[MachineShape]) -> bool:
    """Whether any enrolled machine (or shape of machine) could ever serve such a run
    (checked at submit)."""
    for m in machines:
        if (
            m.pool == run_pool
            and (machine is None or m.id == machine)
            and m.has_labels(labels)
            and m.offers(automation, version)
        ):
            return True
    return False
