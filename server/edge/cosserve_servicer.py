"""The gRPC servicer: translates messages to core calls and back, nothing more."""

from __future__ import annotations

import collections
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import torch
from grpc import aio

from cosserve import limits, wire
from cosserve.server import memory
from cosserve.server.compute import engine, range_search
from cosserve.server.compute.registry import REGISTRY, ArgType, InputKind, OpSchema
from cosserve.server.compute.scorer import Batch, Scorer
from cosserve.server.compute.workers import Stopped, StopSignal, Workers
from cosserve.server.edge.interceptors import HANDLER_KINDS, SESSION_METADATA
from cosserve.server.edge.metrics import Metrics
from cosserve.server.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, quoted
from cosserve.server.protocols import caffe2_format, codec, shm
from cosserve.server.settings import Settings
from cosserve.server.state import identity, snapshots
from cosserve.server.state.corpora import is_corpus
from cosserve.server.state.norm_cache import NormCache
from cosserve.server.state.row_ids import RowIds
from cosserve.server.state.sessions import SessionStore
from cosserve.server.state.workspace import Workspace, resolve_device
from cosserve.v1 import cosserve_pb2 as pb

__all__ = ["SERVICE_NAME", "CosserveServicer", "add_to_server", "op_call", "schema_message"]

SERVICE_NAME = wire.SERVICE_NAME

_ARG_TYPES = {
    ArgType.FLOAT: pb.ARG_FLOAT,
    ArgType.INT: pb.ARG_INT,
    ArgType.BOOL: pb.ARG_BOOL,
    ArgType.STRING: pb.ARG_STRING,
}
# Work that is always sent to a worker thread, whatever its input size.
_ALWAYS_THREAD = math.inf
_CPU = torch.device("cpu")


def op_call(message: pb.OperatorDef, where: str = "op") -> engine.OpCall:
    # Counted before converted: a message can hold millions of names or arguments.
    engine.check_op_counts(len(message.arg), len(message.input), len(message.output), where)
    args: dict[str, Any] = {}
    for arg in message.arg:
        kind = arg.WhichOneof("value")
        if kind is None:
            raise InvalidArgument(f"{message.type}: argument {arg.name!r} has no value")
        if arg.name in args:
            raise InvalidArgument(f"{message.type}: argument {arg.name!r} is given twice")
        args[arg.name] = getattr(arg, kind)
    return engine.OpCall(message.type, tuple(message.input), tuple(message.output), args)


def _argument(name: str, kind: ArgType, value: Any) -> pb.Argument:
    field = {ArgType.FLOAT: "f", ArgType.INT: "i", ArgType.BOOL: "b", ArgType.STRING: "s"}[kind]
    return pb.Argument(name=name, **{field: value})


def schema_message(schema: OpSchema) -> pb.OpSchema:
    return pb.OpSchema(
        name=schema.name,
        inputs=[
            pb.InputSchema(
                name=i.name,
                dtypes=[codec.WIRE_DTYPES[d] for d in engine.ACCEPTED_DTYPES[i.kind]],
                doc=i.doc or ("labels" if i.kind is InputKind.LABEL else ""),
            )
            for i in schema.inputs
        ],
        outputs=list(schema.outputs),
        args=[
            pb.ArgSchema(name=a.name, type=_ARG_TYPES[a.type], default=_argument(a.name, a.type, a.default), doc=a.doc)
            for a in schema.args
        ],
        doc=schema.doc,
        gradient=schema.gradient or "",
        caffe2=schema.caffe2,
    )


class CosserveServicer:
    """Every RPC of cosserve.v1.Cosserve, as coroutines on the server's event loop. Domain errors
    are mapped to status codes by interceptors.ErrorInterceptor; work is run by `workers`."""

    def __init__(
        self, store: SessionStore, settings: Settings, workers: Workers, scorer: Scorer, metrics: Metrics | None = None
    ) -> None:
        self.store = store
        self.settings = settings
        self.workers = workers
        self.scorer = scorer
        self.metrics = metrics
        self._observe_op = metrics.observe_op if metrics is not None else None
        # Built once: the registry does not change while serving.
        self._operators = pb.ListOperatorsResponse(
            operators=[schema_message(REGISTRY[name].schema) for name in sorted(REGISTRY)]
        )

    # ---- sessions ------------------------------------------------------------------------

    async def CreateSession(self, request: pb.CreateSessionRequest, context: aio.ServicerContext) -> pb.CreateSessionResponse:
        _check_routed(request.session_id)
        workspace = self.store.create(request.device, identity.CALLER.get(), request.session_id)
        return pb.CreateSessionResponse(session_id=workspace.id, device=str(workspace.device))

    async def CloseSession(self, request: pb.CloseSessionRequest, context: aio.ServicerContext) -> pb.CloseSessionResponse:
        self.store.close(request.session_id, identity.CALLER.get())
        return pb.CloseSessionResponse()

    def _session(self, session_id: str) -> Workspace:
        """The caller's session `session_id`; NOT_FOUND for a session of another identity, and
        INVALID_ARGUMENT when the call's routing metadata names another session."""
        _check_routed(session_id)
        return self.store.get(session_id, identity.CALLER.get())

    def _count(self, direction: str, method: str, nbytes: int) -> None:
        """Tensor bytes received ("in") or sent ("out") over the socket, for the metrics."""
        if self.metrics is not None:
            self.metrics.count_bytes(direction, method, nbytes)

    # ---- blobs ---------------------------------------------------------------------------
    # The RPCs in wire.FRAMED_METHODS take or return encoded bytes, framed by cosserve.wire.

    async def FeedBlob(self, request: bytes, context: aio.ServicerContext) -> pb.FeedBlobResponse:
        frame = _decoded("FeedBlob", wire.decode_feed_blob_request, request)
        workspace = self._session(frame.session_id)
        what = f"blob {frame.name!r}"
        tensor = codec.tensor_from_frame(what, request, frame.tensor, workspace.device, workspace.max_bytes)
        workspace.put(frame.name, tensor)
        self._count("in", "FeedBlob", frame.tensor.data.end - frame.tensor.data.start)
        return pb.FeedBlobResponse()

    async def FeedBlobStream(self, requests: AsyncIterator[bytes], context: aio.ServicerContext) -> pb.FeedBlobResponse:
        # The stream is read on the event loop: a slow or silent client holds its buffer, never a thread.
        chunks = aiter(requests)
        raw = await anext(chunks, None)
        if raw is None:
            raise InvalidArgument("FeedBlobStream: the stream was empty; the first message carries the header")
        first = _decoded("FeedBlobStream", wire.decode_feed_blob_chunk, raw)
        workspace = self._session(first.session_id)
        what = f"blob {first.name!r}"
        nbytes = codec.check_header(what, first.dtype, first.shape, workspace.max_bytes)
        # Charged from the first message, before anything is allocated or received, and held until
        # the blob is stored or the stream fails: concurrent streams cannot together pass a limit.
        with workspace.claim(first.name, nbytes) as claim:
            assembler = codec.ChunkAssembler(what, first.dtype, first.shape, workspace.max_bytes, workspace.device)
            chunk = b""
            try:
                assembler.add(memoryview(raw)[first.data.start : first.data.end])
                async for chunk in chunks:
                    data = _decoded("FeedBlobStream", wire.decode_feed_blob_chunk, chunk).data
                    assembler.add(memoryview(chunk)[data.start : data.end])
                claim.store(assembler.finish(workspace.device))
                self._count("in", "FeedBlobStream", nbytes)
            finally:
                # A failed or cancelled call's traceback holds this frame, in a reference cycle of
                # grpc's: free the buffer and the messages now, not at the next GC cycle.
                assembler.discard()
                raw = chunk = b""
        return pb.FeedBlobResponse()

    async def FetchBlob(self, request: pb.FetchBlobRequest, context: aio.ServicerContext) -> bytes:
        """The encoded FetchBlobResponse, framed with one copy of the data; for blobs of one message
        (the client fetches every blob with FetchBlobStream, which has no such bound)."""
        tensor = self._session(request.session_id).get(request.name)
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > limits.INLINE_BYTES:
            raise ResourceExhausted(
                f"blob {request.name!r} is {limits.readable_bytes(nbytes)}, above the {limits.readable_bytes(limits.INLINE_BYTES)} of one message; "
                "use FetchBlobStream"
            )
        self._count("out", "FetchBlob", nbytes)
        return b"".join(wire.fetch_blob_response(codec.WIRE_DTYPES[tensor.dtype], tensor.shape, memory.tensor_bytes(tensor)))

    async def FetchBlobStream(self, request: pb.FetchBlobRequest, context: aio.ServicerContext) -> AsyncIterator[bytes]:
        """Encoded FetchBlobChunks: the first has dtype, shape and the first bytes (all of them for a
        blob of one message), each framed with one copy of its data."""
        tensor = self._session(request.session_id).get(request.name)
        dtype = codec.WIRE_DTYPES[tensor.dtype]
        self._count("out", "FetchBlobStream", tensor.numel() * tensor.element_size())
        header = True
        for piece in codec.stream_chunks(tensor, limits.CHUNK_BYTES):
            yield b"".join(wire.fetch_blob_chunk(dtype, tensor.shape, piece, header=header))
            header = False
        if header:  # a blob of no bytes: the header alone
            yield b"".join(wire.fetch_blob_chunk(dtype, tensor.shape, b"", header=True))

    async def FeedBlobShm(self, request: pb.FeedBlobShmRequest, context: aio.ServicerContext) -> pb.FeedBlobResponse:
        shm.check_access(self.settings.allow_shm, context.peer())
        workspace = self._session(request.session_id)
        args = (workspace, request.name, request.dtype, tuple(request.shape), request.shm_name, request.offset)
        await self.workers.run(_ALWAYS_THREAD, shm.feed, *args)
        return pb.FeedBlobResponse()

    async def FetchBlobShm(self, request: pb.FetchBlobShmRequest, context: aio.ServicerContext) -> pb.FetchBlobShmResponse:
        # An empty shm_name asks for dtype and shape only, so the client can size its region.
        shm.check_access(self.settings.allow_shm, context.peer())
        workspace = self._session(request.session_id)
        cost = _ALWAYS_THREAD if request.shm_name else 0
        tensor = await self.workers.run(cost, shm.fetch, workspace, request.name, request.shm_name, request.offset)
        return pb.FetchBlobShmResponse(dtype=codec.WIRE_DTYPES[tensor.dtype], shape=tensor.shape)

    async def HasBlob(self, request: pb.HasBlobRequest, context: aio.ServicerContext) -> pb.HasBlobResponse:
        return pb.HasBlobResponse(exists=self._session(request.session_id).has(request.name))

    async def ListBlobs(self, request: pb.ListBlobsRequest, context: aio.ServicerContext) -> pb.ListBlobsResponse:
        return pb.ListBlobsResponse(names=self._session(request.session_id).names())

    async def RemoveBlob(self, request: pb.RemoveBlobRequest, context: aio.ServicerContext) -> pb.RemoveBlobResponse:
        self._session(request.session_id).remove(request.name)
        return pb.RemoveBlobResponse()

    async def ResetWorkspace(self, request: pb.ResetWorkspaceRequest, context: aio.ServicerContext) -> pb.ResetWorkspaceResponse:
        self._session(request.session_id).reset()
        return pb.ResetWorkspaceResponse()

    # ---- operators -----------------------------------------------------------------------

    async def RunOperator(self, request: pb.RunOperatorRequest, context: aio.ServicerContext) -> pb.RunOperatorResponse:
        if request.WhichOneof("definition") == "caffe2_op":  # Caffe2's own encoding (caffe2_format)
            calls = await self._caffe2_calls(request.session_id, caffe2_format.operator_calls, request.caffe2_op)
        else:
            calls = [op_call(request.op)]
        await self._run_net(request.session_id, calls)
        return pb.RunOperatorResponse()

    async def RunNet(self, request: pb.RunNetRequest, context: aio.ServicerContext) -> pb.RunNetResponse:
        if request.caffe2_net:  # Caffe2's own encoding (caffe2_format)
            if request.ops:
                raise InvalidArgument("RunNet: give ops or caffe2_net, not both")
            calls = await self._caffe2_calls(request.session_id, caffe2_format.net_calls, request.caffe2_net)
        else:
            engine.check_net_count(len(request.ops), "RunNet")
            calls = [op_call(op, f"op #{i}") for i, op in enumerate(request.ops)]
        await self._run_net(request.session_id, calls)
        return pb.RunNetResponse()

    async def _caffe2_calls(self, session_id: str, convert: Any, data: bytes) -> list[engine.OpCall]:
        device = self._session(session_id).device
        # Parsing is in proportion to the bytes (a few MiB of tiny fields take seconds): past
        # --inline-op-bytes it goes to a worker thread, as a large op does, not on the loop.
        calls: list[engine.OpCall] = await self.workers.run(len(data), convert, data, device)
        return calls

    async def _run_net(self, session_id: str, calls: list[engine.OpCall]) -> None:
        workspace = self._session(session_id)
        await self.workers.run(engine.input_bytes(workspace, calls), engine.run_net, workspace, calls, self._observe_op)

    async def Compute(self, request: pb.ComputeRequest, context: aio.ServicerContext) -> pb.ComputeResponse:
        # Plain protobuf: for tensors of one message its parser is faster than framing by hand.
        device = resolve_device(request.device, self.settings.device)
        engine.check_op_counts(0, len(request.inputs), 0, "Compute: inputs")  # counted before converted
        inputs: dict[str, torch.Tensor] = {}
        nbytes = 0
        for item in request.inputs:
            if item.name in inputs:
                raise InvalidArgument(f"Compute: input {item.name!r} is sent twice")
            inputs[item.name] = codec.tensor_from_wire(f"input {item.name!r}", item.tensor, device)
            nbytes += len(item.tensor.data)
        call = op_call(request.op)
        max_reply = limits.MAX_MESSAGE_BYTES - 64 * 1024
        outputs = await self.workers.run(nbytes, engine.compute, call, inputs, max_reply, self._observe_op)
        response = pb.ComputeResponse()
        for name, tensor in zip(call.outputs, outputs):
            codec.tensor_to_wire(tensor, response.outputs.add(name=name).tensor)
        self._count("in", "Compute", nbytes)
        self._count("out", "Compute", sum(len(item.tensor.data) for item in response.outputs))
        return response

    async def ListOperators(self, request: pb.ListOperatorsRequest, context: aio.ServicerContext) -> pb.ListOperatorsResponse:
        return self._operators

    async def CheckGradient(self, request: pb.CheckGradientRequest, context: aio.ServicerContext) -> pb.CheckGradientResponse:
        workspace = self._session(request.session_id)
        # Set when the call is cancelled (a client's cancel, or grpc at the deadline), and due at
        # the deadline: the check stops between evaluations and frees its thread.
        stop = StopSignal(context.time_remaining())
        try:
            rows = await self.workers.run(
                _ALWAYS_THREAD,
                engine.check_gradient,
                workspace,
                op_call(request.op),
                request.step_size,
                request.output_index,
                stop,
                stop=stop,
            )
        except Stopped:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "CheckGradient: the deadline passed during the check")
        return pb.CheckGradientResponse(
            inputs=[pb.InputGradientError(input=n, max_abs_error=a, max_rel_error=r) for n, a, r in rows],
            max_abs_error=max((a for _, a, _ in rows), default=0.0),
        )

    # ---- scoring -------------------------------------------------------------------------

    async def ScoreTopK(self, requests: AsyncIterator[pb.TopKRequest], context: aio.ServicerContext) -> AsyncIterator[pb.TopKResponse]:
        # Batches of every stream that wait for the same corpus at once are scored in one pass.
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        # The ids each batch asked for (None: none), in the order the scorer answers the batches.
        wanted: collections.deque[tuple[Workspace, RowIds | None]] = collections.deque()
        try:
            async for scores, indices in self.scorer.score(self._batches(requests, wanted, deadline)):
                response = pb.TopKResponse()
                codec.tensor_to_wire(scores, response.scores)
                codec.tensor_to_wire(indices, response.indices)
                workspace, ids = wanted.popleft()
                if ids is not None:
                    rows = indices.reshape(-1).cpu().numpy()
                    room = range_search.MAX_REPLY_BYTES - len(response.scores.data) - len(response.indices.data)
                    with workspace.transaction() as held:  # the ids are charged while they are held
                        held.expect((), ids.bytes_of(rows), "ScoreTopK's ids")
                        codec.ids_to_wire(ids.take_within(rows, room, "ScoreTopK"), response.ids)
                self._count("out", "ScoreTopK", len(response.scores.data) + len(response.indices.data) + _ids_bytes(response.ids))
                yield response
        except Stopped:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "ScoreTopK: the deadline passed before the batch was scored")

    async def _batches(
        self,
        requests: AsyncIterator[pb.TopKRequest],
        wanted: collections.deque[tuple[Workspace, RowIds | None]],
        deadline: float | None,
    ) -> AsyncIterator[Batch]:
        async for request in requests:
            workspace = self._session(request.session_id)
            corpus = workspace.get(request.corpus)
            queries = codec.tensor_from_wire("ScoreTopK queries", request.queries, _CPU)
            self._count("in", "ScoreTopK", len(request.queries.data))
            wanted.append((workspace, _ids(workspace, request.corpus, request.with_ids, "ScoreTopK")))
            yield Batch(workspace, request.corpus, corpus, queries, request.k, _norms(workspace, request.corpus), deadline)

    async def ScoreRange(
        self, requests: AsyncIterator[pb.RangeRequest], context: aio.ServicerContext
    ) -> AsyncIterator[pb.RangeResponse]:
        async for request in requests:
            workspace = self._session(request.session_id)
            corpus = workspace.get(request.corpus)
            ids = _ids(workspace, request.corpus, request.with_ids, "ScoreRange")
            queries = codec.tensor_from_wire("ScoreRange queries", request.queries, workspace.device)
            self._count("in", "ScoreRange", len(request.queries.data))
            # The hits, while found and until their reply is sent, are charged to the session.
            with workspace.transaction() as held:
                hits, found_ids = await self.workers.run(
                    corpus.numel() * corpus.element_size(),
                    range_search.score_range,
                    request.corpus,
                    corpus,
                    queries,
                    request.min_score,
                    request.max_per_query,
                    _norms(workspace, request.corpus),
                    range_search.MAX_REPLY_BYTES,
                    lambda nbytes: held.expect((), nbytes, "ScoreRange's results"),
                    ids,
                )
                response = pb.RangeResponse()
                for tensor, field in (
                    (hits.lims, response.lims),
                    (hits.indices, response.indices),
                    (hits.scores, response.scores),
                    (hits.truncated, response.truncated),
                ):
                    codec.tensor_to_wire(tensor, field)
                if found_ids is not None:
                    codec.ids_to_wire(found_ids, response.ids)
                self._count("out", "ScoreRange", sum(len(t.data) for t in (response.lims, response.indices, response.scores, response.truncated)) + _ids_bytes(response.ids))
                del hits, found_ids
                yield response


    # ---- snapshots and shared corpora (issue 10; filled in by its work) --------------------

    async def SaveWorkspace(self, request: pb.SaveWorkspaceRequest, context: aio.ServicerContext) -> pb.SaveWorkspaceResponse:
        workspace = self._session(request.session_id)
        args = (self.settings.state_dir, identity.CALLER.get(), request.name, workspace)
        blobs, nbytes = await self.workers.run(_ALWAYS_THREAD, snapshots.save_workspace, *args)
        return pb.SaveWorkspaceResponse(blobs=blobs, bytes=nbytes)

    async def LoadWorkspace(self, request: pb.LoadWorkspaceRequest, context: aio.ServicerContext) -> pb.LoadWorkspaceResponse:
        workspace = self._session(request.session_id)
        args = (self.settings.state_dir, identity.CALLER.get(), request.name, workspace)
        blobs, nbytes = await self.workers.run(_ALWAYS_THREAD, snapshots.load_workspace, *args)
        return pb.LoadWorkspaceResponse(blobs=blobs, bytes=nbytes)

    async def ListCorpora(self, request: pb.ListCorporaRequest, context: aio.ServicerContext) -> pb.ListCorporaResponse:
        return pb.ListCorporaResponse(
            corpora=[
                pb.CorpusInfo(
                    name=c.name,
                    dtype=codec.WIRE_DTYPES[c.tensor.dtype],
                    shape=c.tensor.shape,
                    bytes=c.nbytes,
                    source=c.source,
                    id_type=c.ids.kind if c.ids is not None else "",
                )
                for c in (self.store.corpora.list() if self.store.corpora is not None else [])
            ]
        )

    async def PublishCorpus(self, request: pb.PublishCorpusRequest, context: aio.ServicerContext) -> pb.PublishCorpusResponse:
        # Any caller the interceptors let in may publish (with identities: any authenticated one);
        # the corpus records who. The tensor is shared with the session, not copied: blobs are
        # replaced, never changed in place, so the session may go on using or replacing its blob.
        workspace = self._session(request.session_id)
        if is_corpus(request.blob):
            raise InvalidArgument(f"PublishCorpus: blob {request.blob[:64]!r} is already a shared corpus; publish a blob of the session")
        tensor = workspace.get(request.blob)
        if self.store.corpora is None:
            raise FailedPrecondition("PublishCorpus: this server has no shared corpora")
        self.store.corpora.publish(request.name, tensor, identity.CALLER.get())
        return pb.PublishCorpusResponse()

def _check_routed(session_id: str) -> None:
    """InvalidArgument when the call's `cosserve-session-id` metadata names another session than
    its request: a balancer routed the call on the metadata, so it may have reached a replica that
    does not hold the session the request acts on (a misbuilt client)."""
    for value in SESSION_METADATA.get():
        if value != session_id:
            raise InvalidArgument(
                f"the {limits.SESSION_ID_METADATA!r} metadata names session {quoted(value)} but the request names "
                f"{quoted(session_id)}; a load balancer routes the call on the metadata, so send the request's id there"
            )


def _norms(workspace: Workspace, corpus: str) -> NormCache:
    """Where the norms of `corpus` are kept: a shared corpus's once for every session, a blob's for its session."""
    return workspace.corpora.norms if is_corpus(corpus) and workspace.corpora is not None else workspace.norms


def _ids(workspace: Workspace, corpus: str, with_ids: bool, method: str) -> RowIds | None:
    """The row ids of `corpus` when the request asks for them; InvalidArgument if it has none."""
    if not with_ids:
        return None
    ids = workspace.corpora.ids(corpus) if is_corpus(corpus) and workspace.corpora is not None else None
    if ids is None:
        raise InvalidArgument(
            f"{method}: corpus {quoted(corpus)} has no row ids (only a shared corpus loaded from a file with an id "
            "column has them: ListCorpora's id_type); ask without ids"
        )
    return ids


def _ids_bytes(ids: pb.CorpusIds) -> int:
    return len(ids.int64_ids.data) + len(ids.string_ids.offsets.data) + len(ids.string_ids.utf8)


def _decoded(method: str, decode: Any, raw: bytes) -> Any:
    try:
        return decode(raw)
    except wire.WireError as err:
        raise InvalidArgument(f"{method}: malformed request: {err}") from None


def add_to_server(servicer: CosserveServicer, server: aio.Server) -> None:
    """Register every RPC of the service on `server`, read from the service descriptor: protobuf
    messages, except the sides wire.FRAMED_METHODS lists as bytes (decoded and framed by wire).
    interceptors.ErrorInterceptor makes every deserializer answer bytes it cannot parse with
    INVALID_ARGUMENT."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["Cosserve"].methods:
        framed = wire.FRAMED_METHODS.get(method.name)
        request_bytes = framed is not None and framed.request_bytes
        response_bytes = framed is not None and framed.response_bytes
        request_type = getattr(pb, method.input_type.name)
        response_type = getattr(pb, method.output_type.name)
        _, factory = HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = factory(
            getattr(servicer, method.name),
            request_deserializer=None if request_bytes else request_type.FromString,
            response_serializer=None if response_bytes else response_type.SerializeToString,
        )
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
