"""Embedding files as one logical (M, D) matrix with ids, read piece by piece in bounded memory:
`.npy` and `.safetensors` files (memory-mapped), folders of `.npy` shards (in sorted order), and
`.parquet` files or folders of them (streamed record batches, read with pyarrow).

Every malformed input raises one `DatasetError`, whose message is one line a person can act on.
pyarrow is imported only to read Parquet (`pip install 'cosserve[parquet]'`); numpy files need
nothing more than numpy."""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np

from cosserve.errors import InvalidArgumentError

__all__ = ["BATCH_ROWS", "Batch", "DatasetError", "Source", "open_source"]

# Rows per batch read by default: 16 MiB of 1024-wide float32 vectors.
BATCH_ROWS = 4096
_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"
_PARQUET_MAGIC = b"PAR1"
_SAFETENSORS_DTYPES: dict[str, np.dtype] = {"F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8")}
_NEEDS_PYARROW = "reading Parquet needs pyarrow: pip install 'cosserve[parquet]'"
# Parquet is read through a buffered stream, not whole column chunks at once: a 1M-row row group
# of 384-wide vectors would otherwise be 1.5 GB in memory before its first batch.
_PARQUET_BUFFER = 8 << 20

IdKind = Literal["row", "int64", "string"]


class DatasetError(InvalidArgumentError):
    """An input file or folder that cannot be read as a matrix of embeddings (with ids): one line."""


@dataclasses.dataclass(frozen=True)
class Batch:
    """Rows [start, start + len(vectors)) of a source: their vectors (n, D) and ids (n,), int64
    (the row numbers when the source has no id column) or str objects."""

    start: int
    vectors: np.ndarray
    ids: np.ndarray


class Source:
    """A logical (rows, dim) matrix of `dtype` read from `path`, with ids of `id_kind` ("row":
    the row number is the id)."""

    path: str
    rows: int
    dim: int
    dtype: np.dtype
    id_kind: IdKind
    files: list[str]

    def batches(self, start: int = 0, stop: int | None = None, rows: int = BATCH_ROWS) -> Iterator[Batch]:
        """Batches of at most `rows` rows covering [start, stop) in order."""
        raise NotImplementedError

    def ids(self) -> np.ndarray:
        """Every row's id (only the id column is read): int64 or str objects."""
        if self.id_kind == "row":
            return np.arange(self.rows, dtype=np.int64)
        return np.concatenate([b.ids for b in self._id_batches()]) if self.rows else np.zeros(0, np.int64)

    def _id_batches(self) -> Iterator[Batch]:
        return self.batches()

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The vectors of the given row numbers, in their order."""
        raise NotImplementedError

    def array(self) -> np.ndarray | None:
        """The whole matrix as one memory-mapped array, where the source is one (else None)."""
        return None

    def fingerprint(self) -> list[list[Any]]:
        """[path, size, mtime_ns] of each file read: what a resumed job checks is unchanged."""
        out = []
        for name in self.files:
            st = os.stat(name)
            out.append([os.path.abspath(name), st.st_size, st.st_mtime_ns])
        return out

    def describe(self) -> str:
        ids = {"row": "row numbers as ids", "int64": "int64 ids", "string": "string ids"}[self.id_kind]
        return f"{self.rows} x {self.dim} {self.dtype}, {ids}"


# ---- numpy arrays: .npy, .safetensors, folders of .npy shards -----------------------------------


class ArraySource(Source):
    """Memory-mapped arrays (one file, or shards read one after another); ids are row numbers."""

    def __init__(self, path: str, arrays: Sequence[np.ndarray], files: list[str]) -> None:
        self.path, self.files, self._arrays = path, files, list(arrays)
        self.rows = sum(a.shape[0] for a in arrays)
        self.dim = arrays[0].shape[1]
        self.dtype = arrays[0].dtype
        self.id_kind = "row"
        self._starts = np.cumsum([0] + [a.shape[0] for a in arrays])

    def batches(self, start: int = 0, stop: int | None = None, rows: int = BATCH_ROWS) -> Iterator[Batch]:
        stop = self.rows if stop is None else min(stop, self.rows)
        at = start
        while at < stop:
            shard = int(np.searchsorted(self._starts, at, side="right")) - 1
            local = at - int(self._starts[shard])
            n = min(rows, stop - at, self._arrays[shard].shape[0] - local)
            vectors = np.ascontiguousarray(self._arrays[shard][local : local + n])
            yield Batch(at, vectors, np.arange(at, at + n, dtype=np.int64))
            at += n

    def take(self, rows: np.ndarray) -> np.ndarray:
        if len(self._arrays) == 1:
            return np.asarray(self._arrays[0][np.asarray(rows, dtype=np.int64)])
        shard = np.searchsorted(self._starts, rows, side="right") - 1
        out = np.empty((len(rows), self.dim), self.dtype)
        for s in np.unique(shard):
            mask = shard == s
            out[mask] = self._arrays[s][rows[mask] - self._starts[s]]
        return out

    def array(self) -> np.ndarray | None:
        return self._arrays[0] if len(self._arrays) == 1 else None


def _check_matrix(array: np.ndarray, name: str, what: str) -> np.ndarray:
    if array.dtype.newbyteorder("=") not in _FLOAT_DTYPES:
        raise DatasetError(f"{what} {name!r} is {array.dtype}; it must be float16, float32 or float64")
    if array.ndim != 2:
        raise DatasetError(f"{what} {name!r} has shape {array.shape}; it must be 2-D (rows, D)")
    return array


def _load_npy(path: str, what: str) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as err:
        if "pickled" in str(err) or "Python objects" in str(err):  # an object array: it would need unpickling
            raise DatasetError(f"{what} file {path!r} holds Python objects (an object .npy); save a float array") from None
        raise DatasetError(f"{what} file {path!r} is not a readable .npy array ({err})") from None
    except OSError as err:
        raise DatasetError(f"{what} file {path!r} is not a readable .npy array ({err})") from None
    return _check_matrix(array, path, what)


def _load_safetensors(path: str, key: str | None, what: str) -> np.ndarray:
    """One tensor of a .safetensors file, memory-mapped: the format is an 8-byte little-endian
    header length, a JSON header of {name: {dtype, shape, data_offsets}}, then the bytes."""
    try:
        with open(path, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            size = os.fstat(file.fileno()).st_size
            if length > size - 8:
                raise ValueError(f"a header of {length} bytes in a file of {size}")
            header = json.loads(file.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        header.pop("__metadata__", None)
        keys = sorted(header)
        if key is None:
            if len(keys) != 1:
                shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
                raise DatasetError(f"{what} file {path!r} holds {len(keys)} tensors ({shown or 'none'}); name one as {path}:KEY")
            key = keys[0]
        if key not in header:
            raise DatasetError(f"{what} file {path!r} has no tensor {key!r}; it has {', '.join(keys[:5])}")
        entry = header[key]
        code, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        if code not in _SAFETENSORS_DTYPES:
            raise DatasetError(f"{what} {path}:{key} is {code}; it must be F16, F32 or F64 (float16, float32 or float64)")
        dtype = _SAFETENSORS_DTYPES[code]
        if end - begin != dtype.itemsize * int(np.prod(shape)) or 8 + length + end > size:
            raise ValueError(f"tensor {key!r}'s offsets do not match its shape {shape}")
        array = np.memmap(path, dtype=dtype, mode="r", offset=8 + length + begin, shape=shape) if end > begin else np.zeros(shape, dtype)
    except DatasetError:
        raise
    except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
        raise DatasetError(f"{what} file {path!r} is not a readable .safetensors file ({err})") from None
    return _check_matrix(array, f"{path}:{key}", what)


def _open_npy_shards(folder: str, names: list[str], what: str) -> ArraySource:
    paths = [os.path.join(folder, n) for n in names]
    arrays = [_load_npy(p, what) for p in paths]
    first = arrays[0]
    for path, array in zip(paths[1:], arrays[1:]):
        if array.dtype != first.dtype:
            raise DatasetError(
                f"{what} shard {path!r} is {array.dtype} but {paths[0]!r} is {first.dtype}; every shard must have the same dtype"
            )
        if array.shape[1] != first.shape[1]:
            raise DatasetError(
                f"{what} shard {path!r} has width {array.shape[1]} but {paths[0]!r} has {first.shape[1]}; every shard must have the same width"
            )
    return ArraySource(folder, arrays, paths)


# ---- Parquet ------------------------------------------------------------------------------------


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401  (the submodule is used as pyarrow.parquet)
    except ImportError:
        raise DatasetError(_NEEDS_PYARROW) from None
    return pyarrow


def _vector_type(pa: Any, t: Any) -> bool:
    """A list, large list or fixed-size list of float16/32/64."""
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
        return False
    return bool(pa.types.is_floating(t.value_type))


def _id_type(pa: Any, t: Any) -> bool:
    return bool(pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t))


def _columns(schema: Any) -> str:
    return ", ".join(f"{f.name} ({f.type})" for f in schema)


class ParquetSource(Source):
    """Parquet files read one after another as one table; the vector column becomes (n, D) rows."""

    def __init__(self, path: str, files: list[str], vector_column: str | None, id_column: str | None, what: str) -> None:
        pa = self._pa = _pyarrow()
        self.path, self.files, self._what = path, files, what
        self._readers = [self._open(f) for f in files]
        schema = self._readers[0].schema_arrow
        self.vector_column = self._pick_vector(schema, vector_column, files[0])
        self.id_column = self._pick_id(schema, id_column, files[0])
        vtype = schema.field(self.vector_column).type
        for name, reader in zip(files[1:], self._readers[1:]):
            other = reader.schema_arrow
            if self.vector_column not in other.names or (self.id_column and self.id_column not in other.names):
                raise DatasetError(f"{what} file {name!r} lacks the columns of {files[0]!r}: its columns are {_columns(other)}")
            if other.field(self.vector_column).type != vtype:
                raise DatasetError(
                    f"{what} file {name!r} has column {self.vector_column!r} of {other.field(self.vector_column).type} but "
                    f"{files[0]!r} has {vtype}; every file must have the same vector type (mixed dimensions?)"
                )
        self.dtype = np.dtype(vtype.value_type.to_pandas_dtype())
        if self.id_column is None:
            self.id_kind = "row"
        else:
            itype = schema.field(self.id_column).type
            self.id_kind = "int64" if pa.types.is_integer(itype) else "string"
        self._file_rows = [r.metadata.num_rows for r in self._readers]
        self._file_starts = np.cumsum([0] + self._file_rows)
        self.rows = int(self._file_starts[-1])
        self.dim = vtype.list_size if pa.types.is_fixed_size_list(vtype) else self._first_width()
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    def _open(self, name: str) -> Any:
        try:
            return self._pa.parquet.ParquetFile(name, pre_buffer=False, buffer_size=_PARQUET_BUFFER)
        except (self._pa.ArrowException, OSError) as err:
            raise DatasetError(f"{self._what} file {name!r} is not a readable Parquet file ({_one_line(err)})") from None

    def _pick_vector(self, schema: Any, given: str | None, name: str) -> str:
        if given:
            if given not in schema.names:
                raise DatasetError(f"{self._what} file {name!r} has no column {given!r}; its columns are {_columns(schema)}")
            if not _vector_type(self._pa, schema.field(given).type):
                raise DatasetError(
                    f"{self._what} column {given!r} of {name!r} is {schema.field(given).type}; "
                    "a vector column must be a list or fixed_size_list of float16/float32/float64"
                )
            return given
        found = [f.name for f in schema if _vector_type(self._pa, f.type)]
        if not found:
            raise DatasetError(
                f"{self._what} file {name!r} has no vector column (a list or fixed_size_list of floats); "
                f"its columns are {_columns(schema)}"
            )
        if len(found) > 1:
            raise DatasetError(f"{self._what} file {name!r} has several vector columns ({', '.join(found)}); choose one with --vector-column")
        return found[0]

    def _pick_id(self, schema: Any, given: str | None, name: str) -> str | None:
        if given == "":  # --id-column '': row numbers, whatever columns there are
            return None
        if given is not None:
            if given not in schema.names:
                raise DatasetError(f"{self._what} file {name!r} has no column {given!r}; its columns are {_columns(schema)}")
            if not _id_type(self._pa, schema.field(given).type):
                raise DatasetError(f"{self._what} column {given!r} of {name!r} is {schema.field(given).type}; ids must be integers or strings")
            return given
        found = [f.name for f in schema if f.name != self.vector_column and _id_type(self._pa, f.type)]
        if len(found) > 1:
            if "id" in found:
                return "id"
            raise DatasetError(
                f"{self._what} file {name!r} has several possible id columns ({', '.join(found)}); choose one with "
                "--id-column (or --id-column '' for row numbers)"
            )
        return found[0] if found else None

    def _first_width(self) -> int:
        for _, _, batch in self._file_batches(0, self.rows, 1, [self.vector_column]):
            return int(self._pa.compute.list_value_length(batch.column(0)).to_numpy(zero_copy_only=False)[0])
        return 0

    def _record_batches(self, file: int, start: int, stop: int, rows: int, columns: list[str]) -> Iterator[Any]:
        """Record batches of file `file`'s rows [start, stop) (row numbers within the file)."""
        reader = self._readers[file]
        meta = reader.metadata
        at = 0
        for group in range(meta.num_row_groups):
            n = meta.row_group(group).num_rows
            if at + n > start and at < stop:
                try:
                    pieces = reader.iter_batches(batch_size=rows, row_groups=[group], columns=columns)
                    for batch in pieces:
                        lo, hi = max(start - at, 0), min(stop - at, batch.num_rows)
                        if hi > lo:
                            yield batch.slice(lo, hi - lo)
                        at += batch.num_rows
                        if at >= stop:
                            return
                except (self._pa.ArrowException, OSError) as err:
                    raise DatasetError(f"{self._what} file {self.files[file]!r} cannot be read ({_one_line(err)})") from None
            else:
                at += n
            if at >= stop:
                return

    def _vectors(self, column: Any, file: int) -> np.ndarray:
        pa, name = self._pa, self.files[file]
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        if column.null_count:
            raise DatasetError(f"{self._what} file {name!r} has nulls in vector column {self.vector_column!r}")
        if not pa.types.is_fixed_size_list(column.type):
            lengths = pa.compute.list_value_length(column).to_numpy(zero_copy_only=False)
            bad = np.flatnonzero(lengths != self.dim)
            if len(bad):
                raise DatasetError(
                    f"{self._what} file {name!r} has a vector of {lengths[bad[0]]} values in column {self.vector_column!r} "
                    f"where {self.dim} were expected (mixed dimensions)"
                )
        values = column.flatten()
        if values.null_count:
            raise DatasetError(f"{self._what} file {name!r} has nulls in vector column {self.vector_column!r}")
        return values.to_numpy(zero_copy_only=False).reshape(len(column), self.dim)

    def _ids(self, column: Any, file: int) -> np.ndarray:
        if column.null_count:
            raise DatasetError(f"{self._what} file {self.files[file]!r} has nulls in id column {self.id_column!r}")
        if self.id_kind == "int64":
            return column.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        return column.to_numpy(zero_copy_only=False).astype(object, copy=False)

    def _file_batches(self, start: int, stop: int, rows: int, columns: list[str]) -> Iterator[tuple[int, int, Any]]:
        """(file, first global row, record batch) over the global rows [start, stop)."""
        for file in range(len(self.files)):
            first, last = int(self._file_starts[file]), int(self._file_starts[file + 1])
            if last <= start or first >= stop:
                continue
            at = max(start, first)
            for batch in self._record_batches(file, at - first, min(stop, last) - first, rows, columns):
                yield file, at, batch
                at += batch.num_rows

    def batches(self, start: int = 0, stop: int | None = None, rows: int = BATCH_ROWS) -> Iterator[Batch]:
        stop = self.rows if stop is None else min(stop, self.rows)
        columns = [self.vector_column] + ([self.id_column] if self.id_column else [])
        for file, at, batch in self._file_batches(start, stop, rows, columns):
            vectors = self._vectors(batch.column(0), file)
            ids = self._ids(batch.column(1), file) if self.id_column else np.arange(at, at + batch.num_rows, dtype=np.int64)
            yield Batch(at, vectors, ids)

    def _id_batches(self) -> Iterator[Batch]:
        assert self.id_column is not None
        empty = np.zeros((0, self.dim), self.dtype)
        for file, at, batch in self._file_batches(0, self.rows, 1 << 16, [self.id_column]):
            yield Batch(at, empty, self._ids(batch.column(0), file))

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows read by row group, the last few groups kept: rows in (nearly) file order read each
        group once."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), self.dtype)
        file = np.searchsorted(self._file_starts, rows, side="right") - 1
        for f in np.unique(file):
            in_file = np.flatnonzero(file == f)
            local = rows[in_file] - self._file_starts[f]
            meta = self._readers[f].metadata
            group_starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
            group = np.searchsorted(group_starts, local, side="right") - 1
            for g in np.unique(group):
                mask = group == g
                out[in_file[mask]] = self._group(int(f), int(g))[local[mask] - group_starts[g]]
        return out

    def _group(self, file: int, group: int) -> np.ndarray:
        key = (file, group)
        if key not in self._cache:
            if len(self._cache) >= 2:
                self._cache.pop(next(iter(self._cache)))
            try:
                table = self._readers[file].read_row_group(group, columns=[self.vector_column])
            except self._pa.ArrowException as err:
                raise DatasetError(f"{self._what} file {self.files[file]!r} cannot be read ({_one_line(err)})") from None
            self._cache[key] = self._vectors(table.column(0), file)
        return self._cache[key]


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 200 else text[:197] + "..."


# ---- opening a path -----------------------------------------------------------------------------


def _kind(path: str) -> str:
    """'npy', 'npz', 'parquet', 'safetensors' or 'other', from the file's first bytes (not its name)."""
    with open(path, "rb") as file:
        head = file.read(9)
        size = os.fstat(file.fileno()).st_size
    if head.startswith(_NPY_MAGIC):
        return "npy"
    if head.startswith(_ZIP_MAGIC):
        return "npz"
    if head.startswith(_PARQUET_MAGIC):
        return "parquet"
    # safetensors: an 8-byte little-endian header length, then the JSON header.
    if len(head) == 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] <= size - 8:
        return "safetensors"
    return "other"


def _split_key(path: str) -> tuple[str, str | None]:
    """FILE.safetensors:KEY -> (FILE.safetensors, KEY) when FILE.safetensors exists and `path` does not."""
    if not os.path.exists(path) and ":" in path:
        file, key = path.rsplit(":", 1)
        if os.path.isfile(file):
            return file, key
    return path, None


def _open_folder(path: str, vector_column: str | None, id_column: str | None, what: str) -> Source:
    # Names starting with '.' or '_' are a writer's temporary files and markers (Spark's _SUCCESS).
    names = sorted(n for n in os.listdir(path) if not n.startswith((".", "_")) and os.path.isfile(os.path.join(path, n)))
    npy = [n for n in names if n.endswith(".npy")]
    parquet = [n for n in names if n.endswith(".parquet")]
    if npy and parquet:
        raise DatasetError(f"{what} folder {path!r} holds both .npy and .parquet files; keep one kind")
    if parquet:
        return ParquetSource(path, [os.path.join(path, n) for n in parquet], vector_column, id_column, what)
    if npy:
        return _open_npy_shards(path, npy, what)
    raise DatasetError(f"{what} folder {path!r} holds no .npy or .parquet files")


def open_source(path: str, *, vector_column: str | None = None, id_column: str | None = None, what: str = "input") -> Source:
    """The embeddings at `path`: a .npy, .safetensors (FILE:KEY for one of several tensors) or
    .parquet file, or a folder of .parquet files or of .npy shards.

    `vector_column` and `id_column` name Parquet's columns (ignored for numpy files); without
    them the one list-of-floats column holds the vectors and the one other integer or string
    column (or, among several, the one named "id") holds the ids; `id_column=""` takes row
    numbers. `what` names the input in messages ("corpus", "queries")."""
    if os.path.isdir(path):
        return _open_folder(path, vector_column, id_column, what)
    file, key = _split_key(path)
    if not os.path.isfile(file):
        raise DatasetError(f"{what} {path!r} does not exist")
    kind = _kind(file)
    if kind == "npy":
        return ArraySource(file, [_load_npy(file, what)], [file])
    if kind == "safetensors":
        return ArraySource(path, [_load_safetensors(file, key, what)], [file])
    if kind == "parquet":
        return ParquetSource(file, [file], vector_column, id_column, what)
    if kind == "npz":
        raise DatasetError(f"{what} file {path!r} is an .npz archive; give one array, as a .npy or a .safetensors file")
    raise DatasetError(f"{what} file {path!r} is not a .npy, .safetensors or .parquet file (nor a folder of them)")
