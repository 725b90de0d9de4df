"""Shared memory against a hostile client: a region truncated before or during the copy, a FIFO,
a directory or a symbolic link named as the region, a declared size the host cannot allocate.

These run against a `cosserve serve` process, not an in-process server: a server that faults on
client memory dies of SIGBUS, which in-process would take pytest with it. After every test the
process must still be alive and a session made before the test must still return its blob
bit-exact. The test side never maps a region it truncates (a mapping would fault here too): it
makes and changes regions with plain file calls on /dev/shm.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest

from cosserve import Client, CosserveRpcError
from cosserve.limits import SHM_PREFIX
from cosserve.v1 import cosserve_pb2 as pb

from tests.conftest import start_process, stop_process

SHM_DIR = Path("/dev/shm")
pytestmark = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="needs /dev/shm (Linux)")

MiB = 1024 * 1024
BIG = 256 * MiB  # large enough that a copy takes tens of milliseconds, so a truncation can land inside it
# A limit no host can back, so that only the allocation itself can fail (test 7).
HUGE_LIMIT = 2**50
# Delays after the server has opened the region before it is truncated: the first lands before
# or at its size check, the later ones inside the copy.
TRUNCATE_DELAYS_S = (0.0, 0.002, 0.005, 0.01, 0.02, 0.04)
CALL_TIMEOUT_S = 10.0  # a call that would block forever on main comes back as DEADLINE_EXCEEDED

WITNESS = np.random.default_rng(9).standard_normal(64 * 1024).astype(np.float32)
PATTERN = np.random.default_rng(10).integers(0, 2**32, BIG // 4, dtype=np.uint32).view(np.float32)
SMALL = np.arange(4, dtype=np.float32)


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[subprocess.Popen, Client]]:
    proc, address = start_process("--allow-shm", "--max-session-bytes", str(HUGE_LIMIT))
    try:
        with Client(address, timeout=30.0) as client:
            yield proc, client
    finally:
        stop_process(proc, timeout=30)


@pytest.fixture(scope="module")
def witness(served: tuple[subprocess.Popen, Client]):
    """A session made before any hostile call; its blob must survive every test bit-exact."""
    _, client = served
    with client.session("cpu") as session:
        session.feed_blob("w", WITNESS)
        yield session


@pytest.fixture(autouse=True)
def still_serving(served: tuple[subprocess.Popen, Client], witness) -> Iterator[None]:
    yield
    proc, _ = served
    assert proc.poll() is None, f"the server process died (exit status {proc.returncode})"
    assert witness.fetch_blob("w").tobytes() == WITNESS.tobytes()


@pytest.fixture
def ws(served: tuple[subprocess.Popen, Client]):
    _, client = served
    with client.session("cpu") as session:
        yield session


def _name(ws) -> str:
    return f"{SHM_PREFIX}{ws.id}_{secrets.token_hex(6)}"


@contextmanager
def _raw_region(ws, size: int) -> Iterator[tuple[str, int]]:
    """A region made with plain file calls (never mapped here); yields its name and a writable fd."""
    name = _name(ws)
    path = SHM_DIR / name
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        yield name, fd
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)


@contextmanager
def _odd_entry(ws, make) -> Iterator[str]:
    """A name in /dev/shm that `make(path)` turns into something other than a regular file."""
    name = _name(ws)
    path = SHM_DIR / name
    make(path)
    try:
        yield name
    finally:
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink(missing_ok=True)


def _fill(fd: int, data: np.ndarray) -> None:
    os.ftruncate(fd, data.nbytes)
    view = data.reshape(-1).view(np.uint8).data
    done = 0
    while done < data.nbytes:
        done += os.pwrite(fd, view[done : done + 16 * MiB], done)


def _feed(ws, shm_name: str, shape: tuple[int, ...], name: str = "x") -> None:
    request = pb.FeedBlobShmRequest(
        session_id=ws.id, name=name, dtype=pb.FLOAT32, shape=shape, shm_name=shm_name, offset=0
    )
    ws.client._call("FeedBlobShm", request, timeout=CALL_TIMEOUT_S)


def _fetch(ws, shm_name: str, name: str = "x") -> None:
    request = pb.FetchBlobShmRequest(session_id=ws.id, name=name, shm_name=shm_name, offset=0)
    ws.client._call("FetchBlobShm", request, timeout=CALL_TIMEOUT_S)


def _refused(call, *args: object) -> CosserveRpcError:
    with pytest.raises(CosserveRpcError) as caught:
        call(*args)
    return caught.value


def _server_holds(pid: int, path: str) -> bool:
    """Whether process `pid` has `path` open right now (from /proc/PID/fd)."""
    fds = Path(f"/proc/{pid}/fd")
    for entry in os.listdir(fds):
        try:
            if os.readlink(fds / entry) == path:
                return True
        except OSError:  # closed while we looked
            continue
    return False


def _truncate_once_open(pid: int, name: str, fd: int, delay_s: float, done: threading.Event) -> None:
    """Truncate the region to 0 bytes `delay_s` after the server opened it (or give up once the call ended)."""
    path = str(SHM_DIR / name)
    deadline = time.monotonic() + CALL_TIMEOUT_S
    while not done.is_set() and time.monotonic() < deadline:
        if _server_holds(pid, path):
            time.sleep(delay_s)
            os.ftruncate(fd, 0)
            return
        time.sleep(0.0002)


def _race(proc: subprocess.Popen, name: str, fd: int, delay_s: float, call) -> CosserveRpcError | None:
    """Run `call()` while a thread truncates the region under it; its error, or None if it succeeded."""
    done = threading.Event()
    truncator = threading.Thread(target=_truncate_once_open, args=(proc.pid, name, fd, delay_s, done))
    truncator.start()
    try:
        call()
        return None
    except CosserveRpcError as err:
        return err
    finally:
        done.set()
        truncator.join(CALL_TIMEOUT_S + 1)


def _check_race_outcomes(outcomes: list[CosserveRpcError | None], *words: str) -> None:
    for err in outcomes:
        if err is not None:
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
            assert any(w in err.details() for w in words), err.details()
    assert any(err is not None for err in outcomes), "no truncation landed inside a call: the race was never run"


# 1 ------------------------------------------------------------------------------------------


def test_feed_from_a_region_truncated_during_the_copy(served, ws) -> None:
    proc, _ = served
    outcomes: list[CosserveRpcError | None] = []
    with _raw_region(ws, BIG) as (name, fd):
        for delay_s in TRUNCATE_DELAYS_S:
            _fill(fd, PATTERN)
            err = _race(proc, name, fd, delay_s, lambda: _feed(ws, name, PATTERN.shape))
            outcomes.append(err)
            if err is None:  # the copy won the race: what it stored is the region's bytes
                assert ws.fetch_blob("x", shm=True).tobytes() == PATTERN.tobytes()
    _check_race_outcomes(outcomes, "changed while", "do not fit")


# 2 ------------------------------------------------------------------------------------------


def test_feed_from_a_region_truncated_before_the_call(ws) -> None:
    ws.feed_blob("x", SMALL)
    with _raw_region(ws, 64) as (name, fd):
        os.ftruncate(fd, 0)
        err = _refused(_feed, ws, name, (4,))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "16 bytes at offset 0" in err.details() and "of 0 bytes" in err.details()
    assert ws.fetch_blob("x").tobytes() == SMALL.tobytes()


# 3, 4, 5 ------------------------------------------------------------------------------------


def _symlink_to(target: Path):
    return lambda path: os.symlink(target, path)


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink"])
def test_a_region_that_is_not_a_regular_file_is_refused_at_once(ws, tmp_path: Path, kind: str) -> None:
    victim = tmp_path / "victim"  # a file the client may name through a link; the server must not touch it
    victim.write_bytes(b"V" * 64)
    make = {"fifo": os.mkfifo, "directory": os.mkdir, "symlink": _symlink_to(victim)}[kind]
    ws.feed_blob("x", SMALL)
    with _odd_entry(ws, make) as name:
        started = time.monotonic()
        feed = _refused(_feed, ws, name, (1,), "y")
        fetch = _refused(_fetch, ws, name, "x")
        elapsed_s = time.monotonic() - started
    allowed = {grpc.StatusCode.INVALID_ARGUMENT} | ({grpc.StatusCode.PERMISSION_DENIED} if kind == "symlink" else set())
    words = {"fifo": "is a FIFO, not a regular file", "directory": "is a directory, not a regular file"}
    for err in (feed, fetch):
        assert err.code() in allowed, (err.code(), err.details())
        assert name in err.details() and words.get(kind, "symbolic link") in err.details()
    assert elapsed_s < CALL_TIMEOUT_S / 2
    assert victim.read_bytes() == b"V" * 64
    assert not ws.has_blob("y")
    assert ws.fetch_blob("x").tobytes() == SMALL.tobytes()


# 6 ------------------------------------------------------------------------------------------


def test_fetch_into_a_region_truncated_before_the_call(ws) -> None:
    ws.feed_blob("x", SMALL)
    with _raw_region(ws, 64) as (name, fd):
        os.ftruncate(fd, 0)
        err = _refused(_fetch, ws, name)
        assert os.fstat(fd).st_size == 0  # nothing written, the region not grown back
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "16 bytes at offset 0" in err.details() and "of 0 bytes" in err.details()


def test_fetch_into_a_region_truncated_during_the_write(served, ws) -> None:
    proc, _ = served
    ws.feed_blob("x", PATTERN, shm=True)
    outcomes: list[CosserveRpcError | None] = []
    with _raw_region(ws, BIG) as (name, fd):
        for delay_s in TRUNCATE_DELAYS_S:
            os.ftruncate(fd, 0)
            os.ftruncate(fd, BIG)  # fresh pages each time, so the server's writes take their time
            outcomes.append(_race(proc, name, fd, delay_s, lambda: _fetch(ws, name)))
    _check_race_outcomes(outcomes, "changed while", "do not fit")
    assert ws.fetch_blob("x", shm=True).tobytes() == PATTERN.tobytes()


# 7 ------------------------------------------------------------------------------------------


def _overcommits_always() -> bool:
    try:
        return Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1"
    except OSError:
        return False


@pytest.mark.skipif(_overcommits_always(), reason="with vm.overcommit_memory=1 a 4 TiB allocation succeeds")
def test_a_blob_the_host_cannot_allocate_is_resource_exhausted(ws) -> None:
    ws.feed_blob("x", SMALL)
    declared = 2**40  # float32: 4 TiB, within the session's limit, beyond any host's memory
    with _raw_region(ws, declared * 4) as (name, _):  # sparse: tmpfs stores no pages for it
        err = _refused(_feed, ws, name, (declared,))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (err.code(), err.details())
    assert "blob 'x' of 4 TiB" in err.details()
    assert ws.fetch_blob("x").tobytes() == SMALL.tobytes()
