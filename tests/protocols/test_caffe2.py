"""Caffe2's front door (issue 11): a Caffe2-style script run remotely through `cosserve.caffe2`,
Caffe2's own encodings (serialized OperatorDef / NetDef) sent by a raw stub, bools as ints, and
the numbers where we now give what Caffe2 gives. Every case talks to a real server."""

from __future__ import annotations

import pathlib
import re
import types

import grpc
import numpy as np
import pytest

torch = pytest.importorskip("torch")


# ---- numbers closer to Caffe2's (scope 4) --------------------------------------------------


def caffe2_max0(x: np.ndarray) -> np.ndarray:
    """std::max(0.f, x) as Caffe2 computes it: (0 < x) ? x : 0, so NaN gives 0 (np.maximum gives NaN)."""
    return np.where(0 < x, x, 0.0)


def test_cosine_embedding_criterion_nan_on_the_hinge_branch_is_zero(client, device):
    s = np.array([np.nan, np.nan, 0.5, -0.75, np.inf], np.float32)
    y = np.array([0, 1, -1, 2, 0], np.int32)
    margin = 0.25
    out = client.compute("CosineEmbeddingCriterion", {"S": s, "Y": y}, ["loss"], device=device, margin=margin)["loss"]
    expected = np.where(y == 1, 1 - s, caffe2_max0(s - np.float32(margin)))
    np.testing.assert_array_equal(out, expected.astype(np.float32))  # NaN only where y == 1
    assert not np.signbit(out[[0, 3]]).any()


def test_l1_distance_gradient_dead_zone_is_positive_zero(client, device):
    x = np.array([[0.0, 1e-13, -1e-13, 0.5, 2.0]], np.float32)
    y = np.array([[0.0, 0.0, 0.0, 0.5, 1.0]], np.float32)
    g = np.array([3.0], np.float32)
    out = client.compute("L1DistanceGradient", {"X": x, "Y": y, "dL": g}, ["dX", "dY"], device=device)
    d = x - y
    dead = np.abs(d) <= 1e-12
    np.testing.assert_array_equal(out["dX"], np.where(dead, 0.0, g[:, None] * np.sign(d)))
    np.testing.assert_array_equal(out["dY"], np.where(dead, 0.0, -g[:, None] * np.sign(d)))
    # Caffe2 writes 0 to both in the dead zone: +0.0, never -0.0.
    assert not np.signbit(out["dX"][dead]).any() and not np.signbit(out["dY"][dead]).any()


@pytest.mark.parametrize(
    ("xs", "ys", "args"),
    [((3, 0), (3, 4), {"pad_value": 2.0}), ((3, 0), (3, 0), {"replicate": True}), ((2, 0), (2, 3), {"replicate": True})],
    ids=["pad", "replicate-both-empty", "replicate-x-empty"],
)
def test_dot_product_with_padding_of_an_x_with_no_elements_is_shape_0(client, device, xs, ys, args):
    x = np.zeros(xs, np.float32)
    y = np.arange(np.prod(ys), dtype=np.float32).reshape(ys)
    out = client.compute("DotProductWithPadding", {"X": x, "Y": y}, ["P"], device=device, **args)["P"]
    assert out.shape == (0,) and out.dtype == np.float32  # Caffe2: N = 0 when X has no elements
    # The gradient takes the forward's dP, (0,), and gives zeros of X's and Y's shapes.
    grads = client.compute(
        "DotProductWithPaddingGradient", {"X": x, "Y": y, "dP": np.zeros(0, np.float32)}, ["dX", "dY"], device=device, **args
    )
    np.testing.assert_array_equal(grads["dX"], np.zeros(xs, np.float32))
    np.testing.assert_array_equal(grads["dY"], np.zeros(ys, np.float32))


# ---- a Caffe2 script, run remotely by changing its imports (scope 2) -----------------------

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "caffe2_script.py"
CAFFE2_IMPORTS = {
    "from caffe2.python import core, workspace": "from cosserve.caffe2 import core, workspace",
    "from caffe2.proto import caffe2_pb2": "from cosserve.caffe2 import caffe2_pb2",
}


def load_script(imports: dict[str, str]) -> types.ModuleType:
    """tests/caffe2_script.py as a module, its import lines replaced by `imports` (nothing else)."""
    source = SCRIPT.read_text(encoding="utf-8")
    for old, new in imports.items():
        assert source.count(old) == 1, f"the script must import with {old!r}"
        source = source.replace(old, new)
    module = types.ModuleType("caffe2_script")
    exec(compile(source, str(SCRIPT), "exec"), module.__dict__)
    return module


@pytest.fixture
def remote_workspace(server):
    from cosserve.caffe2 import workspace

    workspace.connect(server.address)
    yield workspace
    workspace.close()


def t64(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64, requires_grad=True)


def check_script_values(fetched: dict, data: dict) -> None:
    """Every value the script fetched, against numpy formulas and torch autograd (float64)."""
    x, y, ds, w, labels = (data[k] for k in ("X", "Y", "dS", "W", "labels"))
    tol = {"rtol": 1e-5, "atol": 1e-6}
    xt, yt = t64(x), t64(y)
    s = (xt * yt).sum(1) / torch.sqrt((xt * xt).sum(1).clamp(min=1e-12) * (yt * yt).sum(1).clamp(min=1e-12))
    s.backward(torch.tensor(ds, dtype=torch.float64))
    np.testing.assert_allclose(fetched["S"], s.detach().numpy(), **tol)
    np.testing.assert_allclose(fetched["dX"], xt.grad.numpy(), **tol)
    np.testing.assert_allclose(fetched["dY"], yt.grad.numpy(), **tol)
    xt, yt = t64(x), t64(y)
    l2 = 0.5 * ((xt - yt) ** 2).sum(1)
    l2.backward(torch.tensor(ds, dtype=torch.float64))
    np.testing.assert_allclose(fetched["L2"], l2.detach().numpy(), **tol)
    np.testing.assert_allclose(fetched["dX2"], xt.grad.numpy(), **tol)
    np.testing.assert_allclose(fetched["dY2"], yt.grad.numpy(), **tol)
    np.testing.assert_allclose(fetched["P"], (w * np.tile(x, (1, 2))).sum(1, dtype=np.float64), **tol)
    margin = np.float64(np.float32(0.1))  # Argument.f is a float32
    s64 = fetched["S"].astype(np.float64)
    np.testing.assert_allclose(fetched["loss"], np.where(labels == 1, 1 - s64, np.maximum(0, s64 - margin)), **tol)
    np.testing.assert_allclose(fetched["dot"], (x.astype(np.float64) * y).sum(1), **tol)
    np.testing.assert_allclose(fetched["l1"], np.abs(x.astype(np.float64) - y).sum(1), **tol)
    for name in ("S", "dX", "dY", "L2", "dX2", "dY2", "P", "loss", "dot", "l1"):
        assert fetched[name].dtype == np.float32, name
    assert set(fetched["blobs"]) == {"X", "Y", "dS", "W", "labels", "S", "dX", "dY", "L2", "dX2", "dY2", "P", "loss"}
    assert list(fetched["pairs_blobs_at_start"]) == []
    assert list(fetched["workspaces"])[0] == "default" and set(fetched["workspaces"]) == {"default", "pairs"}
    assert fetched["current"] == "pairs"
    assert fetched["default_has_S"] is True and fetched["default_has_dot"] is False


def test_caffe2_script_runs_remotely_with_its_imports_changed(remote_workspace):
    script = load_script(CAFFE2_IMPORTS)
    check_script_values(script.run(), script.inputs())


def test_caffe2_script_runs_on_caffe2_itself():
    pytest.importorskip("caffe2.python.core", reason="no Caffe2 here (torch 2.x ships none)")
    script = load_script({})
    check_script_values(script.run(), script.inputs())


def test_workspace_calls_match_caffe2s_signatures_and_errors(remote_workspace):
    ws = remote_workspace
    from cosserve.caffe2 import core

    assert ws.CurrentWorkspace() == "default" and ws.Workspaces() == ["default"]
    assert ws.FeedBlob("a", np.arange(6, dtype=np.float32).reshape(2, 3)) is True
    assert ws.HasBlob("a") is True and ws.HasBlob("b") is False
    assert ws.Blobs() == ["a"]
    np.testing.assert_array_equal(ws.FetchBlob("a"), np.arange(6, dtype=np.float32).reshape(2, 3))
    with pytest.raises(RuntimeError, match="'b'"):  # the server's message, as Caffe2's enforce
        ws.FetchBlob("b")
    with pytest.raises(RuntimeError, match="unknown operator type 'Sin'") as caught:
        ws.RunOperatorOnce(core.CreateOperator("Sin", ["a"], ["b"]))
    assert caught.value.__cause__.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(RuntimeError, match="does not exist"):
        ws.SwitchWorkspace("nope")
    assert ws.CurrentWorkspace() == "default"
    ws.SwitchWorkspace("nope", True)
    assert ws.Blobs() == [] and ws.Workspaces() == ["default", "nope"]
    ws.SwitchWorkspace("default")
    assert ws.RemoveBlob("a") is True and ws.Blobs() == []
    ws.FeedBlob("a", np.ones(3))
    assert ws.ResetWorkspace() is True and ws.Blobs() == []
    with pytest.raises(RuntimeError, match="cuda:0"):
        ws.FeedBlob("a", np.ones(3), device_option=core.DeviceOption(1, 0))



def test_address_from_the_environment_and_none(server, monkeypatch):
    from cosserve.caffe2 import workspace

    workspace.close()
    monkeypatch.delenv("COSSERVE_ADDRESS", raising=False)
    with pytest.raises(RuntimeError, match="not connected"):
        workspace.Blobs()
    monkeypatch.setenv("COSSERVE_ADDRESS", server.address)
    try:
        assert workspace.FeedBlob("x", np.zeros(2, np.float32)) and workspace.Blobs() == ["x"]
    finally:
        workspace.close()

# ---- Caffe2's own encodings, sent by a raw stub (scope 3) ----------------------------------

from cosserve.caffe2 import caffe2_pb2 as c2  # noqa: E402
from cosserve.caffe2 import core  # noqa: E402
from cosserve.v1 import cosserve_pb2 as pb  # noqa: E402
from cosserve.v1 import cosserve_pb2_grpc as pb_grpc  # noqa: E402

MAX_DETAILS = 2048  # no status message may be longer (test_hostile's bound)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, value: bytes | int) -> bytes:
    """One protobuf field by hand: a varint (wire type 0) or length-delimited bytes (wire type 2)."""
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    return _varint(number << 3 | 2) + _varint(len(value)) + value


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.CosserveStub(channel)


def run_op(stub, session_id: str, data: bytes) -> None:
    stub.RunOperator(pb.RunOperatorRequest(session_id=session_id, caffe2_op=data), timeout=30)


def run_net(stub, session_id: str, data: bytes, **fields) -> None:
    stub.RunNet(pb.RunNetRequest(session_id=session_id, caffe2_net=data, **fields), timeout=30)


def refused(call, code: grpc.StatusCode, *needles: str) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    err = caught.value
    assert err.code() == code, err.details()
    details = err.details()
    assert len(details.encode()) <= MAX_DETAILS
    for needle in needles:
        assert needle in details, details
    return details


@pytest.fixture
def pair(cpu_ws):
    x = np.array([[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 2.0, 0.0]], np.float32)
    y = np.array([[1.0, -1.0], [2.0, 3.0]], np.float32)
    cpu_ws.feed_blob("X", x)
    cpu_ws.feed_blob("Y", y)
    return cpu_ws, x, y


def replicated_dot(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x.astype(np.float64) * np.tile(y, (1, x.shape[1] // y.shape[1]))).sum(1)


def test_hand_encoded_caffe2_operator_def_runs(stub, pair):
    """Bytes laid out by hand from caffe2.proto's numbers (OperatorDef: input 1, output 2, type 4,
    arg 5; Argument: name 1, i 3), not by our generated module: our numbers are Caffe2's."""
    ws, x, y = pair
    arg = _field(1, b"replicate") + _field(3, 1)  # a bool as Caffe2 stores it: i = 1
    data = _field(1, b"X") + _field(1, b"Y") + _field(2, b"P") + _field(4, b"DotProductWithPadding") + _field(5, arg)
    run_op(stub, ws.id, data)
    np.testing.assert_allclose(ws.fetch_blob("P"), replicated_dot(x, y), rtol=1e-6)


def test_serialized_operator_def_and_net_def(stub, pair):
    ws, x, y = pair
    op = core.CreateOperator("DotProductWithPadding", ["X", "Y"], ["P"], pad_value=0.5, device_option=core.DeviceOption(c2.CPU))
    run_op(stub, ws.id, op.SerializeToString())
    p = (x[:, :2].astype(np.float64) * y).sum(1) + 0.5 * x[:, 2:].sum(1)
    np.testing.assert_allclose(ws.fetch_blob("P"), p, rtol=1e-6)
    net = c2.NetDef(name="n", external_input=["X"], external_output=["S"])
    net.op.append(core.CreateOperator("CosineSimilarity", ["X", "X"], ["S"]))
    net.op.append(core.CreateOperator("Cos", ["S"], ["C"]))
    net.device_option.CopyFrom(core.DeviceOption(c2.CPU))
    run_net(stub, ws.id, net.SerializeToString())
    np.testing.assert_allclose(ws.fetch_blob("S"), np.ones(2), rtol=1e-6)
    np.testing.assert_allclose(ws.fetch_blob("C"), np.cos(np.ones(2, np.float32)), rtol=1e-6)


@pytest.mark.parametrize("encoding", ["ours", "caffe2"])
def test_bools_as_ints_in_both_encodings(stub, pair, encoding):
    ws, x, y = pair

    def send(value: int) -> None:
        if encoding == "ours":
            op = pb.OperatorDef(type="DotProductWithPadding", input=["X", "Y"], output=["P"],
                                arg=[pb.Argument(name="replicate", i=value)])
            stub.RunOperator(pb.RunOperatorRequest(session_id=ws.id, op=op), timeout=30)
        else:
            op = core.CreateOperator("DotProductWithPadding", ["X", "Y"], ["P"], replicate=value)
            run_op(stub, ws.id, op.SerializeToString())

    send(1)
    np.testing.assert_allclose(ws.fetch_blob("P"), replicated_dot(x, y), rtol=1e-6)
    send(0)
    np.testing.assert_allclose(ws.fetch_blob("P"), (x[:, :2].astype(np.float64) * y).sum(1), rtol=1e-6)
    refused(lambda: send(2), grpc.StatusCode.INVALID_ARGUMENT, "'replicate'", "bool (or the int 0 or 1)", "2")


MALFORMED = {
    "truncated field": b"\x2a\xff",
    "bad wire type": b"\x27",
    "garbage": bytes(range(255, 200, -1)),
    "length past the end": _varint(4 << 3 | 2) + _varint(1 << 30) + b"Cos",
}


@pytest.mark.parametrize("data", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_bytes_are_invalid_argument(stub, pair, data):
    ws, _, _ = pair
    refused(lambda: run_op(stub, ws.id, data), grpc.StatusCode.INVALID_ARGUMENT, "caffe2_op", "OperatorDef")
    refused(lambda: run_net(stub, ws.id, data), grpc.StatusCode.INVALID_ARGUMENT, "caffe2_net", "NetDef")
    assert ws.blobs() == ["X", "Y"]


def test_what_cosserve_cannot_honour_is_refused_by_name(stub, pair):
    ws, _, _ = pair
    invalid = grpc.StatusCode.INVALID_ARGUMENT

    def op(**kwargs) -> bytes:
        return core.CreateOperator("DotProductWithPadding", ["X", "Y"], ["P"], **kwargs).SerializeToString()

    refused(lambda: run_op(stub, ws.id, op(pad_value=[1.0, 2.0])), invalid, "'pad_value'", "list of 2 floats", "Argument.floats")
    refused(lambda: run_op(stub, ws.id, op(names=["a"])), invalid, "list of 1 strings")
    two = c2.OperatorDef(type="Cos", input=["X"], output=["Z"], arg=[c2.Argument(name="m", f=1.0, i=2)])
    refused(lambda: run_op(stub, ws.id, two.SerializeToString()), invalid, "'m'", "sets f and i")
    empty = c2.OperatorDef(type="Cos", input=["X"], output=["Z"], arg=[c2.Argument(name="m")])
    refused(lambda: run_op(stub, ws.id, empty.SerializeToString()), invalid, "'m'", "no value")
    tensor = c2.OperatorDef(type="Cos", input=["X"], output=["Z"], arg=[c2.Argument(name="w", t=b"\x08\x01")])
    refused(lambda: run_op(stub, ws.id, tensor.SerializeToString()), invalid, "'w'", "TensorProto")
    aten = c2.OperatorDef(type="Cos", input=["X"], output=["Z"], domain="aten")
    refused(lambda: run_op(stub, ws.id, aten.SerializeToString()), invalid, "'aten'")
    utf8 = _field(4, b"Co\xffs") + _field(1, b"X") + _field(2, b"Z")
    refused(lambda: run_op(stub, ws.id, utf8), invalid, "not UTF-8")
    refused(lambda: run_op(stub, ws.id, op(replicate=True, margin=1.0)), invalid, "no argument 'margin'")
    odd = op(device_option=core.DeviceOption(5))
    refused(lambda: run_op(stub, ws.id, odd), invalid, "device_type 5", "0 (CPU) or 1 (CUDA)")
    # A device_option naming another device than the session's: its blobs are not there.
    cuda = op(device_option=core.DeviceOption(c2.CUDA, 0))
    refused(lambda: run_op(stub, ws.id, cuda), grpc.StatusCode.FAILED_PRECONDITION, "cuda:0", "cpu")
    net = c2.NetDef(op=[c2.OperatorDef(type="Cos", input=["X"], output=["Z"])], device_option=core.DeviceOption(c2.CUDA, 0))
    refused(lambda: run_net(stub, ws.id, net.SerializeToString()), grpc.StatusCode.FAILED_PRECONDITION, "op #0", "cuda:0")
    assert ws.blobs() == ["X", "Y"]


def test_net_checks_and_all_or_nothing(stub, pair):
    ws, _, _ = pair
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    cos = c2.OperatorDef(type="Cos", input=["X"], output=["Z"])
    undeclared = c2.NetDef(name="n", op=[cos], external_input=["Y"])
    refused(lambda: run_net(stub, ws.id, undeclared.SerializeToString()), invalid, "'X'", "external_input")
    unproduced = c2.NetDef(op=[cos], external_output=["W"])
    refused(lambda: run_net(stub, ws.id, unproduced.SerializeToString()), invalid, "'W'", "never produced")
    failing = c2.NetDef(op=[cos, c2.OperatorDef(type="CosineSimilarity", input=["X", "Y"], output=["S"])])
    refused(lambda: run_net(stub, ws.id, failing.SerializeToString()), invalid, "op #1", "nothing was changed")
    both = pb.OperatorDef(type="Cos", input=["X"], output=["Z"])
    refused(lambda: run_net(stub, ws.id, c2.NetDef(op=[cos]).SerializeToString(), ops=[both]), invalid, "not both")
    assert ws.blobs() == ["X", "Y"]


def test_hostile_sizes_are_bounded(stub, pair):
    ws, _, _ = pair
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    many = c2.OperatorDef(type="Cos", input=["X"], output=["Z"], arg=[c2.Argument(name="m", floats=[0.5] * 1_000_000)])
    assert len(many.SerializeToString()) > 4_000_000
    refused(lambda: run_op(stub, ws.id, many.SerializeToString()), invalid, "list of 1000000 floats")
    long_name = "n" * 200_000
    named = c2.OperatorDef(type="Cos", input=["X"], output=["Z"], arg=[c2.Argument(name=long_name, f=1.0)])
    refused(lambda: run_op(stub, ws.id, named.SerializeToString()), invalid, "200000 chars")
    long_type = c2.OperatorDef(type="C" * 300_000, input=["X"], output=["Z"])
    refused(lambda: run_op(stub, ws.id, long_type.SerializeToString()), invalid, "unknown operator type")
    # A nested NetDef in an argument is never parsed (so never recursed into), only refused.
    nested = b""
    for _ in range(200):
        nested = _field(2, _field(5, _field(1, b"a") + _field(8, nested)))
    deep = _field(4, b"Cos") + _field(1, b"X") + _field(2, b"Z") + _field(5, _field(1, b"a") + _field(8, nested))
    refused(lambda: run_op(stub, ws.id, deep), invalid, "'a'", "NetDef")
    # Counts are checked before anything is converted: a message holds millions of empty entries.
    empties = b"\x12\x00" * 3_000_000  # NetDef.op, 3 million times
    refused(lambda: run_net(stub, ws.id, empties), invalid, "3000000 op entries", "10000")
    args = _field(4, b"Cos") + _field(1, b"X") + _field(2, b"Z") + _field(5, b"") * 1_000_000
    refused(lambda: run_op(stub, ws.id, args), invalid, "1000000 arg entries", "64")
    names = _field(4, b"Cos") + _field(1, b"X") * 1_000_000 + _field(2, b"Z")
    refused(lambda: run_op(stub, ws.id, names), invalid, "1000000 input entries")
    wide = c2.NetDef(op=[c2.OperatorDef(type="Cos", input=["X"], output=[f"z{i}"]) for i in range(2000)])
    wide.op.append(c2.OperatorDef(type="Nope", input=["X"], output=["w"]))
    refused(lambda: run_net(stub, ws.id, wide.SerializeToString()), invalid, "op #2000", "nothing was changed")
    assert ws.blobs() == ["X", "Y"]


def test_readme_caffe2_example_runs_against_a_server(server):
    readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    (example,) = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "cosserve.caffe2" in b]
    from cosserve.caffe2 import workspace

    namespace: dict = {}
    try:
        exec(compile(example.replace('"127.0.0.1:50051"', repr(server.address)), "README.md", "exec"), namespace)  # noqa: S102
    finally:
        workspace.close()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3), dtype=np.float32).astype(np.float64)
    y = rng.standard_normal((4, 3), dtype=np.float32).astype(np.float64)
    xn, yn = np.linalg.norm(x, axis=1)[:, None], np.linalg.norm(y, axis=1)[:, None]
    xy = (x * y).sum(1)[:, None]
    np.testing.assert_allclose(namespace["s"], (xy / (xn * yn))[:, 0], rtol=1e-5)
    np.testing.assert_allclose(namespace["dx"], y / (xn * yn) - xy * x / (xn**3 * yn), rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_option_of_a_cuda_session(stub, client):
    with client.session("cuda:0") as ws:
        x = np.array([[1.0, 2.0], [3.0, -4.0]], np.float32)
        ws.feed_blob("X", x)
        op = core.CreateOperator("CosineSimilarity", ["X", "X"], ["S"], device_option=core.DeviceOption(c2.CUDA, 0))
        run_op(stub, ws.id, op.SerializeToString())
        np.testing.assert_allclose(ws.fetch_blob("S"), np.ones(2), rtol=1e-6)
        cpu = core.CreateOperator("Cos", ["X"], ["C"], device_option=core.DeviceOption(c2.CPU))
        refused(lambda: run_op(stub, ws.id, cpu.SerializeToString()), grpc.StatusCode.FAILED_PRECONDITION, "cuda:0")
        other = core.CreateOperator("Cos", ["X"], ["C"], device_option=core.DeviceOption(c2.CUDA, 7))
        refused(lambda: run_op(stub, ws.id, other.SerializeToString()), grpc.StatusCode.FAILED_PRECONDITION, "cuda:7")


def test_sessions_run_caffe2_bytes_sync_and_async(server, client):
    """Session.run_caffe2_operator / run_caffe2_net (and cosserve.aio's): a program holding Caffe2
    protobufs forwards their bytes unchanged; checked against numpy."""
    import asyncio

    from cosserve import aio

    x = np.array([[3.0, 4.0], [1.0, 0.0]], np.float32)
    y = np.array([[4.0, 3.0], [0.0, 2.0]], np.float32)
    expected = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    op = core.CreateOperator("CosineSimilarity", ["X", "Y"], ["S"]).SerializeToString()
    net = c2.NetDef(op=[c2.OperatorDef.FromString(op)]).SerializeToString()
    with client.session("cpu") as ws:
        ws.feed_blob("X", x)
        ws.feed_blob("Y", y)
        ws.run_caffe2_operator(op)
        np.testing.assert_allclose(ws.fetch_blob("S"), expected, rtol=1e-6)
        ws.remove_blob("S")
        ws.run_caffe2_net(net)
        np.testing.assert_allclose(ws.fetch_blob("S"), expected, rtol=1e-6)

    async def remote() -> np.ndarray:
        async with aio.Client(server.address) as aclient:
            async with aclient.session("cpu") as aws:
                await aws.feed_blob("X", x)
                await aws.feed_blob("Y", y)
                await aws.run_caffe2_net(net)
                await aws.run_caffe2_operator(op)
                return await aws.fetch_blob("S")

    np.testing.assert_allclose(asyncio.run(remote()), expected, rtol=1e-6)
