"""The deployment files agree with the code: env variables, ports, grace periods, entrypoint."""

from __future__ import annotations

import dataclasses
import pathlib
import re

import pytest

from cosserve.server.settings import Settings

yaml = pytest.importorskip("yaml")
ROOT = pathlib.Path(__file__).resolve().parent.parent
FIELDS = {f.name for f in dataclasses.fields(Settings)}


def _deployment() -> dict:
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "kubernetes.yaml").read_text()))
    return next(d for d in docs if d["kind"] == "Deployment")


def test_manifest_env_variables_are_real_settings_and_ports_match():
    spec = _deployment()["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    for name in env:
        assert name.startswith("COSSERVE_") and name.removeprefix("COSSERVE_").lower() in FIELDS, name
    port = container["ports"][0]["containerPort"]
    assert port == Settings().port
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["grpc"]["port"] == port
    assert spec["terminationGracePeriodSeconds"] > float(env["COSSERVE_GRACE_S"])


def test_dockerfile_env_variables_are_real_settings_and_entrypoint_is_exec_form():
    text = (ROOT / "Dockerfile").read_text()
    for name in re.findall(r"COSSERVE_([A-Z_]+)=", text):
        assert name.lower() in FIELDS, name
    assert 'ENTRYPOINT ["cosserve", "serve"]' in text  # exec form: SIGTERM reaches the server
