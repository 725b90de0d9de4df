"""`ShardedScorer`: exact cosine top-k over a corpus split across several servers, each holding one
contiguous range of its rows, with the same answer as one server holding all of them."""

from __future__ import annotations

import concurrent.futures
import contextvars
import dataclasses
import queue
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from cosserve import tensors
from cosserve.calls import RangeResult, joined_range, query_batches
from cosserve.client import Client, Session
from cosserve.errors import InvalidArgumentError, ProtocolError, ShapeError

__all__ = ["ShardedScorer", "merge_range", "merge_top_k", "shard_bounds"]


def shard_bounds(rows: int, shards: int) -> list[tuple[int, int]]:
    """[start, stop) of each of `shards` contiguous row ranges covering `rows` rows in order; their
    sizes differ by at most one (the later ones are the larger)."""
    return [(rows * i // shards, rows * (i + 1) // shards) for i in range(shards)]


def merge_top_k(parts: Sequence[tuple[np.ndarray, np.ndarray, int]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top-k of each row over every shard's top-k: `parts` are (scores (n, k_i), indices (n, k_i)
    within the shard, the shard's first global row). Global indices; best first; equal scores by
    the lower index, and NaN before any number, as the server's sort orders them
    (server/compute/similarity.py); scores keep their dtype, indices are int64."""
    scores = np.concatenate([s for s, _, _ in parts], axis=1)
    indices = np.concatenate([i.astype(np.int64) + offset for _, i, offset in parts], axis=1)
    # np.lexsort sorts by its last key first: NaN or not, then the score descending, then the index.
    order = np.lexsort((indices, -scores, ~np.isnan(scores)), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(indices, order, axis=1)


def merge_range(parts: Sequence[tuple[RangeResult, int]], max_per_query: int | None = None) -> RangeResult:
    """Every shard's range results for the same queries as one: `parts` are (a shard's RangeResult,
    its first global row). Global indices, each query's rows by (-score, index) as the server
    orders them, cut to `max_per_query` (truncated where a shard was, or the cut dropped rows)."""
    n = len(parts[0][0])
    if any(len(result) != n for result, _ in parts):
        raise ProtocolError(f"servers answered different numbers of query rows: {[len(r) for r, _ in parts]}")
    query = np.concatenate([np.repeat(np.arange(n), np.diff(r.lims)) for r, _ in parts])
    indices = np.concatenate([r.indices + offset for r, offset in parts])
    scores = np.concatenate([r.scores for r, _ in parts])
    # np.lexsort sorts by its last key first: the query, then the score descending, then the index.
    order = np.lexsort((indices, -scores, query))
    counts = np.bincount(query, minlength=n)
    truncated = np.logical_or.reduce([r.truncated for r, _ in parts])
    if max_per_query is not None:
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        keep = np.arange(order.shape[0]) - starts[query[order]] < max_per_query
        order = order[keep]
        truncated = truncated | (counts > max_per_query)
        counts = np.minimum(counts, max_per_query)
    lims = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return RangeResult(lims, indices[order], scores[order], truncated)


@dataclasses.dataclass
class _Shard:
    session: Session
    start: int  # the shard's first row in the whole corpus
    rows: int


class ShardedScorer:
    """A corpus too large for one server, split across several: `feed` gives each server (a
    replica, addressed directly, not through a balancer) one contiguous range of its rows, and
    `top_k` sends every query batch to all of them at once and merges their answers exactly.

    Args:
        addresses: "host:port" of each server, in order (a list, or one string "a,b,c").
        device: device of the sessions ("auto", "cpu", "cuda", "cuda:N").
        blob: the name the corpus range takes in each server's session.
        client_options: passed to every `Client` (timeout, token, TLS options, ...).
    """

    def __init__(self, addresses: Sequence[str] | str, *, device: str = "auto", blob: str = "corpus", **client_options: Any) -> None:
        if isinstance(addresses, str):
            addresses = [a.strip() for a in addresses.split(",") if a.strip()]
        if not addresses:
            raise InvalidArgumentError("ShardedScorer needs the address of at least one server")
        self.addresses = list(addresses)
        self.device = device
        self.blob = blob
        self._clients = [Client(address, **client_options) for address in self.addresses]
        self._shards: list[_Shard] = []
        self.rows = 0  # rows of the corpus fed
        self.dtype: np.dtype | None = None

    def __enter__(self) -> ShardedScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the sessions (freeing the corpus on every server) and the channels."""
        try:
            self._close_sessions()
        finally:
            for client in self._clients:
                client.close()

    def _close_sessions(self) -> None:
        shards, self._shards, self.rows, self.dtype = self._shards, [], 0, None
        for shard in shards:
            shard.session.close()

    # ---- feeding -------------------------------------------------------------------------

    def feed(self, corpus: Any, progress: bool | None | Callable[[int], object] = None) -> None:
        """Give server i rows [M*i/n, M*(i+1)/n) of the (M, D) `corpus` (numpy, torch or memory-
        mapped: each range is streamed from it, never copied whole), all servers at once. Replaces
        a corpus fed before. `progress`: a tqdm bar of the bytes sent, on stderr (None: when
        stderr is a terminal), or a function called with the bytes of each piece sent."""
        array = tensors.as_numpy(corpus)
        if array.ndim != 2:
            raise ShapeError(f"the corpus must be 2-D (M, D), got shape {array.shape}")
        self._close_sessions()
        ranges = [(client, start, stop) for client, (start, stop) in zip(self._clients, shard_bounds(array.shape[0], len(self._clients)))]
        ranges = [r for r in ranges if r[2] > r[1]]  # fewer rows than servers: some get none
        report, bar = (progress, None) if callable(progress) else (None, _bar(array.nbytes, progress))
        lock = threading.Lock()

        def sent(nbytes: int) -> None:
            with lock:  # pieces of every shard are reported from grpc's threads
                if report is not None:
                    report(nbytes)
                elif bar is not None:
                    bar.update(nbytes)

        def feed_one(client: Client, start: int, stop: int) -> _Shard:
            session = client.session(self.device)
            try:
                session.feed_blob(self.blob, array[start:stop], progress=sent)
            except BaseException:
                session.close()
                raise
            return _Shard(session, start, stop - start)

        shards: list[_Shard] = []
        try:
            with concurrent.futures.ThreadPoolExecutor(max(1, len(ranges)), thread_name_prefix="cosserve-feed") as pool:
                futures = [pool.submit(feed_one, *r) for r in ranges]
                failure: BaseException | None = None
                for future in futures:  # every feed finished or failed: none is left running
                    try:
                        shards.append(future.result())
                    except BaseException as err:  # noqa: BLE001  (raised below, after the others)
                        failure = failure or err
            if failure is not None:
                for shard in shards:
                    shard.session.close()
                raise failure
        finally:
            if bar is not None:
                bar.close()
        self._shards, self.rows, self.dtype = shards, array.shape[0], array.dtype

    # ---- scoring -------------------------------------------------------------------------

    def top_k(
        self, queries: Any, k: int = 10, *, batch_size: int = 256, timeout: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact cosine top-k of each query row among all the corpus's rows: (scores (N, k) in the
        corpus dtype, int64 global row indices (N, k)), best first, ties to the lower index: the
        same answer as `Session.top_k` of one server holding the whole corpus. `queries` as for
        `Session.top_k` (in the corpus dtype); `timeout` as there, for each server's stream."""
        scores, indices = [], []
        for batch_scores, batch_indices in self.iter_top_k(queries, k, batch_size=batch_size, timeout=timeout):
            scores.append(batch_scores)
            indices.append(batch_indices)
        if not scores:
            return np.empty((0, k), self.dtype or np.float32), np.empty((0, k), np.int64)
        return np.concatenate(scores), np.concatenate(indices)

    def iter_top_k(
        self, queries: Any, k: int = 10, *, batch_size: int = 256, timeout: float | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Like `top_k`, but yields (scores, indices) of consecutive query rows as every server has
        answered them, in order."""
        if not self._shards:
            raise InvalidArgumentError("ShardedScorer: feed a corpus first")
        if not 1 <= k <= self.rows:
            raise InvalidArgumentError(f"k must be between 1 and the corpus's {self.rows} rows, got {k}")
        batches, count = query_batches(queries, batch_size)  # checked once, read by every server
        shared = _Tee(batches, len(self._shards))
        stop = threading.Event()
        answers: list[queue.Queue[Any]] = [queue.Queue(_QUEUED_ANSWERS) for _ in self._shards]
        pumps = []
        for i, shard in enumerate(self._shards):
            # Each server keeps the best min(k, its rows) of its range: the global best k are among them.
            if timeout is None and count is not None:  # as Session.top_k's default for a known count
                timeout = shard.session.client.timeout * (1 + count)
            stream = shard.session.iter_top_k(shared.reader(i), self.blob, min(k, shard.rows), batch_size=batch_size, timeout=timeout)
            # Each pump in a copy of the caller's context: its calls continue the caller's trace.
            pump_args = (_pump, stream, answers[i], stop)
            pumps.append(
                threading.Thread(target=contextvars.copy_context().run, args=pump_args, name=f"cosserve-shard-{i}", daemon=True)
            )
        for pump in pumps:  # every server scores at once
            pump.start()
        # A server's answer comes in messages of its own row counts (they depend on its k): rows
        # are merged once every server has answered them.
        pending: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in pumps]
        buffered = [0] * len(pumps)
        finished = [False] * len(pumps)
        try:
            while True:
                ready = min(buffered)
                if ready:
                    parts = [(*_take(pending[i], ready), shard.start) for i, shard in enumerate(self._shards)]
                    buffered = [b - ready for b in buffered]
                    yield merge_top_k(parts, k)
                    continue
                if all(finished):
                    break
                for i in range(len(pumps)):
                    if buffered[i] == 0 and not finished[i]:
                        # Bounded: the server's stream ends by its deadline at the latest.
                        answer = answers[i].get()
                        if answer is _END:
                            finished[i] = True
                        elif isinstance(answer, BaseException):
                            raise answer
                        else:
                            pending[i].append(answer)
                            buffered[i] += answer[0].shape[0]
                if all(finished) and any(buffered):
                    raise ProtocolError(f"servers answered different numbers of query rows: {buffered}")  # a reply we cannot use
        finally:
            stop.set()
            for pump in pumps:
                pump.join(timeout=5)


    def range_search(
        self, queries: Any, min_score: float | None = None, *, max_per_query: int | None = None, batch_size: int = 256,
        timeout: float | None = None,
    ) -> RangeResult:  # fmt: skip
        """For each query row, every row of the whole corpus with cosine >= `min_score`, with
        global row indices: the same `RangeResult` as `Session.range_search` of one server holding
        the whole corpus (see there for `max_per_query`)."""
        results = list(self.iter_range_search(queries, min_score, max_per_query=max_per_query, batch_size=batch_size, timeout=timeout))
        return joined_range(results, self.dtype or np.float32)

    def iter_range_search(
        self, queries: Any, min_score: float | None = None, *, max_per_query: int | None = None, batch_size: int = 256,
        timeout: float | None = None,
    ) -> Iterator[RangeResult]:  # fmt: skip
        """Like `range_search`, but yields the `RangeResult` of consecutive query rows as every
        server has answered them, in order."""
        if not self._shards:
            raise InvalidArgumentError("ShardedScorer: feed a corpus first")

        def stream(session: Session, batches: Iterator[np.ndarray], timeout: float | None) -> Iterator[RangeResult]:
            return session.iter_range_search(
                batches, self.blob, min_score, max_per_query=max_per_query, ids=False, batch_size=batch_size, timeout=timeout
            )

        # Every server splits each batch into the same messages (by rows and bytes alone), so
        # their answers pair up one to one.
        for answers in self._scatter(queries, batch_size, timeout, stream):
            yield merge_range([(answer, shard.start) for answer, shard in zip(answers, self._shards)], max_per_query)

    def _scatter(
        self, queries: Any, batch_size: int, timeout: float | None, stream: Callable[[Session, Iterator[np.ndarray], float | None], Iterator[Any]]
    ) -> Iterator[list[Any]]:
        """Each server's next answer, together, from one `stream` per server over the same query
        batches (read once), all servers at once; ProtocolError if one answers more than another."""
        batches, count = query_batches(queries, batch_size)
        shared = _Tee(batches, len(self._shards))
        stop = threading.Event()
        answers: list[queue.Queue[Any]] = [queue.Queue(_QUEUED_ANSWERS) for _ in self._shards]
        pumps = []
        for i, shard in enumerate(self._shards):
            if timeout is None and count is not None:
                timeout = shard.session.client.timeout * (1 + count)
            pumps.append(threading.Thread(
                target=_pump, args=(stream(shard.session, shared.reader(i), timeout), answers[i], stop),
                name=f"cosserve-shard-{i}", daemon=True,
            ))  # fmt: skip
        for pump in pumps:
            pump.start()
        try:
            while True:
                got = [queue_.get() for queue_ in answers]  # bounded: each stream ends by its deadline at the latest
                for answer in got:
                    if isinstance(answer, BaseException):
                        raise answer
                ended = [answer is _END for answer in got]
                if all(ended):
                    return
                if any(ended):
                    raise ProtocolError("servers answered different numbers of messages")
                yield got
        finally:
            stop.set()
            for pump in pumps:
                pump.join(timeout=5)


# Answers of one server held until the other servers have answered the same rows.
_QUEUED_ANSWERS = 16
_END = object()


def _pump(stream: Iterator[tuple[np.ndarray, np.ndarray]], out: queue.Queue[Any], stop: threading.Event) -> None:
    """Move one server's answers into `out`, then _END (or the error it raised), until `stop`."""

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        for answer in stream:
            if not put(answer):
                return
        put(_END)
    except BaseException as err:  # noqa: BLE001  (raised by the reader of `out`)
        put(err)
    finally:
        stream.close()  # type: ignore[attr-defined]


def _take(pending: list[tuple[np.ndarray, np.ndarray]], rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `rows` rows of the pending answers, removed from them."""
    scores, indices = [], []
    while rows:
        s, i = pending[0]
        if s.shape[0] <= rows:
            pending.pop(0)
        else:
            pending[0] = (s[rows:], i[rows:])
            s, i = s[:rows], i[:rows]
        scores.append(s)
        indices.append(i)
        rows -= s.shape[0]
    return np.concatenate(scores), np.concatenate(indices)


class _Tee:
    """One iterator of query batches read by several streams, each batch drawn once: a batch is
    kept until every reader has taken it (readers run in grpc's threads, at their servers' pace,
    so at most the batches between the slowest and the fastest server are held)."""

    def __init__(self, source: Iterator[np.ndarray], readers: int) -> None:
        self._source = source
        self._lock = threading.Lock()
        self._batches: dict[int, np.ndarray] = {}
        self._taken: dict[int, int] = {}  # batch number -> readers that took it
        self._readers = readers
        self._drawn = 0
        self._done = False

    def reader(self, index: int) -> Iterator[np.ndarray]:
        number = 0
        while True:
            with self._lock:
                if number == self._drawn:
                    if self._done:
                        return
                    try:
                        self._batches[number] = next(self._source)
                    except StopIteration:
                        self._done = True
                        return
                    self._taken[number] = 0
                    self._drawn += 1
                batch = self._batches[number]
                self._taken[number] += 1
                if self._taken[number] == self._readers:
                    del self._batches[number], self._taken[number]
            yield batch
            number += 1


def _bar(total: int, progress: bool | None) -> Any:
    if progress is False:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # a base dependency, but a bar is not worth failing for
        return None
    # disable=None: no bar when stderr is not a terminal, unless asked for
    return tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="feeding corpus", file=sys.stderr,
        disable=None if progress is None else False,
    )  # fmt: skip
