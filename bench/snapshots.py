"""`python -m bench.snapshots [--bytes 1GiB] [--blobs 16]`: SaveWorkspace and LoadWorkspace
throughput of a `cosserve serve` session against a plain copy of the same bytes on the same disk."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from bench.servers import ServerProcess
from cosserve import Client
from cosserve.server.settings import parse_size

__all__ = ["main"]

_NAME = "bench"


def _start_server(state_dir: Path, max_session_bytes: int) -> ServerProcess:
    argv = [
        sys.executable, "-m", "cosserve.cli", "serve",
        "--host", "127.0.0.1", "--port", "0", "--http-port", "off", "--device", "cpu", "--grace-s", "1",
        "--state-dir", str(state_dir), "--max-session-bytes", str(max_session_bytes),
        "--max-identity-bytes", str(max_session_bytes),
    ]  # fmt: skip
    return ServerProcess(argv, r"listening on [^\s:]+:(\d+)", "cosserve")


def _timed(repeat: int, fn: Callable[[], object]) -> list[float]:
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


def _copy_synced(source: Path, target: Path) -> None:
    """shutil.copyfile, then the fsync a snapshot's save also pays (data on the disk, not in cache)."""
    shutil.copyfile(source, target)
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_whole(path: Path, nbytes: int) -> None:
    """Read a file into one fresh buffer, as a load does (the floor of a restore)."""
    buffer = np.empty(nbytes, np.uint8)
    with open(path, "rb", buffering=0) as source:
        view = memoryview(buffer)
        filled = 0
        while filled < nbytes:
            count = source.readinto(view[filled : filled + 16 * 1024**2])
            if not count:
                break
            filled += count


def run(total_bytes: int, blobs: int, repeat: int, directory: Path) -> list[tuple[str, float, float]]:
    """(what, median seconds, GB/s) of each operation on `total_bytes` in `blobs` float32 blobs."""
    state_dir = directory / "state"
    per_blob = total_bytes // blobs // 4
    nbytes = per_blob * 4 * blobs
    generator = np.random.default_rng(10)
    rows: list[tuple[str, float, float]] = []

    def row(what: str, seconds: Sequence[float], moved: int = nbytes) -> None:
        median = statistics.median(seconds)
        rows.append((what, median, moved / median / 1e9))

    # Room for the session and, during a load, the snapshot beside it.
    with _start_server(state_dir, 2 * nbytes + 2**30) as server, Client(server.address, timeout=600) as client:
        with client.session("cpu") as ws:
            for index in range(blobs):
                ws.feed_blob(f"blob{index:03d}", generator.standard_normal(per_blob, dtype=np.float32))
            row("SaveWorkspace (RPC: write, crc32, fsync, rename)", _timed(repeat, lambda: ws.save(_NAME)))
            row("LoadWorkspace (RPC: read, crc32, replace)", _timed(repeat, lambda: ws.load(_NAME)))
    data = next((state_dir / "snapshots").glob(f"*/{_NAME}.safetensors"))
    copy = directory / "copy.bin"
    file_bytes = data.stat().st_size
    row("shutil.copyfile + fsync (same bytes, same disk)", _timed(repeat, lambda: _copy_synced(data, copy)), file_bytes)
    row("shutil.copyfile (page cache only)", _timed(repeat, lambda: shutil.copyfile(data, copy)), file_bytes)
    row("read the file into one buffer (page cache)", _timed(repeat, lambda: _read_whole(data, file_bytes)), file_bytes)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.snapshots", description=__doc__)
    parser.add_argument("--bytes", default="1GiB", help="tensor bytes of the session (default 1GiB)")
    parser.add_argument("--blobs", type=int, default=16, help="float32 blobs they are split into (default 16)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each operation; the median is shown")
    parser.add_argument("--dir", default=None, help="directory on the disk to measure (default: the temp dir)")
    args = parser.parse_args(argv)
    total = parse_size(args.bytes)
    with tempfile.TemporaryDirectory(prefix="cosserve-bench-", dir=args.dir) as directory:
        rows = run(total, max(1, args.blobs), max(1, args.repeat), Path(directory))
    copy_rate = rows[2][2]
    print(f"{total / 2**30:.2f} GiB in {args.blobs} float32 blobs, median of {args.repeat}, in {args.dir or tempfile.gettempdir()}")
    print(f"{'operation':<50} {'seconds':>9} {'GB/s':>7} {'vs copy+fsync':>14}")
    for what, seconds, rate in rows:
        print(f"{what:<50} {seconds:>9.3f} {rate:>7.2f} {rate / copy_rate:>13.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
