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

from cosserve.server import errors
from cosserve.server.compute import engine  # noqa: E402
from cosserve.server.compute.scorer import Batch, Scorer  # noqa: E402
from cosserve.server.compute.workers import Workers  # noqa: E402
from cosserve.server.edge.status import STATUS_CODES, status_of  # noqa: E402
from cosserve.server.settings import Settings  # noqa: E402
from cosserve.server.state.accounts import Account  # noqa: E402
from cosserve.server.state.sessions import SessionStore  # noqa: E402
from cosserve.server.state.workspace import BLOB_OVERHEAD_BYTES, MAX_NAME_BYTES, Workspace  # noqa: E402

CPU = torch.device("cpu")


def _workspace(max_bytes: int = 1 << 20, account: Account | None = None) -> Workspace:
    return Workspace("s", CPU, max_bytes, account)


def _charge(name: str, nbytes: int) -> int:
    """An independent statement of what a blob costs: its data, its name and a fixed overhead."""
    return nbytes + len(name.encode()) + BLOB_OVERHEAD_BYTES


def test_a_transaction_reads_its_own_staged_outputs_and_commits_them_together():
    ws = _workspace()
    ws.put("x", torch.ones(4))
    with ws.transaction() as txn:
        txn.stage("y", txn.get("x") * 2)
        assert not ws.has("y"), "staged outputs are invisible until commit"
        torch.testing.assert_close(txn.get("y"), torch.full((4,), 2.0))
        txn.commit()
    assert ws.names() == ["x", "y"] and ws.held_bytes() == _charge("x", 16) + _charge("y", 16)


def test_staged_outputs_are_charged_as_they_are_staged_so_others_cannot_take_their_room():
    ws = _workspace(max_bytes=_charge("x", 16) + _charge("a", 16) + _charge("b", 16) + 10)
    ws.put("x", torch.ones(4))
    with ws.transaction() as txn:
        txn.stage("a", torch.ones(4))
        txn.stage("b", torch.ones(4))
        with pytest.raises(errors.ResourceExhausted, match="above its limit"):
            ws.put("other", torch.ones(6))  # another call meanwhile finds the room taken
        txn.commit()
    assert ws.names() == ["a", "b", "x"]
    assert ws.held_bytes() == _charge("x", 16) + _charge("a", 16) + _charge("b", 16)


def test_a_failed_transaction_gives_its_room_back():
    ws = _workspace()
    ws.put("x", torch.ones(4))
    with pytest.raises(RuntimeError):
        with ws.transaction() as txn:
            txn.stage("a", torch.ones(100))
            assert ws.held_bytes() == _charge("x", 16) + _charge("a", 400)
            raise RuntimeError("the op failed")
    assert ws.held_bytes() == _charge("x", 16) and ws.names() == ["x"]


def test_a_commit_keeps_a_concurrent_change_to_other_blobs():
    ws = _workspace()
    ws.put("x", torch.ones(2))
    with ws.transaction() as txn:
        ws.put("z", torch.zeros(2))  # lands between the snapshot and the commit
        txn.stage("y", torch.ones(2))
        txn.commit()
    assert ws.names() == ["x", "y", "z"]


def test_a_replaced_blob_is_charged_beside_its_replacement_until_it_is_stored():
    ws = _workspace(max_bytes=1000)
    ws.put("x", torch.ones(10))  # 40 bytes of data
    with ws.transaction() as txn:
        with pytest.raises(errors.ResourceExhausted, match="above its limit of 1000"):
            txn.stage("x", torch.ones(10))  # the old x is alive until commit
    ws.put("x", torch.ones(10))  # an already allocated tensor replaces it at once
    assert ws.held_bytes() == _charge("x", 40)


def test_names_count_and_are_bounded():
    ws = _workspace()
    ws.put("é" * 100, torch.ones(1))
    assert ws.held_bytes() == 4 + 200 + BLOB_OVERHEAD_BYTES
    ws.put("n" * MAX_NAME_BYTES, torch.ones(1))
    with pytest.raises(errors.InvalidArgument, match=f"above the {MAX_NAME_BYTES}"):
        ws.put("n" * (MAX_NAME_BYTES + 1), torch.ones(1))
    with pytest.raises(errors.InvalidArgument, match="1026 bytes"):
        ws.claim("é" * 513, 4)


def test_a_claim_holds_its_room_until_stored_or_released():
    ws = _workspace(max_bytes=_charge("big", 600) + 100)
    with ws.claim("big", 600) as claim:
        with pytest.raises(errors.ResourceExhausted):
            ws.claim("other", 8)  # concurrent streams cannot together pass the limit
        claim.store(torch.ones(150))
    assert ws.held_bytes() == _charge("big", 600)
    ws.remove("big")
    with pytest.raises(errors.NotFound):
        with ws.claim("late", 8):
            ws.close()
            ws.claim("late", 8)
    assert ws.held_bytes() == 0


def test_an_account_is_charged_by_every_workspace_of_its_identity():
    account = Account("identity 'alice'", max_bytes=_charge("a", 400) + _charge("b", 400) + 10)
    one, two = _workspace(account=account), _workspace(account=account)
    one.put("a", torch.ones(100))
    with two.claim("b", 400) as claim:
        with pytest.raises(errors.ResourceExhausted, match=r"identity 'alice' .*--max-identity-bytes"):
            one.put("c", torch.ones(10))
        claim.store(torch.ones(100))
    assert account.held == one.held_bytes() + two.held_bytes()
    with pytest.raises(errors.ResourceExhausted, match="identity 'alice'"):
        with two.transaction() as txn:
            txn.stage("d", torch.ones(10))
    assert account.held == one.held_bytes() + two.held_bytes() and two.names() == ["b"]
    one.reset()
    two.close()
    assert account.held == 0


def test_run_net_is_all_or_nothing_and_refuses_outputs_before_computing_them():
    ws = _workspace(max_bytes=_charge("q", 128) + _charge("c", 1600) + 10_000)
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
    store = SessionStore(dataclasses.replace(Settings(), session_idle_timeout_s=0.5))
    idle, used = store.create("cpu"), store.create("cpu")
    time.sleep(0.3)
    store.get(used.id)  # touching a session keeps it alive
    time.sleep(0.3)
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


def test_a_replacing_commit_is_one_step_and_one_journal_record():
    from cosserve.server.state.workspace import blob_charge

    workspace = Workspace("s", torch.device("cpu"), 1 << 20)
    records: list[tuple[str, list[str]]] = []
    workspace.journal = lambda ws, kind, blobs: records.append((kind, sorted(blobs)))
    workspace.put("a", torch.ones(4))
    workspace.put("b", torch.ones(8))
    with workspace.transaction() as txn:
        txn.expect([], blob_charge("c", 12), "load")
        txn.stage_outputs({"c": torch.zeros(3)}, "load")
        txn.commit(replace=True)
    assert records[-1] == ("replace", ["c"]) and len(records) == 3  # no reset record before it
    assert workspace.names() == ["c"]
    assert workspace.held_bytes() == blob_charge("c", 12)
