"""``deskfleet api-keys``, ``whoami`` and ``audit`` as real processes against a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

_SCRIPT = Path(sys.executable).with_name("deskfleet")
DESKFLEET = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "deskfleet"]
BOOT = "boot-cli-9e0f"


@dataclass
class Out:
    code: int
    out: str
    err: str


def run(url: str, *args: str, key: str | None = BOOT) -> Out:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DESKFLEET_")}
    if key:
        env["DESKFLEET_API_KEY"] = key
    p = subprocess.run([*DESKFLEET, "--server", url, *args], env=env, capture_output=True, text=True, timeout=60)
    assert "Traceback" not in p.stderr, p.stderr
    return Out(p.returncode, p.stdout, p.stderr)


def test_keys_are_made_listed_and_revoked_and_the_audit_log_read_from_the_cli(server_factory):
    server = server_factory(api_key=BOOT)
    made = run(server.url, "api-keys", "create", "acme ci", "--role", "submitter", "--tenant", "acme",
               "--expires", "30d")
    assert made.code == 0, made.err
    key = made.out.strip()
    assert key.startswith("dfk_") and len(made.out.splitlines()) == 1, "the key alone on stdout"
    assert "shown this once" in made.err and "submitter of tenant acme" in made.err and key not in made.err
    quiet = run(server.url, "api-keys", "create", "ops", "--role", "operator", "--screenshots", "-q")
    assert quiet.code == 0 and quiet.err == "" and quiet.out.strip().startswith("dfk_")

    me = run(server.url, "whoami", key=key)
    assert me.code == 0 and json.loads(me.out)["tenant"] == "acme"
    listed = run(server.url, "api-keys", "list", "--json")
    assert {k["name"]: k["state"] for k in json.loads(listed.out)} == {"acme ci": "active", "ops": "active"}
    assert key not in listed.out

    # What a key may not do, said in one line.
    refused = run(server.url, "api-keys", "list", key=key)
    assert refused.code != 0 and "keys.admin" in refused.err and "admin role" in refused.err
    wrong = run(server.url, "runs", "list", key="dfk_aaaaaaaaaa_" + "x" * 43)
    assert wrong.code != 0 and "unknown API key dfk_aaaaaaaaaa" in wrong.err
    bad = run(server.url, "api-keys", "create", "x", "--role", "admin", "--expires", "soon")
    assert bad.code != 0 and "--expires" in bad.err

    revoked = run(server.url, "api-keys", "revoke", key[:14])
    assert revoked.code == 0 and "revoked" in revoked.out
    after = run(server.url, "whoami", key=key)
    assert after.code != 0 and "revoked" in after.err

    log = run(server.url, "audit", "--limit", "20")
    assert log.code == 0
    lines = log.out.splitlines()
    assert any("api_key.created" in line for line in lines) and any("api_key.revoked" in line for line in lines)
    ids = [int(line.split()[0]) for line in lines]
    assert ids == sorted(ids), "newest last"
    denied = run(server.url, "audit", "--outcome", "denied", "--json")
    entries = [json.loads(line) for line in denied.out.splitlines()]
    assert entries and {e["outcome"] for e in entries} == {"denied"}
    assert any("keys.admin" in e["detail"].get("reason", "") for e in entries)
    assert [e["id"] for e in entries] == sorted(e["id"] for e in entries), "oldest first, newest last"
