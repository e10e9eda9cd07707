"""A pool that sizes itself, for real: the orchestrator's controller creates machines through
the local provider — each a real ``deskfleet agent`` process on this host — for a burst of
runs, and retires them once the burst is over. Checked from outside: the API's machines and
events, and the processes themselves.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from deskfleet.providers import LocalProvider
from deskfleet.providers.local import running

Cluster = Any  # tests/acceptance/conftest.py's

POLICY = {"min": 1, "max": 4, "provider": "here", "warm": {"min": 0, "max": 0}, "ready_time": 30,
          "scale_in": {"stabilization": 3, "drain_timeout": 60}}


def _agent_command(c: Cluster) -> str:
    return shlex.join([
        sys.executable, "-m", "deskfleet", "agent", "--orchestrator", c.url, "--pack", "simehr", "--desktop", "sim",
        "--machine", "{name}", "--exact-name", "--sim-backend", str(c.backend), "--state-dir", "{state_dir}",
        "--enrolment-token-file", str(c.data_dir / "enrolment-token"), "--action-delay", "0.01",
    ])


@contextmanager
def provided(c: Cluster) -> Iterator[None]:
    """The cluster's server with the local provider ``here``; afterwards the machines it made
    — which outlive it, as VMs would — are powered off, once the server (whose controller
    would replace them) is gone."""
    c.start_server("--provider", f"here=local:{_agent_command(c)}", "--controller-tick", "0.5")
    try:
        yield
    finally:
        c.procs["server"].terminate()
        for m in asyncio.run(_provider(c).list()):
            asyncio.run(_provider(c).power_off(m.id, token=f"test-teardown-{m.id}"))


def _provider(c: Cluster) -> LocalProvider:
    return LocalProvider([sys.executable], state_dir=c.data_dir / "providers" / "here", name="here")


def _pids(c: Cluster) -> dict[str, int]:
    state = json.loads((c.data_dir / "providers" / "here" / "local-provider.json").read_text())
    return {name: m["pid"] for name, m in state["machines"].items()}


def test_a_burst_scales_the_pool_out_through_the_local_provider_and_back_in_after_it(cluster: Cluster) -> None:
    with provided(cluster):
        _scale_out_and_in(cluster)


def _scale_out_and_in(c: Cluster) -> None:
    c.wait_healthy()
    c.client.put_pool("default", allow_wait_for_capacity=True)
    c.client.put_pool_policy("default", POLICY, version=0, comment="acceptance")

    def serving() -> list[dict[str, Any]]:
        return [m for m in c.client.machines() if m["status"] in ("ready", "busy")]

    # The floor: one machine, created and enrolled with no run in sight.
    first = c.wait_until(lambda: serving() or None, 60, "the pool's first machine")
    assert len(first) == 1 and first[0]["id"].startswith("default-"), first

    # A burst: four runs of 4 s. Three more machines (max 4), each run on its own machine.
    runs = [c.client.submit("sim.work", {"key": f"burst-{i}", "seconds": 4.0})["id"] for i in range(4)]
    done = c.wait_final(set(runs), timeout=90)
    assert {r["state"] for r in done.values()} == {"succeeded"}, done
    assert len({r["current_machine"] for r in done.values()}) >= 3, "the burst ran on the machines made for it"
    events = c.all_events()
    created = [e for e in events if e["kind"] == "machine.lifecycle" and e["reason"] == "provisioning"]
    assert len(created) == 4, [e["machine"] for e in created]
    scaled = [e for e in events if e["kind"] == "pool.scaled" and e["data"]["create"]]
    assert scaled and "create" in scaled[-1]["reason"]
    ready = [e for e in events if e["kind"] == "machine.lifecycle" and e["reason"] == "ready"]
    assert {e["machine"] for e in ready} == {e["machine"] for e in created}

    # After it, the idle machines go — drained, destroyed, their processes gone — down to the floor.
    c.wait_until(lambda: len(serving()) == 1 or None, 60, "the pool back at its floor")
    time.sleep(1.0)
    events = c.all_events()
    destroyed = {e["machine"] for e in events if e["kind"] == "machine.lifecycle" and e["reason"] == "destroyed"}
    assert len(destroyed) == 3 and destroyed <= {e["machine"] for e in created}
    assert not [e for e in events if e["kind"] in ("pool.provider_error", "pool.machine_failed")]
    pids = _pids(c)
    for name in destroyed:
        pid = pids[name]
        assert not running(pid), f"{name}'s agent (pid {pid}) is still running after it was destroyed"
    # Every run accounted for, once.
    report, _, _ = c.audit()
    assert report.ok, report.violations
    # And the pool stays at its floor: nothing more is created, nothing flaps.
    time.sleep(3.0)
    after = [e for e in c.all_events() if e["kind"] == "machine.lifecycle" and e["reason"] in ("provisioning", "destroyed")]
    assert len(after) == len(created) + len(destroyed), [(e["machine"], e["reason"]) for e in after]


def test_a_machine_paused_mid_effect_is_powered_off_before_its_run_moves(cluster: Cluster) -> None:
    """Issue 12, item 8c: a machine whose agent — with everything it started — is paused
    (SIGSTOP of the whole process group: what a hypervisor's pause does to a VM) past its
    lease, halfway into ``sim.work`` whose effect is yet to come. The run is neither
    idempotent nor safe to retry while that machine might wake: the orchestrator powers it
    off through the pool's provider first (STONITH), and only then is the run reconciled and
    retried elsewhere. 0 double effects, and the paused machine never runs again."""
    c = cluster
    with provided(c):
        c.wait_healthy()
        c.client.put_pool("default", allow_wait_for_capacity=True)
        c.client.put_pool_policy("default", {**POLICY, "min": 2, "max": 3}, version=0)
        c.wait_until(lambda: len([m for m in c.client.machines() if m["status"] == "ready"]) == 2 or None,
                     60, "two machines made by the provider")
        run = c.client.submit("sim.work", {"key": "STONITH-1", "seconds": 3.0})
        step = c.wait_until(lambda: next((e for e in c.client.events(run["id"])
                                          if e["kind"] == "attempt.progress" and e["reason"] == "work"), None),
                            30, "the work step")
        paused, pid = step["machine"], _pids(c)[step["machine"]]
        os.killpg(pid, signal.SIGSTOP)  # before the effect, which lands 1.5 s into the work
        try:
            done = c.client.run(run["id"], wait=60)
        finally:
            if running(pid):
                os.killpg(pid, signal.SIGCONT)
        assert done["state"] == "succeeded" and done["current_machine"] != paused, done
        events = c.all_events()
        fenced = [e for e in events if e["kind"] == "machine.fenced"]
        assert [(e["machine"], e["data"]["attempt"]) for e in fenced] == [(paused, step["attempt"])], fenced
        order = [e["kind"] for e in events if e["run"] == run["id"] or e["kind"] == "machine.fenced"]
        assert order.index("machine.fenced") < order.index("run.fence_released") < \
            max(i for i, k in enumerate(order) if k == "attempt.ended"), order
        assert not running(pid), "the paused machine's agent survived its fence"
    with c.records() as ehr:
        assert ehr.work_done_by("STONITH-1") == [done["current_machine"]]
