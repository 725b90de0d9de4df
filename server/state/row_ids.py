"""Row ids of a shared corpus (int64 or strings, one per row), and the ids of a list of rows. No gRPC here."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cosserve import limits
from cosserve.server.errors import ResourceExhausted

__all__ = ["MAX_ID_BYTES", "RowIds"]

# A string id's UTF-8 bytes at most: ids are keys (UUIDs, URLs, paths), and a bound on each keeps
# the bytes a reply's ids may take predictable (the client sizes its requests by it).
MAX_ID_BYTES = limits.MAX_ID_BYTES


@dataclasses.dataclass(frozen=True)
class RowIds:
    """The ids of a corpus's rows: an Arrow array of int64 or large_string, no nulls. Arrow's
    layout keeps strings in one buffer with int64 offsets, as the wire carries them."""

    array: pa.Array

    @classmethod
    def of(cls, values: pa.Array | pa.ChunkedArray | np.ndarray, rows: int) -> RowIds:
        """Checked ids for a corpus of `rows` rows; ValueError with the reason."""
        if isinstance(values, np.ndarray):
            values = pa.array(values)
        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks()
        if len(values) != rows:
            raise ValueError(f"has {len(values)} ids for {rows} rows")
        if values.null_count:
            raise ValueError(f"has {values.null_count} null ids; every row needs an id")
        if pa.types.is_integer(values.type):
            try:
                values = values.cast(pa.int64())
            except pa.ArrowInvalid as err:
                raise ValueError(f"has ids that do not fit int64 ({err})"[:300]) from None
        elif pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            values = values.cast(pa.large_string())
            longest = pc.max(pc.binary_length(values)).as_py() if len(values) else 0
            if longest and longest > MAX_ID_BYTES:
                raise ValueError(f"has a string id of {longest} UTF-8 bytes; ids may have at most {MAX_ID_BYTES}")
        else:
            raise ValueError(f"has ids of type {values.type}; ids are integers or strings")
        return cls(values)

    @property
    def kind(self) -> str:
        """"int64" or "string"."""
        return "int64" if pa.types.is_int64(self.array.type) else "string"

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)

    def _offsets(self) -> np.ndarray:
        """The int64 offsets of a string array, (M + 1,), from its buffer (no copy)."""
        buffer = self.array.buffers()[1]
        return np.frombuffer(buffer, np.int64)[self.array.offset : self.array.offset + len(self.array) + 1]

    def bytes_of(self, rows: np.ndarray) -> int:
        """Bytes the ids of `rows` take on the wire (int64 values, or offsets and UTF-8 bytes)."""
        if self.kind == "int64":
            return 8 * len(rows)
        offsets = self._offsets()
        return 8 * (len(rows) + 1) + int((offsets[rows + 1] - offsets[rows]).sum())

    def take(self, rows: np.ndarray) -> pa.Array:
        """The ids of corpus rows `rows` (int64, each in range), in order."""
        return self.array.take(pa.array(rows, pa.int64()))

    def take_within(self, rows: np.ndarray, max_bytes: int, what: str) -> pa.Array:
        """`take`, or ResourceExhausted if the ids would pass max_bytes on the wire."""
        nbytes = self.bytes_of(rows)
        if nbytes > max_bytes:
            raise ResourceExhausted(
                f"{what}: the ids of {len(rows)} rows take {limits.readable_bytes(nbytes)}, above the "
                f"{limits.readable_bytes(max_bytes)} left in one reply; "
                "send fewer queries per message"
            )
        return self.take(rows)
