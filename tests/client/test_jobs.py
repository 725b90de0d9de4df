"""`cosserve score topk|pairs|threshold` over generated files against a real server process: every
job's results equal a numpy float64 reference (ties by the lower index), ids round-trip (int64
and string), a job killed with SIGKILL and resumed equals an uninterrupted one, Ctrl-C exits 130
with its session closed, and each malformed input is one line and exit 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from cosserve import Client, cli  # noqa: E402
from tests.client.test_datasets import malformed, vectors_column  # noqa: E402
from tests.conftest import start_process, stop_process  # noqa: E402

SCRIPT = "import sys; from cosserve.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    proc, addr = start_process()
    yield addr
    stop_process(proc)


def unit(x: np.ndarray) -> np.ndarray:
    """Rows over their norms in float64, the norm floored as Caffe2 floors it (sqrt(max(x·x, 1e-12)))."""
    x = x.astype(np.float64)
    return x / np.sqrt(np.maximum((x * x).sum(axis=1, keepdims=True), 1e-12))


def write_parquet(path, x: np.ndarray, ids=None, id_name="id", row_group_size=128) -> None:
    columns = {} if ids is None else {id_name: ids}
    columns["embedding"] = vectors_column(x)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)


def read_parts(folder) -> object:
    """The part files in order, as one table (the _SUCCESS marker says the job finished)."""
    names = sorted(n for n in os.listdir(folder) if n.startswith("part-"))
    return pa.concat_tables([pq.read_table(os.path.join(folder, n)) for n in names])


def score(*args: str, address: str | None = None) -> int:
    argv = ["score", *args, "--device", "cpu", "--no-progress"]
    if address:
        argv += ["--server", address]
    return cli.main(argv)


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(20)
    corpus = rng.standard_normal((1500, 12)).astype(np.float32)
    queries = rng.standard_normal((333, 12)).astype(np.float32)
    corpus_ids = rng.permutation(10**6)[:1500].astype(np.int64) - 5000  # not the row numbers
    query_ids = np.array([f"query/{i:04d}" for i in range(333)], dtype=object)
    write_parquet(tmp_path / "corpus.parquet", corpus, corpus_ids, row_group_size=200)
    write_parquet(tmp_path / "queries.parquet", queries, query_ids, id_name="qid", row_group_size=100)
    return tmp_path, corpus, queries, corpus_ids, query_ids


def test_topk_parquet_in_and_out_with_int_and_string_ids(data, address, capsys):
    tmp_path, corpus, queries, corpus_ids, query_ids = data
    out = tmp_path / "topk.parquet"
    code = score("topk", "--corpus", str(tmp_path / "corpus.parquet"), "--queries", str(tmp_path / "queries.parquet"),
                 "--k", "7", "--batch-size", "50", "--part-rows", "120", "--out", str(out), address=address)
    assert code == 0, capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["_SUCCESS", "_job.json", "part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]
    table = read_parts(out)
    assert table.column_names == ["query_id", "rank", "corpus_id", "score"]
    assert table.schema.field("query_id").type == pa.string() and table.schema.field("corpus_id").type == pa.int64()
    similarity = unit(queries) @ unit(corpus).T
    best = np.argsort(-similarity, axis=1, kind="stable")[:, :7]
    assert table.column("query_id").to_pylist() == list(np.repeat(query_ids, 7))
    np.testing.assert_array_equal(table.column("rank").to_numpy(), np.tile(np.arange(7), 333))
    np.testing.assert_array_equal(table.column("corpus_id").to_numpy(), corpus_ids[best].ravel())
    np.testing.assert_allclose(table.column("score").to_numpy(), np.take_along_axis(similarity, best, 1).ravel(), atol=1e-5)


def test_topk_from_npy_shards_and_safetensors_into_npz(tmp_path, address):
    rng = np.random.default_rng(21)
    corpus = rng.standard_normal((900, 8)).astype(np.float16)
    queries = rng.standard_normal((64, 8)).astype(np.float16)
    (tmp_path / "shards").mkdir()
    for i, (lo, hi) in enumerate([(0, 300), (300, 301), (301, 900)]):
        np.save(tmp_path / "shards" / f"{i:02d}.npy", corpus[lo:hi])
    safetensors_numpy.save_file({"q": queries}, str(tmp_path / "q.safetensors"))
    out = tmp_path / "r.npz"
    assert score("--corpus", str(tmp_path / "shards"), "--queries", str(tmp_path / "q.safetensors"), "--k", "4",
                 "--out", str(out), address=address) == 0
    similarity = unit(queries) @ unit(corpus).T
    best = np.argsort(-similarity, axis=1, kind="stable")[:, :4]
    with np.load(out) as result:
        assert sorted(result.files) == ["indices", "scores"]  # row numbers are the ids: today's arrays
        np.testing.assert_array_equal(result["indices"], best)
        np.testing.assert_allclose(result["scores"], np.take_along_axis(similarity, best, 1), atol=2e-3)


def test_pairs_aligned_rows(tmp_path, address):
    rng = np.random.default_rng(22)
    a = rng.standard_normal((5000, 10)).astype(np.float32)
    b = rng.standard_normal((5000, 10)).astype(np.float32)
    a[7] = 0  # a zero row: 0, as Caffe2's floor gives, never NaN
    np.save(tmp_path / "a.npy", a)
    (tmp_path / "b").mkdir()
    for i in range(0, 5000, 1700):
        write_parquet(tmp_path / "b" / f"{i:05d}.parquet", b[i : i + 1700], row_group_size=333)
    out = tmp_path / "pairs.parquet"
    assert score("pairs", "--a", str(tmp_path / "a.npy"), "--b", str(tmp_path / "b"), "--part-rows", "2048", "--out", str(out),
                 address=address) == 0
    table = read_parts(out)
    assert table.column_names == ["a_id", "b_id", "score"]
    np.testing.assert_array_equal(table.column("a_id").to_numpy(), np.arange(5000))
    np.testing.assert_array_equal(table.column("b_id").to_numpy(), np.arange(5000))
    np.testing.assert_allclose(table.column("score").to_numpy(), (unit(a) * unit(b)).sum(1), atol=1e-6)


def test_pairs_joined_on_string_ids(tmp_path, address, capsys):
    rng = np.random.default_rng(23)
    a = rng.standard_normal((800, 6)).astype(np.float32)
    a_ids = np.array([f"doc-{i}" for i in range(800)], dtype=object)
    # B: A's ids shuffled, 50 of them missing, and 30 ids A does not have.
    kept = rng.permutation(800)[:750]
    b_ids = np.concatenate([a_ids[kept], np.array([f"other-{i}" for i in range(30)], dtype=object)])
    b = rng.standard_normal((780, 6)).astype(np.float32)
    write_parquet(tmp_path / "a.parquet", a, a_ids)
    write_parquet(tmp_path / "b.parquet", b, b_ids, row_group_size=64)
    out = tmp_path / "joined.npz"
    assert score("pairs", "--a", str(tmp_path / "a.parquet"), "--b", str(tmp_path / "b.parquet"), "--out", str(out),
                 address=address) == 0
    assert "50 rows of --a without a match in --b" in capsys.readouterr().err
    row_of_b = {key: row for row, key in enumerate(b_ids)}
    matched = [i for i in range(800) if a_ids[i] in row_of_b]
    expected = [(unit(a[i : i + 1]) * unit(b[row_of_b[a_ids[i]] : row_of_b[a_ids[i]] + 1])).sum() for i in matched]
    with np.load(out) as result:
        assert list(result["a_id"]) == [a_ids[i] for i in matched] == list(result["b_id"])
        np.testing.assert_allclose(result["score"], expected, atol=1e-6)


def clear_threshold(similarity: np.ndarray, lo: float, hi: float) -> float:
    """A threshold in [lo, hi] midway in the widest gap between the pairs' cosines: no pair sits
    within float32's rounding of it, so float32 and float64 agree on every pair."""
    values = np.sort(similarity[(similarity >= lo) & (similarity <= hi)].ravel())
    gap = int(np.argmax(np.diff(values)))
    assert values[gap + 1] - values[gap] > 1e-5
    return float((values[gap] + values[gap + 1]) / 2)


def reference_range(similarity: np.ndarray, tau: float, offset: int | None = None) -> list[list[int]]:
    """Each query's rows with similarity >= tau, best first, ties by the lower row; with `offset`,
    the corpus against itself: only rows after the query's own row (offset + i)."""
    out = []
    for i, row in enumerate(similarity):
        hits = np.flatnonzero(row >= tau)
        if offset is not None:
            hits = hits[hits > offset + i]
        out.append(list(hits[np.lexsort((hits, -row[hits]))]))
    return out


def test_threshold_with_a_cap_and_ids(data, address, capsys):
    tmp_path, corpus, queries, corpus_ids, query_ids = data
    similarity = unit(queries) @ unit(corpus).T
    tau = clear_threshold(similarity, 0.5, 0.6)
    out = tmp_path / "near.parquet"
    assert score("threshold", "--corpus", str(tmp_path / "corpus.parquet"), "--queries", str(tmp_path / "queries.parquet"),
                 "--min-score", str(tau), "--max-per-query", "5", "--part-rows", "100", "--out", str(out), address=address) == 0
    expected = reference_range(similarity, tau)
    cut = sum(len(rows) > 5 for rows in expected)
    assert cut > 0 and f"{cut} queries cut to --max-per-query 5" in capsys.readouterr().err
    table = read_parts(out)
    want_query = [query_ids[i] for i, rows in enumerate(expected) for _ in rows[:5]]
    want_corpus = [corpus_ids[r] for rows in expected for r in rows[:5]]
    assert table.column("query_id").to_pylist() == want_query
    assert table.column("corpus_id").to_pylist() == want_corpus
    want_score = [similarity[i, r] for i, rows in enumerate(expected) for r in rows[:5]]
    np.testing.assert_allclose(table.column("score").to_numpy(), want_score, atol=1e-5)


def test_threshold_self_gives_each_unordered_pair_once(tmp_path, address):
    rng = np.random.default_rng(24)
    base = rng.standard_normal((60, 16)).astype(np.float32)
    corpus = np.concatenate([base, base[:40] + 0.3 * rng.standard_normal((40, 16)).astype(np.float32), base[:5]])  # near and exact duplicates
    np.save(tmp_path / "c.npy", corpus)
    similarity = unit(corpus) @ unit(corpus).T
    tau = clear_threshold(similarity, 0.85, 0.95)
    out = tmp_path / "dups.npz"
    assert score("threshold", "--corpus", str(tmp_path / "c.npy"), "--self", "--min-score", str(tau), "--batch-size", "16",
                 "--out", str(out), address=address) == 0
    expected = reference_range(similarity, tau, offset=0)
    with np.load(out) as result:
        assert list(result["query_id"]) == [i for i, rows in enumerate(expected) for _ in rows]
        assert list(result["corpus_id"]) == [r for rows in expected for r in rows]
        assert (result["query_id"] < result["corpus_id"]).all() and len(result["query_id"]) >= 45


def test_an_empty_query_file_gives_one_empty_part(tmp_path, address):
    write_parquet(tmp_path / "c.parquet", np.ones((5, 4), np.float32))
    write_parquet(tmp_path / "q.parquet", np.ones((0, 4), np.float32), np.zeros(0, np.int64))
    out = tmp_path / "none.parquet"
    assert score("--corpus", str(tmp_path / "c.parquet"), "--queries", str(tmp_path / "q.parquet"), "--k", "2", "--out", str(out),
                 address=address) == 0
    table = read_parts(out)
    assert table.num_rows == 0 and table.column_names == ["query_id", "rank", "corpus_id", "score"]


def usage_cases(tmp_path) -> list[tuple[str, list[str], str]]:
    """(name, the job's flags, words of its one line) of bad flags and inputs."""
    x = np.random.default_rng(25).standard_normal((50, 6)).astype(np.float32)
    np.save(tmp_path / "q.npy", x)
    np.save(tmp_path / "narrow.npy", x[:, :4])
    write_parquet(tmp_path / "dup.parquet", x[:3], np.array([1, 2, 1]))
    write_parquet(tmp_path / "ids.parquet", x, np.arange(50))
    (tmp_path / "taken.parquet").mkdir()
    (tmp_path / "taken.parquet" / "x").write_text("")
    q = str(tmp_path / "q.npy")
    out = str(tmp_path / "o.parquet")
    cases = []
    for name, path, options, words in malformed(tmp_path, x):
        flags = [f"--{key.replace('_', '-')}={value}" for key, value in options.items()]
        cases.append((name + " (corpus)", ["--corpus", str(path), "--queries", q, "--k", "1", *flags, "--out", out], words))
    cases.append(("corrupt parquet (queries)", ["--corpus", q, "--queries", str(tmp_path / "corrupt.parquet"), "--out", out], "corrupt.parquet"))
    cases += [
        ("unknown suffix", ["--corpus", q, "--queries", q, "--out", str(tmp_path / "o.csv")], "its suffix chooses the format"),
        ("resume into npz", ["--corpus", q, "--queries", q, "--out", str(tmp_path / "o.npz"), "--resume"], "--resume needs a .parquet --out"),
        ("out taken", ["--corpus", q, "--queries", q, "--out", str(tmp_path / "taken.parquet")], "already exists; pass --resume"),
        ("widths", ["--corpus", str(tmp_path / "narrow.npy"), "--queries", q, "--out", out], "widths must match"),
        ("k", ["--corpus", q, "--queries", q, "--k", "51", "--out", out], "--k must be between 1 and the 50 corpus rows"),
    ]
    pairs = [
        ("pairs rows", ["pairs", "--a", q, "--b", str(tmp_path / "dup.parquet"), "--out", out], "aligned pairs need as many rows"),
        ("pairs duplicate ids", ["pairs", "--a", str(tmp_path / "ids.parquet"), "--b", str(tmp_path / "dup.parquet"), "--out", out],
         "--b's id 1 appears more than once"),
        ("self and queries", ["threshold", "--corpus", q, "--queries", q, "--self", "--min-score", "0.5", "--out", out], "or --self"),
        ("nan", ["threshold", "--corpus", q, "--queries", q, "--min-score", "nan", "--out", out], "--min-score is NaN"),
    ]
    return cases + pairs


def test_each_bad_input_is_one_line_and_exit_2(tmp_path, address, capsys):
    for name, flags, words in usage_cases(tmp_path):
        code = score(*flags, address=address)
        err = capsys.readouterr().err
        assert code == 2, (name, err)
        assert words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (name, err)
        assert not (tmp_path / "o.parquet" / "_SUCCESS").exists(), name


def test_a_bad_input_in_a_subprocess_prints_no_traceback(tmp_path, address):
    """grpc's request thread never sees the error of a file failing half-way (it would log it
    with a traceback): the job ends the stream and raises the file's error itself."""
    x = np.random.default_rng(26).standard_normal((400, 6)).astype(np.float32)
    (tmp_path / "c").mkdir()
    write_parquet(tmp_path / "c" / "a.parquet", x)
    ragged = pa.array([list(r) for r in x[:9]] + [list(x[9, :5])], type=pa.list_(pa.float32()))
    pq.write_table(pa.table({"embedding": ragged}), tmp_path / "c" / "b.parquet")
    np.save(tmp_path / "q.npy", x[:10])
    done = subprocess.run([sys.executable, "-c", SCRIPT, "score", "--corpus", str(tmp_path / "c"), "--queries", str(tmp_path / "q.npy"),
                           "--server", address, "--out", str(tmp_path / "o.parquet")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "mixed dimensions" in done.stderr, done.stderr


def long_job(tmp_path) -> list[str]:
    """A topk job of many small parts, slow enough to stop half-way."""
    rng = np.random.default_rng(27)
    write_parquet(tmp_path / "c.parquet", rng.standard_normal((2000, 32)).astype(np.float32), np.arange(2000) * 3)
    queries = rng.standard_normal((40_000, 32)).astype(np.float32)
    write_parquet(tmp_path / "q.parquet", queries, np.array([f"q{i}" for i in range(40_000)], dtype=object), row_group_size=500)
    return ["score", "--corpus", str(tmp_path / "c.parquet"), "--queries", str(tmp_path / "q.parquet"), "--k", "3",
            "--part-rows", "500", "--batch-size", "100", "--device", "cpu"]


def start_job(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SCRIPT, *args], stderr=subprocess.PIPE, text=True)


def wait_for_parts(folder, count: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.isdir(folder) and sum(n.startswith("part-") for n in os.listdir(folder)) >= count:
            return
        time.sleep(0.01)
    raise AssertionError(f"the job wrote fewer than {count} parts (exit {proc.poll()})")


def test_a_job_killed_and_resumed_equals_an_uninterrupted_one(tmp_path, address):
    args = long_job(tmp_path) + ["--server", address]
    whole, resumed = tmp_path / "whole.parquet", tmp_path / "resumed.parquet"
    proc = start_job([*args, "--out", str(resumed)])
    wait_for_parts(resumed, 3, proc)
    proc.kill()  # SIGKILL: no cleanup at all
    proc.wait(10)
    written = sorted(n for n in os.listdir(resumed) if n.startswith("part-"))
    assert not (resumed / "_SUCCESS").exists() and len(written) < 80, written
    # A part left half-written by an older writer, under its final name, is detected and redone.
    (resumed / written[-1]).write_bytes((resumed / written[-1]).read_bytes()[:100])
    again = subprocess.run([sys.executable, "-c", SCRIPT, *args, "--out", str(resumed)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already exists; pass --resume" in again.stderr
    again = subprocess.run([sys.executable, "-c", SCRIPT, *args, "--out", str(resumed), "--resume"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"({len(written) - 1} parts already written)" in again.stderr
    subprocess.run([sys.executable, "-c", SCRIPT, *args, "--out", str(whole)], check=True, capture_output=True, timeout=300)
    assert read_parts(resumed).equals(read_parts(whole))
    assert read_parts(whole).num_rows == 120_000
    other = subprocess.run([sys.executable, "-c", SCRIPT, *args, "--k", "4", "--out", str(resumed), "--resume"],
                           capture_output=True, text=True, timeout=300)
    assert other.returncode == 2 and "holds another job (k: 3 there, 4 now)" in other.stderr, other.stderr


def test_ctrl_c_exits_130_with_its_session_closed(tmp_path):
    proc, addr = start_process("--max-sessions", "1")
    try:
        job = start_job([*long_job(tmp_path), "--server", addr, "--out", str(tmp_path / "r.parquet")])
        wait_for_parts(tmp_path / "r.parquet", 2, job)
        job.send_signal(signal.SIGINT)
        _, err = job.communicate(timeout=60)
        assert job.returncode == 130, err
        assert err.count("\n") == 1 and "interrupted; rerun with --resume to continue" in err, err
        # The server allows one session: the job's was closed, so this one opens at once.
        with Client(addr) as client, client.session("cpu") as session:
            assert session.blobs() == []
    finally:
        stop_process(proc)


def test_a_shared_corpus_gives_its_string_ids(tmp_path):
    """`--corpus @NAME` of a server that loaded a Parquet corpus with string ids: the rows of
    topk and threshold carry those ids, as the server sends them."""
    rng = np.random.default_rng(28)
    corpus = rng.standard_normal((400, 8)).astype(np.float32)
    names = np.array([f"doc:{i * 13 % 400}" for i in range(400)], dtype=object)
    write_parquet(tmp_path / "docs.parquet", corpus, names, row_group_size=64)
    queries = rng.standard_normal((30, 8)).astype(np.float32)
    np.save(tmp_path / "q.npy", queries)
    proc, addr = start_process("--corpus", f"docs={tmp_path / 'docs.parquet'}")
    try:
        similarity = unit(queries) @ unit(corpus).T
        assert score("--corpus", "@docs", "--queries", str(tmp_path / "q.npy"), "--k", "3", "--out", str(tmp_path / "t.parquet"),
                     address=addr) == 0
        best = np.argsort(-similarity, axis=1, kind="stable")[:, :3]
        table = read_parts(tmp_path / "t.parquet")
        assert table.column("corpus_id").to_pylist() == list(names[best].ravel())
        tau = clear_threshold(similarity, 0.6, 0.7)
        assert score("threshold", "--corpus", "@docs", "--queries", str(tmp_path / "q.npy"), "--min-score", str(tau),
                     "--out", str(tmp_path / "r.npz"), address=addr) == 0
        with np.load(tmp_path / "r.npz") as result:
            assert list(result["corpus_id"]) == [names[r] for rows in reference_range(similarity, tau) for r in rows]
    finally:
        stop_process(proc)


def test_threshold_over_several_servers_equals_one(tmp_path, address):
    """--server A,B shards the corpus (ShardedScorer.iter_range_search): the same rows as one server."""
    from tests.conftest import start_server

    rng = np.random.default_rng(29)
    np.save(tmp_path / "c.npy", rng.standard_normal((900, 8)).astype(np.float32))
    np.save(tmp_path / "q.npy", rng.standard_normal((120, 8)).astype(np.float32))
    args = ["threshold", "--corpus", str(tmp_path / "c.npy"), "--queries", str(tmp_path / "q.npy"), "--min-score", "0.7"]
    servers = [start_server(), start_server()]
    try:
        assert score(*args, "--out", str(tmp_path / "two.parquet"), address=",".join(s.address for s in servers)) == 0
    finally:
        for running in servers:
            running.stop(0)
    assert score(*args, "--out", str(tmp_path / "one.parquet"), address=address) == 0
    two, one = read_parts(tmp_path / "two.parquet"), read_parts(tmp_path / "one.parquet")
    assert two.num_rows > 100 and two.equals(one)
