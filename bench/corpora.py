"""Start-up with shared corpora: seconds from process start to SERVING with no corpus, a 1 GiB and
a 4 GiB `.npy` corpus (`--corpus NAME=FILE`), and how much of the file is resident then.

    python -m bench.corpora [--runs 3] [--sizes-gib 1,4]

The corpora are sparse files made in a temporary directory (a header and a hole: made at once,
whatever the size) and deleted after; a size that does not fit the free disk is skipped. A
memory-mapped start reads only the header, so its time should not grow with the file.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.report import _grid, median
from bench.servers import ServerProcess

__all__ = ["main", "start_to_serving"]

_WIDTH = 1024  # float32 columns of the corpus: 4 KiB rows
_SERVING_TIMEOUT_S = 120.0


def _sparse_npy(path: Path, nbytes: int) -> None:
    """A .npy of (nbytes / 4 KiB, 1024) float32 whose data is a hole: no disk written but the header."""
    rows = nbytes // (_WIDTH * 4)
    with open(path, "wb") as file:
        np.lib.format.write_array_header_1_0(file, {"descr": "<f4", "fortran_order": False, "shape": (rows, _WIDTH)})
        file.truncate(file.tell() + rows * _WIDTH * 4)


def _serving(address: str, deadline: float) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.01)
    raise RuntimeError(f"{address} was not SERVING within {_SERVING_TIMEOUT_S} s")


def start_to_serving(corpus: Path | None) -> tuple[float, int, int]:
    """(seconds from spawning `cosserve serve` to health SERVING, RSS then, resident bytes of the corpus file)."""
    argv = [sys.executable, "-m", "cosserve.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--http-port", "off", "--device", "cpu"]
    if corpus is not None:
        argv += ["--corpus", f"bench={corpus}"]
    started = time.monotonic()
    with ServerProcess(argv, r"listening on [^\s:]+:(\d+)", "cosserve") as server:
        _serving(server.address, started + _SERVING_TIMEOUT_S)
        seconds = time.monotonic() - started
        rss = server.process.memory_info().rss
        mapped = sum(m.rss for m in server.process.memory_maps(grouped=True) if corpus is not None and m.path == str(corpus))
    return seconds, rss, mapped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.corpora", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="starts per size; the median is shown [default 3]")
    parser.add_argument("--sizes-gib", default="1,4", help="corpus sizes in GiB, besides none [default 1,4]")
    ns = parser.parse_args(argv)
    sizes = [0] + [int(float(s) * 1024**3) for s in ns.sizes_gib.split(",") if s.strip()]
    rows = []
    with tempfile.TemporaryDirectory(prefix="cosserve-corpora-") as folder:
        for nbytes in sizes:
            label = "none" if not nbytes else f"{nbytes / 1024**3:g} GiB .npy"
            path = None
            if nbytes:
                # A sparse file takes no room, but a filesystem without holes would write it all.
                free = shutil.disk_usage(folder).free
                if nbytes + 1024**3 > free:
                    rows.append([label, "skipped", f"{free >> 30} GiB free", "-", "-"])
                    continue
                path = Path(folder) / f"corpus-{nbytes >> 20}MiB.npy"
                _sparse_npy(path, nbytes)
            runs = [start_to_serving(path) for _ in range(ns.runs)]
            seconds = median([r[0] for r in runs])
            rows.append([
                label, f"{seconds:.2f}", f"{min(r[0] for r in runs):.2f}",
                f"{median([r[1] for r in runs]) / 2**20:.0f}", f"{median([r[2] for r in runs]) / 2**20:.2f}",
            ])  # fmt: skip
            if path is not None:
                os.unlink(path)
    print(_grid(["corpus", "start to SERVING s (median)", "min s", "RSS MiB", "corpus resident MiB"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
