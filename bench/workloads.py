"""The workloads W1-W4, each measured through cosserve, the bare-grpcio floors and in-process torch."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from bench.floor import FloorClient
from bench.report import Row, median
from bench.servers import MemorySampler, ServerProcess
from cosserve import Client, limits
from cosserve.calls import operator_def
from cosserve.v1 import cosserve_pb2 as pb

__all__ = ["Params", "w1_latency", "w2_throughput", "w3_transfer", "w4_scoring"]

MiB = 1024**2
GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Params:
    """Sizes and counts of one bench run (`full` or `quick`), and the device of its sessions."""

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
    device: str = "cpu"  # of the cosserve sessions and Compute calls, and of the torch reference

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
    device: str
    request_bytes: bytes  # the serialized ComputeRequest: what the floors send
    answer_bytes: int  # size of the serialized ComputeResponse: what the floors answer

    def cosserve(self, client: Client) -> None:
        client.compute(self.op, self.inputs, self.outputs, device=self.device)

    def in_process(self) -> Callable[[], Any]:
        """The op on inputs already on the device (and finished there, for CUDA)."""
        from cosserve.server.compute import ops  # noqa: F401  (fills the registry)
        from cosserve.server.compute.registry import REGISTRY

        impl = REGISTRY[self.op].impl
        tensors = [torch.from_numpy(a).to(self.device) for a in self.inputs.values()]
        if not _is_cuda(self.device):
            return lambda: impl(tensors, {})

        def call() -> None:
            impl(tensors, {})
            torch.cuda.synchronize(self.device)

        return call


def _is_cuda(device: str) -> bool:
    return torch.device(device).type == "cuda"


@contextlib.contextmanager
def _floor_clients(floors: Mapping[str, ServerProcess]) -> Iterator[dict[str, FloorClient]]:
    """One client (one channel) per kind of floor."""
    with contextlib.ExitStack() as stack:
        yield {kind: stack.enter_context(FloorClient(server.address)) for kind, server in floors.items()}


def _in_turn(kinds: Sequence[str], repeat: int) -> list[str]:
    # Which floor runs first alternates between repeats, so drift favours neither.
    return list(kinds) if repeat % 2 == 0 else list(reversed(kinds))


def _small_call(client: Client, device: str) -> _SmallCall:
    ops = {o.name: o for o in client.operators()}
    op = "CosineSimilarity" if "CosineSimilarity" in ops else "Cos"
    rng = np.random.default_rng(0)
    names = [i.name for i in ops[op].inputs]
    inputs = {n: rng.standard_normal((64, 128), dtype=np.float32) for n in names}
    outputs = list(ops[op].outputs)
    request = pb.ComputeRequest(op=operator_def(op, names, outputs, {}), device=device)
    for name, value in inputs.items():
        item = request.inputs.add(name=name).tensor
        item.dtype, item.data = pb.FLOAT32, value.tobytes()
        item.shape[:] = value.shape
    reply = client.stub.Compute(request, timeout=30)
    return _SmallCall(op, inputs, outputs, device, request.SerializeToString(), reply.ByteSize())


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


def w1_latency(cosserve: ServerProcess, floors: Mapping[str, ServerProcess], p: Params) -> list[Row]:
    """p50/p90/p99 of one Compute call, sequential, one channel."""
    with Client(cosserve.address) as client, _floor_clients(floors) as bare:
        call = _small_call(client, p.device)
        for floor in bare.values():
            floor.configure(answer_bytes=call.answer_bytes)
        local = call.in_process()
        runs: dict[str, list[np.ndarray]] = {"cosserve": [], **{f"floor_{k}": [] for k in bare}, "torch": []}
        for repeat in range(p.w1_repeats):  # interleaved, so drift hits all alike
            for kind in _in_turn(list(bare), repeat):
                unary = functools.partial(bare[kind].unary, call.request_bytes, timeout=30)
                runs[f"floor_{kind}"].append(_latencies(unary, p.w1_calls, p.w1_warmup))
            runs["cosserve"].append(_latencies(lambda: call.cosserve(client), p.w1_calls, p.w1_warmup))
            runs["torch"].append(_latencies(local, p.w1_calls, p.w1_warmup))
    rows = []
    for q in (50, 90, 99):
        per = {k: [float(np.percentile(v, q)) for v in runs[k]] for k in runs}
        row = Row(
            "W1", f"{call.op} p{q}", "us", median(per["cosserve"]),
            floors={k: median(per[f"floor_{k}"]) for k in bare}, torch=median(per["torch"]),
            lower_is_better=True, samples=per,
        )  # fmt: skip
        rows.append(row.against_floor("<=", 1.15) if q == 50 else row.against_floor())
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


def w2_throughput(cosserve: ServerProcess, floors: Mapping[str, ServerProcess], p: Params) -> list[Row]:
    """Requests/s of concurrent clients doing the W1 call."""
    with Client(cosserve.address) as client, _floor_clients(floors) as bare:
        call = _small_call(client, p.device)
        for floor in bare.values():
            floor.configure(answer_bytes=call.answer_bytes)
        local = call.in_process()

    def cosserve_client() -> tuple[Callable[[], Any], Callable[[], None]]:
        c = Client(cosserve.address)
        return (lambda: call.cosserve(c)), c.close

    def floor_client(kind: str) -> Callable[[], tuple[Callable[[], Any], Callable[[], None]]]:
        def make() -> tuple[Callable[[], Any], Callable[[], None]]:
            f = FloorClient(floors[kind].address)
            return (lambda: f.unary(call.request_bytes, timeout=30)), f.channel.close

        return make

    per: dict[str, list[float]] = {"cosserve": [], **{f"floor_{k}": [] for k in floors}, "torch": []}
    for repeat in range(p.w2_repeats):
        for kind in _in_turn(list(floors), repeat):
            per[f"floor_{kind}"].append(_throughput(floor_client(kind), p))
        per["cosserve"].append(_throughput(cosserve_client, p))
        n, start = 0, time.perf_counter()
        while n < p.w2_max_calls and time.perf_counter() - start < min(p.w2_seconds, 2.0):
            local()
            n += 1
        per["torch"].append(n / (time.perf_counter() - start))
    row = Row(
        "W2", f"{p.w2_clients} clients x {call.op}", "req/s", median(per["cosserve"]),
        floors={k: median(per[f"floor_{k}"]) for k in floors}, torch=median(per["torch"]), samples=per,
    )  # fmt: skip
    return [row.against_floor(">=", 0.9)]


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


def _copy(array: np.ndarray, device: str) -> Callable[[], Any]:
    """The in-process reference of a transfer: one copy of the blob into the session's device."""
    source = torch.from_numpy(array)
    if not _is_cuda(device):
        return source.clone

    def copy() -> None:
        source.to(device)
        torch.cuda.synchronize(device)

    return copy


def _warm_up(client: Client, bare: Mapping[str, FloorClient], array: np.ndarray, device: str) -> None:
    # Every path once, so first-use costs (connection windows, the allocator, the kernel handing
    # fresh memory to the processes) are not in the first timed repeat.
    for floor in bare.values():
        floor.feed(array, limits.CHUNK_BYTES)
        floor.fetch()
    for shm in (False, True):
        with client.session(device) as ws:
            ws.feed_blob("blob", array, shm=shm)
            ws.fetch_blob("blob", shm=shm)


def w3_transfer(cosserve: ServerProcess, floors: Mapping[str, ServerProcess], p: Params) -> list[Row]:
    """GB/s of feeding and fetching big float32 blobs, and the server's peak memory."""
    rows: list[Row] = []
    with Client(cosserve.address, timeout=600) as client, _floor_clients(floors) as bare:
        for nbytes, repeats in zip(p.w3_sizes, p.w3_repeats):
            array = _blob(nbytes)
            for floor in bare.values():
                floor.configure(blob_bytes=nbytes, chunk_bytes=limits.CHUNK_BYTES)
            copy = _copy(array, p.device)
            s: dict[str, list[float]] = {
                k: []
                for k in (
                    *(f"floor_{kind}_{way}" for kind in bare for way in ("feed", "fetch")),
                    "feed", "fetch", "shm_feed", "shm_fetch",
                    "feed_mem", "fetch_mem", "shm_feed_mem", "shm_fetch_mem", "torch_copy",
                )
            }  # fmt: skip
            for repeat in range(-1, repeats):  # -1: an untimed warm-up of every path
                if repeat < 0:
                    _warm_up(client, bare, array, p.device)
                    continue
                for kind in _in_turn(list(bare), repeat):
                    floor = bare[kind]
                    s[f"floor_{kind}_feed"].append(_timed(functools.partial(floor.feed, array, limits.CHUNK_BYTES))[0])
                    seconds, got = _timed(floor.fetch)
                    s[f"floor_{kind}_fetch"].append(seconds)
                    del got
                for prefix, shm in (("", False), ("shm_", True)):
                    with client.session(p.device) as ws:
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
                s["torch_copy"].append(_timed(copy)[0])
            gbps = {k: [nbytes / x / 1e9 for x in v] for k, v in s.items() if not k.endswith("mem")}
            m = {k: median(v) for k, v in gbps.items()}
            size = _size_name(nbytes)
            for way in ("feed", "fetch"):
                row = Row(
                    "W3", f"{way} {size} socket", "GB/s", m[way],
                    floors={kind: m[f"floor_{kind}_{way}"] for kind in bare}, torch=m["torch_copy"],
                    samples={"cosserve": gbps[way], **{f"floor_{kind}": gbps[f"floor_{kind}_{way}"] for kind in bare},
                             "torch": gbps["torch_copy"]},
                )  # fmt: skip
                rows.append(row.against_floor(">=", 0.9))
                row = Row(
                    "W3", f"{way} {size} shm", "GB/s", m["shm_" + way], torch=m["torch_copy"],
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


def w4_scoring(cosserve: ServerProcess, floors: Mapping[str, ServerProcess], p: Params) -> list[Row] | str:
    """Queries/s of top-k over a corpus blob (ScoreTopK via Session.iter_top_k) against the same
    scoring core in-process; bench/score.py's paths, on the bench's server process. Also as the
    GEMM's rate: 2*M*D flops per query (a batch of N is one N x D by D x M product)."""
    from cosserve import Session

    if not hasattr(Session, "iter_top_k"):
        return "W4 skipped: Session.top_k does not exist yet (ScoreTopK is being built)"
    try:
        from bench import score
    except ImportError as err:
        return f"W4 skipped: bench/score.py cannot be imported ({err})"
    ns = argparse.Namespace(device=p.device, k=p.w4_k, batch_size=p.w4_batch, max_seconds=120.0)
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
    shape = f"top-{p.w4_k} of {p.w4_corpus:,}x{p.w4_dim}, batches of {p.w4_batch}"
    qps = {k: median(v) for k, v in per.items()}
    row = Row("W4", shape, "queries/s", qps["cosserve"], torch=qps["torch"], samples=per)
    tflop_per_query = 2 * p.w4_corpus * p.w4_dim / 1e12
    tflops = {k: [q * tflop_per_query for q in v] for k, v in per.items()}
    rate = Row("W4", f"{shape}, GEMM rate", "TFLOP/s", median(tflops["cosserve"]), torch=median(tflops["torch"]),
               samples=tflops)  # fmt: skip
    rate.ratio, rate.ratio_of = qps["cosserve"] / qps["torch"], "cosserve/torch"
    return [row.check(qps["cosserve"] / qps["torch"], "cosserve/torch", ">=", 0.9), rate]
