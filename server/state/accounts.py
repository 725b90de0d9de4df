"""What an identity's sessions hold together, against its limit and the server's."""

from __future__ import annotations

import threading

from cosserve.limits import readable_bytes
from cosserve.server.errors import ResourceExhausted

__all__ = ["Account"]


class Account:
    """The bytes held by every session of one identity, against that identity's limit (0: none),
    and through `parent` against the server's (--max-total-bytes: all identities together).
    Thread-safe: its sessions charge it from many calls at once. Each Workspace charges its account
    with every charge of its own, under the workspace's lock (workspace lock, then account lock,
    then the parent's lock: always that order, so no two calls wait on each other in a cycle)."""

    def __init__(self, name: str, max_bytes: int = 0, parent: Account | None = None, flag: str = "--max-identity-bytes") -> None:
        self.name = name
        self.max_bytes = max_bytes
        self.parent = parent
        self.flag = flag
        self._lock = threading.Lock()
        self._held = 0

    @property
    def held(self) -> int:
        return self._held

    def charge(self, nbytes: int, what: str = "this") -> None:
        """Count nbytes more, here and in the parent, or raise ResourceExhausted and count nothing
        if that passes either limit."""
        with self._lock:
            after = self._held + nbytes
            if self.max_bytes and nbytes > 0 and after > self.max_bytes:
                raise ResourceExhausted(
                    f"{what} would take {self.name[:64]} to {readable_bytes(after)}, above its limit of "
                    f"{readable_bytes(self.max_bytes)} ({self.flag}); remove blobs or close sessions"
                )
            if self.parent is not None:
                self.parent.charge(nbytes, what)
            self._held = after

    def release(self, nbytes: int) -> None:
        with self._lock:
            self._held -= nbytes
            if self.parent is not None:
                self.parent.release(nbytes)
