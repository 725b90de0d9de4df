"""The one table from domain errors to gRPC status codes, and the bounds of what a client is told."""

from __future__ import annotations

import grpc

from cosserve.server import errors

__all__ = ["MAX_DETAILS", "STATUS_CODES", "MalformedRequest", "bounded", "status_of"]

STATUS_CODES: dict[type[errors.CosserveError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
}

# Characters of an error message sent to the client: status details travel in HTTP/2 headers,
# and a message that echoes a huge blob name must not turn into a metadata-size failure.
MAX_DETAILS = 1024


def status_of(err: BaseException) -> grpc.StatusCode | None:
    """The code of a domain error, looked up along its class hierarchy (a subclass of InvalidArgument
    is INVALID_ARGUMENT); None for anything that is not a domain error (our bug: INTERNAL)."""
    for cls in type(err).__mro__:
        code = STATUS_CODES.get(cls)  # type: ignore[call-overload]
        if code is not None:
            return code
    return None


def bounded(message: str) -> str:
    if len(message) <= MAX_DETAILS:
        return message
    return message[: MAX_DETAILS - 24] + f" ... ({len(message)} chars)"


class MalformedRequest:
    """What a request deserializer hands on instead of raising, for bytes that are not the message:
    the error interceptor answers it with INVALID_ARGUMENT (grpc alone would say INTERNAL)."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message
