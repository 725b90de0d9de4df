"""Installing the test extra on top of a server's environment changes none of the server's
packages to an older version (pip itself answers, with a dry run of the README's test command)."""

from __future__ import annotations

import importlib.metadata
import json
import pathlib
import re
import shlex
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


# ---- the server and tritonclient in one environment (issue 21, item 10) -----------------------

# A tritonclient call from the shared environment's interpreter: CosineSimilarity of two rows.
_INFER = r"""
import sys
import numpy as np
import tritonclient.grpc as tc

client = tc.InferenceServerClient(sys.argv[1])
x = np.array([[1.0, 0.0], [3.0, 4.0]], np.float32)
inputs = [tc.InferInput("X", x.shape, "FP32"), tc.InferInput("Y", x.shape, "FP32")]
inputs[0].set_data_from_numpy(x)
inputs[1].set_data_from_numpy(np.array([[0.0, 1.0], [3.0, 4.0]], np.float32))
print(client.infer("CosineSimilarity", inputs).as_numpy("S").tolist())
"""


@pytest.mark.slow  # one venv made with pip on first use (seconds when cached), and a server start
def test_the_readmes_command_installs_the_server_and_tritonclient_together_and_both_work() -> None:
    """tritonclient[grpc] installed after the server downgraded protobuf to 6.x under
    grpcio-health-checking 1.85 (protobuf 7 gencode): `cosserve serve` died with VersionError."""
    from cosserve.cli import INSTALL_WITH_TRITONCLIENT

    from tests import toolenv
    from tests.conftest import stop_process

    readme = (ROOT / "README.md").read_text()
    assert f"```bash\n{INSTALL_WITH_TRITONCLIENT}\n```" in readme
    words = shlex.split(INSTALL_WITH_TRITONCLIENT)
    assert words[:5] == ["python3", "-m", "pip", "install", "-e"]
    requirements = ["-e", words[5].replace(".", str(ROOT), 1), *words[6:]]  # ".[server]": this clone
    python = toolenv.python("server-and-tritonclient", requirements)
    versions = subprocess.run(
        [str(python), "-c", "import google.protobuf, tritonclient, grpc_health; print(google.protobuf.__version__)"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert versions.returncode == 0, versions.stderr
    serve = "import sys; from cosserve.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([str(python), "-c", serve, "serve", "--port", "0", "--device", "cpu"], stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:  # bounded by the server's start: it prints its address, or exits
            lines.append(line)
            if "listening on" in line:
                break
        match = re.search(r"listening on (\S+)", "".join(lines))
        assert match, "".join(lines)
        infer = subprocess.run([str(python), "-c", _INFER, match.group(1)], capture_output=True, text=True, timeout=120)
    finally:
        stop_process(proc)
    assert infer.returncode == 0, infer.stderr
    assert json.loads(infer.stdout) == pytest.approx([0.0, 1.0], abs=1e-6)


def test_a_protobuf_too_old_for_the_servers_packages_says_to_install_both_together() -> None:
    """The state a separate `pip install tritonclient[grpc]` leaves: grpc_health generated for
    protobuf 7 under protobuf 6. Protobuf's own check is made to refuse it as it then does; the
    server stopped with a traceback."""
    from cosserve.cli import INSTALL_WITH_TRITONCLIENT

    script = r"""
import sys
from google.protobuf import runtime_version

checked = runtime_version.ValidateProtobufRuntimeVersion

def older_runtime(domain, major, minor, patch, suffix, location):
    if location.startswith("grpc_health/"):
        raise runtime_version.VersionError(
            f"Detected incompatible Protobuf Gencode/Runtime versions when loading {location}: gencode 7.35.1 "
            "runtime 6.33.6. Runtime version cannot be older than the linked gencode version. See Protobuf version "
            "guarantees at https://protobuf.dev/support/cross-version-runtime-guarantee."
        )
    checked(domain, major, minor, patch, suffix, location)

runtime_version.ValidateProtobufRuntimeVersion = older_runtime
from cosserve.cli import main
sys.exit(main(["serve", "--port", "0"]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        "cosserve: grpc_health/v1/health.proto was generated for protobuf 7.35.1, but protobuf 6.33.6 is installed "
        "(installing tritonclient[grpc] after the server downgrades protobuf); install the server and tritonclient "
        f"together, in a clone of cosserve: {INSTALL_WITH_TRITONCLIENT}"
    )
