"""OpenTelemetry traces, end to end: a real OTLP/gRPC receiver (a TraceService server built from
opentelemetry-proto's definitions) started here receives the spans of a real `cosserve serve`
process configured by OTEL_* variables; their names, attributes and parents are checked, and a
trace begun in this process (the client) continues into the server's spans."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

# Imported, not skipped when missing: the dev extra installs them, so CI always runs these tests.
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk import trace as sdk_trace

from cosserve import Client, CosserveRpcError, ShardedScorer, aio
from cosserve.v1 import cosserve_pb2 as pb
from tests.conftest import free_port, start_process, stop_process

API_KEY = "s3cret-key-of-alice-0123456789"
# A float32 value whose bytes appear in no span: a tensor's data must never be exported.
MARKER = np.float32(-1234.5677)
GRPC_SERVICE = "cosserve.v1.Cosserve"


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC collector of traces: keeps every span it is sent, and every request's bytes."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.raw: list[bytes] = []
        self._arrived = threading.Condition()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    def Export(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._arrived:
            self.raw.append(request.SerializeToString())
            for resource_spans in request.resource_spans:
                resource = _attributes(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append({
                            "name": span.name,
                            "kind": span.kind,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent": span.parent_span_id.hex(),
                            "attributes": _attributes(span.attributes),
                            "status": span.status.code,
                            "resource": resource,
                            "scope": scope_spans.scope.name,
                        })  # fmt: skip
            self._arrived.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait_for(self, what: Callable[[dict[str, Any]], bool], count: int = 1, timeout: float = 20.0) -> list[dict[str, Any]]:
        """The spans for which `what` holds, once there are `count` of them."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while True:
                found = [s for s in self.spans if what(s)]
                left = deadline - time.monotonic()
                if len(found) >= count or left <= 0:
                    return found
                self._arrived.wait(min(left, 0.5))

    def stop(self) -> None:
        self._server.stop(0)


def _attributes(pairs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        value = pair.value
        kind = value.WhichOneof("value")
        if kind == "array_value":
            out[pair.key] = [getattr(v, v.WhichOneof("value")) for v in value.array_value.values]
        else:
            out[pair.key] = getattr(value, kind) if kind else None
    return out


def _otel_env(receiver: Receiver, **more: str) -> dict[str, str]:
    env = {key: "" for key in os.environ if key.startswith("OTEL_")}  # none of the caller's
    env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = f"http://127.0.0.1:{receiver.port}"
    env["OTEL_SERVICE_NAME"] = "cosserve-under-test"
    env["OTEL_BSP_SCHEDULE_DELAY"] = "50"  # ms: the spans arrive within a moment of their calls
    return {**env, **more}


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def traced(receiver: Receiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A `cosserve serve` process sending every span to `receiver`: API keys (identity "alice"),
    sync durability (journal and snapshots), every op on a worker thread, shared memory allowed."""
    state = tmp_path_factory.mktemp("state")
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"alice:{hashlib.sha256(API_KEY.encode()).hexdigest()}\n")
    proc, address = start_process(
        "--host", "127.0.0.1", "--api-keys-file", str(keys), "--state-dir", str(state), "--durability", "sync",
        "--inline-op-bytes", "0", "--allow-shm",
        env=_otel_env(receiver, OTEL_TRACES_SAMPLER="parentbased_always_on"),
    )  # fmt: skip
    yield address
    stop_process(proc)


def _server_span(receiver: Receiver, method: str, **attributes: Any) -> dict[str, Any]:
    def matches(s: dict[str, Any]) -> bool:
        return s["name"] == f"{GRPC_SERVICE}/{method}" and all(s["attributes"].get(k) == v for k, v in attributes.items())

    found = receiver.wait_for(matches)
    assert found, (method, attributes, sorted({s["name"] for s in receiver.spans}))
    return found[-1]


def _children(receiver: Receiver, parent: dict[str, Any], name: str, count: int = 1) -> list[dict[str, Any]]:
    found = receiver.wait_for(lambda s: s["name"] == name and s["parent"] == parent["span_id"], count)
    assert len(found) >= count, (name, parent["name"], [(s["name"], s["parent"]) for s in receiver.spans])
    for child in found:
        assert child["trace_id"] == parent["trace_id"]
        assert child["kind"] == 1  # SPAN_KIND_INTERNAL
    return found


def test_every_call_has_a_server_span_by_the_rpc_conventions(receiver: Receiver, traced: str) -> None:
    with Client(traced, token=API_KEY) as client, client.session("cpu") as ws:
        ws.feed_blob("X", np.ones((3, 4), np.float32))
        ws.run_operator("Cos", ["X"], ["Y"])
        session_id = ws.id
    span = _server_span(receiver, "RunOperator", **{"cosserve.session_id": session_id})
    assert span["kind"] == 2  # SPAN_KIND_SERVER
    assert span["parent"] == ""  # the client traced nothing: the server's span is the root
    attributes = span["attributes"]
    assert attributes["rpc.system"] == "grpc"
    assert attributes["rpc.service"] == GRPC_SERVICE
    assert attributes["rpc.method"] == "RunOperator"
    assert attributes["rpc.grpc.status_code"] == 0
    assert attributes["cosserve.identity"] == "alice"
    assert re.fullmatch(r"[0-9a-f]{16}", attributes["cosserve.request_id"])
    assert span["status"] == 0  # unset: OK
    assert span["resource"]["service.name"] == "cosserve-under-test"
    assert span["scope"] == "cosserve.server"
    # The op ran on a worker thread (--inline-op-bytes 0), as a child of the call's span.
    (net,) = _children(receiver, span, "cosserve.net")
    assert net["attributes"]["cosserve.op.types"] == ["Cos"]
    assert net["attributes"]["cosserve.op.count"] == 1
    assert net["attributes"]["thread.name"].startswith("cosserve-work")


def test_a_callers_request_id_and_status_codes_are_on_the_span(receiver: Receiver, traced: str) -> None:
    with Client(traced, token=API_KEY) as client, client.session("cpu") as ws:
        bearer = (("authorization", f"Bearer {API_KEY}"),)
        client.stub.ListOperators(pb.ListOperatorsRequest(), metadata=(*bearer, ("x-request-id", "trace-test-42")), timeout=10)
        # Long, but under grpc's 8 KiB soft limit on metadata: between it and the hard limit grpc
        # refuses a call at random (RESOURCE_EXHAUSTED), which once failed this test.
        hostile = (("traceparent", "00-" + "z" * 32 + "-" + "0" * 16 + "-01"), ("tracestate", "k=" + "v" * 3000),
                   ("baggage", "=;=," * 500), ("traceparent-bin", b"\x00\xff"), ("x-request-id", "trace-test-44"))  # fmt: skip
        client.stub.ListOperators(pb.ListOperatorsRequest(), metadata=(*bearer, *hostile), timeout=10)
        with pytest.raises(grpc.RpcError):  # no credentials
            client.stub.ListOperators(pb.ListOperatorsRequest(), metadata=(("x-request-id", "trace-test-43"),), timeout=10)
        with pytest.raises(CosserveRpcError):
            ws.fetch_blob("nothing-of-that-name")
        session_id = ws.id
    ok = _server_span(receiver, "ListOperators", **{"cosserve.request_id": "trace-test-42"})
    assert ok["attributes"]["rpc.grpc.status_code"] == 0 and ok["attributes"]["cosserve.identity"] == "alice"
    garbled = _server_span(receiver, "ListOperators", **{"cosserve.request_id": "trace-test-44"})
    assert garbled["parent"] == "" and garbled["attributes"]["rpc.grpc.status_code"] == 0  # a new trace, and OK
    refused = _server_span(receiver, "ListOperators", **{"cosserve.request_id": "trace-test-43"})
    assert refused["attributes"]["rpc.grpc.status_code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
    missing = _server_span(receiver, "FetchBlobStream", **{"cosserve.session_id": session_id})
    assert missing["attributes"]["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    # The caller's mistakes are not the server's errors (OpenTelemetry's gRPC server conventions).
    assert refused["status"] == missing["status"] == 0


def test_work_that_takes_time_has_child_spans(receiver: Receiver, traced: str) -> None:
    corpus = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    with Client(traced, token=API_KEY) as client, client.session("cpu") as ws:
        session_id = ws.id
        ws.feed_blob("C", corpus)  # sync durability: one journal record, fsynced
        ws.top_k(corpus[:5], "C", k=3)
        ws.save("snap")
        ws.load("snap")
        ws.feed_blob("S", corpus, shm=True)
        ws.fetch_blob("S", shm=True)
        client.compute("CosineSimilarity", {"X": corpus, "Y": corpus}, ["S"])
    by_session = {"cosserve.session_id": session_id}
    (journal,) = _children(receiver, _server_span(receiver, "FeedBlob", **by_session), "cosserve.journal.append")
    assert journal["attributes"]["cosserve.bytes"] > corpus.nbytes
    (score,) = _children(receiver, _server_span(receiver, "ScoreTopK", **by_session), "cosserve.score")
    keys = ("cosserve.queries", "cosserve.k", "cosserve.corpus", "cosserve.corpus.rows", "cosserve.callers")
    assert {k: score["attributes"][k] for k in keys} == {
        "cosserve.queries": 5, "cosserve.k": 3, "cosserve.corpus": "C", "cosserve.corpus.rows": 50, "cosserve.callers": 1,
    }  # fmt: skip
    (written,) = _children(receiver, _server_span(receiver, "SaveWorkspace", **by_session), "cosserve.snapshot.write")
    assert written["attributes"]["cosserve.blobs"] == 1 and written["attributes"]["cosserve.bytes"] > corpus.nbytes
    (read,) = _children(receiver, _server_span(receiver, "LoadWorkspace", **by_session), "cosserve.snapshot.read")
    assert read["attributes"]["cosserve.blobs"] == 1
    (copied_in,) = _children(receiver, _server_span(receiver, "FeedBlobShm", **by_session), "cosserve.shm.read")
    assert copied_in["attributes"]["cosserve.bytes"] == corpus.nbytes
    (copied_out,) = _children(receiver, _server_span(receiver, "FetchBlobShm", **by_session), "cosserve.shm.write")
    assert copied_out["attributes"]["cosserve.bytes"] == corpus.nbytes
    compute = _server_span(receiver, "Compute")
    (op,) = _children(receiver, compute, "cosserve.op")
    assert op["attributes"]["cosserve.op.types"] == ["CosineSimilarity"]


def test_a_trace_begun_in_the_client_continues_into_the_server(receiver: Receiver, traced: str) -> None:
    """The sync and the asyncio client send the caller's context as `traceparent` metadata."""
    tracer = sdk_trace.TracerProvider().get_tracer("the-caller")  # records, exports nowhere
    x = np.ones((2, 3), np.float32)
    with tracer.start_as_current_span("caller's work") as caller, Client(traced, token=API_KEY) as client:
        client.compute("Cos", {"X": x}, ["Y"])
    context = caller.get_span_context()

    async def from_asyncio() -> Any:
        async with aio.Client(traced, token=API_KEY) as client:
            with tracer.start_as_current_span("caller's async work") as span:
                await client.compute("Cos", {"X": x}, ["Y"])
                return span.get_span_context()

    async_context = asyncio.run(from_asyncio())
    for parent in (context, async_context):
        trace_id = format(parent.trace_id, "032x")
        found = receiver.wait_for(lambda s, t=trace_id: s["trace_id"] == t and s["name"] == f"{GRPC_SERVICE}/Compute")
        assert len(found) == 1, trace_id
        (span,) = found
        assert span["parent"] == format(parent.span_id, "016x")
        assert span["kind"] == 2
        _children(receiver, span, "cosserve.op")  # the op's span is in the caller's trace too


def test_a_sharded_scorers_streams_continue_the_callers_trace(receiver: Receiver, traced: str) -> None:
    """ShardedScorer runs each server's stream on a thread of its own, in the caller's context."""
    tracer = sdk_trace.TracerProvider().get_tracer("the-caller")
    corpus = np.random.default_rng(1).standard_normal((40, 8)).astype(np.float32)
    with ShardedScorer([traced, traced], device="cpu", token=API_KEY) as scorer:
        scorer.feed(corpus, progress=False)
        with tracer.start_as_current_span("caller's search") as caller:
            scorer.top_k(corpus[:3], k=2)
    parent = caller.get_span_context()
    trace_id = format(parent.trace_id, "032x")
    streams = receiver.wait_for(lambda s: s["trace_id"] == trace_id and s["name"] == f"{GRPC_SERVICE}/ScoreTopK", count=2)
    assert len(streams) == 2 and {s["parent"] for s in streams} == {format(parent.span_id, "016x")}
    for stream in streams:
        _children(receiver, stream, "cosserve.score")


def test_spans_carry_no_tensor_data_and_no_secret(receiver: Receiver, traced: str) -> None:
    value = np.full((64, 64), MARKER, np.float32)
    with Client(traced, token=API_KEY) as client, client.session("cpu") as ws:
        ws.feed_blob("V", value)
        ws.run_operator("Cos", ["V"], ["W"])
        ws.fetch_blob("W")
        session_id = ws.id
    _server_span(receiver, "FetchBlobStream", **{"cosserve.session_id": session_id})
    exported = b"".join(receiver.raw)
    assert API_KEY.encode() not in exported
    assert MARKER.tobytes() * 4 not in exported
    for span in receiver.spans:
        for key, attribute in span["attributes"].items():
            assert len(str(attribute)) <= 256, (span["name"], key)


def test_a_rest_request_has_a_server_span_that_continues_its_traceparent(receiver: Receiver, tmp_path: Path) -> None:
    """The REST door wraps each request in observability.call_span, as the gRPC door's interceptor
    does a call: rpc.system "http", the caller's trace continued from its `traceparent` header."""
    keys = tmp_path / "keys.txt"
    keys.write_text(f"alice:{hashlib.sha256(API_KEY.encode()).hexdigest()}\n")
    http_port = free_port()
    proc, _ = start_process(
        "--host", "127.0.0.1", "--api-keys-file", str(keys), "--http-port", str(http_port), "--inline-op-bytes", "0",
        env=_otel_env(receiver, OTEL_TRACES_SAMPLER="parentbased_always_on"),
    )  # fmt: skip
    try:
        trace_id, parent_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
        body = json.dumps({"inputs": [{"name": "X", "shape": [2, 2], "datatype": "FP32", "data": [0, 1, 2, 3]}]}).encode()
        headers = {"Authorization": f"Bearer {API_KEY}", "traceparent": f"00-{trace_id}-{parent_id}-01", "x-request-id": "rest-trace-1"}
        request = urllib.request.Request(f"http://127.0.0.1:{http_port}/v2/models/Cos/infer", body, headers, method="POST")
        with urllib.request.urlopen(request, timeout=20) as reply:
            assert reply.status == 200
        missing = urllib.request.Request(f"http://127.0.0.1:{http_port}/v2/models/NoSuchOp/infer", body, headers, method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(missing, timeout=20)
        assert refused.value.code == 404
    finally:
        stop_process(proc)
    found = receiver.wait_for(lambda s: s["trace_id"] == trace_id and s["kind"] == 2, count=2)
    ok = next(s for s in found if s["attributes"].get("http.response.status_code") == 200)
    assert ok["name"] == "inference.GRPCInferenceService/ModelInfer"
    assert ok["parent"] == parent_id
    attributes = ok["attributes"]
    assert attributes["rpc.system"] == "http" and attributes["rpc.method"] == "ModelInfer"
    assert attributes["http.request.method"] == "POST" and attributes["cosserve.request_id"] == "rest-trace-1"
    assert attributes["cosserve.identity"] == "alice" and ok["status"] == 0
    # The op ran on a worker thread (--inline-op-bytes 0), as a child of the request's span.
    assert receiver.wait_for(lambda s: s["parent"] == ok["span_id"] and s["trace_id"] == trace_id)
    (not_found,) = [s for s in found if s["attributes"].get("http.response.status_code") == 404]
    assert not_found["status"] == 0  # a 4xx is the caller's mistake, not the server's error


# Blocks every opentelemetry module, as on an install without the [otel] extra.
_WITHOUT_OTEL = textwrap.dedent(
    """
    import sys
    class NoOtel:
        def find_spec(self, name, path=None, target=None):
            if name == "opentelemetry" or name.startswith("opentelemetry."):
                raise ImportError(f"No module named {name!r}")
    sys.meta_path.insert(0, NoOtel())
    """
)


def test_an_endpoint_without_the_extra_is_one_clear_log_line_and_the_server_runs(receiver: Receiver, tmp_path: Path) -> None:
    script = _WITHOUT_OTEL + "from cosserve.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    proc = subprocess.Popen(
        [sys.executable, "-c", script, "serve", "--host", "127.0.0.1", "--port", "0", "--device", "cpu"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, **_otel_env(receiver)},
    )  # fmt: skip
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "listening on" in line:
                break
        address = re.search(r"listening on (\S+)", lines[-1])
        assert address, lines
        with Client(address.group(1)) as client:
            y = client.compute("Cos", {"X": np.ones((1, 2), np.float32)}, ["Y"])["Y"]
        np.testing.assert_allclose(y, np.cos(np.ones((1, 2))), rtol=1e-6)
    finally:
        stop_process(proc)
    said = "".join(lines)
    assert "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set, but OpenTelemetry's SDK is not installed" in said, said
    # The README's install command, as every install hint gives it (issue 21, item 12).
    readme_install = 'python3 -m pip install -e ".[server,otel]"'
    assert f"```bash\n{readme_install}\n" in (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert f"in a clone of cosserve: {readme_install}" in said and "Traceback" not in said


def test_off_by_default_nothing_of_opentelemetry_is_loaded(server: Any) -> None:
    """Without an endpoint a server imports no opentelemetry (so it installs no tracing
    interceptor), and the client works without the package at all."""
    script = _WITHOUT_OTEL + textwrap.dedent(
        f"""
        import dataclasses, numpy as np
        from cosserve import Client
        from cosserve.server import tracing
        from cosserve.server.edge.app import build_server
        from cosserve.server.settings import Settings
        assert not tracing.configure()
        running = build_server(Settings(host="127.0.0.1", port=0))
        with Client(running.address) as c:
            assert c.compute("Cos", {{"X": np.ones((1, 2), np.float32)}}, ["Y"])["Y"].shape == (1, 2)
        with Client({server.address!r}) as c, c.session("cpu") as ws:
            ws.feed_blob("X", np.zeros((2, 3), np.float32))
        running.stop(0)
        assert not [m for m in sys.modules if m.startswith("opentelemetry")]
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_the_tracing_bench_runs_and_counts_every_span_at_100_percent(capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m bench.tracing` at minimal sizes (the numbers mean nothing here): its three servers
    start, take turns, and the 100 % one sends a server span for every call (W1's op is small enough
    to run on the loop, so it has no span of its own), the 1 % one a few at most."""
    from bench.tracing import main

    assert main(["--calls", "20", "--warmup", "5", "--repeats", "1"]) == 0
    printed = capsys.readouterr().out
    for name in ("off", "on, 100 % sampled", "on, 1 % sampled"):
        assert f"| {name} |" in printed, printed
    spans = re.search(r"spans received: ([\d,]+) for (\d+) calls", printed)
    assert spans, printed
    received, calls = int(spans.group(1).replace(",", "")), int(spans.group(2))
    assert calls == 25 and calls <= received <= calls + 10, printed
