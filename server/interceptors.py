"""Three small grpc.aio interceptors: bearer-token auth, per-call metrics, errors to status codes."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from cosserve.server.errors import Unauthenticated
from cosserve.server.status import MalformedRequest, bounded, status_of

__all__ = ["HANDLER_KINDS", "AuthInterceptor", "ErrorInterceptor", "MetricsInterceptor", "Observer"]

log = logging.getLogger("cosserve.server")

# Called with (method, status code name, seconds) after every call, e.g. by Metrics.observe.
Observer = Callable[[str, str, float], None]

# Paths every caller may use without a token: Kubernetes probes and reflection tooling.
_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

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


def rewrap(handler: grpc.RpcMethodHandler, wrap: Wrapper, *, deserializer: bool = True) -> grpc.RpcMethodHandler:
    """A handler of the same kind and serializers whose behavior is wrap(behavior)."""
    field, factory = HANDLER_KINDS[(handler.request_streaming, handler.response_streaming)]
    behavior = getattr(handler, field)
    return factory(
        wrap(behavior, inspect.isasyncgenfunction(behavior)),
        request_deserializer=handler.request_deserializer if deserializer else None,
        response_serializer=handler.response_serializer,
    )


def _around(before: Callable[[Any, aio.ServicerContext], Awaitable[None]] | None,
            failed: Callable[[BaseException, aio.ServicerContext], Awaitable[None]],
            done: Callable[[aio.ServicerContext, BaseException | None, float], None] | None = None) -> Wrapper:
    """A wrapper that calls `before(request, context)`, the behavior, then `failed` on an exception
    (which decides what leaves) and `done` at the end."""

    # `failed` runs outside the `except` block: an abort raised inside it would chain the error
    # (and through its traceback every frame and tensor of the call) to grpc's record of the abort,
    # which outlives the call.

    def wrap(behavior: Behavior, generator: bool) -> Behavior:
        if generator:

            async def stream(request: Any, context: aio.ServicerContext) -> Any:
                error: BaseException | None = None
                started = time.perf_counter()
                try:
                    if before is not None:
                        await before(request, context)
                    async with contextlib.aclosing(behavior(request, context)) as replies:
                        async for reply in replies:
                            yield reply
                except BaseException as err:  # noqa: BLE001  (failed() re-raises or aborts)
                    error = err
                try:
                    if error is not None:
                        await failed(error, context)
                finally:
                    if done is not None:
                        done(context, error, time.perf_counter() - started)
                    error = None

            return stream

        async def unary(request: Any, context: aio.ServicerContext) -> Any:
            error: BaseException | None = None
            reply: Any = None
            started = time.perf_counter()
            try:
                if before is not None:
                    await before(request, context)
                reply = await behavior(request, context)
            except BaseException as err:  # noqa: BLE001
                error = err
            try:
                if error is not None:
                    await failed(error, context)
                return reply
            finally:
                if done is not None:
                    done(context, error, time.perf_counter() - started)
                error = reply = None  # no reference cycle through this frame

        return unary

    return wrap


class ErrorInterceptor(aio.ServerInterceptor):
    """Domain errors leave as their status code (status.STATUS_CODES) with a bounded message; any
    other exception is our bug: INTERNAL with an opaque id, the traceback in the log only. A
    client's cancel and grpc's own aborts pass through untouched."""

    def __init__(self) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

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
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bounded(request.message))

        async def failed(err: BaseException, context: aio.ServicerContext) -> None:
            if isinstance(err, (aio.AbortError, asyncio.CancelledError)) or not isinstance(err, Exception):
                raise err
            code = status_of(err)
            if code is not None:
                message = bounded(str(err))
            else:
                error_id = secrets.token_hex(6)
                log.error("internal error %s in %s", error_id, method, exc_info=err)
                code, message = grpc.StatusCode.INTERNAL, f"internal error {error_id}; the server log has the details"
            del err
            await context.abort(code, message)

        wrapped = rewrap(handler, _around(check, failed))
        self._wrapped[method] = wrapped
        return wrapped


class AuthInterceptor(aio.ServerInterceptor):
    """With a token configured, a call without "authorization: Bearer <token>" is refused with
    UNAUTHENTICATED before its request is even decoded (health and reflection stay open)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()
        self._refusals: dict[str, grpc.RpcMethodHandler] = {}

    def _allowed(self, details: grpc.HandlerCallDetails) -> bool:
        if details.method.startswith(_OPEN_PREFIXES):
            return True
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                sent = value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")
                return secrets.compare_digest(sent, self._expected)
        return False

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        if self._allowed(details):
            return await continuation(details)
        refusal = self._refusals.get(details.method)
        if refusal is None:
            handler = await continuation(details)
            if handler is None:
                return None

            async def refuse(request: Any, context: aio.ServicerContext) -> None:
                err = Unauthenticated("missing or wrong bearer token in 'authorization' metadata")
                await context.abort(status_of(err) or grpc.StatusCode.UNAUTHENTICATED, str(err))

            refusal = rewrap(handler, _around(refuse, _reraise), deserializer=False)
            self._refusals[details.method] = refusal
        return refusal


def _code_name(context: aio.ServicerContext, error: BaseException | None) -> str:
    if error is None:
        return "OK"
    if isinstance(error, asyncio.CancelledError):
        return "CANCELLED"
    if isinstance(error, Exception):
        code = status_of(error)
        if code is not None:
            return code.name
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "INTERNAL"


class MetricsInterceptor(aio.ServerInterceptor):
    """Reports every call's method, final status code and duration to `observe`."""

    def __init__(self, observe: Observer) -> None:
        self._observe = observe
        self._wrapped: dict[int, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        entry = self._wrapped.get(id(handler))  # inner interceptors hand out cached handlers
        if entry is not None and entry[0] is handler:
            return entry[1]
        method = details.method
        observe = self._observe

        def done(context: aio.ServicerContext, error: BaseException | None, seconds: float) -> None:
            observe(method, _code_name(context, error), seconds)

        wrapped = rewrap(handler, _around(None, _reraise, done))
        self._wrapped[id(handler)] = (handler, wrapped)
        return wrapped
