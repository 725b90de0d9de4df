"""The deployment files agree with the Kubernetes schemas, with each other and with the server.

Every manifest of deploy/k8s/ (the CPU variant, and the CUDA variant gpu/ makes of it) is checked
offline with `kubernetes-validate --strict` against the schemas of the oldest Kubernetes these
files are written for and of the newest one the package bundles. kubernetes-validate has no schema
for the prometheus-operator's ServiceMonitor (a CRD): for it only the warning that says so is
allowed, and the test checks by hand that it selects the replicas' Service and its metrics port.

No cluster, container engine or kustomize runs here: gpu/'s patches are applied by this file's
own small JSON-patch (add and replace, which is all gpu/ uses), and deploy/compose.yaml is checked
as YAML. Regenerate deploy/k8s/nginx-configmap.yaml after changing the nginx files it holds with
`python tests/deploy/test_deploy.py`.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import pathlib
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from cosserve import CosserveError
from cosserve.server import settings as settings_mod
from cosserve.server.settings import Settings

yaml = pytest.importorskip("yaml")
ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
NGINX_CONF = DEPLOY / "nginx" / "cosserve.conf"
COMPOSE_REPLICAS = DEPLOY / "nginx" / "cosserve-replicas.conf"
K8S_REPLICAS = K8S / "nginx" / "cosserve-replicas.conf"
CONFIGMAP = K8S / "nginx-configmap.yaml"
FIELDS = {f.name for f in dataclasses.fields(Settings)}
# Native gRPC probes are GA from Kubernetes 1.27: the oldest version these manifests are for.
OLDEST_KUBERNETES = "1.27.0"
# RunningServer.stop waits up to --grace-s + 5 s for the calls to finish before it moves on.
STOP_MARGIN_S = 5
# What the termination grace leaves, past the drain, for writing the changed sessions
# (--durability snapshot): 60 s is about 14 GB at the 0.24 GB/s measured for SaveWorkspace.
SNAPSHOT_BUDGET_S = 60


def load_all(path: pathlib.Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def base_resources() -> list[dict]:
    """deploy/k8s as `kubectl apply -k deploy/k8s` applies it: the files its kustomization lists."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"] for doc in load_all(K8S / name)]


def _pointer(path: str) -> list[str]:
    return [part.replace("~1", "/").replace("~0", "~") for part in path.split("/")[1:]]


def json_patch(doc: dict, operations: list[dict]) -> None:
    """RFC 6902 `add` and `replace`, in place (the operations gpu/ uses; anything else fails)."""
    for op in operations:
        *parents, last = _pointer(op["path"])
        node = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if op["op"] == "add" and isinstance(node, list):
            node.insert(len(node) if last == "-" else int(last), op["value"])
        elif op["op"] == "add" or (op["op"] == "replace" and last in node):
            node[last] = op["value"]
        else:
            raise AssertionError(f"unsupported or failing patch operation {op}")


def gpu_resources() -> list[dict]:
    """deploy/k8s/gpu as `kubectl apply -k deploy/k8s/gpu` applies it."""
    overlay = yaml.safe_load((K8S / "gpu" / "kustomization.yaml").read_text())
    assert overlay["resources"] == [".."]
    docs = base_resources()
    for patch in overlay["patches"]:
        target = patch["target"]
        matched = [d for d in docs if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]]
        assert len(matched) == 1, target
        assert matched[0]["apiVersion"] == f"{target['group']}/{target['version']}"
        json_patch(matched[0], yaml.safe_load(patch["patch"]))
    return docs


def one(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def server_container(docs: list[dict]) -> dict:
    (container,) = one(docs, "StatefulSet", "cosserve")["spec"]["template"]["spec"]["containers"]
    return container


def settings_from_env(env: dict[str, str]) -> Settings:
    """The Settings `cosserve serve` makes from these variables (SettingError for a bad one)."""
    parser = argparse.ArgumentParser()
    settings_mod.add_arguments(parser, environ=env)
    return settings_mod.from_args(parser.parse_args([]))


def container_settings(container: dict) -> tuple[Settings, dict[str, str]]:
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    for e in container["env"]:
        assert e["name"].startswith("COSSERVE_") and e["name"].removeprefix("COSSERVE_").lower() in FIELDS, e
    return settings_from_env(env), env


def nginx_port() -> int:
    (port,) = re.findall(r"^\s*listen\s+(?:[\d.]+:)?(\d+)\b", NGINX_CONF.read_text(), re.MULTILINE)
    return int(port)


def nginx_include() -> str:
    (name,) = re.findall(r"^\s*include\s+(\S+);", NGINX_CONF.read_text(), re.MULTILINE)
    return name


def replica_servers(text: str) -> list[str]:
    return re.findall(r"^\s*server\s+(\S+?)(?:\s+[^;]*)?;", text, re.MULTILINE)


# ---- the schemas ----


def _validate(paths: list[pathlib.Path], version: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", version, *map(str, paths)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_every_manifest_validates_strictly_against_the_kubernetes_schemas(variant: str, tmp_path: pathlib.Path):
    from kubernetes_validate.utils import latest_version

    docs = base_resources() if variant == "cpu" else gpu_resources()
    rendered = tmp_path / f"{variant}.yaml"
    rendered.write_text(yaml.safe_dump_all(docs))
    monitor = K8S / "prometheus" / "servicemonitor.yaml"
    for version in (OLDEST_KUBERNETES, f"{latest_version()}.0"):
        out = _validate([rendered, monitor], version)
        passed = re.findall(r"^INFO .* passed for resource (\S+) against version", out, re.MULTILINE)
        assert sorted(passed) == sorted(f"{d['kind'].lower()}/{d['metadata']['name']}" for d in docs), out
        warnings = re.findall(r"^WARN .*$", out, re.MULTILINE)
        assert len(warnings) == 1 and "kind ServiceMonitor with api version monitoring.coreos.com/v1" in warnings[0], out


def test_strict_validation_refuses_a_misspelt_field(tmp_path: pathlib.Path):
    # The check can fail: one unknown field in the StatefulSet is an error.
    docs = base_resources()
    server_container(docs)["readinessProbe"]["grpcc"] = {"port": 50051}
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump_all(docs))
    result = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", OLDEST_KUBERNETES, str(broken)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0 and "grpcc" in result.stdout, result.stdout


# ---- agreement with the server ----


def test_statefulset_ports_env_probes_and_grace_agree_with_the_server_settings():
    docs = base_resources()
    statefulset = one(docs, "StatefulSet", "cosserve")
    pod = statefulset["spec"]["template"]["spec"]
    container = server_container(docs)
    settings, env = container_settings(container)  # every variable is a setting and parses
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": settings.port, "http": settings.http_port, "metrics": settings.metrics_port}
    assert settings.port == Settings().port and settings.http_port == Settings().http_port and settings.host == "0.0.0.0"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": settings.port}, probe
    # The startup probe outlasts restoring the sessions on the volume; build_server allows 60 s.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60
    # preStop, then SIGTERM's drain and the final snapshot, all inside the termination grace.
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    needed = pre_stop + settings.grace_s + STOP_MARGIN_S
    if settings.durability in ("snapshot", "sync"):
        needed += SNAPSHOT_BUDGET_S
    assert pod["terminationGracePeriodSeconds"] >= needed
    assert settings.grace_s > 0 and pre_stop >= 5  # nginx re-resolves every 5 s (replicas.conf)
    # The state directory is the volume claim's, so sessions outlive the pod.
    assert settings.durability == "snapshot" and settings.state_dir
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    claims = {t["metadata"]["name"] for t in statefulset["spec"]["volumeClaimTemplates"]}
    assert mounts[settings.state_dir] in claims
    # Non-root, as the image's USER; the volume writable by that group.
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["fsGroup"] == 10001
    assert pod["securityContext"]["runAsNonRoot"] is True
    # The default variant asks for no GPU; only gpu/ does.
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})


def test_gpu_variant_asks_for_one_gpu_and_runs_the_cuda_image_on_it():
    container = server_container(gpu_resources())
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].endswith("-cuda")
    settings, _ = container_settings(container)
    assert settings.device == "cuda"
    pod = one(gpu_resources(), "StatefulSet", "cosserve")["spec"]["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_services_selectors_and_policies_agree_with_the_pods():
    docs = base_resources()
    namespace = one(docs, "Namespace", "cosserve")["metadata"]["name"]
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {namespace}
    statefulset = one(docs, "StatefulSet", "cosserve")
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    settings, _ = container_settings(server_container(docs))

    def selects(selector: dict, pod_labels: dict) -> bool:
        return selector.items() <= pod_labels.items()

    assert selects(statefulset["spec"]["selector"]["matchLabels"], labels)
    headless = one(docs, "Service", statefulset["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None" and selects(headless["spec"]["selector"], labels)
    assert {p["name"]: p["port"] for p in headless["spec"]["ports"]} == {
        "grpc": settings.port, "http": settings.http_port, "metrics": settings.metrics_port,
    }
    # Prometheus: the pods' annotations and the ServiceMonitor both name the metrics port.
    annotations = statefulset["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings.metrics_port)
    (monitor,) = load_all(K8S / "prometheus" / "servicemonitor.yaml")
    assert selects(monitor["spec"]["selector"]["matchLabels"], headless["metadata"]["labels"])
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [namespace]
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    # The budget and the autoscaler act on these pods.
    assert selects(one(docs, "PodDisruptionBudget", "cosserve")["spec"]["selector"]["matchLabels"], labels)
    hpa = one(docs, "HorizontalPodAutoscaler", "cosserve")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "cosserve"}
    assert hpa["minReplicas"] == statefulset["spec"]["replicas"] <= hpa["maxReplicas"]
    # The network policy lets nginx reach the gRPC port and Prometheus the metrics port.
    policy = one(docs, "NetworkPolicy", "cosserve")["spec"]
    assert selects(policy["podSelector"]["matchLabels"], labels)
    nginx_labels = one(docs, "Deployment", "cosserve-nginx")["spec"]["template"]["metadata"]["labels"]
    by_port = {rule["ports"][0]["port"]: rule["from"] for rule in policy["ingress"]}
    assert set(by_port) == {settings.port, settings.http_port, settings.metrics_port}
    assert any(selects(peer.get("podSelector", {}).get("matchLabels", {"-": "-"}), nginx_labels) for peer in by_port[settings.port])


def test_nginx_configmap_holds_deploy_nginx_conf_and_the_statefulset_pod_names():
    docs = base_resources()
    (configmap,) = load_all(CONFIGMAP)
    assert one(docs, "ConfigMap", "cosserve-nginx") == configmap
    assert configmap["data"] == {
        "cosserve.conf": NGINX_CONF.read_text(),
        nginx_include(): K8S_REPLICAS.read_text(),
    }, "deploy/k8s/nginx-configmap.yaml is stale: run `python tests/deploy/test_deploy.py`"
    assert CONFIGMAP.read_text() == render_configmap(), "run `python tests/deploy/test_deploy.py`"
    # The replica list: every pod the autoscaler may make, by its headless-Service DNS name.
    statefulset = one(docs, "StatefulSet", "cosserve")
    settings, _ = container_settings(server_container(docs))
    namespace, service = statefulset["metadata"]["namespace"], statefulset["spec"]["serviceName"]
    most = one(docs, "HorizontalPodAutoscaler", "cosserve")["spec"]["maxReplicas"]
    assert replica_servers(K8S_REPLICAS.read_text()) == [
        f"cosserve-{i}.{service}.{namespace}.svc.cluster.local:{settings.port}" for i in range(most)
    ]
    # nginx reads them both from one directory (the include is relative to cosserve.conf's).
    nginx = one(docs, "Deployment", "cosserve-nginx")["spec"]["template"]["spec"]
    (container,) = nginx["containers"]
    (mount,) = container["volumeMounts"]
    (volume,) = [v for v in nginx["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    config_index = container["command"].index("-c") + 1
    assert container["command"][config_index] == f"{mount['mountPath']}/cosserve.conf"
    # Ports: nginx's listen, its container port, its Service and its network policy.
    port = nginx_port()
    assert [p["containerPort"] for p in container["ports"]] == [port]
    service_ports = one(docs, "Service", "cosserve-nginx")["spec"]["ports"]
    assert [(p["port"], p["targetPort"]) for p in service_ports] == [(settings.port, "grpc")]
    policy = one(docs, "NetworkPolicy", "cosserve-nginx")["spec"]
    assert [p["port"] for rule in policy["ingress"] for p in rule["ports"]] == [port]
    # `resolve` in the replica list needs nginx >= 1.27.3.
    major, minor = map(int, re.fullmatch(r"nginx:(\d+)\.(\d+)(?:\.\d+)?", container["image"]).groups())
    assert (major, minor) >= (1, 28)


def render_configmap() -> str:
    """deploy/k8s/nginx-configmap.yaml: deploy/nginx/cosserve.conf and deploy/k8s's replica list."""

    def block(text: str) -> str:
        assert text.endswith("\n") and not text.endswith("\n\n")
        return "".join(f"    {line}\n" if line else "\n" for line in text.splitlines())

    return (
        "# Generated by `python tests/deploy/test_deploy.py` from deploy/nginx/cosserve.conf and\n"
        "# deploy/k8s/nginx/cosserve-replicas.conf; tests/deploy/test_deploy.py checks it still holds them.\n"
        "apiVersion: v1\n"
        "kind: ConfigMap\n"
        "metadata:\n"
        "  name: cosserve-nginx\n"
        "  namespace: cosserve\n"
        "  labels: {app.kubernetes.io/name: cosserve-nginx}\n"
        "data:\n"
        "  cosserve.conf: |\n" + block(NGINX_CONF.read_text()) +
        f"  {nginx_include()}: |\n" + block(K8S_REPLICAS.read_text())
    )


# ---- compose ----


def test_compose_runs_three_named_replicas_behind_nginx_with_its_config():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    replicas = sorted(name for name in services if name != "nginx")
    assert replicas == ["cosserve-0", "cosserve-1", "cosserve-2"]
    defaults = Settings()
    for name in replicas:
        service = services[name]
        assert service["image"] == "cosserve:0.1.0" and service["build"]["context"] == ".."
        env = {key: str(value) for key, value in service["environment"].items()}
        for key in env:
            assert key.removeprefix("COSSERVE_").lower() in FIELDS, key
        # The image's ENV gives host 0.0.0.0 and port 50051; these add to it.
        settings = settings_from_env({"COSSERVE_HOST": "0.0.0.0", **env})
        assert settings.port == defaults.port
        assert service["healthcheck"]["test"] == ["CMD", "cosserve", "health", "--server", f"127.0.0.1:{settings.port}"]
        grace = float(service["stop_grace_period"].removesuffix("s"))
        assert grace >= settings.grace_s + STOP_MARGIN_S + (SNAPSHOT_BUDGET_S if settings.state_dir else 0)
        (volume,) = service["volumes"]
        assert volume == f"{name}-state:{settings.state_dir}" and f"{name}-state" in compose["volumes"]
        published, rest = service["ports"]
        assert published.startswith("127.0.0.1:") and published.endswith(f":{settings.port}")
        assert rest.startswith("127.0.0.1:") and rest.endswith(f":{settings.http_port}")
    # nginx: deploy/nginx/cosserve.conf as its nginx.conf, and the replica list beside it, which
    # names exactly these services on the server's port.
    nginx = services["nginx"]
    assert sorted(nginx["depends_on"]) == replicas
    assert all(c == {"condition": "service_healthy"} for c in nginx["depends_on"].values())
    mounts = {target: source for source, target in (m.removesuffix(":ro").split(":") for m in nginx["volumes"])}
    assert (DEPLOY / mounts["/etc/nginx/nginx.conf"]).resolve() == NGINX_CONF
    assert (DEPLOY / mounts[f"/etc/nginx/{nginx_include()}"]).resolve() == COMPOSE_REPLICAS
    assert replica_servers(COMPOSE_REPLICAS.read_text()) == [f"{name}:{defaults.port}" for name in replicas]
    assert nginx["ports"] == [f"{defaults.port}:{nginx_port()}"]
    assert nginx["image"] == one(base_resources(), "Deployment", "cosserve-nginx")["spec"]["template"]["spec"]["containers"][0]["image"]



# ---- deploy/k8s's replica list, run by a real nginx >= 1.27.3 ----


def _nginx_with_resolve() -> str | None:
    """An nginx that takes `resolve` in an upstream (>= 1.27.3): $COSSERVE_NGINX, else nginx on PATH."""
    for candidate in (os.environ.get("COSSERVE_NGINX"), shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and os.access(candidate, os.X_OK):
            version = subprocess.run([candidate, "-v"], capture_output=True, text=True, timeout=10).stderr
            found = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", version)
            if found and tuple(map(int, found.groups())) >= (1, 27, 3):
                return candidate
    return None


class _LoopbackDns:
    """A DNS server on 127.0.0.1 for A queries, standing in for kube-dns: a name in `records`
    gets its address (TTL 1 s), any other NXDOMAIN (as a pod that is not ready), AAAA nothing."""

    def __init__(self, records: dict[str, str]) -> None:
        self.records = records
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                data, peer = self.sock.recvfrom(512)
            except (TimeoutError, OSError):
                continue
            end, labels = 12, []
            while end < len(data) and data[end]:
                labels.append(data[end + 1 : end + 1 + data[end]].decode("ascii", "replace"))
                end += 1 + data[end]
            question, (qtype,) = data[12 : end + 5], struct.unpack(">H", data[end + 1 : end + 3])
            address = self.records.get(".".join(labels))
            header = struct.pack(">H", struct.unpack(">H", data[:2])[0])
            if address is None:
                reply = header + struct.pack(">HHHHH", 0x8183, 1, 0, 0, 0) + question
            elif qtype != 1:
                reply = header + struct.pack(">HHHHH", 0x8180, 1, 0, 0, 0) + question
            else:
                answer = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 1, 4) + socket.inet_aton(address)
                reply = header + struct.pack(">HHHHH", 0x8180, 1, 1, 0, 0) + question + answer
            self.sock.sendto(reply, peer)

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(5)
        self.sock.close()


@pytest.mark.slow
def test_k8s_replica_list_follows_the_pods_dns_names(tmp_path: pathlib.Path):
    """deploy/nginx/cosserve.conf with deploy/k8s's replica list, in a real nginx: replicas on
    127.0.0.2-4:50051 under their pod names, served by a loopback DNS in kube-dns's place. A
    replica that comes back on a new address is followed without a reload, one that leaves the
    DNS leaves the ring, and the names of pods that do not exist (3-5) do not stop nginx."""
    from tests.conftest import start_process, stop_process

    import numpy as np

    from cosserve import Client

    nginx_bin = _nginx_with_resolve()
    if nginx_bin is None:
        pytest.skip("needs nginx >= 1.27.3 (`resolve`; Debian's is 1.22): set COSSERVE_NGINX to one")
    names = [f"cosserve-{i}.cosserve.cosserve.svc.cluster.local" for i in range(6)]
    records = {names[i]: f"127.0.0.{i + 2}" for i in range(3)}
    (tmp_path / "logs").mkdir()
    listen = _free_port()
    conf, listens = re.subn(r"(?m)^(\s*listen\s+)50051\b", rf"\g<1>127.0.0.1:{listen}", NGINX_CONF.read_text())
    assert listens == 1
    (tmp_path / "cosserve.conf").write_text(conf)
    dns = _LoopbackDns(records)
    replicas = K8S_REPLICAS.read_text()
    assert replicas.count("resolver kube-dns.kube-system.svc.cluster.local ") == 1
    (tmp_path / nginx_include()).write_text(replicas.replace("kube-dns.kube-system.svc.cluster.local", f"127.0.0.1:{dns.port}"))
    log = tmp_path / "nginx.out"
    servers: dict[str, subprocess.Popen] = {}
    nginx = None

    def upstreams(since: int) -> collections.Counter:
        return collections.Counter(re.findall(r"upstream=(127\.0\.0\.\d+):50051", log.read_text()[since:]))

    def holders(session_id: str) -> list[str]:
        held = []
        for address in servers:
            with Client(f"{address}:50051") as direct:
                try:
                    direct.attach(session_id)
                    held.append(address)
                except CosserveError:
                    pass
        return held

    try:
        for address in records.values():
            servers[address] = start_process("--host", address, "--port", "50051")[0]
        with open(log, "w") as out:
            nginx = subprocess.Popen(
                [nginx_bin, "-p", str(tmp_path), "-c", str(tmp_path / "cosserve.conf"), "-g", f"daemon off; pid {tmp_path}/nginx.pid;"],
                stdout=out, stderr=subprocess.STDOUT,
            )
        with Client(f"127.0.0.1:{listen}") as client:
            deadline = time.monotonic() + 20
            while True:  # nginx up, and the names resolved
                try:
                    client.operators()
                    break
                except CosserveError:
                    assert time.monotonic() < deadline, log.read_text()
                    time.sleep(0.5)
            sessions = [client.session("cpu") for _ in range(24)]
            for session in sessions:
                session.feed_blob("X", np.ones(4, np.float32))
            where = {s.id: holders(s.id) for s in sessions}
            assert all(len(held) == 1 for held in where.values()), where
            assert len({held[0] for held in where.values()}) == 3, where
            mark = len(log.read_text())
            for _ in range(30):
                client.operators()
            assert set(upstreams(mark)) == set(records.values())
            # cosserve-1 comes back on a new address, as a rescheduled pod does.
            stop_process(servers.pop("127.0.0.3"))
            servers["127.0.0.5"] = start_process("--host", "127.0.0.5", "--port", "50051")[0]
            records[names[1]] = "127.0.0.5"
            time.sleep(7)  # valid=5s in the replica list
            mark = len(log.read_text())
            for session in sessions:
                if where[session.id] == ["127.0.0.3"]:
                    with pytest.raises(CosserveError) as lost:
                        session.fetch_blob("X")
                    assert lost.value.code().name == "NOT_FOUND"
                else:
                    assert session.fetch_blob("X").tolist() == [1.0] * 4
            fresh = [client.session("cpu") for _ in range(12)]
            assert "127.0.0.5" in upstreams(mark) and "127.0.0.3" not in upstreams(mark)
            # cosserve-2 leaves the DNS (not ready): no call reaches it.
            del records[names[2]]
            time.sleep(7)
            mark = len(log.read_text())
            fresh += [client.session("cpu") for _ in range(12)]
            for _ in range(20):
                client.operators()
            assert set(upstreams(mark)) == {"127.0.0.2", "127.0.0.5"}
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait(10)
        for proc in servers.values():
            stop_process(proc)
        dns.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the docs name real files ----


def _docs_file_arguments(text: str) -> set[str]:
    named = set(re.findall(r"(?<![\w/])deploy/[\w./-]*[\w/]", text))  # not tests/deploy/
    for command in re.findall(r"(?m)^\s*(?:\$ )?((?:docker|podman|kubectl)\b.*)$", text):
        named.update(re.findall(r"(?:^|\s)(?:-f|-k|--file|--kustomize)\s+(\S+)", command))
    return named


@pytest.mark.parametrize("doc", ["docs/deploy.md", "README.md"])
def test_every_deploy_file_the_docs_name_exists(doc: str):
    named = _docs_file_arguments((ROOT / doc).read_text())
    assert named, doc
    missing = sorted(path for path in named if not (ROOT / path).exists())
    assert not missing, f"{doc} names files that do not exist: {missing}"
    assert not (DEPLOY / "kubernetes.yaml").exists()


if __name__ == "__main__":
    CONFIGMAP.write_text(render_configmap())
    print(f"wrote {CONFIGMAP.relative_to(ROOT)}")
