"""The grpc.aio interceptors: request ids, per-call metrics, identities (auth), errors to status codes."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio
from grpc._cython import cygrpc

from cosserve import limits
from cosserve.server import tracing
from cosserve.server.edge import observability
from cosserve.server.edge.status import MalformedRequest, bounded, status_of
from cosserve.server.errors import InvalidArgument, Unauthenticated
from cosserve.server.state import identity
from cosserve.server.state.identity import Identities

__all__ = [
    "HANDLER_KINDS", "AuthInterceptor", "ErrorInterceptor", "MetricsInterceptor", "Observer", "RequestIdInterceptor",
    "TracingInterceptor",
]

log = logging.getLogger("cosserve.server")

# Called with (method, status code name, seconds) after every call, e.g. by Metrics.observe.
Observer = Callable[[str, str, float], None]

# Paths every caller may use without credentials: Kubernetes probes; reflection with --reflection-open.
_HEALTH_PREFIX = "/grpc.health.v1.Health/"
_REFLECTION_PREFIX = "/grpc.reflection."

# What grpc raises when it cannot send on a call: the client cancelled or the connection is
# gone (grpc's own type, not exported by grpc.aio).
_SEND_FAILED: tuple[type[BaseException], ...] = tuple(
    t for t in (getattr(cygrpc, "ExecuteBatchError", None),) if isinstance(t, type)
)

Behavior = Callable[..., Any]
# Wraps a behavior: (behavior, is an async generator) -> new behavior of the same kind.
Wrapper = Callable[[Behavior, bool], Behavior]

# (request streaming, response streaming) -> the handler's behavior field and its factory; the
# servicer's registration builds its handlers from the same table.
HANDLER_KINDS = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


async def _reraise(err: BaseException, context: aio.ServicerContext) -> None:
    """The `failed` of an interceptor that leaves errors to the one inside it."""
    raise err


_SAME: Any = object()


def rewrap(handler: grpc.RpcMethodHandler, wrap: Wrapper, *, request_deserializer: Any = _SAME) -> grpc.RpcMethodHandler:
    """A handler of the same kind and serializers (or with `request_deserializer`) whose behavior
    is wrap(behavior)."""
    field, factory = HANDLER_KINDS[(handler.request_streaming, handler.response_streaming)]
    behavior = getattr(handler, field)
    return factory(
        wrap(behavior, inspect.isasyncgenfunction(behavior)),
        request_deserializer=handler.request_deserializer if request_deserializer is _SAME else request_deserializer,
        response_serializer=handler.response_serializer,
    )


async def _write(context: aio.ServicerContext, reply: Any) -> None:
    try:
        await context.write(reply)
        return
    except _SEND_FAILED:
        pass
    # The client cancelled or went away: the call is cancelled, not failed (grpc logs nothing
    # for a CancelledError, where it would log the send error with a traceback). Raised outside
    # the except block, so it does not carry grpc's error along.
    raise asyncio.CancelledError()


def _around(before: Callable[[Any, aio.ServicerContext], Awaitable[None]] | None,
            failed: Callable[[BaseException, aio.ServicerContext], Awaitable[None]],
            done: Callable[[aio.ServicerContext, BaseException | None, float], None] | None = None,
            requests: Callable[[Any], Any] | None = None) -> Wrapper:
    """A wrapper that calls `before(request, context)`, the behavior (on `requests(request)` if
    given), then `failed` on an exception (which decides what leaves) and `done` at the end.

    The wrapper of a streaming behavior (an async generator) is a coroutine that writes each reply
    itself with context.write: a write that fails because the client is gone then happens here,
    where it becomes CANCELLED, not in grpc, which would log it as the servicer's error."""

    # `failed` runs outside the `except` block: an abort raised inside it would chain the error
    # (and through its traceback every frame and tensor of the call) to grpc's record of the abort,
    # which outlives the call.

    def wrap(behavior: Behavior, generator: bool) -> Behavior:
        async def call(request: Any, context: aio.ServicerContext) -> Any:
            error: BaseException | None = None
            reply: Any = None
            started = time.perf_counter()
            try:
                if before is not None:
                    await before(request, context)
                if requests is not None:
                    request = requests(request)
                if generator:
                    async with contextlib.aclosing(behavior(request, context)) as replies:
                        async for item in replies:
                            await _write(context, item)
                            item = None
                else:
                    reply = await behavior(request, context)
            except BaseException as err:  # noqa: BLE001  (failed() re-raises or aborts)
                error = err
            try:
                if error is not None:
                    await failed(error, context)
                return reply
            finally:
                if done is not None:
                    done(context, error, time.perf_counter() - started)
                error = reply = request = None  # no reference cycle through this frame

        return call

    return wrap


def _lenient(deserialize: Callable[[bytes], Any], method: str) -> Callable[[bytes], Any]:
    """A request deserializer that hands bytes it cannot parse on as a MalformedRequest (grpc
    would answer UNKNOWN and log a traceback per request)."""
    name = method.rsplit("/", 1)[-1]

    def parse(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except Exception as err:  # noqa: BLE001  (any parse failure is the client's bytes)
            return MalformedRequest(f"{name}: the request is not a valid message: {err}")

    return parse


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """The messages of a request stream; one that did not parse fails the call as INVALID_ARGUMENT."""
    async for request in requests:
        if isinstance(request, MalformedRequest):
            raise InvalidArgument(request.message)
        yield request


class _GrpcDecodingNoise(logging.Filter):
    """Drops grpc's log line, with traceback, for metadata that is not UTF-8: grpc writes it
    for every such header before any interceptor runs, so anyone could fill the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "Invalid encoding on %s"


_GRPC_DECODING_NOISE = _GrpcDecodingNoise()


class ErrorInterceptor(aio.ServerInterceptor):
    """Domain errors leave as their status code (status.STATUS_CODES) with a bounded message; any
    other exception is our bug: INTERNAL with an opaque id, the traceback in the log only. Bytes
    that do not parse, on every method (health and reflection too), are INVALID_ARGUMENT. A
    client's cancel, and a send that fails because the client is gone, leave as CANCELLED;
    grpc's own aborts pass through untouched."""

    def __init__(self) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}
        logging.getLogger("grpc._cython.cygrpc").addFilter(_GRPC_DECODING_NOISE)  # added once

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        method = details.method
        cached = self._wrapped.get(method)
        if cached is not None:
            return cached
        handler = await continuation(details)
        if handler is None:
            return None

        async def check(request: Any, context: aio.ServicerContext) -> None:
            if isinstance(request, MalformedRequest):
                raise InvalidArgument(request.message)

        async def failed(err: BaseException, context: aio.ServicerContext) -> None:
            if isinstance(err, _SEND_FAILED):
                raise asyncio.CancelledError()  # the client is gone (see _write)
            if isinstance(err, (aio.AbortError, asyncio.CancelledError)) or not isinstance(err, Exception):
                raise err
            code = status_of(err)
            if code is not None:
                message = bounded(str(err))
            else:
                error_id = secrets.token_hex(6)
                log.error("internal error %s in %s", error_id, method, exc_info=err)
                request_id = observability.REQUEST_ID.get()
                code = grpc.StatusCode.INTERNAL
                message = f"internal error {error_id} in request {request_id}; the server log has the details"
            del err
            try:
                await context.abort(code, message)
            except _SEND_FAILED:
                pass  # a request stream the client cancelled ends like a short one: no one to tell
            raise asyncio.CancelledError()

        deserialize = handler.request_deserializer
        streaming = handler.request_streaming and deserialize is not None
        wrapped = rewrap(
            handler,
            _around(None if handler.request_streaming else check, failed, requests=_checked if streaming else None),
            request_deserializer=None if deserialize is None else _lenient(deserialize, method),
        )
        self._wrapped[method] = wrapped
        return wrapped


class AuthInterceptor(aio.ServerInterceptor):
    """Every call must prove an identity (identity.Identities): a bearer key in 'authorization'
    metadata, or with mutual TLS the client certificate. A call that proves none is refused with
    UNAUTHENTICATED before its request is even decoded. The identity is set in identity.CALLER for
    the call's handler. Health stays open; reflection too with `reflection_open`."""

    def __init__(self, identities: Identities, *, reflection_open: bool = False) -> None:
        self._identities = identities
        self._open = (_HEALTH_PREFIX, _REFLECTION_PREFIX) if reflection_open else (_HEALTH_PREFIX,)
        self._refusals: dict[str, grpc.RpcMethodHandler] = {}
        self._by_certificate: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        method = details.method
        if method.startswith(self._open):
            return await continuation(details)
        metadata = details.invocation_metadata
        if self._identities.certificates and not identity.authorization(metadata):
            return await self._certified(continuation, details)
        caller = self._identities.caller(metadata)
        if caller is None:
            return await self._refusal(continuation, details)
        # The interceptors run in the call's own task, before its handler: the handler, and the
        # tasks it starts, see this value; no other call does.
        identity.CALLER.set(caller)
        return await continuation(details)

    async def _refusal(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        refusal = self._refusals.get(details.method)
        if refusal is None:
            handler = await continuation(details)
            if handler is None:
                return None

            async def refuse(request: Any, context: aio.ServicerContext) -> None:
                await _unauthenticated(context, "missing or wrong bearer token in 'authorization' metadata")

            # No deserializer: the bytes of a caller without credentials are never parsed.
            refusal = rewrap(handler, _around(refuse, _reraise), request_deserializer=None)
            self._refusals[details.method] = refusal
        return refusal

    async def _certified(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        """The handler that takes the caller from the client certificate, which only the call's
        context shows (the handshake has verified it against --tls-client-ca already)."""
        certified = self._by_certificate.get(details.method)
        if certified is None:
            handler = await continuation(details)
            if handler is None:
                return None
            identities = self._identities

            async def from_certificate(request: Any, context: aio.ServicerContext) -> None:
                caller = identities.of_subject(_subject(context))
                if caller is None:
                    await _unauthenticated(context, "no bearer token and no client certificate")
                    return
                identity.CALLER.set(caller)

            certified = rewrap(handler, _around(from_certificate, _reraise))
            self._by_certificate[details.method] = certified
        return certified


async def _unauthenticated(context: aio.ServicerContext, message: str) -> None:
    err = Unauthenticated(message)
    await context.abort(status_of(err) or grpc.StatusCode.UNAUTHENTICATED, str(err))


def _subject(context: aio.ServicerContext) -> str | None:
    """The subject of the peer's verified certificate (RFC 4514 text), or None."""
    auth = context.auth_context() or {}
    for key in ("x509_subject", "x509_common_name"):
        values = auth.get(key)
        if values:
            value = values[0]
            return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)
    return None


def _code_name(context: aio.ServicerContext, error: BaseException | None) -> str:
    if error is None:
        return "OK"
    if isinstance(error, (asyncio.CancelledError, *_SEND_FAILED)):
        return "CANCELLED"
    if isinstance(error, Exception):
        code = status_of(error)
        if code is not None:
            return code.name
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "INTERNAL"


class _WrappedHandlers:
    """An interceptor's wrapped handler of each inner handler, made once: the inner interceptors
    and the servicer hand out the same handler object for a method on every call, so the wrapping
    (a few closures) is paid once per method. Keyed by identity, holding the handler too, so a
    recycled id() never returns another handler's wrapper."""

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def get(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler | None:
        entry = self._by_id.get(id(handler))
        return entry[1] if entry is not None and entry[0] is handler else None

    def keep(self, handler: grpc.RpcMethodHandler, wrapped: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        self._by_id[id(handler)] = (handler, wrapped)
        return wrapped


class MetricsInterceptor(aio.ServerInterceptor):
    """Reports every call's method, final status code and duration to `observe`."""

    def __init__(self, observe: Observer) -> None:
        self._observe = observe
        self._wrapped = _WrappedHandlers()

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        cached = self._wrapped.get(handler)
        if cached is not None:
            return cached
        method = details.method
        observe = self._observe

        def done(context: aio.ServicerContext, error: BaseException | None, seconds: float) -> None:
            observe(method, _code_name(context, error), seconds)

        wrapped = rewrap(handler, _around(None, _reraise, done))
        return self._wrapped.keep(handler, wrapped)


# The call's `cosserve-session-id` metadata values (limits.SESSION_ID_METADATA), the key a load
# balancer routes a session's calls on; the servicer checks they name the request's session.
SESSION_METADATA: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("session_metadata", default=())


class RequestIdInterceptor(aio.ServerInterceptor):
    """Gives every call a request id: the caller's x-request-id if it is plain and short, else a
    new one. The id is in observability.REQUEST_ID for every log line of the call, returned in the
    trailing metadata (also of a refused or failed call), and at DEBUG each call logs one line.
    It also records the call's routing metadata in SESSION_METADATA."""

    def __init__(self) -> None:
        self._wrapped = _WrappedHandlers()

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        # Set here, in the call's own task before its handler runs (as identity.CALLER is).
        metadata = details.invocation_metadata or ()
        request_id = observability.request_id_of(metadata)
        observability.REQUEST_ID.set(request_id)
        SESSION_METADATA.set(tuple(str(value) for key, value in metadata if key == limits.SESSION_ID_METADATA))
        handler = await continuation(details)
        if handler is None:
            return None
        cached = self._wrapped.get(handler)
        if cached is not None:
            return cached
        method = details.method

        async def returned(request: Any, context: aio.ServicerContext) -> None:
            # Kept by grpc when an inner interceptor aborts the call.
            context.set_trailing_metadata(((observability.REQUEST_ID_KEY, observability.REQUEST_ID.get()),))

        def done(context: aio.ServicerContext, error: BaseException | None, seconds: float) -> None:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s %s %.1f ms", method, _code_name(context, error), seconds * 1e3)

        wrapped = rewrap(handler, _around(returned, _reraise, done))
        return self._wrapped.keep(handler, wrapped)


# The codes OpenTelemetry's gRPC conventions count as a server's error; the others are the caller's.
_SERVER_ERROR_CODES = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"})


class TracingInterceptor(aio.ServerInterceptor):
    """A SERVER span per call (observability.call_span), named `{service}/{method}` with
    rpc.system "grpc", rpc.service, rpc.method and rpc.grpc.status_code, the request id, the
    identity and the `cosserve-session-id` metadata's session; a `traceparent` in the metadata
    makes it a child of the caller's span. Installed first, so the span holds the whole call,
    and only while traces are on (tracing.enabled)."""

    def __init__(self) -> None:
        self._wrapped = _WrappedHandlers()

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        cached = self._wrapped.get(handler)
        if cached is not None:
            return cached
        service, _, method = details.method.lstrip("/").rpartition("/")

        def wrap(behavior: Behavior, generator: bool) -> Behavior:
            # A stream's replies are written by _around's wrapper, which is a plain coroutine.
            inner = _around(None, _reraise)(behavior, generator) if generator else behavior

            async def traced(request: Any, context: aio.ServicerContext) -> Any:
                with observability.call_span("grpc", service, method, context.invocation_metadata() or ()) as span:
                    error: BaseException | None = None
                    try:
                        return await inner(request, context)
                    except BaseException as err:
                        error = err
                        raise
                    finally:
                        code = _code_name(context, error)
                        span.set_attribute("rpc.grpc.status_code", grpc.StatusCode[code].value[0])
                        if code in _SERVER_ERROR_CODES:
                            span.set_error(code)
                        sessions = SESSION_METADATA.get()
                        if sessions:
                            span.set_attribute("cosserve.session_id", tracing.text(sessions[0]))
                        error = request = None  # no reference cycle through this frame

            return traced

        wrapped = rewrap(handler, wrap)
        return self._wrapped.keep(handler, wrapped)
