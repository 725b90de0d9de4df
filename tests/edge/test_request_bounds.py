"""Counts in one request are bounded before anything is converted: a 7 MiB RunNet of empty ops is
3.6 million protobuf objects, and turning each into an engine call costs microseconds on the
event loop, which one request must not buy (it held every other call for 23.7 s)."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from cosserve import Client, limits
from cosserve.server.compute import engine
from cosserve.v1 import cosserve_pb2 as pb
from tests.conftest import start_server


@pytest.fixture(scope="module")
def server():
    running = start_server(device="cpu")
    yield running
    running.stop(0)


def _code(call, request, session_id):
    try:
        call(request, timeout=60, metadata=((limits.SESSION_ID_METADATA, session_id),))
        return "OK", ""
    except grpc.RpcError as err:
        return err.code().name, err.details() or ""


def test_a_net_with_more_ops_than_the_bound_is_refused_by_count(server):
    with Client(server.address) as client, client.session("cpu") as ws:
        request = pb.RunNetRequest(session_id=ws.id, ops=[pb.OperatorDef()] * (engine.MAX_NET_OPS + 1))
        code, details = _code(client.stub.RunNet, request, ws.id)
        assert code == "INVALID_ARGUMENT"
        assert f"more than the {engine.MAX_NET_OPS}" in details


@pytest.mark.parametrize("field", ["input", "output", "arg"])
def test_an_op_with_more_names_or_arguments_than_the_bound_is_refused(server, field):
    with Client(server.address) as client, client.session("cpu") as ws:
        op = pb.OperatorDef(type="Cos")
        if field == "arg":
            op.arg.extend(pb.Argument(name=f"a{i}", i=1) for i in range(engine.MAX_OP_ARGS + 1))
        else:
            getattr(op, field).extend(f"b{i}" for i in range(engine.MAX_OP_BLOBS + 1))
        for call, request in (
            (client.stub.RunOperator, pb.RunOperatorRequest(session_id=ws.id, op=op)),
            (client.stub.RunNet, pb.RunNetRequest(session_id=ws.id, ops=[op])),
        ):
            code, details = _code(call, request, ws.id)
            assert code == "INVALID_ARGUMENT", details
            assert f"{field} entries, more than the" in details
        code, details = _code(client.stub.Compute, pb.ComputeRequest(op=op, device="cpu"), "")
        assert code == "INVALID_ARGUMENT" and f"{field} entries, more than the" in details


def test_compute_with_more_inputs_than_any_op_takes_is_refused_by_count(server):
    with Client(server.address) as client:
        tensor = pb.Tensor(dtype=pb.FLOAT32, shape=[1], data=b"\0\0\0\0")
        inputs = [pb.NamedTensor(name=f"x{i}", tensor=tensor) for i in range(engine.MAX_OP_BLOBS + 1)]
        request = pb.ComputeRequest(op=pb.OperatorDef(type="Cos", input=["x0"], output=["y"]), inputs=inputs, device="cpu")
        code, details = _code(client.stub.Compute, request, "")
        assert code == "INVALID_ARGUMENT" and "input entries, more than the" in details


def test_a_full_message_of_empty_ops_does_not_hold_other_calls(server):
    with Client(server.address) as client, client.session("cpu") as ws:
        head = pb.RunNetRequest(session_id=ws.id).SerializeToString()
        body = head + b"\x12\x00" * ((limits.MAX_MESSAGE_BYTES - 4096) // 2)  # 3.6 million empty ops
        channel = grpc.insecure_channel(server.address, options=list(limits.GRPC_OPTIONS))
        hostile = channel.unary_unary("/cosserve.v1.Cosserve/RunNet")
        answer: dict[str, object] = {}
        thread = threading.Thread(target=lambda: answer.update(result=_code(hostile, body, ws.id)))
        thread.start()
        worst, deadline = 0.0, time.monotonic() + 60
        while thread.is_alive() and time.monotonic() < deadline:
            started = time.perf_counter()
            client.operators()
            worst = max(worst, time.perf_counter() - started)
        thread.join(timeout=60)
        channel.close()
        code, details = answer["result"]
        assert code == "INVALID_ARGUMENT" and "more than the" in details
        # Parsing the message itself is protobuf's (about 1.4 s here); converting it was 23.7 s.
        assert worst < 10, f"a small call waited {worst:.1f} s behind one request"
