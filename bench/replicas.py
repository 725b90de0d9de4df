"""Replicas behind nginx (deploy/nginx/cosserve.conf) and a corpus sharded over replicas, side by
side in one run: the latency nginx adds to W1's call, W2 through nginx with three replicas against
one, and ShardedScorer's queries/s over 1, 2 and 3 replicas.

    python -m bench.replicas [--quick] [--device cpu] [--json out.json]

Every server is a real `cosserve serve` process and nginx is the real one (Debian's package), all
on this machine's loopback, so the replicas share its cores. Each replica gets a third of them for
torch (OMP_NUM_THREADS, at least 1), as if each ran on its own share of the machine: one replica
then scores with a third of the cores and three with all of them. Where a third is less than one
core (a 2-core machine), the replicas and nginx compete for the cores and the scale-out figures
measure contention as much as scale-out; the table says how many cores there were.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench import workloads
from bench.report import _grid, machine, median
from bench.servers import ServerProcess, start_cosserve
from cosserve import Client, ShardedScorer

__all__ = ["NGINX_CONF", "Nginx", "find_nginx", "main", "nginx_config", "start_replicas"]

NGINX_CONF = Path(__file__).resolve().parent.parent / "deploy" / "nginx" / "cosserve.conf"
# The listen line of deploy/nginx/cosserve.conf, replaced by a loopback port of our own.
_LISTEN = "listen 50051 http2;"
_START_TIMEOUT_S = 15.0


def find_nginx() -> str:
    """The nginx binary; RuntimeError saying how to install it when there is none."""
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)
    if found is None:
        raise RuntimeError("nginx is not installed: `apt-get install nginx` (.ci/run installs Debian's package)")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nginx_config(port: int, directory: Path) -> str:
    """deploy/nginx/cosserve.conf listening on 127.0.0.1:`port`, its temporary files in `directory`
    (Debian's nginx has absolute compiled-in paths under /var/lib/nginx); nothing else changed."""
    text = NGINX_CONF.read_text()
    if text.count(_LISTEN) != 1 or text.count("http {\n") != 1:
        raise RuntimeError(f"{NGINX_CONF} no longer has one {_LISTEN!r} and one 'http {{' line")
    text = text.replace(_LISTEN, f"listen 127.0.0.1:{port} http2;")
    temp = "".join(f"    {kind}_temp_path {directory / kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return text.replace("http {\n", "http {\n" + temp, 1)


class Nginx:
    """A real nginx in front of `replicas` ("host:port" each), run from deploy/nginx/cosserve.conf
    in `directory` (its config, replica list, pid, logs and temporary files), on a free loopback
    port: `address`. Its access log (one line per call, with the replica that took it) is
    `access_log`. Stopped by its PID."""

    def __init__(self, replicas: Sequence[str], directory: Path) -> None:
        binary = find_nginx()
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "cosserve-replicas.conf").write_text("".join(f"server {r};\n" for r in replicas))
        self.access_log = directory / "access.log"
        self.error_log = directory / "error.log"
        settings = f"daemon off; pid {directory / 'nginx.pid'};"
        if os.geteuid() == 0:  # else workers run as nobody, who cannot reach a private temp dir
            settings += " user root;"
        for _attempt in range(3):  # the free port may be taken between our probe and nginx's bind
            port = _free_port()
            (directory / "nginx.conf").write_text(nginx_config(port, directory))
            with open(self.access_log, "ab") as out, open(self.error_log, "ab") as err:
                self.proc = subprocess.Popen(
                    [binary, "-p", str(directory), "-c", str(directory / "nginx.conf"), "-e", "stderr", "-g", settings],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                )  # fmt: skip
            if self._wait_listening(port):
                self.address = f"127.0.0.1:{port}"
                return
            if "Address already in use" not in self.error_log.read_text():
                break
        raise RuntimeError(f"nginx did not start: {self.error_log.read_text()[-2000:]}")

    def _wait_listening(self, port: int) -> bool:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return True
            time.sleep(0.05)
        self.stop()
        return False

    def __enter__(self) -> Nginx:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM (nginx's fast shutdown: the master stops its workers), SIGKILL past 10 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log_lines(self) -> list[str]:
        return self.access_log.read_text().splitlines()


def start_replicas(count: int, device: str = "cpu", threads: int | None = None) -> list[ServerProcess]:
    """`count` cosserve serve processes, started at once (each takes seconds to import torch), with
    `threads` torch threads each (None: torch's default, one per core)."""
    env = None if threads is None else {"OMP_NUM_THREADS": str(threads)}
    started: list[ServerProcess | BaseException] = [RuntimeError("not started")] * count

    def start(i: int) -> None:
        try:
            started[i] = start_cosserve(allow_shm=False, device=device, env=env)
        except BaseException as err:  # noqa: BLE001  (raised below)
            started[i] = err

    threads = [threading.Thread(target=start, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    servers = [s for s in started if isinstance(s, ServerProcess)]
    if len(servers) < count:
        for server in servers:
            server.stop()
        raise next(s for s in started if isinstance(s, BaseException))
    return servers


# ---- the measurements ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Params:
    w1_calls: int = 2000
    w1_repeats: int = 5
    w2_clients: int = 8
    w2_seconds: float = 5.0
    w2_repeats: int = 3
    corpus_rows: int = 300_000
    dim: int = 128
    queries: int = 2048
    batch: int = 256
    k: int = 10
    shard_repeats: int = 3
    device: str = "cpu"

    @classmethod
    def quick(cls) -> Params:
        return cls(w1_calls=800, w1_repeats=3, w2_seconds=2.0, w2_repeats=2, corpus_rows=200_000, queries=1024,
                   shard_repeats=2)  # fmt: skip

    @classmethod
    def tiny(cls) -> Params:
        """Seconds: every path once, nothing measured (the smoke test)."""
        return cls(w1_calls=20, w1_repeats=1, w2_clients=2, w2_seconds=0.3, w2_repeats=1, corpus_rows=3000, dim=16,
                   queries=64, batch=16, shard_repeats=1)  # fmt: skip


def _percentiles(runs: list[np.ndarray]) -> dict[int, float]:
    return {q: median([float(np.percentile(r, q)) for r in runs]) for q in (50, 90, 99)}


def nginx_latency(direct: str, balanced: str, p: Params) -> list[dict[str, Any]]:
    """W1's call (one small Compute) sequential on one channel, straight to a replica and through
    nginx, in turns."""
    with Client(direct) as straight, Client(balanced) as through:
        call = workloads._small_call(straight, p.device)
        runs: dict[str, list[np.ndarray]] = {"direct": [], "nginx": []}
        for repeat in range(p.w1_repeats):
            order = [("direct", straight), ("nginx", through)]
            for name, client in order if repeat % 2 == 0 else reversed(order):
                runs[name].append(workloads._latencies(functools.partial(call.cosserve, client), p.w1_calls, p.w1_calls // 10))
    direct_p, nginx_p = _percentiles(runs["direct"]), _percentiles(runs["nginx"])
    return [
        {"what": f"W1 {call.op} p{q}", "unit": "us", "base": "direct to a replica", "base_value": direct_p[q],
         "value": nginx_p[q], "of": "through nginx", "ratio": nginx_p[q] / direct_p[q],
         "note": f"nginx adds {nginx_p[q] - direct_p[q]:.0f} us"}  # fmt: skip
        for q in (50, 90, 99)
    ]


def replica_throughput(one: str, three: str, direct: str, p: Params) -> list[dict[str, Any]]:
    """W2: requests/s of `w2_clients` threads (a channel each) doing W1's call, through nginx in
    front of three replicas against nginx in front of one (and straight to one), in turns."""
    with Client(direct) as client:
        call = workloads._small_call(client, p.device)
    w2 = workloads.Params(w2_clients=p.w2_clients, w2_seconds=p.w2_seconds)

    def maker(address: str) -> Callable[[], tuple[Callable[[], Any], Callable[[], None]]]:
        def make() -> tuple[Callable[[], Any], Callable[[], None]]:
            c = Client(address)
            return functools.partial(call.cosserve, c), c.close

        return make

    targets = {"direct to 1": direct, "nginx, 1 replica": one, "nginx, 3 replicas": three}
    per: dict[str, list[float]] = {name: [] for name in targets}
    for repeat in range(p.w2_repeats):
        names = list(targets) if repeat % 2 == 0 else list(reversed(targets))
        for name in names:
            per[name].append(workloads._throughput(maker(targets[name]), w2))
    m = {name: median(v) for name, v in per.items()}
    base = m["nginx, 1 replica"]
    label = f"W2 {p.w2_clients} clients x {call.op}"
    return [
        {"what": label, "unit": "req/s", "base": "nginx, 1 replica", "base_value": base, "value": m["nginx, 3 replicas"],
         "of": "nginx, 3 replicas", "ratio": m["nginx, 3 replicas"] / base, "note": ""},
        {"what": label, "unit": "req/s", "base": "direct to 1", "base_value": m["direct to 1"], "value": base,
         "of": "nginx, 1 replica", "ratio": base / m["direct to 1"], "note": ""},
    ]  # fmt: skip


def sharded_throughput(replicas: Sequence[str], p: Params) -> list[dict[str, Any]]:
    """ShardedScorer queries/s over the first 1, 2 and 3 replicas, each fed its range of one
    corpus; the scorers take turns, repeat by repeat."""
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((p.corpus_rows, p.dim), dtype=np.float32)
    queries = rng.standard_normal((p.queries, p.dim), dtype=np.float32)
    counts = [n for n in (1, 2, 3) if n <= len(replicas)]
    with contextlib.ExitStack() as stack:
        scorers = {n: stack.enter_context(ShardedScorer(replicas[:n], device=p.device, timeout=300)) for n in counts}
        answers = {}
        for n, scorer in scorers.items():
            scorer.feed(corpus, progress=False)
            answers[n] = scorer.top_k(queries[: p.batch], p.k, batch_size=p.batch)  # warm-up
        for n in counts[1:]:  # the same answer whatever the number of shards
            if not (np.array_equal(answers[n][1], answers[1][1]) and np.array_equal(answers[n][0], answers[1][0])):
                raise AssertionError(f"ShardedScorer over {n} replicas differs from 1 replica")
        # The same replica's session, holding the whole corpus, asked directly: what the scorer's
        # merging costs.
        whole = scorers[1]._shards[0].session
        runs: dict[Any, Callable[[], Any]] = {
            "session": lambda: whole.top_k(queries, scorers[1].blob, p.k, batch_size=p.batch),
            **{n: functools.partial(scorers[n].top_k, queries, p.k, batch_size=p.batch) for n in counts},
        }
        per: dict[Any, list[float]] = {name: [] for name in runs}
        for repeat in range(p.shard_repeats):
            for name in list(runs) if repeat % 2 == 0 else list(reversed(runs)):
                start = time.perf_counter()
                runs[name]()
                per[name].append(p.queries / (time.perf_counter() - start))
    qps = {n: median(v) for n, v in per.items()}
    shape = f"top-{p.k} of {p.corpus_rows:,}x{p.dim} float32, batches of {p.batch}"
    merging = {"what": f"ShardedScorer {shape}", "unit": "queries/s", "base": "Session.top_k, 1 replica",
               "base_value": qps["session"], "value": qps[1], "of": "ShardedScorer, 1 replica",
               "ratio": qps[1] / qps["session"], "note": "the scorer's own cost"}  # fmt: skip
    return [merging] + [
        {"what": f"ShardedScorer {shape}", "unit": "queries/s", "base": "1 replica", "base_value": qps[1],
         "value": qps[n], "of": f"{n} replicas", "ratio": qps[n] / qps[1], "note": ""}  # fmt: skip
        for n in counts[1:]
    ] or [{"what": f"ShardedScorer {shape}", "unit": "queries/s", "base": "1 replica", "base_value": qps[1],
           "value": qps[1], "of": "1 replica", "ratio": 1.0, "note": ""}]  # fmt: skip


def run(p: Params, directory: Path) -> list[dict[str, Any]]:
    replicas = start_replicas(3, p.device, threads=max(1, (os.cpu_count() or 1) // 3))
    try:
        addresses = [r.address for r in replicas]
        with Nginx(addresses[:1], directory / "nginx-1") as one, Nginx(addresses, directory / "nginx-3") as three:
            rows = nginx_latency(addresses[0], three.address, p)
            print("nginx latency: done", file=sys.stderr, flush=True)
            rows += replica_throughput(one.address, three.address, addresses[0], p)
            print("W2: done", file=sys.stderr, flush=True)
        rows += sharded_throughput(addresses, p)
        print("ShardedScorer: done", file=sys.stderr, flush=True)
        return rows
    finally:
        for replica in replicas:
            replica.stop()


def table(rows: Sequence[dict[str, Any]]) -> str:
    header = ["measure", "unit", "base", "base value", "compared", "value", "ratio", ""]
    body = [
        [r["what"], r["unit"], r["base"], f"{r['base_value']:,.1f}", r["of"], f"{r['value']:,.1f}", f"{r['ratio']:.2f}", r["note"]]
        for r in rows
    ]
    return _grid(header, body)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="fewer and shorter repeats, a smaller corpus (under 2 minutes)")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the smoke test
    parser.add_argument("--device", default="cpu", help="device of the replicas' sessions [default cpu]")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON here")
    ns = parser.parse_args(argv)
    p = Params.tiny() if ns.tiny else Params.quick() if ns.quick else Params()
    p = dataclasses.replace(p, device=ns.device)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cosserve-bench-nginx-") as directory:
        rows = run(p, Path(directory))
    print(table(rows))
    info = machine()
    print(
        f"({time.perf_counter() - started:.0f} s; device {p.device}; {info['nproc']} x {info['cpu']}: three replicas "
        f"({max(1, (os.cpu_count() or 1) // 3)} torch thread(s) each) and nginx share these cores; "
        f"load average {info['loadavg']})"
    )
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump({"machine": info, "params": dataclasses.asdict(p), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
