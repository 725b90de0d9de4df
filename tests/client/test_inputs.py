"""How the client reads what it is given (issue 21, items 1 and 2): inputs given by name bind by the
schema's input names on every entry point that takes them (Compute inline or through a temporary
session, sync and asyncio), and a nested list of rows is one array of queries, as feed_blob takes it."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from cosserve import InvalidArgumentError, aio


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _reference_top_k(q: np.ndarray, c: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = _unit(q) @ _unit(c).T
    indices = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, indices, axis=1), indices


RNG = np.random.default_rng(21)
Q = RNG.standard_normal((3, 4)).astype(np.float32)
C = RNG.standard_normal((50, 4)).astype(np.float32)
# Past one Compute message (7 MiB): fed to a temporary session, the other path of compute.
C_LARGE = RNG.standard_normal((600_000, 4)).astype(np.float32)


@pytest.mark.parametrize("corpus", [C, C_LARGE], ids=["inline", "temporary-session"])
def test_compute_binds_inputs_by_name_whatever_their_order(client, corpus):
    """{"C": C, "Q": Q} bound C as Q: 50 queries against 3 rows, a silent wrong answer for k <= 3."""
    want_scores, want_indices = _reference_top_k(Q, corpus, 2)
    for inputs in ({"C": corpus, "Q": Q}, {"Q": Q, "C": corpus}):
        out = client.compute("CosineTopK", inputs, ["Scores", "Indices"], k=2)
        np.testing.assert_array_equal(out["Indices"], want_indices)
        np.testing.assert_allclose(out["Scores"], want_scores, rtol=1e-5, atol=1e-6)


def test_compute_binds_by_name_for_three_inputs(client):
    x, y, dl = (RNG.standard_normal((5, 3)) for _ in range(3))
    dl = dl[:, 0]
    # L1Distance: L = sum |x - y| per row; dL/dX = dL * sign(x - y), dL/dY = -dL/dX.
    out = client.compute("L1DistanceGradient", {"dL": dl, "Y": y, "X": x}, ["dX", "dY"])
    np.testing.assert_allclose(out["dX"], dl[:, None] * np.sign(x - y))
    np.testing.assert_allclose(out["dY"], -dl[:, None] * np.sign(x - y))


def test_an_unknown_or_missing_input_name_lists_the_schemas_names(client):
    with pytest.raises(InvalidArgumentError, match=r"CosineTopK takes the inputs Q, C, given by these names: 'A' is not one of them"):
        client.compute("CosineTopK", {"Q": Q, "A": C}, ["Scores", "Indices"], k=2)
    with pytest.raises(InvalidArgumentError, match=r"CosineTopK takes the inputs Q, C, given by these names: missing 'C'"):
        client.compute("CosineTopK", {"Q": Q}, ["Scores", "Indices"], k=2)


def test_the_asyncio_compute_binds_by_name_too(server):
    want_scores, want_indices = _reference_top_k(Q, C, 2)

    async def main() -> None:
        async with aio.Client(server.address) as client:
            out = await client.compute("CosineTopK", {"C": C, "Q": Q}, ["Scores", "Indices"], k=2)
            np.testing.assert_array_equal(out["Indices"], want_indices)
            np.testing.assert_allclose(out["Scores"], want_scores, rtol=1e-5, atol=1e-6)
            with pytest.raises(InvalidArgumentError, match="takes the inputs Q, C"):
                await client.compute("CosineTopK", {"C": C, "B": Q}, ["Scores", "Indices"], k=2)

    asyncio.run(main())


# ---- queries: one array, or an iterable of batches ----------------------------------------


ROWS = [[0.1 * (i + 1) + 0.01 * j for j in range(8)] for i in range(2)]


def test_a_nested_list_of_rows_is_one_array_of_queries(cpu_ws):
    """It raised ShapeError "queries must be 2-D (N, D), got shape (8,)": read as batches."""
    corpus = RNG.standard_normal((20, 8))
    cpu_ws.feed_blob("C", corpus)
    want_scores, want_indices = _reference_top_k(np.asarray(ROWS), corpus, 2)
    for queries in (ROWS, tuple(ROWS), [tuple(r) for r in ROWS]):
        scores, indices = cpu_ws.top_k(queries, "C", k=2)
        np.testing.assert_array_equal(indices, want_indices)
        np.testing.assert_allclose(scores, want_scores, rtol=1e-12)
    # Batches stay batches: a list of 2-D arrays or of lists of rows, and any other iterable.
    for batches in ([np.asarray(ROWS[:1]), np.asarray(ROWS[1:])], [ROWS[:1], ROWS[1:]], (np.asarray([r]) for r in ROWS)):
        np.testing.assert_array_equal(cpu_ws.top_k(batches, "C", k=2)[1], want_indices)


def test_the_asyncio_top_k_reads_a_nested_list_as_one_array(server):
    corpus = RNG.standard_normal((20, 8))
    want = _reference_top_k(np.asarray(ROWS), corpus, 2)[1]

    async def main() -> np.ndarray:
        async with aio.Client(server.address) as client, client.session("cpu") as ws:
            await ws.feed_blob("C", corpus)
            return (await ws.top_k(ROWS, "C", k=2))[1]

    np.testing.assert_array_equal(asyncio.run(main()), want)
