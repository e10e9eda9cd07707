"""Demo automations for SimEHR, written with the SDK as a user would write them.

They show the three policies a run can have when an attempt dies midway:

- ``ehr.create_patient`` is not idempotent but has a *reconcile* check — search by MRN —
  so the orchestrator can tell "already saved" from "never saved" before retrying;
- ``ehr.lookup_patient`` only reads, so it is declared idempotent and simply retried;
- ``ehr.export_summary`` is neither: a lost attempt must fail loudly, because nobody can
  tell whether the summary left the building.

``sim.approval`` shows a person in the loop: it asks for a push approval (or an SMS code)
with ``ctx.ask_human`` and does its work once somebody answered.

Each waits for screen states instead of sleeping, reports a step before each stage, and
raises :class:`~deskfleet.errors.DesktopError` the moment the app shows something it did
not expect (an error dialog, the bare desktop); all of them finish at "home".
"""

from __future__ import annotations

import asyncio
import datetime
import re

from pydantic import BaseModel, Field

from deskfleet import (
    Automation,
    BusinessError,
    Context,
    Desktop,
    DesktopError,
    Registry,
    automation,
)

from .layout import Layout, layout_for

STEP_TIMEOUT = 10.0  # seconds for SimEHR to show the next screen
#: screens that end any step at once: waiting longer would not make them go away
TROUBLE = ("error_dialog", "session_expired", "validation", "desktop", "rebooting", "login")

_PLAIN_TEXT = r"^[^\t\n\r]+$"  # tabs and newlines would move focus or submit the form


class PatientInput(BaseModel):
    mrn: str = Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9-]+$")
    name: str = Field(min_length=1, max_length=60, pattern=_PLAIN_TEXT)
    dob: datetime.date


class PatientCreated(BaseModel):
    record_id: int
    mrn: str


class MrnInput(BaseModel):
    mrn: str = Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9-]+$")


class PatientRecord(BaseModel):
    record_id: int
    name: str
    dob: str


class LookupResult(BaseModel):
    mrn: str
    count: int
    records: list[PatientRecord]  # the first few, as the search screen lists them


class ExportResult(BaseModel):
    mrn: str
    export_id: int
    records: int


# -- steps shared by the automations ----------------------------------------------------


async def _layout(ctx: Context) -> Layout:
    if ctx.model is not None and isinstance(ctx.model.meta.get("layout"), Layout):
        return ctx.model.meta["layout"]  # type: ignore[no-any-return]
    info = await ctx.desktop.info()
    return layout_for(info.width, info.height)


async def _expect(ctx: Context, *wanted: str) -> str:
    """Wait for one of ``wanted``; fail at once if the app shows trouble instead."""
    trouble = [s for s in TROUBLE if s not in wanted]
    seen = await ctx.wait_for(*wanted, *trouble, timeout=STEP_TIMEOUT)
    if seen not in wanted:
        raise DesktopError(f"SimEHR shows {seen!r} where {' or '.join(wanted)!r} was expected")
    return seen


async def _fill(desktop: Desktop, layout: Layout, screen: str, field: str, text: str) -> None:
    widget = layout.widget(screen, field)
    await desktop.click(*widget.center)
    await desktop.press("ctrl", "a")
    await desktop.type_text(text)
    shown = await desktop.read_text(widget.rect)
    if shown != text:
        raise DesktopError(f"the {field} field shows {shown!r} after typing {text!r}")


_HEADER = re.compile(r"^(\d+) records? for MRN (\S+)$")
_ROW = re.compile(r"^#(\d+)  (.*)  (\S+)$")


async def _search(ctx: Context, mrn: str) -> tuple[int, list[PatientRecord]]:
    """Search by MRN from "home"; returns (how many, the records listed) on the search screen."""
    layout = await _layout(ctx)
    desktop = ctx.desktop
    await ctx.progress("open search")
    await _expect(ctx, "home")
    await desktop.click(*layout.widget("home", "search").center)
    await _expect(ctx, "search")
    await ctx.progress("search by MRN")
    await _fill(desktop, layout, "search", "mrn", mrn)
    await desktop.click(*layout.widget("search", "search").center)
    await _expect(ctx, "search")
    lines = (await desktop.read_text(layout.widget("search", "results").rect)).split("\n")
    if lines[0] == f"No patient with MRN {mrn}":
        return 0, []
    header = _HEADER.match(lines[0])
    if header is None or header.group(2) != mrn:
        raise DesktopError(f"unexpected search result for MRN {mrn}: {lines[0]!r}")
    records = []
    for line in lines[1:]:
        row = _ROW.match(line)
        if row:
            records.append(PatientRecord(record_id=int(row[1]), name=row[2], dob=row[3]))
    return int(header.group(1)), records


async def _back_home(ctx: Context) -> None:
    layout = await _layout(ctx)
    await ctx.desktop.click(*layout.widget("search", "back").center)
    await _expect(ctx, "home")


async def _dialog_number(ctx: Context, pattern: str) -> int:
    layout = await _layout(ctx)
    message = await ctx.desktop.read_text(layout.dialog_message)
    match = re.search(pattern, message)
    if match is None:
        raise DesktopError(f"cannot read the number in the dialog {message!r}")
    return int(match.group(1))


# -- the automations --------------------------------------------------------------------


@automation(name="ehr.create_patient", version="1")
async def create_patient(ctx: Context, data: PatientInput) -> PatientCreated:
    """Register a new patient. Not idempotent: saving twice makes two records."""
    layout = await _layout(ctx)
    desktop = ctx.desktop
    await ctx.progress("open the new-patient form", percent=10)
    await _expect(ctx, "home")
    await desktop.click(*layout.widget("home", "new_patient").center)
    await _expect(ctx, "patient_form")
    await ctx.progress("fill in the form", percent=30)
    for field, value in (("mrn", data.mrn), ("name", data.name), ("dob", data.dob.isoformat())):
        await _fill(desktop, layout, "patient_form", field, value)
    await ctx.progress("save", percent=60)
    await desktop.click(*layout.widget("patient_form", "save").center)
    await _expect(ctx, "saved")
    record_id = await _dialog_number(ctx, r"record #(\d+)")
    await ctx.progress("confirm", percent=90)
    await desktop.click(*layout.dialog_ok.center)
    await _expect(ctx, "home")
    return PatientCreated(record_id=record_id, mrn=data.mrn)


@create_patient.reconcile
async def find_created_patient(ctx: Context, data: PatientInput) -> PatientCreated | None:
    """Did a lost attempt already save this patient? One record: yes; none: no."""
    count, records = await _search(ctx, data.mrn)
    await _back_home(ctx)
    if count == 0:
        return None
    if count > 1:
        ids = ", ".join(f"#{r.record_id}" for r in records)
        raise BusinessError(
            f"MRN {data.mrn} has {count} records ({ids}…): a person must merge the duplicates"
        )
    return PatientCreated(record_id=records[0].record_id, mrn=data.mrn)


@automation(name="ehr.lookup_patient", version="1", idempotent=True)
async def lookup_patient(ctx: Context, data: MrnInput) -> LookupResult:
    """Find the records with an MRN. Read-only, so safe to retry anywhere."""
    count, records = await _search(ctx, data.mrn)
    await ctx.progress("return home")
    await _back_home(ctx)
    return LookupResult(mrn=data.mrn, count=count, records=records)


@automation(name="ehr.export_summary", version="1")
async def export_summary(ctx: Context, data: MrnInput) -> ExportResult:
    """Send a patient's summary out. No reconcile: a lost attempt cannot be checked."""
    layout = await _layout(ctx)
    count, _ = await _search(ctx, data.mrn)
    if count == 0:
        await _back_home(ctx)
        raise BusinessError(f"no patient with MRN {data.mrn}")
    await ctx.progress("export", percent=60)
    await ctx.desktop.click(*layout.widget("search", "export").center)
    await _expect(ctx, "exported")
    export_id = await _dialog_number(ctx, r"export #(\d+)")
    await ctx.progress("confirm", percent=90)
    await ctx.desktop.click(*layout.dialog_ok.center)
    await _expect(ctx, "search")
    await _back_home(ctx)
    return ExportResult(mrn=data.mrn, export_id=export_id, records=count)


class Echo(BaseModel):
    value: str = ""


@automation(name="sim.noop", version="1", idempotent=True, required_state="any")
async def noop(ctx: Context, data: Echo) -> Echo:
    """Does nothing on the desktop: what a run costs the orchestrator alone (benchmarks)."""
    await ctx.progress("noop")
    return Echo(value=data.value)


class WorkInput(BaseModel):
    key: str = Field(min_length=1, max_length=64)
    seconds: float = Field(default=0.0, ge=0.0, le=3600.0)


class WorkDone(BaseModel):
    key: str
    machine: str


async def _work(ctx: Context, data: WorkInput) -> WorkDone:
    """A unit of work of a given duration whose side effect lands halfway through it (in the
    simulated backend, countable by key) — for benchmarks of utilisation, failover and
    double effects: a machine killed in the second half has done the work but not said so.
    The effect is written straight to the backend, as an automation calling an API would,
    so it goes through ``ctx.fenced()``: a machine paused past its lease does not make it."""
    backend = getattr(ctx.desktop, "backend", None)
    if backend is None:
        raise BusinessError("sim.work needs a simulated desktop")
    await ctx.progress("work", percent=0)
    await asyncio.sleep(data.seconds / 2)
    async with ctx.fenced():
        backend.record_work(data.key, machine=ctx.machine_id)
    await ctx.progress("effect recorded", percent=50)
    await asyncio.sleep(data.seconds / 2)
    return WorkDone(key=data.key, machine=ctx.machine_id)


async def _work_was_done(ctx: Context, data: WorkInput) -> WorkDone | None:
    """Did a lost attempt already do it? The backend knows."""
    backend = getattr(ctx.desktop, "backend", None)
    if backend is None or backend.work_count(data.key) == 0:
        return None
    return WorkDone(key=data.key, machine=ctx.machine_id)


def _work_automation(name: str, what: str) -> Automation[WorkInput, WorkDone]:
    """``sim.work``'s body under another name: benchmarks mix automations whose runs take
    typically different times (a lookup, a form, a month-end report), as users' do."""

    async def body(ctx: Context, data: WorkInput) -> WorkDone:
        return await _work(ctx, data)

    body.__doc__ = f"{what}: {_work.__doc__}"
    made = automation(name=name, version="1", required_state="any")(body)
    made.reconcile(_work_was_done)
    return made


work = _work_automation("sim.work", "A unit of work")
#: a mix for utilisation benchmarks: the same work, each kind typically short, long
work_short = _work_automation("sim.work_short", "Typically short work")
work_long = _work_automation("sim.work_long", "Typically long work")


class ApprovalInput(BaseModel):
    key: str = Field(min_length=1, max_length=64)
    kind: str = "push_approval"
    prompt: str = Field(default="Approve the sign-in request on the phone", min_length=1, max_length=2000)
    due: float = Field(default=300.0, gt=0.0, le=24 * 3600.0, description="seconds the person has")
    escalate_after: float | None = Field(default=None, gt=0.0)
    secret: bool = False


class ApprovalDone(BaseModel):
    key: str
    by: str  # who answered
    response: str | None  # what they answered; never a secret answer
    machine: str


@automation(name="sim.approval", version="1", required_state="any")
async def approval(ctx: Context, data: ApprovalInput) -> ApprovalDone:
    """Work that needs a person first: a push approval (or, with ``secret``, a code read out
    from an SMS) asked with ``ctx.ask_human``; the machine stays leased while they answer.
    Its effect is written once they did, fenced, as ``sim.work``'s."""
    backend = getattr(ctx.desktop, "backend", None)
    if backend is None:
        raise BusinessError("sim.approval needs a simulated desktop")
    await ctx.progress("ask a person", message=data.kind)
    answer = await ctx.ask_human(data.kind, data.prompt, due=data.due, escalate_after=data.escalate_after,
                                 secret=data.secret)
    await ctx.progress("answered", message=f"by {answer.by}")
    async with ctx.fenced():
        backend.record_work(data.key, machine=ctx.machine_id)
    return ApprovalDone(key=data.key, by=answer.by, response=None if data.secret else answer.response,
                        machine=ctx.machine_id)


@approval.reconcile
async def approval_was_done(ctx: Context, data: ApprovalInput) -> ApprovalDone | None:
    """A retry (nobody answered in time, a lost machine) asks again only if the work was not done."""
    backend = getattr(ctx.desktop, "backend", None)
    if backend is None or backend.work_count(data.key) == 0:
        return None
    return ApprovalDone(key=data.key, by="", response=None, machine=ctx.machine_id)


PACK = "simehr"  # the vault's accounts for SimEHR have this app


def demo_registry() -> Registry:
    """The SimEHR automations (and ``sim.noop``, ``sim.work``), as an agent would offer them."""
    return Registry([create_patient, lookup_patient, export_summary, noop, work, work_short, work_long,
                     approval]).for_pack(PACK)
