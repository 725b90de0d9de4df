"""The core without a server: workspace transactions, idle expiry, workers, the scoring pipeline,
and the error table."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import grpc
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cosserve.server import engine, errors  # noqa: E402
from cosserve.server.scorer import Batch, Scorer  # noqa: E402
from cosserve.server.settings import Settings  # noqa: E402
from cosserve.server.status import STATUS_CODES, status_of  # noqa: E402
from cosserve.server.workers import Workers  # noqa: E402
from cosserve.server.sessions import SessionStore  # noqa: E402
from cosserve.server.workspace import Workspace  # noqa: E402

CPU = torch.device("cpu")


def _workspace(max_bytes: int = 1024) -> Workspace:
    return Workspace("s", CPU, max_bytes)


def test_a_transaction_reads_its_own_staged_outputs_and_commits_them_together():
    ws = _workspace()
    ws.put("x", torch.ones(4))
    txn = ws.transaction()
    txn.stage("y", txn.get("x") * 2)
    assert not ws.has("y"), "staged outputs are invisible until commit"
    torch.testing.assert_close(txn.get("y"), torch.full((4,), 2.0))
    txn.commit()
    assert ws.names() == ["x", "y"] and ws.held_bytes() == 32


def test_a_commit_that_no_longer_fits_changes_nothing():
    ws = _workspace(max_bytes=64)
    ws.put("x", torch.ones(4))  # 16 bytes
    txn = ws.transaction()
    txn.stage("a", torch.ones(4))
    txn.stage("b", torch.ones(4))
    ws.put("other", torch.ones(6))  # meanwhile another call takes 24 of the remaining bytes
    with pytest.raises(errors.ResourceExhausted, match="above its limit of 64"):
        txn.commit()
    assert ws.names() == ["other", "x"] and ws.held_bytes() == 40


def test_a_commit_keeps_a_concurrent_change_to_other_blobs():
    ws = _workspace()
    ws.put("x", torch.ones(2))
    txn = ws.transaction()
    ws.put("z", torch.zeros(2))  # lands between the snapshot and the commit
    txn.stage("y", torch.ones(2))
    txn.commit()
    assert ws.names() == ["x", "y", "z"]


def test_room_counts_replaced_outputs_as_freed():
    ws = _workspace(max_bytes=100)
    ws.put("x", torch.ones(10))  # 40 bytes
    txn = ws.transaction()
    assert txn.room() == 60 and txn.room(["x"]) == 100 and txn.room(["x", "x", "nope"]) == 100


def test_run_net_is_all_or_nothing_and_refuses_outputs_before_computing_them():
    ws = _workspace(max_bytes=10_000)
    ws.put("q", torch.ones(4, 8))
    ws.put("c", torch.ones(50, 8))
    calls = [
        engine.OpCall("CosineSimilarity", ("q", "q"), ("s",)),
        engine.OpCall("CosineSimilarityMatrix", ("c", "c"), ("big",)),  # 50 x 50 x 4 = 10,000 bytes
    ]
    with pytest.raises(errors.ResourceExhausted, match=r"op #1 .*nothing was changed"):
        engine.run_net(ws, calls)
    assert ws.names() == ["c", "q"]
    engine.run_net(ws, calls[:1])
    np.testing.assert_allclose(ws.get("s").numpy(), np.ones(4), rtol=1e-6)


def test_a_closed_workspace_refuses_every_change():
    ws = _workspace()
    txn = ws.transaction()
    txn.stage("y", torch.ones(1))
    ws.close()
    for attempt in (txn.commit, lambda: ws.put("x", torch.ones(1)), ws.transaction):
        with pytest.raises(errors.NotFound, match="was closed"):
            attempt()


def test_idle_sessions_expire_and_used_ones_stay():
    store = SessionStore(dataclasses.replace(Settings(), session_idle_timeout_s=0.2))
    idle, used = store.create("cpu"), store.create("cpu")
    time.sleep(0.3)
    store.get(used.id)  # touching a session keeps it alive
    assert store.expire_idle() == 1
    with pytest.raises(errors.NotFound):
        store.get(idle.id)
    assert idle.closed and store.get(used.id) is used


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
    ws = _workspace(max_bytes=1 << 20)
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


def _domain_errors() -> list[type[errors.CosserveError]]:
    found, todo = [], [errors.CosserveError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_every_domain_error_class_has_a_status_code():
    missing = [cls.__name__ for cls in _domain_errors() if cls is not errors.CosserveError and status_of(cls("x")) is None]
    assert not missing, f"domain errors without a status code in status.STATUS_CODES: {missing}"
    assert status_of(errors.CosserveError("x")) is None  # the base alone is no code: INTERNAL
    assert status_of(ValueError("x")) is None


def test_a_subclass_of_a_domain_error_takes_its_parents_code():
    class BlobNameTooLong(errors.InvalidArgument):
        pass

    class Deeper(BlobNameTooLong):
        pass

    assert status_of(Deeper("x")) is grpc.StatusCode.INVALID_ARGUMENT
    assert set(STATUS_CODES) <= set(_domain_errors())
