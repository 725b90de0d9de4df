"""Shared corpora read from Parquet (and folders of Parquet files or .npy shards) keep their rows'
ids, int64 or strings, and top-k and range replies carry them; checked through a real server
against the files the tests write and a float64 reference."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from cosserve import Client, CosserveRpcError, limits
from cosserve.v1 import cosserve_pb2 as pb
from cosserve.v1 import cosserve_pb2_grpc as pb_grpc
from tests.conftest import start_server

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

D = 8
ROWS = 600


def _cosine(q: np.ndarray, c: np.ndarray) -> np.ndarray:
    q64, c64 = q.astype(np.float64), c.astype(np.float64)
    qn = np.sqrt(np.maximum((q64 * q64).sum(1), 1e-12))
    cn = np.sqrt(np.maximum((c64 * c64).sum(1), 1e-12))
    return (q64 @ c64.T) / qn[:, None] / cn[None, :]


def _write_parquet(path: Path, vectors: np.ndarray, ids: np.ndarray | list[str], row_group_size: int = 128) -> None:
    table = pa.table({
        "id": pa.array(ids),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1]),
    })  # fmt: skip
    pq.write_table(table, path, row_group_size=row_group_size)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    rng = np.random.default_rng(20)
    folder = tmp_path_factory.mktemp("idcorpora")
    vectors = rng.standard_normal((ROWS, D)).astype(np.float32)
    int_ids = rng.choice(2**62, ROWS, replace=False).astype(np.int64)
    str_ids = [f"doc-{i:05d}-" + "é" * (i % 7) for i in rng.permutation(ROWS)]
    _write_parquet(folder / "ints.parquet", vectors, int_ids)
    parts = folder / "parts"
    parts.mkdir()
    for n, (start, stop) in enumerate([(0, 250), (250, 251), (251, ROWS)]):  # a folder of files, one of one row
        _write_parquet(parts / f"part-{n}.parquet", vectors[start:stop], str_ids[start:stop])
    shards = folder / "shards"
    shards.mkdir()
    np.save(shards / "0.npy", vectors[:300])
    np.save(shards / "1.npy", vectors[300:])
    return {"vectors": vectors, "int_ids": int_ids, "str_ids": np.array(str_ids, dtype=object),
            "ints": folder / "ints.parquet", "parts": parts, "shards": shards}  # fmt: skip


@pytest.fixture(scope="module")
def server(corpora):
    running = start_server(corpus=(f"ints={corpora['ints']}", f"strs={corpora['parts']}", f"plain={corpora['shards']}"))
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address) as c:
        yield c


def test_list_corpora_says_which_have_ids(client):
    listed = {c.name: c for c in client.corpora()}
    assert (listed["ints"].id_type, listed["strs"].id_type, listed["plain"].id_type) == ("int64", "string", "")
    assert listed["strs"].shape == (ROWS, D) and listed["plain"].shape == (ROWS, D)


@pytest.mark.parametrize("corpus", ["ints", "strs", "plain"])
def test_top_k_of_a_parquet_or_shard_corpus_equals_a_float64_reference(client, corpora, corpus):
    rng = np.random.default_rng(21)
    q = rng.standard_normal((9, D)).astype(np.float32)
    with client.session("cpu") as ws:
        scores, indices = ws.top_k(q, f"@{corpus}", k=4)
    ref = _cosine(q, corpora["vectors"])
    np.testing.assert_array_equal(indices, np.argsort(-ref, axis=1, kind="stable")[:, :4])
    np.testing.assert_allclose(scores, np.take_along_axis(ref, indices, 1), atol=1e-5)


@pytest.mark.parametrize(("corpus", "key"), [("ints", "int_ids"), ("strs", "str_ids")])
def test_top_k_and_range_replies_carry_the_rows_ids(client, corpora, corpus, key):
    rng = np.random.default_rng(22)
    q = rng.standard_normal((30, D)).astype(np.float32)
    ids = corpora[key]
    with client.session("cpu") as ws:
        scores, indices, found = ws.top_k(q, f"@{corpus}", k=5, ids=True)
        assert found.shape == (30, 5)
        np.testing.assert_array_equal(found, ids[indices])
        result = ws.range_search(q, f"@{corpus}", 0.5, batch_size=7)  # ids=None: the corpus has them, so they come
        assert result.ids is not None and len(result.ids) == len(result.indices) > 0
        np.testing.assert_array_equal(result.ids, ids[result.indices])
        assert ws.range_search(q, f"@{corpus}", 0.5, ids=False).ids is None
        capped = ws.range_search(q, f"@{corpus}", 0.2, max_per_query=3, ids=True)
        np.testing.assert_array_equal(capped.ids, ids[capped.indices])


def test_asking_ids_of_a_corpus_without_them_is_invalid_argument(client):
    q = np.ones((1, D), np.float32)
    with client.session("cpu") as ws:
        ws.feed_blob("C", np.ones((4, D), np.float32))
        for corpus in ("@plain", "C"):
            with pytest.raises(CosserveRpcError) as err:
                ws.top_k(q, corpus, k=1, ids=True)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no row ids" in err.value.details()
            with pytest.raises(CosserveRpcError) as err:
                ws.range_search(q, corpus, 0.5, ids=True)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no row ids" in err.value.details()
        assert ws.range_search(q, "@plain", 0.5).ids is None  # ids=None: none asked of a corpus without


def test_string_ids_past_one_reply_are_resource_exhausted(tmp_path):
    """Ids count in a reply's bound: 7,000 rows of 1,024-byte ids pass one message."""
    rows = 7000
    vectors = np.ones((rows, 2), np.float32)
    _write_parquet(tmp_path / "long.parquet", vectors, [f"{i:06d}" + "x" * (limits.MAX_ID_BYTES - 6) for i in range(rows)])
    running = start_server(corpus=(f"long={tmp_path / 'long.parquet'}",))
    try:
        with Client(running.address) as client, client.session("cpu") as ws:
            with pytest.raises(CosserveRpcError) as err:
                ws.range_search(np.ones((1, 2), np.float32), "@long", 0.5, ids=True)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "ids" in err.value.details()
            result = ws.range_search(np.ones((1, 2), np.float32), "@long", 0.5, max_per_query=1000, ids=True)
            assert result.ids[0] == "000000" + "x" * (limits.MAX_ID_BYTES - 6) and result.truncated.all()
            # ScoreTopK with ids, sent raw with more queries than the client would put in one message
            request = pb.TopKRequest(session_id=ws.id, corpus="@long", k=7000, with_ids=True,
                                     queries=pb.Tensor(dtype=pb.FLOAT32, shape=[1, 2], data=np.ones((1, 2), np.float32).tobytes()))
            with grpc.insecure_channel(running.address) as channel, pytest.raises(grpc.RpcError) as raw:
                list(pb_grpc.CosserveStub(channel).ScoreTopK(iter([request]), timeout=10))
            assert raw.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "fewer queries" in raw.value.details()
    finally:
        running.stop(0)


@pytest.mark.parametrize(
    ("write", "reason"),
    [
        (lambda p: _write_parquet(p, np.ones((3, 2), np.float32), ["a", "b", "c" * (limits.MAX_ID_BYTES + 1)]), "at most 1024"),
        (lambda p: pq.write_table(pa.table({"id": [1, 2], "embedding": [[1.0, 2.0], [3.0]]}), p), "corpus"),
        (lambda p: p.write_bytes(b"PAR1 not really parquet"), "corpus"),
    ],
    ids=["long string id", "mixed dimensions", "corrupt file"],
)
def test_a_bad_parquet_corpus_is_one_start_up_line(tmp_path, write, reason):
    path = tmp_path / "bad.parquet"
    write(path)
    script = "import sys; from cosserve.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run(
        [sys.executable, "-c", script, "serve", "--port", "0", "--device", "cpu", "--corpus", f"bad={path}"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cosserve serve: --corpus ") and reason in lines[0], done.stderr


def test_the_asyncio_client_gets_the_same_ids(server, corpora):
    import asyncio

    from cosserve import aio

    q = np.random.default_rng(23).standard_normal((5, D)).astype(np.float32)

    async def ask() -> tuple:
        async with aio.Client(server.address) as client, client.session("cpu") as ws:
            return await ws.top_k(q, "@strs", k=3, ids=True), await ws.range_search(q, "@ints", 0.4)

    (scores, indices, found), result = asyncio.run(ask())
    np.testing.assert_array_equal(found, corpora["str_ids"][indices])
    np.testing.assert_array_equal(result.ids, corpora["int_ids"][result.indices])
