"""ScoreTopK's pipeline: query batches staged ahead of the one being scored, one scoring thread."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from concurrent import futures

import torch

from cosserve.server import tracing
from cosserve.server.compute import similarity
from cosserve.server.state.norm_cache import NormCache
from cosserve.server.state.workspace import Workspace

__all__ = ["Batch", "Scorer"]

# Batches received and staged ahead of the one being scored: enough to hide receiving, decoding
# and (on CUDA) the copy to the device behind compute, few enough that a fast client cannot make
# the server hold many.
PREFETCH_DEPTH = 2


@dataclasses.dataclass
class Batch:
    """One ScoreTopK request, decoded: queries against blob `corpus_name` of `workspace` (or the
    shared corpus `@NAME`), with the cache that holds that corpus's norms."""

    workspace: Workspace
    corpus_name: str
    corpus: torch.Tensor
    queries: torch.Tensor
    k: int
    norms: NormCache | None = None  # None: the workspace's own cache


def _score_attributes(batch: Batch) -> dict[str, tracing.AttributeValue] | None:
    """A scoring pass's span: its queries, k and corpus (by name and rows), never their values."""
    if not tracing.enabled():
        return None
    return {
        "cosserve.queries": int(batch.queries.shape[0]) if batch.queries.dim() else 1,
        "cosserve.k": batch.k,
        "cosserve.corpus": tracing.text(batch.corpus_name),
        "cosserve.corpus.rows": int(batch.corpus.shape[0]) if batch.corpus.dim() else 1,
        "cosserve.session_id": batch.workspace.id,
        "cosserve.callers": 1,  # each ScoreTopK stream scores its own batches
    }


class Scorer:
    """Scores every ScoreTopK stream's batches on one long-lived thread: each batch already uses
    every core, and one thread keeps one OpenMP team and one set of allocator pools."""

    def __init__(self, max_result_bytes: int) -> None:
        self.max_result_bytes = max_result_bytes
        self._thread = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cosserve-score")

    async def score(self, batches: AsyncIterator[Batch]) -> AsyncIterator[tuple[torch.Tensor, torch.Tensor]]:
        """(scores, indices) of each batch, in order; a batch's error arrives after the results of
        the batches before it. Closing the iterator stops the reading of further batches."""
        ready: asyncio.Queue[tuple[Batch | None, BaseException | None]] = asyncio.Queue(maxsize=PREFETCH_DEPTH)

        async def read() -> None:
            try:
                async for batch in batches:
                    batch.queries = similarity.to_device(batch.queries, batch.workspace.device)
                    await ready.put((batch, None))
            except Exception as err:  # noqa: BLE001  (handed to the consumer, in order)
                await ready.put((None, err))
                return
            await ready.put((None, None))

        reader = asyncio.create_task(read())
        loop = asyncio.get_running_loop()
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
                with tracing.span("cosserve.score", _score_attributes(batch)):  # one scoring pass
                    result = await loop.run_in_executor(
                        self._thread,
                        similarity.score_blob,
                        batch.corpus_name,
                        batch.corpus,
                        batch.queries,
                        batch.k,
                        batch.norms if batch.norms is not None else batch.workspace.norms,
                        self.max_result_bytes,
                    )
                batch = None
                yield result  # outside the span: its context is this call's until the next batch
                del result
        finally:
            reader.cancel()

    def shutdown(self) -> None:
        """Drop queued batches and return at once; a batch being scored is abandoned."""
        self._thread.shutdown(wait=False, cancel_futures=True)
