"""The demo automations end to end, through a real SDK Context on a simulated desktop."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from deskfleet.errors import BusinessError, DesktopError, Stopped
from deskfleet.sdk import Context
from deskfleet.sim import (
    SimBackend,
    SimDesktop,
    create_patient,
    demo_registry,
    ehr_model,
    export_summary,
    lookup_patient,
)

MODEL = ehr_model()
CREDS = SimBackend.credentials(0)
JANE = {"mrn": "MRN-100", "name": "Jane Doe", "dob": "1980-01-02"}


def context(desktop: Any, steps: list[str], stop: asyncio.Event | None = None) -> Context:
    async def report(step: str, percent: float | None, message: str | None) -> None:
        steps.append(step)

    async def upload(name: str, data: bytes, content_type: str) -> str:
        return f"artifact-{name}"

    return Context(
        run_id="run-1", attempt_id=1, attempt_number=1, machine_id=desktop.name,
        desktop=desktop, model=MODEL, report_progress=report, upload=upload,
        stop_event=stop or asyncio.Event(),
    )


async def at_home(backend: SimBackend | None = None, name: str = "m1") -> SimDesktop:
    desktop = SimDesktop(name, backend or SimBackend(), seed=5)
    await desktop.type_text(f"robot1\t{CREDS['robot1'].password}\n")
    assert await state(desktop) == "home"
    return desktop


async def state(desktop: SimDesktop) -> str:
    return MODEL.classify(await desktop.screenshot()).state


def test_registry_offers_the_three_with_their_policies() -> None:
    registry = demo_registry()
    assert len(registry) == 8  # the three SimEHR automations; sim.noop and sim.work(_short, _long) for benchmarks;
    # sim.approval, a person in the loop
    specs = {s.name: s for s in registry.specs()}
    assert (specs["ehr.create_patient"].idempotent, specs["ehr.create_patient"].has_reconcile) == (
        False, True)
    assert specs["ehr.lookup_patient"].idempotent
    assert (specs["ehr.export_summary"].idempotent, specs["ehr.export_summary"].has_reconcile) == (
        False, False)
    assert (specs["sim.noop"].idempotent, specs["sim.noop"].required_state) == (True, "any")
    for name in ("sim.work", "sim.work_short", "sim.work_long"):
        assert (specs[name].idempotent, specs[name].has_reconcile, specs[name].required_state) == (False, True, "any")
    assert specs["sim.work_long"].description.startswith("Typically long work: A unit of work of a given duration")


async def test_work_leaves_its_effect_halfway_and_reconcile_finds_it() -> None:
    backend = SimBackend()
    desktop = SimDesktop("m1", backend, seed=5)
    work = demo_registry().get("sim.work", None)
    assert work is not None
    steps: list[str] = []
    assert await work.run_reconcile(context(desktop, steps), {"key": "w1", "seconds": 0.2}) is None
    task = asyncio.ensure_future(work.execute(context(desktop, steps), {"key": "w1", "seconds": 0.2}))
    await asyncio.sleep(0.05)
    assert backend.work_count("w1") == 0, "not yet: the effect lands halfway"
    await asyncio.sleep(0.1)
    assert backend.work_count("w1") == 1
    task.cancel()  # killed in the second half: done, but never reported
    found = await work.run_reconcile(context(desktop, steps), {"key": "w1", "seconds": 0.2})
    assert found == {"key": "w1", "machine": "m1"}
    assert backend.work_counts() == {"w1": 1}


async def test_create_patient_makes_one_record_and_reconcile_finds_it() -> None:
    desktop = await at_home()
    steps: list[str] = []
    out = await create_patient.execute(context(desktop, steps), JANE)
    backend = desktop.backend
    [record] = backend.find_by_mrn("MRN-100")
    assert out == {"record_id": record.record_id, "mrn": "MRN-100"}
    assert (record.name, record.dob, record.created_by_machine) == ("Jane Doe", "1980-01-02", "m1")
    assert steps == ["open the new-patient form", "fill in the form", "save", "confirm"]
    assert await state(desktop) == "home"

    assert await create_patient.run_reconcile(context(desktop, []), JANE) == out
    assert backend.count_by_mrn("MRN-100") == 1  # reconcile only reads
    assert await state(desktop) == "home"
    other = {**JANE, "mrn": "MRN-404"}
    assert await create_patient.run_reconcile(context(desktop, []), other) is None


async def test_reconcile_refuses_to_pick_between_duplicates() -> None:
    desktop = await at_home()
    for _ in range(2):
        await create_patient.execute(context(desktop, []), JANE)
    assert desktop.backend.duplicates() == {"MRN-100": 2}
    with pytest.raises(BusinessError, match="2 records"):
        await create_patient.run_reconcile(context(desktop, []), JANE)
    assert await state(desktop) == "home"


class CrashOn:
    """A desktop whose app crashes right after one particular click (e.g. on Save)."""

    def __init__(self, desktop: SimDesktop, point: tuple[int, int], kind: str = "crash") -> None:
        self._desktop, self._point, self._kind = desktop, point, kind

    def __getattr__(self, name: str) -> Any:
        return getattr(self._desktop, name)

    async def click(self, x: int, y: int, **kw: Any) -> None:
        await self._desktop.click(x, y, **kw)
        if (x, y) == self._point:
            self._desktop.inject(self._kind)


async def test_a_crash_after_save_fails_the_attempt_and_reconcile_sees_the_record() -> None:
    desktop = await at_home()
    save = desktop.layout.widget("patient_form", "save").center
    with pytest.raises(DesktopError, match="desktop"):
        await create_patient.execute(context(CrashOn(desktop, save), []), JANE)
    assert desktop.backend.count_by_mrn("MRN-100") == 1  # the side effect happened

    # Another machine, sharing the backend, reconciles instead of creating it again.
    other = await at_home(desktop.backend, "m2")
    found = await create_patient.run_reconcile(context(other, []), JANE)
    assert found is not None and found["record_id"] == desktop.backend.find_by_mrn("MRN-100")[
        0].record_id
    assert desktop.backend.duplicates() == {}


async def test_an_error_dialog_midway_is_a_desktop_error() -> None:
    desktop = await at_home()
    new = desktop.layout.widget("home", "new_patient").center
    with pytest.raises(DesktopError, match="error_dialog"):
        await create_patient.execute(context(CrashOn(desktop, new, "error_dialog"), []), JANE)
    assert desktop.backend.count() == 0


async def test_stop_is_honoured_at_the_next_step() -> None:
    desktop = await at_home()
    stop = asyncio.Event()
    stop.set()
    with pytest.raises(Stopped):
        await create_patient.execute(context(desktop, [], stop), JANE)
    assert desktop.backend.count() == 0


async def test_lookup_patient_reads_the_search_results() -> None:
    desktop = await at_home()
    first = await create_patient.execute(context(desktop, []), JANE)
    out = await lookup_patient.execute(context(desktop, []), {"mrn": "MRN-100"})
    assert out == {"mrn": "MRN-100", "count": 1, "records": [
        {"record_id": first["record_id"], "name": "Jane Doe", "dob": "1980-01-02"}]}
    assert (await lookup_patient.execute(context(desktop, []), {"mrn": "NOPE"}))["count"] == 0
    assert await state(desktop) == "home"


async def test_export_summary_exports_once_or_fails_for_unknown_patients() -> None:
    desktop = await at_home()
    await create_patient.execute(context(desktop, []), JANE)
    out = await export_summary.execute(context(desktop, []), {"mrn": "MRN-100"})
    assert out["records"] == 1 and out["export_id"] >= 1
    assert desktop.backend.count_exports("MRN-100") == 1
    assert await state(desktop) == "home"
    with pytest.raises(BusinessError, match="no patient"):
        await export_summary.execute(context(desktop, []), {"mrn": "MRN-404"})
    assert await state(desktop) == "home"
    assert desktop.backend.count_exports() == 1


def test_inputs_are_validated() -> None:
    # Rejected input fails the run without a retry, and never quotes the input back.
    with pytest.raises(BusinessError, match="dob") as exc:
        create_patient.parse_input({**JANE, "dob": "02/01/1980"})
    assert "02/01/1980" not in str(exc.value)
    with pytest.raises(BusinessError, match="name"):
        create_patient.parse_input({**JANE, "name": "Jane\tDoe"})
