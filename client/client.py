"""The friendly client: `Client` holds the channel, `Session` is one server-side workspace."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np

from cosserve import limits, tensors
from cosserve.errors import CosserveRpcError
from cosserve.v1 import cosserve_pb2 as pb
from cosserve.v1 import cosserve_pb2_grpc as pb_grpc

__all__ = ["ArgInfo", "Client", "InputInfo", "OpInfo", "Session", "OpSpec"]

T = TypeVar("T")

# One operator of a net: (type, inputs, outputs) or (type, inputs, outputs, {arg: value}),
# or a mapping with keys "type", "inputs", "outputs" and optionally "args".
OpSpec = tuple[Any, ...] | Mapping[str, Any]

# Seconds of deadline added per byte streamed, on top of the call's timeout (10 MB/s floor).
_SECONDS_PER_BYTE = 1e-7


@dataclasses.dataclass(frozen=True)
class ArgInfo:
    name: str
    type: str  # "float", "int", "bool" or "string"
    default: Any
    doc: str


@dataclasses.dataclass(frozen=True)
class InputInfo:
    name: str
    dtypes: tuple[str, ...]
    doc: str


@dataclasses.dataclass(frozen=True)
class OpInfo:
    """An operator's schema as the server reports it."""

    name: str
    inputs: tuple[InputInfo, ...]
    outputs: tuple[str, ...]
    args: tuple[ArgInfo, ...]
    doc: str
    gradient: str | None
    caffe2: bool


def _argument(name: str, value: Any) -> pb.Argument:
    arg = pb.Argument(name=name)
    if isinstance(value, (bool, np.bool_)):
        arg.b = bool(value)
    elif isinstance(value, (int, np.integer)):
        arg.i = int(value)
    elif isinstance(value, (float, np.floating)):
        arg.f = float(value)
    elif isinstance(value, str):
        arg.s = value
    else:
        raise TypeError(f"argument {name}={value!r}: expected bool, int, float or str")
    return arg


def _argument_value(arg: pb.Argument) -> Any:
    kind = arg.WhichOneof("value")
    return None if kind is None else getattr(arg, kind)


def operator_def(op_type: str, inputs: Sequence[str], outputs: Sequence[str], args: Mapping[str, Any]) -> pb.OperatorDef:
    """Build the wire OperatorDef of one operator."""
    if isinstance(inputs, str) or isinstance(outputs, str):
        raise TypeError("inputs and outputs are lists of blob names, not a single string")
    return pb.OperatorDef(
        type=op_type,
        input=list(inputs),
        output=list(outputs),
        arg=[_argument(k, v) for k, v in args.items()],
    )


def _op_from_spec(spec: OpSpec) -> pb.OperatorDef:
    if isinstance(spec, Mapping):
        return operator_def(spec["type"], spec["inputs"], spec["outputs"], spec.get("args", {}))
    if len(spec) == 3:
        return operator_def(spec[0], spec[1], spec[2], {})
    if len(spec) == 4:
        return operator_def(spec[0], spec[1], spec[2], spec[3])
    raise TypeError(f"an op is (type, inputs, outputs[, args]), got {spec!r}")


class Client:
    """A connection to a cosserve server.

    Args:
        target: "host:port" of the server.
        timeout: default deadline in seconds of every call (streams get more per byte).
        credentials: channel credentials for TLS; None for a plaintext channel.
        token: bearer token sent with every call, for servers started with an auth token.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 30.0,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        options = list(limits.GRPC_OPTIONS)
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self.stub = pb_grpc.CosserveStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: str, request: Any, *, timeout: float | None = None) -> Any:
        """Call a unary or request-streaming RPC; raise CosserveRpcError on failure."""
        rpc = getattr(self.stub, method)
        try:
            return rpc(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise CosserveRpcError(err.code(), err.details() or "", method) from err

    def _stream(self, method: str, request: Any, *, timeout: float | None = None) -> Iterator[Any]:
        """Call a response-streaming RPC and yield its messages; raise CosserveRpcError on failure."""
        rpc = getattr(self.stub, method)
        try:
            yield from rpc(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise CosserveRpcError(err.code(), err.details() or "", method) from err

    def session(self, device: str = "auto") -> Session:
        """Open a server-side workspace on `device` ("auto", "cpu", "cuda", "cuda:N")."""
        reply = self._call("CreateSession", pb.CreateSessionRequest(device=device))
        return Session(self, reply.session_id, reply.device)

    def operators(self) -> list[OpInfo]:
        """Schemas of the server's operators, sorted by name."""
        reply = self._call("ListOperators", pb.ListOperatorsRequest())
        return [
            OpInfo(
                name=s.name,
                inputs=tuple(
                    InputInfo(i.name, tuple(pb.DType.Name(d).lower() for d in i.dtypes), i.doc)
                    for i in s.inputs
                ),
                outputs=tuple(s.outputs),
                args=tuple(
                    ArgInfo(a.name, pb.ArgType.Name(a.type).removeprefix("ARG_").lower(), _argument_value(a.default), a.doc)
                    for a in s.args
                ),
                doc=s.doc,
                gradient=s.gradient or None,
                caffe2=s.caffe2,
            )
            for s in reply.operators
        ]

    def compute(
        self,
        op_type: str,
        inputs: Mapping[str, Any],
        outputs: Sequence[str],
        *,
        device: str = "auto",
        **args: Any,
    ) -> dict[str, np.ndarray]:
        """Run one operator on `inputs` ({name: array}) without a session; return {output: array}.

        For small tensors: everything travels in one request and one response.
        """
        request = pb.ComputeRequest(
            op=operator_def(op_type, list(inputs), outputs, args), device=device
        )
        for name, value in inputs.items():
            tensors.to_wire(value, request.inputs.add(name=name).tensor)
        reply = self._call("Compute", request)
        return {item.name: tensors.from_wire(item.tensor) for item in reply.outputs}


class Session:
    """One server-side workspace of named tensors; close it, or use it as a context manager."""

    def __init__(self, client: Client, session_id: str, device: str) -> None:
        self.client = client
        self.id = session_id
        self.device = device
        self.closed = False

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Session(id={self.id!r}, device={self.device!r}, closed={self.closed})"

    def close(self) -> None:
        """Free the session's blobs on the server; calling it twice is harmless."""
        if not self.closed:
            self.closed = True
            self.client._call("CloseSession", pb.CloseSessionRequest(session_id=self.id))

    # ---- blobs ---------------------------------------------------------------------------

    def feed_blob(self, name: str, value: Any) -> None:
        """Create or overwrite blob `name` with an array (numpy, torch or array-like)."""
        array = tensors.as_numpy(value)
        if array.nbytes <= limits.INLINE_BYTES:
            request = pb.FeedBlobRequest(session_id=self.id, name=name)
            tensors.to_wire(array, request.tensor)
            self.client._call("FeedBlob", request)
            return
        self.client._call(
            "FeedBlobStream",
            self._feed_chunks(name, array),
            timeout=self.client.timeout + array.nbytes * _SECONDS_PER_BYTE,
        )

    def _feed_chunks(self, name: str, array: np.ndarray) -> Iterator[pb.FeedBlobChunk]:
        yield pb.FeedBlobChunk(
            session_id=self.id, name=name, dtype=tensors.wire_dtype(array.dtype), shape=array.shape
        )
        for piece in tensors.chunks(array, limits.CHUNK_BYTES):
            yield pb.FeedBlobChunk(data=bytes(piece))

    def fetch_blob(self, name: str) -> np.ndarray:
        """Return blob `name` as a numpy array of the server's dtype and shape."""
        request = pb.FetchBlobRequest(session_id=self.id, name=name)
        try:
            return tensors.from_wire(self.client._call("FetchBlob", request).tensor)
        except CosserveRpcError as err:
            if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
        return self._fetch_streamed(request)

    def _fetch_streamed(self, request: pb.FetchBlobRequest) -> np.ndarray:
        messages = self.client._stream("FetchBlobStream", request, timeout=None)
        first = next(messages)
        nbytes = tensors.nbytes_of(first.dtype, first.shape)
        buffer = np.empty(nbytes, np.uint8)
        filled = 0
        for message in _chain_first(first, messages):
            size = len(message.data)
            if filled + size > nbytes:
                raise ValueError(f"server sent more than the {nbytes} bytes of blob {request.name!r}")
            buffer[filled : filled + size] = np.frombuffer(message.data, np.uint8)
            filled += size
        return tensors.decode(first.dtype, first.shape, buffer[:filled])

    def has_blob(self, name: str) -> bool:
        reply = self.client._call("HasBlob", pb.HasBlobRequest(session_id=self.id, name=name))
        return bool(reply.exists)

    def blobs(self) -> list[str]:
        """Names of the session's blobs, sorted."""
        return list(self.client._call("ListBlobs", pb.ListBlobsRequest(session_id=self.id)).names)

    def remove_blob(self, name: str) -> None:
        self.client._call("RemoveBlob", pb.RemoveBlobRequest(session_id=self.id, name=name))

    def reset(self) -> None:
        """Drop every blob; the session stays open."""
        self.client._call("ResetWorkspace", pb.ResetWorkspaceRequest(session_id=self.id))

    # ---- operators -----------------------------------------------------------------------

    def run_operator(self, op_type: str, inputs: Sequence[str], outputs: Sequence[str], **args: Any) -> None:
        """Run one Caffe2 operator on the session's blobs; on failure nothing changes."""
        request = pb.RunOperatorRequest(session_id=self.id, op=operator_def(op_type, inputs, outputs, args))
        self.client._call("RunOperator", request)

    def run_net(self, ops: Iterable[OpSpec]) -> None:
        """Run operators in order, all or nothing.

        Each op is (type, inputs, outputs) or (type, inputs, outputs, {arg: value}).
        """
        request = pb.RunNetRequest(session_id=self.id, ops=[_op_from_spec(s) for s in ops])
        self.client._call("RunNet", request)

    def check_gradient(
        self,
        op_type: str,
        inputs: Sequence[str],
        outputs: Sequence[str] | None = None,
        *,
        step_size: float = 1e-6,
        output_index: int = 0,
        **args: Any,
    ) -> dict[str, float]:
        """Compare `op_type`'s gradient operator with finite differences on this session's blobs.

        Returns {"max_abs_error": ..., <input name>: max abs error of that input, ...}.
        """
        request = pb.CheckGradientRequest(
            session_id=self.id,
            op=operator_def(op_type, inputs, outputs or [], args),
            step_size=step_size,
            output_index=output_index,
        )
        reply = self.client._call("CheckGradient", request)
        result = {item.input: item.max_abs_error for item in reply.inputs}
        result["max_abs_error"] = reply.max_abs_error
        return result


def _chain_first(first: T, rest: Iterator[T]) -> Iterator[T]:
    yield first
    yield from rest

