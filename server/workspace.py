"""Sessions: each a Caffe2-style workspace of named torch tensors on one device."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch

from cosserve.server.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from cosserve.server.scoring import NormCache

__all__ = ["Transaction", "Workspace", "resolve_device"]


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


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class Workspace:
    """Named tensors of one session. Its lock is held only for dict updates, never while computing:
    readers take a snapshot, writers commit staged tensors (see Transaction)."""

    def __init__(self, session_id: str, device: torch.device, max_bytes: int) -> None:
        self.id = session_id
        self.device = device
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._blobs: dict[str, torch.Tensor] = {}
        self._held = 0  # bytes of _blobs, kept with it so no call sums every blob
        self.last_used = time.monotonic()
        self.closed = False
        # Corpus row norms for ScoreTopK, keyed weakly by tensor: an entry goes with its blob's tensor
        # when the blob is overwritten or removed (blobs are replaced, never changed in place).
        self.norms = NormCache()

    @staticmethod
    def bytes_of(blobs: Mapping[str, torch.Tensor]) -> int:
        return sum(_nbytes(t) for t in blobs.values())

    def held_bytes(self) -> int:
        return self._held

    def size_of(self, names: Iterable[str]) -> int:
        """Bytes of the named blobs that exist."""
        with self._lock:
            return sum(_nbytes(self._blobs[n]) for n in set(names) if n in self._blobs)

    def missing(self, name: str) -> NotFound:
        """The error for a blob this workspace does not hold."""
        return NotFound(f"blob {name!r} is not in session {self.id}")

    def _ensure_open(self) -> None:
        if self.closed:
            raise NotFound(f"session {self.id!r} was closed")

    def _check_room(self, sizes: Mapping[str, int]) -> None:
        """ResourceExhausted unless the blobs fit with each named one at its new size (lock held)."""
        after = self._held
        for name, nbytes in sizes.items():
            old = self._blobs.get(name)
            after += nbytes - (0 if old is None else _nbytes(old))
        if after <= self.max_bytes:
            return
        if len(sizes) == 1:
            name, nbytes = next(iter(sizes.items()))
            what, tail = f"blob {name!r} ({nbytes} bytes)", "remove blobs or raise --max-session-bytes"
        else:
            what, tail = "the outputs", "nothing was changed"
        raise ResourceExhausted(
            f"{what} would take session {self.id} to {after} bytes, above its limit of {self.max_bytes}; {tail}"
        )

    def reserve(self, name: str, nbytes: int) -> None:
        """Refuse now, before anything is received or allocated, a blob `name` of nbytes that
        could not be stored (closed session, empty name, byte limit)."""
        _check_name(name)
        with self._lock:
            self._ensure_open()
            self._check_room({name: nbytes})

    def put(self, name: str, tensor: torch.Tensor) -> None:
        _check_name(name)
        self.apply({name: tensor})

    def apply(self, changes: Mapping[str, torch.Tensor]) -> None:
        """Set every blob of `changes` at once or, if they do not fit, none of them."""
        with self._lock:
            self._ensure_open()
            self._check_room({name: _nbytes(tensor) for name, tensor in changes.items()})
            for name, tensor in changes.items():
                old = self._blobs.get(name)
                self._held += _nbytes(tensor) - (0 if old is None else _nbytes(old))
                self._blobs[name] = tensor

    def get(self, name: str) -> torch.Tensor:
        with self._lock:
            self._ensure_open()
            tensor = self._blobs.get(name)
        if tensor is None:
            raise self.missing(name)
        return tensor

    def has(self, name: str) -> bool:
        with self._lock:
            return name in self._blobs

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._blobs)

    def remove(self, name: str) -> None:
        with self._lock:
            self._ensure_open()
            old = self._blobs.pop(name, None)
            if old is None:
                raise self.missing(name)
            self._held -= _nbytes(old)

    def reset(self) -> None:
        with self._lock:
            self._blobs = {}
            self._held = 0

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self._blobs = {}
            self._held = 0

    def transaction(self) -> Transaction:
        """A snapshot to read from and a place to stage outputs; `commit` applies them all or none."""
        with self._lock:
            self._ensure_open()
            return Transaction(dict(self._blobs), self.max_bytes, self.missing, self, self._held)


class Transaction:
    """Reads see a workspace as it was when the transaction began plus what was staged since;
    `commit` applies the staged blobs together, or none of them if they no longer fit.

    Commits are applied on top of the workspace as it is then: a concurrent call's changes to
    other blobs are kept, as if that call had run after this one. Without a workspace (one-shot
    Compute) a transaction only stages, within `max_bytes`.
    """

    def __init__(
        self,
        blobs: dict[str, torch.Tensor],
        max_bytes: int,
        missing: Callable[[str], Exception],
        workspace: Workspace | None = None,
        held: int | None = None,
    ) -> None:
        self.workspace = workspace
        self.max_bytes = max_bytes
        self._missing = missing
        self._view = blobs
        self._held = Workspace.bytes_of(blobs) if held is None else held
        self.staged: dict[str, torch.Tensor] = {}

    def get(self, name: str) -> torch.Tensor:
        tensor = self._view.get(name)
        if tensor is None:
            raise self._missing(name)
        return tensor

    def room(self, replacing: Sequence[str] = ()) -> int:
        """Bytes that may still be staged, counting blobs named in `replacing` as freed."""
        freed = sum(_nbytes(self._view[n]) for n in set(replacing) if n in self._view)
        return self.max_bytes - self._held + freed

    def stage(self, name: str, tensor: torch.Tensor) -> None:
        old = self._view.get(name)
        self._held += _nbytes(tensor) - (0 if old is None else _nbytes(old))
        self._view[name] = tensor
        self.staged[name] = tensor

    def commit(self) -> None:
        if self.workspace is not None and self.staged:
            self.workspace.apply(self.staged)
