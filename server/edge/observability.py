"""Request ids, log lines and call spans: every line a call logs carries its id, as text or as
JSON, and with traces on every call has a server span that carries it too.

No grpc import: interceptors.RequestIdInterceptor reads the metadata and sets REQUEST_ID; the
log filter reads it back on the loop thread and on the work threads (Workers copies the
call's context to the thread that runs its work). `call_span` is the server span of a call of
any door (interceptors.TracingInterceptor for gRPC; an HTTP door wraps each request in it).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import secrets
import time
from collections.abc import Iterable, Iterator, Mapping

from cosserve.server import tracing
from cosserve.server.state import identity

__all__ = ["REQUEST_ID", "REQUEST_ID_KEY", "JsonFormatter", "call_span", "configure_logging", "request_id_of"]

# The metadata key a caller may set (and every response carries back), as nginx and Envoy name it.
REQUEST_ID_KEY = "x-request-id"
# The id of the call being served; "-" outside any call (start-up, shutdown, sweeps).
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("cosserve_request_id", default="-")

# A caller's id is kept only if it is short and plain, so it cannot forge or flood log lines.
_ACCEPTED_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


def request_id_of(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The caller's x-request-id if it is acceptable, else a new random one."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _ACCEPTED_ID.fullmatch(value):
            return value
    return secrets.token_hex(8)


def call_span(
    system: str,
    service: str,
    method: str,
    carrier: Iterable[tuple[str, str | bytes]],
    attributes: Mapping[str, tracing.AttributeValue] | None = None,
) -> contextlib.AbstractContextManager[tracing.Span]:
    """The server span of one call, named `{service}/{method}` and attributed as OpenTelemetry's
    RPC conventions say (rpc.system, rpc.service, rpc.method, and `attributes`); it continues the
    trace of a W3C `traceparent` in `carrier` (the call's metadata or HTTP headers, as (name, value)
    pairs). When the call ends it gets the request id (`cosserve.request_id`) and the caller's
    identity (`cosserve.identity`, when the server authenticates), both set by then. The door sets the status code and a session
    id on the span it yields. While traces are off, a shared no-op that costs one call."""
    if not tracing.enabled():
        return tracing.NO_SPAN
    return _call_span(f"{service}/{method}", {"rpc.system": system, "rpc.service": service, "rpc.method": method, **(attributes or {})}, carrier)


@contextlib.contextmanager
def _call_span(
    name: str, attributes: Mapping[str, tracing.AttributeValue], carrier: Iterable[tuple[str, str | bytes]]
) -> Iterator[tracing.Span]:
    with tracing.server_span(name, attributes, carrier) as span:
        try:
            yield span
        finally:
            span.set_attribute("cosserve.request_id", REQUEST_ID.get())
            # A name from the API keys file or a certificate's subject, never the key itself;
            # none on a server that authenticates nobody.
            caller = identity.CALLER.get()
            if caller:
                span.set_attribute("cosserve.identity", caller)


class _RequestIdFilter(logging.Filter):
    """Adds `request_id` to every record, so formats can name it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, request_id, message,
    and the traceback as `exception` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, log_format: str) -> None:
    """The root logger's one handler on stderr, in `log_format` ("text" or "json")."""
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(_TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
