"""The friendly client: `Client` holds the channel, `Session` is one server-side workspace."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import mmap
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from multiprocessing import shared_memory
from typing import Any

import grpc
import numpy as np

from cosserve import limits, tensors, wire
from cosserve.errors import (
    CosserveRpcError,
    InvalidArgumentError,
    InvalidTypeError,
    OpSpecError,
    ProtocolError,
    ShapeError,
    SharedMemoryError,
)
from cosserve.v1 import cosserve_pb2 as pb
from cosserve.v1 import cosserve_pb2_grpc as pb_grpc

__all__ = [
    "ArgInfo",
    "Client",
    "CorpusInfo",
    "GradientCheck",
    "InputInfo",
    "OpInfo",
    "OpSpec",
    "PemSource",
    "Session",
    "channel_credentials",
    "operator_def",
]

# One operator of a net: (type, inputs, outputs) or (type, inputs, outputs, {arg: value}),
# or a mapping with keys "type", "inputs", "outputs" and optionally "args".
OpSpec = tuple[Any, ...] | Mapping[str, Any]

# Seconds of deadline added per byte streamed, on top of the call's timeout (10 MB/s floor).
_SECONDS_PER_BYTE = 1e-7
# The same through shared memory (100 MB/s floor).
_SHM_SECONDS_PER_BYTE = 1e-8
# Deadline of a ScoreTopK stream whose number of batches is unknown up front.
_UNSIZED_STREAM_TIMEOUT = 24 * 3600.0


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


@dataclasses.dataclass(frozen=True)
class CorpusInfo:
    """A shared corpus of the server: every session reads it as the blob `@name`, read-only."""

    name: str  # without the '@'
    dtype: str  # "float32", ...
    shape: tuple[int, ...]
    nbytes: int  # its data, held once by the server whatever the number of sessions
    source: str  # the file it was mapped from, or "published by <identity>"


def _argument(name: str, value: Any) -> pb.Argument:
    arg = pb.Argument(name=name)
    if isinstance(value, (bool, np.bool_)):
        arg.b = bool(value)
    elif isinstance(value, (int, np.integer)):
        if not -(2**63) <= int(value) < 2**63:
            raise InvalidArgumentError(f"argument {name}={value}: an int argument must fit in int64")
        arg.i = int(value)
    elif isinstance(value, (float, np.floating)):
        arg.f = float(value)
    elif isinstance(value, str):
        arg.s = value
    else:
        raise InvalidTypeError(f"argument {name}={value!r}: expected bool, int, float or str")
    return arg


def _argument_value(arg: pb.Argument) -> Any:
    kind = arg.WhichOneof("value")
    return None if kind is None else getattr(arg, kind)


def operator_def(op_type: str, inputs: Sequence[str], outputs: Sequence[str], args: Mapping[str, Any]) -> pb.OperatorDef:
    """Build the wire OperatorDef of one operator (InvalidTypeError for names that are not str)."""
    if not isinstance(op_type, str):
        raise InvalidTypeError(f"an operator type is a str such as 'Cos', got {op_type!r}")
    if isinstance(inputs, str) or isinstance(outputs, str):
        raise InvalidTypeError("inputs and outputs are lists of blob names, not a single string")
    for name in (*inputs, *outputs):
        _check_name(name)
    if not isinstance(args, Mapping) or not all(isinstance(k, str) for k in args):
        raise InvalidTypeError(f"{op_type}: arguments are a mapping of str names to values, got {args!r}")
    return pb.OperatorDef(
        type=op_type,
        input=list(inputs),
        output=list(outputs),
        arg=[_argument(k, v) for k, v in args.items()],
    )


def _check_k(k: Any) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise InvalidTypeError(f"k is an int, 1 <= k <= M, got {k!r}")


def _check_name(name: Any) -> None:
    if not isinstance(name, str):
        raise InvalidTypeError(f"a blob name is a str, got {name!r}")


def op_from_spec(spec: OpSpec) -> pb.OperatorDef:
    """The OperatorDef of one op of a net: (type, inputs, outputs[, args]) or a mapping with keys
    "type", "inputs", "outputs" and optionally "args"; OpSpecError for anything else."""
    if isinstance(spec, Mapping):
        missing = [key for key in ("type", "inputs", "outputs") if key not in spec]
        unknown = sorted(set(spec) - {"type", "inputs", "outputs", "args"}, key=str)
        if missing or unknown:
            problem = f"missing {missing}" if missing else f"unknown keys {unknown}"
            raise OpSpecError(f"an op mapping has keys type, inputs, outputs[, args]: {problem} in {spec!r}")
        parts: Sequence[Any] = (spec["type"], spec["inputs"], spec["outputs"], spec.get("args", {}))
    elif isinstance(spec, (tuple, list)) and len(spec) in (3, 4):
        parts = (*spec, {}) if len(spec) == 3 else spec
    else:
        raise OpSpecError(f"an op is (type, inputs, outputs[, args]), got {spec!r}")
    try:
        return operator_def(*parts)
    except InvalidTypeError as err:
        raise OpSpecError(f"{err} (in the op {spec!r})") from None


# PEM text as bytes, or the path of a PEM file.
PemSource = bytes | str | os.PathLike[str]


def _pem(source: PemSource | None) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    text = os.fspath(source)
    if text.lstrip().startswith("-----BEGIN "):  # PEM given as text rather than a path
        return text.encode("ascii")
    try:
        with open(text, "rb") as file:
            return file.read()
    except OSError as err:
        raise InvalidArgumentError(f"cannot read the PEM file {text!r}: {err.strerror or err}") from None


def channel_credentials(
    *,
    root_certificates: PemSource | None = None,
    client_cert: PemSource | None = None,
    client_key: PemSource | None = None,
) -> grpc.ChannelCredentials:
    """TLS credentials of a channel: the CAs to trust (None: the system's) and, for mutual TLS,
    this client's certificate and key. Each is PEM bytes or the path of a PEM file."""
    if (client_cert is None) != (client_key is None):
        raise InvalidArgumentError("client_cert and client_key go together: give both or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(root_certificates), private_key=_pem(client_key), certificate_chain=_pem(client_cert)
    )


def connection_options(
    credentials: grpc.ChannelCredentials | None,
    token: str | None,
    *,
    tls: bool,
    root_certificates: PemSource | None,
    client_cert: PemSource | None,
    client_key: PemSource | None,
) -> tuple[grpc.ChannelCredentials | None, tuple[tuple[str, str], ...]]:
    """(the channel's credentials, None for plaintext; the metadata every call sends) from a
    client's arguments (see Client): any TLS option means TLS, and a token is a bearer header."""
    if tls or root_certificates is not None or client_cert is not None or client_key is not None:
        if credentials is not None:
            raise InvalidArgumentError("give credentials, or the TLS options (tls, root_certificates, client_cert, client_key)")
        credentials = channel_credentials(root_certificates=root_certificates, client_cert=client_cert, client_key=client_key)
    return credentials, ((("authorization", f"Bearer {token}"),) if token else ())


# ---- pure request building and reply decoding, shared with cosserve.aio ------------------


def build_request(message_type: Any, **fields: Any) -> Any:
    """A request message of user-given fields; the client's errors, not protobuf's, for a value of
    the wrong type (`InvalidTypeError`) or out of range (`InvalidArgumentError`)."""
    try:
        return message_type(**fields)
    except TypeError as err:
        raise InvalidTypeError(f"{message_type.DESCRIPTOR.name}: {err}") from None
    except ValueError as err:
        raise InvalidArgumentError(f"{message_type.DESCRIPTOR.name}: {err}") from None


def call_metadata(base: tuple[tuple[str, str], ...], session: str | None) -> tuple[tuple[str, str], ...]:
    """A call's metadata: `base` (the token), and for a session's call its id, so that a load
    balancer hashing on `cosserve-session-id` sends every call of a session to the replica holding it."""
    if session is None:
        return base
    return (*base, (limits.SESSION_ID_METADATA, session))


def create_session_request(device: str) -> pb.CreateSessionRequest:
    """CreateSession with a proposed id: 128 random bits, also sent as metadata, so that a balancer
    hashing on that header sends the creation where every later call will go."""
    return build_request(pb.CreateSessionRequest, device=device, session_id=secrets.token_hex(16))


def rpc_error(err: grpc.RpcError, method: str) -> CosserveRpcError:
    return CosserveRpcError(err.code(), err.details() or "", method)


def operator_infos(reply: pb.ListOperatorsResponse) -> list[OpInfo]:
    return [
        OpInfo(
            name=s.name,
            inputs=tuple(
                InputInfo(i.name, tuple(pb.DType.Name(d).lower() for d in i.dtypes), i.doc) for i in s.inputs
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


def corpus_infos(reply: pb.ListCorporaResponse) -> list[CorpusInfo]:
    return [CorpusInfo(c.name, pb.DType.Name(c.dtype).lower(), tuple(c.shape), int(c.bytes), c.source) for c in reply.corpora]


# Inputs of one Compute request at most: the message limit, less room for names and headers.
# Larger inputs go through a temporary session.
COMPUTE_INPUT_BYTES = limits.MAX_MESSAGE_BYTES - 256 * 1024
# The server's advice when a Compute's outputs do not fit one reply (engine.compute and
# workspace.Transaction._settle): the client then does just that, in a temporary session.
_REPLY_TOO_BIG_ADVICE = "run it in a session"


def compute_inputs(
    op_type: str, inputs: Mapping[str, Any], outputs: Sequence[str], args: Mapping[str, Any]
) -> tuple[pb.OperatorDef, dict[str, np.ndarray]]:
    """The checked operator and its inputs as wire-ready arrays."""
    if not isinstance(inputs, Mapping):
        raise InvalidTypeError(f"compute inputs are a mapping {{name: array}}, got {type(inputs).__name__}")
    op = operator_def(op_type, list(inputs), outputs, args)
    return op, {name: tensors.as_numpy(value) for name, value in inputs.items()}


def fits_one_compute(arrays: Mapping[str, np.ndarray]) -> bool:
    return sum(a.nbytes for a in arrays.values()) <= COMPUTE_INPUT_BYTES


def compute_request(op: pb.OperatorDef, arrays: Mapping[str, np.ndarray], device: str) -> pb.ComputeRequest:
    request = build_request(pb.ComputeRequest, op=op, device=device)
    for name, array in arrays.items():
        tensors.to_wire(array, request.inputs.add(name=name).tensor)
    return request


def compute_outputs(reply: pb.ComputeResponse) -> dict[str, np.ndarray]:
    return {item.name: tensors.from_wire(item.tensor) for item in reply.outputs}


def reply_too_big(err: CosserveRpcError) -> bool:
    """Whether a Compute failed only because its outputs do not fit one reply message."""
    return err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and _REPLY_TOO_BIG_ADVICE in err.details()


class GradientCheck(dict[str, float]):
    """`Session.check_gradient`'s result: {"max_abs_error": ..., <input>: its max abs error, ...}
    as a dict, and the relative errors, max |analytic - numeric| / max(1, |numeric|), as
    `.max_rel_error` and `.rel_errors` ({input: max rel error})."""

    def __init__(self, abs_errors: Mapping[str, float], rel_errors: Mapping[str, float], max_abs_error: float) -> None:
        super().__init__(abs_errors)
        self["max_abs_error"] = max_abs_error
        self.rel_errors = dict(rel_errors)
        self.max_rel_error = max(rel_errors.values(), default=0.0)


def gradient_check(reply: pb.CheckGradientResponse) -> GradientCheck:
    return GradientCheck(
        {item.input: item.max_abs_error for item in reply.inputs},
        {item.input: item.max_rel_error for item in reply.inputs},
        reply.max_abs_error,
    )


class FetchAssembler:
    """One streamed fetch's blob, put together from its FetchBlobChunk messages (bytes)."""

    def __init__(self, name: str, first: bytes) -> None:
        self.name = name
        self.frame = _decoded(wire.decode_fetch_blob_chunk, first)
        self.nbytes = tensors.nbytes_of(self.frame.dtype, self.frame.shape)
        data = self.frame.data
        if self.nbytes == data.end - data.start:
            # The whole blob in one message. One copy (at most a message): a view of the received
            # bytes would be read-only, unlike every other array the client returns.
            self.whole: np.ndarray | None = tensors.array_at(self.frame.dtype, self.frame.shape, first, *data).copy()
            return
        self.whole = None
        self.buffer = np.empty(self.nbytes, np.uint8)
        self.filled = 0
        self._add(first, data)

    def add(self, message: bytes) -> None:
        self._add(message, _decoded(wire.decode_fetch_blob_chunk, message).data)

    def _add(self, message: bytes, data: wire.Span) -> None:
        size = data.end - data.start
        if self.filled + size > self.nbytes:
            raise ProtocolError(f"server sent more than the {self.nbytes} bytes of blob {self.name!r}")
        if size:
            self.buffer[self.filled : self.filled + size] = np.frombuffer(message, np.uint8, size, data.start)
        self.filled += size

    def result(self) -> np.ndarray:
        if self.whole is not None:
            return self.whole
        return tensors.decode(self.frame.dtype, self.frame.shape, self.buffer[: self.filled])


def _decoded(decode: Any, message: bytes) -> Any:
    try:
        return decode(message)
    except wire.WireError as err:
        raise ProtocolError(f"the server sent a message this client cannot decode: {err}") from None


def create_region(nbytes: int, name: str) -> shared_memory.SharedMemory:
    try:
        return shared_memory.SharedMemory(create=True, size=max(nbytes, 1), name=name)
    except OSError as err:
        raise SharedMemoryError(
            f"cannot create a {nbytes}-byte shared-memory region ({err.strerror or err}); pass shm=False"
        ) from None


# ---- top-k: one ScoreTopK stream, or CosineTopK in the session for a k too large for it ---

# Bytes of one ScoreTopK reply the server sends at most (server/app.py: Scorer(limits.INLINE_BYTES)).
TOP_K_REPLY_BYTES = limits.INLINE_BYTES
# Result bytes of one CosineTopK call when k is too large for a ScoreTopK reply of one row.
_TOP_K_OP_RESULT_BYTES = 64 * 1024 * 1024


def top_k_row_bytes(k: int, itemsize: int) -> int:
    """Reply bytes per query: k scores of the corpus dtype and k int64 indices."""
    return max(1, k) * (itemsize + 8)


def top_k_requests(session_id: str, corpus: str, k: int, batch: np.ndarray) -> Iterator[pb.TopKRequest]:
    """ScoreTopK requests of one batch, each small enough, and its reply within TOP_K_REPLY_BYTES."""
    reply_rows = max(1, TOP_K_REPLY_BYTES // top_k_row_bytes(k, batch.dtype.itemsize))
    rows = max(1, min(reply_rows, limits.INLINE_BYTES // max(1, batch[:1].nbytes)))
    for start in range(0, max(1, batch.shape[0]), rows):
        request = build_request(pb.TopKRequest, session_id=session_id, corpus=corpus, k=k)
        tensors.to_wire(batch[start : start + rows], request.queries)
        yield request


def top_k_op_pieces(batch: np.ndarray, k: int) -> Iterator[np.ndarray]:
    """Row slices of a batch scored by one CosineTopK call each (at most 64 MiB of results)."""
    rows = max(1, _TOP_K_OP_RESULT_BYTES // top_k_row_bytes(k, batch.dtype.itemsize))
    for start in range(0, max(1, batch.shape[0]), rows):
        yield batch[start : start + rows]


def top_k_scratch_names() -> tuple[str, str, str]:
    """Blob names for the queries, scores and indices of CosineTopK calls, unlike any caller's."""
    tag = secrets.token_hex(6)
    return f"_cosserve_topk_{tag}_queries", f"_cosserve_topk_{tag}_scores", f"_cosserve_topk_{tag}_indices"


class Client:
    """A connection to a cosserve server.

    Args:
        target: "host:port" of the server.
        timeout: default deadline in seconds of every call (streams get more per byte).
        credentials: channel credentials made by hand; None for the TLS options below, or plaintext.
        token: bearer token sent with every call, for servers started with an auth token.
        tls: TLS, trusting the system's root certificates (unless root_certificates is given).
        root_certificates: PEM bytes or a path: the CAs the server's certificate must chain to.
        client_cert, client_key: PEM bytes or paths: this client's certificate and key, for a
            server that requires them (mutual TLS). Any TLS option means TLS.
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
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self.stub = pb_grpc.CosserveStub(self._channel)
        # The RPCs that carry tensor data skip the protobuf runtime on that side (see cosserve.wire):
        # their requests are bytes framed by wire, or their responses bytes read in place by it.
        self._framed = {name: _framed_callable(self._channel, method) for name, method in wire.FRAMED_METHODS.items()}
        self._watchdog = _Watchdog()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._watchdog.close()
        self._channel.close()

    def _metadata_for(self, session: str | None) -> tuple[tuple[str, str], ...]:
        """The call's metadata: the token, and for a session's call its id, so that a load balancer
        hashing on `cosserve-session-id` sends every call of a session to the replica holding it."""
        return call_metadata(self._metadata, session)

    def _call(
        self,
        method: str,
        request: Any,
        *,
        timeout: float | None = None,
        framed: bool = False,
        session: str | None = None,
    ) -> Any:
        """Call a unary or request-streaming RPC; raise CosserveRpcError on failure.

        With `framed`, the call is the bytes variant of `_framed` (see `__init__`). `session` is
        the id of the session the call is for, sent as metadata too (see `_metadata_for`).
        """
        rpc = self._framed[method] if framed else getattr(self.stub, method)
        try:
            return rpc(request, timeout=timeout or self.timeout, metadata=self._metadata_for(session))
        except grpc.RpcError as err:
            raise rpc_error(err, method) from err

    def _stream(
        self, method: str, request: Any, *, timeout: float | None = None, session: str | None = None
    ) -> Iterator[Any]:
        """Call a response-streaming RPC and yield its messages; raise CosserveRpcError on failure."""
        rpc = getattr(self.stub, method)
        try:
            yield from rpc(request, timeout=timeout or self.timeout, metadata=self._metadata_for(session))
        except grpc.RpcError as err:
            raise rpc_error(err, method) from err

    def session(self, device: str = "auto") -> Session:
        """Open a server-side workspace on `device` ("auto", "cpu", "cuda", "cuda:N")."""
        # The client proposes the id (128 random bits) and sends it as metadata as well, so that a
        # balancer hashing on that header sends the creation where every later call will go.
        request = create_session_request(device)
        reply = self._call("CreateSession", request, session=request.session_id)
        return Session(self, reply.session_id, reply.device)

    def attach(self, session_id: str) -> Session:
        """The existing session `session_id` of this client's identity: one made by another client,
        another process, or before the server restarted (see --durability).

        Raises:
            CosserveRpcError: NOT_FOUND if this identity has no such session (never created,
                closed, expired, or another identity's); FAILED_PRECONDITION if the server could
                not restore it after a restart (the details say why).
        """
        # One cheap call that names the session: the server checks it exists and is ours.
        self._call("ListBlobs", build_request(pb.ListBlobsRequest, session_id=session_id), session=session_id)
        # The device is the server's to know; this reply does not say it.
        return Session(self, session_id, "unknown")

    def operators(self) -> list[OpInfo]:
        """Schemas of the server's operators, sorted by name."""
        return operator_infos(self._call("ListOperators", pb.ListOperatorsRequest()))

    def corpora(self) -> list[CorpusInfo]:
        """The server's shared corpora (`--corpus NAME=FILE`, `Session.publish_corpus`), sorted by name."""
        return corpus_infos(self._call("ListCorpora", pb.ListCorporaRequest()))

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

        Tensors of any size: inputs that fit one message travel in one `Compute` request and the
        outputs in its reply; larger inputs, or outputs too large for one reply, go through a
        temporary session (fed streamed, `RunOperator`, fetched streamed, closed).
        """
        op, arrays = compute_inputs(op_type, inputs, outputs, args)
        if fits_one_compute(arrays):
            try:
                return compute_outputs(self._call("Compute", compute_request(op, arrays, device)))
            except CosserveRpcError as err:
                if not reply_too_big(err):
                    raise
        with self.session(device) as ws:
            for name, array in arrays.items():
                ws.feed_blob(name, array)
            ws._call("RunOperator", pb.RunOperatorRequest(session_id=ws.id, op=op))
            return {name: ws.fetch_blob(name) for name in op.output}


class Session:
    """One server-side workspace of named tensors; close it, or use it as a context manager."""

    def __init__(self, client: Client, session_id: str, device: str) -> None:
        self.client = client
        self.id = session_id
        self.device = device
        self.closed = False

    def _call(self, method: str, request: Any, **kwargs: Any) -> Any:
        """Call one of this session's RPCs (see Client._call)."""
        return self.client._call(method, request, session=self.id, **kwargs)

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
            self._call("CloseSession", pb.CloseSessionRequest(session_id=self.id))

    # ---- blobs ---------------------------------------------------------------------------

    def feed_blob(
        self, name: str, value: Any, *, shm: bool = False, progress: Callable[[int], object] | None = None
    ) -> None:
        """Create or overwrite blob `name` with an array (numpy, torch or array-like).

        With `shm=True` the bytes go through a shared-memory region this call creates and
        removes; the server must be on this host and started with --allow-shm. `progress`, if
        given, is called with the number of bytes of each piece as it is handed to grpc.
        """
        _check_name(name)
        array = tensors.as_numpy(value)
        if shm:
            self._feed_shm(name, array)
            if progress is not None:
                progress(array.nbytes)
        elif array.nbytes <= limits.INLINE_BYTES:
            pieces = wire.feed_blob_request(
                self.id, name, tensors.wire_dtype(array.dtype), array.shape, tensors.byte_view(array)
            )
            self._call("FeedBlob", b"".join(pieces), framed=True)
            if progress is not None:
                progress(array.nbytes)
        else:
            self._call(
                "FeedBlobStream",
                feed_chunks(self.id, name, array, progress),
                timeout=self.client.timeout + array.nbytes * _SECONDS_PER_BYTE,
                framed=True,
            )

    def _feed_shm(self, name: str, array: np.ndarray) -> None:
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
            self._call("FeedBlobShm", request, timeout=self.client.timeout + array.nbytes * _SHM_SECONDS_PER_BYTE)
        finally:
            region.close()
            region.unlink()

    def _region_name(self) -> str:
        # The server only opens regions named for the calling session (see server/shm.py).
        return f"{limits.SHM_PREFIX}{self.id}_{secrets.token_hex(6)}"

    def fetch_blob(self, name: str, *, shm: bool = False) -> np.ndarray:
        """Return blob `name` as a numpy array of the server's dtype and shape.

        With `shm=True` the bytes come through a shared-memory region this call creates and
        removes; the server must be on this host and started with --allow-shm.
        """
        _check_name(name)
        if shm:
            return self._fetch_shm(name)
        request = pb.FetchBlobRequest(session_id=self.id, name=name)
        # One streamed call for a blob of any size: the first message has dtype, shape and the
        # first bytes (all of them for a small blob). No deadline could suit every size, so the
        # call is instead cancelled when no message arrives for the client's timeout.
        rpc = self.client._framed["FetchBlobStream"]
        call = rpc(request, metadata=self.client._metadata_for(self.id))
        with self.client._watchdog.watch(call, self.client.timeout) as progress:
            try:
                first = next(call, None)
                if first is None:
                    raise ProtocolError(f"FetchBlobStream of blob {name!r}: the server sent no message")
                blob = FetchAssembler(name, first)
                progress()
                if blob.whole is None:
                    for message in call:
                        progress()
                        blob.add(message)
                return blob.result()
            except ProtocolError:
                call.cancel()
                raise
            except grpc.RpcError as err:
                code, details = err.code(), err.details() or ""
                if progress.expired:
                    code, details = grpc.StatusCode.DEADLINE_EXCEEDED, progress.message(name)
                raise CosserveRpcError(code, details, "FetchBlobStream") from err

    def _fetch_shm(self, name: str) -> np.ndarray:
        request = pb.FetchBlobShmRequest(session_id=self.id, name=name)
        info = self._call("FetchBlobShm", request)  # no region named: dtype and shape only
        for attempt in range(3):
            nbytes = tensors.nbytes_of(info.dtype, info.shape)
            region = create_region(nbytes, self._region_name())
            try:
                into = pb.FetchBlobShmRequest(session_id=self.id, name=name, shm_name=region.name, offset=0)
                reply = self._call("FetchBlobShm", into, timeout=self.client.timeout + nbytes * _SHM_SECONDS_PER_BYTE)
                return _array_in(region, reply.dtype, tuple(reply.shape))
            except CosserveRpcError as err:
                # The blob may have grown between the two calls: size the region again.
                if err.code() != grpc.StatusCode.INVALID_ARGUMENT or attempt == 2:
                    raise
                now = self._call("FetchBlobShm", request)
                if tensors.nbytes_of(now.dtype, now.shape) <= nbytes:
                    raise
                info = now
            finally:
                region.close()
                region.unlink()
        raise AssertionError("unreachable")

    def has_blob(self, name: str) -> bool:
        _check_name(name)
        reply = self._call("HasBlob", pb.HasBlobRequest(session_id=self.id, name=name))
        return bool(reply.exists)

    def blobs(self) -> list[str]:
        """Names of the session's blobs, sorted."""
        return list(self._call("ListBlobs", pb.ListBlobsRequest(session_id=self.id)).names)

    def remove_blob(self, name: str) -> None:
        _check_name(name)
        self._call("RemoveBlob", pb.RemoveBlobRequest(session_id=self.id, name=name))

    def reset(self) -> None:
        """Drop every blob; the session stays open."""
        self._call("ResetWorkspace", pb.ResetWorkspaceRequest(session_id=self.id))

    def save(self, name: str, *, timeout: float | None = None) -> tuple[int, int]:
        """Write every blob of this session, bit-exact, to the server's state directory
        (`--state-dir`) as the snapshot `name` of this identity, replacing one of that name
        atomically. Returns (blobs, bytes): the blobs and tensor bytes written.

        `name`: 1 to 128 letters, digits, '.', '_' or '-', not starting with '.' and without '..'.
        Raises CosserveRpcError: INVALID_ARGUMENT for such a name, FAILED_PRECONDITION on a server
        without a state directory, RESOURCE_EXHAUSTED when its disk has no room. `timeout`: the
        deadline in seconds (default the client's); a large session takes about a second per GB."""
        request = build_request(pb.SaveWorkspaceRequest, session_id=self.id, name=name)
        reply = self._call("SaveWorkspace", request, timeout=timeout)
        return int(reply.blobs), int(reply.bytes)

    def load(self, name: str, *, timeout: float | None = None) -> tuple[int, int]:
        """Replace every blob of this session with those of the snapshot `name` (saved by this
        identity): all of them or, on any error, none (the session is left as it was). Returns
        (blobs, bytes): the blobs and tensor bytes loaded.

        Raises CosserveRpcError: NOT_FOUND for a snapshot this identity has not saved,
        RESOURCE_EXHAUSTED when the blobs would pass the session's limits (checked before
        anything is read), FAILED_PRECONDITION for a damaged snapshot (the message says what
        and which file) or a server without a state directory."""
        request = build_request(pb.LoadWorkspaceRequest, session_id=self.id, name=name)
        reply = self._call("LoadWorkspace", request, timeout=timeout)
        return int(reply.blobs), int(reply.bytes)

    def publish_corpus(self, blob: str, name: str) -> None:
        """Make this session's blob `blob` the shared corpus `@name`, read by every session (and
        identity) of the server, without a copy. The session keeps its blob (still charged to it
        while it holds it; remove it to give that back); the corpus stays until the server stops.

        Raises CosserveRpcError: FAILED_PRECONDITION for a name already in use (or a server that
        publishes nothing), RESOURCE_EXHAUSTED past the server's --max-published-bytes,
        INVALID_ARGUMENT for a bad name, NOT_FOUND for a blob the session does not hold."""
        self._call("PublishCorpus", build_request(pb.PublishCorpusRequest, session_id=self.id, blob=blob, name=name))

    # ---- operators -----------------------------------------------------------------------

    def run_operator(self, op_type: str, inputs: Sequence[str], outputs: Sequence[str], **args: Any) -> None:
        """Run one Caffe2 operator on the session's blobs; on failure nothing changes."""
        request = pb.RunOperatorRequest(session_id=self.id, op=operator_def(op_type, inputs, outputs, args))
        self._call("RunOperator", request)

    def run_net(self, ops: Iterable[OpSpec]) -> None:
        """Run operators in order, all or nothing.

        Each op is (type, inputs, outputs) or (type, inputs, outputs, {arg: value}).
        """
        request = pb.RunNetRequest(session_id=self.id, ops=[op_from_spec(s) for s in ops])
        self._call("RunNet", request)

    def run_caffe2_operator(self, operator_def: bytes) -> None:
        """Run one operator given as a serialized Caffe2 OperatorDef (Caffe2's own encoding, as a
        program holding Caffe2 protobufs has it); on failure nothing changes."""
        self._call("RunOperator", pb.RunOperatorRequest(session_id=self.id, caffe2_op=bytes(operator_def)))

    def run_caffe2_net(self, net_def: bytes) -> None:
        """Run a serialized Caffe2 NetDef, all or nothing."""
        self._call("RunNet", pb.RunNetRequest(session_id=self.id, caffe2_net=bytes(net_def)))

    def check_gradient(
        self,
        op_type: str,
        inputs: Sequence[str],
        outputs: Sequence[str] | None = None,
        *,
        step_size: float = 1e-6,
        output_index: int = 0,
        **args: Any,
    ) -> GradientCheck:
        """Compare `op_type`'s gradient operator with finite differences on this session's blobs.

        Returns {"max_abs_error": ..., <input name>: max abs error of that input, ...}, a dict
        whose `.max_rel_error` and `.rel_errors` ({input: error}) give the relative errors,
        |analytic - numeric| / max(1, |numeric|).
        """
        request = build_request(
            pb.CheckGradientRequest,
            session_id=self.id,
            op=operator_def(op_type, inputs, outputs or [], args),
            step_size=step_size,
            output_index=output_index,
        )
        return gradient_check(self._call("CheckGradient", request))

    # ---- scoring -------------------------------------------------------------------------

    def top_k(
        self,
        queries: Any,
        corpus: str = "C",
        k: int = 10,
        *,
        batch_size: int = 256,
        timeout: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact cosine top-k of each query row among the rows of blob `corpus` (or of the
        server's shared corpus `"@NAME"`, see `Client.corpora`).

        `queries` is an (N, D) array (numpy, torch or memory-mapped), sent in batches of
        `batch_size` rows, or an iterable of (n, D) batches whose results are concatenated. All
        batches go over one ScoreTopK stream, several in flight. Queries must have the corpus
        dtype. Returns (scores (N, k) in the corpus dtype, int64 indices (N, k)), best first,
        ties broken by the lower index; an iterable with no batches asks nothing of the server
        and gives (0, k) float32 scores. `timeout` bounds the whole call; by default it is the
        client's timeout per batch (a day for an iterator of unknown length).
        """
        scores, indices = [], []
        for batch_scores, batch_indices in self.iter_top_k(queries, corpus, k, batch_size=batch_size, timeout=timeout):
            scores.append(batch_scores)
            indices.append(batch_indices)
        if not scores:
            return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
        return np.concatenate(scores), np.concatenate(indices)

    def iter_top_k(
        self,
        queries: Any,
        corpus: str = "C",
        k: int = 10,
        *,
        batch_size: int = 256,
        timeout: float | None = None,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Like `top_k`, but yields (scores, indices) of each message's queries as they arrive, in order."""
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
            yield from self._top_k_by_operator(batches, corpus, k, timeout)
            return
        failure: list[BaseException] = []

        def requests() -> Iterator[pb.TopKRequest]:
            try:
                for batch in batches:
                    yield from top_k_requests(self.id, corpus, k, batch)
            except Exception as err:  # grpc would only report CANCELLED; keep the real cause
                failure.append(err)
                raise

        try:
            for reply in self.client._stream("ScoreTopK", requests(), timeout=timeout, session=self.id):
                yield tensors.from_wire(reply.scores), tensors.from_wire(reply.indices)
        except CosserveRpcError:
            if failure:
                raise failure[0] from None
            raise

    def _top_k_by_operator(
        self, batches: Iterator[np.ndarray], corpus: str, k: int, timeout: float
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """CosineTopK on the session's blobs, its outputs fetched streamed: for any k <= M, with the
        same numbers as ScoreTopK (one scoring function). The scratch blobs go at the end."""
        queries, scores, indices = top_k_scratch_names()
        try:
            for batch in batches:
                for piece in top_k_op_pieces(batch, k):
                    self.feed_blob(queries, piece)
                    op = operator_def("CosineTopK", [queries, corpus], [scores, indices], {"k": k})
                    self._call("RunOperator", pb.RunOperatorRequest(session_id=self.id, op=op), timeout=timeout)
                    yield self.fetch_blob(scores), self.fetch_blob(indices)
        finally:
            for name in (queries, scores, indices):
                with contextlib.suppress(CosserveRpcError):
                    self.remove_blob(name)


def _query_batches(queries: Any, batch_size: int) -> tuple[Iterator[np.ndarray], int | None]:
    """Query batches as 2-D arrays, and how many there are (None when unknown)."""
    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be at least 1, got {batch_size}")
    if isinstance(queries, np.ndarray) or hasattr(queries, "__array__") or type(queries).__module__.startswith("torch"):
        array = _two_d(tensors.as_numpy(queries))
        starts = range(0, max(1, array.shape[0]), batch_size)  # an empty array still goes once, to be checked
        return (array[s : s + batch_size] for s in starts), len(starts)
    count = len(queries) if isinstance(queries, Sized) else None
    return (_two_d(tensors.as_numpy(batch)) for batch in queries), count


def feed_chunks(
    session_id: str, name: str, array: np.ndarray, progress: Callable[[int], object] | None = None
) -> Iterator[bytes]:
    """FeedBlobStream's messages: the header, then messages of data alone, each copied once from
    the array into the bytes grpc sends."""
    yield wire.feed_blob_chunk_header(session_id, name, tensors.wire_dtype(array.dtype), array.shape)
    for piece in tensors.chunks(array, limits.CHUNK_BYTES):
        yield b"".join(wire.feed_blob_chunk_data(piece))
        if progress is not None:
            progress(len(piece))


def _two_d(array: np.ndarray) -> np.ndarray:
    if array.ndim != 2:
        raise ShapeError(f"queries must be 2-D (N, D), got shape {array.shape}")
    return array


def _array_in(region: shared_memory.SharedMemory, dtype: int, shape: tuple[int, ...]) -> np.ndarray:
    """The array the server wrote at the start of `region`, valid after the region is removed."""
    size = tensors.nbytes_of(dtype, shape)
    fd = getattr(region, "_fd", -1)  # POSIX: a second mapping outlives the region's name and object
    if size and fd >= 0:
        # The server's one copy is the array's memory: no copy here, and no fresh pages to fill.
        return tensors.decode(dtype, shape, memoryview(mmap.mmap(fd, size)))
    buffer = np.empty(size, np.uint8)
    assert region.buf is not None
    buffer.data[:] = region.buf[:size]
    return tensors.decode(dtype, shape, buffer)


def _framed_callable(channel: grpc.Channel, method: wire.FramedMethod) -> Any:
    """The multicallable of a framed method: bytes on its framed side, protobuf on the other."""
    described = pb.DESCRIPTOR.services_by_name["Cosserve"].methods_by_name[method.name]
    request_type = getattr(pb, described.input_type.name)
    response_type = getattr(pb, described.output_type.name)
    make = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[(method.request_streaming, method.response_streaming)]
    return make(
        wire.method_path(method.name),
        request_serializer=None if method.request_bytes else request_type.SerializeToString,
        response_deserializer=None if method.response_bytes else response_type.FromString,
    )


class _Progress:
    """One watched call: calling it records progress; `expired` once the watchdog cancelled it."""

    def __init__(self, call: Any, idle_s: float) -> None:
        self.call = call
        self.idle_s = idle_s
        self.last = time.monotonic()
        self.expired = False

    def __call__(self) -> None:
        self.last = time.monotonic()

    def message(self, name: str) -> str:
        return f"no data of blob {name!r} arrived for {self.idle_s:g} s (the client's timeout); the call was cancelled"


class _Watchdog:
    """Cancels streamed calls that receive nothing for their idle time: one thread per client,
    started on first use, that looks at the watched calls a few times a second."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: set[_Progress] = set()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    class _Watch:
        def __init__(self, owner: _Watchdog, progress: _Progress) -> None:
            self.owner, self.progress = owner, progress

        def __enter__(self) -> _Progress:
            return self.progress

        def __exit__(self, *exc: object) -> None:
            with self.owner._lock:
                self.owner._watched.discard(self.progress)

    def watch(self, call: Any, idle_s: float) -> _Watchdog._Watch:
        progress = _Progress(call, idle_s)
        with self._lock:
            self._watched.add(progress)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="cosserve-watchdog", daemon=True)
                self._thread.start()
        return self._Watch(self, progress)

    def _run(self) -> None:
        while not self._closed.wait(0.2):
            now = time.monotonic()
            with self._lock:
                stale = [p for p in self._watched if now - p.last > p.idle_s]
            for progress in stale:
                progress.expired = True
                progress.call.cancel()

    def close(self) -> None:
        self._closed.set()
