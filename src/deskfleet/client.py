"""A small HTTP client for the deskfleet API, blocking and async, used by the CLI, the demo,
benchmarks and tests — and by users' own scripts.

One implementation of each call (``_Call``: method, path, body, how to read the answer),
executed by either transport. API errors become :class:`ApiError` with the server's
message; a server that cannot be reached becomes
:class:`~deskfleet.errors.ServerUnreachable`.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from .config import MAX_BATCH
from .errors import DeskfleetError, ServerUnreachable

DEFAULT_SERVER = "http://127.0.0.1:8470"


class ApiError(DeskfleetError):
    def __init__(self, status: int, error: str, message: str, field: str | None = None) -> None:
        super().__init__(f"{message} (HTTP {status})")
        self.status = status
        self.error = error
        self.message = message
        self.field = field


#: Idle connections are dropped after this many seconds, well before the server closes them
#: (uvicorn: after 5 s idle). httpx keeps them 5 s by default, as long as the server does: a
#: request sent on one at the moment the server closes it reads nothing back (httpx.ReadError,
#: reported as ServerUnreachable) although the server is up.
KEEPALIVE_EXPIRY = 2.0


@dataclass(slots=True)
class _Call:
    method: str
    path: str
    json: Any = None
    params: dict[str, Any] = field(default_factory=dict)
    timeout: float | None = None
    content: bytes | None = None  # a raw body (a pack archive) instead of JSON
    headers: dict[str, str] | None = None


def _run_call(automation: str, input: dict[str, Any] | None, wait: float, **options: Any) -> _Call:
    body = {"automation": automation, "input": input or {}}
    body.update({k: v for k, v in options.items() if v is not None})
    return _Call("POST", "/v1/runs", body, {"wait": wait} if wait else {}, timeout=wait + 30 if wait else None)


def _answer(resp: httpx.Response) -> Any:
    if resp.status_code >= 400:
        try:
            body = resp.json()
            raise ApiError(resp.status_code, body.get("error", "error"), body.get("message", resp.text), body.get("field"))
        except ValueError:
            raise ApiError(resp.status_code, "error", resp.text[:300]) from None
    if resp.headers.get("content-type", "").startswith("application/json"):
        return resp.json()
    return resp.content


Pager = Generator[_Call, Any, list[dict[str, Any]]]


def _every_run(**filters: Any) -> Pager:
    """All runs, newest first, a page at a time (a sans-I/O generator: yields calls, is sent
    their answers; each transport drives it)."""
    out: list[dict[str, Any]] = []
    before = None
    while True:
        params = {"limit": 1000, **filters, **({"before": before} if before else {})}
        page = yield _Call("GET", "/v1/runs", params=params)
        out.extend(page["runs"])
        before = page["next_before"]
        if not before:
            return out


#: the most runs one ``POST /v1/runs:batch`` takes
BATCH_MAX = MAX_BATCH


def _run_body(run: Mapping[str, Any]) -> dict[str, Any]:
    """A run request's body: ``automation`` and ``input`` and any options (None left out)."""
    return {k: v for k, v in run.items() if v is not None}


def _submit_batches(runs: Iterable[Mapping[str, Any]], size: int) -> Pager:
    """Submit ``runs`` ``size`` at a time; one answer per run, in order, each with its place
    in ``runs`` as ``index``."""
    if not 1 <= size <= BATCH_MAX:
        raise ValueError(f"a batch holds 1 to {BATCH_MAX} runs, not {size}")
    out: list[dict[str, Any]] = []
    chunk: list[dict[str, Any]] = []
    for run in [*runs, None]:  # None: the end, to send what is left
        if run is not None:
            chunk.append(_run_body(run))
        if chunk and (run is None or len(chunk) == size):
            answer = yield _Call("POST", "/v1/runs:batch", {"runs": chunk})
            sent = len(out)
            out += [{**r, "index": r["index"] + sent} for r in answer["results"]]
            chunk = []
    return out


def _every_event(after: int = 0) -> Pager:
    """All events after an id, oldest first."""
    out: list[dict[str, Any]] = []
    while True:
        batch = yield _Call("GET", "/v1/events", params={"after": after, "limit": 10000})
        if not batch:
            return out
        out.extend(batch)
        after = batch[-1]["id"]


def _put_accounts(credentials: Mapping[str, Any], app: str | None, max_sessions: int) -> Pager:
    """Put every account of ``credentials`` (name → an object with ``username``, ``password``
    and ``totp_seed``, e.g. an app's demo accounts) in the vault; their answers."""
    out: list[dict[str, Any]] = []
    for name, cred in credentials.items():
        body = {"app": app, "username": cred.username, "password": cred.password,
                "totp_seed": getattr(cred, "totp_seed", None), "max_sessions": max_sessions}
        out.append((yield _Call("PUT", f"/v1/accounts/{name}", body)))
    return out


class _Calls:
    """The API's calls, independent of transport. On its own, each call returns the
    :class:`_Call` it would make; a transport overrides ``_do`` to make it."""

    def _do(self, call: _Call) -> Any:
        return call

    def submit(self, automation: str, input: dict[str, Any] | None = None, *, wait: float = 0, **options: Any) -> Any:
        return self._do(_run_call(automation, input, wait, **options))

    def submit_batch(self, runs: Iterable[Mapping[str, Any]]) -> Any:
        """Submit up to 1,000 runs in one request (``POST /v1/runs:batch``). Each run is a
        mapping with ``automation``, ``input`` and any of ``submit``'s options; the answer
        holds one result per run, in order: ``created``, ``existing`` (its idempotency key
        was used before with the same request), ``conflict`` or ``invalid``, with the run or
        the error."""
        return self._do(_Call("POST", "/v1/runs:batch", {"runs": [_run_body(r) for r in runs]}))

    def run(self, run_id: str, *, wait: float = 0) -> Any:
        return self._do(_Call("GET", f"/v1/runs/{run_id}", params={"wait": wait} if wait else {},
                              timeout=wait + 30 if wait else None))

    def runs(self, *, state: Iterable[str] = (), limit: int = 100, before: str | None = None, **filters: Any) -> Any:
        params: dict[str, Any] = {"limit": limit, **{k: v for k, v in filters.items() if v is not None}}
        if state:
            params["state"] = list(state)
        if before:
            params["before"] = before
        return self._do(_Call("GET", "/v1/runs", params=params))

    def machine_samples(self, machine_id: str, *, hours: float = 2.0) -> Any:
        """The machine's app memory and CPU over time: ``[{"at", "memory_mb", "cpu_percent"}]``."""
        return self._do(_Call("GET", f"/v1/machines/{machine_id}/samples", params={"hours": hours}))

    def retry(self, run_id: str) -> Any:
        """A new run with an ended run's request (failed, timed out or cancelled); asking
        again returns the same new run."""
        return self._do(_Call("POST", f"/v1/runs/{run_id}/retry"))

    def cancel(self, run_id: str) -> Any:
        return self._do(_Call("POST", f"/v1/runs/{run_id}/cancel"))

    def events(self, run_id: str) -> Any:
        return self._do(_Call("GET", f"/v1/runs/{run_id}/events"))

    def attempts(self, run_id: str) -> Any:
        return self._do(_Call("GET", f"/v1/runs/{run_id}/attempts"))

    def artifacts(self, run_id: str) -> Any:
        return self._do(_Call("GET", f"/v1/runs/{run_id}/artifacts"))

    def artifact(self, artifact_id: str) -> Any:
        return self._do(_Call("GET", f"/v1/artifacts/{artifact_id}"))

    def all_events(self, after: int = 0, limit: int = 1000) -> Any:
        return self._do(_Call("GET", "/v1/events", params={"after": after, "limit": limit}))

    def machines(self, pool: str | None = None) -> Any:
        return self._do(_Call("GET", "/v1/machines", params={"pool": pool} if pool else {}))

    def machine(self, machine_id: str) -> Any:
        return self._do(_Call("GET", f"/v1/machines/{machine_id}"))

    def machine_action(self, machine_id: str, action: str, reason: str = "") -> Any:
        if action not in ("cordon", "drain", "uncordon"):
            raise ValueError(f"unknown machine action {action!r}")
        return self._do(_Call("POST", f"/v1/machines/{machine_id}/{action}", {"reason": reason}))

    def pools(self) -> Any:
        return self._do(_Call("GET", "/v1/pools"))

    def put_pool(self, name: str, **settings: Any) -> Any:
        return self._do(_Call("PUT", f"/v1/pools/{name}", settings))

    def pool_policy(self, name: str) -> Any:
        return self._do(_Call("GET", f"/v1/pools/{name}/policy"))

    def put_pool_policy(self, name: str, policy: dict[str, Any], *, version: int | None = None,
                        comment: str = "") -> Any:
        """A new version of the pool's policy; ``version``: the one it was made to (409 if no longer the latest)."""
        return self._do(_Call("PUT", f"/v1/pools/{name}/policy",
                              {"policy": policy, "version": version, "comment": comment}))

    def pool_policy_history(self, name: str, limit: int = 50) -> Any:
        return self._do(_Call("GET", f"/v1/pools/{name}/policy/history", params={"limit": limit}))

    def pool_demand(self, name: str) -> Any:
        return self._do(_Call("GET", f"/v1/pools/{name}/demand"))

    def start_maintenance(self, pool: str, *, reason: str = "", machines: list[str] | None = None) -> Any:
        """A rolling update of the pool's machines (all of those up, or ``machines``)."""
        return self._do(_Call("POST", f"/v1/pools/{pool}/maintenance", {"reason": reason, "machines": machines}))

    def maintenance(self, pool: str, campaign_id: int | None = None, *, limit: int = 20) -> Any:
        """One campaign, or the pool's latest (newest first)."""
        if campaign_id is not None:
            return self._do(_Call("GET", f"/v1/pools/{pool}/maintenance/{campaign_id}"))
        return self._do(_Call("GET", f"/v1/pools/{pool}/maintenance", params={"limit": limit}))

    def cancel_maintenance(self, pool: str, campaign_id: int, *, reason: str = "") -> Any:
        return self._do(_Call("POST", f"/v1/pools/{pool}/maintenance/{campaign_id}/cancel", {"reason": reason}))

    def publish_pack(self, archive: bytes, *, sha256: str | None = None) -> Any:
        """Publish a pack archive (``deskfleet pack build`` makes it), checked against ``sha256``."""
        return self._do(_Call("POST", "/v1/packs", params={"sha256": sha256} if sha256 else {}, content=archive,
                              headers={"content-type": "application/zip"}, timeout=300.0))

    def packs(self, name: str | None = None) -> Any:
        """Published pack versions, newest first."""
        return self._do(_Call("GET", "/v1/packs", params={"name": name} if name else {}))

    def pack(self, name: str, version: str) -> Any:
        return self._do(_Call("GET", f"/v1/packs/{name}/{version}"))

    def pack_archive(self, name: str, version: str) -> Any:
        return self._do(_Call("GET", f"/v1/packs/{name}/{version}/archive"))

    def assign_pack(self, pool: str, pack: str, version: str | None = None, *, rollback: bool = False,
                    max_unavailable: int | str | None = None, reason: str = "") -> Any:
        """Assign a pack's version to a pool (a rolling rollout), or roll back to the one before."""
        return self._do(_Call("PUT", f"/v1/pools/{pool}/pack", {
            "pack": pack, "version": version, "rollback": rollback, "max_unavailable": max_unavailable,
            "reason": reason}))

    def pool_packs(self, pool: str) -> Any:
        """The pack versions assigned to a pool, each with its newest rollout."""
        return self._do(_Call("GET", f"/v1/pools/{pool}/packs"))

    def rollouts(self, pool: str, pack: str | None = None, *, limit: int = 20) -> Any:
        return self._do(_Call("GET", f"/v1/pools/{pool}/rollouts", params={"limit": limit, **({"pack": pack} if pack else {})}))

    def rollout(self, pool: str, rollout_id: int) -> Any:
        return self._do(_Call("GET", f"/v1/pools/{pool}/rollouts/{rollout_id}"))

    def automations(self) -> Any:
        return self._do(_Call("GET", "/v1/automations"))

    # -- the vault (secrets go in, never come out) ---------------------------------------------
    def put_account(self, name: str, *, username: str, password: str, app: str | None = None,
                    totp_seed: str | None = None, labels: dict[str, str] | None = None,
                    max_sessions: int = 1) -> Any:
        """Create or replace an account."""
        return self._do(_Call("PUT", f"/v1/accounts/{name}", {
            "app": app, "username": username, "password": password, "totp_seed": totp_seed,
            "labels": labels or {}, "max_sessions": max_sessions}))

    def patch_account(self, name: str, **changes: Any) -> Any:
        """Change some fields (``totp_seed=None`` removes the seed)."""
        return self._do(_Call("PATCH", f"/v1/accounts/{name}", changes))

    def accounts(self, app: str | None = None) -> Any:
        return self._do(_Call("GET", "/v1/accounts", params={"app": app} if app else {}))

    def account(self, name: str) -> Any:
        return self._do(_Call("GET", f"/v1/accounts/{name}"))

    def remove_account(self, name: str, *, force: bool = False) -> Any:
        return self._do(_Call("DELETE", f"/v1/accounts/{name}", params={"force": "true"} if force else {}))

    # -- human tasks: what only a person can do for a running automation ---------------------------
    def human_tasks(self, *, state: Iterable[str] = (), pool: str | None = None, run: str | None = None,
                    limit: int = 100) -> Any:
        """``{"tasks": [...]}``, newest first; ``state=("open", "claimed")`` for those waiting."""
        params: dict[str, Any] = {"limit": limit, **({"state": list(state)} if state else {})}
        params.update({k: v for k, v in (("pool", pool), ("run", run)) if v is not None})
        return self._do(_Call("GET", "/v1/human-tasks", params=params))

    def human_task(self, task_id: str) -> Any:
        return self._do(_Call("GET", f"/v1/human-tasks/{task_id}"))

    def human_task_screenshot(self, task_id: str) -> Any:
        """The screen the agent saw when it asked (PNG bytes)."""
        return self._do(_Call("GET", f"/v1/human-tasks/{task_id}/screenshot"))

    def claim_human_task(self, task_id: str, by: str) -> Any:
        """Take the task (ApiError 409, naming who holds it, if somebody else did)."""
        return self._do(_Call("POST", f"/v1/human-tasks/{task_id}/claim", {"by": by}))

    def release_human_task(self, task_id: str, by: str) -> Any:
        return self._do(_Call("POST", f"/v1/human-tasks/{task_id}/release", {"by": by}))

    def complete_human_task(self, task_id: str, by: str, response: str | None = None) -> Any:
        """Answer the task; a secret task's ``response`` is never shown again."""
        body: dict[str, Any] = {"by": by}
        if response is not None:
            body["response"] = response
        return self._do(_Call("POST", f"/v1/human-tasks/{task_id}/complete", body))

    # -- API keys and the audit log --------------------------------------------------------------
    def whoami(self) -> Any:
        """The key these calls are made with: its role, tenant and permissions."""
        return self._do(_Call("GET", "/v1/whoami"))

    def create_api_key(self, name: str, role: str, *, tenant: str = "*", screenshots: bool = False,
                       expires_at: str | None = None) -> Any:
        """A new key; its whole secret is in ``key`` in this answer only. ``expires_at``: ISO 8601."""
        body: dict[str, Any] = {"name": name, "role": role, "tenant": tenant, "screenshots": screenshots}
        if expires_at is not None:
            body["expires_at"] = expires_at
        return self._do(_Call("POST", "/v1/api-keys", body))

    def api_keys(self) -> Any:
        return self._do(_Call("GET", "/v1/api-keys"))

    def revoke_api_key(self, prefix: str) -> Any:
        return self._do(_Call("POST", f"/v1/api-keys/{prefix}/revoke"))

    def audit(self, *, limit: int = 100, before: int | None = None, after: int | None = None, **filters: Any) -> Any:
        """``{"entries": [...], "next_before"}``, newest first (with ``after``: oldest first from
        that id). Filters: actor, action (a prefix), target, outcome, since (ISO 8601)."""
        params: dict[str, Any] = {"limit": limit, **{k: v for k, v in filters.items() if v is not None}}
        if before is not None:
            params["before"] = before
        if after is not None:
            params["after"] = after
        return self._do(_Call("GET", "/v1/audit", params=params))

    def summary(self) -> Any:
        return self._do(_Call("GET", "/v1/summary"))

    def health(self) -> Any:
        return self._do(_Call("GET", "/healthz"))


def _headers(api_key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


class Client(_Calls):
    """Blocking client: ``Client("http://127.0.0.1:8470").submit("ehr.lookup_patient", {...})``."""

    def __init__(self, server: str = DEFAULT_SERVER, *, api_key: str | None = None, timeout: float = 30.0) -> None:
        self.server = server.rstrip("/")
        self._http = httpx.Client(base_url=self.server, headers=_headers(api_key), timeout=timeout,
                                  limits=httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY))

    def _do(self, call: _Call) -> Any:
        try:
            resp = self._http.request(call.method, call.path, json=call.json, params=call.params,
                                      content=call.content, headers=call.headers,
                                      timeout=call.timeout or httpx.USE_CLIENT_DEFAULT)
        except httpx.TransportError as exc:
            raise ServerUnreachable(self.server, str(exc) or type(exc).__name__) from exc
        return _answer(resp)

    def every_run(self, **filters: Any) -> list[dict[str, Any]]:
        return self._drive(_every_run(**filters))

    def every_event(self, after: int = 0) -> list[dict[str, Any]]:
        return self._drive(_every_event(after))

    def submit_many(self, runs: Iterable[Mapping[str, Any]], *, batch: int = BATCH_MAX) -> list[dict[str, Any]]:
        """Submit any number of runs, ``batch`` per request: one result per run, in order
        (see :meth:`submit_batch`), each with its place in ``runs`` as ``index``."""
        return self._drive(_submit_batches(runs, batch))

    def put_accounts(self, credentials: Mapping[str, Any], *, app: str | None = None,
                     max_sessions: int = 1) -> list[dict[str, Any]]:
        return self._drive(_put_accounts(credentials, app, max_sessions))

    def _drive(self, pager: Pager) -> list[dict[str, Any]]:
        try:
            call = next(pager)
            while True:
                call = pager.send(self._do(call))
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: Concurrent requests of an :class:`AsyncClient` go over up to LANES connection pools of
#: LANE_SIZE connections or so each (see ``AsyncClient._lane``).
LANES = 8
LANE_SIZE = 4


class AsyncClient:
    """The same calls, awaited: ``await AsyncClient(url).submit(...)``.

    Concurrent requests are spread over a few connection pools ("lanes"), each opened once
    the others have LANE_SIZE requests in flight: httpcore's pool looks at every one of its
    connections for each request it starts or ends (encode/httpcore#1035), so one pool of 32
    busy connections cost ~3 ms of CPU a request, eight pools of four ~1.4 ms. One request
    at a time uses one pool and one connection, as before."""

    def __init__(self, server: str = DEFAULT_SERVER, *, api_key: str | None = None, timeout: float = 30.0) -> None:
        self.server = server.rstrip("/")
        self._headers = _headers(api_key)
        self._timeout = timeout
        # 200 connections, 50 of them kept alive when idle, in all
        self._limits = httpx.Limits(max_connections=200 // LANES, max_keepalive_connections=50 // LANES,
                                    keepalive_expiry=KEEPALIVE_EXPIRY)
        self._lanes: list[httpx.AsyncClient] = []
        self._busy: list[int] = []  # requests in flight, per lane
        self._lane()
        self._calls = _Calls()  # builds each call; this class makes it

    def _lane(self) -> int:
        """The lane for the next request: the least busy, or a new one if every lane has
        LANE_SIZE requests in flight (and there are fewer than LANES)."""
        if self._lanes:
            i = min(range(len(self._busy)), key=self._busy.__getitem__)
            if self._busy[i] < LANE_SIZE or len(self._lanes) >= LANES:
                return i
        self._lanes.append(httpx.AsyncClient(base_url=self.server, headers=self._headers, timeout=self._timeout,
                                             limits=self._limits))
        self._busy.append(0)
        return len(self._lanes) - 1

    def __getattr__(self, name: str) -> Any:
        build = getattr(self._calls, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await self._do(build(*args, **kwargs))

        return call

    async def _do(self, call: _Call) -> Any:
        lane = self._lane()
        self._busy[lane] += 1
        try:
            resp = await self._lanes[lane].request(call.method, call.path, json=call.json, params=call.params,
                                                   content=call.content, headers=call.headers,
                                                   timeout=call.timeout or httpx.USE_CLIENT_DEFAULT)
        except httpx.TransportError as exc:
            raise ServerUnreachable(self.server, str(exc) or type(exc).__name__) from exc
        finally:
            self._busy[lane] -= 1
        return _answer(resp)

    async def every_run(self, **filters: Any) -> list[dict[str, Any]]:
        return await self._drive(_every_run(**filters))

    async def every_event(self, after: int = 0) -> list[dict[str, Any]]:
        return await self._drive(_every_event(after))

    async def submit_many(self, runs: Iterable[Mapping[str, Any]], *, batch: int = BATCH_MAX) -> list[dict[str, Any]]:
        return await self._drive(_submit_batches(runs, batch))

    async def put_accounts(self, credentials: Mapping[str, Any], *, app: str | None = None,
                           max_sessions: int = 1) -> list[dict[str, Any]]:
        return await self._drive(_put_accounts(credentials, app, max_sessions))

    async def _drive(self, pager: Pager) -> list[dict[str, Any]]:
        try:
            call = next(pager)
            while True:
                call = pager.send(await self._do(call))
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        for lane in self._lanes:
            await lane.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
