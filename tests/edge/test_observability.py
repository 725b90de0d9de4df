"""Request ids, JSON log lines and metrics, read from a real server as an operator would."""

from __future__ import annotations

import json
import re
import time

import grpc
import numpy as np
import pytest

from cosserve import Client
from cosserve.v1 import cosserve_pb2 as pb
from cosserve.v1 import cosserve_pb2_grpc as pb_grpc
from tests.conftest import scrape_metrics, start_process, start_server, start_server_with_metrics

KEY = "x-request-id"


def _trailing_id(call: grpc.Call) -> str | None:
    return dict(call.trailing_metadata() or ()).get(KEY)


def test_every_call_returns_the_request_id_it_was_given_or_a_new_one(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.CosserveStub(channel)
        _, call = stub.ListOperators.with_call(pb.ListOperatorsRequest(), metadata=((KEY, "trace-42.a"),))
        assert _trailing_id(call) == "trace-42.a"
        with pytest.raises(grpc.RpcError) as refused:  # an error carries it too
            stub.HasBlob(pb.HasBlobRequest(session_id="nope", name="x"), metadata=((KEY, "trace-43"),))
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        assert _trailing_id(refused.value) == "trace-43"
        generated = set()
        for _ in range(3):
            _, call = stub.ListOperators.with_call(pb.ListOperatorsRequest())
            generated.add(_trailing_id(call))
        assert len(generated) == 3 and all(re.fullmatch(r"[0-9a-f]{16}", g or "") for g in generated)
        # An id that could forge or flood log lines is replaced, not echoed.
        for hostile in ("a b", "x" * 200, "line\\nbreak", "{\"json\": 1}"):
            _, call = stub.ListOperators.with_call(pb.ListOperatorsRequest(), metadata=((KEY, hostile),))
            assert re.fullmatch(r"[0-9a-f]{16}", _trailing_id(call) or "")


def test_streamed_calls_return_the_request_id(server):
    with Client(server.address) as c, c.session("cpu") as s:
        s.feed_blob("big", np.ones(3 * 1024 * 1024, np.uint8))
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.CosserveStub(channel)
            replies = stub.FetchBlobStream(pb.FetchBlobRequest(session_id=s.id, name="big"), metadata=((KEY, "stream-7"),))
            for _ in replies:
                pass
            assert _trailing_id(replies) == "stream-7"


def test_json_log_lines_name_the_request_id_of_their_call():
    log: list[str] = []
    proc, address = start_process("--log-format", "json", "--log-level", "DEBUG", log=log)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.CosserveStub(channel)
            stub.ListOperators(pb.ListOperatorsRequest(), metadata=((KEY, "find-me-1"),))
            with pytest.raises(grpc.RpcError):
                stub.HasBlob(pb.HasBlobRequest(session_id="nope", name="x"), metadata=((KEY, "find-me-2"),))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any("find-me-2" in line for line in log):
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(30)
    entries = [json.loads(line) for line in log if line.strip()]  # every line is one JSON object
    assert all({"time", "level", "logger", "request_id", "message"} <= e.keys() for e in entries)
    assert any("listening on" in e["message"] and e["request_id"] == "-" for e in entries)
    mine = {e["request_id"]: e for e in entries if e["request_id"].startswith("find-me")}
    assert "ListOperators" in mine["find-me-1"]["message"] and "OK" in mine["find-me-1"]["message"]
    assert "HasBlob" in mine["find-me-2"]["message"] and "NOT_FOUND" in mine["find-me-2"]["message"]


def _value(text: str, sample: str) -> float:
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
    assert match, f"{sample} not in the metrics"
    return float(match.group(1))


def test_metrics_show_op_time_bytes_residency_refusals_and_the_process():
    running = start_server_with_metrics()
    try:
        with Client(running.address) as c, c.session("cpu") as s:
            x = np.ones((4, 8), np.float32)
            s.feed_blob("x", x)
            s.feed_blob("y", x)
            s.run_operator("CosineSimilarity", ["x", "y"], ["cos"])
            s.fetch_blob("cos")
            with pytest.raises(Exception):
                s.fetch_blob("missing")
            text = scrape_metrics(running.metrics_port, showing='cosserve_rpcs_total{code="NOT_FOUND",method="FetchBlobStream"}')
    finally:
        running.stop(0)
    assert _value(text, 'cosserve_op_seconds_count{device="cpu",op="CosineSimilarity"}') == 1
    assert _value(text, 'cosserve_tensor_bytes_total{direction="in",method="FeedBlob"}') == 2 * x.nbytes
    assert _value(text, 'cosserve_tensor_bytes_total{direction="out",method="FetchBlobStream"}') == 4 * 4
    assert _value(text, 'cosserve_resident_bytes{device="cpu"}') >= 2 * x.nbytes + 16
    assert _value(text, 'cosserve_refused_calls_total{reason="NOT_FOUND"}') == 1
    assert _value(text, "process_resident_memory_bytes") > 0
