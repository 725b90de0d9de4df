"""The README stays true: its Python example runs against a real server, and .ci/run runs its test command."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

pytest.importorskip("torch")


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_ci_runs_exactly_the_readme_test_command():
    test_command = next(b.strip() for b in _blocks("bash") if "pytest" in b)
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def test_quickstart_serves_with_the_documented_command():
    serve_command = next(b.strip() for b in _blocks("bash") if "cosserve serve" in b)
    assert serve_command == 'python3 -m pip install -e ".[server]" && cosserve serve'


def test_python_example_runs_against_a_server(server):
    (example, *_) = _blocks("python")
    code = example.replace('"127.0.0.1:50051"', repr(server.address))
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102  (our own README)
    y = namespace["y"]
    assert y.dtype.name == "float32" and y.shape == (2, 3)


def test_scoring_example_runs_against_a_server(server):
    import numpy as np

    (_, scoring, *_) = _blocks("python")
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((500, 16)).astype(np.float32)
    queries = rng.standard_normal((7, 16)).astype(np.float32)
    namespace: dict[str, object] = {"Client": __import__("cosserve").Client, "corpus": corpus, "queries": queries}
    exec(compile(scoring.replace('"127.0.0.1:50051"', repr(server.address)), "README.md", "exec"), namespace)  # noqa: S102
    sims = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
        corpus / np.linalg.norm(corpus, axis=1, keepdims=True)
    ).T
    np.testing.assert_array_equal(namespace["indices"], np.argsort(-sims, axis=1, kind="stable")[:, :10])



def test_the_flag_table_names_every_setting_and_no_other():
    import dataclasses

    from cosserve.server.settings import Settings

    table = README[README.index("## Running the server"):README.index("### Security model")]
    first_cells = re.findall(r"^\| ([^|]+) \|", table, re.M)
    documented = {flag for cell in first_cells for flag in re.findall(r"`(--[a-z0-9-]+)`", cell)}
    flags = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(Settings)}
    assert flags - documented == set(), "flags missing from the README's table"
    assert documented - flags <= {"--no-allow-shm"}, "README rows for flags that do not exist"
