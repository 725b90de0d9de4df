"""The one table from domain errors to gRPC status codes, applied by one server interceptor."""

from __future__ import annotations

import logging
import secrets
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

# Paths every caller may use without a token: Kubernetes probes and reflection tooling.
_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _abort(context: grpc.ServicerContext, method: str, err: BaseException) -> None:
    if isinstance(err, errors.CosserveError):
        context.abort(STATUS_CODES[type(err)], str(err))
    error_id = secrets.token_hex(6)
    log.error("internal error %s in %s", error_id, method, exc_info=err)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error {error_id}; the server log has the details")


class ErrorInterceptor(grpc.ServerInterceptor):
    """Turns domain errors into their status codes and anything else into an opaque INTERNAL;
    with a token configured, refuses calls without it (UNAUTHENTICATED)."""

    def __init__(self, auth_token: str = "") -> None:
        self._expected = f"Bearer {auth_token}" if auth_token else ""

    def intercept_service(self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        check_token = bool(self._expected) and not method.startswith(_OPEN_PREFIXES)
        if check_token:
            sent = dict(details.invocation_metadata or ()).get("authorization", "")
            if not secrets.compare_digest(str(sent), self._expected):
                return _refuse(handler, "missing or wrong bearer token in 'authorization' metadata")
        if handler.response_streaming:
            behavior = handler.unary_stream or handler.stream_stream
            wrapped = _wrap_stream(method, behavior)
            field = "unary_stream" if handler.unary_stream else "stream_stream"
        else:
            behavior = handler.unary_unary or handler.stream_unary
            wrapped = _wrap_unary(method, behavior)
            field = "unary_unary" if handler.unary_unary else "stream_unary"
        return handler._replace(**{field: wrapped})


def _wrap_unary(method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
    def call(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return behavior(request, context)
        except Exception as err:  # noqa: BLE001  (every error leaves as a status code)
            if _is_abort(context):
                raise
            _abort(context, method, err)

    return call


def _wrap_stream(method: str, behavior: Callable[..., Any]) -> Callable[..., Iterator[Any]]:
    def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from behavior(request, context)
        except Exception as err:  # noqa: BLE001
            if _is_abort(context):
                raise
            _abort(context, method, err)

    return call


def _is_abort(context: grpc.ServicerContext) -> bool:
    # A handler (or grpc itself) already set a status: let its exception through unchanged.
    state = getattr(context, "_state", None)
    return bool(getattr(state, "aborted", False))


def _refuse(handler: Any, message: str) -> Any:
    def deny(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.response_streaming:
        field = "unary_stream" if handler.unary_stream else "stream_stream"
    else:
        field = "unary_unary" if handler.unary_unary else "stream_unary"
    return handler._replace(**{field: deny})
