"""The server as a deployed process: health, reflection, auth, SIGTERM drain, CLI, packaging."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cosserve import Client, CosserveRpcError
from cosserve.server.state.workspace import BLOB_OVERHEAD_BYTES
from cosserve.v1 import cosserve_pb2 as pb
from tests.conftest import scrape_metrics, start_process, start_server, start_server_with_metrics

pytest.importorskip("torch")


def test_health_reports_serving_for_the_server_and_the_service(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "cosserve.v1.Cosserve"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
        names = {s.name for s in reply.list_services_response.service}
        assert {"cosserve.v1.Cosserve", "grpc.health.v1.Health"} <= names


def test_auth_token_is_required_when_configured():
    running = start_server(auth_token="s3cret")
    try:
        with Client(running.address) as anonymous:
            with pytest.raises(CosserveRpcError) as err:
                anonymous.session("cpu")
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with Client(running.address, token="wrong") as wrong:
            with pytest.raises(CosserveRpcError) as err:
                wrong.operators()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with Client(running.address, token="s3cret") as good, good.session("cpu") as s:
            s.feed_blob("x", np.ones(2))
            assert s.blobs() == ["x"]
        with grpc.insecure_channel(running.address) as channel:  # probes need no token
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        running.stop(0)


def test_unexpected_errors_are_internal_with_an_opaque_id(client, caplog):
    # An op whose implementation fails unexpectedly: reach it through the registry.
    from cosserve.server.compute.registry import REGISTRY, InputSpec, OpSchema, register

    @register(OpSchema(name="_TestBoom", inputs=(InputSpec("X"),), outputs=("Y",), doc="raises"))
    def boom(inputs, args):
        raise RuntimeError("secret internal detail")

    try:
        with client.session("cpu") as s:
            s.feed_blob("x", np.ones(1, np.float32))
            with pytest.raises(CosserveRpcError) as err:
                s.run_operator("_TestBoom", ["x"], ["y"])
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "secret" not in err.value.details() and "Traceback" not in err.value.details()
        assert re.search(r"internal error [0-9a-f]{12}", err.value.details())
    finally:
        del REGISTRY["_TestBoom"]


def test_sigterm_drains_in_flight_calls_and_exits_zero():
    proc, address = start_process("--grace-s", "30")
    try:
        with Client(address) as c:
            s = c.session("cpu")  # not closed: the server is gone by the end
            value = np.random.default_rng(0).standard_normal(4 * 1024 * 1024).astype(np.float32)  # 16 MiB
            s.feed_blob("x", value)
            stream = c.stub.FetchBlobStream(pb.FetchBlobRequest(session_id=s.id, name="x"), timeout=60)
            chunks = [next(stream)]  # the call is now in flight
            proc.send_signal(signal.SIGTERM)
            draining = False  # health turns NOT_SERVING, then new calls are refused
            deadline = time.monotonic() + 20
            with grpc.insecure_channel(address) as channel:
                check = health_pb2_grpc.HealthStub(channel).Check
                while not draining and time.monotonic() < deadline:
                    try:
                        status = check(health_pb2.HealthCheckRequest(), timeout=2).status
                        draining = status != health_pb2.HealthCheckResponse.SERVING
                    except grpc.RpcError:
                        draining = True
                    time.sleep(0.02)
            assert draining, "the server kept serving new calls after SIGTERM"
            assert proc.poll() is None, "the server exited with a call in flight"
            chunks.extend(stream)  # the in-flight call finishes intact
            data = b"".join(chunk.data for chunk in chunks)
            assert np.array_equal(np.frombuffer(data, np.float32), value)
            assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_flags_override_environment_variables():
    proc, address = start_process("--max-sessions", "1", env={"COSSERVE_MAX_SESSIONS": "5"})
    try:
        with Client(address) as c:
            with c.session("cpu"):
                with pytest.raises(CosserveRpcError) as err:
                    c.session("cpu")
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0


def test_cli_help_lists_flags_and_environment_variables():
    out = subprocess.run(
        [sys.executable, "-m", "cosserve.cli", "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in ("--host", "--port", "--device", "--max-session-bytes", "--allow-shm", "COSSERVE_PORT"):
        assert flag in out


def test_client_imports_and_works_without_torch(server):
    script = textwrap.dedent(
        f"""
        import sys
        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, NoTorch())
        import numpy as np
        from cosserve import Client
        with Client({server.address!r}) as c, c.session("cpu") as ws:
            ws.feed_blob("X", np.zeros((2, 3), np.float32))
            ws.run_operator("Cos", ["X"], ["Y"])
            assert (ws.fetch_blob("Y") == 1).all()
        assert "torch" not in sys.modules
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_serve_without_torch_says_which_extra_to_install():
    script = textwrap.dedent(
        """
        import sys
        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("No module named 'torch'")
        sys.meta_path.insert(0, NoTorch())
        from cosserve.cli import main
        sys.exit(main(["serve", "--port", "0"]))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert 'python3 -m pip install -e ".[server]"' in out.stderr and "Traceback" not in out.stderr


def test_operator_list_is_sorted_and_has_cos(client):
    names = [op.name for op in client.operators()]
    assert names == sorted(names)
    cos = next(op for op in client.operators() if op.name == "Cos")
    assert cos.gradient == "CosGradient" and cos.caffe2
    assert cos.inputs[0].dtypes == ("float16", "bfloat16", "float32", "float64")


def test_wire_dtype_enum_matches_the_codecs():
    from cosserve import tensors
    from cosserve.server.protocols import codec

    codes = [v for v in pb.DType.values() if v != pb.DTYPE_UNSPECIFIED]
    assert sorted(tensors.NUMPY_DTYPES) == sorted(codec.TORCH_DTYPES) == sorted(codes)
    for code in codes:
        assert tensors.NUMPY_DTYPES[code].itemsize == codec.TORCH_DTYPES[code].itemsize


def test_health_command_exits_zero_when_serving_and_one_when_down(server):
    ok = subprocess.run([sys.executable, "-m", "cosserve.cli", "health", "--server", server.address],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "SERVING" in ok.stdout
    down = subprocess.run([sys.executable, "-m", "cosserve.cli", "health", "--server", "127.0.0.1:1",
                           "--timeout", "1"], capture_output=True, text=True, timeout=60)
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr


def test_metrics_count_calls_by_method_and_code():
    running = start_server_with_metrics()
    try:
        with Client(running.address) as c, c.session("cpu") as s:
            s.feed_blob("x", np.ones(3, np.float32))
            s.feed_blob("big", np.ones(3 * 1024 * 1024, np.uint8))  # fetched in one call, no error first
            assert s.fetch_blob("big").nbytes == 3 * 1024 * 1024
            with pytest.raises(CosserveRpcError):
                s.fetch_blob("missing")
            text = scrape_metrics(running.metrics_port, showing='cosserve_rpcs_total{code="NOT_FOUND",method="FetchBlobStream"}')
        assert 'cosserve_rpcs_total{code="OK",method="FeedBlob"} 1.0' in text
        assert 'cosserve_rpcs_total{code="OK",method="FetchBlobStream"} 1.0' in text
        assert 'cosserve_rpcs_total{code="NOT_FOUND",method="FetchBlobStream"} 1.0' in text
        assert 'code="RESOURCE_EXHAUSTED"' not in text
        assert "cosserve_sessions 1.0" in text
        # 12 + 3 MiB of data, plus each blob's name and its fixed overhead, as Prometheus writes it
        held = 12 + 3 * 1024 * 1024 + len("x") + len("big") + 2 * BLOB_OVERHEAD_BYTES
        assert float(re.search(r"^cosserve_session_bytes (\S+)$", text, re.M).group(1)) == held
    finally:
        running.stop(0)
