"""Sessions: each a Caffe2-style workspace of named torch tensors on one device."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator, Mapping

import torch

from cosserve.server.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from cosserve.server.scoring import NormCache
from cosserve.server.settings import Settings

__all__ = ["SessionStore", "Workspace", "resolve_device"]


def resolve_device(spec: str, default: str = "auto") -> torch.device:
    """Turn "auto" / "cpu" / "cuda" / "cuda:N" into a device this host has."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        spec = default if default not in ("", "auto") else ("cuda" if torch.cuda.is_available() else "cpu")
        if spec == "auto":
            spec = "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise InvalidArgument(f"device {spec!r} is not one of auto, cpu, cuda, cuda:N") from err
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise InvalidArgument(f"device {spec!r} is not one of auto, cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise FailedPrecondition(f"device {spec!r} was asked for, but this server has no CUDA device")
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise FailedPrecondition(f"device {spec!r}: this server has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def _check_name(name: str) -> str:
    if not name:
        raise InvalidArgument("blob name must not be empty")
    return name


class Workspace:
    """Named tensors of one session. Hold `lock` while reading or changing `blobs`."""

    def __init__(self, session_id: str, device: torch.device, max_bytes: int) -> None:
        self.id = session_id
        self.device = device
        self.max_bytes = max_bytes
        self.lock = threading.RLock()
        self.blobs: dict[str, torch.Tensor] = {}
        self.last_used = time.monotonic()
        self.closed = False
        # Corpus row norms for ScoreTopK, keyed weakly by tensor: an entry goes with its blob's tensor
        # when the blob is overwritten or removed (blobs are replaced, never changed in place).
        self.norms = NormCache()

    @staticmethod
    def bytes_of(blobs: Mapping[str, torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in blobs.values())

    def held_bytes(self) -> int:
        with self.lock:
            return self.bytes_of(self.blobs)

    def check_room(self, name: str, nbytes: int) -> None:
        """ResourceExhausted unless blob `name` can become `nbytes` big (call with the lock held)."""
        old = self.blobs.get(name)
        held = self.bytes_of(self.blobs) - (0 if old is None else old.numel() * old.element_size())
        if held + nbytes > self.max_bytes:
            raise ResourceExhausted(
                f"blob {name!r} ({nbytes} bytes) would take session {self.id} to {held + nbytes} bytes, "
                f"above its limit of {self.max_bytes}; remove blobs or raise --max-session-bytes"
            )

    def ensure_open(self) -> None:
        if self.closed:
            raise NotFound(f"session {self.id!r} was closed")

    def reserve(self, name: str, nbytes: int) -> None:
        """Refuse now, before anything is received or allocated, a blob `name` of nbytes that
        could not be stored (closed session, empty name, byte limit)."""
        with self.lock:
            self.ensure_open()
            _check_name(name)
            self.check_room(name, nbytes)

    def put(self, name: str, tensor: torch.Tensor) -> None:
        with self.lock:
            self.reserve(name, tensor.numel() * tensor.element_size())
            self.blobs[name] = tensor

    def get(self, name: str) -> torch.Tensor:
        with self.lock:
            return self.lookup(self.blobs, name)

    def lookup(self, blobs: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
        try:
            return blobs[name]
        except KeyError:
            raise NotFound(f"blob {name!r} is not in session {self.id}") from None

    def has(self, name: str) -> bool:
        with self.lock:
            return name in self.blobs

    def names(self) -> list[str]:
        with self.lock:
            return sorted(self.blobs)

    def remove(self, name: str) -> None:
        with self.lock:
            self.lookup(self.blobs, name)
            del self.blobs[name]

    def reset(self) -> None:
        with self.lock:
            self.blobs = {}

    def commit(self, blobs: dict[str, torch.Tensor]) -> None:
        """Replace every blob at once (the end of an all-or-nothing call; lock held)."""
        self.ensure_open()
        total = self.bytes_of(blobs)
        if total > self.max_bytes:
            raise ResourceExhausted(
                f"the outputs would take session {self.id} to {total} bytes, above its limit of "
                f"{self.max_bytes}; nothing was changed"
            )
        self.blobs = blobs


class SessionStore:
    """Owns every open session; thread-safe."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._sessions: dict[str, Workspace] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, device: str) -> Workspace:
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
            return workspace

    def get(self, session_id: str) -> Workspace:
        with self._lock:
            workspace = self._sessions.get(session_id)
        if workspace is None:
            raise NotFound(f"session {session_id!r} does not exist (closed, expired, or never created)")
        workspace.last_used = time.monotonic()
        return workspace

    def close(self, session_id: str) -> None:
        with self._lock:
            workspace = self._sessions.pop(session_id, None)
        if workspace is None:
            raise NotFound(f"session {session_id!r} does not exist (closed, expired, or never created)")
        with workspace.lock:
            workspace.closed = True
            workspace.blobs = {}

    def expire_idle(self) -> int:
        """Close sessions idle longer than the timeout; return how many."""
        timeout = self.settings.session_idle_timeout_s
        if timeout <= 0:
            return 0
        cutoff = time.monotonic() - timeout
        with self._lock:
            stale = [sid for sid, ws in self._sessions.items() if ws.last_used < cutoff]
        for sid in stale:
            try:
                self.close(sid)
            except NotFound:
                pass
        return len(stale)

    def __iter__(self) -> Iterator[Workspace]:
        with self._lock:
            return iter(list(self._sessions.values()))
