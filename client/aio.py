"""The asyncio client: `cosserve.aio.Client` and `Session`, the methods of `cosserve.Client` as
coroutines over a grpc.aio channel.

    async with cosserve.aio.Client("127.0.0.1:50051") as client:
        async with client.session() as ws:
            await ws.feed_blob("X", x)
            async for scores, indices in ws.iter_top_k(queries, "C", k=10):
                ...

Requests are built and replies decoded by the same functions as the sync client's
(`cosserve.client`); the errors are the same family (`cosserve.CosserveError`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator, Mapping, Sequence
from typing import Any

import grpc
import grpc.aio
import numpy as np

from cosserve import limits, tensors, wire
from cosserve.client import (
    _SECONDS_PER_BYTE,
    _SHM_SECONDS_PER_BYTE,
    _UNSIZED_STREAM_TIMEOUT,
    TOP_K_REPLY_BYTES,
    CorpusInfo,
    FetchAssembler,
    GradientCheck,
    OpInfo,
    OpSpec,
    PemSource,
    _array_in,
    _check_k,
    _check_name,
    _framed_callable,
    _query_batches,
    build_request,
    call_metadata,
    connection_options,
    compute_inputs,
    compute_outputs,
    compute_request,
    corpus_infos,
    create_region,
    create_session_request,
    feed_chunks,
    fits_one_compute,
    gradient_check,
    op_from_spec,
    operator_def,
    operator_infos,
    reply_too_big,
    rpc_error,
    top_k_op_pieces,
    top_k_requests,
    top_k_row_bytes,
    top_k_scratch_names,
)
from cosserve.errors import CosserveRpcError, ProtocolError
from cosserve.v1 import cosserve_pb2 as pb
from cosserve.v1 import cosserve_pb2_grpc as pb_grpc

__all__ = ["Client", "Session"]


class Client:
    """An asyncio connection to a cosserve server; the arguments are `cosserve.Client`'s.

    Use it as `async with Client(...) as client`, or `await client.close()` when done.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 30.0,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        tls: bool = False,
        root_certificates: PemSource | None = None,
        client_cert: PemSource | None = None,
        client_key: PemSource | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        options = list(limits.GRPC_OPTIONS)
        credentials, self._metadata = connection_options(
            credentials, token, tls=tls, root_certificates=root_certificates, client_cert=client_cert, client_key=client_key
        )
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        self.stub = pb_grpc.CosserveStub(self._channel)
        self._framed = {name: _framed_callable(self._channel, method) for name, method in wire.FRAMED_METHODS.items()}

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def _metadata_for(self, session: str | None) -> tuple[tuple[str, str], ...]:
        """The token, and for a session's call its id (`cosserve-session-id`), as the sync client."""
        return call_metadata(self._metadata, session)

    async def _call(
        self,
        method: str,
        request: Any,
        *,
        timeout: float | None = None,
        framed: bool = False,
        session: str | None = None,
    ) -> Any:
        """Await a unary or request-streaming RPC; raise CosserveRpcError on failure."""
        rpc = self._framed[method] if framed else getattr(self.stub, method)
        try:
            return await rpc(request, timeout=timeout or self.timeout, metadata=self._metadata_for(session))
        except grpc.RpcError as err:
            raise rpc_error(err, method) from err

    def session(self, device: str = "auto") -> _OpenSession:
        """Open a server-side workspace on `device`: `ws = await client.session()`, or
        `async with client.session() as ws` (closed on exit)."""
        return _OpenSession(self._create_session(device))

    async def _create_session(self, device: str) -> Session:
        # The proposed id goes in the request and the metadata, as the sync client's does.
        request = create_session_request(device)
        reply = await self._call("CreateSession", request, session=request.session_id)
        return Session(self, reply.session_id, reply.device)

    async def attach(self, session_id: str) -> Session:
        """The existing session `session_id` of this identity (see `cosserve.Client.attach`)."""
        await self._call("ListBlobs", build_request(pb.ListBlobsRequest, session_id=session_id), session=session_id)
        return Session(self, session_id, "unknown")

    async def operators(self) -> list[OpInfo]:
        """Schemas of the server's operators, sorted by name."""
        return operator_infos(await self._call("ListOperators", pb.ListOperatorsRequest()))

    async def corpora(self) -> list[CorpusInfo]:
        """The server's shared corpora, sorted by name."""
        return corpus_infos(await self._call("ListCorpora", pb.ListCorporaRequest()))

    async def compute(
        self,
        op_type: str,
        inputs: Mapping[str, Any],
        outputs: Sequence[str],
        *,
        device: str = "auto",
        **args: Any,
    ) -> dict[str, np.ndarray]:
        """One operator on `inputs` without a session, any size (see `cosserve.Client.compute`)."""
        op, arrays = compute_inputs(op_type, inputs, outputs, args)
        if fits_one_compute(arrays):
            try:
                return compute_outputs(await self._call("Compute", compute_request(op, arrays, device)))
            except CosserveRpcError as err:
                if not reply_too_big(err):
                    raise
        async with self.session(device) as ws:
            for name, array in arrays.items():
                await ws.feed_blob(name, array)
            await ws._call("RunOperator", pb.RunOperatorRequest(session_id=ws.id, op=op))
            return {name: await ws.fetch_blob(name) for name in op.output}


class _OpenSession:
    """`Client.session()`: awaitable (the Session) and an async context manager (closing it)."""

    def __init__(self, opening: Any) -> None:
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


class Session:
    """One server-side workspace; the methods of `cosserve.Session`, as coroutines."""

    def __init__(self, client: Client, session_id: str, device: str) -> None:
        self.client = client
        self.id = session_id
        self.device = device
        self.closed = False

    async def _call(self, method: str, request: Any, **kwargs: Any) -> Any:
        # Every call of a session carries its id as metadata too (limits.SESSION_ID_METADATA).
        return await self.client._call(method, request, session=self.id, **kwargs)

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"aio.Session(id={self.id!r}, device={self.device!r}, closed={self.closed})"

    async def close(self) -> None:
        """Free the session's blobs on the server; calling it twice is harmless."""
        if not self.closed:
            self.closed = True
            await self._call("CloseSession", pb.CloseSessionRequest(session_id=self.id))

    # ---- blobs ---------------------------------------------------------------------------

    async def feed_blob(
        self, name: str, value: Any, *, shm: bool = False, progress: Callable[[int], object] | None = None
    ) -> None:
        """Create or overwrite blob `name` (see `cosserve.Session.feed_blob`)."""
        _check_name(name)
        array = tensors.as_numpy(value)
        if shm:
            await self._feed_shm(name, array)
            if progress is not None:
                progress(array.nbytes)
        elif array.nbytes <= limits.INLINE_BYTES:
            pieces = wire.feed_blob_request(self.id, name, tensors.wire_dtype(array.dtype), array.shape, tensors.byte_view(array))
            await self._call("FeedBlob", b"".join(pieces), framed=True)
            if progress is not None:
                progress(array.nbytes)
        else:
            await self._call(
                "FeedBlobStream",
                feed_chunks(self.id, name, array, progress),
                timeout=self.client.timeout + array.nbytes * _SECONDS_PER_BYTE,
                framed=True,
            )

    async def _feed_shm(self, name: str, array: np.ndarray) -> None:
        region = create_region(array.nbytes, self._region_name())
        try:
            assert region.buf is not None
            region.buf[: array.nbytes] = tensors.byte_view(array)
            request = pb.FeedBlobShmRequest(
                session_id=self.id,
                name=name,
                dtype=tensors.wire_dtype(array.dtype),
                shape=array.shape,
                shm_name=region.name,
                offset=0,
            )
            await self._call("FeedBlobShm", request, timeout=self.client.timeout + array.nbytes * _SHM_SECONDS_PER_BYTE)
        finally:
            region.close()
            region.unlink()

    def _region_name(self) -> str:
        # The server only opens regions named for the calling session (see server/shm.py).
        return f"{limits.SHM_PREFIX}{self.id}_{secrets.token_hex(6)}"

    async def fetch_blob(self, name: str, *, shm: bool = False) -> np.ndarray:
        """Blob `name` as a numpy array (see `cosserve.Session.fetch_blob`): one streamed call,
        cancelled with DEADLINE_EXCEEDED when no message arrives for the client's timeout."""
        _check_name(name)
        if shm:
            return await self._fetch_shm(name)
        request = pb.FetchBlobRequest(session_id=self.id, name=name)
        call = self.client._framed["FetchBlobStream"](request, metadata=self.client._metadata_for(self.id))
        idle = self.client.timeout
        try:
            first = await asyncio.wait_for(call.read(), idle)
            if first is grpc.aio.EOF:
                raise ProtocolError(f"FetchBlobStream of blob {name!r}: the server sent no message")
            blob = FetchAssembler(name, first)
            while blob.whole is None:
                message = await asyncio.wait_for(call.read(), idle)
                if message is grpc.aio.EOF:
                    break
                blob.add(message)
            return blob.result()
        except asyncio.TimeoutError:
            call.cancel()
            message = f"no data of blob {name!r} arrived for {idle:g} s (the client's timeout); the call was cancelled"
            raise CosserveRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, message, "FetchBlobStream") from None
        except ProtocolError:
            call.cancel()
            raise
        except grpc.RpcError as err:
            raise rpc_error(err, "FetchBlobStream") from err

    async def _fetch_shm(self, name: str) -> np.ndarray:
        request = pb.FetchBlobShmRequest(session_id=self.id, name=name)
        info = await self._call("FetchBlobShm", request)  # no region named: dtype and shape only
        for attempt in range(3):
            nbytes = tensors.nbytes_of(info.dtype, info.shape)
            region = create_region(nbytes, self._region_name())
            try:
                into = pb.FetchBlobShmRequest(session_id=self.id, name=name, shm_name=region.name, offset=0)
                timeout = self.client.timeout + nbytes * _SHM_SECONDS_PER_BYTE
                reply = await self._call("FetchBlobShm", into, timeout=timeout)
                return _array_in(region, reply.dtype, tuple(reply.shape))
            except CosserveRpcError as err:
                # The blob may have grown between the two calls: size the region again.
                if err.code() != grpc.StatusCode.INVALID_ARGUMENT or attempt == 2:
                    raise
                now = await self._call("FetchBlobShm", request)
                if tensors.nbytes_of(now.dtype, now.shape) <= nbytes:
                    raise
                info = now
            finally:
                region.close()
                region.unlink()
        raise AssertionError("unreachable")

    async def has_blob(self, name: str) -> bool:
        _check_name(name)
        return bool((await self._call("HasBlob", pb.HasBlobRequest(session_id=self.id, name=name))).exists)

    async def blobs(self) -> list[str]:
        """Names of the session's blobs, sorted."""
        return list((await self._call("ListBlobs", pb.ListBlobsRequest(session_id=self.id))).names)

    async def remove_blob(self, name: str) -> None:
        _check_name(name)
        await self._call("RemoveBlob", pb.RemoveBlobRequest(session_id=self.id, name=name))

    async def reset(self) -> None:
        """Drop every blob; the session stays open."""
        await self._call("ResetWorkspace", pb.ResetWorkspaceRequest(session_id=self.id))

    async def save(self, name: str, *, timeout: float | None = None) -> tuple[int, int]:
        """Write the session's blobs as the snapshot `name` (see `cosserve.Session.save`)."""
        reply = await self._call("SaveWorkspace", build_request(pb.SaveWorkspaceRequest, session_id=self.id, name=name), timeout=timeout)
        return int(reply.blobs), int(reply.bytes)

    async def load(self, name: str, *, timeout: float | None = None) -> tuple[int, int]:
        """Replace the session's blobs with the snapshot `name` (see `cosserve.Session.load`)."""
        reply = await self._call("LoadWorkspace", build_request(pb.LoadWorkspaceRequest, session_id=self.id, name=name), timeout=timeout)
        return int(reply.blobs), int(reply.bytes)

    async def publish_corpus(self, blob: str, name: str) -> None:
        """Share blob `blob` as the corpus `@name` (see `cosserve.Session.publish_corpus`)."""
        await self._call("PublishCorpus", build_request(pb.PublishCorpusRequest, session_id=self.id, blob=blob, name=name))

    # ---- operators -----------------------------------------------------------------------

    async def run_operator(self, op_type: str, inputs: Sequence[str], outputs: Sequence[str], **args: Any) -> None:
        """Run one Caffe2 operator on the session's blobs; on failure nothing changes."""
        request = pb.RunOperatorRequest(session_id=self.id, op=operator_def(op_type, inputs, outputs, args))
        await self._call("RunOperator", request)

    async def run_net(self, ops: Iterable[OpSpec]) -> None:
        """Run operators in order, all or nothing (see `cosserve.Session.run_net`)."""
        await self._call("RunNet", pb.RunNetRequest(session_id=self.id, ops=[op_from_spec(s) for s in ops]))

    async def run_caffe2_operator(self, operator_def: bytes) -> None:
        """Run a serialized Caffe2 OperatorDef (see `cosserve.Session.run_caffe2_operator`)."""
        await self._call("RunOperator", pb.RunOperatorRequest(session_id=self.id, caffe2_op=bytes(operator_def)))

    async def run_caffe2_net(self, net_def: bytes) -> None:
        """Run a serialized Caffe2 NetDef, all or nothing (see `cosserve.Session.run_caffe2_net`)."""
        await self._call("RunNet", pb.RunNetRequest(session_id=self.id, caffe2_net=bytes(net_def)))

    async def check_gradient(
        self,
        op_type: str,
        inputs: Sequence[str],
        outputs: Sequence[str] | None = None,
        *,
        step_size: float = 1e-6,
        output_index: int = 0,
        **args: Any,
    ) -> GradientCheck:
        """The gradient op against finite differences (see `cosserve.Session.check_gradient`)."""
        request = build_request(
            pb.CheckGradientRequest,
            session_id=self.id,
            op=operator_def(op_type, inputs, outputs or [], args),
            step_size=step_size,
            output_index=output_index,
        )
        return gradient_check(await self._call("CheckGradient", request))

    # ---- scoring -------------------------------------------------------------------------

    async def top_k(
        self, queries: Any, corpus: str = "C", k: int = 10, *, batch_size: int = 256, timeout: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact cosine top-k of each query row among the rows of blob `corpus` (see
        `cosserve.Session.top_k`)."""
        scores, indices = [], []
        async for batch_scores, batch_indices in self.iter_top_k(queries, corpus, k, batch_size=batch_size, timeout=timeout):
            scores.append(batch_scores)
            indices.append(batch_indices)
        if not scores:
            return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
        return np.concatenate(scores), np.concatenate(indices)

    async def iter_top_k(
        self, queries: Any, corpus: str = "C", k: int = 10, *, batch_size: int = 256, timeout: float | None = None
    ) -> AsyncIterator[tuple[np.ndarray, np.ndarray]]:
        """Like `top_k`, an async iterator of each message's (scores, indices) as they arrive.
        `queries` is an (N, D) array or an iterable of (n, D) batches."""
        _check_name(corpus)
        _check_k(k)
        batches, count = _query_batches(queries, batch_size)
        first = next(batches, None)
        if first is None:
            return
        batches = itertools.chain([first], batches)
        if timeout is None:
            timeout = self.client.timeout * (1 + count) if count is not None else _UNSIZED_STREAM_TIMEOUT
        if top_k_row_bytes(k, first.dtype.itemsize) > TOP_K_REPLY_BYTES:
            # One query's reply alone would pass a ScoreTopK message: score in the session instead.
            async for result in self._top_k_by_operator(batches, corpus, k, timeout):
                yield result
            return
        failure: list[BaseException] = []

        def requests() -> Iterator[pb.TopKRequest]:
            try:
                for batch in batches:
                    yield from top_k_requests(self.id, corpus, k, batch)
            except Exception as err:  # grpc would only report CANCELLED; keep the real cause
                failure.append(err)
                raise

        call = self.client.stub.ScoreTopK(requests(), timeout=timeout, metadata=self.client._metadata_for(self.id))
        try:
            async for reply in call:
                yield tensors.from_wire(reply.scores), tensors.from_wire(reply.indices)
        except grpc.RpcError as err:
            if failure:
                raise failure[0] from None
            raise rpc_error(err, "ScoreTopK") from err
        finally:
            call.cancel()  # a no-op once the stream ended; stops it when the caller breaks off

    async def _top_k_by_operator(
        self, batches: Iterator[np.ndarray], corpus: str, k: int, timeout: float
    ) -> AsyncIterator[tuple[np.ndarray, np.ndarray]]:
        """CosineTopK on the session's blobs, fetched streamed (see the sync `_top_k_by_operator`)."""
        queries, scores, indices = top_k_scratch_names()
        try:
            for batch in batches:
                for piece in top_k_op_pieces(batch, k):
                    await self.feed_blob(queries, piece)
                    op = operator_def("CosineTopK", [queries, corpus], [scores, indices], {"k": k})
                    await self._call("RunOperator", pb.RunOperatorRequest(session_id=self.id, op=op), timeout=timeout)
                    yield await self.fetch_blob(scores), await self.fetch_blob(indices)
        finally:
            for name in (queries, scores, indices):
                with contextlib.suppress(CosserveRpcError):
                    await self.remove_blob(name)
