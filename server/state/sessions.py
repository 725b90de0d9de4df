"""The session table: every open workspace, who owns it, and when it expires."""

from __future__ import annotations

import collections
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator

import torch

from cosserve.server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, quoted
from cosserve.server.settings import Settings
from cosserve.server.state.accounts import Account
from cosserve.server.state.corpora import Corpora
from cosserve.server.state.workspace import Workspace, resolve_device

__all__ = ["ANONYMOUS", "EXPIRED_REMEMBERED", "SESSION_ID", "SessionStore"]

# The identity of every caller when the server has no authentication.
ANONYMOUS = ""

# Ids of closed and expired sessions remembered, so that an expired session's owner is told
# "expired" rather than "does not exist", and so that no proposal takes such an id again (a stale
# handle of it must never reach a fresh, empty workspace); the oldest are forgotten first (about
# 100 bytes each).
EXPIRED_REMEMBERED = 4096

# A session id: 128 bits as 32 lowercase hex digits, whoever picked it (the server, or the client
# that proposed it so a load balancer could route its creation, see deploy/nginx/cosserve.conf).
# It names files of the state directory (server/state/durability.py), so nothing else is accepted.
SESSION_ID = re.compile(r"[0-9a-f]{32}")


class SessionStore:
    """Owns every open session; thread-safe. A session belongs to the identity that created it:
    to any other identity it does not exist (the same NOT_FOUND as a session never created).

    A session idle for longer than --session-idle-timeout-s is expired: from that moment every
    call on it is NOT_FOUND saying so (to its owner), whether or not a sweep has freed it yet.

    An id names one session once: an id open, unrestorable, closed or expired (as far as the
    store remembers: EXPIRED_REMEMBERED ids) is never given to a new session."""

    def __init__(self, settings: Settings, corpora: Corpora | None = None) -> None:
        self.settings = settings
        self.corpora = corpora  # the server's shared corpora, which every session reads as `@NAME`
        # Called with each new session and its owner before the session is handed out (durability
        # attaches its journal there); if it raises, the session is not created.
        self.on_open: Callable[[Workspace, str], None] | None = None
        self._lock = threading.Lock()
        self._sessions: dict[str, Workspace] = {}
        self._owners: dict[str, str] = {}
        self._counts: collections.Counter[str] = collections.Counter()  # open sessions per owner
        # One Account per identity with open sessions: their bytes against --max-identity-bytes,
        # and through `total` against --max-total-bytes (every session's, whoever owns it).
        self.total = Account("the server's sessions", settings.max_total_bytes, flag="--max-total-bytes")
        self._accounts: dict[str, Account] = {}
        # Closed and expired sessions: id -> (owner, whether it expired); the oldest first.
        self._retired: collections.OrderedDict[str, tuple[str, bool]] = collections.OrderedDict()
        # Sessions a restart could not bring back: id -> (owner, or None when unknown, and why).
        self._unrestorable: dict[str, tuple[str | None, str]] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, device: str, owner: str = ANONYMOUS, proposed: str = "") -> Workspace:
        """A new, empty session of `owner` on `device`, named `proposed` (the id a client chose,
        so that a load balancer hashing on it sends the creation where the session's later calls
        go), or by the server when `proposed` is empty.

        Raises:
            InvalidArgument: `proposed` is not 32 lowercase hex digits.
            AlreadyExists: `proposed` names a session open, unrestorable, closed or expired here,
                whoever's: the same answer for all, so it tells nothing about another identity.
            ResourceExhausted: past --max-sessions or --max-identity-sessions.
        """
        if proposed and not SESSION_ID.fullmatch(proposed):
            raise InvalidArgument(
                f"CreateSession: the proposed session id {quoted(proposed)} is not 32 lowercase hex digits; "
                "propose 128 random bits (secrets.token_hex(16)), or none to let the server pick"
            )
        workspace = self._add(proposed or secrets.token_hex(16), resolve_device(device, self.settings.device), owner)
        if self.on_open is not None:
            try:
                self.on_open(workspace, owner)
            except BaseException:
                self.discard(workspace.id)
                raise
        return workspace

    def restore(self, session_id: str, owner: str, device: str, idle_remaining_s: float | None) -> Workspace:
        """Recreate, empty, the session `session_id` of `owner` that a restart is bringing back, as
        `create` would (same limits), with `idle_remaining_s` of its idle timeout left (None:
        all of it). Its blobs are then stored through the workspace, charged as any others.

        Raises:
            ResourceExhausted: past --max-sessions or --max-identity-sessions.
            FailedPrecondition, InvalidArgument: this host has no such device.
        """
        workspace = self._add(session_id, resolve_device(device, self.settings.device), owner)
        timeout = self.settings.session_idle_timeout_s
        if idle_remaining_s is not None and timeout > 0:
            workspace.last_used = time.monotonic() - (timeout - min(idle_remaining_s, timeout))
        return workspace

    def discard(self, session_id: str) -> None:
        """Close the session `session_id`, whoever owns it, if it is open (a restore that failed,
        or a close found in the sync log)."""
        with self._lock:
            workspace = self._remove(session_id, expired=False) if session_id in self._sessions else None
        if workspace is not None:
            workspace.close()

    def mark_unrestorable(self, session_id: str, owner: str | None, reason: str) -> None:
        """Remember that the session `session_id` could not be restored, and why: from now on a call
        on it by `owner` (by anyone when the owner is unknown: its file did not say) is
        FAILED_PRECONDITION saying so, until the owner closes it."""
        with self._lock:
            self._unrestorable[session_id] = (owner, reason)

    def unrestorable(self) -> set[str]:
        """Ids of the sessions that could not be restored and are not closed yet."""
        with self._lock:
            return set(self._unrestorable)

    def owned(self) -> list[tuple[Workspace, str]]:
        """Every open session with its owner."""
        with self._lock:
            return [(workspace, self._owners[sid]) for sid, workspace in self._sessions.items()]

    def _add(self, session_id: str, resolved: torch.device, owner: str) -> Workspace:
        self.expire_idle()
        with self._lock:
            if session_id in self._sessions or session_id in self._unrestorable or session_id in self._retired:
                raise AlreadyExists(
                    f"CreateSession: session id {quoted(session_id)} is taken on this server; "
                    "propose another, of 128 fresh random bits (secrets.token_hex(16))"
                )
            if len(self._sessions) >= self.settings.max_sessions:
                raise ResourceExhausted(
                    f"{len(self._sessions)} sessions are open, the limit is {self.settings.max_sessions}; "
                    "close sessions you no longer use"
                )
            limit = self.settings.max_identity_sessions
            if limit and self._counts[owner] >= limit:
                raise ResourceExhausted(
                    f"this identity has {self._counts[owner]} open sessions, its limit is {limit} "
                    "(--max-identity-sessions); close sessions it no longer uses"
                )
            account = self._accounts.get(owner)
            if account is None:
                account = self._accounts[owner] = Account(
                    f"identity {owner[:64]!r}", self.settings.max_identity_bytes, parent=self.total
                )
            workspace = Workspace(session_id, resolved, self.settings.max_session_bytes, account, self.corpora)
            self._sessions[session_id] = workspace
            self._owners[session_id] = owner
            self._counts[owner] += 1
            return workspace

    def get(self, session_id: str, owner: str = ANONYMOUS) -> Workspace:
        """The session `session_id` of `owner`, marked used now.

        Raises:
            NotFound: it does not exist, is another identity's, or has expired (its owner alone
                is told that it expired).
        """
        now = time.monotonic()
        with self._lock:
            self._check_restored(session_id, owner)
            workspace = self._sessions.get(session_id)
            if workspace is None or self._owners[session_id] != owner:
                raise self._missing(session_id, owner)
            expired = self._idle_too_long(workspace, now)
            if expired:  # a sweep has not come yet: expire it now, as it would have
                self._remove(session_id, expired=True)
                error = self._missing(session_id, owner)
            else:
                workspace.last_used = now
        if expired:
            workspace.close()
            raise error
        return workspace

    def close(self, session_id: str, owner: str = ANONYMOUS) -> None:
        with self._lock:
            restored = self._unrestorable.get(session_id)
            if restored is not None and restored[0] in (owner, None):
                del self._unrestorable[session_id]
                return  # its files go at the next snapshot, as a closed session's do
            if self._owners.get(session_id) != owner:
                raise self._missing(session_id, owner)
            workspace = self._remove(session_id, expired=False)
        workspace.close()

    def expire_idle(self) -> int:
        """Close sessions idle longer than the timeout; return how many."""
        now = time.monotonic()
        with self._lock:
            stale = [self._remove(sid, expired=True) for sid, ws in list(self._sessions.items()) if self._idle_too_long(ws, now)]
        for workspace in stale:
            workspace.close()
        return len(stale)

    def held_by(self, owner: str) -> int:
        """Bytes charged to the identity `owner` across its sessions."""
        with self._lock:
            account = self._accounts.get(owner)
        return 0 if account is None else account.held

    def __iter__(self) -> Iterator[Workspace]:
        with self._lock:
            return iter(list(self._sessions.values()))

    # ---- under the lock -----------------------------------------------------------------

    def _check_restored(self, session_id: str, owner: str) -> None:
        restored = self._unrestorable.get(session_id)
        if restored is not None and restored[0] in (owner, None):
            raise FailedPrecondition(
                f"session {quoted(session_id)} could not be restored after the server restarted: {restored[1]}; "
                "its blobs are lost, close it (CloseSession) and create a new one"
            )

    def _idle_too_long(self, workspace: Workspace, now: float) -> bool:
        timeout = self.settings.session_idle_timeout_s
        return timeout > 0 and now - workspace.last_used > timeout

    def _remove(self, session_id: str, *, expired: bool) -> Workspace:
        """Take a session out of the table (the caller closes it outside the lock), and remember
        its id as closed or expired."""
        workspace = self._sessions.pop(session_id)
        owner = self._owners.pop(session_id)
        self._counts[owner] -= 1
        if not self._counts[owner]:
            del self._counts[owner]
            # Its sessions are closed, so it holds nothing; a call still finishing on one of
            # them gives its charges back to this object, never to the owner's next account.
            del self._accounts[owner]
        self._retired[session_id] = (owner, expired)
        while len(self._retired) > EXPIRED_REMEMBERED:
            self._retired.popitem(last=False)
        return workspace

    def _missing(self, session_id: str, owner: str) -> NotFound:
        if self._retired.get(session_id) == (owner, True):
            return NotFound(
                f"session {quoted(session_id)} expired: it was idle for more than "
                f"{self.settings.session_idle_timeout_s:g} s (--session-idle-timeout-s); create a new session"
            )
        # One message whether the session never existed, was closed, is someone else's (expired or
        # not), or lives on another replica: the refusal must not tell another identity that it
        # exists. Behind a balancer, a session whose replica stopped is rehashed to one that never
        # held it: this says so, where an empty workspace would silently lose its blobs.
        return NotFound(
            f"session {quoted(session_id)} does not exist on this server: it was closed, expired or never created "
            "(or, behind a load balancer, another replica held it and stopped, losing its sessions); create a new session"
        )
