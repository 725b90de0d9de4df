"""Workspaces without a server: transactions and their charges, claims, identity accounts, a
net all or nothing, closing, idle expiry and the records a commit journals."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cosserve.server import errors
from cosserve.server.compute import engine  # noqa: E402
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
