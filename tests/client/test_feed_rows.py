"""Session.feed_rows (sync and asyncio): a matrix sent from batches of its rows as they come, the
batches cast to the dtype; a stream that ends short of its rows, or a batch of another width,
is refused by the server and the blob is not made."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from cosserve import CosserveRpcError, aio


def batches(x: np.ndarray, rows: int):
    return (x[i : i + rows] for i in range(0, len(x), rows))


def test_rows_in_batches_make_the_matrix(cpu_ws):
    x = np.random.default_rng(0).standard_normal((20_000, 48))  # 7.7 MB of float32: several chunks
    sent: list[int] = []
    cpu_ws.feed_rows("C", np.float32, x.shape, batches(x, 3_001), progress=sent.append)
    np.testing.assert_array_equal(cpu_ws.fetch_blob("C"), x.astype(np.float32))
    assert sum(sent) == x.size * 4


@pytest.mark.parametrize("bad", ["short", "wide"])
def test_a_stream_that_does_not_make_the_shape_is_refused(cpu_ws, bad):
    x = np.ones((1000, 8), np.float32)
    pieces = [x[:500]] if bad == "short" else [x[:500], np.ones((500, 9), np.float32)]
    with pytest.raises(CosserveRpcError) as caught:
        cpu_ws.feed_rows("C", np.float32, x.shape, iter(pieces))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stream ended after 16000 of 32000 bytes" in caught.value.details()
    assert not cpu_ws.has_blob("C")


def test_the_asyncio_session_feeds_rows_too(server):
    x = np.random.default_rng(1).standard_normal((5000, 16)).astype(np.float16)

    async def main() -> np.ndarray:
        async with aio.Client(server.address) as client, client.session("cpu") as ws:
            await ws.feed_rows("C", np.float16, x.shape, batches(x, 777))
            return await ws.fetch_blob("C")

    np.testing.assert_array_equal(asyncio.run(main()), x)
