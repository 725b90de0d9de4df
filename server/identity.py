"""Who is calling: API keys, the one-token shortcut and mutual-TLS subjects, as identity names.

No grpc import: the edge hands in the call's metadata and the peer's certificate subject.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterable

from cosserve.server.sessions import ANONYMOUS
from cosserve.server.settings import Settings

__all__ = ["ANONYMOUS", "CALLER", "Identities"]

# The identity of the call being served, set by interceptors.AuthInterceptor in the call's task
# and read by the servicer; ANONYMOUS on a server without authentication.
CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("cosserve_caller", default=ANONYMOUS)


class Identities:
    """The identities a server accepts. TODO(issue 9): API keys file, SIGHUP reload, mTLS."""

    def __init__(self, token: str) -> None:
        self._token = token

    @classmethod
    def from_settings(cls, settings: Settings) -> Identities | None:
        """None when the server authenticates nobody (every caller is ANONYMOUS)."""
        return cls(settings.auth_token) if settings.auth_token else None

    def reload(self) -> None:
        """Reread the API keys file (on SIGHUP)."""

    def caller(self, metadata: Iterable[tuple[str, str | bytes]], subject: str | None = None) -> str | None:
        """The identity the call's credentials prove, or None if they prove none."""
        raise NotImplementedError
