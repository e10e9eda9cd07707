"""Human tasks in the store (a part of :class:`~deskfleet.store.sql.SQLStore`).

A human task is asked by a running attempt (``ctx.ask_human``): it is created in a fenced
write — refused with StaleLease once the attempt lost its lease — and lives

    open ⇄ claimed (released: open again) → completed | expired | cancelled

Each transition is an event on the run's timeline (``human_task.*``, with who and when) and,
for ``created``, ``escalated``, ``expired`` and ``completed``, a webhook in the outbox
(``human_notices``), written in the same transaction. The leader's sweep
(:meth:`HumanOps.sweep_human_tasks`) escalates, expires — and asks the attempt to stop with
``human_timeout`` — and cancels the tasks whose attempt ended otherwise.

A task's due time never outlasts its attempt: it is clamped to a little before the
attempt's own timeout and the run's deadline. While a task waits, the progress watchdog
waits with it: the attempt's ``last_progress_at`` is set to the due time, and once answered
to when the agent says it has the answer (at most :data:`ANSWER_GRACE` later).

Lock order (see ``store.sql``): run, attempt, then the task.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, select, update

from .. import ids
from ..crypto import is_encrypted
from ..errors import Conflict, InvalidInput, InvalidRequest, NotFound, StaleLease
from ..models import Attempt, AttemptState, HumanTask, HumanTaskState, Run, StopOrder, StopReason
from .schema import attempts, human_notices, human_tasks, runs

#: a task's due time ends at least this long before its attempt's timeout (and the run's
#: deadline), so that a task nobody answers expires — and says so — before the attempt is
#: stopped for its own timeout
DUE_MARGIN = 1.0
#: seconds an answer may take to reach its agent (a lost push waits for the agent's next
#: ``human_check``) before the progress watchdog counts again
ANSWER_GRACE = 10.0
NOTICE_MAX_TRIES = 12
#: transitions that post a webhook (to the URLs the server was given for them)
NOTIFIED = ("human_task.created", "human_task.escalated", "human_task.expired", "human_task.completed")

#: what a person may be asked to do: a name (letters, digits, ``_``, ``.``, ``-``), and a prompt
KIND_MAX = 64
PROMPT_MAX = 2000
BY_MAX = 200

Notify = Mapping[str, Sequence[str]]  # event kind → the URLs to post it to


@dataclass(slots=True)
class HumanSweep:
    """What one pass of the leader's sweep did."""

    escalated: list[HumanTask] = field(default_factory=list)
    expired: list[HumanTask] = field(default_factory=list)
    cancelled: list[HumanTask] = field(default_factory=list)
    stop_orders: list[StopOrder] = field(default_factory=list)  # attempts to stop: human_timeout


def check_kind(kind: str) -> str:
    if not kind or len(kind) > KIND_MAX or not all(c.isalnum() or c in "_.-" for c in kind):
        raise InvalidRequest(f"a human task's kind is a name of 1 to {KIND_MAX} letters, digits, '_', '.' or '-' "
                             f"(such as push_approval or sms_code), not {kind[:80]!r}", field="kind")
    return kind


class HumanOps:
    """Human-task operations; mixed into SQLStore, whose plumbing they use."""

    _pg: bool

    if TYPE_CHECKING:
        def _tx(self, write: bool = True) -> AbstractContextManager[Connection]: ...

        def _event(self, conn: Connection, kind: str, now: float, *, run_id: str | None = None,
                   attempt_id: int | None = None, machine_id: str | None = None,
                   from_state: str | None = None, to_state: str | None = None, reason: str | None = None,
                   data: dict[str, Any] | None = None) -> None: ...

        def _fenced(self, op: str, attempt_id: int, machine_id: str, now: float,
                    fn: Callable[[Connection, Attempt, Run | None], Any], *,
                    repeat: Callable[[Connection, Any], Any] | None = None, needs_run: bool = True) -> Any: ...

        def _get_run(self, conn: Connection, run_id: str, *, lock: bool = False) -> Run: ...

        def _request_stop(self, conn: Connection, attempt_id: int, reason: StopReason,
                          now: float) -> StopOrder | None: ...

    # -- from the agent (fenced) ---------------------------------------------------------------
    def create_human_task(self, attempt_id: int, machine_id: str, *, kind: str, prompt: str, due: float,
                          escalate_after: float | None = None, secret: bool = False,
                          screenshot_id: str | None = None, now: float, notify: Notify | None = None) -> HumanTask:
        """A task for a person, asked by the attempt holding its lease (StaleLease
        otherwise; Stopped-like refusals are the caller's: a stop already ordered still
        lets the automation ask). ``due`` and ``escalate_after`` are seconds from ``now``."""
        check_kind(kind)
        if not prompt or len(prompt) > PROMPT_MAX:
            raise InvalidRequest(f"a human task's prompt says what to do, in 1 to {PROMPT_MAX} characters",
                                 field="prompt")
        if not due > 0:
            raise InvalidRequest("a human task's due time is seconds from now, more than 0", field="due")
        if escalate_after is not None and not escalate_after > 0:
            raise InvalidRequest("escalate_after is seconds from now, more than 0 (or none)", field="escalate_after")

        def fn(conn: Connection, a: Attempt, run: Run | None) -> HumanTask:
            assert run is not None
            # Never beyond the attempt's own timeout or the run's deadline: clamped before them.
            ends = a.assigned_at + run.attempt_timeout
            if run.deadline_at is not None:
                ends = min(ends, run.deadline_at)
            requested = now + due
            due_at = max(now, min(requested, ends - DUE_MARGIN))
            escalate_at = now + escalate_after if escalate_after is not None else None
            if escalate_at is not None and escalate_at >= due_at:
                escalate_at = None  # it would expire first: nothing to escalate
            task_id = ids.new_id("hum")
            conn.execute(human_tasks.insert().values(
                id=task_id, run_id=a.run_id, attempt_id=a.id, machine_id=a.machine_id, pool=run.pool, kind=kind,
                prompt=prompt, state="open", secret=secret, screenshot_id=screenshot_id, created_at=now,
                due_at=due_at, requested_due_at=requested, escalate_at=escalate_at, answered=False,
            ))
            # The progress watchdog waits for the person: it counts from the due time.
            conn.execute(update(attempts).where(attempts.c.id == a.id).values(last_progress_at=due_at))
            task = self._read_task(conn, task_id)
            self._task_event(conn, task, "human_task.created", now, data={
                "kind": kind, "due_at": due_at, "clamped": due_at < requested, "escalate_at": escalate_at,
                "secret": secret, "screenshot": screenshot_id}, notify=notify)
            return task

        task: HumanTask = self._fenced("human", attempt_id, machine_id, now, fn)
        return task

    def check_human_task(self, task_id: str, attempt_id: int, machine_id: str, *, received: bool = False,
                         now: float) -> HumanTask:
        """The task as its attempt's agent may see it (its secret answer still encrypted):
        NotFound unless it is that attempt's on that machine, StaleLease once the attempt
        no longer holds its lease. ``received``: the agent has the answer — a secret one is
        wiped now."""
        with self._tx(write=received) as conn:
            task = self._task_or_404(conn, task_id)
            if task.attempt_id != attempt_id or task.machine_id != machine_id:
                raise NotFound(f"no human task {task_id!r} for attempt {attempt_id}")
            state = conn.execute(select(attempts.c.state).where(attempts.c.id == attempt_id)).scalar()
            if state != AttemptState.ACTIVE.value:
                raise StaleLease(attempt_id, f"attempt already ended: {state}")
            if received:
                if task.secret_response is not None:
                    conn.execute(update(human_tasks).where(human_tasks.c.id == task_id).values(secret_response=None))
                conn.execute(update(attempts).where(attempts.c.id == attempt_id).values(last_progress_at=now))
            return task

    # -- from people (the API) -------------------------------------------------------------------
    def get_human_task(self, task_id: str) -> HumanTask | None:
        with self._tx(write=False) as conn:
            row = conn.execute(select(human_tasks).where(human_tasks.c.id == task_id)).mappings().first()
            return _task(row) if row is not None else None

    def list_human_tasks(self, *, states: Collection[HumanTaskState] = (), pool: str | None = None,
                         run_id: str | None = None, limit: int = 100, tenant: str | None = None) -> list[HumanTask]:
        """Newest first (with ``tenant``, of that tenant's runs)."""
        q = select(human_tasks).order_by(human_tasks.c.created_at.desc(), human_tasks.c.id.desc()).limit(limit)
        if states:
            q = q.where(human_tasks.c.state.in_([s.value for s in states]))
        if pool is not None:
            q = q.where(human_tasks.c.pool == pool)
        if run_id is not None:
            q = q.where(human_tasks.c.run_id == run_id)
        if tenant is not None:
            q = q.where(human_tasks.c.run_id.in_(select(runs.c.id).where(runs.c.tenant == tenant)))
        with self._tx(write=False) as conn:
            return [_task(r) for r in conn.execute(q).mappings()]

    def claim_human_task(self, task_id: str, by: str, now: float) -> HumanTask:
        """``by`` takes the task; Conflict if somebody else holds it or it is over. Claiming
        it again is harmless."""
        with self._tx() as conn:
            task = self._lock_task(conn, task_id)
            self._must_wait(task)
            if task.state is HumanTaskState.CLAIMED:
                if task.claimed_by != by:
                    raise _held(task)
                return task
            conn.execute(update(human_tasks).where(human_tasks.c.id == task_id).values(
                state="claimed", claimed_by=by, claimed_at=now))
            task = self._read_task(conn, task_id)
            self._task_event(conn, task, "human_task.claimed", now, by=by, from_state="open")
            return task

    def release_human_task(self, task_id: str, by: str, now: float) -> HumanTask:
        """``by`` gives the task back (open again); Conflict if it is not theirs."""
        with self._tx() as conn:
            task = self._lock_task(conn, task_id)
            self._must_wait(task)
            if task.state is HumanTaskState.OPEN:
                raise Conflict(f"human task {task_id} is not claimed: nothing to release")
            if task.claimed_by != by:
                raise _held(task, "release it")
            conn.execute(update(human_tasks).where(human_tasks.c.id == task_id).values(
                state="open", claimed_by=None, claimed_at=None))
            task = self._read_task(conn, task_id)
            self._task_event(conn, task, "human_task.released", now, by=by, from_state="claimed")
            return task

    def complete_human_task(self, task_id: str, by: str, *, response: str | None = None,
                            secret_response: str | None = None, now: float,
                            notify: Notify | None = None) -> HumanTask:
        """``by`` answers the task (a secret task's answer already encrypted, in
        ``secret_response``). Conflict if somebody else claimed it or it is over. If its
        attempt ended meanwhile (the sweep has not seen it yet), the task is cancelled
        instead and returned so: the caller says why."""
        with self._tx() as conn:
            found = self._task_or_404(conn, task_id)
            # Lock order: the run, the attempt, then the task.
            self._get_run(conn, found.run_id, lock=True)
            attempt_state = conn.execute(select(attempts.c.state, attempts.c.reason, attempts.c.ending)
                                         .where(attempts.c.id == found.attempt_id).with_for_update()).first()
            task = self._lock_task(conn, task_id)
            self._must_wait(task)
            if task.state is HumanTaskState.CLAIMED and task.claimed_by != by:
                raise _held(task, "complete it")
            if task.secret and secret_response is None:
                raise InvalidInput(f"human task {task_id} asks for a secret answer ({task.kind}): give it as "
                                     "response", field="response")
            if attempt_state is None or attempt_state[0] != AttemptState.ACTIVE.value:
                ended = f"{attempt_state[0]}: {attempt_state[1] or attempt_state[2]}" if attempt_state else "gone"
                return self._cancel(conn, task, now, f"its attempt ended ({ended})")
            conn.execute(update(human_tasks).where(human_tasks.c.id == task_id).values(
                state="completed", completed_by=by, ended_at=now, answered=True,
                response=None if task.secret else response, secret_response=secret_response if task.secret else None,
                claimed_by=task.claimed_by or by, claimed_at=task.claimed_at or now))
            # An answer is progress: the watchdog counts again once the agent has it (its
            # ``received``), or ANSWER_GRACE from now if that is not heard.
            conn.execute(update(attempts).where(attempts.c.id == task.attempt_id).values(
                last_progress_at=now + ANSWER_GRACE))
            done = self._read_task(conn, task_id)
            # Never the answer itself on the timeline: whether there was one, and who gave it.
            self._task_event(conn, done, "human_task.completed", now, by=by, from_state=task.state.value,
                             data={"answered": response is not None or secret_response is not None},
                             notify=notify)
            return done

    # -- the leader's sweep -------------------------------------------------------------------------
    def sweep_human_tasks(self, now: float, notify: Notify | None = None) -> HumanSweep:
        """Escalate tasks past their ``escalate_at`` (once); expire those past their due time
        and ask their attempts to stop (``human_timeout``); cancel those whose attempt ended
        otherwise; wipe secret answers whose attempt is over."""
        out = HumanSweep()
        with self._tx() as conn:
            waiting = [_task(r) for r in conn.execute(
                select(human_tasks).where(human_tasks.c.state.in_(("open", "claimed")))
                .order_by(human_tasks.c.due_at)).mappings()]
            active: dict[int, Any] = {}
            if waiting:
                active = {r[0]: r[1:] for r in conn.execute(
                    select(attempts.c.id, attempts.c.state, attempts.c.reason, attempts.c.ending)
                    .where(attempts.c.id.in_(sorted({t.attempt_id for t in waiting}))))}
            for seen in waiting:
                attempt = active.get(seen.attempt_id)
                ended = attempt is None or attempt[0] != AttemptState.ACTIVE.value
                if not ended and seen.due_at > now and (seen.escalate_at is None or seen.escalated_at is not None
                                                        or seen.escalate_at > now):
                    continue
                # Lock order: the run, the attempt, then the task; and look again once locked.
                self._get_run(conn, seen.run_id, lock=True)
                conn.execute(select(attempts.c.id).where(attempts.c.id == seen.attempt_id).with_for_update())
                task = self._lock_task(conn, seen.id)
                if not task.state.waiting:
                    continue
                if ended:
                    why = f"{attempt[0]}: {attempt[1] or attempt[2]}" if attempt is not None else "gone"
                    out.cancelled.append(self._cancel(conn, task, now, f"its attempt ended ({why})"))
                elif task.due_at <= now:
                    out.expired.append(self._expire(conn, task, now, notify))
                    order = self._request_stop(conn, task.attempt_id, StopReason.HUMAN_TIMEOUT, now)
                    if order is not None:
                        out.stop_orders.append(order)
                elif task.escalate_at is not None and task.escalated_at is None and task.escalate_at <= now:
                    conn.execute(update(human_tasks).where(human_tasks.c.id == task.id).values(escalated_at=now))
                    task = self._read_task(conn, task.id)
                    self._task_event(conn, task, "human_task.escalated", now,
                                     data={"claimed_by": task.claimed_by, "due_at": task.due_at}, notify=notify)
                    out.escalated.append(task)
            held = select(human_tasks.c.id).select_from(
                human_tasks.join(attempts, attempts.c.id == human_tasks.c.attempt_id)).where(
                human_tasks.c.secret_response.is_not(None), attempts.c.state != AttemptState.ACTIVE.value)
            over = [r[0] for r in conn.execute(held)]
            if over:
                conn.execute(update(human_tasks).where(human_tasks.c.id.in_(over)).values(secret_response=None))
        return out

    # -- webhooks (an outbox, delivered by the leader: services.webhooks) --------------------------------
    def due_human_notices(self, now: float, limit: int = 50) -> list[tuple[int, str, str, str]]:
        """(notice id, task id, event, url) due for delivery."""
        with self._tx(write=False) as conn:
            q = select(human_notices.c.id, human_notices.c.task_id, human_notices.c.event, human_notices.c.url).where(
                human_notices.c.delivered_at.is_(None), human_notices.c.gave_up_at.is_(None),
                human_notices.c.next_at <= now,
            ).order_by(human_notices.c.next_at).limit(limit)
            return [(r[0], r[1], r[2], r[3]) for r in conn.execute(q)]

    def human_notice_done(self, notice_id: int, *, ok: bool, error: str | None, now: float) -> None:
        with self._tx() as conn:
            row = conn.execute(select(human_notices).where(human_notices.c.id == notice_id)).mappings().one()
            tries = row["tries"] + 1
            run_id = conn.execute(select(human_tasks.c.run_id).where(human_tasks.c.id == row["task_id"])).scalar()
            values: dict[str, Any] = {"tries": tries, "last_error": error}
            if ok:
                values["delivered_at"] = now
                self._event(conn, "webhook.delivered", now, run_id=run_id,
                            data={"tries": tries, "task": row["task_id"], "event": row["event"]})
            elif tries >= NOTICE_MAX_TRIES:
                values["gave_up_at"] = now
                self._event(conn, "webhook.gave_up", now, run_id=run_id, reason=error,
                            data={"tries": tries, "task": row["task_id"], "event": row["event"]})
            else:
                values["next_at"] = now + min(2.0 ** tries, 600.0)
            conn.execute(update(human_notices).where(human_notices.c.id == notice_id).values(**values))

    def rewrap_human_tasks(self, rewrap: Callable[[str], str | None]) -> int:
        """Re-encrypt the secret answers still held; how many changed."""
        changed = 0
        with self._tx() as conn:
            q = select(human_tasks.c.id, human_tasks.c.secret_response).where(
                human_tasks.c.secret_response.is_not(None))
            for task_id, value in list(conn.execute(q.with_for_update() if self._pg else q)):
                if is_encrypted(value) and (new := rewrap(value)) is not None:
                    conn.execute(update(human_tasks).where(human_tasks.c.id == task_id).values(secret_response=new))
                    changed += 1
        return changed

    # -- plumbing ------------------------------------------------------------------------------------
    def _read_task(self, conn: Connection, task_id: str) -> HumanTask:
        return _task(conn.execute(select(human_tasks).where(human_tasks.c.id == task_id)).mappings().one())

    def _task_or_404(self, conn: Connection, task_id: str) -> HumanTask:
        row = conn.execute(select(human_tasks).where(human_tasks.c.id == task_id)).mappings().first()
        if row is None:
            raise NotFound(f"no human task {task_id!r}")
        return _task(row)

    def _lock_task(self, conn: Connection, task_id: str) -> HumanTask:
        q = select(human_tasks).where(human_tasks.c.id == task_id)
        row = conn.execute(q.with_for_update() if self._pg else q).mappings().first()
        if row is None:
            raise NotFound(f"no human task {task_id!r}")
        return _task(row)

    @staticmethod
    def _must_wait(task: HumanTask) -> None:
        if task.state is HumanTaskState.COMPLETED:
            raise Conflict(f"human task {task.id} was already completed by {task.completed_by}")
        if not task.state.waiting:
            raise Conflict(f"human task {task.id} is no longer open: {task.state.value}"
                           + (f" ({task.reason})" if task.reason else ""))

    def _cancel(self, conn: Connection, task: HumanTask, now: float, reason: str) -> HumanTask:
        conn.execute(update(human_tasks).where(human_tasks.c.id == task.id).values(
            state="cancelled", ended_at=now, reason=reason, secret_response=None))
        done = self._read_task(conn, task.id)
        self._task_event(conn, done, "human_task.cancelled", now, from_state=task.state.value, reason=reason)
        return done

    def _expire(self, conn: Connection, task: HumanTask, now: float, notify: Notify | None) -> HumanTask:
        reason = f"nobody answered by its due time ({task.due_at - task.created_at:.0f}s after it was asked)"
        conn.execute(update(human_tasks).where(human_tasks.c.id == task.id).values(
            state="expired", ended_at=now, reason=reason))
        done = self._read_task(conn, task.id)
        self._task_event(conn, done, "human_task.expired", now, from_state=task.state.value, reason=reason,
                         data={"claimed_by": task.claimed_by}, notify=notify)
        return done

    def _task_event(self, conn: Connection, task: HumanTask, kind: str, now: float, *, by: str | None = None,
                    from_state: str | None = None, reason: str | None = None, data: dict[str, Any] | None = None,
                    notify: Notify | None = None) -> None:
        self._event(conn, kind, now, run_id=task.run_id, attempt_id=task.attempt_id, machine_id=task.machine_id,
                    from_state=from_state, to_state=task.state.value, reason=reason,
                    data={"task": task.id, **({"by": by} if by is not None else {}), **(data or {})})
        for url in (notify or {}).get(kind, ()):
            conn.execute(human_notices.insert().values(task_id=task.id, event=kind, url=url, next_at=now,
                                                       created_at=now))


def _held(task: HumanTask, to: str = "claim it") -> Conflict:
    return Conflict(f"human task {task.id} is claimed by {task.claimed_by}; only they can {to} "
                    "(or release it first)")


def _task(r: Mapping[Any, Any]) -> HumanTask:
    return HumanTask(
        id=r["id"], run_id=r["run_id"], attempt_id=r["attempt_id"], machine_id=r["machine_id"], pool=r["pool"],
        kind=r["kind"], prompt=r["prompt"], state=HumanTaskState(r["state"]), secret=bool(r["secret"]),
        created_at=r["created_at"], due_at=r["due_at"], requested_due_at=r["requested_due_at"],
        escalate_at=r["escalate_at"], escalated_at=r["escalated_at"], screenshot_id=r["screenshot_id"],
        claimed_by=r["claimed_by"], claimed_at=r["claimed_at"], completed_by=r["completed_by"],
        ended_at=r["ended_at"], reason=r["reason"], response=r["response"], secret_response=r["secret_response"],
        answered=bool(r["answered"]),
    )


__all__ = ["DUE_MARGIN", "NOTIFIED", "HumanOps", "HumanSweep", "Notify", "check_kind"]
