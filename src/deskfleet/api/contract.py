"""The API's contract: an OpenAPI document that says everything the server answers.

FastAPI writes the document from the routes' models, and knows nothing of what our error
handlers, the body limit and the services answer, nor of the catalogue — which changes
while the server runs (agents advertise automations, packs get published). A client
generated from the document, or schemathesis testing against it
(``tests/integration/test_api_contract.py``), must be able to rely on it, so
:func:`install` completes it once the routers are included:

- **every status and its body**, by rule — 401 and 403 on every ``/v1`` operation and on
  ``/metrics``; 404 where the path names something; 400 (malformed JSON), 413 and 422
  where a body comes in; 422 where parameters do; 503 everywhere, since the database
  answers every request — and by a small table where a rule cannot know (the 409s). Each
  error is :class:`~deskfleet.api.schemas.ErrorOut`, as ``errors.py`` writes it;
- **each automation's input and output** (``AutomationInput_<name>``,
  ``AutomationOutput_<name>``): ``/openapi.json`` is built per request from the static
  part (made once) and the catalogue as it is now, and a run request becomes a ``oneOf``
  discriminated by ``automation``;
- **methods**: a 405 says in ``Allow`` what the path does support, ``OPTIONS`` answers
  with it, and ``HEAD`` is ``GET`` without the body.

The agents' endpoints (``/agent/v1``) are left out of the document: they speak the agent
protocol (``protocol.py``), versioned with the agent, not the public API.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from http import HTTPStatus
from typing import Any

import fastapi.routing
import jsonschema
import orjson
from fastapi import FastAPI, Request, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..access import Permission
from ..errors import Unauthorized
from ..models import AutomationSpec, version_key
from ..orchestrator import Orchestrator
from ..vault import MIN_SEED_CHARS
from ..vault import NAME as ACCOUNT
from .accounts import MAX_SESSIONS
from .errors import error_response
from .schemas import ErrorOut

log = logging.getLogger(__name__)

Document = dict[str, Any]
Catalogue = Callable[[], Awaitable[list[AutomationSpec]]]

COMPONENTS = "#/components/schemas/"
ERROR = {"application/json": {"schema": {"$ref": COMPONENTS + "ErrorOut"}}}
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

# What each error status means, wherever an operation can answer it.
GENERIC = {
    400: "Bad Request: the body is not valid JSON, or the request contradicts itself (``field`` says where)",
    401: "Unauthorized: a missing, wrong, expired or revoked API key",
    403: "Forbidden: the key's role or tenant does not allow this request",
    404: "Not Found: nothing by that name or id",
    409: "Conflict: valid, but it contradicts what exists",
    413: "Payload Too Large: the body exceeds the server's limit",
    422: "Unprocessable Content: the request does not validate (``field`` says where, ``message`` what to fix)",
    503: "Service Unavailable: the database cannot be reached; retry shortly",
}

# The statuses no rule can infer: what the services refuse for what exists (409), and 404s
# of operations whose path names nothing.
EXTRA: dict[tuple[str, str], dict[int, str]] = {
    ("post", "/v1/runs"): {
        404: "Not Found: an unknown automation, version of it, pool, or pack version (``field`` says which)",
        409: "Conflict: the idempotency key was used for another request",
        422: "Unprocessable Content: the input does not match the automation's schema (``invalid_input``), "
             "or no machine could ever serve the run (``unservable``)",
    },
    ("get", "/v1/runs"): {404: "Not Found: ``before`` names no run"},
    ("post", "/v1/runs/{run_id}/cancel"): {409: "Conflict: the run has ended already"},
    ("post", "/v1/runs/{run_id}/retry"): {409: "Conflict: only a run that failed, timed out or was cancelled can be retried"},
    ("delete", "/v1/accounts/{name}"): {409: "Conflict: a machine holds a lease on the account (unless force)"},
    ("put", "/v1/pools/{name}/policy"): {409: "Conflict: ``version`` is no longer the latest"},
    ("post", "/v1/pools/{name}/maintenance"): {
        409: "Conflict: another maintenance of the pool is under way",
        422: "Unprocessable Content: the request does not validate, or the pool's policy names no provider "
             "to update its machines through",
    },
    ("post", "/v1/pools/{name}/maintenance/{campaign_id}/cancel"): {409: "Conflict: the campaign has ended"},
    ("post", "/v1/packs"): {409: "Conflict: that version is published with another archive"},
    ("put", "/v1/pools/{name}/pack"): {409: "Conflict: there is no earlier version to roll back to"},
    ("post", "/v1/human-tasks/{task_id}/claim"): {409: "Conflict: the task is claimed by somebody else, or no longer open"},
    ("post", "/v1/human-tasks/{task_id}/release"): {409: "Conflict: the task is not claimed, or by somebody else"},
    ("post", "/v1/human-tasks/{task_id}/complete"): {409: "Conflict: the task is claimed by somebody else, or no longer open"},
}

# Successes whose body is not JSON: FastAPI cannot see what a plain Response carries.
BINARY = {"schema": {"type": "string", "format": "binary"}}
CONTENT: dict[tuple[str, str], dict[str, Any]] = {
    ("get", "/metrics"): {"text/plain": {"schema": {"type": "string"}}},
    ("get", "/v1/artifacts/{artifact_id}"): {"*/*": BINARY},
    ("get", "/v1/packs/{name}/{version}/archive"): {"application/zip": BINARY},
    ("get", "/v1/human-tasks/{task_id}/screenshot"): {"image/png": BINARY},
}

# Constraints a model's validator enforces that pydantic cannot publish, stated for the
# document: component → property → its schema (or a function of the one pydantic wrote).
# schemathesis's positive-data check keeps the two in step: a value the document allows and
# a validator refuses fails it.
_B32 = r"[\s-]*[A-Za-z2-7]"
SEED = {"type": "string", "maxLength": 256,
        "pattern": (rf"^(?:(?:{_B32}){{8}}){{{MIN_SEED_CHARS // 8},}}"
                    rf"(?:(?:{_B32}){{7}}|(?:{_B32}){{5}}|(?:{_B32}){{4}}|(?:{_B32}){{2}})?[\s=-]*$"),
        "description": f"base32 (A-Z, 2-7; spaces and dashes ignored), at least {MIN_SEED_CHARS} characters"}
LABELS = {"type": "object", "additionalProperties": {"type": "string"}, "maxProperties": 64,
          "propertyNames": {"minLength": 1, "maxLength": 128}}
SESSIONS = {"type": "integer", "minimum": 1, "maximum": MAX_SESSIONS}
# One line, not blank. ``(?![\s\S]*…)`` rather than ``$``: Python's ``$`` also matches before a
# final newline, so a generator reading the pattern as Python does would send one.
ONE_LINE = {"type": "string", "minLength": 1, "maxLength": 200, "pattern": r"^(?![\s\S]*[\r\n\t])\s*\S"}
UNAVAILABLE = [{"type": "integer", "minimum": 1},
               {"type": "string", "pattern": r"^\s*(?:100(?:\.0+)?|[1-9][0-9]?(?:\.[0-9]+)?|0?\.[0-9]*[1-9][0-9]*)%\s*$"}]


def _not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """Left out means unchanged, but null is refused (a PATCH of a required field)."""
    kept = [s for s in schema.get("anyOf", []) if s != {"type": "null"}]
    rest = {k: v for k, v in schema.items() if k not in ("anyOf", "default")}
    return {**rest, **kept[0]} if len(kept) == 1 else {**rest, "anyOf": kept} if kept else schema


Refinement = dict[str, Any] | Callable[[dict[str, Any]], dict[str, Any]]
REFINE: dict[str, dict[str, Refinement]] = {
    "RunRequest": {"labels": LABELS},
    "AccountIn": {"totp_seed": {"anyOf": [SEED, {"type": "null"}]}, "max_sessions": SESSIONS, "labels": LABELS},
    "AccountPatch": {"totp_seed": {"anyOf": [SEED, {"type": "null"}]},
                     "max_sessions": {**SESSIONS, "description": "null is refused"},
                     "labels": {**LABELS, "description": "null is refused"},
                     "username": _not_null, "password": _not_null},
    "AssignIn": {"max_unavailable": {"anyOf": [*UNAVAILABLE, {"type": "null"}]}},
    "Person": {"by": ONE_LINE},
    "Completion": {"by": ONE_LINE},
    "Maintenance": {"max_unavailable": {"anyOf": UNAVAILABLE}},
}
# ...and across properties: a pool is assigned a version, or rolled back, never both or neither.
REFINE_WHOLE: dict[str, dict[str, Any]] = {
    "AssignIn": {"oneOf": [
        {"required": ["version"], "properties": {"version": {"type": "string"}, "rollback": {"const": False}}},
        {"required": ["rollback"], "properties": {"rollback": {"const": True}, "version": {"type": "null"}}},
    ]},
}


# Parameters, likewise: (method, path) → parameter → its schema.
SHA256 = {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"}
REFINE_PARAMS: dict[tuple[str, str], dict[str, dict[str, Any]]] = {
    ("post", "/v1/packs"): {"sha256": SHA256, "x-deskfleet-sha256": SHA256},
    ("put", "/v1/pools/{name}"): {"name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"}},
    ("put", "/v1/accounts/{name}"): {"name": {"type": "string", "maxLength": 200, "pattern": ACCOUNT.pattern}},
}
INT64 = {"format": "int64", "minimum": -(2**63), "maximum": 2**63 - 1}  # what the database stores


def _int64(schema: Any) -> None:
    """Integers bounded as the database stores them (a larger one is refused with 422)."""
    if isinstance(schema, list):
        for s in schema:
            _int64(s)
    elif isinstance(schema, dict):
        if schema.get("type") == "integer":
            for k, v in INT64.items():
                schema.setdefault(k, v)
        for k in ("properties", "$defs"):
            for s in schema.get(k, {}).values():
                _int64(s)
        for k in ("items", "additionalProperties", "anyOf", "oneOf", "allOf", "prefixItems"):
            _int64(schema.get(k))


def _refine(schemas: dict[str, Any]) -> None:
    for name, props in REFINE.items():
        declared = schemas.get(name, {}).get("properties", {})
        for prop, refinement in props.items():
            if prop not in declared:
                continue
            old = declared[prop]
            kept = {k: old[k] for k in ("title", "description", "default", "examples") if old.get(k) is not None}
            declared[prop] = {**kept, **(refinement(old) if callable(refinement) else refinement)}
    for name, extra in REFINE_WHOLE.items():
        if name in schemas:
            schemas[name].update(extra)


# -- install -------------------------------------------------------------------------------------


def install(app: FastAPI, orch: Orchestrator) -> None:
    """Complete the app's contract; call it once every route is in place."""
    generate = app.openapi
    static: Document = {}

    def document() -> Document:
        if not static:
            static.update(declare(copy.deepcopy(generate())))
        return static

    app.openapi = document  # type: ignore[method-assign]
    url = app.openapi_url or "/openapi.json"
    app.router.routes[:] = [r for r in app.router.routes if not (isinstance(r, Route) and r.path == url)]
    catalogue: Catalogue = orch.catalogue.automations

    async def openapi(request: Request) -> Response:
        # The automations and their schemas are the fleet's business: published to a caller
        # whose key may read runs (or on an open loopback server), the rest of the document
        # to anyone (a client generator, /docs before anybody logged in).
        given = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ")
        try:
            who = await orch.access.authenticate(given.strip() or None)
        except Unauthorized:
            who = None
        known = await catalogue() if who is not None and who.can(Permission.RUNS_READ) else []
        return Response(orjson.dumps(publish(document(), known)), media_type="application/json")

    app.add_route(url, openapi, include_in_schema=False)
    app.add_middleware(Methods, routes=lambda: _flat(app.routes))
    app.add_exception_handler(OverflowError, _out_of_range)


async def _out_of_range(_request: Request, exc: Exception) -> Response:
    # An id or number past what the database stores (a 64-bit integer) names nothing: the
    # client's error, never a 500. Logged, since a computation of ours could overflow too.
    log.warning("a number out of range: %s", exc, exc_info=exc)
    return error_response(422, "invalid_request", "a number in the request is out of range (at most 2**63 - 1)")


def declare(doc: Document) -> Document:
    """The document with every operation's error statuses declared, each with ErrorOut."""
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas["ErrorOut"] = ErrorOut.model_json_schema(ref_template=COMPONENTS + "{model}")
    doc["paths"] = {path: item for path, item in doc.get("paths", {}).items() if not path.startswith("/agent/")}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method not in METHODS:
                continue
            responses = op.setdefault("responses", {})
            for status, description in _statuses(method, path, op).items():
                declared = responses.setdefault(str(status), {})
                # FastAPI's own words ("Validation Error", "Not Found") say less than ours.
                if status in EXTRA.get((method, path), {}) or \
                        declared.get("description") in (None, "Validation Error", HTTPStatus(status).phrase):
                    declared["description"] = description
                declared["content"] = ERROR
            for param in op.get("parameters", []):
                refined = REFINE_PARAMS.get((method, path), {}).get(param.get("name"))
                if refined is not None:  # a header or a path parameter is never null
                    nullable = param.get("in") == "query" and not param.get("required")
                    param["schema"] = {"anyOf": [refined, {"type": "null"}]} if nullable else refined
                _int64(param.get("schema"))
            if (method, path) in CONTENT:
                success = next(s for s in responses if s.startswith("2"))
                responses[success]["content"] = CONTENT[method, path]
    _refine(schemas)
    for schema in schemas.values():
        _int64(schema)
    # FastAPI's own validation error shape is never sent: our handler answers ErrorOut.
    for unused in ("HTTPValidationError", "ValidationError"):
        if f'"{COMPONENTS}{unused}"'.encode() not in orjson.dumps(doc):
            schemas.pop(unused, None)
    return doc


def _statuses(method: str, path: str, op: Mapping[str, Any]) -> dict[int, str]:
    params = op.get("parameters", [])
    found: dict[int, str] = {}
    if path.startswith("/v1/") or path == "/metrics":
        found |= {401: GENERIC[401], 403: GENERIC[403]}
    if "requestBody" in op:
        found |= {400: GENERIC[400], 413: GENERIC[413], 422: GENERIC[422]}
    if params:
        found[422] = GENERIC[422]
    if any(p.get("in") == "path" for p in params):
        found[404] = GENERIC[404]
    found[503] = GENERIC[503]
    return found | EXTRA.get((method, path), {})


# -- the catalogue ---------------------------------------------------------------------------------


def publish(static: Document, specs: Iterable[AutomationSpec]) -> Document:
    """The static document with the catalogue in it: each automation's input and output
    schemas as components, and the run request (``RunSubmission``) as ``RunRequest``'s
    fields and a ``oneOf``, discriminated by ``automation``, of a small branch per
    automation: its name and its input. With no automation known the run request stays
    ``RunRequest`` (any name: the server answers 404)."""
    by_name: dict[str, list[AutomationSpec]] = {}
    for spec in specs:
        by_name.setdefault(spec.name, []).append(spec)
    if not by_name:
        return static
    doc = copy.deepcopy(static)
    schemas: dict[str, Any] = doc["components"]["schemas"]
    keys: dict[str, str] = {}
    branches: dict[str, str] = {}
    for name in sorted(by_name):
        versions = sorted(by_name[name], key=lambda s: version_key(s.version))
        newest = versions[-1]
        key = _key(name, keys)
        input_ref = _component(schemas, f"AutomationInput_{key}", newest.input_schema)
        if newest.output_schema:
            _component(schemas, f"AutomationOutput_{key}", newest.output_schema)
        branch = _branch(name, newest, input_ref)
        # Older versions whose input differs: a branch each, reached by pinning ``version``.
        older = [s for s in versions[:-1] if s.input_schema != newest.input_schema]
        if older:
            current = [v.version for v in versions if v.input_schema == newest.input_schema]
            branch["properties"]["version"] = {"anyOf": [{"enum": current}, {"type": "null"}]}
            alternatives = [branch]
            for spec in older:
                ref = _component(schemas, f"AutomationInput_{key}_v{_key(spec.version, {})}", spec.input_schema)
                alt = _branch(name, spec, ref)
                alt["properties"]["version"] = {"const": spec.version}
                alt["required"] = sorted({*alt["required"], "version"})
                alternatives.append(alt)
            branch = {"oneOf": alternatives}
        schemas[f"RunRequest_{key}"] = {"title": f"RunRequest_{key}", **branch}
        branches[name] = COMPONENTS + f"RunRequest_{key}"
    schemas["RunSubmission"] = {
        "title": "RunSubmission",
        "description": "A run request: RunRequest's fields, the automation's name picking the schema its input "
                       "must match (an unknown name is answered 404). Integers anywhere in the input are at most "
                       "64 bits.",
        "allOf": [{"$ref": COMPONENTS + "RunRequest"}],
        "oneOf": [{"$ref": ref} for ref in branches.values()],
        "discriminator": {"propertyName": "automation", "mapping": branches},
    }
    submission = {"$ref": COMPONENTS + "RunSubmission"}
    body = doc["paths"]["/v1/runs"]["post"]["requestBody"]["content"]["application/json"]
    body["schema"] = submission
    schemas["BatchRequest"]["properties"]["runs"]["items"] = submission
    return doc


def _branch(name: str, spec: AutomationSpec, input_ref: str) -> dict[str, Any]:
    """The part of a run request that depends on its automation: the name and the input."""
    branch: dict[str, Any] = {
        "type": "object",
        "properties": {"automation": {"type": "string", "const": name}, "input": {"$ref": input_ref}},
        "required": ["automation"],
    }
    if spec.description:
        branch["description"] = spec.description
    if not _accepts_empty(spec.input_schema):
        branch["required"].append("input")  # left out, the input is {}, which this schema refuses
    return branch


def _accepts_empty(schema: Any) -> bool:
    try:
        return bool(jsonschema.Draft202012Validator(schema).is_valid({}))
    except Exception:  # a schema the validator cannot use: say nothing more than RunRequest does
        return True


def _key(name: str, taken: dict[str, str]) -> str:
    """A component name for ``name`` (``[A-Za-z0-9._-]``), unique among ``taken``."""
    key = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    if taken.get(key, name) != name:
        key += "_" + hashlib.sha256(name.encode()).hexdigest()[:8]
    taken[key] = name
    return key


# -- schemas from the catalogue, made fit for OpenAPI 3.1 tools ----------------------------------

ONE = ("items", "additionalProperties", "unevaluatedProperties", "unevaluatedItems", "contains",
       "propertyNames", "not", "if", "then", "else")
MANY = ("allOf", "anyOf", "oneOf", "prefixItems")
NAMED = ("properties", "patternProperties", "dependentSchemas")
KEEP_BOOLEAN = ("additionalProperties", "unevaluatedProperties", "unevaluatedItems")  # understood everywhere


def _component(schemas: dict[str, Any], name: str, schema: Any) -> str:
    """Put an automation's schema into the components as ``name`` — its ``$defs`` beside
    it as ``name.def`` — and return its reference.

    JSON Schema allows what OpenAPI 3.1 tools choke on: ``$defs`` referenced as
    ``#/$defs/…`` (which would point into the document's root), ``#`` for the schema
    itself, remote references, ``$schema``/``$id``, ``$dynamicRef``, boolean schemas and
    draft-07 tuples (``items: [...]``); each is rewritten or dropped here."""
    schema = schema if isinstance(schema, dict) else {} if schema is not False else {"not": {}}
    defs = {**schema.get("definitions", {}), **schema.get("$defs", {})}
    taken: dict[str, str] = {}
    names = {d: f"{name}.{_key(d, taken)}" for d in defs}

    def ref(target: str) -> dict[str, Any]:
        if target == "#":
            return {"$ref": COMPONENTS + name}
        for prefix in ("#/$defs/", "#/definitions/"):
            if target.startswith(prefix):
                head, _, rest = target[len(prefix):].partition("/")
                if head in names:
                    return {"$ref": COMPONENTS + names[head] + (f"/{rest}" if rest else "")}
        if target.startswith("#/"):
            return {"$ref": COMPONENTS + name + target[1:]}
        return {"description": f"not published: the reference {target!r} is outside the automation's schema"}

    def fix(node: Any, boolean_ok: bool = False) -> Any:
        if isinstance(node, bool):
            return node if boolean_ok else ({} if node else {"not": {}})
        if not isinstance(node, dict):
            return {}
        out: dict[str, Any] = {}
        for k, v in node.items():
            if k in ("$schema", "$id", "$defs", "definitions", "$anchor", "$dynamicAnchor", "$comment"):
                continue
            if k == "$ref" and isinstance(v, str):
                out.update(ref(v))
            elif k in ("$dynamicRef", "$recursiveRef"):
                continue
            elif k == "items" and isinstance(v, list):  # draft-07 tuple
                out["prefixItems"] = [fix(s) for s in v]
            elif k == "additionalItems" and isinstance(node.get("items"), list):
                out["items"] = fix(v, boolean_ok=True)
            elif k in ONE:
                out[k] = fix(v, boolean_ok=k in KEEP_BOOLEAN)
            elif k in MANY and isinstance(v, list):
                out[k] = [fix(s) for s in v]
            elif k in NAMED and isinstance(v, dict):
                out[k] = {p: fix(s) for p, s in v.items()}
            else:
                out[k] = v
        return out

    for d, component in names.items():
        schemas[component] = fix(defs[d])
    schemas[name] = fix(schema)
    return COMPONENTS + name


# -- methods ---------------------------------------------------------------------------------------


class Methods:
    """What a path supports, said the HTTP way: a 405 carries ``Allow`` (the methods of
    every route on that path, not just the first one matched), ``OPTIONS`` answers 204
    with it, and ``HEAD`` is served as ``GET`` without the body."""

    def __init__(self, app: ASGIApp, routes: Callable[[], Iterable[Any]]) -> None:
        self.app = app
        self.routes = routes

    def allowed(self, path: str) -> set[str]:
        methods: set[str] = set()
        for route in self.routes():
            regex, route_methods = getattr(route, "path_regex", None), getattr(route, "methods", None)
            if regex is not None and route_methods and regex.match(path):
                methods |= set(route_methods)
        if methods:
            methods |= {"OPTIONS"} | ({"HEAD"} if "GET" in methods else set())
        return methods

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        method = scope["method"]
        if method in ("OPTIONS", "HEAD"):
            allowed = self.allowed(path)
            if method == "OPTIONS" and allowed:
                await Response(status_code=204, headers={"allow": _allow(allowed)})(scope, receive, send)
                return
            if method == "HEAD" and "GET" in allowed:
                await self.app({**scope, "method": "GET"}, receive, _headers_only(send))
                return

        async def send_allow(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 405:
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"allow"]
                message = {**message, "headers": [*headers, (b"allow", _allow(self.allowed(path)).encode())]}
            await send(message)

        await self.app(scope, receive, send_allow)


def _flat(routes: Iterable[Any]) -> Iterable[Any]:
    """The app's routes, those of included routers too (FastAPI 0.16x keeps an included
    router as one entry, its routes behind it)."""
    contexts = getattr(fastapi.routing, "iter_route_contexts", None)
    return contexts(list(routes)) if contexts is not None else routes


def _allow(methods: set[str]) -> str:
    return ", ".join(sorted(methods))


def _headers_only(send: Send) -> Send:
    async def head(message: Message) -> None:
        if message["type"] == "http.response.body":
            message = {"type": "http.response.body", "body": b"", "more_body": message.get("more_body", False)}
        await send(message)
    return head
