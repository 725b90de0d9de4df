"""Every registered operator, generated from tests/op_db.py and run through a real server: numpy
references in four dtypes, gradients against autograd and finite differences, the remote gradient
check and error inputs; then OPS_SPEC's quirks, one test each, and all-or-nothing nets."""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grpc
import ml_dtypes
import numpy as np
import pytest

from cosserve import CosserveRpcError
from cosserve.server.compute import engine  # importing it fills the registry
from cosserve.server.compute.registry import REGISTRY, InputKind, OpSchema
from cosserve.server.errors import InvalidArgument
from tests.op_db import ALL_DTYPES, DEFAULT_TOLERANCES, OP_DB, OpEntry, blob, generic_error_cases, out_blob

torch = pytest.importorskip("torch")

NP_DTYPES: dict[str, Any] = {
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "float32": np.float32,
    "float64": np.float64,
}
OPS = sorted(REGISTRY)
FORWARD_OPS = sorted(name for name in OPS if REGISTRY[name].schema.gradient)
FORWARD_OF = {REGISTRY[name].schema.gradient: name for name in FORWARD_OPS}
GRADIENT_OPS = sorted(FORWARD_OF)
ROWWISE = ["CosineSimilarity", "DotProduct", "DotProductWithPadding", "SquaredL2Distance", "L1Distance"]


def entry(name: str) -> OpEntry:
    if name not in OP_DB:  # test_registered_op_has_an_op_db_entry fails for it
        pytest.skip(f"{name} has no entry in tests/op_db.py")
    return OP_DB[name]


def rng_for(name: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(name.encode()))


def schema(name: str) -> OpSchema:
    return REGISTRY[name].schema


def input_blobs(op: str, count: int) -> list[str]:
    names = [blob(spec.name) for spec in schema(op).inputs]
    return (names + [blob(f"extra{i}") for i in range(count)])[:count]


def run(
    ws: Any, op: str, inputs: Sequence[np.ndarray], args: Mapping[str, Any] | None = None, n_outputs: int | None = None
) -> list[np.ndarray]:
    """Feed `inputs` under blob(input name), run `op` through the server, fetch its outputs."""
    names = input_blobs(op, len(inputs))
    for name, value in zip(names, inputs):
        ws.feed_blob(name, value)
    outputs = [out_blob(o) for o in schema(op).outputs]
    if n_outputs is not None:
        outputs = (outputs + [out_blob(f"extra{i}") for i in range(n_outputs)])[:n_outputs]
    ws.run_operator(op, names, outputs, **(args or {}))
    return [ws.fetch_blob(name) for name in outputs]


def f64(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a).astype(np.float64))


@contextlib.contextmanager
def expect_error(code: grpc.StatusCode, *match: str) -> Iterator[None]:
    """The block must fail with status `code` and a message containing every `match`."""
    with pytest.raises(CosserveRpcError) as info:
        yield
    assert info.value.code() == code, info.value
    for text in match:
        assert text in info.value.details(), f"{text!r} not in {info.value.details()!r}"


# ---- the table and the registry agree ----------------------------------------------------


@pytest.mark.parametrize("op", OPS)
def test_registered_op_has_an_op_db_entry(op):
    assert op in OP_DB, f"operator {op} is registered: add its entry to tests/op_db.py"
    if schema(op).gradient:
        assert OP_DB[op].autograd_ref is not None, f"{op} has a gradient: its op_db entry needs autograd_ref"


def test_every_op_db_entry_is_served(client):
    served = {info.name for info in client.operators()}
    assert set(OP_DB) <= served, f"op_db entries for unknown ops: {sorted(set(OP_DB) - served)}"
    assert served == set(REGISTRY)


@pytest.mark.parametrize("op", FORWARD_OPS)
def test_gradient_op_fits_its_forward_op(op):
    forward, gradient = schema(op), schema(schema(op).gradient)
    assert gradient.args == forward.args, "gradient ops take the forward's arguments"
    assert [i.name for i in gradient.inputs[:-1]] == [i.name for i in forward.inputs]
    n_float = sum(i.kind is InputKind.FLOAT for i in forward.inputs)
    assert len(gradient.outputs) == n_float, "one gradient per floating input of the forward op"


# ---- numbers: every op, every dtype, against the numpy reference ------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("op", OPS)
def test_matches_numpy_reference(ws, op, dtype):
    e = entry(op)
    rtol, atol = e.tolerances.get(dtype, DEFAULT_TOLERANCES[dtype])
    samples = [s for s in e.samples(rng_for(op)) if dtype in s.dtypes]
    assert samples, f"{op} has no sample for {dtype}"
    for sample in samples:
        floating = [a.dtype.kind == "f" for a in sample.inputs]
        inputs = [a.astype(NP_DTYPES[dtype]) if f else a for a, f in zip(sample.inputs, floating)]
        # The reference sees the rounded inputs: only the op's own error is measured.
        want = e.ref(*[a.astype(np.float64) if f else a for a, f in zip(inputs, floating)], **sample.args)
        got = run(ws, op, inputs, sample.args)
        assert len(got) == len(want)
        if e.compare is not None:
            e.compare(got, want, dtype)
            continue
        for i, (g, w) in enumerate(zip(got, want)):
            where = f"{op} output {i}, sample {sample.desc!r}, {dtype}"
            w = np.asarray(w)
            if w.dtype.kind == "f":  # floating outputs have the inputs' dtype
                assert g.dtype == np.dtype(NP_DTYPES[dtype]), f"{where}: dtype {g.dtype}"
                torch.testing.assert_close(f64(g), f64(w), rtol=rtol, atol=atol, msg=lambda m: f"{where}: {m}")
            else:
                assert g.dtype == w.dtype, f"{where}: dtype {g.dtype}, expected {w.dtype}"
                np.testing.assert_array_equal(g, w, err_msg=where)


# ---- gradients: autograd, finite differences, the remote check ---------------------------


def central_differences(e: OpEntry, inputs: Sequence[np.ndarray], args: Mapping[str, Any], i: int,
                        weights: np.ndarray, step: float = 1e-6) -> np.ndarray:
    """d/d inputs[i] of sum(ref(inputs)[0] * weights), by central differences in float64."""
    values = [np.array(a, copy=True) for a in inputs]
    flat = values[i].reshape(-1)
    grad = np.zeros(flat.size)
    for j in range(flat.size):
        original = flat[j]
        flat[j] = original + step
        plus = float((e.ref(*values, **args)[0] * weights).sum())
        flat[j] = original - step
        minus = float((e.ref(*values, **args)[0] * weights).sum())
        flat[j] = original
        grad[j] = (plus - minus) / (2 * step)
    return grad.reshape(values[i].shape)


@pytest.mark.parametrize("grad_op", GRADIENT_OPS)
def test_gradient_matches_autograd_and_finite_differences(ws, grad_op):
    forward = FORWARD_OF[grad_op]
    e = entry(forward)
    assert e.autograd_ref is not None
    slots = [i for i, spec in enumerate(schema(forward).inputs) if spec.kind is InputKind.FLOAT]
    rng = rng_for(grad_op)
    samples = [s for s in e.samples(rng) if s.smooth]
    assert samples
    for sample in samples:
        weights = rng.standard_normal(e.ref(*sample.inputs, **sample.args)[0].shape)
        got = run(ws, grad_op, [*sample.inputs, weights], sample.args)
        assert len(got) == len(slots)
        tensors = [torch.tensor(a, requires_grad=i in slots) for i, a in enumerate(sample.inputs)]
        out = e.autograd_ref(*tensors, **sample.args)
        loss = (out * torch.from_numpy(weights)).sum()
        autograd = torch.autograd.grad(loss, [tensors[i] for i in slots], allow_unused=True, materialize_grads=True)
        for slot, i in enumerate(slots):
            where = f"{grad_op} output {slot}, sample {sample.desc!r}"
            torch.testing.assert_close(f64(got[slot]), autograd[slot], msg=lambda m: f"{where} vs autograd: {m}")
            numeric = central_differences(e, sample.inputs, sample.args, i, weights)
            torch.testing.assert_close(f64(got[slot]), f64(numeric), rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{where} vs finite differences: {m}")


@pytest.mark.parametrize("op", FORWARD_OPS)
def test_remote_gradient_check_is_small(ws, op):
    e = entry(op)
    samples = [s for s in e.samples(rng_for(op)) if s.smooth and all(a.size for a in s.inputs)][:3]
    assert samples
    float_names = [blob(spec.name) for spec in schema(op).inputs if spec.kind is InputKind.FLOAT]
    for sample in samples:
        names = input_blobs(op, len(sample.inputs))
        for name, value in zip(names, sample.inputs):
            ws.feed_blob(name, value)
        result = ws.check_gradient(op, names, **sample.args)
        assert set(result) == {*float_names, "max_abs_error"}
        assert result["max_abs_error"] < 1e-5, (sample.desc, result)


# ---- errors ------------------------------------------------------------------------------

ERROR_CASES = [
    pytest.param(op, case, id=f"{op}-{case.desc}")
    for op in OPS
    if op in OP_DB
    for case in [*OP_DB[op].errors(), *generic_error_cases(OP_DB[op], schema(op))]
]


@pytest.mark.parametrize(("op", "case"), ERROR_CASES)
def test_error_input_is_invalid_argument(cpu_ws, op, case):
    with expect_error(grpc.StatusCode.INVALID_ARGUMENT, *case.match):
        run(cpu_ws, op, case.inputs, case.args, case.n_outputs)
    assert not any(name.startswith("out_") for name in cpu_ws.blobs()), "a failed op wrote an output"


@pytest.mark.parametrize("op", OPS)
def test_shape_errors_name_the_op_once_in_front(op):
    # Shape checks leave the op out of their messages; engine.check_inputs names it, then the blobs.
    shape_errors = 0
    for case in entry(op).errors():
        names = input_blobs(op, len(case.inputs))
        outputs = tuple(out_blob(o) for o in schema(op).outputs)
        try:
            operator, args = engine.bind(engine.OpCall(op, tuple(names), outputs, case.args))
        except InvalidArgument:
            continue  # an argument or count error: bind's own, named there
        tensors = [torch.from_numpy(a) for a in case.inputs]
        try:
            operator.check_shapes(tensors, args)
        except InvalidArgument as raw:
            shape_errors += 1
            assert op not in str(raw), f"{case.desc}: the shape check named the op itself: {raw}"
            with pytest.raises(InvalidArgument) as err:
                engine.check_inputs(operator, names, tensors, args)
            assert str(err.value).startswith(f"{op}: {raw} (blobs: "), (case.desc, str(err.value))
    if not shape_errors:
        pytest.skip(f"{op}'s op_db entry has no shape error cases")


@pytest.mark.parametrize("op", OPS)
def test_missing_input_blob_is_not_found(cpu_ws, op):
    sample = entry(op).samples(rng_for(op))[0]
    names = input_blobs(op, len(sample.inputs))
    for name, value in zip(names[:-1], sample.inputs[:-1]):
        cpu_ws.feed_blob(name, value)
    outputs = [out_blob(o) for o in schema(op).outputs]
    with expect_error(grpc.StatusCode.NOT_FOUND, names[-1]):
        cpu_ws.run_operator(op, names, outputs, **sample.args)


# ---- OPS_SPEC's quirks, one test each ----------------------------------------------------


def call(ws: Any, op: str, *inputs: Any, **args: Any) -> list[np.ndarray]:
    return run(ws, op, [np.asarray(a) for a in inputs], args)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_floor_is_on_squared_norms(ws, dtype):
    (s,) = call(ws, "CosineSimilarity", np.array([[1e-7, 0.0]], dtype), np.array([[1.0, 0.0]], dtype))
    np.testing.assert_allclose(s, [0.1], rtol=1e-6)


def test_zero_row_gives_zero_similarity_never_nan(ws):
    x = np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    y = np.array([[1.0, 2.0], [0.0, 0.0], [0.0, 0.0]])
    (s,) = call(ws, "CosineSimilarity", x, y)
    np.testing.assert_array_equal(s, [0.0, 0.0, 0.0])
    dx, dy = call(ws, "CosineSimilarityGradient", x, y, np.ones(3))
    assert np.isfinite(dx).all() and np.isfinite(dy).all()


def test_0d_is_one_row_of_width_one(ws):
    x, y = np.array(2.0), np.array(-3.0)
    expected = {"CosineSimilarity": -1.0, "DotProduct": -6.0, "SquaredL2Distance": 12.5, "L1Distance": 5.0,
                "DotProductWithPadding": -6.0}
    for op, value in expected.items():
        (out,) = call(ws, op, x, y)
        assert out.shape == (1,) and out[0] == value, (op, out)
    dx, dy = call(ws, "DotProductGradient", x, y, np.array([2.0]))
    assert dx.shape == () and dx == -6.0 and dy == 4.0


def test_1d_of_length_n_is_n_rows_of_width_one(ws):
    x, y = np.array([1.0, -2.0, 3.0]), np.array([4.0, 5.0, 0.0])
    expected = {
        "CosineSimilarity": [1.0, -1.0, 0.0],
        "DotProduct": [4.0, -10.0, 0.0],
        "SquaredL2Distance": [4.5, 24.5, 4.5],
        "L1Distance": [3.0, 7.0, 3.0],
    }
    for op, values in expected.items():
        (out,) = call(ws, op, x, y)
        np.testing.assert_array_equal(out, values, err_msg=op)


def test_nd_is_n_rows_of_the_trailing_product(ws):
    x, y = np.arange(8.0).reshape(2, 2, 2), np.ones((2, 2, 2))
    (p,) = call(ws, "DotProduct", x, y)
    np.testing.assert_array_equal(p, [6.0, 22.0])
    (l1,) = call(ws, "L1Distance", x, y)
    np.testing.assert_array_equal(l1, [4.0, 18.0])
    dx, _ = call(ws, "SquaredL2DistanceGradient", x, y, np.array([1.0, 2.0]))
    np.testing.assert_array_equal(dx, np.concatenate([x[:1] - 1, 2 * (x[1:] - 1)]))


@pytest.mark.parametrize("op", ["CosineSimilarity", "SquaredL2Distance", "L1Distance"])
def test_zero_width_rows_give_zeros(ws, op):
    (out,) = call(ws, op, np.zeros((3, 0)), np.zeros((3, 0)))
    np.testing.assert_array_equal(out, np.zeros(3))


@pytest.mark.parametrize("op", ROWWISE)
def test_zero_rows_give_shape_0(ws, op):
    (out,) = call(ws, op, np.zeros((0, 4)), np.zeros((0, 4)))
    assert out.shape == (0,) and out.dtype == np.float64


@pytest.mark.parametrize("op", ["DotProduct", "DotProductWithPadding"])
def test_zero_width_rows_of_dot_products_give_shape_0(ws, op):
    # Caffe2: N = 0 when X has no elements (DotProductWithPadding: whatever Y's width).
    (out,) = call(ws, op, np.zeros((3, 0)), np.zeros((3, 0)))
    assert out.shape == (0,)


@pytest.mark.parametrize("shape", [(3, 0), (0, 4), (2, 0, 5), (0,)], ids=str)
def test_dot_product_of_any_zero_size_input_gives_shape_0(ws, shape):
    (p,) = call(ws, "DotProduct", np.zeros(shape, np.float32), np.zeros(shape, np.float32))
    assert p.shape == (0,) and p.dtype == np.float32
    dx, dy = call(ws, "DotProductGradient", np.zeros(shape), np.zeros(shape), np.zeros(0))
    assert dx.shape == shape and dy.shape == shape


def test_empty_gradients_have_the_input_shapes(ws):
    dx, dy = call(ws, "CosineSimilarityGradient", np.zeros((3, 0)), np.zeros((3, 0)), np.ones(3))
    assert dx.shape == (3, 0) and dy.shape == (3, 0)
    (ds,) = call(ws, "CosineEmbeddingCriterionGradient", np.zeros((0, 2)), np.zeros(0, np.int32), np.zeros(0))
    assert ds.shape == (0, 2)


@pytest.mark.parametrize("label_dtype", [np.int32, np.int64])
def test_labels_other_than_1_take_the_hinge_branch(ws, label_dtype):
    s = np.full(5, 0.5)
    y = np.array([1, 0, -1, 2, 7], label_dtype)
    (loss,) = call(ws, "CosineEmbeddingCriterion", s, y, margin=0.25)
    np.testing.assert_array_equal(loss, [0.5, 0.25, 0.25, 0.25, 0.25])
    (ds,) = call(ws, "CosineEmbeddingCriterionGradient", s, y, np.full(5, 2.0), margin=0.25)
    np.testing.assert_array_equal(ds, [-2.0, 2.0, 2.0, 2.0, 2.0])


def test_criterion_gradient_passes_g_at_the_margin(ws):
    s = np.array([0.25, 0.25, 0.125, 0.375])
    y = np.array([0, 1, 0, 0], np.int32)
    (loss,) = call(ws, "CosineEmbeddingCriterion", s, y, margin=0.25)
    np.testing.assert_array_equal(loss, [0.0, 0.75, 0.0, 0.125])
    (ds,) = call(ws, "CosineEmbeddingCriterionGradient", s, y, np.full(4, 3.0), margin=0.25)
    np.testing.assert_array_equal(ds, [3.0, -3.0, 0.0, 3.0])  # ≥: loss 0 at s == margin, gradient g


def test_l1_gradient_dead_zone(ws):
    x = np.array([[0.0, 1e-13, 1e-12, 2e-12, 0.5, -0.5]])
    y = np.zeros((1, 6))
    dx, dy = call(ws, "L1DistanceGradient", x, y, np.array([3.0]))
    np.testing.assert_array_equal(dx, [[0.0, 0.0, 0.0, 3.0, 3.0, -3.0]])
    np.testing.assert_array_equal(dy, -dx)


@pytest.mark.parametrize(("dtype", "big"), [(np.float64, 1e9), (np.float32, 1e4)])
def test_squared_l2_is_computed_as_a_difference(ws, dtype, big):
    x, y = np.array([[big + 1.0]], dtype), np.array([[big]], dtype)
    naive = (x * x + y * y).sum() / 2 - (x * y).sum()  # Caffe2's expansion cancels to the wrong value
    assert naive != 0.5
    (dist,) = call(ws, "SquaredL2Distance", x, y)
    np.testing.assert_array_equal(dist, np.array([0.5], dtype))


def test_criterion_needs_only_equal_element_counts(ws):
    s, y = np.array([[0.5, -0.5], [0.75, 0.0]]), np.array([1, 0, 1, 0], np.int64)
    (loss,) = call(ws, "CosineEmbeddingCriterion", s, y)
    assert loss.shape == (2, 2)
    np.testing.assert_array_equal(loss, [[0.5, 0.0], [0.25, 0.0]])
    (ds,) = call(ws, "CosineEmbeddingCriterionGradient", s, y, np.ones(4))
    assert ds.shape == (2, 2)
    np.testing.assert_array_equal(ds, [[-1.0, 0.0], [-1.0, 1.0]])


@pytest.mark.parametrize("op", [g for g in GRADIENT_OPS if FORWARD_OF[g] in ROWWISE])
@pytest.mark.parametrize("g_shape", [(4,), (2, 1), (1, 2), ()], ids=str)
def test_gradient_ops_need_1d_gradient_of_length_n(cpu_ws, op, g_shape):
    x = np.ones((2, 3))
    with expect_error(grpc.StatusCode.INVALID_ARGUMENT, op, "1-D of length 2"):
        call(cpu_ws, op, x, x, np.ones(g_shape))


def test_padding_gradient_takes_the_forward_args(ws):
    x, y = np.array([[1.0, 2.0, 3.0]]), np.array([[4.0]])
    (p,) = call(ws, "DotProductWithPadding", x, y, pad_value=2.0)
    np.testing.assert_array_equal(p, [4.0 + 2.0 * (2.0 + 3.0)])
    dx, dy = call(ws, "DotProductWithPaddingGradient", x, y, np.array([3.0]), pad_value=2.0)
    np.testing.assert_array_equal(dx, [[12.0, 6.0, 6.0]])
    np.testing.assert_array_equal(dy, [[3.0]])


def test_replicate_tiles_the_shorter_row(ws):
    x, y = np.array([[1.0, 2.0, 3.0, 4.0]]), np.array([[1.0, 10.0]])
    (p,) = call(ws, "DotProductWithPadding", y, x, replicate=True, pad_value=5.0)
    np.testing.assert_array_equal(p, [1.0 + 20.0 + 3.0 + 40.0])
    dy, dx = call(ws, "DotProductWithPaddingGradient", y, x, np.array([2.0]), replicate=True)
    np.testing.assert_array_equal(dx, [[2.0, 20.0, 2.0, 20.0]])
    np.testing.assert_array_equal(dy, [[8.0, 12.0]])


@pytest.mark.parametrize("op", ["DotProductWithPadding", "DotProductWithPaddingGradient"])
def test_replicate_needs_one_width_to_divide_the_other(cpu_ws, op):
    g = (np.ones(1),) if op.endswith("Gradient") else ()
    with expect_error(grpc.StatusCode.INVALID_ARGUMENT, op, "divide", "width 4", "width 3"):
        call(cpu_ws, op, np.ones((1, 4)), np.ones((1, 3)), *g, replicate=True)
    call(cpu_ws, op, np.ones((1, 4)), np.ones((1, 3)), *g)  # fine when padding


def test_criterion_gradient_takes_margin(ws):
    s, y = np.array([0.0, 0.5]), np.array([0, 0], np.int32)
    (ds,) = call(ws, "CosineEmbeddingCriterionGradient", s, y, np.ones(2), margin=0.25)
    np.testing.assert_array_equal(ds, [0.0, 1.0])


def test_integer_arguments_are_accepted_as_floats(ws):
    s, y = np.array([0.5, -0.5]), np.array([0, 0], np.int32)
    (loss,) = call(ws, "CosineEmbeddingCriterion", s, y, margin=0)
    np.testing.assert_array_equal(loss, [0.5, 0.0])
    (p,) = call(ws, "DotProductWithPadding", np.ones((1, 3)), np.ones((1, 1)), pad_value=2)
    np.testing.assert_array_equal(p, [5.0])


def test_float16_is_computed_in_float32(ws):
    # x·x = 180000 overflows float16 (max 65504); computed in float32 the similarity is exactly 1.
    x = np.array([[300.0, 300.0]], np.float16)
    (s,) = call(ws, "CosineSimilarity", x, x)
    assert s.dtype == np.float16 and s[0] == 1.0
    # A float16 running sum of ones stalls at 2048; 3000 is a float16 number.
    ones = np.ones((1, 3000), np.float16)
    (p,) = call(ws, "DotProduct", ones, ones)
    assert p[0] == 3000.0


def test_bfloat16_is_computed_in_float32(ws):
    ones = np.ones((1, 300), ml_dtypes.bfloat16)
    (l1,) = call(ws, "L1Distance", ones, -ones)  # 600: bfloat16 accumulation stalls at 512
    assert l1.dtype == ml_dtypes.bfloat16 and l1[0] == ml_dtypes.bfloat16(600.0)


# ---- nets: all or nothing ----------------------------------------------------------------


def test_net_whose_third_op_fails_changes_nothing(ws):
    rng = np.random.default_rng(3)
    ws.feed_blob("a", rng.standard_normal((3, 4)))
    ws.feed_blob("b", rng.standard_normal((3, 4)).astype(np.float32))
    ws.feed_blob("wide", rng.standard_normal((3, 5)))
    ws.feed_blob("labels", np.array([1, 0, 1], np.int32))
    before = {name: ws.fetch_blob(name) for name in ws.blobs()}
    net = [
        ("SquaredL2Distance", ["a", "a"], ["d"]),
        ("Cos", ["a"], ["a"]),  # overwrites an input in the staged copy
        ("CosineSimilarity", ["a", "wide"], ["s"]),  # shape mismatch
        ("DotProduct", ["a", "a"], ["never"]),
    ]
    with expect_error(grpc.StatusCode.INVALID_ARGUMENT, "op #2", "CosineSimilarity", "'wide'", "(3, 5)"):
        ws.run_net(net)
    assert ws.blobs() == sorted(before)
    for name, value in before.items():
        got = ws.fetch_blob(name)
        assert (got.dtype, got.shape, got.tobytes()) == (value.dtype, value.shape, value.tobytes()), name


def test_net_stops_with_not_found_and_changes_nothing(ws):
    ws.feed_blob("a", np.ones((2, 2)))
    with expect_error(grpc.StatusCode.NOT_FOUND, "'missing'"):
        ws.run_net([("Cos", ["a"], ["a"]), ("DotProduct", ["a", "missing"], ["p"])])
    assert ws.blobs() == ["a"]
    np.testing.assert_array_equal(ws.fetch_blob("a"), np.ones((2, 2)))


def test_output_may_reuse_an_input_name(ws):
    x, y, g = np.array([[1.0, 2.0], [3.0, 5.0]]), np.array([[0.5, -1.0], [2.0, 2.0]]), np.array([2.0, -1.0])
    for name, value in {"x": x, "y": y, "g": g}.items():
        ws.feed_blob(name, value)
    # Both outputs overwrite inputs; each must come from the old values.
    ws.run_operator("DotProductGradient", ["x", "y", "g"], ["x", "y"])
    np.testing.assert_array_equal(ws.fetch_blob("x"), g[:, None] * y)
    np.testing.assert_array_equal(ws.fetch_blob("y"), g[:, None] * x)
    ws.run_net([("SquaredL2Distance", ["x", "y"], ["x"]), ("Cos", ["x"], ["x"])])
    np.testing.assert_allclose(ws.fetch_blob("x"), np.cos(0.5 * ((g[:, None] * (y - x)) ** 2).sum(1)))
    assert ws.blobs() == ["g", "x", "y"]
