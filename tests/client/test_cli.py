"""`cosserve score` as a user runs it: the real command in a subprocess against a real server
process; progress bars, the summary line, .npy and .safetensors inputs, files that are neither,
k = M, and a client-only environment (no torch, no safetensors)."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from tests.conftest import start_process, stop_process

safetensors_numpy = pytest.importorskip("safetensors.numpy")

SUMMARY = re.compile(r"^cosserve score: (\d+) queries, k=(\d+), (\d+\.\d\d) s, ([\d,]+|-) queries/s -> (.+)$")


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    proc, addr = start_process()
    yield addr
    stop_process(proc)


def score(*args: str, blocked: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """The command, in its own interpreter; `blocked` modules cannot be imported there (a
    client-only install has no torch, and maybe no safetensors)."""
    prelude = "".join(f"sys.modules[{name!r}] = None; " for name in blocked)
    script = f"import sys; {prelude}from cosserve.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", script, "score", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "COSSERVE_AUTH_TOKEN": ""},
    )


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.maximum((x.astype(np.float64) ** 2).sum(axis=1, keepdims=True), 1e-12))


def _reference_indices(queries: np.ndarray, corpus: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(_unit(queries) @ _unit(corpus).T), axis=1, kind="stable")[:, :k]


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((3000, 16)).astype(np.float32)
    queries = rng.standard_normal((700, 16)).astype(np.float32)
    np.save(tmp_path / "corpus.npy", corpus)
    np.save(tmp_path / "queries.npy", queries)
    return tmp_path, corpus, queries


def test_progress_bars_when_forced_and_a_summary(files, address):
    tmp_path, corpus, queries = files
    out = tmp_path / "r.npz"
    done = score("--corpus", str(tmp_path / "corpus.npy"), "--queries", str(tmp_path / "queries.npy"), "--k", "5",
                 "--batch-size", "50", "--server", address, "--out", str(out), "--progress")
    assert done.returncode == 0, done.stderr
    lines = [line for line in re.split(r"[\r\n]", done.stderr) if line.strip()]
    assert any(line.startswith("corpus: 100%") and "192k/192k" in line for line in lines), lines
    assert any(line.startswith("scoring: 100%") and "700/700" in line for line in lines), lines
    summary = SUMMARY.match(lines[-1])
    assert summary, lines[-1]
    assert summary.group(1) == "700" and summary.group(2) == "5" and summary.group(5) == str(out)
    with np.load(out) as result:
        np.testing.assert_array_equal(result["indices"], _reference_indices(queries, corpus, 5))


def test_no_bars_off_a_terminal_or_with_no_progress(files, address):
    tmp_path, _, _ = files
    args = ("--corpus", str(tmp_path / "corpus.npy"), "--queries", str(tmp_path / "queries.npy"),
            "--server", address, "--out", str(tmp_path / "r.npz"))
    for extra in ((), ("--no-progress",)):
        done = score(*args, *extra)  # stderr is a pipe here, not a terminal
        assert done.returncode == 0, done.stderr
        assert "%|" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and SUMMARY.match(done.stderr.strip())


def test_safetensors_inputs(files, address):
    tmp_path, corpus, queries = files
    safetensors_numpy.save_file({"embeddings": corpus}, str(tmp_path / "c.safetensors"))
    safetensors_numpy.save_file({"q": queries, "other": corpus[:2]}, str(tmp_path / "both.safetensors"))
    out = tmp_path / "r.npz"
    done = score("--corpus", str(tmp_path / "c.safetensors"), "--queries", f"{tmp_path / 'both.safetensors'}:q",
                 "--k", "4", "--server", address, "--out", str(out))
    assert done.returncode == 0, done.stderr
    with np.load(out) as result:
        np.testing.assert_array_equal(result["indices"], _reference_indices(queries, corpus, 4))
    done = score("--corpus", str(tmp_path / "c.safetensors"), "--queries", str(tmp_path / "both.safetensors"),
                 "--server", address, "--out", str(out))
    assert done.returncode == 2
    assert "holds 2 tensors (other, q); name one as" in done.stderr and "both.safetensors:KEY" in done.stderr


def test_safetensors_are_read_without_the_package(files, address):
    """The client memory-maps a .safetensors file itself (8-byte header length, JSON header, the
    bytes): a client-only install needs neither torch nor the safetensors package."""
    tmp_path, corpus, queries = files
    safetensors_numpy.save_file({"embeddings": corpus}, str(tmp_path / "c.safetensors"))
    out = tmp_path / "r.npz"
    done = score("--corpus", str(tmp_path / "c.safetensors"), "--queries", str(tmp_path / "queries.npy"),
                 "--server", address, "--out", str(out), blocked=("safetensors", "torch"))
    assert done.returncode == 0, done.stderr
    with np.load(out) as result:
        np.testing.assert_array_equal(result["indices"], _reference_indices(queries, corpus, 10))


def test_a_client_only_environment_scores_npy_with_bars(files, address):
    tmp_path, corpus, queries = files
    out = tmp_path / "r.npz"
    done = score("--corpus", str(tmp_path / "corpus.npy"), "--queries", str(tmp_path / "queries.npy"),
                 "--server", address, "--out", str(out), "--progress", blocked=("torch", "safetensors"))
    assert done.returncode == 0, done.stderr
    assert "scoring: 100%" in done.stderr
    with np.load(out) as result:
        np.testing.assert_array_equal(result["indices"], _reference_indices(queries, corpus, 10))


def test_files_that_are_neither_npy_nor_safetensors(files, address):
    tmp_path, corpus, _ = files
    (tmp_path / "notes.txt").write_text("not an array at all\n")
    (tmp_path / "fake.npy").write_bytes(b"\x80\x04\x95 pickle-like bytes")  # what np.load calls "pickled data"
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "archive.npz", a=corpus)
    cases = {
        "notes.txt": "is not a .npy, .safetensors or .parquet file",
        "fake.npy": "is a damaged .npy file: it does not start as a .npy file does",
        "objects.npy": "holds Python objects (an object .npy); save a float array",
        "archive.npz": "is an .npz archive; give one array, as a .npy or a .safetensors file",
    }
    for name, words in cases.items():
        done = score("--corpus", str(tmp_path / name), "--queries", str(tmp_path / "queries.npy"),
                     "--server", address, "--out", str(tmp_path / "r.npz"))
        assert done.returncode == 2, (name, done.stderr)
        assert words in done.stderr and "pickled" not in done.stderr, (name, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1


def test_k_equal_to_a_200k_corpus(tmp_path, address):
    rng = np.random.default_rng(1)
    corpus = rng.standard_normal((200_000, 4)).astype(np.float32)
    queries = rng.standard_normal((2, 4)).astype(np.float32)
    np.save(tmp_path / "c.npy", corpus)
    np.save(tmp_path / "q.npy", queries)
    out = tmp_path / "r.npz"
    done = score("--corpus", str(tmp_path / "c.npy"), "--queries", str(tmp_path / "q.npy"), "--k", "200000",
                 "--server", address, "--out", str(out))
    assert done.returncode == 0, done.stderr
    sims = _unit(queries) @ _unit(corpus).T
    with np.load(out) as result:
        assert result["scores"].shape == result["indices"].shape == (2, 200_000)
        for row in range(2):
            np.testing.assert_array_equal(np.sort(result["indices"][row]), np.arange(200_000))
            np.testing.assert_allclose(result["scores"][row], np.sort(sims[row])[::-1], atol=1e-5)


def test_score_over_several_servers_shards_the_corpus(files, capsys):
    """`--server a,b`: the corpus split over two servers (cosserve.ShardedScorer), the same answer
    as numpy's; each server holds only its share of the rows."""
    from cosserve import cli
    from tests.conftest import start_server

    tmp_path, corpus, queries = files
    servers = [start_server(), start_server()]
    try:
        addresses = ",".join(s.address for s in servers)
        out = tmp_path / "sharded.npz"
        argv = ["score", "--corpus", str(tmp_path / "corpus.npy"), "--queries", str(tmp_path / "queries.npy"),
                "--k", "7", "--server", addresses, "--device", "cpu", "--out", str(out), "--no-progress"]
        assert cli.main(argv) == 0
        assert SUMMARY.match(capsys.readouterr().err.strip())
        with np.load(out) as result:
            np.testing.assert_array_equal(result["indices"], _reference_indices(queries, corpus, 7))
        # A shared corpus is one server's: several servers refuse it in one line.
        argv[argv.index("--corpus") + 1] = "@docs"
        assert cli.main(argv) == 2
        assert "a shared corpus is one server's" in capsys.readouterr().err
    finally:
        for running in servers:
            running.stop(0)


# ---- Ctrl-C, --out, damaged files, install hints (issue 21, items 5, 12 and 13) -------------


def _command(*args: str) -> subprocess.Popen[bytes]:
    script = "import sys; from cosserve.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", script, *args], stderr=subprocess.PIPE, env={**os.environ, "COSSERVE_AUTH_TOKEN": ""})


def _interrupted(proc: subprocess.Popen[bytes], ready: Callable[[str], bool]) -> tuple[int, str]:
    """SIGINT to `proc` once `ready(stderr so far)`; its exit status and stderr."""
    seen: list[bytes] = []
    assert proc.stderr is not None
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: os.read(proc.stderr.fileno(), 4096), b"")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while not ready(b"".join(seen).decode(errors="replace")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, b"".join(seen).decode(errors="replace")
    proc.send_signal(signal.SIGINT)
    try:
        status = proc.wait(60)
    finally:
        proc.kill()
    reader.join(10)
    return status, b"".join(seen).decode(errors="replace")


def test_ctrl_c_during_score_exits_130_with_one_line(tmp_path):
    """It printed a 25-line traceback. The embedded server and the session are closed on the way out."""
    rng = np.random.default_rng(5)
    np.save(tmp_path / "c.npy", rng.standard_normal((200_000, 64)).astype(np.float32))
    np.save(tmp_path / "q.npy", rng.standard_normal((40_000, 64)).astype(np.float32))
    proc = _command("score", "--corpus", str(tmp_path / "c.npy"), "--queries", str(tmp_path / "q.npy"),
                    "--device", "cpu", "--out", str(tmp_path / "r.npz"), "--progress")
    status, stderr = _interrupted(proc, lambda text: "scoring:" in text)
    assert status == 130, stderr
    assert "Traceback" not in stderr and stderr.rstrip().splitlines()[-1].split("\r")[-1] == "cosserve score: interrupted"
    assert not (tmp_path / "r.npz").exists()


def test_ctrl_c_during_health_exits_130_with_one_line():
    with socket.socket() as silent:  # accepts the connection and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(60)
        proc = _command("health", "--server", "127.0.0.1:%d" % silent.getsockname()[1], "--timeout", "60")
        connection, _ = silent.accept()  # health is waiting for its answer now
        with connection:
            time.sleep(0.3)
            status, stderr = _interrupted(proc, lambda text: True)
    assert status == 130 and stderr.strip() == "cosserve health: interrupted", stderr


def test_ctrl_c_stops_serve_with_130():
    proc = _command("serve", "--port", "0", "--device", "cpu")
    status, stderr = _interrupted(proc, lambda text: "listening on" in text)
    assert status == 130, stderr
    assert "received SIGINT" in stderr and "cosserve stopped" in stderr and "Traceback" not in stderr


def test_out_must_end_in_a_format_written(files, capsys):
    """--out r.txt silently wrote an npz named r.txt; its suffix now chooses the format."""
    from cosserve import cli

    tmp_path, _, _ = files
    for out in ("r.txt", "r", "r.npy"):
        argv = ["score", "--corpus", str(tmp_path / "corpus.npy"), "--queries", str(tmp_path / "queries.npy"),
                "--server", "127.0.0.1:1", "--out", str(tmp_path / out)]
        assert cli.main(argv) == 2
        stderr = capsys.readouterr().err
        assert stderr.strip() == (
            f"cosserve score: --out {str(tmp_path / out)!r}: its suffix chooses the format, "
            ".parquet (a folder of part files, resumable) or .npz (one file, for small jobs)"
        )
        assert not (tmp_path / out).exists()


def test_a_damaged_npy_is_named_damaged(files, address):
    """A .npy whose header was damaged was "neither a .npy nor a .safetensors file"."""
    tmp_path, corpus, _ = files
    good = (tmp_path / "corpus.npy").read_bytes()
    (tmp_path / "header.npy").write_bytes(b"\0" * 16 + good[16:])
    (tmp_path / "short.npy").write_bytes(good[: len(good) // 2])  # cut off: fewer bytes than its shape needs
    for name in ("header.npy", "short.npy"):
        done = score("--corpus", str(tmp_path / name), "--queries", str(tmp_path / "queries.npy"),
                     "--server", address, "--out", str(tmp_path / "r.npz"))
        assert done.returncode == 2, done.stderr
        assert f"corpus file {str(tmp_path / name)!r} is a damaged .npy file" in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def test_install_hints_are_the_readmes_command(files):
    """The client-only install said `pip install 'cosserve[server]'`, which pulls CUDA torch and is
    not how the README installs."""
    readme_install = re.search(r"^(python3 -m pip install -e \"\.\[server\]\")", README.read_text(), re.M)
    assert readme_install, "the README's install command moved"
    tmp_path, _, _ = files
    no_torch = "import sys; sys.modules['torch'] = None; from cosserve.cli import main; sys.exit(main(sys.argv[1:]))"
    runs = {
        "serve": [sys.executable, "-c", no_torch, "serve", "--port", "0"],
        "score": [sys.executable, "-c", no_torch, "score", "--corpus", str(tmp_path / "corpus.npy"),
                  "--queries", str(tmp_path / "queries.npy"), "--out", str(tmp_path / "r.npz")],
    }
    for command, argv in runs.items():
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, (command, done.stderr)
        assert readme_install.group(1) in done.stderr and "'cosserve[server]'" not in done.stderr, (command, done.stderr)


def test_health_refuses_a_url_naming_host_port():
    """grpc's "Misformatted domain name" was all `--server http://...` got (issue 21, item 4)."""
    done = subprocess.run([sys.executable, "-m", "cosserve.cli", "health", "--server", "http://127.0.0.1:50051"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == "cosserve health: 'http://127.0.0.1:50051' is a URL; the server address is host:port, here '127.0.0.1:50051'"


def test_an_interrupt_that_surfaces_as_another_error_still_exits_130(monkeypatch, capsys):
    """Ctrl-C landing inside grpc's wait on a stream broke its lock, and the job ended with
    `RuntimeError: cannot release un-acquired lock` raised while the KeyboardInterrupt unwound: a
    traceback and exit 1 (a clean-clone CI run of test_jobs' Ctrl-C test)."""
    from cosserve import cli

    def interrupted_then_broken(ns):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("cannot release un-acquired lock")  # noqa: B904  (as grpc's `with` exit does)

    monkeypatch.setattr(cli, "_run", interrupted_then_broken)
    assert cli.main(["health"]) == 130
    assert capsys.readouterr().err.strip() == "cosserve health: interrupted"

    def plainly_broken(ns):
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr(cli, "_run", plainly_broken)
    with pytest.raises(RuntimeError, match="a bug of ours"):
        cli.main(["health"])
