"""Where a `cosserve score` job's results go, chosen by the --out suffix: a folder of Parquet part
files (one row per result), each written atomically while the job runs and checked and skipped
when it resumes; or one .npz written at the end, for small jobs."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from cosserve.errors import InvalidArgumentError

__all__ = ["COLUMNS", "NpzResults", "ParquetParts", "Part", "Results", "UsageError", "open_results", "plan_parts"]

# The columns of each job's Parquet rows.
COLUMNS = {
    "topk": ("query_id", "rank", "corpus_id", "score"),
    "pairs": ("a_id", "b_id", "score"),
    "threshold": ("query_id", "corpus_id", "score"),
}
# The job a folder holds, checked by --resume; `_` hides it from Parquet readers (and
# cosserve.datasets), as Spark's _SUCCESS, written when the last part is.
MANIFEST = "_job.json"
SUCCESS = "_SUCCESS"
PART_KEY = b"cosserve.part"


class UsageError(InvalidArgumentError):
    """Something wrong with the command's inputs: reported in one line, exit code 2."""


@dataclasses.dataclass(frozen=True)
class Part:
    """Rows [start, stop) of the job's driving input (the queries, or A): one part file."""

    index: int
    start: int
    stop: int


def plan_parts(rows: int, part_rows: int) -> list[Part]:
    """The parts of a job over `rows` rows; an empty input is one empty part."""
    return [Part(i, s, min(s + part_rows, rows)) for i, s in enumerate(range(0, max(rows, 1), part_rows))]


class Results:
    """A job's output: `done(part)` says whether a part is already written, `write` writes one
    (parts come in order), `close` finishes the output."""

    path: str

    def done(self, part: Part) -> bool:
        return False

    def write(self, part: Part, columns: dict[str, np.ndarray], arrays: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def discard(self) -> None:
        """The job failed: leave nothing behind if it wrote no result yet."""

    def written(self) -> int:
        return 0


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise UsageError('writing Parquet needs pyarrow (in a clone of cosserve: python3 -m pip install -e ".[parquet]"), or write an .npz') from None
    return pyarrow


def _arrow_column(pa: Any, values: np.ndarray) -> Any:
    if values.dtype == object or values.dtype.kind == "U":
        return pa.array(values, type=pa.string())
    return pa.array(values)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ParquetParts(Results):
    """A folder of `part-NNNNNN.parquet` files. Each is written to a hidden temporary file, synced
    and renamed into place, so a file under its final name is whole; its footer names its part
    and rows, which --resume checks before skipping it."""

    def __init__(self, path: str, job: dict[str, Any], resume: bool) -> None:
        self.pa = _pyarrow()
        self.path, self.job = path, job
        self._written = 0
        manifest = os.path.join(path, MANIFEST)
        if os.path.exists(path) and not os.path.isdir(path):
            raise UsageError(f"--out {path!r} is a file; a .parquet output is a folder of part files")
        if resume:
            if not os.path.isfile(manifest):
                if os.path.isdir(path) and os.listdir(path):
                    raise UsageError(f"--out {path!r} holds no job to resume (no {MANIFEST}); remove it or choose another --out")
            else:
                try:
                    with open(manifest) as f:
                        before = json.load(f)
                except (OSError, ValueError) as err:
                    raise UsageError(f"--resume: {manifest!r} is unreadable ({err}); remove {path!r} to start over") from None
                if before != json.loads(json.dumps(job)):
                    raise UsageError(f"--resume: {path!r} holds another job ({_difference(before, job)}); remove it or choose another --out")
        elif os.path.isdir(path) and os.listdir(path):
            raise UsageError(f"--out {path!r} already exists; pass --resume to continue its job, or remove it")
        self._created = not os.path.isdir(path)
        os.makedirs(path, exist_ok=True)
        if not os.path.isfile(manifest):
            self._atomic(MANIFEST, lambda f: f.write(json.dumps(job, indent=1, sort_keys=True).encode()))

    def _name(self, part: Part) -> str:
        return f"part-{part.index:06d}.parquet"

    def _footer(self, part: Part) -> bytes:
        return json.dumps({"index": part.index, "start": part.start, "stop": part.stop}).encode()

    def done(self, part: Part) -> bool:
        name = os.path.join(self.path, self._name(part))
        if not os.path.isfile(name):
            return False
        try:
            meta = self.pa.parquet.read_metadata(name).metadata or {}
        except (self.pa.ArrowException, OSError):
            meta = {}
        if meta.get(PART_KEY) == self._footer(part):
            return True
        os.remove(name)  # not ours or not whole: written again
        return False

    def _atomic(self, name: str, write: Any) -> None:
        temporary = os.path.join(self.path, f".{name}.tmp")
        with open(temporary, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, os.path.join(self.path, name))
        _fsync_dir(self.path)

    def write(self, part: Part, columns: dict[str, np.ndarray], arrays: dict[str, np.ndarray]) -> None:
        pa = self.pa
        table = pa.table({name: _arrow_column(pa, values) for name, values in columns.items()})
        table = table.replace_schema_metadata({PART_KEY: self._footer(part)})
        self._atomic(self._name(part), lambda f: pa.parquet.write_table(table, f))
        self._written += 1

    def written(self) -> int:
        return self._written

    def close(self) -> None:
        self._atomic(SUCCESS, lambda f: None)

    def discard(self) -> None:
        # A folder this run made and wrote no part into: the next run starts afresh without --resume.
        if self._created and os.listdir(self.path) == [MANIFEST]:
            os.remove(os.path.join(self.path, MANIFEST))
            os.rmdir(self.path)


def _difference(before: dict[str, Any], job: dict[str, Any]) -> str:
    for key in sorted(set(before) | set(job)):
        if before.get(key) != json.loads(json.dumps(job.get(key))):
            return f"{key}: {_short(before.get(key))} there, {_short(job.get(key))} now"
    return "?"


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


class NpzResults(Results):
    """One .npz, written (atomically) when the job ends: every part's arrays concatenated."""

    def __init__(self, path: str, resume: bool) -> None:
        if resume:
            raise UsageError("--resume needs a .parquet --out (an .npz is written once, at the end of its job)")
        self.path = path
        self._arrays: dict[str, list[np.ndarray]] = {}

    def write(self, part: Part, columns: dict[str, np.ndarray], arrays: dict[str, np.ndarray]) -> None:
        for name, values in arrays.items():
            self._arrays.setdefault(name, []).append(values.astype(str) if values.dtype == object else values)

    def close(self) -> None:
        folder, name = os.path.split(os.path.abspath(self.path))
        temporary = os.path.join(folder, f".{name}.tmp")
        with open(temporary, "wb") as f:
            arrays: dict[str, Any] = {name: np.concatenate(values) for name, values in self._arrays.items()}
            np.savez(f, **arrays)
        os.replace(temporary, self.path)


def open_results(path: str, job: dict[str, Any], resume: bool) -> Results:
    """The output --out names: a .parquet folder or an .npz file; anything else is a usage error."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"the directory of --out {path!r} does not exist")
    if path.endswith(".parquet"):
        return ParquetParts(path, job, resume)
    if path.endswith(".npz"):
        return NpzResults(path, resume)
    raise UsageError(f"--out {path!r}: its suffix chooses the format, .parquet (a folder of part files, resumable) or .npz (one file, for small jobs)")
