"""`cosserve score`: exact cosine top-k of a .npy query file against a .npy corpus, or a server's
shared corpus `@NAME`, via a server."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from cosserve.client import Client, Session
from cosserve.errors import CosserveRpcError, InvalidArgumentError

__all__ = ["CORPUS_BLOB", "UsageError", "add_arguments", "load_inputs", "run"]

CORPUS_BLOB = "corpus"
_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_NEEDS_SERVER = "an embedded server needs the server extra (torch): pip install 'cosserve[server]', or pass --server"


class UsageError(InvalidArgumentError):
    """Something wrong with the command's inputs: reported in one line, exit code 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--corpus",
        required=True,
        metavar="NPY|@NAME",
        help="(M, D) float16/32/64 .npy file, or @NAME: the --server's shared corpus NAME (nothing is uploaded)",
    )
    parser.add_argument("--queries", required=True, metavar="NPY", help="(N, D) floating .npy file (cast to the corpus dtype)")
    parser.add_argument("--k", type=int, default=10, help="corpus rows kept per query, 1 <= k <= M [default 10]")
    parser.add_argument("--out", required=True, metavar="NPZ", help="write arrays 'scores' (N, k) and 'indices' (N, k) here")
    parser.add_argument("--batch-size", type=int, default=256, help="queries per streamed batch [default 256]")
    parser.add_argument(
        "--server", metavar="ADDR", default=None, help="host:port of a running server; default: start one in this process"
    )
    parser.add_argument("--device", default="auto", help="session device: auto, cpu, cuda, cuda:N [default auto]")
    parser.add_argument(
        "--token",
        default=os.environ.get("COSSERVE_AUTH_TOKEN", ""),
        help="bearer token for a server started with one [env COSSERVE_AUTH_TOKEN]",
    )


def _load(path: str, what: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise UsageError(f"{what} file {path!r} does not exist")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise UsageError(f"{what} file {path!r} is not a readable .npy array ({err})") from None
    if not isinstance(array, np.ndarray):  # an .npz archive
        raise UsageError(f"{what} file {path!r} is not a .npy array")
    if array.dtype.newbyteorder("=") not in _FLOAT_DTYPES:
        raise UsageError(f"{what} {path!r} is {array.dtype}; it must be float16, float32 or float64")
    if array.ndim != 2:
        raise UsageError(f"{what} {path!r} has shape {array.shape}; it must be 2-D ({'M' if what == 'corpus' else 'N'}, D)")
    return array


def load_inputs(corpus_path: str, queries_path: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Memory-map both files and check them; UsageError with a one-line message otherwise."""
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


def _shared_corpus(client: Client, blob: str, queries: np.ndarray, queries_path: str, k: int) -> np.dtype:
    """The dtype of the server's shared corpus `@NAME`, checked against the queries and k."""
    name = blob[1:]
    found = [c for c in client.corpora() if c.name == name]
    if not found:
        raise UsageError(f"the server has no shared corpus {blob!r}; it has {', '.join('@' + c.name for c in client.corpora()) or 'none'}")
    info = found[0]
    if len(info.shape) != 2 or np.dtype(info.dtype) not in _FLOAT_DTYPES:
        raise UsageError(f"shared corpus {blob!r} is {info.dtype} {info.shape}; it must be a 2-D float16/32/64 matrix")
    _check_fit(info.shape, blob, queries, queries_path, k)
    return np.dtype(info.dtype)


@contextlib.contextmanager
def _server(address: str | None, device: str, corpus_bytes: int) -> Iterator[str]:
    """The given address, or that of a server started in this process for the duration."""
    if address:
        yield address
        return
    try:
        from cosserve.server.app import build_server
        from cosserve.server.settings import Settings
    except ImportError as err:
        raise UsageError(f"{_NEEDS_SERVER} ({err})") from None
    room = max(Settings.max_session_bytes, corpus_bytes + 2**30)
    running = build_server(Settings(host="127.0.0.1", port=0, device=device, max_session_bytes=room))
    try:
        yield running.address
    finally:
        running.stop(0)


def _progress(total: int) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    # disable=None: no bar when stderr is not a terminal
    return tqdm(total=total, unit="query", desc="scoring", file=sys.stderr, disable=None)


def _score(
    session: Session, corpus: str, queries: np.ndarray, dtype: np.dtype, k: int, batch_size: int, timeout: float
) -> tuple[np.ndarray, np.ndarray]:
    n = queries.shape[0]
    batches = (np.asarray(queries[s : s + batch_size], dtype=dtype) for s in range(0, max(1, n), batch_size))
    bar = _progress(n)
    scores, indices = [], []
    try:
        for batch_scores, batch_indices in session.iter_top_k(
            batches, corpus, k, batch_size=batch_size, timeout=timeout
        ):
            scores.append(batch_scores)
            indices.append(batch_indices)
            if bar is not None:
                bar.update(batch_scores.shape[0])
    finally:
        if bar is not None:
            bar.close()
    return np.concatenate(scores), np.concatenate(indices)


def run(ns: argparse.Namespace) -> int:
    """Score, write the .npz; 0 on success, 2 for bad inputs, 1 when the server refuses."""
    try:
        if ns.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {ns.batch_size}")
        out_dir = os.path.dirname(os.path.abspath(ns.out))
        if not os.path.isdir(out_dir):
            raise UsageError(f"the directory of --out {ns.out!r} does not exist")
        if ns.corpus.startswith("@"):
            if not ns.server:
                raise UsageError(f"--corpus {ns.corpus}: a shared corpus is a running server's; pass --server ADDR")
            corpus = None
            queries = _load(ns.queries, "queries")
        else:
            corpus, queries = load_inputs(ns.corpus, ns.queries, ns.k)
        corpus_bytes = 0 if corpus is None else corpus.nbytes
        with _server(ns.server, ns.device, corpus_bytes) as address, Client(address, token=ns.token or None) as client:
            dtype = _shared_corpus(client, ns.corpus, queries, ns.queries, ns.k) if corpus is None else corpus.dtype
            with client.session(ns.device) as session:
                if corpus is not None:
                    session.feed_blob(CORPUS_BLOB, corpus)  # streamed in chunks from the memory map
                batches = max(1, -(-queries.shape[0] // ns.batch_size))
                timeout = client.timeout * (1 + batches)
                blob = ns.corpus if corpus is None else CORPUS_BLOB
                scores, indices = _score(session, blob, queries, dtype, ns.k, ns.batch_size, timeout)
    except UsageError as err:
        print(f"cosserve score: {err}", file=sys.stderr)
        return 2
    except CosserveRpcError as err:
        print(f"cosserve score: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    with open(ns.out, "wb") as f:
        np.savez(f, scores=scores, indices=indices)
    return 0
