"""Fixtures: a real cosserve server on 127.0.0.1, a free port, and clients talking gRPC to it."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

torch = pytest.importorskip("torch")

from cosserve import Client  # noqa: E402
from cosserve.server.edge.app import RunningServer, build_server  # noqa: E402
from cosserve.server.settings import Settings  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs CUDA"))]


def start_server(**overrides: object) -> RunningServer:
    """Start the production server (same interceptors and limits) on a free loopback port (and
    the REST binding on another)."""
    settings = dataclasses.replace(Settings(host="127.0.0.1", port=0, http_port=0, max_workers=8), **overrides)
    return build_server(settings)


def start_process(
    *flags: str, env: dict[str, str] | None = None, gc_off: bool = False, log: list[str] | None = None
) -> tuple[subprocess.Popen, str]:
    """`cosserve serve` in its own process on a free loopback port; returns it and its address.
    With gc_off, Python's cycle collector is disabled, so memory held through reference cycles
    stays held and shows in RSS. With `log`, every line the server writes to stderr is appended to it."""
    prelude = "import gc; gc.disable(); " if gc_off else ""
    script = prelude + "import sys; from cosserve.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", script, "serve", "--port", "0", "--http-port", "0", "--device", "cpu", *flags],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    deadline = time.monotonic() + 60
    assert proc.stderr is not None
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if log is not None and line:
            log.append(line)
        match = re.search(r"listening on (\S+)", line)
        if match:
            # Keep the pipe drained, so the server never blocks writing a log line.
            threading.Thread(target=_drain, args=(proc.stderr, log), daemon=True).start()
            return proc, match.group(1)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError("server process did not report its address")


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM, as Kubernetes stops a pod; SIGKILL if it has not exited within `timeout`."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _drain(stream: object, log: list[str] | None) -> None:
    for line in stream:  # type: ignore[attr-defined]
        if log is not None:
            log.append(line)


@pytest.fixture(scope="session")
def server() -> Iterator[RunningServer]:
    running = start_server()
    yield running
    running.stop(0)


@pytest.fixture(scope="session")
def client(server: RunningServer) -> Iterator[Client]:
    with Client(server.address) as c:
        yield c


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def ws(client: Client, device: str):
    """A fresh session on each device (CUDA only where there is one)."""
    with client.session(device) as session:
        yield session


@pytest.fixture
def cpu_ws(client: Client):
    with client.session("cpu") as session:
        yield session
