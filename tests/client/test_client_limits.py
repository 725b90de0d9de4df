"""Limits that never surprise (issue 12): Compute of any size, top-k for any k <= M, reply-too-big
messages that name the real limit with advice a caller can follow, "did you mean" on every RPC
that takes an op type, and check_gradient's relative errors. All against a real server."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from cosserve import CosserveRpcError, limits
from cosserve.v1 import cosserve_pb2 as pb
from cosserve.v1 import cosserve_pb2_grpc as pb_grpc


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.maximum((x.astype(np.float64) ** 2).sum(axis=1, keepdims=True), 1e-12))


# ---- Compute of any size -----------------------------------------------------------------------


def test_compute_with_inputs_larger_than_one_message(client):
    x = np.random.default_rng(0).standard_normal((600_000, 4)).astype(np.float32)  # 9.6 MB > 7 MiB
    y = np.random.default_rng(1).standard_normal((600_000, 4)).astype(np.float32)
    assert x.nbytes + y.nbytes > limits.MAX_MESSAGE_BYTES
    out = client.compute("CosineSimilarity", {"X": x, "Y": y}, ["S"])
    reference = (_unit(x) * _unit(y)).sum(axis=1)
    np.testing.assert_allclose(out["S"], reference, rtol=1e-5, atol=1e-6)
    assert out["S"].dtype == np.float32 and out["S"].flags.writeable


def test_compute_with_outputs_larger_than_one_reply(client):
    rng = np.random.default_rng(2)
    q, c = rng.standard_normal((1500, 8)).astype(np.float32), rng.standard_normal((1400, 8)).astype(np.float32)
    out = client.compute("CosineSimilarityMatrix", {"Q": q, "C": c}, ["S"])  # 8.4 MB reply
    assert out["S"].nbytes > limits.MAX_MESSAGE_BYTES
    np.testing.assert_allclose(out["S"], _unit(q) @ _unit(c).T, rtol=1e-4, atol=1e-5)


def test_compute_through_a_session_leaves_no_session(client, server):
    x = np.ones((2_000_000, 1), np.float32)  # 8 MB
    before = {w.id for w in server.store}
    client.compute("Cos", {"X": x}, ["Y"])
    assert {w.id for w in server.store} == before


def test_a_large_compute_still_fails_precisely(client):
    x = np.ones((1_000_000, 2), np.float32)
    with pytest.raises(CosserveRpcError) as err:
        client.compute("CosineSimilarity", {"X": x, "Y": x[:, :1]}, ["S"])  # widths differ, found in the session
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "CosineSimilarity" in err.value.details() and "(1000000, 1)" in err.value.details()


# ---- top-k for any k <= M -------------------------------------------------------------------


def test_top_k_with_k_equal_to_a_200k_corpus(cpu_ws):
    rng = np.random.default_rng(3)
    m, d = 200_000, 8
    corpus = rng.standard_normal((m, d)).astype(np.float32)
    queries = rng.standard_normal((3, d)).astype(np.float32)
    cpu_ws.feed_blob("C", corpus)
    scores, indices = cpu_ws.top_k(queries, "C", k=m)
    assert scores.shape == indices.shape == (3, m) and indices.dtype == np.int64
    sims = _unit(queries) @ _unit(corpus).T
    for row in range(3):
        np.testing.assert_array_equal(np.sort(indices[row]), np.arange(m))  # every row once
        np.testing.assert_allclose(scores[row], sims[row, indices[row]], atol=1e-5)
        np.testing.assert_allclose(scores[row], np.sort(sims[row])[::-1], atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 0)
    assert cpu_ws.blobs() == ["C"]  # the scratch blobs are gone


def test_top_k_large_k_against_a_shared_corpus_and_in_batches(cpu_ws):
    rng = np.random.default_rng(4)
    corpus = rng.standard_normal((250_000, 4)).astype(np.float32)
    queries = rng.standard_normal((5, 4)).astype(np.float32)
    cpu_ws.feed_blob("C", corpus)
    got = list(cpu_ws.iter_top_k(iter([queries[:2], queries[2:]]), "C", k=200_000))
    assert [s.shape for s, _ in got] == [(2, 200_000), (3, 200_000)]
    sims = _unit(queries) @ _unit(corpus).T
    best = np.sort(sims, axis=1)[:, ::-1][:, :200_000]
    np.testing.assert_allclose(np.concatenate([s for s, _ in got]), best, atol=1e-5)


def test_scoretopk_reply_too_big_advice_can_be_followed(cpu_ws, server):
    cpu_ws.feed_blob("C", np.ones((200_000, 2), np.float32))
    with grpc.insecure_channel(server.address, options=limits.GRPC_OPTIONS) as channel:
        request = pb.TopKRequest(session_id=cpu_ws.id, corpus="C", k=200_000, queries=pb.Tensor(
            dtype=pb.FLOAT32, shape=[1, 2], data=np.ones((1, 2), np.float32).tobytes()))
        metadata = ((limits.SESSION_ID_METADATA, cpu_ws.id),)
        with pytest.raises(grpc.RpcError) as err:
            list(pb_grpc.CosserveStub(channel).ScoreTopK(iter([request]), timeout=10, metadata=metadata))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = err.value.details()
    assert "fewer queries" not in details  # it already sends one
    assert "CosineTopK" in details and "FetchBlobStream" in details
    assert f"above the {limits.readable_bytes(limits.INLINE_BYTES)} a ScoreTopK reply may carry" in details


def test_compute_reply_too_big_names_the_message_limit(server):
    q = np.ones((3000, 4), np.float32)
    request = pb.ComputeRequest(
        op=pb.OperatorDef(type="CosineSimilarityMatrix", input=["Q", "C"], output=["S"]),
        inputs=[pb.NamedTensor(name=n, tensor=pb.Tensor(dtype=pb.FLOAT32, shape=[3000, 4], data=q.tobytes())) for n in "QC"],
    )
    with grpc.insecure_channel(server.address, options=limits.GRPC_OPTIONS) as channel:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.CosserveStub(channel).Compute(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "of one message" in err.value.details() and "--max-session-bytes" not in err.value.details()
    assert "run it in a session" in err.value.details()  # what cosserve's client then does itself


# ---- did you mean --------------------------------------------------------------------------


def _refusal(call) -> str:
    with pytest.raises(CosserveRpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return err.value.details()


@pytest.mark.parametrize("typo", ["COSINE_SIMILARITY", "cosine-similarity", "CosineSimilarty"])
def test_every_rpc_that_takes_an_op_type_suggests_the_name(client, cpu_ws, typo):
    x = np.ones((2, 3), np.float32)
    cpu_ws.feed_blob("X", x)
    cpu_ws.feed_blob("Y", x)
    calls = {
        "RunOperator": lambda: cpu_ws.run_operator(typo, ["X", "Y"], ["S"]),
        "RunNet": lambda: cpu_ws.run_net([("Cos", ["X"], ["Z"]), (typo, ["X", "Y"], ["S"])]),
        "Compute": lambda: client.compute(typo, {"X": x, "Y": x}, ["S"]),
        "CheckGradient": lambda: cpu_ws.check_gradient(typo, ["X", "Y"]),
    }
    for rpc, call in calls.items():
        details = _refusal(call)
        assert "did you mean 'CosineSimilarity'" in details, (rpc, details)


def test_suggestions_for_a_name_near_several_and_for_none(cpu_ws):
    cpu_ws.feed_blob("X", np.ones((2, 3), np.float32))
    assert "did you mean 'DotProduct' or 'DotProductGradient'?" in _refusal(
        lambda: cpu_ws.run_operator("DotProdcut", ["X", "X"], ["S"])
    )
    assert "ListOperators lists the known ones" in _refusal(lambda: cpu_ws.run_operator("Q" * 5000, ["X"], ["S"]))


# ---- check_gradient's relative error ----------------------------------------------------------


def test_check_gradient_returns_the_relative_errors_the_rpc_carries(cpu_ws, client, server):
    rng = np.random.default_rng(5)
    cpu_ws.feed_blob("X", rng.standard_normal((3, 4)))
    cpu_ws.feed_blob("Y", rng.standard_normal((3, 4)) * 100)  # gradients well above 1: rel < abs
    result = cpu_ws.check_gradient("DotProduct", ["X", "Y"])
    with grpc.insecure_channel(server.address) as channel:
        raw = pb_grpc.CosserveStub(channel).CheckGradient(
            pb.CheckGradientRequest(session_id=cpu_ws.id, op=pb.OperatorDef(type="DotProduct", input=["X", "Y"])),
            metadata=((limits.SESSION_ID_METADATA, cpu_ws.id),),
            timeout=30,
        )
    assert result.rel_errors == {item.input: item.max_rel_error for item in raw.inputs}
    assert result.max_rel_error == max(item.max_rel_error for item in raw.inputs)
    assert set(result) == {"X", "Y", "max_abs_error"}  # the dict is as before
    for name in ("X", "Y"):
        assert 0 <= result.rel_errors[name] <= result[name] + 1e-300
    assert result.max_rel_error < 1e-6
