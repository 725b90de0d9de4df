"""Named snapshots of a workspace on disk: a safetensors file of the blobs and a JSON manifest."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import stat
import struct
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, TypeGuard

import torch

from cosserve.limits import readable_bytes
from cosserve.server import memory, tracing
from cosserve.server.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, SnapshotError, quoted
from cosserve.server.state.workspace import Workspace, blob_charge
from cosserve.server.state.workspace import check_name as check_blob_name

__all__ = [
    "DATA_SUFFIX",
    "FORMAT",
    "MANIFEST_SUFFIX",
    "MAX_MANIFEST_BYTES",
    "MAX_NAME_CHARS",
    "SAFETENSORS_DTYPES",
    "check_name",
    "exists",
    "fsync_directory",
    "load_workspace",
    "owner_dir",
    "read",
    "save_workspace",
    "snapshot_path",
    "write",
]

FORMAT = "cosserve-snapshot"
VERSION = 1
DATA_SUFFIX = ".safetensors"
MANIFEST_SUFFIX = ".json"
TEMP_SUFFIX = ".tmp"
MAX_NAME_CHARS = 128
# A manifest is a few hundred bytes per blob; this bound keeps a hostile or damaged one from
# costing more than a bounded read and parse before anything is charged.
MAX_MANIFEST_BYTES = 16 * 1024**2
# The safetensors header says about as much as the manifest (safetensors' own bound is 100 MB).
MAX_HEADER_BYTES = MAX_MANIFEST_BYTES
# Bytes moved per read or write call: a CUDA blob is copied to the host this much at a time.
COPY_BYTES = 16 * 1024**2
# Free space kept beyond a snapshot's own bytes on the state directory's disk.
DISK_MARGIN_BYTES = 64 * 1024**2
# The one tensor name safetensors keeps for itself.
_RESERVED_KEY = "__metadata__"

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
}
_TORCH_DTYPES = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
_NAME = re.compile(r"[A-Za-z0-9._-]{1,%d}" % MAX_NAME_CHARS)
_CPU = torch.device("cpu")


def check_name(name: str) -> str:
    """`name`, if a snapshot may have it: 1 to 128 ASCII letters, digits, '.', '_' or '-', not
    starting with '.' (temporary files do) and without '..'. Nothing else reaches the filesystem."""
    if not _NAME.fullmatch(name) or name.startswith(".") or ".." in name:
        raise InvalidArgument(
            f"snapshot name {quoted(name)} is not allowed: use 1 to {MAX_NAME_CHARS} letters, digits, '.', '_' "
            "or '-', not starting with '.' and without '..'"
        )
    return name


def owner_dir(owner: str) -> str:
    """The directory of an identity's snapshots: 'anonymous' without authentication, else the
    sha256 of its name in hex, so no identity's name reaches the filesystem."""
    if not owner:
        return "anonymous"
    return hashlib.sha256(owner.encode("utf-8", "surrogatepass")).hexdigest()


def snapshot_path(state_dir: str | os.PathLike[str], owner: str, name: str) -> Path:
    """`<state_dir>/snapshots/<owner_dir>/<name>`, the stem of its two files."""
    return Path(state_dir) / "snapshots" / owner_dir(owner) / check_name(name)


def _with_suffix(path: Path, suffix: str) -> Path:
    # Not Path.with_suffix: snapshot names may hold dots ("v1.2" would become "v1.safetensors").
    return path.parent / (path.name + suffix)


def exists(path: Path) -> bool:
    """Whether the snapshot at `path` has a manifest (a save that did not finish leaves none)."""
    return _with_suffix(path, MANIFEST_SUFFIX).is_file()


@dataclasses.dataclass(frozen=True)
class _Blob:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    crc32: int


# ---- a session's snapshots ------------------------------------------------------------------


def _path_in(state_dir: str, owner: str, name: str) -> Path:
    if not state_dir:
        raise FailedPrecondition("snapshots need a state directory: start the server with --state-dir DIR")
    return snapshot_path(state_dir, owner, name)


def save_workspace(state_dir: str, owner: str, name: str, workspace: Workspace) -> tuple[int, int]:
    """Write every blob of `workspace`, as they are at one instant, as `owner`'s snapshot `name`
    under `state_dir`; (blobs, tensor bytes) written. Blocks on disk: run it on a worker thread."""
    path = _path_in(state_dir, owner, name)
    with workspace.transaction() as snapshot:
        # One consistent view: calls that change the session meanwhile are not half in it.
        blobs = dict(snapshot._view)
    meta = {"session": workspace.id, "device": str(workspace.device), "saved_at": time.time()}
    return len(blobs), write(path, blobs, meta)


def load_workspace(state_dir: str, owner: str, name: str, workspace: Workspace) -> tuple[int, int]:
    """Replace every blob of `workspace` with those of `owner`'s snapshot `name`: all of them, or
    on any error none (the session is left as it was). The snapshot is charged to the session,
    beside its current blobs, before anything is allocated. (blobs, tensor bytes) loaded."""
    path = _path_in(state_dir, owner, name)
    if not exists(path):
        raise NotFound(f"snapshot {name!r} does not exist (for this identity); save it first")
    what = f"snapshot {name!r}"
    with workspace.transaction() as staging:
        tensors, _ = read(path, workspace.device, lambda nbytes: staging.expect([], nbytes, what))
        staging.stage_outputs(tensors, what)  # the room taken above, to the byte
        # One step under the workspace's lock: a concurrent call, or a restart after a crash,
        # sees the old blobs or the new ones, never none and never a mix.
        staging.commit(replace=True)
    return len(tensors), Workspace.bytes_of(tensors)


# ---- writing -------------------------------------------------------------------------------


def write(path: Path, blobs: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> int:
    """Write `blobs` as `<path>.safetensors` and `<path>.json`, replacing a snapshot of that name;
    return the tensor bytes written.

    Each file is written to a temporary file in the same directory (a name starting with '.',
    which no snapshot has), flushed and fsynced, then renamed into place, data first and the
    manifest last, and the directory fsynced: a manifest only ever names complete data. Saves
    and reads of one directory are serialized by a lock on it. Tensors may be on CUDA: they are
    copied to the host COPY_BYTES at a time, so no second full copy of a session is built.

    Raises InvalidArgument for a dtype or name safetensors cannot hold, ResourceExhausted when
    the disk has too little room, FailedPrecondition when the directory cannot be written.
    """
    entries = [_entry(name, tensor) for name, tensor in sorted(blobs.items())]
    header = _safetensors_header(entries)
    total = sum(blob.nbytes for blob in entries)
    data_bytes = 8 + len(header) + total
    directory = path.parent
    data_path, manifest_path = _with_suffix(path, DATA_SUFFIX), _with_suffix(path, MANIFEST_SUFFIX)
    try:
        _make_directory(directory)
        span = {"cosserve.blobs": len(entries), "cosserve.bytes": data_bytes}
        with _locked(directory, exclusive=True), tracing.span("cosserve.snapshot.write", span):
            _remove_temporaries(directory, path.name)
            _check_room(directory, data_bytes, path.name)
            token = secrets.token_hex(6)
            data_temp = directory / f".{path.name}.{token}{DATA_SUFFIX}{TEMP_SUFFIX}"
            manifest_temp = directory / f".{path.name}.{token}{MANIFEST_SUFFIX}{TEMP_SUFFIX}"
            try:
                crcs = _write_data(data_temp, header, blobs, entries)
                manifest = {
                    "format": FORMAT,
                    "version": VERSION,
                    "meta": dict(meta),
                    "data": data_path.name,
                    "data_bytes": data_bytes,
                    "total_bytes": total,
                    "blobs": [
                        {"name": b.name, "dtype": SAFETENSORS_DTYPES[b.dtype], "shape": list(b.shape), "bytes": b.nbytes, "crc32": crc}
                        for b, crc in zip(entries, crcs)
                    ],
                }
                _write_file(manifest_temp, json.dumps(manifest, ensure_ascii=True).encode("ascii"))
                os.replace(data_temp, data_path)
                os.replace(manifest_temp, manifest_path)
                fsync_directory(directory)
            finally:
                for temp in (data_temp, manifest_temp):
                    with contextlib.suppress(FileNotFoundError):
                        temp.unlink()
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceExhausted(f"snapshot {path.name!r}: the state directory's disk is full; nothing was replaced") from None
        raise FailedPrecondition(f"snapshot {path.name!r} cannot be written: {err.strerror or err}") from None
    return total


def _entry(name: str, tensor: torch.Tensor) -> _Blob:
    if tensor.dtype not in SAFETENSORS_DTYPES:
        raise InvalidArgument(
            f"blob {quoted(name)} is {tensor.dtype}, which a snapshot cannot hold; it holds "
            + ", ".join(memory.dtype_name(d) for d in SAFETENSORS_DTYPES)
        )
    if name == _RESERVED_KEY:
        raise InvalidArgument(f"blob {name!r} cannot be saved: safetensors keeps that name for itself; rename it")
    return _Blob(name, tensor.dtype, tuple(tensor.shape), tensor.numel() * tensor.element_size(), 0)


def _safetensors_header(entries: list[_Blob]) -> bytes:
    """The JSON header of a safetensors file holding `entries` back to back in this order, padded
    with spaces to a multiple of 8 bytes as the format asks."""
    header: dict[str, Any] = {_RESERVED_KEY: {"format": FORMAT, "version": str(VERSION)}}
    offset = 0
    for blob in entries:
        header[blob.name] = {
            "dtype": SAFETENSORS_DTYPES[blob.dtype],
            "shape": list(blob.shape),
            "data_offsets": [offset, offset + blob.nbytes],
        }
        offset += blob.nbytes
    text = json.dumps(header, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    return text + b" " * (-len(text) % 8)


def _host_chunks(tensor: torch.Tensor) -> Iterator[memoryview]:
    """The tensor's bytes, C-ordered, in pieces of at most COPY_BYTES in host memory."""
    if tensor.device.type == "cpu":
        data = memory.tensor_bytes(tensor)
        for start in range(0, len(data), COPY_BYTES):
            yield data[start : start + COPY_BYTES]
        return
    flat = memory.byte_view(tensor)
    for start in range(0, flat.numel(), COPY_BYTES):
        yield memory.tensor_bytes(flat[start : start + COPY_BYTES].to(_CPU))


def _write_data(temp: Path, header: bytes, blobs: Mapping[str, torch.Tensor], entries: list[_Blob]) -> list[int]:
    """Write the safetensors file to `temp` and fsync it; the crc32 of each blob's bytes."""
    crcs = []
    with _created(temp) as out:
        out.write(struct.pack("<Q", len(header)))
        out.write(header)
        for blob in entries:
            crc = 0
            for piece in _host_chunks(blobs[blob.name]):
                crc = zlib.crc32(piece, crc)
                out.write(piece)
            crcs.append(crc)
    return crcs


def _write_file(temp: Path, data: bytes) -> None:
    with _created(temp) as out:
        out.write(data)


class _Output:
    """A new file written without a buffer (BufferedWriter copied 16 MiB pieces: 4x slower), whole
    pieces at a time."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(self.fd, view) :]


@contextlib.contextmanager
def _created(path: Path) -> Iterator[_Output]:
    """A new file opened for writing, fsynced on leaving."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        yield _Output(fd)
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_directory(directory: Path) -> None:
    """Create the directory (and its parents) if it is new, and make its entry durable."""
    if directory.is_dir():
        return
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fsync_directory(directory.parent)


def fsync_directory(directory: Path) -> None:
    """Make the directory's entries (a rename, a new file) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked(directory: Path, *, exclusive: bool) -> Iterator[None]:
    """Hold a lock on the directory: a save (exclusive) never interleaves its renames with another
    save's or with a read (shared) of the same directory."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def _remove_temporaries(directory: Path, stem: str) -> None:
    """Delete what an earlier save of `stem` left when its process died mid-write (lock held, so
    no save of this directory is writing them now)."""
    prefix = f".{stem}."
    for entry in os.listdir(directory):
        if entry.startswith(prefix) and entry.endswith(TEMP_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                (directory / entry).unlink()


def _check_room(directory: Path, data_bytes: int, stem: str) -> None:
    # The old snapshot stays until the new one is complete, so all of the new one must fit.
    free = shutil.disk_usage(directory).free
    needed = data_bytes + MAX_MANIFEST_BYTES // 16 + DISK_MARGIN_BYTES
    if free < needed:
        raise ResourceExhausted(
            f"snapshot {stem!r} needs {readable_bytes(data_bytes)} on disk (and a {readable_bytes(DISK_MARGIN_BYTES)} margin), "
            f"but the state directory's disk has {readable_bytes(free)} free"
        )


# ---- reading -------------------------------------------------------------------------------


def read(
    path: Path, device: torch.device, charge: Callable[[int], None]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify the snapshot at `path`: its blobs on `device`, and the manifest's meta.

    The manifest is read first (at most MAX_MANIFEST_BYTES, JSON only) and checked; then
    `charge(n)` is called before anything is allocated, n being what the blobs will cost a
    session (workspace.blob_charge summed: data, names and per-blob overhead), and may raise
    (ResourceExhausted) to stop the read. The safetensors header is then checked against the
    manifest (names, dtypes, shapes, offsets, file size), and each blob is read and checked
    against its crc32. Raises SnapshotError, naming the file and what is wrong, for a missing,
    truncated or corrupt snapshot. Never unpickles anything.
    """
    manifest_path, data_path = _with_suffix(path, MANIFEST_SUFFIX), _with_suffix(path, DATA_SUFFIX)
    try:
        with _locked(path.parent, exclusive=False), tracing.span("cosserve.snapshot.read") as span:
            manifest = _read_manifest(manifest_path)
            entries = _manifest_blobs(manifest, manifest_path.name)
            span.set_attribute("cosserve.blobs", len(entries))
            span.set_attribute("cosserve.bytes", int(manifest["data_bytes"]))
            if manifest.get("data") != data_path.name:
                raise SnapshotError(f"{manifest_path.name}: names data file {manifest.get('data')!r}, not {data_path.name!r}")
            charge(sum(blob_charge(b.name, b.nbytes) for b in entries))
            return _read_data(data_path, manifest["data_bytes"], entries, device), manifest["meta"]
    except FileNotFoundError as err:
        raise SnapshotError(f"snapshot {path.name!r}: {Path(err.filename or path).name} is missing") from None
    except OSError as err:
        raise SnapshotError(f"snapshot {path.name!r} cannot be read: {err.strerror or err}") from None


def _open_regular(path: Path) -> tuple[int, int]:
    """(fd, size) of a regular file, opened without following a link."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise SnapshotError(f"{path.name} is not a regular file")
    return fd, info.st_size


def _read_manifest(path: Path) -> dict[str, Any]:
    fd, size = _open_regular(path)
    with open(fd, "rb", buffering=0) as source:
        if size > MAX_MANIFEST_BYTES:
            raise SnapshotError(f"{path.name} is {size} bytes, above the {MAX_MANIFEST_BYTES} a manifest may have")
        text = source.read(MAX_MANIFEST_BYTES + 1)
    if len(text) > MAX_MANIFEST_BYTES:
        raise SnapshotError(f"{path.name} grew past {MAX_MANIFEST_BYTES} bytes while being read")
    try:
        manifest = json.loads(text)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise SnapshotError(f"{path.name} is not a JSON manifest (damaged or truncated)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SnapshotError(f"{path.name} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise SnapshotError(f"{path.name} has format version {manifest.get('version')!r}; this server reads {VERSION}")
    if not isinstance(manifest.get("meta"), dict):
        raise SnapshotError(f"{path.name}: 'meta' is not an object")
    return manifest


def _is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _manifest_blobs(manifest: dict[str, Any], filename: str) -> list[_Blob]:
    """The manifest's blobs, each checked to be one a session could hold."""
    items = manifest.get("blobs")
    if not isinstance(items, list):
        raise SnapshotError(f"{filename}: 'blobs' is not a list")
    entries: list[_Blob] = []
    seen: set[str] = set()
    for index, item in enumerate(items):
        where = f"{filename}: blob {index}"
        if not isinstance(item, dict):
            raise SnapshotError(f"{where} is not an object")
        name, dtype_code, shape = item.get("name"), item.get("dtype"), item.get("shape")
        if not isinstance(name, str) or name in seen or name == _RESERVED_KEY:
            raise SnapshotError(f"{where} has a missing, repeated or reserved name")
        try:
            check_blob_name(name)
        except InvalidArgument:
            raise SnapshotError(f"{where} has a name no blob may have") from None
        if dtype_code not in _TORCH_DTYPES:
            raise SnapshotError(f"{where} ({quoted(name)}) has dtype {str(dtype_code)[:16]!r}, not one of {sorted(_TORCH_DTYPES)}")
        dtype = _TORCH_DTYPES[dtype_code]
        if not isinstance(shape, list) or len(shape) > 64 or not all(_is_count(d) for d in shape):
            raise SnapshotError(f"{where} ({quoted(name)}) has a shape that is not a list of sizes")
        nbytes = math.prod(shape) * dtype.itemsize
        if item.get("bytes") != nbytes or not _is_count(nbytes):
            raise SnapshotError(f"{where} ({quoted(name)}): 'bytes' does not match its dtype and shape")
        crc = item.get("crc32")
        if not _is_count(crc) or crc >= 2**32:
            raise SnapshotError(f"{where} ({quoted(name)}) has no crc32")
        seen.add(name)
        entries.append(_Blob(name, dtype, tuple(shape), nbytes, crc))
    total = sum(blob.nbytes for blob in entries)
    if manifest.get("total_bytes") != total:
        raise SnapshotError(f"{filename}: 'total_bytes' is not the sum of its blobs' bytes")
    if not _is_count(manifest.get("data_bytes")):
        raise SnapshotError(f"{filename}: 'data_bytes' is not a size")
    return entries


def _read_data(path: Path, data_bytes: int, entries: list[_Blob], device: torch.device) -> dict[str, torch.Tensor]:
    fd, size = _open_regular(path)
    with open(fd, "rb", buffering=0) as source:
        if size != data_bytes:
            raise SnapshotError(f"{path.name} is {size} bytes; its manifest says {data_bytes} (truncated or replaced)")
        _check_header(path.name, source, size, entries)
        tensors: dict[str, torch.Tensor] = {}
        for blob in entries:
            host = memory.empty(blob.dtype, blob.shape, _CPU, f"blob {quoted(blob.name)}")
            if _read_into(source, memory.tensor_bytes(host), path.name) != blob.crc32:
                raise SnapshotError(f"{path.name}: blob {quoted(blob.name)} does not match its checksum (the file is corrupt)")
            tensors[blob.name] = host if device.type == "cpu" else host.to(device)
    return tensors


def _read_exactly(source: BinaryIO, nbytes: int, filename: str) -> bytes:
    data = source.read(nbytes)
    if len(data) != nbytes:
        raise SnapshotError(f"{filename} ends early (truncated)")
    return data


def _check_header(filename: str, source: BinaryIO, size: int, entries: list[_Blob]) -> None:
    """Check the safetensors header against the manifest: the same blobs, back to back in its order."""
    (header_bytes,) = struct.unpack("<Q", _read_exactly(source, 8, filename))
    if header_bytes > MAX_HEADER_BYTES or 8 + header_bytes > size:
        raise SnapshotError(f"{filename} has a header of {header_bytes} bytes, more than the file or the bound allows")
    try:
        header = json.loads(_read_exactly(source, header_bytes, filename))
    except (ValueError, RecursionError):
        raise SnapshotError(f"{filename} does not start with a safetensors header (damaged)") from None
    if not isinstance(header, dict):
        raise SnapshotError(f"{filename} does not start with a safetensors header (damaged)")
    header.pop(_RESERVED_KEY, None)
    if len(header) != len(entries):
        raise SnapshotError(f"{filename} holds {len(header)} tensors; its manifest names {len(entries)}")
    offset = 0
    for blob in entries:
        expected = {"dtype": SAFETENSORS_DTYPES[blob.dtype], "shape": list(blob.shape), "data_offsets": [offset, offset + blob.nbytes]}
        if header.get(blob.name) != expected:
            raise SnapshotError(f"{filename}: tensor {quoted(blob.name)} is not the one its manifest describes")
        offset += blob.nbytes
    if 8 + header_bytes + offset != size:
        raise SnapshotError(f"{filename} is {size} bytes; its header and tensors make {8 + header_bytes + offset}")


def _read_into(source: BinaryIO, target: memoryview, filename: str) -> int:
    """Fill `target` from `source`, COPY_BYTES at a time; the crc32 of what was read."""
    crc = 0
    filled = 0
    while filled < len(target):
        count = source.readinto(target[filled : filled + COPY_BYTES])  # type: ignore[attr-defined]
        if not count:
            raise SnapshotError(f"{filename} ended early (it shrank while being read)")
        crc = zlib.crc32(target[filled : filled + count], crc)
        filled += count
    return crc
