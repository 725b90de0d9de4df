"""The one table from domain errors to gRPC status codes, and the bounds of what a client is told."""

from __future__ import annotations

import ast
import re

import grpc

from cosserve.server import errors

__all__ = ["HTTP_STATUS", "MAX_DETAILS", "STATUS_CODES", "MalformedRequest", "bounded", "status_of", "wire_bytes"]

STATUS_CODES: dict[type[errors.CosserveError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
}

# The HTTP status of each code, for the REST binding (edge/rest.py): google.rpc's mapping
# (google/rpc/code.proto), which KServe and Triton follow.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

# Bytes of an error message on the wire. Status details travel in an HTTP/2 header
# (grpc-message), which grpc percent-encodes: a byte outside printable ASCII takes three. The
# client refuses a header block over its metadata limit (8 KiB by default) with its own
# RESOURCE_EXHAUSTED, so a message that echoes a client's huge or non-ASCII name must stay
# well within it.
MAX_DETAILS = 1024

# A quoted name in a message, as repr() writes one: 'text' or "text", escapes included.
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'" + r'|"(?:[^"\\]|\\.)*"')
# Characters of a quoted name kept when a message is too long.
_QUOTED_KEPT = 48


def status_of(err: BaseException) -> grpc.StatusCode | None:
    """The code of a domain error, looked up along its class hierarchy (a subclass of InvalidArgument
    is INVALID_ARGUMENT); None for anything that is not a domain error (our bug: INTERNAL)."""
    for cls in type(err).__mro__:
        code = STATUS_CODES.get(cls)  # type: ignore[call-overload]
        if code is not None:
            return code
    return None


def wire_bytes(message: str) -> int:
    """Bytes of `message` in grpc-message: UTF-8, percent-encoded outside printable ASCII."""
    return sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in message.encode("utf-8", "backslashreplace"))


def _cut_quoted(match: re.Match[str]) -> str:
    text = match.group()
    if len(text) <= _QUOTED_KEPT + 2:
        return text
    try:
        chars = len(ast.literal_eval(text))  # the name's own length, not its escapes'
    except (ValueError, SyntaxError):
        chars = len(text) - 2
    return f"{text[: _QUOTED_KEPT + 1]}...{text[0]} ({chars} chars)"


def bounded(message: str) -> str:
    """`message`, made safe to send as status details: at most MAX_DETAILS bytes on the wire.
    Long quoted names are cut first, so the message keeps what it says about them."""
    # A lone surrogate (a name decoded with surrogateescape) cannot be encoded by grpc at all.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    if wire_bytes(message) <= MAX_DETAILS:
        return message
    message = _QUOTED.sub(_cut_quoted, message)
    if wire_bytes(message) <= MAX_DETAILS:
        return message
    tail = f" ... ({len(message)} chars)"
    room = MAX_DETAILS - len(tail)
    kept = []
    for char in message:
        room -= wire_bytes(char)
        if room < 0:
            break
        kept.append(char)
    return "".join(kept) + tail


class MalformedRequest:
    """What a request deserializer hands on instead of raising, for bytes that are not the message:
    the error interceptor answers it with INVALID_ARGUMENT (grpc alone would say INTERNAL)."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message
