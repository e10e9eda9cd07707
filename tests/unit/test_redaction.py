"""Redaction regions of an app model, applied to the screenshots an agent uploads: what the
model declares in ``model.json``, where each region lands on a captured frame (pixels
inside black, every pixel outside unchanged), and the fail-safe — a frame whose regions
cannot be placed is blanked whole."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import deskfleet.sim
from deskfleet.desktop import Region
from deskfleet.errors import ConfigError
from deskfleet.sim import SimBackend, SimDesktop, ehr_model
from deskfleet.sim.layout import View, layout_for
from deskfleet.sim.model import redaction as sim_redaction
from deskfleet.sim.render import Renderer
from deskfleet.vision.redact import Redaction
from deskfleet.vision.screens import read_image
from deskfleet.vision.templates import Anchor, TemplateLibrary

MODEL = ehr_model()
SIM_MODEL = Path(deskfleet.sim.__file__).parent / "model"
PATIENT = "Jane Q Patient"


def inside(frame: np.ndarray, box: Region) -> np.ndarray:
    return box.crop(frame)


def mask_of(shape: tuple[int, ...], boxes: list[Region]) -> np.ndarray:
    mask = np.zeros(shape[:2], bool)
    for b in boxes:
        mask[b.top:b.top + b.height, b.left:b.left + b.width] = True
    return mask


def assert_redacted(before: np.ndarray, after: np.ndarray, boxes: list[Region]) -> None:
    """Black inside ``boxes``, every other pixel as it was."""
    mask = mask_of(before.shape, boxes)
    assert np.all(after[mask] == 0), "a pixel inside a redaction region is not black"
    assert np.array_equal(after[~mask], before[~mask]), "a pixel outside the regions changed"
    assert np.any(before[mask] != 0), "the regions held something to hide in the first place"


async def captured_search_screen() -> np.ndarray:
    """A real capture from a simulated machine: SimEHR's search screen listing a patient."""
    backend = SimBackend()
    backend.insert("MRN-77", PATIENT, "1970-01-01")
    desktop = SimDesktop("m1", backend, seed=1)
    layout = desktop.layout
    from deskfleet.appmodel import PlaybookContext, local_accounts

    accounts = local_accounts(SimBackend.credentials())
    c = MODEL.classify(await desktop.screenshot())
    await MODEL.playbooks["login"](PlaybookContext(desktop, MODEL, accounts["robot1"], None, c))
    assert MODEL.classify(await desktop.screenshot()).state == "home"
    await desktop.click(*layout.widget("home", "search").center)
    await desktop.click(*layout.widget("search", "mrn").center)
    await desktop.type_text("MRN-77")
    await desktop.click(*layout.widget("search", "search").center)
    frame = await desktop.screenshot()
    assert MODEL.classify(frame).state == "search"
    assert PATIENT in await desktop.read_text(layout.widget("search", "results").rect)
    return frame


async def test_a_captured_search_screen_has_the_patient_blacked_out_and_nothing_else_touched() -> None:
    frame = await captured_search_screen()
    original = frame.copy()
    done = MODEL.redact(frame)
    assert done is not None and not done.whole_frame
    layout = layout_for()
    boxes = [layout.widget("search", "mrn").rect, layout.widget("search", "results").rect]
    assert_redacted(frame, done.frame, boxes)
    assert np.array_equal(frame, original), "the caller's frame (maybe the renderer's cache) is left alone"
    assert done.info == {"regions": ["mrn", "results"], "states": ["search"]}
    assert PATIENT not in json.dumps(done.info)


def test_the_patient_form_saved_with_the_model_is_redacted_where_the_model_says() -> None:
    """A screenshot recorded with the model (its labelled screens), as a desktop captured it."""
    frame = read_image(SIM_MODEL / "screens" / "patient_form" / "1.png")
    done = MODEL.redact(frame)
    assert done is not None and done.info["states"] == ["patient_form"]
    layout = layout_for()
    boxes = [layout.widget("patient_form", n).rect for n in ("mrn", "name", "dob")]
    mask = mask_of(frame.shape, boxes)
    assert np.all(done.frame[mask] == 0) and np.array_equal(done.frame[~mask], frame[~mask])


def test_a_screen_without_regions_is_uploaded_as_it_is() -> None:
    frame = Renderer().frame(View("home", texts=(("user", "Signed in as robot1"),)))
    done = MODEL.redact(frame)
    assert done is not None and done.info == {"regions": [], "states": ["home"]}
    assert np.array_equal(done.frame, frame)


def test_a_dialog_that_hides_the_screen_beneath_blanks_the_frame() -> None:
    """'saved' over the patient form hides the form's checks: whether a field to hide shows
    around the dialog cannot be told, so nothing of the frame goes."""
    frame = Renderer().frame(View("patient_form", values=(("name", PATIENT),), dialogs=(("saved", "Saved"),)))
    assert MODEL.classify(frame).state == "saved"
    done = MODEL.redact(frame)
    assert done is not None and done.whole_frame and not done.frame.any()
    assert done.info["states"] == ["saved"] and "hiding the screen beneath" in done.info["whole_frame"]


def test_an_unknown_screen_is_blanked_but_a_known_one_is_not() -> None:
    noise = np.random.default_rng(1).integers(0, 256, (768, 1024, 3), dtype=np.uint8)
    done = MODEL.redact(noise)
    assert done is not None and not done.frame.any() and done.info["whole_frame"].startswith("no state")
    assert noise.any(), "the input is untouched"


def test_a_frame_of_another_size_is_blanked() -> None:
    model = TemplateLibrary.load(SIM_MODEL).classifier()
    frame = np.full((600, 800, 3), 200, np.uint8)
    done = model.redaction.apply(frame, model.states, model.screen)
    assert not done.frame.any() and "800x600" in done.info["whole_frame"]


def test_a_model_without_redaction_uploads_frames_as_they_are() -> None:
    from deskfleet.appmodel import AppModel

    plain = AppModel(**{**{f: getattr(MODEL, f) for f in MODEL.__dataclass_fields__},
                        "classifier": type(MODEL.classifier)(MODEL.classifier.states)})
    assert not plain.redaction.declared and plain.redact(np.zeros((768, 1024, 3), np.uint8)) is None


def test_simehr_declares_its_regions_in_its_own_model_files() -> None:
    """SimEHR's regions are its own (model.json), the same as its layout places them at any size."""
    assert TemplateLibrary.load(SIM_MODEL).redaction() == sim_redaction(layout_for())
    small = ehr_model(800, 600)
    assert small.redaction == sim_redaction(layout_for(800, 600)) and small.redaction.declared


# -- regions placed by what the model locates -------------------------------------------------------


def _textured(size: tuple[int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def _screen(logo_at: tuple[int, int]) -> np.ndarray:
    frame = np.full((300, 400, 3), 230, np.uint8)
    x, y = logo_at
    frame[y:y + 40, x:x + 40] = _textured((40, 40), 7)
    frame[y + 5:y + 25, x + 60:x + 200] = 40  # the account number, beside the logo
    return frame


@pytest.fixture
def located_model(tmp_path: Path) -> Path:
    """A model whose 'account' state finds its logo within 8 px and redacts the account
    number relative to it, and a status bar on every screen."""
    lib = TemplateLibrary("bank", (400, 300))
    lib.record(_screen((100, 100)), "account", [Anchor("logo", Region(100, 100, 40, 40), "match", margin=8)],
               ready=True)
    lib.states[0]["redact"] = [{"name": "account_number", "near": "logo", "box": [60, 5, 140, 20]}]
    lib.redact = [{"name": "status_bar", "box": [0, 280, 400, 20]}]
    return lib.save(tmp_path / "model").parent


def test_a_region_near_a_match_check_follows_where_the_check_is_found(located_model: Path) -> None:
    classifier = TemplateLibrary.load(located_model).classifier()
    for at in ((100, 100), (104, 97)):  # where recorded, and drawn 4 px right and 3 px up
        frame = _screen(at)
        frame[280:, :] = 90  # a status bar
        done = classifier.redaction.apply(frame, classifier.states, classifier.screen)
        assert done.info == {"regions": ["status_bar", "account_number"], "states": ["account"]}
        assert_redacted(frame, done.frame, [Region(at[0] + 60, at[1] + 5, 140, 20), Region(0, 280, 400, 20)])


def test_recording_a_state_again_keeps_what_it_redacts(located_model: Path) -> None:
    lib = TemplateLibrary.load(located_model)
    lib.record(_screen((100, 100)), "account", [Anchor("logo", Region(100, 100, 40, 40), "match", margin=8)])
    lib.save(located_model)
    again = TemplateLibrary.load(located_model)
    assert again.redaction() == lib.redaction() and again.redaction().states["account"][0].near == "logo"
    with pytest.raises(ConfigError, match="redacts regions near check"):
        lib.record(_screen((100, 100)), "account", [Anchor("badge", Region(100, 100, 40, 40), "match")])


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(redact=[{"name": "x", "box": [0, 0, 500, 10]}]), "outside the 400x300 screen"),
    (lambda d: d.update(redact=[{"name": "x", "near": "logo", "box": [0, 0, 5, 5]}]), "a region of every screen has a box"),
    (lambda d: d["states"][0].update(redact=[{"name": "x", "near": "nope", "box": [0, 0, 5, 5]}]),
     "'near' must name a check of the state"),
    (lambda d: d["states"][0].update(redact=[{"name": "x", "box": [0, 0, 5, 5], "blur": 3}]), "unknown field 'blur'"),
    (lambda d: d["states"][0].update(redact=[{"name": "x", "box": [0, 0, 5, 5]}, {"name": "x", "box": [1, 1, 5, 5]}]),
     "names region 'x' twice"),
    (lambda d: d.update(redact={"name": "x"}), "must be a list of regions"),
    (lambda d: d["states"][0].update(redact=[{"name": "x", "near": "logo", "box": [0, 0, 0, 5]}]), "dx, dy, width"),
])
def test_model_json_redaction_mistakes_are_refused_with_what_to_fix(located_model: Path, tmp_path: Path,
                                                                   change, message) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(located_model, copy)
    data = json.loads((copy / "model.json").read_text())
    change(data)
    (copy / "model.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=message) as exc:
        TemplateLibrary.load(copy)
    assert str(exc.value).startswith(str(copy / "model.json"))


def test_an_empty_redaction_is_no_redaction() -> None:
    assert not Redaction().declared
