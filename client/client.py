"""The sync client: `Client` holds the channel, `Session` is one server-side workspace; both perform the flows of `cosserve.calls`."""

from __future__ import annotations

import abc
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Generic, Literal, TypeVar, overload

import grpc
import numpy as np

from cosserve import calls, flows, limits, wire
from cosserve.calls import CorpusInfo, GradientCheck, OpInfo, OpSpec, RangeResult
from cosserve.errors import ClientClosedError, InvalidArgumentError, InvalidTypeError
from cosserve.v1 import cosserve_pb2 as pb
from cosserve.v1 import cosserve_pb2_grpc as pb_grpc

__all__ = [
    "BaseClient",
    "BaseSession",
    "Client",
    "PemSource",
    "Session",
    "channel_credentials",
    "check_target",
    "connection_options",
    "trace_metadata",
]

T = TypeVar("T")
ClientT = TypeVar("ClientT", bound="BaseClient")

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


def check_target(target: str) -> str:
    """`target` if it is a server address grpc can dial (host:port, or a gRPC target such as
    dns:///host:port or unix:PATH); InvalidArgumentError for a URL, which grpc would only fail to
    resolve ("Misformatted domain name") at the first call."""
    if not isinstance(target, str):
        raise InvalidTypeError(f"the server address is a str, host:port, got {target!r}")
    scheme = target.partition("://")[0].lower() if "://" in target else ""
    if scheme in ("http", "https", "grpc", "grpcs"):
        bare = target.partition("://")[2].rstrip("/")
        tls = " with TLS (tls=True; --tls on the command line)" if scheme in ("https", "grpcs") else ""
        raise InvalidArgumentError(f"{target!r} is a URL; the server address is host:port, here {bare!r}{tls}")
    return target


def trace_metadata() -> tuple[tuple[str, str], ...]:
    """The current OpenTelemetry context as W3C `traceparent` (and `tracestate`, `baggage`)
    metadata, so that the caller's trace continues into the server; nothing when the program has
    not loaded opentelemetry (it is optional: a program that traces has loaded it already)."""
    if "opentelemetry.context" not in sys.modules:
        return ()
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)  # the propagators of OTEL_PROPAGATORS; nothing outside a span
    return tuple(carrier.items())


class BaseClient(abc.ABC):
    """What `Client` and `cosserve.aio.Client` share: the connection their arguments describe (see
    `Client`), and how one call of a flow is started on it."""

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
        self.target = check_target(target)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise InvalidTypeError(f"timeout is a number of seconds, got {timeout!r}")
        if not 0 < timeout < float("inf"):
            raise InvalidArgumentError(f"timeout must be a positive, finite number of seconds, got {timeout!r}")
        self.timeout = timeout
        self._closed = False
        self._schemas: dict[str, tuple[str, ...]] = {}  # each op's input names, for compute (calls.schema_inputs)
        credentials, self._metadata = connection_options(
            credentials, token, tls=tls, root_certificates=root_certificates, client_cert=client_cert, client_key=client_key
        )
        self._channel = self._connect(target, credentials, list(limits.GRPC_OPTIONS))
        self.stub = pb_grpc.CosserveStub(self._channel)
        # The RPCs that carry tensor data skip the protobuf runtime on that side (see cosserve.wire):
        # their requests are bytes framed by wire, or their responses bytes read in place by it.
        self._framed = {name: _framed_callable(self._channel, method) for name, method in wire.FRAMED_METHODS.items()}

    @abc.abstractmethod
    def _connect(self, target: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]) -> Any:
        """The shell's channel to `target`: plaintext without credentials."""

    def _metadata_for(self, session: str | None) -> tuple[tuple[str, str], ...]:
        """The call's metadata: the token, and for a session's call its id (see calls.call_metadata),
        and the caller's trace context when it traces (trace_metadata)."""
        metadata = calls.call_metadata(self._metadata, session)
        trace = trace_metadata()
        return (*metadata, *trace) if trace else metadata

    def _start(self, call: flows.Call) -> Any:
        """Start `call`: its reply (sync), an awaitable of it (asyncio), or its reply stream."""
        if self._closed:
            what = f"{call.method} (session {call.session})" if call.session else call.method
            raise ClientClosedError(f"{what}: the client is closed; open a new Client (and session) to call the server")
        rpc = self._framed[call.method] if call.framed else getattr(self.stub, call.method)
        metadata = self._metadata_for(call.session)
        if call.idle is not None:  # no deadline: the shell cancels it when it idles
            return rpc(call.request, metadata=metadata)
        return rpc(call.request, timeout=call.timeout or self.timeout, metadata=metadata)


class Client(BaseClient):
    """A connection to a cosserve server.

    Args:
        target: "host:port" of the server (or a gRPC target such as "dns:///host:port"; a URL
            such as "http://host:port" is refused with InvalidArgumentError).
        timeout: default deadline in seconds of every call (streams get more per byte).
        credentials: channel credentials made by hand; None for the TLS options below, or plaintext.
        token: bearer token sent with every call, for servers started with an auth token.
        tls: TLS, trusting the system's root certificates (unless root_certificates is given).
        root_certificates: PEM bytes or a path: the CAs the server's certificate must chain to.
        client_cert, client_key: PEM bytes or paths: this client's certificate and key, for a
            server that requires them (mutual TLS). Any TLS option means TLS.
    """

    def _connect(self, target: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]) -> grpc.Channel:
        # Its streams without deadline are watched from one thread per client, started on first use.
        self._watchdog = _Watchdog()
        if credentials is None:
            return grpc.insecure_channel(target, options=options)
        return grpc.secure_channel(target, credentials, options=options)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        self._watchdog.close()
        self._channel.close()

    def _perform(self, flow: flows.Flow[T]) -> T:
        """Perform the calls of `flow` (one that hands nothing out on the way); its result."""
        run = flows.Run(flow)
        for _ in self._drive(run):
            pass
        return run.result

    def _drive(self, run: flows.Run[Any]) -> Iterator[Any]:
        """Answer the steps of `run` until its flow returns, yielding what it Emits to our caller."""
        with _OpenStream(self._watchdog, run) as stream:
            for step in run:
                with run.answer() as answer:
                    if isinstance(step, flows.Emit):
                        yield step.value
                    else:
                        answer.reply = self._answer(step, stream)

    def _answer(self, step: flows.Call | flows.Read, stream: _OpenStream) -> Any:
        if isinstance(step, flows.Read):
            return stream.read()
        if step.stream:
            stream.open(self._start(step), step)
            return None
        return self._start(step)

    def _call(
        self,
        method: str,
        request: Any,
        *,
        timeout: float | None = None,
        framed: bool = False,
        session: str | None = None,
    ) -> Any:
        """Call one unary or request-streaming RPC with a request of one's own; raise
        CosserveRpcError on failure. `framed`: the bytes variant of `wire.FRAMED_METHODS`;
        `session`: the id of the session the call is for, sent as metadata too."""
        return self._perform(flows.one(flows.Call(method, request, session=session, timeout=timeout, framed=framed)))

    def session(self, device: str = "auto") -> Session:
        """Open a server-side workspace on `device` ("auto", "cpu", "cuda", "cuda:N")."""
        return Session(self, *self._perform(calls.create_session(device)))

    def attach(self, session_id: str) -> Session:
        """The existing session `session_id` of this client's identity: one made by another client,
        another process, or before the server restarted (see --durability).

        Raises:
            CosserveRpcError: NOT_FOUND if this identity has no such session (never created,
                closed, expired, or another identity's); FAILED_PRECONDITION if the server could
                not restore it after a restart (the details say why).
        """
        self._perform(calls.attach(session_id))
        # The device is the server's to know; the check's reply does not say it.
        return Session(self, session_id, "unknown")

    def operators(self) -> list[OpInfo]:
        """Schemas of the server's operators, sorted by name."""
        return self._perform(calls.operators())

    def corpora(self) -> list[CorpusInfo]:
        """The server's shared corpora (`--corpus NAME=FILE`, `Session.publish_corpus`), sorted by name."""
        return self._perform(calls.corpora())

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

        Inputs bind by name: each key is one of the op's input names (`operators()`; {"Q": q,
        "C": c} and {"C": c, "Q": q} are the same call). A name the op does not have, or one of its
        inputs left out, is an InvalidArgumentError listing its names. The first call asks the
        server for its operators once (ListOperators).

        Tensors of any size: inputs that fit one message travel in one `Compute` request and the
        outputs in its reply; larger inputs, or outputs too large for one reply, go through a
        temporary session (fed streamed, `RunOperator`, fetched streamed, closed).
        """
        flow = calls.compute(op_type, inputs, outputs, args, device=device, client_timeout=self.timeout, schemas=self._schemas)
        return self._perform(flow)


class BaseSession(Generic[ClientT]):
    """What `Session` and `cosserve.aio.Session` share: which session, on which client."""

    def __init__(self, client: ClientT, session_id: str, device: str) -> None:
        self.client = client
        self.id = session_id
        self.device = device
        self.closed = False

    def _closing(self) -> bool:
        """Whether this close is the first, the one that frees the session on the server."""
        first, self.closed = not self.closed, True
        return first


class Session(BaseSession[Client]):
    """One server-side workspace of named tensors; close it, or use it as a context manager."""

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Session(id={self.id!r}, device={self.device!r}, closed={self.closed})"

    def close(self) -> None:
        """Free the session's blobs on the server; calling it twice is harmless."""
        if self._closing():
            self.client._perform(calls.close_session(self.id))

    # ---- blobs ---------------------------------------------------------------------------

    def feed_blob(
        self, name: str, value: Any, *, shm: bool = False, progress: Callable[[int], object] | None = None
    ) -> None:
        """Create or overwrite blob `name` with an array (numpy, torch or array-like).

        With `shm=True` the bytes go through a shared-memory region this call creates and
        removes; the server must be on this host and started with --allow-shm. `progress`, if
        given, is called with the number of bytes of each piece as it is handed to grpc.
        """
        flow = calls.feed_blob(self.id, name, value, client_timeout=self.client.timeout, shm=shm, progress=progress)
        self.client._perform(flow)

    def fetch_blob(self, name: str, *, shm: bool = False) -> np.ndarray:
        """Return blob `name` as a numpy array of the server's dtype and shape.

        With `shm=True` the bytes come through a shared-memory region this call creates and
        removes; the server must be on this host and started with --allow-shm. Otherwise one
        streamed call, cancelled with DEADLINE_EXCEEDED when no message arrives for the client's
        timeout.
        """
        return self.client._perform(calls.fetch_blob(self.id, name, client_timeout=self.client.timeout, shm=shm))

    def has_blob(self, name: str) -> bool:
        return self.client._perform(calls.has_blob(self.id, name))

    def blobs(self) -> list[str]:
        """Names of the session's blobs, sorted."""
        return self.client._perform(calls.blobs(self.id))

    def remove_blob(self, name: str) -> None:
        self.client._perform(calls.remove_blob(self.id, name))

    def reset(self) -> None:
        """Drop every blob; the session stays open."""
        self.client._perform(calls.reset(self.id))

    def save(self, name: str, *, timeout: float | None = None) -> tuple[int, int]:
        """Write every blob of this session, bit-exact, to the server's state directory
        (`--state-dir`) as the snapshot `name` of this identity, replacing one of that name
        atomically. Returns (blobs, bytes): the blobs and tensor bytes written.

        `name`: 1 to 128 letters, digits, '.', '_' or '-', not starting with '.' and without '..'.
        Raises CosserveRpcError: INVALID_ARGUMENT for such a name, FAILED_PRECONDITION on a server
        without a state directory, RESOURCE_EXHAUSTED when its disk has no room. `timeout`: the
        deadline in seconds (default the client's); a large session takes about a second per GB."""
        return self.client._perform(calls.save(self.id, name, timeout))

    def load(self, name: str, *, timeout: float | None = None) -> tuple[int, int]:
        """Replace every blob of this session with those of the snapshot `name` (saved by this
        identity): all of them or, on any error, none (the session is left as it was). Returns
        (blobs, bytes): the blobs and tensor bytes loaded.

        Raises CosserveRpcError: NOT_FOUND for a snapshot this identity has not saved,
        RESOURCE_EXHAUSTED when the blobs would pass the session's limits (checked before
        anything is read), FAILED_PRECONDITION for a damaged snapshot (the message says what
        and which file) or a server without a state directory."""
        return self.client._perform(calls.load(self.id, name, timeout))

    def publish_corpus(self, blob: str, name: str) -> None:
        """Make this session's blob `blob` the shared corpus `@name`, read by every session (and
        identity) of the server, without a copy. The session keeps its blob (still charged to it
        while it holds it; remove it to give that back); the corpus stays until the server stops.

        Raises CosserveRpcError: FAILED_PRECONDITION for a name already in use (or a server that
        publishes nothing), RESOURCE_EXHAUSTED past the server's --max-published-bytes,
        INVALID_ARGUMENT for a bad name, NOT_FOUND for a blob the session does not hold."""
        self.client._perform(calls.publish_corpus(self.id, blob, name))

    # ---- operators -----------------------------------------------------------------------

    def run_operator(self, op_type: str, inputs: Sequence[str], outputs: Sequence[str], **args: Any) -> None:
        """Run one Caffe2 operator on the session's blobs; on failure nothing changes."""
        self.client._perform(calls.run_operator(self.id, op_type, inputs, outputs, args))

    def run_net(self, ops: Iterable[OpSpec]) -> None:
        """Run operators in order, all or nothing.

        Each op is (type, inputs, outputs) or (type, inputs, outputs, {arg: value}).
        """
        self.client._perform(calls.run_net(self.id, ops))

    def run_caffe2_operator(self, operator_def: bytes) -> None:
        """Run one operator given as a serialized Caffe2 OperatorDef (Caffe2's own encoding, as a
        program holding Caffe2 protobufs has it); on failure nothing changes."""
        self.client._perform(calls.run_caffe2_operator(self.id, operator_def))

    def run_caffe2_net(self, net_def: bytes) -> None:
        """Run a serialized Caffe2 NetDef, all or nothing."""
        self.client._perform(calls.run_caffe2_net(self.id, net_def))

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
        flow = calls.check_gradient(self.id, op_type, inputs, outputs, args, step_size=step_size, output_index=output_index)
        return self.client._perform(flow)

    # ---- scoring -------------------------------------------------------------------------

    @overload
    def top_k(
        self, queries: Any, corpus: str = ..., k: int = ..., *, batch_size: int = ..., timeout: float | None = ...,
        ids: Literal[False] = ...,
    ) -> tuple[np.ndarray, np.ndarray]: ...  # fmt: skip

    @overload
    def top_k(
        self, queries: Any, corpus: str = ..., k: int = ..., *, batch_size: int = ..., timeout: float | None = ...,
        ids: Literal[True],
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...  # fmt: skip

    def top_k(
        self,
        queries: Any,
        corpus: str = "C",
        k: int = 10,
        *,
        batch_size: int = 256,
        timeout: float | None = None,
        ids: bool = False,
    ) -> tuple[np.ndarray, ...]:
        """Exact cosine top-k of each query row among the rows of blob `corpus` (or of the
        server's shared corpus `"@NAME"`, see `Client.corpora`).

        `queries` is one (N, D) array (numpy, torch, memory-mapped, or a nested list or tuple of
        rows, as `feed_blob` takes it), sent in batches of `batch_size` rows, or an iterable of
        (n, D) batches whose results are concatenated: an iterator or generator, or a list or tuple
        whose first item is 2-D. All batches go over one ScoreTopK stream, several in flight.
        Queries must have the corpus dtype. Returns (scores (N, k) in the corpus dtype, int64 indices (N, k)), best first,
        ties broken by the lower index; an iterable with no batches asks nothing of the server
        and gives (0, k) float32 scores. `timeout` bounds the whole call; by default it is the
        client's timeout per batch (a day for an iterator of unknown length). With `ids=True`
        (a shared corpus whose rows have ids, `CorpusInfo.id_type`), (scores, indices, ids (N, k):
        int64, or str objects).
        """
        pieces = list(self.iter_top_k(queries, corpus, k, batch_size=batch_size, timeout=timeout, ids=ids))
        return calls.joined_top_k(pieces, k, ids)

    def iter_top_k(
        self, queries: Any, corpus: str = "C", k: int = 10, *, batch_size: int = 256, timeout: float | None = None,
        ids: bool = False,
    ) -> Iterator[tuple[np.ndarray, ...]]:  # fmt: skip
        """Like `top_k`, but yields (scores, indices) of each message's queries as they arrive, in
        order ((scores, indices, ids) with `ids=True`)."""
        flow = calls.iter_top_k(
            self.id, queries, corpus, k, batch_size=batch_size, timeout=timeout, client_timeout=self.client.timeout, ids=ids
        )
        return self.client._drive(flows.Run(flow))

    def range_search(
        self,
        queries: Any,
        corpus: str = "C",
        min_score: float | None = None,
        *,
        max_per_query: int | None = None,
        ids: bool | None = None,
        batch_size: int = 256,
        timeout: float | None = None,
    ) -> RangeResult:
        """Exact cosine range search: for each query row, every row of blob `corpus` (or shared
        corpus `"@NAME"`) with cosine >= `min_score` (required), as a `RangeResult` in CSR form
        (faiss's layout): query i's rows are `indices[lims[i]:lims[i + 1]]`, best first, equal
        scores by the lower index.

        Scores are the server's float32 cosines of the stored values (float64 for a float64
        corpus), compared with `min_score` rounded to that type: a row is returned exactly when
        the score `top_k` reports for it passes. `max_per_query` keeps the best that many per
        query and sets `truncated[i]` where more passed. `ids`: True gives the rows' corpus ids
        in `.ids` (a shared corpus loaded with ids), None gives them when the corpus has them.
        `queries`, `batch_size` and `timeout` as for `top_k`, over one ScoreRange stream. One
        message's rows must fit a reply (about 6.7 MB: 580,000 rows of float32): past that the
        call fails with RESOURCE_EXHAUSTED; raise `min_score`, set `max_per_query` or lower
        `batch_size`.
        """
        pieces = list(
            self.iter_range_search(
                queries, corpus, min_score, max_per_query=max_per_query, ids=ids, batch_size=batch_size, timeout=timeout
            )
        )
        return calls.joined_range(pieces)

    def iter_range_search(
        self,
        queries: Any,
        corpus: str = "C",
        min_score: float | None = None,
        *,
        max_per_query: int | None = None,
        ids: bool | None = None,
        batch_size: int = 256,
        timeout: float | None = None,
    ) -> Iterator[RangeResult]:
        """Like `range_search`, but yields a `RangeResult` of each message's queries as it arrives, in order."""
        flow = calls.iter_range_search(
            self.id, queries, corpus, min_score, max_per_query=max_per_query, ids=ids, batch_size=batch_size,
            timeout=timeout, client_timeout=self.client.timeout,
        )  # fmt: skip
        return self.client._drive(flows.Run(flow))


def _framed_callable(channel: Any, method: wire.FramedMethod) -> Any:
    """The multicallable of a framed method on a sync or asyncio channel: bytes on its framed
    side, protobuf on the other."""
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


class _OpenStream:
    """The reply stream a flow has open, one at a time: watched for idleness when it has no
    deadline, cancelled when another opens or the flow ends (a no-op once it ended)."""

    def __init__(self, watchdog: _Watchdog, run: flows.Run[Any]) -> None:
        self._watchdog = watchdog
        self._run = run
        self._call: Any = None
        self._progress: _Progress | None = None

    def __enter__(self) -> _OpenStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self, call: Any, step: flows.Call) -> None:
        self.close()
        self._call = call
        if step.idle is not None:
            self._progress = self._watchdog.watch(call, step.idle, lambda: self._run.expire(step))

    def read(self) -> Any:
        message = next(self._call, flows.END)
        if self._progress is not None:
            self._progress()
        return message

    def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._progress is not None:
            self._watchdog.forget(self._progress)
        self._call = self._progress = None


class _Progress:
    """One watched call: calling it records progress; `expire` is called before the watchdog
    cancels the call for idleness."""

    def __init__(self, call: Any, idle_s: float, expire: Callable[[], None]) -> None:
        self.call = call
        self.idle_s = idle_s
        self.expire = expire
        self.last = time.monotonic()

    def __call__(self) -> None:
        self.last = time.monotonic()


class _Watchdog:
    """Cancels streamed calls that receive nothing for their idle time: one thread per client,
    started on first use, that looks at the watched calls a few times a second."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: set[_Progress] = set()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, call: Any, idle_s: float, expire: Callable[[], None]) -> _Progress:
        progress = _Progress(call, idle_s, expire)
        with self._lock:
            self._watched.add(progress)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="cosserve-watchdog", daemon=True)
                self._thread.start()
        return progress

    def forget(self, progress: _Progress) -> None:
        with self._lock:
            self._watched.discard(progress)

    def _run(self) -> None:
        while not self._closed.wait(0.2):
            now = time.monotonic()
            with self._lock:
                stale = [p for p in self._watched if now - p.last > p.idle_s]
            for progress in stale:
                progress.expire()
                progress.call.cancel()

    def close(self) -> None:
        self._closed.set()
