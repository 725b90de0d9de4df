"""Bad input that once reached the allocator or a traceback: each now gets a precise status, early."""

from __future__ import annotations

import os
import time
import subprocess
import sys

import grpc
import numpy as np
import pytest

from cosserve import Client, CosserveRpcError
from cosserve.v1 import cosserve_pb2 as pb
from tests.conftest import start_server

pytest.importorskip("torch")


def test_large_op_output_is_refused_before_it_is_computed():
    running = start_server(max_session_bytes=8 * 1024 * 1024)
    try:
        with Client(running.address) as c, c.session("cpu") as s:
            s.feed_blob("Q", np.ones((40_000, 4), np.float32))  # 640 KB in, 6.4 GB out
            with pytest.raises(CosserveRpcError) as err:
                s.run_operator("CosineSimilarityMatrix", ["Q", "Q"], ["S"])
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "6400000000 bytes" in err.value.details()
            with pytest.raises(CosserveRpcError) as err:
                s.run_operator("CosineTopK", ["Q", "Q"], ["V", "I"], k=40_000)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert s.blobs() == ["Q"]
    finally:
        running.stop(0)


def test_compute_output_larger_than_a_reply_is_resource_exhausted(client):
    q = np.ones((2000, 4), np.float32)  # 16 MB of output
    tensor = pb.Tensor(dtype=pb.FLOAT32, shape=[2000, 4], data=q.tobytes())
    request = pb.ComputeRequest(
        op=pb.OperatorDef(type="CosineSimilarityMatrix", input=["Q", "C"], output=["S"]),
        inputs=[pb.NamedTensor(name=n, tensor=tensor) for n in "QC"],
        device="cpu",
    )
    with pytest.raises(grpc.RpcError) as err:  # a stub: Client.compute runs it in a session instead
        client.stub.Compute(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "16000000 bytes" in err.value.details()


def test_zero_size_shape_with_huge_dimensions_is_invalid_argument(client, cpu_ws):
    cpu_ws.feed_blob("x", np.ones(2, np.float32))
    tensor = pb.Tensor(dtype=pb.FLOAT32, shape=[0, 2**62, 2**62])
    with pytest.raises(grpc.RpcError) as err:
        client.stub.FeedBlob(pb.FeedBlobRequest(session_id=cpu_ws.id, name="x", tensor=tensor))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "too large" in err.value.details()
    header = pb.FeedBlobChunk(session_id=cpu_ws.id, name="x", dtype=pb.FLOAT32, shape=[0, 2**62, 2**62])
    with pytest.raises(grpc.RpcError) as err:
        client.stub.FeedBlobStream(iter([header]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    np.testing.assert_array_equal(cpu_ws.fetch_blob("x"), np.ones(2, np.float32))


def test_malformed_stream_header_is_invalid_argument(server):
    with grpc.insecure_channel(server.address) as channel:
        feed = channel.stream_unary("/cosserve.v1.Cosserve/FeedBlobStream")
        with pytest.raises(grpc.RpcError) as err:
            feed(iter([b"\xff\xff\xff"]), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        feed_one = channel.unary_unary("/cosserve.v1.Cosserve/FeedBlob")
        with pytest.raises(grpc.RpcError) as err:
            feed_one(b"\xff\xff\xff", timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_duplicate_names_are_invalid_argument(client, cpu_ws):
    x = np.ones((2, 3), np.float32)
    cpu_ws.feed_blob("X", x)
    cpu_ws.feed_blob("g", np.ones(2, np.float32))
    with pytest.raises(CosserveRpcError) as err:
        cpu_ws.run_operator("CosineSimilarityGradient", ["X", "X", "g"], ["o", "o"])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "output names must differ" in err.value.details()
    request = pb.ComputeRequest(op=pb.OperatorDef(type="Cos", input=["X"], output=["Y"]), device="cpu")
    for _ in range(2):
        item = request.inputs.add(name="X").tensor
        item.dtype, item.data = pb.FLOAT32, x.tobytes()
        item.shape[:] = x.shape
    with pytest.raises(grpc.RpcError) as raw:
        client.stub.Compute(request)
    assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sent twice" in raw.value.details()


@pytest.mark.parametrize("step", [float("inf"), float("nan"), -1e-3])
def test_gradient_check_step_must_be_finite_and_positive(cpu_ws, step):
    cpu_ws.feed_blob("X", np.ones(3))
    with pytest.raises(CosserveRpcError) as err:
        cpu_ws.check_gradient("Cos", ["X"], step_size=step)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cosserve.cli", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **env})  # fmt: skip


def test_bad_environment_variable_fails_serve_cleanly_and_not_other_commands():
    assert _cli("--version", env={"COSSERVE_ALLOW_SHM": "maybe", "COSSERVE_PORT": "abc"}).returncode == 0
    for env, needle in (({"COSSERVE_PORT": "abc"}, "COSSERVE_PORT"), ({"COSSERVE_ALLOW_SHM": "maybe"}, "COSSERVE_ALLOW_SHM")):
        out = _cli("serve", env=env)
        assert out.returncode == 2 and needle in out.stderr and "Traceback" not in out.stderr


def test_bad_default_device_fails_at_startup():
    out = _cli("serve", "--port", "0", "--device", "banana", env={})
    assert out.returncode == 2
    assert "banana" in out.stderr and "Traceback" not in out.stderr


def test_stream_to_an_empty_name_or_closed_session_is_refused_at_the_header(client):
    session = client.session("cpu")
    header = pb.FeedBlobChunk(session_id=session.id, name="", dtype=pb.FLOAT32, shape=[4])
    with pytest.raises(grpc.RpcError) as err:
        client.stub.FeedBlobStream(iter([header, pb.FeedBlobChunk(data=b"\0" * 16)]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "must not be empty" in err.value.details()
    session.close()
    header.name = "x"
    with pytest.raises(grpc.RpcError) as err:
        client.stub.FeedBlobStream(iter([header]))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def _check_gradient(client: Client, session_id: str, blob: str, timeout: float) -> pb.CheckGradientResponse:
    op = pb.OperatorDef(type="Cos", input=[blob])
    return client.stub.CheckGradient(pb.CheckGradientRequest(session_id=session_id, op=op), timeout=timeout)


def test_a_gradient_check_is_bounded_by_its_cost_not_its_element_count(client, cpu_ws):
    cpu_ws.feed_blob("X", np.linspace(-1, 1, 20_000))  # 160 KB: 40,000 evaluations of 40,000 elements
    with pytest.raises(grpc.RpcError) as err:
        _check_gradient(client, cpu_ws.id, "X", timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "a cost of 2000000000" in err.value.details() and "check a smaller sample" in err.value.details()


def test_a_gradient_check_past_its_deadline_frees_its_worker_at_once():
    running = start_server(max_workers=1)
    try:
        with Client(running.address) as c, c.session("cpu") as s:
            s.feed_blob("X", np.linspace(-1, 1, 12_000))  # under the cost bound, seconds of work
            s.feed_blob("small", np.linspace(-1, 1, 8))
            with pytest.raises(grpc.RpcError) as err:
                _check_gradient(c, s.id, "X", timeout=1)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            started = time.monotonic()
            result = _check_gradient(c, s.id, "small", timeout=2)  # needs the one worker thread
            freed_after = time.monotonic() - started
            assert result.max_abs_error < 1e-6
            assert freed_after < 1.0, f"the worker was busy {freed_after:.2f} s after the deadline"
    finally:
        running.stop(0)


def test_sizes_in_messages_are_readable_and_exact_where_rounded():
    """'18253611008 bytes is more than the 17179869184 a session may hold' (issue 21, item 7)."""
    from cosserve.limits import readable_bytes

    assert [readable_bytes(n) for n in (0, 1, 1000, 2048, 1536, 16 * 2**30, 17 * 2**30 + 1, 6_400_000_000)] == [
        "0 bytes", "1 byte", "1000 bytes", "2 KiB", "1.5 KiB (1536 bytes)", "16 GiB", "17.0 GiB (18253611009 bytes)",
        "6.0 GiB (6400000000 bytes)",
    ]  # fmt: skip
    running = start_server(max_session_bytes=2**20, max_published_bytes=2**20)
    try:
        with Client(running.address) as c, c.session("cpu") as s:
            refusals = []
            for call in (
                lambda: s.feed_blob("big", np.ones(3 * 2**19, np.uint8)),  # announced, refused before it is received
                lambda: s.run_operator("CosineSimilarityMatrix", ["q", "q"], ["S"]),  # outputs refused before they exist
            ):
                s.feed_blob("q", np.ones((600, 4), np.float32))
                with pytest.raises(CosserveRpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                refusals.append(err.value.details())
    finally:
        running.stop(0)
    for details in refusals:
        assert "1 MiB" in details and "(--max-session-bytes)" in details and "1048576" not in details, details
    assert "blob 'big': 1.5 MiB (1572864 bytes) is more than the 1 MiB a session may hold" in refusals[0], refusals[0]
    assert "above its limit of 1 MiB (--max-session-bytes)" in refusals[1], refusals[1]
