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
    """Start the production server (same interceptors and limits) on a free loopback port."""
    settings = dataclasses.replace(Settings(host="127.0.0.1", port=0, max_workers=8), **overrides)
    return build_server(settings)


def free_port() -> int:
    """A loopback port nothing listens on now. Another process may take it before ours binds it
    (six suites share this machine): start what binds it with `retry_on_taken_port`."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server_with_metrics(**overrides: object) -> RunningServer:
    """start_server with its metrics on a free port (which --metrics-port cannot pick itself), taking
    another port when the one probed free was taken in between (a SettingError naming it)."""
    from cosserve.server.settings import SettingError

    for attempt in range(5):
        try:
            return start_server(metrics_port=free_port(), **overrides)
        except SettingError as err:
            if err.name != "metrics_port" or attempt == 4:
                raise
    raise AssertionError("unreachable")


def scrape_metrics(port: int, *, showing: str = "", timeout_s: float = 10.0) -> str:
    """The /metrics text of the server with metrics on `port`; with `showing`, scraped again until it
    has that text (at most `timeout_s`): a call's status reaches its client before the server's
    interceptor has counted the call, so a scrape right after a call may not count it yet."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        if showing in text or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def start_process(
    *flags: str, env: dict[str, str] | None = None, gc_off: bool = False, log: list[str] | None = None
) -> tuple[subprocess.Popen, str]:
    """`cosserve serve` in its own process on a free loopback port; returns it and its address.
    With gc_off, Python's cycle collector is disabled, so memory held through reference cycles
    stays held and shows in RSS. With `log`, every line the server writes to stderr is appended to it."""
    prelude = "import gc; gc.disable(); " if gc_off else ""
    script = prelude + "import sys; from cosserve.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", script, "serve", "--port", "0", "--device", "cpu", *flags],
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
