"""ScoreTopK's shared passes: batches of many callers scored in one pass over a corpus, each result
bit for bit what the batch gets alone; cancels, deadlines, stalled readers, fairness and charges,
against real servers, and the pass's kernel against float64 numpy."""

from __future__ import annotations

import re
import socket
import threading
import time
import urllib.request

import grpc
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cosserve import Client
from cosserve.v1 import cosserve_pb2 as pb
from cosserve.v1 import cosserve_pb2_grpc as pb_grpc
from tests.conftest import start_server

torch = pytest.importorskip("torch")

from cosserve.server.compute import similarity  # noqa: E402

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float64": np.float64}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
WIRE = {np.dtype(np.float32): pb.FLOAT32, np.dtype(np.float16): pb.FLOAT16, np.dtype(ml_dtypes.bfloat16): pb.BFLOAT16}


def ref_top_k(q: np.ndarray, c: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 numpy: cosine with squared norms floored at 1e-12, by (-score, index)."""
    q, c = q.astype(np.float64), c.astype(np.float64)
    qn = np.sqrt(np.maximum(np.einsum("nd,nd->n", q, q), 1e-12))
    cn = np.sqrt(np.maximum(np.einsum("md,md->m", c, c), 1e-12))
    s = (q @ c.T) / qn[:, None] / cn[None, :]
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), order


def assert_near_reference(scores: np.ndarray, indices: np.ndarray, q: np.ndarray, c: np.ndarray, k: int, atol: float) -> None:
    """Scores close to float64's; indices equal but where float64 scores tie within rounding."""
    want_s, want_i = ref_top_k(q, c, k)
    np.testing.assert_allclose(scores.astype(np.float64), want_s, rtol=0, atol=atol)
    differ = indices != want_i
    if differ.any():
        picked = ref_top_k(q, c, c.shape[0])[0]  # every score, sorted: a returned row must score its rank
        full = (q.astype(np.float64) @ c.astype(np.float64).T)
        qn = np.linalg.norm(q.astype(np.float64), axis=1)[:, None]
        cn = np.linalg.norm(c.astype(np.float64), axis=1)[None, :]
        got = np.take_along_axis(full / np.maximum(qn, 1e-6) / np.maximum(cn, 1e-6), indices, 1)
        np.testing.assert_allclose(got[differ], picked[:, :k][differ], rtol=0, atol=atol)


def alone(q: np.ndarray, c: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The batch scored by itself, by the server's own code, in this process."""
    s, i = similarity.top_k(torch.from_numpy(np.ascontiguousarray(q)), torch.from_numpy(np.ascontiguousarray(c)), k)
    return s.numpy(), i.numpy()


# ---- the kernel: one pass for many parts --------------------------------------------------


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("m, d", [(5000, 384), (4099, 33), (70, 7), (3, 1)])
def test_a_pass_gives_each_part_what_it_gets_alone(dtype_name, m, d):
    rng = np.random.default_rng(m + d)
    dtype = TORCH_DTYPES[dtype_name]
    corpus = torch.from_numpy(rng.standard_normal((m, d))).to(dtype)
    norms = similarity.inverse_norms(corpus)
    sizes = [(1, 1), (3, 10), (17, 50), (300, 5), (2, m), (1, 3), (257, 2)]
    parts = [(torch.from_numpy(rng.standard_normal((n, d))).to(dtype), min(k, m)) for n, k in sizes]
    together = similarity.top_k_pass(corpus, norms, [(similarity.normalized(q), k) for q, k in parts])
    for (q, k), (scores, indices) in zip(parts, together):
        by_itself = similarity.top_k(q, corpus, k, norms)
        assert torch.equal(scores, by_itself[0]) and torch.equal(indices, by_itself[1])  # bit for bit
        assert scores.dtype == dtype and indices.shape == (q.shape[0], k)
        c64, q64 = corpus.double().numpy(), q.double().numpy()  # against the stored values
        atol = {"float32": 1e-5, "float64": 1e-12}.get(dtype_name, 1e-2)
        assert_near_reference(scores.double().numpy(), indices.numpy(), q64, c64, k, atol)


@pytest.mark.parametrize("d", [1, 33, 384, 768])
def test_a_rows_scores_do_not_depend_on_the_tile_it_shares(d):
    """The premise of a shared pass on the CPU's float32 kernel (float16 and bfloat16 corpora are
    scored in it too): every tile height a pass uses gives a row the same scores, wherever the row
    sits, so the check passes and batches share tiles."""
    dtype = torch.float32
    widths = (similarity._chunk_rows(d, torch.device("cpu"), dtype), 77)
    similarity._INDEPENDENT.clear()
    assert similarity._rows_independent(torch.device("cpu"), dtype, d, widths)
    rng = torch.Generator().manual_seed(d)
    chunk = torch.randn(widths[0], d, generator=rng, dtype=dtype)
    row = torch.randn(1, d, generator=rng, dtype=dtype)
    first = None
    for h in similarity._heights():
        for place in {0, h // 2, h - 1}:
            tile = torch.randn(h, d, generator=rng, dtype=dtype)
            tile[place] = row
            got = similarity._gemm(tile, chunk, None)[place]
            first = got if first is None else first
            assert torch.equal(got, first), (h, place)


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("n", [1, 3, 300])
def test_the_tiles_of_the_matrix_and_range_search_give_top_ks_scores(dtype_name, n):
    """similarity.score_tiles (CosineSimilarityMatrix, range search) lays its queries as a pass does,
    so the score of every pair is the one top-k reports, bit for bit."""
    rng = np.random.default_rng(n)
    dtype = TORCH_DTYPES[dtype_name]
    corpus = torch.from_numpy(rng.standard_normal((5000, 33))).to(dtype)
    q = torch.from_numpy(rng.standard_normal((n, 33))).to(dtype)
    norms = similarity.inverse_norms(corpus)
    scores, indices = similarity.top_k(q, corpus, 7, norms)
    assert torch.equal(similarity.similarity_matrix(q, corpus, norms).gather(1, indices), scores)


def test_where_rows_would_differ_each_part_is_scored_by_itself(monkeypatch):
    """MKL's float64 GEMM gives some rows other bits in another tile height: there, a pass scores
    each part alone, whole, and the result is still each part's own."""
    monkeypatch.setattr(similarity, "_rows_independent", lambda *args: False)
    scans = []
    original = similarity._pass
    monkeypatch.setattr(similarity, "_pass", lambda corpus, norms, parts: scans.append(len(parts)) or original(corpus, norms, parts))
    rng = np.random.default_rng(3)
    corpus = torch.from_numpy(rng.standard_normal((300, 8)))
    norms = similarity.inverse_norms(corpus)
    parts = [(torch.from_numpy(rng.standard_normal((n, 8))), k) for n, k in ((3, 4), (260, 2))]
    together = similarity.top_k_pass(corpus, norms, [(similarity.normalized(q), k) for q, k in parts])
    assert scans == [1, 1]
    for (q, k), (scores, indices) in zip(parts, together):
        assert_near_reference(scores.numpy(), indices.numpy(), q.numpy(), corpus.numpy(), k, 1e-12)
        by_itself = similarity.top_k(q, corpus, k, norms)
        assert torch.equal(scores, by_itself[0]) and torch.equal(indices, by_itself[1])


# ---- real servers --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def pass_counts(port: int) -> tuple[int, int, float]:
    """(passes, passes of one query, queries) from the server's metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()

    def value(sample: str) -> float:
        match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
        return float(match.group(1)) if match else 0.0

    return (
        int(value("cosserve_score_pass_queries_count")),
        int(value('cosserve_score_pass_queries_bucket{le="1.0"}')),
        value("cosserve_score_pass_queries_sum"),
    )


def max_pass(port: int) -> float:
    """The smallest bucket bound that holds every pass."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    total = pass_counts(port)[0]
    for bound, count in re.findall(r'^cosserve_score_pass_queries_bucket\{le="([^"]+)"\} (\S+)$', text, re.M):
        if float(count) == total:
            return float(bound)
    raise AssertionError("no bucket holds every pass")


def request(session_id: str, corpus: str, q: np.ndarray, k: int) -> pb.TopKRequest:
    return pb.TopKRequest(
        session_id=session_id, corpus=corpus, k=k, queries=pb.Tensor(dtype=WIRE[q.dtype], shape=q.shape, data=q.tobytes())
    )


def reply(message: pb.TopKResponse) -> tuple[np.ndarray, np.ndarray]:
    from cosserve.tensors import from_wire

    return from_wire(message.scores), from_wire(message.indices)


def held(running, session_ids) -> dict[str, int]:
    """The bytes each session has charged: its blobs, and whatever is in flight."""
    return {sid: running.store.get(sid).held_bytes() for sid in session_ids}


def settled(running, baseline: dict[str, int], timeout_s: float = 20.0) -> dict[str, int]:
    """Each session's charge, once in-flight work has let go of it (or timeout_s has passed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = held(running, baseline)
        if now == baseline or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


@pytest.fixture(scope="module")
def batching_server():
    """A server whose passes wait up to 50 ms for company, so concurrent callers share them."""
    port = _free_port()
    running = start_server(metrics_port=port, score_max_queue_delay_s=0.05)
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def shared(batching_server):
    """Three sessions of one client, a shared corpus @shared-16 and a blob C in session 0."""
    rng = np.random.default_rng(11)
    corpus = rng.standard_normal((3000, 16)).astype(np.float32)
    blob = rng.standard_normal((500, 16)).astype(np.float32)
    with Client(batching_server.address) as client:
        sessions = [client.session("cpu") for _ in range(3)]
        sessions[0].feed_blob("pub", corpus)
        sessions[0].publish_corpus("pub", "shared-16")
        sessions[0].remove_blob("pub")
        sessions[0].feed_blob("C", blob)
        yield client, sessions, {"@shared-16": corpus, "C": blob}
        for s in sessions:
            s.close()


def test_concurrent_callers_share_a_pass_and_each_gets_its_own_rows(batching_server, shared):
    client, sessions, corpora = shared
    corpus = corpora["@shared-16"]
    rng = np.random.default_rng(12)
    asks = [(sessions[i % 3], rng.standard_normal((1 + i % 4, 16)).astype(np.float32), 1 + i) for i in range(8)]
    results: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(asks)
    barrier = threading.Barrier(len(asks))
    before = pass_counts(batching_server.metrics_port)

    def call(i: int) -> None:
        session, q, k = asks[i]
        barrier.wait(timeout=30)
        results[i] = session.top_k(q, "@shared-16", k=k)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    after = pass_counts(batching_server.metrics_port)
    passes, singles, queries = (a - b for a, b in zip(after, before))
    assert queries == sum(len(q) for _, q, _ in asks)
    assert passes < len(asks)  # some pass held the batches of several callers
    for (session, q, k), got in zip(asks, results):
        assert got is not None
        want = alone(q, corpus, k)
        np.testing.assert_array_equal(got[0], want[0])  # bit for bit, scores and indices
        np.testing.assert_array_equal(got[1], want[1])
        assert_near_reference(got[0], got[1], q, corpus, k, 1e-5)


# One caller of the property test: its session, corpus, k, batch sizes and what it does.
CALLERS = st.lists(
    st.tuples(
        st.integers(0, 2),
        st.sampled_from(["@shared-16", "C"]),
        st.integers(1, 40),
        st.lists(st.integers(0, 70), min_size=1, max_size=4),
        st.sampled_from(["read", "read", "read", "cancel", "deadline", "float16"]),
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(callers=CALLERS, seed=st.integers(0, 2**32 - 1))
def test_any_interleaving_gives_every_caller_its_batches_scored_alone(batching_server, shared, callers, seed):
    client, sessions, corpora = shared
    baseline = held(batching_server, [s.id for s in sessions])
    channel = grpc.insecure_channel(batching_server.address)
    stub = pb_grpc.CosserveStub(channel)
    outcomes: list[object] = [None] * len(callers)
    barrier = threading.Barrier(len(callers))

    def call(i: int) -> None:
        session_index, corpus_name, k, sizes, action = callers[i]
        session = sessions[session_index]
        name = corpus_name if corpus_name.startswith("@") or session_index == 0 else "@shared-16"
        corpus = corpora[name]
        k = min(k, corpus.shape[0])
        batches = [np.random.default_rng(seed + i * 7 + j).standard_normal((n, 16)).astype(np.float32) for j, n in enumerate(sizes)]
        if action == "float16":  # a batch the corpus refuses: INVALID_ARGUMENT, after the good ones
            batches.append(batches[0].astype(np.float16))
        barrier.wait(timeout=30)
        call = stub.ScoreTopK(
            iter([request(session.id, name, b, k) for b in batches]), timeout=0.002 if action == "deadline" else 30
        )
        got = []
        try:
            for message in call:
                got.append(reply(message))
                if action == "cancel":
                    call.cancel()
                    break
        except grpc.RpcError as err:
            outcomes[i] = (name, k, batches, got, err.code())
            return
        outcomes[i] = (name, k, batches, got, None)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(callers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    channel.close()
    for (_, _, _, _, action), outcome in zip(callers, outcomes):
        name, k, batches, got, code = outcome
        corpus = corpora[name]
        assert code in {
            "read": (None,), "cancel": (None, grpc.StatusCode.CANCELLED), "deadline": (None, grpc.StatusCode.DEADLINE_EXCEEDED),
            "float16": (grpc.StatusCode.INVALID_ARGUMENT,),
        }[action], (action, code)
        if action in ("read", "float16"):
            assert len(got) == len(batches) - (action == "float16")
        for batch, (scores, indices) in zip(batches, got):
            want = alone(batch, corpus, k)
            np.testing.assert_array_equal(scores, want[0])
            np.testing.assert_array_equal(indices, want[1])
            if len(batch):
                assert_near_reference(scores, indices, batch, corpus, k, 1e-5)
    # Whatever each caller did, nothing stays charged once the calls are over.
    assert settled(batching_server, baseline) == baseline


def test_a_cancelled_caller_frees_its_charge_and_is_not_scored():
    port = _free_port()
    running = start_server(metrics_port=port, score_max_queue_delay_s=30.0)  # a lone batch waits for company
    try:
        with Client(running.address) as client, client.session("cpu") as session:
            session.feed_blob("C", np.ones((100, 16), np.float32))
            workspace = running.store.get(session.id)
            stored = workspace.held_bytes()
            q = np.ones((64, 16), np.float32)
            channel = grpc.insecure_channel(running.address)
            call = pb_grpc.CosserveStub(channel).ScoreTopK(iter([request(session.id, "C", q, 10)]), timeout=60)
            deadline = time.monotonic() + 20
            while workspace.held_bytes() == stored and time.monotonic() < deadline:
                time.sleep(0.01)
            charged = workspace.held_bytes() - stored
            assert charged >= q.nbytes + 64 * 10 * 12  # the queries and their results, while it waits
            call.cancel()
            assert settled(running, {session.id: stored}) == {session.id: stored}
            assert pass_counts(port)[0] == 0  # its pass had not started: never scored
            channel.close()
    finally:
        running.stop(0)


def test_a_caller_that_stops_reading_holds_no_pass(batching_server, shared):
    client, sessions, corpora = shared
    corpus = corpora["@shared-16"]
    q = np.random.default_rng(13).standard_normal((64, 16)).astype(np.float32)
    baseline = held(batching_server, [sessions[1].id])
    channel = grpc.insecure_channel(batching_server.address)
    try:
        # Batches whose replies (768 KB each, 77 MB in all) are never read: they fill the flow
        # control window, and the stream stalls with a reply on its way and two batches staged.
        stalled = pb_grpc.CosserveStub(channel).ScoreTopK(
            iter([request(sessions[1].id, "@shared-16", q, 1000)] * 100), timeout=120
        )
        before = pass_counts(batching_server.metrics_port)[0]
        for round_ in range(5):  # others go on being scored, pass after pass
            got = sessions[2].top_k(q[: round_ + 1], "@shared-16", k=5)
            want = alone(q[: round_ + 1], corpus, 5)
            np.testing.assert_array_equal(got[1], want[1])
        assert pass_counts(batching_server.metrics_port)[0] >= before + 5
        stalled.cancel()
    finally:
        channel.close()
    assert settled(batching_server, baseline) == baseline


def test_a_huge_batch_does_not_starve_a_small_caller():
    port = _free_port()
    running = start_server(metrics_port=port, score_pass_queries=8)
    try:
        rng = np.random.default_rng(14)
        corpus = rng.standard_normal((20000, 32)).astype(np.float32)
        big = rng.standard_normal((4000, 32)).astype(np.float32)
        small = rng.standard_normal((1, 32)).astype(np.float32)
        done: list[str] = []
        with Client(running.address, timeout=300) as client, client.session("cpu") as a, client.session("cpu") as b:
            a.feed_blob("C", corpus)
            a.publish_corpus("C", "starve")

            def big_call() -> None:
                a.top_k(big, "@starve", k=3, batch_size=4000)
                done.append("big")

            thread = threading.Thread(target=big_call)
            thread.start()
            deadline = time.monotonic() + 60
            while pass_counts(port)[0] < 2 and time.monotonic() < deadline:  # the big batch is being scored
                time.sleep(0.01)
            got = b.top_k(small, "@starve", k=3)
            done.append("small")
            thread.join(300)
        assert done == ["small", "big"]
        np.testing.assert_array_equal(got[1], alone(small, corpus, 3)[1])
        assert max_pass(port) <= 8  # no pass held more than --score-pass-queries
    finally:
        running.stop(0)


def test_callers_of_different_identities_share_a_pass(tmp_path):
    import hashlib

    keys = {"alice": "alice-key-" + "a" * 20, "bob": "bob-key-" + "b" * 20}
    path = tmp_path / "keys"
    path.write_text("".join(f"{n}:{hashlib.sha256(k.encode()).hexdigest()}\n" for n, k in keys.items()))
    port = _free_port()
    running = start_server(metrics_port=port, api_keys_file=str(path), score_max_queue_delay_s=0.5)
    try:
        rng = np.random.default_rng(15)
        corpus = rng.standard_normal((2000, 24)).astype(np.float32)
        asks = {name: rng.standard_normal((3, 24)).astype(np.float32) for name in keys}
        got: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        with Client(running.address, token=keys["alice"]) as alice, alice.session("cpu") as publisher:
            publisher.feed_blob("C", corpus)
            publisher.publish_corpus("C", "both")
            barrier = threading.Barrier(len(keys))

            def call(name: str) -> None:
                with Client(running.address, token=keys[name]) as client, client.session("cpu") as session:
                    barrier.wait(timeout=30)
                    got[name] = session.top_k(asks[name], "@both", k=4)

            threads = [threading.Thread(target=call, args=(name,)) for name in keys]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        passes, _, queries = pass_counts(port)
        assert queries == 6 and passes == 1  # alice's and bob's batches in one pass (they arrived within 0.5 s)
        for name, q in asks.items():
            want = alone(q, corpus, 4)
            np.testing.assert_array_equal(got[name][0], want[0])
            np.testing.assert_array_equal(got[name][1], want[1])
    finally:
        running.stop(0)


def test_a_batch_is_charged_before_it_is_queued():
    """Queries, their normalized copy and the results count against the session's limit: a batch
    that would pass it is refused with RESOURCE_EXHAUSTED, and the stream's earlier replies stand."""
    running = start_server(max_session_bytes=200_000)
    try:
        with Client(running.address) as client, client.session("cpu") as session:
            corpus = np.random.default_rng(16).standard_normal((1000, 16)).astype(np.float32)  # 64,000 bytes
            session.feed_blob("C", corpus)
            baseline = held(running, [session.id])
            small = corpus[:4]
            large = np.ones((1000, 16), np.float32)  # 64,000 + 64,000 + 2 x 1000 x 50 x 12 bytes: too much
            channel = grpc.insecure_channel(running.address)
            stub = pb_grpc.CosserveStub(channel)
            replies = []
            with pytest.raises(grpc.RpcError) as err:
                for message in stub.ScoreTopK(iter([request(session.id, "C", small, 50), request(session.id, "C", large, 50)]), timeout=30):
                    replies.append(reply(message))
            channel.close()
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "ScoreTopK: a batch of queries and its results" in err.value.details()
            assert "--max-session-bytes" in err.value.details()
            assert len(replies) == 1
            np.testing.assert_array_equal(replies[0][1], alone(small, corpus, 50)[1])
            assert settled(running, baseline) == baseline  # nothing stays charged
    finally:
        running.stop(0)
