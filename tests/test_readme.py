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
