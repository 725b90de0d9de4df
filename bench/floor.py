"""The floor: a bare grpcio server that moves the same bytes as cosserve and does nothing else.

Run as its own process (`python -m bench.floor --port 0`); it prints `PORT <n>` once it serves.
Generic handlers with identity (de)serializers: what a Python gRPC service costs before it
does any work. The bench configures the answer size of each workload with `Configure`.
"""

from __future__ import annotations

import argparse
import signal
import struct
import sys
import threading
from collections.abc import Iterator, Sequence
from concurrent import futures

import grpc
import numpy as np

from cosserve import limits

__all__ = ["SERVICE", "FloorClient", "main"]

SERVICE = "floor.Floor"
_U64 = struct.Struct("<Q")


class _FloorState:
    """The answer of `Unary`, and the blob `Fetch` streams; set by `Configure`."""

    def __init__(self) -> None:
        self.answer = b""
        self.blob = np.empty(0, np.uint8)
        self.chunk_bytes = limits.CHUNK_BYTES

    def configure(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        # request: answer bytes, blob bytes, chunk bytes (three little-endian u64).
        answer, blob, chunk = struct.unpack("<QQQ", request)
        self.answer = bytes(answer)
        if blob != self.blob.nbytes:
            self.blob = np.ones(blob, np.uint8)
        self.chunk_bytes = chunk or limits.CHUNK_BYTES
        return b""

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return self.answer

    def feed(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        # The first message is the total size; every later one the next bytes, copied into one
        # buffer (the least any service must do to hold the blob).
        total = _U64.unpack(next(requests))[0]
        buffer = np.empty(total, np.uint8)
        filled = 0
        for chunk in requests:
            buffer[filled : filled + len(chunk)] = np.frombuffer(chunk, np.uint8)
            filled += len(chunk)
        return _U64.pack(filled)

    def fetch(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        # grpc needs a bytes object per message: one copy of each chunk, nothing else.
        view = memoryview(self.blob)
        step = self.chunk_bytes
        yield _U64.pack(len(view))
        for start in range(0, len(view), step):
            yield bytes(view[start : start + step])


def build(port: int, max_workers: int = 16) -> tuple[grpc.Server, int]:
    state = _FloorState()
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Configure": grpc.unary_unary_rpc_method_handler(state.configure),
            "Unary": grpc.unary_unary_rpc_method_handler(state.unary),
            "Feed": grpc.stream_unary_rpc_method_handler(state.feed),
            "Fetch": grpc.unary_stream_rpc_method_handler(state.fetch),
        },
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="floor"),
        options=list(limits.GRPC_OPTIONS),
    )
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, bound


class FloorClient:
    """The bench side of the floor: one channel, raw bytes in and out."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address, options=list(limits.GRPC_OPTIONS))
        self._configure = self.channel.unary_unary(f"/{SERVICE}/Configure")
        self.unary = self.channel.unary_unary(f"/{SERVICE}/Unary")
        self._feed = self.channel.stream_unary(f"/{SERVICE}/Feed")
        self._fetch = self.channel.unary_stream(f"/{SERVICE}/Fetch")

    def __enter__(self) -> FloorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.channel.close()

    def configure(self, answer_bytes: int = 0, blob_bytes: int = 0, chunk_bytes: int = 0) -> None:
        self._configure(struct.pack("<QQQ", answer_bytes, blob_bytes, chunk_bytes), timeout=60)

    def feed(self, array: np.ndarray, chunk_bytes: int) -> None:
        view = memoryview(array.reshape(-1).view(np.uint8))

        def messages() -> Iterator[bytes]:
            yield _U64.pack(len(view))
            for start in range(0, len(view), chunk_bytes):
                yield bytes(view[start : start + chunk_bytes])

        got = _U64.unpack(self._feed(messages(), timeout=600))[0]
        if got != len(view):
            raise RuntimeError(f"floor received {got} of {len(view)} bytes")

    def fetch(self) -> np.ndarray:
        stream = self._fetch(b"", timeout=600)
        total = _U64.unpack(next(stream))[0]
        buffer = np.empty(total, np.uint8)
        filled = 0
        for chunk in stream:
            buffer[filled : filled + len(chunk)] = np.frombuffer(chunk, np.uint8)
            filled += len(chunk)
        if filled != total:
            raise RuntimeError(f"floor sent {filled} of {total} bytes")
        return buffer


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--max-workers", type=int, default=16)
    ns = parser.parse_args(argv)
    server, port = build(ns.port, ns.max_workers)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"PORT {port}", flush=True)
    # Exit on a signal, or when the bench that started us goes away (stdin closes).
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    stop.wait()
    server.stop(0).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
