"""Many threads over few sessions, overwriting and reading the same blob names of a real server
process: every read is a whole value some writer wrote to that same session; no torn reads (a
mix of two writes), no foreign reads (another session's value), no phantom reads (a value no
call wrote).

COSSERVE_CONCURRENCY_S sets how long the threads run (default 4 s)."""

from __future__ import annotations

import dataclasses
import os
import threading
import time

import numpy as np

from cosserve import Client, CosserveRpcError, Session, limits
from tests.conftest import start_process, stop_process

THREADS = 32
SESSIONS = 8
SECONDS = float(os.environ.get("COSSERVE_CONCURRENCY_S", "4"))
# Bound on each thread's loop besides the clock.
MAX_STEPS = 100_000
# "small" travels in one FeedBlob message; "large" in a FeedBlobStream and a streamed fetch.
SIZES = {"small": 2048, "large": limits.INLINE_BYTES // 8 + 65_536}  # float64 elements
# One in this many steps touches the large blob. Every second step: with a planted bug (a feed
# that overwrites the stored tensor in place) 4 s at 1 in 8 saw no torn read, 1 in 2 saw several.
LARGE_EVERY = 2
_COUNTER_BITS = 30


def encode(session: int, writer: int, kind: int, counter: int) -> float:
    """One float64 that says who wrote a value: exact, since it stays below 2**53."""
    return float((((session * THREADS + writer) << 1 | kind) << _COUNTER_BITS) | counter)


def decode(value: float) -> tuple[int, int, int, int]:
    number = int(value)
    counter = number & ((1 << _COUNTER_BITS) - 1)
    rest = number >> _COUNTER_BITS
    return (rest >> 1) // THREADS, (rest >> 1) % THREADS, rest & 1, counter


@dataclasses.dataclass
class Tally:
    reads: int = 0
    writes: int = 0
    torn: int = 0
    foreign: int = 0
    phantom: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)
    examples: list[str] = dataclasses.field(default_factory=list)


def run_thread(session: Session, session_index: int, writer: int, deadline: float,
               written: dict[tuple[int, int, int], set[int]], tally: Tally, lock: threading.Lock) -> None:
    """Alternate writes and reads of "small" and "large" in one session until `deadline`."""
    rng = np.random.default_rng(session_index * THREADS + writer)
    mine = {kind: written[(session_index, writer, kind)] for kind in (0, 1)}
    reads = writes = torn = foreign = phantom = 0
    errors: list[str] = []
    examples: list[str] = []
    for step in range(MAX_STEPS):
        if time.monotonic() >= deadline:
            break
        kind = 1 if step % LARGE_EVERY == LARGE_EVERY - 1 else 0
        name = "large" if kind else "small"
        try:
            if rng.random() < 0.5:
                counter = step
                mine[kind].add(counter)  # before the call: a reader may see it before the reply comes
                session.feed_blob(name, np.full(SIZES[name], encode(session_index, writer, kind, counter)))
                writes += 1
                continue
            value = session.fetch_blob(name)
        except CosserveRpcError as err:
            errors.append(f"{name}: {err.code().name}: {err.details()[:200]}")
            continue
        reads += 1
        first = float(value[0])
        if value.shape != (SIZES[name],) or not np.all(value == first):
            torn += 1
            if len(examples) < 3:
                found = np.unique(value)
                examples.append(f"torn {name} in session {session_index}: {len(found)} values, "
                                f"writers {sorted({decode(v)[:2] for v in found[:8]})}")
            continue
        if first == -1.0:  # the initial value
            continue
        owner, by, written_kind, counter = decode(first)
        if owner != session_index or written_kind != kind:
            foreign += 1
            if len(examples) < 3:
                examples.append(f"foreign {name} in session {session_index}: written to session {owner}")
        elif counter not in written[(owner, by, kind)]:
            phantom += 1
    with lock:
        tally.reads += reads
        tally.writes += writes
        tally.torn += torn
        tally.foreign += foreign
        tally.phantom += phantom
        tally.errors.extend(errors[:5])
        tally.examples.extend(examples)


def test_threads_overwriting_and_reading_the_same_names_see_only_whole_values_of_their_session():
    proc, address = start_process("--max-workers", "4")
    try:
        clients = [Client(address, timeout=30) for _ in range(SESSIONS)]
        sessions = [c.session("cpu") for c in clients]
        for session in sessions:
            for name, size in SIZES.items():
                session.feed_blob(name, np.full(size, -1.0))
        written = {(s, w, k): set() for s in range(SESSIONS) for w in range(THREADS) for k in (0, 1)}
        tally, lock = Tally(), threading.Lock()
        deadline = time.monotonic() + SECONDS
        threads = [
            threading.Thread(target=run_thread, daemon=True,
                             args=(sessions[i % SESSIONS], i % SESSIONS, i, deadline, written, tally, lock))
            for i in range(THREADS)
        ]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(SECONDS + 60)
        elapsed = time.monotonic() - started
        assert not any(t.is_alive() for t in threads), "a thread is still waiting on the server"
        print(f"\n{THREADS} threads x {elapsed:.1f} s over {SESSIONS} sessions: {tally.reads} reads, "
              f"{tally.writes} writes, {tally.torn} torn, {tally.foreign} foreign, {tally.phantom} phantom, "
              f"{len(tally.errors)} errors")
        assert not tally.errors, tally.errors[:5]
        assert tally.torn == tally.foreign == tally.phantom == 0, tally.examples
        assert tally.reads > THREADS and tally.writes > THREADS
        for client in clients:
            client.close()
    finally:
        stop_process(proc)
