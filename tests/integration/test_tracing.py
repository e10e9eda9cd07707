"""OpenTelemetry traces (``deskfleet.tracing``): one run submitted over HTTP with a client's
``traceparent``, executed by a real agent over a real socket (a simulated machine), makes one
trace — the client's span the parent of the API request, then submit, the wait in the queue
and the assignment, and on the agent the attempt, pre-flight with its playbooks, and the
automation with its progress steps — every span the child of the one it should be.

Spans are caught by the SDK's in-memory exporter; the server and the agent share this
process, and so one tracer provider. Without tracing, nothing imports opentelemetry.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from deskfleet import tracing
from support import LiveServer, eventually

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable("deskfleet-test", provider=provider)
    try:
        yield exporter
    finally:
        tracing.disable()
        provider.shutdown()


def tree(found: list[ReadableSpan], root: int, depth: int = 0) -> list[str]:
    """The spans under ``root`` (a span id), indented, in start order."""
    out = []
    for s in sorted((s for s in found if s.parent is not None and s.parent.span_id == root),
                    key=lambda s: s.start_time or 0):
        assert s.context is not None
        what = next((str(s.attributes[k]) for k in ("deskfleet.playbook", "deskfleet.step", "deskfleet.automation")
                     if s.attributes and k in s.attributes), "")
        out.append("  " * depth + s.name + (f" [{what}]" if what else ""))
        out += tree(found, s.context.span_id, depth + 1)
    return out


async def test_a_run_is_one_trace_from_the_clients_span_to_the_automation_steps(
        spans: InMemorySpanExporter, server_factory: Callable[..., LiveServer],
        fleet_factory: Callable[..., Any]) -> None:
    server = server_factory()  # tracing is on before the app is built: it traces requests
    fleet = await fleet_factory(server, count=1)
    # An error dialog on the screen: pre-flight has a playbook to run before the automation.
    fleet.desktops[0].app.show_error()
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
        resp = await c.post("/v1/runs", params={"wait": 30},
                            json={"automation": "ehr.lookup_patient", "input": {"mrn": "M-1"}},
                            headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})
    assert resp.status_code in (200, 201), resp.text
    run = resp.json()
    assert run["state"] == "succeeded", run

    def ours() -> list[ReadableSpan]:
        found = [s for s in spans.get_finished_spans()
                 if s.context is not None and f"{s.context.trace_id:032x}" == CLIENT_TRACE]
        return found if {"POST /v1/runs", "deskfleet.attempt"} <= {s.name for s in found} else []

    found = await eventually(ours, timeout=10)
    by_name: dict[str, list[ReadableSpan]] = {}
    for s in found:
        by_name.setdefault(s.name, []).append(s)

    def one(name: str) -> ReadableSpan:
        assert len(by_name.get(name, [])) == 1, f"{name}: {len(by_name.get(name, []))} spans"
        return by_name[name][0]

    def parent_of(s: ReadableSpan) -> ReadableSpan | int:
        assert s.parent is not None, f"{s.name} has no parent"
        return next((p for p in found if p.context is not None and p.context.span_id == s.parent.span_id),
                    s.parent.span_id)

    request, submit = one("POST /v1/runs"), one("deskfleet.submit")
    assert request.kind is SpanKind.SERVER and request.parent is not None
    assert f"{request.parent.span_id:016x}" == CLIENT_SPAN and request.parent.is_remote
    assert request.attributes is not None and request.attributes["http.response.status_code"] in (200, 201)
    assert parent_of(submit) is request
    assert submit.attributes is not None and submit.attributes["deskfleet.run"] == run["id"]
    assign, queued = one("deskfleet.assign"), one("deskfleet.queued")
    assert parent_of(assign) is submit and parent_of(queued) is submit
    attempt = one("deskfleet.attempt")
    assert parent_of(attempt) is assign  # across the agent protocol: Assign.traceparent
    assert attempt.attributes is not None and attempt.attributes["deskfleet.ending"] == "succeeded"
    preflight, automation = one("deskfleet.preflight"), one("deskfleet.automation")
    assert parent_of(preflight) is attempt and parent_of(automation) is attempt
    assert preflight.attributes is not None and preflight.attributes["deskfleet.screen"] == "home"  # SimEHR's ready
    assert preflight.status.is_ok
    playbooks = by_name.get("deskfleet.playbook", [])
    assert playbooks and all(parent_of(p) is preflight for p in playbooks)
    steps = sorted(by_name.get("deskfleet.step", []), key=lambda s: s.start_time or 0)
    assert steps and all(parent_of(s) is automation for s in steps)
    assert [s.attributes["deskfleet.step"] for s in steps if s.attributes] == ["open search", "search by MRN", "return home"]
    # every span of the run is in the client's trace, under its span
    lines = [request.name, *("  " + line for line in tree(found, request.context.span_id))]  # type: ignore[union-attr]
    assert len(lines) == len(found), "\n".join(lines)
    print("\n".join(lines))


def test_without_tracing_nothing_imports_opentelemetry() -> None:
    """The agent side, its spans all made, with tracing off: no module of opentelemetry is
    loaded (the server's web framework may bring one of its own accord)."""
    code = (
        "import sys\n"
        "import deskfleet.agent.runtime, deskfleet.agent.preflight, deskfleet.services.dispatch\n"
        "from deskfleet import tracing\n"
        "with tracing.span('x', {'a': 1}) as s:\n"
        "    s.set_attribute('b', 2)\n"
        "    tracing.end(tracing.start_span('y'))\n"
        "    assert tracing.traceparent() is None\n"
        "steps = tracing.Steps(); steps.step('z'); steps.close()\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n"
        "print(loaded)\n"
        "assert not loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
