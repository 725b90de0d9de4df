"""The committed generated stubs are what protos/generate.py makes from the .proto today."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load_generator():
    spec = importlib.util.spec_from_file_location("generate", ROOT / "protos" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_are_fresh(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("grpc_tools", reason="regenerating needs the dev extra (grpcio-tools)")
    written = _load_generator().generate(tmp_path)
    assert written, "the generator wrote nothing"
    for fresh in written:
        committed = ROOT / "client" / fresh.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is missing: run python protos/generate.py"
        assert committed.read_bytes() == fresh.read_bytes(), (
            f"{committed.relative_to(ROOT)} is stale: run python protos/generate.py and commit the result"
        )
