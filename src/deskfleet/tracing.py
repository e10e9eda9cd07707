"""OpenTelemetry traces of a run, from a client's submit to its agent's automation steps —
optional: ``pip install 'deskfleet[otel]'``, then ``deskfleet server --otel`` and
``deskfleet agent --otel`` (or ``DESKFLEET_SERVER_OTEL=1`` / ``DESKFLEET_AGENT_OTEL=1``).

One trace per run, continued across processes by its W3C ``traceparent``:

    POST /v1/runs                  (the API request; a client's own traceparent header is its parent)
      deskfleet.submit             the run made durable; its context is stored with the run
        deskfleet.queued           from the run's (re)queueing to its assignment
        deskfleet.assign           an attempt assigned and sent — Assign.traceparent names it
          deskfleet.attempt        on the agent, to its result
            deskfleet.preflight    proving the screen (invariant 5)
              deskfleet.playbook   each playbook pre-flight runs
            deskfleet.automation   (deskfleet.reconcile first, for an attempt after a lost one)
              deskfleet.step       each progress step, until the next one

A run's spans may come from several replicas (it is submitted to one and assigned by
another): the store keeps the submit's context in the run's row (``runs.traceparent``).
Where spans go is OpenTelemetry's standard configuration: ``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_SERVICE_NAME``, ``OTEL_TRACES_SAMPLER``, ``OTEL_TRACES_EXPORTER`` (``otlp``,
``console`` or ``none``)…

Until :func:`enable` nothing here imports opentelemetry, and every call returns at once
with a shared do-nothing span: tracing that is off costs a function call.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from types import TracebackType
from typing import Any, Protocol

from .errors import ConfigError

log = logging.getLogger(__name__)

Attributes = Mapping[str, str | int | float | bool]

_tracer: Any = None  # opentelemetry.trace.Tracer once enabled
_provider: Any = None
_otel: Any = None  # the modules, imported by enable(): see _Otel


class Span(Protocol):
    """What the code here does with a span (an OpenTelemetry span, or :data:`NO_SPAN`)."""

    def set_attribute(self, key: str, value: Any) -> Any: ...

    def update_name(self, name: str) -> Any: ...

    def end(self, end_time: int | None = None) -> Any: ...


class _NoSpan:
    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def update_name(self, name: str) -> None:
        pass

    def end(self, end_time: int | None = None) -> None:
        pass

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


NO_SPAN = _NoSpan()


class _Otel:
    """The OpenTelemetry modules used here, imported once tracing is on."""

    def __init__(self) -> None:
        from opentelemetry import context, propagate, trace

        self.context, self.propagate, self.trace = context, propagate, trace


def enabled() -> bool:
    return _tracer is not None


def enable(service: str, *, provider: Any = None) -> None:
    """Trace this process. ``provider``: an OpenTelemetry TracerProvider to use (an
    embedder's, or a test's with an in-memory exporter); by default the SDK's, configured by
    the standard ``OTEL_*`` environment variables and exporting by OTLP, made the global one."""
    global _tracer, _provider, _otel
    try:
        _otel = _Otel()
        if provider is None:
            provider = _sdk_provider(service)
            _otel.trace.set_tracer_provider(provider)
    except ImportError as exc:
        _otel = None
        raise ConfigError(f"tracing needs OpenTelemetry ({exc.name} is missing): "
                          "pip install 'deskfleet[otel]'") from exc
    from .version import __version__

    _provider = provider
    _tracer = provider.get_tracer("deskfleet", __version__)


def disable() -> None:
    """Back to no tracing (spans already made are the provider's to export)."""
    global _tracer, _provider
    _tracer = _provider = None


def _sdk_provider(service: str) -> Any:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    # OTEL_SERVICE_NAME (and OTEL_RESOURCE_ATTRIBUTES) win over our default name.
    resource = Resource.create({} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": service})
    provider = TracerProvider(resource=resource)  # OTEL_TRACES_SAMPLER applies
    kind = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")[0].strip().lower()
    if kind == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif kind == "otlp":
        protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                    or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf")
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    elif kind != "none":
        raise ConfigError(f"OTEL_TRACES_EXPORTER={kind!r}: deskfleet exports by otlp or console (or none)")
    log.info("tracing on: service %s, exporter %s", service, kind)
    return provider


# -- spans ------------------------------------------------------------------------------------


class _Current:
    """``with span(...)``: an OpenTelemetry span made the current one while the block runs."""

    __slots__ = ("_cm", "_span", "args")

    def __init__(self, args: dict[str, Any]) -> None:
        self.args = args
        self._cm: Any = None

    def __enter__(self) -> Span:
        # Not OpenTelemetry's record of an exception: its message may quote the app (or a
        # secret it typed). A span that raised says only the exception's type.
        self._cm = _tracer.start_as_current_span(**self.args, record_exception=False, set_status_on_exception=False)
        self._span: Any = self._cm.__enter__()
        return self._span  # type: ignore[no-any-return]

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            failed(self._span, exc_type.__name__)
        self._cm.__exit__(exc_type, exc, tb)


def _args(name: str, attributes: Attributes | None, parent: str | None, kind: str,
          start: float | None) -> dict[str, Any]:
    args: dict[str, Any] = {"name": name, "attributes": attributes,
                            "kind": getattr(_otel.trace.SpanKind, kind.upper())}
    if parent is not None:
        args["context"] = _otel.propagate.extract({"traceparent": parent})
    if start is not None:
        args["start_time"] = int(start * 1e9)
    return args


def span(name: str, attributes: Attributes | None = None, *, parent: str | None = None,
         kind: str = "internal", start: float | None = None) -> _Current | _NoSpan:
    """``with span(name) as s:`` a span, current while the block runs (its children's
    parent), ended with the block (an exception marks it failed). ``parent``: a
    ``traceparent`` to continue instead of the current span; ``start``: its start, in
    seconds since the epoch, if it began before the block."""
    if _tracer is None:
        return NO_SPAN
    return _Current(_args(name, attributes, parent, kind, start))


def start_span(name: str, attributes: Attributes | None = None, *, parent: str | None = None,
               start: float | None = None, kind: str = "internal") -> Span:
    """A span that is not made current: whoever holds it ends it (``end``)."""
    if _tracer is None:
        return NO_SPAN
    return _tracer.start_span(**_args(name, attributes, parent, kind, start))  # type: ignore[no-any-return]


def current(s: Span) -> Any:
    """``with current(s):`` make a span from :func:`start_span` the current one (the parent
    of spans made in the block, and of tasks started there); it is not ended."""
    if s is NO_SPAN:
        return NO_SPAN
    return _otel.trace.use_span(s, end_on_exit=False)


def end(s: Span, at: float | None = None) -> None:
    """End a span made by :func:`start_span`, at ``at`` (seconds since the epoch) or now."""
    s.end(None if at is None else int(at * 1e9))


def traceparent(of: Span | None = None) -> str | None:
    """The W3C ``traceparent`` of ``of`` (default: the current span), for another process to
    continue the trace from; None when tracing is off or no span is recording."""
    if _tracer is None:
        return None
    ctx = _otel.trace.set_span_in_context(of) if of is not None else None
    carrier: dict[str, str] = {}
    _otel.propagate.inject(carrier, context=ctx)
    return carrier.get("traceparent")


def failed(s: Span, message: str) -> None:
    """Mark a span failed, with why (its block raised nothing: the failure was an answer)."""
    if s is NO_SPAN:
        return
    s.set_status(_otel.trace.Status(_otel.trace.StatusCode.ERROR, message[:500]))  # type: ignore[attr-defined]


class Steps:
    """The spans of an automation's progress steps, children of the span current where this
    is made: each lasts from its report to the next one's (or to :meth:`close`)."""

    __slots__ = ("_current", "_parent")

    def __init__(self) -> None:
        self._parent = traceparent()
        self._current: Span | None = None

    def step(self, name: str, attributes: Attributes | None = None) -> None:
        if self._parent is None:
            return
        self.close()
        self._current = start_span("deskfleet.step", {"deskfleet.step": name, **(attributes or {})},
                                   parent=self._parent)

    def close(self) -> None:
        if self._current is not None:
            self._current.end()
            self._current = None


# -- the API ------------------------------------------------------------------------------------

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class TraceRequests:
    """ASGI middleware: a server span per HTTP request, the child of the client's
    ``traceparent`` header if it sent one; named by its route (``POST /v1/runs``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _tracer is None:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers") or ()}
        method = scope.get("method", "GET")
        status = 0

        async def sending(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        with _tracer.start_as_current_span(
            method, context=_otel.propagate.extract(headers), kind=_otel.trace.SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": scope.get("path", "")},
            record_exception=False, set_status_on_exception=False,
        ) as s:
            try:
                await self.app(scope, receive, sending)
            finally:
                route = getattr(scope.get("route"), "path", None)
                if route:
                    s.update_name(f"{method} {route}")
                    s.set_attribute("http.route", route)
                if status:
                    s.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        failed(s, f"HTTP {status}")
