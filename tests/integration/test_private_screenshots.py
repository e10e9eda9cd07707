"""Private screenshots (issue 13, item 4): artifacts encrypted at rest (and re-encrypted by a
key rotation), kept only as long as their automation, pool or server says, and redacted on
the machine before they leave it. The store parts run on every backend of the store suite
(SQLite and PostgreSQL); the end to end one on a simulated fleet of SimEHR, whose model
declares its patient fields private."""

from __future__ import annotations

import asyncio
import io
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from pydantic import BaseModel
from sqlalchemy import text
from test_store import T0, add_machine, claim

from deskfleet.config import DEFAULT_ARTIFACT_RETENTION, ServerSettings, parse_retention
from deskfleet.crypto import SecretBox, new_key
from deskfleet.errors import ConfigError
from deskfleet.fleet.retention import Retention
from deskfleet.pools import PoolPolicy
from deskfleet.sdk import automation, encode_png
from deskfleet.sim.layout import layout_for
from deskfleet.store import SQLStore
from deskfleet.store.runner import StoreRunner
from deskfleet.vault import Reencrypted, reencrypt
from support import Backend, LiveServer, fast_settings, start_server

DAY = 86400.0


class Nothing(BaseModel):
    pass
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def picture(seed: int = 3) -> bytes:
    """A PNG whose compressed bytes are recognisable: random pixels do not compress."""
    frame = np.random.default_rng(seed).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    return encode_png(frame)


def raw_rows(store: SQLStore) -> dict[str, tuple[bytes, str | None]]:
    """Each artifact's bytes as the database holds them, and the key they say encrypted them."""
    with store.engine.connect() as conn:
        return {r[0]: (bytes(r[1]), r[2]) for r in conn.execute(text("SELECT id, data, encrypted_with FROM artifacts"))}


def assert_unreadable(stored: bytes, png: bytes) -> None:
    assert PNG_SIGNATURE not in stored and b"IDAT" not in stored and b"IHDR" not in stored
    for i in range(0, len(png) - 32, 32):
        assert png[i:i + 32] not in stored, f"bytes {i}..{i + 32} of the picture lie in the database"


# -- encrypted at rest -----------------------------------------------------------------------------


@pytest.fixture
def server_on(backend: Backend, tmp_path: Path) -> Any:
    started: list[LiveServer] = []

    def make(**overrides: Any) -> LiveServer:
        server = start_server(fast_settings(tmp_path / "server", db=backend.url, **overrides))
        started.append(server)
        return server

    yield make
    for s in started:
        s.stop()


async def enrol(server: LiveServer, machine: str = "m-private") -> dict[str, str]:
    async with httpx.AsyncClient(base_url=server.url) as c:
        resp = await c.post("/agent/v1/enrol", json={"machine": machine, "pool": "default"},
                            headers={"authorization": f"Bearer {server.token}"})
        assert resp.status_code == 200, resp.text
        return {"authorization": f"Bearer {resp.json()['agent_key']}", "x-deskfleet-machine": machine}


async def upload(server: LiveServer, agent: dict[str, str], data: bytes, **headers: str) -> str:
    async with httpx.AsyncClient(base_url=server.url) as c:
        resp = await c.post("/agent/v1/artifacts", params={"name": "screen"}, content=data,
                            headers={**agent, "content-type": "image/png", **headers})
        assert resp.status_code == 201, resp.text
        return str(resp.json()["id"])


async def test_a_screenshot_is_encrypted_in_the_database_and_served_exactly(server_on, backend: Backend) -> None:
    server = server_on()
    agent = await enrol(server)
    png = picture()
    art = await upload(server, agent, png, **{"x-deskfleet-redaction": '{"regions": ["mrn"], "states": ["search"]}'})
    async with httpx.AsyncClient(base_url=server.url) as c:
        served = await c.get(f"/v1/artifacts/{art}")
    assert served.status_code == 200 and served.content == png and served.headers["content-type"] == "image/png"

    view = backend.open()
    stored, key = raw_rows(view)[art]
    assert key == server.orch.secrets.key_fingerprint()
    assert_unreadable(stored, png)
    meta, _ = view.get_artifact(art)
    assert meta.encrypted and meta.size == len(png) and meta.pool == "default"
    assert meta.redaction == {"regions": ["mrn"], "states": ["search"]}
    if backend.name == "sqlite":  # the file itself, write-ahead log included
        server.stop()
        db = Path(backend.url.removeprefix("sqlite:///"))
        for f in (db, db.with_name(db.name + "-wal")):
            if f.exists():
                assert_unreadable(f.read_bytes(), png)


async def test_a_bad_redaction_header_is_refused(server_on) -> None:
    server = server_on()
    agent = await enrol(server)
    async with httpx.AsyncClient(base_url=server.url) as c:
        resp = await c.post("/agent/v1/artifacts", params={"name": "x"}, content=b"x",
                            headers={**agent, "x-deskfleet-redaction": "[1, 2]"})
    assert resp.status_code == 422 and "X-Deskfleet-Redaction" in resp.json()["message"]


async def test_a_plain_artifact_from_before_stays_readable_until_a_rotation_encrypts_it(
        server_on, backend: Backend) -> None:
    server = server_on()
    await enrol(server, "m-old")
    png = picture(5)
    view = backend.open()
    old = view.add_artifact(attempt_id=None, machine_id="m-old", name="before.png", content_type="image/png",
                            data=png, now=time.time())
    assert not old.encrypted
    async with httpx.AsyncClient(base_url=server.url) as c:
        assert (await c.get(f"/v1/artifacts/{old.id}")).content == png
        box = server.orch.secrets
        done = await asyncio.to_thread(reencrypt, view, box)
        assert done.artifacts == 1
        stored, key = raw_rows(view)[old.id]
        assert key == box.key_fingerprint()
        assert_unreadable(stored, png)
        assert (await c.get(f"/v1/artifacts/{old.id}")).content == png


def test_a_rotation_reencrypts_artifacts_in_batches_with_progress(s: SQLStore) -> None:
    add_machine(s, "m1")
    old_key, new = new_key(), new_key()
    old_box = SecretBox(old_key)
    pngs = {}
    for i in range(7):
        png = picture(10 + i)
        art = s.add_artifact(attempt_id=None, machine_id="m1", name=f"{i}.png", content_type="image/png",
                             data=old_box.seal(png), size=len(png), now=T0 + i,
                             encrypted_with=old_box.key_fingerprint())
        pngs[art.id] = png
    plain = s.add_artifact(attempt_id=None, machine_id="m1", name="plain.png", content_type="image/png",
                           data=picture(99), now=T0 + 9)
    pngs[plain.id] = picture(99)
    before = raw_rows(s)

    ring = SecretBox([new, old_key])
    seen: list[int] = []
    done = reencrypt(s, ring, artifact_batch=3, progress=lambda d: seen.append(d.artifacts))
    assert done.artifacts == 8 and seen[-3:] == [3, 6, 8], seen
    only_new = SecretBox(new)
    for art_id, (stored, key) in raw_rows(s).items():
        assert key == only_new.key_fingerprint() and stored != before[art_id][0]
        assert only_new.unseal(stored) == pngs[art_id]
        assert_unreadable(stored, pngs[art_id])
    assert reencrypt(s, ring, artifact_batch=3) == Reencrypted(), "nothing left under an older key"
    with pytest.raises(ConfigError, match="cannot be decrypted"):
        old_box.unseal(raw_rows(s)[plain.id][0])


# -- retention ---------------------------------------------------------------------------------------------


def test_retention_values() -> None:
    assert parse_retention("30d") == 30 * DAY and parse_retention("12h") == 43200 and parse_retention(90) == 90
    assert parse_retention("2w") == 14 * DAY and parse_retention("forever") == 0 and parse_retention("0") == 0
    assert parse_retention(None) is None
    for bad in ("soon", "-1d", "3y", True):
        with pytest.raises(ValueError, match="a duration such as 30d"):
            parse_retention(bad)
    assert ServerSettings().artifact_retention == DEFAULT_ARTIFACT_RETENTION == 30 * DAY
    policy = PoolPolicy.model_validate({"artifacts": {"retention": " 7d "}})
    assert policy.artifacts.retention == "7d" and policy.artifacts.retention_seconds == 7 * DAY
    assert PoolPolicy().artifacts.retention_seconds is None
    with pytest.raises(ValueError, match=r"artifacts\.retention 'a while'"):
        PoolPolicy.model_validate({"artifacts": {"retention": "a while"}})

    @automation(name="t.kept", artifact_retention="90d")
    async def kept(ctx: Any, data: Nothing) -> Nothing:
        return data

    assert kept.artifact_retention == 90 * DAY
    with pytest.raises(ValueError, match=r"t\.bad: artifact_retention"):
        automation(name="t.bad", artifact_retention="someday")


def _aged(s: SQLStore, machine: str, age_days: float, now: float, **kw: Any) -> str:
    return s.add_artifact(attempt_id=kw.pop("attempt_id", None), machine_id=machine, name="a.png",
                          content_type="image/png", data=b"sealed", now=now - age_days * DAY, **kw).id


def test_expiry_goes_by_the_automation_then_the_pool_then_the_default(s: SQLStore) -> None:
    now = T0 + 400 * DAY
    for mid, pool in (("m1", "default"), ("w1", "week"), ("k1", "keep")):
        add_machine(s, mid, now - 35 * DAY, pool=pool)
    a = claim(s, now - 35 * DAY, machine="m1")
    keep = {
        _aged(s, "m1", 29, now),  # default 30 d
        _aged(s, "w1", 6, now),  # the pool's 7 d
        _aged(s, "k1", 300, now),  # the pool keeps them for good
        _aged(s, "m1", 100, now, retention=365 * DAY),  # its automation's year
        _aged(s, "w1", 50, now, retention=0.0),  # its automation's "forever" beats the pool's week
    }
    gone = {
        _aged(s, "m1", 31, now),
        _aged(s, "w1", 8, now),
        _aged(s, "k1", 3, now, retention=2 * DAY),  # its automation's 2 days beat the pool's forever
        _aged(s, "m1", 35, now, attempt_id=a.attempt.id),  # a run's: the artifact goes, the run stays
    }
    shot = s.add_artifact(attempt_id=None, machine_id="w1", name="last.png", content_type="image/png",
                          data=b"x", now=now - 20 * DAY).id
    gone.add(shot)
    assert s.get_machine("w1").last_screenshot_id == shot
    pools = {"week": 7 * DAY, "keep": 0.0}
    first = s.expire_artifacts(now, default=30 * DAY, pools=pools, limit=3)
    # Oldest first within each: the automation's, then the week pool's (its last screenshot too).
    assert (first.deleted, first.bytes) == (3, 6 + 1 + 6)
    rest = s.expire_artifacts(now, default=30 * DAY, pools=pools, limit=100)
    assert first.deleted + rest.deleted == len(gone)
    assert s.expire_artifacts(now, default=30 * DAY, pools=pools, limit=100).deleted == 0
    left = {r for r in raw_rows(s)}
    assert left == keep
    assert s.get_machine("w1").last_screenshot_id is None, "no link to a screenshot that is gone"
    assert s.get_run(a.run.id) is not None and s.list_artifacts(a.run.id) == [], "runs stay; only artifacts go"
    assert s.expire_artifacts(now + 1000 * DAY, default=None, pools={}, limit=100).deleted == 1, \
        "without a default only the automations' retentions apply"


async def test_the_leaders_sweep_deletes_in_bounded_batches_with_one_event_per_sweep(s: SQLStore) -> None:
    now = T0 + 100 * DAY
    add_machine(s, "w1", T0, pool="week")
    add_machine(s, "m1", T0)
    s.put_pool_policy("week", PoolPolicy.model_validate({"artifacts": {"retention": "7d"}}).model_dump(mode="json"),
                      expected_version=None, now=T0)
    for i in range(5):
        _aged(s, "w1", 10 + i, now)
    _aged(s, "w1", 1, now)
    _aged(s, "m1", 10, now)  # the server keeps them 30 days
    db = StoreRunner(s)
    try:
        sweep = Retention(s, db, default=30 * DAY, leads=lambda: True, batch=2, max_batches=2)
        assert await sweep.pools() == {"week": 7 * DAY}
        first = await sweep.sweep(now)
        assert (first.deleted, first.batches, first.more) == (4, 2, True)
        second = await sweep.sweep(now)
        assert (second.deleted, second.batches, second.more) == (1, 1, False)
        assert (await sweep.sweep(now)).deleted == 0
    finally:
        db.close()
    events = [e for e in s.events() if e.kind == "artifacts.expired"]
    assert [e.data["deleted"] for e in events] == [4, 1], "one event per sweep that deleted something"
    assert events[0].data["more"] is True and events[0].data["retention"] == {"default": 30 * DAY,
                                                                             "pools": {"week": 7 * DAY}}
    assert len(raw_rows(s)) == 2


# -- redacted on the machine, end to end ------------------------------------------------------------------


PATIENT = "Ada Q Patient"
MRN = "MRN-PRIV-1"


async def test_a_human_tasks_screen_reaches_the_api_with_the_patient_blacked_out(live_server, fleet_factory) -> None:
    server = live_server
    fleet = await fleet_factory(server, count=1, screenshots="evidence", upkeep=False)
    fleet.backend.insert(MRN, PATIENT, "1970-01-01")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
        # Log the machine in (a run's pre-flight), then show the patient on its screen.
        first = (await c.post("/v1/runs", params={"wait": 20},
                              json={"automation": "ehr.lookup_patient", "input": {"mrn": MRN}})).json()
        assert first["state"] == "succeeded" and first["output"]["records"][0]["name"] == PATIENT, first
        resp = await c.post("/v1/api-keys", json={"name": "records office", "role": "operator",
                                                  "screenshots": True})
        assert resp.status_code == 201, resp.text
        viewer = {"authorization": f"Bearer {resp.json()['key']}"}
    desktop = fleet.desktops[0]
    layout = layout_for()
    await desktop.click(*layout.widget("home", "search").center)
    await desktop.click(*layout.widget("search", "mrn").center)
    await desktop.type_text(MRN)
    await desktop.click(*layout.widget("search", "search").center)
    assert PATIENT in await desktop.read_text(layout.widget("search", "results").rect)
    on_screen = await desktop.screenshot()

    async with httpx.AsyncClient(base_url=server.url, timeout=30, headers=viewer) as c:
        run = (await c.post("/v1/runs", json={"automation": "sim.approval",
                                              "input": {"key": "priv-1", "prompt": "May this record go?"}})).json()
        task = None
        for _ in range(200):
            found = (await c.get("/v1/human-tasks", params={"run": run["id"]})).json()["tasks"]
            if found:
                task = found[0]
                break
            await asyncio.sleep(0.05)
        assert task is not None and task["screenshot_url"], task
        served = await c.get(task["screenshot_url"])
        assert served.status_code == 200
        arts = [a for a in (await c.get(f"/v1/runs/{run['id']}/artifacts")).json() if a["name"].startswith("human-")]
        assert len(arts) == 1
        assert arts[0]["encrypted"] is True and arts[0]["redaction"] == {"regions": ["mrn", "results"],
                                                                         "states": ["search"]}
        assert (await c.get(arts[0]["url"])).content == served.content
        await c.post(f"/v1/runs/{run['id']}/cancel")

    seen = np.asarray(Image.open(io.BytesIO(served.content)).convert("RGB"))
    private = [layout.widget("search", "mrn").rect, layout.widget("search", "results").rect]
    mask = np.zeros(seen.shape[:2], bool)
    for r in private:
        mask[r.top:r.top + r.height, r.left:r.left + r.width] = True
    assert np.all(seen[mask] == 0), "the patient's record is blacked out"
    assert np.any(on_screen[mask] != 0), "it was on the screen"
    assert np.array_equal(seen[~mask], on_screen[~mask]), "the rest of the screen is as it was"

    store = server.view()
    meta, stored = store.get_artifact(arts[0]["id"])
    assert meta.redaction == {"regions": ["mrn", "results"], "states": ["search"]}
    assert meta.encrypted and PNG_SIGNATURE not in stored
    with sqlite3.connect(server.settings.data_dir / "deskfleet.db") as raw:
        assert all(PNG_SIGNATURE not in bytes(d) for (d,) in raw.execute("SELECT data FROM artifacts"))
    evidence = [e for e in store.events(run_id=first["id"]) if e.kind == "preflight.ok"]
    assert evidence, "pre-flight evidence went up too (the home screen: nothing to hide)"
