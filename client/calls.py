"""What the client sends and what it makes of the replies: each operation as a flow (cosserve.flows)
with no network I/O, that the sync and the asyncio client perform alike."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import mmap
import secrets
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
from cosserve.flows import END, READ, Call, Emit, Flow
from cosserve.v1 import cosserve_pb2 as pb

__all__ = [
    "COMPUTE_INPUT_BYTES",
    "TOP_K_REPLY_BYTES",
    "ArgInfo",
    "CorpusInfo",
    "FetchAssembler",
    "GradientCheck",
    "InputInfo",
    "OpInfo",
    "OpSpec",
    "RangeResult",
    "attach",
    "blobs",
    "bound_inputs",
    "call_metadata",
    "check_gradient",
    "close_session",
    "compute",
    "corpora",
    "corpus_ids",
    "create_session",
    "feed_blob",
    "fetch_blob",
    "has_blob",
    "iter_range_search",
    "iter_top_k",
    "joined_range",
    "joined_top_k",
    "load",
    "op_from_spec",
    "operator_def",
    "operators",
    "publish_corpus",
    "query_batches",
    "range_result",
    "remove_blob",
    "reset",
    "run_caffe2_net",
    "run_caffe2_operator",
    "run_net",
    "run_operator",
    "save",
    "schema_inputs",
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


# ---- what the server reports ------------------------------------------------------------


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
    id_type: str = ""  # "int64" or "string" when its rows have ids (top_k(ids=True), range_search), else ""


class GradientCheck(dict[str, float]):
    """`Session.check_gradient`'s result: {"max_abs_error": ..., <input>: its max abs error, ...}
    as a dict, and the relative errors, max |analytic - numeric| / max(1, |numeric|), as
    `.max_rel_error` and `.rel_errors` ({input: max rel error})."""

    def __init__(self, abs_errors: Mapping[str, float], rel_errors: Mapping[str, float], max_abs_error: float) -> None:
        super().__init__(abs_errors)
        self["max_abs_error"] = max_abs_error
        self.rel_errors = dict(rel_errors)
        self.max_rel_error = max(rel_errors.values(), default=0.0)


# ---- request building ----------------------------------------------------------------------


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


def _check_k(k: Any) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise InvalidTypeError(f"k is an int, 1 <= k <= M, got {k!r}")


def _check_name(name: Any) -> None:
    if not isinstance(name, str):
        raise InvalidTypeError(f"a blob name is a str, got {name!r}")


# ---- the client's own calls ----------------------------------------------------------------


def create_session(device: str) -> Flow[tuple[str, str]]:
    """A new session on `device`: (its id, its device). The client proposes the id (128 random
    bits) and sends it as metadata as well, so that a balancer hashing on that header sends the
    creation where every later call will go."""
    request = build_request(pb.CreateSessionRequest, device=device, session_id=secrets.token_hex(16))
    reply = yield Call("CreateSession", request, session=request.session_id)
    return reply.session_id, reply.device


def attach(session_id: str) -> Flow[None]:
    """Check that this identity holds the session `session_id`."""
    # One cheap call that names the session: the server checks it exists and is ours.
    yield Call("ListBlobs", build_request(pb.ListBlobsRequest, session_id=session_id), session=session_id)


def close_session(session_id: str) -> Flow[None]:
    yield Call("CloseSession", pb.CloseSessionRequest(session_id=session_id), session=session_id)


def operators() -> Flow[list[OpInfo]]:
    reply = yield Call("ListOperators", pb.ListOperatorsRequest())
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


def corpora() -> Flow[list[CorpusInfo]]:
    reply = yield Call("ListCorpora", pb.ListCorporaRequest())
    return [
        CorpusInfo(c.name, pb.DType.Name(c.dtype).lower(), tuple(c.shape), int(c.bytes), c.source, c.id_type) for c in reply.corpora
    ]


# Inputs of one Compute request at most: the message limit, less room for names and headers.
# Larger inputs go through a temporary session.
COMPUTE_INPUT_BYTES = limits.MAX_MESSAGE_BYTES - 256 * 1024
# The server's advice when a Compute's outputs do not fit one reply (engine.compute and
# workspace.Transaction._settle): the client then does just that, in a temporary session.
_REPLY_TOO_BIG_ADVICE = "run it in a session"


def compute(
    op_type: str,
    inputs: Mapping[str, Any],
    outputs: Sequence[str],
    args: Mapping[str, Any],
    *,
    device: str,
    client_timeout: float,
    schemas: dict[str, tuple[str, ...]] | None = None,
) -> Flow[dict[str, np.ndarray]]:
    """One operator on `inputs` ({input name: array}, bound by the schema's input names, whatever
    the mapping's order) without a session: one Compute call when the inputs fit one message and the
    outputs one reply, else a temporary session (fed streamed, RunOperator, fetched streamed,
    closed). `schemas`: the client's cache of each op's input names (see `schema_inputs`)."""
    if not isinstance(inputs, Mapping):
        raise InvalidTypeError(f"compute inputs are a mapping {{name: array}}, got {type(inputs).__name__}")
    for name in inputs:
        _check_name(name)
    names = yield from schema_inputs(op_type, {} if schemas is None else schemas)
    op = operator_def(op_type, bound_inputs(op_type, list(inputs), names), outputs, args)
    arrays = {name: tensors.as_numpy(value) for name, value in inputs.items()}
    if sum(a.nbytes for a in arrays.values()) <= COMPUTE_INPUT_BYTES:
        request = build_request(pb.ComputeRequest, op=op, device=device)
        for name, array in arrays.items():
            tensors.to_wire(array, request.inputs.add(name=name).tensor)
        try:
            reply = yield Call("Compute", request)
            return {item.name: tensors.from_wire(item.tensor) for item in reply.outputs}
        except CosserveRpcError as err:
            # Only outputs too large for one reply message are worth a second try.
            if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or _REPLY_TOO_BIG_ADVICE not in err.details():
                raise
    session_id, _ = yield from create_session(device)
    try:
        for name, array in arrays.items():
            yield from feed_blob(session_id, name, array, client_timeout=client_timeout)
        yield Call("RunOperator", pb.RunOperatorRequest(session_id=session_id, op=op), session=session_id)
        results = {}
        for name in op.output:
            results[name] = yield from fetch_blob(session_id, name, client_timeout=client_timeout)
        return results
    finally:
        yield from close_session(session_id)


def schema_inputs(op_type: str, schemas: dict[str, tuple[str, ...]]) -> Flow[tuple[str, ...] | None]:
    """The input names of `op_type`'s schema, in order; None for an op the server does not have
    (its refusal names the closest ones). `schemas` is the client's cache: filled by one
    ListOperators on first use, since a server's operators do not change while it runs."""
    if not schemas:
        for info in (yield from operators()):
            schemas[info.name] = tuple(i.name for i in info.inputs)
    return schemas.get(op_type)


def bound_inputs(op_type: str, given: Sequence[str], names: Sequence[str] | None) -> list[str]:
    """The names of inputs given by name, in the order of the schema's `names` (None: as given);
    InvalidArgumentError, listing the schema's names, for a name it does not have or one missing."""
    if names is None:
        return list(given)
    unknown = [n for n in given if n not in names]
    missing = [n for n in names if n not in given]
    problems = [f"{', '.join(map(repr, unknown))} {'is' if len(unknown) == 1 else 'are'} not one of them"] if unknown else []
    problems += [f"missing {', '.join(map(repr, missing))}"] if missing else []
    if problems:
        raise InvalidArgumentError(f"{op_type} takes the inputs {', '.join(names)}, given by these names: {'; '.join(problems)}")
    return sorted(given, key=list(names).index)


# ---- blobs ---------------------------------------------------------------------------------


def feed_blob(
    session_id: str,
    name: str,
    value: Any,
    *,
    client_timeout: float,
    shm: bool = False,
    progress: Callable[[int], object] | None = None,
) -> Flow[None]:
    """Blob `name` of the session set to `value`: one FeedBlob message up to INLINE_BYTES, a
    FeedBlobStream of chunks past it (a deadline that grows with the bytes), or a shared-memory
    region. `progress` gets the bytes of each piece as it is handed to grpc."""
    _check_name(name)
    array = tensors.as_numpy(value)
    if shm:
        yield from _feed_shm(session_id, name, array, client_timeout)
    elif array.nbytes <= limits.INLINE_BYTES:
        pieces = wire.feed_blob_request(session_id, name, tensors.wire_dtype(array.dtype), array.shape, tensors.byte_view(array))
        yield Call("FeedBlob", b"".join(pieces), session=session_id, framed=True)
    else:
        timeout = client_timeout + array.nbytes * _SECONDS_PER_BYTE
        yield Call("FeedBlobStream", feed_chunks(session_id, name, array, progress), session=session_id, timeout=timeout, framed=True)
        return
    if progress is not None:
        progress(array.nbytes)


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


def _feed_shm(session_id: str, name: str, array: np.ndarray, client_timeout: float) -> Flow[None]:
    region = create_region(array.nbytes, _region_name(session_id))
    try:
        assert region.buf is not None
        region.buf[: array.nbytes] = tensors.byte_view(array)
        request = pb.FeedBlobShmRequest(
            session_id=session_id,
            name=name,
            dtype=tensors.wire_dtype(array.dtype),
            shape=array.shape,
            shm_name=region.name,
            offset=0,
        )
        timeout = client_timeout + array.nbytes * _SHM_SECONDS_PER_BYTE
        yield Call("FeedBlobShm", request, session=session_id, timeout=timeout)
    finally:
        region.close()
        region.unlink()


def fetch_blob(session_id: str, name: str, *, client_timeout: float, shm: bool = False) -> Flow[np.ndarray]:
    """Blob `name` of the session: one FetchBlobStream call for a blob of any size, or a
    shared-memory region."""
    _check_name(name)
    if shm:
        return (yield from _fetch_shm(session_id, name, client_timeout))
    # The first message has dtype, shape and the first bytes (all of them for a small blob). No
    # deadline could suit every size: the call is cancelled when no message arrives for the
    # client's timeout instead.
    request = pb.FetchBlobRequest(session_id=session_id, name=name)
    yield Call("FetchBlobStream", request, session=session_id, framed=True, stream=True, idle=client_timeout, about=f"blob {name!r}")
    first = yield READ
    if first is END:
        raise ProtocolError(f"FetchBlobStream of blob {name!r}: the server sent no message")
    blob = FetchAssembler(name, first)
    while blob.whole is None and (message := (yield READ)) is not END:
        blob.add(message)
    return blob.result()


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


def _fetch_shm(session_id: str, name: str, client_timeout: float) -> Flow[np.ndarray]:
    request = pb.FetchBlobShmRequest(session_id=session_id, name=name)
    info = yield Call("FetchBlobShm", request, session=session_id)  # no region named: dtype and shape only
    for attempt in range(3):
        nbytes = tensors.nbytes_of(info.dtype, info.shape)
        region = create_region(nbytes, _region_name(session_id))
        try:
            into = pb.FetchBlobShmRequest(session_id=session_id, name=name, shm_name=region.name, offset=0)
            timeout = client_timeout + nbytes * _SHM_SECONDS_PER_BYTE
            reply = yield Call("FetchBlobShm", into, session=session_id, timeout=timeout)
            return _array_in(region, reply.dtype, tuple(reply.shape))
        except CosserveRpcError as err:
            # The blob may have grown between the two calls: size the region again.
            if err.code() != grpc.StatusCode.INVALID_ARGUMENT or attempt == 2:
                raise
            now = yield Call("FetchBlobShm", request, session=session_id)
            if tensors.nbytes_of(now.dtype, now.shape) <= nbytes:
                raise
            info = now
        finally:
            region.close()
            region.unlink()
    raise AssertionError("unreachable")


def create_region(nbytes: int, name: str) -> shared_memory.SharedMemory:
    try:
        return shared_memory.SharedMemory(create=True, size=max(nbytes, 1), name=name)
    except OSError as err:
        raise SharedMemoryError(
            f"cannot create a shared-memory region of {limits.readable_bytes(nbytes)} ({err.strerror or err}); pass shm=False"
        ) from None


def _region_name(session_id: str) -> str:
    # The server only opens regions named for the calling session (server/protocols/shm.py).
    return f"{limits.SHM_PREFIX}{session_id}_{secrets.token_hex(6)}"


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


def has_blob(session_id: str, name: str) -> Flow[bool]:
    _check_name(name)
    reply = yield Call("HasBlob", pb.HasBlobRequest(session_id=session_id, name=name), session=session_id)
    return bool(reply.exists)


def blobs(session_id: str) -> Flow[list[str]]:
    reply = yield Call("ListBlobs", pb.ListBlobsRequest(session_id=session_id), session=session_id)
    return list(reply.names)


def remove_blob(session_id: str, name: str) -> Flow[None]:
    _check_name(name)
    yield Call("RemoveBlob", pb.RemoveBlobRequest(session_id=session_id, name=name), session=session_id)


def reset(session_id: str) -> Flow[None]:
    yield Call("ResetWorkspace", pb.ResetWorkspaceRequest(session_id=session_id), session=session_id)


def save(session_id: str, name: str, timeout: float | None) -> Flow[tuple[int, int]]:
    """SaveWorkspace: (blobs, bytes) written."""
    request = build_request(pb.SaveWorkspaceRequest, session_id=session_id, name=name)
    reply = yield Call("SaveWorkspace", request, session=session_id, timeout=timeout)
    return int(reply.blobs), int(reply.bytes)


def load(session_id: str, name: str, timeout: float | None) -> Flow[tuple[int, int]]:
    """LoadWorkspace: (blobs, bytes) loaded."""
    request = build_request(pb.LoadWorkspaceRequest, session_id=session_id, name=name)
    reply = yield Call("LoadWorkspace", request, session=session_id, timeout=timeout)
    return int(reply.blobs), int(reply.bytes)


def publish_corpus(session_id: str, blob: str, name: str) -> Flow[None]:
    request = build_request(pb.PublishCorpusRequest, session_id=session_id, blob=blob, name=name)
    yield Call("PublishCorpus", request, session=session_id)


# ---- operators -----------------------------------------------------------------------------


def run_operator(session_id: str, op_type: str, inputs: Sequence[str], outputs: Sequence[str], args: Mapping[str, Any]) -> Flow[None]:
    request = pb.RunOperatorRequest(session_id=session_id, op=operator_def(op_type, inputs, outputs, args))
    yield Call("RunOperator", request, session=session_id)


def run_net(session_id: str, ops: Iterable[OpSpec]) -> Flow[None]:
    request = pb.RunNetRequest(session_id=session_id, ops=[op_from_spec(s) for s in ops])
    yield Call("RunNet", request, session=session_id)


def run_caffe2_operator(session_id: str, operator: bytes) -> Flow[None]:
    yield Call("RunOperator", pb.RunOperatorRequest(session_id=session_id, caffe2_op=bytes(operator)), session=session_id)


def run_caffe2_net(session_id: str, net: bytes) -> Flow[None]:
    yield Call("RunNet", pb.RunNetRequest(session_id=session_id, caffe2_net=bytes(net)), session=session_id)


def check_gradient(
    session_id: str,
    op_type: str,
    inputs: Sequence[str],
    outputs: Sequence[str] | None,
    args: Mapping[str, Any],
    *,
    step_size: float,
    output_index: int,
) -> Flow[GradientCheck]:
    request = build_request(
        pb.CheckGradientRequest,
        session_id=session_id,
        op=operator_def(op_type, inputs, outputs or [], args),
        step_size=step_size,
        output_index=output_index,
    )
    reply = yield Call("CheckGradient", request, session=session_id)
    return GradientCheck(
        {item.input: item.max_abs_error for item in reply.inputs},
        {item.input: item.max_rel_error for item in reply.inputs},
        reply.max_abs_error,
    )


# ---- top-k: one ScoreTopK stream, or CosineTopK in the session for a k too large for it ---

# Bytes of one ScoreTopK reply the server sends at most (server/edge/app.py: Scorer(limits.INLINE_BYTES)).
TOP_K_REPLY_BYTES = limits.INLINE_BYTES
# Result bytes of one CosineTopK call when k is too large for a ScoreTopK reply of one row.
_TOP_K_OP_RESULT_BYTES = 64 * 1024 * 1024


def iter_top_k(
    session_id: str,
    queries: Any,
    corpus: str,
    k: int,
    *,
    batch_size: int,
    timeout: float | None,
    client_timeout: float,
    ids: bool = False,
) -> Flow[None]:
    """Emits (scores, indices) of each reply's queries as they arrive, in order: every batch over
    one ScoreTopK stream, or CosineTopK in the session when one query's reply alone would pass a
    ScoreTopK message. `timeout` bounds the whole call; None: the client's timeout per batch (a day
    for an iterator of unknown length). With `ids`, (scores, indices, the rows' corpus ids)."""
    _check_name(corpus)
    _check_k(k)
    # With ids, a reply carries up to MAX_ID_BYTES (and an offset) more per row found.
    id_bytes = limits.MAX_ID_BYTES + 8 if ids else 0
    batches, count = query_batches(queries, batch_size)
    first = next(batches, None)
    if first is None:
        return
    batches = itertools.chain([first], batches)
    if timeout is None:
        timeout = client_timeout * (1 + count) if count is not None else _UNSIZED_STREAM_TIMEOUT
    if _top_k_row_bytes(k, first.dtype.itemsize) > TOP_K_REPLY_BYTES:
        if ids:
            raise InvalidArgumentError(f"top-k with ids answers k <= {TOP_K_REPLY_BYTES // (first.dtype.itemsize + 8)}, got {k}")
        yield from _top_k_by_operator(session_id, batches, corpus, k, timeout, client_timeout)
        return
    failure: list[BaseException] = []

    def requests() -> Iterator[pb.TopKRequest]:
        try:
            for batch in batches:
                yield from _top_k_requests(session_id, corpus, k, batch, id_bytes)
        except Exception as err:  # grpc would only report CANCELLED; keep the real cause
            failure.append(err)
            raise

    try:
        yield Call("ScoreTopK", requests(), session=session_id, timeout=timeout, stream=True)
        while (reply := (yield READ)) is not END:
            scores, indices = tensors.from_wire(reply.scores), tensors.from_wire(reply.indices)
            if ids:
                yield Emit((scores, indices, corpus_ids(reply.ids, indices.size).reshape(indices.shape)))
            else:
                yield Emit((scores, indices))
    except CosserveRpcError:
        if failure:
            raise failure[0] from None
        raise


def _top_k_by_operator(
    session_id: str, batches: Iterator[np.ndarray], corpus: str, k: int, timeout: float, client_timeout: float
) -> Flow[None]:
    """CosineTopK on the session's blobs, its outputs fetched streamed: for any k <= M, with the
    same numbers as ScoreTopK (one scoring function). The scratch blobs go at the end."""
    tag = secrets.token_hex(6)  # names unlike any caller's
    queries, scores, indices = (f"_cosserve_topk_{tag}_{part}" for part in ("queries", "scores", "indices"))
    try:
        for batch in batches:
            # Row slices scored by one call each, at most _TOP_K_OP_RESULT_BYTES of results.
            rows = max(1, _TOP_K_OP_RESULT_BYTES // _top_k_row_bytes(k, batch.dtype.itemsize))
            for start in range(0, max(1, batch.shape[0]), rows):
                yield from feed_blob(session_id, queries, batch[start : start + rows], client_timeout=client_timeout)
                op = operator_def("CosineTopK", [queries, corpus], [scores, indices], {"k": k})
                yield Call("RunOperator", pb.RunOperatorRequest(session_id=session_id, op=op), session=session_id, timeout=timeout)
                found_scores = yield from fetch_blob(session_id, scores, client_timeout=client_timeout)
                found_indices = yield from fetch_blob(session_id, indices, client_timeout=client_timeout)
                yield Emit((found_scores, found_indices))
    finally:
        for name in (queries, scores, indices):
            with contextlib.suppress(CosserveRpcError):
                yield from remove_blob(session_id, name)


def _top_k_row_bytes(k: int, itemsize: int) -> int:
    """Reply bytes per query: k scores of the corpus dtype and k int64 indices."""
    return max(1, k) * (itemsize + 8)


def _top_k_requests(session_id: str, corpus: str, k: int, batch: np.ndarray, id_bytes: int = 0) -> Iterator[pb.TopKRequest]:
    """ScoreTopK requests of one batch, each small enough, and its reply within TOP_K_REPLY_BYTES
    (its ids, `id_bytes` at most per row found, within the rest of a message)."""
    reply_rows = max(1, TOP_K_REPLY_BYTES // _top_k_row_bytes(k, batch.dtype.itemsize))
    if id_bytes:
        reply_rows = min(reply_rows, max(1, (limits.MAX_MESSAGE_BYTES - 2 * TOP_K_REPLY_BYTES) // (k * id_bytes)))
    rows = max(1, min(reply_rows, limits.INLINE_BYTES // max(1, batch[:1].nbytes)))
    for start in range(0, max(1, batch.shape[0]), rows):
        request = build_request(pb.TopKRequest, session_id=session_id, corpus=corpus, k=k, with_ids=bool(id_bytes))
        tensors.to_wire(batch[start : start + rows], request.queries)
        yield request


def query_batches(queries: Any, batch_size: int) -> tuple[Iterator[np.ndarray], int | None]:
    """Query batches as 2-D arrays, and how many there are (None when unknown)."""
    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be at least 1, got {batch_size}")
    if _one_array(queries):
        array = _two_d(tensors.as_numpy(queries))
        starts = range(0, max(1, array.shape[0]), batch_size)  # an empty array still goes once, to be checked
        return (array[s : s + batch_size] for s in starts), len(starts)
    count = len(queries) if isinstance(queries, Sized) else None
    return (_two_d(tensors.as_numpy(batch)) for batch in queries), count


def _one_array(queries: Any) -> bool:
    """Whether `queries` is one array of queries rather than an iterable of batches: an array, a
    tensor, anything with `__array__`, or a (nested) list or tuple of numbers, as `feed_blob` takes
    it. A list or tuple whose first item is itself 2-D (an array, a list of rows) is a list of
    batches; so is any other iterable (a generator, an iterator)."""
    if isinstance(queries, np.ndarray) or hasattr(queries, "__array__") or type(queries).__module__.startswith("torch"):
        return True
    if isinstance(queries, (list, tuple)):
        if not queries:
            return False  # no batches
        try:
            return bool(np.ndim(queries[0]) < 2)  # a row (or a number): the list is the rows
        except ValueError:  # a ragged first item: as_numpy says what is wrong with it
            return True
    return False


def _two_d(array: np.ndarray) -> np.ndarray:
    if array.ndim != 2:
        raise ShapeError(f"queries must be 2-D (N, D), got shape {array.shape}")
    return array


def joined_top_k(results: Sequence[tuple[np.ndarray, ...]], k: int, ids: bool = False) -> tuple[np.ndarray, ...]:
    """`top_k`'s answer from `iter_top_k`'s pieces; (0, k) float32 scores when there are none.
    With `ids`, (scores, indices, ids)."""
    if not results:
        empty = (np.empty((0, k), np.float32), np.empty((0, k), np.int64))
        return (*empty, np.empty((0, k), np.int64)) if ids else empty
    return tuple(np.concatenate(parts) for parts in zip(*results))


# ---- range search: every corpus row with cosine >= min_score, over one ScoreRange stream -----


@dataclasses.dataclass(frozen=True)
class RangeResult:
    """For each query, the corpus rows with cosine >= min_score, in CSR form (as faiss's
    RangeSearchResult): query i's rows are `indices[lims[i]:lims[i + 1]]`, their scores at the
    same places, best first, equal scores by the lower index."""

    lims: np.ndarray  # int64 (N + 1,), lims[0] = 0
    indices: np.ndarray  # int64 (R,) corpus rows
    scores: np.ndarray  # (R,) cosine similarities, the corpus dtype
    truncated: np.ndarray  # bool (N,): the query had more than max_per_query rows, cut to the best
    ids: np.ndarray | None = None  # (R,) the rows' corpus ids (int64, or str objects), when asked for

    def __len__(self) -> int:
        """The number of queries."""
        return int(self.truncated.shape[0])


def _check_range_args(min_score: Any, max_per_query: Any) -> tuple[float, int]:
    """(min_score, max_per_query) as the wire has them (0: no cap), after checking them."""
    if min_score is None:
        raise InvalidTypeError("range search needs min_score, the least cosine of the rows to return")
    if isinstance(min_score, bool) or not isinstance(min_score, (int, float, np.integer, np.floating)):
        raise InvalidTypeError(f"min_score is a number (cosines lie in [-1, 1]), got {min_score!r}")
    if np.isnan(min_score):
        raise InvalidArgumentError("min_score is NaN; give a number (cosines lie in [-1, 1])")
    if max_per_query is None:
        return float(min_score), 0
    if isinstance(max_per_query, bool) or not isinstance(max_per_query, (int, np.integer)):
        raise InvalidTypeError(f"max_per_query is None (no cap) or an int >= 1, got {max_per_query!r}")
    if max_per_query < 1:
        raise InvalidArgumentError(f"max_per_query is None (no cap) or an int >= 1, got {max_per_query}")
    return float(min_score), int(max_per_query)


def iter_range_search(
    session_id: str,
    queries: Any,
    corpus: str,
    min_score: float | None,
    *,
    max_per_query: int | None,
    ids: bool | None,
    batch_size: int,
    timeout: float | None,
    client_timeout: float,
) -> Flow[None]:
    """Emits a RangeResult of each reply's queries as they arrive, in order, every batch over one
    ScoreRange stream. `ids`: True asks for the rows' corpus ids, None asks for them when the corpus
    is a shared one that has ids (one ListCorpora call first). `timeout` as for iter_top_k."""
    _check_name(corpus)
    score, cap = _check_range_args(min_score, max_per_query)
    batches, count = query_batches(queries, batch_size)
    first = next(batches, None)
    if first is None:
        return
    batches = itertools.chain([first], batches)
    if ids is None:
        ids = False
        if corpus.startswith("@"):
            listed = yield from corpora()
            ids = any(c.name == corpus[1:] and c.id_type for c in listed)
    if timeout is None:
        timeout = client_timeout * (1 + count) if count is not None else _UNSIZED_STREAM_TIMEOUT
    failure: list[BaseException] = []

    def requests() -> Iterator[pb.RangeRequest]:
        try:
            for batch in batches:
                rows = max(1, limits.INLINE_BYTES // max(1, batch[:1].nbytes))
                for start in range(0, max(1, batch.shape[0]), rows):
                    request = build_request(
                        pb.RangeRequest, session_id=session_id, corpus=corpus, min_score=score, max_per_query=cap,
                        with_ids=bool(ids),
                    )  # fmt: skip
                    tensors.to_wire(batch[start : start + rows], request.queries)
                    yield request
        except Exception as err:  # grpc would only report CANCELLED; keep the real cause
            failure.append(err)
            raise

    try:
        yield Call("ScoreRange", requests(), session=session_id, timeout=timeout, stream=True)
        while (reply := (yield READ)) is not END:
            yield Emit(range_result(reply))
    except CosserveRpcError:
        if failure:
            raise failure[0] from None
        raise


def range_result(reply: pb.RangeResponse) -> RangeResult:
    """A ScoreRange reply as a RangeResult; ProtocolError if its parts do not agree."""
    lims, indices, scores, truncated = (tensors.from_wire(t) for t in (reply.lims, reply.indices, reply.scores, reply.truncated))
    n = truncated.shape[0] if truncated.ndim == 1 else -1
    if not (
        lims.dtype == np.int64 and indices.dtype == np.int64 and truncated.dtype == np.bool_
        and lims.shape == (n + 1,) and indices.ndim == 1 and scores.shape == indices.shape
        and lims[0] == 0 and lims[-1] == indices.shape[0] and bool(np.all(np.diff(lims) >= 0))
    ):  # fmt: skip
        raise ProtocolError(
            f"a ScoreRange reply whose parts disagree: lims {lims.dtype}{lims.shape}, indices {indices.dtype}{indices.shape}, "
            f"scores {scores.shape}, truncated {truncated.dtype}{truncated.shape}"
        )
    return RangeResult(lims, indices, scores, truncated, corpus_ids(reply.ids, indices.shape[0]) if reply.HasField("ids") else None)


def corpus_ids(message: pb.CorpusIds, count: int) -> np.ndarray:
    """`count` corpus ids from the wire: int64, or an array of str objects."""
    kind = message.WhichOneof("ids")
    if kind == "int64_ids":
        values = tensors.from_wire(message.int64_ids)
        if values.dtype != np.int64 or values.shape != (count,):
            raise ProtocolError(f"expected {count} int64 ids, got {values.dtype}{values.shape}")
        return values
    if kind == "string_ids":
        offsets = tensors.from_wire(message.string_ids.offsets)
        data = message.string_ids.utf8
        if not (
            offsets.dtype == np.int64 and offsets.shape == (count + 1,) and offsets[0] == 0
            and offsets[-1] == len(data) and bool(np.all(np.diff(offsets) >= 0))
        ):  # fmt: skip
            raise ProtocolError(f"expected offsets of {count} string ids in {len(data)} bytes, got {offsets.dtype}{offsets.shape}")
        strings = np.empty(count, dtype=object)
        try:
            strings[:] = [data[a:b].decode() for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
        except UnicodeDecodeError as err:
            raise ProtocolError(f"a string id is not UTF-8: {err}") from None
        return strings
    raise ProtocolError("the reply carries no ids")


def joined_range(results: Sequence[RangeResult], dtype: Any = np.float32) -> RangeResult:
    """One RangeResult of consecutive queries from the RangeResults of their parts."""
    if not results:
        return RangeResult(np.zeros(1, np.int64), np.empty(0, np.int64), np.empty(0, dtype), np.empty(0, bool))
    if len(results) == 1:
        return results[0]
    starts = np.cumsum([0] + [int(r.lims[-1]) for r in results[:-1]])
    lims = np.concatenate([np.zeros(1, np.int64)] + [r.lims[1:] + start for r, start in zip(results, starts)])
    with_ids = [r.ids for r in results if r.ids is not None]
    return RangeResult(
        lims,
        np.concatenate([r.indices for r in results]),
        np.concatenate([r.scores for r in results]),
        np.concatenate([r.truncated for r in results]),
        np.concatenate(with_ids) if len(with_ids) == len(results) else None,
    )
