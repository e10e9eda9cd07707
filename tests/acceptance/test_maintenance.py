"""Rolling maintenance, for real: a pool of three machines made by the local provider — each
a real ``deskfleet agent`` process — is taken through an "OS update" one machine at a time
while runs keep arriving. Each machine is drained, updated (the provider's update command),
rebooted (a new process: a new boot id), re-verified by its agent's own pre-flight and put
back in service. Checked from outside: the API's campaign, machines and events, the files
the update wrote, and the invariant checker over every run.
"""

from __future__ import annotations

import asyncio
import shlex
import sys
import threading
from typing import Any

from test_autoscale import _agent_command, _provider

Cluster = Any  # tests/acceptance/conftest.py's

UPDATE = shlex.join([sys.executable, "-c", "import pathlib, sys; p = pathlib.Path(sys.argv[1], 'os-updates'); "
                     "p.write_text(p.read_text() + 'patched\\n' if p.exists() else 'patched\\n')", "{state_dir}"])
POLICY = {"min": 3, "max": 3, "provider": "here", "warm": {"min": 0, "max": 0}, "ready_time": 30,
          "maintenance": {"max_unavailable": 1, "timeout": 120}}


def test_a_rolling_update_drains_updates_reboots_and_reverifies_each_machine_while_runs_go_on(cluster: Cluster) -> None:
    c = cluster
    c.start_server("--provider", f"here=local:{_agent_command(c)}", "--provider-update", f"here={UPDATE}",
                   "--controller-tick", "0.5")
    try:
        c.wait_healthy()
        c.add_accounts()  # SimEHR's: a machine re-verified after its reboot logs in to prove it works
        c.client.put_pool("default", allow_wait_for_capacity=True)
        c.client.put_pool_policy("default", POLICY, version=0, comment="acceptance")
        def ready() -> list[str] | None:
            up = sorted(m["id"] for m in c.client.machines() if m["status"] == "ready")
            return up if len(up) == 3 else None

        names = c.wait_until(ready, 90, "three machines made by the provider")

        # Runs keep arriving all along; how many machines are out of service is watched.
        stop, worst, runs = threading.Event(), [0], []

        def load() -> None:
            i = 0
            while not stop.is_set():
                if len([r for r in runs if c.client.run(r)["state"] not in ("succeeded", "failed")]) < 2:
                    runs.append(c.client.submit("sim.work", {"key": f"maint-{i}", "seconds": 0.5})["id"])
                    i += 1
                out = [m for m in c.client.machines() if m["id"] in names and m["status"] not in ("ready", "busy")]
                worst[0] = max(worst[0], len(out))
                stop.wait(0.1)

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        try:
            campaign = c.client.start_maintenance("default", reason="acceptance patches")
            assert sorted(campaign["machines"]) == names and campaign["state"] == "running"
            done = c.wait_until(lambda: (m := c.client.maintenance("default", campaign["id"]))["state"] in (
                "done", "stalled") and m, 180, "the campaign's end")
        finally:
            stop.set()
            loader.join(10)
        assert done["state"] == "done" and done["counts"] == {"done": 3}, done
        assert worst[0] == 1, f"{worst[0]} machines out of service at once (max_unavailable 1)"

        events = c.all_events()
        steps: dict[str, list[str]] = {}
        for e in events:
            if e["kind"] == "maintenance.step":
                steps.setdefault(e["machine"], []).append(e["reason"])
        assert steps == {n: ["draining", "updating", "rebooting", "verifying", "done"] for n in names}, steps
        for name in names:
            # Updated once, by the provider's command, in the machine's own directory …
            updates = c.data_dir / "providers" / "here" / "machines" / name / "os-updates"
            assert updates.read_text() == "patched\n", name
            # … back from a new boot, and verified by its agent before it served again.
            connected = [e for e in events if e["kind"] == "machine.connected" and e["machine"] == name]
            assert [e["data"]["rebooted"] for e in connected][-1] is True, connected
            verified = [e for e in events if e["kind"] == "machine.verified" and e["machine"] == name]
            back = next(e for e in events if e["kind"] == "maintenance.step" and e["machine"] == name
                        and e["reason"] == "done")
            assert verified and verified[-1]["id"] < back["id"], name
        # The work went on, every run once and done.
        final = c.wait_final(set(runs), timeout=60)
        assert runs and {r["state"] for r in final.values()} == {"succeeded"}, final
        report, _, _ = c.audit()
        assert report.ok, report.violations
        assert not [e for e in events if e["kind"] in ("maintenance.machine_failed", "pool.provider_error")]
    finally:
        c.procs["server"].terminate()
        for m in asyncio.run(_provider(c).list()):
            asyncio.run(_provider(c).power_off(m.id, token=f"test-teardown-{m.id}"))
