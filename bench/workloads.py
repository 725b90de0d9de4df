"""The workloads W1-W4, each measured through cosserve, the bare-grpcio floor and in-process torch."""

from __future__ import annotations

import argparse
import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from bench.floor import FloorClient
from bench.report import Row, median
from bench.servers import MemorySampler, ServerProcess
from cosserve import Client, limits
from cosserve.client import operator_def
from cosserve.v1 import cosserve_pb2 as pb

__all__ = ["Params", "w1_latency", "w2_throughput", "w3_transfer", "w4_scoring"]

MiB = 1024**2
GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Params:
    """Sizes and counts of one bench run (`full` or `quick`)."""

    w1_calls: int = 2000
    w1_warmup: int = 200
    w1_repeats: int = 5
    w2_clients: int = 8
    w2_seconds: float = 10.0
    w2_repeats: int = 3
    w2_max_calls: int = 1_000_000  # per client thread: the loop also stops by count
    w3_sizes: tuple[int, ...] = (64 * MiB, 1 * GiB)
    w3_repeats: tuple[int, ...] = (7, 5)  # per size, after an untimed warm-up
    w4_corpus: int = 100_000
    w4_dim: int = 384
    w4_batch: int = 256
    w4_k: int = 10
    w4_queries: int = 2048
    w4_repeats: int = 5

    @classmethod
    def quick(cls) -> Params:
        return cls(
            w1_repeats=2, w2_seconds=3.0, w2_repeats=1, w3_sizes=(64 * MiB, 1 * GiB), w3_repeats=(3, 1),
            w4_queries=1024, w4_repeats=2,
        )  # fmt: skip

    @classmethod
    def tiny(cls) -> Params:
        """Minimal sizes: exercises every path in seconds (the smoke test), measures nothing."""
        return cls(
            w1_calls=20, w1_warmup=5, w1_repeats=1, w2_clients=2, w2_seconds=0.3, w2_repeats=1,
            w3_sizes=(3 * MiB,), w3_repeats=(1,), w4_corpus=2000, w4_dim=32, w4_batch=16, w4_queries=32, w4_repeats=1,
        )  # fmt: skip


# ---- W1 / W2: one small Compute call -----------------------------------------------------


@dataclasses.dataclass
class _SmallCall:
    """The W1 call: CosineSimilarity of two 64x128 float32 blobs (Cos of one until it exists)."""

    op: str
    inputs: dict[str, np.ndarray]
    outputs: list[str]
    request_bytes: bytes  # the serialized ComputeRequest: what the floor sends
    answer_bytes: int  # size of the serialized ComputeResponse: what the floor answers

    def cosserve(self, client: Client) -> None:
        client.compute(self.op, self.inputs, self.outputs, device="cpu")

    def in_process(self) -> Callable[[], Any]:
        from cosserve.server import ops  # noqa: F401  (fills the registry)
        from cosserve.server.registry import REGISTRY

        impl = REGISTRY[self.op].impl
        tensors = [torch.from_numpy(a) for a in self.inputs.values()]
        return lambda: impl(tensors, {})


def _small_call(client: Client) -> _SmallCall:
    ops = {o.name: o for o in client.operators()}
    op = "CosineSimilarity" if "CosineSimilarity" in ops else "Cos"
    rng = np.random.default_rng(0)
    names = [i.name for i in ops[op].inputs]
    inputs = {n: rng.standard_normal((64, 128), dtype=np.float32) for n in names}
    outputs = list(ops[op].outputs)
    request = pb.ComputeRequest(op=operator_def(op, names, outputs, {}), device="cpu")
    for name, value in inputs.items():
        item = request.inputs.add(name=name).tensor
        item.dtype, item.data = pb.FLOAT32, value.tobytes()
        item.shape[:] = value.shape
    reply = client.stub.Compute(request, timeout=30)
    return _SmallCall(op, inputs, outputs, request.SerializeToString(), reply.ByteSize())


def _latencies(call: Callable[[], Any], count: int, warmup: int) -> np.ndarray:
    for _ in range(warmup):
        call()
    out = np.empty(count)
    clock = time.perf_counter
    for i in range(count):
        start = clock()
        call()
        out[i] = clock() - start
    return out * 1e6


def w1_latency(cosserve: ServerProcess, floor: ServerProcess, p: Params) -> list[Row]:
    """p50/p90/p99 of one Compute call, sequential, one channel."""
    with Client(cosserve.address) as client, FloorClient(floor.address) as bare:
        call = _small_call(client)
        bare.configure(answer_bytes=call.answer_bytes)
        local = call.in_process()
        runs: dict[str, list[np.ndarray]] = {"cosserve": [], "floor": [], "torch": []}
        for _ in range(p.w1_repeats):  # interleaved, so drift hits both alike
            runs["floor"].append(_latencies(lambda: bare.unary(call.request_bytes, timeout=30), p.w1_calls, p.w1_warmup))
            runs["cosserve"].append(_latencies(lambda: call.cosserve(client), p.w1_calls, p.w1_warmup))
            runs["torch"].append(_latencies(local, p.w1_calls, p.w1_warmup))
    rows = []
    for q in (50, 90, 99):
        per = {k: [float(np.percentile(v, q)) for v in runs[k]] for k in runs}
        row = Row(
            "W1", f"{call.op} p{q}", "us", median(per["cosserve"]), median(per["floor"]), median(per["torch"]),
            samples=per,
        )  # fmt: skip
        ratio = row.cosserve / row.floor
        if q == 50:
            row.check(ratio, "cosserve/floor", "<=", 1.15)
        else:
            row.ratio, row.ratio_of = ratio, "cosserve/floor"
        rows.append(row)
    return rows


def _throughput(make: Callable[[], tuple[Callable[[], Any], Callable[[], None]]], p: Params) -> float:
    """Calls per second of `p.w2_clients` threads, each with its own channel, for w2_seconds."""
    counts = [0] * p.w2_clients
    errors: list[BaseException] = []
    ready = threading.Barrier(p.w2_clients + 1)

    def worker(slot: int) -> None:
        try:
            call, close = make()
        except BaseException as err:  # noqa: BLE001  (reported after join)
            errors.append(err)
            ready.abort()
            return
        try:
            for _ in range(10):
                call()
            ready.wait(timeout=60)
            deadline = time.perf_counter() + p.w2_seconds
            n = 0
            while n < p.w2_max_calls and time.perf_counter() < deadline:
                call()
                n += 1
            counts[slot] = n
        except BaseException as err:  # noqa: BLE001
            errors.append(err)
            ready.abort()
        finally:
            close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(p.w2_clients)]
    for t in threads:
        t.start()
    try:
        ready.wait(timeout=60)
    except threading.BrokenBarrierError:
        pass
    started = time.perf_counter()
    for t in threads:
        t.join(timeout=p.w2_seconds + 60)
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return sum(counts) / elapsed


def w2_throughput(cosserve: ServerProcess, floor: ServerProcess, p: Params) -> list[Row]:
    """Requests/s of concurrent clients doing the W1 call."""
    with Client(cosserve.address) as client, FloorClient(floor.address) as bare:
        call = _small_call(client)
        bare.configure(answer_bytes=call.answer_bytes)
        local = call.in_process()

    def cosserve_client() -> tuple[Callable[[], Any], Callable[[], None]]:
        c = Client(cosserve.address)
        return (lambda: call.cosserve(c)), c.close

    def floor_client() -> tuple[Callable[[], Any], Callable[[], None]]:
        f = FloorClient(floor.address)
        return (lambda: f.unary(call.request_bytes, timeout=30)), f.channel.close

    per: dict[str, list[float]] = {"cosserve": [], "floor": [], "torch": []}
    for _ in range(p.w2_repeats):
        per["floor"].append(_throughput(floor_client, p))
        per["cosserve"].append(_throughput(cosserve_client, p))
        n, start = 0, time.perf_counter()
        while n < p.w2_max_calls and time.perf_counter() - start < min(p.w2_seconds, 2.0):
            local()
            n += 1
        per["torch"].append(n / (time.perf_counter() - start))
    row = Row(
        "W2", f"{p.w2_clients} clients x {call.op}", "req/s",
        median(per["cosserve"]), median(per["floor"]), median(per["torch"]), samples=per,
    )  # fmt: skip
    return [row.check(row.cosserve / row.floor, "cosserve/floor", ">=", 0.9)]


# ---- W3: big blobs -----------------------------------------------------------------------


def _size_name(nbytes: int) -> str:
    return f"{nbytes // GiB} GiB" if nbytes >= GiB else f"{nbytes // MiB} MiB"


def _blob(nbytes: int) -> np.ndarray:
    array = np.empty(nbytes // 4, np.float32)
    # Cheap, non-constant content (random would take seconds per GiB).
    array[:] = np.tile(np.arange(4096, dtype=np.float32) * 0.5 - 7.25, len(array) // 4096 + 1)[: len(array)]
    return array


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _warm_up(cosserve: ServerProcess, client: Client, bare: FloorClient, array: np.ndarray) -> None:
    # Every path once, so first-use costs (connection windows, the allocator, the kernel handing
    # fresh memory to both processes) are not in the first timed repeat.
    bare.feed(array, limits.CHUNK_BYTES)
    bare.fetch()
    for shm in (False, True):
        with client.session("cpu") as ws:
            ws.feed_blob("blob", array, shm=shm)
            ws.fetch_blob("blob", shm=shm)


def w3_transfer(cosserve: ServerProcess, floor: ServerProcess, p: Params) -> list[Row]:
    """GB/s of feeding and fetching big float32 blobs, and the server's peak memory."""
    rows: list[Row] = []
    with Client(cosserve.address, timeout=600) as client, FloorClient(floor.address) as bare:
        for nbytes, repeats in zip(p.w3_sizes, p.w3_repeats):
            array = _blob(nbytes)
            bare.configure(blob_bytes=nbytes, chunk_bytes=limits.CHUNK_BYTES)
            s: dict[str, list[float]] = {
                k: []
                for k in (
                    "floor_feed", "floor_fetch", "feed", "fetch", "shm_feed", "shm_fetch",
                    "feed_mem", "fetch_mem", "shm_feed_mem", "shm_fetch_mem", "torch_copy",
                )
            }  # fmt: skip
            for repeat in range(-1, repeats):  # -1: an untimed warm-up of every path
                if repeat < 0:
                    _warm_up(cosserve, client, bare, array)
                    continue
                s["floor_feed"].append(_timed(lambda: bare.feed(array, limits.CHUNK_BYTES))[0])
                seconds, got = _timed(bare.fetch)
                s["floor_fetch"].append(seconds)
                del got
                for prefix, shm in (("", False), ("shm_", True)):
                    with client.session("cpu") as ws:
                        base = cosserve.rss()
                        with MemorySampler(cosserve) as mem:
                            s[prefix + "feed"].append(_timed(lambda: ws.feed_blob("blob", array, shm=shm))[0])
                        s[prefix + "feed_mem"].append((mem.peak - base) / nbytes)
                        with MemorySampler(cosserve) as mem:
                            seconds, got = _timed(lambda: ws.fetch_blob("blob", shm=shm))
                        s[prefix + "fetch"].append(seconds)
                        s[prefix + "fetch_mem"].append((mem.peak - base) / nbytes)
                        if repeat == 0 and not np.array_equal(got, array):  # bit-exact, checked once
                            raise AssertionError(f"W3: fetched blob differs from the fed one (shm={shm})")
                        del got
                source = torch.from_numpy(array)
                s["torch_copy"].append(_timed(lambda: source.clone())[0])
            gbps = {k: [nbytes / x / 1e9 for x in v] for k, v in s.items() if not k.endswith("mem")}
            m = {k: median(v) for k, v in gbps.items()}
            size = _size_name(nbytes)
            for way in ("feed", "fetch"):
                row = Row(
                    "W3", f"{way} {size} socket", "GB/s", m[way], m["floor_" + way], m["torch_copy"],
                    samples={"cosserve": gbps[way], "floor": gbps["floor_" + way], "torch": gbps["torch_copy"]},
                )  # fmt: skip
                rows.append(row.check(row.cosserve / row.floor, "cosserve/floor", ">=", 0.9))
                row = Row(
                    "W3", f"{way} {size} shm", "GB/s", m["shm_" + way], None, m["torch_copy"],
                    samples={"cosserve": gbps["shm_" + way]},
                )  # fmt: skip
                rows.append(row.check(m["shm_" + way] / m[way], "shm/socket", ">=", 4.0))
            for key, label in (("feed_mem", "socket feed"), ("fetch_mem", "socket fetch"),
                               ("shm_feed_mem", "shm feed"), ("shm_fetch_mem", "shm fetch")):  # fmt: skip
                peak = median(s[key])
                row = Row("W3", f"server peak RSS, {label} {size}", "x blob", peak, samples={"cosserve": s[key]})
                rows.append(row.check(peak, "peak/blob", "<=", 1.3))
            del array
    return rows


# ---- W4: scoring -------------------------------------------------------------------------


def w4_scoring(cosserve: ServerProcess, floor: ServerProcess, p: Params) -> list[Row] | str:
    """Queries/s of top-k over a corpus blob (ScoreTopK via Session.iter_top_k) against the same
    scoring core in-process; bench/score.py's paths, on the bench's server process."""
    from cosserve import Session

    if not hasattr(Session, "iter_top_k"):
        return "W4 skipped: Session.top_k does not exist yet (ScoreTopK is being built)"
    try:
        from bench import score
    except ImportError as err:
        return f"W4 skipped: bench/score.py cannot be imported ({err})"
    ns = argparse.Namespace(device="cpu", k=p.w4_k, batch_size=p.w4_batch, max_seconds=120.0)
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((p.w4_corpus, p.w4_dim), dtype=np.float32)
    queries = rng.standard_normal((p.w4_queries, p.w4_dim), dtype=np.float32)
    service = score.ServicePath(cosserve.address, corpus, ns)
    try:
        local = score.TorchPath(corpus, ns)
        service.run(queries[: p.w4_batch])  # warm-up
        local.run(queries[: p.w4_batch])
        per: dict[str, list[float]] = {"cosserve": [], "torch": []}
        for _ in range(p.w4_repeats):  # interleaved
            per["cosserve"].append(service.run(queries)["qps"])
            per["torch"].append(local.run(queries)["qps"])
    finally:
        service.close()
    row = Row(
        "W4", f"top-{p.w4_k} of {p.w4_corpus:,}x{p.w4_dim}, batches of {p.w4_batch}", "queries/s",
        median(per["cosserve"]), None, median(per["torch"]), samples=per,
    )  # fmt: skip
    return [row.check(row.cosserve / row.torch, "cosserve/torch", ">=", 0.9)]
