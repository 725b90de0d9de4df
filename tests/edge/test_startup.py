"""Start-up refuses what it cannot honour: bad settings and ports in use get one line and exit 2;
connections that go quiet or grow old are closed by the server."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.certs import make_certs
from tests.conftest import start_server

from cosserve.server.settings import SettingError

SERVE = [sys.executable, "-m", "cosserve.cli", "serve", "--device", "cpu"]
# A `cosserve serve` that would start anyway is stopped after this long. The ones refused here
# exit once their flags are read, in the time an import of torch takes (seconds; more on a busy
# machine, where six of them share the cores).
_PROCESS_LIMIT_S = 120.0


@pytest.fixture(scope="module")
def listener() -> Iterator[socket.socket]:
    """A port held by someone else: a plain listening socket on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock


@pytest.fixture(scope="module")
def grpc_server():
    """A running cosserve server whose port a second one must not share."""
    running = start_server()
    yield running
    running.stop(0)


def _cases(listener_port: int, grpc_port: int, certs_dir: Path) -> dict[str, tuple[list[str], dict[str, str], str]]:
    certs = make_certs(certs_dir)
    return {
        # name: (flags, environment, what the one line says)
        "port-out-of-range": (["--port", "70000"], {}, "--port 70000: must be 0–65535"),
        "workers-from-environment": ([], {"COSSERVE_MAX_WORKERS": "0"}, "COSSERVE_MAX_WORKERS=0: must be at least 1"),
        "host-unresolvable": (["--host", "not-a-host", "--port", "0"], {}, "--host not-a-host: "),
        "port-in-use-by-cosserve": (["--port", str(grpc_port)], {}, f"--port {grpc_port}: 127.0.0.1:{grpc_port} is in use"),
        "metrics-port-in-use": (
            ["--port", "0", "--metrics-port", str(listener_port)],
            {},
            f"--metrics-port {listener_port}: 127.0.0.1:{listener_port} is in use",
        ),
        "tls-key-of-another-cert": (
            ["--port", "0", "--tls-cert", str(certs.server.cert), "--tls-key", str(certs.client.key)],
            {},
            f"--tls-key {certs.client.key}: is not the key of --tls-cert {certs.server.cert}",
        ),
    }


@pytest.fixture(scope="module")
def refused(listener, grpc_server, tmp_path_factory) -> dict[str, tuple[str, subprocess.CompletedProcess[str]]]:
    """Every case's `cosserve serve`, run at once (each is mostly an import of torch)."""
    cases = _cases(listener.getsockname()[1], grpc_server.port, tmp_path_factory.mktemp("certs"))
    procs = {
        name: subprocess.Popen(
            SERVE + flags,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (flags, env, _) in cases.items()
    }
    deadline = time.monotonic() + _PROCESS_LIMIT_S
    results = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results[name] = (cases[name][2], subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


@pytest.mark.parametrize(
    "case",
    [
        "port-out-of-range",
        "workers-from-environment",
        "host-unresolvable",
        "port-in-use-by-cosserve",
        "metrics-port-in-use",
        "tls-key-of-another-cert",
    ],
)
def test_bad_start_exits_2_with_one_line_naming_the_setting(refused, case):
    expected, done = refused[case]
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, f"exit {done.returncode} (-9: still serving after {_PROCESS_LIMIT_S} s); {done.stderr[-600:]}"
    assert len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith("cosserve serve: ") and expected in lines[0], lines[0]


def test_second_server_on_a_port_in_use_is_refused_and_the_first_keeps_serving(grpc_server):
    with pytest.raises(SettingError, match=f"--port {grpc_server.port}: .* is in use"):
        start_server(port=grpc_server.port)
    from cosserve import Client

    with Client(grpc_server.address, timeout=10) as client:
        assert [op.name for op in client.operators()]


# ---- HTTP/2 by hand: a client that finishes the handshake and then says nothing ----

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_SETTINGS, _PING, _GOAWAY = 0x4, 0x6, 0x7
_ACK = 0x1
_ENHANCE_YOUR_CALM = 0xB


def _frame(kind: int, flags: int, payload: bytes = b"", stream: int = 0) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


class _QuietPeer:
    """A raw TCP connection that speaks just enough HTTP/2: the preface, an empty SETTINGS, and
    the ACK of the server's SETTINGS (and of its PINGs); no calls."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self._buffer = b""
        self.send(_PREFACE + _frame(_SETTINGS, 0))
        deadline = time.monotonic() + 5
        for _ in range(100):  # the server's SETTINGS is its first frame
            frame = self._read_frame(deadline)
            if frame is None:
                raise AssertionError("the server sent no HTTP/2 SETTINGS")
            if frame[0] == _SETTINGS and not frame[1] & _ACK:
                self.send(_frame(_SETTINGS, _ACK))
                return
        raise AssertionError("the server sent no HTTP/2 SETTINGS")

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed by the server: its GOAWAY, if any, is still there to read

    def _read_exactly(self, n: int, deadline: float) -> bytes | None:
        while len(self._buffer) < n:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                return None
            if not chunk:
                return None
            self._buffer += chunk
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def _read_frame(self, deadline: float) -> tuple[int, int, bytes] | None:
        """(type, flags, payload), or None at the end of the connection or the deadline."""
        header = self._read_exactly(9, deadline)
        if header is None:
            return None
        payload = self._read_exactly(int.from_bytes(header[:3], "big"), deadline)
        return None if payload is None else (header[3], header[4], payload)

    def wait_for_close(self, within_s: float) -> tuple[str, bytes, int | None, float]:
        """(how, GOAWAY debug text, GOAWAY error code, seconds): how is 'goaway' or 'eof' once the
        server ends the connection, 'open' if it is still open after within_s."""
        start = time.monotonic()
        deadline = start + within_s
        for _ in range(10_000):  # frames; the server sends a handful
            frame = self._read_frame(deadline)
            elapsed = time.monotonic() - start
            if frame is None:
                return ("open" if time.monotonic() >= deadline else "eof"), b"", None, elapsed
            kind, flags, payload = frame
            if kind == _SETTINGS and not flags & _ACK:
                self.send(_frame(_SETTINGS, _ACK))
            elif kind == _PING and not flags & _ACK:
                self.send(_frame(_PING, _ACK, payload))
            elif kind == _GOAWAY:
                return "goaway", payload[8:], int.from_bytes(payload[4:8], "big"), elapsed
        raise AssertionError("the server sent more frames than a quiet connection gets")


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"max_connection_idle_s": 1.0}, b"idle"),
        ({"max_connection_idle_s": 0.0, "max_connection_age_s": 1.0}, b"max_age"),
    ],
    ids=["idle", "age"],
)
def test_quiet_connection_is_closed_by_the_server(overrides, reason):
    running = start_server(**overrides)
    peer = _QuietPeer(running.port)
    try:
        how, debug, _, seconds = peer.wait_for_close(within_s=6.0)
    finally:
        peer.close()
        running.stop(0)
    assert how == "goaway", f"a quiet connection was still open after {seconds:.1f} s ({how})"
    # grpc names why in the GOAWAY's debug data ("connection idle", "max_age"); its error code
    # is grpc's own choice (2 for idle, 0 for age in grpc 1.85), so it is not asserted.
    assert reason in debug, debug
    assert 0.5 < seconds < 5.0


def test_quiet_connection_stays_open_under_the_idle_limit():
    # The control of the test above: the same peer is left alone for as long as the limit allows.
    running = start_server(max_connection_idle_s=30.0)
    peer = _QuietPeer(running.port)
    try:
        how, _, _, seconds = peer.wait_for_close(within_s=2.0)
    finally:
        peer.close()
        running.stop(0)
    assert how == "open", f"closed ({how}) after {seconds:.1f} s with a 30 s idle limit"


def test_ping_flood_without_calls_is_told_to_calm_down():
    running = start_server()
    peer = _QuietPeer(running.port)
    try:
        peer.send(b"".join(_frame(_PING, 0, struct.pack(">Q", i)) for i in range(6)))
        how, debug, code, _ = peer.wait_for_close(within_s=5.0)
    finally:
        peer.close()
        running.stop(0)
    assert (how, code) == ("goaway", _ENHANCE_YOUR_CALM), (how, code, debug)


def test_stopping_a_server_whose_work_is_done_abandons_nothing():
    """An idle server logged "abandoning work still running on cosserve-score_0, cosserve-work_0"
    at SIGTERM: its pools' idle threads read as lost work (issue 21, item 11)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from cosserve import Client
    from tests.conftest import start_process, stop_process

    log: list[str] = []
    proc, address = start_process("--inline-op-bytes", "0", "--max-workers", "16", log=log)  # every op on a worker thread
    try:
        with Client(address) as client, client.session("cpu") as ws:
            ws.feed_blob("C", np.ones((8, 4), np.float32))
            with ThreadPoolExecutor(16) as calls:  # ops at once: several cosserve-work threads, all idle at the end
                list(calls.map(lambda i: ws.run_operator("Cos", ["C"], [f"Y{i}"]), range(64)))
            ws.top_k(np.ones((2, 4), np.float32), "C", k=2)  # the cosserve-score thread
    finally:
        stop_process(proc)
    assert proc.returncode == 0
    text = "".join(log)
    assert "cosserve stopped" in text and "abandoning" not in text, text
