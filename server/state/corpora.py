"""Shared corpora: read-only tensors every session names as `@NAME`, held once by the server.

A corpus comes from a file given at start (`--corpus NAME=FILE`: `.npy`, or `.safetensors` with
one tensor or `NAME=FILE:KEY`), memory-mapped so that start-up reads only its header; from a
`.parquet` file or a folder of them or of `.npy` shards, read into memory by `cosserve.datasets`,
with the rows' ids (int64 or strings) when an id column holds them; or from a session's blob
(`PublishCorpus`), moved out of the session without a copy. No gRPC here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np
import torch

from cosserve.limits import readable_bytes
from cosserve.server import settings
from cosserve.server.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, quoted
from cosserve.server.memory import STORED_DTYPES, dtype_name
from cosserve.server.settings import parse_corpus_spec
from cosserve.server.state.norm_cache import NormCache
from cosserve.server.state.row_ids import RowIds

__all__ = [
    "CORPUS_PREFIX",
    "READ_ONLY",
    "Corpora",
    "Corpus",
    "RowSource",
    "check_corpus_name",
    "is_corpus",
    "load_dataset",
    "load_file",
]

# A blob name starting with this names a shared corpus; a session's own blobs may not.
CORPUS_PREFIX = "@"
READ_ONLY = "shared corpora are read-only"
# safetensors' own bound on its JSON header; a larger one is not a safetensors file.
_MAX_SAFETENSORS_HEADER = 100 * 1024**2
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def is_corpus(name: str) -> bool:
    """Whether a blob name names a shared corpus (`@NAME`)."""
    return name.startswith(CORPUS_PREFIX)


def check_corpus_name(name: str) -> str:
    """`name` (without '@') if a corpus may have it: a letter or digit, then letters, digits, _ . -; at most 128."""
    try:
        return settings.check_corpus_name(name)
    except ValueError as err:
        raise InvalidArgument(str(err)) from None


@dataclasses.dataclass(frozen=True)
class Corpus:
    """One shared corpus: its tensor where it lives (CPU: a memory map or a published blob), and where it came from."""

    name: str
    tensor: torch.Tensor
    source: str  # the file (and key), or "published by <identity>"
    ids: RowIds | None = None  # the rows' ids, when its file has an id column

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()


def _load_npy(path: str) -> torch.Tensor:
    try:
        # mmap_mode "c" (copy-on-write), not "r": torch warns on a read-only array, and a write to a
        # read-only map would crash the process; ops never write their inputs, but if one did it
        # would change this process's private pages only, never the file. Only the header is read
        # now, the data as it is used.
        array = np.load(path, mmap_mode="c", allow_pickle=False)
    except (ValueError, EOFError) as err:
        raise ValueError(f"is not a readable .npy file ({err})"[:300]) from None
    if not isinstance(array, np.ndarray):
        raise ValueError("is not a .npy file of one array")
    if not array.dtype.isnative:
        raise ValueError(f"has byte order {array.dtype.str!r}; save it little-endian")
    if array.ndim and not array.flags.c_contiguous:
        raise ValueError("is stored in Fortran order; save it C-ordered (numpy.ascontiguousarray)")
    try:
        tensor = torch.from_numpy(array)
    except TypeError as err:
        raise ValueError(f"holds {array.dtype}, which cosserve does not take ({err})"[:300]) from None
    return tensor


def _load_safetensors(path: str, key: str) -> tuple[torch.Tensor, str]:
    """The tensor `key` (or the file's only tensor), memory-mapped: the header is parsed here (it is
    JSON, never code) and the data mapped at its offset, so nothing else is read."""
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        head = file.read(8)
        if len(head) < 8:
            raise ValueError("is not a safetensors file (shorter than its header length)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(_MAX_SAFETENSORS_HEADER, size - 8):
            raise ValueError(f"is not a safetensors file (a header of {header_len} bytes in a {size}-byte file)")
        try:
            header = json.loads(file.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"is not a safetensors file (its header is not JSON: {err})"[:300]) from None
    if not isinstance(header, dict):
        raise ValueError("is not a safetensors file (its header is not a JSON object)")
    keys = sorted(k for k in header if k != "__metadata__")
    if not key:
        if len(keys) != 1:
            shown = ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")
            raise ValueError(f"holds {len(keys)} tensors ({shown}); name one: NAME=FILE.safetensors:KEY")
        key = keys[0]
    entry = header.get(key)
    if key == "__metadata__" or not isinstance(entry, dict):
        raise ValueError(f"has no tensor {key[:80]!r} (it has {', '.join(keys[:8])})")
    dtype = _SAFETENSORS_DTYPES.get(str(entry.get("dtype")))
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if dtype is None:
        raise ValueError(f"tensor {key[:80]!r} is {str(entry.get('dtype'))[:16]}, which cosserve does not take")
    if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)):
        raise ValueError(f"tensor {key[:80]!r} has a malformed shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(n, int) for n in offsets)):
        raise ValueError(f"tensor {key[:80]!r} has malformed data_offsets")
    begin, end = offsets
    nbytes = math.prod(shape) * dtype.itemsize
    start = 8 + header_len + begin
    if not (0 <= begin <= end and end - begin == nbytes and start + nbytes <= size):
        raise ValueError(f"tensor {key[:80]!r}: data_offsets {offsets} do not hold {shape} of {str(entry['dtype'])} in this file")
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype), key
    raw = np.memmap(path, dtype=np.uint8, mode="c", offset=start, shape=(nbytes,))
    return torch.from_numpy(raw).view(dtype).view(shape), key


class RowSource(Protocol):
    """What `load_dataset` reads: cosserve.datasets.Source, opened by the edge (the client's
    modules raise the client's errors, which import grpc, so state never imports them)."""

    @property
    def rows(self) -> int: ...

    @property
    def dim(self) -> int: ...

    @property
    def dtype(self) -> np.dtype: ...

    @property
    def id_kind(self) -> str: ...  # "row": no ids (the row number); "int64" or "string"

    def batches(self) -> Iterator[Any]: ...  # .start, .vectors (n, dim) in order

    def ids(self) -> np.ndarray: ...


def load_dataset(name: str, path: str, open_source: Callable[[str], RowSource]) -> Corpus:
    """The corpus `name` from a .parquet file or a folder (of .parquet files or .npy shards), read
    into memory in bounded pieces from `open_source(path)`, with the rows' ids when a Parquet id
    column holds them; ValueError with the reason."""
    try:
        source = open_source(path)
        try:
            tensor = torch.empty((source.rows, source.dim), dtype=getattr(torch, source.dtype.name))
        except RuntimeError as err:  # torch's out of memory
            raise ValueError(f"({source.rows} x {source.dim} {source.dtype}) does not fit in memory: {err}") from None
        rows = tensor.numpy()  # the tensor's memory: each batch is copied in once
        for batch in source.batches():
            rows[batch.start : batch.start + len(batch.vectors)] = batch.vectors
        ids = None if source.id_kind == "row" else RowIds.of(source.ids(), source.rows)
    except OSError as err:
        raise ValueError(f"cannot read {path[:200]!r}: {err.strerror or err}") from None
    except ValueError as err:  # cosserve.datasets.DatasetError included: its message names the file
        message = str(err) if path[:200] in str(err) else f"{path[:200]!r} {err}"
        raise ValueError(message[:400]) from None
    return Corpus(name, tensor, path, ids)


def load_file(name: str, path: str, key: str = "", open_source: Callable[[str], RowSource] | None = None) -> Corpus:
    """The corpus `name` from a .npy or .safetensors file, memory-mapped, or through `load_dataset`
    from a .parquet file or a folder; ValueError with the reason."""
    if path.endswith(".parquet") or os.path.isdir(path):
        if open_source is None:
            raise ValueError(f"{path[:200]!r}: this server reads no Parquet files or folders")
        return load_dataset(name, path, open_source)
    try:
        if path.endswith(".npy"):
            tensor, source = _load_npy(path), path
        else:
            tensor, key = _load_safetensors(path, key)
            source = f"{path}:{key}"
    except OSError as err:
        raise ValueError(f"cannot read {path[:200]!r}: {err.strerror or err}") from None
    except ValueError as err:
        raise ValueError(f"{path[:200]!r} {err}") from None
    if tensor.dtype not in STORED_DTYPES:
        raise ValueError(f"{path[:200]!r} holds {dtype_name(tensor.dtype)}, which cosserve does not take")
    return Corpus(name, tensor, source)


class Corpora:
    """Every shared corpus of the server, by name (without '@'); thread-safe.

    Each corpus is held once: its tensor stays where it was made (a file's memory map on the CPU,
    a published blob on its session's device), and a session on another device reads a copy
    made on that device at its first use and kept (one per device, never one per session). Nothing here is
    charged to a session or an identity: file corpora are the server's configuration (page cache,
    reclaimable), and published corpora count against `max_published_bytes`, server-wide.
    The norm cache is shared too: one NormCache entry per corpus tensor, whatever the sessions.
    """

    def __init__(self, max_published_bytes: int = 0) -> None:
        self.max_published_bytes = max_published_bytes
        self.norms = NormCache()
        self._lock = threading.Lock()
        self._corpora: dict[str, Corpus] = {}
        self._copies: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._published = 0  # data bytes of the published corpora

    def add_file(self, spec: str, open_source: Callable[[str], RowSource] | None = None) -> Corpus:
        """Add the corpus of one `--corpus NAME=FILE` entry, mapped (not read; Parquet and folders
        are read through `open_source`); ValueError with the reason."""
        name, path, key = parse_corpus_spec(spec)
        corpus = load_file(name, path, key, open_source)
        with self._lock:
            if name in self._corpora:
                raise ValueError(f"corpus name {name!r} is given twice")
            self._corpora[name] = corpus
        return corpus

    def list(self) -> list[Corpus]:
        with self._lock:
            return [self._corpora[name] for name in sorted(self._corpora)]

    def __len__(self) -> int:
        with self._lock:
            return len(self._corpora)

    def get(self, blob: str, device: torch.device) -> torch.Tensor:
        """The corpus named by blob name `@NAME`, on `device` (copied there once, at its first use)."""
        name = blob[len(CORPUS_PREFIX) :] if is_corpus(blob) else blob
        with self._lock:
            corpus = self._corpora.get(name)
            if corpus is None:
                raise NotFound(f"shared corpus {quoted(CORPUS_PREFIX + name)} does not exist; ListCorpora lists them")
            if corpus.tensor.device == device:
                return corpus.tensor
            copy = self._copies.get((name, device))
            if copy is None:
                # Under the lock: two sessions asking at once must not both make a copy.
                copy = self._copies[(name, device)] = corpus.tensor.to(device)
            return copy

    def ids(self, blob: str) -> RowIds | None:
        """The row ids of corpus `@NAME` (None: it has none, or there is no such corpus)."""
        with self._lock:
            corpus = self._corpora.get(blob[len(CORPUS_PREFIX) :] if is_corpus(blob) else blob)
        return None if corpus is None else corpus.ids

    def nbytes(self, blob: str) -> int:
        """Data bytes of corpus `@NAME`, 0 if there is none (for sizing work, never for charging)."""
        with self._lock:
            corpus = self._corpora.get(blob[len(CORPUS_PREFIX) :] if is_corpus(blob) else blob)
        return 0 if corpus is None else corpus.nbytes

    def publish(self, name: str, tensor: torch.Tensor, publisher: str) -> Corpus:
        """Make `tensor` the corpus `name`, held as it is (no copy). Refused for a name in use or
        past max_published_bytes; the caller removes the blob from its session afterwards."""
        check_corpus_name(name)
        nbytes = tensor.numel() * tensor.element_size()
        source = f"published by {publisher[:64]}" if publisher else "published (no identities on this server)"
        with self._lock:
            if name in self._corpora:
                raise FailedPrecondition(
                    f"shared corpus {quoted(CORPUS_PREFIX + name)} already exists ({self._corpora[name].source[:200]}); "
                    "publish under another name"
                )
            if not self.max_published_bytes:
                raise FailedPrecondition("publishing corpora is off on this server (--max-published-bytes 0)")
            after = self._published + nbytes
            if after > self.max_published_bytes:
                raise ResourceExhausted(
                    f"publishing {quoted(CORPUS_PREFIX + name)} of {readable_bytes(nbytes)} would take the published corpora to "
                    f"{readable_bytes(after)}, above the server's {readable_bytes(self.max_published_bytes)} (--max-published-bytes)"
                )
            corpus = self._corpora[name] = Corpus(name, tensor, source)
            self._published = after
        return corpus
