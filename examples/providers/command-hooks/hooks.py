#!/usr/bin/env python3
"""Reference hooks for deskfleet's CommandProvider: a "hypervisor" kept in a JSON file.

Copy this file and replace the few lines marked HYPERVISOR with calls to yours (Hyper-V's
PowerShell, vSphere's govc, Proxmox's pvesh…); keep the rest — reading the request, the
token bookkeeping that makes a retried call harmless, the answer and the exit statuses.
The contract is in docs/providers.md.

Run it either way the provider supports:

* as one command, the operation first: ``hooks.py create`` (``CommandProvider(["python3",
  "hooks.py"])``) — the way to go on Windows;
* as a directory of hooks: the files ``create``, ``get``… beside it are links to this
  script, which takes the operation from the name it was run by.

Its state (the machines and the tokens already acted on) is the JSON file named by
``DESKFLEET_HOOKS_STATE``, locked while a hook reads and writes it, since the provider
runs hooks concurrently. Standard library only.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

OPS = ("create", "start", "stop", "reboot", "power_off", "destroy", "get", "list", "tag", "update")
EX_NOTFOUND = 3
EX_TEMPFAIL = 75
EX_FAILED = 1


class HookError(Exception):
    def __init__(self, message: str, status: int = EX_FAILED) -> None:
        super().__init__(message)
        self.status = status


@contextmanager
def locked(path: Path) -> Iterator[dict[str, Any]]:
    """The state, read under an exclusive lock and written back (atomically) on success."""
    with open(path.with_name(path.name + ".lock"), "a+b") as lock:
        if os.name == "nt":
            import msvcrt

            lock.seek(0)
            msvcrt.locking(lock.fileno(), msvcrt.LK_LOCK, 1)  # retries for 10 s, then raises
        else:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        state = json.loads(path.read_text()) if path.exists() else {}
        state.setdefault("next", 1)
        state.setdefault("machines", {})
        state.setdefault("tokens", {})
        yield state
        temp = path.with_name(path.name + ".tmp")
        temp.write_text(json.dumps(state, indent=1))
        os.replace(temp, path)


def machine(state: dict[str, Any], machine_id: str) -> dict[str, Any]:
    found = state["machines"].get(machine_id)
    if found is None:
        raise HookError(f"no machine {machine_id!r}", EX_NOTFOUND)
    return found


def enter(m: dict[str, Any], new: str, detail: str = "") -> None:
    if m["state"] != new:
        m["state"], m["state_since"] = new, time.time()
    m["detail"] = detail


def act(op: str, request: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """Do ``op`` once per token; the answer for stdout."""
    token = request.get("token")
    if op in ("get", "list"):
        if op == "get":
            return {"machine": machine(state, request["machine_id"])}
        pool = request.get("pool")
        return {"machines": [m for m in state["machines"].values() if pool in (None, m["pool"])]}
    if not token:
        raise HookError(f"{op} needs a token")
    used = state["tokens"].get(token)
    if used is not None:
        # Acted on already (this is a retry): the same answer, nothing done twice.
        if used["op"] != op or (op != "create" and used["machine_id"] != request.get("machine_id")):
            raise HookError(f"token {token!r} was used for {used['op']} of {used['machine_id']}")
        return {"machine": machine(state, used["machine_id"])} if op == "create" else {}
    now = time.time()
    if op == "create":
        spec = request["spec"]
        machine_id = f"vm-{state['next']:04d}"
        state["next"] += 1
        # HYPERVISOR: clone spec["image"] as a VM named spec["name"], tag it, power it on.
        state["machines"][machine_id] = {
            "id": machine_id, "name": spec["name"], "pool": spec["pool"], "state": "running",
            "tags": dict(spec.get("tags") or {}), "created_at": now, "state_since": now,
            "detail": "", "address": None,
        }
        answer = {"machine": state["machines"][machine_id]}
    else:
        machine_id = request["machine_id"]
        m = machine(state, machine_id)
        if m["state"] == "terminated" and op not in ("destroy", "tag"):
            raise HookError(f"cannot {op} {machine_id}: it is terminated")
        # HYPERVISOR: each branch is one call to the hypervisor on the VM.
        if op == "start":
            enter(m, "running")
        elif op == "stop":
            enter(m, "stopped", "hibernated" if request.get("hibernate") else "")
        elif op == "reboot":
            if m["state"] != "running":
                raise HookError(f"cannot reboot {machine_id}: it is {m['state']}")
            m["state_since"] = now  # rebooted just now; our VMs come back at once
        elif op == "power_off":
            enter(m, "stopped", "powered off")
        elif op == "destroy":
            enter(m, "terminated")
        elif op == "tag":
            m["tags"].update(request["tags"])
        elif op == "update":
            if m["state"] != "running":
                raise HookError(f"cannot update {machine_id}: it is {m['state']}")
            # HYPERVISOR: start the guest's OS updates (e.g. Invoke-Command … Install-WindowsUpdate)
            # and answer at once; "get" reports "updating" until they are applied, then "running".
            m["updated_at"] = now  # ours apply at once
            m["state_since"] = now
        answer = {}
    state["tokens"][token] = {"op": op, "machine_id": machine_id}
    return answer


def main(argv: list[str]) -> int:
    named = Path(argv[0]).name
    op = named if named in OPS else (argv[1] if len(argv) > 1 else "")
    if op not in OPS:
        print(f"usage: hooks.py {{{','.join(OPS)}}} < request.json", file=sys.stderr)
        return 2
    where = os.environ.get("DESKFLEET_HOOKS_STATE")
    if not where:
        print("set DESKFLEET_HOOKS_STATE to the JSON file that holds the machines", file=sys.stderr)
        return 2
    request = json.load(sys.stdin)
    try:
        with locked(Path(where)) as state:
            answer = act(op, request, state)
    except HookError as exc:
        print(f"{op}: {exc}", file=sys.stderr)
        return exc.status
    except OSError as exc:  # the state file is busy or unreachable: worth another try
        print(f"{op}: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    json.dump(answer, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
