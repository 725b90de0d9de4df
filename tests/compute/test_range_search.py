"""Exact cosine range search through a real server (ScoreRange, `Session.range_search`, the asyncio
client and `ShardedScorer`), checked against a float64 numpy reference; caps, charging, the reply
bound and hostile requests."""

from __future__ import annotations

import asyncio
import math

import grpc
import numpy as np
import pytest

from cosserve import Client, CosserveRpcError, InvalidArgumentError, InvalidTypeError, RangeResult, ShardedScorer, aio
from cosserve.v1 import cosserve_pb2 as pb
from cosserve.v1 import cosserve_pb2_grpc as pb_grpc

torch = pytest.importorskip("torch")

from cosserve.server.compute import range_search, similarity  # noqa: E402
from tests.conftest import start_server  # noqa: E402

# dtype, |score - reference| allowed (float32 products rounded once to the dtype), and the
# margin around min_score within which the float32 test may decide either way.
FLOATS = {
    "float16": (np.float16, 1e-3, 1e-5),
    "float32": (np.float32, 1e-5, 1e-5),
    "float64": (np.float64, 1e-12, 1e-12),
}


def ref_matrix(q: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Cosines in float64 of the stored values, with CosineSimilarity's norm floor."""
    q, c = q.astype(np.float64), c.astype(np.float64)
    qn = np.sqrt(np.maximum(np.einsum("nd,nd->n", q, q), 1e-12))
    cn = np.sqrt(np.maximum(np.einsum("md,md->m", c, c), 1e-12))
    return (q @ c.T) / qn[:, None] / cn[None, :]


def assert_range(result: RangeResult, q: np.ndarray, c: np.ndarray, tau: float, cap: int | None, atol: float, margin: float) -> None:
    """Every query's rows: all rows surely above tau (the best `cap` of them, by the reference),
    none surely below, scores within atol of the reference, ordered by (-score, index)."""
    ref = ref_matrix(q, c)
    n = q.shape[0]
    assert result.lims.dtype == np.int64 and result.lims.shape == (n + 1,) and result.lims[0] == 0
    assert result.indices.dtype == np.int64 and result.scores.dtype == c.dtype and result.truncated.shape == (n,)
    for i in range(n):
        rows = result.indices[result.lims[i] : result.lims[i + 1]]
        scores = result.scores[result.lims[i] : result.lims[i + 1]].astype(np.float64)
        assert len(set(rows.tolist())) == len(rows)
        np.testing.assert_allclose(scores, ref[i, rows], atol=atol, rtol=0)
        assert (np.diff(scores) <= 0).all(), "not best first"
        if c.dtype.itemsize >= 4:  # float16 scores are ordered in float32, then rounded: ties may be new
            assert (np.lexsort((rows, -scores)) == np.arange(len(rows))).all(), "equal scores not by index"
        sure, maybe = np.flatnonzero(ref[i] >= tau + margin), np.flatnonzero(ref[i] >= tau - margin)
        assert np.isin(rows, maybe).all(), "a row below min_score"
        if cap is None:
            assert not result.truncated[i]
            assert np.isin(sure, rows).all(), "a row above min_score is missing"
        else:
            assert len(rows) <= cap
            if len(sure) > cap:
                assert result.truncated[i]
            if len(maybe) <= cap:
                assert not result.truncated[i]
            if result.truncated[i]:  # the best `cap`: a row left out scores no more than the last one kept
                assert len(rows) == cap
                left_out = np.setdiff1d(sure, rows)
                assert (ref[i, left_out] <= scores.min() + margin + atol).all()
            else:
                assert np.isin(sure, rows).all()


@pytest.mark.parametrize("dtype", FLOATS)
def test_rows_above_min_score_equal_a_float64_reference(ws, dtype):
    np_dtype, atol, margin = FLOATS[dtype]
    rng = np.random.default_rng(1)
    c = rng.standard_normal((3000, 16)).astype(np_dtype)
    q = rng.standard_normal((70, 16)).astype(np_dtype)
    c[10] = 0  # a zero row: cosine 0 by the norm floor
    ws.feed_blob("C", c)
    for tau in (0.5, 0.0, -0.2, 1.5):
        assert_range(ws.range_search(q, "C", tau, batch_size=32), q, c, tau, None, atol, margin)
    for cap in (1, 5):
        assert_range(ws.range_search(q, "C", 0.4, max_per_query=cap), q, c, 0.4, cap, atol, margin)


def test_equal_scores_keep_the_lower_index_and_the_cap_cuts_there(cpu_ws):
    rng = np.random.default_rng(2)
    c = rng.standard_normal((50, 8)).astype(np.float32)
    c[[7, 21, 40]] = c[3]  # four equal rows
    q = np.stack([c[3], -c[3]])
    cpu_ws.feed_blob("C", c)
    result = cpu_ws.range_search(q, "C", 0.999)
    assert result.indices[result.lims[0] : result.lims[1]].tolist() == [3, 7, 21, 40]
    assert result.lims[2] == result.lims[1]  # -c[3] matches nothing
    capped = cpu_ws.range_search(q, "C", 0.999, max_per_query=2)
    assert capped.indices.tolist() == [3, 7] and capped.truncated.tolist() == [True, False]


def test_a_cap_below_the_hits_of_every_row_is_the_top_k(cpu_ws):
    """min_score below -1 takes every row: capped, that is top-k, score for score (the same tiles),
    and the hits held are cut down to the cap as they pile up."""
    rng = np.random.default_rng(3)
    c = rng.standard_normal((20000, 8)).astype(np.float32)
    q = rng.standard_normal((40, 8)).astype(np.float32)
    cpu_ws.feed_blob("C", c)
    result = cpu_ws.range_search(q, "C", -2.0, max_per_query=7)
    scores, indices = cpu_ws.top_k(q, "C", k=7)
    assert result.truncated.all() and (np.diff(result.lims) == 7).all()
    np.testing.assert_array_equal(result.indices.reshape(40, 7), indices)
    np.testing.assert_array_equal(result.scores.reshape(40, 7), scores)


def test_the_core_compacts_hits_to_the_cap_and_charges_before_keeping():
    rng = np.random.default_rng(4)
    c = torch.from_numpy(rng.standard_normal((70000, 4)).astype(np.float32))
    q = torch.from_numpy(rng.standard_normal((64, 4)).astype(np.float32))
    charges: list[int] = []
    hits = range_search.range_search(q, c, -2.0, 5, max_hits=10**6, charge=charges.append)
    scores, indices = similarity.top_k(q, c, 5)
    assert torch.equal(hits.indices.view(64, 5), indices) and torch.equal(hits.scores.view(64, 5), scores)
    # Every pair passes (4,480,000), but the hits held are cut to the cap after each tile: the
    # high-water mark is about one tile's hits (64 x 8192 here), charged before they were kept.
    _, tile_rows = similarity.tile_plan(64, 4, c.device, torch.float32)
    assert charges == sorted(charges) and len(charges) > 1
    assert max(charges) <= (64 * tile_rows + range_search._MIN_COMPACT) * range_search.HIT_BYTES < 64 * 70000 * range_search.HIT_BYTES
    with pytest.raises(Exception, match="raise min_score"):
        range_search.range_search(q, c, -2.0, 0, max_hits=1000)
    refused = []

    def refuse(nbytes: int) -> None:
        refused.append(nbytes)
        raise MemoryError("refused")

    with pytest.raises(MemoryError):
        range_search.range_search(q, c, -2.0, 0, max_hits=10**8, charge=refuse)
    assert refused == [64 * tile_rows * range_search.HIT_BYTES]  # refused at the first tile's hits


def test_batches_stream_in_order_one_result_per_message(cpu_ws):
    rng = np.random.default_rng(5)
    c = rng.standard_normal((400, 8)).astype(np.float32)
    cpu_ws.feed_blob("C", c)
    batches = [rng.standard_normal((n, 8)).astype(np.float32) for n in (3, 0, 17, 1)]
    pieces = list(cpu_ws.iter_range_search(iter(batches), "C", 0.3))
    assert [len(p) for p in pieces] == [3, 0, 17, 1]
    for piece, batch in zip(pieces, batches):
        assert_range(piece, batch, c, 0.3, None, 1e-5, 1e-5)
    whole = cpu_ws.range_search(iter(batches), "C", 0.3)
    assert_range(whole, np.concatenate(batches), c, 0.3, None, 1e-5, 1e-5)
    assert len(cpu_ws.range_search(iter([]), "C", 0.3)) == 0  # nothing asked of the server


def test_the_asyncio_client_gives_the_same_result(server, cpu_ws):
    rng = np.random.default_rng(6)
    c = rng.standard_normal((300, 8)).astype(np.float32)
    q = rng.standard_normal((30, 8)).astype(np.float32)

    async def search() -> RangeResult:
        async with aio.Client(server.address) as client, client.session("cpu") as session:
            await session.feed_blob("C", c)
            return await session.range_search(q, "C", 0.2, max_per_query=4, batch_size=7)

    got = asyncio.run(search())
    cpu_ws.feed_blob("C", c)
    want = cpu_ws.range_search(q, "C", 0.2, max_per_query=4)
    for field in ("lims", "indices", "scores", "truncated"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field))


def test_sharded_equals_one_server(cpu_ws):
    rng = np.random.default_rng(7)
    c = rng.standard_normal((3001, 8)).astype(np.float32)
    c[2999] = c[5]  # a tie across shards: the lower global index first
    q = np.concatenate([c[5:6], rng.standard_normal((60, 8)).astype(np.float32)])
    cpu_ws.feed_blob("C", c)
    servers = [start_server() for _ in range(3)]
    try:
        with ShardedScorer([s.address for s in servers], device="cpu") as sharded:
            sharded.feed(c)
            for cap in (None, 1, 6):
                got = sharded.range_search(q, 0.35, max_per_query=cap, batch_size=25)
                want = cpu_ws.range_search(q, "C", 0.35, max_per_query=cap)
                np.testing.assert_array_equal(got.lims, want.lims)
                np.testing.assert_array_equal(got.indices, want.indices)
                np.testing.assert_allclose(got.scores, want.scores, atol=1e-6)
                np.testing.assert_array_equal(got.truncated, want.truncated)
            assert sharded.range_search(q[:1], 0.999).indices.tolist() == [5, 2999]
    finally:
        for s in servers:
            s.stop(0)


def test_results_are_charged_to_the_session_and_bounded_by_one_reply():
    running = start_server(max_session_bytes=1 << 20)
    try:
        with Client(running.address) as client, client.session("cpu") as ws:
            rng = np.random.default_rng(8)
            ws.feed_blob("C", rng.standard_normal((20000, 4)).astype(np.float32))  # 320 KB
            q = rng.standard_normal((2, 4)).astype(np.float32)
            # Every row of both queries: 40,000 hits held, about 1.6 MB, above the session's 1 MiB.
            with pytest.raises(CosserveRpcError) as err:
                ws.range_search(q, "C", -2.0)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-session-bytes" in err.value.details() and "ScoreRange" in err.value.details()
            # About 8,000 hits (320 KB held) each: were a search's charge kept, the third would fail.
            for _ in range(4):
                assert 5000 < ws.range_search(q, "C", 0.5).lims[-1] < 12000
    finally:
        running.stop(0)


def test_more_rows_than_one_reply_is_resource_exhausted_with_advice(cpu_ws):
    c = np.random.default_rng(9).standard_normal((300_000, 1)).astype(np.float32)
    cpu_ws.feed_blob("C", c)
    q = np.ones((2, 1), np.float32)
    with pytest.raises(CosserveRpcError) as err:
        cpu_ws.range_search(q, "C", -2.0)  # 600,000 rows: 7.2 MB of reply
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    for advice in ("raise min_score", "max_per_query", "fewer queries per message"):
        assert advice in err.value.details()
    assert len(cpu_ws.range_search(q[:1], "C", -2.0).indices) == 300_000  # one query's fit


def raw_error(server, session_id: str, **fields) -> grpc.RpcError:
    request = pb.RangeRequest(session_id=session_id, **fields)
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as err:
        list(pb_grpc.CosserveStub(channel).ScoreRange(iter([request]), timeout=10))
    return err.value


def _queries(array: np.ndarray) -> pb.Tensor:
    dtype = {np.dtype(np.float32): pb.FLOAT32, np.dtype(np.float64): pb.FLOAT64}[array.dtype]
    return pb.Tensor(dtype=dtype, shape=array.shape, data=array.tobytes())


def test_hostile_requests_get_precise_status_codes(server, cpu_ws):
    cpu_ws.feed_blob("C", np.ones((5, 4), np.float32))
    cpu_ws.feed_blob("ints", np.ones((5, 4), np.int32))
    q = _queries(np.ones((2, 4), np.float32))
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    cases = [
        (dict(corpus="C", min_score=math.nan, queries=q), invalid, ("ScoreRange", "NaN")),
        (dict(corpus="C", min_score=0.5, max_per_query=-1, queries=q), invalid, ("max_per_query", "-1")),
        (dict(corpus="C", min_score=0.5, queries=_queries(np.ones((2, 3), np.float32))), invalid, ("width 3", "width 4")),
        (dict(corpus="C", min_score=0.5, queries=_queries(np.ones(4, np.float32))), invalid, ("2-D",)),
        (dict(corpus="C", min_score=0.5, queries=_queries(np.ones((2, 4)))), invalid, ("float64", "corpus dtype")),
        (dict(corpus="ints", min_score=0.5, queries=q), invalid, ("'ints'", "int32")),
        (dict(corpus="C", min_score=0.5, queries=pb.Tensor(dtype=pb.FLOAT32, shape=[2, 4], data=b"x")), invalid, ("bytes",)),
        (dict(corpus="C", min_score=0.5, queries=q, with_ids=True), invalid, ("no row ids",)),
        (dict(corpus="missing", min_score=0.5, queries=q), grpc.StatusCode.NOT_FOUND, ("'missing'",)),
        (dict(corpus="@missing", min_score=0.5, queries=q), grpc.StatusCode.NOT_FOUND, ("@missing",)),
    ]
    for fields, code, words in cases:
        err = raw_error(server, cpu_ws.id, **fields)
        assert err.code() == code, (fields, err.details())
        for word in words:
            assert word in err.details(), (word, err.details())
    # infinities are numbers: +inf matches nothing, -inf every row
    assert cpu_ws.range_search(np.ones((2, 4), np.float32), "C", math.inf).lims.tolist() == [0, 0, 0]
    assert cpu_ws.range_search(np.ones((2, 4), np.float32), "C", -math.inf).lims.tolist() == [0, 5, 10]


def test_the_client_refuses_bad_arguments_before_sending(cpu_ws):
    q = np.ones((2, 4), np.float32)
    for bad in (None, "0.5", True):
        with pytest.raises(InvalidTypeError):
            cpu_ws.range_search(q, "C", bad)
    with pytest.raises(InvalidArgumentError, match="NaN"):
        cpu_ws.range_search(q, "C", math.nan)
    for cap in (0, -3):
        with pytest.raises(InvalidArgumentError, match="max_per_query"):
            cpu_ws.range_search(q, "C", 0.5, max_per_query=cap)
    with pytest.raises(InvalidTypeError, match="max_per_query"):
        cpu_ws.range_search(q, "C", 0.5, max_per_query=2.5)
