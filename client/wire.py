"""Protobuf wire framing of the blob messages (FeedBlob, FetchBlob and their streams), read and written
without copying their tensor data."""

# The protobuf runtime copies a bytes field when it is set, again when the message is serialized
# and again when it is parsed, and only takes `bytes`. For the blob messages, which carry tensors
# of any size, we read and write the same wire format here: encoders return pieces that `b"".join`
# copies once into the buffer grpc sends, and decoders return spans of the buffer grpc hands over.
# Compute stays plain protobuf: its messages are small, and protobuf's own parser reads them far
# faster than Python could. Every decoder must accept exactly what `pb.X.FromString` accepts and
# read it the same way; the tests hold it to that with protobuf itself (tests/protocols/test_wire.py).

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

from cosserve.v1 import cosserve_pb2 as pb

__all__ = [
    "FRAMED_METHODS",
    "SERVICE_NAME",
    "Buffer",
    "FeedBlobFrame",
    "FeedChunkFrame",
    "FramedMethod",
    "Span",
    "TensorFrame",
    "WireError",
    "decode_feed_blob_chunk",
    "decode_feed_blob_request",
    "decode_fetch_blob_chunk",
    "decode_fetch_blob_response",
    "decode_tensor",
    "feed_blob_chunk_data",
    "feed_blob_chunk_header",
    "feed_blob_request",
    "fetch_blob_chunk",
    "fetch_blob_response",
    "field_header",
    "fields",
    "method_path",
    "tensor_message",
]

Buffer = bytes | bytearray | memoryview


class WireError(ValueError):
    """An encoded message that protobuf would refuse to parse."""


class Span(NamedTuple):
    """The byte range buffer[start:end] of a field's payload."""

    start: int
    end: int


class TensorFrame(NamedTuple):
    dtype: int
    shape: tuple[int, ...]
    data: Span  # Span(0, 0) when the message has no data field


class FeedBlobFrame(NamedTuple):
    session_id: str
    name: str
    tensor: TensorFrame


class FeedChunkFrame(NamedTuple):
    session_id: str
    name: str
    dtype: int
    shape: tuple[int, ...]
    data: Span


# ---- field numbers, from the descriptors ------------------------------------------------------

# Wire types (the low 3 bits of a tag).
_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5
_FIXED_SIZE = {_I64: 8, _I32: 4}

_MASK64 = (1 << 64) - 1
# protobuf's default recursion limit: a top-level message is depth 0, every sub-message or group
# inside it one more; upb refuses a message nested deeper than this.
_MAX_DEPTH = 100


def _number(message: Any, name: str, kind: str, of: Any = None) -> int:
    """The number of field `name` of `message`, checked to have the type this module reads it as,
    so that a change to the .proto fails at import instead of misreading the wire."""
    field = message.DESCRIPTOR.fields_by_name[name]
    if field.type != getattr(field, "TYPE_" + kind) or (of is not None and field.message_type is not of.DESCRIPTOR):
        raise TypeError(f"{message.DESCRIPTOR.full_name}.{name} is not a {kind} field as cosserve.wire reads it")
    return int(field.number)


class _TensorNumbers(NamedTuple):
    dtype: int
    shape: int
    data: int

    @classmethod
    def of(cls, message: Any) -> _TensorNumbers:
        return cls(
            _number(message, "dtype", "ENUM"), _number(message, "shape", "INT64"), _number(message, "data", "BYTES")
        )


_TENSOR = _TensorNumbers.of(pb.Tensor)
_FEED_CHUNK = _TensorNumbers.of(pb.FeedBlobChunk)
_FETCH_CHUNK = _TensorNumbers.of(pb.FetchBlobChunk)
_FEED_SESSION = _number(pb.FeedBlobRequest, "session_id", "STRING")
_FEED_NAME = _number(pb.FeedBlobRequest, "name", "STRING")
_FEED_TENSOR = _number(pb.FeedBlobRequest, "tensor", "MESSAGE", pb.Tensor)
_CHUNK_SESSION = _number(pb.FeedBlobChunk, "session_id", "STRING")
_CHUNK_NAME = _number(pb.FeedBlobChunk, "name", "STRING")
_FETCH_TENSOR = _number(pb.FetchBlobResponse, "tensor", "MESSAGE", pb.Tensor)

_NO_DATA = Span(0, 0)
_NO_TENSOR = TensorFrame(0, (), _NO_DATA)


# ---- reading ----------------------------------------------------------------------------------


def _view(buffer: Buffer) -> Buffer:
    # Offsets are byte offsets: a memoryview of wider items (an array's) is read as its bytes.
    if isinstance(buffer, memoryview) and (buffer.format != "B" or buffer.ndim != 1):
        return buffer.cast("B")
    return buffer


def _varint(buf: Buffer, pos: int, end: int) -> tuple[int, int]:
    """(value mod 2**64, position after it). As protobuf: at most 10 bytes, and the bits a 10th
    byte carries beyond 64 are dropped rather than refused."""
    if pos < end and buf[pos] < 0x80:  # one byte: by far the most common
        return buf[pos], pos + 1
    value = shift = 0
    for i in range(pos, min(pos + 10, end)):
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value & _MASK64, i + 1
        shift += 7
    raise WireError("truncated or overlong varint")


def _tag(buf: Buffer, pos: int, end: int) -> tuple[int, int, int]:
    """(field number, wire type, position after the tag). upb reads tags as 32-bit varints of at
    most 5 bytes, and field number 0 does not exist."""
    value = shift = 0
    for i in range(pos, min(pos + 5, end)):
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if value >> 32 or value >> 3 == 0:
                raise WireError("invalid field number")
            return value >> 3, value & 7, i + 1
        shift += 7
    raise WireError("truncated or overlong tag")


def _skip_group(buf: Buffer, pos: int, end: int, number: int, depth: int) -> tuple[int, int]:
    """Skip the contents of a group that opened at `pos` (at nesting `depth`) with `number`:
    (start of its end-group tag, position after it). Iterative, so no input can exhaust Python's
    stack; nested groups must close in order, as upb requires."""
    open_groups = [number]
    while True:
        if depth + len(open_groups) - 1 > _MAX_DEPTH:
            raise WireError("groups nested too deeply")
        if pos >= end:
            raise WireError("group without an end-group")
        tag_start = pos
        inner, kind, pos = _tag(buf, pos, end)
        if kind == _VARINT:
            _, pos = _varint(buf, pos, end)
        elif kind == _LEN:
            length, pos = _varint(buf, pos, end)
            pos += length
        elif kind in _FIXED_SIZE:
            pos += _FIXED_SIZE[kind]
        elif kind == _SGROUP:
            open_groups.append(inner)
        elif kind == _EGROUP:
            if open_groups.pop() != inner:
                raise WireError("end-group does not match its start-group")
            if not open_groups:
                return tag_start, pos
        else:
            raise WireError(f"invalid wire type {kind}")
        if pos > end:
            raise WireError("a field runs past the end")


def _fields(buf: Buffer, pos: int, end: int, depth: int) -> Iterator[tuple[int, int, int, int]]:
    while pos < end:
        number, kind, pos = _tag(buf, pos, end)
        if kind == _VARINT:
            value, pos = _varint(buf, pos, end)
            yield number, kind, value, pos
        elif kind == _LEN:
            length, start = _varint(buf, pos, end)
            pos = start + length
            if pos > end:
                raise WireError("a field runs past the end")
            yield number, kind, start, pos
        elif kind in _FIXED_SIZE:
            start, pos = pos, pos + _FIXED_SIZE[kind]
            if pos > end:
                raise WireError("a field runs past the end")
            yield number, kind, start, pos
        elif kind == _SGROUP:
            start = pos
            stop, pos = _skip_group(buf, pos, end, number, depth + 1)
            yield number, kind, start, stop
        elif kind == _EGROUP:
            raise WireError("end-group without a start-group")
        else:
            raise WireError(f"invalid wire type {kind}")


def _bounds(buf: Buffer, start: int, end: int) -> None:
    if not 0 <= start <= end <= len(buf):
        raise WireError(f"span {start}:{end} is outside the {len(buf)}-byte buffer")


def fields(buffer: Buffer, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, int, int]]:
    """Yield (field number, wire type, value or start, end) of every field of buffer[start:end].

    A varint field yields its value (mod 2**64) and the position after it; every other field the
    byte range of its payload: the bytes of a length-delimited field, the 8 or 4 bytes of a fixed
    one, and for a group (wire type 3) everything up to its matching end-group tag.
    """
    buf = _view(buffer)
    stop = len(buf) if end is None else end
    _bounds(buf, start, stop)
    return _fields(buf, start, stop, 0)


def _text(buf: Buffer, start: int, end: int) -> str:
    try:
        return str(buf[start:end], "utf-8")
    except UnicodeDecodeError:
        # proto3 strings must be valid UTF-8; protobuf refuses the message otherwise.
        raise WireError("a string field is not valid UTF-8") from None


def _int32(value: int) -> int:
    # An enum is an int32: protobuf keeps the low 32 bits of the varint, signed.
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >> 31 else value


def _int64(value: int) -> int:
    return value - (1 << 64) if value >> 63 else value


class _TensorReader:
    """Merges the dtype, shape and data fields of a Tensor-like message as protobuf does: the last
    dtype and data win, shape values (packed or not) append."""

    __slots__ = ("buf", "numbers", "dtype", "shape", "data")

    def __init__(self, buf: Buffer, numbers: _TensorNumbers) -> None:
        self.buf = buf
        self.numbers = numbers
        self.dtype = 0
        self.shape: list[int] = []
        self.data = _NO_DATA

    def take(self, number: int, kind: int, value: int, end: int) -> bool:
        """Read the field if it is one of ours with the wire type protobuf reads it from; a known
        number with another wire type is an unknown field to protobuf, and so to us."""
        numbers = self.numbers
        if number == numbers.dtype:
            if kind == _VARINT:
                self.dtype = _int32(value)
        elif number == numbers.shape:
            if kind == _VARINT:
                self.shape.append(_int64(value))
            elif kind == _LEN:
                pos = value
                while pos < end:
                    dim, pos = _varint(self.buf, pos, end)
                    self.shape.append(_int64(dim))
        elif number == numbers.data:
            if kind == _LEN:
                self.data = Span(value, end)
        else:
            return False
        return True

    def frame(self) -> TensorFrame:
        return TensorFrame(self.dtype, tuple(self.shape), self.data)


def _tensor(buf: Buffer, parts: Sequence[Span]) -> TensorFrame:
    """The parts of a Tensor field of a top-level message, merged; its fields sit at depth 1."""
    if not parts:
        return _NO_TENSOR
    reader = _TensorReader(buf, _TENSOR)
    for start, end in parts:
        for number, kind, value, stop in _fields(buf, start, end, 1):
            reader.take(number, kind, value, stop)
    return reader.frame()


def decode_tensor(buffer: Buffer, parts: Sequence[Span]) -> TensorFrame:
    """The Tensor whose parts (the payloads of every occurrence of a singular Tensor field of a
    top-level message) are `parts`, merged as protobuf merges them."""
    buf = _view(buffer)
    for start, end in parts:
        _bounds(buf, start, end)
    return _tensor(buf, parts)


def decode_feed_blob_request(buffer: Buffer) -> FeedBlobFrame:
    """An encoded FeedBlobRequest; the tensor data stays in `buffer`."""
    buf = _view(buffer)
    session_id = name = ""
    tensor: list[Span] = []
    for number, kind, value, end in _fields(buf, 0, len(buf), 0):
        if kind != _LEN:
            continue
        if number == _FEED_SESSION:
            session_id = _text(buf, value, end)
        elif number == _FEED_NAME:
            name = _text(buf, value, end)
        elif number == _FEED_TENSOR:
            tensor.append(Span(value, end))
    return FeedBlobFrame(session_id, name, _tensor(buf, tensor))


def decode_feed_blob_chunk(buffer: Buffer) -> FeedChunkFrame:
    """An encoded FeedBlobChunk; the data stays in `buffer`."""
    buf = _view(buffer)
    session_id = name = ""
    reader = _TensorReader(buf, _FEED_CHUNK)
    for number, kind, value, end in _fields(buf, 0, len(buf), 0):
        if reader.take(number, kind, value, end) or kind != _LEN:
            continue
        if number == _CHUNK_SESSION:
            session_id = _text(buf, value, end)
        elif number == _CHUNK_NAME:
            name = _text(buf, value, end)
    return FeedChunkFrame(session_id, name, reader.dtype, tuple(reader.shape), reader.data)


def decode_fetch_blob_response(buffer: Buffer) -> TensorFrame:
    """FetchBlobResponse.tensor of an encoded FetchBlobResponse; the data stays in `buffer`."""
    buf = _view(buffer)
    parts = [
        Span(value, end)
        for number, kind, value, end in _fields(buf, 0, len(buf), 0)
        if number == _FETCH_TENSOR and kind == _LEN
    ]
    return _tensor(buf, parts)


def decode_fetch_blob_chunk(buffer: Buffer) -> TensorFrame:
    """An encoded FetchBlobChunk (dtype, shape, data); the data stays in `buffer`."""
    buf = _view(buffer)
    reader = _TensorReader(buf, _FETCH_CHUNK)
    for number, kind, value, end in _fields(buf, 0, len(buf), 0):
        reader.take(number, kind, value, end)
    return reader.frame()


# ---- writing ----------------------------------------------------------------------------------
# Fields are written in field-number order and default values left out, as SerializeToString
# does, so that both produce the same bytes; message fields are always written (set, though maybe
# empty), as a message built with protobuf has them.


def _uvarint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _signed(value: int, bits: int) -> int:
    """`value` as the unsigned 64-bit varint protobuf writes for an int32 or int64 (a negative one
    takes 10 bytes); ValueError where protobuf would refuse the value."""
    if not -(1 << (bits - 1)) <= value < 1 << (bits - 1):
        raise ValueError(f"{value} does not fit in int{bits}")
    return value & _MASK64


def _key(number: int, kind: int) -> bytes:
    return _uvarint(number << 3 | kind)


def _nbytes(data: Buffer) -> int:
    # len() of a memoryview counts items, not bytes.
    return data.nbytes if isinstance(data, memoryview) else len(data)


def field_header(number: int, length: int) -> bytes:
    """Tag and length of a length-delimited field; the field's `length` bytes follow."""
    return _key(number, _LEN) + _uvarint(length)


def _string(number: int, text: str) -> bytes:
    if not text:
        return b""
    raw = text.encode()
    return field_header(number, len(raw)) + raw


def _head(numbers: _TensorNumbers, dtype: int, shape: Sequence[int]) -> bytes:
    """The dtype and (packed) shape fields of a Tensor-like message."""
    head = _key(numbers.dtype, _VARINT) + _uvarint(_signed(dtype, 32)) if dtype else b""
    if shape:
        packed = b"".join(_uvarint(_signed(dim, 64)) for dim in shape)
        head += field_header(numbers.shape, len(packed)) + packed
    return head


def _data(number: int, data: Buffer) -> list[Buffer]:
    size = _nbytes(data)
    return [field_header(number, size), data] if size else []


def _message(number: int, pieces: list[Buffer]) -> list[Buffer]:
    return [field_header(number, sum(map(_nbytes, pieces))), *pieces]


def tensor_message(dtype: int, shape: Sequence[int], data: Buffer) -> list[Buffer]:
    """A Tensor message, as pieces to join; `data` is one of them, as given (not copied)."""
    return [_head(_TENSOR, dtype, shape), *_data(_TENSOR.data, data)]


def feed_blob_request(session_id: str, name: str, dtype: int, shape: Sequence[int], data: Buffer) -> list[Buffer]:
    """A FeedBlobRequest, as pieces to join; `data` is one of them, as given (not copied)."""
    head = _string(_FEED_SESSION, session_id) + _string(_FEED_NAME, name)
    return [head, *_message(_FEED_TENSOR, tensor_message(dtype, shape, data))]


def feed_blob_chunk_header(session_id: str, name: str, dtype: int, shape: Sequence[int]) -> bytes:
    """The header fields of the first FeedBlobChunk of a stream; its data, if any, may follow
    (b"".join([header, *feed_blob_chunk_data(data)]))."""
    return _string(_CHUNK_SESSION, session_id) + _string(_CHUNK_NAME, name) + _head(_FEED_CHUNK, dtype, shape)


def feed_blob_chunk_data(data: Buffer) -> list[Buffer]:
    """A FeedBlobChunk carrying only data, as pieces to join (none for empty data)."""
    return _data(_FEED_CHUNK.data, data)


def fetch_blob_response(dtype: int, shape: Sequence[int], data: Buffer) -> list[Buffer]:
    """A FetchBlobResponse, as pieces to join; `data` is one of them, as given (not copied)."""
    return _message(_FETCH_TENSOR, tensor_message(dtype, shape, data))


def fetch_blob_chunk(dtype: int, shape: Sequence[int], data: Buffer, *, header: bool) -> list[Buffer]:
    """A FetchBlobChunk, as pieces to join: dtype, shape and data for the first of a stream
    (`header`), the data field alone for the others."""
    pieces = _data(_FETCH_CHUNK.data, data)
    return [_head(_FETCH_CHUNK, dtype, shape), *pieces] if header else pieces


# ---- methods ----------------------------------------------------------------------------------

_SERVICE = pb.DESCRIPTOR.services_by_name["Cosserve"]
SERVICE_NAME: str = _SERVICE.full_name


class FramedMethod(NamedTuple):
    """An RPC whose requests or responses are framed by this module instead of protobuf."""

    name: str
    request_streaming: bool
    response_streaming: bool
    request_bytes: bool  # requests travel as bytes framed and decoded by this module on both sides
    response_bytes: bool  # responses travel as bytes framed and decoded by this module


def _framed(name: str, *, request_bytes: bool, response_bytes: bool) -> FramedMethod:
    method = _SERVICE.methods_by_name[name]
    return FramedMethod(name, method.client_streaming, method.server_streaming, request_bytes, response_bytes)


FRAMED_METHODS: dict[str, FramedMethod] = {
    method.name: method
    for method in (
        _framed("FeedBlob", request_bytes=True, response_bytes=False),
        _framed("FeedBlobStream", request_bytes=True, response_bytes=False),
        _framed("FetchBlob", request_bytes=False, response_bytes=True),
        _framed("FetchBlobStream", request_bytes=False, response_bytes=True),
    )
}


def method_path(name: str) -> str:
    """The gRPC path of method `name` of the service, e.g. "/cosserve.v1.Cosserve/FeedBlob";
    KeyError if the service has no such method."""
    return f"/{SERVICE_NAME}/{_SERVICE.methods_by_name[name].name}"
