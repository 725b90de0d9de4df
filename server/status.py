"""The one table from domain errors to gRPC status codes, applied by one server interceptor."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from cosserve.server import errors

__all__ = ["STATUS_CODES", "ErrorInterceptor"]

log = logging.getLogger("cosserve.server")

STATUS_CODES: dict[type[errors.CosserveError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
}

# Called with (method, status code name, seconds) after every call, e.g. by Metrics.observe.
Observer = Callable[[str, str, float], None]

# Paths every caller may use without a token: Kubernetes probes and reflection tooling.
_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _abort(context: grpc.ServicerContext, method: str, err: BaseException) -> None:
    if isinstance(err, errors.CosserveError):
        context.abort(STATUS_CODES[type(err)], str(err))
    error_id = secrets.token_hex(6)
    log.error("internal error %s in %s", error_id, method, exc_info=err)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error {error_id}; the server log has the details")


def _code_of(err: BaseException | None, context: grpc.ServicerContext) -> str:
    if err is None:
        return "OK"
    if isinstance(err, errors.CosserveError):
        return STATUS_CODES[type(err)].name
    code = context.code() if hasattr(context, "code") else None  # set by abort()
    return code.name if isinstance(code, grpc.StatusCode) else "INTERNAL"


class ErrorInterceptor(grpc.ServerInterceptor):
    """Turns domain errors into their status codes and anything else into an opaque INTERNAL;
    with a token configured, refuses calls without it (UNAUTHENTICATED)."""

    def __init__(self, auth_token: str = "", observe: Observer | None = None) -> None:
        self._expected = f"Bearer {auth_token}" if auth_token else ""
        self._observe = observe or (lambda method, code, seconds: None)

    def intercept_service(self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        check_token = bool(self._expected) and not method.startswith(_OPEN_PREFIXES)
        if check_token:
            sent = dict(details.invocation_metadata or ()).get("authorization", "")
            if not secrets.compare_digest(str(sent), self._expected):
                self._observe(method, "UNAUTHENTICATED", 0.0)
                return _refuse(handler, "missing or wrong bearer token in 'authorization' metadata")
        field = _behavior_field(handler)
        wrap = _wrap_stream if handler.response_streaming else _wrap_unary
        return handler._replace(**{field: wrap(method, getattr(handler, field), self._observe)})


def _behavior_field(handler: grpc.RpcMethodHandler) -> str:
    """Which of the handler's four behavior fields is set."""
    if handler.response_streaming:
        return "stream_stream" if handler.request_streaming else "unary_stream"
    return "stream_unary" if handler.request_streaming else "unary_unary"


def _wrap_unary(method: str, behavior: Callable[..., Any], observe: Observer) -> Callable[..., Any]:
    def call(request: Any, context: grpc.ServicerContext) -> Any:
        start, failure = time.perf_counter(), None
        try:
            return behavior(request, context)
        except Exception as err:  # noqa: BLE001  (every error leaves as a status code)
            failure = err
            if _is_abort(context):
                raise
            _abort(context, method, err)
        finally:
            observe(method, _code_of(failure, context), time.perf_counter() - start)

    return call


def _wrap_stream(method: str, behavior: Callable[..., Any], observe: Observer) -> Callable[..., Iterator[Any]]:
    def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        start, failure = time.perf_counter(), None
        try:
            yield from behavior(request, context)
        except Exception as err:  # noqa: BLE001
            failure = err
            if _is_abort(context):
                raise
            _abort(context, method, err)
        finally:
            observe(method, _code_of(failure, context), time.perf_counter() - start)

    return call


def _is_abort(context: grpc.ServicerContext) -> bool:
    # A handler (or grpc itself) already set a status: let its exception through unchanged.
    state = getattr(context, "_state", None)
    return bool(getattr(state, "aborted", False))


def _refuse(handler: Any, message: str) -> Any:
    def deny(request: Any, context: grpc.ServicerContext) -> Any:
        _abort(context, "", errors.Unauthenticated(message))

    return handler._replace(**{_behavior_field(handler): deny})
