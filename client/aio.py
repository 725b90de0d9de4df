"""The asyncio client: `cosserve.aio.Client` and `Session`, the methods of `cosserve.Client` as
coroutines over a grpc.aio channel.

    async with cosserve.aio.Client("127.0.0.1:50051") as client:
        async with client.session() as ws:
            await ws.feed_blob("X", x)
            async for scores, indices in ws.iter_top_k(queries, "C", k=10):
                ...

Each method awaits the calls of the same flow as the sync client's (`cosserve.calls`): the same
requests, replies and errors (`cosserve.CosserveError`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Generator, Iterable, Mapping, Sequence
from typing import Any, Literal, TypeVar, overload

import grpc
import grpc.aio
import numpy as np

from cosserve import calls, flows
from cosserve.calls import CorpusInfo, GradientCheck, OpInfo, OpSpec, RangeResult
from cosserve.client import BaseClient, BaseSession

__all__ = ["Client", "Session"]

T = TypeVar("T")


class Client(BaseClient):
    """An asyncio connection to a cosserve server; the arguments are `cosserve.Client`'s.

    Use it as `async with Client(...) as client`, or `await client.close()` when done.
    """

    def _connect(self, target: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]) -> grpc.aio.Channel:
        if credentials is None:
            return grpc.aio.insecure_channel(target, options=options)
        return grpc.aio.secure_channel(target, credentials, options=options)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        await self._channel.close()

    async def _perform(self, flow: flows.Flow[T]) -> T:
        """Await the calls of `flow` (one that hands nothing out on the way); its result."""
        run = flows.Run(flow)
        async for _ in self._drive(run):
            pass
        return run.result

    async def _drive(self, run: flows.Run[Any]) -> AsyncGenerator[Any, None]:
        """Answer the steps of `run` until its flow returns, yielding what it Emits to our caller."""
        async with _OpenStream() as stream:
            for step in run:
                with run.answer() as answer:
                    if isinstance(step, flows.Emit):
                        yield step.value
                    else:
                        answer.reply = await self._answer(step, stream)

    async def _answer(self, step: flows.Call | flows.Read, stream: _OpenStream) -> Any:
        if isinstance(step, flows.Read):
            return await stream.read()
        if step.stream:
            stream.open(self._start(step), step.idle)
            return None
        return await self._start(step)

    def session(self, device: str = "auto") -> _OpenSession:
        """Open a server-side workspace on `device`: `ws = await client.session()`, or
        `async with client.session() as ws` (closed on exit)."""
        return _OpenSession(self._create_session(device))

    async def _create_session(self, device: str) -> Session:
        return Session(self, *await self._perform(calls.create_session(device)))

    async def attach(self, session_id: str) -> Session:
        """The existing session `session_id` of this identity (see `cosserve.Client.attach`)."""
        await self._perform(calls.attach(session_id))
        return Session(self, session_id, "unknown")

    async def operators(self) -> list[OpInfo]:
        """Schemas of the server's operators, sorted by name."""
        return await self._perform(calls.operators())

    async def corpora(self) -> list[CorpusInfo]:
        """The server's shared corpora, sorted by name."""
        return await self._perform(calls.corpora())

    async def compute(
        self, op_type: str, inputs: Mapping[str, Any], outputs: Sequence[str], *, device: str = "auto", **args: Any
    ) -> dict[str, np.ndarray]:
        """One operator on `inputs` without a session, any size (see `cosserve.Client.compute`)."""
        flow = calls.compute(op_type, inputs, outputs, args, device=device, client_timeout=self.timeout, schemas=self._schemas)
        return await self._perform(flow)


class _OpenStream:
    """The reply stream a flow has open, one at a time: each message awaited for at most its idle
    time when it has no deadline, cancelled when another opens or the flow ends (a no-op once it
    ended)."""

    def __init__(self) -> None:
        self._call: Any = None
        self._idle: float | None = None

    async def __aenter__(self) -> _OpenStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def open(self, call: Any, idle: float | None) -> None:
        self.close()
        self._call, self._idle = call, idle

    async def read(self) -> Any:
        # A TimeoutError here becomes the flow's DEADLINE_EXCEEDED (flows.Run); wait_for has
        # cancelled the read, and with it the call.
        message = await asyncio.wait_for(self._call.read(), self._idle)
        return flows.END if message is grpc.aio.EOF else message

    def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        self._call = None


class _OpenSession:
    """`Client.session()`: awaitable (the Session) and an async context manager (closing it)."""

    def __init__(self, opening: Awaitable[Session]) -> None:
        self._opening = opening
        self._session: Session | None = None

    def __await__(self) -> Generator[Any, None, Session]:
        return self._opening.__await__()

    async def __aenter__(self) -> Session:
        self._session = await self._opening
        return self._session

    async def __aexit__(self, *exc: object) -> None:
        assert self._session is not None
        await self._session.close()


class Session(BaseSession[Client]):
    """One server-side workspace; the methods of `cosserve.Session`, as coroutines."""

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"aio.Session(id={self.id!r}, device={self.device!r}, closed={self.closed})"

    async def close(self) -> None:
        """Free the session's blobs on the server; calling it twice is harmless."""
        if self._closing():
            await self.client._perform(calls.close_session(self.id))

    # ---- blobs ---------------------------------------------------------------------------

    async def feed_blob(
        self, name: str, value: Any, *, shm: bool = False, progress: Callable[[int], object] | None = None
    ) -> None:
        """Create or overwrite blob `name` (see `cosserve.Session.feed_blob`)."""
        await self.client._perform(
            calls.feed_blob(self.id, name, value, client_timeout=self.client.timeout, shm=shm, progress=progress)
        )

    async def fetch_blob(self, name: str, *, shm: bool = False) -> np.ndarray:
        """Blob `name` as a numpy array (see `cosserve.Session.fetch_blob`): one streamed call,
        cancelled with DEADLINE_EXCEEDED when no message arrives for the client's timeout."""
        return await self.client._perform(calls.fetch_blob(self.id, name, client_timeout=self.client.timeout, shm=shm))

    async def has_blob(self, name: str) -> bool:
        return await self.client._perform(calls.has_blob(self.id, name))

    async def blobs(self) -> list[str]:
        """Names of the session's blobs, sorted."""
        return await self.client._perform(calls.blobs(self.id))

    async def remove_blob(self, name: str) -> None:
        await self.client._perform(calls.remove_blob(self.id, name))

    async def reset(self) -> None:
        """Drop every blob; the session stays open."""
        await self.client._perform(calls.reset(self.id))

    async def save(self, name: str, *, timeout: float | None = None) -> tuple[int, int]:
        """Write the session's blobs as the snapshot `name` (see `cosserve.Session.save`)."""
        return await self.client._perform(calls.save(self.id, name, timeout))

    async def load(self, name: str, *, timeout: float | None = None) -> tuple[int, int]:
        """Replace the session's blobs with the snapshot `name` (see `cosserve.Session.load`)."""
        return await self.client._perform(calls.load(self.id, name, timeout))

    async def publish_corpus(self, blob: str, name: str) -> None:
        """Share blob `blob` as the corpus `@name` (see `cosserve.Session.publish_corpus`)."""
        await self.client._perform(calls.publish_corpus(self.id, blob, name))

    # ---- operators -----------------------------------------------------------------------

    async def run_operator(self, op_type: str, inputs: Sequence[str], outputs: Sequence[str], **args: Any) -> None:
        """Run one Caffe2 operator on the session's blobs; on failure nothing changes."""
        await self.client._perform(calls.run_operator(self.id, op_type, inputs, outputs, args))

    async def run_net(self, ops: Iterable[OpSpec]) -> None:
        """Run operators in order, all or nothing (see `cosserve.Session.run_net`)."""
        await self.client._perform(calls.run_net(self.id, ops))

    async def run_caffe2_operator(self, operator_def: bytes) -> None:
        """Run a serialized Caffe2 OperatorDef (see `cosserve.Session.run_caffe2_operator`)."""
        await self.client._perform(calls.run_caffe2_operator(self.id, operator_def))

    async def run_caffe2_net(self, net_def: bytes) -> None:
        """Run a serialized Caffe2 NetDef, all or nothing (see `cosserve.Session.run_caffe2_net`)."""
        await self.client._perform(calls.run_caffe2_net(self.id, net_def))

    async def check_gradient(
        self, op_type: str, inputs: Sequence[str], outputs: Sequence[str] | None = None,
        *, step_size: float = 1e-6, output_index: int = 0, **args: Any,
    ) -> GradientCheck:  # fmt: skip
        """The gradient op against finite differences (see `cosserve.Session.check_gradient`)."""
        flow = calls.check_gradient(self.id, op_type, inputs, outputs, args, step_size=step_size, output_index=output_index)
        return await self.client._perform(flow)

    # ---- scoring -------------------------------------------------------------------------

    @overload
    async def top_k(
        self, queries: Any, corpus: str = ..., k: int = ..., *, batch_size: int = ..., timeout: float | None = ...,
        ids: Literal[False] = ...,
    ) -> tuple[np.ndarray, np.ndarray]: ...  # fmt: skip

    @overload
    async def top_k(
        self, queries: Any, corpus: str = ..., k: int = ..., *, batch_size: int = ..., timeout: float | None = ...,
        ids: Literal[True],
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...  # fmt: skip

    async def top_k(
        self, queries: Any, corpus: str = "C", k: int = 10, *, batch_size: int = 256, timeout: float | None = None,
        ids: bool = False,
    ) -> tuple[np.ndarray, ...]:  # fmt: skip
        """Exact cosine top-k of each query row among the rows of blob `corpus` (see
        `cosserve.Session.top_k`)."""
        pieces = [piece async for piece in self.iter_top_k(queries, corpus, k, batch_size=batch_size, timeout=timeout, ids=ids)]
        return calls.joined_top_k(pieces, k, ids)

    async def iter_top_k(
        self, queries: Any, corpus: str = "C", k: int = 10, *, batch_size: int = 256, timeout: float | None = None,
        ids: bool = False,
    ) -> AsyncIterator[tuple[np.ndarray, ...]]:  # fmt: skip
        """Like `top_k`, an async iterator of each message's (scores, indices) as they arrive.
        `queries` is an (N, D) array or an iterable of (n, D) batches."""
        flow = calls.iter_top_k(
            self.id, queries, corpus, k, batch_size=batch_size, timeout=timeout, client_timeout=self.client.timeout, ids=ids
        )
        # Closed with this iterator, so that a caller who breaks off stops the stream at once.
        async with contextlib.aclosing(self.client._drive(flows.Run(flow))) as results:
            async for result in results:
                yield result

    async def range_search(
        self, queries: Any, corpus: str = "C", min_score: float | None = None, *, max_per_query: int | None = None,
        ids: bool | None = None, batch_size: int = 256, timeout: float | None = None,
    ) -> RangeResult:  # fmt: skip
        """Every corpus row with cosine >= min_score, per query (see `cosserve.Session.range_search`)."""
        pieces = [
            piece
            async for piece in self.iter_range_search(
                queries, corpus, min_score, max_per_query=max_per_query, ids=ids, batch_size=batch_size, timeout=timeout
            )
        ]
        return calls.joined_range(pieces)

    async def iter_range_search(
        self, queries: Any, corpus: str = "C", min_score: float | None = None, *, max_per_query: int | None = None,
        ids: bool | None = None, batch_size: int = 256, timeout: float | None = None,
    ) -> AsyncIterator[RangeResult]:  # fmt: skip
        """Like `range_search`, an async iterator of each message's `RangeResult` as it arrives, in order."""
        flow = calls.iter_range_search(
            self.id, queries, corpus, min_score, max_per_query=max_per_query, ids=ids, batch_size=batch_size,
            timeout=timeout, client_timeout=self.client.timeout,
        )  # fmt: skip
        async with contextlib.aclosing(self.client._drive(flows.Run(flow))) as results:
            async for result in results:
                yield result
