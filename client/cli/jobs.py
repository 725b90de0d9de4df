"""The jobs of `cosserve score`: topk, pairs and threshold over inputs of any layout
(cosserve.datasets), their results written part by part (cosserve.cli.results). Reading the
files and writing the parts run on threads of their own, so file I/O overlaps the scoring."""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from cosserve.calls import COMPUTE_INPUT_BYTES, RangeResult
from cosserve.cli.results import Part, Results, UsageError, open_results, plan_parts
from cosserve.client import Client, Session
from cosserve.datasets import Batch, Source, open_source
from cosserve.sharded import ShardedScorer

__all__ = ["CORPUS_BLOB", "Prefetch", "Summary", "exact_batches", "run_pairs", "run_threshold", "run_topk"]

CORPUS_BLOB = "corpus"
_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_NEEDS_SERVER = 'an embedded server needs the server extra (torch): pass --server, or install it in a clone of cosserve: python3 -m pip install -e ".[server]" (README, Quickstart)'
# Batches read ahead of the scoring, and parts waiting for the writer.
_READ_AHEAD = 8
_WRITE_BEHIND = 2
# Compute calls in flight at once in a pairs job (per server).
_PAIRS_IN_FLIGHT = 4


@dataclasses.dataclass
class Summary:
    """What the job did, for its one-line summary."""

    rows: int = 0  # rows of the driving input scored by this run
    results: int = 0  # result rows written by this run
    skipped: int = 0  # parts already written (--resume)
    parts: int = 0  # parts written by this run
    seconds: float = 0.0
    note: str = ""


# ---- reading ahead and writing behind -----------------------------------------------------------


def exact_batches(source: Source, start: int, stop: int, rows: int) -> Iterator[Batch]:
    """Batches of exactly `rows` rows (the last may be shorter) over [start, stop): a source's own
    batches end at its files' and row groups' edges."""
    held: list[Batch] = []
    count = 0
    for batch in source.batches(start, stop, rows=rows):
        held.append(batch)
        count += len(batch.ids)
        while count >= rows:
            vectors = np.concatenate([b.vectors for b in held]) if len(held) > 1 else held[0].vectors
            ids = np.concatenate([b.ids for b in held]) if len(held) > 1 else held[0].ids
            first = held[0].start
            yield Batch(first, vectors[:rows], ids[:rows])
            count -= rows
            held = [Batch(first + rows, vectors[rows:], ids[rows:])] if count else []
    if count:
        yield Batch(held[0].start, np.concatenate([b.vectors for b in held]), np.concatenate([b.ids for b in held]))


_END = object()


class Prefetch:
    """Iterates `items` on a thread of its own, `depth` items ahead of the consumer; an error of
    the producer is raised to the consumer. Closing it stops the producer."""

    def __init__(self, items: Iterable[Any], depth: int = _READ_AHEAD, name: str = "cosserve-read") -> None:
        self._queue: queue.Queue[Any] = queue.Queue(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(items,), name=name, daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, items: Iterable[Any]) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
        except BaseException as err:  # noqa: BLE001  (handed to the consumer)
            self._put(_Raised(err))
            return
        self._put(_END)

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, _Raised):
                raise item.error
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclasses.dataclass
class _Raised:
    error: BaseException


class _Writer:
    """Writes parts on a thread of its own, a few behind the scoring; its error is raised by the
    next `put` or by `finish`."""

    def __init__(self, results: Results, summary: Summary) -> None:
        self.results, self.summary = results, summary
        self._queue: queue.Queue[Any] = queue.Queue(_WRITE_BEHIND)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="cosserve-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if self._error is None:
                try:
                    part, columns, arrays = item
                    self.results.write(part, columns, arrays)
                    self.summary.results += len(next(iter(columns.values())))
                    self.summary.parts += 1
                except BaseException as err:  # noqa: BLE001  (raised in the job's thread)
                    self._error = err

    def put(self, part: Part, columns: dict[str, np.ndarray], arrays: dict[str, np.ndarray]) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((part, columns, arrays))

    def finish(self) -> None:
        self._queue.put(_END)
        self._thread.join()
        if self._error is not None:
            raise self._error
        self.results.close()

    def abandon(self) -> None:
        """Stop after the part being written (Ctrl-C, an error): the parts written stay whole."""
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        self._queue.put(_END)
        self._thread.join(timeout=30)


class _Recorded:
    """An iterable handed to grpc that records its own error instead of raising it inside grpc's
    request thread (grpc would log it with a traceback and cancel the call); `check` raises it."""

    def __init__(self, items: Iterable[Any]) -> None:
        self._items = items
        self.error: Exception | None = None

    def __iter__(self) -> Iterator[Any]:
        try:
            yield from self._items
        except Exception as err:  # noqa: BLE001  (raised by check())
            self.error = err

    def check(self) -> None:
        if self.error is not None:
            raise self.error


# ---- inputs and servers -------------------------------------------------------------------------


def open_input(ns: argparse.Namespace, path: str, what: str) -> Source:
    return open_source(path, vector_column=ns.vector_column, id_column=ns.id_column, what=what)


def _check_widths(first: Source, first_name: str, second: Source, second_name: str) -> None:
    if first.dim != second.dim:
        raise UsageError(f"{first_name} has width {first.dim} ({first.path}) but {second_name} has width {second.dim} ({second.path}); widths must match")


def _servers(ns: argparse.Namespace) -> list[str]:
    return [a.strip() for a in (ns.server or "").split(",") if a.strip()]


@contextlib.contextmanager
def _embedded_or_given(ns: argparse.Namespace, corpus_bytes: int) -> Iterator[list[str]]:
    """The --server addresses, or that of a server started in this process for the duration."""
    if _servers(ns):
        yield _servers(ns)
        return
    try:
        from cosserve.server.edge.app import build_server
        from cosserve.server.settings import Settings
    except ImportError as err:
        raise UsageError(f"{_NEEDS_SERVER} ({err})") from None
    room = max(Settings.max_session_bytes, corpus_bytes + 2**30)
    running = build_server(Settings(host="127.0.0.1", port=0, device=ns.device, max_session_bytes=room))
    try:
        yield [running.address]
    finally:
        running.stop(0)


def _check_shared(ns: argparse.Namespace) -> None:
    if not _servers(ns):
        raise UsageError(f"--corpus {ns.corpus}: a shared corpus is a running server's; pass --server ADDR")
    if len(_servers(ns)) > 1:
        raise UsageError(f"--corpus {ns.corpus}: a shared corpus is one server's; give one --server to score against it")


def _shared_corpus(client: Client, blob: str, width: int) -> tuple[np.dtype, int, bool]:
    """(dtype, rows, whether its rows have ids) of the server's shared corpus `@NAME`, checked
    against the queries' width."""
    name = blob[1:]
    corpora = client.corpora()
    found = [c for c in corpora if c.name == name]
    if not found:
        raise UsageError(f"the server has no shared corpus {blob!r}; it has {', '.join('@' + c.name for c in corpora) or 'none'}")
    info = found[0]
    if len(info.shape) != 2 or np.dtype(info.dtype) not in _FLOAT_DTYPES:
        raise UsageError(f"shared corpus {blob!r} is {info.dtype} {info.shape}; it must be a 2-D float16/32/64 matrix")
    if info.shape[1] != width:
        raise UsageError(f"queries have width {width} but {blob} has width {info.shape[1]}; widths must match")
    return np.dtype(info.dtype), int(info.shape[0]), bool(info.id_type)


class _Upload:
    """The corpus upload's progress bar, started by the first bytes sent: not while a server starts."""

    def __init__(self, show: bool | None, total: int) -> None:
        self.show, self.total = show, total
        self.bar: Any = None

    def __call__(self, nbytes: int) -> None:
        if self.bar is None:
            self.bar = progress_bar(self.show, total=self.total, unit="B", unit_scale=True, desc="corpus")
        self.bar.update(nbytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress_bar(show: bool | None, **kwargs: Any) -> Any:
    from tqdm import tqdm  # a base dependency; imported here so `cosserve serve` does not load it

    # disable=None: shown only when stderr is a terminal; --progress / --no-progress force it.
    return tqdm(file=sys.stderr, disable=None if show is None else not show, dynamic_ncols=True, **kwargs)


def _upload(session: Session, corpus: Source, show: bool | None) -> None:
    """The corpus into blob CORPUS_BLOB, read on a thread while the bytes already read are sent."""
    bar = _Upload(show, corpus.rows * corpus.dim * corpus.dtype.itemsize)
    try:
        with Prefetch(b.vectors for b in corpus.batches()) as batches:
            recorded = _Recorded(batches)
            try:
                session.feed_rows(CORPUS_BLOB, corpus.dtype, (corpus.rows, corpus.dim), recorded, progress=bar)
            finally:
                recorded.check()  # a file that failed half-way is the error, not the short stream
    finally:
        bar.close()


class _Corpus:
    """Where the corpus lives for a topk or threshold job: one session's blob, a server's shared
    corpus `@NAME` (whose ids, when it has them, come back with the rows), or a ShardedScorer's
    shards over several servers."""

    def __init__(self, dtype: np.dtype, rows: int, batch_size: int) -> None:
        self.dtype, self.rows, self.batch_size = dtype, rows, batch_size
        self.session: Session | None = None
        self.sharded: ShardedScorer | None = None
        self.blob = CORPUS_BLOB
        self.server_ids = False  # a shared corpus with ids: the replies carry them

    def top_k(self, batches: Iterable[np.ndarray], k: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """(scores, indices, the corpus ids of indices or None) of consecutive query rows."""
        if self.sharded is not None:
            for scores, indices in self.sharded.iter_top_k(batches, k, batch_size=self.batch_size):
                yield scores, indices, None
            return
        assert self.session is not None
        for answer in self.session.iter_top_k(batches, self.blob, k, batch_size=self.batch_size, ids=self.server_ids):
            yield answer[0], answer[1], answer[2] if self.server_ids else None

    def range(self, batches: Iterable[np.ndarray], min_score: float, cap: int | None) -> Iterator[RangeResult]:
        if self.sharded is not None:
            return self.sharded.iter_range_search(batches, min_score, max_per_query=cap, batch_size=self.batch_size)
        assert self.session is not None
        return self.session.iter_range_search(
            batches, self.blob, min_score, max_per_query=cap, ids=self.server_ids, batch_size=self.batch_size
        )


@contextlib.contextmanager
def _corpus_scorer(ns: argparse.Namespace, corpus: Source | str, width: int) -> Iterator[_Corpus]:
    """The corpus uploaded (or named, `@NAME`) where it is scored, for the duration; every
    session opened here is closed on the way out, Ctrl-C included."""
    corpus_bytes = 0 if isinstance(corpus, str) else corpus.rows * corpus.dim * corpus.dtype.itemsize
    token = ns.token or None
    with _embedded_or_given(ns, corpus_bytes) as addresses:
        if len(addresses) > 1:
            array = None if isinstance(corpus, str) else corpus.array()
            if array is None:
                raise UsageError(
                    "several --server shard a corpus read from one .npy or .safetensors file; "
                    "convert it, or publish it on each server and score against @NAME with one --server"
                )
            with ShardedScorer(addresses, device=ns.device, token=token) as sharded:
                bar = _Upload(ns.progress, corpus_bytes)
                try:
                    sharded.feed(array, progress=bar)
                finally:
                    bar.close()
                scorer = _Corpus(array.dtype, array.shape[0], ns.batch_size)
                scorer.sharded = sharded
                yield scorer
            return
        with Client(addresses[0], token=token) as client:
            if isinstance(corpus, str):
                dtype, rows, server_ids = _shared_corpus(client, corpus, width)
                scorer = _Corpus(dtype, rows, ns.batch_size)
                scorer.blob, scorer.server_ids = corpus, server_ids
            else:
                scorer = _Corpus(corpus.dtype, corpus.rows, ns.batch_size)
            with client.session(ns.device) as session:
                if not isinstance(corpus, str):
                    _upload(session, corpus, ns.progress)
                scorer.session = session
                yield scorer


# ---- the part loop ------------------------------------------------------------------------------


Answers = tuple[np.ndarray, ...]
MakePart = Callable[[Part, np.ndarray, Answers], tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]


class _Rows:
    """Results of consecutive rows of the driving input, gathered into whole parts: the scoring
    answers in pieces of its own sizes, and a part is written once the rows of its last batch
    are answered. `empty` is (ids, *answers) with no rows, the shapes of a part without any."""

    def __init__(self, writer: _Writer, make: MakePart, empty: Answers) -> None:
        self.writer, self.make, self.empty = writer, make, empty
        self.pending: collections.deque[tuple[Part, np.ndarray, bool]] = collections.deque()
        self.ids: list[np.ndarray] = []
        self.answers: list[Answers] = []
        self.rows = 0

    def sent(self, part: Part, ids: np.ndarray, last: bool) -> None:
        """Rows with `ids` were sent to be scored; `last`: the last batch of `part`."""
        self.pending.append((part, ids, last))

    def answered(self, *answer: np.ndarray) -> None:
        """`answer`: arrays whose first axis is the next rows answered, in the order sent."""
        at, n = 0, answer[0].shape[0]
        while True:
            while self.pending and len(self.pending[0][1]) == 0:  # batches with no rows need no answer
                part, _, last = self.pending.popleft()
                if last:
                    self._emit(part)
            if at >= n:
                return
            part, ids, last = self.pending[0]
            take = min(len(ids), n - at)
            self.ids.append(ids[:take])
            self.answers.append(tuple(a[at : at + take] for a in answer))
            self.rows += take
            at += take
            if take == len(ids):
                self.pending.popleft()
                if last:
                    self._emit(part)
            else:
                self.pending[0] = (part, ids[take:], last)

    def _emit(self, part: Part) -> None:
        if self.ids:
            ids = np.concatenate(self.ids)
            answers = tuple(np.concatenate([a[i] for a in self.answers]) for i in range(len(self.answers[0])))
        else:
            ids, answers = self.empty[0], self.empty[1:]
        self.writer.put(part, *self.make(part, ids, answers))
        self.ids, self.answers = [], []

    def empty_part(self, part: Part) -> None:
        """A part with no rows at all (the one part of an empty input)."""
        self.sent(part, self.empty[0], True)
        self.answered(*self.empty[1:])


@contextlib.contextmanager
def _job(ns: argparse.Namespace, kind: str, job: dict[str, Any], rows: int, summary: Summary) -> Iterator[tuple[list[Part], _Writer]]:
    """The output opened, the parts still to do, and the writer; the writer finished on success
    and abandoned (its written parts whole) on an error or Ctrl-C."""
    if ns.part_rows < 1:
        raise UsageError(f"--part-rows must be at least 1, got {ns.part_rows}")
    job = {"job": kind, "part_rows": ns.part_rows, **job}
    results = open_results(ns.out, job, ns.resume)
    parts = plan_parts(rows, ns.part_rows)
    todo = [p for p in parts if not results.done(p)]
    summary.skipped = len(parts) - len(todo)
    writer = _Writer(results, summary)
    try:
        yield todo, writer
    except BaseException:
        writer.abandon()
        results.discard()
        raise
    writer.finish()


def _fingerprint(source: Source | str) -> Any:
    if isinstance(source, str):
        return source
    return {"files": source.fingerprint(), "shape": [source.rows, source.dim], "dtype": str(source.dtype), "ids": source.id_kind}


def _last(items: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
    """Each item with whether it is the last."""
    iterator = iter(items)
    held = next(iterator, _END)
    while held is not _END:
        following = next(iterator, _END)
        yield held, following is _END
        held = following


def _part_batches(source: Source, todo: list[Part], rows: int) -> Iterator[tuple[Part, Batch, bool]]:
    """(part, batch, last batch of the part) over the parts to do."""
    for part in todo:
        for batch, last in _last(exact_batches(source, part.start, part.stop, rows)):
            yield part, batch, last


def _empty_ids(source: Source) -> np.ndarray:
    return np.zeros(0, object if source.id_kind == "string" else np.int64)


# ---- topk ---------------------------------------------------------------------------------------


def run_topk(ns: argparse.Namespace, summary: Summary) -> None:
    if ns.k < 1:
        raise UsageError(f"--k must be at least 1, got {ns.k}")
    queries = open_input(ns, ns.queries, "queries")
    corpus: Source | str
    if ns.corpus.startswith("@"):
        _check_shared(ns)
        corpus = ns.corpus
    else:
        corpus = open_input(ns, ns.corpus, "corpus")
        _check_widths(queries, "queries", corpus, "the corpus")
        if ns.k > corpus.rows:
            raise UsageError(f"--k must be between 1 and the {corpus.rows} corpus rows, got {ns.k}")
    job = {"k": ns.k, "corpus": _fingerprint(corpus), "queries": _fingerprint(queries)}
    with _job(ns, "topk", job, queries.rows, summary) as (todo, writer):
        if not todo:
            return
        corpus_ids = None if isinstance(corpus, str) or corpus.id_kind == "row" else corpus.ids()
        with _corpus_scorer(ns, corpus, queries.dim) as scorer:
            if ns.k > scorer.rows:
                raise UsageError(f"--k must be between 1 and the {scorer.rows} rows of {ns.corpus}, got {ns.k}")
            k = ns.k

            def make(part: Part, query_ids: np.ndarray, answers: Answers) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
                scores, indices, found = answers  # found: the server's ids of a shared corpus, else the indices
                if corpus_ids is not None:
                    found = corpus_ids[indices]
                columns = {
                    "query_id": np.repeat(query_ids, k),
                    "rank": np.tile(np.arange(k, dtype=np.int32), len(query_ids)),
                    "corpus_id": found.reshape(-1),
                    "score": scores.reshape(-1),
                }
                arrays = {"scores": scores, "indices": indices}
                if queries.id_kind != "row" or corpus_ids is not None or scorer.server_ids:
                    arrays.update(query_ids=query_ids, corpus_ids=found)
                return columns, arrays

            empty = (_empty_ids(queries), np.zeros((0, k), scorer.dtype), np.zeros((0, k), np.int64), np.zeros((0, k), np.int64))
            rows = _Rows(writer, make, empty)
            bar = progress_bar(ns.progress, total=sum(p.stop - p.start for p in todo), unit="query", desc="scoring")
            with bar, Prefetch(_part_batches(queries, todo, ns.batch_size)) as batches:

                def vectors() -> Iterator[np.ndarray]:
                    for part, batch, last in batches:
                        rows.sent(part, batch.ids, last)
                        yield np.asarray(batch.vectors, dtype=scorer.dtype)

                started = time.perf_counter()
                recorded = _Recorded(vectors())
                try:
                    for scores, indices, found in scorer.top_k(recorded, k):
                        rows.answered(scores, indices, indices if found is None else found)
                        bar.update(scores.shape[0])
                finally:
                    recorded.check()
                for part in todo:
                    if part.stop == part.start:
                        rows.empty_part(part)
                summary.seconds = time.perf_counter() - started
                summary.rows = rows.rows


# ---- pairs --------------------------------------------------------------------------------------


def _join_index(a: Source, b: Source) -> tuple[np.ndarray, np.ndarray]:
    """(B's ids sorted, the B row of each): A's rows find their B row by binary search."""
    if a.id_kind != b.id_kind:
        raise UsageError(f"--a has {a.id_kind} ids but --b has {b.id_kind} ids; rows are joined on ids of one type")
    b_ids = b.ids()
    order = np.argsort(b_ids, kind="stable")
    keys = b_ids[order]
    same = np.flatnonzero(keys[1:] == keys[:-1])
    if len(same):
        twice = keys[same[0]]
        twice = twice.item() if isinstance(twice, np.generic) else twice
        raise UsageError(f"--b's id {twice!r} appears more than once; rows are joined on unique ids")
    return keys, order


PairBatch = tuple[Part, bool, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _pair_batches(a: Source, b: Source, todo: list[Part], rows: int, joined: tuple[np.ndarray, np.ndarray] | None) -> Iterator[PairBatch]:
    """(part, last batch of the part, a ids, b ids, a vectors, b vectors) of consecutive A rows
    and their B rows (the same row numbers, or the B rows of the same ids)."""
    for part in todo:
        if joined is None:  # A and B each read on a thread of its own: decoding Parquet is most of the work
            with Prefetch(exact_batches(a, part.start, part.stop, rows), 2) as xs, Prefetch(exact_batches(b, part.start, part.stop, rows), 2) as ys:
                for (x, y), last in _last(zip(xs, ys)):
                    yield part, last, x.ids, y.ids, x.vectors, y.vectors
            continue
        keys, order = joined
        for x, last in _last(exact_batches(a, part.start, part.stop, rows)):
            at = np.minimum(np.searchsorted(keys, x.ids), max(len(keys) - 1, 0))
            found = keys[at] == x.ids if len(keys) else np.zeros(len(x.ids), bool)
            yield part, last, x.ids[found], x.ids[found], x.vectors[found], b.take(order[at[found]])


def run_pairs(ns: argparse.Namespace, summary: Summary) -> None:
    a, b = open_input(ns, ns.a, "--a"), open_input(ns, ns.b, "--b")
    _check_widths(a, "--a", b, "--b")
    joined = None
    if a.id_kind != "row" and b.id_kind != "row":
        joined = _join_index(a, b)
    elif a.rows != b.rows:
        raise UsageError(f"--a has {a.rows} rows but --b has {b.rows}; aligned pairs need as many rows (or ids in both to join on)")
    dtype = np.result_type(a.dtype, b.dtype)
    # Rows per Compute call: both inputs fit one request message.
    rows = max(1, COMPUTE_INPUT_BYTES // (2 * max(a.dim, 1) * dtype.itemsize))
    job = {"a": _fingerprint(a), "b": _fingerprint(b), "joined": joined is not None}
    with _job(ns, "pairs", job, a.rows, summary) as (todo, writer):
        if not todo:
            return

        def make(part: Part, a_ids: np.ndarray, answers: Answers) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
            columns = {"a_id": a_ids, "b_id": answers[0], "score": answers[1]}
            return columns, columns

        pairs = _Rows(writer, make, (_empty_ids(a), _empty_ids(b), np.zeros(0, dtype)))
        with _embedded_or_given(ns, 0) as addresses, contextlib.ExitStack() as stack:
            clients = [stack.enter_context(Client(address, token=ns.token or None)) for address in addresses]
            width = _PAIRS_IN_FLIGHT * len(clients)
            pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(width, thread_name_prefix="cosserve-pairs"))
            bar = stack.enter_context(progress_bar(ns.progress, total=sum(p.stop - p.start for p in todo), unit="pair", desc="scoring"))
            # Two batches read ahead (each of A and B, and of the pairs): memory is a few batches, whatever the input.
            batches = stack.enter_context(Prefetch(_pair_batches(a, b, todo, rows, joined), 2))
            in_flight: collections.deque[tuple[np.ndarray, concurrent.futures.Future[dict[str, np.ndarray]] | None]] = collections.deque()

            def settle() -> None:
                b_ids, future = in_flight.popleft()
                scores = future.result()["S"] if future is not None else np.zeros(0, dtype)
                pairs.answered(b_ids, scores)
                bar.update(len(b_ids))

            started = time.perf_counter()
            try:
                for i, (part, last, a_ids, b_ids, x, y) in enumerate(batches):
                    pairs.sent(part, a_ids, last)
                    future = None
                    if len(a_ids):
                        inputs = {"X": np.asarray(x, dtype=dtype), "Y": np.asarray(y, dtype=dtype)}
                        future = pool.submit(clients[i % len(clients)].compute, "CosineSimilarity", inputs, ["S"], device=ns.device)
                    in_flight.append((b_ids, future))
                    if len(in_flight) >= width:
                        settle()
                while in_flight:
                    settle()
            finally:
                for _, pending in in_flight:
                    if pending is not None:
                        pending.cancel()
            for part in todo:
                if part.stop == part.start:
                    pairs.empty_part(part)
            summary.seconds = time.perf_counter() - started
            summary.rows = pairs.rows
            if joined is not None:
                summary.note = f", {sum(p.stop - p.start for p in todo) - pairs.rows} rows of --a without a match in --b"


# ---- threshold ----------------------------------------------------------------------------------


def _per_query(result: RangeResult) -> Answers:
    """A RangeResult (CSR) as arrays with one entry per query, which gather into parts as the
    other jobs' rows do: (truncated, the rows of each, their scores, their ids or the rows)."""
    n = len(result)
    pieces = [np.empty(n, object) for _ in range(3)]
    cuts = result.lims[1:-1]
    found = result.ids if result.ids is not None else result.indices
    for column, values in zip(pieces, (result.indices, result.scores, found)):
        for i, piece in enumerate(np.split(values, cuts)):
            column[i] = piece
    return (result.truncated, *pieces)


def run_threshold(ns: argparse.Namespace, summary: Summary) -> None:
    if np.isnan(ns.min_score):
        raise UsageError("--min-score is NaN; give a number (cosines lie in [-1, 1])")
    if ns.max_per_query is not None and ns.max_per_query < 1:
        raise UsageError(f"--max-per-query must be at least 1, got {ns.max_per_query}")
    if ns.self_join == bool(ns.queries):
        raise UsageError("threshold needs --queries, or --self (and no --queries) to score the corpus against itself")
    corpus: Source | str
    if ns.corpus.startswith("@"):
        if ns.self_join:
            raise UsageError(f"--self reads the corpus's rows from its file; give the file, not {ns.corpus}")
        _check_shared(ns)
        corpus = ns.corpus
        queries = open_input(ns, ns.queries, "queries")
    else:
        corpus = open_input(ns, ns.corpus, "corpus")
        queries = corpus if ns.self_join else open_input(ns, ns.queries, "queries")
        _check_widths(queries, "queries", corpus, "the corpus")
    self_join = bool(ns.self_join)
    job = {
        "min_score": ns.min_score,
        "max_per_query": ns.max_per_query,
        "self": self_join,
        "corpus": _fingerprint(corpus),
        "queries": None if self_join else _fingerprint(queries),
    }
    with _job(ns, "threshold", job, queries.rows, summary) as (todo, writer):
        if not todo:
            return
        corpus_ids = None if isinstance(corpus, str) or corpus.id_kind == "row" else corpus.ids()
        truncated_queries = 0
        with _corpus_scorer(ns, corpus, queries.dim) as scorer:

            def make(part: Part, sent: np.ndarray, answers: Answers) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
                nonlocal truncated_queries
                truncated = answers[0]
                rows, scores, found = (list(column) for column in answers[1:])
                if self_join:  # `sent` are row numbers: keep each pair once, from its earlier row
                    keep = [r > row for r, row in zip(rows, sent)]
                    rows = [r[k] for r, k in zip(rows, keep)]
                    scores = [s[k] for s, k in zip(scores, keep)]
                    found = [f[k] for f, k in zip(found, keep)]
                    if ns.max_per_query is not None:
                        truncated = np.array([len(r) > ns.max_per_query for r in rows], bool)
                        rows, scores, found = ([x[: ns.max_per_query] for x in column] for column in (rows, scores, found))
                    query_ids = corpus_ids[sent] if corpus_ids is not None else sent
                else:
                    query_ids = sent
                truncated_queries += int(np.count_nonzero(truncated))
                counts = np.array([len(r) for r in rows], np.int64)
                indices = np.concatenate([np.zeros(0, np.int64), *rows])
                columns = {
                    "query_id": np.repeat(query_ids, counts),
                    "corpus_id": corpus_ids[indices] if corpus_ids is not None else np.concatenate([np.zeros(0, np.int64), *found]),
                    "score": np.concatenate([np.zeros(0, scorer.dtype), *scores]).astype(scorer.dtype, copy=False),
                }
                return columns, columns

            def empty_column() -> np.ndarray:
                return np.empty(0, object)

            sent_ids = np.zeros(0, np.int64) if self_join else _empty_ids(queries)
            rows = _Rows(writer, make, (sent_ids, np.zeros(0, bool), empty_column(), empty_column(), empty_column()))
            bar = progress_bar(ns.progress, total=sum(p.stop - p.start for p in todo), unit="query", desc="scoring")
            with bar, Prefetch(_part_batches(queries, todo, ns.batch_size)) as batches:

                def vectors() -> Iterator[np.ndarray]:
                    for part, batch, last in batches:
                        numbers = np.arange(batch.start, batch.start + len(batch.ids), dtype=np.int64)
                        rows.sent(part, numbers if self_join else batch.ids, last)
                        yield np.asarray(batch.vectors, dtype=scorer.dtype)

                started = time.perf_counter()
                recorded = _Recorded(vectors())
                cap = None if self_join else ns.max_per_query
                try:
                    for result in scorer.range(recorded, ns.min_score, cap):
                        rows.answered(*_per_query(result))
                        bar.update(len(result))
                finally:
                    recorded.check()
                for part in todo:
                    if part.stop == part.start:
                        rows.empty_part(part)
                summary.seconds = time.perf_counter() - started
                summary.rows = rows.rows
        if ns.max_per_query is not None:
            summary.note = f", {truncated_queries} queries cut to --max-per-query {ns.max_per_query}"
