"""The committed generated stubs are what protos/generate.py makes from the .proto today, with the
pinned generator in its own venv (the suite's own environment has the newest protobuf)."""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess

from tests import toolenv

ROOT = pathlib.Path(__file__).resolve().parents[2]
GENERATE = ROOT / "protos" / "generate.py"


def _load_generator():
    spec = importlib.util.spec_from_file_location("generate", GENERATE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_are_fresh(tmp_path: pathlib.Path) -> None:
    # Not skipped when the generator cannot be installed: toolenv raises with pip's words.
    interpreter = toolenv.python("stubgen", _load_generator().GENERATOR_REQUIREMENTS)
    result = subprocess.run(
        [str(interpreter), str(GENERATE), "--out", str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    written = [pathlib.Path(line) for line in result.stdout.splitlines()]
    assert written, "the generator wrote nothing"
    for fresh in written:
        committed = ROOT / "client" / fresh.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is missing: run python3 protos/generate.py"
        assert committed.read_bytes() == fresh.read_bytes(), (
            f"{committed.relative_to(ROOT)} is stale: run python3 protos/generate.py and commit the result"
        )


def test_the_generator_is_pinned_and_kept_out_of_the_suites_environment() -> None:
    """The pin is exact (else the committed bytes are not reproducible), and the suite's own
    environment does not carry it (it would hold protobuf below 6 there)."""
    generator = _load_generator()
    assert all("==" in requirement for requirement in generator.GENERATOR_REQUIREMENTS)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"grpcio-tools' not in pyproject, "grpcio-tools in an extra downgrades protobuf: keep it in generate.py's venv"
