"""The cost of --durability on W3-like feeds: `none`, `snapshot` and `sync` side by side in one run,
each a real `cosserve serve` process with its own state directory on the same disk.

    python -m bench.durability [--big-mib 64] [--big-feeds 5] [--small-kib 32] [--small-feeds 300] [--dir DIR]

`sync` fsyncs every feed's record before acknowledging it, so its cost is the disk's write and
fsync time; `snapshot` writes nothing on a feed. Also timed: a restart after SIGKILL in `sync`,
which replays the log and writes it as snapshots before serving. The state directories go in
`--dir` (default: the system's temporary directory; it must be a real disk, not tmpfs, for the
fsyncs to mean anything) and are deleted after.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.report import _grid, median
from bench.servers import ServerProcess, start_cosserve
from cosserve import Client

__all__ = ["main"]

MODES = ("none", "snapshot", "sync")


def _timed(feed: Callable[[], None], count: int) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        feed()
        times.append(time.perf_counter() - start)
    return times


def _state_env(state: Path, mode: str) -> dict[str, str]:
    return {"COSSERVE_STATE_DIR": str(state), "COSSERVE_DURABILITY": mode, "COSSERVE_SNAPSHOT_INTERVAL_S": "0"}


def _filesystem(path: Path) -> str:
    """The type of the filesystem `path` is on, from /proc/mounts (longest mount point that holds it)."""
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                _, point, fstype, *_ = line.split()
                if str(path.resolve()).startswith(point) and len(point) > len(best):
                    best, kind = point, fstype
    except OSError:
        pass
    return kind


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.durability", description=__doc__.split("\n\n")[0])
    parser.add_argument("--big-mib", type=int, default=64, help="MiB of each large (streamed) feed")
    parser.add_argument("--big-feeds", type=int, default=5, help="large feeds per mode")
    parser.add_argument("--small-kib", type=int, default=32, help="KiB of each small (unary) feed")
    parser.add_argument("--small-feeds", type=int, default=300, help="small feeds per mode")
    parser.add_argument("--dir", default=None, help="where the state directories go (a real disk)")
    ns = parser.parse_args(argv)

    big = np.random.default_rng(0).standard_normal(ns.big_mib * 2**20 // 4).astype(np.float32)
    small = np.random.default_rng(1).standard_normal(ns.small_kib * 1024 // 4).astype(np.float32)
    root = Path(tempfile.mkdtemp(prefix="cosserve-durability-", dir=ns.dir))
    times: dict[str, dict[str, list[float]]] = {mode: {"big": [], "small": []} for mode in MODES}
    restart_s = 0.0
    servers: dict[str, ServerProcess] = {}
    try:
        for mode in MODES:
            servers[mode] = start_cosserve(allow_shm=False, env=_state_env(root / mode, mode))
        clients = {mode: Client(server.address) for mode, server in servers.items()}
        sessions = {mode: client.session("cpu") for mode, client in clients.items()}
        for session in sessions.values():
            session.feed_blob("warm", small)  # connection and first-call costs out of the way
        # The modes take turns, feed by feed, so a change in the machine's load touches them alike.
        # Each feed replaces the one before, so the sessions (and the log) stay bounded.
        for key, value, count in (("big", big, ns.big_feeds), ("small", small, ns.small_feeds)):
            for _ in range(count):
                for mode, session in sessions.items():
                    times[mode][key] += _timed(lambda: session.feed_blob(key, value), 1)
        for client in clients.values():
            client.close()
        servers["sync"].proc.kill()
        servers["sync"].proc.wait(15)
        start = time.perf_counter()
        with start_cosserve(allow_shm=False, env=_state_env(root / "sync", "sync")) as server, Client(server.address) as client:
            client.attach(sessions["sync"].id)
            restart_s = time.perf_counter() - start
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
    results = {mode: {key: median(values) for key, values in by_key.items()} for mode, by_key in times.items()}

    rows = []
    for label, key, nbytes in (
        (f"{ns.big_mib} MiB FeedBlobStream", "big", big.nbytes),
        (f"{ns.small_kib} KiB FeedBlob", "small", small.nbytes),
    ):
        base = results["none"][key]
        for mode in MODES:
            seconds = results[mode][key]
            rows.append([
                label, mode, f"{seconds * 1000:.2f}", f"{nbytes / seconds / 1e6:.0f}", f"{seconds / base:.2f}x",
            ])  # fmt: skip
    print(f"state directories on {_filesystem(root)} ({root.parent}); {os.cpu_count()} CPUs")
    print(_grid(["feed", "durability", "ms per feed (median)", "MB/s", "vs none"], rows))
    print(
        f"restart after SIGKILL with sync (replay of the log, snapshots written, then serving): {restart_s:.2f} s "
        "from spawn to a session attached"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
