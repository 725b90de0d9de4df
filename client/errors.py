"""The client's exceptions: one family under `CosserveError`.

A call the server refused is a `CosserveRpcError` (`.code()`, `.details()`). A mistake the client
catches before anything is sent derives from the matching built-in as well, so code that already
catches `TypeError` or `ValueError` keeps working; what grpc raises itself before sending (not an
RpcError) becomes the same: a TypeError an InvalidTypeError, a ValueError an InvalidArgumentError
(see `cosserve.flows`):

    CosserveError
    ├── CosserveRpcError              the server answered with a status other than OK
    ├── InvalidTypeError (TypeError)  a value of the wrong type: a blob name that is not a str,
    │   │                             an op argument that is not bool/int/float/str
    │   ├── UnsupportedDtypeError     an array dtype the wire has no code for (complex64, object)
    │   └── OpSpecError               a malformed operator spec (`run_net`, `operator_def`)
    ├── InvalidArgumentError (ValueError)  a bad value: batch_size < 1, TLS options that do not
    │   │                             go together, an unreadable certificate file
    │   └── ShapeError                an array of the wrong rank or a ragged one (1-D queries)
    ├── ProtocolError (ValueError)    a reply the client cannot decode (a broken or foreign server)
    ├── ClientClosedError (ValueError)  a call through a closed client (its sessions' calls too)
    └── SharedMemoryError (OSError)   a shared-memory region this host would not create
"""

from __future__ import annotations

import grpc

__all__ = [
    "CosserveError",
    "ClientClosedError",
    "CosserveRpcError",
    "InvalidArgumentError",
    "InvalidTypeError",
    "OpSpecError",
    "ProtocolError",
    "ShapeError",
    "SharedMemoryError",
    "UnsupportedDtypeError",
]


class CosserveError(Exception):
    """Every failure the cosserve client raises."""


class CosserveRpcError(CosserveError):
    """A cosserve call failed; `.code()` is a grpc.StatusCode and `.details()` the message."""

    def __init__(self, code: grpc.StatusCode, details: str, method: str = "") -> None:
        super().__init__(f"{method}: {code.name}: {details}" if method else f"{code.name}: {details}")
        self._code = code
        self._details = details
        self.method = method

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class InvalidTypeError(CosserveError, TypeError):
    """A value of a type the client cannot send; nothing was sent."""


class UnsupportedDtypeError(InvalidTypeError):
    """An array whose dtype has no wire code (complex64, object, strings, ...); nothing was sent."""


class OpSpecError(InvalidTypeError):
    """A malformed operator spec: not (type, inputs, outputs[, args]) or a mapping with those keys."""


class InvalidArgumentError(CosserveError, ValueError):
    """An argument value the client refuses before sending anything."""


class ShapeError(InvalidArgumentError):
    """An array of the wrong rank (queries must be 2-D) or a ragged nested list."""


class ProtocolError(CosserveError, ValueError):
    """A reply the client cannot decode: more bytes than announced, an unknown dtype code."""


class ClientClosedError(CosserveError, ValueError):
    """A call through a client after its `close()` (the calls of its sessions too); nothing was sent."""


class SharedMemoryError(CosserveError, OSError):
    """This host refused to create a shared-memory region (full /dev/shm, no POSIX shm)."""
