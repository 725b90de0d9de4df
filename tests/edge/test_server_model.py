"""The server model under hostile clients: stalled streams, SIGTERM with CPU-bound work, memory of
cancelled calls. Each test talks gRPC to a real server (in-process or its own process)."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cosserve import Client, CosserveRpcError, limits
from cosserve.v1 import cosserve_pb2 as pb
from cosserve.v1 import cosserve_pb2_grpc as pb_grpc
from tests.conftest import start_process, start_server, stop_process

psutil = pytest.importorskip("psutil")

STALLED = 64  # the figure: 64 stalled feeds and 64 health watches at once


def _stalled_feed(session_id: str, release: threading.Event) -> Iterator[pb.FeedBlobChunk]:
    """A FeedBlobStream that sends its header, then nothing until `release` is set."""
    yield pb.FeedBlobChunk(session_id=session_id, name="stalled", dtype=pb.FLOAT32, shape=[1024])
    release.wait(60)


def test_stalled_streams_and_health_watches_do_not_starve_other_clients():
    running = start_server(max_workers=16)  # the default settings, on a free loopback port
    release = threading.Event()
    calls: list[grpc.Future] = []
    try:
        with grpc.insecure_channel(running.address) as hostile, Client(running.address, timeout=10) as c:
            stub = pb_grpc.CosserveStub(hostile)
            session = c.session("cpu")
            for _ in range(STALLED):
                calls.append(stub.FeedBlobStream.future(_stalled_feed(session.id, release), timeout=60))
            health = health_pb2_grpc.HealthStub(hostile)
            watches = [health.Watch(health_pb2.HealthCheckRequest(), timeout=60) for _ in range(STALLED)]
            for watch in watches:
                assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            time.sleep(0.5)  # let every stalled stream reach the server

            x = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32)
            latencies = []
            for _ in range(20):
                start = time.perf_counter()
                out = c.compute("CosineSimilarity", {"X": x, "Y": x}, ["S"])
                latencies.append(time.perf_counter() - start)
                np.testing.assert_allclose(out["S"], np.ones(64, np.float32), rtol=1e-5)
            with grpc.insecure_channel(running.address) as fresh:
                reply = health_pb2_grpc.HealthStub(fresh).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            session.feed_blob("ok", x)
            np.testing.assert_array_equal(session.fetch_blob("ok"), x)
            print(f"\nCompute p50 with {STALLED} stalled feeds + {STALLED} watches: "
                  f"{np.median(latencies) * 1e3:.2f} ms (max {max(latencies) * 1e3:.2f} ms)")
            for watch in watches:
                watch.cancel()
    finally:
        release.set()
        for call in calls:
            call.cancel()
        running.stop(0)


def test_sigterm_exits_within_grace_even_with_a_cpu_bound_call_in_flight():
    grace = 0.5
    proc, address = start_process("--grace-s", str(grace))
    failure: list[BaseException] = []
    try:
        with Client(address, timeout=120) as c:
            s = c.session("cpu")
            rng = np.random.default_rng(0)
            # A finite-difference check of 2 x 8,000 elements, within the cost bound (8.3e8 of
            # engine.MAX_GRADIENT_CHECK_COST's 1e9): 1.6 s of CPU on a fast core, so it outlasts
            # the wait below and the grace (2 x 6,000 took 1.05 s: done before SIGTERM came).
            s.feed_blob("X", rng.standard_normal((80, 100)))
            s.feed_blob("Y", rng.standard_normal((80, 100)))

            def busy() -> None:
                try:
                    s.check_gradient("CosineSimilarity", ["X", "Y"])
                except CosserveRpcError as err:
                    failure.append(err)

            worker = threading.Thread(target=busy, daemon=True)
            worker.start()
            time.sleep(0.3)  # the check is running
            assert worker.is_alive()
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(grace + 10)
            elapsed = time.monotonic() - start
            print(f"\nexit {code} {elapsed:.2f} s after SIGTERM (grace {grace} s) with a CPU-bound call running")
            assert code == 0
            assert elapsed <= grace + 2.0, f"took {elapsed:.1f} s to exit, grace is {grace} s"
            worker.join(10)
            assert failure and failure[0].code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    finally:
        if proc.poll() is None:
            proc.kill()


def _feed_then(session_id: str, declared: int, sent: int, extra: bool) -> Iterator[bytes]:
    """A FeedBlobStream declaring `declared` bytes that sends `sent` of them, then more than
    declared (extra) or blocks until cancelled."""
    yield pb.FeedBlobChunk(session_id=session_id, name="big", dtype=pb.UINT8, shape=[declared]).SerializeToString()
    piece = pb.FeedBlobChunk(data=bytes(limits.CHUNK_BYTES)).SerializeToString()
    for _ in range(sent // limits.CHUNK_BYTES):
        yield piece
    if extra:
        for _ in range(declared // limits.CHUNK_BYTES + 1):
            yield piece
    else:
        time.sleep(0.5)


def test_failed_and_cancelled_feeds_free_their_buffers_without_the_cycle_collector():
    proc, address = start_process(gc_off=True)
    try:
        server = psutil.Process(proc.pid)
        declared = 128 * 1024**2
        with grpc.insecure_channel(address, options=list(limits.GRPC_OPTIONS)) as channel, Client(address) as c:
            feed = channel.stream_unary(
                "/cosserve.v1.Cosserve/FeedBlobStream", response_deserializer=pb.FeedBlobResponse.FromString
            )
            s = c.session("cpu")
            s.feed_blob("warm", np.ones(8, np.float32))
            base = server.memory_info().rss
            for attempt in range(6):
                extra = attempt % 2 == 0
                call = feed.future(_feed_then(s.id, declared, declared // 2, extra), timeout=60)
                if extra:  # too much data: the server refuses it
                    with pytest.raises(grpc.RpcError) as err:
                        call.result()
                    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                else:  # the client gives up half way
                    time.sleep(0.3)
                    call.cancel()
                time.sleep(0.2)
            time.sleep(0.5)
            grown = server.memory_info().rss - base
            print(f"\nserver RSS grew {grown / 2**20:.0f} MiB after six failed or cancelled 128 MiB feeds")
            assert grown < declared, f"RSS grew {grown / 2**20:.0f} MiB: buffers of dead calls are still held"
            assert s.blobs() == ["warm"]
    finally:
        stop_process(proc)
