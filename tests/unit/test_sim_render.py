"""Simulated screens: every SimEHR state renders, and the app model recognises exactly it."""

from __future__ import annotations

import numpy as np
import pytest

from deskfleet.desktop import Region
from deskfleet.sim import SimBackend, SimDesktop, ehr_model
from deskfleet.sim.layout import DIALOGS, View, layout_for
from deskfleet.sim.render import Renderer, cache_info, clear_cache, read_text

MODEL = ehr_model()
LAYOUT = layout_for()
USER = (("user", "Signed in as clinic-b"),)

# Several renderings of each state: hover, focus, selection, typed text, long results.
VARIANTS: dict[str, list[View]] = {
    "login": [
        View("login"),
        View(
            "login",
            values=(("password", "•" * 11), ("username", "robot1")),
            focus="password",
            hover="sign_in",
            texts=(("error", "Invalid username or password."),),
        ),
        View("login", focus="username", selected=True, values=(("username", "x" * 60),)),
    ],
    "mfa": [View("mfa", focus="code", hover="verify", values=(("code", "123456"),),
                 texts=(("error", "Invalid code. Try again."),))],
    "home": [View("home", texts=USER, hover=h) for h in (None, "new_patient", "search", "sign_out")],
    "patient_form": [
        View("patient_form", focus="mrn"),
        View("patient_form", values=(("dob", "1980-01-01"), ("mrn", "M" * 32), ("name", "N" * 60)),
             focus="dob", hover="save"),
    ],
    "search": [
        View("search", hover="back"),
        View("search", values=(("mrn", "MRN-1"),), hover="export",
             texts=(("results", "5 records for MRN MRN-1\n#1  A  x\n#2  B  x\n#3  C  x\n#4  D  x\n"
                                 "… and 1 more"),)),
    ],
    "saved": [View("patient_form", dialogs=(("saved", "Patient saved — record #123456"),),
                   hover="ok")],
    "exported": [View("search", dialogs=(("exported", "Summary for MRN X sent — export #5"),))],
    "error_dialog": [
        *(View(s, dialogs=(("error_dialog", "An unexpected error occurred."),))
          for s in ("login", "mfa", "home", "patient_form", "search")),
        View("home", texts=USER, dialogs=(("session_expired", "a"), ("error_dialog", "b"))),
    ],
    "session_expired": [View("login", dialogs=(("session_expired", "Your session has expired."),),
                             hover="ok")],
    "validation": [View("patient_form", dialogs=(("validation", "Fill in MRN, name and dob."),))],
    "desktop": [View("desktop")],
    "rebooting": [View("rebooting")],
}


def passing(frame: np.ndarray) -> list[str]:
    """The states all of whose checks pass on ``frame``."""
    scores = MODEL.classify(frame).scores
    return sorted(
        state.name for state in MODEL.classifier.states
        if scores[state.name] >= min(c.threshold for c in state.checks)
    )


def test_every_state_has_a_variant_and_a_recovery() -> None:
    names = {s.name for s in MODEL.classifier.states}
    assert names == set(VARIANTS)
    assert set(MODEL.recoveries) - {"no_screen", "covered"} == names - MODEL.ready_states
    assert set(MODEL.recoveries.values()) <= set(MODEL.playbooks)
    assert {MODEL.on_unknown, MODEL.logout} <= set(MODEL.playbooks)
    assert all(1 <= len(s.checks) <= 3 for s in MODEL.classifier.states)
    assert {s.name for s in MODEL.classifier.states if s.overlay} == set(DIALOGS)
    assert [s.name for s in MODEL.classifier.states if s.ready] == ["home"]


@pytest.mark.parametrize("drift", [None, 1, 2, 3])
@pytest.mark.parametrize("state", list(VARIANTS))
def test_each_state_is_recognised_and_only_it(state: str, drift: int | None) -> None:
    renderer = Renderer(drift=drift)
    for view in VARIANTS[state]:
        frame = renderer.frame(view)
        assert frame.shape == (768, 1024, 3) and frame.dtype == np.uint8
        assert MODEL.classify(frame).state == state, view
        if not view.dialogs or len(view.dialogs) == 1:
            assert passing(frame) == [state], view


def test_drift_really_changes_the_pixels() -> None:
    view = VARIANTS["home"][0]
    clean, drifted = Renderer().frame(view), Renderer(drift=2).frame(view)
    diff = np.abs(clean.astype(int) - drifted.astype(int))
    assert diff.mean() > 1.0  # noise everywhere, a shift at every edge
    assert diff.max() > 100


@pytest.mark.parametrize("kind", sorted(DIALOGS))
def test_a_dialog_over_home_is_never_home(kind: str) -> None:
    for drift in (None, 4):
        frame = Renderer(drift=drift).frame(View("home", texts=USER, hover="search",
                                                 dialogs=((kind, "message"),)))
        assert MODEL.classify(frame).state == kind
        assert "home" not in passing(frame)
        assert MODEL.classify(frame).scores["home"] < 0.9


def test_foreign_and_blank_frames_are_unknown() -> None:
    h, w = 768, 1024
    rng = np.random.default_rng(0)
    frames = [np.full((h, w, 3), v, np.uint8) for v in (0, 128, 238, 255)]
    frames.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    # Another app: SimEHR's colours and layout, but none of its screens.
    other = np.array(Renderer().frame(View("home", texts=USER)))
    other[40:400, 200:800] = (236, 239, 244)
    frames.append(other)
    for frame in frames:
        assert MODEL.classify(frame).state == "unknown"


async def test_a_live_desktop_classifies_as_its_screen_changes() -> None:
    desktop = SimDesktop("m", SimBackend(), seed=1)

    async def shot() -> str:
        return MODEL.classify(await desktop.screenshot()).state

    assert await shot() == "login"
    desktop.inject("error_dialog")
    assert await shot() == "error_dialog"
    await desktop.press("enter")
    assert await shot() == "login"
    desktop.inject("crash")
    assert await shot() == "desktop"
    await desktop.click(*LAYOUT.icons[0].center, count=2)  # started again from its icon
    assert await shot() == "login"


async def test_region_screenshots_and_bounds() -> None:
    desktop = SimDesktop("m", SimBackend(), seed=1)
    region = Region(10, 20, 30, 40)
    full = await desktop.screenshot()
    part = await desktop.screenshot(region)
    assert part.shape == (40, 30, 3)
    assert np.array_equal(part, region.crop(full))
    with pytest.raises(ValueError):
        await desktop.screenshot(Region(1000, 0, 100, 10))


def test_read_text_is_exact_and_respects_modal_dialogs() -> None:
    view = View("login", values=(("password", "••••"), ("username", "robot1")))
    assert read_text(LAYOUT, view, LAYOUT.widget("login", "username").rect) == "robot1"
    assert read_text(LAYOUT, view, LAYOUT.widget("login", "password").rect) == "••••"
    assert read_text(LAYOUT, view, LAYOUT.title_bar) == "SimEHR — Sign in"
    form = LAYOUT.screens["login"]
    everything = read_text(LAYOUT, view, Region(0, 0, 1024, 768))
    assert everything.split("\n")[:3] == ["SimEHR — Sign in", "Sign in to SimEHR", "Username"]
    assert all(w.text in everything for w in form if w.text)
    covered = View("login", dialogs=(("session_expired", "Your session has expired."),))
    text = read_text(LAYOUT, covered, LAYOUT.dialog)
    assert text == "Session expired\nYour session has expired.\nOK"
    assert read_text(LAYOUT, View("rebooting"), Region(0, 0, 1024, 768)) == "Restarting…"


async def test_idle_screenshots_hit_the_frame_cache() -> None:
    clear_cache()
    backend = SimBackend()
    desktops = [SimDesktop(f"m{i}", backend, seed=i, drift=77) for i in range(50)]
    frames = [await d.screenshot() for d in desktops for _ in range(4)]
    info = cache_info()
    assert info.misses == 1  # 50 desktops at the same login screen: one render
    assert info.hits == 199
    assert all(f is frames[0] for f in frames)  # shared, never copied
    assert not frames[0].flags.writeable


@pytest.mark.parametrize("size", [(800, 600), (1280, 1024)])
def test_other_screen_sizes_classify(size: tuple[int, int]) -> None:
    model = ehr_model(*size)
    for drift in (None, 1):
        renderer = Renderer(*size, drift=drift)
        for state, views in VARIANTS.items():
            for view in views:
                assert model.classify(renderer.frame(view)).state == state, (size, view)
