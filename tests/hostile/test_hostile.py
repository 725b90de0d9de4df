"""A hostile client against one real `cosserve serve` process: a hypothesis fuzz of every RPC, as
protobuf messages with hostile field values and as raw bytes on every method path. Whatever it
sends, the server answers a precise code (never UNKNOWN, never INTERNAL) with bounded details,
stays up, leaves an untouched session bit-exact and still computes correctly.

COSSERVE_FUZZ_EXAMPLES sets the examples of each fuzz test (one example is one hostile call);
COSSERVE_FUZZ_SEED picks another fixed seed (the default is derandomized)."""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from multiprocessing import shared_memory
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from cosserve import Client, Session, wire
from cosserve.v1 import cosserve_pb2 as pb
from tests.conftest import start_process, stop_process

MiB = 1024**2
SESSION_LIMIT = 64 * MiB
SERVICE = pb.DESCRIPTOR.services_by_name["Cosserve"]
METHODS = {method.name: method for method in SERVICE.methods}
# Examples of each of the two fuzz tests; together at least the 2,000 requests.
EXAMPLES = int(os.environ.get("COSSERVE_FUZZ_EXAMPLES", "1000"))
SEED = os.environ.get("COSSERVE_FUZZ_SEED")
# No hostile call here costs more than a few milliseconds of server time: a call that runs into
# this deadline is a hang, not slowness.
CALL_TIMEOUT_S = 20.0
MAX_DETAILS_BYTES = 2048
# Replies read from one response stream before the client cancels it (a fetch of a full session
# is 32 chunks).
MAX_REPLIES = 64
# Failures kept per distinct (method, code, first words of details), to show the lead.
KEPT_PER_FAILURE = 2
ITEMSIZE = {pb.BOOL: 1, pb.UINT8: 1, pb.INT8: 1, pb.INT16: 2, pb.INT32: 4, pb.INT64: 8,
            pb.FLOAT16: 2, pb.BFLOAT16: 2, pb.FLOAT32: 4, pb.FLOAT64: 8}
NUMPY_DTYPE = {pb.BOOL: np.bool_, pb.UINT8: np.uint8, pb.INT8: np.int8, pb.INT16: np.int16,
               pb.INT32: np.int32, pb.INT64: np.int64, pb.FLOAT16: np.float16, pb.FLOAT32: np.float32,
               pb.FLOAT64: np.float64}
# Blobs of the playground session, fed again whenever the fuzz may have removed them.
BASE_BLOBS: dict[str, np.ndarray] = {
    "X": np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32),
    "Y": np.random.default_rng(2).standard_normal((4, 8)).astype(np.float32),
    "C": np.random.default_rng(3).standard_normal((16, 8)).astype(np.float32),
    "S": np.random.default_rng(4).uniform(-1, 1, 4).astype(np.float32),
    "L": np.array([1, -1, 1, -1], np.int32),
    "D": np.random.default_rng(5).standard_normal((3, 5)),
}
# Refreshed every this many examples, so that hostile overwrites do not pile up.
RESTOCK_EVERY = 25


@dataclasses.dataclass
class Hostile:
    """One hostile call: the method and the raw messages it sends (one for a unary request)."""

    method: str
    messages: list[bytes]
    how: str  # "structured" or the kind of raw bytes, for the tally

    def __repr__(self) -> str:  # what hypothesis prints for a failing example: short enough to read
        shown = [m[:60] + (b"..." if len(m) > 60 else b"") for m in self.messages[:3]]
        sizes = [len(m) for m in self.messages]
        return f"Hostile({self.method}, how={self.how}, sizes={sizes}, messages={shown!r})"


@dataclasses.dataclass
class Failure:
    method: str
    code: str
    details: str
    request: str


@dataclasses.dataclass
class Fuzzed:
    """The server under fuzz, its sessions and what the fuzz saw."""

    proc: subprocess.Popen
    address: str
    channel: grpc.Channel
    client: Client
    playground: str  # the session the fuzz aims at
    sentinel: str  # a session the fuzz never names
    sentinel_blobs: dict[str, np.ndarray]
    region: shared_memory.SharedMemory  # a real region named for the playground
    ops: dict[str, list[str]]  # op name -> argument names, from ListOperators
    log: list[str]  # the server's log lines, as they come
    codes: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    by_method: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    failures: dict[tuple[str, str, str], list[Failure]] = dataclasses.field(default_factory=dict)
    seconds: collections.defaultdict[str, float] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(float))
    requests: int = 0
    dirty: bool = False
    callables: dict[str, Any] = dataclasses.field(default_factory=dict)
    strategies: Any = None  # built by strategies_of


# ---- the server ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    log: list[str] = []
    # With a state dir, so snapshot names reach the path code.
    state = str(tmp_path_factory.mktemp("state"))
    proc, address = start_process(
        "--max-session-bytes", str(SESSION_LIMIT), "--allow-shm", "--max-workers", "4", "--state-dir", state, log=log
    )
    # The client side may send and receive more than the server accepts: the server must refuse it.
    options = [("grpc.max_send_message_length", 64 * MiB), ("grpc.max_receive_message_length", 64 * MiB)]
    channel = grpc.insecure_channel(address, options=options)
    client = Client(address, timeout=CALL_TIMEOUT_S)
    region = None
    try:
        rng = np.random.default_rng(0)
        sentinel = client.session("cpu")
        sentinel_blobs: dict[str, np.ndarray] = {
            "small": rng.standard_normal((8, 16)).astype(np.float32),
            "streamed": rng.standard_normal(3 * MiB // 8),  # 3 MiB: FeedBlobStream and a streamed fetch
            "labels": rng.integers(-(2**62), 2**62, 100),
            "half": rng.standard_normal(64).astype(np.float16),
        }
        for name, value in sentinel_blobs.items():
            sentinel.feed_blob(name, value)
        playground = client.session("cpu")
        region = shared_memory.SharedMemory(create=True, size=4096, name=f"cosserve_{playground.id}_fuzz")
        ops = {op.name: [a.name for a in op.args] for op in client.operators()}
        state = Fuzzed(proc, address, channel, client, playground.id, sentinel.id, sentinel_blobs, region, ops, log)
        restock(state)
        yield state
    finally:
        if region is not None:
            region.close()
            region.unlink()
        client.close()
        channel.close()
        stop_process(proc)


def restock(state: Fuzzed) -> None:
    """Give the playground its base blobs again (hostile feeds and resets may have changed them)."""
    playground = Session(state.client, state.playground, "cpu")
    playground.reset()
    for name, value in BASE_BLOBS.items():
        playground.feed_blob(name, value)
    state.dirty = False


def print_tally(state: Fuzzed) -> None:
    codes = ", ".join(f"{code} {count}" for code, count in state.codes.most_common())
    print(f"\nhostile fuzz: {state.requests} requests ({sum(state.seconds.values()):.1f} s in calls); codes: {codes}")
    print("per method: " + ", ".join(f"{m} {n}" for m, n in sorted(state.by_method.items())))
    slowest = sorted(state.seconds.items(), key=lambda item: -item[1])[:6]
    print("slowest: " + ", ".join(f"{kind} {seconds:.1f} s" for kind, seconds in slowest))


# ---- calling the server with raw bytes ------------------------------------------------------------


def raw_callable(state: Fuzzed, method: str) -> Any:
    """A multicallable of `method` that sends and returns bytes as they are (nothing re-encoded)."""
    rpc = state.callables.get(method)
    if rpc is None:
        descriptor = METHODS[method]
        path = wire.method_path(method)
        kind = (descriptor.client_streaming, descriptor.server_streaming)
        factory = {
            (False, False): state.channel.unary_unary,
            (False, True): state.channel.unary_stream,
            (True, False): state.channel.stream_unary,
            (True, True): state.channel.stream_stream,
        }[kind]
        rpc = state.callables[method] = factory(path, request_serializer=None, response_deserializer=None)
    return rpc


def call(state: Fuzzed, hostile: Hostile) -> tuple[grpc.StatusCode, str, list[bytes]]:
    """Send one hostile call; its status code, details and the replies (at most MAX_REPLIES)."""
    descriptor = METHODS[hostile.method]
    rpc = raw_callable(state, hostile.method)
    request: Any = iter(hostile.messages) if descriptor.client_streaming else hostile.messages[0]
    replies: list[bytes] = []
    try:
        if descriptor.server_streaming:
            stream = rpc(request, timeout=CALL_TIMEOUT_S)
            for reply in stream:
                replies.append(reply)
                if len(replies) >= MAX_REPLIES:
                    stream.cancel()
                    break
        else:
            replies.append(rpc(request, timeout=CALL_TIMEOUT_S))
    except grpc.RpcError as err:
        if replies and err.code() == grpc.StatusCode.CANCELLED:  # our own cancel after MAX_REPLIES
            return grpc.StatusCode.OK, "", replies
        return err.code(), err.details() or "", replies
    return grpc.StatusCode.OK, "", replies


def send(state: Fuzzed, hostile: Hostile) -> None:
    """One hostile call, judged: the code, the size of the details, the process still alive."""
    started = time.perf_counter()
    code, details, replies = call(state, hostile)
    state.seconds[f"{hostile.method}/{hostile.how}"] += time.perf_counter() - started
    state.requests += 1
    state.codes[code.name] += 1
    state.by_method[hostile.method] += 1
    assert state.proc.poll() is None, f"the server died (exit {state.proc.returncode}) on {hostile!r}"
    problems = []
    if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED):
        problems.append(code.name)
    if len(details.encode("utf-8", "surrogateescape")) >= MAX_DETAILS_BYTES:
        problems.append(f"details of {len(details.encode('utf-8', 'surrogateescape'))} bytes")
    if problems:
        key = (hostile.method, "+".join(problems), " ".join(details.split()[:3])[:40])
        kept = state.failures.setdefault(key, [])
        if len(kept) < KEPT_PER_FAILURE:
            kept.append(Failure(hostile.method, "+".join(problems), details[:100], repr(hostile)))
    if code == grpc.StatusCode.OK and hostile.method == "CreateSession":
        # A session the fuzz opened: close it again, so the fuzz never meets the session limit.
        opened = pb.CreateSessionResponse.FromString(replies[0])
        state.client.stub.CloseSession(pb.CloseSessionRequest(session_id=opened.session_id), timeout=CALL_TIMEOUT_S)
    if code == grpc.StatusCode.OK and hostile.method in ("ResetWorkspace", "RemoveBlob", "FeedBlob", "FeedBlobStream",
                                                          "FeedBlobShm", "RunOperator", "RunNet"):
        state.dirty = True


def report_failures(state: Fuzzed) -> str:
    lines = [f"{len(state.failures)} kinds of failure in {state.requests} hostile requests:"]
    for (method, problem, words), kept in sorted(state.failures.items()):
        lines.append(f"- {method}: {problem}: {words!r}")
        for failure in kept:
            lines.append(f"    details {failure.details!r}")
            lines.append(f"    request {failure.request}")
    return "\n".join(lines)


# ---- hostile values -------------------------------------------------------------------------------

# Text protobuf can carry (no lone surrogates), including NUL and non-ASCII.
TEXT = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=12)
HOSTILE_TEXT = st.one_of(
    st.sampled_from(["", "\x00", "a\x00b", "é", "名前", "🙂" * 3, " ", "../..", "%s%n", "\n\r"]),
    # Long: error details that echo them must stay bounded (in bytes, non-ASCII included).
    # (Built by a map: a strategy's repr, which hypothesis computes, stays short.)
    st.sampled_from([("n", 20_000), ("名", 5_000), ("🙂", 3_000), ("é", 1_500)]).map(lambda t: t[0] * t[1]),
    TEXT,
)
DIMS = st.one_of(
    st.integers(0, 6),
    st.sampled_from([-1, -(2**63), 2**31, 2**32 + 1, 2**40, 2**62, 2**63 - 1]),
)
SHAPES = st.one_of(
    st.lists(DIMS, max_size=5),
    st.sampled_from([[1] * 40, [1] * 300, [0] * 64, [2] * 64]),  # many dimensions
)
DTYPES = st.one_of(st.sampled_from(sorted(ITEMSIZE)), st.sampled_from([0, 11, -1, 99, 2**31 - 1, -(2**31)]))
FLOATS = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-320, 1e308, -1e308]),
    st.floats(allow_nan=True, allow_infinity=True),
)
INTS = st.one_of(st.integers(-3, 20), st.sampled_from([-(2**63), 2**63 - 1, 2**31, -(2**31), 2**62]))
SPECIAL_VALUES = np.array([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-45, 3e38, -1.0, 1.0, 65504.0])


@st.composite
def tensors(draw: st.DrawFn, elements: int = 4096) -> pb.Tensor:
    """A Tensor message: sometimes consistent (data the size shape x itemsize says, of special
    values or random bytes), often not (any dtype, shape and data length)."""
    dtype = draw(DTYPES)
    shape = draw(st.one_of(SHAPES, st.lists(st.integers(0, 8), min_size=1, max_size=3)))
    count = math.prod(shape) if all(d >= 0 for d in shape) else -1
    mode = draw(st.sampled_from(["consistent", "special", "random"]))
    # Long data comes from a drawn seed: hypothesis drawing every byte would cost more than the call.
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if dtype in ITEMSIZE and 0 <= count <= elements and mode != "random":
        nbytes = count * ITEMSIZE[dtype]
        if mode == "special" and dtype in NUMPY_DTYPE:
            with np.errstate(all="ignore"):
                data = SPECIAL_VALUES[rng.integers(0, len(SPECIAL_VALUES), count)].astype(NUMPY_DTYPE[dtype]).tobytes()
        else:
            data = rng.bytes(nbytes)
    else:
        data = draw(st.binary(max_size=64))
    return pb.Tensor(dtype=dtype, shape=shape, data=data)  # type: ignore[arg-type]


def valid_tensor(rows: int, cols: int) -> pb.Tensor:
    value = np.random.default_rng(rows * 31 + cols).standard_normal((rows, cols)).astype(np.float32)
    return pb.Tensor(dtype=pb.FLOAT32, shape=value.shape, data=value.tobytes())


class Strategies:
    """Hostile requests for every RPC, aimed at the fuzzed server's playground session."""

    def __init__(self, state: Fuzzed) -> None:
        self.state = state
        playground = state.playground
        self.session_ids = st.one_of(
            st.just(playground),
            st.sampled_from([playground + "\x00", playground.upper(), playground[:-1], playground + "0",
                             " " + playground, "nope"]),
            HOSTILE_TEXT,
        )
        # Hostile ids that never name the playground (CloseSession must not close it).
        self.foreign_ids = self.session_ids.filter(lambda s: s != playground)
        self.names = st.one_of(st.sampled_from(sorted(BASE_BLOBS)), st.sampled_from(["out", "out2"]), HOSTILE_TEXT)
        op_names = sorted(state.ops)
        self.op_types = st.one_of(
            st.sampled_from(op_names),
            st.sampled_from(["", "Nope", "cos", "COS", "Cos\x00", "Cos ", "x", "名"]).map(lambda t: t * 2_000 if len(t) == 1 else t),
        )
        arg_names = sorted({a for args in state.ops.values() for a in args})
        self.arguments = st.builds(
            self._argument, st.one_of(st.sampled_from(arg_names), HOSTILE_TEXT),
            st.sampled_from(["f", "i", "b", "s", None]), FLOATS, INTS, st.booleans(), HOSTILE_TEXT,
        )
        self.devices = st.one_of(
            st.sampled_from(["", "auto", "cpu", "cuda", "cuda:0", "cuda:99", "cuda:-1", "cuda:x", "cpu:0", "CPU",
                             "meta", "tpu", "mps", "cuda:99999999999999999999", "\x00"]),
            HOSTILE_TEXT,
        )

    @staticmethod
    def _argument(name: str, kind: str | None, f: float, i: int, b: bool, s: str) -> pb.Argument:
        arg = pb.Argument(name=name)
        if kind is not None:
            setattr(arg, kind, {"f": f, "i": i, "b": b, "s": s}[kind])
        return arg

    def op(self) -> st.SearchStrategy[pb.OperatorDef]:
        return st.builds(
            lambda t, i, o, a: pb.OperatorDef(type=t, input=i, output=o, arg=a),
            self.op_types,
            st.lists(self.names, max_size=3),
            st.lists(self.names, max_size=3),
            st.lists(self.arguments, max_size=3),
        )

    def messages(self) -> dict[str, st.SearchStrategy[list[pb.Message]]]:
        """For each RPC, hostile values in valid messages (a list: the messages of one call)."""
        one = lambda strategy: strategy.map(lambda m: [m])  # noqa: E731
        sid, name = self.session_ids, self.names
        return {
            "CreateSession": one(st.builds(pb.CreateSessionRequest, device=self.devices)),
            "CloseSession": one(st.builds(pb.CloseSessionRequest, session_id=self.foreign_ids)),
            "FeedBlob": one(st.builds(pb.FeedBlobRequest, session_id=sid, name=name, tensor=tensors())),
            "FeedBlobStream": self.feed_streams(),
            "FetchBlob": one(st.builds(pb.FetchBlobRequest, session_id=sid, name=name)),
            "FetchBlobStream": one(st.builds(pb.FetchBlobRequest, session_id=sid, name=name)),
            "FeedBlobShm": one(st.builds(
                pb.FeedBlobShmRequest, session_id=sid, name=name, dtype=DTYPES, shape=SHAPES,
                shm_name=self.shm_names(), offset=INTS,
            )),
            "FetchBlobShm": one(st.builds(
                pb.FetchBlobShmRequest, session_id=sid, name=name, shm_name=self.shm_names(), offset=INTS,
            )),
            "HasBlob": one(st.builds(pb.HasBlobRequest, session_id=sid, name=name)),
            "ListBlobs": one(st.builds(pb.ListBlobsRequest, session_id=sid)),
            "RemoveBlob": one(st.builds(pb.RemoveBlobRequest, session_id=sid, name=name)),
            "ResetWorkspace": one(st.builds(pb.ResetWorkspaceRequest, session_id=sid)),
            "RunOperator": one(st.builds(pb.RunOperatorRequest, session_id=sid, op=self.op())),
            "RunNet": one(st.builds(pb.RunNetRequest, session_id=sid, ops=st.one_of(
                st.lists(self.op(), max_size=4),
                # A net of many ops: each one cheap, together a test of what staging holds.
                st.sampled_from([300, 1000]).map(
                    lambda n: [pb.OperatorDef(type="Cos", input=["X"], output=[f"o{j % 7}"]) for j in range(n)]),
            ))),
            "Compute": one(st.builds(
                pb.ComputeRequest, op=self.op(),
                inputs=st.lists(st.builds(pb.NamedTensor, name=name, tensor=st.one_of(
                    tensors(), st.builds(valid_tensor, st.just(4), st.just(8)))), max_size=4),
                device=self.devices,
            )),
            "ListOperators": one(st.just(pb.ListOperatorsRequest())),
            "CheckGradient": one(st.builds(
                pb.CheckGradientRequest, session_id=sid, op=self.op(),
                step_size=st.one_of(FLOATS, st.sampled_from([1e-300, 1e300, -1e-3, 5e-324, 1.0, 1e6])),
                output_index=st.one_of(st.integers(-2, 3), st.sampled_from([2**31 - 1, -(2**31)])),
            )),
            "ScoreTopK": st.lists(st.builds(
                pb.TopKRequest, session_id=sid, corpus=st.one_of(st.sampled_from(["C", "X", "L", "D"]), name),
                k=st.one_of(INTS, st.sampled_from([16, 17])),
                queries=st.one_of(tensors(), st.builds(valid_tensor, st.sampled_from([1, 2, 5]), st.sampled_from([8, 7]))),
            ), max_size=4),
            "ScoreRange": st.lists(st.builds(
                pb.RangeRequest, session_id=sid, corpus=st.one_of(st.sampled_from(["C", "X", "L", "D", "@C"]), name),
                min_score=st.one_of(FLOATS, st.sampled_from([-2.0, 0.0, 0.99, math.nan, math.inf, -math.inf])),
                max_per_query=st.one_of(INTS, st.sampled_from([0, 1, 3])), with_ids=st.booleans(),
                queries=st.one_of(tensors(), st.builds(valid_tensor, st.sampled_from([1, 2, 5]), st.sampled_from([8, 7]))),
            ), max_size=4),
            "SaveWorkspace": one(st.builds(pb.SaveWorkspaceRequest, session_id=sid, name=self.snapshot_names())),
            "LoadWorkspace": one(st.builds(pb.LoadWorkspaceRequest, session_id=sid, name=self.snapshot_names())),
            "ListCorpora": one(st.just(pb.ListCorporaRequest())),
            "PublishCorpus": one(st.builds(
                pb.PublishCorpusRequest, session_id=sid, blob=name,
                name=st.one_of(self.snapshot_names(), st.sampled_from(["@x", "shared", "C"])),
            )),
        }

    def snapshot_names(self) -> st.SearchStrategy[str]:
        """Names a path could be made of: traversal, separators, absolute paths, dot files."""
        return st.one_of(
            st.sampled_from(["s1", "../s1", "../../etc/passwd", "/tmp/x", "a/b", "a\\b", ".hidden", ".", "..",
                             "x" * 129, "x" * 5000, "", "\x00", "nul\x00x", "CON", "s1.safetensors"]),
            HOSTILE_TEXT,
        )

    def shm_names(self) -> st.SearchStrategy[str]:
        prefix = f"cosserve_{self.state.playground}_"
        return st.one_of(
            st.just(self.state.region.name), st.just("/" + self.state.region.name),
            st.sampled_from(["", prefix, prefix + "missing", prefix + "../x", prefix + "a/b", prefix + "\x00",
                             prefix + "x" * 300, "cosserve_other_x", "/dev/zero", "../../etc/passwd",
                             f"cosserve_{self.state.sentinel[:4]}_x"]),
            HOSTILE_TEXT,
        )

    def feed_streams(self) -> st.SearchStrategy[list[pb.Message]]:
        """A header chunk with hostile values, then data chunks (some with header fields again)."""
        header = st.builds(
            pb.FeedBlobChunk, session_id=self.session_ids, name=self.names, dtype=DTYPES,
            shape=st.one_of(SHAPES, st.sampled_from([[256 * MiB], [SESSION_LIMIT // 4 + 1], [16], [4, 4]])),
            data=st.binary(max_size=64),
        )
        data = st.one_of(
            st.builds(pb.FeedBlobChunk, data=st.binary(max_size=64)),
            st.builds(pb.FeedBlobChunk, session_id=self.session_ids, name=self.names, dtype=DTYPES,
                      shape=SHAPES, data=st.binary(max_size=16)),
        )
        return st.one_of(
            st.just([]),  # a stream with no message at all
            st.tuples(header, st.lists(data, max_size=4)).map(lambda t: [t[0], *t[1]]),
        )


# ---- raw bytes ----------------------------------------------------------------------------------

def _nested(depth: int) -> bytes:
    """Length-delimited field 2 nested `depth` deep (past protobuf's recursion limit)."""
    body = b""
    for _ in range(depth):
        body = b"\x12" + _uvarint(len(body)) + body
    return body


def _uvarint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


# Byte strings protobuf parsers are known to stumble on.
NASTY_BYTES = [
    b"",
    b"\x0a\x02\xff\xfe",  # field 1 (a string everywhere it exists) of invalid UTF-8
    b"\x12\x03\xc3\x28\x00",  # field 2, invalid UTF-8
    b"\x0a\xff\xff\xff\xff\x0f",  # a length of 4 GiB with nothing after it
    b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # a ten-byte varint length
    b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # an eleven-byte varint
    b"\x0b" * 200 + b"\x0c" * 200,  # groups nested 200 deep
    b"\x0b" * 5,  # groups never closed
    b"\x0c",  # an end-group with no start
    b"\x00",  # field number 0
    b"\x07",  # wire type 7
    b"\xfa\xff\xff\xff\x0f\x00",  # field number 2^29 - 1 ... of wire type 2 with no payload
    _nested(150),
    b"\x1a\x04\xff\xff\xff\xff",  # field 3 as bytes: in Tensor/FeedBlobChunk data, elsewhere whatever
    b"\x22\x02\x08\x01" * 500,  # 500 repeated field-4 submessages
]
# Sizes of messages of zeros: up to the server's limit and past it.
BIG_SIZES = [7 * MiB - 64, 8 * MiB, 20 * MiB]


class RawBytes:
    """Raw bytes for a method: random bytes, truncated valid encodings, encodings of the wrong
    message, known-nasty byte strings and oversized messages."""

    def __init__(self, messages: dict[str, st.SearchStrategy[list[pb.Message]]], playground: str = "") -> None:
        self.messages = messages
        self.playground = playground

    def one(self, method: str) -> st.SearchStrategy[tuple[bytes, str]]:
        encoded = self.messages[method].filter(bool).map(lambda ms: ms[0].SerializeToString())
        others = st.sampled_from(sorted(set(self.messages) - {method})).flatmap(
            lambda other: self.messages[other].filter(bool).map(lambda ms: ms[0].SerializeToString()))
        if method == "CloseSession":  # another RPC's request naming the playground reads as closing it
            others = others.filter(lambda b: self.playground.encode() not in b)
        return st.one_of(
            st.binary(max_size=256).map(lambda b: (b, "random")),
            st.tuples(encoded, st.floats(0, 1)).filter(lambda t: len(t[0]) > 1).map(
                lambda t: (t[0][: int((len(t[0]) - 1) * t[1])], "truncated")),
            others.map(lambda b: (b, "wrong message")),
            st.integers(0, len(NASTY_BYTES) - 1).map(lambda i: (NASTY_BYTES[i], "nasty")),
            st.sampled_from(BIG_SIZES).map(lambda n: (bytes(n), "oversized")),
            st.tuples(encoded, st.binary(min_size=1, max_size=16)).map(lambda t: (t[0] + t[1], "trailing garbage")),
        )

    def call(self, method: str) -> st.SearchStrategy[Hostile]:
        descriptor = METHODS[method]
        if not descriptor.client_streaming:
            return self.one(method).map(lambda p: Hostile(method, [p[0]], p[1]))
        # A stream: valid messages of the method mixed with raw ones.
        valid = self.messages[method].filter(bool).map(lambda ms: (ms[0].SerializeToString(), "valid"))
        return st.lists(st.one_of(valid, self.one(method)), min_size=1, max_size=4).map(
            lambda parts: Hostile(method, [p for p, _ in parts], "stream: " + "/".join(sorted({h for _, h in parts}))))


# ---- the tests ----------------------------------------------------------------------------------


def fuzz_settings(examples: int) -> Callable[[Any], Any]:
    def apply(test: Any) -> Any:
        configured = settings(max_examples=examples, deadline=None, derandomize=SEED is None, database=None,
                              suppress_health_check=list(HealthCheck), print_blob=False)(test)
        return seed(int(SEED))(configured) if SEED is not None else configured
    return apply


def strategies_of(state: Fuzzed) -> tuple[dict[str, st.SearchStrategy[list[pb.Message]]], dict[str, st.SearchStrategy[Hostile]]]:
    """The structured and the raw strategies of every method, built once per server (hypothesis
    runs much faster on strategies it has seen)."""
    if state.strategies is None:
        structured = Strategies(state).messages()
        raw = RawBytes(structured, state.playground)
        state.strategies = (structured, {method: raw.call(method) for method in METHODS})
    return state.strategies


def fuzz_one(state: Fuzzed, hostile: Hostile) -> None:
    if state.dirty and state.requests % RESTOCK_EVERY == 0:
        restock(state)
    send(state, hostile)


@fuzz_settings(EXAMPLES)
@given(data=st.data())
def test_structured_hostile_requests_on_every_rpc(fuzzed: Fuzzed, data: st.DataObject) -> None:
    structured, _ = strategies_of(fuzzed)
    method = data.draw(st.sampled_from(sorted(METHODS)), label="method")
    messages = data.draw(structured[method], label="messages")
    fuzz_one(fuzzed, Hostile(method, [m.SerializeToString() for m in messages], "structured"))


@fuzz_settings(EXAMPLES)
@given(data=st.data())
def test_raw_bytes_on_every_method_path(fuzzed: Fuzzed, data: st.DataObject) -> None:
    _, raw = strategies_of(fuzzed)
    method = data.draw(st.sampled_from(sorted(METHODS)), label="method")
    fuzz_one(fuzzed, data.draw(raw[method], label="call"))


def test_every_method_was_fuzzed_and_no_call_failed(fuzzed: Fuzzed) -> None:
    """After both fuzz tests: every RPC was hit, and no answer broke the rules."""
    print_tally(fuzzed)
    assert fuzzed.requests >= min(2_000, 2 * EXAMPLES)
    assert set(fuzzed.by_method) == set(METHODS), f"never fuzzed: {sorted(set(METHODS) - set(fuzzed.by_method))}"
    assert not fuzzed.failures, report_failures(fuzzed)
    # A client's mistake is no error of the server's: nothing of it in the log at ERROR, no traceback.
    errors = [line for line in fuzzed.log if "Traceback" in line or " ERROR " in line or "internal error" in line]
    assert not errors, f"{len(errors)} error lines in the server log, e.g. {errors[:3]}"


def test_after_the_fuzz_the_untouched_session_is_bit_exact_and_calls_are_correct(fuzzed: Fuzzed) -> None:
    assert fuzzed.proc.poll() is None
    sentinel = Session(fuzzed.client, fuzzed.sentinel, "cpu")
    assert sentinel.blobs() == sorted(fuzzed.sentinel_blobs)
    for name, expected in fuzzed.sentinel_blobs.items():
        got = sentinel.fetch_blob(name)
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        assert got.tobytes() == expected.tobytes(), f"blob {name!r} of the untouched session changed"

    # Normal calls, checked against numpy.
    rng = np.random.default_rng(7)
    x = rng.standard_normal((64, 32)).astype(np.float32)
    corpus = rng.standard_normal((500, 32)).astype(np.float32)
    big = rng.standard_normal(5 * MiB // 4).astype(np.float32)  # streamed both ways
    with fuzzed.client.session("cpu") as s:
        s.feed_blob("x", x)
        s.feed_blob("C", corpus)
        s.feed_blob("big", big)
        s.run_operator("Cos", ["x"], ["y"])
        np.testing.assert_allclose(s.fetch_blob("y"), np.cos(x.astype(np.float64)), rtol=1e-6, atol=1e-6)
        assert s.fetch_blob("big").tobytes() == big.tobytes()
        scores, indices = s.top_k(x, "C", k=5)
        unit = lambda a: a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)  # noqa: E731
        reference = unit(x.astype(np.float64)) @ unit(corpus.astype(np.float64)).T
        expected = np.argsort(-reference, axis=1, kind="stable")[:, :5]
        np.testing.assert_array_equal(indices, expected)
        np.testing.assert_allclose(scores, np.take_along_axis(reference, expected, axis=1), rtol=1e-5, atol=1e-5)
    assert fuzzed.proc.poll() is None
