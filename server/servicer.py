"""The gRPC servicer: translates messages to core calls and back, nothing more."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import torch
from google.protobuf.message import DecodeError

from cosserve import limits
from cosserve import tensors as wire
from cosserve.server import codec, engine, scoring, shm
from cosserve.server.errors import InvalidArgument, ResourceExhausted
from cosserve.server.registry import REGISTRY, ArgType, InputKind, OpSchema
from cosserve.server.settings import Settings
from cosserve.server.workspace import SessionStore, Workspace, resolve_device
from cosserve.v1 import cosserve_pb2 as pb
from cosserve.v1 import cosserve_pb2_grpc as pb_grpc

__all__ = ["CosserveServicer", "add_framed_handlers", "add_to_server", "op_call", "schema_message"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Cosserve"].full_name

# ScoreTopK batches decoded ahead of the one being scored: enough to hide receiving and decoding
# behind compute, few enough that a fast client cannot make the server hold many.
_PREFETCH_DEPTH = 2

_ARG_TYPES = {
    ArgType.FLOAT: pb.ARG_FLOAT,
    ArgType.INT: pb.ARG_INT,
    ArgType.BOOL: pb.ARG_BOOL,
    ArgType.STRING: pb.ARG_STRING,
}


def op_call(message: pb.OperatorDef) -> engine.OpCall:
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


class CosserveServicer(pb_grpc.CosserveServicer):
    """Every RPC of cosserve.v1.Cosserve; domain errors are mapped by status.ErrorInterceptor."""

    def __init__(self, store: SessionStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        # Built once: the registry does not change while serving.
        self._operators = pb.ListOperatorsResponse(
            operators=[schema_message(REGISTRY[name].schema) for name in sorted(REGISTRY)]
        )
        # ScoreTopK batches of every stream are scored on this one thread: each batch already uses
        # every core, and one long-lived thread keeps one OpenMP team and one set of allocator
        # pools instead of one per gRPC worker that happens to serve a stream.
        self._scorer = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cosserve-score")

    # ---- sessions ------------------------------------------------------------------------

    def CreateSession(self, request: pb.CreateSessionRequest, context: grpc.ServicerContext) -> pb.CreateSessionResponse:
        workspace = self.store.create(request.device)
        return pb.CreateSessionResponse(session_id=workspace.id, device=str(workspace.device))

    def CloseSession(self, request: pb.CloseSessionRequest, context: grpc.ServicerContext) -> pb.CloseSessionResponse:
        self.store.close(request.session_id)
        return pb.CloseSessionResponse()

    # ---- blobs ---------------------------------------------------------------------------

    # The four RPCs that carry blob data read their data from, or write it into, encoded bytes
    # (FeedBlob and FeedBlobStream take bytes; FetchBlob and FetchBlobStream return bytes):
    # add_to_server registers them so (see add_framed_handlers).

    def FeedBlob(self, request: bytes, context: grpc.ServicerContext) -> pb.FeedBlobResponse:
        session_id, name, span = _framed_feed_request(request)
        workspace = self.store.get(session_id)
        tensor = codec.tensor_from_frame(f"blob {name!r}", request, *span, workspace.device, workspace.max_bytes)
        workspace.put(name, tensor)
        return pb.FeedBlobResponse()

    def FeedBlobStream(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> pb.FeedBlobResponse:
        raw = next(request_iterator, None)
        if raw is None:
            raise InvalidArgument("FeedBlobStream: the stream was empty; the first message carries the header")
        try:
            first = pb.FeedBlobChunk.FromString(raw)
        except DecodeError:
            raise InvalidArgument("FeedBlobStream: the first message is not a FeedBlobChunk") from None
        workspace = self.store.get(first.session_id)
        what = f"blob {first.name!r}"
        # Fail before allocating or receiving gigabytes that cannot be stored.
        workspace.reserve(first.name, codec.check_header(what, first.dtype, first.shape, workspace.max_bytes))
        assembler = codec.ChunkAssembler(what, first.dtype, first.shape, workspace.max_bytes, workspace.device)
        assembler.add(_chunk_data(raw))
        for chunk in request_iterator:
            assembler.add(_chunk_data(chunk))
        workspace.put(first.name, assembler.finish(workspace.device))
        return pb.FeedBlobResponse()

    def _inline_blob(self, request: pb.FetchBlobRequest, context: grpc.ServicerContext) -> torch.Tensor:
        tensor = self.store.get(request.session_id).get(request.name)
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > limits.INLINE_BYTES:
            # The size, so that the client can give the streamed fetch a deadline to match.
            context.set_trailing_metadata(((limits.BLOB_BYTES_KEY, str(nbytes)),))
            raise ResourceExhausted(
                f"blob {request.name!r} is {nbytes} bytes, above the {limits.INLINE_BYTES} of one message; "
                "use FetchBlobStream"
            )
        return tensor

    def FetchBlob(self, request: pb.FetchBlobRequest, context: grpc.ServicerContext) -> bytes:
        """The encoded FetchBlobResponse, framed with one copy of the data."""
        tensor = codec.tensor_pieces(self._inline_blob(request, context))
        return b"".join([wire.field_header(1, sum(map(len, tensor))), *tensor])  # tensor (1)

    def FetchBlobStream(self, request: pb.FetchBlobRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        """Encoded FetchBlobChunks, each framed with one copy of its data."""
        tensor = self.store.get(request.session_id).get(request.name)
        head = pb.FetchBlobChunk(dtype=codec.WIRE_DTYPES[tensor.dtype], shape=tensor.shape).SerializeToString()
        pieces = codec.stream_chunks(tensor, limits.CHUNK_BYTES)
        first = next(pieces, None)
        yield head if first is None else b"".join((head, wire.field_header(3, len(first)), first))
        for piece in pieces:
            yield b"".join((wire.field_header(3, len(piece)), piece))  # data (3)

    def FeedBlobShm(self, request: pb.FeedBlobShmRequest, context: grpc.ServicerContext) -> pb.FeedBlobResponse:
        shm.check_access(self.settings.allow_shm, context.peer())
        workspace = self.store.get(request.session_id)
        shm.feed(workspace, request.name, request.dtype, request.shape, request.shm_name, request.offset)
        return pb.FeedBlobResponse()

    def FetchBlobShm(self, request: pb.FetchBlobShmRequest, context: grpc.ServicerContext) -> pb.FetchBlobShmResponse:
        # An empty shm_name asks for dtype and shape only, so the client can size its region.
        shm.check_access(self.settings.allow_shm, context.peer())
        tensor = shm.fetch(self.store.get(request.session_id), request.name, request.shm_name, request.offset)
        return pb.FetchBlobShmResponse(dtype=codec.WIRE_DTYPES[tensor.dtype], shape=tensor.shape)

    def HasBlob(self, request: pb.HasBlobRequest, context: grpc.ServicerContext) -> pb.HasBlobResponse:
        return pb.HasBlobResponse(exists=self.store.get(request.session_id).has(request.name))

    def ListBlobs(self, request: pb.ListBlobsRequest, context: grpc.ServicerContext) -> pb.ListBlobsResponse:
        return pb.ListBlobsResponse(names=self.store.get(request.session_id).names())

    def RemoveBlob(self, request: pb.RemoveBlobRequest, context: grpc.ServicerContext) -> pb.RemoveBlobResponse:
        self.store.get(request.session_id).remove(request.name)
        return pb.RemoveBlobResponse()

    def ResetWorkspace(self, request: pb.ResetWorkspaceRequest, context: grpc.ServicerContext) -> pb.ResetWorkspaceResponse:
        self.store.get(request.session_id).reset()
        return pb.ResetWorkspaceResponse()

    # ---- operators -----------------------------------------------------------------------

    def RunOperator(self, request: pb.RunOperatorRequest, context: grpc.ServicerContext) -> pb.RunOperatorResponse:
        engine.run_net(self.store.get(request.session_id), [op_call(request.op)])
        return pb.RunOperatorResponse()

    def RunNet(self, request: pb.RunNetRequest, context: grpc.ServicerContext) -> pb.RunNetResponse:
        engine.run_net(self.store.get(request.session_id), [op_call(op) for op in request.ops])
        return pb.RunNetResponse()

    def Compute(self, request: pb.ComputeRequest, context: grpc.ServicerContext) -> pb.ComputeResponse:
        device = resolve_device(request.device, self.settings.device)
        inputs: dict[str, torch.Tensor] = {}
        for item in request.inputs:
            if item.name in inputs:
                raise InvalidArgument(f"Compute: input {item.name!r} is sent twice")
            inputs[item.name] = codec.tensor_from_wire(f"input {item.name!r}", item.tensor, device)
        call = op_call(request.op)
        outputs = engine.compute(call, inputs, limits.MAX_MESSAGE_BYTES - 64 * 1024)
        response = pb.ComputeResponse()
        for name, tensor in zip(call.outputs, outputs):
            codec.tensor_to_wire(tensor, response.outputs.add(name=name).tensor)
        return response

    def ListOperators(self, request: pb.ListOperatorsRequest, context: grpc.ServicerContext) -> pb.ListOperatorsResponse:
        return self._operators

    def CheckGradient(self, request: pb.CheckGradientRequest, context: grpc.ServicerContext) -> pb.CheckGradientResponse:
        workspace = self.store.get(request.session_id)
        rows = engine.check_gradient(workspace, op_call(request.op), request.step_size, request.output_index)
        return pb.CheckGradientResponse(
            inputs=[pb.InputGradientError(input=n, max_abs_error=a, max_rel_error=r) for n, a, r in rows],
            max_abs_error=max((a for _, a, _ in rows), default=0.0),
        )

    # ---- scoring -------------------------------------------------------------------------

    def ScoreTopK(self, request_iterator: Iterator[pb.TopKRequest], context: grpc.ServicerContext) -> Iterator[pb.TopKResponse]:
        # A reader thread receives, decodes and stages (on CUDA: copies) the next batches while
        # this thread scores the current one, so network and decoding time overlap with compute
        # instead of adding to it; replies still leave one per request, in order.
        cpu = torch.device("cpu")

        def receive(request: pb.TopKRequest) -> tuple[Workspace, str, torch.Tensor, torch.Tensor, int]:
            workspace = self.store.get(request.session_id)
            corpus = workspace.get(request.corpus)
            queries = codec.tensor_from_wire("ScoreTopK queries", request.queries, cpu)
            return workspace, request.corpus, corpus, scoring.to_device(queries, workspace.device), request.k

        for workspace, name, corpus, queries, k in scoring.prefetch(map(receive, request_iterator), _PREFETCH_DEPTH):
            scores, indices = self._scorer.submit(
                scoring.score_blob, name, corpus, queries, k, workspace.norms, limits.INLINE_BYTES
            ).result()
            response = pb.TopKResponse()
            codec.tensor_to_wire(scores, response.scores)
            codec.tensor_to_wire(indices, response.indices)
            yield response


def _framed_feed_request(raw: bytes) -> tuple[str, str, tuple[int, int]]:
    """Session id, blob name and the span of the tensor of an encoded FeedBlobRequest."""
    session_id, name, span = b"", b"", (0, 0)
    try:
        for number, kind, start, end in wire.fields(raw):
            if kind == 2 and number == 1:
                session_id = raw[start:end]
            elif kind == 2 and number == 2:
                name = raw[start:end]
            elif kind == 2 and number == 3:
                span = (start, end)
        return session_id.decode(), name.decode(), span
    except (ValueError, UnicodeDecodeError) as err:
        raise InvalidArgument(f"FeedBlob: malformed request: {err}") from None


def _chunk_data(chunk: bytes) -> bytes | memoryview:
    """The data of an encoded FeedBlobChunk: a view of its bytes (no copy)."""
    data: bytes | memoryview = b""
    try:
        for number, kind, start, end in wire.fields(chunk):
            if kind == 2 and number == 5:
                data = memoryview(chunk)[start:end]
    except ValueError as err:
        raise InvalidArgument(f"FeedBlobStream: malformed chunk: {err}") from None
    return data


def add_framed_handlers(servicer: CosserveServicer, server: grpc.Server) -> None:
    """Serve the four RPCs that carry blob data on bytes instead of protobuf objects.

    Same wire format; the data is read in place and written with one copy, where the protobuf
    runtime copies it three times (parse, field read, assembly; or field set, serialize). Call
    after the generated registration: registered handlers replace those of the same name.
    """
    raw_response = {"response_serializer": pb.FeedBlobResponse.SerializeToString}
    raw_request = {"request_deserializer": pb.FetchBlobRequest.FromString}
    server.add_registered_method_handlers(
        SERVICE_NAME,
        {
            "FeedBlob": grpc.unary_unary_rpc_method_handler(servicer.FeedBlob, **raw_response),
            "FeedBlobStream": grpc.stream_unary_rpc_method_handler(servicer.FeedBlobStream, **raw_response),
            "FetchBlob": grpc.unary_unary_rpc_method_handler(servicer.FetchBlob, **raw_request),
            "FetchBlobStream": grpc.unary_stream_rpc_method_handler(servicer.FetchBlobStream, **raw_request),
        },
    )


def add_to_server(servicer: CosserveServicer, server: grpc.Server) -> None:
    """Register every RPC of `servicer` on `server`, the blob-data ones framed (add_framed_handlers)."""
    pb_grpc.add_CosserveServicer_to_server(servicer, server)
    add_framed_handlers(servicer, server)
