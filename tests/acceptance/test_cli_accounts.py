"""``deskfleet accounts`` and ``deskfleet keys`` as an operator runs them: real processes.

Secrets come from stdin or a file, never from the command line (a secret on argv is
refused without being repeated), and nothing prints them back. The key is rotated while the
server and an agent run: runs that log in with MFA keep working, an idempotency key sent
again after the rotation still finds its run, and a server holding only the old key
refuses to start.
"""

from __future__ import annotations

import json
import os
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

from deskfleet.sim import SimBackend
from support import free_port

_SCRIPT = Path(sys.executable).with_name("deskfleet")
DESKFLEET = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "deskfleet"]
PASSWORD = "Tr0ub4dor&3-not-echoed"
SEED = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"


@dataclass
class Out:
    code: int
    out: str
    err: str

    @property
    def both(self) -> str:
        return self.out + self.err


@dataclass
class Stack:
    url: str
    work: Path
    env: dict[str, str]
    procs: dict[str, subprocess.Popen[bytes]]

    def cli(self, *args: str, stdin: str | None = None, timeout: float = 60) -> Out:
        p = subprocess.run([*DESKFLEET, "--server", self.url, *args], cwd=self.work, env=self.env, input=stdin,
                           capture_output=True, text=True, timeout=timeout)
        return Out(p.returncode, p.stdout, p.stderr)

    def ok(self, *args: str, stdin: str | None = None, timeout: float = 60) -> Out:
        r = self.cli(*args, stdin=stdin, timeout=timeout)
        assert r.code == 0, f"deskfleet {' '.join(args)} failed ({r.code}): {r.err}\n{self.logs()}"
        assert "Traceback" not in r.err
        return r

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        with (self.work / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen([*DESKFLEET, *args], cwd=self.work, env=self.env, stdout=log,
                                    stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def start_server(self) -> None:
        self.start("server", "server", "--port", self.url.rsplit(":", 1)[1], "--data-dir", str(self.work / "data"),
                   "--heartbeat-interval", "0.3", "--heartbeat-timeout", "2", "--sqlite-synchronous", "NORMAL")
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert self.procs["server"].poll() is None, self.logs()
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.1)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.read_text()[-2500:]}" for p in self.work.glob("*.log"))


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DESKFLEET_")}
    env.update({"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb", "PYTHONUNBUFFERED": "1"})
    s = Stack(f"http://127.0.0.1:{free_port()}", tmp_path, env, {})
    try:
        s.start_server()
        yield s
    finally:
        for name in list(s.procs):
            s.stop(name)


def test_secrets_come_from_stdin_or_a_file_and_are_never_shown(stack):
    made = stack.ok("accounts", "set", "robot1", "--app", "demoehr", "--password-stdin", stdin=PASSWORD + "\n")
    assert "created" in made.err and "password set" in made.err
    (stack.work / "seed.txt").write_text(SEED + "\n")
    (stack.work / "pw.txt").write_text(PASSWORD + "-2")
    changed = stack.ok("accounts", "set", "robot1", "--totp-seed-file", "seed.txt", "--password-file", "pw.txt",
                       "--max-sessions", "2", "--label", "site=lyon")
    assert "updated" in changed.err and "TOTP set" in changed.err
    shown = json.loads(stack.ok("accounts", "show", "robot1").out)
    assert shown["has_password"] and shown["has_totp"] and shown["max_sessions"] == 2
    assert shown["labels"] == {"site": "lyon"} and shown["username"] == "robot1"
    listed = stack.ok("accounts", "list")
    assert "robot1" in listed.out and "0/2" in listed.out
    for r in (made, changed, listed, stack.ok("accounts", "show", "robot1")):
        assert PASSWORD not in r.both and SEED not in r.both
    removed = stack.ok("accounts", "remove", "robot1")
    assert "removed" in removed.err
    gone = stack.cli("accounts", "show", "robot1")
    assert gone.code == 1 and "no account 'robot1'" in gone.err
    assert PASSWORD not in (stack.work / "server.log").read_text()


@pytest.mark.parametrize("args", [
    ["--password", PASSWORD],
    [f"--password={PASSWORD}"],
    ["--password-stdin", "--totp-seed", SEED],
])
def test_a_secret_on_the_command_line_is_refused_without_being_repeated(stack, args):
    r = stack.cli("accounts", "set", "robot1", "--app", "demoehr", *args, stdin="x\n")
    assert r.code == 2, r
    lines = [line for line in r.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("deskfleet: ")
    assert "-stdin" in lines[0] and "-file" in lines[0]
    assert PASSWORD not in r.both and SEED not in r.both
    assert stack.ok("accounts", "list").out.count("robot1") == 0, "nothing was written"


@pytest.mark.parametrize(("args", "stdin", "says"), [
    (["--password-stdin"], "", "empty"),
    (["--password-stdin", "--totp-seed-stdin"], "a\nb\n", "only one secret can come from stdin"),
    (["--password-file", "missing.txt"], None, "missing.txt"),
    ([], None, "needs a password"),
    (["--password-stdin", "--max-sessions", "0"], "pw\n", "at least 1"),
    (["--password-stdin", "--totp-seed-file", "bad-seed.txt"], "pw\n", "base32"),
])
def test_bad_account_commands_fail_with_one_line_and_write_nothing(stack, args, stdin, says):
    (stack.work / "bad-seed.txt").write_text("not a seed at all\n")
    r = stack.cli("accounts", "set", "robot1", *args, stdin=stdin)
    assert r.code != 0 and "Traceback" not in r.err
    assert says in r.err, r.err
    assert "not a seed at all" not in r.err
    assert "robot1" not in stack.ok("accounts", "list").out


def test_keys_rotate_while_the_server_and_an_agent_run(stack):
    stack.ok("accounts", "add-demo", "simehr", "--max-sessions", "2")
    stack.start("agent", "agent", "--orchestrator", stack.url, "--pack", "simehr", "--desktop", "sim", "--count", "1", "--machine", "rot",
                "--enrolment-token-file", str(stack.work / "data" / "enrolment-token"),
                "--state-dir", str(stack.work / "agent"), "--sim-backend", str(stack.work / "ehr.db"),
                "--action-delay", "0.01", "--screenshots", "none")
    deadline = time.monotonic() + 30
    while not any(m["status"] == "ready" for m in httpx.get(f"{stack.url}/v1/machines").json()):
        assert time.monotonic() < deadline, stack.logs()
        time.sleep(0.1)

    def submit(mrn: str, account: str, key: str) -> Any:
        return json.loads(stack.ok("submit", "ehr.lookup_patient", "--input", json.dumps({"mrn": mrn}),
                                   "--session-key", account, "--idempotency-key", key, "--wait", "40").out)

    first = submit("K-1", "clinic-a", "rot-1")  # clinic-a answers MFA at every login: a TOTP code
    assert first["state"] == "succeeded", first
    key_file = stack.work / "data" / "secret.key"
    old_keys = [line for line in key_file.read_text().splitlines() if line and not line.startswith("#")]
    rotated = stack.ok("keys", "rotate", "--data-dir", str(stack.work / "data"), "--wait", "20")
    assert "every secret is encrypted with" in rotated.err, rotated.err
    status = stack.ok("keys", "status", "--data-dir", str(stack.work / "data")).out
    assert "2 key(s)" in status and status.count("in use") == 1
    assert "encrypts with" in status
    for line in old_keys:
        assert line not in rotated.both + status, "a key was printed"
    # The same request again after the rotation: the same run (its fingerprint did not change).
    assert submit("K-1", "clinic-a", "rot-1")["id"] == first["id"]
    second = submit("K-2", "clinic-b", "rot-2")  # a new login with MFA, secrets under the new key
    assert second["state"] == "succeeded", second
    retired = stack.ok("keys", "rotate", "--data-dir", str(stack.work / "data"), "--reencrypt-only", "--retire")
    assert "removed 1 older key" in retired.err
    time.sleep(1.5)  # the server re-reads the file
    assert submit("K-3", "clinic-a", "rot-3")["state"] == "succeeded"
    # A server holding only the old key cannot decrypt what is stored: it refuses to start.
    stack.stop("agent")
    stack.stop("server")
    (stack.work / "old.key").write_text("\n".join(old_keys) + "\n")
    r = subprocess.run([*DESKFLEET, "server", "--port", str(free_port()), "--data-dir", str(stack.work / "data"),
                        "--secret-key-file", str(stack.work / "old.key")],
                       cwd=stack.work, env=stack.env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "secret keys do not include every key" in r.stderr and "Traceback" not in r.stderr
    assert not any(k in r.stderr for k in old_keys)
    for name in ("clinic-a", "clinic-b"):
        secret = SimBackend.credentials(1)[name].password
        assert secret not in stack.logs()
