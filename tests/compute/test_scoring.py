"""Exact cosine scoring through a real server: CosineSimilarityMatrix, CosineTopK, the ScoreTopK
stream, the corpus-norm cache, chunking, errors and `cosserve score`."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import grpc
import ml_dtypes
import numpy as np
import pytest

from cosserve import CosserveRpcError, cli
from cosserve.v1 import cosserve_pb2 as pb
from cosserve.v1 import cosserve_pb2_grpc as pb_grpc

torch = pytest.importorskip("torch")

from cosserve.server.compute import similarity  # noqa: E402

# dtype, atol of scores: computed in float32 (float64) and rounded once to the output dtype.
FLOATS = {
    "float16": (np.float16, 1e-3),
    "bfloat16": (ml_dtypes.bfloat16, 1e-2),
    "float32": (np.float32, 1e-5),
    "float64": (np.float64, 1e-12),
}


# ---- independent references: float64 numpy ----------------------------------------------


def ref_matrix(q: np.ndarray, c: np.ndarray) -> np.ndarray:
    q, c = q.astype(np.float64), c.astype(np.float64)
    qn = np.sqrt(np.maximum(np.einsum("nd,nd->n", q, q), 1e-12))
    cn = np.sqrt(np.maximum(np.einsum("md,md->m", c, c), 1e-12))
    return (q @ c.T) / qn[:, None] / cn[None, :]


def ref_top_k(q: np.ndarray, c: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = ref_matrix(q, c)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]  # stable: equal scores keep index order
    return np.take_along_axis(s, order, 1), order


def sample(rng: np.random.Generator, rows: int, width: int, dtype: type) -> np.ndarray:
    return rng.standard_normal((rows, width)).astype(dtype)


def tie_data() -> tuple[np.ndarray, np.ndarray]:
    """Rows whose scores are exact in floating point, so equal scores are equal bit for bit."""
    patterns = np.array([[1, 1, 1, 1], [2, 0, 0, 0], [0, 0, 0, 0], [1, -1, 1, -1], [0, 2, 0, 0], [-1, -1, -1, -1]])
    order = np.random.default_rng(3).integers(0, len(patterns), size=40)
    corpus = patterns[order].astype(np.float32)
    queries = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, -4]], np.float32)
    return queries, corpus


def assert_top_k(
    got: tuple[np.ndarray, np.ndarray], q: np.ndarray, c: np.ndarray, k: int, atol: float, near_ties: bool = False
) -> None:
    """Indices equal to the reference's; with near_ties, rows may differ where reference scores
    are within float32 rounding of each other (each returned row must then score its rank)."""
    scores, indices = got
    want_scores, want_indices = ref_top_k(q, c, k)
    assert scores.shape == indices.shape == (q.shape[0], k)
    assert scores.dtype == c.dtype and indices.dtype == np.int64
    np.testing.assert_allclose(scores.astype(np.float64), want_scores, rtol=0, atol=atol)
    if not near_ties:
        np.testing.assert_array_equal(indices, want_indices)
        return
    picked = np.take_along_axis(ref_matrix(q, c), indices, 1)
    np.testing.assert_allclose(picked, want_scores, rtol=0, atol=1e-6)
    assert all(len(set(row)) == k for row in indices.tolist())
    assert np.mean(indices == want_indices) > 0.99


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of a few rows, so a corpus of dozens of rows spans many chunks; counts the tiles."""
    monkeypatch.setattr(similarity, "CPU_BLOCK_BYTES", 64)
    monkeypatch.setattr(similarity, "CUDA_BLOCK_BYTES", 64)
    monkeypatch.setattr(similarity, "CORPUS_CHUNK_BYTES", 64)
    monkeypatch.setattr(similarity, "QUERY_BLOCK_ROWS", 2)
    monkeypatch.setattr(similarity, "MERGE_EVERY", 2)
    calls = []
    original = similarity._gemm

    def counting(queries, chunk, out):
        calls.append((queries.shape[0], chunk.shape[0]))
        return original(queries, chunk, out)

    monkeypatch.setattr(similarity, "_gemm", counting)
    return calls


# ---- the operators -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype_name", FLOATS)
def test_similarity_matrix_matches_reference(ws, dtype_name):
    dtype, atol = FLOATS[dtype_name]
    rng = np.random.default_rng(0)
    q, c = sample(rng, 5, 12, dtype), sample(rng, 9, 12, dtype)
    q[2] = 0  # the norm floor: a zero row scores 0, never NaN
    c[4] = 0
    ws.feed_blob("Q", q)
    ws.feed_blob("C", c)
    ws.run_operator("CosineSimilarityMatrix", ["Q", "C"], ["S"])
    s = ws.fetch_blob("S")
    assert s.dtype == c.dtype and s.shape == (5, 9)
    np.testing.assert_allclose(s.astype(np.float64), ref_matrix(q, c), rtol=0, atol=atol)
    assert not np.any(s[2].astype(np.float64)) and not np.any(s[:, 4].astype(np.float64))


@pytest.mark.parametrize("dtype_name", FLOATS)
def test_top_k_matches_reference_as_op_and_stream(ws, dtype_name):
    dtype, atol = FLOATS[dtype_name]
    rng = np.random.default_rng(1)
    q, c = sample(rng, 37, 16, dtype), sample(rng, 300, 16, dtype)
    ws.feed_blob("Q", q)
    ws.feed_blob("C", c)
    ws.run_operator("CosineTopK", ["Q", "C"], ["V", "I"], k=7)
    assert_top_k((ws.fetch_blob("V"), ws.fetch_blob("I")), q, c, 7, atol)
    assert_top_k(ws.top_k(q, "C", k=7, batch_size=10), q, c, 7, atol)


def test_norm_floor_and_tiny_rows(cpu_ws):
    q = np.array([[1e-7, 0.0], [0.0, 0.0], [3.0, -4.0]])
    c = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    cpu_ws.feed_blob("Q", q)
    cpu_ws.feed_blob("C", c)
    cpu_ws.run_operator("CosineSimilarityMatrix", ["Q", "C"], ["S"])
    s = cpu_ws.fetch_blob("S")
    np.testing.assert_allclose(s[0], [0.1, 0.0, 0.0], atol=1e-15)  # norm below 1e-6 counts as 1e-6
    assert not np.any(s[1]) and not np.any(np.isnan(s))
    scores, indices = cpu_ws.top_k(q, "C", k=3)
    np.testing.assert_array_equal(indices[1], [0, 1, 2])  # all 0: ties go to the lower index
    np.testing.assert_array_equal(indices[2], [0, 1, 2])  # 0.6, 0, -0.8
    np.testing.assert_allclose(scores[2], [0.6, 0.0, -0.8], atol=1e-15)


@pytest.mark.parametrize("tiles", ["default", "small"])
def test_ties_go_to_the_lower_index(ws, request, tiles):
    if tiles == "small":
        request.getfixturevalue("small_tiles")
    q, c = tie_data()
    ws.feed_blob("Q", q)
    ws.feed_blob("C", c)
    for k in (1, 2, 5, 11, 39, 40):  # 40 == M
        assert_top_k(ws.top_k(q, "C", k=k), q, c, k, atol=0)
        ws.run_operator("CosineTopK", ["Q", "C"], ["V", "I"], k=k)
        assert_top_k((ws.fetch_blob("V"), ws.fetch_blob("I")), q, c, k, atol=0)


def test_k_equal_to_m_returns_every_row_in_order(cpu_ws):
    rng = np.random.default_rng(2)
    q, c = sample(rng, 4, 8, np.float64), sample(rng, 6, 8, np.float64)
    cpu_ws.feed_blob("C", c)
    assert_top_k(cpu_ws.top_k(q, "C", k=6), q, c, 6, atol=1e-12)


def test_chunked_result_equals_unchunked(ws, small_tiles):
    rng = np.random.default_rng(4)
    q, c = sample(rng, 5, 8, np.float32), sample(rng, 50, 8, np.float32)
    ws.feed_blob("Q", q)
    ws.feed_blob("C", c)
    chunked = ws.top_k(q, "C", k=4)
    ws.run_operator("CosineSimilarityMatrix", ["Q", "C"], ["S"])
    matrix = ws.fetch_blob("S")
    # 25 chunks of 2 corpus rows x 3 query blocks of 2 rows for top-k (the last padded), 2 full ones for the matrix
    assert small_tiles.count((2, 2)) >= 5 * 25, small_tiles
    assert max(rows for _, rows in small_tiles) < c.shape[0]
    with pytest.MonkeyPatch.context() as undo:  # back to one tile for this small corpus
        undo.setattr(similarity, "CPU_BLOCK_BYTES", 4 * 1024**2)
        undo.setattr(similarity, "CUDA_BLOCK_BYTES", 64 * 1024**2)
        undo.setattr(similarity, "CORPUS_CHUNK_BYTES", 16 * 1024**2)
        undo.setattr(similarity, "QUERY_BLOCK_ROWS", 1024)
        del small_tiles[:]
        whole = ws.top_k(q, "C", k=4)
        ws.run_operator("CosineSimilarityMatrix", ["Q", "C"], ["S1"])
        assert (8, 50) in small_tiles  # 5 queries in a tile padded to 8 rows, for top-k and the matrix
    np.testing.assert_array_equal(chunked[1], whole[1])
    np.testing.assert_allclose(chunked[0], whole[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(matrix, ws.fetch_blob("S1"), rtol=0, atol=1e-6)
    assert_top_k(chunked, q, c, 4, atol=1e-5)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_onednn_and_matmul_paths_agree(cpu_ws, monkeypatch, dtype_name):
    dtype, atol = FLOATS[dtype_name]
    rng = np.random.default_rng(10)
    q, c = sample(rng, 9, 32, dtype), sample(rng, 400, 32, dtype)
    cpu_ws.feed_blob("C", c)
    fast = cpu_ws.top_k(q, "C", k=5)
    monkeypatch.setattr(similarity, "USE_ONEDNN", False)
    plain = cpu_ws.top_k(q, "C", k=5)
    np.testing.assert_array_equal(fast[1], plain[1])
    np.testing.assert_allclose(fast[0].astype(np.float64), plain[0].astype(np.float64), rtol=0, atol=atol)
    assert_top_k(fast, q, c, 5, atol)


def test_corpus_norms_are_cached_and_dropped_with_the_blob(cpu_ws, server, monkeypatch):
    rng = np.random.default_rng(5)
    q = sample(rng, 6, 8, np.float32)
    first, second = sample(rng, 30, 8, np.float32), sample(rng, 30, 8, np.float32)
    corpus_norms = []
    original = similarity.inverse_norms

    def counting(x):
        if x.shape[0] == 30:
            corpus_norms.append(x.shape)
        return original(x)

    monkeypatch.setattr(similarity, "inverse_norms", counting)
    cache = server.store.get(cpu_ws.id).norms
    cpu_ws.feed_blob("C", first)
    assert_top_k(cpu_ws.top_k(q, "C", k=3), q, first, 3, atol=1e-5)
    assert_top_k(cpu_ws.top_k(q, "C", k=3, batch_size=2), q, first, 3, atol=1e-5)
    assert len(corpus_norms) == 1  # computed once for four batches
    cpu_ws.feed_blob("C", second)  # same name, same shape: the old norms must not be used
    assert_top_k(cpu_ws.top_k(q, "C", k=3), q, second, 3, atol=1e-5)
    assert len(corpus_norms) == 2
    gc.collect()
    assert len(cache) == 1  # the replaced tensor took its entry with it
    cpu_ws.remove_blob("C")
    gc.collect()
    assert len(cache) == 0


# ---- the ScoreTopK stream ----------------------------------------------------------------


def test_stream_returns_batches_in_order(cpu_ws):
    rng = np.random.default_rng(6)
    c = sample(rng, 500, 16, np.float32)
    cpu_ws.feed_blob("C", c)
    batches = [sample(rng, n, 16, np.float32) for n in (3, 64, 1, 17, 0, 40, 9)]
    sent = []

    def lazily():  # a generator: the client streams without knowing how many batches come
        for batch in batches:
            sent.append(len(batch))
            yield batch

    replies = list(cpu_ws.iter_top_k(lazily(), "C", k=5))
    assert [r[0].shape[0] for r in replies] == [3, 64, 1, 17, 0, 40, 9]
    for (scores, indices), batch in zip(replies, batches):
        assert_top_k((scores, indices), batch, c, 5, atol=1e-5)
    everything = np.concatenate(batches)
    assert_top_k(cpu_ws.top_k(iter(batches), "C", k=5), everything, c, 5, atol=1e-5)
    assert_top_k(cpu_ws.top_k(everything, "C", k=5, batch_size=7), everything, c, 5, atol=1e-5)


def test_large_k_is_split_so_each_reply_fits_one_message(cpu_ws, server):
    rng = np.random.default_rng(7)
    q, c = sample(rng, 200, 4, np.float32), sample(rng, 2000, 4, np.float32)
    cpu_ws.feed_blob("C", c)
    scores, indices = cpu_ws.top_k(q, "C", k=2000)  # 200 x 2000 x 12 bytes: several messages
    assert_top_k((scores, indices), q, c, 2000, atol=1e-5, near_ties=True)  # 2000 rows of width 4: near ties
    with grpc.insecure_channel(server.address) as channel:  # one message asking too much
        request = pb.TopKRequest(session_id=cpu_ws.id, corpus="C", k=2000, queries=pb.Tensor(
            dtype=pb.FLOAT32, shape=[200, 4], data=q.tobytes()))
        with pytest.raises(grpc.RpcError) as err:
            list(pb_grpc.CosserveStub(channel).ScoreTopK(iter([request]), timeout=10))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "fewer queries" in err.value.details()


def stream_error(ws, queries, corpus: str = "C", k: int = 3) -> CosserveRpcError:
    with pytest.raises(CosserveRpcError) as err:
        ws.top_k(queries, corpus, k=k)
    return err.value


def test_stream_errors_have_status_codes(cpu_ws):
    q = np.ones((2, 4), np.float32)
    cpu_ws.feed_blob("C", np.ones((5, 4), np.float32))
    cpu_ws.feed_blob("ints", np.ones((5, 4), np.int32))
    cases = [
        (np.ones((2, 3), np.float32), "C", 3, grpc.StatusCode.INVALID_ARGUMENT, ("ScoreTopK", "'C'", "width 3", "width 4")),
        (q, "C", 0, grpc.StatusCode.INVALID_ARGUMENT, ("ScoreTopK", "k must be between 1 and the 5", "'C'")),
        (q, "C", 6, grpc.StatusCode.INVALID_ARGUMENT, ("ScoreTopK", "got 6")),
        (q, "ints", 3, grpc.StatusCode.INVALID_ARGUMENT, ("ScoreTopK", "'ints'", "int32")),
        (q.astype(np.float64), "C", 3, grpc.StatusCode.INVALID_ARGUMENT, ("float64", "float32", "corpus dtype")),
        (np.ones((2, 2, 2), np.float32), "C", 3, None, ("2-D",)),  # refused by the client
        (q, "missing", 3, grpc.StatusCode.NOT_FOUND, ("'missing'",)),
    ]
    for queries, corpus, k, code, words in cases:
        if code is None:
            with pytest.raises(ValueError, match="2-D"):
                cpu_ws.top_k(queries, corpus, k=k)
            continue
        err = stream_error(cpu_ws, queries, corpus, k)
        assert err.code() == code, (words, err)
        for word in words:
            assert word in err.details(), (word, err.details())


def test_stream_error_after_good_batches_keeps_their_replies(cpu_ws):
    cpu_ws.feed_blob("C", np.eye(4, dtype=np.float32))
    good = np.eye(4, dtype=np.float32)[:2]
    replies = []
    with pytest.raises(CosserveRpcError) as err:
        for reply in cpu_ws.iter_top_k([good, good, np.ones((1, 5), np.float32), good], "C", k=1):
            replies.append(reply)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(replies) == 2
    np.testing.assert_array_equal(replies[0][1], [[0], [1]])
    # the session still works
    np.testing.assert_array_equal(cpu_ws.top_k(good, "C", k=1)[1], [[0], [1]])


def test_stream_on_a_closed_session_is_not_found(client):
    session = client.session("cpu")
    session.feed_blob("C", np.eye(3, dtype=np.float32))
    session.close()
    assert stream_error(session, np.eye(3, dtype=np.float32)).code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("op", "outputs", "args", "words"),
    [
        ("CosineSimilarityMatrix", ["S"], {}, ("CosineSimilarityMatrix", "width 3", "width 4", "'c'")),
        ("CosineTopK", ["V", "I"], {}, ("CosineTopK", "width 3", "'c'")),
    ],
)
def test_op_shape_errors_name_op_and_blobs(cpu_ws, op, outputs, args, words):
    cpu_ws.feed_blob("q", np.ones((2, 3), np.float32))
    cpu_ws.feed_blob("c", np.ones((5, 4), np.float32))
    with pytest.raises(CosserveRpcError) as err:
        cpu_ws.run_operator(op, ["q", "c"], outputs, **args)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for word in words:
        assert word in err.value.details()


def test_op_k_and_dtype_errors(cpu_ws):
    cpu_ws.feed_blob("q", np.ones((2, 4), np.float32))
    cpu_ws.feed_blob("c", np.ones((5, 4), np.float32))
    cpu_ws.feed_blob("ints", np.ones((5, 4), np.int64))
    for k in (0, 6):
        with pytest.raises(CosserveRpcError) as err:
            cpu_ws.run_operator("CosineTopK", ["q", "c"], ["V", "I"], k=k)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "k must be between 1 and the 5" in err.value.details()
    with pytest.raises(CosserveRpcError) as err:
        cpu_ws.run_operator("CosineTopK", ["q", "ints"], ["V", "I"], k=2)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'ints'" in err.value.details()
    with pytest.raises(CosserveRpcError) as err:
        cpu_ws.run_operator("CosineTopK", ["q", "nope"], ["V", "I"], k=2)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "'nope'" in err.value.details()
    assert not cpu_ws.has_blob("V")


# ---- cosserve score ----------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cosserve.cli", "score", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COSSERVE_AUTH_TOKEN": ""},
    )


def test_cli_scores_files_with_an_embedded_server(tmp_path):
    rng = np.random.default_rng(8)
    corpus, queries = sample(rng, 700, 24, np.float32), sample(rng, 300, 24, np.float64)
    np.save(tmp_path / "corpus.npy", corpus)
    np.save(tmp_path / "queries.npy", queries)
    out = tmp_path / "result.npz"
    done = run_cli("--corpus", str(tmp_path / "corpus.npy"), "--queries", str(tmp_path / "queries.npy"),
                   "--k", "6", "--batch-size", "64", "--device", "cpu", "--out", str(out))
    assert done.returncode == 0, done.stderr
    with np.load(out) as result:
        # queries are cast to the corpus dtype, scores come back in it
        assert_top_k((result["scores"], result["indices"]), queries.astype(np.float32), corpus, 6, atol=1e-5)


def test_cli_uses_a_running_server(tmp_path, server):
    rng = np.random.default_rng(9)
    corpus, queries = sample(rng, 50, 8, np.float16), sample(rng, 20, 8, np.float16)
    np.save(tmp_path / "c.npy", corpus)
    np.save(tmp_path / "q.npy", queries)
    out = tmp_path / "r.npz"
    code = cli.main(["score", "--corpus", str(tmp_path / "c.npy"), "--queries", str(tmp_path / "q.npy"),
                     "--k", "3", "--server", server.address, "--device", "cpu", "--out", str(out)])
    assert code == 0
    with np.load(out) as result:
        assert_top_k((result["scores"], result["indices"]), queries, corpus, 3, atol=1e-3)


def test_cli_usage_errors_exit_2_with_one_line(tmp_path):
    np.save(tmp_path / "c.npy", np.ones((5, 4), np.float32))
    np.save(tmp_path / "q.npy", np.ones((3, 3), np.float32))
    np.save(tmp_path / "ints.npy", np.ones((5, 4), np.int32))
    np.save(tmp_path / "flat.npy", np.ones(4, np.float32))
    out = str(tmp_path / "r.npz")
    cases = [
        (("--corpus", str(tmp_path / "missing.npy"), "--queries", str(tmp_path / "q.npy")), "does not exist"),
        (("--corpus", str(tmp_path / "c.npy"), "--queries", str(tmp_path / "q.npy")), "widths must match"),
    ]
    for args, words in cases:
        done = run_cli(*args, "--out", out)
        assert done.returncode == 2, done
        assert words in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    in_process = [  # the same checks, without a subprocess each
        (("--corpus", str(tmp_path / "ints.npy"), "--queries", str(tmp_path / "q.npy")), "int32"),
        (("--corpus", str(tmp_path / "flat.npy"), "--queries", str(tmp_path / "q.npy")), "2-D"),
        (("--corpus", str(tmp_path / "c.npy"), "--queries", str(tmp_path / "c.npy"), "--k", "6"), "between 1 and the 5"),
    ]
    for args, words in in_process:
        assert cli.main(["score", *args, "--out", out]) == 2
    assert not os.path.exists(out)
