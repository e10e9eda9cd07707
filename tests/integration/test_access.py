"""API keys, roles, tenants and the audit log, against a real server over real HTTP.

The authorisation matrix walks every operation the API publishes, by every role, with a key of
every tenant and of one: each answer is the one the permission table below says, so an
endpoint added without a decision about who may call it fails here.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from test_api_input import LOOKUP, assert_error, http

from deskfleet.access import Permission

P = Permission
BOOT = "boot-7c1e9a"
#: who may call each operation (None: any valid key). The spec, written by hand.
REQUIRED: dict[tuple[str, str], Permission | None] = {
    ("POST", "/v1/runs"): P.RUNS_SUBMIT, ("POST", "/v1/runs:batch"): P.RUNS_SUBMIT,
    ("GET", "/v1/runs"): P.RUNS_READ, ("GET", "/v1/runs/{run_id}"): P.RUNS_READ,
    ("POST", "/v1/runs/{run_id}/cancel"): P.RUNS_CANCEL, ("POST", "/v1/runs/{run_id}/retry"): P.RUNS_RETRY,
    ("GET", "/v1/runs/{run_id}/attempts"): P.RUNS_READ, ("GET", "/v1/runs/{run_id}/events"): P.RUNS_READ,
    ("GET", "/v1/runs/{run_id}/artifacts"): P.RUNS_READ, ("GET", "/v1/artifacts/{artifact_id}"): P.RUNS_READ,
    ("GET", "/v1/events"): P.RUNS_READ, ("GET", "/v1/summary"): P.RUNS_READ,
    ("GET", "/v1/automations"): P.RUNS_READ,
    ("GET", "/v1/machines"): P.FLEET_READ, ("GET", "/v1/machines/{machine_id}"): P.FLEET_READ,
    ("GET", "/v1/machines/{machine_id}/events"): P.FLEET_READ,
    ("GET", "/v1/machines/{machine_id}/samples"): P.FLEET_READ,
    ("POST", "/v1/machines/{machine_id}/cordon"): P.FLEET_OPERATE,
    ("POST", "/v1/machines/{machine_id}/drain"): P.FLEET_OPERATE,
    ("POST", "/v1/machines/{machine_id}/uncordon"): P.FLEET_OPERATE,
    ("GET", "/v1/pools"): P.FLEET_READ, ("GET", "/v1/pools/{name}"): P.FLEET_READ,
    ("PUT", "/v1/pools/{name}"): P.FLEET_ADMIN,
    ("GET", "/v1/pools/{name}/policy"): P.FLEET_READ, ("PUT", "/v1/pools/{name}/policy"): P.FLEET_ADMIN,
    ("GET", "/v1/pools/{name}/policy/history"): P.FLEET_READ, ("GET", "/v1/pools/{name}/demand"): P.FLEET_READ,
    ("POST", "/v1/pools/{name}/maintenance"): P.FLEET_OPERATE, ("GET", "/v1/pools/{name}/maintenance"): P.FLEET_READ,
    ("GET", "/v1/pools/{name}/maintenance/{campaign_id}"): P.FLEET_READ,
    ("POST", "/v1/pools/{name}/maintenance/{campaign_id}/cancel"): P.FLEET_OPERATE,
    ("POST", "/v1/packs"): P.FLEET_ADMIN, ("GET", "/v1/packs"): P.FLEET_READ,
    ("GET", "/v1/packs/{name}/{version}"): P.FLEET_READ, ("GET", "/v1/packs/{name}/{version}/archive"): P.FLEET_READ,
    ("PUT", "/v1/pools/{name}/pack"): P.FLEET_ADMIN, ("GET", "/v1/pools/{name}/packs"): P.FLEET_READ,
    ("GET", "/v1/pools/{name}/rollouts"): P.FLEET_READ, ("GET", "/v1/pools/{name}/rollouts/{rollout_id}"): P.FLEET_READ,
    ("GET", "/v1/accounts"): P.ACCOUNTS_READ, ("GET", "/v1/accounts/{name}"): P.ACCOUNTS_READ,
    ("PUT", "/v1/accounts/{name}"): P.ACCOUNTS_WRITE, ("PATCH", "/v1/accounts/{name}"): P.ACCOUNTS_WRITE,
    ("DELETE", "/v1/accounts/{name}"): P.ACCOUNTS_WRITE,
    ("GET", "/v1/human-tasks"): P.HUMAN_READ, ("GET", "/v1/human-tasks/{task_id}"): P.HUMAN_READ,
    ("GET", "/v1/human-tasks/{task_id}/screenshot"): P.HUMAN_READ,
    ("POST", "/v1/human-tasks/{task_id}/claim"): P.HUMAN_ACT,
    ("POST", "/v1/human-tasks/{task_id}/release"): P.HUMAN_ACT,
    ("POST", "/v1/human-tasks/{task_id}/complete"): P.HUMAN_ACT,
    ("GET", "/v1/whoami"): None,
    ("POST", "/v1/api-keys"): P.KEYS_ADMIN, ("GET", "/v1/api-keys"): P.KEYS_ADMIN,
    ("POST", "/v1/api-keys/{prefix}/revoke"): P.KEYS_ADMIN,
    ("GET", "/v1/audit"): P.AUDIT_READ,
    ("GET", "/metrics"): P.METRICS_READ,
}
#: what each role may do, as the docs promise it (docs/access.md)
ROLES = {
    "submitter": {P.RUNS_SUBMIT, P.RUNS_READ, P.RUNS_CANCEL},
    "operator": {P.RUNS_SUBMIT, P.RUNS_READ, P.RUNS_CANCEL, P.RUNS_RETRY, P.FLEET_READ, P.FLEET_OPERATE,
                 P.HUMAN_READ, P.HUMAN_ACT, P.METRICS_READ},
}
ROLES["admin"] = ROLES["operator"] | {P.FLEET_ADMIN, P.ACCOUNTS_READ, P.ACCOUNTS_WRITE, P.KEYS_ADMIN, P.AUDIT_READ}


def _boot(server: Any) -> httpx.AsyncClient:
    return http(server, authorization=f"Bearer {BOOT}")


async def _key(c: httpx.AsyncClient, name: str, role: str, tenant: str = "*", **more: Any) -> str:
    resp = await c.post("/v1/api-keys", json={"name": name, "role": role, "tenant": tenant, **more})
    assert resp.status_code == 201, resp.text
    return str(resp.json()["key"])


def _audit(server: Any, **filters: Any) -> list[dict[str, Any]]:
    with server.client(api_key=BOOT) as c:
        return list(c.audit(limit=1000, **filters)["entries"])


async def _submit(c: httpx.AsyncClient, tenant: str | None = None, wait: float = 0) -> dict[str, Any]:
    body = {**LOOKUP, **({"tenant": tenant} if tenant else {})}
    resp = await c.post("/v1/runs", json=body, params={"wait": wait} if wait else {})
    assert resp.status_code == 201, resp.text
    return dict(resp.json())


# -- keys ---------------------------------------------------------------------------------------------
async def test_a_key_is_shown_once_stored_hashed_and_refused_once_wrong_revoked_or_expired(server_factory):
    server = server_factory(api_key=BOOT)
    async with _boot(server) as boot:
        made = (await boot.post("/v1/api-keys", json={"name": "ci", "role": "submitter", "tenant": "acme"})).json()
        secret, prefix = made["key"], made["prefix"]
        assert secret.startswith(prefix + "_") and made["state"] == "active" and made["created_by"] == "bootstrap"
        listed = (await boot.get("/v1/api-keys")).json()
        assert [k["prefix"] for k in listed] == [prefix] and "key" not in listed[0], "the secret is shown once"
    with sqlite3.connect(server.settings.data_dir / "deskfleet.db") as db:
        (stored,) = db.execute("SELECT digest FROM api_keys").fetchone()
        assert secret not in stored and secret.split("_")[-1] not in stored, "only a digest is kept"

    async with http(server, authorization=f"Bearer {secret}") as c:
        assert (await c.get("/v1/whoami")).json() == {
            "name": prefix, "label": "ci", "role": "submitter", "tenant": "acme", "screenshots": False,
            "permissions": ["runs.cancel", "runs.read", "runs.submit"]}
    async with http(server, **{"x-api-key": secret}) as c:
        assert (await c.get("/v1/runs")).status_code == 200

    # Each wrong key says what is wrong with it.
    cases = {
        "": ("needs an API key",),
        "nonsense": ("not a deskfleet API key",),
        prefix.replace(prefix[-3:], "zzz") + secret[len(prefix):]: ("unknown API key",),
        secret[:-4] + "AAAA": ("wrong secret", prefix),
    }
    for given, mentions in cases.items():
        async with http(server, **({"authorization": f"Bearer {given}"} if given else {})) as c:
            assert_error(await c.get("/v1/runs"), 401, "unauthorized", mentions=mentions)

    async with _boot(server) as boot:
        short = (await boot.post("/v1/api-keys", json={
            "name": "short", "role": "operator",
            "expires_at": (datetime.now(UTC) + timedelta(seconds=1)).isoformat()})).json()
        assert_error(await boot.post("/v1/api-keys", json={
            "name": "past", "role": "operator", "expires_at": "2001-01-01T00:00:00Z"}), 422, field="expires_at")
        revoked = (await boot.post(f"/v1/api-keys/{prefix}/revoke")).json()
        assert revoked["state"] == "revoked" and revoked["revoked_by"] == "bootstrap"
    async with http(server, authorization=f"Bearer {secret}") as c:
        assert_error(await c.get("/v1/runs"), 401, mentions=(prefix, "revoked", "bootstrap"))
    await asyncio.sleep(max(0.0, datetime.fromisoformat(short["expires_at"]).timestamp() - time.time() + 0.1))
    async with http(server, authorization=f"Bearer {short['key']}") as c:
        assert_error(await c.get("/v1/runs"), 401, mentions=(short["prefix"], "expired"))

    denied = _audit(server, outcome="denied")
    assert len(denied) >= len(cases) + 2 and {e["actor"] for e in denied} == {"unauthenticated"}
    assert any("revoked" in e["detail"]["reason"] for e in denied)
    made_entries = _audit(server, action="api_key.")
    assert sorted(e["action"] for e in made_entries) == ["api_key.created", "api_key.created", "api_key.revoked"]
    assert all(secret not in str(e) for e in _audit(server)), "a secret never reaches the audit log"


async def test_a_loopback_server_without_keys_is_open_until_the_first_key_exists(server_factory):
    server = server_factory()  # no --api-key, on loopback: the quick start
    async with http(server) as c:
        assert (await c.get("/v1/whoami")).json()["name"] == "anonymous"
        key = await _key(c, "first admin", "admin", screenshots=True)
        assert_error(await c.get("/v1/runs"), 401, mentions=("needs an API key",))
    async with http(server, authorization=f"Bearer {key}") as c:
        assert (await c.get("/v1/whoami")).json()["role"] == "admin"


async def test_a_tenants_admin_makes_keys_of_its_tenant_and_no_wider(server_factory):
    server = server_factory(api_key=BOOT)
    async with _boot(server) as boot:
        acme_admin = await _key(boot, "acme admin", "admin", "acme")
        other = await _key(boot, "globex", "submitter", "globex")
    async with http(server, authorization=f"Bearer {acme_admin}") as c:
        assert_error(await c.post("/v1/api-keys", json={"name": "x", "role": "submitter", "tenant": "globex"}),
                     422, field="tenant")
        assert_error(await c.post("/v1/api-keys", json={"name": "x", "role": "submitter", "screenshots": True,
                                                        "tenant": "acme"}), 422, field="screenshots")
        assert (await c.post("/v1/api-keys", json={"name": "x", "role": "submitter", "tenant": "acme"})).status_code == 201
        assert {k["tenant"] for k in (await c.get("/v1/api-keys")).json()} == {"acme"}
        assert_error(await c.post(f"/v1/api-keys/{other[:14]}/revoke"), 404, mentions=("acme",))


# -- the matrix ----------------------------------------------------------------------------------------
async def test_every_endpoint_answers_every_role_and_tenant_as_the_permission_table_says(server_factory, fleet_factory):
    server = server_factory(api_key=BOOT)
    await fleet_factory(server, count=1)
    async with _boot(server) as boot:
        ops = [(m.upper(), path) for path, item in (await boot.get("/openapi.json")).json()["paths"].items()
               for m in item if m in ("get", "post", "put", "patch", "delete") and not path.startswith("/agent/")
               and path != "/healthz"]
        unclassified = sorted(set(ops) - set(REQUIRED))
        assert not unclassified, f"operations nobody decided who may call: {unclassified}"
        keys = {(role, tenant): await _key(boot, f"{role}-{tenant}", role, tenant)
                for role in ROLES for tenant in ("*", "acme")}
        mine = await _submit(boot, "acme")
        theirs = await _submit(boot, "globex")
        machine = (await boot.get("/v1/machines")).json()[0]["id"]

    values = {"run_id": mine["id"], "machine_id": machine, "name": "default", "campaign_id": "1",
              "rollout_id": "1", "task_id": "ht_nothing", "prefix": "dfk_aaaaaaaaaa", "artifact_id": "art_nothing",
              "version": "1.0.0"}
    walked = 0
    for (role, tenant), key in keys.items():
        async with http(server, authorization=f"Bearer {key}") as c:
            for method, template in ops:
                path = template.format(**values)
                body = {} if method in ("POST", "PUT", "PATCH") else None
                if template in ("/v1/runs", "/v1/runs:batch") and method == "POST":
                    body = LOOKUP if template == "/v1/runs" else {"runs": [LOOKUP]}
                resp = await c.request(method, path, json=body)
                need = REQUIRED[(method, template)]
                allowed = need is None or need in ROLES[role]
                where = f"{role} of {tenant}: {method} {template} → {resp.status_code} {resp.text[:200]}"
                if allowed:
                    assert resp.status_code not in (401, 403), where
                else:
                    assert resp.status_code == 403, where
                    assert need.value in resp.json()["message"], where
                walked += 1
    assert walked == len(ops) * len(keys)

    # Another tenant's run is not there for a tenant's key, whatever its role; it is for a key of every tenant.
    for (_, tenant), key in keys.items():
        async with http(server, authorization=f"Bearer {key}") as c:
            for suffix in ("", "/attempts", "/events", "/artifacts"):
                resp = await c.get(f"/v1/runs/{theirs['id']}{suffix}")
                if tenant == "acme":
                    assert_error(resp, 404, "not_found", mentions=(theirs["id"], "acme"))
                else:
                    assert resp.status_code == 200, resp.text
            listed = {r["id"] for r in (await c.get("/v1/runs")).json()["runs"]}
            assert (theirs["id"] in listed) == (tenant == "*") and mine["id"] in listed
            seen = {e["run"] for e in (await c.get("/v1/events")).json() if e["run"]}
            assert (theirs["id"] in seen) == (tenant == "*")
            counts = (await c.get("/v1/summary")).json()["runs"]
            assert sum(counts.values()) >= (1 if tenant == "acme" else 2)


async def test_a_tenants_key_submits_into_its_tenant_only(server_factory, fleet_factory):
    server = server_factory(api_key=BOOT)
    await fleet_factory(server, count=1)
    async with _boot(server) as boot:
        key = await _key(boot, "acme ci", "submitter", "acme")
        await _submit(boot, "globex")
    async with http(server, authorization=f"Bearer {key}") as c:
        assert (await _submit(c))["tenant"] == "acme"
        assert (await _submit(c, "acme"))["tenant"] == "acme"
        assert_error(await c.post("/v1/runs", json={**LOOKUP, "tenant": "globex"}), 403, "forbidden",
                     mentions=("acme", "globex"))
        batch = (await c.post("/v1/runs:batch", json={"runs": [LOOKUP, {**LOOKUP, "tenant": "globex"}]})).json()
        assert [r["status"] for r in batch["results"]] == ["created", "invalid"]
        assert batch["results"][1]["error"]["error"] == "forbidden"
        assert sum((await c.get("/v1/summary")).json()["runs"].values()) == 3, "its own three, not globex's"


# -- the audit log -------------------------------------------------------------------------------------
async def test_the_audit_log_holds_each_action_each_refusal_each_credential_and_each_screen_seen(
        server_factory, fleet_factory):
    server = server_factory(api_key=BOOT)
    fleet = await fleet_factory(server, count=1, screenshots="evidence")
    async with _boot(server) as boot:
        operator = await _key(boot, "night shift", "operator", "acme")
        viewer = await _key(boot, "auditor", "operator", "*", screenshots=True)
        machine = (await boot.get("/v1/machines")).json()[0]["id"]
        done = await _submit(boot, "acme", wait=30)
        assert done["state"] == "succeeded", done
        theirs = await _submit(boot, "globex")
        images = [a for a in (await boot.get(f"/v1/runs/{done['id']}/artifacts")).json()
                  if a["content_type"].startswith("image/")]
        assert images, "the sim fleet keeps an evidence screenshot of each run"

    op_prefix = operator[:14]
    async with http(server, authorization=f"Bearer {operator}") as c:
        assert (await c.post(f"/v1/machines/{machine}/cordon", json={"reason": "patching"})).status_code == 200
        assert (await c.post(f"/v1/machines/{machine}/uncordon")).status_code == 200
        assert_error(await c.put("/v1/pools/default", json={}), 403, mentions=("fleet.admin", "admin role"))
        assert_error(await c.get(f"/v1/runs/{theirs['id']}"), 404)
        assert_error(await c.get(f"/v1/artifacts/{images[0]['id']}"), 403, mentions=("screenshots",))
        assert_error(await c.post("/v1/runs/run_nope/cancel"), 404)
    async with http(server, authorization=f"Bearer {viewer}") as c:
        shot = await c.get(f"/v1/artifacts/{images[0]['id']}")
        assert shot.status_code == 200 and shot.content[:4] == b"\x89PNG"

    mine = {(e["action"], e["outcome"], e["status"]) for e in _audit(server, actor=op_prefix)}
    assert mine == {
        ("POST /v1/machines/{machine_id}/cordon", "ok", 200),
        ("POST /v1/machines/{machine_id}/uncordon", "ok", 200),
        ("PUT /v1/pools/{name}", "denied", 403),
        ("GET /v1/runs/{run_id}", "denied", 404),
        ("GET /v1/artifacts/{artifact_id}", "denied", 403),
        ("POST /v1/runs/{run_id}/cancel", "failed", 404),
    }, mine
    cordon = _audit(server, action="POST /v1/machines/{machine_id}/cordon")[0]
    assert cordon["target"] == f"/v1/machines/{machine}/cordon" and cordon["tenant"] == "acme"
    assert cordon["role"] == "operator" and cordon["remote"] == "127.0.0.1"
    other_tenant = _audit(server, actor=op_prefix, action="GET /v1/runs/")[0]
    assert "another tenant" in other_tenant["detail"]["reason"]
    (seen,) = _audit(server, action="screenshot.viewed")
    assert seen["actor"] == viewer[:14] and seen["target"] == f"artifact:{images[0]['id']}"
    assert seen["detail"]["run"] == done["id"]
    issued = _audit(server, action="credential.")
    granted = [e for e in issued if e["detail"].get("run") == done["id"]]
    assert granted and granted[0]["actor"] == f"machine:{fleet.agents[0].machine_id}", issued
    assert granted[0]["target"].startswith("account:") and granted[0]["action"] == "credential.issued", issued
    assert not [e for e in _audit(server) if e["action"].startswith("POST /v1/runs") and e["outcome"] == "ok"], \
        "submissions are in their runs' timelines, not the audit log"

    # Newest first, paged; and followed from an id, oldest first.
    page = _audit(server)
    with server.client(api_key=BOOT) as c:
        first = c.audit(limit=2)
        assert [e["id"] for e in first["entries"]] == [page[0]["id"], page[1]["id"]]
        assert c.audit(limit=2, before=first["next_before"])["entries"][0]["id"] == page[2]["id"]
        assert [e["id"] for e in c.audit(after=page[2]["id"])["entries"]] == [page[1]["id"], page[0]["id"]]


def test_the_audit_log_is_append_only_in_the_database(backend_store):
    from deskfleet.access import AuditEntry

    s = backend_store
    s.append_audit([AuditEntry(action="machine.cordon", actor="dfk_aaaaaaaaaa", at=time.time())])
    with s._tx() as conn:
        from sqlalchemy import text

        for statement in ("UPDATE audit_log SET actor = 'someone else'", "DELETE FROM audit_log"):
            with pytest.raises(Exception, match="append-only"), conn.begin_nested():
                conn.execute(text(statement))
    assert [e.actor for e in s.audit_entries()] == ["dfk_aaaaaaaaaa"]
