"""cosserve.aio against a real server: the sync client's methods as coroutines, the same numbers,
errors and session-id metadata."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np
import pytest

import cosserve
from cosserve import CosserveRpcError, OpSpecError, ShapeError, UnsupportedDtypeError, aio, limits, wire

from tests.conftest import start_server


def run(test: Callable[[aio.Client], Awaitable[Any]], address: str, **kwargs: Any) -> Any:
    async def main() -> Any:
        async with aio.Client(address, **kwargs) as client:
            return await test(client)

    return asyncio.run(main())


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.maximum((x.astype(np.float64) ** 2).sum(axis=1, keepdims=True), 1e-12))


def test_the_same_public_methods_as_the_sync_client():
    for sync_cls, async_cls in ((cosserve.Client, aio.Client), (cosserve.Session, aio.Session)):
        public = {n for n in vars(sync_cls) if not n.startswith("_")}
        missing = public - set(vars(async_cls))
        assert missing == set(), (async_cls, missing)
        for name in public:
            attr = getattr(async_cls, name)
            if not callable(attr) or name == "session":
                continue
            if name.startswith("iter_"):
                assert inspect.isasyncgenfunction(attr)
            else:
                assert inspect.iscoroutinefunction(attr), name


def test_feed_fetch_small_and_streamed(server):
    rng = np.random.default_rng(0)
    small = rng.standard_normal((3, 4)).astype(np.float32)
    large = rng.standard_normal((1_000_000, 3))  # 24 MB: FeedBlobStream and a streamed fetch
    sent: list[int] = []

    async def test(client: aio.Client) -> None:
        async with client.session("cpu") as ws:
            await ws.feed_blob("S", small)
            await ws.feed_blob("L", large, progress=sent.append)
            np.testing.assert_array_equal(await ws.fetch_blob("S"), small)
            got = await ws.fetch_blob("L")
            assert got.dtype == np.float64 and got.flags.writeable
            np.testing.assert_array_equal(got, large)
            assert await ws.has_blob("L") and await ws.blobs() == ["L", "S"]
            await ws.remove_blob("L")
            assert not await ws.has_blob("L")
            await ws.reset()
            assert await ws.blobs() == []

    run(test, server.address)
    assert sum(sent) == large.nbytes and len(sent) == -(-large.nbytes // limits.CHUNK_BYTES)


def test_operators_nets_compute_and_gradients(server):
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((4, 8)).astype(np.float32), rng.standard_normal((4, 8)).astype(np.float32)
    labels = np.array([1, -1, 1, -1], np.int32)
    reference = (_unit(x) * _unit(y)).sum(axis=1)

    async def test(client: aio.Client) -> None:
        assert "CosineSimilarity" in [op.name for op in await client.operators()]
        assert isinstance(await client.corpora(), list)
        out = await client.compute("CosineSimilarity", {"X": x, "Y": y}, ["S"])
        np.testing.assert_allclose(out["S"], reference, rtol=1e-5, atol=1e-6)
        big = np.ones((2_000_000, 1), np.float32)  # 8 MB of input: through a temporary session
        np.testing.assert_allclose((await client.compute("Cos", {"X": big}, ["Y"]))["Y"], np.cos(big), rtol=1e-6)
        ws = await client.session("cpu")  # awaitable as well as a context manager
        try:
            await ws.feed_blob("X", x)
            await ws.feed_blob("Y", y)
            await ws.feed_blob("L", labels)
            await ws.run_operator("CosineSimilarity", ["X", "Y"], ["S"])
            np.testing.assert_allclose(await ws.fetch_blob("S"), reference, rtol=1e-5, atol=1e-6)
            await ws.run_net([("Cos", ["S"], ["C"]), ("CosineEmbeddingCriterion", ["S", "L"], ["loss"], {"margin": 0.1})])
            assert set(await ws.blobs()) == {"X", "Y", "L", "S", "C", "loss"}
            await ws.feed_blob("X64", x.astype(np.float64))
            await ws.feed_blob("Y64", y.astype(np.float64))
            check = await ws.check_gradient("CosineSimilarity", ["X64", "Y64"])
            assert set(check) == {"X64", "Y64", "max_abs_error"} and check["max_abs_error"] < 1e-5
            assert set(check.rel_errors) == {"X64", "Y64"} and check.max_rel_error <= check["max_abs_error"]
        finally:
            await ws.close()
            await ws.close()  # harmless twice

    run(test, server.address)


def test_top_k_and_iter_top_k(server):
    rng = np.random.default_rng(2)
    corpus = rng.standard_normal((5000, 16)).astype(np.float32)
    queries = rng.standard_normal((300, 16)).astype(np.float32)
    sims = _unit(queries) @ _unit(corpus).T
    expected = np.argsort(-sims, axis=1, kind="stable")[:, :10]

    async def test(client: aio.Client) -> None:
        async with client.session("cpu") as ws:
            await ws.feed_blob("C", corpus)
            scores, indices = await ws.top_k(queries, "C", k=10, batch_size=64)
            np.testing.assert_array_equal(indices, expected)
            np.testing.assert_allclose(scores, np.take_along_axis(sims, expected, 1), atol=1e-5)
            pieces = [s.shape[0] async for s, _ in ws.iter_top_k(iter([queries[:7], queries[7:]]), "C", k=10)]
            assert sum(pieces) == 300
            # A k whose one-row reply passes a message: scored by CosineTopK in the session.
            big_scores, big_indices = await ws.top_k(queries[:2], "C", k=5000)
            np.testing.assert_array_equal(np.sort(big_indices, axis=1), np.tile(np.arange(5000), (2, 1)))
            np.testing.assert_allclose(big_scores, np.sort(sims[:2], axis=1)[:, ::-1], atol=1e-5)
            assert await ws.blobs() == ["C"]
            # Breaking off an iterator stops its stream; the session goes on.
            async for _ in ws.iter_top_k(queries, "C", k=3, batch_size=10):
                break
            assert (await ws.top_k(queries[:1], "C", k=1))[1][0, 0] == expected[0, 0]

    run(test, server.address)


def test_errors_are_the_same_family(server):
    async def test(client: aio.Client) -> None:
        async with client.session("cpu") as ws:
            with pytest.raises(CosserveRpcError) as err:
                await ws.fetch_blob("absent")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND and "'absent'" in err.value.details()
            with pytest.raises(CosserveRpcError) as err:
                await ws.run_operator("cosine_similarity", ["X", "Y"], ["S"])
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "did you mean 'CosineSimilarity'?" in err.value.details()
            with pytest.raises(UnsupportedDtypeError):
                await ws.feed_blob("Z", np.ones(2, np.complex64))
            with pytest.raises(OpSpecError):
                await ws.run_net([("Cos", ["X"])])
            await ws.feed_blob("C", np.ones((4, 2), np.float32))
            with pytest.raises(ShapeError):
                await ws.top_k(np.ones(2, np.float32), "C", k=1)
            with pytest.raises(CosserveRpcError) as err:
                await ws.top_k(np.ones((2, 2), np.float32), "C", k=9)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "got 9" in err.value.details()
        with pytest.raises(CosserveRpcError) as err:
            await client.attach(ws.id)  # closed
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

    run(test, server.address)


def test_session_ids_are_proposed_and_sent_as_metadata():
    """A server that checks `cosserve-session-id` on every call of a session (cosserve_servicer._check_routed)
    answers every method; a session made by the sync client is attached by the async one."""
    seen: list[tuple[str, str]] = []
    running = start_server()
    try:
        with cosserve.Client(running.address) as sync_client:
            sync_ws = sync_client.session("cpu")
            sync_ws.feed_blob("X", np.arange(6, dtype=np.float32).reshape(2, 3))

        async def test(client: aio.Client) -> None:
            ws = await client.attach(sync_ws.id)
            np.testing.assert_array_equal(await ws.fetch_blob("X"), np.arange(6, dtype=np.float32).reshape(2, 3))
            async with client.session("cpu") as fresh:
                assert len(fresh.id) == 32 and fresh.id != ws.id  # the proposed 128-bit id, as hex
                seen.append((fresh.id, str(client._metadata_for(fresh.id))))
                await fresh.feed_blob("Y", np.ones((2, 2), np.float32))
            await ws.close()

        run(test, running.address)
        assert limits.SESSION_ID_METADATA in seen[0][1] and seen[0][0] in seen[0][1]
    finally:
        running.stop(0)


def test_a_token_server():
    running = start_server(auth_token="s3cret")
    try:
        async def refused(client: aio.Client) -> None:
            with pytest.raises(CosserveRpcError) as err:
                await client.operators()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

        run(refused, running.address)

        async def allowed(client: aio.Client) -> None:
            assert await client.operators()

        run(allowed, running.address, token="s3cret")
    finally:
        running.stop(0)


def test_shared_memory(tmp_path):
    running = start_server(allow_shm=True)
    data = np.random.default_rng(3).standard_normal((512, 512)).astype(np.float32)
    try:
        async def test(client: aio.Client) -> None:
            async with client.session("cpu") as ws:
                await ws.feed_blob("X", data, shm=True)
                np.testing.assert_array_equal(await ws.fetch_blob("X"), data)
                np.testing.assert_array_equal(await ws.fetch_blob("X", shm=True), data)

        run(test, running.address)
    finally:
        running.stop(0)


def test_a_fetch_that_receives_nothing_is_cancelled_after_the_client_timeout():
    """FetchBlobStream has no deadline: a message awaited past the client's timeout cancels the
    call, with the sync client's DEADLINE_EXCEEDED and message."""

    async def main() -> None:
        release = asyncio.Event()

        async def never(request: bytes, context: object) -> Any:
            await release.wait()
            yield b""

        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            wire.SERVICE_NAME, {"FetchBlobStream": grpc.unary_stream_rpc_method_handler(never)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with aio.Client(f"127.0.0.1:{port}", timeout=0.5) as client:
                begin = time.monotonic()
                with pytest.raises(CosserveRpcError) as err:
                    await aio.Session(client, "s", "cpu").fetch_blob("x")
                assert time.monotonic() - begin < 5
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "blob 'x'" in err.value.details() and "0.5 s" in err.value.details()
        finally:
            release.set()
            with contextlib.suppress(TimeoutError):  # see test_workspace's twin: a stop may hang
                await asyncio.wait_for(server.stop(0), 3)

    asyncio.run(main())


def test_leaving_a_cosine_top_k_iterator_early_removes_its_scratch_blobs(server):
    """A k whose one-row reply passes a ScoreTopK message is scored by CosineTopK on scratch blobs
    of the session; a caller who stops iterating still has them removed, in either client."""
    rng = np.random.default_rng(4)
    k = 200_000  # k * (4 + 8) bytes per row: past TOP_K_REPLY_BYTES
    corpus = rng.standard_normal((k, 4)).astype(np.float32)
    queries = rng.standard_normal((3, 4)).astype(np.float32)
    with cosserve.Client(server.address) as client, client.session("cpu") as ws:
        ws.feed_blob("C", corpus)
        with contextlib.closing(ws.iter_top_k(queries, "C", k=k, batch_size=1)) as results:
            assert next(results)[1].shape == (1, k)
            assert len(ws.blobs()) == 4  # C, and the queries, scores and indices of CosineTopK
        assert ws.blobs() == ["C"]

    async def test(client: aio.Client) -> None:
        async with client.session("cpu") as ws:
            await ws.feed_blob("C", corpus)
            async with contextlib.aclosing(ws.iter_top_k(queries, "C", k=k, batch_size=1)) as results:
                async for _, indices in results:
                    assert indices.shape == (1, k) and len(await ws.blobs()) == 4
                    break
            assert await ws.blobs() == ["C"]

    run(test, server.address)
