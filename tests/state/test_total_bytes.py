"""--max-total-bytes: what all sessions together may hold, whoever owns them, so that many
identities (each under its own --max-identity-bytes) cannot together take the host's memory."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from cosserve import Client, CosserveRpcError
from tests.conftest import start_server

MiB = 1024 * 1024


def test_sessions_together_stop_at_the_servers_limit_and_closing_one_frees_room():
    running = start_server(max_total_bytes=5 * MiB, device="cpu")
    try:
        with Client(running.address) as client:
            first, second = client.session("cpu"), client.session("cpu")
            first.feed_blob("x", np.ones(3 * MiB // 4, np.float32))  # 3 MiB
            with pytest.raises(CosserveRpcError) as err:
                second.feed_blob("x", np.ones(3 * MiB // 4, np.float32))  # 3 + 3 > 5
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-total-bytes" in err.value.details()
            assert not second.has_blob("x")
            second.feed_blob("small", np.ones(1024, np.float32))  # what fits still fits
            first.close()  # gives its 3 MiB back to the server
            second.feed_blob("x", np.ones(3 * MiB // 4, np.float32))
            np.testing.assert_array_equal(second.fetch_blob("x"), np.ones(3 * MiB // 4, np.float32))
            second.close()
    finally:
        running.stop(0)


def test_the_limit_is_checked_before_an_ops_outputs_are_allocated():
    running = start_server(max_total_bytes=5 * MiB, device="cpu")
    try:
        with Client(running.address) as client, client.session("cpu") as ws:
            ws.feed_blob("Q", np.ones((1024, 4), np.float32))
            with pytest.raises(CosserveRpcError) as err:  # a 1024 x 2048 float32 matrix: 8 MiB
                ws.feed_blob("C", np.ones((2048, 4), np.float32))
                ws.run_operator("CosineSimilarityMatrix", ["Q", "C"], ["S"])
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-total-bytes" in err.value.details()
            assert not ws.has_blob("S")
    finally:
        running.stop(0)
