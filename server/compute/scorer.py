"""ScoreTopK's scoring: the batches of every stream that wait at the same time for the same corpus
are scored together, in one pass over the corpus, on one thread."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence

import torch

from cosserve.server import tracing
from cosserve.server.compute import similarity
from cosserve.server.compute.numerics import compute_dtype
from cosserve.server.compute.workers import Stopped
from cosserve.server.errors import ResourceExhausted
from cosserve.server.memory import is_out_of_memory
from cosserve.server.state.norm_cache import NormCache
from cosserve.server.state.workspace import Reservation, Workspace

__all__ = ["Batch", "PassObserver", "Scorer"]

# Batches received and staged ahead of the one being scored: enough to hide receiving, decoding
# and (on CUDA) the copy to the device behind compute, few enough that a fast client cannot make
# the server hold many. Each is charged to its session while it is held.
PREFETCH_DEPTH = 2

# Told of every pass: the queries it scored and, for each batch in it, the seconds it waited.
PassObserver = Callable[[int, Sequence[float]], None]


@dataclasses.dataclass(eq=False)
class Batch:
    """One ScoreTopK request, decoded: queries against blob `corpus_name` of `workspace` (or the
    shared corpus `@NAME`), with the cache that holds that corpus's norms."""

    workspace: Workspace
    corpus_name: str
    corpus: torch.Tensor
    queries: torch.Tensor
    k: int
    norms: NormCache | None = None  # None: the workspace's own cache
    deadline: float | None = None  # time.monotonic() after which its queries are not scored
    charge: Reservation | None = None  # its queries and results, charged to the session while held

    def release(self) -> None:
        if self.charge is not None:
            self.charge.release()
            self.charge = None


def batch_bytes(batch: Batch) -> int:
    """What a batch holds from staging until its reply is sent: the queries as received, as
    normalized for the pass, its rows' candidates in the pass and the result."""
    n, d = batch.queries.shape if batch.queries.dim() == 2 else (0, 0)
    result = n * batch.k * (batch.corpus.element_size() + 8)
    return batch.queries.numel() * batch.queries.element_size() + n * d * compute_dtype(batch.corpus.dtype).itemsize + 2 * result


def _score_attributes(batch: Batch) -> dict[str, tracing.AttributeValue] | None:
    """A scoring span: its queries, k and corpus (by name and rows), never their values; the
    callers its pass scored together are set when it is done."""
    if not tracing.enabled():
        return None
    return {
        "cosserve.queries": int(batch.queries.shape[0]) if batch.queries.dim() else 1,
        "cosserve.k": batch.k,
        "cosserve.corpus": tracing.text(batch.corpus_name),
        "cosserve.corpus.rows": int(batch.corpus.shape[0]) if batch.corpus.dim() else 1,
        "cosserve.session_id": batch.workspace.id,
    }


@dataclasses.dataclass(eq=False)
class _Waiting:
    """A batch in the queue: its rows go into passes (several, when it has more than its share of
    one) until every row is scored; `future` gets the result on the batch's event loop."""

    batch: Batch
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[tuple[torch.Tensor, torch.Tensor]]
    queued_at: float
    normalized: torch.Tensor | None = None
    next_row: int = 0  # rows before it are in a pass that started
    pieces: list[tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=list)
    dropped: bool = False  # its caller left: never scored again, its result thrown away
    callers: int = 0  # batches in the last pass that scored rows of it

    @property
    def key(self) -> int:
        return id(self.batch.corpus)  # the tensor itself: the queue holds it alive

    @property
    def rows_left(self) -> int:
        return int(self.batch.queries.shape[0]) - self.next_row


class Scorer:
    """Scores the batches of every ScoreTopK stream on one long-lived thread (each pass already uses
    every core; one thread keeps one OpenMP team and one set of allocator pools).

    Batches that wait at the same time for the same corpus tensor (a shared `@NAME`, or one
    session's blob), from any stream, session or identity, are scored in one pass: the corpus is
    read once for all of them, and each gets the result it would get alone, bit for bit
    (similarity.top_k_pass). Opportunistic: an idle scorer starts at once, and what queues during a
    pass goes into the next. A pass holds at most `pass_queries` queries, shared fairly: each
    waiting batch gets an equal share, round after round, and a batch larger than its share goes
    on in later passes, behind the others. With `max_queue_delay_s`, a pass that is not full waits
    up to that long after its oldest batch arrived for more.
    """

    def __init__(
        self,
        max_result_bytes: int,
        pass_queries: int = 1024,
        max_queue_delay_s: float = 0.0,
        observe_pass: PassObserver | None = None,
    ) -> None:
        self.max_result_bytes = max_result_bytes
        self.pass_queries = max(1, pass_queries)
        self.max_queue_delay_s = max_queue_delay_s
        self.observe_pass = observe_pass
        self._ready = threading.Condition()
        self._waiting: list[_Waiting] = []  # in order of arrival, batches served in part at the back
        self._closed = False
        self._thread: threading.Thread | None = None

    # ---- the event loop's side -------------------------------------------------------------

    async def score(self, batches: AsyncIterator[Batch]) -> AsyncIterator[tuple[torch.Tensor, torch.Tensor]]:
        """(scores, indices) of each batch, in order; a batch's error arrives after the results of
        the batches before it. Closing the iterator stops the reading of further batches, and
        takes its batch out of the queue if its pass has not started."""
        ready: asyncio.Queue[tuple[Batch | None, BaseException | None]] = asyncio.Queue(maxsize=PREFETCH_DEPTH)

        async def read() -> None:
            try:
                async for batch in batches:
                    try:
                        similarity.check_batch(batch.corpus_name, batch.corpus, batch.queries, batch.k, self.max_result_bytes)
                        # Charged before anything more is allocated for it, held until its reply is sent.
                        batch.charge = batch.workspace.hold(batch_bytes(batch), "ScoreTopK: a batch of queries and its results")
                        batch.queries = similarity.to_device(batch.queries, batch.workspace.device)
                        await ready.put((batch, None))
                    except BaseException:
                        batch.release()
                        raise
            except Exception as err:  # noqa: BLE001  (handed to the consumer, in order)
                await ready.put((None, err))
                return
            await ready.put((None, None))

        reader = asyncio.create_task(read())
        batch: Batch | None = None
        try:
            while True:
                batch, failure = await ready.get()
                if batch is None:
                    if failure is None:
                        return
                    try:
                        raise failure
                    finally:
                        failure = None  # no cycle through this frame
                # The span covers the batch's wait for its pass and the pass; it names how many
                # batches (callers) that pass scored together.
                with tracing.span("cosserve.score", _score_attributes(batch)) as span:
                    result = await self._scored(batch, span)
                yield result  # outside the span: its context is this call's until the next batch
                batch.release()  # the reply is on its way: its bytes are grpc's now
                batch = None
                del result
        finally:
            reader.cancel()
            if batch is not None:
                batch.release()
            while not ready.empty():  # staged, never scored
                staged, _ = ready.get_nowait()
                if staged is not None:
                    staged.release()

    async def _scored(self, batch: Batch, span: tracing.Span) -> tuple[torch.Tensor, torch.Tensor]:
        if batch.queries.shape[0] == 0:
            empty = batch.queries.shape[0], batch.k
            device = batch.queries.device
            return torch.empty(empty, dtype=batch.corpus.dtype, device=device), torch.empty(empty, dtype=torch.int64, device=device)
        loop = asyncio.get_running_loop()
        waiting = _Waiting(batch, loop, loop.create_future(), time.monotonic())
        with self._ready:
            if self._closed:
                raise RuntimeError("the scorer is shut down")
            self._waiting.append(waiting)
            self._ready.notify()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="cosserve-score", daemon=True)
                self._thread.start()
        try:
            result = await waiting.future
            span.set_attribute("cosserve.callers", waiting.callers)
            return result
        finally:
            if not waiting.future.done():  # cancelled, or its deadline passed: leave the queue
                self._drop(waiting)

    def _drop(self, waiting: _Waiting) -> None:
        with self._ready:
            waiting.dropped = True
            if waiting in self._waiting:
                self._waiting.remove(waiting)

    def shutdown(self) -> None:
        """Drop queued batches (after the server has stopped: nobody waits for them); an idle
        scoring thread ends at once, a pass being scored is abandoned to finish on its own."""
        with self._ready:
            self._closed = True
            dropped, self._waiting = self._waiting, []
            self._ready.notify_all()
            thread = self._thread
        for waiting in dropped:
            _settle(waiting, error=RuntimeError("the server is stopping"))
        if thread is not None:
            thread.join(0.5)  # an idle scorer ends at once; one in a pass is left to finish it

    # ---- the scoring thread ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._ready:
                members = self._next_pass()
                if members is None:
                    return
            if isinstance(members, torch.Tensor):  # a corpus shape not seen yet: check it first
                self._check(members)
            elif members:
                self._score(members)
            members = None  # hold no batch (nor its corpus) while waiting for the next

    def _check(self, corpus: torch.Tensor) -> None:
        """similarity.shares_passes for a new corpus shape; if the check itself fails, the
        batches waiting for that corpus get the error (the thread must go on)."""
        try:
            similarity.shares_passes(corpus)
        except Exception as err:  # noqa: BLE001  (each caller gets it)
            with self._ready:
                failed = [w for w in self._waiting if w.batch.corpus is corpus]
                for waiting in failed:
                    self._waiting.remove(waiting)
            for waiting in failed:
                _settle(waiting, error=err)

    def _next_pass(self) -> list[tuple[_Waiting, int, int]] | torch.Tensor | None:
        """The next pass's (batch, first row, end row)s, [] to look again, a corpus whose shape
        must be checked first (similarity.shares_passes), None once shut down (lock held)."""
        while not self._closed and not self._waiting:
            self._ready.wait()
        if self._closed:
            return None
        now = time.monotonic()
        for waiting in [w for w in self._waiting if w.batch.deadline is not None and now >= w.batch.deadline]:
            self._waiting.remove(waiting)
            waiting.dropped = True
            _settle(waiting, error=Stopped("the deadline passed before the batch was scored"))
        if not self._waiting:
            return []
        key = self._waiting[0].key
        group = [w for w in self._waiting if w.key == key]
        if self.max_queue_delay_s > 0 and sum(w.rows_left for w in group) < self.pass_queries:
            due = self._waiting[0].queued_at + self.max_queue_delay_s
            if now < due:
                self._ready.wait(due - now)
                return []
        shared = similarity.shares_passes(group[0].batch.corpus, check=False)
        if shared is None:
            return group[0].batch.corpus
        shares = dict.fromkeys(group, 0)
        budget = self.pass_queries
        # A batch's rows go into several passes only where rows score the same in any tile;
        # otherwise whole batches, in order.
        if not shared:
            for w in group:
                if budget <= 0 and any(shares.values()):
                    break
                shares[w] = w.rows_left
                budget -= w.rows_left
            budget = 0
        while budget:  # rounds of equal shares, until the pass is full or every row is in it
            active = [w for w in group if w.rows_left > shares[w]]
            if not active:
                break
            quantum = max(1, budget // len(active))
            for w in active:
                take = min(quantum, w.rows_left - shares[w], budget)
                shares[w] += take
                budget -= take
                if not budget:
                    break
        members = []
        for w, rows in shares.items():
            if rows:
                members.append((w, w.next_row, w.next_row + rows))
                w.next_row += rows
                self._waiting.remove(w)
                if w.rows_left:
                    self._waiting.append(w)  # the rest waits behind the others
        return members

    def _score(self, members: list[tuple[_Waiting, int, int]]) -> None:
        started = time.monotonic()
        first = members[0][0].batch
        try:
            norms = first.norms if first.norms is not None else first.workspace.norms
            inv_norms = norms.get(first.corpus, similarity.inverse_norms)
            ct = compute_dtype(first.corpus.dtype)
            for waiting, _, _ in members:
                if waiting.normalized is None:  # the whole batch at once, as it would be alone
                    waiting.normalized = similarity.normalized(waiting.batch.queries, ct)
            parts = [(w.normalized[start:end], w.batch.k) for w, start, end in members if w.normalized is not None]
            results = similarity.top_k_pass(first.corpus, inv_norms, parts)
        except Exception as err:  # noqa: BLE001  (each caller gets it)
            failure: BaseException = err
            if is_out_of_memory(err):
                failure = ResourceExhausted(f"ScoreTopK: out of memory: {err}")
            with self._ready:
                for waiting, _, _ in members:
                    if waiting in self._waiting:
                        self._waiting.remove(waiting)
            for waiting, _, _ in members:
                _settle(waiting, error=failure)
            return
        if self.observe_pass is not None:
            self.observe_pass(sum(end - start for _, start, end in members), [started - w.queued_at for w, _, _ in members])
        for (waiting, _, end), result in zip(members, results):
            waiting.callers = len(members)
            waiting.pieces.append(result)
            if end == waiting.batch.queries.shape[0]:
                pieces, waiting.pieces = waiting.pieces, []
                if len(pieces) == 1:
                    _settle(waiting, result=pieces[0])
                else:
                    _settle(waiting, result=(torch.cat([s for s, _ in pieces]), torch.cat([i for _, i in pieces])))
            else:
                waiting.queued_at = time.monotonic()  # its next share waits from now


def _settle(
    waiting: _Waiting,
    result: tuple[torch.Tensor, torch.Tensor] | None = None,
    error: BaseException | None = None,
) -> None:
    """Hand a batch its result or error on its event loop (from any thread)."""

    def settle() -> None:
        if waiting.future.done():
            return
        if error is not None:
            waiting.future.set_exception(error)
        elif result is not None:
            waiting.future.set_result(result)

    if waiting.dropped and error is None:
        return
    try:
        waiting.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # its loop is closed: nobody waits
        pass
