"""Installing the test extra on top of a server's environment changes none of the server's
packages to an older version (pip itself answers, with a dry run of the README's test command)."""

from __future__ import annotations

import importlib.metadata
import json
import pathlib
import re
import subprocess
import sys

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parents[2]
# What pip prints when it cannot reach an index: only then is the answer unknown and the test skips.
_OFFLINE = re.compile(
    r"NewConnectionError|Max retries exceeded|Network is unreachable|Temporary failure in name resolution"
    r"|Name or service not known|Connection refused|ConnectTimeout|ReadTimeout|ProxyError|Could not fetch URL"
)


def installed_closure(name: str, extras: frozenset[str]) -> dict[str, str]:
    """Every installed distribution that `name[extras]` requires, directly or not: name -> version."""
    found: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(canonicalize_name(name), extras)]
    while todo:  # bounded: each (distribution, extras) pair is expanded once
        key, wanted = todo.pop()
        if (key, wanted) in seen:
            continue
        seen.add((key, wanted))
        try:
            dist = importlib.metadata.distribution(key)
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional dependency this environment lacks: nothing to downgrade
        found[key] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            environments = [{**default_environment(), "extra": extra} for extra in wanted or {""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in environments):
                todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    return found


@pytest.mark.slow  # pip resolves the whole install: about 20 s
def test_installing_the_test_extra_downgrades_no_package_of_the_server() -> None:
    server = installed_closure("cosserve", frozenset({"server"}))
    assert "torch" in server and "protobuf" in server, "the suite runs on an install with the server extra"
    command = [
        sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-",
        "--retries", "1", "--timeout", "30", "--disable-pip-version-check",
        "-e", f"{ROOT}[server,dev]",  # the README's test command
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-15:])
        if _OFFLINE.search(result.stderr):
            pytest.skip(f"pip cannot reach a package registry:\n{tail}")
        pytest.fail(f"pip cannot resolve the README's test install:\n{tail}")
    report = json.loads(result.stdout)
    downgrades = []
    for item in report["install"]:
        key = canonicalize_name(item["metadata"]["name"])
        new = item["metadata"]["version"]
        if key in server and Version(new) < Version(server[key]):
            downgrades.append(f"{key} {server[key]} -> {new}")
    assert not downgrades, "installing the dev extra would downgrade the server's " + ", ".join(downgrades)
