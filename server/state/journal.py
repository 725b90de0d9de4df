"""The sync log of --durability sync: records appended and fsynced one at a time, and the
primitives that read them back (state/durability.py replays them into sessions)."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import struct
import threading
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

from cosserve.server import tracing
from cosserve.server.errors import CosserveError, FailedPrecondition, ResourceExhausted
from cosserve.server.state import snapshots

__all__ = ["Journal", "TornRecord", "check_crc", "read_head", "read_into", "refusal", "skip_data"]

log = logging.getLogger("cosserve.server")

# Every record: MAGIC, u32 header bytes, u64 data bytes, the JSON header, the data, and the
# crc32 of everything after MAGIC. A record that does not end, or whose crc differs, is the tail
# a crash cut: replay stops there and cuts it off.
MAGIC = b"CSJ1"
RECORD_PREFIX = struct.Struct("<4sIQ")
RECORD_CRC = struct.Struct("<I")
# A header names a session and its blobs' names, dtypes and shapes: a few KiB at most.
MAX_HEADER_BYTES = 16 * 1024**2
# Bytes read per call when replaying the data of a record no session will keep.
SCRATCH_BYTES = 16 * 1024**2


def refusal(what: str, err: OSError) -> CosserveError:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(f"{what}: the state directory's disk is full; nothing was changed")
    return FailedPrecondition(f"{what}: {err.strerror or err}; nothing was changed")


class Journal:
    """The sync log: records appended and fsynced one at a time, by any thread.

    A record that cannot be written whole is cut off again, so the log always ends with a whole
    record; if even that fails, every later append is refused (the log is no longer trusted)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.size = os.fstat(self._fd).st_size
        self._broken = ""

    def append(self, header: Mapping[str, Any], data: list[memoryview]) -> int:
        """Write one record and fsync it; the log's size after it."""
        text = json.dumps(header, ensure_ascii=True, separators=(",", ":")).encode("ascii")
        length = sum(len(piece) for piece in data)
        prefix = RECORD_PREFIX.pack(MAGIC, len(text), length) + text
        crc = zlib.crc32(prefix[len(MAGIC) :])
        for piece in data:
            crc = zlib.crc32(piece, crc)
        with self.lock, tracing.span("cosserve.journal.append", {"cosserve.bytes": len(prefix) + length}):
            if self._broken:
                raise FailedPrecondition(f"the sync log cannot be written ({self._broken}); nothing was changed")
            try:
                for piece in (memoryview(prefix), *data, memoryview(RECORD_CRC.pack(crc))):
                    while piece:
                        piece = piece[os.write(self._fd, piece) :]
                os.fsync(self._fd)
            except OSError as err:
                self._cut()
                raise refusal("the sync log", err) from None
            self.size += len(prefix) + length + RECORD_CRC.size
            return self.size

    def _cut(self) -> None:
        """Take back a record written in part (lock held)."""
        try:
            os.ftruncate(self._fd, self.size)
            os.fsync(self._fd)
        except OSError as err:
            self._broken = err.strerror or str(err)
            log.error("the sync log %s cannot be repaired (%s): every change is refused from now on", self.path, err)

    def set_aside(self, old: Path) -> bool:
        """Rename this log to `old` and go on in a new, empty one, unless it is empty or `old` is
        still there (its snapshots were not all written: it stays the log set aside). Appends wait
        meanwhile, so every record lands in one of the two."""
        with self.lock:
            if not self.size or old.exists():
                return False
            # A crash between the two leaves only `old`, which start-up replays.
            os.replace(self.path, old)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            snapshots.fsync_directory(self.path.parent)
            os.close(self._fd)
            self._fd, self.size = fd, 0
            return True

    def close(self) -> None:
        with self.lock:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._broken = "the server is stopping"


class TornRecord(Exception):
    """A log record that is not whole: the tail a crash cut, or damage."""


def read_into(source: BinaryIO, target: memoryview, crc: int) -> int:
    filled = 0
    while filled < len(target):
        count = source.readinto(target[filled : filled + SCRATCH_BYTES])  # type: ignore[attr-defined]
        if not count:
            raise TornRecord("it ends early")
        crc = zlib.crc32(target[filled : filled + count], crc)
        filled += count
    return crc


def read_head(source: BinaryIO, start: int, size: int) -> tuple[bytes, int, int, int]:
    """The record at `start` of a log of `size` bytes, up to its data: (its JSON header, its data
    bytes, where the next record begins, the crc32 so far). TornRecord if it cannot be whole."""
    source.seek(start)
    prefix = source.read(RECORD_PREFIX.size)
    if len(prefix) < RECORD_PREFIX.size:
        raise TornRecord("it ends inside its prefix")
    magic, header_bytes, data_bytes = RECORD_PREFIX.unpack(prefix)
    if magic != MAGIC or header_bytes > MAX_HEADER_BYTES:
        raise TornRecord("it does not start like a record")
    end = start + RECORD_PREFIX.size + header_bytes + data_bytes + RECORD_CRC.size
    if end > size:
        raise TornRecord(f"it needs {end - start} bytes, the log has {size - start} left")
    text = source.read(header_bytes)
    return text, data_bytes, end, zlib.crc32(text, zlib.crc32(prefix[len(MAGIC) :]))


def check_crc(source: BinaryIO, crc: int) -> None:
    """TornRecord unless the record's stored crc32, next in `source`, is `crc`."""
    tail = source.read(RECORD_CRC.size)
    if len(tail) < RECORD_CRC.size or RECORD_CRC.unpack(tail)[0] != crc:
        raise TornRecord("its crc32 does not match")


def skip_data(source: BinaryIO, data_bytes: int, crc: int) -> None:
    """Read past a record's data, checking its crc32 (nothing kept beyond one scratch buffer)."""
    scratch = memoryview(bytearray(min(data_bytes, SCRATCH_BYTES)))
    left = data_bytes
    while left:
        crc = read_into(source, scratch[: min(left, len(scratch))], crc)
        left -= min(left, len(scratch))
    check_crc(source, crc)
