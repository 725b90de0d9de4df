"""docs/operators.md is generated from the registry: fail when it is stale."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("torch")

from cosserve.server.compute.registry import REGISTRY  # noqa: E402

DOCS = Path(__file__).resolve().parents[2] / "docs"


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate_operators", DOCS / "generate_operators.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_operators_md_is_up_to_date():
    current = (DOCS / "operators.md").read_text(encoding="utf-8")
    assert current == generator().render(), "docs/operators.md is stale; run: python docs/generate_operators.py"


def test_every_operator_has_a_section():
    current = (DOCS / "operators.md").read_text(encoding="utf-8")
    for name in REGISTRY:
        assert f"\n## {name}\n" in current
