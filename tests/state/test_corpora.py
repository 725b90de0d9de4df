"""Shared corpora `@NAME` (issue 10): mapped from .npy and .safetensors at start or published by a
session, read by every session's ops and scoring without a copy, never written, held once."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import start_process, start_server

from cosserve import Client, CosserveRpcError
from cosserve.cli import main as cli_main

psutil = pytest.importorskip("psutil")

D = 16
NPY_ROWS, ST_ROWS = 500, 300


def _cosine(q: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Independent reference: float64 cosine with Caffe2's 1e-12 floor on each squared norm."""
    q64, c64 = q.astype(np.float64), c.astype(np.float64)
    qn = np.sqrt(np.maximum((q64 * q64).sum(1), 1e-12))
    cn = np.sqrt(np.maximum((c64 * c64).sum(1), 1e-12))
    return (q64 @ c64.T) / qn[:, None] / cn[None, :]


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """A safetensors file written by hand from the format's spec (an 8-byte header length, a JSON
    header, the data), so the server's reader is checked against the format, not against itself."""
    header: dict[str, object] = {"__metadata__": {"by": "test_corpora"}}
    offset, blobs = 0, []
    for key, array in tensors.items():
        data = np.ascontiguousarray(array).tobytes()
        header[key] = {"dtype": {"float32": "F32", "float64": "F64"}[array.dtype.name], "shape": list(array.shape),
                       "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    rng = np.random.default_rng(10)
    folder = tmp_path_factory.mktemp("corpora")
    npy = rng.standard_normal((NPY_ROWS, D)).astype(np.float32)
    st = rng.standard_normal((ST_ROWS, D)).astype(np.float32)
    np.save(folder / "npy.npy", npy)
    _write_safetensors(folder / "two.safetensors", {"emb": st, "other": np.zeros((2, 2), np.float64)})
    return {"npy": npy, "st": st, "npy_path": folder / "npy.npy", "st_path": folder / "two.safetensors"}


@pytest.fixture(scope="module")
def server(corpus_files):
    running = start_server(
        corpus=(f"vecs={corpus_files['npy_path']}", f"emb={corpus_files['st_path']}:emb"),
        max_published_bytes=1024**2,
    )
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address) as c:
        yield c


def test_list_corpora_shows_dtype_shape_bytes_and_source(client, corpus_files):
    found = {c.name: c for c in client.corpora() if c.name in ("vecs", "emb")}
    assert found["vecs"].dtype == "float32" and found["vecs"].shape == (NPY_ROWS, D)
    assert found["vecs"].nbytes == NPY_ROWS * D * 4 and found["vecs"].source == str(corpus_files["npy_path"])
    assert found["emb"].shape == (ST_ROWS, D) and found["emb"].source == f"{corpus_files['st_path']}:emb"


@pytest.mark.parametrize(("corpus", "key"), [("@vecs", "npy"), ("@emb", "st")])
def test_top_k_and_ops_read_a_corpus(client, corpus_files, corpus, key):
    reference = corpus_files[key]
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((7, D)).astype(np.float32)
    expected = _cosine(queries, reference)
    with client.session("cpu") as ws:
        scores, indices = ws.top_k(queries, corpus=corpus, k=5)
        np.testing.assert_array_equal(indices, np.argsort(-expected, axis=1, kind="stable")[:, :5])
        np.testing.assert_allclose(scores, np.take_along_axis(expected, indices, 1), rtol=1e-5, atol=1e-6)

        ws.feed_blob("Q", queries)
        ws.run_operator("CosineSimilarityMatrix", ["Q", corpus], ["S"])
        np.testing.assert_allclose(ws.fetch_blob("S"), expected, rtol=1e-5, atol=1e-6)
        # A net reads the corpus beside a staged output: S2 = cos(corpus rows, corpus rows).
        ws.run_net([("Cos", [corpus], ["N"]), ("CosineSimilarity", [corpus, corpus], ["S2"])])
        np.testing.assert_allclose(ws.fetch_blob("S2"), np.ones(reference.shape[0]), rtol=1e-5)
        # Fetching it reads it too, bit-exact; the session holds none of it.
        np.testing.assert_array_equal(ws.fetch_blob(corpus), reference)
        assert corpus not in ws.blobs()


def test_corpus_norms_are_cached_once_for_every_session(server, client, corpus_files):
    queries = np.ones((2, D), np.float32)
    for _ in range(3):
        with client.session("cpu") as ws:
            ws.top_k(queries, corpus="@vecs", k=1)
            ws.top_k(queries, corpus="@emb", k=1)
            assert len(ws_norms := server.store.get(ws.id).norms) == 0, ws_norms  # none in the session's own cache
    assert len(server.store.corpora.norms) == 2  # one entry per corpus, not one per session


@pytest.mark.parametrize(
    "write",
    [
        lambda ws: ws.feed_blob("@vecs", np.zeros((2, D), np.float32)),
        lambda ws: ws.feed_blob("@new", np.zeros((2, D), np.float32)),
        lambda ws: ws.feed_blob("@vecs", np.zeros((1024, 1024), np.float32)),  # streamed
        lambda ws: ws.run_operator("Cos", ["@vecs"], ["@vecs"]),
        lambda ws: ws.remove_blob("@vecs"),
    ],
    ids=["feed", "feed-new-@name", "feed-stream", "op-output", "remove"],
)
def test_writing_a_corpus_is_refused(client, corpus_files, write):
    with client.session("cpu") as ws:
        with pytest.raises(CosserveRpcError) as caught:
            write(ws)
        assert caught.value.code().name == "INVALID_ARGUMENT"
        assert "shared corpora are read-only" in caught.value.details()
        np.testing.assert_array_equal(ws.fetch_blob("@vecs"), corpus_files["npy"])


@pytest.mark.parametrize(
    "read",
    [
        lambda ws: ws.top_k(np.ones((1, D), np.float32), corpus="@nope", k=1),
        lambda ws: ws.run_operator("Cos", ["@nope"], ["Y"]),
        lambda ws: ws.fetch_blob("@nope"),
    ],
    ids=["top_k", "op", "fetch"],
)
def test_an_unknown_corpus_is_not_found(client, read):
    with client.session("cpu") as ws:
        with pytest.raises(CosserveRpcError) as caught:
            read(ws)
        assert caught.value.code().name == "NOT_FOUND"
        assert "'@nope'" in caught.value.details()


def test_a_published_blob_is_read_by_another_session(client):
    rows = np.random.default_rng(3).standard_normal((40, D)).astype(np.float32)
    with client.session("cpu") as owner:
        owner.feed_blob("mine", rows)
        owner.publish_corpus("mine", "pub")
        owner.remove_blob("mine")  # the corpus keeps the tensor; the session's charge goes
        with pytest.raises(CosserveRpcError) as taken:
            owner.publish_corpus("@pub", "again")
        assert taken.value.code().name == "INVALID_ARGUMENT"
    with client.session("cpu") as other:
        np.testing.assert_array_equal(other.fetch_blob("@pub"), rows)
        _, indices = other.top_k(rows[:3], corpus="@pub", k=1)
        np.testing.assert_array_equal(indices[:, 0], [0, 1, 2])
        other.feed_blob("x", rows)
        with pytest.raises(CosserveRpcError) as exists:
            other.publish_corpus("x", "pub")
        assert exists.value.code().name == "FAILED_PRECONDITION" and "already exists" in exists.value.details()
        with pytest.raises(CosserveRpcError) as bad:
            other.publish_corpus("x", "no/slash")
        assert bad.value.code().name == "INVALID_ARGUMENT"
        # --max-published-bytes (1 MiB here) bounds what all publishers together may hold.
        other.feed_blob("big", np.zeros((512, 1024), np.float32))
        with pytest.raises(CosserveRpcError) as full:
            other.publish_corpus("big", "big")
        assert full.value.code().name == "RESOURCE_EXHAUSTED" and "--max-published-bytes" in full.value.details()
    info = {c.name: c for c in client.corpora()}["pub"]
    assert info.shape == (40, D) and info.source.startswith("published")


def test_cosserve_score_against_a_servers_corpus(server, corpus_files, tmp_path):
    queries = np.random.default_rng(4).standard_normal((9, D))  # float64: cast to the corpus dtype
    np.save(tmp_path / "q.npy", queries)
    out = tmp_path / "out.npz"
    argv = ["score", "--server", server.address, "--corpus", "@vecs", "--queries", str(tmp_path / "q.npy"),
            "--k", "4", "--out", str(out)]
    assert cli_main(argv) == 0
    result = np.load(out)
    expected = _cosine(queries.astype(np.float32), corpus_files["npy"])
    np.testing.assert_array_equal(result["indices"], np.argsort(-expected, axis=1, kind="stable")[:, :4])
    assert cli_main([*argv[:4], "@missing", *argv[5:]]) == 2


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("x=/nonexistent/c.npy", "cannot read"),
        ("x={st}", "holds 2 tensors"),
        ("x={st}:nokey", "has no tensor 'nokey'"),
        ("x={junk}", "is not a readable .npy file"),
    ],
)
def test_a_bad_corpus_file_is_one_start_up_line(corpus_files, tmp_path, spec, reason):
    junk = tmp_path / "junk.npy"
    junk.write_bytes(b"not numpy at all")
    spec = spec.format(st=corpus_files["st_path"], junk=junk)
    script = "import sys; from cosserve.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run(
        [sys.executable, "-c", script, "serve", "--port", "0", "--http-port", "0", "--device", "cpu", "--corpus", spec],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cosserve serve: --corpus ") and reason in lines[0], done.stderr


def _rss(pid: int, path: Path) -> tuple[int, int]:
    """(resident bytes of the process, of them those of its mappings of `path`)."""
    process = psutil.Process(pid)
    mapped = sum(m.rss for m in process.memory_maps(grouped=True) if m.path == str(path))
    return process.memory_info().rss, mapped


def test_a_corpus_is_mapped_at_start_and_held_once_by_eight_sessions(tmp_path):
    # 256 MiB of float32 (65536 x 1024), written in pieces so this test never holds it all.
    rows, width = 65536, 1024
    path = tmp_path / "big.npy"
    big = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, width))
    rng = np.random.default_rng(5)
    for start in range(0, rows, 8192):
        big[start : start + 8192] = rng.standard_normal((8192, width), dtype=np.float32)
    probe = np.array(big[[0, 12345, rows - 1]])
    big.flush()
    del big
    size = path.stat().st_size
    proc, address = start_process("--corpus", f"big={path}")
    try:
        with Client(address) as client:
            client.corpora()  # the server is serving
            rss_start, mapped_start = _rss(proc.pid, path)
            sessions = [client.session("cpu") for _ in range(8)]
            for ws in sessions:
                _, indices = ws.top_k(probe, corpus="@big", k=1)
                np.testing.assert_array_equal(indices[:, 0], [0, 12345, rows - 1])
            rss_after, mapped_after = _rss(proc.pid, path)
            for ws in sessions:
                ws.close()
    finally:
        proc.terminate()
        proc.wait(30)
    # Mapped, not read: at start only the header's page of the file is resident.
    assert mapped_start <= 1024**2, f"{mapped_start >> 20} MiB of the corpus file resident right after start"
    # Its pages once (the map's), plus scoring's tiles and norms; copies would be 8 x 256 MiB more.
    assert mapped_after <= size + 4096  # whole pages
    grown = (rss_after - mapped_after) - (rss_start - mapped_start)
    assert grown <= 96 * 1024**2, f"RSS besides the map grew {grown >> 20} MiB with 8 sessions on a {size >> 20} MiB corpus"
    assert rss_after - rss_start <= size + 96 * 1024**2
