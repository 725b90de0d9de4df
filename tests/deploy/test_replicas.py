"""Replicas behind a real nginx (issue 13): three `cosserve serve` processes on loopback and nginx
run from deploy/nginx/cosserve.conf (only its listen port and replica list replaced). Sessions stick
to one replica, stateless calls spread, a killed replica's sessions are told clearly that they are
gone, and ShardedScorer over the three gives one server's answer. nginx must be installed (.ci/run
installs Debian's package): without it these tests fail, they do not skip."""

from __future__ import annotations

import collections
import re
import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from bench.replicas import Nginx, find_nginx
from cosserve import Client, CosserveRpcError, ShardedScorer
from tests.conftest import start_process, stop_process

pytest.importorskip("torch")

REPLICAS = 3


class Replica:
    def __init__(self) -> None:
        self.log: list[str] = []
        # DEBUG: one line per call, with its method, so the test can see which replica took it.
        self.proc, self.address = start_process("--log-level", "DEBUG", "--grace-s", "1", log=self.log)

    def calls(self, method: str) -> int:
        return sum(1 for line in list(self.log) if re.search(rf"\b{method} OK\b", line))


@pytest.fixture(scope="module")
def replicas() -> Iterator[list[Replica]]:
    find_nginx()  # fails here, before starting anything, when nginx is missing
    started: list[Replica | BaseException] = []

    def start() -> None:
        try:
            started.append(Replica())
        except BaseException as err:  # noqa: BLE001
            started.append(err)

    threads = [threading.Thread(target=start) for _ in range(REPLICAS)]  # torch imports take seconds each
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    running = [r for r in started if isinstance(r, Replica)]
    try:
        for r in started:
            if isinstance(r, BaseException):
                raise r
        yield running
    finally:
        for replica in running:
            if replica.proc.poll() is None:
                stop_process(replica.proc)


@pytest.fixture(scope="module")
def nginx(replicas: list[Replica], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    with Nginx([r.address for r in replicas], tmp_path_factory.mktemp("nginx")) as running:
        yield running


def holder(replicas: list[Replica], session_id: str, alive: set[str] | None = None) -> list[str]:
    """Addresses of the replicas that hold the session, asked directly (not through nginx)."""
    held = []
    for replica in replicas:
        if alive is not None and replica.address not in alive:
            continue
        with Client(replica.address) as direct:
            try:
                direct.attach(session_id)
            except CosserveRpcError as err:
                assert err.code() == grpc.StatusCode.NOT_FOUND, err
                continue
            held.append(replica.address)
    return held


def upstreams(nginx: Nginx) -> dict[str, set[str]]:
    """Session id -> the replicas nginx sent its calls to, from its access log."""
    routed: dict[str, set[str]] = collections.defaultdict(set)
    for line in nginx.log_lines():
        match = re.search(r'session="([0-9a-f]{32})" upstream=(\S+)', line)
        if match:
            routed[match.group(1)].add(match.group(2))
    return routed


def test_sessions_stick_to_one_replica_and_stateless_calls_spread(replicas, nginx):
    values = {}
    with Client(nginx.address) as client:
        sessions = [client.session("cpu") for _ in range(30)]
        for i, session in enumerate(sessions):
            for call in range(20):  # 20 calls of every kind, each of which must reach the session's replica
                kind = call % 5
                if kind == 0:
                    values[session.id] = np.full(7, i * 100 + call, np.float32)
                    session.feed_blob("x", values[session.id])
                elif kind == 1:
                    assert session.has_blob("x")
                elif kind == 2:
                    np.testing.assert_array_equal(session.fetch_blob("x"), values[session.id])
                elif kind == 3:
                    session.run_operator("CosineSimilarity", ["x", "x"], ["s"])
                else:
                    assert session.blobs() == ["s", "x"]
        big = np.arange(3 * 2**20 // 4, dtype=np.float32)  # streamed in several messages through nginx
        sessions[0].feed_blob("big", big)
        np.testing.assert_array_equal(sessions[0].fetch_blob("big"), big)
        for _ in range(30):
            client.operators()
        placed = {s.id: holder(replicas, s.id) for s in sessions}
        for session in sessions:
            session.close()
    assert all(len(where) == 1 for where in placed.values()), placed  # on exactly one replica each
    assert len({where[0] for where in placed.values()}) >= 2, placed  # and the sessions spread
    routed = upstreams(nginx)
    for session in sessions:  # nginx sent every one of its calls to that replica, and only there
        assert routed[session.id] == set(placed[session.id]), (session.id, routed[session.id])
    spread = [r.calls("ListOperators") for r in replicas]
    assert sum(spread) >= 30 and sum(1 for n in spread if n) >= 2, spread


def test_sharded_scorer_over_three_replicas_equals_one_server_and_numpy(replicas):
    rng = np.random.default_rng(7)
    # Rows drawn from few small-integer vectors: many exact ties, across shard boundaries too.
    base = rng.integers(-3, 4, (40, 24)).astype(np.float32)
    corpus = base[rng.integers(0, len(base), 3001)]
    queries = rng.integers(-3, 4, (50, 24)).astype(np.float32)
    queries[0] = 0  # the norm floor: every score 0, ties everywhere
    with Client(replicas[0].address) as client, client.session("cpu") as whole:
        whole.feed_blob("C", corpus)
        for k in (1, 9, 1000):
            want = whole.top_k(queries, "C", k, batch_size=16)
            sent: list[int] = []
            with ShardedScorer([r.address for r in replicas], device="cpu") as sharded:
                sharded.feed(corpus, progress=sent.append)
                got = sharded.top_k(queries, k, batch_size=16)
            assert sum(sent) == corpus.nbytes  # every byte of every shard reported once
            assert got[0].dtype == np.float32 and got[1].dtype == np.int64 and got[0].shape == (50, k)
            np.testing.assert_array_equal(got[1], want[1])
            np.testing.assert_array_equal(got[0], want[0])
            check_against_numpy(corpus, queries, k, *got)
    # Fewer rows than replicas, and k = M: every shard answers with all its rows.
    small = rng.standard_normal((2, 5)).astype(np.float64)
    with ShardedScorer(",".join(r.address for r in replicas), device="cpu") as sharded:
        sharded.feed(small, progress=False)
        scores, indices = sharded.top_k(small, 2)
    check_against_numpy(small, small, 2, scores, indices)
    assert scores.dtype == np.float64


def check_against_numpy(corpus: np.ndarray, queries: np.ndarray, k: int, scores: np.ndarray, indices: np.ndarray) -> None:
    """The reference: cosine in float64 with Caffe2's 1e-12 floor on squared norms; the answer's
    scores are the best k (to float32 rounding), each is its row's score, and equal scores come
    in index order."""
    c, q = corpus.astype(np.float64), queries.astype(np.float64)
    ref = (q @ c.T) / np.sqrt(np.maximum((q * q).sum(1), 1e-12))[:, None] / np.sqrt(np.maximum((c * c).sum(1), 1e-12))[None]
    best = -np.sort(-ref, axis=1)[:, :k]
    np.testing.assert_allclose(scores, best, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.take_along_axis(ref, indices, 1), scores, rtol=1e-5, atol=1e-6)
    for row_scores, row_indices in zip(scores, indices):
        assert len(set(row_indices.tolist())) == k
        for a in range(k - 1):
            assert row_scores[a] > row_scores[a + 1] or row_indices[a] < row_indices[a + 1]


def test_a_killed_replica_s_sessions_are_not_found_saying_so_and_the_others_carry_on(replicas, nginx):
    # The last test of the module: it kills a replica.
    with Client(nginx.address) as client:
        sessions = [client.session("cpu") for _ in range(30)]
        for i, session in enumerate(sessions):
            session.feed_blob("x", np.full(3, i, np.float32))
        placed = {s.id: holder(replicas, s.id)[0] for s in sessions}
        victim = next(r for r in replicas if any(where == r.address for where in placed.values()))
        victim.proc.kill()
        victim.proc.wait(10)
        lost = [s for s in sessions if placed[s.id] == victim.address]
        kept = [s for s in sessions if placed[s.id] != victim.address]
        assert lost and kept, placed
        for _round in range(3):  # not only the first call after the kill
            for i, session in enumerate(sessions):
                if session in kept:
                    np.testing.assert_array_equal(session.fetch_blob("x"), np.full(3, i, np.float32))
                else:
                    with pytest.raises(CosserveRpcError) as err:
                        session.has_blob("x")
                    assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value
                    assert "does not exist on this server" in err.value.details()
        # Another live replica answered for each lost session; new sessions and stateless calls work.
        alive = {r.address for r in replicas} - {victim.address}
        for session in lost:
            assert holder(replicas, session.id, alive) == []
        with client.session("cpu") as fresh:
            fresh.feed_blob("y", np.ones(2))
            assert fresh.blobs() == ["y"]
            assert holder(replicas, fresh.id, alive) != []
        assert client.operators()
        for session in kept:
            session.close()
