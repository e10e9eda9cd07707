"""Demo automations for DemoEHR, written with the SDK as a user would write them.

- ``demoehr.create_patient`` is not idempotent (saving twice makes two records) but has a
  *reconcile* check — search by MRN, the unique key — so a run whose attempt died after
  the save is finished by finding the record, not by saving it again;
- ``demoehr.search_patient`` only reads: idempotent, simply retried;
- ``demoehr.update_patient`` sets a record's name and date of birth; setting them twice
  leaves the same record, so it is idempotent too.

Each reports a step before each stage (the progress watchdog's heartbeat), waits for
screen states instead of sleeping, reads what the app says by OCR, and raises
:class:`~deskfleet.errors.DesktopError` the moment the app shows a screen it did not
expect. All of them finish at "home".
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import re
from collections.abc import Awaitable, Callable

from pydantic import BaseModel, Field

from deskfleet import BusinessError, Context, DesktopError, Region, Registry, automation, same_text

from . import layout as L

STEP_TIMEOUT = 10.0  # seconds for DemoEHR to show the next screen
READ_TIMEOUT = 5.0  # seconds for text (search results, a typed field, a message) to be drawn
#: screens that end any step at once: waiting longer would not make them go away
TROUBLE = ("error_dialog", "session_expired", "validation", "desktop", "login", "mfa")
_PLAIN = r"^[A-Za-z][A-Za-z .'-]*$"  # what DemoEHR's form takes and OCR reads back reliably
_MRN = r"^[A-Z0-9][A-Z0-9-]*$"


class NewPatient(BaseModel):
    mrn: str = Field(min_length=1, max_length=24, pattern=_MRN)
    name: str = Field(min_length=1, max_length=40, pattern=_PLAIN)
    dob: datetime.date


class PatientCreated(BaseModel):
    record_id: int
    mrn: str


class MrnQuery(BaseModel):
    mrn: str = Field(min_length=1, max_length=24, pattern=_MRN)


class Found(BaseModel):
    record_id: int
    name: str
    dob: str


class SearchResult(BaseModel):
    mrn: str
    count: int
    records: list[Found]  # the first few, as the search screen lists them


class PatientChange(BaseModel):
    mrn: str = Field(min_length=1, max_length=24, pattern=_MRN)
    name: str = Field(min_length=1, max_length=40, pattern=_PLAIN)
    dob: datetime.date


class PatientUpdated(BaseModel):
    record_id: int
    mrn: str


# -- steps shared by the automations ----------------------------------------------------


#: screens that mean the session ended mid-run: the automation logs in again and carries on
SESSION_LOST = ("session_expired", "login", "mfa")


async def _act(ctx: Context, act: Callable[[], Awaitable[None]], *wanted: str) -> str:
    """Do ``act`` and wait for one of ``wanted``; if the session ended meanwhile (the app is back
    at its login), log in again mid-run with this run's account and do it once more."""
    return await ctx.act(act, *wanted, trouble=TROUBLE, recover_on=SESSION_LOST, timeout=STEP_TIMEOUT)


async def _expect(ctx: Context, *wanted: str) -> str:
    """Wait for one of ``wanted``; fail at once if the app shows trouble instead."""
    return await ctx.expect(*wanted, trouble=TROUBLE, timeout=STEP_TIMEOUT)


async def _read_until(ctx: Context, region: Region, accept: Callable[[str], bool], what: str) -> str:
    """Read ``region`` until ``accept`` says yes: the app may not have drawn the text yet."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READ_TIMEOUT
    while True:
        text = await ctx.desktop.read_text(region)
        if accept(text):
            return text
        if loop.time() >= deadline:
            raise DesktopError(f"{what}: the screen reads {text!r}")
        await asyncio.sleep(0.05)


async def _fill(ctx: Context, fields: list[tuple[str, Region, str]]) -> None:
    """Type into each field, leave the last one (Tab: no caret over the text), read them all back."""
    for _, region, text in fields:
        await ctx.desktop.click(*region.center)  # no window manager: focus goes where you click
        await ctx.desktop.press("ctrl", "a")
        await ctx.desktop.type_text(text)
    await ctx.desktop.press("tab")
    for label, region, text in fields:
        await _read_until(ctx, _inside(region), functools.partial(same_text, expected=text),
                          f"the {label} field does not show {text!r} after typing it")


def _inside(field: Region) -> Region:
    """A field without its border: a border line against the first glyph ("John…") makes
    tesseract read nothing at all."""
    return Region(field.left + 2, field.top + 2, field.width - 4, field.height - 4)


_HEADER = re.compile(r"(\d+)\s+records?\s+for\s+MRN\s+(\S+)", re.IGNORECASE)
_NONE = re.compile(r"No patient with MRN\s+(\S+)", re.IGNORECASE)
_ROW = re.compile(r"#\s*(\d+)\s+(.+?)\s+(\d{4}-\d{2}-\d{2})\s*$")


async def _search(ctx: Context, mrn: str) -> tuple[int, list[Found]]:
    """From "home", search by MRN; returns (how many, the records listed) on the search screen."""
    await ctx.progress("open search")
    await _expect(ctx, "home")
    await _act(ctx, lambda: ctx.desktop.click(*L.SEARCH_NAV.center), "search")
    await ctx.progress("search by MRN")
    await ctx.desktop.click(*L.SEARCH_MRN.center)
    await ctx.desktop.press("ctrl", "a")
    await ctx.desktop.type_text(mrn)
    await ctx.desktop.click(*L.SEARCH_GO.center)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READ_TIMEOUT
    text = ""
    while loop.time() < deadline:  # the results replace the empty panel when the query returns
        await _expect(ctx, "search")
        text = await ctx.desktop.read_text(L.RESULTS)
        first, *rest = text.split("\n")
        none = _NONE.search(first)
        if none and same_text(none.group(1), mrn):
            return 0, []
        header = _HEADER.search(first)
        if header and same_text(header.group(2), mrn):
            count = int(header.group(1))
            found = [Found(record_id=int(m[1]), name=m[2], dob=m[3]) for m in map(_ROW.search, rest) if m]
            if len(found) < min(count, L.RESULT_LINES - 1):
                raise DesktopError(f"cannot read every search result for MRN {mrn}: {text!r}")
            return count, found
        await asyncio.sleep(0.05)
    raise DesktopError(f"no search result for MRN {mrn} appeared (the panel reads {text!r})")


async def _back_home(ctx: Context) -> None:
    await ctx.progress("return home")
    await ctx.desktop.click(*L.SEARCH_BACK.center)
    await _expect(ctx, "home")


async def _confirmed(ctx: Context, kind: str, pattern: str) -> int:
    """Wait for the ``kind`` dialog, read the record number in it, close it, reach home."""
    await _expect(ctx, kind)
    message = await _read_until(ctx, L.DIALOG_MESSAGE, lambda text: re.search(pattern, text) is not None,
                                f"no record number in the {kind} dialog")
    match = re.search(pattern, message)
    assert match is not None
    await ctx.progress("confirm", percent=90)
    await ctx.desktop.click(*L.DIALOG_OK.center)
    await _expect(ctx, "home")
    return int(match.group(1))


# -- the automations --------------------------------------------------------------------


@automation(name="demoehr.create_patient", version="1")
async def create_patient(ctx: Context, data: NewPatient) -> PatientCreated:
    """Register a new patient. Not idempotent: saving twice makes two records."""
    await ctx.progress("open the new-patient form", percent=10)
    await _expect(ctx, "home")
    await _act(ctx, lambda: ctx.desktop.click(*L.NEW_PATIENT.center), "patient_form")
    await ctx.progress("fill in the form", percent=30)
    await _fill(ctx, [("MRN", L.FORM_MRN, data.mrn), ("name", L.FORM_NAME, data.name),
                      ("date of birth", L.FORM_DOB, data.dob.isoformat())])
    await ctx.progress("save", percent=60)
    await ctx.desktop.click(*L.FORM_SAVE.center)
    record_id = await _confirmed(ctx, "saved", r"record\s*#\s*(\d+)")
    return PatientCreated(record_id=record_id, mrn=data.mrn)


@create_patient.reconcile
async def find_created_patient(ctx: Context, data: NewPatient) -> PatientCreated | None:
    """Did a lost attempt already save this patient? One record: yes; none: no; more: a person must look."""
    count, found = await _search(ctx, data.mrn)
    await _back_home(ctx)
    if count == 0:
        return None
    if count > 1:
        ids = ", ".join(f"#{r.record_id}" for r in found)
        raise BusinessError(f"MRN {data.mrn} has {count} records ({ids}): a person must merge the duplicates")
    return PatientCreated(record_id=found[0].record_id, mrn=data.mrn)


@automation(name="demoehr.search_patient", version="1", idempotent=True)
async def search_patient(ctx: Context, data: MrnQuery) -> SearchResult:
    """The records with an MRN. Read-only, so safe to retry anywhere."""
    count, found = await _search(ctx, data.mrn)
    await _back_home(ctx)
    return SearchResult(mrn=data.mrn, count=count, records=found)


@automation(name="demoehr.update_patient", version="1", idempotent=True)
async def update_patient(ctx: Context, data: PatientChange) -> PatientUpdated:
    """Set the name and date of birth of the one record with this MRN."""
    count, _ = await _search(ctx, data.mrn)
    if count != 1:
        await _back_home(ctx)
        raise BusinessError(f"MRN {data.mrn} has {count} records; an update needs exactly one")
    await ctx.progress("open the record", percent=40)
    await ctx.desktop.click(*L.SEARCH_EDIT.center)
    await _expect(ctx, "edit_form")
    await ctx.progress("change it", percent=60)
    await _fill(ctx, [("name", L.FORM_NAME, data.name), ("date of birth", L.FORM_DOB, data.dob.isoformat())])
    await ctx.progress("save", percent=80)
    await ctx.desktop.click(*L.FORM_SAVE.center)
    record_id = await _confirmed(ctx, "updated", r"#\s*(\d+)")
    return PatientUpdated(record_id=record_id, mrn=data.mrn)


PACK = "demoehr"  # the vault's accounts for DemoEHR have this app


def demoapp_registry() -> Registry:
    """The DemoEHR automations, as an agent on a real desktop offers them."""
    return Registry([create_patient, search_patient, update_patient]).for_pack(PACK)
