"""Packs through the HTTP API and the CLI: publishing (and what is refused, each with a
message that says what to fix), downloads for clients and agents, assignments, a pool with
no machine accepting runs of a published pack, and runs pinned to a version."""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest

from deskfleet import packfile
from deskfleet.packs.archive import build
from simpacks import sim_pack
from support import LiveServer


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("packs")
    return {v: build(sim_pack(root / v, v), root / "dist").path.read_bytes() for v in ("1.0.0", "2.0.0")}


def _error(resp: httpx.Response, status: int, *mentions: str) -> str:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert "Traceback" not in resp.text and body["message"], body
    for m in mentions:
        assert m in body["message"], (m, body["message"])
    return str(body["message"])


def _zip(files: dict[str, bytes]) -> bytes:
    return packfile.write([(n, d, False) for n, d in files.items()])


def test_publish_list_show_and_download(live_server: LiveServer, archives: dict[str, bytes]) -> None:
    data = archives["1.0.0"]
    with httpx.Client(base_url=live_server.url) as c:
        resp = c.post("/v1/packs", content=data, params={"sha256": packfile.sha256(data)})
        assert resp.status_code == 201, resp.text
        made = resp.json()
        assert (made["name"], made["version"], made["sha256"], made["created"]) == (
            "simehr", "1.0.0", packfile.sha256(data), True)
        assert "simehr.which@1" in made["automations"] and "sim.work@1" in made["automations"]
        again = c.post("/v1/packs", content=data)
        assert again.status_code == 200 and again.json()["created"] is False
        assert [p["version"] for p in c.get("/v1/packs").json()] == ["1.0.0"]
        assert c.get("/v1/packs/simehr/1.0.0").json()["size"] == len(data)
        got = c.get("/v1/packs/simehr/1.0.0/archive")
        assert got.content == data and got.headers["x-deskfleet-sha256"] == packfile.sha256(data)
        _error(c.get("/v1/packs/simehr/9.9"), 404, "no pack simehr 9.9")
        # agents download with their agent key, nothing else
        _error(c.get("/agent/v1/packs/simehr/1.0.0/archive"), 401, "agent key")
        names = {a["name"] for a in c.get("/v1/automations").json()}
        assert "simehr.which" in names, "publishing registered the pack's automations"


def test_what_publishing_refuses(live_server: LiveServer, archives: dict[str, bytes]) -> None:
    data = archives["1.0.0"]
    with httpx.Client(base_url=live_server.url) as c:
        _error(c.post("/v1/packs", content=b""), 422, "empty")
        _error(c.post("/v1/packs", content=b"not a zip at all"), 422, "not a pack archive", "pack build")
        _error(c.post("/v1/packs", content=data[: len(data) // 2]), 422, "not a pack archive")
        corrupt = bytearray(data)
        corrupt[200:210] = b"X" * 10  # inside the first file's bytes: its CRC no longer holds
        _error(c.post("/v1/packs", content=bytes(corrupt)), 422, "corrupt")
        _error(c.post("/v1/packs", content=data, params={"sha256": "0" * 64}), 422, "sha256", "upload it again")
        _error(c.post("/v1/packs", content=data, params={"sha256": "xyz"}), 400, "64 hexadecimal")
        _error(c.post("/v1/packs", content=_zip({"readme.txt": b"hi"})), 422, "no pack.toml")
        _error(c.post("/v1/packs", content=_zip({"pack.toml": b'[pack]\nname = "a"\nversion = "1"\n'})), 422,
               "deskfleet-pack.json", "deskfleet pack build")
        _error(c.post("/v1/packs", content=_zip({"../evil": b"x", "pack.toml": b""})), 422, "leaves its directory")
        src = zipfile.ZipFile(io.BytesIO(data))
        files = {n: src.read(n) for n in src.namelist()}
        lying = {**files, "pack.toml": files["pack.toml"].replace(b'version = "1.0.0"', b'version = "1.0.1"')}
        _error(c.post("/v1/packs", content=_zip(lying)), 422, "says simehr 1.0.0", "1.0.1")
        assert c.get("/v1/packs").json() == [], "nothing refused was stored"
        assert c.post("/v1/packs", content=data).status_code == 201
        other = {**files, "pack.py": files["pack.py"] + b"\n# changed\n"}
        _error(c.post("/v1/packs", content=_zip(other)), 409, "published already", "raise [pack] version")


def test_assignments_and_their_errors(live_server: LiveServer, archives: dict[str, bytes]) -> None:
    with httpx.Client(base_url=live_server.url) as c:
        assert c.put("/v1/pools/default", json={}).status_code == 200
        for v in ("1.0.0", "2.0.0"):
            assert c.post("/v1/packs", content=archives[v]).status_code == 201
        _error(c.put("/v1/pools/nowhere/pack", json={"pack": "simehr", "version": "1.0.0"}), 404, "no pool")
        _error(c.put("/v1/pools/default/pack", json={"pack": "simehr", "version": "7.0"}), 404, "not published",
               "1.0.0, 2.0.0")
        _error(c.put("/v1/pools/default/pack", json={"pack": "simehr"}), 400, "either version", "rollback")
        _error(c.put("/v1/pools/default/pack", json={"pack": "simehr", "rollback": True}), 409, "no earlier version")
        _error(c.put("/v1/pools/default/pack", json={"pack": "simehr", "version": "1.0.0", "max_unavailable": "0%"}),
               422, "max_unavailable")
        made = c.put("/v1/pools/default/pack", json={"pack": "simehr", "version": "2.0.0", "max_unavailable": "20%"})
        assert made.status_code == 201, made.text
        r = made.json()
        assert (r["version"], r["max_unavailable"], r["state"]) == ("2.0.0", "20%", "running")
        assert c.get("/v1/pools/default/packs").json()["simehr"]["id"] == r["id"]
        assert c.get(f"/v1/pools/default/rollouts/{r['id']}").json()["version"] == "2.0.0"
        _error(c.get("/v1/pools/other/rollouts/1"), 404)


def test_a_pool_with_no_machine_accepts_runs_of_a_published_pack(live_server: LiveServer,
                                                                  archives: dict[str, bytes]) -> None:
    with httpx.Client(base_url=live_server.url) as c:
        assert c.put("/v1/pools/burst", json={}).status_code == 200
        _error(c.post("/v1/runs", json={"automation": "simehr.which", "pool": "burst"}), 404, "unknown automation")
        assert c.post("/v1/packs", content=archives["1.0.0"]).status_code == 201
        # known now, but the pool has no machine and is not told to wait: still refused, saying why
        _error(c.post("/v1/runs", json={"automation": "simehr.which", "pool": "burst"}), 422, "no machine")
        assert c.put("/v1/pools/burst/pack", json={"pack": "simehr", "version": "1.0.0"}).status_code == 201
        run = c.post("/v1/runs", json={"automation": "simehr.which", "pool": "burst"})
        assert run.status_code == 201, run.text
        assert run.json()["state"] == "queued"
        # a pool that waits for capacity takes it once the automation is known
        assert c.put("/v1/pools/later", json={"allow_wait_for_capacity": True}).status_code == 200
        assert c.post("/v1/runs", json={"automation": "simehr.which", "pool": "later"}).status_code == 201


def test_a_run_pins_a_published_version_or_is_refused(live_server: LiveServer, archives: dict[str, bytes]) -> None:
    with httpx.Client(base_url=live_server.url) as c:
        assert c.put("/v1/pools/default", json={}).status_code == 200
        assert c.post("/v1/packs", content=archives["1.0.0"]).status_code == 201
        assert c.put("/v1/pools/default/pack", json={"pack": "simehr", "version": "1.0.0"}).status_code == 201
        _error(c.post("/v1/runs", json={"automation": "simehr.which", "pack_version": "3.1"}), 404,
               "simehr 3.1 is not published", "published: 1.0.0")
        _error(c.post("/v1/runs", json={"automation": "simehr.which", "pack_version": "../x"}), 422, "pack_version")
        run = c.post("/v1/runs", json={"automation": "simehr.which", "pack_version": "1.0.0"})
        assert run.status_code == 201, run.text
        assert run.json()["labels"] == {"deskfleet.pack/simehr": "1.0.0"}


def test_the_cli_builds_and_publishes_and_says_what_is_wrong(live_server: LiveServer, tmp_path: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "deskfleet", "--server", live_server.url, *args],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)

    pack = sim_pack(tmp_path / "v5", "5.0.0")
    assert cli("pools", "set", "default").returncode == 0
    done = cli("pack", "publish", str(pack), "--pool", "default", "--max-unavailable", "3")
    assert done.returncode == 0, done.stderr
    assert "published: pack simehr 5.0.0" in done.stderr and "pool default assigned simehr 5.0.0" in done.stderr
    shown = cli("pools", "pack", "default")
    assert shown.returncode == 0 and '"max_unavailable": "3"' in shown.stdout
    (pack / "pack.py").write_text((pack / "pack.py").read_text() + "\n# changed\n")
    refused = cli("pack", "publish", str(pack))
    assert refused.returncode == 1 and "published already" in refused.stderr and "Traceback" not in refused.stderr
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"PK\x03\x04 truncated")
    refused = cli("pack", "publish", str(junk))
    assert refused.returncode == 1 and "not a pack archive" in refused.stderr
    bad = cli("pools", "pack", "default", "--set", "simehr")
    assert bad.returncode == 2 and "PACK@VERSION" in bad.stderr
    # a pack that loads only where it was written (the shipped SimEHR: package-relative imports)
    # is refused at build, not on the machines
    built = cli("pack", "build", "simehr", "-o", str(tmp_path / "dist"))
    assert built.returncode == 1 and "does not load from its own files" in built.stderr, built.stderr
    assert not (tmp_path / "dist").exists()
