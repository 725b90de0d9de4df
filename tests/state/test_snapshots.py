"""Named snapshots against a real server: SaveWorkspace and LoadWorkspace bit-exact for every dtype,
names that never reach the filesystem, snapshots that belong to their identity, damaged files,
limits checked before anything is read, and saves that die half-way."""

from __future__ import annotations

import json
import math
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from cosserve import Client, CosserveRpcError
from tests.conftest import DEVICES, start_server
from tests.edge.test_security import KEYS, keys_file

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from cosserve.server.errors import InvalidArgument  # noqa: E402
from cosserve.server.state import snapshots  # noqa: E402

# Bit patterns numpy and torch would not produce by arithmetic: NaNs with payloads, -0.0, infinities.
_F32_BITS = [0x7FC00001, 0xFFC00123, 0x80000000, 0x7F800000, 0xFF800000, 0x00000001, 0x3F800000]
_F16_BITS = [0x7E01, 0xFE55, 0x8000, 0x7C00, 0x0001, 0x3C00]
_BF16_BITS = [0x7FC1, 0xFFA5, 0x8000, 0x7F80, 0x0001, 0x3F80]
_F64_BITS = [0x7FF8000000000001, 0xFFF800000000ABCD, 0x8000000000000000, 0x0000000000000001]


def _bits(values: list[int], int_dtype: Any, dtype: Any) -> Any:
    return torch.tensor(np.array(values, dtype=np.uint64).astype(np.int64)).to(int_dtype).view(dtype)


def sample_blobs() -> dict[str, Any]:
    """A blob of every wire dtype, with the values that break a lax round trip."""
    generator = torch.Generator().manual_seed(10)
    return {
        "bool": torch.tensor([[True, False, True]]),
        "uint8": torch.arange(256, dtype=torch.uint8),
        "int8": torch.tensor([-128, -1, 0, 127], dtype=torch.int8),
        "int16": torch.tensor([-32768, 32767], dtype=torch.int16),
        "int32": torch.tensor([-(2**31), 2**31 - 1], dtype=torch.int32),
        "int64": torch.tensor([-(2**63), 2**63 - 1], dtype=torch.int64),
        "float16": _bits(_F16_BITS, torch.int16, torch.float16),
        "bfloat16": _bits(_BF16_BITS, torch.int16, torch.bfloat16),
        "float32": _bits(_F32_BITS, torch.int32, torch.float32),
        "float64": _bits(_F64_BITS, torch.int64, torch.float64),
        "empty": torch.empty(0, 7, dtype=torch.float32),
        "empty_bf16": torch.empty(3, 0, dtype=torch.bfloat16),
        "scalar": torch.tensor(-0.0, dtype=torch.float64),
        "scalar_bool": torch.tensor(False),
        # Above limits.INLINE_BYTES: fed and fetched as streams.
        "big": torch.randn(3 * 1024 * 1024 // 4 + 5, generator=generator),
        "named ünïcode / with spaces": torch.tensor([1.5, -2.5]),
    }


def raw(value: Any) -> tuple[str, tuple[int, ...], bytes]:
    """dtype, shape and bytes of a numpy array or torch tensor, compared bit for bit."""
    if isinstance(value, torch.Tensor):
        host = value.contiguous()
        data = host.view(torch.int16) if host.dtype is torch.bfloat16 else host
        name = str(host.dtype).removeprefix("torch.")
        return name, tuple(host.shape), data.numpy().tobytes()
    array = np.asarray(value)
    return str(array.dtype), array.shape, array.tobytes()


def assert_same(got: Any, expected: Any, what: str) -> None:
    assert raw(got) == raw(expected), what


def code_of(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(CosserveRpcError) as caught:
        call()
    return caught.value.code(), caught.value.details()


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="module")
def snap_client(state_dir: Path) -> Iterator[Client]:
    running = start_server(state_dir=str(state_dir))
    with Client(running.address) as client:
        yield client
    running.stop(0)


def files_of(state_dir: Path, name: str, owner: str = "anonymous") -> tuple[Path, Path]:
    directory = state_dir / "snapshots" / owner
    return directory / f"{name}.safetensors", directory / f"{name}.json"


# ---- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_every_dtype_round_trips_bit_exact(snap_client: Client, state_dir: Path, device: str) -> None:
    blobs = sample_blobs()
    name = f"every-dtype.{device}"
    with snap_client.session(device) as ws:
        for blob, value in blobs.items():
            ws.feed_blob(blob, value)
        saved = ws.save(name)
        assert saved == (len(blobs), sum(v.numel() * v.element_size() for v in blobs.values()))

        # What was there before the load goes: a load replaces the session's blobs.
        ws.reset()
        ws.feed_blob("extra", np.ones(3, np.float32))
        ws.feed_blob("big", np.zeros(2, np.float32))
        assert ws.load(name) == saved
        assert ws.blobs() == sorted(blobs)
        for blob, value in blobs.items():
            assert_same(ws.fetch_blob(blob), value, blob)

    # The file is plain safetensors: its own reader finds the same tensors, bit for bit.
    data, manifest = files_of(state_dir, name)
    from_file = safetensors_torch.load_file(str(data))
    assert sorted(from_file) == sorted(blobs)
    for blob, value in blobs.items():
        assert_same(from_file[blob], value, blob)
    described = json.loads(manifest.read_text())
    assert described["total_bytes"] == saved[1] and len(described["blobs"]) == saved[0]


def test_a_snapshot_loads_into_another_session_and_replaces_an_older_one(snap_client: Client) -> None:
    with snap_client.session("cpu") as first, snap_client.session("cpu") as second:
        first.feed_blob("x", np.arange(4, dtype=np.int32))
        first.save("replaced")
        first.feed_blob("x", np.arange(5, dtype=np.int64))
        first.feed_blob("y", np.float64(2.0))
        assert first.save("replaced") == (2, 5 * 8 + 8)
        assert second.load("replaced") == (2, 48)
        assert_same(second.fetch_blob("x"), np.arange(5, dtype=np.int64), "x")
        first.reset()
        assert first.save("empty-session") == (0, 0)
        assert second.load("empty-session") == (0, 0)
        assert second.blobs() == []


def test_concurrent_saves_of_one_name_leave_one_whole_snapshot(snap_client: Client) -> None:
    sessions = [snap_client.session("cpu") for _ in range(4)]
    try:
        for index, ws in enumerate(sessions):
            ws.feed_blob("who", np.full(300_000, index, np.int32))
            ws.feed_blob(f"only-{index}", np.int8(index))
        threads = [threading.Thread(target=ws.save, args=("contended",)) for ws in sessions for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        with snap_client.session("cpu") as reader:
            assert reader.load("contended") == (2, 1_200_001)
            who = reader.fetch_blob("who")
            index = int(who[0])
            assert reader.blobs() == sorted(["who", f"only-{index}"])
            assert np.array_equal(who, np.full(300_000, index, np.int32))
    finally:
        for ws in sessions:
            ws.close()


# ---- names, identities, no state dir -------------------------------------------------------

BAD_NAMES = ["../x", "a/b", "/abs", ".hidden", "..", ".", "a..b", "x" * 129, "nul\x00byte", "", "tab\tname", "ü", "a\\b"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_names_that_could_leave_the_directory_are_refused(snap_client: Client, state_dir: Path, name: str) -> None:
    before = sorted(p.relative_to(state_dir) for p in state_dir.rglob("*"))
    with snap_client.session("cpu") as ws:
        ws.feed_blob("x", np.ones(2, np.float32))
        for call in (ws.save, ws.load):
            code, details = code_of(lambda: call(name))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, details
            assert "letters, digits" in details
    assert sorted(p.relative_to(state_dir) for p in state_dir.rglob("*")) == before


def test_the_longest_name_is_allowed(snap_client: Client) -> None:
    name = "n" * 128
    with snap_client.session("cpu") as ws:
        ws.feed_blob("x", np.ones(2, np.float32))
        assert ws.save(name) == (1, 8)
        assert ws.load(name) == (1, 8)


def test_loading_a_snapshot_never_saved_is_not_found(snap_client: Client) -> None:
    with snap_client.session("cpu") as ws:
        ws.feed_blob("keep", np.ones(2, np.float32))
        code, details = code_of(lambda: ws.load("never-saved"))
        assert code == grpc.StatusCode.NOT_FOUND and "never-saved" in details
        assert ws.blobs() == ["keep"]


def test_without_a_state_dir_both_are_failed_precondition(client: Client) -> None:
    with client.session("cpu") as ws:
        for call in (ws.save, ws.load):
            code, details = code_of(lambda: call("fine"))
            assert code == grpc.StatusCode.FAILED_PRECONDITION and "--state-dir" in details


def test_a_snapshot_belongs_to_the_identity_that_saved_it(tmp_path: Path) -> None:
    running = start_server(state_dir=str(tmp_path / "state"), api_keys_file=keys_file(tmp_path, "alice", "bob"))
    try:
        with Client(running.address, token=KEYS["alice"]) as alice, Client(running.address, token=KEYS["bob"]) as bob:
            with alice.session("cpu") as mine, bob.session("cpu") as theirs:
                mine.feed_blob("secret", np.arange(3, dtype=np.float32))
                mine.save("shared-name")
                theirs.feed_blob("own", np.int64(7))
                code, _ = code_of(lambda: theirs.load("shared-name"))
                assert code == grpc.StatusCode.NOT_FOUND  # as for a name never saved
                assert theirs.blobs() == ["own"]
                theirs.save("shared-name")  # bob's own, beside alice's
                assert mine.load("shared-name") == (1, 12)
                assert mine.blobs() == ["secret"]
        # Identity names never reach the filesystem: a directory per identity, named by a digest.
        owners = sorted(p.name for p in (tmp_path / "state" / "snapshots").iterdir())
        assert owners == sorted(snapshots.owner_dir(n) for n in ("alice", "bob"))
        assert all(len(o) == 64 and "alice" not in o for o in owners)
    finally:
        running.stop(0)


# ---- damage, limits, crashes ---------------------------------------------------------------


def _flip_data_byte(data: Path, manifest: Path) -> str:
    blob = bytearray(data.read_bytes())
    blob[-3] ^= 0x10  # in the last blob's data, past the header
    data.write_bytes(bytes(blob))
    return "checksum"


def _truncate(data: Path, manifest: Path) -> str:
    data.write_bytes(data.read_bytes()[:-100])
    return "truncated"


def _garbage_manifest(data: Path, manifest: Path) -> str:
    manifest.write_bytes(b"\x00\xffnot json{" * 10)
    return "not a JSON manifest"


def _lying_manifest(data: Path, manifest: Path) -> str:
    described = json.loads(manifest.read_text())
    described["blobs"][0]["shape"] = [1, 2, 3, 4]
    described["blobs"][0]["bytes"] = 24 * 4
    manifest.write_text(json.dumps(described))
    return "'total_bytes'"


def _header_mismatch(data: Path, manifest: Path) -> str:
    described = json.loads(manifest.read_text())
    described["blobs"][0]["dtype"] = "I32"  # same size as F32: only the header can tell
    manifest.write_text(json.dumps(described))
    return "is not the one its manifest describes"


def _missing_data(data: Path, manifest: Path) -> str:
    data.unlink()
    return "missing"


def _manifest_bomb(data: Path, manifest: Path) -> str:
    manifest.write_bytes(b"[" * 200_000)
    return "not a JSON manifest"


def _huge_manifest(data: Path, manifest: Path) -> str:
    with manifest.open("ab") as out:
        out.truncate(snapshots.MAX_MANIFEST_BYTES + 1)
    return "above the"


DAMAGE = [_flip_data_byte, _truncate, _garbage_manifest, _lying_manifest, _header_mismatch, _missing_data, _manifest_bomb, _huge_manifest]


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__.strip("_"))
def test_a_damaged_snapshot_is_failed_precondition_and_changes_nothing(
    snap_client: Client, state_dir: Path, damage: Callable[[Path, Path], str]
) -> None:
    name = f"damaged-{damage.__name__.strip('_')}"
    with snap_client.session("cpu") as ws:
        ws.feed_blob("a", np.arange(6, dtype=np.float32))
        ws.feed_blob("b", np.arange(1000, dtype=np.float32))
        ws.save(name)
        ws.reset()
        ws.feed_blob("keep", np.arange(4, dtype=np.int16))
        expected = damage(*files_of(state_dir, name))
        code, details = code_of(lambda: ws.load(name))
        assert code == grpc.StatusCode.FAILED_PRECONDITION, details
        assert expected in details and name in details, details
        assert ws.blobs() == ["keep"]
        assert_same(ws.fetch_blob("keep"), np.arange(4, dtype=np.int16), "keep")


def test_a_load_past_the_session_limit_is_refused_before_the_data_is_read(state_dir: Path) -> None:
    name = "too-big-later"
    with snap_client_at(state_dir) as roomy, roomy.session("cpu") as ws:
        ws.feed_blob("big", np.zeros(1_000_000, np.float32))
        ws.save(name)
    data, _ = files_of(state_dir, name)
    _flip_data_byte(data, data)  # a read of the data would answer FAILED_PRECONDITION
    with snap_client_at(state_dir, max_session_bytes=2_000_000) as tight, tight.session("cpu") as ws:
        ws.feed_blob("keep", np.ones(4, np.float64))
        code, details = code_of(lambda: ws.load(name))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert "--max-session-bytes" in details
        assert ws.blobs() == ["keep"]
        assert_same(ws.fetch_blob("keep"), np.ones(4, np.float64), "keep")


class snap_client_at:
    """A client of a server of its own on `state_dir` (with settings), stopped on leaving."""

    def __init__(self, state_dir: Path, **settings: Any) -> None:
        self.running = start_server(state_dir=str(state_dir), **settings)
        self.client = Client(self.running.address)

    def __enter__(self) -> Client:
        return self.client

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self.running.stop(0)


def test_a_save_that_died_before_its_rename_leaves_the_old_snapshot(snap_client: Client, state_dir: Path) -> None:
    name = "survivor"
    with snap_client.session("cpu") as ws:
        ws.feed_blob("v", np.arange(10, dtype=np.float64))
        ws.save(name)
        data, manifest = files_of(state_dir, name)
        # What a process killed between writing its temporary files and renaming them leaves.
        strays = [data.parent / f".{name}.0123456789ab.safetensors.tmp", data.parent / f".{name}.0123456789ab.json.tmp"]
        strays[0].write_bytes(data.read_bytes()[:50])
        strays[1].write_text('{"format": "cosserve-snapshot", "blobs": [')
        ws.reset()
        assert ws.load(name) == (1, 80)
        assert_same(ws.fetch_blob("v"), np.arange(10, dtype=np.float64), "v")
        # The next save of that name clears them away.
        ws.save(name)
        assert not any(s.exists() for s in strays)
        assert sorted(p.name for p in data.parent.iterdir() if p.name.startswith(f".{name}.")) == []


def test_a_disk_without_room_is_resource_exhausted(snap_client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    # A full disk stood in for by what shutil reports of it (the server runs in this process).
    real = shutil.disk_usage
    monkeypatch.setattr(snapshots.shutil, "disk_usage", lambda p: real(p)._replace(free=1024))
    with snap_client.session("cpu") as ws:
        ws.feed_blob("x", np.ones(1000, np.float32))
        code, details = code_of(lambda: ws.save("no-room"))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "free" in details, details
    monkeypatch.undo()


def test_a_blob_safetensors_cannot_name_is_refused(snap_client: Client) -> None:
    with snap_client.session("cpu") as ws:
        ws.feed_blob("__metadata__", np.ones(2, np.float32))
        code, details = code_of(lambda: ws.save("reserved"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "__metadata__" in details


def test_dtypes_outside_safetensors_set_are_refused(tmp_path: Path) -> None:
    # No wire dtype can carry these, so this is the core's own check.
    for dtype in (torch.complex64, torch.uint16) if hasattr(torch, "uint16") else (torch.complex64,):
        with pytest.raises(InvalidArgument, match="cannot hold"):
            snapshots.write(tmp_path / "odd", {"z": torch.zeros(2, dtype=dtype)}, {})
    assert list(tmp_path.iterdir()) == []


def test_the_charge_comes_before_any_tensor(tmp_path: Path) -> None:
    path = tmp_path / "owner" / "s"
    snapshots.write(path, {"a": torch.arange(10.0), "bb": torch.zeros(3, 3, dtype=torch.int64)}, {"k": "v"})
    charged: list[int] = []

    def refuse(nbytes: int) -> None:
        charged.append(nbytes)
        raise InvalidArgument("no room")

    with pytest.raises(InvalidArgument):
        snapshots.read(path, torch.device("cpu"), refuse)
    # What a session is charged for them: data, names and per-blob overhead.
    from cosserve.server.state.workspace import blob_charge

    assert charged == [blob_charge("a", 40) + blob_charge("bb", 72)]
    tensors, meta = snapshots.read(path, torch.device("cpu"), lambda n: None)
    assert meta == {"k": "v"} and torch.equal(tensors["a"], torch.arange(10.0))
    assert math.prod(tensors["bb"].shape) == 9


def test_a_server_killed_mid_save_keeps_the_old_snapshot(tmp_path: Path) -> None:
    """kill -9 of a `cosserve serve` process while it writes a snapshot over an older one: after a
    restart the older one loads whole, and the dead save's temporary files are ignored."""
    import signal
    import time

    from tests.conftest import start_process

    state = tmp_path / "state"
    directory = state / "snapshots" / "anonymous"
    old = np.arange(1000, dtype=np.float64)
    proc, address = start_process("--state-dir", str(state))
    try:
        with Client(address, timeout=60) as client:
            ws = client.session("cpu")  # not closed: its server is killed under it
            ws.closed = True
            ws.feed_blob("v", old)
            ws.save("kept")
            ws.feed_blob("v", np.ones(48 * 1024 * 1024 // 8))  # 48 MiB: a save that takes a while
            outcome: list[object] = []
            saver = threading.Thread(target=lambda: outcome.append(_result_of(ws.save, "kept")))
            saver.start()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not any(p.name.startswith(".kept.") for p in directory.iterdir()):
                time.sleep(0.001)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            saver.join(30)
        if outcome and outcome[0] == (1, 48 * 1024 * 1024):
            pytest.skip("the save finished before the kill landed")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    proc, address = start_process("--state-dir", str(state))
    try:
        with Client(address) as client, client.session("cpu") as ws:
            assert ws.load("kept") == (1, 8000)
            assert_same(ws.fetch_blob("v"), old, "v")
    finally:
        proc.kill()
        proc.wait(10)


def _result_of(call: Callable[[str], Any], name: str) -> object:
    try:
        return call(name)
    except CosserveRpcError as err:
        return err.code()
