"""The compute layer's threads without a server: Workers inline or on a thread, the Scorer's
order and errors, and request ids on the work threads."""

from __future__ import annotations

import asyncio
import threading

import pytest

torch = pytest.importorskip("torch")

from cosserve.server import errors
from cosserve.server.compute.scorer import Batch, Scorer  # noqa: E402
from cosserve.server.compute.workers import Workers  # noqa: E402
from cosserve.server.state.workspace import Workspace  # noqa: E402


def test_workers_run_small_work_inline_and_large_work_on_a_thread():
    workers = Workers(threads=2, inline_bytes=100)
    loop_thread: list[threading.Thread] = []

    async def main() -> tuple[str, str]:
        loop_thread.append(threading.current_thread())
        small = await workers.run(100, lambda: threading.current_thread().name)
        large = await workers.run(101, lambda: threading.current_thread().name)
        return small, large

    try:
        small, large = asyncio.run(main())
    finally:
        workers.shutdown()
    assert small == loop_thread[0].name
    assert large.startswith("cosserve-work")


def test_the_scorer_gives_results_in_order_then_the_error_of_a_bad_batch():
    ws = Workspace("s", torch.device("cpu"), 1 << 20)
    corpus = torch.eye(4, dtype=torch.float32)
    ws.put("C", corpus)
    scorer = Scorer(max_result_bytes=1 << 20)

    async def batches():
        for row in (2, 0):
            yield Batch(ws, "C", corpus, corpus[row : row + 1].clone(), 1)
        raise errors.NotFound("blob 'gone' is not in session s")

    async def main() -> tuple[list[int], BaseException | None]:
        got: list[int] = []
        try:
            async for _scores, indices in scorer.score(batches()):
                got.append(int(indices[0, 0]))
        except errors.NotFound as err:
            return got, err
        return got, None

    try:
        got, failure = asyncio.run(main())
    finally:
        scorer.shutdown()
    assert got == [2, 0]
    assert isinstance(failure, errors.NotFound)




def test_work_on_a_thread_sees_its_calls_request_id():
    from cosserve.server.edge.observability import REQUEST_ID

    workers = Workers(threads=1, inline_bytes=0)

    async def call(request_id: str) -> tuple[str, str]:
        REQUEST_ID.set(request_id)
        return await workers.run(1, lambda: (threading.current_thread().name, REQUEST_ID.get()))

    async def both() -> list[tuple[str, str]]:
        return list(await asyncio.gather(call("first"), call("second")))

    try:
        results = asyncio.run(both())
    finally:
        workers.shutdown()
    assert [r[1] for r in results] == ["first", "second"]
    assert all(r[0].startswith("cosserve-work") for r in results)
