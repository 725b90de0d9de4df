"""Restart without loss (issue 10): --durability snapshot and sync against real server processes,
stopped by SIGTERM or killed with SIGKILL and started again on the same --state-dir."""

from __future__ import annotations

import hashlib
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import ml_dtypes
import numpy as np
import pytest

from cosserve import Client, CosserveRpcError, limits, wire
from tests.conftest import start_process

pytest.importorskip("torch")

KEYS = {"alice": "alice-key-" + "a" * 20, "bob": "bob-key-" + "b" * 20}


def keys_file(directory: Path) -> str:
    path = directory / "keys"
    path.write_text("".join(f"{name}:{hashlib.sha256(key.encode()).hexdigest()}\n" for name, key in KEYS.items()))
    return str(path)


def serve(state: Path, mode: str, *flags: str, log: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    return start_process(
        "--state-dir", str(state / "state"), "--durability", mode, "--api-keys-file", keys_file(state), *flags, log=log
    )


def stop(proc: subprocess.Popen, how: signal.Signals) -> None:
    proc.send_signal(how)
    try:
        assert proc.wait(30) == (0 if how is signal.SIGTERM else -signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()


def same_bits(got: np.ndarray, want: np.ndarray) -> bool:
    return got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes()


def values(seed: int) -> dict[str, np.ndarray]:
    """One blob of every wire dtype, odd shapes, a scalar and an empty one."""
    rng = np.random.default_rng(seed)
    floats = rng.standard_normal((7, 5))
    return {
        "f32": floats.astype(np.float32),
        "f64": floats.astype(np.float64)[:, :3].copy(),
        "f16": floats.astype(np.float16),
        "bf16": floats.astype(ml_dtypes.bfloat16),
        "i64": rng.integers(-(2**62), 2**62, (4, 3), dtype=np.int64),
        "i32": rng.integers(-(2**31), 2**31 - 1, 9, dtype=np.int32),
        "i16": rng.integers(-(2**15), 2**15 - 1, (2, 2, 2), dtype=np.int16),
        "i8": rng.integers(-128, 127, 11, dtype=np.int8),
        "u8": rng.integers(0, 255, (3, 1), dtype=np.uint8),
        "bool": rng.integers(0, 2, 6).astype(np.bool_),
        "scalar": np.array(np.float32(seed) + 0.25),
        "empty": np.zeros((0, 4), np.float32),
    }


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path


def _sessions_dir(state: Path) -> Path:
    return state / "state" / "sessions"


def test_sigterm_snapshot_then_restart_restores_every_session_bit_exact(state: Path) -> None:
    big = np.random.default_rng(7).standard_normal(limits.INLINE_BYTES // 4 + 100_000).astype(np.float32)
    assert big.nbytes > limits.INLINE_BYTES  # goes through FeedBlobStream
    proc, address = serve(state, "snapshot")
    try:
        with Client(address, token=KEYS["alice"]) as alice, Client(address, token=KEYS["bob"]) as bob:
            a1, a2, gone = alice.session("cpu"), alice.session("cpu"), alice.session("cpu")
            b1 = bob.session("cpu")
            want = {a1.id: values(1), a2.id: values(2), b1.id: values(3)}
            want[a1.id]["big"] = big
            for session in (a1, a2, b1):
                for name, value in want[session.id].items():
                    session.feed_blob(name, value)
            gone.feed_blob("x", np.ones(3, np.float32))
            gone.close()
    finally:
        stop(proc, signal.SIGTERM)

    proc, address = serve(state, "snapshot")
    try:
        with Client(address, token=KEYS["alice"]) as alice, Client(address, token=KEYS["bob"]) as bob:
            for client, session_id in ((alice, a1.id), (alice, a2.id), (bob, b1.id)):
                session = client.attach(session_id)
                assert session.id == session_id
                assert session.blobs() == sorted(want[session_id])
                for name, value in want[session_id].items():
                    assert same_bits(session.fetch_blob(name), value), (session_id, name)
            # Same owners: to bob, alice's sessions do not exist, and the reverse.
            for client, session_id in ((bob, a1.id), (alice, b1.id)):
                with pytest.raises(CosserveRpcError) as err:
                    client.attach(session_id)
                assert err.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(CosserveRpcError) as err:
                alice.attach("0" * 32)  # never created
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            # The closed session is not restored, and its files are gone.
            with pytest.raises(CosserveRpcError) as err:
                alice.attach(gone.id)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert not list(_sessions_dir(state).glob(f"{gone.id}.*"))
            # A restored session works as any other: it takes new blobs and runs ops.
            session = alice.attach(a2.id)
            session.run_operator("Cos", ["f32"], ["cos"])
            np.testing.assert_allclose(session.fetch_blob("cos"), np.cos(want[a2.id]["f32"]), rtol=1e-6)
    finally:
        stop(proc, signal.SIGTERM)


def _stamp(path: Path) -> bytes:
    """Which writing of a session file `path` holds: its bytes, which record when it was written
    (`written_at`, and the idle time left), so two writings never hold the same. An inode number
    is reused once freed, and a change time has the clock's coarse tick: both can repeat."""
    return path.read_bytes()


def test_periodic_snapshots_write_changed_sessions_only(state: Path) -> None:
    proc, address = serve(state, "snapshot", "--snapshot-interval-s", "0.2")
    try:
        with Client(address, token=KEYS["alice"]) as alice:
            still, busy = alice.session("cpu"), alice.session("cpu")
            still.feed_blob("x", np.arange(5, dtype=np.float32))
            busy.feed_blob("x", np.arange(5, dtype=np.float32))
            written = _sessions_dir(state) / f"{still.id}.json"
            busy_file = _sessions_dir(state) / f"{busy.id}.json"
            deadline = time.monotonic() + 10
            while not (written.exists() and busy_file.exists()) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert written.exists() and busy_file.exists(), "no periodic snapshot within 10 s"
            time.sleep(0.1)  # the pass that wrote them is over
            # A rewrite is a new file renamed over the old one, with a new `written_at` in it.
            first = _stamp(written)
            busy_first = _stamp(busy_file)
            for i in range(15):  # several periods, busy changing all the time
                busy.feed_blob("x", np.full(5, i, np.float32))
                time.sleep(0.1)
            assert _stamp(written) == first, "an unchanged session was written again"
            assert _stamp(busy_file) != busy_first, "a changed session was not written again"
    finally:
        proc.kill()
        proc.wait(10)
    # SIGKILL in snapshot mode: what the last periodic snapshot held comes back.
    proc, address = serve(state, "snapshot")
    try:
        with Client(address, token=KEYS["alice"]) as alice:
            assert same_bits(alice.attach(still.id).fetch_blob("x"), np.arange(5, dtype=np.float32))
    finally:
        stop(proc, signal.SIGTERM)


def _journal(state: Path) -> Path:
    return _sessions_dir(state) / "journal.log"


def test_kill_9_with_sync_keeps_every_acknowledged_change(state: Path) -> None:
    rng = np.random.default_rng(11)
    feeds = {f"b{i}": rng.standard_normal(rng.integers(1, 300)).astype(np.float32) for i in range(25)}
    big = rng.standard_normal(limits.INLINE_BYTES // 8 + 5000)  # float64, streamed
    proc, address = serve(state, "sync", "--allow-shm")
    try:
        with Client(address, token=KEYS["alice"]) as alice, Client(address, token=KEYS["bob"]) as bob:
            session, emptied, closed = alice.session("cpu"), alice.session("cpu"), alice.session("cpu")
            theirs = bob.session("cpu")  # created after the last snapshot, never written but logged
            for name, value in feeds.items():
                session.feed_blob(name, value)
            session.feed_blob("big", big)
            session.feed_blob("shm", feeds["b3"] * 2, shm=True)
            session.feed_blob("b0", feeds["b1"])  # overwritten
            session.remove_blob("b2")
            session.run_operator("Cos", ["b4"], ["cos"])
            emptied.feed_blob("x", np.ones(4, np.int64))
            emptied.reset()
            closed.feed_blob("x", np.ones(4, np.int64))
            closed.close()
            theirs.feed_blob("mine", np.arange(3, dtype=np.int8))
    finally:
        proc.kill()  # SIGKILL: no snapshot, only the log
        proc.wait(10)

    proc, address = serve(state, "sync")
    try:
        with Client(address, token=KEYS["alice"]) as alice, Client(address, token=KEYS["bob"]) as bob:
            restored = alice.attach(session.id)
            want = {**feeds, "b0": feeds["b1"], "big": big, "shm": feeds["b3"] * 2}
            del want["b2"]
            assert restored.blobs() == sorted([*want, "cos"])
            for name, value in want.items():
                assert same_bits(restored.fetch_blob(name), value), name
            np.testing.assert_allclose(restored.fetch_blob("cos"), np.cos(feeds["b4"]), rtol=1e-6)
            assert alice.attach(emptied.id).blobs() == []
            with pytest.raises(CosserveRpcError) as err:
                alice.attach(closed.id)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert same_bits(bob.attach(theirs.id).fetch_blob("mine"), np.arange(3, dtype=np.int8))
            with pytest.raises(CosserveRpcError) as err:
                bob.attach(session.id)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        stop(proc, signal.SIGTERM)


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    path.write_bytes(bytes(data))


def test_a_corrupt_or_oversized_session_file_costs_only_its_own_session(state: Path) -> None:
    damages = ("flipped", "truncated", "no-manifest", "over-limit")
    proc, address = serve(state, "snapshot")
    try:
        with Client(address, token=KEYS["alice"]) as alice, Client(address, token=KEYS["bob"]) as bob:
            broken = {damage: alice.session("cpu") for damage in damages}
            fine, theirs = alice.session("cpu"), bob.session("cpu")
            for session in (*broken.values(), fine, theirs):
                session.feed_blob("x", np.arange(20_000, dtype=np.float32) + len(session.id))
            broken["over-limit"].feed_blob("big", np.zeros(1 << 18, np.float32))  # 1 MiB
    finally:
        stop(proc, signal.SIGTERM)
    data = {damage: _sessions_dir(state) / f"{session.id}.safetensors" for damage, session in broken.items()}
    _flip_bytes(data["flipped"])
    with open(data["truncated"], "r+b") as f:
        f.truncate(data["truncated"].stat().st_size // 3)
    (_sessions_dir(state) / f"{broken['no-manifest'].id}.json").unlink()

    lines: list[str] = []
    proc, address = serve(state, "snapshot", "--max-session-bytes", "512KiB", log=lines)
    try:
        with Client(address, token=KEYS["alice"]) as alice, Client(address, token=KEYS["bob"]) as bob:
            for damage, session in broken.items():
                with pytest.raises(CosserveRpcError) as err:
                    alice.attach(session.id)
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, damage
                details = err.value.details()
                assert session.id in details and "could not be restored" in details and len(details) < 1024, details
                failures = [line for line in lines if session.id in line]
                assert len(failures) == 1 and "could not be restored" in failures[0], (damage, lines)
                if damage != "no-manifest":  # without its manifest nobody knows whose it was
                    with pytest.raises(CosserveRpcError) as err:
                        bob.attach(session.id)
                    assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert "--max-session-bytes" in str([line for line in lines if broken["over-limit"].id in line])
            for client, session in ((alice, fine), (bob, theirs)):
                value = np.arange(20_000, dtype=np.float32) + len(session.id)
                assert same_bits(client.attach(session.id).fetch_blob("x"), value)
            # Its owner closes it: the id is gone, and so are its files at the next snapshot.
            gone = broken["flipped"]
            alice._call("CloseSession", _close(gone.id))
            with pytest.raises(CosserveRpcError) as err:
                alice.attach(gone.id)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        stop(proc, signal.SIGTERM)
    assert not list(_sessions_dir(state).glob(f"{gone.id}.*"))
    assert list(_sessions_dir(state).glob(f"{broken['truncated'].id}.*")), "an unrestored session's files were deleted"


def _close(session_id: str) -> object:
    from cosserve.v1 import cosserve_pb2 as pb

    return pb.CloseSessionRequest(session_id=session_id)


def test_sync_log_compacted_past_its_bound_survives_a_kill_without_unacknowledged_or_torn_changes(state: Path) -> None:
    bound = 64 * 1024
    rng = np.random.default_rng(5)
    feeds = {f"b{i}": rng.standard_normal(2048).astype(np.float32) for i in range(40)}  # 8 KiB each
    proc, address = serve(state, "sync", "--sync-log-max-bytes", str(bound))
    cut = threading.Event()
    try:
        with Client(address, token=KEYS["alice"]) as alice:
            session = alice.session("cpu")
            for name, value in feeds.items():
                session.feed_blob(name, value)
            snapshot = _sessions_dir(state) / f"{session.id}.safetensors"
            deadline = time.monotonic() + 10
            while not (snapshot.exists() and _journal(state).stat().st_size < bound) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert snapshot.exists(), "the log was never compacted into a snapshot"
            assert _journal(state).stat().st_size < bound
            session.feed_blob("after", np.arange(7, dtype=np.int16))
            session.remove_blob("b0")
            session.feed_blob("torn", np.arange(20, dtype=np.float32))  # its record is torn below

            def half_a_stream() -> Iterator[bytes]:
                # A streamed feed that sends its header and one chunk, then waits: never acknowledged.
                yield wire.feed_blob_chunk_header(session.id, "unacked", 9, [1 << 20])  # FLOAT32
                yield b"".join(wire.feed_blob_chunk_data(memoryview(bytes(1 << 16))))
                cut.wait(30)

            feeder = threading.Thread(
                target=lambda: pytest.raises(CosserveRpcError, alice._call, "FeedBlobStream", half_a_stream(), framed=True),
                daemon=True,
            )
            feeder.start()
            time.sleep(0.5)  # the server holds the stream's first chunks
    finally:
        proc.kill()  # SIGKILL: no snapshot, the log is all there is
        proc.wait(10)
        cut.set()
    # The last acknowledged feed's record loses its last bytes, as if the machine had died while
    # writing it: it must come back not at all, never half.
    size = _journal(state).stat().st_size
    with open(_journal(state), "r+b") as log:
        log.truncate(size - 3)
    lines: list[str] = []
    proc, address = serve(state, "sync", "--sync-log-max-bytes", str(bound), log=lines)
    try:
        with Client(address, token=KEYS["alice"]) as alice:
            restored = alice.attach(session.id)
            want = {**feeds, "after": np.arange(7, dtype=np.int16)}
            del want["b0"]
            assert restored.blobs() == sorted(want)  # neither "torn" nor "unacked"
            for name, value in want.items():
                assert same_bits(restored.fetch_blob(name), value), name
        assert any(re.search(r"journal.log.*incomplete", line) for line in lines), lines
        # Replayed, written as snapshots, and the log started again from nothing.
        assert _journal(state).stat().st_size == 0
        assert not (_sessions_dir(state) / "journal.old.log").exists()
    finally:
        stop(proc, signal.SIGTERM)
