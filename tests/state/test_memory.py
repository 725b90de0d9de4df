"""Memory no caller can inflate: what a session holds (blob data, names, staged op outputs, stream
buffers in flight) is charged before it is allocated, and nothing outlives the call that made it.
Memory is read from a real `cosserve serve` process (RSS, and VmHWM for peaks), with the cycle
collector off where a reference cycle would otherwise hide a leak."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from cosserve import Client, CosserveRpcError, limits, wire
from cosserve.v1 import cosserve_pb2 as pb
from tests.conftest import start_process, start_server

psutil = pytest.importorskip("psutil")
pytest.importorskip("torch")

MiB = 1024 * 1024
# An unknown field (number 15, length-delimited) that protobuf and the server's decoder skip: a
# way for a hostile client to make a message far larger than the tensor it carries.
_PAD_TAG = bytes([15 << 3 | 2])


def _padded_feed(session_id: str, name: str, data: bytes, pad: int) -> bytes:
    head = b"".join(wire.feed_blob_request(session_id, name, pb.UINT8, [len(data)], data))
    return head + _PAD_TAG + _varint(pad) + b"\1" * pad


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _charge(name: str, nbytes: int) -> int:
    """What a blob costs against the limits, as documented: data, UTF-8 name, 640 bytes."""
    return nbytes + len(name.encode()) + 640


# glibc serves large allocations from its arenas once its adaptive mmap threshold has grown, and
# keeps what is freed there: RSS then shows allocator slack (28-76 MiB after the same six dead
# streams), not what the server holds. A fixed threshold maps and unmaps every allocation of
# 1 MiB or more, so RSS follows the buffers (8-17 MiB).
_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(1024 * 1024)}


@contextlib.contextmanager
def _process(*flags: str, gc_off: bool = True) -> Iterator[tuple[psutil.Process, str]]:
    proc, address = start_process(*flags, gc_off=gc_off, env=_ALLOCATOR)
    try:
        yield psutil.Process(proc.pid), address
    finally:
        proc.kill()
        proc.wait(timeout=30)


def _peak_rss(process: psutil.Process) -> int:
    """The process's peak resident memory so far (VmHWM), in bytes."""
    with open(f"/proc/{process.pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


def test_a_stored_blob_does_not_keep_its_request_alive():
    # 60 blobs of 3 MiB, each in a message twice its size: stored as views, they held both halves.
    data, pad = b"\0" * (3 * MiB), 3 * MiB - 4096
    with _process("--max-session-bytes", str(256 * MiB)) as (server, address):
        with Client(address) as client, client.session("cpu") as session:
            with grpc.insecure_channel(address, options=limits.GRPC_OPTIONS) as channel:
                feed = channel.unary_unary(wire.method_path("FeedBlob"))
                feed(_padded_feed(session.id, "warm", data, pad), timeout=30)
                before = server.memory_info().rss
                for i in range(60):
                    feed(_padded_feed(session.id, f"b{i}", data, pad), timeout=30)
                grown = server.memory_info().rss - before
            assert session.fetch_blob("b7").nbytes == len(data)
    stored = 60 * len(data)
    assert grown < 1.4 * stored, f"60 blobs of {stored // MiB} MiB grew the server by {grown // MiB} MiB"


def test_names_count_against_the_limit_and_are_bounded():
    running = start_server(max_session_bytes=MiB)
    try:
        with Client(running.address) as client, client.session("cpu") as session:
            with pytest.raises(CosserveRpcError) as err:
                session.feed_blob("n" * 2000, np.ones(1, np.float32))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "2000 bytes" in err.value.details() and "1024" in err.value.details()
            session.feed_blob("x", np.ones(1, np.float32))
            with pytest.raises(CosserveRpcError) as err:
                session.run_operator("Cos", ["x"], ["y" * 1025])
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # Blobs of 4 bytes named by 1000 bytes: the names fill the session, not the data.
            fits = (MiB - _charge("x", 4)) // _charge("n" * 1000, 4)
            for i in range(fits):
                session.feed_blob(f"{i:04d}" + "n" * 996, np.ones(1, np.float32))
            with pytest.raises(CosserveRpcError) as err:
                session.feed_blob("last" + "n" * 996, np.ones(1, np.float32))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "above its limit of 1 MiB" in err.value.details()
            assert len(session.blobs()) == fits + 1
    finally:
        running.stop(0)


def test_a_net_is_refused_at_the_op_that_would_pass_the_limit_not_at_commit():
    limit, count = 8 * MiB, 400
    x = np.ones(MiB // 4, np.float32)  # 1 MiB; each Cos output is 1 MiB too
    with _process("--max-session-bytes", str(limit), gc_off=False) as (server, address):
        with Client(address) as client, client.session("cpu") as session:
            session.feed_blob("X", x)
            ops = [pb.OperatorDef(type="Cos", input=["X"], output=[f"Y{i:03d}"]) for i in range(count)]
            before = _peak_rss(server)
            with pytest.raises(grpc.RpcError) as err:
                client.stub.RunNet(pb.RunNetRequest(session_id=session.id, ops=ops), timeout=120)
            peak = _peak_rss(server) - before
            assert session.blobs() == ["X"]
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    refused_at = (limit - _charge("X", x.nbytes)) // _charge("Y000", x.nbytes)
    assert f"op #{refused_at} (Cos)" in err.value.details()
    # What the session may hold, plus one output past it, plus the allocator's slack.
    assert peak < limit + 2 * MiB + 16 * MiB, f"the net peaked at +{peak // MiB} MiB under an {limit // MiB} MiB limit"


def _stream(session_id: str, name: str, total: int, send: int, tail: list[bytes], hold: threading.Event | None = None):
    """A FeedBlobStream of a uint8 blob of `total` bytes that sends `send` of them, then `tail`,
    then (with `hold`) waits for it before ending."""
    yield wire.feed_blob_chunk_header(session_id, name, pb.UINT8, [total])
    piece = b"\0" * limits.CHUNK_BYTES
    for start in range(0, send, len(piece)):
        yield b"".join(wire.feed_blob_chunk_data(piece[: min(len(piece), send - start)]))
    yield from tail
    if hold is not None:
        hold.wait(30)


def _wait_for_rss(server: psutil.Process, at_least: int) -> None:
    deadline = time.monotonic() + 30
    while server.memory_info().rss < at_least and time.monotonic() < deadline:
        time.sleep(0.05)


def test_failed_and_cancelled_streams_free_their_buffers_at_once():
    size, sent = 128 * MiB, 120 * MiB
    with _process() as (server, address):
        with Client(address) as client, client.session("cpu") as session:
            with grpc.insecure_channel(address, options=limits.GRPC_OPTIONS) as channel:
                feed = channel.stream_unary(wire.method_path("FeedBlobStream"))
                before = server.memory_info().rss
                codes = []
                for attempt in range(6):
                    if attempt % 2:  # the client gives up mid-stream
                        hold = threading.Event()
                        call = feed.future(_stream(session.id, "big", size, sent, [], hold), timeout=60)
                        _wait_for_rss(server, before + sent)
                        call.cancel()
                        hold.set()
                        codes.append("CANCELLED")
                    else:  # the stream ends short, or a chunk does not decode
                        tail = [] if attempt % 4 == 0 else [b"\xff\xff\xff"]
                        with pytest.raises(grpc.RpcError) as err:
                            feed(_stream(session.id, "big", size, sent, tail), timeout=60)
                        codes.append(err.value.code().name)
                deadline = time.monotonic() + 10  # the last cancel reaches the server asynchronously
                while (grown := server.memory_info().rss - before) >= 64 * MiB and time.monotonic() < deadline:
                    time.sleep(0.1)
            assert not session.blobs()
    assert codes == ["INVALID_ARGUMENT", "CANCELLED"] * 3
    assert grown < 64 * MiB, f"six failed or cancelled {size // MiB} MiB streams left +{grown // MiB} MiB"


def test_concurrent_streams_cannot_together_pass_the_limit():
    running = start_server(max_session_bytes=MiB)
    try:
        with Client(running.address) as client, client.session("cpu") as session:
            feed = client._channel.stream_unary(wire.method_path("FeedBlobStream"))
            hold = threading.Event()
            first = feed.future(_stream(session.id, "a", 700_000, 100_000, [], hold), timeout=30)
            try:
                deadline = time.monotonic() + 10
                while not running.store.get(session.id).held_bytes() and time.monotonic() < deadline:
                    time.sleep(0.01)  # the first stream's header has reached the server
                with pytest.raises(grpc.RpcError) as err:
                    feed(_stream(session.id, "b", 700_000, 700_000, []), timeout=30)
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "above its limit of 1 MiB" in err.value.details()
            finally:
                first.cancel()
                hold.set()
            deadline = time.monotonic() + 10
            while running.store.get(session.id).held_bytes() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert running.store.get(session.id).held_bytes() == 0, "a cancelled stream gives its room back"
            session.feed_blob("b", np.zeros(700_000, np.uint8))
    finally:
        running.stop(0)


def test_a_size_the_machine_cannot_allocate_is_resource_exhausted():
    running = start_server(max_session_bytes=2**62)
    try:
        with Client(running.address) as client, client.session("cpu") as session:
            feed = client._channel.stream_unary(wire.method_path("FeedBlobStream"))
            with pytest.raises(grpc.RpcError) as err:
                feed(iter([wire.feed_blob_chunk_header(session.id, "huge", pb.UINT8, [2**50])]), timeout=30)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "cannot allocate" in err.value.details()
            assert running.store.get(session.id).held_bytes() == 0
            session.feed_blob("x", np.ones(3))
    finally:
        running.stop(0)
