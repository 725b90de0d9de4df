"""The README stays true: its Python example runs against a real server, and .ci/run runs its test command."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
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


def _section(heading: str) -> str:
    """The README's text from `## heading` to the next `## ` heading."""
    start = README.index(f"## {heading}")
    end = README.find("\n## ", start + 3)
    return README[start : end if end >= 0 else len(README)]


def _python_blocks_of(heading: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", _section(heading), flags=re.S)


def _run_as_written(block: str, address: str) -> dict[str, object]:
    """Run a README example exactly as written, against `address` instead of the default port:
    nothing is defined for it beforehand."""
    assert block.count('"127.0.0.1:50051"') == 1, "each example connects once, to the documented address"
    namespace: dict[str, object] = {"__name__": "__readme__"}
    exec(compile(block.replace('"127.0.0.1:50051"', repr(address)), "README.md", "exec"), namespace)  # noqa: S102
    return namespace


def test_every_python_example_of_the_client_sections_runs_as_written(server, capsys):
    blocks = _python_blocks_of("Calling it from Python") + _python_blocks_of("Scoring embeddings")
    assert len(blocks) == 3  # the sync client, asyncio, scoring: each is checked below
    first, asyncio_example, scoring = blocks

    y = _run_as_written(first, server.address)["y"]
    assert y.dtype.name == "float32" and y.shape == (2, 3)

    _run_as_written(asyncio_example, server.address)
    assert capsys.readouterr().out.count("[[") == 1  # it printed the (5, 3) indices of its one batch

    import numpy as np

    namespace = _run_as_written(scoring, server.address)
    corpus, queries = namespace["corpus"], namespace["queries"]
    sims = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
        corpus / np.linalg.norm(corpus, axis=1, keepdims=True)
    ).T
    np.testing.assert_array_equal(namespace["indices"], np.argsort(-sims, axis=1, kind="stable")[:, :10])
    above = np.flatnonzero(sims[0] >= 0.3)
    np.testing.assert_array_equal(namespace["rows"], above[np.argsort(-sims[0, above], kind="stable")][:100])


def test_the_client_error_table_names_every_exported_exception():
    import cosserve
    import cosserve.errors

    table = _section("Calling it from Python")
    documented = set(re.findall(r"^\| `(\w+Error)` \|", table, re.M))
    exported = set(cosserve.errors.__all__) - {"CosserveError", "CosserveRpcError"}
    assert documented == exported
    for name in documented:
        assert issubclass(getattr(cosserve, name), cosserve.CosserveError)


def test_the_flag_table_names_every_setting_and_no_other():
    import dataclasses

    from cosserve.server.settings import Settings

    table = README[README.index("## Running the server"):README.index("### Security model")]
    first_cells = re.findall(r"^\| ([^|]+) \|", table, re.M)
    documented = {flag for cell in first_cells for flag in re.findall(r"`(--[a-z0-9-]+)`", cell)}
    flags = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(Settings)}
    assert flags - documented == set(), "flags missing from the README's table"
    assert documented - flags <= {"--no-allow-shm"}, "README rows for flags that do not exist"
