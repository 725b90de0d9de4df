"""cosserve.wire reads and writes exactly what protobuf does: property tests against protobuf itself."""

from __future__ import annotations

import array
import ast
import pathlib
import subprocess
import sys
import textwrap
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cosserve import wire
from cosserve.v1 import cosserve_pb2 as pb

WIRE_SOURCE = pathlib.Path(wire.__file__)
MASK64 = (1 << 64) - 1
VARINT, I64, LEN, SGROUP, EGROUP, I32 = 0, 1, 2, 3, 4, 5
PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def num(message: type[Message], name: str) -> int:
    return message.DESCRIPTOR.fields_by_name[name].number


# ---- an encoder of our own, independent of cosserve.wire ---------------------------------------


def varint(value: int, size: int = 0, junk: int = 0) -> bytes:
    """`value` mod 2**64 as a varint of at least `size` bytes (padded: protobuf takes up to 10);
    a 10-byte one also carries `junk` in the bits past 64, which protobuf drops."""
    value &= MASK64
    groups = []
    while True:
        groups.append(value & 0x7F)
        value >>= 7
        if not value and len(groups) >= size:
            break
    if len(groups) == 10:
        groups[9] |= (junk & 0x3F) << 1
    return bytes(g | 0x80 for g in groups[:-1]) + bytes(groups[-1:])


def key(number: int, kind: int, size: int = 0) -> bytes:
    return varint(number << 3 | kind, size)


def ld(number: int, body: bytes) -> bytes:
    return key(number, LEN) + varint(len(body)) + body


def split_fields(buf: bytes) -> list[tuple[int, int, Any]]:
    """(number, wire type, value or payload) of a canonical encoding (SerializeToString's output)."""
    out: list[tuple[int, int, Any]] = []
    pos = 0

    def read() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            byte = buf[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while pos < len(buf):
        tag = read()
        number, kind = tag >> 3, tag & 7
        if kind == VARINT:
            out.append((number, kind, read()))
        elif kind == LEN:
            length = read()
            out.append((number, kind, buf[pos : pos + length]))
            pos += length
        else:
            size = 8 if kind == I64 else 4
            out.append((number, kind, buf[pos : pos + size]))
            pos += size
    return out


def read_packed(payload: bytes) -> list[int]:
    values, value, shift = [], 0, 0
    for byte in payload:
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            values.append(value)
            value = shift = 0
    return values


# ---- random messages ----------------------------------------------------------------------------

texts = st.text(max_size=6)
dtypes = st.one_of(st.sampled_from(pb.DType.values()), st.integers(-(2**31), 2**31 - 1))
dims = st.one_of(st.integers(0, 9), st.integers(-(2**63), 2**63 - 1))
shapes = st.lists(dims, max_size=4)
blobs = st.binary(max_size=24)

tensors = st.builds(lambda d, s, b: pb.Tensor(dtype=d, shape=s, data=b), dtypes, shapes, blobs)

MESSAGES: dict[type[Message], st.SearchStrategy[Message]] = {
    pb.FeedBlobRequest: st.builds(
        lambda s, n, t: pb.FeedBlobRequest(session_id=s, name=n, tensor=t), texts, texts, st.none() | tensors
    ),
    pb.FeedBlobChunk: st.builds(
        lambda s, n, d, sh, b: pb.FeedBlobChunk(session_id=s, name=n, dtype=d, shape=sh, data=b),
        texts, texts, dtypes, shapes, blobs,
    ),
    pb.FetchBlobResponse: st.builds(lambda t: pb.FetchBlobResponse(tensor=t), st.none() | tensors),
    pb.FetchBlobChunk: st.builds(lambda d, s, b: pb.FetchBlobChunk(dtype=d, shape=s, data=b), dtypes, shapes, blobs),
}
# Earlier values for singular message fields, to be merged with the real one.
SUB_MESSAGES = {pb.Tensor.DESCRIPTOR.full_name: tensors}


# ---- rewriting an encoding in ways protobuf must read the same ----------------------------------

_VARINT_TYPES = {
    FieldDescriptor.TYPE_ENUM, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_BOOL,
}


def wire_types(field: FieldDescriptor) -> set[int]:
    """The wire types protobuf reads `field` from; any other makes it an unknown field."""
    if field.type in _VARINT_TYPES:
        return {VARINT, LEN} if _repeated(field) else {VARINT}
    if field.type == field.TYPE_DOUBLE:
        return {I64}
    return {LEN}


def _repeated(field: FieldDescriptor) -> bool:
    # protobuf 7 has no FieldDescriptor.label; protobuf 5.27 has no is_repeated yet.
    return field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED


class Rewriter:
    """Re-encodes a message's canonical bytes in valid ways drawn by hypothesis."""

    def __init__(self, data: st.DataObject) -> None:
        self.draw = data.draw

    def varint(self, value: int) -> bytes:
        size = self.draw(st.sampled_from([0, 0, 0, 2, 10]))
        return varint(value, size, self.draw(st.integers(0, 63)) if size == 10 else 0)

    def key(self, number: int, kind: int) -> bytes:
        return key(number, kind, self.draw(st.sampled_from([0, 0, 0, 5])))  # tags: up to 5 bytes

    def ld(self, number: int, body: bytes) -> bytes:
        # A length takes at most 5 bytes: protobuf 7 refuses a longer one (5.x read up to 10).
        length = varint(len(body), self.draw(st.sampled_from([0, 0, 0, 2, 5])))
        return self.key(number, LEN) + length + body

    def message(self, payload: bytes, desc: Descriptor) -> bytes:
        return b"".join(encoding for _, encoding in self.fields(payload, desc))

    def fields(self, payload: bytes, desc: Descriptor) -> list[tuple[int, bytes]]:
        """The fields of `payload` (a `desc`), re-encoded, each as (number, bytes)."""
        out: list[tuple[int, bytes]] = []
        for number, kind, value in split_fields(payload):
            field = desc.fields_by_number[number]
            repeated = _repeated(field)
            if not repeated and self.draw(st.booleans()):  # an earlier value, that the real one replaces
                out.append((number, self.earlier(field)))
            if kind == VARINT:
                if field.type == field.TYPE_ENUM:  # an int32: only the low 32 bits count
                    value += self.draw(st.integers(0, 2**32 - 1)) << 32
                out.append((number, self.key(number, VARINT) + self.varint(value)))
            elif field.type == field.TYPE_MESSAGE:
                inner = self.fields(value, field.message_type)
                if repeated:
                    out.append((number, self.ld(number, b"".join(e for _, e in inner))))
                else:  # a singular message may come in several parts that protobuf merges
                    for part in self.parts([e for _, e in inner]):
                        out.append((number, self.ld(number, b"".join(part))))
            elif repeated and field.type in _VARINT_TYPES:  # packed: runs, each packed or not
                for run in self.parts(read_packed(value)):
                    if self.draw(st.booleans()):
                        out.append((number, self.ld(number, b"".join(self.varint(v) for v in run))))
                    else:
                        out += [(number, self.key(number, VARINT) + self.varint(v)) for v in run]
            elif kind == LEN:
                out.append((number, self.ld(number, value)))
            else:
                out.append((number, self.key(number, kind) + value))
        out += [self.unknown(desc) for _ in range(self.draw(st.integers(0, 3)))]
        return self.shuffle(out)

    def earlier(self, field: FieldDescriptor) -> bytes:
        number = field.number
        if field.type == field.TYPE_MESSAGE:
            return self.ld(number, self.draw(SUB_MESSAGES[field.message_type.full_name]).SerializeToString())
        if field.type == field.TYPE_STRING:
            return self.ld(number, self.draw(texts).encode())
        if field.type == field.TYPE_BYTES:
            return self.ld(number, self.draw(blobs))
        if field.type == field.TYPE_DOUBLE:
            return self.key(number, I64) + self.draw(st.binary(min_size=8, max_size=8))
        return self.key(number, VARINT) + self.varint(self.draw(st.integers(0, MASK64)))

    def parts(self, items: list[Any]) -> list[list[Any]]:
        cuts = sorted(self.draw(st.lists(st.integers(0, len(items)), max_size=2)))
        bounds = [0, *cuts, len(items)]
        return [items[a:b] for a, b in zip(bounds, bounds[1:])]

    def shuffle(self, items: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
        # Any order, except that occurrences of one number keep theirs (it decides what wins).
        order = self.draw(st.permutations(range(len(items))))
        queues: dict[int, deque[bytes]] = defaultdict(deque)
        for number, encoding in items:
            queues[number].append(encoding)
        return [(items[i][0], queues[items[i][0]].popleft()) for i in order]

    def unknown(self, desc: Descriptor) -> tuple[int, bytes]:
        """A field protobuf skips: a number `desc` lacks, or one it has with another wire type."""
        kind = self.draw(st.sampled_from([VARINT, I64, LEN, SGROUP, I32]))
        numbers = st.one_of(st.integers(1, 40), st.integers(1, 2**29 - 1))  # 1- to 5-byte tags
        unused = numbers.filter(lambda n: n not in desc.fields_by_number)
        mistyped = [f.number for f in desc.fields if kind not in wire_types(f)]
        number = self.draw(st.one_of(unused, st.sampled_from(mistyped)) if mistyped else unused)
        return number, self.any_field(number, kind, 0)

    def any_field(self, number: int, kind: int, depth: int) -> bytes:
        if kind == VARINT:
            return self.key(number, kind) + self.varint(self.draw(st.integers(0, MASK64)))
        if kind in (I64, I32):
            size = 8 if kind == I64 else 4
            return self.key(number, kind) + self.draw(st.binary(min_size=size, max_size=size))
        if kind == LEN:  # anything: protobuf does not look inside an unknown field
            return self.ld(number, self.draw(st.binary(max_size=12)))
        inner = []
        for _ in range(self.draw(st.integers(0, 3))):
            inner_kind = self.draw(st.sampled_from([VARINT, I64, LEN, I32] + ([SGROUP] if depth < 3 else [])))
            inner.append(self.any_field(self.draw(st.integers(1, 2**29 - 1)), inner_kind, depth + 1))
        return self.key(number, SGROUP) + b"".join(inner) + self.key(number, EGROUP)


# ---- comparing the decoders with protobuf --------------------------------------------------------


def span_bytes(buf: wire.Buffer, span: wire.Span) -> bytes:
    assert 0 <= span.start <= span.end <= len(buf)
    return bytes(buf[span.start : span.end])


def tensor_of(buf: wire.Buffer, frame: wire.TensorFrame) -> tuple[int, tuple[int, ...], bytes]:
    return frame.dtype, frame.shape, span_bytes(buf, frame.data)


def expected_tensor(message: Any) -> tuple[int, tuple[int, ...], bytes]:
    return message.dtype, tuple(message.shape), message.data


def check_feed_blob_request(buf: wire.Buffer, m: pb.FeedBlobRequest) -> None:
    frame = wire.decode_feed_blob_request(buf)
    assert (frame.session_id, frame.name) == (m.session_id, m.name)
    assert tensor_of(buf, frame.tensor) == expected_tensor(m.tensor)


def check_feed_blob_chunk(buf: wire.Buffer, m: pb.FeedBlobChunk) -> None:
    frame = wire.decode_feed_blob_chunk(buf)
    assert (frame.session_id, frame.name, frame.dtype, frame.shape) == (m.session_id, m.name, m.dtype, tuple(m.shape))
    assert span_bytes(buf, frame.data) == m.data


def check_fetch_blob_response(buf: wire.Buffer, m: pb.FetchBlobResponse) -> None:
    assert tensor_of(buf, wire.decode_fetch_blob_response(buf)) == expected_tensor(m.tensor)


def check_fetch_blob_chunk(buf: wire.Buffer, m: pb.FetchBlobChunk) -> None:
    assert tensor_of(buf, wire.decode_fetch_blob_chunk(buf)) == expected_tensor(m)


CHECKS: dict[type[Message], Callable[[Any, Any], None]] = {
    pb.FeedBlobRequest: check_feed_blob_request,
    pb.FeedBlobChunk: check_feed_blob_chunk,
    pb.FetchBlobResponse: check_fetch_blob_response,
    pb.FetchBlobChunk: check_fetch_blob_chunk,
}
DECODERS: dict[type[Message], Callable[[wire.Buffer], object]] = {
    pb.FeedBlobRequest: wire.decode_feed_blob_request,
    pb.FeedBlobChunk: wire.decode_feed_blob_chunk,
    pb.FetchBlobResponse: wire.decode_fetch_blob_response,
    pb.FetchBlobChunk: wire.decode_fetch_blob_chunk,
}


BUFFER_KINDS = ["bytes", "bytearray", "memoryview", "signed"]


def as_buffer(encoded: bytes, kind: str) -> wire.Buffer:
    """The same bytes as bytes, bytearray, a memoryview that does not start at its object's 0, or
    a memoryview of signed chars (whose items are not the bytes' values)."""
    if kind == "bytes":
        return encoded
    if kind == "bytearray":
        return bytearray(encoded)
    if kind == "signed":
        return memoryview(encoded).cast("b")
    return memoryview(b"\xff\xff\xff" + encoded)[3:]


def ids(cls: type) -> str:
    return cls.__name__


@pytest.mark.parametrize("cls", list(MESSAGES), ids=ids)
@PROPERTY
@given(data=st.data())
def test_decoders_read_what_protobuf_reads(cls: type[Message], data: st.DataObject) -> None:
    original = data.draw(MESSAGES[cls])
    encoded = Rewriter(data).message(original.SerializeToString(), cls.DESCRIPTOR)
    parsed = cls.FromString(encoded)  # the rewriting must stay valid protobuf
    CHECKS[cls](as_buffer(encoded, data.draw(st.sampled_from(BUFFER_KINDS))), parsed)


@pytest.mark.parametrize("cls", list(MESSAGES), ids=ids)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_decoders_read_canonical_encodings(cls: type[Message], data: st.DataObject) -> None:
    original = data.draw(MESSAGES[cls])
    CHECKS[cls](original.SerializeToString(), original)


def test_decode_tensor_merges_parts() -> None:
    dtype, shape, data = num(pb.Tensor, "dtype"), num(pb.Tensor, "shape"), num(pb.Tensor, "data")
    first = key(dtype, VARINT) + varint(pb.FLOAT32) + ld(shape, varint(2)) + ld(data, b"old")
    second = key(shape, VARINT) + varint(3) + ld(data, b"new")
    buf = b"xx" + first + second
    parts = [wire.Span(2, 2 + len(first)), wire.Span(2 + len(first), len(buf))]
    frame = wire.decode_tensor(buf, parts)
    assert tensor_of(buf, frame) == (pb.FLOAT32, (2, 3), b"new")
    assert wire.decode_tensor(buf, []) == wire.TensorFrame(0, (), wire.Span(0, 0))
    with pytest.raises(wire.WireError):
        wire.decode_tensor(buf, [wire.Span(0, len(buf) + 1)])
    # A part is a Tensor inside a top-level message (depth 1), as in FeedBlobRequest: groups 100
    # deep in it go past protobuf's limit, 99 do not (the MALFORMED and EDGES cases).
    with pytest.raises(wire.WireError):
        wire.decode_tensor(groups(100), [wire.Span(0, len(groups(100)))])
    assert wire.decode_tensor(groups(99), [wire.Span(0, len(groups(99)))]) == wire.TensorFrame(0, (), wire.Span(0, 0))


def test_fields_yields_every_field_and_groups_whole() -> None:
    group_body = key(1, VARINT) + varint(7) + key(2, SGROUP) + key(2, EGROUP)
    buf = (
        key(1, VARINT) + varint(2**64 - 1)
        + key(2, I64) + bytes(range(8))
        + ld(3, b"abc")
        + key(4, SGROUP) + group_body + key(4, EGROUP)
        + key(5, I32) + bytes(4)
    )
    got = list(wire.fields(buf))
    assert [(n, k) for n, k, _, _ in got] == [(1, VARINT), (2, I64), (3, LEN), (4, SGROUP), (5, I32)]
    assert got[0][2] == 2**64 - 1
    assert buf[got[1][2] : got[1][3]] == bytes(range(8))
    assert buf[got[2][2] : got[2][3]] == b"abc"
    assert buf[got[3][2] : got[3][3]] == group_body  # up to the matching end-group tag
    assert [n for n, *_ in wire.fields(buf, got[3][2], got[3][3])] == [1, 2]
    assert got[4][3] == len(buf)


# ---- encoders -----------------------------------------------------------------------------------

data_buffers = st.one_of(
    blobs,
    blobs.map(bytearray),
    blobs.map(lambda b: memoryview(b)),
    # A view of 4-byte items: its size is nbytes, not len().
    st.lists(st.integers(-(2**31), 2**31 - 1), max_size=4).map(lambda v: memoryview(array.array("i", v))),
)


def raw(data: wire.Buffer) -> bytes:
    return memoryview(data).tobytes()


def assert_encodes(pieces: list[wire.Buffer], expected: Message, *data: wire.Buffer) -> None:
    encoded = b"".join(pieces)
    assert type(expected).FromString(encoded) == expected
    # Byte for byte as protobuf writes: it is deterministic for these messages (no maps).
    assert expected.SerializeToString(deterministic=True) == expected.SerializeToString()
    assert encoded == expected.SerializeToString()
    for item in data:  # the data goes in as given, never copied
        assert not memoryview(item).nbytes or any(piece is item for piece in pieces)


@PROPERTY
@given(dtypes, shapes, data_buffers, texts, texts)
def test_tensor_encoders_write_what_protobuf_writes(
    dtype: int, shape: list[int], data: wire.Buffer, session_id: str, name: str
) -> None:
    tensor = pb.Tensor(dtype=dtype, shape=shape, data=raw(data))
    assert_encodes(wire.tensor_message(dtype, shape, data), tensor, data)
    assert_encodes(
        wire.feed_blob_request(session_id, name, dtype, shape, data),
        pb.FeedBlobRequest(session_id=session_id, name=name, tensor=tensor),
        data,
    )
    assert_encodes(wire.fetch_blob_response(dtype, shape, data), pb.FetchBlobResponse(tensor=tensor), data)
    chunk = pb.FetchBlobChunk(dtype=dtype, shape=shape, data=raw(data))
    assert_encodes(wire.fetch_blob_chunk(dtype, shape, data, header=True), chunk, data)
    assert_encodes(wire.fetch_blob_chunk(dtype, shape, data, header=False), pb.FetchBlobChunk(data=raw(data)), data)


@PROPERTY
@given(dtypes, shapes, data_buffers, texts, texts)
def test_feed_chunk_encoders_write_what_protobuf_writes(
    dtype: int, shape: list[int], data: wire.Buffer, session_id: str, name: str
) -> None:
    header = wire.feed_blob_chunk_header(session_id, name, dtype, shape)
    first = pb.FeedBlobChunk(session_id=session_id, name=name, dtype=dtype, shape=shape, data=raw(data))
    assert_encodes([header, *wire.feed_blob_chunk_data(data)], first, data)
    assert_encodes(wire.feed_blob_chunk_data(data), pb.FeedBlobChunk(data=raw(data)), data)


@pytest.mark.parametrize("dtype, shape", [(2**31, []), (-(2**31) - 1, []), (1, [2**63]), (1, [-(2**63) - 1])])
def test_encoders_refuse_what_protobuf_refuses(dtype: int, shape: list[int]) -> None:
    with pytest.raises(ValueError):
        pb.Tensor(dtype=dtype, shape=shape)
    with pytest.raises(ValueError):
        wire.tensor_message(dtype, shape, b"")


# ---- malformed and edge-case encodings ----------------------------------------------------------

T_DATA = num(pb.Tensor, "data")
FEED_SESSION, FEED_TENSOR = num(pb.FeedBlobRequest, "session_id"), num(pb.FeedBlobRequest, "tensor")
CHUNK_NAME, CHUNK_DATA = num(pb.FeedBlobChunk, "name"), num(pb.FeedBlobChunk, "data")
FETCH_TENSOR = num(pb.FetchBlobResponse, "tensor")
OUT_DTYPE, OUT_SHAPE = num(pb.FetchBlobChunk, "dtype"), num(pb.FetchBlobChunk, "shape")
UNKNOWN = 99  # no message here has it


def groups(depth: int) -> bytes:
    return key(UNKNOWN, SGROUP) * depth + key(UNKNOWN, EGROUP) * depth


MALFORMED = [
    ("truncated-varint", pb.FetchBlobChunk, key(OUT_DTYPE, VARINT) + b"\x80"),
    ("truncated-tag", pb.FetchBlobChunk, b"\x80"),
    ("varint-of-11-bytes", pb.FetchBlobChunk, key(OUT_DTYPE, VARINT) + b"\xff" * 10 + b"\x01"),
    ("tag-of-6-bytes", pb.FetchBlobChunk, key(OUT_DTYPE, VARINT, 6) + b"\x05"),
    ("tag-above-32-bits", pb.FetchBlobChunk, varint(1 << 32 | OUT_DTYPE << 3) + b"\x05"),
    ("field-number-0", pb.FeedBlobChunk, key(0, VARINT) + b"\x05"),
    ("length-past-end", pb.FeedBlobRequest, key(FEED_SESSION, LEN) + varint(5) + b"ab"),
    ("length-past-sub-message", pb.FeedBlobRequest, ld(FEED_TENSOR, key(T_DATA, LEN) + varint(3)) + b"abc"),
    ("fixed64-past-end", pb.FeedBlobChunk, key(UNKNOWN, I64) + bytes(7)),
    ("fixed32-past-end", pb.FeedBlobChunk, key(UNKNOWN, I32) + bytes(3)),
    ("wire-type-6", pb.FeedBlobChunk, key(UNKNOWN, 6)),
    ("wire-type-7", pb.FeedBlobChunk, key(UNKNOWN, 7) + bytes(8)),
    ("end-group-without-start", pb.FetchBlobResponse, key(UNKNOWN, EGROUP)),
    ("end-group-in-sub-message", pb.FetchBlobResponse, ld(FETCH_TENSOR, key(UNKNOWN, EGROUP))),
    ("end-group-mismatched", pb.FeedBlobRequest, key(UNKNOWN, SGROUP) + key(UNKNOWN + 1, EGROUP)),
    (
        "end-group-nested-mismatched",
        pb.FetchBlobChunk,
        key(UNKNOWN, SGROUP) + key(UNKNOWN + 1, SGROUP) + key(UNKNOWN, EGROUP) + key(UNKNOWN + 1, EGROUP),
    ),
    ("group-without-end", pb.FetchBlobChunk, key(UNKNOWN, SGROUP) + key(OUT_DTYPE, VARINT) + b"\x01"),
    ("group-ends-past-message", pb.FeedBlobRequest, ld(FEED_TENSOR, key(UNKNOWN, SGROUP)) + key(UNKNOWN, EGROUP)),
    ("groups-101-deep", pb.FetchBlobChunk, groups(101)),
    ("groups-100-deep-in-tensor", pb.FeedBlobRequest, ld(FEED_TENSOR, groups(100))),
    ("groups-100-deep-in-fetch-tensor", pb.FetchBlobResponse, ld(FETCH_TENSOR, groups(100))),
    ("packed-shape-truncated", pb.FetchBlobChunk, ld(OUT_SHAPE, b"\x01\x80")),
    ("utf8-session-id", pb.FeedBlobRequest, ld(FEED_SESSION, b"\xff")),
    ("utf8-replaced-later", pb.FeedBlobRequest, ld(FEED_SESSION, b"\xc0\x80") + ld(FEED_SESSION, b"ok")),
    ("utf8-surrogate", pb.FeedBlobChunk, ld(CHUNK_NAME, "\ud800".encode("utf-8", "surrogatepass"))),
    # Each part of a message is parsed on its own: a field split across two parts is no field.
    (
        "tensor-field-across-parts",
        pb.FeedBlobRequest,
        ld(FEED_TENSOR, key(T_DATA, LEN) + varint(3) + b"a") + ld(FEED_TENSOR, b"bc"),
    ),
]


@pytest.mark.parametrize("cls, encoded", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_is_refused_by_both(cls: type[Message], encoded: bytes) -> None:
    with pytest.raises(DecodeError):
        cls.FromString(encoded)
    with pytest.raises(wire.WireError):
        DECODERS[cls](encoded)


EDGES = [
    ("groups-100-deep", pb.FetchBlobChunk, groups(100)),
    ("groups-99-deep-in-tensor", pb.FeedBlobRequest, ld(FEED_TENSOR, groups(99))),
    ("groups-99-deep-in-fetch-tensor", pb.FetchBlobResponse, ld(FETCH_TENSOR, groups(99))),
    ("varint-of-10-bytes-with-bits-past-64", pb.FetchBlobChunk, key(OUT_SHAPE, VARINT) + varint(5, 10, 63)),
    ("dtype-above-32-bits", pb.FetchBlobChunk, key(OUT_DTYPE, VARINT) + varint(pb.INT8 + (7 << 32))),
    ("dtype-negative", pb.FetchBlobChunk, key(OUT_DTYPE, VARINT) + varint(-3)),
    ("tag-of-5-bytes", pb.FetchBlobChunk, key(OUT_DTYPE, VARINT, 5) + b"\x05"),
    ("largest-field-number", pb.FeedBlobChunk, key(2**29 - 1, VARINT) + b"\x05"),
    ("known-number-other-wire-type", pb.FeedBlobChunk, key(CHUNK_DATA, VARINT) + b"\x05" + ld(CHUNK_NAME, b"n")),
    ("bad-utf8-in-group", pb.FeedBlobRequest, key(UNKNOWN, SGROUP) + ld(FEED_SESSION, b"\xff") + key(UNKNOWN, EGROUP)),
    ("empty-packed-shape", pb.FetchBlobChunk, ld(OUT_SHAPE, b"") + key(OUT_SHAPE, VARINT) + b"\x02"),
]


@pytest.mark.parametrize("cls, encoded", [c[1:] for c in EDGES], ids=[c[0] for c in EDGES])
def test_edge_cases_are_read_as_protobuf_reads_them(cls: type[Message], encoded: bytes) -> None:
    CHECKS[cls](encoded, cls.FromString(encoded))


# ---- methods ------------------------------------------------------------------------------------

SERVICE = pb.DESCRIPTOR.services_by_name["Cosserve"]
FRAMED_MESSAGES = {  # the framed side of each method: the messages this module's decoders read
    "FeedBlob": ("input", pb.FeedBlobRequest),
    "FeedBlobStream": ("input", pb.FeedBlobChunk),
    "FetchBlob": ("output", pb.FetchBlobResponse),
    "FetchBlobStream": ("output", pb.FetchBlobChunk),
}


def test_framed_methods_match_the_service() -> None:
    assert wire.SERVICE_NAME == "cosserve.v1.Cosserve"
    assert set(wire.FRAMED_METHODS) == set(FRAMED_MESSAGES)
    for name, method in wire.FRAMED_METHODS.items():
        desc = SERVICE.methods_by_name[name]
        side, message = FRAMED_MESSAGES[name]
        assert method.name == name
        assert (method.request_streaming, method.response_streaming) == (desc.client_streaming, desc.server_streaming)
        assert (method.request_bytes, method.response_bytes) == (side == "input", side == "output")
        assert getattr(desc, f"{side}_type") is message.DESCRIPTOR
        assert wire.method_path(name) == f"/cosserve.v1.Cosserve/{name}"
    with pytest.raises(KeyError):
        wire.method_path("NoSuchMethod")


# ---- the module itself --------------------------------------------------------------------------


def test_imports_without_numpy_or_torch() -> None:
    # A bare `cosserve` package: its __init__ imports the (numpy) client, which is not wire's doing.
    code = textwrap.dedent(
        f"""
        import sys, types
        for name in ("numpy", "torch", "ml_dtypes", "grpc"):
            sys.modules[name] = None  # import fails
        package = types.ModuleType("cosserve")
        package.__path__ = [{str(WIRE_SOURCE.parent)!r}]
        sys.modules["cosserve"] = package
        import cosserve.wire
        pieces = cosserve.wire.fetch_blob_chunk(1, [2], b"ab", header=True)
        assert cosserve.wire.decode_fetch_blob_chunk(b"".join(pieces)).shape == (2,)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def has_int_literal(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Constant) and type(n.value) is int for n in ast.walk(node))


def test_no_literal_field_numbers() -> None:
    # Field numbers come from the descriptors (wire._number): no helper is handed a literal one,
    # and no decoder compares a field's number with one.
    tree = ast.parse(WIRE_SOURCE.read_text())
    # Every helper that takes a field number takes it first, as `number`.
    takes_number = {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and node.args.args and node.args.args[0].arg == "number"
    }
    assert {"field_header", "_key"} <= takes_number
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in takes_number:
            assert node.args and not has_int_literal(node.args[0]), f"line {node.lineno}: a literal field number"
        if isinstance(node, ast.Compare):  # `number == 3`
            names = [n.id for n in (node.left, *node.comparators) if isinstance(n, ast.Name)]
            if "number" in names:
                assert not has_int_literal(node), f"line {node.lineno}: a field number compared with a literal"
