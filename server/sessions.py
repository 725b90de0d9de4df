"""The session table: every open workspace, who owns it, and when it expires."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator

from cosserve.server.errors import NotFound, ResourceExhausted
from cosserve.server.settings import Settings
from cosserve.server.workspace import Workspace, resolve_device

__all__ = ["ANONYMOUS", "SessionStore"]

# The identity of every caller when the server has no authentication.
ANONYMOUS = ""


class SessionStore:
    """Owns every open session; thread-safe. A session belongs to the identity that created it:
    to any other identity it does not exist (the same NOT_FOUND as a session never created)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._sessions: dict[str, Workspace] = {}
        self._owners: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, device: str, owner: str = ANONYMOUS) -> Workspace:
        resolved = resolve_device(device, self.settings.device)
        self.expire_idle()
        with self._lock:
            if len(self._sessions) >= self.settings.max_sessions:
                raise ResourceExhausted(
                    f"{len(self._sessions)} sessions are open, the limit is {self.settings.max_sessions}; "
                    "close sessions you no longer use"
                )
            session_id = secrets.token_hex(16)
            workspace = Workspace(session_id, resolved, self.settings.max_session_bytes)
            self._sessions[session_id] = workspace
            self._owners[session_id] = owner
            return workspace

    def get(self, session_id: str, owner: str = ANONYMOUS) -> Workspace:
        with self._lock:
            workspace = self._sessions.get(session_id)
            if workspace is None or self._owners.get(session_id) != owner:
                raise _no_such_session(session_id)
        workspace.last_used = time.monotonic()
        return workspace

    def close(self, session_id: str, owner: str = ANONYMOUS) -> None:
        with self._lock:
            if self._owners.get(session_id) != owner:
                raise _no_such_session(session_id)
            workspace = self._sessions.pop(session_id)
            del self._owners[session_id]
        workspace.close()

    def expire_idle(self) -> int:
        """Close sessions idle longer than the timeout; return how many."""
        timeout = self.settings.session_idle_timeout_s
        if timeout <= 0:
            return 0
        cutoff = time.monotonic() - timeout
        with self._lock:
            stale = [sid for sid, ws in self._sessions.items() if ws.last_used < cutoff]
        closed = 0
        for sid in stale:
            with self._lock:
                workspace = self._sessions.pop(sid, None)
                self._owners.pop(sid, None)
            if workspace is not None:
                workspace.close()
                closed += 1
        return closed

    def __iter__(self) -> Iterator[Workspace]:
        with self._lock:
            return iter(list(self._sessions.values()))


def _no_such_session(session_id: str) -> NotFound:
    # One message whether the session never existed, was closed, or is someone else's: the
    # refusal must not tell another identity that it exists.
    return NotFound(f"session {session_id[:64]!r} does not exist (closed, expired, or never created)")
