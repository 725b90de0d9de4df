"""Caffe2's front door (issue 11): a Caffe2-style script run remotely through `cosserve.caffe2`,
Caffe2's own encodings (serialized OperatorDef / NetDef) sent by a raw stub, bools as ints, and
the numbers where we now give what Caffe2 gives. Every case talks to a real server."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")


# ---- numbers closer to Caffe2's (scope 4) --------------------------------------------------


def caffe2_max0(x: np.ndarray) -> np.ndarray:
    """std::max(0.f, x) as Caffe2 computes it: (0 < x) ? x : 0, so NaN gives 0 (np.maximum gives NaN)."""
    return np.where(0 < x, x, 0.0)


def test_cosine_embedding_criterion_nan_on_the_hinge_branch_is_zero(client):
    s = np.array([np.nan, np.nan, 0.5, -0.75, np.inf], np.float32)
    y = np.array([0, 1, -1, 2, 0], np.int32)
    margin = 0.25
    out = client.compute("CosineEmbeddingCriterion", {"S": s, "Y": y}, ["loss"], device="cpu", margin=margin)["loss"]
    expected = np.where(y == 1, 1 - s, caffe2_max0(s - np.float32(margin)))
    np.testing.assert_array_equal(out, expected.astype(np.float32))  # NaN only where y == 1
    assert not np.signbit(out[[0, 3]]).any()


def test_l1_distance_gradient_dead_zone_is_positive_zero(client):
    x = np.array([[0.0, 1e-13, -1e-13, 0.5, 2.0]], np.float32)
    y = np.array([[0.0, 0.0, 0.0, 0.5, 1.0]], np.float32)
    g = np.array([3.0], np.float32)
    out = client.compute("L1DistanceGradient", {"X": x, "Y": y, "dL": g}, ["dX", "dY"], device="cpu")
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
def test_dot_product_with_padding_of_an_x_with_no_elements_is_shape_0(client, xs, ys, args):
    x = np.zeros(xs, np.float32)
    y = np.arange(np.prod(ys), dtype=np.float32).reshape(ys)
    out = client.compute("DotProductWithPadding", {"X": x, "Y": y}, ["P"], device="cpu", **args)["P"]
    assert out.shape == (0,) and out.dtype == np.float32  # Caffe2: N = 0 when X has no elements
    # The gradient takes the forward's dP, (0,), and gives zeros of X's and Y's shapes.
    grads = client.compute(
        "DotProductWithPaddingGradient", {"X": x, "Y": y, "dP": np.zeros(0, np.float32)}, ["dX", "dY"], device="cpu", **args
    )
    np.testing.assert_array_equal(grads["dX"], np.zeros(xs, np.float32))
    np.testing.assert_array_equal(grads["dY"], np.zeros(ys, np.float32))
