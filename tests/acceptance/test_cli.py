"""The real ``deskfleet`` command, run as separate processes.

Bad arguments and unreachable servers must end in one clear line on stderr and a
non-zero exit, never a traceback. The happy path brings up ``deskfleet server`` and
``deskfleet agent --sim 2`` as subprocesses and drives them with the client commands.
Every process started here is stopped (and killed if it will not stop) in teardown.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from support import free_port

_SCRIPT = Path(sys.executable).with_name("deskfleet")
DESKFLEET = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "deskfleet"]


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without any DESKFLEET_* setting, and a wide terminal for tables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DESKFLEET_")}
    env.update({"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 30) -> Result:
    proc = subprocess.run([*DESKFLEET, *args], cwd=cwd, env=env or clean_env(), capture_output=True,
                          text=True, timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def assert_clean_failure(r: Result, *mentions: str) -> None:
    assert r.code != 0, f"exit 0 for a failure; stdout={r.out!r} stderr={r.err!r}"
    assert "Traceback" not in r.err and "Traceback" not in r.out, f"a traceback:\n{r.err}"
    assert r.err_lines, "nothing on stderr"
    for word in mentions:
        assert word in r.err, f"stderr does not mention {word!r}:\n{r.err}"


# -- bad arguments -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "mentions"), [
    (["submit", "x", "--input", "{bad"], ["--input", "not JSON"]),
    (["submit", "x", "--input", "[1, 2]"], ["--input", "JSON object"]),
    (["submit", "x", "--input", "@missing.json"], ["missing.json"]),
    (["submit", "x", "--label", "novalue"], ["--label", "novalue", "key=value"]),
    (["submit", "x", "--priority", "high"], ["--priority", "high"]),
    (["frobnicate"], ["frobnicate"]),
    (["runs", "list", "--limit", "0"], ["--limit"]),
    (["machines", "cordon"], ["MACHINE_ID"]),
    (["--log-level", "loud", "runs", "list"], ["--log-level", "loud"]),
    (["agent", "--label", "novalue"], ["--label", "novalue"]),
    (["agent", "--sim-faults", "bogus", "--orchestrator", "http://127.0.0.1:9", "--state-dir", "st",
      "--sim-backend", "st/ehr.db", "--enrolment-token", "t"], ["bogus", "'none', 'demo', 'chaos'"]),
], ids=["bad-json", "not-an-object", "missing-file", "label-without-value", "priority-not-int",
        "unknown-command", "limit-zero", "missing-argument", "bad-log-level", "agent-label", "agent-fault-preset"])
def test_bad_arguments_fail_clearly_without_a_traceback(tmp_path, args, mentions):
    r = cli(*args, cwd=tmp_path)
    assert_clean_failure(r, *mentions)
    assert r.out == ""


def test_a_bad_argument_is_one_line(tmp_path):
    r = cli("submit", "x", "--input", "{bad", cwd=tmp_path)
    assert_clean_failure(r, "--input", "not JSON")
    assert len(r.err_lines) == 1, f"expected one line on stderr, got:\n{r.err}"


@pytest.mark.parametrize("args", [
    ["runs", "list"],
    ["submit", "ehr.lookup_patient", "--input", '{"mrn": "X"}'],
    ["machines", "list"],
    ["runs", "show", "run_x", "--events"],
])
def test_an_unreachable_server_is_one_line(tmp_path, args):
    url = f"http://127.0.0.1:{free_port()}"
    r = cli("--server", url, *args, cwd=tmp_path)
    assert_clean_failure(r)
    assert r.code == 1
    assert len(r.err_lines) == 1, r.err
    assert r.err_lines[0].startswith(f"deskfleet: cannot reach the deskfleet server at {url}"), r.err


def test_server_refuses_to_listen_beyond_loopback_without_an_api_key(tmp_path):
    data = tmp_path / "data"
    for args, env in (
        (["server", "--host", "0.0.0.0", "--port", str(free_port()), "--data-dir", str(data)], None),
        (["server", "--port", str(free_port()), "--data-dir", str(data)], clean_env(DESKFLEET_SERVER_HOST="0.0.0.0")),
    ):
        r = cli(*args, cwd=tmp_path, env=env, timeout=20)
        assert_clean_failure(r, "0.0.0.0", "API key", "DESKFLEET_API_KEY")
        assert len(r.err_lines) == 1, r.err
    assert not data.exists(), "nothing is set up for a server that refused to start"


ENVVAR = re.compile(r"DESKFLEET_[A-Z0-9_]+")


@pytest.mark.parametrize(("command", "expected"), [
    ([], ["DESKFLEET_SERVER", "DESKFLEET_API_KEY", "DESKFLEET_LOG_LEVEL", "DESKFLEET_LOG_FORMAT"]),
    (["server"], ["DESKFLEET_SERVER_HOST", "DESKFLEET_SERVER_PORT", "DESKFLEET_SERVER_DATA_DIR",
                  "DESKFLEET_SERVER_DB", "DESKFLEET_SERVER_WEBHOOK_SECRET", "DESKFLEET_SERVER_HEARTBEAT_TIMEOUT"]),
    (["agent"], ["DESKFLEET_AGENT_MACHINE", "DESKFLEET_AGENT_POOL", "DESKFLEET_AGENT_ENROLMENT_TOKEN",
                 "DESKFLEET_AGENT_STATE_DIR"]),
    (["submit"], ["DESKFLEET_SUBMIT_POOL", "DESKFLEET_SUBMIT_WAIT", "DESKFLEET_SUBMIT_PRIORITY",
                  "DESKFLEET_SUBMIT_INPUT", "DESKFLEET_SUBMIT_VERSION"]),
], ids=["main", "server", "agent", "submit"])
def test_help_shows_the_environment_variables(tmp_path, command, expected):
    r = cli(*command, "--help", cwd=tmp_path)
    assert r.code == 0, r.err
    shown = set(ENVVAR.findall(r.out))
    missing = [name for name in expected if name not in shown]
    assert not missing, f"--help does not show {missing}; it shows {sorted(shown)}"
    malformed = sorted(name for name in shown if name.endswith("_") or "__" in name)
    assert not malformed, f"--help shows malformed variable names: {malformed}"
    # Every option has one (besides --help and --version).
    options = set(re.findall(r"^\s+(?:-\w, )?(--[a-z][a-z0-9-]*)", r.out, re.M)) - {"--help", "--version"}
    assert len(shown) >= len(options), f"{len(options)} options, {len(shown)} variables:\n{r.out}"


def test_an_advertised_environment_variable_is_honoured(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    r = cli("runs", "list", cwd=tmp_path, env=clean_env(DESKFLEET_SERVER=url))
    assert_clean_failure(r, url)


# -- the happy path, against real processes ------------------------------------------------------------


@dataclass
class Stack:
    url: str
    work: Path
    env: dict[str, str]
    procs: list[tuple[str, subprocess.Popen[bytes], Path]]

    def run(self, *args: str, timeout: float = 40) -> Result:
        return cli("--server", self.url, *args, cwd=self.work, env=self.env, timeout=timeout)

    def ok(self, *args: str, timeout: float = 40) -> Result:
        r = self.run(*args, timeout=timeout)
        assert r.code == 0, f"deskfleet {' '.join(args)} failed ({r.code}):\n{r.err}\n{self.logs()}"
        assert "Traceback" not in r.err
        return r

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args).out)

    def logs(self) -> str:
        return "\n".join(f"--- {name} ---\n{log.read_text()[-3000:]}" for name, _, log in self.procs)


def _start(name: str, args: list[str], work: Path, env: dict[str, str]) -> tuple[str, subprocess.Popen[bytes], Path]:
    log = work / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([*DESKFLEET, *args], cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
    return name, proc, log


def _stop(procs: list[tuple[str, subprocess.Popen[bytes], Path]]) -> None:
    for _, proc, _ in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for _, proc, _ in reversed(procs):
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _until(check: Any, timeout: float, what: str, stack: Stack) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc, _ in stack.procs:
            if proc.poll() is not None:
                pytest.fail(f"{name} exited ({proc.returncode}) while waiting for {what}\n{stack.logs()}")
        try:
            value = check()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}\n{stack.logs()}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("cli")
    port = free_port()
    env = clean_env()
    s = Stack(f"http://127.0.0.1:{port}", work, env, [])
    try:
        s.procs.append(_start("server", [
            "--log-level", "info", "server", "--port", str(port), "--data-dir", str(work / "data"),
            "--heartbeat-interval", "0.5", "--heartbeat-timeout", "3", "--stop-grace", "3",
            "--sqlite-synchronous", "NORMAL",
        ], work, env))
        _until(lambda: httpx.get(f"{s.url}/healthz", timeout=2).status_code == 200, 30, "the server", s)
        # The agents log in with accounts from the vault, put there as an operator would.
        added = subprocess.run([sys.executable, "-m", "deskfleet", "--server", s.url, "accounts", "add-demo",
                                "simehr", "--max-sessions", "2"], capture_output=True, text=True, env=env,
                               cwd=work, timeout=60)
        assert added.returncode == 0, added.stderr
        s.procs.append(_start("agent", [
            "agent", "--orchestrator", s.url, "--pack", "simehr", "--desktop", "sim", "--count", "2", "--machine", "cli",
            "--enrolment-token-file", str(work / "data" / "enrolment-token"),
            "--state-dir", str(work / "agent"), "--sim-backend", str(work / "agent" / "ehr.db"),
            "--action-delay", "0.01", "--screenshots", "none",
        ], work, env))

        def ready() -> bool:
            machines = httpx.get(f"{s.url}/v1/machines", timeout=2).json()
            return {m["id"] for m in machines if m["status"] == "ready"} == {"cli-01", "cli-02"}

        _until(ready, 30, "two ready machines", s)
        yield s
    finally:
        _stop(s.procs)
    for name, proc, _ in s.procs:
        assert proc.returncode is not None, f"{name} is still running"


def test_submit_and_wait_prints_the_succeeded_run(stack):
    run = stack.json("submit", "ehr.lookup_patient", "--input", '{"mrn": "CLI-1"}', "--wait", "20")
    assert run["state"] == "succeeded", run
    assert run["output"]["mrn"] == "CLI-1"
    assert run["current_machine"] in ("cli-01", "cli-02")
    (stack.work / "patient.json").write_text(json.dumps({"mrn": "CLI-2", "name": "Cleo Line", "dob": "1980-05-06"}))
    created = stack.json("submit", "ehr.create_patient", "--input", "@patient.json", "--wait", "20",
                         "--idempotency-key", "cli-patient-2")
    assert created["state"] == "succeeded" and created["output"]["mrn"] == "CLI-2"
    again = stack.json("submit", "ehr.create_patient", "--input", "@patient.json", "--wait", "20",
                       "--idempotency-key", "cli-patient-2")
    assert again["id"] == created["id"]


def test_submit_from_a_file_answers_every_line(stack):
    lines = [json.dumps({"automation": "ehr.lookup_patient", "input": {"mrn": f"CLI-F{i}"},
                         "idempotency_key": f"cli-file-{i}"}) for i in range(3)]
    lines += ["{not json", "", json.dumps({"automation": "ehr.lookup_patient", "input": {"mrn": "CLI-FX"},
                                           "idempotency_key": "cli-file-0"}),
              json.dumps({"automation": "ehr.lookup_patient", "priority": "high"}), "[1, 2]"]
    (stack.work / "runs.jsonl").write_text("\n".join(lines) + "\n")
    r = stack.run("submit", "--from", "runs.jsonl")
    assert r.code == 1 and "Traceback" not in r.err, r.err
    assert r.out.strip() == "runs.jsonl: 7 run(s): 3 created, 0 existing, 1 conflict, 3 invalid"
    assert r.err_lines[0] == "runs.jsonl:4: invalid: not JSON: Expecting property name enclosed in double quotes at column 2"
    assert r.err_lines[1].startswith("runs.jsonl:6: conflict: idempotency key 'cli-file-0' was already used")
    assert r.err_lines[2].startswith("runs.jsonl:7: invalid: priority:")
    assert r.err_lines[3] == "runs.jsonl:8: invalid: a run request is a JSON object"
    (stack.work / "again.jsonl").write_text("\n".join(lines[:3]) + "\n")
    again = stack.ok("submit", "--from", "again.jsonl")
    assert again.out.strip() == "again.jsonl: 3 run(s): 0 created, 3 existing, 0 conflict, 0 invalid"
    shown = stack.json("runs", "show", json.loads(stack.ok("submit", "ehr.lookup_patient", "--input", '{"mrn": "CLI-F0"}',
                                                           "--idempotency-key", "cli-file-0").out)["id"])
    assert shown["input"] == {"mrn": "CLI-F0"}
    r = stack.run("submit", "ehr.lookup_patient", "--from", "again.jsonl")
    assert_clean_failure(r, "--from takes every run's fields from its line")
    r = stack.run("submit", "--from", "again.jsonl", "--priority", "3")
    assert_clean_failure(r, "no run options with it")
    r = stack.run("submit")
    assert_clean_failure(r, "give the AUTOMATION to run, or --from FILE")


def test_runs_list_and_show_with_events(stack):
    run = stack.json("submit", "ehr.lookup_patient", "--input", '{"mrn": "CLI-3"}', "--wait", "20")
    assert run["state"] == "succeeded"
    listed = stack.ok("runs", "list").out
    row = next((line for line in listed.splitlines() if run["id"] in line), None)
    assert row is not None, f"run {run['id']} not in:\n{listed}"
    assert "ehr.lookup_patient" in row and "succeeded" in row
    newest = stack.ok("runs", "list", "--state", "succeeded", "--limit", "1").out
    assert run["id"] in newest

    shown = stack.json("runs", "show", run["id"], "--events")
    assert shown["id"] == run["id"] and shown["state"] == "succeeded"
    assert [e["to_state"] for e in shown["events"] if e["kind"] == "run.state"] == [
        "queued", "assigned", "preparing", "running", "succeeded"]
    assert [a["ending"] for a in shown["attempts"]] == ["succeeded"]
    plain = stack.json("runs", "show", run["id"])
    assert "events" not in plain

    r = stack.run("runs", "show", "run_nope")
    assert_clean_failure(r, "run_nope")
    assert len(r.err_lines) == 1, r.err
    r = stack.run("runs", "cancel", run["id"])
    assert_clean_failure(r, "already ended")
    assert len(r.err_lines) == 1, r.err


def test_machines_wait_returns_once_enough_are_up_and_says_what_they_do_if_not(stack):
    assert stack.ok("machines", "wait", "--count", "2").out.strip() == "2 machines up: cli-01, cli-02"
    r = stack.run("machines", "wait", "--count", "3", "--timeout", "1")
    assert_clean_failure(r, "2 of 3 machines up after 1s (cli-01 ready, cli-02 ready)")
    assert len(r.err_lines) == 1, r.err
    r = stack.run("machines", "wait", "--pool", "nowhere", "--timeout", "0.5")
    assert_clean_failure(r, "0 of 1 machines up after 0.5s (none has enrolled)")


def test_machines_list_cordon_and_uncordon(stack):
    table = stack.ok("machines", "list").out
    for machine in ("cli-01", "cli-02"):
        row = next((line for line in table.splitlines() if machine in line), "")
        assert "ready" in row, table
    assert stack.ok("machines", "cordon", "cli-01", "--reason", "acceptance").out.strip() == \
        "cli-01: cordoned (admin cordoned)"
    table = stack.ok("machines", "list").out
    assert "cordoned" in next(line for line in table.splitlines() if "cli-01" in line)
    for i in range(2):
        run = stack.json("submit", "ehr.lookup_patient", "--input", json.dumps({"mrn": f"CLI-C{i}"}), "--wait", "20")
        assert run["state"] == "succeeded" and run["current_machine"] == "cli-02"
    assert stack.ok("machines", "uncordon", "cli-01").out.strip() == "cli-01: ready (admin active)"
    stack.ok("machines", "cordon", "cli-02")
    run = stack.json("submit", "ehr.lookup_patient", "--input", '{"mrn": "CLI-U"}', "--wait", "20")
    assert run["current_machine"] == "cli-01"
    stack.ok("machines", "uncordon", "cli-02")
    r = stack.run("machines", "cordon", "ghost-01")
    assert_clean_failure(r, "ghost-01")
    assert len(r.err_lines) == 1, r.err


def test_pools_policy_show_change_history_and_demand(stack):
    shown = stack.json("pools", "policy", "default")
    assert (shown["version"], shown["policy"]["min"], shown["policy"]["max"], shown["policy"]["provider"]) == \
        (0, 0, None, None)
    made = stack.json("pools", "policy", "default", "--min", "2", "--max", "8", "--comment", "acceptance")
    assert (made["version"], made["policy"]["min"], made["policy"]["max"], made["comment"]) == (1, 2, 8, "acceptance")
    policy = {**made["policy"], "schedule": [{"cron": "0 8 * * mon-fri", "hours": 10, "floor": 4,
                                              "timezone": "Europe/Berlin"}]}
    policy_file = stack.work / "policy.json"
    policy_file.write_text(json.dumps(policy))
    assert stack.json("pools", "policy", "default", "--set", str(policy_file))["version"] == 2
    # A change made to a version somebody else has changed since is refused, in one line.
    r = stack.run("pools", "policy", "default", "--min", "3", "--version", "1")
    assert_clean_failure(r, "at version 2, not 1", "read it again")
    assert len(r.err_lines) == 1, r.err
    # So is a policy that cannot hold, saying which field.
    r = stack.run("pools", "policy", "default", "--min", "9")
    assert_clean_failure(r, "max (8) is below min (9)")
    policy_file.write_text("{not json")
    assert_clean_failure(stack.run("pools", "policy", "default", "--set", str(policy_file)), "is not JSON")
    assert [v["version"] for v in stack.json("pools", "history", "default")] == [2, 1]
    demand = stack.json("pools", "demand", "default")
    assert demand["pool"] == "default" and demand["policy_version"] == 2
    assert demand["busy"] + demand["idle"] <= 2 and demand["target"] >= 2  # at least min
    assert_clean_failure(stack.run("pools", "demand", "ghost"), "no pool 'ghost'")


def test_pools_maintenance_start_show_follow_and_cancel(stack):
    r = stack.run("pools", "maintenance", "start", "default")
    assert_clean_failure(r, "has no provider")
    assert len(r.err_lines) == 1, r.err
    stack.json("pools", "policy", "default", "--provider", "nowhere", "--max", "8")
    made = stack.json("pools", "maintenance", "start", "default", "--reason", "patches", "--machine", "cli-01")
    assert (made["state"], list(made["machines"]), made["reason"]) == ("running", ["cli-01"], "patches")
    assert_clean_failure(stack.run("pools", "maintenance", "start", "default"), "is running", "cancel it")
    # This server has no provider "nowhere": the campaign says why it waits.
    shown = stack.json("pools", "maintenance", "show", "default", str(made["id"]))
    assert shown["id"] == made["id"]
    assert [c["id"] for c in stack.json("pools", "maintenance", "show", "default")] == [made["id"]]
    assert stack.json("pools", "maintenance", "cancel", "default", str(made["id"]))["state"] == "cancelling"
    # Followed to its end: a line on stderr at each change, the campaign as it ended on stdout.
    followed = stack.run("pools", "maintenance", "show", "default", "--wait")
    assert followed.code == 0, followed.err
    assert json.loads(followed.out)["state"] == "cancelled"
    assert f"maintenance {made['id']} of default: cancelled" in followed.err
    assert_clean_failure(stack.run("pools", "maintenance", "cancel", "default", str(made["id"])), "nothing to cancel")
    stack.json("pools", "policy", "default", "--provider", "none")


def test_server_errors_are_one_line(stack):
    r = stack.run("submit", "ehr.delete_everything", "--wait", "1")
    assert_clean_failure(r, "unknown automation", "ehr.lookup_patient")
    assert len(r.err_lines) == 1, r.err
    r = stack.run("submit", "ehr.lookup_patient", "--input", '{"mrn": "CLI-4"}', "--label", "os=windows")
    assert_clean_failure(r, "os=windows")
    assert len(r.err_lines) == 1, r.err
    env_run = cli("runs", "list", cwd=stack.work, env=clean_env(DESKFLEET_SERVER=stack.url))
    assert env_run.code == 0, env_run.err
