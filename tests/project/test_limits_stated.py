"""The message limits the .proto's header and the README state for clients in other languages are
the ones cosserve.limits sets on both sides."""

from __future__ import annotations

import pathlib
import re

import pytest

from cosserve import limits

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "protos" / "cosserve" / "v1" / "cosserve.proto", ROOT / "README.md"]
STATED = ("MAX_MESSAGE_BYTES", "INLINE_BYTES", "CHUNK_BYTES")
MiB = 1024 * 1024


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_stated_limits_are_the_code_s(document: pathlib.Path) -> None:
    text = document.read_text()
    for name in STATED:
        # "(MAX_MESSAGE_BYTES): 7340032 bytes (7 MiB)" in the proto, "| `MAX_MESSAGE_BYTES` | 7340032 (7 MiB) |" in the README
        found = re.findall(rf"\b{name}\b[`):| ]+(\d+)(?: bytes)? \((\d+) MiB\)", text)
        assert found, f"{document.name} does not state {name} as 'N bytes (M MiB)'"
        value = getattr(limits, name)
        for stated, mib in found:
            assert int(stated) == value and int(mib) * MiB == value, f"{document.name}: {name} is {value}, not {stated} ({mib} MiB)"
    flags = re.findall(r"-max-msg-sz (\d+)", text)
    assert flags, f"{document.name} does not say how to raise grpcurl's 4 MiB receive limit"
    assert {int(n) for n in flags} == {limits.MAX_MESSAGE_BYTES}
