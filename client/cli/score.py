"""`cosserve score`: exact cosine top-k of a query file against a corpus file (.npy or .safetensors),
or a server's shared corpus `@NAME`, via a server."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import struct
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np

from cosserve.client import Client, Session
from cosserve.errors import CosserveError, CosserveRpcError, InvalidArgumentError

__all__ = [
    "CORPUS_BLOB",
    "OUT_SUFFIXES",
    "Corpus",
    "ScorerFactory",
    "SessionScorer",
    "TopKScorer",
    "UsageError",
    "add_arguments",
    "load_inputs",
    "run",
    "session_scorer",
]

CORPUS_BLOB = "corpus"
_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_NEEDS_SERVER = 'an embedded server needs the server extra (torch): pass --server, or install it in a clone of cosserve: python3 -m pip install -e ".[server]" (README, Quickstart)'
_NEEDS_SAFETENSORS = "reading it needs the safetensors package: pip install safetensors (the server extra has it)"
# The suffixes --out may have: the one format written.
OUT_SUFFIXES = (".npz",)
# Queries handed to the scorer at a time: the scoring bar moves once per slice.
_SLICE_BATCHES = 8
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"


class UsageError(InvalidArgumentError):
    """Something wrong with the command's inputs: reported in one line, exit code 2."""


# The corpus a scorer is made for: an (M, D) array (memory-mapped from its file) or "@NAME".
Corpus = np.ndarray | str


class TopKScorer(Protocol):
    """What `cosserve score` scores with: a corpus held somewhere, top-k of query rows against it
    (`cosserve.ShardedScorer` is one)."""

    def top_k(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores (n, k), int64 indices (n, k)) of each row of `queries` (in the corpus dtype when
        the corpus is an array), best first."""
        ...


# The seam of `run`: given the parsed flags (with `queries_width`, the queries' D, added), the
# corpus and a callback for the bytes uploaded, a context manager holding a TopKScorer for the
# corpus (uploaded on entry, freed on exit).
ScorerFactory = Callable[[argparse.Namespace, Corpus, Callable[[int], object]], contextlib.AbstractContextManager[TopKScorer]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--corpus",
        required=True,
        metavar="FILE|@NAME",
        help="(M, D) float16/32/64 matrix: a .npy file, a .safetensors file of one tensor (FILE.safetensors:KEY "
        "for one of several), or @NAME: the --server's shared corpus NAME (nothing is uploaded)",
    )
    parser.add_argument(
        "--queries", required=True, metavar="FILE", help="(N, D) floating .npy or .safetensors file (cast to the corpus dtype)"
    )
    parser.add_argument("--k", type=int, default=10, help="corpus rows kept per query, 1 <= k <= M [default 10]")
    parser.add_argument("--out", required=True, metavar="NPZ", help="write arrays 'scores' (N, k) and 'indices' (N, k) here, an .npz file")
    parser.add_argument("--batch-size", type=int, default=256, help="queries per streamed batch [default 256]")
    parser.add_argument(
        "--server",
        metavar="ADDR[,ADDR...]",
        default=None,
        help="host:port of a running server; several, comma-separated: the corpus is sharded over them "
        "(cosserve.ShardedScorer); default: start one in this process",
    )
    parser.add_argument("--device", default="auto", help="session device: auto, cpu, cuda, cuda:N [default auto]")
    parser.add_argument(
        "--token",
        default=os.environ.get("COSSERVE_AUTH_TOKEN", ""),
        help="bearer token for a server started with one [env COSSERVE_AUTH_TOKEN]",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars of the corpus upload and the scoring on stderr [default: when stderr is a terminal]",
    )


# ---- input files ------------------------------------------------------------------------------


def _file_kind(path: str) -> str:
    """'npy', 'npz', 'safetensors' or 'other', from the file's first bytes (not its name)."""
    with open(path, "rb") as file:
        head = file.read(9)
        size = os.fstat(file.fileno()).st_size
    if head.startswith(_NPY_MAGIC):
        return "npy"
    if head.startswith(_ZIP_MAGIC):
        return "npz"
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


def _load_npy(path: str, what: str) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as err:
        if "pickled" in str(err) or "Python objects" in str(err):  # an object array: it would need unpickling
            raise UsageError(f"{what} file {path!r} holds Python objects (an object .npy); save a float array") from None
        raise UsageError(f"{what} file {path!r} is a damaged .npy file ({err})") from None
    except OSError as err:
        raise UsageError(f"{what} file {path!r} is a damaged .npy file ({err})") from None
    return array


def _load_safetensors(path: str, key: str | None, what: str) -> np.ndarray:
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise UsageError(f"{what} file {path!r} is a .safetensors file; {_NEEDS_SAFETENSORS}") from None
    try:
        with safe_open(path, framework="numpy") as file:
            keys = sorted(file.keys())
            if key is None:
                if len(keys) != 1:
                    shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
                    raise UsageError(
                        f"{what} file {path!r} holds {len(keys)} tensors ({shown or 'none'}); name one as {path}:KEY"
                    )
                key = keys[0]
            if key not in keys:
                raise UsageError(f"{what} file {path!r} has no tensor {key!r}; it has {', '.join(keys[:5])}")
            return np.asarray(file.get_tensor(key))
    except (SafetensorError, OSError, ValueError, TypeError, json.JSONDecodeError) as err:
        if isinstance(err, UsageError):
            raise
        raise UsageError(f"{what} file {path!r} is not a readable .safetensors file ({err})") from None


def _load(path: str, what: str) -> np.ndarray:
    path, key = _split_key(path)
    if not os.path.isfile(path):
        raise UsageError(f"{what} file {path!r} does not exist")
    kind = _file_kind(path)
    if kind == "npy":
        array = _load_npy(path, what)
    elif kind == "safetensors":
        array = _load_safetensors(path, key, what)
    elif kind == "npz":
        raise UsageError(f"{what} file {path!r} is an .npz archive; give one array, as a .npy or a .safetensors file")
    elif path.lower().endswith((".npy", ".safetensors")):  # named as one, but its first bytes are not
        suffix = os.path.splitext(path)[1]
        raise UsageError(f"{what} file {path!r} is a damaged {suffix} file: it does not start as a {suffix} file does")
    else:
        raise UsageError(f"{what} file {path!r} is neither a .npy nor a .safetensors file")
    if array.dtype.newbyteorder("=") not in _FLOAT_DTYPES:
        raise UsageError(f"{what} {path!r} is {array.dtype}; it must be float16, float32 or float64")
    if array.ndim != 2:
        raise UsageError(f"{what} {path!r} has shape {array.shape}; it must be 2-D ({'M' if what == 'corpus' else 'N'}, D)")
    return array


def load_inputs(corpus_path: str, queries_path: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Read both files (.npy memory-mapped) and check them; UsageError with a one-line message otherwise."""
    corpus = _load(corpus_path, "corpus")
    queries = _load(queries_path, "queries")
    _check_fit(corpus.shape, corpus_path, queries, queries_path, k)
    return corpus, queries


def _check_fit(corpus_shape: tuple[int, ...], corpus_name: str, queries: np.ndarray, queries_path: str, k: int) -> None:
    if corpus_shape[1] != queries.shape[1]:
        raise UsageError(
            f"queries have width {queries.shape[1]} ({queries_path}) but the corpus has width {corpus_shape[1]} "
            f"({corpus_name}); widths must match"
        )
    if not 1 <= k <= corpus_shape[0]:
        raise UsageError(f"--k must be between 1 and the {corpus_shape[0]} corpus rows, got {k}")


# ---- the default scorer: one session of one server -------------------------------------------


def _shared_corpus(client: Client, blob: str, queries_width: int, k: int) -> np.dtype:
    """The dtype of the server's shared corpus `@NAME`, checked against the queries' width and k."""
    name = blob[1:]
    corpora = client.corpora()
    found = [c for c in corpora if c.name == name]
    if not found:
        raise UsageError(f"the server has no shared corpus {blob!r}; it has {', '.join('@' + c.name for c in corpora) or 'none'}")
    info = found[0]
    if len(info.shape) != 2 or np.dtype(info.dtype) not in _FLOAT_DTYPES:
        raise UsageError(f"shared corpus {blob!r} is {info.dtype} {info.shape}; it must be a 2-D float16/32/64 matrix")
    if info.shape[1] != queries_width:
        raise UsageError(f"queries have width {queries_width} but {blob} has width {info.shape[1]}; widths must match")
    if not 1 <= k <= info.shape[0]:
        raise UsageError(f"--k must be between 1 and the {info.shape[0]} rows of {blob}, got {k}")
    return np.dtype(info.dtype)


@contextlib.contextmanager
def _server(address: str | None, device: str, corpus_bytes: int) -> Iterator[str]:
    """The given address, or that of a server started in this process for the duration."""
    if address:
        yield address
        return
    try:
        from cosserve.server.edge.app import build_server
        from cosserve.server.settings import Settings
    except ImportError as err:
        raise UsageError(f"{_NEEDS_SERVER} ({err})") from None
    room = max(Settings.max_session_bytes, corpus_bytes + 2**30)
    running = build_server(Settings(host="127.0.0.1", port=0, device=device, max_session_bytes=room))
    try:
        yield running.address
    finally:
        running.stop(0)


class SessionScorer:
    """A corpus blob (or shared corpus) of one session; queries are cast to its dtype and sent in
    batches of `batch_size` over one ScoreTopK stream per call."""

    def __init__(self, session: Session, blob: str, dtype: np.dtype, batch_size: int, timeout: float) -> None:
        self.session, self.blob, self.dtype = session, blob, dtype
        self.batch_size, self.timeout = batch_size, timeout

    def top_k(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n = queries.shape[0]
        starts = range(0, max(1, n), self.batch_size)
        batches = (np.asarray(queries[s : s + self.batch_size], dtype=self.dtype) for s in starts)
        timeout = self.timeout * (1 + len(starts))
        return self.session.top_k(batches, self.blob, k, batch_size=self.batch_size, timeout=timeout)


@contextlib.contextmanager
def session_scorer(ns: argparse.Namespace, corpus: Corpus, uploaded: Callable[[int], object]) -> Iterator[SessionScorer]:
    """The default ScorerFactory: a session of --server (or of a server started here) holding the
    corpus, fed streamed from its memory map."""
    corpus_bytes = 0 if isinstance(corpus, str) else corpus.nbytes
    with _server(ns.server, ns.device, corpus_bytes) as address, Client(address, token=ns.token or None) as client:
        if isinstance(corpus, str):
            dtype, blob = _shared_corpus(client, corpus, ns.queries_width, ns.k), corpus
        else:
            dtype, blob = corpus.dtype, CORPUS_BLOB
        with client.session(ns.device) as session:
            if not isinstance(corpus, str):
                session.feed_blob(CORPUS_BLOB, corpus, progress=uploaded)
            yield SessionScorer(session, blob, dtype, ns.batch_size, client.timeout)


def _servers(ns: argparse.Namespace) -> list[str]:
    """The addresses of --server, split at commas ("" when none is given)."""
    return [a.strip() for a in (ns.server or "").split(",") if a.strip()]


@contextlib.contextmanager
def sharded_scorer(ns: argparse.Namespace, corpus: Corpus, uploaded: Callable[[int], object]) -> Iterator[TopKScorer]:
    """The ScorerFactory of `--server a,b,c`: the corpus's rows split over the servers in
    contiguous ranges (cosserve.ShardedScorer), their top-k merged exactly."""
    from cosserve.sharded import ShardedScorer

    if isinstance(corpus, str):
        raise UsageError(f"--corpus {corpus}: a shared corpus is one server's; give one --server to score against it")
    with ShardedScorer(_servers(ns), device=ns.device, token=ns.token or None) as scorer:
        scorer.feed(corpus, progress=uploaded)
        yield scorer


# ---- the command ------------------------------------------------------------------------------


def _bar(show: bool | None, **kwargs: Any) -> Any:
    from tqdm import tqdm  # a base dependency; imported here so `cosserve serve` does not load it

    # disable=None: shown only when stderr is a terminal; --progress / --no-progress force it.
    return tqdm(file=sys.stderr, disable=None if show is None else not show, dynamic_ncols=True, **kwargs)


class _UploadBar:
    """The corpus upload's bar, started by the first bytes sent: not while a server starts."""

    def __init__(self, show: bool | None, total: int) -> None:
        self.show, self.total = show, total
        self.bar: Any = None

    def __call__(self, nbytes: int) -> None:
        if self.bar is None:
            self.bar = _bar(self.show, total=self.total, unit="B", unit_scale=True, desc="corpus")
        self.bar.update(nbytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(ns: argparse.Namespace, make_scorer: ScorerFactory | None = None) -> int:
    """Score, write the .npz; 0 on success, 2 for bad inputs, 1 when the server refuses.

    `make_scorer` (default `session_scorer`) holds the corpus and scores: the one seam between the
    command and where the corpus lives (one server's session, or several servers' shards)."""
    if make_scorer is None:
        make_scorer = sharded_scorer if len(_servers(ns)) > 1 else session_scorer
    try:
        if ns.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {ns.batch_size}")
        if os.path.splitext(ns.out)[1].lower() not in OUT_SUFFIXES:
            raise UsageError(f"--out {ns.out!r} must end in {' or '.join(OUT_SUFFIXES)}, the format written")
        out_dir = os.path.dirname(os.path.abspath(ns.out))
        if not os.path.isdir(out_dir):
            raise UsageError(f"the directory of --out {ns.out!r} does not exist")
        corpus: Corpus
        if ns.corpus.startswith("@"):
            if not ns.server:
                raise UsageError(f"--corpus {ns.corpus}: a shared corpus is a running server's; pass --server ADDR")
            corpus, queries = ns.corpus, _load(ns.queries, "queries")
        else:
            corpus, queries = load_inputs(ns.corpus, ns.queries, ns.k)
        ns.queries_width = queries.shape[1]
        scores, indices, seconds = _score(ns, make_scorer, corpus, queries)
    except UsageError as err:
        print(f"cosserve score: {err}", file=sys.stderr)
        return 2
    except CosserveRpcError as err:
        print(f"cosserve score: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    except CosserveError as err:
        print(f"cosserve score: {err}", file=sys.stderr)
        return 1
    with open(ns.out, "wb") as f:
        np.savez(f, scores=scores, indices=indices)
    n = queries.shape[0]
    rate = f"{n / seconds:,.0f}" if seconds > 0 else "-"
    print(f"cosserve score: {n} queries, k={ns.k}, {seconds:.2f} s, {rate} queries/s -> {ns.out}", file=sys.stderr)
    return 0


def _score(
    ns: argparse.Namespace, make_scorer: ScorerFactory, corpus: Corpus, queries: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    """Upload, then score slice by slice with the bars; (scores, indices, seconds of scoring)."""
    n = queries.shape[0]
    upload = _UploadBar(ns.progress, 0 if isinstance(corpus, str) else corpus.nbytes)
    try:
        with make_scorer(ns, corpus, upload) as scorer:
            upload.close()
            slice_rows = ns.batch_size * _SLICE_BATCHES
            scores, indices = [], []
            with _bar(ns.progress, total=n, unit="query", desc="scoring") as bar:
                started = time.perf_counter()
                for start in range(0, max(1, n), slice_rows):  # an empty file still asks once, to be checked
                    piece = queries[start : start + slice_rows]
                    if not isinstance(corpus, str):  # queries go in the corpus dtype (@NAME's: the scorer's to know)
                        piece = np.asarray(piece, dtype=corpus.dtype)
                    piece_scores, piece_indices = scorer.top_k(piece, ns.k)
                    scores.append(piece_scores)
                    indices.append(piece_indices)
                    bar.update(piece_scores.shape[0])
                seconds = time.perf_counter() - started
    finally:
        upload.close()
    return np.concatenate(scores), np.concatenate(indices), seconds
