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
