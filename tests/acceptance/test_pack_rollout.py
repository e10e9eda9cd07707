"""Pack rollouts, for real: an orchestrator process and an agent process with ten simulated
machines running SimEHR 1.0.0 (a copy of the shipped pack, from its directory). Versions
are built and published with the CLI; the pool is assigned 2.0.0 while runs keep arriving,
then a broken 3.0.0 (its ``pack check`` fails on the machines), then rolled back twice.
Checked from outside: the API's rollouts, machines and events, the agents' state
directory, what each run's automation says about the version that ran it, and the
invariant checker over every run.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from simpacks import sim_pack

Cluster = Any  # tests/acceptance/conftest.py's

MACHINES = 10
LABEL = "deskfleet.pack/simehr"


def _cli(c: Cluster, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "deskfleet", "--server", c.url, *args],
                          capture_output=True, text=True, timeout=180, cwd=c.root)
    if ok:
        assert done.returncode == 0, f"deskfleet {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


def _versions(c: Cluster, names: list[str]) -> dict[str, str | None]:
    return {m["id"]: m["labels"].get(LABEL) for m in c.client.machines() if m["id"] in names}


class Load:
    """Runs kept arriving, a few in flight at all times; how many machines are out of service
    is watched meanwhile."""

    def __init__(self, c: Cluster, names: list[str], in_flight: int = 4) -> None:
        self.c, self.names, self.in_flight = c, names, in_flight
        self.runs: list[str] = []
        self.worst = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._load, daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)
        self.c.wait_final(set(self.runs[-self.in_flight:]), timeout=60)  # the last few may still be in flight

    def _load(self) -> None:
        c, i = self.c, 0
        open_runs: list[str] = []
        while not self._stop.is_set():
            open_runs = [r for r in open_runs if c.client.run(r)["state"] not in c.FINAL]
            while len(open_runs) < self.in_flight:
                run = c.client.submit("sim.work", {"key": f"roll-{len(self.runs)}-{i}", "seconds": 0.4})["id"]
                open_runs.append(run)
                self.runs.append(run)
                i += 1
            out = [m for m in c.client.machines() if m["id"] in self.names and m["status"] not in ("ready", "busy")]
            self.worst = max(self.worst, len(out))
            self._stop.wait(0.1)


def _steps(events: list[dict[str, Any]], rollout: int) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for e in events:
        if e["kind"] == "rollout.step" and e["data"].get("rollout") == rollout:
            out.setdefault(e["machine"], []).append(e["reason"])
    return out


def _most_away(events: list[dict[str, Any]], rollout: int) -> int:
    """The most machines the rollout had out of service at once, replayed from its events."""
    away: set[str] = set()
    most = 0
    for e in events:
        if e["kind"] == "rollout.step" and e["data"].get("rollout") == rollout:
            if e["reason"] in ("draining", "installing"):
                away.add(e["machine"])
            else:
                away.discard(e["machine"])
            most = max(most, len(away))
    return most


def test_a_pack_version_rolls_out_under_load_a_broken_one_stalls_and_a_rollback_restores_the_old(
        cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    v1 = sim_pack(tmp_path / "packs" / "v1", "1.0.0")
    v2 = sim_pack(tmp_path / "packs" / "v2", "2.0.0")
    v3 = sim_pack(tmp_path / "packs" / "v3", "3.0.0", broken=True)
    c.start_server("--controller-tick", "0.3")
    c.wait_healthy()
    c.add_accounts()
    state_dir = c.root / "agent-roll"
    c._proc("roll", [
        "agent", "--orchestrator", c.url, "--pack", str(v1), "--desktop", "sim", "--machine", "roll",
        "--count", str(MACHINES), "--sim-backend", str(c.backend), "--state-dir", str(state_dir),
        "--enrolment-token-file", str(c.data_dir / "enrolment-token"), "--action-delay", "0.02"])
    names = [f"roll-{i:02d}" for i in range(1, MACHINES + 1)]
    c.wait_ready(set(names), timeout=60)
    assert set(_versions(c, names).values()) == {"1.0.0"}, "each machine reports the pack version it runs"

    # Built reproducibly, published with its hash; the same archive again is a no-op.
    built = _cli(c, "pack", "build", str(v2), "-o", str(tmp_path / "dist"))
    assert "sha256 " in built.stdout
    archive = tmp_path / "dist" / "simehr-2.0.0.zip"
    first = archive.read_bytes()
    _cli(c, "pack", "build", str(v2), "-o", str(tmp_path / "dist"))
    assert archive.read_bytes() == first, "the same files make the same archive"
    _cli(c, "pack", "publish", str(v1))
    assert "published" in _cli(c, "pack", "publish", str(archive)).stderr
    assert "already published" in _cli(c, "pack", "publish", str(archive)).stderr
    _cli(c, "pack", "publish", str(v3))
    assert [p["version"] for p in c.client.packs("simehr")] == ["3.0.0", "2.0.0", "1.0.0"]

    with Load(c, names) as load:
        # -- 2.0.0, rolled out two machines at a time while runs keep arriving ---------------------
        rollout = c.client.assign_pack("default", "simehr", "2.0.0", max_unavailable=2, reason="acceptance")
        assert rollout["from_version"] == "1.0.0"
        pinned: list[tuple[str, str]] = []
        while (r := c.client.rollout("default", rollout["id"]))["state"] == "running":
            # Runs pinned to either version meanwhile: each must run that version's code.
            for version in ("1.0.0", "2.0.0"):
                if len(pinned) < 12:
                    pinned.append((version, c.client.submit("simehr.which", {}, pack_version=version)["id"]))
            threading.Event().wait(0.5)
        assert r["state"] == "done" and r["counts"] == {"done": MACHINES}, r
        assert set(_versions(c, names).values()) == {"2.0.0"}
        for version, run_id in pinned:
            # Every run pinned to 2.0.0 has a machine now; one pinned to 1.0.0 that had none
            # left before the rollout ended waits for the rollback below (a slow host).
            if version == "2.0.0":
                done = c.client.run(run_id, wait=60)
                assert done["state"] == "succeeded" and done["output"] == {"version": version}, done
        # the version stays pinnable: one on 1.0.0 now waits for a machine that runs it
        waiting = c.client.submit("simehr.which", {}, pack_version="1.0.0", queue_timeout=120)

        # -- 3.0.0 fails its check on the machines: they stay on 2.0.0, and the rollout stalls ---------
        bad = c.client.assign_pack("default", "simehr", "3.0.0")
        assert bad["max_unavailable"] == "2"  # the previous rollout's
        bad = c.wait_until(lambda: (x := c.client.rollout("default", bad["id"]))["state"] != "running" and x,
                           90, "the broken version's rollout to stall")
        assert bad["state"] == "stalled" and bad["counts"]["failed"] == 2, bad
        assert bad["counts"].get("done", 0) == 0 and bad["counts"]["pending"] == MACHINES - 2
        for step in bad["machines"].values():
            if step["step"] == "failed":
                assert "check" in step["detail"] and "ghost" in step["detail"], step
        assert set(_versions(c, names).values()) == {"2.0.0"}, "a failed install keeps the old version"
        assert not (state_dir / "packs" / "simehr" / "3.0.0").exists(), "nothing half-installed is left"
        assert not [p for p in (state_dir / "packs" / "simehr").iterdir() if p.name.startswith(".")]

        # -- rolled back: to 2.0.0 (what 3.0.0 replaced), then to 1.0.0 (what 2.0.0 replaced) --------
        back = _cli(c, "pools", "pack", "default", "--rollback", "simehr", "--wait")
        assert '"version": "2.0.0"' in back.stdout, back.stdout
        back = _cli(c, "pools", "pack", "default", "--rollback", "simehr", "--wait")
        assert '"version": "1.0.0"' in back.stdout, back.stdout
        assert set(_versions(c, names).values()) == {"1.0.0"}, "the rollback restored the old version everywhere"
        assert c.client.run(waiting["id"], wait=30)["output"] == {"version": "1.0.0"}
        for version, run_id in pinned:
            done = c.client.run(run_id, wait=60)
            assert done["state"] == "succeeded", done
            assert done["output"] == {"version": version}, f"pinned to {version}, ran {done['output']}"
    last = c.client.rollouts("default", limit=1)[0]
    assert last["state"] == "done" and last["counts"] == {"done": MACHINES}, last

    # -- nothing interrupted, limits held, every step an event ------------------------------------------
    events = c.all_events()
    for r_id in (rollout["id"], last["id"]):
        assert _most_away(events, r_id) <= 2, f"rollout {r_id} had more than max_unavailable out at once"
        assert all(s == ["draining", "installing", "done"] for s in _steps(events, r_id).values()), _steps(events, r_id)
    assert load.worst <= 2, f"{load.worst} machines out of service at once"
    kinds = {e["kind"] for e in events}
    assert {"pack.published", "pool.pack_assigned", "pack.installing", "pack.installed", "pack.switched",
            "pack.install_failed", "rollout.step", "rollout.done", "rollout.stalled"} <= kinds, kinds
    switched = [e for e in events if e["kind"] == "pack.switched" and not e["data"].get("already")]
    assert len(switched) == 2 * MACHINES, "each machine switched to 2.0.0 and back to 1.0.0 once"
    runs = [c.client.run(r) for r in load.runs]
    assert len(runs) > 20 and all(r["state"] == "succeeded" and r["attempts_started"] == 1 for r in runs), [
        (r["id"], r["state"], r["attempts_started"]) for r in runs if r["state"] != "succeeded" or r["attempts_started"] != 1]
    report, _, _ = c.audit()
    assert report.ok, report.problems
