"""Server processes for the bench: cosserve (the real `cosserve serve`) and the bare floors,
each on 127.0.0.1 in its own process, plus a sampler of a process's resident memory."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

import psutil

__all__ = ["MemorySampler", "ServerProcess", "start_cosserve", "start_floor"]

_START_TIMEOUT_S = 60.0


class ServerProcess:
    """A child server process; `address` is known once it printed its port. Stops on exit."""

    def __init__(self, argv: Sequence[str], pattern: str, name: str, env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            list(argv),
            env=None if env is None else {**os.environ, **env},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        found: queue.Queue[str | None] = queue.Queue()
        regex = re.compile(pattern)

        def drain() -> None:  # keep reading so the child never blocks on a full pipe
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line.rstrip())
                match = regex.search(line)
                if match:
                    found.put(match.group(1))
            found.put(None)  # the child closed its output: it exited

        threading.Thread(target=drain, daemon=True, name=f"{name}-output").start()
        try:
            port = found.get(timeout=_START_TIMEOUT_S)
        except queue.Empty:
            self.stop()
            raise RuntimeError(f"{name} did not start within {_START_TIMEOUT_S} s: {self.lines[-20:]}") from None
        if port is None:
            self.stop()
            raise RuntimeError(f"{name} exited (code {self.proc.returncode}) before serving: {self.lines[-20:]}")
        self.address = f"127.0.0.1:{port}"
        self.rest_address = ""  # cosserve's REST binding, when start_cosserve(rest=True) asked for it
        self.process = psutil.Process(self.proc.pid)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def rss(self) -> int:
        """Private resident bytes: RSS less shared pages (a client's shared-memory region while it
        is mapped, libraries), so a transfer's cost to the server is what grows."""
        info = self.process.memory_info()
        return int(info.rss - info.shared)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        if self.proc.stdin is not None:
            self.proc.stdin.close()


def start_cosserve(
    allow_shm: bool = True, max_workers: int = 16, env: Mapping[str, str] | None = None, device: str = "cpu",
    rest: bool = False,
) -> ServerProcess:
    """`cosserve serve` on a free loopback port, sessions on `device` by default, shared memory
    allowed; with `rest`, the REST binding on another free port (`rest_address`)."""
    argv = [
        sys.executable, "-m", "cosserve.cli", "serve",
        "--host", "127.0.0.1", "--port", "0", "--http-port", "0" if rest else "off", "--device", device,
        "--max-workers", str(max_workers), "--grace-s", "1", "--log-level", "INFO",
        "--allow-shm" if allow_shm else "--no-allow-shm",
    ]  # fmt: skip
    server = ServerProcess(argv, r"listening on [^\s:]+:(\d+)", "cosserve", env)
    if rest:  # logged right after the gRPC address
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not (found := [m for line in server.lines if (m := re.search(r"HTTP/REST at http://([^/\s]+)/", line))]):
            if time.monotonic() > deadline or server.proc.poll() is not None:
                server.stop()
                raise RuntimeError(f"cosserve logged no REST address: {server.lines[-20:]}")
            time.sleep(0.05)
        server.rest_address = found[0].group(1)
    return server


def start_floor(kind: str = "threaded", max_workers: int = 16) -> ServerProcess:
    """`python -m bench.floor` of one kind (bench.floor.KINDS): "threaded" with `max_workers`
    handler threads, or "aio" on one event loop."""
    argv = [sys.executable, "-m", "bench.floor", "--port", "0"]
    argv += ["--aio"] if kind == "aio" else ["--max-workers", str(max_workers)]
    return ServerProcess(argv, r"^PORT (\d+)", f"floor-{kind}")


class MemorySampler:
    """Samples a server's private resident bytes every `interval_s` in a `with` block; `.peak`."""

    def __init__(self, server: ServerProcess, interval_s: float = 0.005) -> None:
        self.server = server
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.server.rss())
            time.sleep(self.interval_s)

    def __enter__(self) -> MemorySampler:
        self.peak = self.server.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.peak = max(self.peak, self.server.rss())
