"""OpenTelemetry traces: off unless an OTLP endpoint is configured, and then the one place the
server touches opentelemetry.

Configured by OpenTelemetry's own variables, read by its SDK: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
or `OTEL_EXPORTER_OTLP_ENDPOINT` turns traces on (OTLP over gRPC), `OTEL_TRACES_SAMPLER` and
`OTEL_TRACES_SAMPLER_ARG` choose the sampling, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
`OTEL_EXPORTER_OTLP_*` (headers, certificates, timeout) and `OTEL_BSP_*` (the batch schedule) are
the SDK's. `cosserve serve` calls `configure` once, after logging is set up.

Off (the default), nothing of opentelemetry is imported: `span` and `server_span` return one
shared no-op context manager, and the edge installs no tracing interceptor. This module imports
nothing of cosserve's layers, so every layer may use it: the edge opens a server span per call
(`interceptors.TracingInterceptor`, `observability.call_span`), the layers below open child spans
around the work that takes time (an op or net, a scoring pass, a snapshot or journal write, a
shared-memory copy). No span carries tensor data or a secret: names, counts and sizes only.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

__all__ = [
    "ENDPOINT_VARIABLES", "INSTALL", "NO_SPAN", "TEXT_LIMIT", "AttributeValue", "Span", "configure", "enabled", "server_span", "shutdown", "span", "text",
]

log = logging.getLogger("cosserve.server")

# Either turns traces on; the first is the traces-only one, which the SDK prefers too.
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_PROTOCOL_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
# How README's "Tracing" installs the optional dependencies traces need (pyproject's [otel]): from
# a clone, as every install there is.
INSTALL = 'python3 -m pip install -e ".[server,otel]"'
# The longest string a span attribute takes from a request (an op type, a blob or corpus name).
TEXT_LIMIT = 64

AttributeValue = str | bool | int | float | Sequence[str] | Sequence[int] | Sequence[float] | Sequence[bool]


class Span(Protocol):
    """What the code that opened a span may do with it."""

    def set_attribute(self, key: str, value: AttributeValue) -> None: ...

    def set_error(self, description: str) -> None: ...


class _NoSpan:
    """The span of every `with` while traces are off: does nothing."""

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        pass

    def set_error(self, description: str) -> None:
        pass


# What `span` and `server_span` return while traces are off (reusable: it holds no state).
NO_SPAN: contextlib.AbstractContextManager[Span] = contextlib.nullcontext(_NoSpan())

# Set by configure when traces are on: the SDK's tracer and provider, and the pieces of
# opentelemetry the spans use (_Otel).
_tracer: Any = None
_provider: Any = None
_otel: Any = None


def enabled() -> bool:
    """Whether traces are on in this process."""
    return _tracer is not None


def text(value: str) -> str:
    """`value` cut to TEXT_LIMIT characters, for an attribute that comes from a request."""
    return value if len(value) <= TEXT_LIMIT else value[:TEXT_LIMIT] + "..."


def span(name: str, attributes: Mapping[str, AttributeValue] | None = None) -> contextlib.AbstractContextManager[Span]:
    """A child of the current span (or a root) around work that takes time; while traces are
    off, or inside a span that is not sampled, one shared no-op. An exception leaving it marks
    the span as an error, by its type's name only (a message may quote a request)."""
    if _tracer is None:
        return NO_SPAN
    parent = _otel.get_current_span()
    if not parent.is_recording() and parent.get_span_context().is_valid:
        return NO_SPAN  # inside a call its sampler dropped: the child would be dropped too
    return _span(name, attributes, None, None, mark_errors=True)


def server_span(
    name: str, attributes: Mapping[str, AttributeValue], carrier: Iterable[tuple[str, str | bytes]]
) -> contextlib.AbstractContextManager[Span]:
    """The SERVER span of one call, continuing the caller's trace when `carrier` (gRPC metadata,
    or HTTP headers as (name, value) pairs, any case) holds a W3C `traceparent`. Any door wraps
    each call in it (see observability.call_span, which adds what every call's span carries) and
    sets its status itself: which codes are errors is the door's convention."""
    if _tracer is None:
        return NO_SPAN
    wanted = _otel.fields
    headers = {}
    for key, value in carrier:
        key = key.lower()
        if key in wanted and isinstance(value, str):
            headers[key] = value
    parent = None
    if headers:
        try:
            parent = _otel.propagate.extract(headers)
        except Exception:  # noqa: BLE001  (a caller's header must never fail its call: it starts a new trace)
            log.debug("traces: a call's trace context could not be read", exc_info=True)
    return _span(name, attributes, parent, _otel.SpanKind.SERVER, mark_errors=False)


class _OtelSpan:
    __slots__ = ("_span",)

    def __init__(self, span: Any) -> None:
        self._span = span

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        self._span.set_attribute(key, value)

    def set_error(self, description: str) -> None:
        self._span.set_status(_otel.Status(_otel.StatusCode.ERROR, description))


@contextlib.contextmanager
def _span(
    name: str, attributes: Mapping[str, AttributeValue] | None, parent: Any, kind: Any, *, mark_errors: bool
) -> Iterator[Span]:
    # Exceptions are not recorded as events: their messages and tracebacks may quote requests.
    with _tracer.start_as_current_span(
        name,
        context=parent,
        kind=kind if kind is not None else _otel.SpanKind.INTERNAL,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as opened:
        handle = _OtelSpan(opened)
        if not mark_errors:
            yield handle
            return
        try:
            yield handle
        except Exception as err:
            handle.set_error(type(err).__name__)
            raise


class _Otel:
    """The pieces of opentelemetry the spans use, imported once by configure."""

    def __init__(self) -> None:
        from opentelemetry import propagate
        from opentelemetry.trace import SpanKind, Status, StatusCode, get_current_span

        self.propagate = propagate
        self.get_current_span = get_current_span
        self.fields = frozenset(propagate.get_global_textmap().fields)
        self.SpanKind = SpanKind
        self.Status = Status
        self.StatusCode = StatusCode


def configure() -> bool:
    """Turn traces on if an OTLP endpoint is set (ENDPOINT_VARIABLES) and OpenTelemetry's SDK is
    installed; whether they are on. Without the SDK, or with a protocol other than gRPC, one log
    line says why they stay off; the server runs either way."""
    global _tracer, _provider, _otel
    if _tracer is not None:
        return True
    variable = next((v for v in ENDPOINT_VARIABLES if os.environ.get(v, "").strip()), None)
    if variable is None:
        return False
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        log.info("traces: off (OTEL_SDK_DISABLED=true)")
        return False
    if os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        log.info("traces: off (OTEL_TRACES_EXPORTER=none)")
        return False
    protocol = next((os.environ[v].strip() for v in _PROTOCOL_VARIABLES if os.environ.get(v, "").strip()), "grpc")
    if protocol != "grpc":
        log.error("traces: off: %s asks for OTLP over %r; cosserve sends OTLP over gRPC only (the collector's port 4317)",
                  next(v for v in _PROTOCOL_VARIABLES if os.environ.get(v, "").strip()), protocol)
        return False
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as err:
        log.error("traces: off: %s is set, but OpenTelemetry's SDK is not installed (%s); in a clone of cosserve: %s", variable, err, INSTALL)
        return False
    # The installed distribution's version (the cosserve package itself loads grpc, which this layer may not).
    try:
        __version__ = importlib.metadata.version("cosserve")
    except importlib.metadata.PackageNotFoundError:
        __version__ = "unknown"
    resource = Resource.create({"service.version": __version__})  # with OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "cosserve"}))
    provider = TracerProvider(resource=resource)  # the sampler from OTEL_TRACES_SAMPLER(_ARG)
    # The exporter reads the endpoint, headers, certificates and timeout from OTEL_EXPORTER_OTLP_*,
    # the processor its schedule from OTEL_BSP_*.
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _otel = _Otel()
    _provider = provider
    _tracer = provider.get_tracer("cosserve.server", __version__)
    log.info(
        "traces: on, OTLP/gRPC to %s (%s), sampler %s",
        _without_credentials(os.environ[variable]), variable, provider.sampler.get_description(),
    )
    return True


def shutdown(timeout_s: float = 5.0) -> None:
    """Send the spans still waiting and stop exporting (at `serve`'s end: the process may leave
    with os._exit, which runs no exit handlers)."""
    global _tracer, _provider
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.force_flush(int(timeout_s * 1000))
        provider.shutdown()


def _without_credentials(url: str) -> str:
    """An endpoint as it may be logged: any user:password@ dropped."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.username is None and parts.password is None:
        return url.strip()
    host = parts.hostname or ""
    return parts._replace(netloc=host if parts.port is None else f"{host}:{parts.port}").geturl()
