"""Cos and CosGradient through a real server: numpy and torch autograd references, errors, atomicity."""

from __future__ import annotations

import grpc
import ml_dtypes
import numpy as np
import pytest

from cosserve import CosserveRpcError

torch = pytest.importorskip("torch")

FLOATS = {
    "float16": (np.float16, dict(rtol=2e-3, atol=2e-3)),
    "bfloat16": (ml_dtypes.bfloat16, dict(rtol=1.6e-2, atol=1.6e-2)),
    "float32": (np.float32, dict(rtol=1e-6, atol=1e-6)),
    "float64": (np.float64, dict(rtol=1e-12, atol=1e-12)),
}


@pytest.mark.parametrize("dtype_name", FLOATS)
@pytest.mark.parametrize("shape", [(), (5,), (3, 4), (2, 0, 3)], ids=str)
def test_cos_matches_numpy(ws, dtype_name, shape):
    dtype, tol = FLOATS[dtype_name]
    x = np.random.default_rng(0).uniform(-4, 4, size=shape).astype(dtype)
    ws.feed_blob("X", x)
    ws.run_operator("Cos", ["X"], ["Y"])
    y = ws.fetch_blob("Y")
    assert y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_allclose(y.astype(np.float64), np.cos(x.astype(np.float64)), **tol)


@pytest.mark.parametrize("dtype_name", FLOATS)
def test_cos_gradient_matches_autograd(ws, dtype_name):
    dtype, tol = FLOATS[dtype_name]
    rng = np.random.default_rng(1)
    x = rng.uniform(-4, 4, size=(4, 5)).astype(dtype)
    dy = rng.standard_normal((4, 5)).astype(dtype)
    ws.feed_blob("X", x)
    ws.feed_blob("dY", dy)
    ws.run_operator("CosGradient", ["X", "dY"], ["dX"])
    got = ws.fetch_blob("dX")
    assert got.dtype == x.dtype
    xt = torch.tensor(x.astype(np.float64), requires_grad=True)
    torch.cos(xt).backward(torch.tensor(dy.astype(np.float64)))
    np.testing.assert_allclose(got.astype(np.float64), xt.grad.numpy(), **tol)
    np.testing.assert_allclose(got.astype(np.float64), -dy.astype(np.float64) * np.sin(x.astype(np.float64)), **tol)


def test_cos_gradient_matches_finite_differences(cpu_ws):
    x = np.random.default_rng(2).uniform(-3, 3, size=7)
    dy = np.random.default_rng(3).standard_normal(7)
    cpu_ws.feed_blob("X", x)
    cpu_ws.feed_blob("dY", dy)
    cpu_ws.run_operator("CosGradient", ["X", "dY"], ["dX"])
    h = 1e-6
    numeric = dy * (np.cos(x + h) - np.cos(x - h)) / (2 * h)
    np.testing.assert_allclose(cpu_ws.fetch_blob("dX"), numeric, rtol=1e-6, atol=1e-8)


def test_output_may_reuse_the_input_name(cpu_ws):
    cpu_ws.feed_blob("X", np.array([0.0, np.pi]))
    cpu_ws.run_operator("Cos", ["X"], ["X"])
    np.testing.assert_allclose(cpu_ws.fetch_blob("X"), [1.0, -1.0])


@pytest.mark.parametrize(
    "op, inputs, outputs, args, needle",
    [
        ("Sin", ["X"], ["Y"], {}, "unknown operator type 'Sin'"),
        ("Cos", ["X", "X"], ["Y"], {}, "Cos takes 1 input (X), got 2"),
        ("Cos", ["X"], [], {}, "Cos takes 1 output (Y), got 0"),
        ("Cos", ["I"], ["Y"], {}, "got int32"),
        ("Cos", ["X"], ["Y"], {"margin": 1.0}, "Cos has no argument 'margin'"),
        ("CosGradient", ["X", "Short"], ["dX"], {}, "CosGradient: input dY must have the shape of X"),
        ("CosGradient", ["X", "X64"], ["dX"], {}, "floating inputs must share a dtype"),
    ],
    ids=["unknown-op", "two-inputs", "no-output", "int-input", "unknown-arg", "shape", "mixed-dtype"],
)
def test_bad_calls_are_invalid_argument_and_change_nothing(cpu_ws, op, inputs, outputs, args, needle):
    blobs = {
        "X": np.ones((2, 3), np.float32),
        "I": np.ones((2, 3), np.int32),
        "Short": np.ones(3, np.float32),
        "X64": np.ones((2, 3), np.float64),
        "Y": np.full(4, 7.0, np.float32),  # an existing output blob must survive the failure
    }
    for name, value in blobs.items():
        cpu_ws.feed_blob(name, value)
    with pytest.raises(CosserveRpcError) as err:
        cpu_ws.run_operator(op, inputs, outputs, **args)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.value.details()
    assert cpu_ws.blobs() == sorted(blobs)
    for name, value in blobs.items():
        got = cpu_ws.fetch_blob(name)
        assert got.dtype == value.dtype and got.tobytes() == value.tobytes()


def test_missing_input_is_not_found(cpu_ws):
    with pytest.raises(CosserveRpcError) as err:
        cpu_ws.run_operator("Cos", ["absent"], ["Y"])
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'absent'" in err.value.details()
    assert cpu_ws.blobs() == []


def test_compute_runs_without_a_session(client):
    x = np.linspace(-1, 1, 9, dtype=np.float32)
    out = client.compute("Cos", {"X": x}, ["Y"], device="cpu")
    np.testing.assert_allclose(out["Y"], np.cos(x), rtol=1e-6)
    with pytest.raises(CosserveRpcError) as err:
        client.compute("Cos", {"X": x}, ["Y"], device="cpu", margin=1.0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
