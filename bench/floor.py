"""The floors: bare grpcio servers that move the same bytes as cosserve and do nothing else.

Run each as its own process: `python -m bench.floor --port 0` (grpc's threaded server) or
`python -m bench.floor --aio --port 0` (`grpc.aio`, `async def` handlers on one event loop); it
prints `PORT <n>` once it serves. Generic handlers with identity (de)serializers: what a Python
gRPC service costs before it does any work. The bench configures the answer size of each
workload with `Configure`. Both kinds share the state and the work; only the handler shells differ.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import struct
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent import futures
from typing import Any

import grpc
import numpy as np

from cosserve import limits

__all__ = ["KINDS", "SERVICE", "FloorClient", "build", "build_aio", "main"]

SERVICE = "floor.Floor"
KINDS = ("threaded", "aio")  # the two floor servers, in the order the bench reports them
_U64 = struct.Struct("<Q")


class _FloorState:
    """The answer of `Unary`, and the blob `Fetch` streams; set by `Configure`."""

    def __init__(self) -> None:
        self.answer = b""
        self.blob = np.empty(0, np.uint8)
        self.chunk_bytes = limits.CHUNK_BYTES

    def configure(self, request: bytes) -> bytes:
        # request: answer bytes, blob bytes, chunk bytes (three little-endian u64).
        answer, blob, chunk = struct.unpack("<QQQ", request)
        self.answer = bytes(answer)
        if blob != self.blob.nbytes:
            self.blob = np.ones(blob, np.uint8)
        self.chunk_bytes = chunk or limits.CHUNK_BYTES
        return b""

    def fetch_messages(self) -> Iterator[bytes]:
        # grpc needs a bytes object per message: one copy of each chunk, nothing else.
        view = memoryview(self.blob)
        step = self.chunk_bytes
        yield _U64.pack(len(view))
        for start in range(0, len(view), step):
            yield bytes(view[start : start + step])


class _Assembly:
    """Feed's receiving side: the first message is the total size; every later one the next
    bytes, copied into one buffer (the least any service must do to hold the blob)."""

    def __init__(self, first: bytes) -> None:
        self.buffer = np.empty(_U64.unpack(first)[0], np.uint8)
        self.filled = 0

    def add(self, chunk: bytes) -> None:
        self.buffer[self.filled : self.filled + len(chunk)] = np.frombuffer(chunk, np.uint8)
        self.filled += len(chunk)

    def reply(self) -> bytes:
        return _U64.pack(self.filled)


def _threaded_handlers(state: _FloorState) -> dict[str, Callable[..., Any]]:
    def configure(request: bytes, context: grpc.ServicerContext) -> bytes:
        return state.configure(request)

    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        return state.answer

    def feed(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        assembly = _Assembly(next(requests))
        for chunk in requests:
            assembly.add(chunk)
        return assembly.reply()

    def fetch(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        return state.fetch_messages()

    return {"Configure": configure, "Unary": unary, "Feed": feed, "Fetch": fetch}


def _aio_handlers(state: _FloorState) -> dict[str, Callable[..., Any]]:
    async def configure(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return state.configure(request)

    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return state.answer

    async def feed(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        messages = aiter(requests)
        assembly = _Assembly(await anext(messages))
        async for chunk in messages:
            assembly.add(chunk)
        return assembly.reply()

    async def fetch(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        for message in state.fetch_messages():
            yield message

    return {"Configure": configure, "Unary": unary, "Feed": feed, "Fetch": fetch}


# Method name -> how grpc wraps its behaviour (no (de)serializers: the handlers see bytes).
_METHODS: dict[str, Callable[[Callable[..., Any]], grpc.RpcMethodHandler]] = {
    "Configure": grpc.unary_unary_rpc_method_handler,
    "Unary": grpc.unary_unary_rpc_method_handler,
    "Feed": grpc.stream_unary_rpc_method_handler,
    "Fetch": grpc.unary_stream_rpc_method_handler,
}


def _generic_handler(behaviours: Mapping[str, Callable[..., Any]]) -> grpc.GenericRpcHandler:
    methods = {name: wrap(behaviours[name]) for name, wrap in _METHODS.items()}
    return grpc.method_handlers_generic_handler(SERVICE, methods)


def build(port: int, max_workers: int = 16) -> tuple[grpc.Server, int]:
    """The threaded floor, started: grpc's server with `max_workers` handler threads."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="floor"),
        options=list(limits.GRPC_OPTIONS),
    )
    server.add_generic_rpc_handlers((_generic_handler(_threaded_handlers(_FloorState())),))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, bound


async def build_aio(port: int) -> tuple[grpc.aio.Server, int]:
    """The aio floor, started on the running event loop: every handler is a coroutine on it."""
    server = grpc.aio.server(options=list(limits.GRPC_OPTIONS))
    server.add_generic_rpc_handlers((_generic_handler(_aio_handlers(_FloorState())),))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, bound


class FloorClient:
    """The bench side of either floor: one channel, raw bytes in and out."""

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


def _stop_when_stdin_closes(stop: Callable[[], object]) -> None:
    """Call `stop` (from another thread) when the bench that started us goes away."""

    def wait() -> None:
        sys.stdin.read()
        stop()

    threading.Thread(target=wait, daemon=True, name="stdin-watch").start()


def _serve_threaded(port: int, max_workers: int) -> None:
    server, bound = build(port, max_workers)
    stopped = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopped.set())
    _stop_when_stdin_closes(stopped.set)
    print(f"PORT {bound}", flush=True)
    stopped.wait()
    server.stop(0).wait()


async def _serve_aio(port: int) -> None:
    server, bound = await build_aio(port)
    loop, stopped = asyncio.get_running_loop(), asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)  # wakes the loop, whichever thread got the signal
    _stop_when_stdin_closes(lambda: loop.call_soon_threadsafe(stopped.set))
    print(f"PORT {bound}", flush=True)
    await stopped.wait()
    await server.stop(0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--aio", action="store_true", help="serve with grpc.aio on one event loop (default: threaded)")
    parser.add_argument("--max-workers", type=int, default=16, help="handler threads of the threaded floor")
    ns = parser.parse_args(argv)
    if ns.aio:
        asyncio.run(_serve_aio(ns.port))
    else:
        _serve_threaded(ns.port, ns.max_workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
