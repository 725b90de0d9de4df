"""Domain errors of the cosserve core; the edge's one table (edge/status.py) maps each to a gRPC status code."""

from __future__ import annotations

__all__ = [
    "CosserveError",
    "quoted",
    "InvalidArgument",
    "NotFound",
    "AlreadyExists",
    "ResourceExhausted",
    "FailedPrecondition",
    "SnapshotError",
    "PermissionDenied",
    "Unauthenticated",
]


class CosserveError(Exception):
    """Base of every error the core raises on purpose; its message is shown to the client."""


class InvalidArgument(CosserveError):
    """The request itself is wrong: unknown op, bad dtype, shape or argument."""


class NotFound(CosserveError):
    """A named session or blob does not exist."""


class AlreadyExists(CosserveError):
    """A name the caller chose (a proposed session id) is taken."""


class ResourceExhausted(CosserveError):
    """A configured limit (bytes, sessions, message size) would be exceeded."""


class FailedPrecondition(CosserveError):
    """The request is well formed but the server is not in a state to serve it."""


class SnapshotError(FailedPrecondition):
    """A snapshot on disk is missing a file, truncated or corrupt; the message names the file."""


class PermissionDenied(CosserveError):
    """The caller may not do this (for example shared memory from a remote peer)."""


class Unauthenticated(CosserveError):
    """The call carries no valid credentials."""


# Characters of a client's name (blob, session, identity) shown in a message.
_QUOTED_CHARS = 64


def quoted(name: str) -> str:
    """repr() of a client-supplied name, cut to a few dozen characters: messages echo names, and a
    20,000-character name must not become a 20,000-character status message."""
    if len(name) <= _QUOTED_CHARS:
        return repr(name)
    return f"{name[:_QUOTED_CHARS]!r}... ({len(name)} chars)"
