"""Blobs through shared memory: round trips, the opt-in, bounds and the local-peer check."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from multiprocessing import shared_memory

import grpc
import ml_dtypes
import numpy as np
import pytest

from cosserve import Client, CosserveRpcError
from cosserve.server.errors import FailedPrecondition, PermissionDenied
from cosserve.server.protocols import shm
from cosserve.v1 import cosserve_pb2 as pb
from tests.conftest import DEVICES, start_server

DTYPES = [
    np.bool_, np.uint8, np.int8, np.int16, np.int32, np.int64,
    np.float16, ml_dtypes.bfloat16, np.float32, np.float64,
]  # fmt: skip
SHAPES = [(3, 5), (), (0, 4), (2, 0, 3)]


@pytest.fixture(scope="module")
def shm_client() -> Iterator[Client]:
    running = start_server(allow_shm=True, max_session_bytes=1 << 20)
    try:
        with Client(running.address) as client:
            yield client
    finally:
        running.stop(0)


@pytest.fixture
def ws(shm_client: Client):
    with shm_client.session("cpu") as session:
        yield session


def _name(ws, tail: str = "") -> str:
    """A region name the server accepts for this session."""
    return f"cosserve_{ws.id}_{tail or secrets.token_hex(4)}"


@pytest.fixture
def region(ws) -> Iterator[shared_memory.SharedMemory]:
    made = shared_memory.SharedMemory(create=True, size=64, name=_name(ws))
    yield made
    made.close()
    made.unlink()


def _sample(dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(sum(shape) + 7)
    values = rng.standard_normal(shape) * 100
    if np.dtype(dtype) == np.bool_:
        return values > 0
    return values.astype(dtype)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_round_trip_is_bit_exact(ws, dtype: type, shape: tuple[int, ...]) -> None:
    value = _sample(dtype, shape)
    ws.feed_blob("x", value, shm=True)
    assert _same_bits(ws.fetch_blob("x", shm=True), value)
    assert _same_bits(ws.fetch_blob("x"), value)  # what shm fed, the socket reads
    ws.feed_blob("y", value)
    assert _same_bits(ws.fetch_blob("y", shm=True), value)  # and the other way round


def test_refused_unless_enabled(client: Client) -> None:
    with client.session("cpu") as session:
        session.feed_blob("x", np.ones(3, np.float32))
        with pytest.raises(CosserveRpcError) as feed:
            session.feed_blob("x", np.zeros(3, np.float32), shm=True)
        with pytest.raises(CosserveRpcError) as fetch:
            session.fetch_blob("x", shm=True)
        assert session.fetch_blob("x").tolist() == [1.0, 1.0, 1.0]
    for err in (feed.value, fetch.value):
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "--allow-shm" in err.details()


def _feed_raw(ws, region_name: str, offset: int, shape: tuple[int, ...] = (4, 4)) -> CosserveRpcError:
    request = pb.FeedBlobShmRequest(
        session_id=ws.id, name="keep", dtype=pb.FLOAT32, shape=shape, shm_name=region_name, offset=offset
    )
    with pytest.raises(CosserveRpcError) as caught:
        ws.client._call("FeedBlobShm", request)
    return caught.value


KEEP = np.arange(6, dtype=np.float32)


@pytest.mark.parametrize(
    ("offset", "shape", "code", "words"),
    [
        (100, (1,), grpc.StatusCode.INVALID_ARGUMENT, "do not fit"),  # offset beyond the region
        (0, (4, 5), grpc.StatusCode.INVALID_ARGUMENT, "do not fit"),  # 80 bytes, region of 64
        (60, (2,), grpc.StatusCode.INVALID_ARGUMENT, "do not fit"),  # runs past the end
        (-8, (1,), grpc.StatusCode.INVALID_ARGUMENT, "negative"),
        (0, (-1, 4), grpc.StatusCode.INVALID_ARGUMENT, "negative dimension"),
        (0, (1024, 1024), grpc.StatusCode.RESOURCE_EXHAUSTED, "max-session-bytes"),  # 4 MiB > 1 MiB
    ],
    ids=["offset-beyond", "region-too-small", "past-end", "negative-offset", "bad-shape", "session-limit"],
)
def test_feed_bounds_leave_the_blob_alone(ws, region, offset: int, shape: tuple[int, ...], code, words: str) -> None:
    ws.feed_blob("keep", KEEP)
    err = _feed_raw(ws, region.name, offset, shape)
    assert err.code() == code
    assert words in err.details()
    assert _same_bits(ws.fetch_blob("keep"), KEEP)


@pytest.mark.parametrize(
    ("name", "code", "words"),
    [
        ("no_such_region_7f3a", grpc.StatusCode.NOT_FOUND, "does not exist"),
        ("a/b", grpc.StatusCode.INVALID_ARGUMENT, "not a region name"),
        ("", grpc.StatusCode.PERMISSION_DENIED, "may only use regions named"),
    ],
    ids=["missing", "slash", "empty"],
)
def test_feed_from_a_bad_region_name(ws, name: str, code, words: str) -> None:
    ws.feed_blob("keep", KEEP)
    err = _feed_raw(ws, _name(ws, name) if name else "", 0)
    assert err.code() == code
    assert words in err.details()
    assert _same_bits(ws.fetch_blob("keep"), KEEP)


def test_limit_is_checked_before_the_region(ws) -> None:
    # Nothing is opened, let alone allocated, for a blob the session could not hold.
    err = _feed_raw(ws, _name(ws, "no_such_region_7f3a"), 0, (1024, 1024))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize(
    ("offset", "size", "code"),
    [
        (0, 16, grpc.StatusCode.INVALID_ARGUMENT),  # 24 bytes into 16
        (48, 64, grpc.StatusCode.INVALID_ARGUMENT),  # past the end
        (-1, 64, grpc.StatusCode.INVALID_ARGUMENT),
    ],
    ids=["region-too-small", "past-end", "negative-offset"],
)
def test_fetch_bounds_write_nothing(ws, offset: int, size: int, code) -> None:
    ws.feed_blob("keep", KEEP)
    target = shared_memory.SharedMemory(create=True, size=size, name=_name(ws))
    try:
        target.buf[:size] = b"\xab" * size
        request = pb.FetchBlobShmRequest(session_id=ws.id, name="keep", shm_name=target.name, offset=offset)
        with pytest.raises(CosserveRpcError) as caught:
            ws.client._call("FetchBlobShm", request)
        assert caught.value.code() == code
        assert bytes(target.buf[:size]) == b"\xab" * size
    finally:
        target.close()
        target.unlink()


def test_fetch_at_an_offset_and_describe(ws, region) -> None:
    ws.feed_blob("keep", KEEP)
    info = ws.client._call("FetchBlobShm", pb.FetchBlobShmRequest(session_id=ws.id, name="keep"))
    assert (info.dtype, tuple(info.shape)) == (pb.FLOAT32, (6,))  # no region: dtype and shape only
    request = pb.FetchBlobShmRequest(session_id=ws.id, name="keep", shm_name=region.name, offset=8)
    ws.client._call("FetchBlobShm", request)
    assert np.frombuffer(region.buf, np.float32, 6, 8).tolist() == KEEP.tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_copies_in_chunks_at_odd_offsets(shm_client, monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    # The server copies _CHUNK_BYTES at a time (on CUDA through a host buffer of that size).
    # With chunks of 64 bytes, 1000 bytes are 15 full chunks and a partial one.
    monkeypatch.setattr(shm, "_CHUNK_BYTES", 64)
    value = np.random.default_rng(3).standard_normal(250).astype(np.float32)
    with shm_client.session(device) as session:
        region = shared_memory.SharedMemory(create=True, size=1100, name=_name(session))
        try:
            region.buf[:1100] = b"\xcd" * 1100
            region.buf[13:1013] = value.tobytes()
            feed = pb.FeedBlobShmRequest(
                session_id=session.id, name="x", dtype=pb.FLOAT32, shape=[250], shm_name=region.name, offset=13
            )
            session.client._call("FeedBlobShm", feed)
            assert _same_bits(session.fetch_blob("x"), value)
            region.buf[:1100] = b"\xcd" * 1100
            fetch = pb.FetchBlobShmRequest(session_id=session.id, name="x", shm_name=region.name, offset=37)
            session.client._call("FetchBlobShm", fetch)
            assert bytes(region.buf[37:1037]) == value.tobytes()
            assert bytes(region.buf[:37]) + bytes(region.buf[1037:1100]) == b"\xcd" * 100  # nothing outside
        finally:
            region.close()
            region.unlink()


def test_server_leaves_the_clients_region(ws, region) -> None:
    region.buf[:24] = KEEP.tobytes()
    request = pb.FeedBlobShmRequest(session_id=ws.id, name="x", dtype=pb.FLOAT32, shape=[6], shm_name=region.name)
    ws.client._call("FeedBlobShm", request)
    again = shared_memory.SharedMemory(name=region.name)  # still there: not unlinked by the server
    try:
        assert bytes(again.buf[:24]) == KEEP.tobytes()
    finally:
        again.close()
    assert _same_bits(ws.fetch_blob("x"), KEEP)


def test_missing_blob_and_session(ws) -> None:
    with pytest.raises(CosserveRpcError) as caught:
        ws.fetch_blob("nope", shm=True)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    request = pb.FetchBlobShmRequest(session_id="no-such-session", name="x")
    with pytest.raises(CosserveRpcError) as caught:
        ws.client._call("FetchBlobShm", request)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("peer", "local"),
    [
        ("ipv4:127.0.0.1:50051", True),
        ("ipv4:127.8.9.10:1", True),
        ("ipv6:[::1]:50051", True),
        ("ipv6:[::ffff:127.0.0.1]:50051", True),
        ("unix:/tmp/cosserve.sock", True),
        ("unix-abstract:cosserve", True),
        ("ipv4:10.1.2.3:50051", False),
        ("ipv4:192.168.0.7:443", False),
        ("ipv6:[2001:db8::1]:50051", False),
        ("ipv6:[::ffff:10.0.0.1]:50051", False),
        ("ipv4:localhost:1", False),
        ("", False),
        ("dns:127.0.0.1:1", False),
    ],
)
def test_local_peers(peer: str, local: bool) -> None:
    assert shm.is_local_peer(peer) is local


def test_access_rules() -> None:
    shm.check_access(True, "ipv4:127.0.0.1:9")
    with pytest.raises(PermissionDenied, match="not local"):
        shm.check_access(True, "ipv4:10.1.2.3:50051")
    with pytest.raises(FailedPrecondition, match="--allow-shm"):
        shm.check_access(False, "ipv4:127.0.0.1:9")


@pytest.mark.parametrize("owner", ["another program", "another session"])
def test_regions_not_named_for_the_session_are_refused_and_untouched(ws, shm_client, owner: str) -> None:
    if owner == "another session":
        with shm_client.session("cpu") as other:
            name = _name(other)
    else:
        name = f"other_app_secret_{secrets.token_hex(4)}"
    foreign = shared_memory.SharedMemory(create=True, size=24, name=name)
    try:
        foreign.buf[:24] = b"TOPSECRET-other-app-data"
        ws.feed_blob("keep", KEEP)
        err = _feed_raw(ws, foreign.name, 0, (6,))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        request = pb.FetchBlobShmRequest(session_id=ws.id, name="keep", shm_name=foreign.name, offset=0)
        with pytest.raises(CosserveRpcError) as caught:
            ws.client._call("FetchBlobShm", request)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert bytes(foreign.buf[:24]) == b"TOPSECRET-other-app-data"
        assert _same_bits(ws.fetch_blob("keep"), KEEP)
    finally:
        foreign.close()
        foreign.unlink()
