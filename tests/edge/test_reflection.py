"""gRPC server reflection, v1 (what current grpcurl asks for first) and v1alpha, on a real server.

The v1 client here is written from grpc's reflection/v1/reflection.proto, field numbers and all,
by hand: it shares no code with the server, which answers v1 with grpcio-reflection's v1alpha
servicer."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.conftest import start_server

V1_METHOD = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
SERVICES = {
    "cosserve.v1.Cosserve",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
}


# ---- protobuf's wire format, as much as reflection v1 needs -----------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _string_field(number: int, text: str) -> bytes:
    data = text.encode()
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _fields(message: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) of each varint or length-delimited field, in order."""
    fields: list[tuple[int, int | bytes]] = []
    pos = 0

    def varint() -> int:
        nonlocal pos
        value = shift = 0
        while True:  # bounded by the message's length: each turn consumes a byte
            byte = message[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    while pos < len(message):
        key = varint()
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            fields.append((number, varint()))
        elif wire_type == 2:
            size = varint()
            fields.append((number, message[pos : pos + size]))
            pos += size
        else:
            raise AssertionError(f"wire type {wire_type} is not in reflection v1")
    return fields


def _one(fields: list[tuple[int, int | bytes]], number: int) -> bytes:
    (value,) = [v for n, v in fields if n == number]
    assert isinstance(value, bytes)
    return value


# ServerReflectionRequest: list_services = 7, file_containing_symbol = 4.
# ServerReflectionResponse: original_request = 2, file_descriptor_response = 4 (repeated bytes
# file_descriptor_proto = 1), list_services_response = 6 (repeated ServiceResponse service = 1, with
# string name = 1), error_response = 7.
def _v1(address: str, requests: list[bytes], metadata: tuple[tuple[str, str], ...] = ()) -> list[list[tuple[int, int | bytes]]]:
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream(V1_METHOD)  # bytes in, bytes out: no stubs
        return [_fields(reply) for reply in call(iter(requests), metadata=metadata, timeout=10)]


def _v1_services(address: str, metadata: tuple[tuple[str, str], ...] = ()) -> set[str]:
    (reply,) = _v1(address, [_string_field(7, "")], metadata)
    listed = _fields(_one(reply, 6))
    return {_one(_fields(service), 1).decode() for number, service in listed if number == 1 and isinstance(service, bytes)}


def _v1_file_containing(address: str, symbol: str) -> list[descriptor_pb2.FileDescriptorProto]:
    (reply,) = _v1(address, [_string_field(4, symbol)])
    assert not [n for n, _ in reply if n == 7], f"error response for {symbol}: {reply}"
    files = _fields(_one(reply, 4))
    return [descriptor_pb2.FileDescriptorProto.FromString(data) for n, data in files if n == 1 and isinstance(data, bytes)]


# ---- the tests --------------------------------------------------------------------------------


def test_v1_lists_every_service(server) -> None:
    assert SERVICES <= _v1_services(server.address)


def test_v1_describes_the_cosserve_service(server) -> None:
    files = _v1_file_containing(server.address, "cosserve.v1.Cosserve")
    (cosserve,) = [f for f in files if f.package == "cosserve.v1"]
    (service,) = cosserve.service
    methods = {m.name for m in service.method}
    assert {"CreateSession", "FeedBlobStream", "RunOperator", "ScoreTopK"} <= methods


def test_v1_describes_itself_as_grpcs_v1_proto(server) -> None:
    """grpcurl describes every listed service: v1's own file must be there, with the messages of
    grpc's reflection/v1/reflection.proto."""
    (reflection_v1,) = _v1_file_containing(server.address, "grpc.reflection.v1.ServerReflection")
    assert reflection_v1.package == "grpc.reflection.v1"
    (service,) = reflection_v1.service
    (method,) = service.method
    assert (method.name, method.input_type, method.output_type) == (
        "ServerReflectionInfo",
        ".grpc.reflection.v1.ServerReflectionRequest",
        ".grpc.reflection.v1.ServerReflectionResponse",
    )
    assert method.client_streaming and method.server_streaming
    fields = {m.name: {f.name: f.number for f in m.field} for m in reflection_v1.message_type}
    assert fields["ServerReflectionRequest"] == {
        "host": 1,
        "file_by_filename": 3,
        "file_containing_symbol": 4,
        "file_containing_extension": 5,
        "all_extension_numbers_of_type": 6,
        "list_services": 7,
    }
    assert fields["ServerReflectionResponse"] == {
        "valid_host": 1,
        "original_request": 2,
        "file_descriptor_response": 4,
        "all_extension_numbers_response": 5,
        "list_services_response": 6,
        "error_response": 7,
    }
    assert fields["ServiceResponse"] == {"name": 1}
    assert fields["ErrorResponse"] == {"error_code": 1, "error_message": 2}


def test_v1_answers_an_unknown_symbol_with_not_found_in_the_stream(server) -> None:
    (reply,) = _v1(server.address, [_string_field(4, "no.such.Service")])
    error = _fields(_one(reply, 7))
    assert dict((n, v) for n, v in error)[1] == grpc.StatusCode.NOT_FOUND.value[0]


def test_v1_refuses_undecodable_bytes_with_invalid_argument(server) -> None:
    with pytest.raises(grpc.RpcError) as err:
        _v1(server.address, [b"\xff\xff\xff"])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_v1alpha_is_still_served(server) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    assert SERVICES <= {s.name for s in reply.list_services_response.service}


def test_v1_needs_credentials_like_v1alpha_unless_reflection_is_open() -> None:
    keyed = start_server(auth_token="s3cret")
    try:
        with pytest.raises(grpc.RpcError) as err:
            _v1_services(keyed.address)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert SERVICES <= _v1_services(keyed.address, (("authorization", "Bearer s3cret"),))
    finally:
        keyed.stop(0)
    open_ = start_server(auth_token="s3cret", reflection_open=True)
    try:
        assert SERVICES <= _v1_services(open_.address)
    finally:
        open_.stop(0)
